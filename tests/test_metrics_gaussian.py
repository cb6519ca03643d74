"""Tests for synthbandit_jax.metrics.gaussian against direct numpy formulas."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from synthbandit_jax.metrics import gaussian as g


def test_streaming_equals_np_cov_across_many_merges():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 7)) @ rng.normal(size=(7, 7)) + rng.normal(size=7)
  cuts = np.sort(rng.choice(np.arange(1, 500), size=40, replace=False))
  parts = np.split(x, cuts)
  parts.insert(3, x[:0])  # an empty batch is a no-op
  # Half added one by one, half merged as a tree of separate accumulators.
  acc = g.GaussianAccumulator.empty(7)
  for p in parts[:20]:
    acc = acc.add(p)
  others = [g.GaussianAccumulator.from_features(p) for p in parts[20:]]
  while len(others) > 1:
    others = [others[i].merge(others[i + 1]) if i + 1 < len(others) else others[i]
              for i in range(0, len(others), 2)]
  acc = acc.merge(others[0])
  assert acc.count == 500
  np.testing.assert_allclose(acc.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(acc.cov, np.cov(x, rowvar=False), rtol=1e-11, atol=1e-12)
  np.testing.assert_allclose(acc.trace_cov, np.trace(np.cov(x, rowvar=False)), rtol=1e-12)


def test_diagonal_mode_matches_variances():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(101, 5)) * np.arange(1, 6)
  acc = g.GaussianAccumulator.empty(5, full_cov=False)
  for p in np.array_split(x, 9):
    acc = acc.add(p)
  np.testing.assert_allclose(acc.var, x.var(axis=0, ddof=1), rtol=1e-12)
  np.testing.assert_allclose(acc.cov, np.diag(x.var(axis=0, ddof=1)), rtol=1e-12)


def test_large_offset_is_stable_in_float64():
  # Features around 1e4 with unit spread: a raw sum(x x^T) would cancel 8 digits away.
  rng = np.random.default_rng(2)
  z = rng.normal(size=(20000, 4))
  x = z + 1e4
  acc = g.GaussianAccumulator.empty(4)
  for p in np.array_split(x, 97):
    acc = acc.add(p)
  expected = np.cov(z, rowvar=False)  # shift invariant, computed without the offset
  np.testing.assert_allclose(acc.cov, expected, rtol=1e-9, atol=1e-10)
  # float32 input: the offset itself is not representable exactly, but accumulation is
  # float64 so the result equals np.cov of the float32 values promoted to float64.
  x32 = x.astype(np.float32)
  acc32 = g.GaussianAccumulator.empty(4)
  for p in np.array_split(x32, 13):
    acc32 = acc32.add(p)
  np.testing.assert_allclose(acc32.cov, np.cov(x32.astype(np.float64), rowvar=False),
                             rtol=1e-9, atol=1e-10)


def test_covariance_of_fewer_than_two_samples_raises():
  acc = g.GaussianAccumulator.empty(3).add(np.ones((1, 3)))
  with pytest.raises(ValueError, match="at least 2 samples"):
    _ = acc.cov


def _direct(x, y, c, full):
  """Expected (mean, cov) of the sets c and not-c with numpy directly."""
  xi, xo = x[y == c], x[y != c]
  return (xi.mean(0), np.cov(xi, rowvar=False), xo.mean(0), np.cov(xo, rowvar=False))


@pytest.mark.parametrize("full_cov", [False, True])
def test_class_stats_match_direct_formulas(full_cov):
  rng = np.random.default_rng(3)
  y = rng.integers(0, 4, size=300)
  x = rng.normal(size=(300, 6)) + 3.0 * y[:, None] + 50.0
  st = g.class_stats(x, y, 4, full_cov=full_cov, batch_size=37)
  for c in range(4):
    mi, ci, mo, co = _direct(x, y, c, full_cov)
    assert st.in_class.count[c] == np.sum(y == c)
    assert st.out_class.count[c] == np.sum(y != c)
    np.testing.assert_allclose(st.in_class.mean[c], mi, rtol=1e-12)
    np.testing.assert_allclose(st.out_class.mean[c], mo, rtol=1e-12)
    np.testing.assert_allclose(st.in_class.trace[c], np.trace(ci), rtol=1e-10)
    np.testing.assert_allclose(st.out_class.trace[c], np.trace(co), rtol=1e-10)
    np.testing.assert_allclose(st.out_class.var[c], np.diag(co), rtol=1e-10)
    if full_cov:
      np.testing.assert_allclose(st.in_class.cov[c], ci, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(st.out_class.cov[c], co, rtol=1e-10, atol=1e-12)
    else:
      assert st.in_class.cov is None
  assert not st.in_class.regularised.any() and not st.out_class.regularised.any()


@pytest.mark.parametrize("full_cov", [False, True])
def test_class_stats_in_many_row_blocks_of_float32(monkeypatch, full_cov):
  # _class_moments takes each class in row blocks of _BLOCK_BYTES; shrink it so that every
  # class spans several blocks (5 rows, 7 with full_cov), a ragged last one included, and
  # feed float32 features around 1e4: the blocks are cast to float64 one by one, so the
  # result must equal numpy's float64 formulas on the promoted float32 values.
  monkeypatch.setattr(g, "_BLOCK_BYTES", 8 * 7 * 5)
  rng = np.random.default_rng(7)
  y = rng.integers(0, 3, size=203)
  x32 = (rng.normal(size=(203, 7)) + 2.0 * y[:, None] + 1e4).astype(np.float32)
  st = g.class_stats(x32, y, 3, full_cov=full_cov)
  x = x32.astype(np.float64)
  for c in range(3):
    mi, ci, mo, co = _direct(x, y, c, full_cov)
    np.testing.assert_allclose(st.in_class.mean[c], mi, rtol=1e-13)
    np.testing.assert_allclose(st.out_class.mean[c], mo, rtol=1e-13)
    np.testing.assert_allclose(st.in_class.var[c], np.diag(ci), rtol=1e-9)
    np.testing.assert_allclose(st.out_class.var[c], np.diag(co), rtol=1e-9)
    if full_cov:
      np.testing.assert_allclose(st.in_class.cov[c], ci, rtol=1e-9, atol=1e-10)


def test_streaming_class_accumulator_equals_one_shot():
  rng = np.random.default_rng(4)
  y = rng.integers(0, 3, size=120)
  x = rng.normal(size=(120, 5))
  acc = g.ClassGaussianAccumulator.empty(3, 5, full_cov=True)
  half = g.ClassGaussianAccumulator.empty(3, 5, full_cov=True)
  for i, (xb, yb) in enumerate(zip(np.array_split(x, 11), np.array_split(y, 11))):
    if i % 2:
      acc = acc.add(xb, yb)
    else:
      half = half.add(xb, yb)
  st = acc.merge(half).finalize()
  ref = g.class_stats(x, y, 3, full_cov=True)
  np.testing.assert_allclose(st.in_class.cov, ref.in_class.cov, rtol=1e-11, atol=1e-13)
  np.testing.assert_allclose(st.out_class.cov, ref.out_class.cov, rtol=1e-11, atol=1e-13)


def test_small_classes_are_regularised_finite_and_warned(caplog):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(41, 3))
  y = np.array([0] * 20 + [1] * 20 + [2])  # class 2 has 1 sample, class 3 has none
  with caplog.at_level(logging.WARNING):
    st = g.class_stats(x, y, 4, class_names=["a", "b", "cat", "dog"], what="synthetic",
                       full_cov=True)
  for s in (st.in_class, st.out_class):
    assert np.all(np.isfinite(s.mean)) and np.all(np.isfinite(s.trace))
    assert np.all(np.isfinite(s.cov))
  pooled = np.cov(x, rowvar=False)
  assert st.in_class.regularised.tolist() == [False, False, True, True]
  np.testing.assert_allclose(st.in_class.cov[2], pooled, rtol=1e-12)
  np.testing.assert_allclose(st.in_class.trace[3], np.trace(pooled), rtol=1e-12)
  np.testing.assert_allclose(st.in_class.mean[2], x[40], rtol=1e-12)  # the one sample
  np.testing.assert_allclose(st.in_class.mean[3], x.mean(0), rtol=1e-12)  # pooled mean
  assert st.in_class.count.tolist() == [20, 20, 1, 0]
  # not-c of class 3 is the whole pool
  np.testing.assert_allclose(st.out_class.cov[3], pooled, rtol=1e-10)
  text = caplog.text
  assert "2 (cat)" in text and "3 (dog)" in text and "synthetic" in text
  assert "0 (a)" not in text


def test_small_set_eps_mode():
  x = np.array([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]])
  y = np.array([0, 0, 1])
  st = g.class_stats(x, y, 2, small_set="eps", eps=1e-3)
  np.testing.assert_allclose(st.in_class.var[1], [1e-3, 1e-3])
  np.testing.assert_allclose(st.in_class.trace[1], 2e-3)
  # class 0: two samples [1,2],[3,5]: variances 2 and 4.5
  np.testing.assert_allclose(st.in_class.var[0], [2.0, 4.5])
  with pytest.raises(ValueError, match="small_set"):
    g.class_stats(x, y, 2, small_set="zero")


def test_max_per_set_subsamples_with_seed():
  rng = np.random.default_rng(6)
  y = np.repeat(np.arange(3), [100, 50, 5])
  x = rng.normal(size=(155, 4))
  st = g.class_stats(x, y, 3, max_per_set=16, seed=7)
  assert st.in_class.count.tolist() == [16, 16, 5]
  assert st.out_class.count.tolist() == [16, 16, 16]
  ins, outs = g.subsample_indices(y, 3, 16, seed=7)
  for c in range(3):
    assert np.all(y[ins[c]] == c) and np.all(y[outs[c]] != c)
    assert len(set(ins[c].tolist())) == len(ins[c])
    np.testing.assert_allclose(st.in_class.mean[c], x[ins[c]].mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.out_class.trace[c],
                               np.trace(np.cov(x[outs[c]], rowvar=False)), rtol=1e-10)
  again = g.class_stats(x, y, 3, max_per_set=16, seed=7)
  np.testing.assert_array_equal(again.in_class.mean, st.in_class.mean)
  other = g.class_stats(x, y, 3, max_per_set=16, seed=8)
  assert not np.allclose(other.in_class.mean[0], st.in_class.mean[0])


def test_bad_labels_are_named():
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    g.class_stats(np.zeros((3, 2)), np.array([0, 1, 2]), 2)
  with pytest.raises(ValueError, match="integers"):
    g.class_stats(np.zeros((2, 2)), np.array([0.0, 1.0]), 2)
