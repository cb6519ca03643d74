"""Tests for synthbandit_jax.metrics.scoring on small synthetic feature sets with known structure.

Features: C = 3 classes; class c's prototype puts mass 3.2 on its own block of dimensions and
0.2 elsewhere (non-negative, so FCS applies). Real images = prototype + small noise. The pool
per class holds clean images, "corrupted" ones mixed towards a flat vector by 25 / 50 / 75 %
(severity 1 / 2 / 3), and wrong-label images drawn from the next class's cluster.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from synthbandit_jax.data.scores import load_score_table
from synthbandit_jax.metrics import baselines
from synthbandit_jax.metrics import gaussian
from synthbandit_jax.metrics import scoring
from synthbandit_jax.metrics import usability

C = 3
TAPS = {"pool_192": 6, "pool_2048": 9}
MIX = {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75}
VARIANTS = (("clean", 0), ("noise", 1), ("noise", 2), ("noise", 3), ("wrong_label", 0))
# quality level per variant (clean 3 ... severity 3 -> 0, wrong label -1)
LEVEL = {("clean", 0): 3, ("noise", 1): 2, ("noise", 2): 1, ("noise", 3): 0,
         ("wrong_label", 0): -1}


def _protos(d: int) -> np.ndarray:
  b = d // C
  p = np.full((C, d), 0.2)
  for c in range(C):
    p[c, c * b:(c + 1) * b] += 3.0
  return p


def make_data(seed: int = 0, per: int = 5, nreal: int = 30, taps=TAPS):
  """(ids, labels, features, real_labels, real_features, levels) of the synthetic setup."""
  rng = np.random.default_rng(seed)
  real = {k: [] for k in taps}
  for c in range(C):
    for k, d in taps.items():
      real[k].append(np.abs(_protos(d)[c] + rng.normal(0, 0.15, (nreal, d))))
  real = {k: np.concatenate(v) for k, v in real.items()}
  ry = np.repeat(np.arange(C), nreal)
  feats = {k: [] for k in taps}
  ids, y, levels = [], [], []
  for c in range(C):
    for kind, sev in VARIANTS:
      for j in range(per):
        src = (c + 1) % C if kind == "wrong_label" else c
        for k, d in taps.items():
          x = np.abs(_protos(d)[src] + rng.normal(0, 0.15, d))
          feats[k].append((1 - MIX[sev]) * x + MIX[sev] * np.full(d, 1.3))
        ids.append(f"c{c}-{kind}{sev}-{j}")
        y.append(c)
        levels.append(LEVEL[(kind, sev)])
  return (ids, np.asarray(y), {k: np.stack(v) for k, v in feats.items()}, ry, real,
          np.asarray(levels))


@pytest.fixture(scope="module")
def data():
  return make_data()


@pytest.fixture(scope="module")
def result(data):
  ids, y, f, ry, real, _ = data
  return scoring.score_pool(ids, y, f, ry, real)


def _minmax(v):
  v = np.asarray(v, np.float64)
  return (v - v.min()) / (v.max() - v.min())


def test_columns_directions_and_sources(result, data):
  t = result.table
  assert t.ids == data[0]
  assert list(t.columns) == ["dps", "fcs", "u", "fid_192", "fid_2048", "realism",
                             "prdc_in_manifold", "prdc_density", "agg_mean", "agg_median",
                             "agg_min", "agg_max"]
  for absent in ("is", "ssim", "psnr"):
    assert absent not in t.columns
  assert t.directions["fid_192"] == "lower" and t.directions["fid_2048"] == "lower"
  assert all(d == "higher" for k, d in t.directions.items() if not k.startswith("fid"))
  assert result.sources["dps"]["tap"] == "pool_192"
  assert result.sources["fcs"]["tap"] == "pool_2048"
  assert result.sources["fid_2048"]["tap"] == "pool_2048"
  assert "Inception" in result.sources["dps"]["backbone"]
  assert result.config["dps_tap"] == "pool_192"
  for name, v in t.columns.items():
    assert np.all(np.isfinite(v)), name
  assert set(np.unique(t.columns["prdc_in_manifold"])) <= {0.0, 1.0}


def test_dps_fcs_u_fid_equal_direct_computation(result, data):
  ids, y, f, ry, real, _ = data
  t = result.table
  rs = gaussian.class_stats(real["pool_192"], ry, C)
  ss = gaussian.class_stats(f["pool_192"], y, C)
  np.testing.assert_allclose(t.columns["dps"], usability.dps(f["pool_192"], y, rs, ss),
                             rtol=1e-6)
  # FCS by hand: p_c = mean real pool_2048 of class c, KL(p || q) with +1e-10 normalisation.
  means = np.stack([real["pool_2048"][ry == c].mean(0) for c in range(C)])
  p = (means + 1e-10) / (means + 1e-10).sum(1, keepdims=True)
  q = (f["pool_2048"] + 1e-10) / (f["pool_2048"] + 1e-10).sum(1, keepdims=True)
  kl = np.sum(p[y] * np.log(p[y] / q), axis=1)
  np.testing.assert_allclose(t.columns["fcs"], 1.0 / kl, rtol=1e-4)
  np.testing.assert_allclose(t.columns["u"],
                             (_minmax(t.columns["dps"]) + _minmax(t.columns["fcs"])) / 2)
  # per-image FID: ||x - mu_c||^2 + sum of unbiased per-dimension variances of real class c
  for name, tap in (("fid_192", "pool_192"), ("fid_2048", "pool_2048")):
    exp = np.empty(len(ids))
    for c in range(C):
      xr = real[tap][ry == c]
      sel = y == c
      exp[sel] = (((f[tap][sel] - xr.mean(0)) ** 2).sum(1) + xr.var(0, ddof=1).sum())
    np.testing.assert_allclose(t.columns[name], exp, rtol=1e-10)


def test_rankings_follow_the_known_structure(result, data):
  levels = data[5]
  t = result.table
  mean = {k: np.array([t.columns[k][levels == lv].mean() for lv in (3, 2, 1, 0, -1)])
          for k in t.columns}
  for k in ("fid_192", "fid_2048"):  # distance grows with corruption; wrong label farthest
    assert np.all(np.diff(mean[k]) > 0), (k, mean[k])
  assert np.all(np.diff(mean["fcs"]) < 0), mean["fcs"]  # wrong label lowest
  assert np.all(np.diff(mean["dps"][:4]) < 0), mean["dps"]  # graded severities
  assert mean["u"][0] > mean["u"][3] and mean["u"][0] > mean["u"][4]
  # every clean image beats every wrong-label image on FCS and per-image FID
  clean, wrong = levels == 3, levels == -1
  assert t.columns["fcs"][clean].min() > t.columns["fcs"][wrong].max()
  assert t.columns["fid_192"][clean].max() < t.columns["fid_192"][wrong].min()


def test_aggregates_from_the_stated_columns(result):
  t = result.table
  cols = ["dps", "fcs", "fid_192", "fid_2048"]
  assert result.sources["agg_mean"]["columns"] == cols
  m = np.stack([_minmax(t.columns[c] if t.directions[c] == "higher" else -t.columns[c])
                for c in cols])
  np.testing.assert_allclose(t.columns["agg_mean"], m.mean(0))
  np.testing.assert_allclose(t.columns["agg_median"], np.median(m, 0))
  np.testing.assert_allclose(t.columns["agg_min"], m.min(0))
  np.testing.assert_allclose(t.columns["agg_max"], m.max(0))


def test_custom_aggregate_columns_and_unknown_one(data):
  ids, y, f, ry, real, _ = data
  cfg = scoring.ScoringConfig(aggregate_columns=("fid_192", "realism"))
  t = scoring.score_pool(ids, y, f, ry, real, config=cfg).table
  m = np.stack([_minmax(-t.columns["fid_192"]), _minmax(t.columns["realism"])])
  np.testing.assert_allclose(t.columns["agg_min"], m.min(0))
  with pytest.raises(ValueError, match="aggregate_columns.*'ssim'"):
    scoring.score_pool(ids, y, f, ry, real,
                       config=scoring.ScoringConfig(aggregate_columns=("ssim",)))


def test_images_and_probs_add_ssim_psnr_is(data):
  ids, y, f, ry, real, _ = data
  rng = np.random.default_rng(1)
  imgs = rng.integers(0, 256, (len(ids), 8, 8), dtype=np.uint8)
  rimgs = rng.integers(0, 256, (len(ry), 8, 8), dtype=np.uint8)
  logits = rng.normal(size=(len(ids), 4))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  res = scoring.score_pool(ids, y, f, ry, real, images=imgs, real_images=rimgs, probs=probs,
                           config=scoring.ScoringConfig(ssim_max_refs=10, seed=3))
  t = res.table
  s, p = baselines.ssim_psnr_against_references(imgs, y, rimgs, ry, same_class=True,
                                                max_refs=10, seed=3)
  np.testing.assert_allclose(t.columns["ssim"], s)
  np.testing.assert_allclose(t.columns["psnr"], p)
  marg = probs.mean(0)
  np.testing.assert_allclose(t.columns["is"], np.sum(probs * np.log(probs / marg), 1),
                             rtol=1e-10)
  assert t.directions["ssim"] == t.directions["psnr"] == t.directions["is"] == "higher"
  assert res.sources["agg_mean"]["columns"] == ["dps", "fcs", "fid_192", "fid_2048", "ssim",
                                                "psnr", "is"]
  assert res.sources["ssim"]["backbone"] == "pixels"
  with pytest.raises(ValueError, match="both images and real_images"):
    scoring.score_pool(ids, y, f, ry, real, images=imgs)


def test_product_form_and_vgg_fcs_tap(data):
  ids, y, f, ry, real, _ = data
  f2 = dict(f, vgg_fc7=f["pool_2048"] * 2.0)
  real2 = dict(real, vgg_fc7=real["pool_2048"] * 2.0)
  res = scoring.score_pool(ids, y, f2, ry, real2,
                           config=scoring.ScoringConfig(u_form="product", fcs_tap="vgg_fc7"))
  t = res.table
  np.testing.assert_allclose(t.columns["u"], _minmax(t.columns["dps"]) * _minmax(t.columns["fcs"]))
  assert res.sources["fcs"]["tap"] == "vgg_fc7" and "VGG16" in res.sources["fcs"]["backbone"]
  with pytest.raises(ValueError, match="u_form"):
    scoring.score_pool(ids, y, f, ry, real, config=scoring.ScoringConfig(u_form="max"))


def test_non_finite_features_name_the_ids(data):
  ids, y, f, ry, real, _ = data
  bad = {k: v.copy() for k, v in f.items()}
  bad["pool_2048"][7, 2] = np.nan
  bad["pool_2048"][11, 0] = np.inf
  with pytest.raises(ValueError, match=rf"2 rows .*{ids[7]}.*{ids[11]}"):
    scoring.score_pool(ids, y, bad, ry, real)


def test_missing_tap_is_named(data):
  ids, y, f, ry, real, _ = data
  with pytest.raises(ValueError, match=r"'vgg_fc7'.*fcs_tap"):
    scoring.score_pool(ids, y, f, ry, real, config=scoring.ScoringConfig(fcs_tap="vgg_fc7"))


def test_fid_tap_missing_is_skipped_with_warning(data, caplog):
  ids, y, f, ry, real, _ = data
  cfg = scoring.ScoringConfig(fid_taps=(("fid_192", "pool_192"), ("fid_768", "mixed_6e_768")))
  with caplog.at_level(logging.WARNING):
    t = scoring.score_pool(ids, y, f, ry, real, config=cfg).table
  assert "fid_768" not in t.columns and "fid_192" in t.columns
  assert "fid_768" in caplog.text


def test_empty_and_tiny_classes(data, caplog):
  ids, y, f, ry, real, _ = data
  # class 2 gets 1 synthetic image; class 3 exists in the real set only
  keep = np.flatnonzero((y != 2) | (np.arange(len(y)) == np.flatnonzero(y == 2)[0]))
  real3 = {k: np.concatenate([v, v[ry == 0][:4]]) for k, v in real.items()}
  ry3 = np.concatenate([ry, np.full(4, 3)])
  with caplog.at_level(logging.WARNING):
    res = scoring.score_pool([ids[i] for i in keep], y[keep], {k: v[keep] for k, v in f.items()},
                             ry3, real3, class_names=["a", "b", "c", "d"])
  assert "without synthetic images are skipped (no rows to score): 3 (d)" in caplog.text
  assert len(res.table) == keep.size
  for name, v in res.table.columns.items():
    assert np.all(np.isfinite(v)), name


def test_max_per_set_and_exclude_self(data):
  ids, y, f, ry, real, _ = data
  a = scoring.score_pool(ids, y, f, ry, real, config=scoring.ScoringConfig(max_per_set=8))
  b = scoring.score_pool(ids, y, f, ry, real, config=scoring.ScoringConfig(max_per_set=8))
  full = scoring.score_pool(ids, y, f, ry, real).table
  np.testing.assert_array_equal(a.table.columns["dps"], b.table.columns["dps"])
  assert not np.allclose(a.table.columns["dps"], full.columns["dps"])
  loo = scoring.score_pool(ids, y, f, ry, real, config=scoring.ScoringConfig(exclude_self=True))
  ss = gaussian.class_stats(f["pool_192"], y, C)
  rs = gaussian.class_stats(real["pool_192"], ry, C)
  np.testing.assert_allclose(loo.table.columns["dps"],
                             usability.dps(f["pool_192"], y, rs, ss, exclude_self=True),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="exclude_self"):
    scoring.score_pool(ids, y, f, ry, real,
                       config=scoring.ScoringConfig(exclude_self=True, max_per_set=64))


def test_save_scoring_result_round_trip(result, tmp_path):
  path = scoring.save_scoring_result(tmp_path / "scores.csv", result)
  t = load_score_table(path)
  assert t.ids == result.table.ids
  assert t.directions == result.table.directions
  for k, v in result.table.columns.items():
    np.testing.assert_allclose(t.columns[k], v, rtol=1e-12)
  side = json.loads((tmp_path / "scores.csv.sources.json").read_text())
  assert side["sources"]["fid_192"]["tap"] == "pool_192"
  assert side["config"]["u_form"] == "mean"
