"""Tests for synthbandit_jax.metrics.validation against direct scipy / sklearn calls."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from synthbandit_jax.data.scores import ScoreTable
from synthbandit_jax.metrics import scoring
from synthbandit_jax.metrics import validation as v

# (kind, severity, expected quality level)
CASES = [("clean", 0, 3), ("noise", 1, 2), ("blur", 2, 1), ("occlusion", 3, 0),
         ("invert", 1, 0), ("edges", 1, 0), ("wrong_label", 0, -1)]


def _rows(reps: int = 3):
  rows = []
  for r in range(reps):
    for kind, sev, _ in CASES:
      rows.append({"id": f"{kind}{sev}-{r}", "class": "a",
                   "extras": {"kind": kind, "severity": sev, "true_class": "a"}})
  return rows


def _levels(rows):
  return np.array([v.quality_level(r["extras"]) for r in rows])


def test_quality_levels():
  for kind, sev, level in CASES:
    assert v.quality_level({"kind": kind, "severity": sev}) == level
  with pytest.raises(ValueError, match="unknown controlled kind 'fog'"):
    v.quality_level({"kind": "fog", "severity": 1})
  with pytest.raises(ValueError, match="severity 5"):
    v.quality_level({"kind": "blur", "severity": 5})
  with pytest.raises(ValueError, match="id 'x'.*no extras"):
    v.ground_truth([{"id": "x", "extras": {}}])


def test_perfect_reversed_and_random_metrics():
  rows = _rows()
  lv = _levels(rows)
  wrong = lv == -1
  rng = np.random.default_rng(0)
  noisy = lv + rng.normal(0, 1.0, lv.size)
  ids = [r["id"] for r in rows]
  table = ScoreTable(ids=ids,
                     columns={"perfect": lv * 2.0 + 1.0,
                              "perfect_dist": -lv.astype(float),
                              "reversed": -lv.astype(float), "noisy": noisy},
                     directions={"perfect": "higher", "perfect_dist": "lower",
                                 "reversed": "higher", "noisy": "higher"})
  out = {r["metric"]: r for r in v.validate_metrics(table, rows)}
  for name in ("perfect", "perfect_dist"):
    assert out[name]["auroc_wrong_label"] == pytest.approx(1.0)
    assert out[name]["spearman"] == pytest.approx(1.0)
  assert out["reversed"]["spearman"] == pytest.approx(-1.0)
  assert out["reversed"]["auroc_wrong_label"] == pytest.approx(0.0)
  exp = stats.spearmanr(noisy, lv)
  assert out["noisy"]["spearman"] == pytest.approx(exp.statistic, abs=1e-12)
  assert out["noisy"]["spearman_p"] == pytest.approx(exp.pvalue, rel=1e-9)
  assert out["noisy"]["auroc_wrong_label"] == pytest.approx(roc_auc_score(wrong, -noisy))
  assert out["noisy"]["n"] == len(rows) and out["noisy"]["n_wrong_label"] == wrong.sum()
  assert out["noisy"]["direction"] == "higher" and out["perfect_dist"]["direction"] == "lower"


def test_alignment_nan_inf_and_constant():
  rows = _rows()
  lv = _levels(rows)
  ids = [r["id"] for r in rows]
  rng = np.random.default_rng(1)
  score = rng.normal(size=lv.size) + lv
  with_nan = score.copy()
  with_nan[[0, 5]] = np.nan
  with_inf = score.copy()
  top = int(np.argmax(score))
  with_inf[top] = np.inf
  # table rows shuffled and holding an extra id that is not in the controlled rows
  perm = rng.permutation(lv.size)
  cols = {"s": score, "nan": with_nan, "inf": with_inf, "const": np.ones(lv.size)}
  table = ScoreTable(ids=[ids[i] for i in perm] + ["extra"],
                     columns={k: np.append(c[perm], 99.0) for k, c in cols.items()},
                     directions={})
  out = {r["metric"]: r for r in v.validate_metrics(table, rows)}
  assert out["s"]["spearman"] == pytest.approx(stats.spearmanr(score, lv).statistic)
  keep = ~np.isnan(with_nan)
  assert out["nan"]["n"] == lv.size - 2 and out["nan"]["n_nan"] == 2
  assert out["nan"]["spearman"] == pytest.approx(
      stats.spearmanr(with_nan[keep], lv[keep]).statistic)
  assert out["nan"]["auroc_wrong_label"] == pytest.approx(
      roc_auc_score(lv[keep] == -1, -with_nan[keep]))
  # +inf is just the largest value: same as the finite maximum it replaced
  assert out["inf"]["spearman"] == pytest.approx(out["s"]["spearman"])
  assert out["inf"]["auroc_wrong_label"] == pytest.approx(out["s"]["auroc_wrong_label"])
  assert math.isnan(out["const"]["spearman"])
  assert out["const"]["auroc_wrong_label"] == pytest.approx(0.5)
  only = v.validate_metrics(table, rows, columns=["s"])
  assert [r["metric"] for r in only] == ["s"]
  with pytest.raises(ValueError, match="have no score row.*'clean0-0'"):
    v.validate_metrics(ScoreTable(ids=["x"], columns={"s": [1.0]}, directions={}), rows)
  with pytest.raises(ValueError, match="'zzz'"):
    v.validate_metrics(table, rows, columns=["zzz"])


def test_no_wrong_label_rows_gives_nan_auroc():
  rows = [r for r in _rows() if r["extras"]["kind"] != "wrong_label"]
  table = ScoreTable(ids=[r["id"] for r in rows], columns={"s": _levels(rows) * 1.0},
                     directions={})
  (row,) = v.validate_metrics(table, rows)
  assert math.isnan(row["auroc_wrong_label"]) and row["spearman"] == pytest.approx(1.0)


def _vrow(metric, rho, auc, n=10):
  return {"metric": metric, "direction": "higher", "spearman": rho, "spearman_p": 0.0,
          "auroc_wrong_label": auc, "n": n, "n_wrong_label": 2, "n_nan": 0}


def test_format_validation_table_sorted():
  text = v.format_validation_table([_vrow("ssim", 0.2, 0.6), _vrow("u", 0.9, 0.95),
                                    _vrow("is", math.nan, 0.5), _vrow("fid_192", 0.9, 0.99)])
  lines = text.strip().splitlines()
  assert lines[0] == "| metric | spearman | auroc_wrong_label | n |"
  assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["fid_192", "u", "ssim", "is"]
  assert lines[3] == "| u | 0.900 | 0.950 | 10 |"
  assert "| is | n/a | 0.500 | 10 |" in lines


def test_u_beats_baselines_verdicts():
  win = [_vrow("u", 0.8, 0.9), _vrow("dps", 0.95, 0.99), _vrow("agg_mean", 0.99, 1.0),
         _vrow("ssim", 0.5, 0.6), _vrow("fid_192", 0.7, 0.85)]
  ok, text = v.u_beats_baselines(win)
  assert ok and "beats every baseline (2)" in text and "0.800" in text and "0.700" in text
  lose = win + [_vrow("psnr", 0.85, 0.5), _vrow("realism", 0.1, 0.9)]
  ok, text = v.u_beats_baselines(lose)
  assert not ok
  assert "NOT" in text and "Spearman (U 0.800) by psnr 0.850" in text
  assert "AUROC (U 0.900) by realism 0.900" in text  # a tie does not beat
  assert "dps" not in text and "agg_mean" not in text  # the method's own columns
  ok, text = v.u_beats_baselines(win + [_vrow("is", math.nan, 0.5)])
  assert ok and "not comparable (NaN): is (Spearman)" in text
  ok, _ = v.u_beats_baselines(win, baselines=["dps"])
  assert not ok
  ok, text = v.u_beats_baselines([_vrow("u", math.nan, 0.9), _vrow("ssim", 0.1, 0.1)])
  assert not ok and "NaN" in text
  with pytest.raises(ValueError, match="'u'"):
    v.u_beats_baselines([_vrow("ssim", 0.1, 0.1)])


def test_end_to_end_on_scored_synthetic_pool():
  from tests.test_scoring import make_data  # pylint: disable=import-outside-toplevel
  ids, y, f, ry, real, levels = make_data(seed=2)
  table = scoring.score_pool(ids, y, f, ry, real).table
  kinds = {3: ("clean", 0), 2: ("noise", 1), 1: ("noise", 2), 0: ("noise", 3),
           -1: ("wrong_label", 0)}
  rows = [{"id": i, "extras": {"kind": kinds[lv][0], "severity": kinds[lv][1]}}
          for i, lv in zip(ids, levels)]
  out = {r["metric"]: r for r in v.validate_metrics(table, rows)}
  assert set(out) == set(table.columns)
  # per-image FID to the labelled class separates the wrong labels perfectly (module data)
  assert out["fid_192"]["auroc_wrong_label"] == pytest.approx(1.0)
  assert out["fid_192"]["spearman"] > 0.9
  assert out["fid_192"]["spearman"] == pytest.approx(
      stats.spearmanr(-table.columns["fid_192"], levels).statistic)
  ok, text = v.u_beats_baselines(list(out.values()))
  assert ok == ("NOT" not in text)
