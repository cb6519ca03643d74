"""Trains the demo's own small text-to-image latent diffusion model (SD layout) on real images.

Why: no text-to-image weights are reachable offline, yet the method needs a generator that
turns the attribute stage's prompts into a synthetic pool. This module trains a miniature
Stable Diffusion -- a diffusers ``AutoencoderKL``, ``UNet2DConditionModel`` and CLIP text
encoder with the real CLIP BPE tokenizer and SD 1.5's noise schedule -- on the real train split
(MNIST-5k for the demo) in a few CPU minutes, and saves it with `diffusion.save_pipeline`, so
the SAME generation stage that serves Stable Diffusion (`diffusion.load_pipeline`,
`Pipeline.generate`, stage.py) samples it, and diffusers' StableDiffusionPipeline loads it too.

Training, in three resumable phases (params float32; one jitted AdamW step per batch):

 1. VAE. Images (uint8, any size, gray or RGB) are resized (``fit="resize"``, bilinear stretch,
    so a pool image resized back to the real size has the real geometry) or zero-padded
    (``fit="pad"``) to ``image_size`` and replicated to 3 channels (the pool is RGB like SD's),
    x in [-1, 1]. With posterior q(z|x) = N(mu, sigma^2) and z = mu + sigma * n, n ~ N(0, I):

        L_vae = mean_pixels |x - D(z)|   (or squared, vae_loss="l2")
                + vae_kl_weight * mean_latent_elements 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)

 2. Latent scale. As SD did: scaling_factor = 1 / std(z) over posterior samples of every
    training image, so the diffusion model sees unit-variance latents (written into the VAE's
    config.json; `vae.encode_to_latents` / `decode_latents` apply it).

 3. UNet + text encoder, jointly, with the DDPM loss of SD 1.5's schedule (scaled_linear betas
    0.00085..0.012, 1000 steps; `schedulers.add_noise` / `prediction_target`):

        z0 = scaling_factor * (mu + sigma n),  t ~ U{0..T-1},  eps ~ N(0, I)
        z_t = sqrt(acp_t) z0 + sqrt(1 - acp_t) eps
        L_unet = mean || UNet(z_t, t, CLIP(prompt)) - eps ||^2     (v / x0 targets optional)

    The prompt of each image at each step is drawn uniformly from prompts_by_class[its class]
    (the attribute stage's prompts, e.g. "a photo of a seven, handwritten, thick strokes");
    with probability cfg_drop it is "" instead, which trains the unconditional branch that
    classifier-free guidance uses at sampling time (the generation stage uses the row's
    negative prompt, "" when it has none, as that branch; since this model only ever saw ""
    there, rows meant for it should carry an empty negative prompt: with SD's long "blurry,
    low quality, ..." negative the digits were less recognizable in our measurement). Optional
    EMA of the UNet and text encoder weights (ema_decay > 0; the saved weights are then the
    EMA ones).

Optimizer: AdamW (optax ``scale_by_adam`` + decoupled weight decay, after global-norm
clipping), learning rate warmed up linearly then cosine-decayed to 5% (`learning_rate`,
evaluated on the host and passed to the step, so configs that differ only in step counts or
rates share one compiled step). The optimizer state is one flat vector over all parameters:
with hundreds of parameter leaves, per-leaf updates doubled XLA's compile time of the step
(~30 s on 2 CPU cores for the UNet), which matters in a 5-minute budget. Parameters are
initialized on the host with Flax's default initializers (`_init_params`). Probe losses (in
the summary): the training loss of a fixed batch with fixed randomness, before and after each
phase, through the step function with lr = 0.

Defaults (MNIST-5k's 3,000-image demo train split, 2 CPU cores): VAE 250 steps x 32 images
at lr 2e-3, then UNet + text encoder 2,200 steps x 16 images at lr 4e-3. Many small steps
beat fewer large ones, and see fewer images (35,200 against 51,200). Measured with
configs/demo.py's sampling (DPM-Solver++ 2M, 20 steps, empty negative prompt) on 200
generated digits (20 per class, the demo's prompts): an RBF SVM on the real train split's
pixels (0.942 on the real test split) assigns 98.5% of them to the prompted class at
guidance 3 and 100% at guidance 5 (999 of the demo's 1,000-image pool at guidance 5); the
earlier defaults, UNet 800 steps x 64 at lr 2e-3, gave 86% and 93% (their 9s, 8s and 5s
were the ones taken for other digits).
Budget: 327 s in an earlier run on a lightly loaded machine; 1,298 s (VAE 408 s, UNet 865 s)
in a `make demo` run whose 2 cores were shared with other jobs (load average 3.5-9); the
earlier defaults' UNet phase took 1,349 s on the same busy machine (load 3-7).

Files:

    out_dir/                      the pipeline in the diffusers layout (save_pipeline), plus
    out_dir/train_generator.json  the done marker: config, data fingerprint, summary
    work_dir/checkpoint.msgpack   params + optimizer states (+ EMA) + phase + step + metadata
                                  (flax.serialization msgpack, written atomically)
    work_dir/tokenizer/           the CLIP tokenizer files (clip_text.write_tokenizer_files)

work_dir defaults to ``<out_dir>_work`` (a sibling) and is removed once out_dir is complete.

Resuming: a checkpoint is written every ``checkpoint_every`` steps, at the end of each phase and
when ``max_steps`` stops a run; a rerun continues from it. Every random draw is a pure function
of (seed, phase, step) -- data order (a seeded permutation per epoch), prompts and dropout,
timesteps and noise -- so an interrupted and resumed run gives the same params as an
uninterrupted one. A finished out_dir whose marker records the same config and data is not
retrained; a different config (or different training data / prompts) is refused with a message
naming the fields.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.flatten_util import ravel_pytree

from synthbandit_jax import io as sio
from synthbandit_jax import xla_options
from synthbandit_jax.data import images as imlib
from synthbandit_jax.generation import diffusion, schedulers
from synthbandit_jax.models import clip_text, unet as unet_lib, vae as vae_lib

log = logging.getLogger(__name__)

PyTree = Any

MARKER = "train_generator.json"
CHECKPOINT = "checkpoint.msgpack"
FITS = ("resize", "pad")
VAE_LOSSES = ("l1", "l2")
# Fields that do not change the trained model (a resume / finished dir may differ in them).
_NOT_IDENTITY = ("checkpoint_every",)
# Phase ids folded into the seed so the phases draw independent random streams.
_PHASE_VAE, _PHASE_UNET, _PHASE_INIT, _PHASE_SCALE = 1, 2, 3, 4
_PROBE_STEP = 2 ** 31 - 1  # the step index whose randomness the probe losses use


# --------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """Architecture and training settings (defaults: MNIST-5k's train split on 2 CPU cores).

  Shapes: 32x32x3 images -> a 3-block VAE (downscale 4) -> 8x8x4 latents -> a 3-block UNet
  (8, 4, 2 pixels; cross-attention at 4 and 2 and in the mid block, head size 8) conditioned
  on a 2-layer, 64-wide CLIP text encoder over CLIP's real 49,408-token BPE vocabulary. The
  defaults train in about 5.5 minutes on 2 CPU cores (budget and the recognisability of
  the digits in the module docstring).
  """
  image_size: int = 32
  fit: str = "resize"  # "resize" (bilinear stretch) | "pad" (centred zero padding)
  # VAE (diffusers AutoencoderKL).
  vae_block_out_channels: tuple[int, ...] = (16, 32, 64)
  vae_layers_per_block: int = 1
  vae_norm_num_groups: int = 8
  latent_channels: int = 4
  vae_steps: int = 250
  vae_batch_size: int = 32
  vae_learning_rate: float = 2e-3
  vae_loss: str = "l1"
  vae_kl_weight: float = 1e-4
  # UNet (diffusers UNet2DConditionModel; num_attention_heads = heads per block).
  unet_block_out_channels: tuple[int, ...] = (32, 64, 64)
  unet_down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D",
                                            "CrossAttnDownBlock2D")
  unet_up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                          "UpBlock2D")
  unet_layers_per_block: int = 1
  unet_attention_heads: tuple[int, ...] = (4, 8, 8)
  unet_norm_num_groups: int = 8
  # CLIP text encoder (transformers CLIPTextModel); the vocabulary is CLIP's BPE.
  text_vocab_size: int = clip_text.VOCAB_SIZE
  text_hidden_size: int = 64
  text_num_layers: int = 2
  text_num_heads: int = 4
  text_intermediate_size: int = 128
  text_max_positions: int = 77
  # Noise schedule (Stable Diffusion 1.5's).
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"
  # UNet + text encoder training.
  unet_steps: int = 2200
  unet_batch_size: int = 16
  unet_learning_rate: float = 4e-3
  warmup_steps: int = 50
  weight_decay: float = 1e-4
  grad_clip: float = 1.0
  cfg_drop: float = 0.1
  ema_decay: float = 0.0
  seed: int = 0
  checkpoint_every: int = 500

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, list):
        object.__setattr__(self, f.name, tuple(value))
    ints = ("image_size", "vae_layers_per_block", "vae_norm_num_groups", "latent_channels",
            "vae_steps", "vae_batch_size", "unet_layers_per_block", "unet_norm_num_groups",
            "text_vocab_size", "text_hidden_size", "text_num_layers", "text_num_heads",
            "text_intermediate_size", "text_max_positions", "num_train_timesteps",
            "unet_steps", "unet_batch_size", "checkpoint_every")
    for name in ints:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"GeneratorConfig.{name}={value!r} must be a positive integer")
    for name in ("warmup_steps", "seed"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"GeneratorConfig.{name}={value!r} must be a non-negative integer")
    for name in ("vae_learning_rate", "unet_learning_rate"):
      if not getattr(self, name) > 0:
        raise ValueError(f"GeneratorConfig.{name}={getattr(self, name)!r} must be positive")
    for name in ("vae_kl_weight", "weight_decay", "grad_clip"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"GeneratorConfig.{name}={getattr(self, name)!r} must be >= 0")
    if not 0.0 <= self.cfg_drop < 1.0:
      raise ValueError(f"GeneratorConfig.cfg_drop={self.cfg_drop!r} must be in [0, 1)")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"GeneratorConfig.ema_decay={self.ema_decay!r} must be in [0, 1) "
                       "(0 = no EMA)")
    if self.fit not in FITS:
      raise ValueError(f"GeneratorConfig.fit={self.fit!r} must be one of {FITS}")
    if self.vae_loss not in VAE_LOSSES:
      raise ValueError(f"GeneratorConfig.vae_loss={self.vae_loss!r} must be one of "
                       f"{VAE_LOSSES}")
    if self.text_max_positions < 77:
      raise ValueError(f"GeneratorConfig.text_max_positions={self.text_max_positions} must be "
                       ">= 77: the pipeline tokenizes every prompt to 77 tokens")
    factor = 2 ** (len(self.vae_block_out_channels) - 1)
    unet_factor = 2 ** (len(self.unet_block_out_channels) - 1)
    if self.image_size % (factor * unet_factor):
      raise ValueError(
          f"GeneratorConfig.image_size={self.image_size} must be a multiple of {factor} (VAE "
          f"downscale, from vae_block_out_channels) x {unet_factor} (UNet downscale, from "
          "unet_block_out_channels)")
    # Build the component configs once: their own checks name the offending value.
    try:
      self.vae_config()
      self.unet_config()
      self.text_config()
      self.scheduler_config()
    except ValueError as e:
      raise ValueError(f"GeneratorConfig: {e}") from e

  @property
  def latent_size(self) -> int:
    return self.image_size // 2 ** (len(self.vae_block_out_channels) - 1)

  def vae_config(self, scaling_factor: float = 1.0) -> vae_lib.VAEConfig:
    n = len(self.vae_block_out_channels)
    return vae_lib.VAEConfig(
        in_channels=3, out_channels=3, latent_channels=self.latent_channels,
        block_out_channels=tuple(int(c) for c in self.vae_block_out_channels),
        layers_per_block=self.vae_layers_per_block, norm_num_groups=self.vae_norm_num_groups,
        scaling_factor=float(scaling_factor), down_block_types=(vae_lib.DOWN_BLOCK,) * n,
        up_block_types=(vae_lib.UP_BLOCK,) * n, sample_size=self.image_size)

  def unet_config(self) -> unet_lib.UNetConfig:
    return unet_lib.UNetConfig(
        sample_size=self.latent_size, in_channels=self.latent_channels,
        out_channels=self.latent_channels,
        block_out_channels=tuple(int(c) for c in self.unet_block_out_channels),
        down_block_types=tuple(self.unet_down_block_types),
        up_block_types=tuple(self.unet_up_block_types),
        layers_per_block=self.unet_layers_per_block,
        num_attention_heads=tuple(int(h) for h in self.unet_attention_heads),
        cross_attention_dim=self.text_hidden_size, norm_num_groups=self.unet_norm_num_groups)

  def text_config(self) -> clip_text.CLIPTextConfig:
    return clip_text.CLIPTextConfig(
        vocab_size=self.text_vocab_size, hidden_size=self.text_hidden_size,
        intermediate_size=self.text_intermediate_size, num_hidden_layers=self.text_num_layers,
        num_attention_heads=self.text_num_heads, max_position_embeddings=self.text_max_positions,
        hidden_act="quick_gelu")

  def scheduler_config(self) -> schedulers.SchedulerConfig:
    return schedulers.SchedulerConfig(
        num_train_timesteps=self.num_train_timesteps, beta_start=float(self.beta_start),
        beta_end=float(self.beta_end), beta_schedule=self.beta_schedule,
        prediction_type=self.prediction_type)


def config_defaults() -> dict:
  """GeneratorConfig's fields and defaults as a plain dict (for an ml_collections config).

  ``seed`` is -1 here: "the run seed" (`config_from_dict`'s ``seed`` argument).
  """
  out = _config_dict(GeneratorConfig())
  out["seed"] = -1
  return out


def config_from_dict(d: Mapping[str, Any], *, seed: int | None = None) -> GeneratorConfig:
  """A GeneratorConfig from a dict of (some of) its fields; unknown keys are an error.

  A ``seed`` of -1 (or none in `d`) takes the `seed` argument (the pipeline's run seed), or 0.
  """
  names = {f.name for f in dataclasses.fields(GeneratorConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"generator config has unknown key(s) {unknown}; valid keys: "
                     f"{sorted(names)}")
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  if int(kw.get("seed", -1)) < 0:
    kw["seed"] = int(seed) if seed is not None else 0
  return GeneratorConfig(**kw)


def _config_dict(config: GeneratorConfig) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(config)))


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  keys = sorted((set(old) | set(new)) - set(_NOT_IDENTITY))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# --------------------------------------------------------------------------------- data


def prepare_images(images: np.ndarray, size: int, fit: str = "resize") -> np.ndarray:
  """uint8 NHWC (or NHW), 1/3/4 channels, any size -> uint8 (N, size, size, 3).

  "resize": bilinear stretch to size x size; "pad": centred zero padding (images must not be
  larger than `size`). Gray is replicated to 3 channels.
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 NHWC (or NHW), got {images.dtype} {images.shape}")
  if fit == "resize":
    return imlib.prepare_images(images, channels=3, size=(size, size))
  if fit != "pad":
    raise ValueError(f"fit={fit!r} must be one of {FITS}")
  rgb = imlib.prepare_images(images, channels=3)
  n, h, w, _ = rgb.shape
  if h > size or w > size:
    raise ValueError(f"fit='pad': images are {h}x{w}, larger than image_size={size}; use "
                     "fit='resize' or a larger image_size")
  top, left = (size - h) // 2, (size - w) // 2
  out = np.zeros((n, size, size, 3), np.uint8)
  out[:, top:top + h, left:left + w] = rgb
  return out


@dataclasses.dataclass
class _Prompts:
  """All prompts tokenized once: rows of `ids` per class, and the empty prompt last."""
  ids: np.ndarray  # int32 [P + 1, 77]
  offsets: np.ndarray  # int64 [K]: first row of class k
  counts: np.ndarray  # int64 [K]: rows of class k
  empty: int  # row of ""


def _tokenize_prompts(tokenizer, class_names: Sequence[str],
                      prompts_by_class: Mapping[str, Sequence[str]]) -> _Prompts:
  texts, offsets, counts = [], [], []
  for name in class_names:
    rows = list(prompts_by_class.get(name, ()))
    offsets.append(len(texts))
    counts.append(len(rows))
    texts.extend(rows)
  ids = clip_text.tokenize(tokenizer, texts + [""])
  return _Prompts(ids=ids, offsets=np.asarray(offsets, np.int64),
                  counts=np.asarray(counts, np.int64), empty=len(texts))


def _check_inputs(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                  prompts_by_class: Mapping[str, Sequence[str]]) -> None:
  if len(images) != len(labels):
    raise ValueError(f"train_generator: {len(images)} images but {len(labels)} labels")
  if len(images) == 0:
    raise ValueError("train_generator: no training images")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"train_generator: labels must be integers [N], got {labels.dtype} "
                     f"{labels.shape}")
  if labels.min() < 0 or labels.max() >= len(class_names):
    raise ValueError(f"train_generator: labels must index class_names (0..{len(class_names) - 1})"
                     f", got [{labels.min()}, {labels.max()}]")
  if not isinstance(prompts_by_class, Mapping):
    raise TypeError("train_generator: prompts_by_class must be a dict {class name: [prompts]}")
  used = sorted({class_names[i] for i in np.unique(labels)})
  missing = [c for c in used if not list(prompts_by_class.get(c, ()))]
  if missing:
    raise ValueError(f"train_generator: prompts_by_class has no prompts for class(es) {missing} "
                     f"(it has {sorted(prompts_by_class)}); every class with training images "
                     "needs at least one prompt (the attribute stage's prompts.jsonl)")
  for c, rows in prompts_by_class.items():
    bad = [p for p in rows if not isinstance(p, str) or not p.strip()]
    if bad:
      raise ValueError(f"train_generator: prompts_by_class[{c!r}] has empty or non-string "
                       f"prompts, e.g. {bad[0]!r}")


def _data_fingerprint(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                      prompts_by_class: Mapping[str, Sequence[str]]) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([list(images.shape), str(images.dtype)]).encode())
  h.update(np.ascontiguousarray(images).tobytes())
  h.update(np.asarray(labels, np.int64).tobytes())
  h.update(json.dumps([list(map(str, class_names)),
                       {str(k): list(v) for k, v in sorted(prompts_by_class.items())}],
                      ensure_ascii=False).encode())
  return h.hexdigest()


def _batch_indices(n: int, batch: int, step: int, seed: int, phase: int,
                   cache: dict) -> np.ndarray:
  """Indices of batch `step`: consecutive slices of a seeded permutation per epoch."""
  pos = np.arange(step * batch, (step + 1) * batch, dtype=np.int64)
  epochs = pos // n
  out = np.empty(batch, np.int64)
  for e in np.unique(epochs):
    if e not in cache:
      if len(cache) > 4:
        cache.clear()
      cache[e] = np.random.default_rng(np.random.SeedSequence([seed, phase, int(e)])
                                       ).permutation(n)
    m = epochs == e
    out[m] = cache[e][pos[m] % n]
  return out


# ------------------------------------------------------------------------------- models


@dataclasses.dataclass
class _Models:
  vae: vae_lib.AutoencoderKL
  unet: unet_lib.UNet2DConditionModel
  text: clip_text.CLIPTextEncoder
  sched: schedulers.SchedulerConfig


def _models(config: GeneratorConfig) -> _Models:
  return _Models(vae_lib.AutoencoderKL(config.vae_config()),
                 unet_lib.UNet2DConditionModel(config.unet_config()),
                 clip_text.CLIPTextEncoder(config.text_config()), config.scheduler_config())


def _key(seed: int, *path: int) -> jax.Array:
  k = jax.random.key(int(seed) & 0xFFFFFFFF)
  for p in path:
    k = jax.random.fold_in(k, int(p))
  return k


def _init_params(shapes: PyTree, seed: int, component: int) -> PyTree:
  """Flax's default initializers, drawn with numpy from (seed, component).

  Kernels: LeCun normal (truncated at 2 sigma, std 1/sqrt(fan_in) after truncation), biases
  0, norm scales 1, embeddings N(0, 1/features). Drawn on the host because Flax's own `init`
  runs the forward pass, which costs 10-30 s of XLA compilation on 2 CPU cores.
  """
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), _PHASE_INIT, component]))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, leaf in leaves:
    name = getattr(path[-1], "key", str(path[-1]))
    shape = tuple(leaf.shape)
    if name == "kernel":
      std = math.sqrt(1.0 / math.prod(shape[:-1])) / 0.87962566103423978
      x = rng.standard_normal(shape)
      bad = np.abs(x) > 2.0
      while bad.any():
        x[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(x) > 2.0
      value = x * std
    elif name == "embedding":
      value = rng.standard_normal(shape) / math.sqrt(shape[-1])
    elif name == "scale":
      value = np.ones(shape)
    elif name == "bias":
      value = np.zeros(shape)
    else:
      raise ValueError(f"no initializer for parameter {jax.tree_util.keystr(path)}")
    out.append(jnp.asarray(np.asarray(value, np.float32)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _init_vae(config: GeneratorConfig) -> PyTree:
  return _init_params(vae_lib.param_shapes(config.vae_config()), config.seed, 0)


def _init_denoiser(config: GeneratorConfig) -> PyTree:
  return {"text_encoder": _init_params(clip_text.param_shapes(config.text_config()),
                                       config.seed, 1),
          "unet": _init_params(unet_lib.param_shapes(config.unet_config()), config.seed, 2)}


def learning_rate(peak: float, steps: int, warmup: int, step: int) -> np.float32:
  """Linear warmup from 0 over `warmup` steps, then cosine decay to 5% of `peak` at `steps`
  (optax.warmup_cosine_decay_schedule's formula, evaluated on the host)."""
  warmup = min(int(warmup), max(0, steps - 1))
  if warmup and step < warmup:
    return np.float32(peak * step / warmup)
  frac = min(max(step - warmup, 0), max(steps - warmup, 1)) / max(steps - warmup, 1)
  end = 0.05 * peak
  return np.float32(end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _optimizer(weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
  """AdamW's direction after global-norm clipping; the step multiplies it by -lr(step), so
  one compiled step serves every schedule (lr is an argument, not a constant)."""
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.scale_by_adam())
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  return optax.chain(*parts)


def opt_init(tx: optax.GradientTransformation, params: PyTree) -> PyTree:
  """``tx.init(params)`` built on the host, for `_optimizer`'s transforms, whose initial state
  is all zeros (Adam's moments and count; clipping and weight decay keep none). Eager
  ``tx.init`` compiles one XLA program per parameter shape (seconds on CPU)."""
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, params))


def ravel(params: PyTree) -> np.ndarray:
  """The params as one float32 vector, in `jax.flatten_util.ravel_pytree`'s order (host)."""
  return np.concatenate([np.asarray(l, np.float32).ravel() for l in jax.tree.leaves(params)])


def unravel(flat: np.ndarray, like: PyTree) -> PyTree:
  """The inverse of `ravel` for a tree shaped like `like` (host numpy)."""
  flat = np.asarray(flat)
  leaves, treedef = jax.tree.flatten(like)
  out, at = [], 0
  for leaf in leaves:
    size = int(np.prod(np.shape(leaf)))
    out.append(flat[at:at + size].reshape(np.shape(leaf)))
    at += size
  if at != flat.size:
    raise ValueError(f"unravel: vector has {flat.size} values, the tree needs {at}")
  return jax.tree.unflatten(treedef, out)


def _apply(tx: optax.GradientTransformation, state: dict, grads: PyTree, lr: jax.Array):
  """One optimizer update. Params stay a tree (for the model); the optimizer works on one
  flat vector, which halves XLA's compile time of the step (hundreds of leaves -> one)."""
  flat_p, unravel_fn = ravel_pytree(state["params"])
  flat_g, _ = ravel_pytree(grads)
  updates, opt = tx.update(flat_g, state["opt"], flat_p)
  flat_p = flat_p - lr * updates
  return unravel_fn(flat_p), flat_p, opt


def _step_key(seed: jax.Array, phase: int, step_index: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), phase), step_index)


def _vae_loss_fn(models: _Models, config: GeneratorConfig):
  def loss_fn(params, x, key):
    mean, logvar = models.vae.apply({"params": params}, x, method=vae_lib.AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    y = models.vae.apply({"params": params}, z, method=vae_lib.AutoencoderKL.decode)
    diff = y - x
    rec = jnp.mean(jnp.abs(diff)) if config.vae_loss == "l1" else jnp.mean(jnp.square(diff))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return rec + config.vae_kl_weight * kl, (rec, kl)
  return loss_fn


def _vae_step_fn(models: _Models, config: GeneratorConfig, tx: optax.GradientTransformation):
  loss_fn = _vae_loss_fn(models, config)

  def step(state, x, seed, step_index, lr):
    key = _step_key(seed, _PHASE_VAE, step_index)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], x, key)
    params, _, opt = _apply(tx, state, grads, lr)
    return {"params": params, "opt": opt}, loss

  return xla_options.jit(step)


def _denoise_loss_fn(models: _Models):
  def loss_fn(params, z0, ids, t, eps):
    x_t = schedulers.add_noise(models.sched, z0, eps, t)
    target = schedulers.prediction_target(models.sched, z0, eps, t)
    ctx = models.text.apply({"params": params["text_encoder"]}, ids)[0]
    out = models.unet.apply({"params": params["unet"]}, x_t, t, ctx).astype(jnp.float32)
    return jnp.mean(jnp.square(out - target))
  return loss_fn


def _unet_step_fn(models: _Models, config: GeneratorConfig, tx: optax.GradientTransformation):
  loss_fn = _denoise_loss_fn(models)
  ema_decay = float(config.ema_decay)

  def step(state, mean, logvar, ids, seed, step_index, lr, scale):
    kz, kt, ke = jax.random.split(_step_key(seed, _PHASE_UNET, step_index), 3)
    z0 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(kz, mean.shape)) * scale
    t = jax.random.randint(kt, (mean.shape[0],), 0, config.num_train_timesteps)
    eps = jax.random.normal(ke, mean.shape, jnp.float32)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], z0, ids, t, eps)
    params, flat, opt = _apply(tx, state, grads, lr)
    new = {"params": params, "opt": opt}
    if ema_decay > 0:  # over the flat vector (see _apply)
      n = step_index.astype(jnp.float32)
      d = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
      new["ema"] = d * state["ema"] + (1.0 - d) * flat
    return new, loss

  return xla_options.jit(step)


@dataclasses.dataclass(frozen=True)
class _Compiled:
  """The models, optimizers and jitted functions of one config (built once per process)."""
  models: _Models
  vae_tx: optax.GradientTransformation
  unet_tx: optax.GradientTransformation
  vae_step: Callable  # (state, x, seed, step, lr) -> (state, loss)
  encode: Callable  # (params, x) -> (mean, logvar)
  unet_step: Callable  # (state, mean, logvar, ids, seed, step, lr, scale) -> (state, loss)


def _compiled(config: GeneratorConfig) -> _Compiled:
  # Step counts, learning rates, warmup, seed and cfg_drop are arguments or host-side: configs
  # that differ only in them share the compiled functions.
  return _compiled_for(dataclasses.replace(
      config, vae_steps=1, unet_steps=1, warmup_steps=0, vae_learning_rate=1.0,
      unet_learning_rate=1.0, seed=0, cfg_drop=0.0, checkpoint_every=1))


@functools.lru_cache(maxsize=4)
def _compiled_for(config: GeneratorConfig) -> _Compiled:
  models = _models(config)
  vae_tx = _optimizer(0.0, config.grad_clip)
  unet_tx = _optimizer(config.weight_decay, config.grad_clip)
  vae = models.vae
  return _Compiled(
      models=models, vae_tx=vae_tx, unet_tx=unet_tx,
      vae_step=_vae_step_fn(models, config, vae_tx),
      encode=xla_options.jit(lambda p, x: vae.apply({"params": p}, x,
                                            method=vae_lib.AutoencoderKL.encode)),
      unet_step=_unet_step_fn(models, config, unet_tx))


@jax.jit
def _sample_latents(mean, logvar, key):
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)


def encode_dataset(encode: Callable, params: PyTree, x: np.ndarray,
                   batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
  """Posterior (mean, logvar) of every image (float32 in [-1, 1]) in fixed-size batches;
  `encode` is ``(params, x) -> (mean, logvar)``."""
  means, logvars = [], []
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    pad = batch_size - len(chunk) if len(x) > batch_size else 0
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)], axis=0)
    m, lv = encode(params, jnp.asarray(chunk))
    keep = len(chunk) - pad
    means.append(np.asarray(m)[:keep])
    logvars.append(np.asarray(lv)[:keep])
  return np.concatenate(means), np.concatenate(logvars)


def latent_scaling_factor(mean: np.ndarray, logvar: np.ndarray, seed: int) -> float:
  """1 / std of posterior samples of the whole training set (SD's recipe)."""
  z = np.asarray(_sample_latents(jnp.asarray(mean), jnp.asarray(logvar),
                                 _key(seed, _PHASE_SCALE)), np.float64)
  std = float(z.std())
  if not math.isfinite(std) or std <= 0:
    raise ValueError(f"the trained VAE's latents have std {std}; cannot scale them (did the VAE "
                     "training diverge? lower vae_learning_rate)")
  return 1.0 / std


# -------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, meta: dict, tree: PyTree) -> None:
  blob = serialization.msgpack_serialize({
      "meta": json.dumps(meta), "state": serialization.to_state_dict(jax.device_get(tree))})
  sio.atomic_write_bytes(path, blob)


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
  try:
    raw = serialization.msgpack_restore(path.read_bytes())
    return json.loads(raw["meta"]), raw["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"generator checkpoint {path} is unreadable ({e}); delete it to start "
                     "the training over") from e


def _restore(template: PyTree, state: dict, where: Path) -> PyTree:
  try:
    tree = serialization.from_state_dict(template, state)
  except (ValueError, KeyError) as e:
    raise ValueError(f"generator checkpoint {where} does not fit the model ({e}); delete it to "
                     "start the training over") from e
  return jax.tree.map(lambda t, r: jnp.asarray(np.asarray(r, dtype=np.asarray(t).dtype)),
                      template, tree)


# ----------------------------------------------------------------------------- training


def _tokenizer(work_dir: Path, bpe_path: str | os.PathLike | None):
  tok_dir = work_dir / "tokenizer"
  if not (tok_dir / "vocab.json").is_file() or not (tok_dir / "merges.txt").is_file():
    clip_text.write_tokenizer_files(tok_dir, bpe_path)
  return clip_text.load_tokenizer(tok_dir)


def _progress_bar(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, desc="generator", unit="step",
              disable=not enabled)


class _Tracker:
  """Loss history (device scalars fetched lazily), progress bar and log lines."""

  def __init__(self, bar, log_every: int, history: list[float], phase: str):
    self.bar, self.log_every, self.history, self.phase = bar, log_every, history, phase
    self.pending: list[Any] = []
    self.t0 = time.perf_counter()
    self.steps = 0

  def add(self, loss: Any, step: int, total: int) -> None:
    self.pending.append(loss)
    self.steps += 1
    self.bar.update(1)
    if self.steps % 10 == 0 or step == total or (self.log_every and step % self.log_every == 0):
      self.flush()
      rate = self.steps / max(time.perf_counter() - self.t0, 1e-9)
      recent = float(np.mean(self.history[-10:]))
      self.bar.set_postfix_str(f"{self.phase} loss {recent:.4f} {rate:.2f} steps/s")
      if self.log_every and (step % self.log_every == 0 or step == total):
        log.info("generator %s step %d/%d: loss %.4f (%.2f steps/s)", self.phase, step, total,
                 recent, rate)

  def flush(self) -> None:
    if self.pending:
      self.history.extend(float(v) for v in jax.device_get(self.pending))
      self.pending = []


def train_generator(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                    prompts_by_class: Mapping[str, Sequence[str]], out_dir: str | os.PathLike,
                    config: GeneratorConfig = GeneratorConfig(), *,
                    work_dir: str | os.PathLike | None = None, progress: bool = True,
                    log_every: int = 100, max_steps: int | None = None,
                    bpe_path: str | os.PathLike | None = None) -> dict:
  """Trains the VAE, then UNet + text encoder, and saves the pipeline to `out_dir`.

  Args:
    images: uint8 NHWC (or NHW) training images, gray or RGB, any size (see `prepare_images`).
    labels: int [N], indices into `class_names`.
    class_names: the class names; `prompts_by_class` is keyed by them.
    prompts_by_class: {class name: [prompts]}; each image's prompt is drawn from its class's
      list at every step ("" with probability cfg_drop).
    out_dir: where the diffusers-format pipeline goes (replaced whole when saved).
    config: the GeneratorConfig.
    work_dir: checkpoint + tokenizer directory (default: ``<out_dir>_work``), removed when done.
    progress: show a tqdm bar (loss, steps/s).
    log_every: log a line every this many steps of each phase (0 = never).
    max_steps: stop (after checkpointing) once this many steps (VAE + UNet, counted from the
      start of training, not of this call) are done; a later call resumes. None = finish.
    bpe_path: CLIP's bpe_simple_vocab_16e6.txt.gz (None fetches the clip_bpe_vocab asset).

  Returns:
    A summary: ``complete`` (False when max_steps stopped it), ``skipped`` (out_dir was
    already trained with this config and data), step counts, first / last / probe losses,
    ``scaling_factor``, per-phase wall times (seconds, summed over resumed calls) and the full
    loss histories (``vae_losses``, ``unet_losses``).

  Raises:
    ValueError: a finished out_dir or a checkpoint was made with another config (the message
      names the fields) or other data; invalid inputs.
  """
  t_start = time.perf_counter()
  out_dir = Path(out_dir)
  work_dir = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + "_work")
  images = np.asarray(images)
  labels = np.asarray(labels)
  class_names = [str(c) for c in class_names]
  _check_inputs(images, labels, class_names, prompts_by_class)
  cfg_dict = _config_dict(config)
  fingerprint = _data_fingerprint(images, labels, class_names, prompts_by_class)

  marker = out_dir / MARKER
  if marker.is_file():
    done = sio.read_json(marker)
    diff = _config_diff(done.get("config", {}), cfg_dict)
    if diff:
      raise ValueError(f"{out_dir} was trained with another generator config ({'; '.join(diff)})"
                       f"; delete {out_dir} to retrain it, or write to another directory")
    if done.get("data_sha256") != fingerprint:
      raise ValueError(f"{out_dir} was trained on other data (training images, labels, class "
                       f"names or prompts differ); delete {out_dir} to retrain it")
    log.info("generator %s is already trained with this config; not retraining", out_dir)
    return {**done.get("summary", {}), "skipped": True}
  ckpt_path = work_dir / CHECKPOINT
  if out_dir.exists() and any(out_dir.iterdir()) and not ckpt_path.is_file():
    raise FileExistsError(f"{out_dir} exists but is not a finished generator (no {MARKER}) and "
                          f"there is no checkpoint in {work_dir}; delete it or choose another "
                          "out_dir")

  comp = _compiled(config)
  models = comp.models
  tokenizer = _tokenizer(work_dir, bpe_path)
  if len(tokenizer) > config.text_vocab_size:
    raise ValueError(f"GeneratorConfig.text_vocab_size={config.text_vocab_size} is smaller than "
                     f"the tokenizer's vocabulary ({len(tokenizer)})")
  prompts = _tokenize_prompts(tokenizer, class_names, prompts_by_class)
  x_all = prepare_images(images, config.image_size, config.fit).astype(np.float32)
  x_all = x_all / 127.5 - 1.0
  n = len(x_all)

  vae_tx, unet_tx = comp.vae_tx, comp.unet_tx
  vae_params = _init_vae(config)
  vae_state = {"params": vae_params, "opt": opt_init(vae_tx, ravel(vae_params))}
  den_params = _init_denoiser(config)
  unet_state = {"params": den_params, "opt": opt_init(unet_tx, ravel(den_params))}
  if config.ema_decay > 0:
    unet_state["ema"] = ravel(den_params)

  meta = {"config": cfg_dict, "data_sha256": fingerprint, "phase": "vae", "step": 0,
          "vae_losses": [], "unet_losses": [], "times": {}, "probe": {}}
  resumed_from = 0
  if ckpt_path.is_file():
    old_meta, raw = _read_checkpoint(ckpt_path)
    diff = _config_diff(old_meta.get("config", {}), cfg_dict)
    if diff:
      raise ValueError(f"the generator checkpoint {ckpt_path} was made with another config "
                       f"({'; '.join(diff)}); delete {work_dir} to start over, or use the old "
                       "config")
    if old_meta.get("data_sha256") != fingerprint:
      raise ValueError(f"the generator checkpoint {ckpt_path} was made from other data "
                       f"(images, labels, class names or prompts differ); delete {work_dir} to "
                       "start over")
    restored = _restore({"vae": vae_state, "unet": unet_state}, raw, ckpt_path)
    vae_state, unet_state = restored["vae"], restored["unet"]
    meta = old_meta
    resumed_from = meta["step"] + (config.vae_steps if meta["phase"] == "unet" else 0)
    log.info("generator: resuming from %s (phase %s, step %d)", ckpt_path, meta["phase"],
             meta["step"])

  def checkpoint() -> None:
    _save_checkpoint(ckpt_path, meta, {"vae": vae_state, "unet": unet_state})

  def add_time(name: str, seconds: float) -> None:
    meta["times"][name] = meta["times"].get(name, 0.0) + seconds

  seed_arr = jnp.uint32(int(config.seed) & 0xFFFFFFFF)
  total = config.vae_steps + config.unet_steps
  stop_at = total if max_steps is None else min(total, max(0, int(max_steps)))
  bar = _progress_bar(total, resumed_from, progress)
  stopped = False
  try:
    # ---- phase 1: VAE
    # Probe losses: the training loss of a fixed batch with fixed randomness (the step index
    # _PROBE_STEP, never a training step) through the step function itself with lr = 0 (no
    # extra compilation; the returned state is dropped).
    probe_step, zero = jnp.int32(_PROBE_STEP), jnp.float32(0.0)
    if meta["phase"] == "vae":
      t0 = time.perf_counter()
      step_fn = comp.vae_step
      probe_x = jnp.asarray(x_all[np.arange(config.vae_batch_size) % n])
      vae_probe = lambda st: float(step_fn(st, probe_x, seed_arr, probe_step, zero)[1])
      if meta["step"] == 0:
        meta["probe"]["vae_initial"] = vae_probe(vae_state)
      tracker = _Tracker(bar, log_every, meta["vae_losses"], "vae")
      cache: dict = {}
      while meta["step"] < config.vae_steps:
        if meta["step"] >= stop_at:
          stopped = True
          break
        s = meta["step"]
        idx = _batch_indices(n, config.vae_batch_size, s, config.seed, _PHASE_VAE, cache)
        lr = learning_rate(config.vae_learning_rate, config.vae_steps, config.warmup_steps, s)
        vae_state, loss = step_fn(vae_state, jnp.asarray(x_all[idx]), seed_arr, jnp.int32(s),
                                  lr)
        meta["step"] = s + 1
        tracker.add(loss, s + 1, config.vae_steps)
        if (s + 1) % config.checkpoint_every == 0 and s + 1 < config.vae_steps:
          tracker.flush()
          checkpoint()
      tracker.flush()
      if not stopped:
        meta["probe"]["vae_final"] = vae_probe(vae_state)
        meta["phase"], meta["step"] = "unet", 0
      add_time("vae_s", time.perf_counter() - t0)
      if not stopped:
        checkpoint()

    # ---- phase 2: latents and their scale
    if not stopped:
      t0 = time.perf_counter()
      mean, logvar = encode_dataset(comp.encode, vae_state["params"], x_all)
      scale = latent_scaling_factor(mean, logvar, config.seed)
      meta["scaling_factor"] = scale
      meta["latent_std_unscaled"] = 1.0 / scale
      meta["posterior_std_mean"] = float(np.exp(0.5 * logvar).mean())
      add_time("latents_s", time.perf_counter() - t0)

      # ---- phase 3: UNet + text encoder
      t0 = time.perf_counter()
      step_fn = comp.unet_step
      scale_arr = jnp.float32(scale)
      pidx = np.arange(config.unet_batch_size) % n
      probe_batch = (jnp.asarray(mean[pidx]), jnp.asarray(logvar[pidx]),
                     jnp.asarray(prompts.ids[prompts.offsets[labels[pidx]]]))

      def probe(params):
        st = {**unet_state, "params": params}
        return float(step_fn(st, *probe_batch, seed_arr, probe_step, zero, scale_arr)[1])

      if meta["step"] == 0 and "unet_initial" not in meta["probe"]:
        meta["probe"]["unet_initial"] = probe(unet_state["params"])
      tracker = _Tracker(bar, log_every, meta["unet_losses"], "unet")
      cache = {}
      while meta["step"] < config.unet_steps:
        if config.vae_steps + meta["step"] >= stop_at:
          stopped = True
          break
        s = meta["step"]
        idx = _batch_indices(n, config.unet_batch_size, s, config.seed, _PHASE_UNET, cache)
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, _PHASE_UNET, s]))
        lab = labels[idx]
        rows = prompts.offsets[lab] + np.floor(
            rng.random(len(idx)) * prompts.counts[lab]).astype(np.int64)
        rows = np.where(rng.random(len(idx)) < config.cfg_drop, prompts.empty, rows)
        lr = learning_rate(config.unet_learning_rate, config.unet_steps, config.warmup_steps, s)
        unet_state, loss = step_fn(unet_state, jnp.asarray(mean[idx]), jnp.asarray(logvar[idx]),
                                   jnp.asarray(prompts.ids[rows]), seed_arr, jnp.int32(s), lr,
                                   scale_arr)
        meta["step"] = s + 1
        tracker.add(loss, s + 1, config.unet_steps)
        if (s + 1) % config.checkpoint_every == 0 and s + 1 < config.unet_steps:
          tracker.flush()
          checkpoint()
      tracker.flush()
      if not stopped:
        meta["probe"]["unet_final"] = probe(unet_state["params"])
        if "ema" in unet_state:
          meta["probe"]["unet_final_ema"] = probe(_ema_params(unet_state))
      add_time("unet_s", time.perf_counter() - t0)
      if not stopped:
        checkpoint()
  finally:
    bar.close()

  if stopped:
    add_time("total_s", time.perf_counter() - t_start)
    checkpoint()
    log.info("generator: stopped at step %d of %d (max_steps); checkpoint %s", stop_at, total,
             ckpt_path)
    return _summary(meta, config, complete=False, resumed_from=resumed_from)

  # ---- save
  t0 = time.perf_counter()
  final = _ema_params(unet_state) if "ema" in unet_state else unet_state["params"]
  vcfg = config.vae_config(meta["scaling_factor"])
  pipe = diffusion.Pipeline(
      text_encoder=models.text, unet=models.unet, vae=vae_lib.AutoencoderKL(vcfg),
      tokenizer=tokenizer, params={"text_encoder": final["text_encoder"], "unet": final["unet"],
                                   "vae": vae_state["params"]},
      unet_config=config.unet_config(), vae_config=vcfg,
      scheduler_config=config.scheduler_config(), name=out_dir.name)
  diffusion.save_pipeline(pipe, out_dir)
  add_time("save_s", time.perf_counter() - t0)
  add_time("total_s", time.perf_counter() - t_start)
  summary = _summary(meta, config, complete=True, resumed_from=resumed_from)
  sio.atomic_write_json(marker, {"config": cfg_dict, "data_sha256": fingerprint,
                                 "summary": summary})
  shutil.rmtree(work_dir, ignore_errors=True)
  log.info("generator saved to %s in %.0f s (this call)", out_dir, time.perf_counter() - t_start)
  return summary


def _ema_params(state: dict) -> PyTree:
  return jax.tree.map(jnp.asarray, unravel(jax.device_get(state["ema"]), state["params"]))


def _summary(meta: dict, config: GeneratorConfig, *, complete: bool, resumed_from: int) -> dict:
  vl, ul = meta["vae_losses"], meta["unet_losses"]
  mean_of = lambda xs, a, b: float(np.mean(xs[a:b])) if xs[a:b] else float("nan")
  out = {
      "complete": bool(complete), "skipped": False, "resumed_from_step": int(resumed_from),
      "vae_steps": len(vl), "unet_steps": len(ul),
      "vae_loss_first": mean_of(vl, 0, 10), "vae_loss_last": mean_of(vl, -10, None),
      "unet_loss_first": mean_of(ul, 0, 10), "unet_loss_last": mean_of(ul, -50, None),
      "scaling_factor": float(meta.get("scaling_factor", float("nan"))),
      "posterior_std_mean": float(meta.get("posterior_std_mean", float("nan"))),
      "images_seen": len(vl) * config.vae_batch_size + len(ul) * config.unet_batch_size,
  }
  for k, v in meta["probe"].items():
    out[f"probe_{k}"] = float(v)
  for k, v in meta["times"].items():
    out[f"time_{k}"] = float(v)
  out["vae_losses"] = list(vl)
  out["unet_losses"] = list(ul)
  return out


# --------------------------------------------------------------------------- evaluation


def evaluate_generator(pipeline: diffusion.Pipeline, class_names: Sequence[str],
                       prompts_by_class: Mapping[str, Sequence[str]], n_per_class: int,
                       classifier_fn: Callable[[np.ndarray], np.ndarray], *,
                       settings: diffusion.SampleSettings = diffusion.SampleSettings(
                           sampler="dpmpp_2m", steps=20, guidance_scale=3.0),
                       negative_prompt: str = "", seed: int = 0, batch_size: int = 50
                       ) -> dict:
  """How recognizable the generated images are to a classifier trained on real data.

  Generates `n_per_class` images per class (prompt k of a class = its list's entry k modulo
  its length; noise from `diffusion.image_noise(seed, id)`), passes them as uint8 NHWC RGB to
  `classifier_fn` (-> predicted class indices) and returns {"accuracy", "per_class":
  {name: accuracy}, "images": uint8 array, "labels": int array, "predictions": int array}.
  """
  prompts, labels, ids = [], [], []
  for c, name in enumerate(class_names):
    rows = list(prompts_by_class[name])
    for k in range(n_per_class):
      prompts.append(rows[k % len(rows)])
      labels.append(c)
      ids.append(f"eval-{c:03d}-{k:05d}")
  shape = pipeline.latent_shape(settings)
  out = []
  for i in range(0, len(prompts), batch_size):
    chunk = prompts[i:i + batch_size]
    pad = batch_size - len(chunk)
    noise = diffusion.image_noise(seed, ids[i:i + batch_size] + ids[i:i + 1] * pad, shape)
    imgs = pipeline.generate(chunk + chunk[:1] * pad, noise,
                             [negative_prompt] * batch_size, settings)[:len(chunk)]
    out.append(vae_lib.to_uint8(imgs))
  images = np.concatenate(out)
  labels = np.asarray(labels, np.int64)
  pred = np.asarray(classifier_fn(images)).astype(np.int64)
  per_class = {name: float(np.mean(pred[labels == c] == c)) for c, name in enumerate(class_names)}
  return {"accuracy": float(np.mean(pred == labels)), "per_class": per_class, "images": images,
          "labels": labels, "predictions": pred}
