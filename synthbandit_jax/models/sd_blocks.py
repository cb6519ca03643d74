"""Building blocks shared by the Stable Diffusion UNet and VAE (diffusers-compatible naming).

Layout is NHWC (Flax); submodule names mirror the diffusers attribute paths so that
`synthbandit_jax.weights.state_dict.to_flax` maps a diffusers checkpoint onto them with no
renaming (``to_out.0`` is the Flax module ``to_out_0``).

Numerics follow diffusers in float32: GroupNorm uses two-pass statistics (not E[x^2]-E[x]^2)
and always normalises in float32; attention softmax is float32 whatever the compute dtype.
`dtype` is the compute dtype (bfloat16 on GPU/TPU behind a config flag); params stay float32.

Attention goes through `jax.nn.dot_product_attention`. ``attention_impl=None`` picks cuDNN's
fused kernel on GPU for bf16/fp16 inputs (about 7x faster than XLA's default on SD shapes,
see DESIGN.md) and XLA elsewhere (CPU, TPU, float32).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def resolve_attention_impl(impl: str | None, dtype: Dtype, head_dim: int = 64) -> str | None:
  """The `implementation=` for jax.nn.dot_product_attention: 'cudnn' where it can run.

  Automatic choice (None / "auto"): cuDNN on GPU for bf16/fp16 inputs whose head size its
  fused kernel takes (a multiple of 8, at most 128; SD 1.5's deepest blocks have 160, which
  then take XLA's path), XLA otherwise.
  """
  if impl not in (None, "auto", "xla", "cudnn"):
    raise ValueError(f"attention_impl must be one of None/'auto', 'xla', 'cudnn', got {impl!r}")
  if impl in (None, "auto"):
    on_gpu = jax.default_backend() == "gpu"
    fits = head_dim % 8 == 0 and head_dim <= 128
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if on_gpu and half and fits else "xla"
  return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str | None = None,
              is_causal: bool = False, upcast: bool = False) -> jax.Array:
  """Scaled dot-product attention on (B, T, heads, head_dim) arrays.

  `upcast` computes q.k in float32 (diffusers' ``upcast_attention``, SD 2.1); XLA's softmax
  is float32 in every case. The result has q's dtype.
  """
  dtype = q.dtype
  if upcast:
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  impl = resolve_attention_impl(impl, q.dtype, q.shape[-1])
  out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)
  return out.astype(dtype)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over the channel (last) axis, statistics in float32, two-pass."""
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    g = xf.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    mean = g.mean(axis=axes, keepdims=True)
    var = jnp.square(g - mean).mean(axis=axes, keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = g.reshape(x.shape) * scale + bias
    return y.astype(self.dtype)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1,
          padding: Any = "SAME_TORCH") -> nn.Conv:
  if padding == "SAME_TORCH":
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D (pre-norm, SiLU, 'default' time-embedding norm)."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  use_time_emb: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    if self.use_time_emb:
      if temb is None:
        raise ValueError("ResnetBlock2D with use_time_emb=True needs a time embedding")
      t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype, padding="VALID")(x)
    out = x.astype(h.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `pad_right_bottom` is the VAE encoder's form (padding (0,1,0,1))."""
  out_channels: int
  pad_right_bottom: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pad_right_bottom:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return _conv(self.out_channels, 3, "conv", self.dtype, stride=2, padding="VALID")(x)
    return _conv(self.out_channels, 3, "conv", self.dtype, stride=2)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.out_channels, 3, "conv", self.dtype)(x)


class Attention(nn.Module):
  """diffusers `Attention`: to_q / to_k / to_v, multi-head attention, to_out.0.

  Called on tokens (B, N, C) with an optional context (B, M, Cc) for cross-attention. With
  ``spatial_norm_groups`` set it is the VAE's mid-block self-attention: input (B, H, W, C),
  GroupNorm (``group_norm``) first, residual connection and ``rescale_output_factor``.
  """
  heads: int
  dim_head: int
  out_dim: int | None = None
  qkv_bias: bool = False
  upcast: bool = False
  spatial_norm_groups: int | None = None
  eps: float = 1e-5
  rescale_output_factor: float = 1.0
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    residual = x
    spatial = self.spatial_norm_groups is not None
    if spatial:
      b, hh, ww, c = x.shape
      x = GroupNorm(self.spatial_norm_groups, self.eps, self.dtype, name="group_norm")(x)
      x = x.reshape(b, hh * ww, c)
    ctx = x if context is None else context
    inner = self.heads * self.dim_head

    def proj(name, y):
      return nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(y)

    split = lambda y: y.reshape(y.shape[:2] + (self.heads, self.dim_head))
    q, k, v = split(proj("to_q", x)), split(proj("to_k", ctx)), split(proj("to_v", ctx))
    o = attention(q, k, v, impl=self.attention_impl, upcast=self.upcast)
    o = o.reshape(o.shape[:2] + (inner,))
    o = nn.Dense(self.out_dim or x.shape[-1], dtype=self.dtype, name="to_out_0")(o)
    if spatial:
      o = o.reshape(residual.shape)
      o = o + residual.astype(o.dtype)
      if self.rescale_output_factor != 1.0:
        o = o / self.rescale_output_factor
    return o
