"""Arms: named subsets of the training bank, padded to one static shape.

An arm is a set of row indices into the training *bank* (the synthetic pool followed by the
real training split, see `bank_layout`). `Arms` stores all arms as a padded `[A, K]` int32
array plus a boolean mask, so the jitted epoch indexes any arm without recompiling.

Builders (all return `list[tuple[name, pool-or-bank indices]]` or `Arms`):
- `topk_arms`: top-k images per class under each ranking of a score table, direction-aware
  (for a distance, lower ranks higher; NaN scores never get in).
- `random_arm`: a uniform random subset with k images per class (control).
- `all_arm`: every synthetic image (control).
- `group_arms`: arms from explicit groups (e.g. the controlled pool's corruption kinds).
- `arms_from_file`: a JSON file `{"arm name": ["pool id", ...], ...}`.
- `with_real`: add the real training split to every arm.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from synthbandit_jax import io as sio

NamedIndices = tuple[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Arms:
  """Padded arms. `indices[a, :sizes[a]]` are bank rows of arm a; `mask` marks them."""
  names: tuple[str, ...]
  indices: np.ndarray  # int32 [A, K]
  mask: np.ndarray     # bool [A, K]

  @property
  def sizes(self) -> np.ndarray:
    return self.mask.sum(axis=1).astype(np.int64)

  @property
  def num_arms(self) -> int:
    return len(self.names)

  def members(self, a: int) -> np.ndarray:
    return self.indices[a, self.mask[a]]

  def as_dict(self) -> dict[str, list[int]]:
    return {n: self.members(i).tolist() for i, n in enumerate(self.names)}


def pad_arms(arms: Sequence[NamedIndices], size: int | None = None) -> Arms:
  """Pads named index arrays to a common size K (default: the largest arm)."""
  if not arms:
    raise ValueError("no arms to train on: check the arms config (arms.source, arms.k, ...)")
  names = [n for n, _ in arms]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"duplicate arm names: {dup}")
  for name, idx in arms:
    if len(idx) == 0:
      raise ValueError(f"arm '{name}' is empty: it has no images to train on")
  k = max(len(idx) for _, idx in arms)
  if size is not None:
    if size < k:
      raise ValueError(f"pad size {size} is smaller than the largest arm ({k})")
    k = size
  indices = np.zeros((len(arms), k), np.int32)
  mask = np.zeros((len(arms), k), bool)
  for a, (_, idx) in enumerate(arms):
    idx = np.asarray(idx, np.int64)
    indices[a, :len(idx)] = idx
    indices[a, len(idx):] = idx[0]
    mask[a, :len(idx)] = True
  return Arms(tuple(names), indices, mask)


def _per_class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.bincount(labels, minlength=num_classes)


def topk_arms(columns: Mapping[str, np.ndarray], directions: Mapping[str, str],
              labels: np.ndarray, class_names: Sequence[str], k: int,
              rankings: Sequence[str] | None = None, prefix: str = "top") -> list[NamedIndices]:
  """One arm per ranking: the k best-scored pool images of every class.

  Args:
    columns: score column name -> float array aligned with the pool (`labels`).
    directions: column -> "higher" or "lower" (which end is better).
    labels: pool labels (int, indices into class_names).
    k: images per class per arm; a class with fewer scored images contributes all it has
      (a warning is logged); a class with none is an error naming it.
    rankings: the columns to use (default: all).
  """
  if k <= 0:
    raise ValueError(f"config arms.k must be positive, got {k}")
  rankings = list(columns) if rankings is None else list(rankings)
  missing = [r for r in rankings if r not in columns]
  if missing:
    raise KeyError(f"rankings {missing} are not score columns; available: {sorted(columns)}")
  out = []
  for name in rankings:
    values = np.asarray(columns[name], np.float64)
    direction = directions.get(name, "higher")
    if direction not in ("higher", "lower"):
      raise ValueError(f"score column '{name}': direction must be 'higher' or 'lower', "
                       f"got {direction!r}")
    chosen = []
    for c, cname in enumerate(class_names):
      rows = np.flatnonzero((labels == c) & np.isfinite(values))
      if len(rows) == 0:
        raise ValueError(f"ranking '{name}': class '{cname}' has no scored synthetic images")
      if len(rows) < k:
        logging.warning("ranking '%s': class '%s' has only %d scored images (k=%d)", name,
                        cname, len(rows), k)
      key = values[rows] if direction == "lower" else -values[rows]
      order = np.argsort(key, kind="stable")
      chosen.append(rows[order[:k]])
    out.append((f"{prefix}:{name}", np.sort(np.concatenate(chosen))))
  return out


def random_arm(labels: np.ndarray, num_classes: int, k: int, seed: int,
               name: str = "random") -> NamedIndices:
  """A uniform random subset of k images per class (fewer where a class has fewer)."""
  rng = np.random.default_rng(seed)
  chosen = []
  for c in range(num_classes):
    rows = np.flatnonzero(labels == c)
    if len(rows):
      chosen.append(rng.choice(rows, size=min(k, len(rows)), replace=False))
  if not chosen:
    raise ValueError("random arm: the pool is empty")
  return name, np.sort(np.concatenate(chosen))


def all_arm(n: int, name: str = "all") -> NamedIndices:
  """Every synthetic image."""
  if n == 0:
    raise ValueError("arm 'all': the synthetic pool is empty")
  return name, np.arange(n)


def group_arms(groups: Mapping[str, np.ndarray], prefix: str = "") -> list[NamedIndices]:
  """Arms from explicit groups of pool rows (e.g. controlled-pool kinds)."""
  return [(f"{prefix}{name}", np.sort(np.asarray(idx))) for name, idx in groups.items()]


def arms_from_file(path: str | Path, pool_ids: Sequence[str]) -> list[NamedIndices]:
  """Reads `{"arm name": ["pool id", ...]}` (JSON); unknown ids are an error naming them."""
  path = Path(path)
  data = sio.read_json(path)
  if not isinstance(data, dict) or not data:
    raise ValueError(f"{path}: expected a JSON object mapping arm names to lists of pool ids")
  where = {pid: i for i, pid in enumerate(pool_ids)}
  out = []
  for name, ids in data.items():
    if not isinstance(ids, list):
      raise ValueError(f"{path}: arm '{name}' must be a list of pool ids")
    unknown = [i for i in ids if i not in where]
    if unknown:
      raise KeyError(f"{path}: arm '{name}' names {len(unknown)} ids not in the pool, "
                     f"e.g. {unknown[:5]}")
    out.append((str(name), np.sort(np.asarray([where[i] for i in ids], np.int64))))
  return out


def save_arms_file(path: str | Path, arms: Sequence[NamedIndices],
                   pool_ids: Sequence[str]) -> Path:
  """Writes arms (pool-row indices) as the JSON format `arms_from_file` reads."""
  return sio.atomic_write_json(path, {n: [pool_ids[i] for i in idx] for n, idx in arms})


@dataclasses.dataclass(frozen=True)
class BankLayout:
  """Row ranges of the training bank: pool rows [0, num_pool), real rows after them."""
  num_pool: int
  num_real: int

  @property
  def pool_rows(self) -> np.ndarray:
    return np.arange(self.num_pool)

  @property
  def real_rows(self) -> np.ndarray:
    return self.num_pool + np.arange(self.num_real)


def with_real(arms: Sequence[NamedIndices], layout: BankLayout) -> list[NamedIndices]:
  """Adds the whole real training split to every arm (arm indices are bank rows)."""
  return [(n, np.concatenate([idx, layout.real_rows])) for n, idx in arms]


def mix_arm(real_labels: np.ndarray, pool_labels: np.ndarray, layout: BankLayout,
            synthetic_fraction: float, budget: int, seed: int,
            name: str | None = None) -> NamedIndices:
  """A fixed mix of real and synthetic images at a total budget (bank rows).

  round(synthetic_fraction * budget) synthetic and the rest real images, each drawn
  uniformly without replacement, stratified by class (per class the same fraction).
  """
  if not 0.0 <= synthetic_fraction <= 1.0:
    raise ValueError(f"synthetic fraction must be in [0, 1], got {synthetic_fraction}")
  n_syn = int(round(synthetic_fraction * budget))
  n_real = budget - n_syn
  if n_syn > len(pool_labels):
    raise ValueError(f"mix needs {n_syn} synthetic images but the pool has {len(pool_labels)}")
  if n_real > len(real_labels):
    raise ValueError(f"mix needs {n_real} real images but the train split has "
                     f"{len(real_labels)}")
  rng = np.random.default_rng(seed)

  def stratified(labels, n):
    if n == 0:
      return np.zeros((0,), np.int64)
    # Per-class quota proportional to the class's share, largest remainder rounding.
    counts = np.bincount(labels)
    exact = counts / counts.sum() * n
    quota = np.floor(exact).astype(int)
    rest = n - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:rest]] += 1
    rows = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
            for c, q in enumerate(quota) if q]
    return np.concatenate(rows)

  syn = stratified(pool_labels, n_syn)
  real = stratified(real_labels, n_real) + layout.num_pool
  name = name or f"mix{int(round(synthetic_fraction * 100))}"
  return name, np.sort(np.concatenate([syn, real]))
