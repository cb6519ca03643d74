"""XLA compiler options that the project's jitted programs compile with.

On CPU, jaxlib 0.10's XLA hands convolutions to YNNPACK (INDIVIDUAL_CONVOLUTION in XLA's
default YNN fusion list, with INDIVIDUAL_DOT and REDUCE), which runs our convolution-heavy
training steps slower than XLA's own convolution. Measured on the 2-core CPU machine
(jaxlib 0.10.2, float32, batch 32, best of 2-3 epochs; XLA's defaults -> with the XLA_FLAGS
form of `CPU_OPTIONS`, before the SmallCNN's max-pool got its own VJP):

- SmallCNN epoch (benchmarks/train_throughput.py, 4,096 images): 3.47 s -> 2.85 s
- ResNet-18 epoch (512 images, 32x32x3): 37.7 s -> 32.4 s
- VGG-style epoch (512 images, 32x32x3): 3.29 s -> 2.55 s
- ViT-Tiny epoch (512 images): 22.9 s -> 23.6 s (within noise; one patch convolution)
- the offline generator's VAE training step: 0.88 s -> 0.61 s; its UNet step: 0.16 s both

So every jitted function of ours that runs convolutions on CPU passes
`compiler_options()` to `jax.jit`; the other fusions keep XLA's defaults. Off CPU the options
are empty.

Feature extraction (`metrics/features.py`: the Inception and VGG16 forward passes) compiles
with `FEATURE_CPU_OPTIONS`, which also drops REDUCE: with it, YNNPACK takes VGG16's whole
convolution stack into one fusion rooted at its max-pools and runs it slower than XLA's own
convolutions (one pinned core, batch 8 at 224 px: 8.3 s -> 7.4 s per batch,
benchmarks/score_throughput.py vgg16 0.83x -> 0.91x PyTorch; the Inception 1.11x -> 1.10x,
unchanged within noise). Training keeps REDUCE: without it the SmallCNN epoch fell from
1.03x to 0.89x PyTorch at batch 32 (the max-pool reductions). Set
``SYNTHBANDIT_XLA_DEFAULTS=1`` to compile with XLA's own defaults instead; an ``XLA_FLAGS``
entry for the same option also wins over ours.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np
from absl import logging

# XLA's default YNN fusion list minus INDIVIDUAL_CONVOLUTION (what the XLA_FLAGS form
# `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` resolves to on jaxlib
# 0.10.2; per-program options take the full enum names).
CPU_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# Feature extraction: YNNPACK's dot only (see the module docstring).
FEATURE_CPU_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
DEFAULTS_ENV = "SYNTHBANDIT_XLA_DEFAULTS"


@functools.cache
def _cpu_options_compile(items: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib accepts these CPU options (a tiny compile; a jaxlib that renamed an
  option raises, and we then fall back to XLA's defaults with a warning)."""
  options = dict(items)
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError, ValueError, ...)
    logging.warning("XLA compiler options %s not accepted by this jaxlib (%s: %s); using "
                    "XLA's defaults", options, type(e).__name__, str(e)[:200])
    return False
  return True


def compiler_options(backend: str | None = None,
                     cpu_options: dict[str, str] | None = None) -> dict[str, Any] | None:
  """The `compiler_options` for `jax.jit` on `backend` (default: JAX's default backend):
  `cpu_options` (default `CPU_OPTIONS`) on CPU, None elsewhere, None when
  ``SYNTHBANDIT_XLA_DEFAULTS=1`` or when ``XLA_FLAGS`` sets one of the options itself.

  Call it when building a jitted function, not at import: it initialises JAX's backends.
  """
  cpu_options = CPU_OPTIONS if cpu_options is None else cpu_options
  if os.environ.get(DEFAULTS_ENV, "").strip() not in ("", "0"):
    return None
  if (backend or jax.default_backend()) != "cpu":
    return None
  flags = os.environ.get("XLA_FLAGS", "")
  if any(name in flags for name in cpu_options):
    return None
  return dict(cpu_options) if _cpu_options_compile(tuple(sorted(cpu_options.items()))) else None


def jit(fun: Any, *, cpu_options: dict[str, str] | None = None, **kwargs: Any) -> Any:
  """`jax.jit(fun, compiler_options=compiler_options(cpu_options=cpu_options), **kwargs)`.

  For top-level functions only: JAX rejects compiler options on a jit called under another
  trace (call the plain function there; the outer jit's options apply to all of it)."""
  return jax.jit(fun, compiler_options=compiler_options(cpu_options=cpu_options), **kwargs)
