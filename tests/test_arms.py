"""Arms: top-k per class (direction-aware), controls, mixes, files, padding and errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from synthbandit_jax import arms as A


def test_topk_is_direction_aware_and_skips_nan():
  labels = np.array([0, 0, 0, 1, 1, 1])
  columns = {
      "dps": np.array([0.1, 0.9, 0.5, 0.3, np.nan, 0.7]),   # higher is better
      "fid": np.array([5.0, 1.0, 3.0, 2.0, 0.5, 9.0]),      # lower is better
  }
  arms = A.topk_arms(columns, {"dps": "higher", "fid": "lower"}, labels, ["a", "b"], k=2)
  got = dict(arms)
  # dps: class a -> rows 1 (0.9), 2 (0.5); class b -> rows 5 (0.7), 3 (0.3); NaN row 4 out.
  assert got["top:dps"].tolist() == [1, 2, 3, 5]
  # fid: class a -> rows 1 (1.0), 2 (3.0); class b -> rows 4 (0.5), 3 (2.0).
  assert got["top:fid"].tolist() == [1, 2, 3, 4]


def test_topk_errors_name_the_problem():
  labels = np.array([0, 0, 1])
  with pytest.raises(ValueError, match="class 'b'"):
    A.topk_arms({"s": np.array([1.0, 2.0, np.nan])}, {}, labels, ["a", "b"], k=1)
  with pytest.raises(KeyError, match="nope"):
    A.topk_arms({"s": np.ones(3)}, {}, labels, ["a", "b"], k=1, rankings=["nope"])
  with pytest.raises(ValueError, match="direction"):
    A.topk_arms({"s": np.ones(3)}, {"s": "up"}, labels, ["a", "b"], k=1)


def test_pad_arms_shapes_masks_and_errors():
  arms = A.pad_arms([("x", np.array([3, 1])), ("y", np.array([0, 2, 4, 5]))])
  assert arms.indices.shape == (2, 4) and arms.mask.sum(1).tolist() == [2, 4]
  assert arms.members(0).tolist() == [3, 1]
  # Padding repeats a valid row (never an out-of-range index).
  assert set(arms.indices[0].tolist()) <= {1, 3}
  with pytest.raises(ValueError, match="arm 'e' is empty"):
    A.pad_arms([("x", np.array([1])), ("e", np.array([], int))])
  with pytest.raises(ValueError, match="duplicate arm names"):
    A.pad_arms([("x", np.array([1])), ("x", np.array([2]))])
  with pytest.raises(ValueError, match="no arms"):
    A.pad_arms([])


def test_random_and_all_arms():
  labels = np.repeat(np.arange(3), [5, 2, 8])
  name, rows = A.random_arm(labels, 3, k=4, seed=0)
  assert name == "random"
  assert np.bincount(labels[rows], minlength=3).tolist() == [4, 2, 4]
  assert len(set(rows.tolist())) == len(rows)
  assert A.random_arm(labels, 3, k=4, seed=0)[1].tolist() == rows.tolist()  # deterministic
  assert A.all_arm(15)[1].tolist() == list(range(15))


def test_mix_arm_budget_fraction_and_strata():
  layout = A.BankLayout(num_pool=100, num_real=40)
  pool_labels = np.repeat(np.arange(2), 50)
  real_labels = np.repeat(np.arange(2), 20)
  name, rows = A.mix_arm(real_labels, pool_labels, layout, 0.25, budget=40, seed=1)
  assert name == "mix25" and len(rows) == 40
  syn = rows[rows < 100]
  real = rows[rows >= 100] - 100
  assert len(syn) == 10 and len(real) == 30
  assert np.bincount(pool_labels[syn]).tolist() == [5, 5]
  assert np.bincount(real_labels[real]).tolist() == [15, 15]
  with pytest.raises(ValueError, match="real images"):
    A.mix_arm(real_labels, pool_labels, layout, 0.0, budget=41, seed=1)


def test_with_real_and_files(tmp_path):
  layout = A.BankLayout(num_pool=3, num_real=2)
  out = A.with_real([("x", np.array([0, 2]))], layout)
  assert out[0][1].tolist() == [0, 2, 3, 4]
  ids = ["p0", "p1", "p2"]
  path = A.save_arms_file(tmp_path / "arms.json", [("good", np.array([2, 0]))], ids)
  assert json.loads(path.read_text()) == {"good": ["p2", "p0"]}
  assert [(n, r.tolist()) for n, r in A.arms_from_file(path, ids)] == [("good", [0, 2])]
  (tmp_path / "bad.json").write_text(json.dumps({"a": ["p0", "zz"]}))
  with pytest.raises(KeyError, match="zz"):
    A.arms_from_file(tmp_path / "bad.json", ids)
