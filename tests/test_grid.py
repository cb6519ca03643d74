"""The experiment grid: upstream once per dataset, every (model, seed), mean/std table."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from synthbandit_jax import grid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from configs import grid as grid_config  # noqa: E402  pylint: disable=wrong-import-position


def _fake_train(calls):
  def train(cfg, run_dir, progress):
    del progress
    calls.append((cfg.model.name, cfg.seed, str(run_dir), cfg.data.split_seed))
    modes = cfg.train.modes.split(",")
    rows = [{"mode": m, "test_accuracy": 0.5 + 0.1 * k + 0.01 * cfg.seed,
             "best_val_accuracy": 0.5, "most_pulled_arm": None} for k, m in enumerate(modes)]
    return {"comparison": rows}
  return train


def test_grid_table_over_seeds(tmp_path):
  c = grid_config.get_config()
  c.grid.datasets = "config"
  c.grid.models = "small_cnn,vgg"
  c.grid.seeds = "0,1,2"
  c.grid.modes = "real,bandit"
  c.pool.kind = "controlled"   # no generation, no scoring upstream for this test
  c.arms.source = "groups"
  c.data.holdout_fraction = 0.4
  calls = []
  result = grid.run_grid(c, tmp_path, progress=False, train_fn=_fake_train(calls))
  assert len(calls) == 6 and {m for m, *_ in calls} == {"small_cnn", "vgg"}
  assert all(split == 0 for *_, split in calls)  # data fixed across seeds
  assert len({d for _, _, d, _ in calls}) == 6  # one run dir per (model, seed)
  table = {(r["model"], r["mode"]): r for r in result["table"]}
  bandit = table[("vgg", "bandit")]
  expected = np.array([0.6, 0.61, 0.62])
  assert bandit["mean"] == pytest.approx(expected.mean())
  assert bandit["std"] == pytest.approx(expected.std(ddof=1))
  assert bandit["seeds"] == 3
  md = (tmp_path / "grid.md").read_text()
  assert f"**{expected.mean():.4f} +- {expected.std(ddof=1):.4f}**" in md  # best in bold
  with open(tmp_path / "grid.csv", newline="") as f:
    assert len(list(csv.DictReader(f))) == 4
  assert len(json.loads((tmp_path / "grid.json").read_text())["runs"]) == 12


def test_grid_dataset_presets_and_errors(tmp_path):
  c = grid_config.get_config()
  gen = grid.dataset_config(c, "generated")
  assert gen.pool.kind == "dir" and gen.generate.model == "offline"
  assert gen.data.split_seed == 0 and gen.arms.source == "scores"
  ctl = grid.dataset_config(c, "controlled")
  assert ctl.pool.kind == "controlled" and ctl.data.holdout_fraction > 0
  assert gen.data.holdout_fraction == ctl.data.holdout_fraction == 0.4  # 100 real per class
  with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
    grid.dataset_config(c, "cifar")
  c.grid.generated_from = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="metadata.jsonl is missing"):
    grid.dataset_config(c, "generated")
  c.grid.generated_from = ""
  c.grid.seeds = ""
  with pytest.raises(ValueError, match="grid.seeds"):
    grid.run_grid(c, tmp_path, progress=False, train_fn=_fake_train([]))


def test_grid_model_presets_train_a_head_on_frozen_inception(tmp_path):
  c = grid_config.get_config()
  assert "inception_frozen" in c.grid.models.split(",")  # in the default grid
  c.grid.datasets = "config"
  c.grid.models = "small_cnn,inception_frozen"
  c.grid.seeds = "0"
  c.grid.modes = "real"
  c.pool.kind = "controlled"
  c.arms.source = "groups"
  c.data.holdout_fraction = 0.4
  seen = []

  def train(cfg, run_dir, progress):
    seen.append((cfg.model.name, cfg.model.features, cfg.model.features_cache))
    return _fake_train([])(cfg, run_dir, progress)

  result = grid.run_grid(c, tmp_path, progress=False, train_fn=train)
  assert seen == [("small_cnn", "", ""),
                  ("linear_head", "inception_2048", str(tmp_path / "features"))]
  assert {r["model"] for r in result["table"]} == {"small_cnn", "inception_frozen"}


def test_generated_dataset_keeps_the_demos_val_and_test(tmp_path):
  """grid.generated_from reuses a demo's pool and scores, computed against the demo's train
  split: the grid's smaller train split (holdout 0.4) must leave val and test exactly the
  demo's, so those scores never saw a grid val / test image."""
  from configs import demo
  from synthbandit_jax.training import inputs
  d = demo.get_config()
  d.data.split_seed = 0
  g = grid.dataset_config(grid_config.get_config(), "generated")
  sd, _ = inputs.real_splits(d)
  sg, _ = inputs.real_splits(g)
  ids = lambda s, k: set(s[k].ids)
  assert ids(sg, "val") == ids(sd, "val") and ids(sg, "test") == ids(sd, "test")
  assert ids(sg, "train") < ids(sd, "train") and len(sg["train"].ids) == 1000
  assert not (ids(sg, "val") | ids(sg, "test")) & ids(sd, "train")
