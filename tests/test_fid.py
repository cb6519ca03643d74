"""Tests for synthbandit_jax.metrics.fid against closed forms, scipy.linalg.sqrtm and loops."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from synthbandit_jax.metrics import fid


def _fid_scipy(mu1, s1, mu2, s2):
  covmean = linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_diagonal_covariances_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  # ||mu1 - mu2||^2 = 1 + 0 + 4 = 5 ; sum (sqrt a - sqrt b)^2 = 1 + 1 + 6.25 = 8.25
  assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(13.25,
                                                                                abs=1e-12)


def test_commuting_covariances_closed_form():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)


def test_random_spd_matches_scipy_sqrtm():
  rng = np.random.default_rng(1)
  for d in (2, 10, 40):
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        _fid_scipy(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)


def test_fid_from_features_and_rank_deficient():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(200, 8))
  y = rng.normal(size=(150, 8)) * 1.5 + 0.3
  want = _fid_scipy(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
  assert fid.fid_from_features(x, y) == pytest.approx(want, rel=1e-9)
  # Fewer samples than dimensions: singular covariances, still finite, >= 0, 0 for a == a.
  small = rng.normal(size=(5, 32))
  assert fid.fid_from_features(small, small) == pytest.approx(0.0, abs=1e-9)
  other = rng.normal(size=(6, 32))
  val = fid.fid_from_features(small, other)
  assert np.isfinite(val) and val > 0


def test_frechet_distance_validates():
  with pytest.raises(ValueError, match="sigma2"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
  with pytest.raises(ValueError, match="NaN"):
    fid.frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def _mmd_loop(x, y):
  m, d = len(x), x.shape[1]

  def k(u, v):
    return (sum(ui * vi for ui, vi in zip(u, v)) / d + 1.0) ** 3

  sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return sxx + syy - 2 * sxy


def test_kid_matches_brute_force_loop():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(12, 4))
  y = rng.normal(size=(12, 4)) + 0.7
  want = _mmd_loop(x, y)
  assert fid.mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-10)
  # subset_size >= N: every subset is a permutation of the whole set, MMD^2 is invariant.
  mean, std = fid.kid(x, y, subsets=5, subset_size=100)
  assert mean == pytest.approx(want, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)
  # Proper subsets: the mean of brute-force MMD^2 over the same seeded draws.
  big_x, big_y = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) * 1.3
  draws = np.random.default_rng(11)
  vals = []
  for _ in range(4):
    ia, ib = draws.choice(30, 8, replace=False), draws.choice(25, 8, replace=False)
    vals.append(_mmd_loop(big_x[ia], big_y[ib]))
  mean, std = fid.kid(big_x, big_y, subsets=4, subset_size=8, seed=11)
  assert mean == pytest.approx(np.mean(vals), rel=1e-10)
  assert std == pytest.approx(np.std(vals), rel=1e-8)


def test_kid_near_zero_for_same_distribution():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
  same, _ = fid.kid(a, b, subsets=10, subset_size=200)
  diff, _ = fid.kid(a, b + 1.0, subsets=10, subset_size=200)
  assert abs(same) < 0.02 and diff > 10 * max(abs(same), 1e-3)
