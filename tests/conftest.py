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

Many tests compile the same programs: the same small model trained by several tests, a run
restarted after a kill, each process of a multi-process test, both pytest-xdist workers. The
suite therefore shares one JAX persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`,
every program, however quick to compile) across its workers and their subprocesses; it
replaces the per-test caches that four multi-process tests had set up for themselves.
The directory is new for every pytest run (a temporary directory that the pytest process
which made it deletes at exit), so no test ever sees an executable left over from another
jax/jaxlib, another checkout or another run: within one run an executable is only reused for
the same program compiled with the same options. (Before, the launch scripts that tests run
as subprocesses used the user's own cache, ~/.cache/synthbandit_jax/xla, so the suite's time
depended on what earlier runs had left there.) Measured on 2 idle cores in one session: 680
s before (launch subprocesses on a warm user cache, xdist's default file order), 664 s with
the shared cache and the slowest files first (663 s from a clean clone): about 2%, near the
noise; the summed test times fell from 1311 to 1266 s.

Set SYNTHBANDIT_TEST_COMPILE_CACHE=0 to compile everything afresh: no persistent cache in
the tests, and `--compilation_cache=off` as the launch scripts' default
(SYNTHBANDIT_COMPILATION_CACHE, launch/common.py).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_OPT = "--xla_backend_optimization_level=0"

if os.environ.get("SYNTHBANDIT_TEST_XLA_DEFAULTS", "").strip() in ("", "0"):
  os.environ["SYNTHBANDIT_SUITE_XLA_FLAGS"] = _OPT
  if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _OPT).strip()

_CACHE_ENV = "SYNTHBANDIT_SUITE_COMPILE_CACHE"  # set by the pytest process that made the dir

if os.environ.get("SYNTHBANDIT_TEST_COMPILE_CACHE", "").strip() in ("0", "off"):
  os.environ["SYNTHBANDIT_COMPILATION_CACHE"] = "off"
else:
  if not os.environ.get(_CACHE_ENV):  # the first pytest process: xdist workers inherit it
    _dir = tempfile.mkdtemp(prefix="synthbandit-suite-xla-cache-")
    os.environ[_CACHE_ENV] = _dir
    atexit.register(shutil.rmtree, _dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# Seconds per test file on 2 idle cores (pytest --durations=0, 2026-12-01, summed per file),
# for the files over 20 s. pytest-xdist's `--dist loadfile` hands whole files to the two
# workers in collection order (the Makefile turns off its reordering by test count, which
# put files with few but slow tests, such as the multi-process ones, last); running the
# slowest first and the many short ones at the end keeps both workers busy until the end.
# Only the order changes: every test still runs. A file missing here just runs after these.
_FILE_SECONDS = {
    "test_trainer.py": 102, "test_llama.py": 99, "test_train_generator.py": 95,
    "test_classifiers.py": 94, "test_score_stage.py": 92, "test_generate_stage.py": 90,
    "test_attributes.py": 72, "test_epoch.py": 69, "test_multihost.py": 69,
    "test_diffusion.py": 68, "test_vgg.py": 85, "test_inception.py": 63, "test_unet.py": 58,
    "test_bandits.py": 43, "test_schedulers.py": 29, "test_frozen_features.py": 26,
    "test_vae.py": 22,
}


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Slowest files first (stable: the order inside a file and among the rest is kept)."""
  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda item: (-_FILE_SECONDS.get(item.path.name, 0), order[id(item)]))
