"""The scoring stage end to end on a small controlled pool, with the real Inception-V3."""
from __future__ import annotations

import json

import numpy as np
import pytest

from configs import tiny
from synthbandit_jax.data import scores as scores_lib
from synthbandit_jax.training import trainer


def test_score_then_train_on_metric_rankings(tmp_path):
  pytest.importorskip("torch")  # first use imports the Inception weights from TorchScript
  from synthbandit_jax.metrics import stage
  c = tiny.get_config()
  c.score.max_pool_images = 40
  c.score.max_real_images = 30
  c.score.batch_size = 8
  summary = stage.run_scoring(c, tmp_path, progress=False)
  table = scores_lib.load_score_table(tmp_path / "scores.csv")
  assert len(table.ids) == summary["scored_pool_images"] == 40
  for col, direction in [("dps", "higher"), ("fcs", "higher"), ("u", "higher"),
                         ("fid_192", "lower"), ("fid_2048", "lower"), ("ssim", "higher")]:
    assert table.directions[col] == direction
    assert np.isfinite(table.columns[col]).all(), col
  sources = json.loads((tmp_path / "scores.csv.sources.json").read_text())["sources"]
  assert "Inception" in sources["dps"]["backbone"] and sources["fcs"]["tap"] == "pool_2048"
  report = (tmp_path / "metric_validation.md").read_text()
  assert "| u |" in report and ("U beats" in report or "U does NOT" in report)
  # Features are cached: a second run reuses them and gives the same table.
  again = stage.run_scoring(c, tmp_path, progress=False)
  table2 = scores_lib.load_score_table(tmp_path / "scores.csv")
  np.testing.assert_array_equal(table.columns["u"], table2.columns["u"])
  assert again["scored_pool_images"] == 40

  c.scores.path = str(tmp_path / "scores.csv")
  c.scores.allow_missing = True  # only 40 of the pool's images have scores
  c.arms.source = "scores"
  c.arms.rankings = "u,fid_192"
  c.arms.k = 2
  c.arms.controls = "random"
  c.train.modes = "topk:u,bandit"
  c.train.epochs = 2
  result = trainer.run(c, tmp_path / "train", progress=False)
  arms = [a["name"] for a in result["runs"]["bandit"]["arms"]]
  assert arms == ["top:u", "top:fid_192", "random"]
  # A top-k arm only holds scored images: 2 per class at most.
  assert result["runs"]["topk:u"]["arms"][0]["size"] <= 2 * 10
  report = (tmp_path / "train" / "report.md").read_text()
  assert "Is the metric any good?" in report and "| u |" in report
