"""From a config to the arrays a run trains on: real splits, the synthetic pool, the bank.

`prepare_inputs(config, workdir)` loads the real dataset, makes the stratified splits,
builds (or reads) the synthetic pool, checks the class sets, loads an optional score table,
and lays out the training bank (pool rows first, then the real train rows).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from synthbandit_jax import arms as arms_lib
from synthbandit_jax import parallel
from synthbandit_jax.data import controlled as controlled_lib
from synthbandit_jax.data import pool as pool_lib
from synthbandit_jax.data import real as real_lib
from synthbandit_jax.data import scores as scores_lib
from synthbandit_jax.data import splits as splits_lib


@dataclasses.dataclass
class Inputs:
  """Everything the training modes need, on the host."""
  class_names: list[str]
  train: real_lib.ImageDataset
  val: real_lib.ImageDataset
  test: real_lib.ImageDataset
  pool: pool_lib.Pool
  layout: arms_lib.BankLayout
  bank_images: np.ndarray
  bank_labels: np.ndarray
  scores: scores_lib.ScoreTable | None
  skipped: list[dict]
  pool_root: Path | None
  # model.features (training/frozen_features.py): the val / test features that replace
  # val.images / test.images (bank_images then holds the bank's features); None = images.
  eval_features: dict[str, np.ndarray] | None = None

  def eval_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of "val" or "test": images, or their features (model.features)."""
    ds = {"val": self.val, "test": self.test}[split]
    x = ds.images if self.eval_features is None else self.eval_features[split]
    return x, ds.labels

  def counts(self) -> dict[str, int]:
    return {"train": len(self.train), "val": len(self.val), "test": len(self.test),
            "pool": len(self.pool), "classes": len(self.class_names)}


def _size(config) -> tuple[int, int] | None:
  s = int(config.data.image_size)
  return (s, s) if s > 0 else None


def _csv(s: str) -> list[str]:
  return [x.strip() for x in str(s).split(",") if x.strip()]


def _restrict(ds, keep: list[str]):
  """Keeps only the classes in `keep` (in that order), relabelling."""
  where = {c: i for i, c in enumerate(ds.class_names)}
  old = np.asarray([where[c] for c in keep])
  rows = np.flatnonzero(np.isin(ds.labels, old))
  sub = ds.subset(rows)
  remap = np.full(len(ds.class_names), -1, np.int64)
  remap[old] = np.arange(len(keep))
  sub.labels = remap[sub.labels].astype(np.int32)
  sub.class_names = list(keep)
  return sub


def split_seed(config) -> int:
  """The seed of the real-data subsample and splits: data.split_seed, or seed when < 0."""
  value = int(config.data.get("split_seed", -1))
  return int(config.seed) if value < 0 else value


def real_splits(config) -> tuple[dict, list[dict]]:
  """The real data of `config` split into train / val / test / holdout, and skipped files."""
  seed = split_seed(config)
  real = real_lib.load_real(config.data.real, channels=int(config.data.channels) or None,
                            image_size=_size(config),
                            max_per_class=int(config.data.max_per_class) or None,
                            seed=seed, alpha=config.data.alpha,
                            resize_method=config.data.resize_method, fit=config.data.fit)
  splits = splits_lib.make_splits(
      real, val_fraction=float(config.data.val_fraction),
      test_fraction=float(config.data.test_fraction),
      holdout_fraction=float(config.data.holdout_fraction), seed=seed)
  skipped = [dict(s, source="real") for ds in real.values() for s in ds.skipped]
  return splits, skipped


def pool_root(config, workdir: str | Path, splits: dict, class_names: list[str], *,
              progress: bool = True,
              rebuild_hint: str = "With launch/train.py, --overwrite rebuilds the workdir's "
                                  "pool; or pick another --workdir / pool.path.") -> Path:
  """The pool directory of `config`: pool.path (kind "dir"), or the controlled pool, built
  (or completed) from the held-out split first. With several processes, process 0 builds it
  while the others wait. Errors name the config key; `rebuild_hint` ends the error for a
  controlled pool made from other arguments."""
  workdir = Path(workdir)
  kind = config.pool.kind
  if kind == "controlled":
    holdout = splits["holdout"]
    if len(holdout) == 0:
      raise ValueError("pool.kind='controlled' builds the pool from held-out real training "
                       "images, but data.holdout_fraction is 0: set it (e.g. 0.4)")
    root = Path(config.pool.path) if config.pool.path else workdir / "pool"
    # Always called: it skips finished shards, and refuses a pool built from other
    # arguments (e.g. another seed, whose holdout may overlap this seed's val/test).
    logging.info("controlled pool in %s from %d held-out images", root, len(holdout))
    error = None
    if parallel.is_main_process():
      try:
        controlled_lib.build_controlled_pool(
            holdout.images, holdout.labels, list(class_names), root, seed=split_seed(config),
            kinds=_csv(config.pool.kinds),
            severities=tuple(int(s) for s in _csv(config.pool.severities)),
            copies_per_image=int(config.pool.copies_per_image), source_ids=holdout.ids,
            progress=progress)
      except ValueError as e:
        error = e
    parallel.sync("controlled pool built")
    if error is not None:
      if "other arguments" not in str(error):
        raise error
      raise ValueError(f"{error}. ({rebuild_hint})") from error
    if not (root / pool_lib.METADATA_NAME).exists():
      raise FileNotFoundError(f"{root}: process 0 failed to build the controlled pool (see "
                              "its log)")
    return root
  if kind == "dir":
    if not config.pool.path:
      raise ValueError("pool.kind='dir' needs pool.path (a directory with metadata.jsonl)")
    root = Path(config.pool.path)
    if not (root / pool_lib.METADATA_NAME).exists():
      raise FileNotFoundError(f"pool.path={root}: no {pool_lib.METADATA_NAME} there")
    return root
  raise ValueError(f"config pool.kind must be 'controlled' or 'dir', got {kind!r}")


def prepare_inputs(config, workdir: str | Path, progress: bool = True,
                   load_scores: bool = True) -> Inputs:
  """Loads and splits the real data and builds/reads the synthetic pool for `config`.

  With `load_scores`, also loads config.scores.path aligned to the pool (pool images
  without a row get NaN scores, and so never enter a top-k arm, when
  scores.allow_missing is set; otherwise a mismatch is an error naming the ids).
  """
  workdir = Path(workdir)
  image_opts = dict(alpha=config.data.alpha, resize_method=config.data.resize_method,
                    fit=config.data.fit)
  splits, skipped = real_splits(config)
  train, val, test = splits["train"], splits["val"], splits["test"]
  class_names = list(train.class_names)

  root = pool_root(config, workdir, splits, class_names, progress=progress)

  image_size = train.images.shape[1:3]
  unknown = config.pool.unknown_classes
  if unknown not in ("error", "skip"):
    raise ValueError(f"config pool.unknown_classes must be 'error' or 'skip', got {unknown!r}")
  pool = pool_lib.read_pool(root, class_names=class_names if unknown == "skip" else None,
                            channels=train.images.shape[3], image_size=tuple(image_size),
                            unknown_classes=unknown, **image_opts)
  skipped += [dict(s, source="pool") for s in pool.skipped]

  real_set = set(class_names)
  counts = np.bincount(pool.labels, minlength=len(pool.class_names))
  pool_set = {c for c, n in zip(pool.class_names, counts) if n > 0}
  if real_set != pool_set:
    only_real = sorted(real_set - pool_set)
    only_pool = sorted(pool_set - real_set)
    if config.data.class_mismatch != "intersect":
      raise ValueError(
          f"real and synthetic class sets differ: only in the real data {only_real}, only in "
          f"the pool {only_pool}. Fix the data, or set --config.data.class_mismatch=intersect "
          f"to train on the classes both have.")
    keep = [c for c in class_names if c in pool_set]
    if not keep:
      raise ValueError("real and synthetic data share no class")
    logging.warning("class_mismatch=intersect: dropping real-only classes %s and pool-only "
                    "classes %s", only_real, only_pool)
    train, val, test = (_restrict(d, keep) for d in (train, val, test))
    pool = _restrict(pool, keep)
    class_names = keep
  if pool.class_names != class_names:
    pool = _restrict(pool, class_names)

  scores = None
  if config.scores.path and load_scores:
    directions = dict(kv.split(":") for kv in _csv(config.scores.directions)) or None
    scores = scores_lib.load_score_table(config.scores.path, directions=directions)
    scores = scores_lib.align_scores(scores, pool.ids,
                                     allow_missing=bool(config.scores.allow_missing))

  layout = arms_lib.BankLayout(num_pool=len(pool), num_real=len(train))
  bank_images = np.concatenate([pool.images, train.images]) if len(pool) else train.images
  bank_labels = np.concatenate([pool.labels, train.labels]).astype(np.int32)
  return Inputs(class_names, train, val, test, pool, layout, bank_images, bank_labels, scores,
                skipped, root)


def _group_rows(inputs: Inputs) -> dict[str, np.ndarray]:
  groups = controlled_lib.controlled_groups(inputs.pool)
  if not groups:
    raise ValueError("arms.source='groups' needs a pool whose rows have extras.kind "
                     "(the controlled pool); use arms.source='scores' or 'file' otherwise")
  return groups


def cap_per_class(rows: np.ndarray, labels: np.ndarray, k: int, seed: int) -> np.ndarray:
  """At most k of `rows` per class (labels[rows]), drawn without replacement by seed."""
  if k <= 0:
    return rows
  rng = np.random.default_rng(seed)
  out = []
  for c in np.unique(labels[rows]):
    r = rows[labels[rows] == c]
    out.append(r if len(r) <= k else rng.choice(r, size=k, replace=False))
  return np.sort(np.concatenate(out))


def candidate_arms(config, inputs: Inputs) -> list[arms_lib.NamedIndices]:
  """The bandit's arms (bank rows) from config.arms, plus the control arms."""
  src = config.arms.source
  k = int(config.arms.k)
  seed = int(config.seed)
  labels = inputs.pool.labels
  if src == "groups":
    groups = _group_rows(inputs)
    arms = [(name, cap_per_class(rows, labels, k, seed + i))
            for i, (name, rows) in enumerate(sorted(groups.items(), key=lambda kv: kv[0]))]
  elif src == "scores":
    if inputs.scores is None:
      raise ValueError("arms.source='scores' needs scores.path (a per-image score table)")
    rankings = _csv(config.arms.rankings) or None
    arms = arms_lib.topk_arms(inputs.scores.columns, inputs.scores.directions, labels,
                              inputs.class_names, k if k > 0 else len(labels), rankings)
  elif src == "file":
    if not config.arms.file:
      raise ValueError("arms.source='file' needs arms.file (JSON: arm name -> pool ids)")
    arms = arms_lib.arms_from_file(config.arms.file, inputs.pool.ids)
  else:
    raise ValueError(f"config arms.source must be 'groups', 'scores' or 'file', got {src!r}")
  for ctrl in _csv(config.arms.controls):
    if ctrl == "random":
      per_class = k if k > 0 else max(1, int(np.median([len(a[1]) for a in arms]) //
                                             max(1, len(inputs.class_names))))
      arms.append(arms_lib.random_arm(labels, len(inputs.class_names), per_class, seed))
    elif ctrl == "all":
      arms.append(arms_lib.all_arm(len(labels)))
    elif ctrl == "real":
      arms.append(("real", inputs.layout.real_rows))
    else:
      raise ValueError(f"config arms.controls: unknown control arm {ctrl!r} "
                       f"(valid: random, all, real)")
  if config.arms.add_real:
    arms = [(n, idx) if n == "real" else (n, np.concatenate([idx, inputs.layout.real_rows]))
            for n, idx in arms]
  return arms


def mode_arms(config, inputs: Inputs, mode: str) -> tuple[list[arms_lib.NamedIndices], bool]:
  """Arms for a training mode, and whether the mode uses the bandit (else fixed arm 0)."""
  layout = inputs.layout
  if mode == "real":
    return [("real", layout.real_rows)], False
  if mode == "synthetic":
    return [arms_lib.all_arm(len(inputs.pool), name="synthetic")], False
  if mode.startswith("mix"):
    try:
      pct = float(mode[3:])
    except ValueError:
      raise ValueError(f"mode {mode!r}: write mixNN with NN the synthetic percent, e.g. "
                       f"mix50") from None
    return [arms_lib.mix_arm(inputs.train.labels, inputs.pool.labels, layout, pct / 100.0,
                             budget=len(inputs.train), seed=int(config.seed), name=mode)], False
  if mode.startswith("topk:"):
    col = mode.split(":", 1)[1]
    if inputs.scores is None:
      raise ValueError(f"mode {mode!r} needs scores.path (a per-image score table)")
    k = int(config.arms.k) or len(inputs.pool)
    return arms_lib.topk_arms(inputs.scores.columns, inputs.scores.directions,
                              inputs.pool.labels, inputs.class_names, k, [col]), False
  if mode.startswith("group:"):
    name = mode.split(":", 1)[1]
    groups = _group_rows(inputs)
    if name not in groups:
      raise KeyError(f"mode {mode!r}: no group {name!r}; groups: {sorted(groups)}")
    return [(name, cap_per_class(groups[name], inputs.pool.labels, int(config.arms.k),
                                  int(config.seed)))], False
  if mode == "bandit" or mode.startswith("bandit:") or mode == "uniform":
    return candidate_arms(config, inputs), True
  raise ValueError(f"unknown training mode {mode!r}; valid: real, synthetic, mixNN, "
                   f"topk:COLUMN, group:NAME, bandit, bandit:ALGO, uniform")


def describe(inputs: Inputs) -> dict[str, Any]:
  return {"counts": inputs.counts(), "class_names": inputs.class_names,
          "pool": str(inputs.pool_root) if inputs.pool_root else None}
