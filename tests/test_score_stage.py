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


def _pixel_extractor():
  """A cheap stand-in for the Inception extractor (keys pool_192 / pool_2048 = raw pixels);
  the real Inception path is covered by test_score_then_train_on_metric_rankings."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from synthbandit_jax import parallel  # pylint: disable=import-outside-toplevel
  from synthbandit_jax.metrics import features  # pylint: disable=import-outside-toplevel

  def apply_fn(p, images):
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0 * p["scale"]
    return {"pool_192": x, "pool_2048": jnp.sqrt(x)}

  return features.FeatureExtractor(apply_fn, {"scale": np.ones((), np.float32)}, batch_size=5,
                                   mesh=parallel.make_mesh(1), name="pixels")


def test_fcs_backbone_vgg16_from_weights_file(tmp_path):
  from synthbandit_jax.metrics import stage
  from synthbandit_jax.metrics import features
  from synthbandit_jax.metrics import usability
  from synthbandit_jax.weights import state_dict as sd_lib
  from tests.test_vgg import random_state_dict
  weights = sd_lib.write_safetensors(tmp_path / "vgg16.safetensors",
                                     random_state_dict(0, with_fc8=False))
  c = tiny.get_config()
  c.score.fcs_backbone = "vgg16"
  c.score.vgg16_weights = str(weights)
  c.score.max_pool_images = 10
  c.score.max_real_images = 20
  c.score.batch_size = 5
  work = tmp_path / "run"
  summary = stage.run_scoring(c, work, progress=False, extractor=_pixel_extractor())
  assert summary["fcs_backbone"] == "vgg16" and summary["fcs_tap"] == "vgg_fc7"
  assert json.loads((work / "scoring.json").read_text())["fcs_backbone"] == "vgg16"
  side = json.loads((work / "scores.csv.sources.json").read_text())
  fcs_src = side["sources"]["fcs"]
  assert fcs_src["backbone"].startswith("VGG16") and fcs_src["tap"] == "vgg_fc7"
  assert fcs_src["fcs_backbone"] == "vgg16" and fcs_src["weights"] == str(weights)
  assert side["config"]["fcs_tap"] == "vgg_fc7" and side["sources"]["dps"]["tap"] == "pool_192"
  # FCS is computed from the cached VGG16 fc7 features: recompute it from them.
  pool_v = features.load_features(work / "features" / "pool_vgg16.npz")
  real_v = features.load_features(work / "features" / "real_train_vgg16.npz")
  assert pool_v.features["vgg_fc7"].shape == (10, 4096) and len(real_v) == 20
  means = np.stack([real_v.features["vgg_fc7"][real_v.labels == k].mean(0) for k in range(10)])
  want = usability.fcs(pool_v.features["vgg_fc7"], pool_v.labels, means)
  table = scores_lib.load_score_table(work / "scores.csv")
  got = dict(zip(table.ids, table.columns["fcs"]))
  np.testing.assert_allclose([got[i] for i in pool_v.ids], want, rtol=1e-5)


def test_fcs_backbone_config_errors(tmp_path):
  from synthbandit_jax.metrics import stage
  c = tiny.get_config()
  c.score.fcs_backbone = "vgg16"
  with pytest.raises(ValueError, match=r"score\.vgg16_weights.*IMAGENET1K_V1"):
    stage.run_scoring(c, tmp_path, progress=False)
  c.score.vgg16_weights = str(tmp_path / "nope.pth")
  with pytest.raises(FileNotFoundError, match=r"score\.vgg16_weights=.*nope\.pth"):
    stage.run_scoring(c, tmp_path, progress=False)
  c.score.fcs_backbone = "resnet"
  with pytest.raises(ValueError, match=r"score\.fcs_backbone='resnet'"):
    stage.run_scoring(c, tmp_path, progress=False)
