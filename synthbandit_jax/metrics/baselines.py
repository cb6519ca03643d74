"""Per-image baseline metrics: SSIM, PSNR, Inception Score, realism score, PRDC.

SSIM (Wang, Bovik, Sheikh, Simoncelli 2004, "Image quality assessment: from error visibility
to structural similarity"): local means, variances and covariance under an 11x11 Gaussian
window (sigma 1.5, normalised to sum 1, separable), evaluated only where the window fits
inside the image ("valid", no padding, as the authors' MATLAB code), with

  SSIM = mean over positions of ((2 mu_a mu_b + C1)(2 s_ab + C2)) /
                                ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
  C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = data_range (255 for 8-bit images).

Local variances are the window-weighted (biased) ones, as in the paper. Colour images get
SSIM per channel, averaged over channels. Images smaller than the window use the largest odd
window that fits (e.g. 7x7 for 8x8 digits) with the same sigma. From 11x11 up this equals
skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255) up to float32 rounding.

PSNR = 10 log10(L^2 / MSE), MSE over all pixels and channels; identical images give +inf.

Images are [N, H, W] (grayscale) or [N, H, W, C], values in [0, data_range] (uint8 or
float). SSIM/PSNR run in JAX float32 (batched, jitted). Inception Score, realism and PRDC are
float64 numpy on precomputed features / probabilities.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_WIN = 11
SSIM_SIGMA = 1.5


# --------------------------------------------------------------------------- SSIM / PSNR


def _as_nhwc(x, name: str) -> jnp.ndarray:
  arr = jnp.asarray(x, jnp.float32)
  if arr.ndim == 3:
    arr = arr[..., None]
  if arr.ndim != 4:
    raise ValueError(f"{name} must be [N, H, W] or [N, H, W, C] images, got shape {arr.shape}")
  return arr


def window_size(h: int, w: int, win: int = SSIM_WIN) -> int:
  """The SSIM window used for HxW images: `win`, or the largest odd size <= min(h, w)."""
  size = min(win, h, w)
  if size % 2 == 0:
    size -= 1
  if size < 1:
    raise ValueError(f"images of size {h}x{w} are too small for SSIM")
  return size


def _filter_matrix(n: int, size: int, sigma: float) -> np.ndarray:
  """[n - size + 1, n] matrix applying the normalised 1-D Gaussian at every valid offset."""
  t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-t * t / (2.0 * sigma * sigma))
  g /= g.sum()
  m = np.zeros((n - size + 1, n))
  for i in range(n - size + 1):
    m[i, i:i + size] = g
  return m.astype(np.float32)


def _local(x, gh, gw):
  """Valid separable Gaussian filtering of [..., H, W, C] -> [..., h, w, C]."""
  return jnp.einsum("ih,...hwc,jw->...ijc", gh, x, gw)


def ssim(a, b, *, data_range: float = 255.0, win: int = SSIM_WIN,
         sigma: float = SSIM_SIGMA) -> np.ndarray:
  """SSIM of paired images a[i] vs b[i]: [N] float (1 for identical images).

  a, b: [N, H, W] or [N, H, W, C] of one shape (see the module docstring for the window,
  constants and colour handling).
  """
  x, y = _as_nhwc(a, "a"), _as_nhwc(b, "b")
  if x.shape != y.shape:
    raise ValueError(f"ssim needs images of one shape, got {x.shape} and {y.shape}")
  size = window_size(x.shape[1], x.shape[2], win)
  gh = jnp.asarray(_filter_matrix(x.shape[1], size, sigma))
  gw = jnp.asarray(_filter_matrix(x.shape[2], size, sigma))
  return np.asarray(_ssim_exact(x, y, gh, gw, float(data_range)), np.float64)


@functools.partial(jax.jit, static_argnames=("data_range",))
def _ssim_exact(a, b, gh, gw, data_range):
  off = 0.5 * data_range
  ac, bc = a - off, b - off
  mu_ac, mu_bc = _local(ac, gh, gw), _local(bc, gh, gw)
  # centred second moments -> (co)variances; then the true means for the luminance term
  e_aa, e_bb, e_ab = _local(ac * ac, gh, gw), _local(bc * bc, gh, gw), _local(ac * bc, gh, gw)
  s_aa, s_bb = e_aa - mu_ac * mu_ac, e_bb - mu_bc * mu_bc
  s_ab = e_ab - mu_ac * mu_bc
  mu_a, mu_b = mu_ac + off, mu_bc + off
  return _ssim_terms(mu_a, mu_b, s_aa, s_bb, s_ab, data_range)


def _ssim_terms(mu_a, mu_b, s_aa, s_bb, s_ab, data_range):
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  num = (2.0 * mu_a * mu_b + c1) * (2.0 * s_ab + c2)
  den = (mu_a * mu_a + mu_b * mu_b + c1) * (s_aa + s_bb + c2)
  return jnp.mean(num / den, axis=(-3, -2, -1))


def psnr(a, b, *, data_range: float = 255.0) -> np.ndarray:
  """PSNR of paired images in dB: 10 log10(data_range^2 / MSE), [N]; +inf where equal."""
  x, y = _as_nhwc(a, "a"), _as_nhwc(b, "b")
  if x.shape != y.shape:
    raise ValueError(f"psnr needs images of one shape, got {x.shape} and {y.shape}")
  mse = np.asarray(jnp.mean((x - y) ** 2, axis=(1, 2, 3)), np.float64)
  return _psnr_from_mse(mse, data_range)


def _psnr_from_mse(mse: np.ndarray, data_range: float) -> np.ndarray:
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(float(data_range) ** 2 / mse)


@functools.partial(jax.jit, static_argnames=("data_range",))
def _pairs(a, b, gh, gw, data_range):
  """SSIM [B, R] and MSE [B, R] of every image of a [B,H,W,C] against every one of b
  (any real or integer dtype; computed in float32)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  off = 0.5 * data_range
  ac, bc = a - off, b - off
  mu_a, mu_b = _local(ac, gh, gw), _local(bc, gh, gw)
  s_aa = _local(ac * ac, gh, gw) - mu_a * mu_a
  s_bb = _local(bc * bc, gh, gw) - mu_b * mu_b
  e_ab = _local(ac[:, None] * bc[None], gh, gw)
  ma, mb = mu_a[:, None], mu_b[None]
  s_ab = e_ab - ma * mb
  ssim_ab = _ssim_terms(ma + off, mb + off, s_aa[:, None], s_bb[None], s_ab, data_range)
  mse = jnp.mean((a[:, None] - b[None]) ** 2, axis=(-3, -2, -1))
  return ssim_ab, mse


REDUCTIONS = ("mean", "max")
ALL_CLASSES = -1  # SSIMReferences.groups key of the references of all classes


@dataclasses.dataclass(frozen=True)
class SSIMReferences:
  """Real reference images for SSIM/PSNR, chosen once by `choose_ssim_references`, so that
  images can be scored in any order and in any pieces (streamed batches, one process's slice
  of a pool) with the same references.

  groups: class index -> uint8 [R_c, H, W, C] references of that class (same_class=True), or
    {ALL_CLASSES: references of all classes}. A class without references has no entry; its
    images get NaN.
  same_class, reduce, data_range, max_elements: see `ssim_psnr_against_references`.
  """
  groups: dict
  same_class: bool = True
  reduce: str = "mean"
  data_range: float = 255.0
  max_elements: int = 1 << 24

  @property
  def image_shape(self) -> tuple[int, ...] | None:
    """(H, W, C) of the references (None without any)."""
    for g in self.groups.values():
      return tuple(g.shape[1:])
    return None


def _nhwc_host(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"{name} must be [N, H, W] or [N, H, W, C] images, got shape {x.shape}")
  return x


def choose_ssim_references(classes, ref_images, ref_labels, *, same_class: bool = True,
                           max_refs: int | None = 64, reduce: str = "mean", seed: int = 0,
                           data_range: float = 255.0, max_elements: int = 1 << 24
                           ) -> SSIMReferences:
  """The references each image will be compared with (see `ssim_psnr_against_references`).

  classes: the class indices that will be scored (e.g. the labels of the whole pool; only
  their unique values matter). With same_class=True, for each of them in ascending order,
  the references of that class, or a seeded random subset of `max_refs` of them
  (np.random.default_rng(seed); a class with no more than max_refs references draws
  nothing); with same_class=False one subset of all references. ref_images [R, H, W(, C)]
  (copied, as uint8 when they are uint8) with ref_labels [R].
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"reduce={reduce!r} is not one of {REDUCTIONS}")
  r = _nhwc_host(ref_images, "ref_images")
  ry = np.asarray(ref_labels)
  if ry.shape != (r.shape[0],):
    raise ValueError(f"ref_labels {ry.shape} must match the {r.shape[0]} reference images")
  rng = np.random.default_rng(seed)
  if same_class:
    wanted = [(int(c), np.flatnonzero(ry == c)) for c in np.unique(np.asarray(classes))]
  else:
    wanted = [(ALL_CLASSES, np.arange(r.shape[0]))]
  groups = {}
  for c, ref_idx in wanted:
    if ref_idx.size == 0:
      logging.getLogger(__name__).warning(
          "SSIM/PSNR: no reference images for class %s; its images get NaN", c)
      continue
    if max_refs is not None and ref_idx.size > max_refs:
      ref_idx = np.sort(rng.choice(ref_idx, size=max_refs, replace=False))
    groups[c] = np.array(r[ref_idx])
  return SSIMReferences(groups=groups, same_class=same_class, reduce=reduce,
                        data_range=float(data_range), max_elements=int(max_elements))


def _bucket(n: int, cap: int) -> int:
  """The padded size of a piece of n images: the next power of two, at most cap (so that
  pieces of any size compile a handful of shapes)."""
  return min(cap, 1 << max(0, int(n - 1).bit_length()))


def ssim_psnr_with_references(images, labels, refs: SSIMReferences
                              ) -> tuple[np.ndarray, np.ndarray]:
  """SSIM and PSNR of each image against `refs` (from `choose_ssim_references`):
  ([N], [N]) float64, reduced over the references by refs.reduce. An image's values depend
  only on the image and its class's references, never on the other images passed with it,
  so a pool can be scored in batches. Images of a class without references get NaN."""
  x = _nhwc_host(images, "images")
  y = np.asarray(labels)
  if y.shape != (x.shape[0],):
    raise ValueError(f"labels {y.shape} must match the {x.shape[0]} images")
  shape = refs.image_shape
  if shape is not None and tuple(x.shape[1:]) != shape:
    raise ValueError(f"images {x.shape} and the references {shape} must be [N, H, W(, C)] of "
                     "one H, W, C; resize the references to the synthetic image size first")
  out_ssim = np.full(x.shape[0], np.nan)
  out_psnr = np.full(x.shape[0], np.nan)
  if shape is None or x.shape[0] == 0:
    return out_ssim, out_psnr
  size = window_size(x.shape[1], x.shape[2])
  gh = jnp.asarray(_filter_matrix(x.shape[1], size, SSIM_SIGMA))
  gw = jnp.asarray(_filter_matrix(x.shape[2], size, SSIM_SIGMA))
  if refs.same_class:
    groups = [(c, np.flatnonzero(y == c)) for c in np.unique(y)]
  else:
    groups = [(ALL_CLASSES, np.arange(x.shape[0]))]
  per_pair = int(np.prod(x.shape[1:]))
  for c, idx in groups:
    ref = refs.groups.get(int(c))
    if ref is None:
      continue
    ref_dev = jnp.asarray(ref)
    cap = max(1, refs.max_elements // (per_pair * ref.shape[0]))
    for start in range(0, idx.size, cap):
      sel = idx[start:start + cap]
      batch = x[sel]
      pad = _bucket(sel.size, cap) - sel.size
      if pad:
        batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
      s, mse = _pairs(jnp.asarray(batch), ref_dev, gh, gw, refs.data_range)
      s = np.asarray(s, np.float64)[:sel.size]
      p = _psnr_from_mse(np.asarray(mse, np.float64)[:sel.size], refs.data_range)
      if refs.reduce == "mean":
        out_ssim[sel], out_psnr[sel] = s.mean(axis=1), p.mean(axis=1)
      else:
        out_ssim[sel], out_psnr[sel] = s.max(axis=1), p.max(axis=1)
  return out_ssim, out_psnr


def ssim_psnr_against_references(images, labels, ref_images, ref_labels, *,
                                 same_class: bool = True, max_refs: int | None = 64,
                                 reduce: str = "mean", seed: int = 0,
                                 data_range: float = 255.0,
                                 max_elements: int = 1 << 24
                                 ) -> tuple[np.ndarray, np.ndarray]:
  """SSIM and PSNR of each image against real reference images: ([N], [N]) float64.

  images [N, H, W(, C)] with labels [N]; ref_images of the same H, W, C with ref_labels.
  same_class=True compares an image with the references of its own class, False with
  references of all classes. At most `max_refs` references per class (or in all) are used,
  a seeded random subset (None: all). reduce="mean" (default) averages SSIM and PSNR (dB)
  over the references, "max" takes the best match (highest SSIM, highest PSNR; a copy of a
  reference then scores SSIM 1 and PSNR +inf). Images of a class without references get NaN
  and a warning. Work is chunked so that one chunk holds about `max_elements` floats.

  The same as `choose_ssim_references(labels, ...)` then `ssim_psnr_with_references`; use
  those two to score images in pieces (streaming) with one choice of references.
  """
  x = _nhwc_host(images, "images")
  r = _nhwc_host(ref_images, "ref_images")
  if r.shape[1:] != x.shape[1:]:
    raise ValueError(f"images {x.shape} and ref_images {r.shape} must be [N, H, W(, C)] of "
                     "one H, W, C; resize the references to the synthetic image size first")
  y, ry = np.asarray(labels), np.asarray(ref_labels)
  if y.shape != (x.shape[0],) or ry.shape != (r.shape[0],):
    raise ValueError(f"labels {y.shape} / ref_labels {ry.shape} must match the image counts "
                     f"{x.shape[0]} / {r.shape[0]}")
  refs = choose_ssim_references(y, r, ry, same_class=same_class, max_refs=max_refs,
                                reduce=reduce, seed=seed, data_range=data_range,
                                max_elements=max_elements)
  return ssim_psnr_with_references(x, y, refs)


# --------------------------------------------------------------------------- Inception Score


def _check_probs(probs) -> np.ndarray:
  p = np.asarray(probs, np.float64)
  if p.ndim != 2 or p.shape[0] == 0:
    raise ValueError(f"probs must be a non-empty [N, K] array of class probabilities, got "
                     f"shape {p.shape}")
  if np.any(p < 0) or not np.all(np.isfinite(p)):
    raise ValueError("probs must be finite and non-negative (softmax outputs)")
  sums = p.sum(axis=1)
  bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-3)
  if bad.size:
    raise ValueError(f"probs rows must sum to 1 (softmax of the logits); rows {bad[:5].tolist()}"
                     f" sum to {sums[bad[:5]].tolist()}")
  return p


def _kl_to_marginal(p: np.ndarray) -> np.ndarray:
  py = p.mean(axis=0, keepdims=True)
  return np.sum(special.xlogy(p, p) - special.xlogy(p, py), axis=1)


def inception_score_per_image(probs) -> np.ndarray:
  """Per-image Inception Score contribution: KL(p(y|x) || p(y)) in nats, [N].

  probs [N, K]: p(y|x) per image (softmax over the classifier's classes, e.g. the 1008
  logits of the FID Inception). p(y) is the marginal over the whole pool given, the mean of
  the rows. Terms with p(y|x) = 0 count 0. The dataset-level IS (one split) is
  exp(mean of these values); a higher value = a confident prediction of a class that is
  not over-represented in the pool.
  """
  return _kl_to_marginal(_check_probs(probs))


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016): the rows are cut into `splits` consecutive
  parts (part i = rows [i*N//splits, (i+1)*N//splits)); per part exp(mean KL(p(y|x) ||
  p(y))) with that part's marginal p(y). Returns (mean, std) over the parts."""
  p = _check_probs(probs)
  n = p.shape[0]
  if not 1 <= splits <= n:
    raise ValueError(f"inception_score splits must be in [1, {n}], got {splits}")
  scores = [np.exp(_kl_to_marginal(p[i * n // splits:(i + 1) * n // splits]).mean())
            for i in range(splits)]
  return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------- k-NN metrics


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances [len(a), len(b)], float64, clipped at 0."""
  d = (np.einsum("nd,nd->n", a, a)[:, None] + np.einsum("md,md->m", b, b)[None, :]
       - 2.0 * a @ b.T)
  return np.maximum(d, 0.0)


def _rows(n: int, batch: int):
  for s in range(0, n, batch):
    yield s, min(s + batch, n)


def knn_radii(features, k: int, batch_size: int = 2048) -> np.ndarray:
  """Distance of each row to its k-th nearest other row (Euclidean), [N] float64."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {x.shape}")
  if not 1 <= k < x.shape[0]:
    raise ValueError(f"k={k} needs at least k+1 = {k + 1} feature rows, got {x.shape[0]}")
  out = np.empty(x.shape[0])
  for s, e in _rows(x.shape[0], batch_size):
    d = _sq_dists(x[s:e], x)
    d[np.arange(e - s), np.arange(s, e)] = -1.0  # self always sorts first
    out[s:e] = np.sqrt(np.maximum(np.partition(d, k, axis=1)[:, k], 0.0))
  return out


def realism_score(real_feats, fake_feats, k: int = 3, *, prune_percentile: float | None = 50.0,
                  eps: float = 1e-5, batch_size: int = 2048) -> np.ndarray:
  """Realism score of each fake image (Kynkaanniemi et al. 2019, Sec. 4), [M] float64.

    R(f) = max over real r of  radius_k(r) / (||f - r|| + eps),

  radius_k(r) = distance from r to its k-th nearest other real feature. As in the paper
  ("we discard half of the hyperspheres with the largest radii") and the authors' code
  (clamp_to_percentile=50), real samples whose radius exceeds the `prune_percentile`
  percentile of the radii (numpy's linear interpolation) are left out; None keeps all.
  R >= 1 iff f lies in the (kept) real manifold. The authors' code uses squared distances
  in the ratio, i.e. returns R^2 (same ranking, same threshold 1); this returns the paper's
  unsquared ratio. Higher = more realistic.
  """
  real = np.asarray(real_feats, np.float64)
  fake = np.asarray(fake_feats, np.float64)
  _check_pair(real, fake)
  radii = knn_radii(real, k, batch_size)
  if prune_percentile is not None:
    radii = np.where(radii > np.percentile(radii, prune_percentile), 0.0, radii)
  out = np.empty(fake.shape[0])
  for s, e in _rows(fake.shape[0], batch_size):
    d = np.sqrt(_sq_dists(fake[s:e], real))
    out[s:e] = np.max(radii[None, :] / (d + eps), axis=1)
  return out


def _check_pair(real: np.ndarray, fake: np.ndarray):
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"real and fake features must be [N, D] and [M, D] of one D, got "
                     f"{real.shape} and {fake.shape}")


@dataclasses.dataclass(frozen=True)
class PRDC:
  """Precision / recall / density / coverage (Naeem et al. 2020) and per-fake memberships.

  in_real_manifold [M] bool: the fake lies inside some real k-NN ball (its precision vote).
  density_contribution [M] float: (number of real k-NN balls holding the fake) / k; their
    mean is `density`.
  real_in_fake_manifold [N] bool (recall votes), real_covered [N] bool (coverage votes).
  """
  precision: float
  recall: float
  density: float
  coverage: float
  in_real_manifold: np.ndarray
  density_contribution: np.ndarray
  real_in_fake_manifold: np.ndarray
  real_covered: np.ndarray


def prdc_memberships(real, fake, k: int = 5, *, batch_size: int = 2048) -> PRDC:
  """PRDC of Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics for Generative
  Models"), with per-image memberships. r_i = k-NN radius of real i among the reals, s_j of
  fake j among the fakes (Euclidean, self excluded); balls are open (distance < radius), as
  in the authors' `prdc` package:

    precision = mean_j [exists i: ||f_j - x_i|| < r_i]
    recall    = mean_i [exists j: ||x_i - f_j|| < s_j]
    density   = 1 / (k M) sum_j sum_i [||f_j - x_i|| < r_i]
    coverage  = mean_i [min_j ||x_i - f_j|| < r_i]
  """
  x = np.asarray(real, np.float64)
  f = np.asarray(fake, np.float64)
  _check_pair(x, f)
  r = knn_radii(x, k, batch_size)
  s = knn_radii(f, k, batch_size)
  counts = np.zeros(f.shape[0])
  real_min = np.full(x.shape[0], np.inf)
  recall = np.zeros(x.shape[0], bool)
  for a, b in _rows(f.shape[0], batch_size):
    d = np.sqrt(_sq_dists(f[a:b], x))  # [m, N]
    counts[a:b] = np.sum(d < r[None, :], axis=1)
    real_min = np.minimum(real_min, d.min(axis=0))
    recall |= np.any(d < s[a:b, None], axis=0)
  covered = real_min < r
  return PRDC(precision=float(np.mean(counts > 0)), recall=float(np.mean(recall)),
              density=float(counts.sum() / (k * f.shape[0])),
              coverage=float(np.mean(covered)), in_real_manifold=counts > 0,
              density_contribution=counts / k, real_in_fake_manifold=recall,
              real_covered=covered)
