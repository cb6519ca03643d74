"""Deterministic stratified splits of real data into train / val / test / holdout.

Per class, the image indices are shuffled by a generator seeded from (seed, class index) only,
so one class's split does not depend on the other classes. Per-class counts use
largest-remainder rounding of `fraction * n_class`, then every part with a positive fraction
is given at least one image of every class (taken from the largest part). Parts are cut from
the shuffled indices in the order of the `fractions` mapping, then the remainder ("rest").
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from synthbandit_jax.data.real import ImageDataset

log = logging.getLogger(__name__)

REST = "rest"
_EPS = 1e-9


def _class_rng(seed: int, label: int) -> np.random.Generator:
  # The trailing 2 keeps this stream apart from real.py's per-class subsampling stream.
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(label), 2]))


def _allocate(n: int, names: list[str], fractions: list[float], label: str) -> list[int]:
  """Largest-remainder counts of `n` items over parts, at least 1 for each positive part."""
  quotas = [f * n for f in fractions]
  counts = [int(np.floor(q + _EPS)) for q in quotas]
  left = n - sum(counts)
  # Only parts with a positive fraction may receive the leftover; ties go to the earlier part.
  order = sorted((i for i, f in enumerate(fractions) if f > 0),
                 key=lambda i: (-(quotas[i] - counts[i]), i))
  for i in order[:left]:
    counts[i] += 1
  positive = [i for i, f in enumerate(fractions) if f > 0]
  if n < len(positive):
    raise ValueError(
        f"class {label} has {n} image(s) but the splits {[names[i] for i in positive]} need at "
        f"least one image of every class each; add images of class {label}, use fewer splits, "
        f"or drop the class")
  for i in positive:
    if counts[i] == 0:
      donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
      counts[donor] -= 1
      counts[i] += 1
  assert sum(counts) == n, (counts, n)
  return counts


def stratified_split(labels: np.ndarray, fractions: Mapping[str, float], seed: int, *,
                     class_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Splits indices 0..N-1 per class by `fractions` (name -> fraction, sum <= 1).

  The remainder `1 - sum(fractions)` goes to the key "rest" (absent when the fractions sum to
  1). Every part with a positive fraction gets at least one image of each class; a class with
  too few images raises an error naming it (by `class_names[label]` if given). Returns
  sorted, disjoint int64 index arrays that together cover every index. Deterministic for
  `seed`.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
    raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
  if labels.size and labels.min() < 0:
    raise ValueError(f"labels must be non-negative, got min {labels.min()}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  names = [str(k) for k in fractions]
  fracs = [float(fractions[k]) for k in fractions]
  if REST in names:
    raise ValueError(f"'{REST}' is reserved for the remainder; rename that split")
  for k, f in zip(names, fracs):
    if not 0.0 <= f <= 1.0:
      raise ValueError(f"fraction for split {k!r} must be in [0, 1], got {f}")
  total = sum(fracs)
  if total > 1.0 + _EPS:
    raise ValueError(f"split fractions sum to {total:.6g} > 1: {dict(zip(names, fracs))}")
  rest = 1.0 - total
  if rest > _EPS:
    names.append(REST)
    fracs.append(rest)
  parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    perm = _class_rng(seed, int(c)).permutation(idx)
    cname = f"{int(c)} ({class_names[int(c)]!r})" if class_names is not None else str(int(c))
    counts = _allocate(len(idx), names, fracs, cname)
    start = 0
    for k, m in zip(names, counts):
      parts[k].append(perm[start:start + m])
      start += m
  return {k: (np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64))
          for k, v in parts.items()}


def _check_same_classes(a: ImageDataset, b: ImageDataset, an: str, bn: str) -> None:
  if a.class_names == b.class_names:
    return
  only_a = [c for c in a.class_names if c not in b.class_names]
  only_b = [c for c in b.class_names if c not in a.class_names]
  if only_a or only_b:
    raise ValueError(f"class names differ between {an} and {bn}: only in {an}: {only_a}, "
                     f"only in {bn}: {only_b}")
  raise ValueError(f"class names of {an} and {bn} are the same set in a different order "
                   f"({an}: {a.class_names}, {bn}: {b.class_names}); labels would not agree")


def make_splits(real: Mapping[str, ImageDataset], *, val_fraction: float,
                test_fraction: float, holdout_fraction: float = 0.0,
                seed: int) -> dict[str, ImageDataset]:
  """Builds {"train", "val", "test", "holdout"} from `load_real`'s output.

  With {"train", "test"}: test is kept as given (test_fraction is ignored) and val / holdout
  are carved out of train (fractions of train). With {"all"} (or only "train"): test is carved
  too. "holdout" (possibly empty) never overlaps val or test; it is the real data later used
  to build a controlled synthetic pool. Stratified per class (see `stratified_split`).
  """
  keys = set(real)
  if keys not in ({"all"}, {"train"}, {"train", "test"}):
    raise ValueError(f"real dataset splits {sorted(keys)} not understood; expected {{'all'}} "
                     f"or {{'train', 'test'}}")
  for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction),
                  ("holdout_fraction", holdout_fraction)):
    if not 0.0 <= f < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {f}")
  if val_fraction <= 0:
    raise ValueError("val_fraction must be > 0: the bandit's reward is accuracy on real val")
  if "test" in real:
    source, test_given = real["train"], real["test"]
    _check_same_classes(source, test_given, "train", "test")
    if test_fraction:
      log.info("test_fraction=%s ignored: the dataset has its own test split", test_fraction)
    fractions = {"val": val_fraction, "holdout": holdout_fraction}
  else:
    source = real["all"] if "all" in real else real["train"]
    test_given = None
    if test_fraction <= 0:
      raise ValueError("test_fraction must be > 0 when the dataset has no test split")
    fractions = {"test": test_fraction, "val": val_fraction, "holdout": holdout_fraction}
  if sum(fractions.values()) >= 1.0 - _EPS:
    raise ValueError(f"fractions {fractions} leave nothing for train; lower them")
  fractions["train"] = 1.0 - sum(fractions.values())
  idx = stratified_split(source.labels, fractions, seed, class_names=source.class_names)
  out = {k: source.subset(idx[k]) for k in ("train", "val", "holdout")}
  out["test"] = test_given if test_given is not None else source.subset(idx["test"])
  return {k: out[k] for k in ("train", "val", "test", "holdout")}
