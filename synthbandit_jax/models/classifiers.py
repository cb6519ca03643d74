"""Flax linen image classifiers used by the training loop.

Every model takes float32 NHWC images in [0, 1] with any number of channels and
any (small or large) spatial size, normalises them itself, and returns float32
logits of shape [N, num_classes]:

  logits, new_state = model.apply(variables, x, train=True,
                                  mutable=["batch_stats"])

Each model is made of a submodule named ``backbone`` (returns pooled features
[N, D]) and an ``nn.Dense`` named ``head``. With ``frozen_backbone=True`` the
backbone always runs in inference mode (BatchNorm uses its running averages and
never updates them) and its features pass through ``jax.lax.stop_gradient``, so
only the head receives gradients. Combine with ``trainable_mask(params,
"head")`` in the optimizer so weight decay or momentum cannot move the backbone.

``dtype`` is the compute dtype (e.g. ``jnp.bfloat16`` on GPU/TPU); parameters
always stay float32 and logits are always returned as float32.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthbandit_jax.models import conv as conv_lib
from synthbandit_jax.models import pooling

Dtype = Any
PyTree = Any

_PARAM_DTYPE = jnp.float32
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


# --------------------------------------------------------------------------
# Shared helpers.
# --------------------------------------------------------------------------


def _check_images(x: jax.Array, model_name: str) -> None:
  """Raises ValueError unless `x` is a rank-4 NHWC batch."""
  if x.ndim != 4:
    raise ValueError(
        f"{model_name} expects NHWC images of rank 4 (N, H, W, C) with values "
        f"in [0, 1]; got an array of shape {tuple(x.shape)}. Add a batch "
        "and/or channel axis (e.g. x[None] or x[..., None]).")


def _normalise(x: jax.Array, dtype: Dtype) -> jax.Array:
  """Maps [0, 1] images to [-1, 1] and casts to the compute dtype."""
  x = (x.astype(jnp.float32) - 0.5) / 0.5
  return x.astype(dtype)


def _backbone_then_head(backbone: nn.Module, head: nn.Module, x: jax.Array,
                        train: bool, frozen_backbone: bool) -> jax.Array:
  """Runs backbone (frozen or not) then the head; returns float32 logits."""
  features = backbone(x, train=train and not frozen_backbone)
  if frozen_backbone:
    features = jax.lax.stop_gradient(features)
  return head(features).astype(jnp.float32)


def _batch_norm(dtype: Dtype, train: bool, name: str,
                scale_init: Callable = nn.initializers.ones) -> nn.BatchNorm:
  """BatchNorm with torch-like settings (momentum 0.9, epsilon 1e-5)."""
  return nn.BatchNorm(
      use_running_average=not train, momentum=_BN_MOMENTUM,
      epsilon=_BN_EPSILON, dtype=dtype, param_dtype=_PARAM_DTYPE,
      scale_init=scale_init, name=name)


def _head(num_classes: int, dtype: Dtype) -> nn.Dense:
  """The classification head shared by all models."""
  return nn.Dense(num_classes, dtype=dtype, param_dtype=_PARAM_DTYPE,
                  kernel_init=_lecun_normal, name="head")


def variance_scaling(scale: float, mode: str, distribution: str) -> Callable:
  """`jax.nn.initializers.variance_scaling` (fans from the kernel's shape: in axis -2, out
  axis -1, the rest the receptive field), drawn for the flat shape and reshaped.

  The values are the same as jax's: with jax_threefry_partitionable (the default) a draw's
  bits depend only on each element's flat index (tested). But XLA:CPU compiles the random
  kernel of a 4-D shape in ~1.5-30 s and of a 1-D shape in ~0.4 s, and every conv kernel of
  a fresh model compiles its own: this makes model init (each run's start-up) seconds
  instead of up to a minute.
  """
  if distribution not in ("truncated_normal", "normal", "uniform"):
    raise ValueError(f"variance_scaling: unknown distribution {distribution!r}")
  if mode not in ("fan_in", "fan_out", "fan_avg"):
    raise ValueError(f"variance_scaling: unknown mode {mode!r}")

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
      raise ValueError(f"variance_scaling needs a kernel of rank >= 2, got shape {shape}")
    receptive = math.prod(shape[:-2])
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    denominator = {"fan_in": fan_in, "fan_out": fan_out,
                   "fan_avg": (fan_in + fan_out) / 2}[mode]
    variance = jnp.array(scale / denominator, dtype=dtype)
    n = (math.prod(shape),)
    if distribution == "truncated_normal":
      stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)
      x = jax.random.truncated_normal(key, -2, 2, n, dtype) * stddev
    elif distribution == "normal":
      x = jax.random.normal(key, n, dtype) * jnp.sqrt(variance)
    else:
      x = jax.random.uniform(key, n, dtype, -1) * jnp.sqrt(3 * variance)
    return x.reshape(shape)

  return init


_lecun_normal = variance_scaling(1.0, "fan_in", "truncated_normal")  # flax's default

# Every convolution goes through conv_lib.conv_general_dilated: lax's convolution, except
# that on CPU its kernel gradient is an image-patches matmul, which XLA:CPU runs ~50x
# faster inside the jitted epoch's lax.scan (see models/conv.py).
_Conv = functools.partial(nn.Conv, conv_general_dilated=conv_lib.conv_general_dilated,
                          kernel_init=_lecun_normal)
_Dense = functools.partial(nn.Dense, kernel_init=_lecun_normal)

# --------------------------------------------------------------------------
# SmallCNN.
# --------------------------------------------------------------------------


class _SmallCNNBackbone(nn.Module):
  """conv-pool-conv-pool-dense feature extractor."""

  conv_features: Sequence[int]
  dense_features: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No train-dependent layers.
    for i, features in enumerate(self.conv_features):
      x = _Conv(features, (3, 3), padding="SAME", dtype=self.dtype,
                param_dtype=_PARAM_DTYPE, name=f"conv{i}")(x)
      x = nn.relu(x)
      x = pooling.max_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    x = _Dense(self.dense_features, dtype=self.dtype,
                 param_dtype=_PARAM_DTYPE, name="dense")(x)
    return nn.relu(x)


class SmallCNN(nn.Module):
  """A cheap CNN (3x3 conv32 - pool - conv64 - pool - dense128 - head).

  The demo and benchmark model: fast on CPU for 28x28 MNIST.
  """

  num_classes: int
  conv_features: Sequence[int] = (32, 64)
  dense_features: int = 128
  dtype: Dtype = jnp.float32
  frozen_backbone: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_images(x, type(self).__name__)
    backbone = _SmallCNNBackbone(self.conv_features, self.dense_features,
                                 self.dtype, name="backbone")
    return _backbone_then_head(backbone, _head(self.num_classes, self.dtype),
                               _normalise(x, self.dtype), train,
                               self.frozen_backbone)


# --------------------------------------------------------------------------
# ResNet (torchvision v1.5 layout: stride on the 3x3 conv of bottlenecks).
# --------------------------------------------------------------------------

_conv_init = variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, dtype: Dtype,
          name: str) -> nn.Conv:
  """Bias-free conv with torch-style symmetric padding kernel // 2."""
  pad = kernel // 2
  return _Conv(features, (kernel, kernel), strides=(stride, stride),
               padding=((pad, pad), (pad, pad)), use_bias=False,
               dtype=dtype, param_dtype=_PARAM_DTYPE, kernel_init=_conv_init,
               name=name)


class _BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (ResNet-18/34)."""

  features: int
  stride: int
  dtype: Dtype
  zero_init_residual: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    last_scale = (nn.initializers.zeros if self.zero_init_residual
                  else nn.initializers.ones)
    y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(self.dtype, train, "bn1")(y))
    y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
    y = _batch_norm(self.dtype, train, "bn2", last_scale)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, self.dtype, "proj_conv")(x)
      x = _batch_norm(self.dtype, train, "proj_bn")(x)
    return nn.relu(x + y)


class _BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand x4, residual (ResNet-50+)."""

  features: int
  stride: int
  dtype: Dtype
  zero_init_residual: bool
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    last_scale = (nn.initializers.zeros if self.zero_init_residual
                  else nn.initializers.ones)
    out_features = self.features * self.expansion
    y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(self.dtype, train, "bn1")(y))
    y = _conv(self.features, 3, self.stride, self.dtype, "conv2")(y)
    y = nn.relu(_batch_norm(self.dtype, train, "bn2")(y))
    y = _conv(out_features, 1, 1, self.dtype, "conv3")(y)
    y = _batch_norm(self.dtype, train, "bn3", last_scale)(y)
    if self.stride != 1 or x.shape[-1] != out_features:
      x = _conv(out_features, 1, self.stride, self.dtype, "proj_conv")(x)
      x = _batch_norm(self.dtype, train, "proj_bn")(x)
    return nn.relu(x + y)


_RESNET_BLOCKS = {"basic": _BasicBlock, "bottleneck": _BottleneckBlock}


def _resolve_small_input(small_input: bool | str, height: int, width: int,
                         max_small: int) -> bool:
  """Resolves the `small_input` option ("auto" decides from the image size)."""
  if isinstance(small_input, bool):
    return small_input
  if small_input == "auto":
    return max(height, width) <= max_small
  raise ValueError(
      f"ResNet.small_input must be True, False or 'auto'; got {small_input!r}.")


class _ResNetBackbone(nn.Module):
  """Stem + residual stages + global average pool."""

  stage_sizes: Sequence[int]
  block: str
  width: int
  small_input: bool
  dtype: Dtype
  zero_init_residual: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.small_input:
      x = _conv(self.width, 3, 1, self.dtype, "conv_init")(x)
      x = nn.relu(_batch_norm(self.dtype, train, "bn_init")(x))
    else:
      x = _conv(self.width, 7, 2, self.dtype, "conv_init")(x)
      x = nn.relu(_batch_norm(self.dtype, train, "bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = _RESNET_BLOCKS[self.block]
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2**i, stride, self.dtype,
                      self.zero_init_residual,
                      name=f"stage{i + 1}_block{j + 1}")(x, train)
    return jnp.mean(x, axis=(1, 2))


class ResNet(nn.Module):
  """ResNet with BatchNorm (collection "batch_stats").

  Attributes:
    num_classes: number of output logits.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: "basic" or "bottleneck".
    width: channels of the first stage (doubles each stage).
    small_input: True = 3x3 stride-1 stem without max-pool (CIFAR style),
      False = the ImageNet 7x7 stride-2 stem + max-pool, "auto" = True when
      max(H, W) <= `small_input_max_size`.
    small_input_max_size: threshold used by "auto".
    zero_init_residual: zero-init the last BN scale of every block, so each
      block starts as the identity (Goyal et al. 2017).
    dtype: compute dtype; params stay float32.
    frozen_backbone: run the backbone in inference mode behind stop_gradient.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  width: int = 64
  small_input: bool | str = "auto"
  small_input_max_size: int = 64
  zero_init_residual: bool = True
  dtype: Dtype = jnp.float32
  frozen_backbone: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_images(x, type(self).__name__)
    if self.block not in _RESNET_BLOCKS:
      raise ValueError(f"ResNet.block must be one of {sorted(_RESNET_BLOCKS)}; "
                       f"got {self.block!r}.")
    small = _resolve_small_input(self.small_input, x.shape[1], x.shape[2],
                                 self.small_input_max_size)
    backbone = _ResNetBackbone(self.stage_sizes, self.block, self.width, small,
                               self.dtype, self.zero_init_residual,
                               name="backbone")
    return _backbone_then_head(backbone, _head(self.num_classes, self.dtype),
                               _normalise(x, self.dtype), train,
                               self.frozen_backbone)


def ResNet18(num_classes: int, **kwargs: Any) -> ResNet:  # pylint: disable=C0103
  """ResNet-18: basic blocks, stages (2, 2, 2, 2)."""
  return ResNet(num_classes=num_classes, stage_sizes=(2, 2, 2, 2),
                block="basic", **kwargs)


def ResNet50(num_classes: int, **kwargs: Any) -> ResNet:  # pylint: disable=C0103
  """ResNet-50: bottleneck blocks, stages (3, 4, 6, 3)."""
  return ResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3),
                block="bottleneck", **kwargs)


# --------------------------------------------------------------------------
# VGG-style net.
# --------------------------------------------------------------------------


class _VGGBackbone(nn.Module):
  """Stages of 3x3 conv(-BN)-ReLU, 2x2 max-pool after each, GAP, dense."""

  stages: Sequence[Sequence[int]]
  fc_features: Sequence[int]
  use_batchnorm: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, stage in enumerate(self.stages):
      for j, features in enumerate(stage):
        x = _Conv(features, (3, 3), padding=((1, 1), (1, 1)),
                  use_bias=not self.use_batchnorm, dtype=self.dtype,
                  param_dtype=_PARAM_DTYPE, kernel_init=_conv_init,
                  name=f"stage{i + 1}_conv{j + 1}")(x)
        if self.use_batchnorm:
          x = _batch_norm(self.dtype, train, f"stage{i + 1}_bn{j + 1}")(x)
        x = nn.relu(x)
      x = pooling.max_pool_2x2(x)
    x = jnp.mean(x, axis=(1, 2))
    for k, features in enumerate(self.fc_features):
      x = _Dense(features, dtype=self.dtype, param_dtype=_PARAM_DTYPE,
                   name=f"fc{k + 1}")(x)
      x = nn.relu(x)
    return x


class VGGNet(nn.Module):
  """A VGG-style net; the default is small, suited to 28-32 px inputs.

  Attributes:
    num_classes: number of output logits.
    stages: conv widths per stage; every stage ends in a 2x2 max-pool
      (skipped once the map is smaller than 2x2). Default 28 px -> 14 -> 7 -> 3.
    fc_features: widths of the dense layers after global average pooling.
    use_batchnorm: BatchNorm after every conv (collection "batch_stats").
    dtype: compute dtype; params stay float32.
    frozen_backbone: run the backbone in inference mode behind stop_gradient.
  """

  num_classes: int
  stages: Sequence[Sequence[int]] = ((32, 32), (64, 64), (128, 128))
  fc_features: Sequence[int] = (256,)
  use_batchnorm: bool = True
  dtype: Dtype = jnp.float32
  frozen_backbone: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_images(x, type(self).__name__)
    backbone = _VGGBackbone(self.stages, self.fc_features, self.use_batchnorm,
                            self.dtype, name="backbone")
    return _backbone_then_head(backbone, _head(self.num_classes, self.dtype),
                               _normalise(x, self.dtype), train,
                               self.frozen_backbone)


# --------------------------------------------------------------------------
# Vision Transformer (pre-LN, cls token, learned position embeddings).
# --------------------------------------------------------------------------

_dense_init = variance_scaling(1.0, "fan_avg", "uniform")  # xavier_uniform


def _resolve_patch_size(patch_size: int | str, height: int, width: int) -> int:
  """Resolves ViT.patch_size ("auto": 2 / 4 / 8 / 16 up to 16 / 32 / 64 / more px)."""
  if isinstance(patch_size, int) and not isinstance(patch_size, bool):
    if patch_size < 1:
      raise ValueError(f"ViT.patch_size must be >= 1; got {patch_size}.")
    size = patch_size
  elif patch_size == "auto":
    side = min(height, width)
    size = 2 if side <= 16 else 4 if side <= 32 else 8 if side <= 64 else 16
  else:
    raise ValueError(
        f"ViT.patch_size must be a positive int or 'auto'; got {patch_size!r}.")
  if size > height or size > width:
    raise ValueError(f"ViT.patch_size={size} is larger than the {height}x"
                     f"{width} input; choose a smaller patch_size.")
  return size


class _SelfAttention(nn.Module):
  """Multi-head self-attention via jax.nn.dot_product_attention.

  `jax.nn.dot_product_attention` picks a fused kernel (cuDNN) on GPU where it
  can and falls back to XLA elsewhere.
  """

  num_heads: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    if dim % self.num_heads:
      raise ValueError(f"ViT hidden_dim={dim} is not divisible by "
                       f"num_heads={self.num_heads}.")
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, dtype=self.dtype, param_dtype=_PARAM_DTYPE,
                   kernel_init=_dense_init, name="qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    y = jax.nn.dot_product_attention(q, k, v)
    y = y.reshape(batch, tokens, dim)
    return nn.Dense(dim, dtype=self.dtype, param_dtype=_PARAM_DTYPE,
                    kernel_init=_dense_init, name="proj")(y)


class _EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ln = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype,
                           param_dtype=_PARAM_DTYPE)
    x = x + _SelfAttention(self.num_heads, self.dtype, name="attn")(
        ln(name="ln1")(x))
    y = ln(name="ln2")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=_PARAM_DTYPE,
                 kernel_init=_dense_init, name="mlp_fc1")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=_PARAM_DTYPE,
                 kernel_init=_dense_init, name="mlp_fc2")(y)
    return x + y


class _ViTBackbone(nn.Module):
  """Patch embedding, cls token, position embeddings, encoder, final LN."""

  patch_size: int
  hidden_dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No train-dependent layers (no dropout).
    p = self.patch_size
    x = _Conv(self.hidden_dim, (p, p), strides=(p, p), padding="VALID",
              dtype=self.dtype, param_dtype=_PARAM_DTYPE,
              name="patch_embed")(x)
    batch, h, w, dim = x.shape
    x = x.reshape(batch, h * w, dim)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, dim),
                     _PARAM_DTYPE)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (batch, 1, dim)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, h * w + 1, dim), _PARAM_DTYPE)
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = _EncoderBlock(self.num_heads, self.mlp_dim, self.dtype,
                        name=f"block{i + 1}")(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=_PARAM_DTYPE,
                     name="ln_final")(x)
    return x[:, 0]


class ViT(nn.Module):
  """Vision Transformer (pre-LN, cls token, learned position embeddings).

  The position embeddings are sized at init for the input's patch grid, so
  apply with the same H, W as at init.

  Attributes:
    num_classes: number of output logits.
    patch_size: int, or "auto": 2 for <= 16 px, 4 for <= 32 px, 8 for
      <= 64 px, 16 otherwise (from min(H, W)). Pixels that do not fill a whole
      patch at the right/bottom edge are dropped.
    hidden_dim, depth, num_heads: transformer size.
    mlp_ratio: MLP width = mlp_ratio * hidden_dim.
    dtype: compute dtype; params stay float32.
    frozen_backbone: run the backbone in inference mode behind stop_gradient.
  """

  num_classes: int
  patch_size: int | str = "auto"
  hidden_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  frozen_backbone: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_images(x, type(self).__name__)
    patch = _resolve_patch_size(self.patch_size, x.shape[1], x.shape[2])
    backbone = _ViTBackbone(patch, self.hidden_dim, self.depth, self.num_heads,
                            self.mlp_ratio * self.hidden_dim, self.dtype,
                            name="backbone")
    return _backbone_then_head(backbone, _head(self.num_classes, self.dtype),
                               _normalise(x, self.dtype), train,
                               self.frozen_backbone)


def vit_tiny(num_classes: int, **kwargs: Any) -> ViT:
  """ViT-Ti: hidden 192, depth 12, 3 heads."""
  return ViT(num_classes=num_classes, hidden_dim=192, depth=12, num_heads=3,
             **kwargs)


def vit_small(num_classes: int, **kwargs: Any) -> ViT:
  """ViT-S: hidden 384, depth 12, 6 heads."""
  return ViT(num_classes=num_classes, hidden_dim=384, depth=12, num_heads=6,
             **kwargs)


# --------------------------------------------------------------------------
# Heads on frozen backbone features (training/frozen_features.py).
# --------------------------------------------------------------------------


class FeatureHead(nn.Module):
  """A new classification head on frozen-backbone feature vectors [N, D] (float).

  hidden=0: one linear layer (the paper's "frozen pretrained backbone with a new head");
  hidden>0: Dense(hidden) - ReLU - Dense. All layers are the head: `frozen_backbone` changes
  nothing (there is no backbone here; the frozen one ran when the features were computed).
  """

  num_classes: int
  hidden: int = 0
  dtype: Dtype = jnp.float32
  frozen_backbone: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    if x.ndim != 2:
      raise ValueError(
          f"{type(self).__name__} expects feature vectors [N, D] (config model.features); got "
          f"an array of shape {tuple(x.shape)}. Images need an image classifier "
          "(small_cnn, resnet18, ...).")
    x = x.astype(self.dtype)
    if self.hidden:
      x = nn.relu(_Dense(self.hidden, dtype=self.dtype, param_dtype=_PARAM_DTYPE,
                           name="head_hidden")(x))
    return _head(self.num_classes, self.dtype)(x).astype(jnp.float32)


# --------------------------------------------------------------------------
# Registry and utilities.
# --------------------------------------------------------------------------

# name -> (module class, attributes fixed by the name).
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "small_cnn": (SmallCNN, {}),
    "resnet18": (ResNet, {"stage_sizes": (2, 2, 2, 2), "block": "basic"}),
    "resnet50": (ResNet, {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck"}),
    "vgg": (VGGNet, {}),
    "vit_tiny": (ViT, {"hidden_dim": 192, "depth": 12, "num_heads": 3}),
    "vit_small": (ViT, {"hidden_dim": 384, "depth": 12, "num_heads": 6}),
    "linear_head": (FeatureHead, {"hidden": 0}),
    "mlp_head": (FeatureHead, {"hidden": 256}),
}

CLASSIFIER_NAMES: tuple[str, ...] = tuple(_REGISTRY)

_COMMON_FIELDS = ("num_classes", "dtype", "frozen_backbone", "parent", "name")


def build_classifier(name: str, num_classes: int, *, dtype: Dtype = jnp.float32,
                     frozen_backbone: bool = False, **kwargs: Any) -> nn.Module:
  """Builds a classifier by registry name.

  Args:
    name: one of CLASSIFIER_NAMES ("small_cnn", "resnet18", "resnet50", "vgg",
      "vit_tiny", "vit_small"; "linear_head", "mlp_head" take feature vectors).
    num_classes: number of output logits.
    dtype: compute dtype (params stay float32, logits are float32).
    frozen_backbone: train only the head (see module docstring).
    **kwargs: further attributes of the model class (e.g. small_input for
      ResNets, patch_size for ViTs, stages for vgg).

  Returns:
    The flax module.

  Raises:
    ValueError: unknown name, or a kwarg the model does not accept.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown classifier {name!r}; valid names: "
                     f"{', '.join(CLASSIFIER_NAMES)}.")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(
        f"num_classes must be a positive int; got {num_classes!r}.")
  cls, fixed = _REGISTRY[name]
  allowed = sorted(f.name for f in dataclasses.fields(cls)
                   if f.name not in _COMMON_FIELDS and f.name not in fixed)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"Classifier {name!r} ({cls.__name__}) got unknown "
                     f"option(s) {unknown}; accepted options: {allowed}.")
  return cls(num_classes=num_classes, dtype=dtype,
             frozen_backbone=frozen_backbone, **fixed, **kwargs)


def init_variables(model: nn.Module, rng: jax.Array,
                   input_shape: Sequence[int], *,
                   partitionable_rng: bool = False) -> dict[str, PyTree]:
  """Initialises `model` for NHWC inputs of `input_shape` (e.g. (1, H, W, C)).

  Args:
    model: a classifier from this module.
    rng: PRNG key (threefry).
    input_shape: (N, H, W, C); N = 1 is enough.
    partitionable_rng: value of `jax.threefry_partitionable` used while
      initialising. False (the pre-0.5 JAX default) compiles several times
      faster on XLA CPU (jax 0.10.2, 2 cores: ResNet-18 init 9 s -> 2.4 s,
      ResNet-50 15 s -> 4.6 s); set True when initialising straight into a
      sharded layout. Either value is deterministic, but they give different
      initial values for the same key.

  Returns:
    A plain dict with "params" and, for models with BatchNorm, "batch_stats".
  """
  if len(input_shape) != 4:
    raise ValueError(
        f"input_shape must be (N, H, W, C); got {tuple(input_shape)}.")
  x = jnp.zeros(tuple(input_shape), jnp.float32)
  with jax.threefry_partitionable(partitionable_rng):
    variables = jax.jit(functools.partial(model.init, train=False))(rng, x)
  return dict(variables)


def trainable_mask(params: PyTree, trainable: str) -> PyTree:
  """Pytree of bools like `params`: True where the leaf trains.

  Args:
    params: the "params" collection of a classifier (top-level keys
      "backbone" and "head").
    trainable: "all" or "head".

  Note that `optax.masked(tx, mask)` passes the raw updates of masked-out
  leaves through unchanged; to freeze leaves, zero their updates instead, e.g.
  `optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
  jax.tree.map(lambda m: "train" if m else "freeze", mask))`.
  """
  if trainable == "all":
    return jax.tree.map(lambda _: True, params)
  if trainable == "head":
    is_mapping = isinstance(params, collections.abc.Mapping)
    if not is_mapping or "head" not in params:
      keys = list(params) if is_mapping else type(params).__name__
      raise ValueError("trainable_mask(..., 'head') needs the classifier's "
                       f"'params' collection with a 'head' entry; got {keys}. "
                       "Pass variables['params'], not the whole variables.")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[0], "key", None) == "head", params)
  raise ValueError(f"trainable must be 'all' or 'head'; got {trainable!r}.")


def count_params(params: PyTree) -> int:
  """Total number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))
