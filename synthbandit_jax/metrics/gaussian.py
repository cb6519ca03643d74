"""Streaming, numerically safe Gaussian statistics of feature vectors.

All accumulation is in float64 with Chan et al.'s pairwise merge: a batch contributes its
count, its mean and its *centred* scatter matrix `M2 = sum (x - mean)(x - mean)^T`, and two
partial results merge exactly as

  n = na + nb,  delta = mean_b - mean_a,
  mean = mean_a + delta * nb / n,
  M2 = M2_a + M2_b + delta delta^T * na * nb / n.

No raw `sum x x^T` is ever formed, so a large common offset (features around 1e4 with unit
spread) costs no precision. The unbiased covariance is `M2 / (n - 1)`.

`class_stats` gives, for every class c, the Gaussians of the set "c" and of the set "not c"
(every other image of the same pool). The per-class sums are computed once; "not c" is the
total with class c removed by the inverse of the merge above (exact algebra, float64).

Sets with fewer than 2 samples have no unbiased covariance. They get a regularised one and a
logged warning that names the class, never NaN:

  small_set="pooled" (default): the covariance of the whole pool (all classes together) is
    used; with fewer than 2 samples in the whole pool, `eps * I`.
  small_set="eps": `eps * I`.

An empty set's mean is the pool mean (zeros for an empty pool). `count` keeps the true count
and `regularised` flags every such set, so callers can skip or report them.

DPS only needs `trace(S)`, so `class_stats` keeps only the per-dimension variances by default
(`full_cov=False`, memory O(C d)); `full_cov=True` keeps [C, d, d] covariances (needed for
per-class FID), memory 2 * C * d^2 * 8 bytes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

_SMALL_SET_MODES = ("pooled", "eps")


def _as_features(features, name: str = "features") -> np.ndarray:
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a [N, D] array, got shape {x.shape}")
  return x


def _batch_moments(x: np.ndarray, full_cov: bool) -> tuple[int, np.ndarray, np.ndarray]:
  """Count, mean and centred M2 of one float64 batch [N, D]."""
  n = x.shape[0]
  d = x.shape[1]
  if n == 0:
    return 0, np.zeros(d), (np.zeros((d, d)) if full_cov else np.zeros(d))
  mean = x.mean(axis=0)
  xc = x - mean
  m2 = xc.T @ xc if full_cov else np.einsum("nd,nd->d", xc, xc)
  return n, mean, m2


# Rows per block of `_class_moments`: a float64 block of about 4 MB stays in cache while it
# is summed, centred and squared (2048-d features: 256 rows).
_BLOCK_BYTES = 1 << 22


def _class_moments(x: np.ndarray, y: np.ndarray, num_classes: int, full_cov: bool
                   ) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """(count, mean, centred M2) of every class of one batch, float64, for features [N, D] of
  any real dtype and labels [N] in [0, C).

  The rows are taken class by class (a stable sort of the labels) in blocks of
  `_BLOCK_BYTES` (at least D rows with full_cov): each block is cast to float64 into one
  reused buffer, centred on its own mean (two-pass moments) and merged into its class with
  `_merge`. The same numbers as `_batch_moments` on `x[y == c]` up to summation order,
  without a float64 copy of the whole batch (~3x faster than that on a 2-core CPU for
  8192 x 2048 features, 10 classes).
  """
  d = x.shape[1]
  counts = np.bincount(y, minlength=num_classes)
  ends = np.cumsum(counts)
  order = np.argsort(y, kind="stable")
  rows = _BLOCK_BYTES // (8 * max(d, 1))
  if full_cov:  # the [D, D] scatter's gemm wants tall blocks, and each merge costs D^2
    rows = max(rows, d)
  rows = int(max(1, min(rows, x.shape[0])))
  buf = np.empty((rows, d))
  out = []
  for c in range(num_classes):
    n, mean, m2 = _batch_moments(buf[:0], full_cov)
    for a in range(int(ends[c] - counts[c]), int(ends[c]), rows):
      b = min(a + rows, int(ends[c]))
      xb = buf[:b - a]
      xb[...] = x[order[a:b]]
      mb = xb.mean(axis=0)
      xb -= mb
      m2b = xb.T @ xb if full_cov else np.einsum("nd,nd->d", xb, xb)
      n, mean, m2 = _merge(n, mean, m2, b - a, mb, m2b, full_cov)
    out.append((n, mean, m2))
  return out


def _merge(na, mean_a, m2a, nb, mean_b, m2b, full_cov: bool):
  """Chan's merge of two (count, mean, M2) triples; counts may be 0."""
  n = na + nb
  if na == 0:
    return nb, mean_b.copy(), m2b.copy()
  if nb == 0:
    return na, mean_a.copy(), m2a.copy()
  delta = mean_b - mean_a
  mean = mean_a + delta * (nb / n)
  corr = np.outer(delta, delta) if full_cov else delta * delta
  return n, mean, m2a + m2b + corr * (na * nb / n)


def _remove(n, mean, m2, nc, mean_c, m2c, full_cov: bool):
  """Inverse of `_merge`: the (count, mean, M2) of a set with a subset removed."""
  no = n - nc
  d = mean.shape[0]
  if no <= 0:
    return 0, np.zeros(d), (np.zeros((d, d)) if full_cov else np.zeros(d))
  if nc == 0:
    return n, mean.copy(), m2.copy()
  mean_o = (n * mean - nc * mean_c) / no
  delta = mean_o - mean_c
  corr = np.outer(delta, delta) if full_cov else delta * delta
  m2o = m2 - m2c - corr * (nc * no / n)
  # Rounding can leave tiny negative variances; a variance is never negative.
  if full_cov:
    m2o = 0.5 * (m2o + m2o.T)
    idx = np.arange(d)
    m2o[idx, idx] = np.maximum(m2o[idx, idx], 0.0)
  else:
    m2o = np.maximum(m2o, 0.0)
  return no, mean_o, m2o


@dataclasses.dataclass(frozen=True)
class GaussianAccumulator:
  """Immutable running (count, mean, centred scatter) of D-dim features, in float64.

  `add` and `merge` return a new accumulator (write `acc = acc.add(x)`):

    acc = GaussianAccumulator.empty(2048)
    for batch in batches:
      acc = acc.add(batch)
    mu, sigma = acc.mean, acc.cov

  With `full_cov=False` only the diagonal of the scatter is kept: `cov` is then the
  diagonal matrix of variances and `var` / `trace_cov` are cheap.
  """
  count: int
  mean: np.ndarray  # float64 [D]
  m2: np.ndarray  # float64 [D, D] (full_cov) or [D] (diagonal)
  full_cov: bool = True

  @classmethod
  def empty(cls, dim: int, full_cov: bool = True) -> "GaussianAccumulator":
    """An accumulator with no samples for `dim`-dimensional features."""
    m2 = np.zeros((dim, dim)) if full_cov else np.zeros(dim)
    return cls(0, np.zeros(dim), m2, full_cov)

  @classmethod
  def from_features(cls, features, full_cov: bool = True) -> "GaussianAccumulator":
    """The accumulator of one [N, D] array."""
    x = _as_features(features)
    n, mean, m2 = _batch_moments(x, full_cov)
    return cls(n, mean, m2, full_cov)

  @property
  def dim(self) -> int:
    return int(self.mean.shape[0])

  def add(self, features) -> "GaussianAccumulator":
    """A new accumulator with the rows of `features` [N, D] added."""
    return self.merge(GaussianAccumulator.from_features(features, self.full_cov))

  def merge(self, other: "GaussianAccumulator") -> "GaussianAccumulator":
    """A new accumulator holding the samples of both (Chan's pairwise merge)."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge Gaussian accumulators of dimension {self.dim} and "
                       f"{other.dim}")
    if other.full_cov != self.full_cov:
      raise ValueError("cannot merge a full-covariance accumulator with a diagonal one; "
                       "create both with the same full_cov")
    n, mean, m2 = _merge(self.count, self.mean, self.m2, other.count, other.mean, other.m2,
                         self.full_cov)
    return GaussianAccumulator(n, mean, m2, self.full_cov)

  def _check_count(self, what: str):
    if self.count < 2:
      raise ValueError(f"the {what} needs at least 2 samples, this accumulator has "
                       f"{self.count}; add more features or use class_stats, which "
                       "regularises small sets")

  @property
  def var(self) -> np.ndarray:
    """Unbiased per-dimension variances [D] (n - 1 in the denominator)."""
    self._check_count("variance")
    diag = np.diagonal(self.m2) if self.full_cov else self.m2
    return diag / (self.count - 1)

  @property
  def cov(self) -> np.ndarray:
    """Unbiased covariance [D, D] (n - 1); diagonal when full_cov=False."""
    self._check_count("covariance")
    if self.full_cov:
      return self.m2 / (self.count - 1)
    return np.diag(self.m2 / (self.count - 1))

  @property
  def trace_cov(self) -> float:
    """trace of the unbiased covariance."""
    return float(np.sum(self.var))


@dataclasses.dataclass(frozen=True)
class SetStats:
  """Gaussian statistics of C sets (one per class), all float64.

  count [C] int64 (true sample count), mean [C, D], trace [C] (= tr of the covariance used),
  var [C, D] (its diagonal), cov [C, D, D] or None (full_cov=False), regularised [C] bool
  (True where the set had fewer than 2 samples and its covariance was regularised).
  """
  count: np.ndarray
  mean: np.ndarray
  trace: np.ndarray
  var: np.ndarray
  cov: np.ndarray | None
  regularised: np.ndarray


@dataclasses.dataclass(frozen=True)
class ClassStats:
  """Per class c: `in_class` = stats of the images labelled c, `out_class` = of the rest."""
  in_class: SetStats
  out_class: SetStats

  @property
  def num_classes(self) -> int:
    return int(self.in_class.count.shape[0])

  @property
  def dim(self) -> int:
    return int(self.in_class.mean.shape[1])


@dataclasses.dataclass(frozen=True)
class ClassGaussianAccumulator:
  """Immutable streaming per-class accumulator: feed (features, labels) batches, then
  `finalize()` into `ClassStats` (classes c and not-c). Labels are ints in [0, C)."""
  count: np.ndarray  # int64 [C]
  mean: np.ndarray  # float64 [C, D]
  # one float64 [D, D] (full_cov) or [D] array per class; a tuple, so `add` shares the
  # arrays of classes absent from a batch instead of copying C * D^2 floats.
  m2: tuple[np.ndarray, ...]
  full_cov: bool = False

  @classmethod
  def empty(cls, num_classes: int, dim: int, full_cov: bool = False
            ) -> "ClassGaussianAccumulator":
    """No samples yet, for `num_classes` classes of `dim`-dim features."""
    shape = (dim, dim) if full_cov else (dim,)
    return cls(np.zeros(num_classes, np.int64), np.zeros((num_classes, dim)),
               tuple(np.zeros(shape) for _ in range(num_classes)), full_cov)

  @property
  def num_classes(self) -> int:
    return int(self.count.shape[0])

  def add(self, features, labels) -> "ClassGaussianAccumulator":
    """A new accumulator with a batch added: features [N, D], labels [N] ints in [0, C)."""
    x = np.asarray(features)  # cast to float64 block by block in _class_moments
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
      raise ValueError(f"features must be a real [N, D] array, got {x.dtype} of shape "
                       f"{x.shape}")
    y = _check_labels(labels, x.shape[0], self.num_classes)
    if x.shape[1] != self.mean.shape[1]:
      raise ValueError(f"features have dimension {x.shape[1]}, the accumulator "
                       f"{self.mean.shape[1]}")
    count, mean, m2 = self.count.copy(), self.mean.copy(), list(self.m2)
    for c, (nb, mb, m2b) in enumerate(_class_moments(x, y, self.num_classes,
                                                     self.full_cov)):
      if nb:
        count[c], mean[c], m2[c] = _merge(int(count[c]), mean[c], m2[c], nb, mb, m2b,
                                          self.full_cov)
    return ClassGaussianAccumulator(count, mean, tuple(m2), self.full_cov)

  def merge(self, other: "ClassGaussianAccumulator") -> "ClassGaussianAccumulator":
    """A new accumulator holding the samples of both."""
    if (other.mean.shape != self.mean.shape or other.full_cov != self.full_cov):
      raise ValueError(f"cannot merge class accumulators of shapes {self.mean.shape} "
                       f"(full_cov={self.full_cov}) and {other.mean.shape} "
                       f"(full_cov={other.full_cov})")
    count, mean, m2 = self.count.copy(), self.mean.copy(), list(self.m2)
    for c in range(self.num_classes):
      count[c], mean[c], m2[c] = _merge(int(count[c]), mean[c], m2[c], int(other.count[c]),
                                        other.mean[c], other.m2[c], self.full_cov)
    return ClassGaussianAccumulator(count, mean, tuple(m2), self.full_cov)

  def total(self) -> GaussianAccumulator:
    """All classes together, as one accumulator."""
    acc = GaussianAccumulator.empty(self.mean.shape[1], self.full_cov)
    for c in range(self.num_classes):
      acc = acc.merge(GaussianAccumulator(int(self.count[c]), self.mean[c], self.m2[c],
                                          self.full_cov))
    return acc

  def finalize(self, *, small_set: str = "pooled", eps: float = 1e-6,
               class_names: Sequence[str] | None = None, what: str = "features"
               ) -> ClassStats:
    """ClassStats of the sets c and not-c for every class (see the module docstring for
    the regularisation of sets with fewer than 2 samples). `what` names the pool in
    warnings, e.g. "synthetic"."""
    _check_small_set(small_set)
    total = self.total()
    c_num = self.num_classes
    ins = [(int(self.count[c]), self.mean[c], self.m2[c]) for c in range(c_num)]
    outs = [_remove(total.count, total.mean, total.m2, *ins[c], self.full_cov)
            for c in range(c_num)]
    fallback = _Fallback.of(total, small_set, eps)
    names = _names(class_names, c_num)
    return ClassStats(
        in_class=_set_stats(ins, self.full_cov, fallback, [f"class {n}" for n in names],
                            what),
        out_class=_set_stats(outs, self.full_cov, fallback,
                             [f"not-class {n}" for n in names], what))


@dataclasses.dataclass(frozen=True)
class _Fallback:
  mean: np.ndarray
  var: np.ndarray
  cov: np.ndarray | None
  how: str

  @classmethod
  def of(cls, total: GaussianAccumulator, small_set: str, eps: float) -> "_Fallback":
    d = total.dim
    mean = total.mean.copy() if total.count > 0 else np.zeros(d)
    if small_set == "pooled" and total.count >= 2:
      var = total.var
      cov = total.m2 / (total.count - 1) if total.full_cov else None
      how = f"the pooled covariance of all {total.count} samples"
    else:
      var = np.full(d, float(eps))
      cov = np.eye(d) * eps if total.full_cov else None
      how = f"{eps:g} * I"
    return cls(mean, var, cov, how)


def _set_stats(triples, full_cov: bool, fb: _Fallback, labels: Sequence[str],
               what: str) -> SetStats:
  c_num = len(triples)
  d = fb.mean.shape[0]
  count = np.zeros(c_num, np.int64)
  mean = np.zeros((c_num, d))
  var = np.zeros((c_num, d))
  cov = np.zeros((c_num, d, d)) if full_cov else None
  reg = np.zeros(c_num, bool)
  for c, (n, mu, m2) in enumerate(triples):
    count[c] = n
    mean[c] = mu if n > 0 else fb.mean
    if n >= 2:
      diag = np.diagonal(m2) if full_cov else m2
      var[c] = diag / (n - 1)
      if full_cov:
        cov[c] = m2 / (n - 1)
    else:
      reg[c] = True
      logging.getLogger(__name__).warning(
          "%s set of %s has %d sample(s), fewer than 2: using %s as its covariance%s",
          what, labels[c], n, fb.how, " and the pooled mean" if n == 0 else "")
      var[c] = fb.var
      if full_cov:
        cov[c] = fb.cov if fb.cov is not None else np.diag(fb.var)
  return SetStats(count=count, mean=mean, trace=var.sum(axis=1), var=var, cov=cov,
                  regularised=reg)


def _check_small_set(small_set: str):
  if small_set not in _SMALL_SET_MODES:
    raise ValueError(f"small_set={small_set!r} is not one of {_SMALL_SET_MODES}")


def _names(class_names, c_num: int) -> list[str]:
  if class_names is None:
    return [str(c) for c in range(c_num)]
  names = [str(n) for n in class_names]
  if len(names) != c_num:
    raise ValueError(f"class_names has {len(names)} names for {c_num} classes")
  return [f"{c} ({n})" for c, n in enumerate(names)]


def _check_labels(labels, n: int, num_classes: int) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,):
    raise ValueError(f"labels must have shape ({n},) to match the features, got {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {y.dtype}")
  if n and (y.min() < 0 or y.max() >= num_classes):
    bad = y[(y < 0) | (y >= num_classes)]
    raise ValueError(f"labels must lie in [0, {num_classes}); found {bad[:5].tolist()}")
  return y.astype(np.int64)


def subsample_indices(labels, num_classes: int, max_per_set: int, seed: int = 0
                      ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per class c, seeded random indices of at most `max_per_set` images labelled c and of
  at most `max_per_set` images not labelled c (without replacement, sorted). This is the
  paper's "64 random images per set" option; it depends on the labels only."""
  y = _check_labels(labels, np.asarray(labels).shape[0], num_classes)
  if max_per_set < 1:
    raise ValueError(f"max_per_set must be >= 1, got {max_per_set}")
  rng = np.random.default_rng(seed)
  ins, outs = [], []
  for c in range(num_classes):
    for pool, out in ((np.flatnonzero(y == c), ins), (np.flatnonzero(y != c), outs)):
      if pool.size > max_per_set:
        pool = np.sort(rng.choice(pool, size=max_per_set, replace=False))
      out.append(pool)
  return ins, outs


def class_stats(features, labels, num_classes: int, *, max_per_set: int | None = None,
                seed: int = 0, full_cov: bool = False, small_set: str = "pooled",
                eps: float = 1e-6, class_names: Sequence[str] | None = None,
                what: str = "features", batch_size: int = 65536) -> ClassStats:
  """Gaussian stats of the sets "c" and "not c" for every class c of one pool.

  features [N, D] (any float dtype, accumulated in float64), labels [N] ints in [0, C).
  max_per_set=None uses every image (streamed in chunks of `batch_size`); an int draws that
  many random images per set (seeded by `seed`, see `subsample_indices`), like the paper's
  64. Sets with fewer than 2 samples are regularised (`small_set`, `eps`; module docstring)
  and a warning names the class (`class_names`, `what` make it readable).
  """
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f"features must be a [N, D] array, got shape {x.shape}")
  y = _check_labels(labels, x.shape[0], num_classes)
  _check_small_set(small_set)
  d = x.shape[1]
  if max_per_set is None:
    acc = ClassGaussianAccumulator.empty(num_classes, d, full_cov)
    for start in range(0, x.shape[0], batch_size):
      acc = acc.add(x[start:start + batch_size], y[start:start + batch_size])
    return acc.finalize(small_set=small_set, eps=eps, class_names=class_names, what=what)

  ins_idx, outs_idx = subsample_indices(y, num_classes, max_per_set, seed)
  total = GaussianAccumulator.empty(d, full_cov)
  for start in range(0, x.shape[0], batch_size):
    total = total.add(x[start:start + batch_size])
  fallback = _Fallback.of(total, small_set, eps)
  names = _names(class_names, num_classes)

  def triples(index_sets):
    return [_batch_moments(np.asarray(x[idx], np.float64).reshape(-1, d), full_cov)
            for idx in index_sets]

  return ClassStats(
      in_class=_set_stats(triples(ins_idx), full_cov, fallback,
                          [f"class {n}" for n in names], what),
      out_class=_set_stats(triples(outs_idx), full_cov, fallback,
                           [f"not-class {n}" for n in names], what))
