"""Dataset-level distances between two feature sets: FID and KID (float64 numpy).

FID (Heusel et al. 2017) between N(mu1, S1) and N(mu2, S2):

  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

tr((S1 S2)^{1/2}) is computed without a general (non-symmetric) matrix square root:
S1 S2 is similar to the symmetric PSD matrix M = S1^{1/2} S2 S1^{1/2}, so it has the same
eigenvalues and tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)). S1^{1/2} comes from `eigh` of
S1 with its eigenvalues clipped at 0, M is symmetrised, and M's eigenvalues are clipped at 0
before the square root. This never produces complex numbers (scipy.linalg.sqrtm of a
singular S1 S2 can), needs no `eps * I` offset and works for rank-deficient covariances (for
example fewer samples than dimensions). The result is clipped at 0 against rounding.

KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of `subset_size` rows
drawn without replacement from each set (as in torch-fidelity / the authors' code):

  MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
          - 2 sum_{i, j} k(x_i, y_j) / m^2.
"""
from __future__ import annotations

import numpy as np

from synthbandit_jax.metrics.gaussian import GaussianAccumulator


def _sym_sqrt_psd(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(0.5 * (s + s.T))
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1, s2) -> float:
  """tr((S1 S2)^{1/2}) for symmetric PSD S1, S2, via eigh of S1^{1/2} S2 S1^{1/2}."""
  s1 = np.asarray(s1, np.float64)
  s2 = np.asarray(s2, np.float64)
  h = _sym_sqrt_psd(s1)
  m = h @ s2 @ h
  ev = np.linalg.eigvalsh(0.5 * (m + m.T))
  return float(np.sum(np.sqrt(np.clip(ev, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, >= 0.

  mu [D], sigma [D, D] symmetric PSD (e.g. unbiased sample covariances). See the module
  docstring for the matrix square root.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0]
  for name, arr, shape in (("mu2", mu2, (d,)), ("sigma1", s1, (d, d)),
                           ("sigma2", s2, (d, d))):
    if arr.shape != shape:
      raise ValueError(f"frechet_distance: {name} has shape {arr.shape}, expected {shape}")
  for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"frechet_distance: {name} contains NaN or Inf")
  diff = mu1 - mu2
  value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
  return float(max(value, 0.0))


def gaussian_of(features, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """(mean, unbiased covariance) of [N, D] features, accumulated in float64 chunks."""
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {x.shape}")
  acc = GaussianAccumulator.empty(x.shape[1])
  for start in range(0, x.shape[0], batch_size):
    acc = acc.add(x[start:start + batch_size])
  return acc.mean, acc.cov


def fid_from_features(a, b) -> float:
  """FID between two feature sets [Na, D] and [Nb, D] (each needs >= 2 rows)."""
  mu1, s1 = gaussian_of(a)
  mu2, s2 = gaussian_of(b)
  return frechet_distance(mu1, s1, mu2, s2)


def polynomial_kernel(x, y) -> np.ndarray:
  """(x y^T / d + 1)^3 in float64: [n, d] x [m, d] -> [n, m]."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
  """Unbiased MMD^2 between two equal-size samples with the cubic polynomial kernel."""
  m = x.shape[0]
  if y.shape[0] != m or m < 2:
    raise ValueError(f"mmd2_unbiased needs two samples of one size >= 2, got {x.shape[0]} "
                     f"and {y.shape[0]}")
  kxx = polynomial_kernel(x, x)
  kyy = polynomial_kernel(y, y)
  kxy = polynomial_kernel(x, y)
  sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
  syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  return float(sxx + syy - 2.0 * kxy.mean())


def kid(a, b, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
        ) -> tuple[float, float]:
  """KID between feature sets a [Na, D] and b [Nb, D]: (mean, std) of the unbiased MMD^2
  over `subsets` subsets; subset_size is capped at min(Na, Nb) (must end up >= 2). Each
  subset draws rows without replacement from a and from b with numpy's default_rng(seed)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"kid needs two [N, D] feature arrays of one D, got {a.shape} and "
                     f"{b.shape}")
  m = min(subset_size, a.shape[0], b.shape[0])
  if m < 2:
    raise ValueError(f"kid needs at least 2 rows in each set, got {a.shape[0]} and "
                     f"{b.shape[0]}")
  if subsets < 1:
    raise ValueError(f"kid subsets must be >= 1, got {subsets}")
  rng = np.random.default_rng(seed)
  vals = np.empty(subsets)
  for i in range(subsets):
    ia = rng.choice(a.shape[0], m, replace=False)
    ib = rng.choice(b.shape[0], m, replace=False)
    vals[i] = mmd2_unbiased(a[ia], b[ib])
  return float(vals.mean()), float(vals.std())
