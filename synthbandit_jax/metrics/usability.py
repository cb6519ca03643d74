"""Per-image usability scores: point Frechet distance, DPS, FCS and their combination U.

Definitions (DESIGN.md, "The method, precisely"):

  d(x, N(mu, S)) = ||x - mu||^2 + tr(S)
      the Frechet distance between a point mass at the feature x and a Gaussian: the
      well-defined limit of what the reference computed by feeding one image to a FID.

  DPS(x) = (d(x, Syn_c) + d(x, Syn_not_c)) / (d(x, Real_c) + d(x, Real_not_c))
      c = the image's own class. High = close to real data and far from other synthetic data.

  FCS(x) = 1 / KL(p_c || q_x)
      p_c = mean real feature of class c, q_x = the image's feature, each + 1e-10 and
      normalised to sum 1. Needs non-negative features (VGG fc7 after ReLU, pooled taps).

  U = (norm(DPS) + norm(FCS)) / 2  ("mean", the reference's OursComp_Avg), or
      norm(DPS) * norm(FCS)         ("product"); norm = min-max over the whole pool.

Whether an image is part of its own Syn_c set: the reference fits Syn_c on the synthetic
pool including the image being scored, and so does `dps` by default. `exclude_self=True`
removes the image from Syn_c with the exact leave-one-out update of the mean and unbiased
covariance (no statistics are recomputed):

  n' = n - 1,  x - mu' = n / (n - 1) * (x - mu),
  tr(S') = ((n - 1) tr(S) - n / (n - 1) * ||x - mu||^2) / (n - 2).

It is valid only when the synthetic stats were fitted on the whole pool (max_per_set=None)
and the scored images are members of that pool; Syn_c sets with fewer than 3 images keep the
image (there would be no covariance left). Syn_not_c never holds x, so it is unchanged.

The per-image functions are jittable and run in the default JAX float dtype (float32 unless
x64 is enabled); the host wrappers stream the images in fixed-size padded chunks, so one
compilation serves any pool size.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax.metrics.gaussian import ClassStats

FCS_EPS = 1e-10
COMBINE_FORMS = ("mean", "product")


def point_frechet(x, mean, trace_cov):
  """||x - mean||^2 + trace_cov over the last axis; batched by broadcasting, jittable.

  x [..., D], mean [..., D] (broadcast against x), trace_cov [...] or scalar.
  """
  x = jnp.asarray(x)
  diff = x - jnp.asarray(mean, x.dtype)
  return jnp.sum(diff * diff, axis=-1) + jnp.asarray(trace_cov, x.dtype)


def _dps_chunk(feat, labels, r_mu_in, r_tr_in, r_mu_out, r_tr_out, s_mu_in, s_tr_in,
               s_mu_out, s_tr_out, s_n_in, exclude_self: bool):
  d_real = (point_frechet(feat, r_mu_in[labels], r_tr_in[labels])
            + point_frechet(feat, r_mu_out[labels], r_tr_out[labels]))
  diff = feat - s_mu_in[labels]
  sq = jnp.sum(diff * diff, axis=-1)
  tr = s_tr_in[labels]
  d_syn_c = sq + tr
  if exclude_self:
    n = s_n_in[labels].astype(feat.dtype)
    ok = n >= 3
    n_safe = jnp.where(ok, n, 3.0)
    r = n_safe / (n_safe - 1.0)
    tr_loo = ((n_safe - 1.0) * tr - r * sq) / (n_safe - 2.0)
    d_loo = r * r * sq + jnp.maximum(tr_loo, 0.0)
    d_syn_c = jnp.where(ok, d_loo, d_syn_c)
  d_syn = d_syn_c + point_frechet(feat, s_mu_out[labels], s_tr_out[labels])
  return d_syn / d_real


_dps_chunk_jit = jax.jit(_dps_chunk, static_argnames=("exclude_self",))


def _chunks(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield start, min(start + batch_size, n)


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  if a.shape[0] == size:
    return a
  pad = np.zeros((size - a.shape[0],) + a.shape[1:], a.dtype)
  return np.concatenate([a, pad], axis=0)


# XLA:CPU takes a host array whose data is aligned to this many bytes without a copy
# (`jax.device_put` aliases it); any other array is copied, which on a 2-core VM costs about
# as much as the FCS kernel itself (~40 ms for 4096 x 2048 float32).
_HOST_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + _HOST_ALIGN, np.uint8)
  start = -raw.ctypes.data % _HOST_ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


class _RowChunks:
  """Rows [a, b) of a host array [N, D] as device arrays of `size` rows in `dtype`, zero
  padded at the end.

  A chunk that is already contiguous, of `dtype` and aligned goes to the device as it is
  (zero-copy on CPU); any other is cast into one reused aligned buffer and that goes. The
  caller must have read the previous chunk's results back (blocking) before asking for the
  next one, since the buffer may still be what the device reads.
  """

  def __init__(self, x: np.ndarray, size: int, dtype):
    self._x = x
    self._size = size
    self._dtype = np.dtype(dtype)
    self._buf: np.ndarray | None = None

  def __call__(self, a: int, b: int) -> jax.Array:
    rows = self._x[a:b]
    if (b - a == self._size and rows.dtype == self._dtype and rows.flags.c_contiguous
        and rows.ctypes.data % _HOST_ALIGN == 0):
      return jax.device_put(rows)
    if self._buf is None:
      self._buf = _aligned_empty((self._size,) + rows.shape[1:], self._dtype)
    np.copyto(self._buf[:b - a], rows, casting="unsafe")
    self._buf[b - a:] = 0
    return jax.device_put(self._buf)


def _check_feat_labels(feat, labels, num_classes: int, dim: int, what: str):
  x = np.asarray(feat)
  y = np.asarray(labels)
  if x.ndim != 2 or x.shape[1] != dim:
    raise ValueError(f"{what}: features must be [N, {dim}] to match the statistics, got "
                     f"shape {x.shape}")
  if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{what}: labels must be integer [N={x.shape[0]}], got {y.dtype} "
                     f"{y.shape}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"{what}: labels must lie in [0, {num_classes}), got values in "
                     f"[{y.min()}, {y.max()}]")
  bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
  if bad.size:
    raise ValueError(f"{what}: {bad.size} feature rows contain NaN or Inf (first rows "
                     f"{bad[:5].tolist()}); exclude those images before scoring")
  return x, y.astype(np.int32)


def dps(feat, labels, real_stats: ClassStats, syn_stats: ClassStats, *,
        exclude_self: bool = False, batch_size: int = 4096) -> np.ndarray:
  """DPS of every image: [N] float (see the module docstring; higher is better).

  feat [N, D] features of the synthetic images being scored, labels [N] their classes;
  real_stats / syn_stats from `gaussian.class_stats` on the real and on the synthetic pool
  (same classes and feature tap). exclude_self=True: leave-one-out Syn_c (module docstring).
  """
  if real_stats.num_classes != syn_stats.num_classes or real_stats.dim != syn_stats.dim:
    raise ValueError(f"real stats ({real_stats.num_classes} classes, dim {real_stats.dim}) "
                     f"and synthetic stats ({syn_stats.num_classes} classes, dim "
                     f"{syn_stats.dim}) do not match; compute both on the same classes and "
                     "feature tap")
  x, y = _check_feat_labels(feat, labels, real_stats.num_classes, real_stats.dim, "dps")
  dtype = jnp.result_type(float)
  ri, ro, si, so = (real_stats.in_class, real_stats.out_class, syn_stats.in_class,
                    syn_stats.out_class)
  consts = [jnp.asarray(a, dtype) for a in (ri.mean, ri.trace, ro.mean, ro.trace, si.mean,
                                            si.trace, so.mean, so.trace)]
  counts = jnp.asarray(si.count, jnp.int32)
  out = np.empty(x.shape[0], np.float64)
  size = min(batch_size, max(x.shape[0], 1))
  rows = _RowChunks(x, size, dtype)
  for a, b in _chunks(x.shape[0], size):
    xb = rows(a, b)
    yb = jnp.asarray(_pad_rows(y[a:b], size))
    res = _dps_chunk_jit(xb, yb, *consts, counts, exclude_self=exclude_self)
    out[a:b] = np.asarray(res)[:b - a]
  return out


def class_distribution(real_class_means, eps: float = FCS_EPS):
  """p_c: each class mean feature + eps, normalised to sum 1. [C, D] -> [C, D]."""
  p = jnp.asarray(real_class_means) + eps
  return p / jnp.sum(p, axis=-1, keepdims=True)


# Up to this many classes the FCS kernel picks each image's p_c row with a one-hot matmul
# (exact: one 1 * p and zeros, at HIGHEST precision) instead of a gather, which XLA:CPU
# materialises: 28 vs 53 ms per 4096 x 2048 chunk on 2 cores. The matmul's cost grows with
# the class count, the gather's does not.
_ONE_HOT_MAX_CLASSES = 32


def _rows_of(table, labels, dtype):
  """table[labels] for a [C, D] table and [N] labels."""
  if table.shape[0] > _ONE_HOT_MAX_CLASSES:
    return table[labels]
  onehot = jax.nn.one_hot(labels, table.shape[0], dtype=dtype)
  return jnp.dot(onehot, table, precision=jax.lax.Precision.HIGHEST)


def _fcs_chunk(feat, labels, p, log_p, min_kl):
  # q is normalised with the very operations that made p, and KL sums p (log p - log q)
  # term by term, so an image whose feature equals its class mean gets KL = 0 exactly
  # (no cancellation between two large sums).
  log_q = jnp.log(class_distribution(feat))
  p_rows, log_p_rows = _rows_of(p, labels, feat.dtype), _rows_of(log_p, labels, feat.dtype)
  kl = jnp.sum(p_rows * (log_p_rows - log_q), axis=-1)
  # negative inputs are counted here, in the same pass over the features, not on the host
  negatives = jnp.sum(feat < 0, dtype=jnp.int32)
  return 1.0 / jnp.maximum(kl, min_kl), kl, negatives


_fcs_chunk_jit = jax.jit(_fcs_chunk)


def fcs(feat, labels, real_class_means, *, min_kl: float = 1e-12, batch_size: int = 4096,
        return_kl: bool = False):
  """FCS = 1 / KL(p_c || q_x) per image: [N] float (higher is better).

  feat [N, D] non-negative features (e.g. VGG16 fc7 after ReLU, or an average-pooled
  Inception tap), labels [N] classes, real_class_means [C, D] mean real feature per class
  (e.g. `class_stats(real...).in_class.mean`). p_c and q_x each get + 1e-10 and are
  normalised to sum 1. KL is clipped below at `min_kl` (an image whose feature is exactly
  proportional to p_c would give 1/0), so FCS <= 1/min_kl. return_kl=True also returns KL.
  """
  means = np.asarray(real_class_means)
  if means.ndim != 2:
    raise ValueError(f"real_class_means must be [C, D], got shape {means.shape}")
  # _check_feat_labels has checked the features for NaN / Inf; the chunks count negatives
  x, y = _check_feat_labels(feat, labels, means.shape[0], means.shape[1], "fcs")
  _check_non_negative("real_class_means", int(np.count_nonzero(means < 0)), means.size)
  if not np.all(np.isfinite(means)):
    raise ValueError("fcs: real_class_means contain NaN or Inf; exclude those classes")
  dtype = jnp.result_type(float)
  p = class_distribution(jnp.asarray(means, dtype))
  log_p = jnp.log(p)
  min_kl_arr = jnp.asarray(min_kl, dtype)
  out = np.empty(x.shape[0], np.float64)
  kls = np.empty(x.shape[0], np.float64)
  negatives = 0
  size = min(batch_size, max(x.shape[0], 1))
  rows = _RowChunks(x, size, dtype)
  for a, b in _chunks(x.shape[0], size):
    yb = jnp.asarray(_pad_rows(y[a:b], size))
    res, kl, neg = _fcs_chunk_jit(rows(a, b), yb, p, log_p, min_kl_arr)
    out[a:b] = np.asarray(res)[:b - a]
    kls[a:b] = np.asarray(kl)[:b - a]
    negatives += int(neg)  # the zero padding has none
  _check_non_negative("features", negatives, x.size)
  return (out, kls) if return_kl else out


def _check_non_negative(name: str, negatives: int, size: int):
  if negatives:
    raise ValueError(f"fcs needs non-negative {name} (a distribution after +1e-10 and "
                     f"normalisation), found {negatives} negative values of {size}; use a "
                     "post-ReLU or average-pooled tap")


def minmax_normalise(values) -> np.ndarray:
  """(v - min) / (max - min) over the whole array, float64, NaN-safe.

  min and max are taken over the finite values; NaN stays NaN; +inf -> 1 and -inf -> 0; a
  column whose finite values are all equal (or that has none) maps its finite values to 0.5.
  """
  v = np.asarray(values, dtype=np.float64)
  out = np.full(v.shape, np.nan)
  finite = np.isfinite(v)
  out[np.isposinf(v)] = 1.0
  out[np.isneginf(v)] = 0.0
  if not finite.any():
    return out
  lo, hi = v[finite].min(), v[finite].max()
  if hi > lo:
    out[finite] = (v[finite] - lo) / (hi - lo)
  else:
    out[finite] = 0.5
  return out


def combine(dps_values, fcs_values, form: str = "mean") -> np.ndarray:
  """U from DPS and FCS, each min-max normalised over the whole pool (all classes together,
  as the reference): form="mean" -> (a + b) / 2 (the reference's OursComp_Avg),
  form="product" -> a * b. NaN in either input gives NaN."""
  if form not in COMBINE_FORMS:
    raise ValueError(f"combine form={form!r} is not one of {COMBINE_FORMS}")
  a, b = minmax_normalise(dps_values), minmax_normalise(fcs_values)
  if a.shape != b.shape:
    raise ValueError(f"DPS has shape {a.shape} and FCS {b.shape}; score the same images")
  return (a + b) / 2.0 if form == "mean" else a * b


def normalised_aggregates(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Mean / median / min / max over metrics of their min-max normalised values, per image.

  columns maps a metric name to its [N] values, each already oriented so that higher is
  better (negate distances such as per-image FID first). NaN entries are ignored per image
  (an image with all NaN gets NaN). Returns {"mean", "median", "min", "max"} -> [N].
  """
  if not columns:
    raise ValueError("normalised_aggregates needs at least one metric column")
  normed = [minmax_normalise(v) for v in columns.values()]
  shapes = {k: n.shape for k, n in zip(columns, normed)}
  if len(set(shapes.values())) != 1 or normed[0].ndim != 1:
    raise ValueError(f"metric columns must all be [N] arrays of one length, got {shapes}")
  m = np.stack(normed, axis=0)
  out = {}
  all_nan = np.all(np.isnan(m), axis=0)
  safe = np.where(all_nan[None, :], 0.0, m)
  for name, fn in (("mean", np.nanmean), ("median", np.nanmedian), ("min", np.nanmin),
                   ("max", np.nanmax)):
    res = fn(safe, axis=0)
    out[name] = np.where(all_nan, np.nan, res)
  return out
