"""synthbandit_jax.models.resample: sparse taps equal the dense resampling matmul."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthbandit_jax.models import inception, resample, vgg


@pytest.mark.parametrize("make", [
    lambda: inception._resize_matrix(512, 299, "tf"),
    lambda: inception._resize_matrix(28, 299, "torch"),
    lambda: vgg._resize_matrix(512, 224, True),
    lambda: vgg._resize_matrix(300, 224, False),
    lambda: vgg._adaptive_pool_matrix(3, 7),
    lambda: np.random.default_rng(0).random((5, 40)),  # dense rows: the matmul fallback
])
def test_apply_along_equals_the_matmul(make):
  m = make()
  rng = np.random.default_rng(1)
  x = rng.random((2, m.shape[1], 9, 3)).astype(np.float32) * 255
  want = np.einsum("oh,nhwc->nowc", m, x.astype(np.float64))
  got = jax.jit(lambda a: resample.apply_along(a, m, axis=1))(jnp.asarray(x))
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=2e-4)
  xt = np.swapaxes(x, 1, 2)
  got_w = resample.apply_along(jnp.asarray(xt), m, axis=2)
  np.testing.assert_allclose(np.asarray(got_w), np.swapaxes(want, 1, 2), rtol=2e-6, atol=2e-4)


def test_row_taps_and_errors():
  idx, w = resample.row_taps(np.array([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]]))
  np.testing.assert_array_equal(idx, [[1, 2], [0, 0]])
  np.testing.assert_allclose(w, [[0.25, 0.75], [1.0, 0.0]])
  with pytest.raises(ValueError, match="does not fit"):
    resample.apply_along(jnp.zeros((1, 4, 4, 3)), np.eye(3), axis=1)
