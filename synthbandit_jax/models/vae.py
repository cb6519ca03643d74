"""Stable Diffusion's VAE (diffusers ``AutoencoderKL``) in Flax linen, NHWC.

Architecture (diffusers ``Encoder`` / ``Decoder`` with DownEncoderBlock2D / UpDecoderBlock2D,
``act_fn="silu"``; every GroupNorm and resnet uses eps 1e-6):

    encoder: conv_in (3x3, C_0)
             down_blocks_i (i = 0..n-1): resnets_0..L-1 (ResnetBlock2D, no time embedding)
                                         downsamplers_0 (pad right/bottom by 1, 3x3 stride 2),
                                         not on the last block
             mid_block: resnets_0, attentions_0 (1-head spatial self-attention), resnets_1
             conv_norm_out (GroupNorm), SiLU, conv_out (3x3, 2 * latent_channels)
    quant_conv (1x1, 2z -> 2z)           -> mean, logvar = split(channels); logvar in [-30, 20]
    post_quant_conv (1x1, z -> z)
    decoder: conv_in (3x3, C_{n-1}), mid_block (as above)
             up_blocks_i (channels reversed): resnets_0..L (L+1 of them), upsamplers_0
                                              (nearest x2, 3x3 conv), not on the last block
             conv_norm_out, SiLU, conv_out (3x3, out_channels)

Submodule names mirror the diffusers attribute paths (``decoder.up_blocks.0.resnets.1`` is
``decoder/up_blocks_0/resnets_1``), so `state_dict.to_flax` maps a diffusers checkpoint onto
the params with no renaming; the mid-block attention follows sd_blocks.Attention's spatial
form (``group_norm``, ``to_q/to_k/to_v`` with bias, ``to_out_0``). Heads = channels //
attention_head_dim with diffusers' attention_head_dim = block_out_channels[-1], i.e. 1 head.

Latent convention (diffusers pipelines):

    encode: z = (posterior - shift_factor) * scaling_factor   (shift 0 when None; SD1/2 use
            scaling_factor 0.18215, SDXL 0.13025); posterior = mean, or mean + exp(logvar/2) * eps
    decode: image = decoder(z / scaling_factor + shift_factor), in [-1, 1] (unclipped)
    to uint8: round(clip(x * 0.5 + 0.5, 0, 1) * 255) in float32, round-half-to-even -- the
            exact arithmetic of VaeImageProcessor.postprocess(..., "pil") (denormalize, then
            numpy_to_pil's ``(images * 255).round().astype("uint8")``); equal to
            round((clip(x, -1, 1) + 1) * 127.5) up to float32 rounding of the product.

Params are float32; ``dtype`` is the compute dtype (bfloat16 optional). GroupNorm statistics
and the attention softmax are float32 whatever the compute dtype; `encode` / `decode` return
float32.

Old diffusers checkpoints name the mid-block attention ``query/key/value/proj_attn`` (some
conversions keep the 1x1-conv weights of rank 4); `params_from_torch` renames them to
``to_q/to_k/to_v/to_out.0`` like diffusers' ``_fix_state_dict_keys_on_load`` and squeezes
(O, I, 1, 1) -> (O, I).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax import xla_options
from synthbandit_jax.models import sd_blocks
from synthbandit_jax.weights import state_dict as sdict

PyTree = Any
Dtype = Any

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of a diffusers ``AutoencoderKL`` (names follow its config.json).

  Hashable (tuples only), so it can be a Flax module attribute / static jit argument.
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  down_block_types: tuple[str, ...] = (DOWN_BLOCK,) * 4
  up_block_types: tuple[str, ...] = (UP_BLOCK,) * 4
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  sample_size: int | tuple[int, ...] = 512

  def __post_init__(self):
    n = len(self.block_out_channels)
    if n == 0:
      raise ValueError("VAEConfig.block_out_channels must name at least one block")
    for field in ("down_block_types", "up_block_types"):
      types = getattr(self, field)
      if len(types) != n:
        raise ValueError(f"VAEConfig.{field} has {len(types)} entries but block_out_channels "
                         f"has {n}; they must have the same length")
    for t in self.down_block_types:
      if t != DOWN_BLOCK:
        raise ValueError(f"VAEConfig.down_block_types: block type {t!r} is not supported "
                         f"(only {DOWN_BLOCK!r}, the Stable Diffusion VAE's)")
    for t in self.up_block_types:
      if t != UP_BLOCK:
        raise ValueError(f"VAEConfig.up_block_types: block type {t!r} is not supported "
                         f"(only {UP_BLOCK!r}, the Stable Diffusion VAE's)")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"VAEConfig: block_out_channels entry {c} does not split into "
                         f"norm_num_groups={self.norm_num_groups} groups")
    if self.layers_per_block < 1:
      raise ValueError(f"VAEConfig.layers_per_block must be >= 1, got {self.layers_per_block}")
    if not self.scaling_factor:
      raise ValueError("VAEConfig.scaling_factor must be non-zero")

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side (8 for Stable Diffusion)."""
    return 2 ** (len(self.block_out_channels) - 1)


# config.json keys -> VAEConfig fields. Required keys define parameter shapes; optional ones
# take diffusers' AutoencoderKL defaults when absent (old configs lack e.g. scaling_factor).
_REQUIRED_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
                  "layers_per_block", "down_block_types", "up_block_types")
_OPTIONAL_DEFAULTS = {"norm_num_groups": 32, "scaling_factor": 0.18215, "shift_factor": None,
                      "use_quant_conv": True, "use_post_quant_conv": True,
                      "mid_block_add_attention": True, "sample_size": 32}
# Keys that are understood but do not change the model (or must have a fixed value).
_FIXED_KEYS = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_IGNORED_KEYS = ("force_upcast",)


def config_from_diffusers(cfg: Mapping[str, Any], where: str = "vae config") -> VAEConfig:
  """A diffusers ``vae/config.json`` dict -> VAEConfig.

  Keys starting with "_" (``_class_name``, ``_diffusers_version`` ...) are metadata; a
  ``_class_name`` other than AutoencoderKL is an error. ``force_upcast`` is ignored (the
  compute dtype is the caller's choice). Raises ValueError naming missing, unknown or
  unsupported keys (`where` names the source, e.g. the file).
  """
  cls = cfg.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise ValueError(f"{where}: _class_name is {cls!r}; only diffusers' 'AutoencoderKL' "
                     "(the Stable Diffusion VAE) is supported")
  missing = [k for k in _REQUIRED_KEYS if k not in cfg]
  if missing:
    raise ValueError(f"{where}: missing required key(s) {missing}; a diffusers AutoencoderKL "
                     "config.json has them")
  known = set(_REQUIRED_KEYS) | set(_OPTIONAL_DEFAULTS) | set(_FIXED_KEYS) | set(_IGNORED_KEYS)
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
  if unknown:
    raise ValueError(f"{where}: unsupported key(s) {unknown}; this AutoencoderKL port knows "
                     f"{sorted(known)} (remove the key if it has no effect on the model)")
  for key, want in _FIXED_KEYS.items():
    if cfg.get(key, want) != want:
      raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (only {want!r})")
  vals = {k: cfg[k] for k in _REQUIRED_KEYS}
  vals.update({k: cfg.get(k, d) for k, d in _OPTIONAL_DEFAULTS.items()})
  for k in ("block_out_channels", "down_block_types", "up_block_types"):
    if not isinstance(vals[k], (list, tuple)):
      raise ValueError(f"{where}: {k} must be a list, got {vals[k]!r}")
    vals[k] = tuple(vals[k])
  if isinstance(vals["sample_size"], list):
    vals["sample_size"] = tuple(vals["sample_size"])
  if vals["shift_factor"] is not None:
    vals["shift_factor"] = float(vals["shift_factor"])
  vals["scaling_factor"] = float(vals["scaling_factor"])
  try:
    return VAEConfig(**vals)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


# ------------------------------------------------------------------------------ modules


def _conv(features: int, kernel: int, name: str | None, dtype: Dtype) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                 param_dtype=jnp.float32, name=name)


class MidBlock(nn.Module):
  """diffusers UNetMidBlock2D as the VAE uses it: resnet, (1-head attention), resnet."""
  channels: int
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    res = lambda i: sd_blocks.ResnetBlock2D(self.channels, self.groups, EPS, use_time_emb=False,
                                            dtype=self.dtype, name=f"resnets_{i}")
    x = res(0)(x)
    if self.add_attention:
      # attention_head_dim = channels in diffusers' Encoder/Decoder -> heads = 1.
      x = sd_blocks.Attention(heads=1, dim_head=self.channels, qkv_bias=True,
                              spatial_norm_groups=self.groups, eps=EPS, dtype=self.dtype,
                              name="attentions_0")(x)
    return res(1)(x)


class DownEncoderBlock2D(nn.Module):
  channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = sd_blocks.ResnetBlock2D(self.channels, self.groups, EPS, use_time_emb=False,
                                  dtype=self.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = sd_blocks.Downsample2D(self.channels, pad_right_bottom=True, dtype=self.dtype,
                                 name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = sd_blocks.ResnetBlock2D(self.channels, self.groups, EPS, use_time_emb=False,
                                  dtype=self.dtype, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = sd_blocks.Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) before quant_conv."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    chans = c.block_out_channels
    x = _conv(chans[0], 3, "conv_in", self.dtype)(x.astype(self.dtype))
    for i, ch in enumerate(chans):
      x = DownEncoderBlock2D(ch, c.layers_per_block, c.norm_num_groups,
                             add_downsample=i < len(chans) - 1, dtype=self.dtype,
                             name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], c.norm_num_groups, c.mid_block_add_attention, self.dtype,
                 name="mid_block")(x)
    x = nn.silu(sd_blocks.GroupNorm(c.norm_num_groups, EPS, self.dtype, name="conv_norm_out")(x))
    return _conv(2 * c.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """Latent (B, h, w, latent_channels) after post_quant_conv -> image (B, h*f, w*f, out)."""
  config: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c = self.config
    chans = tuple(reversed(c.block_out_channels))
    x = _conv(chans[0], 3, "conv_in", self.dtype)(z.astype(self.dtype))
    x = MidBlock(chans[0], c.norm_num_groups, c.mid_block_add_attention, self.dtype,
                 name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = UpDecoderBlock2D(ch, c.layers_per_block + 1, c.norm_num_groups,
                           add_upsample=i < len(chans) - 1, dtype=self.dtype,
                           name=f"up_blocks_{i}")(x)
    x = nn.silu(sd_blocks.GroupNorm(c.norm_num_groups, EPS, self.dtype, name="conv_norm_out")(x))
    return _conv(c.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL: `encode` -> (mean, logvar), `decode` -> image; NHWC, float32 out.

  Tiling / slicing of diffusers are not implemented (whole-image passes only).
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    self.encoder = Encoder(c, self.dtype)
    self.decoder = Decoder(c, self.dtype)
    if c.use_quant_conv:
      self.quant_conv = _conv(2 * c.latent_channels, 1, None, self.dtype)
    if c.use_post_quant_conv:
      self.post_quant_conv = _conv(c.latent_channels, 1, None, self.dtype)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images (B, H, W, C) in [-1, 1] -> (mean, logvar) of the posterior, float32 each
    (B, H/f, W/f, latent_channels); logvar clipped to [-30, 20] as diffusers does."""
    h = self.encoder(x)
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, C), float32."""
    z = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mean (diffusers' forward, sample_posterior=False)."""
    mean, _ = self.encode(x)
    return self.decode(mean)


# ------------------------------------------------------------------------------ latents


# The model (a hashable linen dataclass: config + dtype) is a static argument, so each
# (config, dtype) compiles once per input shape. The jits are made on first use, not at
# import: `xla_options.jit` picks the backend's compiler options (the CPU convolution
# setting), which initialises JAX's backends. Under another trace (the sampler's jit)
# the functions are inlined instead: compiler options are only allowed on a top-level jit.
def _encode_apply(model: AutoencoderKL, params: PyTree, x: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  return model.apply({"params": params}, x, method=AutoencoderKL.encode)


def _decode_apply(model: AutoencoderKL, params: PyTree, z: jax.Array) -> jax.Array:
  return model.apply({"params": params}, z, method=AutoencoderKL.decode)


@functools.cache
def _jitted(fn: Any) -> Any:
  return xla_options.jit(fn, static_argnums=0)


def _call(fn: Any, model: AutoencoderKL, params: PyTree, x: jax.Array) -> Any:
  # compiler_options are only allowed on a top-level jit: under a trace, inline.
  if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves((params, x))):
    return fn(model, params, x)
  return _jitted(fn)(model, params, x)


def _encode(model: AutoencoderKL, params: PyTree, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _call(_encode_apply, model, params, x)


def _decode(model: AutoencoderKL, params: PyTree, z: jax.Array) -> jax.Array:
  return _call(_decode_apply, model, params, z)


def images_to_model_input(images: Any) -> jax.Array:
  """uint8 images in [0, 255] -> float32 in [-1, 1] (x / 255 * 2 - 1, as VaeImageProcessor's
  preprocess does); float images are taken to be in [-1, 1] already and only cast."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0 * 2.0 - 1.0
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
  return images.astype(jnp.float32)


def encode_to_latents(model: AutoencoderKL, params: PyTree, images: Any,
                      rng: jax.Array | None = None) -> jax.Array:
  """Images (B, H, W, C), uint8 or float in [-1, 1] -> diffusion latents (scaled, float32).

  ``rng=None`` takes the posterior mean (deterministic), else a sample mean + std * N(0, 1).
  The result is ``(z - shift_factor) * scaling_factor`` (shift only when set).
  """
  mean, logvar = _encode(model, params, images_to_model_input(images))
  z = mean
  if rng is not None:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
  c = model.config
  if c.shift_factor is not None:
    z = z - c.shift_factor
  return z * c.scaling_factor


def decode_latents(model: AutoencoderKL, params: PyTree, latents: jax.Array) -> jax.Array:
  """Scaled diffusion latents -> images (B, H, W, C) float32, nominally in [-1, 1] (unclipped).

  Undoes `encode_to_latents`' scaling: ``z / scaling_factor (+ shift_factor)``, then decodes.
  """
  c = model.config
  z = jnp.asarray(latents, jnp.float32) / c.scaling_factor
  if c.shift_factor is not None:
    z = z + c.shift_factor
  return _decode(model, params, z)


def to_uint8(images: Any) -> np.ndarray:
  """Images in [-1, 1] -> uint8 numpy, with diffusers' VaeImageProcessor arithmetic.

  ``round(clip(x * 0.5 + 0.5, 0, 1) * 255)`` in float32 with numpy's round-half-to-even,
  i.e. denormalize + numpy_to_pil's ``(images * 255).round().astype("uint8")``; this is
  round((clip(x, -1, 1) + 1) * 127.5) up to float32 rounding.
  """
  x = np.asarray(images, np.float32)
  x = np.clip(x * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
  return (x * np.float32(255)).round().astype(np.uint8)


# ------------------------------------------------------------------------------ weights

_LEGACY_ATTN = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\."
    r"(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy(key: str) -> str:
  m = _LEGACY_ATTN.match(key)
  if not m:
    return key
  return f"{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.{m.group(3)}"


def param_shapes(config: VAEConfig) -> PyTree:
  """The params tree of `AutoencoderKL(config)` as ShapeDtypeStructs (no computation)."""
  side = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]


def params_from_torch(config: VAEConfig, state_dict: Mapping[str, Any],
                      where: str = "vae") -> dict:
  """A diffusers AutoencoderKL state dict (torch names and layouts) -> Flax params (float32).

  Legacy mid-attention names (query/key/value/proj_attn) are renamed and their (O, I, 1, 1)
  weights squeezed. Raises state_dict.WeightsError naming the parameter on a missing, unused or
  mis-shaped tensor (`where` names the source in the message).
  """
  fixed = {}
  for key, value in state_dict.items():
    new = _rename_legacy(key)
    shape = tuple(np.shape(value))
    if new != key and new.endswith(".weight") and len(shape) == 4 and shape[2:] == (1, 1):
      value = value[:, :, 0, 0]  # the 1x1-conv form of the old q/k/v/proj weights
    if new in fixed:
      raise sdict.WeightsError(f"{where}: tensor {key!r} and another tensor both map to "
                               f"{new!r} (mixed old and new attention names?)")
    fixed[new] = value
  return sdict.to_flax(fixed, param_shapes(config), where=where)


def state_dict_from_params(config: VAEConfig, params: PyTree) -> dict[str, np.ndarray]:
  """Flax params -> a diffusers AutoencoderKL state dict (numpy float32, torch layouts)."""
  expected = param_shapes(config)
  got = jax.tree.map(lambda a: tuple(np.shape(a)), params)
  want = jax.tree.map(lambda a: tuple(a.shape), expected)
  if got != want:
    raise sdict.WeightsError("params do not match the VAEConfig's parameter tree; build them "
                             "with params_from_torch(config, ...) or AutoencoderKL(config).init")
  return sdict.from_flax(params)


def load(directory: str | os.PathLike, dtype: Dtype = jnp.float32
         ) -> tuple[AutoencoderKL, dict, VAEConfig]:
  """(model, params, config) from a diffusers ``save_pretrained`` VAE directory.

  `directory` holds config.json and diffusion_pytorch_model.safetensors (or .bin / shards);
  for a full pipeline pass its ``vae`` subfolder. `dtype` is the compute dtype; params are
  float32.
  """
  cfg = sdict.read_config(directory)
  config = config_from_diffusers(cfg, where=f"{os.fspath(directory)}/config.json")
  weights = sdict.read_weights(directory)
  params = params_from_torch(config, weights, where=os.fspath(directory))
  return AutoencoderKL(config, dtype=dtype), params, config
