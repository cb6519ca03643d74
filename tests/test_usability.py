"""Tests for synthbandit_jax.metrics.usability on hand-made inputs with worked-out answers."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from synthbandit_jax.metrics import gaussian as g
from synthbandit_jax.metrics import usability as u

# Real pool: class 0 = (0,0),(2,0): mean (1,0), variances (2,0), trace 2.
#            class 1 = (0,4),(0,6): mean (0,5), variances (0,2), trace 2.
REAL_X = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
REAL_Y = np.array([0, 0, 1, 1])
# Synthetic pool: class 0 = (1,1),(3,1),(2,4): mean (2,2), variances (1,3), trace 4.
#                 class 1 = (0,5),(2,5): mean (1,5), variances (2,0), trace 2.
SYN_X = np.array([[1.0, 1.0], [3.0, 1.0], [2.0, 4.0], [0.0, 5.0], [2.0, 5.0]])
SYN_Y = np.array([0, 0, 0, 1, 1])


def _stats():
  return g.class_stats(REAL_X, REAL_Y, 2), g.class_stats(SYN_X, SYN_Y, 2)


def test_point_frechet_direct_and_jitted():
  x = np.array([[1.0, 1.0], [2.0, 5.0]])
  mu = np.array([[2.0, 2.0], [1.0, 5.0]])
  tr = np.array([4.0, 2.0])
  # ||(1,1)-(2,2)||^2 + 4 = 6 ; ||(2,5)-(1,5)||^2 + 2 = 3
  np.testing.assert_allclose(np.asarray(u.point_frechet(x, mu, tr)), [6.0, 3.0])
  np.testing.assert_allclose(np.asarray(jax.jit(u.point_frechet)(x, mu, tr)), [6.0, 3.0])
  # broadcasting one Gaussian against a batch
  np.testing.assert_allclose(np.asarray(u.point_frechet(x, np.array([0.0, 0.0]), 1.0)),
                             [3.0, 30.0])


def test_dps_worked_example():
  real, syn = _stats()
  np.testing.assert_allclose(real.in_class.trace, [2.0, 2.0])
  np.testing.assert_allclose(syn.in_class.trace, [4.0, 2.0])
  # image (1,1), class 0: Syn_0 = 2 + 4 = 6, Syn_not0 = 16 + 2 = 18,
  #   Real_0 = 1 + 2 = 3, Real_not0 = 17 + 2 = 19 -> 24 / 22 = 12/11
  # image (2,5), class 1: Syn_1 = 1 + 2 = 3, Syn_not1 = 9 + 4 = 13,
  #   Real_1 = 4 + 2 = 6, Real_not1 = 26 + 2 = 28 -> 16 / 34 = 8/17
  feat = np.array([[1.0, 1.0], [2.0, 5.0]])
  lab = np.array([0, 1])
  np.testing.assert_allclose(u.dps(feat, lab, real, syn), [12 / 11, 8 / 17], rtol=1e-6)


def test_dps_exclude_self_leave_one_out():
  real, syn = _stats()
  feat = np.array([[1.0, 1.0], [2.0, 5.0]])
  lab = np.array([0, 1])
  # (1,1) without itself: Syn_0 = (3,1),(2,4): mean (2.5,2.5), variances (0.5,4.5), trace 5
  #   d = 4.5 + 5 = 9.5 -> (9.5 + 18) / 22 = 1.25.
  # (2,5): its Syn_1 has 2 images (< 3), so it keeps itself: 8/17 as before.
  out = u.dps(feat, lab, real, syn, exclude_self=True)
  np.testing.assert_allclose(out, [1.25, 8 / 17], rtol=1e-6)
  # The closed form equals recomputing the stats without the image, on random data.
  rng = np.random.default_rng(0)
  sx = rng.normal(size=(30, 3))
  sy = np.repeat([0, 1], 15)
  rx, ry = rng.normal(size=(20, 3)) + 1.0, np.repeat([0, 1], 10)
  real = g.class_stats(rx, ry, 2)
  fast = u.dps(sx, sy, real, g.class_stats(sx, sy, 2), exclude_self=True)
  for i in (0, 7, 22):
    keep = np.arange(30) != i
    slow = u.dps(sx[i:i + 1], sy[i:i + 1], real, g.class_stats(sx[keep], sy[keep], 2))
    np.testing.assert_allclose(fast[i], slow[0], rtol=1e-5)


def _dps_numpy(feat, lab, rx, ry, sx, sy):
  """DPS from scratch in float64 numpy: np.mean / np.cov of each set, then the formula."""
  out = []
  for x, c in zip(feat, lab):
    def d(pts):
      return np.sum((x - pts.mean(0)) ** 2) + np.trace(np.cov(pts, rowvar=False))
    out.append((d(sx[sy == c]) + d(sx[sy != c])) / (d(rx[ry == c]) + d(rx[ry != c])))
  return np.array(out)


def test_dps_random_matches_numpy_with_padding():
  rng = np.random.default_rng(1)
  rx, ry = rng.normal(size=(60, 5)) * 2, rng.integers(0, 3, 60)
  sx, sy = rng.normal(size=(37, 5)) + 0.5, rng.integers(0, 3, 37)
  real, syn = g.class_stats(rx, ry, 3), g.class_stats(sx, sy, 3)
  got = u.dps(sx, sy, real, syn, batch_size=8)  # 37 = 4 full chunks + 5 padded
  np.testing.assert_allclose(got, _dps_numpy(sx, sy, rx, ry, sx, sy), rtol=2e-6)


def test_dps_mismatched_stats_raise():
  real, _ = _stats()
  syn3 = g.class_stats(SYN_X, np.array([0, 1, 2, 2, 1]), 3)
  with pytest.raises(ValueError, match="do not match"):
    u.dps(SYN_X, SYN_Y, real, syn3)
  with pytest.raises(ValueError, match=r"\[N, 2\]"):
    u.dps(np.zeros((2, 3)), np.array([0, 1]), real, real)


def test_fcs_worked_example_and_scipy():
  means = np.array([[1.0, 0.0], [0.0, 5.0]])
  # (1,1) of class 0: p = (1+1e-10, 1e-10)/(1+2e-10), q = (1/2, 1/2):
  #   KL = log 2 + 1e-10 * log(2e-10) + O(1e-10) = 0.6931471..., FCS = 1/log 2 = 1.4426950
  feat = np.array([[1.0, 1.0], [0.0, 5.0]])
  lab = np.array([0, 1])
  out, kl = u.fcs(feat, lab, means, return_kl=True)
  np.testing.assert_allclose(out[0], 1 / np.log(2), rtol=1e-5)
  p = (means[0] + 1e-10) / np.sum(means[0] + 1e-10)
  q = (feat[0] + 1e-10) / np.sum(feat[0] + 1e-10)
  np.testing.assert_allclose(kl[0], stats.entropy(p, q), rtol=1e-5)
  # (0,5) of class 1 equals its class mean: KL = 0 exactly -> clipped at min_kl,
  # FCS = 1/min_kl
  assert kl[1] == 0.0
  np.testing.assert_allclose(out[1], 1e12, rtol=1e-5)


@pytest.mark.parametrize("classes", [4, u._ONE_HOT_MAX_CLASSES + 8])  # one-hot / gather
def test_fcs_random_matches_scipy_entropy(classes):
  rng = np.random.default_rng(2)
  means = np.abs(rng.normal(size=(classes, 16)))
  means[:, :3] = 0.0  # zeros take the + 1e-10 path
  feat = np.maximum(rng.normal(size=(23, 16)), 0.0)
  lab = rng.integers(0, classes, 23)
  got = u.fcs(feat, lab, means, batch_size=5)
  want = []
  for x, c in zip(feat, lab):
    p, q = means[c] + 1e-10, x + 1e-10
    want.append(1.0 / stats.entropy(p / p.sum(), q / q.sum()))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_fcs_rejects_negative_features():
  with pytest.raises(ValueError, match="found 2 negative"):
    u.fcs(np.array([[1.0, -1.0], [-0.5, 2.0]]), np.array([0, 0]), np.ones((1, 2)))


def test_fcs_counts_negatives_over_every_chunk():
  feat = np.ones((7, 2))
  feat[1, 0] = feat[4, 1] = feat[6, 0] = -0.5  # in chunks 1, 3 and the padded 4th
  with pytest.raises(ValueError, match="found 3 negative values of 14"):
    u.fcs(feat, np.zeros(7, np.int64), np.ones((1, 2)), batch_size=2)
  with pytest.raises(ValueError, match="negative real_class_means"):
    u.fcs(np.ones((2, 2)), np.zeros(2, np.int64), -np.ones((1, 2)))


def test_row_chunks_alias_aligned_float32_and_copy_the_rest():
  # The host wrappers hand XLA float32 rows that are contiguous and 64-byte aligned as they
  # are (zero-copy on CPU) and copy any other rows into one reused aligned buffer. Both
  # must give the same scores, and neither may write into the caller's array.
  rng = np.random.default_rng(5)
  x64 = np.abs(rng.normal(size=(11, 6)))
  aligned = u._aligned_empty((11, 6), np.float32)
  aligned[...] = x64
  shifted = np.empty(11 * 6 + 1, np.float32)[1:].reshape(11, 6)  # 4 bytes off alignment
  shifted[...] = x64
  assert aligned.ctypes.data % 64 == 0 and shifted.ctypes.data % 64 != 0
  before = aligned.copy()
  lab = rng.integers(0, 3, 11)
  means = np.abs(rng.normal(size=(3, 6)))
  want = u.fcs(x64.astype(np.float32).astype(np.float64), lab, means, batch_size=4)
  for x in (aligned, shifted, x64):
    np.testing.assert_allclose(u.fcs(x, lab, means, batch_size=4), want, rtol=1e-6)
  np.testing.assert_array_equal(aligned, before)
  chunks = u._RowChunks(aligned, 4, np.float32)
  first = chunks(0, 4)
  if jax.default_backend() == "cpu":  # the first chunk is the caller's memory itself
    assert first.unsafe_buffer_pointer() == aligned.ctypes.data
  np.testing.assert_array_equal(np.asarray(first), aligned[:4])
  last = chunks(8, 11)  # 3 rows + 1 zero row, through the buffer
  padded = np.concatenate([aligned[8:], np.zeros((1, 6), np.float32)])
  np.testing.assert_array_equal(np.asarray(last), padded)


def test_minmax_and_combine():
  dps = np.array([1.0, 3.0, 2.0, np.nan])
  fcs = np.array([4.0, 2.0, 3.0, 5.0])
  # norm dps = [0, 1, 1/2, nan], norm fcs = [2/3, 0, 1/3, 1]
  np.testing.assert_allclose(u.combine(dps, fcs, "mean"), [1 / 3, 1 / 2, 5 / 12, np.nan])
  np.testing.assert_allclose(u.combine(dps, fcs, "product"), [0.0, 0.0, 1 / 6, np.nan])
  np.testing.assert_allclose(u.minmax_normalise([7.0, 7.0, np.nan]), [0.5, 0.5, np.nan])
  np.testing.assert_allclose(u.minmax_normalise([1.0, np.inf, 3.0, -np.inf]),
                             [0.0, 1.0, 1.0, 0.0])
  with pytest.raises(ValueError, match="form"):
    u.combine(dps, fcs, "sum")


def test_normalised_aggregates():
  cols = {"a": np.array([0.0, 1.0, 2.0]), "b": np.array([2.0, 0.0, 1.0]),
          "c": np.array([5.0, 5.0, 5.0]), "d": np.array([np.nan, np.nan, 1.0])}
  # normalised: a = [0, .5, 1], b = [1, 0, .5], c = [.5, .5, .5], d = [nan, nan, .5]
  out = u.normalised_aggregates(cols)
  np.testing.assert_allclose(out["mean"], [0.5, 1 / 3, 0.625])
  np.testing.assert_allclose(out["median"], [0.5, 0.5, 0.5])
  np.testing.assert_allclose(out["min"], [0.0, 0.0, 0.5])
  np.testing.assert_allclose(out["max"], [1.0, 0.5, 1.0])
  all_nan = u.normalised_aggregates({"x": np.array([np.nan, 1.0, 2.0])})
  assert np.isnan(all_nan["mean"][0]) and all_nan["max"][2] == 1.0


def test_non_finite_features_are_named():
  real, syn = _stats()
  feat = np.array([[1.0, 1.0], [np.nan, 5.0], [0.0, np.inf]])
  with pytest.raises(ValueError, match=r"2 feature rows .*\[1, 2\]"):
    u.dps(feat, np.array([0, 1, 1]), real, syn)
