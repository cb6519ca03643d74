"""The paper's experiment grid: datasets x classifiers x training modes x seeds -> one table.

`run_grid(config, workdir)` reads ``config.grid``:

  grid.datasets   comma list of dataset presets (see `DATASETS`): "generated" (MNIST-5k with
                  the pool of the offline generator), "controlled" (MNIST-5k with the
                  controlled pool), "config" (the config's own data and pool as given)
  grid.models     comma list of classifier names (model.name values), or presets of
                  `MODEL_PRESETS`: "inception_frozen" = the frozen FID Inception-V3 with a
                  new linear head (features computed once, shared by the datasets through
                  WORKDIR/features), "inception_frozen_mlp" = the same with an MLP head
  grid.modes      comma list of training modes; the metric dimension is the topk:<metric>
                  modes (topk:ssim, topk:psnr, topk:fid_2048, topk:dps, topk:fcs, topk:u...)
  grid.seeds      comma list of training seeds
  grid.split_seed the real splits' seed, fixed across the grid's seeds (default 0)
  grid.generated_from  a finished demo workdir whose pool and scores.csv the "generated"
                  dataset reuses (its split seed must be grid.split_seed)

Per dataset, the upstream stages (attributes, generator, generation, scoring) run once with
the pipeline into ``WORKDIR/<dataset>/`` (cached like any pipeline run), with the real splits
fixed (``data.split_seed``, default 0), so scores never see a later seed's val/test images.
Then every (model, seed) trains all modes into ``WORKDIR/<dataset>/<model>-seed<k>/``
(resumable: finished runs are not redone). The table, one row per (dataset, model, mode), has
the mean and standard deviation of test accuracy over seeds, and goes to
``WORKDIR/grid.md``, ``grid.csv`` and ``grid.json`` (with every individual run).
"""
from __future__ import annotations

import csv
import io as _io
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from synthbandit_jax import io as sio
from synthbandit_jax import parallel
from synthbandit_jax import pipeline

UPSTREAM = ("attributes", "generator", "generate", "score")

# grid.models entries that are not plain classifier names: a frozen pretrained backbone
# with a new head (the paper's classifiers), trained on the backbone's cached features.
MODEL_PRESETS = {
    "inception_frozen": {"name": "linear_head", "features": "inception_2048"},
    "inception_frozen_mlp": {"name": "mlp_head", "features": "inception_2048"},
}


def _csv(s: str) -> list[str]:
  return [x.strip() for x in str(s).split(",") if x.strip()]


def dataset_config(config, name: str) -> ml_collections.ConfigDict:
  """`config` with the data / pool settings of a dataset preset."""
  c = ml_collections.ConfigDict(config.to_dict())
  if name == "generated":
    c.data.real = "mnist5k"
    c.pool.kind, c.pool.path = "dir", ""
    c.generate.model = pipeline.OFFLINE_MODEL
    src = str(c.grid.get("generated_from", "") or "")
    if src:  # reuse a finished demo's pool and scores (same real splits: split seed 0)
      pool_dir, scores = Path(src) / "pool", Path(src) / "scores.csv"
      for p in (pool_dir / "metadata.jsonl", scores):
        if not p.exists():
          raise FileNotFoundError(f"grid.generated_from={src}: {p} is missing; run the demo "
                                  "there first (make demo WORKDIR=...)")
      c.pool.path, c.scores.path, c.scores.allow_missing = str(pool_dir), str(scores), True
  elif name == "controlled":
    c.data.real = "mnist5k"
    c.data.holdout_fraction = 0.4
    c.pool.kind, c.pool.path = "controlled", ""
    c.pool.copies_per_image = 1
  elif name != "config":
    raise ValueError(f"grid.datasets: unknown dataset {name!r}; valid: generated, controlled, "
                     "config")
  if c.arms.source != "scores" and any(m.startswith("topk:") for m in _csv(c.grid.modes)):
    c.arms.source = "scores"
  c.data.split_seed = int(c.grid.split_seed)
  return c


def _summarise(runs: list[dict]) -> list[dict]:
  groups: dict[tuple, list[float]] = {}
  for r in runs:
    groups.setdefault((r["dataset"], r["model"], r["mode"]), []).append(r["test_accuracy"])
  out = []
  for (ds, model, mode), accs in groups.items():
    a = np.asarray(accs, np.float64)
    out.append({"dataset": ds, "model": model, "mode": mode, "seeds": len(a),
                "mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0})
  return out


def format_markdown(rows: list[dict]) -> str:
  """The grid table: test accuracy mean +- std over seeds, best per (dataset, model) in bold."""
  lines = ["| dataset | model | mode | test accuracy (mean +- std) | seeds |",
           "| --- | --- | --- | --- | --- |"]
  best: dict[tuple, float] = {}
  for r in rows:
    key = (r["dataset"], r["model"])
    best[key] = max(best.get(key, -1.0), r["mean"])
  for r in rows:
    cell = f"{r['mean']:.4f} +- {r['std']:.4f}"
    if r["mean"] == best[(r["dataset"], r["model"])]:
      cell = f"**{cell}**"
    lines.append(f"| {r['dataset']} | {r['model']} | {r['mode']} | {cell} | {r['seeds']} |")
  return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
  buf = _io.StringIO()
  w = csv.DictWriter(buf, fieldnames=["dataset", "model", "mode", "mean", "std", "seeds"])
  w.writeheader()
  for r in rows:
    w.writerow(r)
  sio.atomic_write_text(path, buf.getvalue())


def run_grid(config, workdir: str | Path, *, progress: bool = True,
             train_fn: Any = None) -> dict:
  """Runs the grid (see the module docstring); returns the dict written to grid.json."""
  from synthbandit_jax.training import trainer  # pylint: disable=g-import-not-at-top
  train_fn = train_fn or trainer.run
  workdir = Path(workdir)
  g = config.grid
  datasets, models = _csv(g.datasets), _csv(g.models)
  seeds = [int(s) for s in _csv(g.seeds)]
  modes = _csv(g.modes)
  if not (datasets and models and seeds and modes):
    raise ValueError("grid.datasets, grid.models, grid.seeds and grid.modes must each name at "
                     "least one value")
  t0 = time.perf_counter()
  runs, upstream = [], {}
  for ds in datasets:
    base = dataset_config(config, ds)
    ds_dir = workdir / sio.safe_filename(ds)
    upstream[ds] = pipeline.run_pipeline(base, ds_dir, stages=UPSTREAM, progress=progress)
    resolved = pipeline.resolve_config(base, ds_dir)
    for model in models:
      for seed in seeds:
        c = ml_collections.ConfigDict(resolved.to_dict())
        c.seed, c.train.modes = seed, ",".join(modes)
        if model in MODEL_PRESETS:
          c.model.name = MODEL_PRESETS[model]["name"]
          c.model.features = MODEL_PRESETS[model]["features"]
          c.model.features_cache = str(workdir / "features")
        else:
          c.model.name = model
        if ds == "controlled" or c.pool.kind == "controlled":
          c.pool.path = str(ds_dir / "pool")  # shared by every run of this dataset
        run_dir = ds_dir / f"{sio.safe_filename(model)}-seed{seed}"
        print(f"[grid] {ds} / {model} / seed {seed}: {len(modes)} modes -> {run_dir}")
        summary = train_fn(c, run_dir, progress=progress)
        for row in summary["comparison"]:
          runs.append({"dataset": ds, "model": model, "seed": seed, "mode": row["mode"],
                       "test_accuracy": float(row["test_accuracy"]),
                       "best_val_accuracy": float(row["best_val_accuracy"]),
                       "most_pulled_arm": row.get("most_pulled_arm")})
  rows = _summarise(runs)
  result = {"table": rows, "runs": runs, "upstream": upstream,
            "grid": {"datasets": datasets, "models": models, "seeds": seeds, "modes": modes},
            "wall_time_s": time.perf_counter() - t0}
  if parallel.is_main_process():  # multi-host: every process ran the same grid
    sio.atomic_write_json(workdir / "grid.json", result)
    _write_csv(workdir / "grid.csv", rows)
    sio.atomic_write_text(workdir / "grid.md", "# Experiment grid: test accuracy on real "
                          "data\n\n" + format_markdown(rows))
  parallel.sync("grid: written")
  return result
