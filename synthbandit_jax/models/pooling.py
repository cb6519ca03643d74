"""Max and average pooling over NHWC maps as separable strided slices.

`flax.linen.max_pool` / `avg_pool` lower to `lax.reduce_window`, which XLA:CPU runs as a
plain loop over every window. A k x k window reduction is separable (max and sum are
associative), so `max_pool` and `avg_pool` here reduce along H, then along W, each as k
strided slices of the padded input combined elementwise, which XLA fuses into one vectorised
loop per axis. Measured on the 2-core CPU machine (Intel Xeon, jaxlib 0.10.2, float32,
batch 8): the Inception-V3's pools ran 3.6-5.2x faster (3x3/2 max-pool of a 147x147x64 map
13.2 -> 3.0 ms, 3x3/1 average pool of 35x35x256 9.9 -> 2.7 ms).

Values: `max_pool` equals `nn.max_pool` exactly; `avg_pool` equals `nn.avg_pool` to float
rounding (the same sums in another order; the divisor of ``count_include_pad=False`` is a
precomputed constant map). Both are differentiable; the gradient of a max where two inputs
tie is split between them (`jnp.maximum`'s rule), where `nn.max_pool`'s select-and-scatter
gives all of it to one, so use these for inference (feature extraction), not where that
matters. `max_pool_2x2` is the 2x2/2 max-pool for training: the same values, with
select-and-scatter's gradient (all of a tied window's to its first maximum), fast inside
XLA:CPU's jitted epoch loops.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Padding = str | Sequence[tuple[int, int]]


def _pads(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
          padding: Padding) -> list[tuple[int, int]]:
  if x.ndim != 4:
    raise ValueError(f"pooling expects NHWC maps [N, H, W, C]; got shape {tuple(x.shape)}")
  if isinstance(padding, str):
    return [tuple(p) for p in lax.padtype_to_pads(x.shape[1:3], window, strides, padding)]
  pads = [tuple(int(v) for v in p) for p in padding]
  if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
    raise ValueError(f"padding must be 'VALID', 'SAME' or two (low, high) pairs >= 0 for "
                     f"H and W; got {padding!r}")
  return pads


def _reduce_axis(x: jax.Array, axis: int, window: int, stride: int, pad: tuple[int, int],
                 op, fill) -> jax.Array:
  """Window reduction along one axis: `op` over `window` strided slices of padded `x`."""
  if pad != (0, 0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = pad
    x = jnp.pad(x, widths, constant_values=fill)
  n = (x.shape[axis] - window) // stride + 1
  if n < 1:
    raise ValueError(f"window {window} does not fit axis {axis} of size {x.shape[axis]} "
                     f"(padding included)")
  out = None
  for i in range(window):
    s = lax.slice_in_dim(x, i, i + (n - 1) * stride + 1, stride, axis)
    out = s if out is None else op(out, s)
  return out


def _separable(x: jax.Array, window, strides, padding: Padding, op, fill):
  """`op` over each window, along H then W; also returns the normalised window, strides
  and (low, high) pads."""
  window, strides = tuple(window), tuple(strides or (1, 1))
  pads = _pads(x, window, strides, padding)
  for axis, k, s, p in zip((1, 2), window, strides, pads):
    x = _reduce_axis(x, axis, k, s, p, op, fill)
  return x, window, strides, pads


def _lowest(dtype) -> float | int:
  if jnp.issubdtype(dtype, jnp.floating):
    return -np.inf
  return int(jnp.iinfo(dtype).min)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int] | None = None,
             padding: Padding = "VALID") -> jax.Array:
  """`nn.max_pool(x, window, strides, padding)` for NHWC `x` (padding counts as -inf)."""
  return _separable(x, window, strides, padding, jnp.maximum, _lowest(x.dtype))[0]


def _window_counts(size: int, window: int, stride: int, pad: tuple[int, int]) -> np.ndarray:
  """How many of each output position's window entries lie inside the unpadded axis."""
  n = (size + pad[0] + pad[1] - window) // stride + 1
  start = np.arange(n) * stride - pad[0]
  return np.minimum(start + window, size) - np.maximum(start, 0)


def avg_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int] | None = None,
             padding: Padding = "VALID", count_include_pad: bool = True) -> jax.Array:
  """`nn.avg_pool(x, window, strides, padding, count_include_pad)` for NHWC `x`.

  The window sums are taken in `x`'s dtype, as `nn.avg_pool` takes them; with
  ``count_include_pad=False`` each output is divided by the number of its window's entries
  that lie inside the map (the zero padding excluded)."""
  in_hw = x.shape[1:3]  # unpacked after `_separable` has checked that x is NHWC
  x, window, strides, pads = _separable(x, window, strides, padding, jnp.add, 0)
  if count_include_pad:
    return x / np.asarray(window[0] * window[1], dtype=x.dtype)
  counts = np.outer(*(_window_counts(n, k, st, p)
                      for n, k, st, p in zip(in_hw, window, strides, pads)))
  return x / jnp.asarray(counts[None, :, :, None], dtype=x.dtype)


# ------------------------------------------------------------- 2x2, exact gradients


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max-pool (VALID: an odd last row/column is dropped) for training; a no-op
  on maps already smaller than 2x2. (`max_pool` gives the same values; its gradient splits
  the gradient of a tied window, this one's does not.)

  Same values and gradients as `nn.max_pool(x, (2, 2), (2, 2))`, ties included (the
  gradient goes to the first maximum of each window in row-major order, as XLA's
  select-and-scatter and torch's max_pool2d do; tested). Written as a reshape + max with its
  own VJP (`_pool_windows`) because both of XLA:CPU's other forms are slow inside the jitted
  epoch: select-and-scatter (nn.max_pool's gradient) ~4x, and `jnp.max`'s own gradient
  counts the ties of every window, a reduction that jaxlib 0.10 hands to YNNPACK at ~5 ms
  per SmallCNN step (measured: the SmallCNN epoch of benchmarks/train_throughput.py runs
  2.64 s with this VJP, 2.92 s with jnp.max's, 2 CPU cores).
  """
  n, h, w, c = x.shape
  if h < 2 or w < 2:
    return x
  h2, w2 = h // 2, w // 2
  return _pool_windows(x[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, c))


@jax.custom_vjp
def _pool_windows(windows: jax.Array) -> jax.Array:
  """[N, H/2, 2, W/2, 2, C] -> the max of each 2x2 window, [N, H/2, W/2, C]."""
  return windows.max(axis=(2, 4))


def _pool_windows_fwd(windows: jax.Array):
  y = windows.max(axis=(2, 4))
  return y, (windows, y)


def _pool_windows_bwd(res, dy: jax.Array):
  windows, y = res
  taken = jnp.zeros(y.shape, bool)  # windows whose maximum already received the gradient
  grads = []
  for i in (0, 1):  # row-major over the window, as select-and-scatter scans it
    for j in (0, 1):
      hit = (windows[:, :, i, :, j] == y) & ~taken
      taken = taken | hit
      grads.append(jnp.where(hit, dy, jnp.zeros_like(dy)))
  rows = [jnp.stack(grads[0:2], axis=3), jnp.stack(grads[2:4], axis=3)]
  return (jnp.stack(rows, axis=2),)


_pool_windows.defvjp(_pool_windows_fwd, _pool_windows_bwd)
