"""The strided-slice pools equal flax's reduce_window pools (nn.max_pool / nn.avg_pool)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthbandit_jax.models import pooling

# avg_pool sums in another order than reduce_window: float32 rounding of a 9-term mean.
AVG_ATOL = 1e-6

CASES = [
    ((3, 3), (2, 2), "VALID"),              # Inception's reductions
    ((3, 3), (1, 1), ((1, 1), (1, 1))),     # Inception's same-size pools
    ((2, 2), (2, 2), "VALID"),              # VGG / SmallCNN
    ((3, 3), (2, 2), ((1, 1), (1, 1))),     # ResNet stem
    ((3, 2), (1, 2), "SAME"),
    ((2, 3), (3, 1), ((0, 2), (1, 0))),
    ((5, 5), (1, 1), "VALID"),
]


def _x(shape=(2, 11, 10, 3), dtype=jnp.float32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@pytest.mark.parametrize("window,strides,padding", CASES)
def test_max_pool_equals_flax(window, strides, padding):
  x = _x()
  ours = jax.jit(lambda v: pooling.max_pool(v, window, strides, padding))(x)
  ref = nn.max_pool(x, window, strides=strides, padding=padding)
  assert ours.shape == ref.shape
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("window,strides,padding", CASES)
def test_avg_pool_equals_flax(window, strides, padding, count_include_pad):
  x = _x()
  ours = jax.jit(lambda v: pooling.avg_pool(v, window, strides, padding,
                                            count_include_pad=count_include_pad))(x)
  ref = nn.avg_pool(x, window, strides=strides, padding=padding,
                    count_include_pad=count_include_pad)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=AVG_ATOL)


def test_avg_pool_excluding_padding_by_hand():
  """The divisor map is independent of flax: a 3x3 same-size mean of ones is 1 everywhere,
  and of a ramp along W the corner value is the mean of the 4 entries inside the map."""
  ones = jnp.ones((1, 4, 5, 2))
  y = pooling.avg_pool(ones, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)
  np.testing.assert_allclose(np.asarray(y), 1.0, rtol=0, atol=1e-7)
  ramp = jnp.broadcast_to(jnp.arange(5, dtype=jnp.float32)[None, None, :, None], (1, 4, 5, 1))
  y = pooling.avg_pool(ramp, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)
  assert float(y[0, 0, 0, 0]) == pytest.approx(0.5)   # (0 + 1) over 2 rows
  assert float(y[0, 1, 2, 0]) == pytest.approx(2.0)   # interior: mean of 1, 2, 3
  y = pooling.avg_pool(ramp, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=True)
  assert float(y[0, 0, 0, 0]) == pytest.approx(2 * (0 + 1) / 9)


def test_max_pool_padding_is_minus_infinity_and_bf16():
  x = -jnp.ones((1, 3, 3, 1), jnp.bfloat16) * 5
  y = pooling.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), -5.0)
  xi = jnp.arange(12, dtype=jnp.int32).reshape(1, 3, 4, 1) - 20
  np.testing.assert_array_equal(
      np.asarray(pooling.max_pool(xi, (2, 2), (1, 1), "SAME")),
      np.asarray(nn.max_pool(xi, (2, 2), strides=(1, 1), padding="SAME")))


def test_bad_input_errors():
  with pytest.raises(ValueError, match="NHWC"):
    pooling.max_pool(jnp.ones((4, 4, 3)), (2, 2))
  with pytest.raises(ValueError, match="padding"):
    pooling.avg_pool(jnp.ones((1, 4, 4, 3)), (2, 2), padding=((1, 1),))
  with pytest.raises(ValueError, match="does not fit"):
    pooling.max_pool(jnp.ones((1, 2, 4, 3)), (3, 3))


def test_gradient_flows_like_flax_without_ties():
  """No ties in random data: the max-pool gradient is flax's (one 1 per window's argmax)."""
  x = _x((1, 7, 7, 2), seed=1)
  g = jax.grad(lambda v: pooling.max_pool(v, (3, 3), (2, 2)).sum())(x)
  g_ref = jax.grad(lambda v: nn.max_pool(v, (3, 3), strides=(2, 2)).sum())(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
