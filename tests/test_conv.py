"""The loop-friendly convolution equals lax.conv_general_dilated, values and gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from synthbandit_jax.models import conv

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("strides,padding,dilation,k", [
    ((1, 1), "SAME", (1, 1), 3),
    ((2, 2), "SAME", (1, 1), 3),
    ((2, 2), ((3, 3), (3, 3)), (1, 1), 7),
    ((1, 1), "VALID", (2, 2), 3),
    ((1, 2), ((1, 0), (0, 2)), (1, 1), 2),
    ((1, 1), ((2, 0), (0, 1)), (1, 1), 3),
    ((1, 1), ((0, 0), (1, 1)), (2, 1), 2),
    ((1, 1), ((0, 0), (0, 0)), (1, 1), 3),   # VALID 3x3: computed size-keeping, cropped
    ((1, 1), ((1, 0), (0, 0)), (1, 1), 3),
    ((1, 1), "VALID", (1, 1), 5),
])
def test_matches_lax(strides, padding, dilation, k):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 11, 9, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 5, 4)), jnp.float32)

  def ours(x, w):
    return conv.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                     dimension_numbers=DN)

  def ref(x, w):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=DN, precision=lax.Precision.HIGHEST)

  y, y_ref = ours(x, w), ref(x, w)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  gx, gw = jax.vjp(ours, x, w)[1](dy)
  rx, rw = jax.vjp(ref, x, w)[1](dy)
  scale = float(jnp.abs(rw).max())
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-4, atol=1e-5 * scale)


def test_custom_path_is_taken_on_cpu_and_jits_inside_scan():
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.normal(size=(4, 2, 6, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.float32)
  loss = lambda w, x: (conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=DN) ** 2).sum()
  ref = lambda w, x: (lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                               precision=lax.Precision.HIGHEST) ** 2).sum()
  scan_grad = jax.jit(lambda w: lax.scan(lambda c, x: (c + jax.grad(loss)(w, x), None),
                                         jnp.zeros_like(w), xs)[0])
  want = sum(jax.grad(ref)(w, xs[i]) for i in range(4))
  np.testing.assert_allclose(np.asarray(scan_grad(w)), np.asarray(want), rtol=1e-4, atol=1e-3)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(w, xs[0]))
  assert "custom_vjp" in jaxpr  # the patches-based kernel gradient is in use on CPU
  # Inside the scan both convolutions (the forward and the kernel gradient; the input
  # gradient is not needed) are in the canonical NHWC/HWIO form that XLA:CPU runs on its
  # fast path (it canonicalises only top-level convolutions itself).
  hlo = scan_grad.lower(w).compile().as_text()
  convs = [l for l in hlo.splitlines() if " convolution(" in l]
  assert len(convs) == 2, convs
  assert any("f32[3,3,3,2]" in l.split("convolution(")[0] for l in convs), convs  # [C,kh,kw,O]
  assert all("dim_labels=b01f_01io->b01f" in l for l in convs), convs
