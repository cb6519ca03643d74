"""Separable linear resampling (resize, adaptive pooling) as sparse taps instead of matmuls.

A linear resampling of one image axis is a [out, in] weight matrix M (bilinear resize: 2
nonzero taps per output row; antialiased downscaling: ~2 x scale + 1; adaptive pooling:
the window). Applying M as a dense matmul costs out x in multiply-adds per pixel column
(2 x 299 x 512 per column to resize 512 -> 299: ~0.75 GFLOP per 512x512 RGB image, 13% of
the whole FID Inception), although almost all weights are zero. `apply_along` gathers the K
nonzero taps of each output row instead (K = the most taps any row has; shorter rows are
padded with zero weights) and sums them in float32 in ascending input order: K multiply-adds
per output value, the same sums as the matmul up to float rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MAX_TAPS = 32  # beyond this many taps per row, a matmul is the better way


def row_taps(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The nonzero taps of each row of `m` [out, in]: (indices int32 [out, K], weights
  float32 [out, K]), ascending input index, padded with index 0 / weight 0."""
  m = np.asarray(m, np.float64)
  if m.ndim != 2:
    raise ValueError(f"row_taps needs an [out, in] matrix, got shape {m.shape}")
  nz = [np.flatnonzero(row) for row in m]
  k = max(1, max(len(r) for r in nz))
  idx = np.zeros((m.shape[0], k), np.int32)
  w = np.zeros((m.shape[0], k), np.float32)
  for j, r in enumerate(nz):
    idx[j, :len(r)] = r
    w[j, :len(r)] = m[j, r]
  return idx, w


def apply_along(x: jax.Array, m: np.ndarray, axis: int) -> jax.Array:
  """out[..., j, ...] = sum_i m[j, i] x[..., i, ...] along `axis` of float `x` (jittable).

  Sparse taps (module docstring); a dense matmul (HIGHEST precision) when a row has more
  than MAX_TAPS nonzero weights.
  """
  m = np.asarray(m)
  axis = axis % x.ndim
  if m.shape[1] != x.shape[axis]:
    raise ValueError(f"resampling matrix {m.shape} does not fit axis {axis} of {x.shape}")
  idx, w = row_taps(m)
  if idx.shape[1] > MAX_TAPS:
    y = jnp.tensordot(jnp.asarray(m, x.dtype), x, axes=[[1], [axis]],
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, 0, axis)
  shape = [1] * x.ndim
  shape[axis] = m.shape[0]
  out = None
  for k in range(idx.shape[1]):
    term = jnp.take(x, jnp.asarray(idx[:, k]), axis=axis, mode="clip") * jnp.asarray(
        w[:, k].reshape(shape), x.dtype)
    out = term if out is None else out + term
  return out
