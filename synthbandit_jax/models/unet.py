"""Stable Diffusion's UNet2DConditionModel (SD 1.x / 2.x configs) in Flax, diffusers-compatible.

What: the noise-prediction UNet of Stable Diffusion 1.x and 2.x, as a Flax module whose
submodule names mirror diffusers' attribute paths, so a diffusers checkpoint converts with
`synthbandit_jax.weights.state_dict.to_flax` and no renaming:

    time_embedding/{linear_1, linear_2}          conv_in
    down_blocks_i/{resnets_j, attentions_j, downsamplers_0/conv}
    mid_block/{resnets_0, attentions_0, resnets_1}
    up_blocks_i/{resnets_j, attentions_j, upsamplers_0/conv}
    conv_norm_out                                conv_out
    attentions_j (Transformer2DModel): norm, proj_in, transformer_blocks_k, proj_out
    transformer_blocks_k (BasicTransformerBlock): norm1, attn1, norm2, attn2, norm3,
        ff/net_0/proj (GEGLU), ff/net_2

Why: the sampling loop of the project runs in JAX; the weights come from diffusers
``save_pretrained`` directories (`load`), and parity with diffusers is tested to < 1e-4
relative error in float32 (tests/test_unet.py).

Forward pass (layout NHWC; diffusers is NCHW, channel concatenations are on the last axis):

    t_emb = sinusoid(t)                      # get_timestep_embedding, float32, dim C0
    emb   = linear_2(silu(linear_1(t_emb)))  # dim 4*C0 (or time_embedding_dim)
    h = conv_in(x);  stack = [h]
    down block i: for each layer  h = resnet(h, emb); h = attn(h, ctx) (cross-attn blocks);
                  stack += [h];  then (not the last block) h = downsample(h); stack += [h]
    mid: h = resnet_0(h, emb); h = attn_0(h, ctx); h = resnet_1(h, emb)
    up block i (layers_per_block + 1 layers): h = concat([h, stack.pop()]); h = resnet(h, emb);
                  h = attn(h, ctx) (cross-attn blocks); then (not the last block) upsample
    out = conv_out(silu(conv_norm_out(h)))

Transformer2DModel: ``x + proj_out(blocks(proj_in(GroupNorm_eps1e-6(x))))`` where proj_in /
proj_out are 1x1 convs (SD1, applied before the flatten / after the unflatten) or Linear on
tokens (SD2, ``use_linear_projection``). BasicTransformerBlock is pre-LayerNorm (eps 1e-5):
``h += attn1(norm1(h)); h += attn2(norm2(h), ctx); h += ff(norm3(h))`` with the GEGLU
feed-forward ``net_2(a * gelu(b))``, ``[a, b] = split(net_0.proj(h))``, exact (erf) GELU.

The diffusers naming quirk: in SD configs ``attention_head_dim`` is the NUMBER of heads. The
rule is diffusers' own: ``heads = num_attention_heads or attention_head_dim`` (per block), and
each Transformer2DModel uses head dimension ``channels // heads``. (diffusers 0.42 itself
refuses a non-null ``num_attention_heads`` in UNet2DConditionModel; we accept it with the same
meaning, heads per block.)

Numerics: params are float32; `dtype` is the compute dtype (bfloat16 on accelerators). The
timestep sinusoid is computed in float32 and then cast, GroupNorm and LayerNorm statistics are
float32, attention softmax is float32 (`upcast_attention` also does q.k in float32). The output
has the compute dtype, like diffusers' (cast to float32 for scheduler arithmetic).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax.models.sd_blocks import (Attention, Downsample2D, GroupNorm, ResnetBlock2D,
                                              Upsample2D)
from synthbandit_jax.weights import state_dict as sdw

Dtype = Any
PyTree = Any

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn",)

# Config keys that must keep diffusers' default value: the feature they switch on (SDXL added
# embeddings, class conditioning, LCM conditioning, ...) is not implemented here.
_MUST_BE_DEFAULT: dict[str, Any] = {
    "addition_embed_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_cond_proj_dim": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "attention_type": "default",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "reverse_transformer_layers_per_block": None,
}


def _per_block(name: str, value: Any, n: int) -> tuple:
  """An int (or None) broadcast to n blocks, or a list/tuple of length n, as a tuple."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNet config {name}={list(value)} has {len(value)} entries; it needs one "
                       f"per down block ({n})")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The UNet architecture (SD 1.x / 2.x). Per-block fields accept an int for all blocks.

  `num_attention_heads` is the number of heads per down block (diffusers' resolved value: the
  ``attention_head_dim`` of SD configs, see `config_from_diffusers`); the mid block uses the
  last entry and the up blocks the reversed list. `time_embedding_dim` None means 4 *
  block_out_channels[0].
  """
  sample_size: int | tuple[int, int] | None = 64
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  layers_per_block: int | tuple[int, ...] = 2
  num_attention_heads: int | tuple[int, ...] = 8
  cross_attention_dim: int = 768
  transformer_layers_per_block: int | tuple[int, ...] = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  center_input_sample: bool = False
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  act_fn: str = "silu"

  def __post_init__(self):
    n = len(self.block_out_channels)
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("block_out_channels", tuple(int(c) for c in self.block_out_channels))
    set_("down_block_types", tuple(self.down_block_types))
    set_("up_block_types", tuple(self.up_block_types))
    if isinstance(self.sample_size, list):
      set_("sample_size", tuple(self.sample_size))
    for k in ("layers_per_block", "num_attention_heads", "transformer_layers_per_block"):
      set_(k, tuple(int(v) for v in _per_block(k, getattr(self, k), n)))
    if n == 0:
      raise ValueError("UNet config block_out_channels is empty")
    for k, types in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
      value = getattr(self, k)
      if len(value) != n:
        raise ValueError(f"UNet config {k}={list(value)} has {len(value)} entries, "
                         f"block_out_channels has {n}; they must match")
      for t in value:
        if t not in types:
          raise ValueError(f"UNet config {k} contains {t!r}: only {list(types)} are supported")
    if self.mid_block_type not in MID_TYPES:
      raise ValueError(f"UNet config mid_block_type={self.mid_block_type!r} is not supported "
                       f"(only {list(MID_TYPES)})")
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"UNet config act_fn={self.act_fn!r} is not supported (only 'silu')")
    if self.downsample_padding not in (0, 1):
      raise ValueError(f"UNet config downsample_padding={self.downsample_padding} is not "
                       "supported (0 or 1)")
    for k in ("conv_in_kernel", "conv_out_kernel"):
      if getattr(self, k) % 2 != 1:
        raise ValueError(f"UNet config {k}={getattr(self, k)} must be odd")
    for i, (c, h) in enumerate(zip(self.block_out_channels, self.num_attention_heads)):
      if h <= 0 or c % h:
        raise ValueError(f"UNet config: block {i} has {c} channels, which do not split into "
                         f"{h} attention heads (attention_head_dim / num_attention_heads)")
      if c % self.norm_num_groups:
        raise ValueError(f"UNet config: block {i} has {c} channels, not a multiple of "
                         f"norm_num_groups={self.norm_num_groups}")

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def num_upsamplers(self) -> int:
    return len(self.block_out_channels) - 1


def config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
  """A diffusers ``unet/config.json`` dict -> UNetConfig.

  Follows diffusers' construction: per-block values are broadcast from ints, and the number of
  heads is ``num_attention_heads or attention_head_dim`` (SD configs store the head COUNT in
  ``attention_head_dim``). Keys diffusers does not know (and ``_class_name`` etc.) are ignored,
  as diffusers ignores them. Raises ValueError naming the key and value for anything that
  switches on a feature this module does not implement (SDXL ``addition_embed_type``, class
  embeddings, ``only_cross_attention``, other block types, ...).
  """
  cfg = dict(cfg)
  for key, default in _MUST_BE_DEFAULT.items():
    if key in cfg and cfg[key] != default:
      raise ValueError(f"UNet config key {key}={cfg[key]!r} is not supported by "
                       f"synthbandit_jax.models.unet (only {default!r}; SD 1.x/2.x configs)")
  only = cfg.get("only_cross_attention", False)
  if any(only) if isinstance(only, (list, tuple)) else only:
    raise ValueError(f"UNet config key only_cross_attention={only!r} is not supported (only False)")
  if cfg.get("mid_block_only_cross_attention"):
    raise ValueError("UNet config key mid_block_only_cross_attention="
                     f"{cfg['mid_block_only_cross_attention']!r} is not supported (only False)")
  if cfg.get("norm_num_groups", 32) is None:
    raise ValueError("UNet config key norm_num_groups=None is not supported (no output norm); "
                     "SD 1.x/2.x use 32")
  blocks = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
  n = len(blocks)
  down = tuple(cfg.get("down_block_types", UNetConfig.down_block_types))
  up = tuple(cfg.get("up_block_types", UNetConfig.up_block_types))
  strip = lambda t: t[7:] if t.startswith("UNetRes") else t  # diffusers' alias rule
  for key, value, types in (("down_block_types", down, DOWN_TYPES),
                            ("up_block_types", up, UP_TYPES)):
    for t in value:
      if strip(t) not in types:
        raise ValueError(f"UNet config key {key} contains {t!r}, which is not supported "
                         f"(only {list(types)})")
  mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
  if mid not in MID_TYPES:
    raise ValueError(f"UNet config key mid_block_type={mid!r} is not supported "
                     f"(only {list(MID_TYPES)})")
  act = cfg.get("act_fn", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"UNet config key act_fn={act!r} is not supported (only 'silu')")
  head_dim = cfg.get("attention_head_dim", 8)
  heads = cfg.get("num_attention_heads") or head_dim  # diffusers' rule, see module docstring
  heads = _per_block("num_attention_heads" if cfg.get("num_attention_heads")
                     else "attention_head_dim", heads, n)
  if any(h is None for h in heads):
    raise ValueError(f"UNet config key attention_head_dim={head_dim!r}: every block needs a head "
                     "count")
  cross = cfg.get("cross_attention_dim", 1280)
  if isinstance(cross, (list, tuple)):
    _per_block("cross_attention_dim", cross, n)
    if len(set(cross)) != 1:
      raise ValueError(f"UNet config key cross_attention_dim={list(cross)}: per-block "
                       "different context widths are not supported (one encoder_hidden_states)")
    cross = cross[0]
  tlpb = cfg.get("transformer_layers_per_block", 1)
  if isinstance(tlpb, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tlpb):
    raise ValueError(f"UNet config key transformer_layers_per_block={tlpb!r}: nested per-layer "
                     "lists are not supported")
  return UNetConfig(
      sample_size=cfg.get("sample_size"),
      in_channels=int(cfg.get("in_channels", 4)),
      out_channels=int(cfg.get("out_channels", 4)),
      block_out_channels=blocks,
      down_block_types=tuple(strip(t) for t in down),
      up_block_types=tuple(strip(t) for t in up),
      mid_block_type=mid,
      layers_per_block=cfg.get("layers_per_block", 2),
      num_attention_heads=heads,
      cross_attention_dim=int(cross),
      transformer_layers_per_block=tlpb,
      use_linear_projection=bool(cfg.get("use_linear_projection", False)),
      upcast_attention=bool(cfg.get("upcast_attention", False)),
      norm_num_groups=int(cfg.get("norm_num_groups", 32)),
      norm_eps=float(cfg.get("norm_eps", 1e-5)),
      flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
      freq_shift=cfg.get("freq_shift", 0),
      downsample_padding=int(cfg.get("downsample_padding", 1)),
      mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
      center_input_sample=bool(cfg.get("center_input_sample", False)),
      time_embedding_dim=cfg.get("time_embedding_dim"),
      conv_in_kernel=int(cfg.get("conv_in_kernel", 3)),
      conv_out_kernel=int(cfg.get("conv_out_kernel", 3)),
      act_fn=act,
  )


# ----------------------------------------------------------------------------- modules

def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
  """diffusers' get_timestep_embedding on a (B,) array, in float32: (B, dim).

  ``freqs_k = exp(-ln(max_period) * k / (half - shift))``, k < half = dim // 2;
  ``emb = [sin(t f), cos(t f)]`` (``[cos, sin]`` with flip_sin_to_cos), zero-padded if odd.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  exponent = exponent / (half - downscale_freq_shift)
  freqs = jnp.exp(exponent)
  emb = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None, :]
  emb = scale * emb
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding, no cond_proj / post_act)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.silu(_dense(self.features, "linear_1", self.dtype)(x))
    return _dense(self.features, "linear_2", self.dtype)(x)


class GEGLU(nn.Module):
  """``a * gelu(b)`` with ``[a, b] = split(proj(x), 2)`` (exact erf GELU, as torch F.gelu)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a, b = jnp.split(_dense(2 * self.features, "proj", self.dtype)(x), 2, axis=-1)
    return a * nn.gelu(b, approximate=False)


class FeedForward(nn.Module):
  """diffusers FeedForward with GEGLU: net_0 (GEGLU, 4x width), net_1 (dropout), net_2."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    h = GEGLU(self.mult * dim, self.dtype, name="net_0")(x)
    return _dense(dim, "net_2", self.dtype)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""
  heads: int
  dim_head: int
  upcast: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    attn = lambda name: Attention(self.heads, self.dim_head, upcast=self.upcast,
                                  attention_impl=self.attention_impl, dtype=self.dtype, name=name)
    x = attn("attn1")(_layer_norm("norm1", self.dtype)(x)) + x
    x = attn("attn2")(_layer_norm("norm2", self.dtype)(x), context) + x
    x = FeedForward(dtype=self.dtype, name="ff")(_layer_norm("norm3", self.dtype)(x)) + x
    return x


class Transformer2DModel(nn.Module):
  """GroupNorm (eps 1e-6) -> proj_in -> transformer blocks -> proj_out, plus the input.

  proj_in / proj_out are 1x1 convs (SD1) or Linear layers on tokens (SD2,
  `use_linear_projection`); both keep diffusers' parameter shapes.
  """
  heads: int
  dim_head: int
  num_layers: int = 1
  use_linear_projection: bool = False
  groups: int = 32
  upcast: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    inner = self.heads * self.dim_head
    h = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x)
    conv1x1 = lambda f, name: nn.Conv(f, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                                      name=name)
    if self.use_linear_projection:
      h = _dense(inner, "proj_in", self.dtype)(h.reshape(b, hh * ww, c))
    else:
      h = conv1x1(inner, "proj_in")(h).reshape(b, hh * ww, inner)
    for k in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, self.dim_head, self.upcast, self.attention_impl,
                                self.dtype, name=f"transformer_blocks_{k}")(h, context)
    if self.use_linear_projection:
      h = _dense(c, "proj_out", self.dtype)(h).reshape(b, hh, ww, c)
    else:
      h = conv1x1(c, "proj_out")(h.reshape(b, hh, ww, inner))
    return h + x.astype(h.dtype)


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (`cross_attention`) or DownBlock2D. Returns (h, skip states)."""
  config: UNetConfig
  index: int
  cross_attention: bool
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, emb: jax.Array, context: jax.Array
               ) -> tuple[jax.Array, list[jax.Array]]:
    c, i = self.config, self.index
    ch = c.block_out_channels[i]
    heads = c.num_attention_heads[i]
    states = []
    for j in range(c.layers_per_block[i]):
      h = ResnetBlock2D(ch, c.norm_num_groups, c.norm_eps, dtype=self.dtype,
                        name=f"resnets_{j}")(h, emb)
      if self.cross_attention:
        h = Transformer2DModel(heads, ch // heads, c.transformer_layers_per_block[i],
                               c.use_linear_projection, c.norm_num_groups, c.upcast_attention,
                               self.attention_impl, self.dtype, name=f"attentions_{j}")(h, context)
      states.append(h)
    if i < len(c.block_out_channels) - 1:
      h = Downsample2D(ch, pad_right_bottom=c.downsample_padding == 0, dtype=self.dtype,
                       name="downsamplers_0")(h)
      states.append(h)
    return h, states


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnets_0 -> attentions_0 -> resnets_1."""
  config: UNetConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, emb: jax.Array, context: jax.Array) -> jax.Array:
    c = self.config
    ch, heads = c.block_out_channels[-1], c.num_attention_heads[-1]
    res = lambda name: ResnetBlock2D(ch, c.norm_num_groups, c.norm_eps,
                                     output_scale_factor=c.mid_block_scale_factor,
                                     dtype=self.dtype, name=name)
    h = res("resnets_0")(h, emb)
    h = Transformer2DModel(heads, ch // heads, c.transformer_layers_per_block[-1],
                           c.use_linear_projection, c.norm_num_groups, c.upcast_attention,
                           self.attention_impl, self.dtype, name="attentions_0")(h, context)
    return res("resnets_1")(h, emb)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D (`cross_attention`) or UpBlock2D; `index` counts up blocks."""
  config: UNetConfig
  index: int
  cross_attention: bool
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, skips: Sequence[jax.Array], emb: jax.Array,
               context: jax.Array) -> jax.Array:
    c, i = self.config, self.index
    n = len(c.block_out_channels)
    ch = c.block_out_channels[n - 1 - i]
    heads = c.num_attention_heads[n - 1 - i]
    layers = c.transformer_layers_per_block[n - 1 - i]
    skips = list(skips)
    for j in range(c.layers_per_block[n - 1 - i] + 1):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = ResnetBlock2D(ch, c.norm_num_groups, c.norm_eps, dtype=self.dtype,
                        name=f"resnets_{j}")(h, emb)
      if self.cross_attention:
        h = Transformer2DModel(heads, ch // heads, layers, c.use_linear_projection,
                               c.norm_num_groups, c.upcast_attention, self.attention_impl,
                               self.dtype, name=f"attentions_{j}")(h, context)
    if i < n - 1:
      h = Upsample2D(ch, dtype=self.dtype, name="upsamplers_0")(h)
    return h


class UNet2DConditionModel(nn.Module):
  """Stable Diffusion's conditional UNet (diffusers UNet2DConditionModel, SD 1.x / 2.x).

  Attributes:
    config: the architecture.
    dtype: compute dtype (params stay float32).
    attention_impl: passed to `sd_blocks.attention` (None: cuDNN for bf16 on GPU, else XLA).
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int,
               encoder_hidden_states: jax.Array) -> jax.Array:
    """Noise prediction.

    Args:
      sample: latents (B, H, W, in_channels); H and W multiples of 2**(blocks - 1).
      timesteps: a scalar or a (B,) array, integer or float.
      encoder_hidden_states: text-encoder states (B, T, cross_attention_dim).
    Returns:
      (B, H, W, out_channels) in the compute dtype.
    """
    c = self.config
    b, hh, ww, _ = sample.shape
    factor = 2 ** c.num_upsamplers
    if hh % factor or ww % factor:
      raise ValueError(f"UNet sample is {hh}x{ww}; height and width must be multiples of "
                       f"{factor} (2**(number of blocks - 1)); pad or resize the latents")
    if encoder_hidden_states.shape[-1] != c.cross_attention_dim:
      raise ValueError(f"encoder_hidden_states has width {encoder_hidden_states.shape[-1]}, "
                       f"the UNet config has cross_attention_dim={c.cross_attention_dim}")
    t = jnp.asarray(timesteps)
    if t.ndim == 0 or t.shape == (1,):
      t = jnp.broadcast_to(t.reshape(()), (b,))
    elif t.shape != (b,):
      raise ValueError(f"timesteps must be a scalar or a ({b},) array, got shape {t.shape}")

    x = sample.astype(self.dtype)
    if c.center_input_sample:
      x = 2 * x - 1.0
    t_emb = timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                               downscale_freq_shift=c.freq_shift)
    emb = TimestepEmbedding(c.time_embed_dim, self.dtype,
                            name="time_embedding")(t_emb.astype(self.dtype))
    context = encoder_hidden_states.astype(self.dtype)

    k = c.conv_in_kernel
    h = nn.Conv(c.block_out_channels[0], (k, k), padding=((k // 2, k // 2),) * 2,
                dtype=self.dtype, param_dtype=jnp.float32, name="conv_in")(x)
    skips = [h]
    for i, kind in enumerate(c.down_block_types):
      h, states = DownBlock(c, i, kind == "CrossAttnDownBlock2D", self.attention_impl,
                            self.dtype, name=f"down_blocks_{i}")(h, emb, context)
      skips.extend(states)
    h = MidBlock(c, self.attention_impl, self.dtype, name="mid_block")(h, emb, context)
    for i, kind in enumerate(c.up_block_types):
      n_res = c.layers_per_block[len(c.block_out_channels) - 1 - i] + 1
      block_skips, skips = skips[-n_res:], skips[:-n_res]
      h = UpBlock(c, i, kind == "CrossAttnUpBlock2D", self.attention_impl, self.dtype,
                  name=f"up_blocks_{i}")(h, block_skips, emb, context)
    h = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, self.dtype, name="conv_norm_out")(h))
    k = c.conv_out_kernel
    return nn.Conv(c.out_channels, (k, k), padding=((k // 2, k // 2),) * 2, dtype=self.dtype,
                   param_dtype=jnp.float32, name="conv_out")(h)


# ----------------------------------------------------------------------------- weights

def param_shapes(config: UNetConfig) -> PyTree:
  """The params tree of `config` as jax.ShapeDtypeStructs (no memory, no compute)."""
  s = 2 ** config.num_upsamplers
  sample = jax.ShapeDtypeStruct((1, s, s, config.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
  module = UNet2DConditionModel(config)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), sample, t, ctx)["params"]


def params_from_torch(config: UNetConfig, state_dict: Mapping[str, Any],
                      where: str = "unet") -> PyTree:
  """A diffusers UNet2DConditionModel state dict (numpy or torch tensors) -> float32 params.

  Raises `state_dict.WeightsError` naming the parameter for a missing, unused or mis-shaped
  tensor (`where` names the source, e.g. the checkpoint directory).
  """
  params = sdw.to_flax(state_dict, param_shapes(config), where=where)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def state_dict_from_params(config: UNetConfig, params: PyTree) -> dict[str, np.ndarray]:
  """The inverse of `params_from_torch`: diffusers-named float32 numpy tensors (NCHW kernels)."""
  if set(params) == {"params"}:
    params = params["params"]
  want = {k: tuple(v.shape) for k, v in _flat(param_shapes(config)).items()}
  got = {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or bad:
    raise sdw.WeightsError(
        "params do not match the UNet config: "
        f"missing {missing[:5]}, unexpected {extra[:5]}, "
        f"mis-shaped {[(k, got[k], want[k]) for k in bad[:5]]} (got, want)")
  return sdw.from_flax(params)


def load(directory: str | os.PathLike, dtype: Dtype = jnp.float32
         ) -> tuple[UNet2DConditionModel, PyTree, UNetConfig]:
  """A diffusers ``save_pretrained`` UNet directory (config.json + weights) -> (module, params,
  config). Params are float32; `dtype` is the module's compute dtype."""
  raw = sdw.read_config(directory)
  cls = raw.get("_class_name", "UNet2DConditionModel")
  if cls != "UNet2DConditionModel":
    raise ValueError(f"{os.fspath(directory)}/config.json describes a {cls}, not a "
                     "UNet2DConditionModel (pass the pipeline's unet/ directory)")
  try:
    config = config_from_diffusers(raw)
  except ValueError as e:
    raise ValueError(f"{os.fspath(directory)}/config.json: {e}") from e
  sd = sdw.read_weights(directory)
  params = params_from_torch(config, sd, where=os.fspath(directory))
  return UNet2DConditionModel(config, dtype=dtype), params, config
