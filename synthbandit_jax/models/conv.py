"""A convolution whose kernel gradient stays fast inside XLA:CPU loops.

XLA:CPU runs the kernel-gradient convolution of `lax.conv_general_dilated` up to ~50x slower
when it sits inside a while loop (`lax.scan`, our jitted epoch) than at the top level of a
jitted function (see jax-ml/jax#12868; measured here: 10.6 s vs 0.18 s for 32 batches of a
3x3, 32->64 channel conv at 14x14). The forward and input-gradient convolutions are not
affected.

`conv_general_dilated` below is a drop-in for `lax.conv_general_dilated` (pass it to
`flax.linen.Conv(conv_general_dilated=...)`): on CPU, for NHWC/HWIO convolutions without
groups or input dilation, it computes the same forward pass with `lax`, the input gradient
of stride-1 convolutions as a canonical convolution with the flipped kernel (lax's own
transpose rule otherwise),
and the kernel gradient of stride-1 float32 convolutions as one convolution written in the
canonical NHWC/HWIO form (`_kernel_grad_canonical`), otherwise as one matmul over shifted
(strided-slice) views of the input,

    dW[i, j, c, o] = sum_{n, h, w} x_pad[n, h*s + i*d, w*s + j*d, c] * dy[n, h, w, o];

XLA:CPU runs both at full speed inside loops. Elsewhere (GPU, TPU, other layouts) it is
`lax.conv_general_dilated` itself. Gradients agree with lax's to float rounding (tested).

Also on CPU, a stride-1 convolution whose padding shrinks the map ("VALID" 3x3) runs as the
size-keeping convolution cropped to the same result (`_forward`), which XLA:CPU runs ~2.3x
faster.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers: Any) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    # NHWC/HWIO/NHWC as ConvDimensionNumbers.
    return (tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2) and
            tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1) and
            tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def _ones(v: Sequence[int] | None, n: int) -> bool:
  return v is None or tuple(v) == (1,) * n


def _norm_padding(padding: Any) -> Any:
  if isinstance(padding, str):
    return padding
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _forward(x, w, strides, padding, rhs_dilation, precision):
  """The forward convolution. A stride-1 convolution whose padding shrinks the map (e.g.
  "VALID" 3x3, as in Inception-V3's stem) is computed with the size-keeping padding and
  then cropped: XLA:CPU runs such convolutions ~2.3x slower than size-keeping ones
  (measured: 3x3 80->192 channels at 73x73, batch 8, one core: 1.54 s vs 0.65 s including
  the 6% extra border outputs), the result is the same."""
  if any(s != 1 for s in strides):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=rhs_dilation,
                                    dimension_numbers=_NHWC, precision=precision)
  padding = _explicit_padding(padding, x.shape[1:3], w.shape[:2], strides, rhs_dilation)
  eff = [(k - 1) * d + 1 for k, d in zip(w.shape[:2], rhs_dilation)]
  grow = [e - 1 - lo - hi for e, (lo, hi) in zip(eff, padding)]
  if all(g == 0 for g in grow) or any(g < 0 for g in grow):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=rhs_dilation,
                                    dimension_numbers=_NHWC, precision=precision)
  wide = tuple((lo + g // 2, hi + g - g // 2) for g, (lo, hi) in zip(grow, padding))
  y = lax.conv_general_dilated(x, w, strides, wide, rhs_dilation=rhs_dilation,
                               dimension_numbers=_NHWC, precision=precision)
  out = [n + lo + hi - e + 1 for n, e, (lo, hi) in zip(x.shape[1:3], eff, padding)]
  start = [g // 2 for g in grow]
  return lax.slice(y, (0, start[0], start[1], 0),
                   (y.shape[0], start[0] + out[0], start[1] + out[1], y.shape[3]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, rhs_dilation, precision):
  return _forward(x, w, strides, padding, rhs_dilation, precision)


def _conv_fwd(x, w, strides, padding, rhs_dilation, precision):
  return _conv(x, w, strides, padding, rhs_dilation, precision), (x, w)


def _conv_bwd(strides, padding, rhs_dilation, precision, res, dy):
  x, w = res
  if all(s == 1 for s in strides):
    # Stride 1: the input gradient is a plain NHWC/HWIO convolution of dy with the
    # spatially flipped, in/out-swapped kernel (canonical layouts run fast in loops too).
    kh, kw = w.shape[:2]
    pads = _explicit_padding(padding, x.shape[1:3], (kh, kw), strides, rhs_dilation)
    eff = [(k - 1) * d + 1 for k, d in zip((kh, kw), rhs_dilation)]
    tpads = tuple((e - 1 - lo, e - 1 - hi) for e, (lo, hi) in zip(eff, pads))
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = lax.conv_general_dilated(dy.astype(w.dtype), w_t, (1, 1), tpads,
                                  rhs_dilation=rhs_dilation, dimension_numbers=_NHWC,
                                  precision=precision)
  else:
    _, x_vjp = jax.vjp(
        lambda x_: lax.conv_general_dilated(x_, w, strides, padding, rhs_dilation=rhs_dilation,
                                            dimension_numbers=_NHWC, precision=precision), x)
    (dx,) = x_vjp(dy)
  dw = _kernel_grad(x, dy, w.shape, strides, padding, rhs_dilation, precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


def _explicit_padding(padding, in_hw, k_hw, strides, dilation):
  if isinstance(padding, str):
    eff = [(k - 1) * d + 1 for k, d in zip(k_hw, dilation)]
    return tuple(lax.padtype_to_pads(in_hw, eff, strides, padding))
  return padding


def _kernel_grad(x, dy, w_shape, strides, padding, dilation, precision):
  """dW[i, j, c, o] = sum_{n,h,w} x_pad[n, h*s + i*d, w*s + j*d, c] * dy[n, h, w, o].

  Stride 1, no dilation, float32: one convolution already in the canonical NHWC/HWIO form
  (`_kernel_grad_canonical`). Otherwise the shifted views of x are strided slices (data
  movement only) and the sum over (n, h, w) is one matmul [kh*kw*C, N*H'*W'] x [N*H'*W', O].
  """
  kh, kw, c, o = w_shape
  n, ho, wo, _ = dy.shape
  pads = _explicit_padding(padding, x.shape[1:3], (kh, kw), strides, dilation)
  if (tuple(strides) == (1, 1) and tuple(dilation) == (1, 1) and
      x.dtype == jnp.float32 and dy.dtype == jnp.float32):
    return _kernel_grad_canonical(x, dy, pads, precision)
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  sh, sw = strides
  dh, dw_ = dilation
  views = []
  for i in range(kh):
    for j in range(kw):
      views.append(lax.slice(
          xp, (0, i * dh, j * dw_, 0),
          (n, i * dh + (ho - 1) * sh + 1, j * dw_ + (wo - 1) * sw + 1, c), (1, sh, sw, 1)))
  patches = jnp.stack(views, axis=-2).reshape(n * ho * wo, kh * kw * c)  # (i, j, c) order
  grad = jnp.dot(patches.T, dy.reshape(n * ho * wo, o).astype(patches.dtype),
                 precision=precision, preferred_element_type=jnp.float32)
  return grad.reshape(kh, kw, c, o)


def _kernel_grad_canonical(x, dy, pads, precision):
  """The stride-1 kernel gradient as a convolution in canonical NHWC/HWIO form: the input's
  channels act as the batch and its batch as the features ([C, H, W, N]), dy is the kernel
  ([H', W', N, O]), and the [C, kh, kw, O] output is transposed to HWIO.

  XLA:CPU rewrites non-canonical convolutions into this form only at the top level of a
  program (its ConvCanonicalization pass skips loop bodies); written so by hand, it runs on
  the fast convolution path inside `lax.scan` too. Measured inside a scan, 2 cores, float32
  (ms per kernel gradient, vs the matmul over shifted views): batch 128 14x14 32->64: 15.3
  vs 22.4; batch 32 32x32 64->64: 31.6 vs 58.1; batch 8 32x32 128->128: 27.2 vs 45.7;
  batch 128 28x28 1->32: 3.35 vs 3.24.
  """
  lhs = x.transpose(3, 1, 2, 0)
  rhs = dy.transpose(1, 2, 0, 3)
  out = lax.conv_general_dilated(lhs, rhs, (1, 1), tuple(tuple(p) for p in pads),
                                 dimension_numbers=_NHWC, precision=precision)
  return out.transpose(1, 2, 0, 3)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with a loop-friendly kernel gradient on CPU (see module)."""
  n = lhs.ndim - 2
  simple = (jax.default_backend() == "cpu" and n == 2 and _is_nhwc(dimension_numbers) and
            feature_group_count == 1 and batch_group_count == 1 and
            _ones(lhs_dilation, n) and preferred_element_type is None)
  if not simple:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  dil = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * n
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), _norm_padding(padding), dil,
               precision)
