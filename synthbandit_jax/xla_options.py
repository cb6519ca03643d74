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
are empty. Set ``SYNTHBANDIT_XLA_DEFAULTS=1`` to compile with XLA's own defaults instead;
an ``XLA_FLAGS`` entry for the same option also wins over ours.
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
DEFAULTS_ENV = "SYNTHBANDIT_XLA_DEFAULTS"


@functools.cache
def _cpu_options_compile() -> bool:
  """Whether this jaxlib accepts CPU_OPTIONS (a tiny compile; a jaxlib that renamed the
  option raises, and we then fall back to XLA's defaults with a warning)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError, ValueError, ...)
    logging.warning("XLA compiler options %s not accepted by this jaxlib (%s: %s); using "
                    "XLA's defaults", CPU_OPTIONS, type(e).__name__, str(e)[:200])
    return False
  return True


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
  """The `compiler_options` for `jax.jit` on `backend` (default: JAX's default backend):
  `CPU_OPTIONS` on CPU, None elsewhere, None when ``SYNTHBANDIT_XLA_DEFAULTS=1`` or when
  ``XLA_FLAGS`` sets one of the options itself.

  Call it when building a jitted function, not at import: it initialises JAX's backends.
  """
  if os.environ.get(DEFAULTS_ENV, "").strip() not in ("", "0"):
    return None
  if (backend or jax.default_backend()) != "cpu":
    return None
  flags = os.environ.get("XLA_FLAGS", "")
  if any(name in flags for name in CPU_OPTIONS):
    return None
  return dict(CPU_OPTIONS) if _cpu_options_compile() else None


def jit(fun: Any, **kwargs: Any) -> Any:
  """`jax.jit(fun, compiler_options=compiler_options(), **kwargs)`.

  For top-level functions only: JAX rejects compiler options on a jit called under another
  trace (call the plain function there; the outer jit's options apply to all of it)."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
