"""Tests for models/winograd.py: Winograd F(2x2, 3x3) / F(4x4, 3x3) convolutions.

The reference is a direct convolution in float64 numpy (nine shifted matmuls), independent
of both the Winograd transforms and XLA's convolution. Tolerances (max |ours - ref| /
max |ref|, float32 inputs): F(2x2) <= 2e-6 (measured up to 6.9e-7, as XLA's own direct
convolution), F(4x4) <= 5e-5 (measured up to 1.2e-5 at 256 input channels: its points 2 and
-2 amplify rounding). The transform matrices themselves are checked in float64 on the 1-D
identity, to 1e-12.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

from synthbandit_jax.models import vgg
from synthbandit_jax.models import winograd as W

TOL = {2: 2e-6, 4: 5e-5}


def _direct_f64(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """3x3, stride 1, zero padding 1, NHWC / HWIO, in float64."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  _, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(xp[:, i:i + h, j:j + wd] @ w[i, j] for i in range(3) for j in range(3))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("m", W.TILE_SIZES)
def test_matrices_give_the_1d_correlation_exactly(m):
  """A^T [(G g) * (B^T d)] = (d correlated with g) for m outputs, in float64."""
  bt, g_mat, at = W.MATRICES[m]
  assert bt.shape == (m + 2, m + 2) and g_mat.shape == (m + 2, 3) and at.shape == (m, m + 2)
  rng = np.random.default_rng(m)
  for _ in range(20):
    d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
    want = np.array([d[i:i + 3] @ g for i in range(m)])
    np.testing.assert_allclose(at @ ((g_mat @ g) * (bt @ d)), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", W.TILE_SIZES)
def test_transform_kernel_is_g_g_gt(m):
  rng = np.random.default_rng(1)
  k = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
  g = W.MATRICES[m][1]
  want = np.einsum("pk,klio,ql->pqio", g, k.astype(np.float64), g).reshape((m + 2) ** 2, 5, 7)
  got = W.transform_kernel(k, m)
  assert got.shape == ((m + 2) ** 2, 5, 7) and got.dtype == jnp.float32
  assert _rel(got, want) < 1e-6


@pytest.mark.parametrize("m", W.TILE_SIZES)
@pytest.mark.parametrize("shape,cout", [
    ((2, 7, 9, 5), 6),      # sizes not multiples of the tile: padded and cropped
    ((1, 1, 1, 3), 2),      # a single pixel
    ((2, 16, 12, 8), 4),    # exact tiles, non-square
    ((1, 13, 13, 64), 32),
    ((1, 28, 28, 256), 64),  # VGG16-like channel counts
])
def test_conv3x3_matches_a_float64_direct_convolution(m, shape, cout):
  rng = np.random.default_rng(shape[1] * 100 + cout)
  x = rng.standard_normal(shape).astype(np.float32)
  w = (rng.standard_normal((3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1])).astype(np.float32)
  ref = _direct_f64(x, w)
  got = jax.jit(W.conv3x3)(jnp.asarray(x), W.transform_kernel(w, m))
  assert got.shape == ref.shape and got.dtype == jnp.float32
  assert _rel(got, ref) < TOL[m]
  # and against XLA's convolution, which the layers replace
  xla = lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert _rel(got, xla) < TOL[m]


@pytest.mark.parametrize("padding", ["VALID", ((0, 1), (1, 0)), ((1, 0), (0, 0))])
def test_conv3x3_padding_matches_xla(padding):
  rng = np.random.default_rng(9)
  x = rng.standard_normal((2, 9, 7, 8)).astype(np.float32)
  w = (rng.standard_normal((3, 3, 8, 5)) / np.sqrt(72)).astype(np.float32)
  ref = lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), (1, 1), padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for m in W.TILE_SIZES:
    got = W.conv3x3(jnp.asarray(x), W.transform_kernel(w, m), padding=padding)
    assert got.shape == ref.shape
    assert _rel(got, ref) < TOL[m]


def test_conv3x3_errors():
  k = np.zeros((3, 3, 4, 2), np.float32)
  u = W.transform_kernel(k, 2)
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ValueError, match=r"tile size m=3"):
    W.transform_kernel(k, 3)
  with pytest.raises(ValueError, match=r"3x3 HWIO kernel.*\(5, 5, 4, 2\)"):
    W.transform_kernel(np.zeros((5, 5, 4, 2), np.float32), 2)
  with pytest.raises(ValueError, match="NHWC input"):
    W.conv3x3(jnp.zeros((8, 8, 4)), u)
  with pytest.raises(ValueError, match="input has 3 channels, kernel expects 4"):
    W.conv3x3(jnp.zeros((1, 8, 8, 3)), u)
  with pytest.raises(ValueError, match=r"kernel rows 9 are not \(m\+2\)\^2"):
    W.conv3x3(x, jnp.zeros((9, 4, 2)))
  with pytest.raises(ValueError, match=r"padding='FULL'"):
    W.conv3x3(x, u, padding="FULL")
  with pytest.raises(ValueError, match=r"padding=\(\(2, 2\), \(1, 1\)\)"):
    W.conv3x3(x, u, padding=((2, 2), (1, 1)))
  with pytest.raises(ValueError, match="input 2x2 with padding 'VALID' leaves no output"):
    W.conv3x3(jnp.zeros((1, 2, 2, 4)), u, padding="VALID")
  with pytest.raises(ValueError, match="needs float32 input.*bfloat16"):
    W.conv3x3(x.astype(jnp.bfloat16), u)


def test_tile_size_rule_and_vgg_plans():
  assert W.tile_size(224, 224, 64) == 0 and W.tile_size(112, 112, 128) == 0
  assert W.tile_size(56, 56, 128) == 4 and W.tile_size(28, 28, 256) == 2
  assert W.tile_size(14, 14, 512) == 2 and W.tile_size(7, 7, 512) == 0
  assert W.tile_size(28, 28, 64) == 0         # too few input channels
  assert W.tile_size(71, 71, 80) == 0         # (the Inception's 4a: slower by F(4x4))
  assert W.tile_size(200, 56, 128) == 4       # the smaller side decides
  # At 224 px: block 3 (56 px) F(4x4), blocks 4 and 5 (28, 14 px) F(2x2), blocks 1-2 direct.
  assert vgg.winograd_plan() == {"features_10": 4, "features_12": 4, "features_14": 4,
                                 "features_17": 2, "features_19": 2, "features_21": 2,
                                 "features_24": 2, "features_26": 2, "features_28": 2}
  # At 112 px every map halves: block 2 at 56 px (its 64-channel input layer direct), block 5
  # at 7 px (direct).
  assert vgg.winograd_plan(112) == {"features_7": 4, "features_10": 2,
                                    "features_12": 2, "features_14": 2, "features_17": 2,
                                    "features_19": 2, "features_21": 2}
  with pytest.raises(KeyError, match="features_10.kernel"):
    vgg.winograd_kernels({}, {"features_10": 4})
