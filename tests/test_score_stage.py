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
  # 20 pool images (2 per class) + 30 real, scored at the smallest Inception input (75 px,
  # 16x less compute than 299; the network at 299 is tested in test_inception.py).
  c.score.max_pool_images = 20
  c.score.max_real_images = 30
  c.score.inception_size = 75
  c.score.batch_size = 8
  summary = stage.run_scoring(c, tmp_path, progress=False)
  table = scores_lib.load_score_table(tmp_path / "scores.csv")
  assert len(table.ids) == summary["scored_pool_images"] == 20
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
  assert again["scored_pool_images"] == 20

  c.scores.path = str(tmp_path / "scores.csv")
  c.scores.allow_missing = True  # only 20 of the pool's images have scores
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
  c.score.vgg16_size = 32  # the smallest VGG16 input: 49x less compute than 224
  c.score.max_pool_images = 10
  c.score.max_real_images = 20
  c.score.batch_size = 5
  work = tmp_path / "run"
  summary = stage.run_scoring(c, work, progress=False, extractor=_pixel_extractor())
  assert summary["fcs_backbone"] == "vgg16" and summary["fcs_tap"] == "vgg_fc7"
  assert summary["vgg16_size"] == 32
  assert json.loads((work / "scoring.json").read_text())["fcs_backbone"] == "vgg16"
  side = json.loads((work / "scores.csv.sources.json").read_text())
  fcs_src = side["sources"]["fcs"]
  assert fcs_src["backbone"].startswith("VGG16") and fcs_src["tap"] == "vgg_fc7"
  assert fcs_src["fcs_backbone"] == "vgg16" and fcs_src["weights"] == str(weights)
  assert "size=32," in fcs_src["extractor"]
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
  (tmp_path / "w.pth").write_bytes(b"")  # checked before the weights are read
  c.score.vgg16_weights = str(tmp_path / "w.pth")
  c.score.vgg16_size = 16
  with pytest.raises(ValueError, match=r"score\.vgg16_size=16: VGG16 needs >= 32"):
    stage.run_scoring(c, tmp_path, progress=False)
  c.score.vgg16_size = 0
  c.score.vgg16_microbatch = -2
  with pytest.raises(ValueError, match=r"score\.vgg16_microbatch=-2: -1 \(auto"):
    stage.run_scoring(c, tmp_path, progress=False)
  c.score.vgg16_microbatch = -1
  c.score.vgg16_winograd = 2
  with pytest.raises(ValueError, match=r"score\.vgg16_winograd=2: -1 \(auto: on for float32"):
    stage.run_scoring(c, tmp_path, progress=False)
  c.score.vgg16_winograd = -1
  for bad in (True, "on"):  # a plain dict has no ConfigDict type check
    with pytest.raises(ValueError, match=r"score\.vgg16_winograd="):
      stage.vgg16_winograd({"vgg16_winograd": bad})
  assert [stage.vgg16_winograd({"vgg16_winograd": v}) for v in (-1, 0, 1)] == [None, False, True]
  c.score.inception_microbatch = -3
  with pytest.raises(ValueError, match=r"score\.inception_microbatch=-3: -1 \(auto: 4"):
    stage.run_scoring(c, tmp_path, progress=False)
  c.score.inception_microbatch = -1
  c.score.fcs_backbone = "resnet"
  with pytest.raises(ValueError, match=r"score\.fcs_backbone='resnet'"):
    stage.run_scoring(c, tmp_path, progress=False)


def _counting_extractor(extra_logits: bool = False, batch_size: int = 5):
  """_pixel_extractor with a call counter (and optionally a "logits_1008" tap)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from synthbandit_jax import parallel  # pylint: disable=import-outside-toplevel
  from synthbandit_jax.metrics import features  # pylint: disable=import-outside-toplevel
  calls = [0]
  proj = np.random.default_rng(0).normal(0, 3.0, (64, 1008)).astype(np.float32)

  def apply_fn(p, images):
    calls[0] += 1
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0 * p["scale"]
    out = {"pool_192": x, "pool_2048": jnp.sqrt(x)}
    if extra_logits:
      out["logits_1008"] = x[:, :64] @ p["proj"]
    return out

  params = {"scale": np.ones((), np.float32)}
  if extra_logits:
    params["proj"] = proj
  ex = features.FeatureExtractor(apply_fn, params, batch_size=batch_size,
                                 mesh=parallel.make_mesh(1),
                                 name=f"pixels(logits={extra_logits})")
  return ex, calls


def test_streamed_stage_equals_the_in_memory_path(tmp_path):
  """The streaming stage gives the table the old in-memory path (whole pool loaded by
  prepare_inputs, features of arrays, SSIM/PSNR of arrays) gives, column for column."""
  from synthbandit_jax.metrics import features, scoring, stage
  from synthbandit_jax.training import inputs as inputs_lib
  c = tiny.get_config()
  c.score.max_pool_images = 60
  c.score.max_real_images = 50
  c.score.batch_size = 5
  ex, _ = _counting_extractor()
  summary = stage.run_scoring(c, tmp_path, progress=False, extractor=ex)
  table = scores_lib.load_score_table(tmp_path / "scores.csv")

  inputs = inputs_lib.prepare_inputs(c, tmp_path, progress=False, load_scores=False)
  pool = inputs.pool.subset(stage._subsample(inputs.pool.labels, 60, c.seed))
  real = inputs.train.subset(stage._subsample(inputs.train.labels, 50, c.seed + 1))
  names = inputs.class_names
  real_fs = features.extract_feature_set(ex, real.images, ids=real.ids, labels=real.labels,
                                         class_names=names)
  pool_fs = features.extract_feature_set(ex, pool.images, ids=pool.ids, labels=pool.labels,
                                         class_names=names)
  want = scoring.score_pool(
      pool_fs.ids, pool_fs.labels, pool_fs.features, real_fs.labels, real_fs.features,
      config=scoring.ScoringConfig(seed=c.seed, ssim_max_refs=int(c.score.ssim_max_refs)),
      images=pool.images, real_images=real.images, num_classes=len(names),
      class_names=names).table
  assert summary["scored_pool_images"] == len(pool.ids) == 60
  assert summary["pool_images"] == len(inputs.pool)
  assert table.ids == want.ids
  assert set(table.columns) == set(want.columns) and "ssim" in table.columns
  for col in want.columns:
    assert table.directions[col] == want.directions[col]
    np.testing.assert_allclose(table.columns[col], want.columns[col], rtol=1e-5, atol=1e-7,
                               err_msg=col)


def test_stage_streams_the_pool_in_bounded_batches(tmp_path, monkeypatch):
  """The pool is read by the streaming PoolReader in batches, never loaded whole, and only a
  few batches of images are alive at any time however large the pool."""
  import gc
  import weakref
  from synthbandit_jax.data import pool as pool_lib
  from synthbandit_jax.metrics import stage

  def no_full_load(*args, **kwargs):
    raise AssertionError("the scoring stage must not load the whole pool (read_pool)")

  monkeypatch.setattr(pool_lib, "read_pool", no_full_load)
  batches, alive_max, yielded = [], [0], [0]
  refs: list = []
  original = pool_lib.PoolReader.__iter__

  def watched(self):
    for images, rows in original(self):
      batches.append(len(images))
      yielded[0] += len(images)
      alive = lambda: sum(len(r()) for r in refs if r() is not None)
      if alive() > 6 * 5:  # only garbage in reference cycles may remain: collect, recount
        gc.collect()  # (a full collection per batch costs ~1 s once the heap is large)
      refs[:] = [r for r in refs if r() is not None]
      alive_max[0] = max(alive_max[0], alive())
      refs.append(weakref.ref(images))
      yield images, rows

  monkeypatch.setattr(pool_lib.PoolReader, "__iter__", watched)
  c = tiny.get_config()
  c.score.max_pool_images = 150
  c.score.max_real_images = 40
  c.score.batch_size = 5
  ex, calls = _counting_extractor()
  summary = stage.run_scoring(c, tmp_path, progress=False, extractor=ex)
  n = summary["scored_pool_images"]
  assert n == 150 and yielded[0] == n  # one pass over the scored rows
  assert max(batches) <= 5 and len(batches) == 30
  # prefetch_batches=2 (+ the batch being re-batched, the one in flight, the one finishing)
  assert alive_max[0] <= 6 * 5 < n, alive_max[0]
  assert calls[0] == 1  # traced once: every batch has the same (padded) shape

  # A second run reuses the cached features: the pass only decodes images for SSIM / PSNR.
  batches.clear()
  yielded[0] = 0
  ex2, calls2 = _counting_extractor()
  again = stage.run_scoring(c, tmp_path, progress=False, extractor=ex2)
  assert calls2[0] == 0 and yielded[0] == 150 and again["scored_pool_images"] == 150


def test_inception_score_column_from_logits(tmp_path):
  """With a logits tap the table gains "is" = KL(p(y|x) || p(y)) over the scored pool."""
  from synthbandit_jax.metrics import baselines, features, stage
  c = tiny.get_config()
  c.score.max_pool_images = 40
  c.score.max_real_images = 30
  c.score.batch_size = 5
  ex, _ = _counting_extractor(extra_logits=True)
  summary = stage.run_scoring(c, tmp_path, progress=False, extractor=ex)
  assert summary["inception_score_column"] is True
  table = scores_lib.load_score_table(tmp_path / "scores.csv")
  assert table.directions["is"] == "higher"
  pool = features.load_features(tmp_path / "features" / "pool.npz")
  logits = pool.features["logits_1008"].astype(np.float64)
  assert logits.shape == (40, 1008)
  # independent numpy: p = softmax, pbar = mean over the scored pool, KL in nats
  z = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  pbar = p.mean(axis=0)
  want = np.sum(p * (np.log(p) - np.log(pbar)), axis=1)
  got = dict(zip(table.ids, table.columns["is"]))
  np.testing.assert_allclose([got[i] for i in pool.ids], want, rtol=1e-6)
  is_mean, _ = baselines.inception_score(p, splits=1)
  assert np.exp(np.mean(want)) == pytest.approx(is_mean, rel=1e-9)
  assert np.exp(np.mean(table.columns["is"])) == pytest.approx(is_mean, rel=1e-6)
  assert is_mean > 1.0
  sources = json.loads((tmp_path / "scores.csv.sources.json").read_text())["sources"]
  assert sources["is"]["tap"] == "logits (softmax)"
  assert "is" in sources["agg_mean"]["columns"]


def test_inception_weights_config(tmp_path):
  from synthbandit_jax.metrics import stage
  c = tiny.get_config()
  assert stage.inception_weights(c.score) is None
  c.score.inception_weights = str(tmp_path / "nope.pth")
  with pytest.raises(FileNotFoundError, match=r"score\.inception_weights=.*nope\.pth"):
    stage.run_scoring(c, tmp_path, progress=False)


def test_inception_size_reaches_the_extractor_and_is_recorded(tmp_path, monkeypatch):
  """score.inception_size is passed to the Inception extractor (whose input_size path is
  tested against the 299 one in test_features) and recorded in scoring.json; a size the
  network cannot take is refused naming the key."""
  from synthbandit_jax.metrics import features as features_lib
  from synthbandit_jax.metrics import stage
  from synthbandit_jax.weights import inception_import
  seen = []

  def fake_inception(params, **kw):  # the network is stubbed: only its arguments matter here
    seen.append(kw.get("input_size"))
    return _pixel_extractor()

  monkeypatch.setattr(inception_import, "cached_inception_params", lambda weights: {})
  monkeypatch.setattr(features_lib, "inception_extractor", fake_inception)
  c = _small(tiny.get_config())
  c.score.batch_size = 5
  c.score.inception_size = 139
  summary = stage.run_scoring(c, tmp_path / "a", progress=False)
  assert seen == [139] and summary["inception_size"] == 139
  assert json.loads((tmp_path / "a" / "scoring.json").read_text())["inception_size"] == 139
  c.score.inception_size = 0  # 0 and 299 both mean the network's own size
  assert stage.run_scoring(c, tmp_path / "b", progress=False)["inception_size"] == 299
  assert seen[-1] is None
  c.score.inception_size = 60
  with pytest.raises(ValueError, match=r"score\.inception_size=60.*>= 75"):
    stage.run_scoring(c, tmp_path / "c", progress=False)


_TWO_PROCESSES = """
init()
from configs import tiny
from synthbandit_jax.metrics import stage
from tests.test_score_stage import _pixel_extractor, _small
s = stage.run_scoring(_small(tiny.get_config()), {wd!r}, progress=False,
                      extractor=_pixel_extractor())
emit({{"scored": s["scored_pool_images"], "real": s["real_images"], "procs": s["processes"]}})
"""


def _small(c):
  c.score.max_pool_images = 40
  c.score.max_real_images = 30
  c.score.batch_size = 5
  return c


def test_two_processes_score_the_same_table_as_one(tmp_path):
  """Two JAX processes (as two hosts) each extract half the pool and half the real images;
  the gathered features give the one-process score table, written once, by process 0."""
  from synthbandit_jax.metrics import stage
  from tests import multihost
  one = stage.run_scoring(_small(tiny.get_config()), tmp_path / "one", progress=False,
                          extractor=_pixel_extractor())
  out = multihost.run_processes(_TWO_PROCESSES.format(wd=str(tmp_path / "two")), 2, 1,
                                timeout=400)
  assert [o["procs"] for o in out] == [2, 2]
  assert all(o["scored"] == one["scored_pool_images"] == 40 for o in out)
  assert all(o["real"] == one["real_images"] for o in out)
  a = scores_lib.load_score_table(tmp_path / "one" / "scores.csv")
  b = scores_lib.load_score_table(tmp_path / "two" / "scores.csv")
  assert a.ids == b.ids and a.columns.keys() == b.columns.keys()
  for col in a.columns:
    # Same features, same float64 statistics: equal up to summation order.
    np.testing.assert_allclose(b.columns[col], a.columns[col], rtol=1e-6, atol=1e-9,
                               err_msg=col)
  feats = sorted(p.name for p in (tmp_path / "two" / "features").iterdir())
  assert "pool.part-00000-of-00002.npz" in feats and "pool.part-00001-of-00002.npz" in feats
  assert (tmp_path / "two" / "metric_validation.md").read_text() == \
      (tmp_path / "one" / "metric_validation.md").read_text()
