"""Tests for synthbandit_jax.xla_options (the project's per-program XLA compiler options)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from synthbandit_jax import parallel, xla_options
from synthbandit_jax.metrics import features
from synthbandit_jax.models import classifiers


def _conv_hlo(options):
  """Optimised HLO of one 3x3 NHWC convolution (SmallCNN's second layer at batch 8)
  compiled with `options` ("ours": through xla_options.jit). (At tiny shapes XLA keeps even
  its default off YNNPACK.)"""
  def f(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = jnp.ones((8, 14, 14, 32), jnp.float32)
  w = jnp.ones((3, 3, 32, 64), jnp.float32)
  fn = jax.jit(f, compiler_options=options) if options != "ours" else xla_options.jit(f)
  return fn.lower(x, w).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-only options")
def test_cpu_options_keep_convolutions_out_of_ynnpack(monkeypatch):
  monkeypatch.delenv(xla_options.DEFAULTS_ENV, raising=False)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  options = xla_options.compiler_options()
  assert options == xla_options.CPU_OPTIONS  # accepted by this jaxlib
  # XLA's default sends the convolution to YNNPACK; ours keeps it as an XLA convolution.
  # (If a jaxlib changes its default, the first assert says so: re-measure the options.)
  assert "__ynn_fusion" in _conv_hlo(None)
  ours = _conv_hlo(options)
  assert "__ynn_fusion" not in ours and "convolution(" in ours
  via_jit = _conv_hlo("ours")  # xla_options.jit passes them
  assert "__ynn_fusion" not in via_jit and "convolution(" in via_jit


def test_options_off_by_env_and_off_cpu(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv(xla_options.DEFAULTS_ENV, "1")
  assert xla_options.compiler_options("cpu") is None
  monkeypatch.setenv(xla_options.DEFAULTS_ENV, "0")
  assert xla_options.compiler_options("gpu") is None
  assert xla_options.compiler_options("tpu") is None
  # The user's own XLA_FLAGS for the same option win over ours.
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
  assert xla_options.compiler_options("cpu") is None


def test_jit_passes_options_and_computes_the_same():
  model = classifiers.build_classifier("small_cnn", 3)
  variables = classifiers.init_variables(model, jax.random.key(0), (2, 12, 12, 1))
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12, 12, 1), np.uint8))
  loss = lambda p: model.apply({"params": p}, x).sum()
  ours = xla_options.jit(jax.grad(loss))(variables["params"])
  plain = jax.jit(jax.grad(loss))(variables["params"])
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    a, b = np.asarray(a), np.asarray(b)
    # Float32 sums in another order: within 1e-5 of each leaf's largest gradient.
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), np.abs(a - b).max()


class _ConvPoolStack(nn.Module):
  """VGG16's pattern in small: 3x3 conv - ReLU - 3x3 conv - ReLU - 2x2 max pool."""

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32) / 255.0
    for f in (8, 8):
      x = nn.relu(nn.Conv(f, (3, 3), padding=((1, 1), (1, 1)))(x))
    return {"pool": nn.max_pool(x, (2, 2), strides=(2, 2)).mean(axis=(1, 2))}


def _ynn_fusions(hlo: str) -> int:
  return sum("__ynn_fusion" in line and "fusion(" in line for line in hlo.splitlines())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-only options")
def test_feature_options_keep_a_conv_pool_stack_out_of_ynnpack(monkeypatch):
  monkeypatch.delenv(xla_options.DEFAULTS_ENV, raising=False)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  model = _ConvPoolStack()
  x = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  params = model.init(jax.random.key(0), x)
  hlo = lambda options: jax.jit(model.apply, compiler_options=options).lower(
      params, x).compile().as_text()
  # With REDUCE (XLA's default and the training options) YNNPACK takes the stack, convs and
  # all, into one fusion rooted at the pool; the feature options leave it to XLA. (If a
  # jaxlib stops doing this, the first assert says so: re-measure the options.)
  assert _ynn_fusions(hlo(xla_options.CPU_OPTIONS)) == 1
  assert xla_options.compiler_options(
      cpu_options=xla_options.FEATURE_CPU_OPTIONS) == xla_options.FEATURE_CPU_OPTIONS
  assert _ynn_fusions(hlo(xla_options.FEATURE_CPU_OPTIONS)) == 0
  # The FeatureExtractor compiles with them.
  ex = features.FeatureExtractor(model.apply, params, batch_size=2,
                                 mesh=parallel.make_mesh(num_devices=1))
  compiled = ex._jitted.lower(ex.params, jax.device_put(x, ex._batch_sharding)).compile()
  ours = compiled.as_text()
  assert _ynn_fusions(ours) == 0 and "convolution(" in ours
  np.testing.assert_allclose(np.asarray(ex(np.asarray(x))["pool"]),
                             np.asarray(jax.jit(model.apply)(params, x)["pool"]), atol=1e-6)
