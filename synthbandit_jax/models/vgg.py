"""VGG16 (torchvision layout) as a Flax linen module that returns fc7 features.

FCS (the usability score's feature-consistency term) in the paper is computed on VGG16 fc7
features: the 4096-d output of the second fully connected layer, after its ReLU, with dropout
off (eval mode). This module reproduces ``torchvision.models.vgg16`` (configuration "D",
no BatchNorm) so that its ImageNet weights (``VGG16_Weights.IMAGENET1K_V1``) import one to one
(`synthbandit_jax.weights.vgg_import`):

  features     13 x (3x3 conv, stride 1, padding 1, bias) + ReLU, a 2x2/2 max pool after
               conv blocks 1-5; torch indices (conv layers) 0, 2 | 5, 7 | 10, 12, 14 |
               17, 19, 21 | 24, 26, 28, widths 64, 64 | 128, 128 | 256 x 3 | 512 x 3 | 512 x 3
  avgpool      AdaptiveAvgPool2d((7, 7)) (identity for a 224x224 input, whose map is 7x7)
  flatten      in torch's (C, H, W) order: feature j of fc6's input is
               ``x[c, h, w]`` with ``j = c * 49 + h * 7 + w``
  classifier   0: fc6 Linear(25088, 4096), 1: ReLU, 2: Dropout,
               3: fc7 Linear(4096, 4096),  4: ReLU, 5: Dropout,   -> "fc7" (after 4)
               6: fc8 Linear(4096, 1000)                          -> "logits" (optional)

Parameter names mirror the torch attribute paths with list indices joined by "_"
(``features.0.weight`` -> ``params["features_0"]["kernel"]``, ``classifier.3.bias`` ->
``params["classifier_3"]["bias"]``), so `synthbandit_jax.weights.state_dict.to_flax` maps a
torchvision state dict directly. Dropout layers are left out (inference only: eval-mode
dropout is the identity).

Adaptive average pooling follows torch's rule for any input size: output cell i of an axis of
length ``n`` pooled to ``m`` averages input rows ``floor(i * n / m)`` to
``ceil((i + 1) * n / m) - 1`` (windows may overlap or, for n < m, repeat rows). It is computed
as two small separable averaging steps (`resample.apply_along`), exact up to float rounding.

Input pipeline (`preprocess`, run inside `VGG16.__call__` unless ``preprocessed=True``):

1. uint8 NHWC (or NHW) images of any size, values u in [0, 255] -> u / 255; float images are
   taken to be in [0, 1] already. 1 channel is repeated to RGB; a 4th (alpha) channel is
   dropped.
2. Bilinear resize to 224x224 in float32 (no rounding back to 8 bits), with PyTorch's
   ``F.interpolate(mode="bilinear", align_corners=False)`` convention (half-pixel centres).
   Antialiasing: ``antialias=True`` (default) uses ``F.interpolate(..., antialias=True)``'s
   triangle filter widened by the downscale factor, which is what torchvision's ``Resize``
   (antialias=True, its default since 0.17) and PIL's bilinear resize do, so an SD 512x512
   image is low-pass filtered before it is subsampled instead of aliasing. For upscaling (the
   small real datasets) both settings give the same weights. ``antialias=False`` is plain
   two-tap bilinear interpolation.
3. ImageNet normalisation per channel: ``(x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)``.

torchvision's ImageNet evaluation transform is Resize(256) + CenterCrop(224); we resize the
whole image to 224x224 instead (no crop), so the full generated image is seen.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax import parallel
from synthbandit_jax.models import pooling, resample, winograd

Dtype = Any

INPUT_SIZE = 224
MIN_INPUT_SIZE = 32  # five 2x2 max pools
POOL_SIZE = 7
FC7_DIM = 4096
NUM_CLASSES = 1000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's cfgs["D"]: conv widths, "M" = 2x2/2 max pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


def conv_indices(cfg=VGG16_CFG) -> list[int]:
  """torch indices of the conv layers inside ``features`` (0, 2, 5, 7, 10, ...)."""
  out, k = [], 0
  for v in cfg:
    if v == "M":
      k += 1
    else:
      out.append(k)
      k += 2  # conv, ReLU
  return out


CONV_INDICES = tuple(conv_indices())
# The variable collection of pre-transformed Winograd kernels (`winograd_kernels`).
WINOGRAD_COLLECTION = "winograd"
FC_INDICES = (0, 3, 6)  # fc6, fc7, fc8 inside ``classifier``


# --------------------------------------------------------------------------
# Resizing and adaptive pooling as [out, in] matrices.
# --------------------------------------------------------------------------


def _resize_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  """[out, in] weights of torch's bilinear ``F.interpolate(align_corners=False)`` (float64).

  Without antialias: output j samples ``(j + 0.5) * in / out - 0.5`` clamped to [0, in - 1],
  two taps. With antialias (torch's ``_upsample_bilinear2d_aa``, PIL's ImagingResample):
  ``scale = in / out``, ``support = max(scale, 1)``, centre ``c = scale * (j + 0.5)``; taps
  ``i`` in ``[int(c - support + 0.5), int(c + support + 0.5))`` clipped to the image, weights
  ``tri((i - c + 0.5) / max(scale, 1))`` with ``tri(t) = max(0, 1 - |t|)``, normalised to sum 1.
  """
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  if antialias:
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for j in range(out_size):
      center = scale * (j + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      i = np.arange(lo, hi)
      w = np.maximum(0.0, 1.0 - np.abs((i - center + 0.5) * inv))
      total = w.sum()
      if total > 0:
        m[j, lo:hi] = w / total
    return m
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging weights of torch's adaptive average pooling along one axis."""
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil((i + 1) * in / out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def _separable(x: jax.Array, mh: np.ndarray | None, mw: np.ndarray | None) -> jax.Array:
  """Applies [out, in] matrices along H and W of NHWC `x`, as the sparse taps of each row
  (`synthbandit_jax.models.resample.apply_along`: the matmul's sums, without the zeros)."""
  if mh is not None:
    x = resample.apply_along(x, mh, axis=1)
  if mw is not None:
    x = resample.apply_along(x, mw, axis=2)
  return x


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE, antialias: bool = True) -> jax.Array:
  """Float NHWC images -> [N, size, size, C] with torch's bilinear rule (module docstring)."""
  x = x.astype(jnp.float32)
  _, h, w, _ = x.shape
  mh = _resize_matrix(h, size, antialias) if h != size else None
  mw = _resize_matrix(w, size, antialias) if w != size else None
  return _separable(x, mh, mw)


def adaptive_avg_pool(x: jax.Array, size: int = POOL_SIZE) -> jax.Array:
  """torch's ``AdaptiveAvgPool2d((size, size))`` on NHWC `x` (identity if already that size)."""
  _, h, w, _ = x.shape
  mh = _adaptive_pool_matrix(h, size) if h != size else None
  mw = _adaptive_pool_matrix(w, size) if w != size else None
  return _separable(x, mh, mw)


def preprocess(images: jax.Array | np.ndarray, size: int = INPUT_SIZE,
               antialias: bool = True) -> jax.Array:
  """Images -> float32 [N, size, size, 3] VGG input (module docstring, steps 1-3); jittable.

  `images`: uint8 (values 0..255) or float (values in [0, 1]), [N, H, W] or [N, H, W, C]
  with C in {1, 3, 4}. An image already size x size is not resampled.
  """
  x = jnp.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
    raise ValueError("vgg.preprocess expects images [N, H, W] or [N, H, W, C] with C in "
                     f"{{1, 3, 4}}; got shape {tuple(x.shape)}")
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  elif x.shape[-1] == 4:
    x = x[..., :3]
  if jnp.issubdtype(x.dtype, jnp.integer):
    if x.dtype != jnp.uint8:
      raise ValueError(f"vgg.preprocess: integer images must be uint8 (0..255), got {x.dtype}")
    x = x.astype(jnp.float32) / 255.0
  else:
    x = x.astype(jnp.float32)
  if x.shape[1] != size or x.shape[2] != size:
    x = resize_bilinear(x, size, antialias)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x - mean) / std


# --------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------


class VGG16(nn.Module):
  """torchvision's VGG16 for inference; returns {"fc7": [N, 4096]} (+ "logits").

  Call: ``model.apply({"params": p}, images)`` with uint8 or [0, 1] float NHWC images of any
  size (preprocessed by `preprocess`: resize to 224x224, ImageNet normalisation), or
  ``model.apply(..., x, preprocessed=True)`` with an already normalised float NHWC input of
  any spatial size >= 32 (no resize; the adaptive pool maps the last map to 7x7).
  The same computation in three steps (``method=``): `prepare` (preprocess + checks),
  `conv_features` (the conv stack + adaptive pool, per image) and `head` (fc6, fc7, fc8);
  `apply_microbatched` runs the middle one a few images at a time (faster on CPU).
  With a ``"winograd"`` variable collection beside the params (`winograd_kernels`), the
  layers it names run by Winograd's algorithm (`synthbandit_jax.models.winograd`; faster
  on CPU, fc7 within a few 1e-6 relative of the direct convolution's, float32 only).

  Attributes:
    with_logits: add fc8 (``classifier_6``, `num_classes` outputs) and return "logits".
    num_classes: fc8 width (1000 for ImageNet weights).
    dtype: compute dtype (e.g. jnp.bfloat16); params stay float32, outputs are float32.
    precision: passed to every conv and dense layer (jax.lax.Precision.HIGHEST gives exact
      fp32 on GPUs that otherwise use TF32).
    antialias: the resize's antialias setting (module docstring).
    input_size: the side `preprocess` resizes to (224, the network's own; >= 32 runs at
      ~(size/224)^2 of the compute, the adaptive pool bringing any map to 7x7; features are
      then not those of 224 px inputs).
  """
  with_logits: bool = False
  num_classes: int = NUM_CLASSES
  dtype: Dtype = jnp.float32
  precision: Any = None
  antialias: bool = True
  input_size: int = INPUT_SIZE

  def setup(self):
    conv = dict(kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                param_dtype=jnp.float32, precision=self.precision)
    for k, width in zip(CONV_INDICES, [v for v in VGG16_CFG if v != "M"]):
      setattr(self, f"features_{k}", nn.Conv(width, **conv))
    dense = dict(dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision)
    self.classifier_0 = nn.Dense(FC7_DIM, **dense)   # fc6
    self.classifier_3 = nn.Dense(FC7_DIM, **dense)   # fc7
    if self.with_logits:
      self.classifier_6 = nn.Dense(self.num_classes, **dense)   # fc8

  def __call__(self, x: jax.Array, *, preprocessed: bool = False) -> dict[str, jax.Array]:
    return self.head(self.conv_features(self.prepare(x, preprocessed=preprocessed)))

  def prepare(self, x: jax.Array, *, preprocessed: bool = False) -> jax.Array:
    """Images -> the network's input: `preprocess` (unless `preprocessed`), shape checks,
    `dtype`. No params."""
    if not preprocessed:
      if int(self.input_size) < MIN_INPUT_SIZE:
        raise ValueError(f"VGG16 input_size={self.input_size}: needs >= {MIN_INPUT_SIZE} "
                         "(5 max pools of 2)")
      x = preprocess(x, int(self.input_size), self.antialias)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"VGG16 expects NHWC RGB input [N, H, W, 3]; got {tuple(x.shape)}")
    if x.shape[1] < MIN_INPUT_SIZE or x.shape[2] < MIN_INPUT_SIZE:
      raise ValueError(f"VGG16 needs at least 32x32 input (5 max pools of 2); got "
                       f"{tuple(x.shape[1:3])}")
    return x.astype(self.dtype)

  def conv_features(self, x: jax.Array) -> jax.Array:
    """The network input [N, H, W, 3] -> the adaptive-pooled last map [N, 7, 7, 512]
    (``features`` + ``avgpool``): 13 convolutions + ReLU, 5 max pools. Each image's row
    depends on that image only, so `apply_microbatched` can run it a few images at a time."""
    k = 0
    for v in VGG16_CFG:
      if v == "M":
        # nn.max_pool's values, faster on XLA:CPU (`synthbandit_jax.models.pooling`).
        x = pooling.max_pool(x, (2, 2), (2, 2), "VALID")
        k += 1
      else:
        name = f"features_{k}"
        conv = getattr(self, name)
        if self.has_variable(WINOGRAD_COLLECTION, name):
          # The same layer by Winograd's algorithm from its pre-transformed kernel
          # (`winograd_kernels`; faster on CPU at 14-56 px).
          bias = conv.variables["params"]["bias"]
          u = self.get_variable(WINOGRAD_COLLECTION, name)
          x = nn.relu(winograd.conv3x3(x, u, precision=self.precision) + bias)
        else:
          x = nn.relu(conv(x))
        k += 2
    return adaptive_avg_pool(x, POOL_SIZE)

  def head(self, x: jax.Array) -> dict[str, jax.Array]:
    """[N, 7, 7, 512] -> {"fc7": [N, 4096]} (+ "logits"), float32."""
    n = x.shape[0]
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(n, -1)  # torch.flatten of NCHW: (C, H, W)
    x = nn.relu(self.classifier_0(x))   # fc6
    x = nn.relu(self.classifier_3(x))   # fc7
    out = {"fc7": x.astype(jnp.float32)}
    if self.with_logits:
      out["logits"] = self.classifier_6(x).astype(jnp.float32)
    return out


def apply_microbatched(model: VGG16, variables: Any, images: jax.Array, *,
                       microbatch: int = 0, shards: int = 1,
                       preprocessed: bool = False) -> dict[str, jax.Array]:
  """``model.apply(variables, images)`` with the convolution stack run `microbatch` images
  at a time (a `jax.lax.map`); the dense layers still take the whole batch, so fc6's 411 MB
  of weights are read once per batch. Jittable. Each image's features depend on that image
  only, so the values are the whole batch's up to float rounding (XLA may order a smaller
  batch's convolution sums differently: 1.3e-6 relative measured at 32x40, 0 at 224x224).

  Why: on CPU a batch's activations (224x224x64 floats = 12.8 MB per image per map) leave
  the caches; a few images at a time run faster (2 cores, batch 32: 0.148 -> 0.118 s per
  image for the conv stack, benchmarks/README.md). On GPUs keep ``microbatch=0`` (off).

  `microbatch` (images per step per shard, 0 = off) and `shards` (the mesh's device count)
  are `synthbandit_jax.parallel.microbatched`'s.
  """
  x = model.apply(variables, images, preprocessed=preprocessed, method=VGG16.prepare)

  def conv(t):
    return model.apply(variables, t, method=VGG16.conv_features)

  feats = parallel.microbatched(conv, x, microbatch=microbatch, shards=shards)
  return model.apply(variables, feats, method=VGG16.head)


def winograd_plan(input_size: int | tuple[int, int] = INPUT_SIZE) -> dict[str, int]:
  """{conv layer name: Winograd tile size} for the layers `winograd.tile_size` picks at this
  input size (a side, or (H, W)); the others are absent (direct convolution). At 224 px:
  the 56 px layers take F(4x4, 3x3), the 28 and 14 px layers F(2x2, 3x3)."""
  h, w = (input_size, input_size) if np.isscalar(input_size) else input_size
  h, w, channels, plan, k = int(h), int(w), 3, {}, 0
  for v in VGG16_CFG:
    if v == "M":
      h, w, k = h // 2, w // 2, k + 1
      continue
    m = winograd.tile_size(h, w, channels)
    if m:
      plan[f"features_{k}"] = m
    channels, k = v, k + 2
  return plan


def winograd_kernels(params: Any, plan: dict[str, int]) -> dict[str, jax.Array]:
  """The ``"winograd"`` variable collection for `plan` (`winograd_plan`): each planned
  layer's kernel transformed once (`winograd.transform_kernel`). Pass it beside the params,
  ``model.apply({"params": p, "winograd": winograd_kernels(p, plan)}, x)``, and those layers
  run by Winograd's algorithm (float32 only); the params are unchanged."""
  out = {}
  for name, m in plan.items():
    if name not in params or "kernel" not in params[name]:
      raise KeyError(f"vgg.winograd_kernels: params have no {name}.kernel (plan {plan})")
    out[name] = winograd.transform_kernel(params[name]["kernel"], m)
  return out


def param_shapes(with_logits: bool = False, num_classes: int = NUM_CLASSES) -> dict:
  """The params tree of `VGG16` as nested dicts of shape tuples (abstract, no compute)."""
  model = VGG16(with_logits=with_logits, num_classes=num_classes)
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  tree = jax.eval_shape(lambda r, a: model.init(r, a, preprocessed=True), jax.random.key(0), x)
  return jax.tree.map(lambda a: tuple(a.shape), dict(tree["params"]))


def num_params(with_logits: bool = True) -> int:
  """Parameter count (138,357,544 with fc8, as torchvision reports)."""
  return sum(math.prod(s) for s in jax.tree.leaves(
      param_shapes(with_logits), is_leaf=lambda t: isinstance(t, tuple)))
