"""Tests for synthbandit_jax.data.scores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from synthbandit_jax.data import scores


def _table():
  return scores.ScoreTable(
      ids=["a", "b,c", "d"],
      columns={"dps": np.array([0.1, np.nan, 1 / 3]), "fid_2048": np.array([3.0, 1e-12, -2.5]),
               "ssim": np.array([0.5, 0.25, np.inf])},
      directions={"ssim": "lower"})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".npz"])
def test_round_trip(tmp_path, suffix):
  t = _table()
  assert t.directions == {"dps": "higher", "fid_2048": "lower", "ssim": "lower"}
  path = scores.save_score_table(tmp_path / f"s{suffix}", t)
  assert (tmp_path / f"s{suffix}.meta.json").is_file()
  u = scores.load_score_table(path)
  assert u.ids == t.ids
  assert list(u.columns) == list(t.columns)
  for n in t.columns:
    assert u.columns[n].dtype == np.float64
    np.testing.assert_array_equal(u.columns[n], t.columns[n])  # Exact, NaN == NaN.
  assert u.directions == t.directions  # "ssim": "lower" came from the sidecar.


def test_csv_without_sidecar_and_direction_priority(tmp_path):
  path = tmp_path / "user.csv"
  path.write_text("id,FID192,kid,pairDist,val_loss,error_rate,lpips,fidelity,IS\n"
                  "x,1,2,3,4,5,6,7,8\ny,nan,,3,4,5,6,7,NaN\n")
  t = scores.load_score_table(path)
  assert t.directions == {"FID192": "lower", "kid": "lower", "pairDist": "lower",
                          "val_loss": "lower", "error_rate": "lower", "lpips": "lower",
                          "fidelity": "higher", "IS": "higher"}
  assert np.isnan(t.columns["FID192"][1]) and np.isnan(t.columns["kid"][1])
  assert t.columns["IS"][0] == 8.0
  (tmp_path / "user.csv.meta.json").write_text(json.dumps({"directions": {"kid": "higher"}}))
  assert scores.load_score_table(path).directions["kid"] == "higher"
  t = scores.load_score_table(path, directions={"kid": "lower", "IS": "lower"})
  assert t.directions["kid"] == "lower" and t.directions["IS"] == "lower"
  with pytest.raises(ValueError, match="nope"):
    scores.load_score_table(path, directions={"nope": "lower"})
  with pytest.raises(ValueError, match="'higher' or 'lower'"):
    scores.load_score_table(path, directions={"kid": "up"})


@pytest.mark.parametrize("name,expected", [
    ("fid", "lower"), ("fid_2048", "lower"), ("fid192", "lower"), ("FID", "lower"),
    ("kid_score", "lower"), ("distance", "lower"), ("l2-dist", "lower"), ("train.loss", "lower"),
    ("Errors", "lower"), ("lpips", "lower"), ("fidelity", "higher"), ("dps", "higher"),
    ("fcs", "higher"), ("u", "higher"), ("psnr", "higher"), ("kidney", "higher"),
    ("distinct", "higher"), ("lossless", "higher")])
def test_default_direction(name, expected):
  assert scores.default_direction(name) == expected


def test_non_numeric_and_duplicates_are_named(tmp_path):
  p = tmp_path / "bad.csv"
  p.write_text("id,dps,fcs\na,1,2\nb,3,hello\n")
  with pytest.raises(ValueError, match=r"bad\.csv: line 3, column 'fcs': value 'hello'"):
    scores.load_score_table(p)
  p = tmp_path / "bad.jsonl"
  p.write_text('{"id": "a", "dps": 1}\n{"id": "b", "dps": "x"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl: line 2, column 'dps'"):
    scores.load_score_table(p)
  p = tmp_path / "dup.csv"
  p.write_text("id,dps\na,1\nb,2\na,3\n")
  with pytest.raises(ValueError, match=r"dup\.csv: 1 duplicate id.*'a'"):
    scores.load_score_table(p)
  np.savez(tmp_path / "bad.npz", ids=np.array(["a", "b"]), dps=np.array(["1", "zz"]))
  with pytest.raises(ValueError, match=r"bad\.npz: row 1, column 'dps'"):
    scores.load_score_table(tmp_path / "bad.npz")
  with pytest.raises(ValueError, match="unsupported"):
    scores.save_score_table(tmp_path / "x.txt", _table())


def test_jsonl_missing_fields_are_nan(tmp_path):
  p = tmp_path / "s.jsonl"
  p.write_text('{"id": "a", "dps": 1}\n{"id": "b", "fcs": 2, "dps": null}\n{"id": "c"}\n')
  t = scores.load_score_table(p)
  np.testing.assert_array_equal(t.columns["dps"], [1.0, np.nan, np.nan])
  np.testing.assert_array_equal(t.columns["fcs"], [np.nan, 2.0, np.nan])


def test_align_scores(tmp_path):
  t = _table()
  a = scores.align_scores(t, ["d", "a", "b,c"])
  assert a.ids == ["d", "a", "b,c"]
  np.testing.assert_array_equal(a.columns["fid_2048"], [-2.5, 3.0, 1e-12])
  assert a.directions == t.directions
  with pytest.raises(ValueError) as e:
    scores.align_scores(t, ["a", "d", "q1", "q2"])
  msg = str(e.value)
  assert "2 pool id(s) have no score row" in msg and "'q1', 'q2'" in msg
  assert "1 score row id(s) are not in the pool" in msg and "'b,c'" in msg
  many = [f"m{k}" for k in range(9)]
  with pytest.raises(ValueError, match=r"9 pool id.*'m4'\]"):
    scores.align_scores(t, ["a", "b,c", "d"] + many)
  b = scores.align_scores(t, ["q", "a"], allow_missing=True)
  np.testing.assert_array_equal(b.columns["dps"], [np.nan, 0.1])
  with pytest.raises(ValueError, match="not in the pool"):
    scores.align_scores(t, ["q", "a"], allow_missing=True, allow_extra=False)
  with pytest.raises(ValueError, match="duplicate"):
    scores.align_scores(t, ["a", "a", "d", "b,c"])


def _reference_rank(values, direction):
  """Independent reference: sort (is_nan, signed value, index) tuples."""
  sign = -1.0 if direction == "higher" else 1.0
  keys = [(np.isnan(v), 0.0 if np.isnan(v) else sign * v, k) for k, v in enumerate(values)]
  return [k for *_, k in sorted(keys)]


def test_rank_order():
  v = np.array([0.5, np.nan, 2.0, 0.5, -1.0, np.nan, 2.0, np.inf])
  hi = scores.rank_order(v, "higher")
  lo = scores.rank_order(v, "lower")
  assert hi.tolist() == [7, 2, 6, 0, 3, 4, 1, 5]
  assert lo.tolist() == [4, 0, 3, 2, 6, 7, 1, 5]
  rng = np.random.default_rng(0)
  for _ in range(20):
    w = rng.integers(0, 4, size=30).astype(float)
    w[rng.random(30) < 0.2] = np.nan
    for d in ("higher", "lower"):
      assert scores.rank_order(w, d).tolist() == _reference_rank(w, d)
  with pytest.raises(ValueError):
    scores.rank_order(v, "best")
