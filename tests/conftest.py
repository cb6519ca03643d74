"""Suite-wide settings, applied before any test module imports JAX.

XLA:CPU compilation is most of this suite's time (hundreds of small programs, each compiled
once). The suite compiles with LLVM at -O0 (`--xla_backend_optimization_level=0`): XLA's
HLO passes are unchanged and, with fast-math off at both levels, LLVM may not reorder float
operations, so results should not change (not checked bit for bit); only the generated
machine code is less optimised. Measured on 2 idle cores (pytest -n 2): 924 s before this
session's test changes; 728 s with -O0 in the main processes plus two test cuts worth ~55 s;
682 s and 620 s (two runs) from a clean clone once the subprocesses got -O0 too. The whole suite passed at
both levels (the default-level run predates two small edits: a 75 px scoring test and a
12-token SmolLM2 test). The library itself never sets this: runs and benchmarks compile
at XLA's default.

Set SYNTHBANDIT_TEST_XLA_DEFAULTS=1 to run the suite at XLA's default optimisation level.
Subprocesses that set their own XLA_FLAGS append $SYNTHBANDIT_SUITE_XLA_FLAGS
(`tests.xla_flags()`).
"""
from __future__ import annotations

import os

_OPT = "--xla_backend_optimization_level=0"

if os.environ.get("SYNTHBANDIT_TEST_XLA_DEFAULTS", "").strip() in ("", "0"):
  os.environ["SYNTHBANDIT_SUITE_XLA_FLAGS"] = _OPT
  if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _OPT).strip()
