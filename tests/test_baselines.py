"""Tests for synthbandit_jax.metrics.baselines against independent numpy/scipy references."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats

from synthbandit_jax.metrics import baselines as b


def _ssim_numpy(x, y, L=255.0):
  """Wang et al. 2004 in float64 with scipy.ndimage.gaussian_filter.

  truncate=3.5 gives radius int(3.5 * 1.5 + 0.5) = 5, i.e. exactly the 11-tap window; the
  default truncate=4.0 would use 13 taps and differ by ~1e-3. Filtering pads the border
  (mode 'reflect'), so the 5-pixel rim is cropped to keep only valid windows.
  """
  x, y = x.astype(np.float64), y.astype(np.float64)
  f = lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5)
  mx, my = f(x), f(y)
  sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
  c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
  m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  return m[5:-5, 5:-5].mean()


def _images(rng, n, h, w, c=None):
  shape = (n, h, w) if c is None else (n, h, w, c)
  return rng.integers(0, 256, size=shape).astype(np.uint8)


def test_ssim_identity_is_one():
  rng = np.random.default_rng(0)
  for c in (None, 3):
    x = _images(rng, 3, 20, 24, c)
    np.testing.assert_allclose(b.ssim(x, x), 1.0, atol=1e-6)


def test_ssim_matches_numpy_gaussian_filter():
  rng = np.random.default_rng(1)
  base = _images(rng, 4, 23, 19).astype(np.float64)
  noisy = np.clip(base + rng.normal(scale=30.0, size=base.shape), 0, 255)
  smooth = ndimage.uniform_filter(base, size=(1, 3, 3))
  for other in (noisy, smooth):
    got = b.ssim(base, other)
    want = [_ssim_numpy(p, q) for p, q in zip(base, other)]
    # float32 JAX vs float64 numpy, identical window: agreement to ~1e-5.
    np.testing.assert_allclose(got, want, atol=2e-5)
  # colour: mean of the per-channel values
  rgb_a, rgb_b = _images(rng, 2, 16, 16, 3), _images(rng, 2, 16, 16, 3)
  want = [np.mean([_ssim_numpy(p[..., ch], q[..., ch]) for ch in range(3)])
          for p, q in zip(rgb_a, rgb_b)]
  np.testing.assert_allclose(b.ssim(rgb_a, rgb_b), want, atol=2e-5)


def test_ssim_constant_images_closed_form():
  # No variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1) * C2 / C2, C1 = 2.55^2 = 6.5025
  a, c = np.full((1, 16, 16), 100.0), np.full((1, 16, 16), 150.0)
  want = (2 * 100 * 150 + 6.5025) / (100 ** 2 + 150 ** 2 + 6.5025)  # 0.923092...
  np.testing.assert_allclose(b.ssim(a, c), [want], rtol=1e-6)


def test_ssim_small_images_use_smaller_window():
  assert b.window_size(8, 8) == 7 and b.window_size(28, 28) == 11 and b.window_size(10, 30) == 9
  rng = np.random.default_rng(2)
  x, y = _images(rng, 2, 8, 8), _images(rng, 2, 8, 8)
  out = b.ssim(x, y)
  assert np.all(np.isfinite(out)) and np.all(out < 1)
  np.testing.assert_allclose(b.ssim(x, x), 1.0, atol=1e-6)


def test_psnr_constant_offset_closed_form():
  rng = np.random.default_rng(3)
  x = rng.uniform(0, 200, size=(2, 9, 9, 3))
  # MSE = 10^2 = 100 -> 10 log10(255^2 / 100) = 28.130803608679106 dB
  np.testing.assert_allclose(b.psnr(x, x + 10.0), 10 * np.log10(255.0 ** 2 / 100), rtol=1e-6)
  np.testing.assert_allclose(b.psnr(x, x + 10.0), 28.130803608679106, rtol=1e-6)
  assert np.all(np.isinf(b.psnr(x, x)))


def test_against_references_matches_pairwise_loop():
  rng = np.random.default_rng(4)
  imgs, labels = _images(rng, 7, 14, 14, 3), np.array([0, 1, 0, 1, 2, 0, 1])
  refs, ref_labels = _images(rng, 6, 14, 14, 3), np.array([0, 0, 1, 1, 1, 0])

  def loop(same_class, red):
    s_out, p_out = [], []
    for img, c in zip(imgs, labels):
      pool = refs[ref_labels == c] if same_class else refs
      if len(pool) == 0:
        s_out.append(np.nan)
        p_out.append(np.nan)
        continue
      rep = np.repeat(img[None], len(pool), axis=0)
      s_out.append(red(b.ssim(rep, pool)))
      p_out.append(red(b.psnr(rep, pool)))
    return np.array(s_out), np.array(p_out)

  for same, red, name in ((True, np.mean, "mean"), (True, np.max, "max"),
                          (False, np.mean, "mean")):
    s, p = b.ssim_psnr_against_references(imgs, labels, refs, ref_labels, same_class=same,
                                          max_refs=None, reduce=name, max_elements=3000)
    ws, wp = loop(same, red)
    np.testing.assert_allclose(s, ws, atol=1e-5)
    np.testing.assert_allclose(p, wp, rtol=1e-5)
  s, _ = b.ssim_psnr_against_references(imgs, labels, refs, ref_labels, max_refs=None)
  assert np.isnan(s[4]) and np.all(np.isfinite(np.delete(s, 4)))
  # a copy of a reference: max-SSIM 1, max-PSNR inf
  s, p = b.ssim_psnr_against_references(refs[:1], ref_labels[:1], refs, ref_labels,
                                        reduce="max")
  assert s[0] == pytest.approx(1.0, abs=1e-6) and np.isinf(p[0])


def test_max_refs_subsamples():
  rng = np.random.default_rng(5)
  imgs, refs = _images(rng, 2, 12, 12), _images(rng, 30, 12, 12)
  lab, rlab = np.zeros(2, int), np.zeros(30, int)
  a = b.ssim_psnr_against_references(imgs, lab, refs, rlab, max_refs=5, seed=1)
  c = b.ssim_psnr_against_references(imgs, lab, refs, rlab, max_refs=5, seed=1)
  full = b.ssim_psnr_against_references(imgs, lab, refs, rlab, max_refs=None)
  np.testing.assert_array_equal(a[0], c[0])
  assert not np.allclose(a[1], full[1])


def test_references_chosen_once_score_any_pieces_alike():
  """choose_ssim_references + ssim_psnr_with_references on shuffled pieces of any size equal
  ssim_psnr_against_references on the whole set (what the streaming stage relies on)."""
  rng = np.random.default_rng(6)
  imgs, labels = _images(rng, 23, 12, 12, 3), rng.integers(0, 3, 23)
  refs, ref_labels = _images(rng, 40, 12, 12, 3), rng.integers(0, 3, 40)
  for same in (True, False):
    whole = b.ssim_psnr_against_references(imgs, labels, refs, ref_labels, same_class=same,
                                           max_refs=6, seed=2, max_elements=5000)
    chosen = b.choose_ssim_references(labels, refs, ref_labels, same_class=same, max_refs=6,
                                      seed=2, max_elements=5000)
    s, p = np.full(23, np.nan), np.full(23, np.nan)
    order = rng.permutation(23)
    for piece in np.split(order, [1, 4, 11, 12]):
      s[piece], p[piece] = b.ssim_psnr_with_references(imgs[piece], labels[piece], chosen)
    np.testing.assert_allclose(s, whole[0], rtol=1e-6)
    np.testing.assert_allclose(p, whole[1], rtol=1e-6)
  with pytest.raises(ValueError, match="references"):
    b.ssim_psnr_with_references(imgs[:, :8], labels, chosen)


def test_inception_score_against_scipy_entropy():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(40, 6)) * 2
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  py = p.mean(0)
  np.testing.assert_allclose(b.inception_score_per_image(p),
                             [stats.entropy(row, py) for row in p], rtol=1e-10)
  mean, std = b.inception_score(p, splits=4)
  parts = [np.exp(np.mean([stats.entropy(r, q.mean(0)) for r in q]))
           for q in np.split(p, 4)]
  assert mean == pytest.approx(np.mean(parts), rel=1e-10)
  assert std == pytest.approx(np.std(parts), rel=1e-8)
  # confident and balanced over K classes: IS = K exactly; one class only: IS = 1
  onehot = np.eye(5)[np.arange(20) % 5]
  assert b.inception_score(onehot, splits=1)[0] == pytest.approx(5.0)
  assert b.inception_score(np.eye(5)[np.zeros(10, int)], splits=2)[0] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="sum to 1"):
    b.inception_score_per_image(np.ones((2, 3)))


# Hand example (k = 1). Real points and their 1-NN radii:
#   R0 (0,0) 1, R1 (1,0) 1, R2 (0,1) 1, R3 (10,10) 2, R4 (10,12) 2, R5 (-10,0) 1.5,
#   R6 (-10,-1.5) 1.5.
# Fakes: F0 (.5,.5) is within .7071 of R0, R1, R2 -> 3 balls; F1 (10,11) within 1 of R3, R4 -> 2;
#   F2 (5,5) in none; F3 (1.5,0) within .5 of R1 only (1.5 from R0, 1.80 from R2) -> 1.
# precision 3/4, density 6 / (1 * 4) = 1.5.
# coverage: nearest fake of R0..R4 is inside their radius (.707, .5, .707, 1, 1); R5, R6 are
#   ~10 away from every fake -> 5/7.
# recall: fake 1-NN radii F0 1.118 (F3), F1 7.81 (F2), F2 6.10 (F3), F3 1.118 (F0);
#   R0..R2 lie .707 from F0 (< 1.118), R3, R4 lie 1 from F1 (< 7.81); R5, R6 are > 15 from
#   F1/F2 and > 10 from F0/F3 -> 5/7.
REAL = np.array([[0, 0], [1, 0], [0, 1], [10, 10], [10, 12], [-10, 0], [-10, -1.5]], float)
FAKE = np.array([[0.5, 0.5], [10, 11], [5, 5], [1.5, 0]], float)


def test_prdc_hand_example():
  np.testing.assert_allclose(b.knn_radii(REAL, 1), [1, 1, 1, 2, 2, 1.5, 1.5])
  res = b.prdc_memberships(REAL, FAKE, k=1)
  assert res.in_real_manifold.tolist() == [True, True, False, True]
  np.testing.assert_allclose(res.density_contribution, [3, 2, 0, 1])
  assert res.precision == pytest.approx(0.75) and res.density == pytest.approx(1.5)
  assert res.coverage == pytest.approx(5 / 7) and res.recall == pytest.approx(5 / 7)
  assert res.real_covered.tolist() == [True] * 5 + [False] * 2


def test_prdc_random_matches_brute_force():
  rng = np.random.default_rng(7)
  real, fake, k = rng.normal(size=(30, 3)), rng.normal(size=(25, 3)) + 0.4, 3
  dist = lambda u, v: float(np.sqrt(np.sum((u - v) ** 2)))
  r = [sorted(dist(p, q) for j, q in enumerate(real) if j != i)[k - 1]
       for i, p in enumerate(real)]
  s = [sorted(dist(p, q) for j, q in enumerate(fake) if j != i)[k - 1]
       for i, p in enumerate(fake)]
  cnt = [sum(dist(f, x) < r[i] for i, x in enumerate(real)) for f in fake]
  rec = [any(dist(x, f) < s[j] for j, f in enumerate(fake)) for x in real]
  cov = [min(dist(x, f) for f in fake) < r[i] for i, x in enumerate(real)]
  res = b.prdc_memberships(real, fake, k=k, batch_size=7)
  np.testing.assert_allclose(res.density_contribution, np.array(cnt) / k)
  assert res.precision == pytest.approx(np.mean(np.array(cnt) > 0))
  assert res.recall == pytest.approx(np.mean(rec))
  assert res.coverage == pytest.approx(np.mean(cov))
  assert res.density == pytest.approx(sum(cnt) / (k * len(fake)))


def test_realism_score_hand_example():
  # Without pruning: F0 -> 1 / .70711 = 1.41421 (R0-R2); F1 -> 2 / 1 = 2 (R3, R4).
  out = b.realism_score(REAL, FAKE, k=1, prune_percentile=None, eps=0.0)
  np.testing.assert_allclose(out[:2], [np.sqrt(2), 2.0], rtol=1e-12)
  # With the paper's pruning: median radius 1.5, so R3 and R4 (radius 2) are dropped and
  # F1's best ratio is R2's 1 / sqrt(10^2 + 10^2) = 0.0707107; F0 keeps 1.41421.
  out = b.realism_score(REAL, FAKE, k=1, eps=0.0)
  np.testing.assert_allclose(out[:2], [np.sqrt(2), 1 / np.sqrt(200)], rtol=1e-12)
  assert out[0] >= 1 > out[1]
  # default eps = 1e-5 is added to the distance
  np.testing.assert_allclose(b.realism_score(REAL, FAKE[:1], k=1)[0],
                             1 / (np.sqrt(0.5) + 1e-5), rtol=1e-12)
