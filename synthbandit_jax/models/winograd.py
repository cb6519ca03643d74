"""3x3 stride-1 convolutions by Winograd's minimal filtering, F(2x2, 3x3) and F(4x4, 3x3).

Why: XLA:CPU runs convolutions with Eigen's contraction kernels, 10-20% slower than oneDNN's
(PyTorch's) on AVX-512 CPUs from 128 channels on (benchmarks/README.md). Winograd's algorithm
trades multiplications for additions: an m x m output tile of a 3x3 filter takes (m + 2)^2
products instead of 9 m^2 (2.25x fewer for m = 2, 4x fewer for m = 4), computed as (m + 2)^2
independent matmuls over channels, which Eigen runs at full speed. On maps of 14-56 px with
>= 128 channels this is 1.3-1.8x faster than XLA:CPU's own convolution (2-core Sapphire
Rapids, 2 images per call, `tile_size` records the measured choice); on larger maps the
transforms (memory-bound) cost more than the products save. GPUs (cuDNN) choose their own
algorithms: this module is for CPU.

The algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016), per
m x m output tile Y at tile origin (i, j), input tile d = x_pad[i : i + a, j : j + a] with
a = m + 2, filter g (3 x 3), per input channel c and output channel o:

    Y = A^T [ sum_c (G g_{c,o} G^T) * (B^T d_c B) ] A          (* elementwise, a x a)

`MATRICES` holds (B^T, G, A^T) for m = 2 (interpolation points 0, 1, -1, inf) and m = 4
(0, 1, -1, 2, -2, inf). The filter transform U = G g G^T is done once per weight
(`transform_kernel`); `conv3x3` does the input transform V = B^T d B (sums of strided slices),
the (m + 2)^2 matmuls M[p, q] = V[p, q] @ U[p, q] over channels, and the output transform.

Exactness: the identity is exact in real arithmetic; in float32 the larger points of m = 4
amplify rounding. Measured against a float64 direct convolution (tests/test_winograd.py):
max error / max |output| up to 7e-7 for m = 2 (as XLA's own convolution) and 1.2e-5 for
m = 4. Through VGG16 (tests/test_vgg.py) fc7 differs from torch's by 2.4e-6 relative with
`vgg.winograd_plan`'s layers at 224 px (2.1e-6 with direct convolutions only), and by
3.0e-6 / 3.8e-6 with every layer but the first by m = 2 / m = 4.
Use float32 inputs: in bfloat16 the m = 4 transforms lose too much (`conv3x3` refuses it).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# (B^T [a, a], G [a, 3], A^T [m, a]) per output tile size m; a = m + 2.
MATRICES: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
    2: (np.array([[1, 0, -1, 0],
                  [0, 1, 1, 0],
                  [0, -1, 1, 0],
                  [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0],
                  [1 / 2, 1 / 2, 1 / 2],
                  [1 / 2, -1 / 2, 1 / 2],
                  [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0],
                  [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0],
                  [0, -4, -4, 1, 1, 0],
                  [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0],
                  [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0],
                  [-1 / 6, -1 / 6, -1 / 6],
                  [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6],
                  [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0],
                  [0, 1, -1, 2, -2, 0],
                  [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], np.float64)),
}
TILE_SIZES = tuple(sorted(MATRICES))


def tile_size(height: int, width: int, in_channels: int) -> int:
  """The output tile (0 = XLA's own convolution, 2 or 4) for a 3x3 stride-1 layer on CPU.

  The rule is what was measured per layer (VGG16's shapes, 2 images per call, 2-core Intel
  Sapphire Rapids, benchmarks/README.md "Session 13"): maps over 80 px (VGG16's 224 and
  112 px layers) and layers with < 128 input channels stay direct (the transforms cost more
  than they save; so did the Inception's 71 px 80 -> 192 layer, 49 vs 41 ms by F(4x4));
  41-80 px (56 px) take F(4x4, 3x3) (1.4-1.6x faster than direct, F(2x2) was slower than
  direct there); 8-40 px (28 and 14 px) take F(2x2, 3x3) (1.3-1.9x, as fast as F(4x4) there
  and 10x more exact). The smaller side decides.
  """
  side = min(int(height), int(width))
  if in_channels < 128 or side > 80 or side < 8:
    return 0
  return 4 if side > 40 else 2


def _check_tile(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  if m not in MATRICES:
    raise ValueError(f"winograd tile size m={m!r}: use one of {TILE_SIZES}")
  return MATRICES[m]


def transform_kernel(kernel: Any, m: int) -> jax.Array:
  """A 3x3 HWIO kernel [3, 3, Cin, Cout] -> U = G g G^T as [(m + 2)^2, Cin, Cout] float32
  (row p * (m + 2) + q holds U[p, q]). Done once per weight; `conv3x3` takes the result."""
  _, g, _ = _check_tile(m)
  kernel = jnp.asarray(kernel, jnp.float32)
  if kernel.ndim != 4 or kernel.shape[:2] != (3, 3):
    raise ValueError(f"winograd.transform_kernel needs a 3x3 HWIO kernel [3, 3, Cin, Cout]; "
                     f"got shape {tuple(kernel.shape)}")
  a = m + 2
  # U[p, q] = sum_k sum_l G[p, k] G[q, l] g[k, l], separably (sums of kernel taps).
  rows = [_combine(g[p], [kernel[k] for k in range(3)]) for p in range(a)]   # [3, Cin, Cout]
  u = [_combine(g[q], [rows[p][l] for l in range(3)]) for p in range(a) for q in range(a)]
  return jnp.stack(u)


def _combine(coefs: np.ndarray, parts: list[jax.Array]) -> jax.Array:
  """sum_k coefs[k] * parts[k], skipping zero coefficients (the transforms are sparse)."""
  out = None
  for c, p in zip(coefs, parts):
    if c == 0:
      continue
    term = p if c == 1 else (-p if c == -1 else p * np.asarray(c, p.dtype))
    out = term if out is None else out + term
  return out


def _norm_padding(padding: Any) -> tuple[tuple[int, int], tuple[int, int]]:
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"winograd.conv3x3 padding={padding!r}: use 'SAME', 'VALID' or "
                       "((lo, hi), (lo, hi)) with each in {0, 1}")
    p = 1 if padding.upper() == "SAME" else 0
    return ((p, p), (p, p))
  pads = tuple(tuple(int(v) for v in pair) for pair in padding)
  if len(pads) != 2 or any(len(pair) != 2 or not set(pair) <= {0, 1} for pair in pads):
    raise ValueError(f"winograd.conv3x3 padding={padding!r}: use 'SAME', 'VALID' or "
                     "((lo, hi), (lo, hi)) with each in {0, 1}")
  return pads


def conv3x3(x: jax.Array, u: jax.Array, *, padding: Any = "SAME",
            precision: Any = None) -> jax.Array:
  """``lax.conv_general_dilated(x, kernel, (1, 1), padding)`` in NHWC / HWIO, with
  ``u = transform_kernel(kernel, m)`` (m read from its shape); no bias. Jittable.

  `x`: float32 [N, H, W, Cin]; the last tiles are zero-padded and cropped, so any size with
  an output of at least 1x1 works. `padding`: "SAME" (1 on every side, the default), "VALID"
  (none) or ((top, bottom), (left, right)) with each 0 or 1. Returns [N, H', W', Cout]
  (H' = H + top + bottom - 2) in x's dtype. `precision` goes to the channel matmuls.
  """
  (pt, pb), (pl, pr) = _norm_padding(padding)
  if x.ndim != 4:
    raise ValueError(f"winograd.conv3x3 expects NHWC input; got shape {tuple(x.shape)}")
  if u.ndim != 3:
    raise ValueError(f"winograd.conv3x3 expects a transformed kernel [(m+2)^2, Cin, Cout] "
                     f"(transform_kernel); got shape {tuple(u.shape)}")
  a = int(round(u.shape[0] ** 0.5))
  m = a - 2
  if a * a != u.shape[0] or m not in MATRICES:
    raise ValueError(f"winograd.conv3x3: kernel rows {u.shape[0]} are not (m+2)^2 for m in "
                     f"{TILE_SIZES}")
  n, h, w, c = x.shape
  if u.shape[1] != c:
    raise ValueError(f"winograd.conv3x3: input has {c} channels, kernel expects {u.shape[1]}")
  if x.dtype != jnp.float32:
    raise ValueError(f"winograd.conv3x3 needs float32 input (its transforms amplify rounding); "
                     f"got {x.dtype}")
  bt, _, at = MATRICES[m]
  co = u.shape[2]
  ho, wo = h + pt + pb - 2, w + pl + pr - 2
  if ho < 1 or wo < 1:
    raise ValueError(f"winograd.conv3x3: input {h}x{w} with padding {padding!r} leaves no "
                     "output")
  th, tw = -(-ho // m), -(-wo // m)
  # th * m + 2 input rows cover the tiles: pad `pt` above, the rest below (>= pb).
  xp = jnp.pad(x, ((0, 0), (pt, th * m + 2 - h - pt), (pl, tw * m + 2 - w - pl), (0, 0)))
  # Input transform V = B^T d B: along H on strided row slices, then along W.
  rows = [xp[:, r:r + (th - 1) * m + 1:m] for r in range(a)]          # [N, th, Wp, C] each
  rows = [_combine(bt[p], rows) for p in range(a)]
  v = []
  for p in range(a):
    cols = [rows[p][:, :, s:s + (tw - 1) * m + 1:m] for s in range(a)]  # [N, th, tw, C]
    v.extend(_combine(bt[q], cols) for q in range(a))
  v = jnp.stack(v).reshape(a * a, n * th * tw, c)
  # The (m + 2)^2 products, each a matmul over input channels.
  prod = lax.dot_general(v, u.astype(x.dtype), (((2,), (1,)), ((0,), (0,))),
                         precision=precision)                          # [a*a, T, Cout]
  prod = prod.reshape(a, a, n, th, tw, co)
  # Output transform Y = A^T M A.
  half = [_combine(at[r], [prod[p] for p in range(a)]) for r in range(m)]   # [a, N, th, tw, Co]
  y = [jnp.stack([_combine(at[s], [half[r][q] for q in range(a)]) for s in range(m)], axis=3)
       for r in range(m)]                                              # [N, th, tw, m, Co]
  y = jnp.stack(y, axis=2)                                             # [N, th, m, tw, m, Co]
  return y.reshape(n, th * m, tw * m, co)[:, :ho, :wo]
