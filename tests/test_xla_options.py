"""Tests for synthbandit_jax.xla_options (the project's per-program XLA compiler options)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthbandit_jax import xla_options
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
