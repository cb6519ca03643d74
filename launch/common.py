"""Shared pieces of the absl launch scripts: the common flags (config, workdir, progress and
jax.distributed), config-override validation, logging, and the multi-process start-up.

Every launch script calls `define_flags()` at import and `start()` first thing in `main`:

  --config=FILE[:ARG] --workdir=DIR [--noprogress] [--compilation_cache=auto|off|DIR]
  --distributed=auto|on|off  --coordinator_address=HOST:PORT  --num_processes=N
  --process_id=I  --local_device_ids=0,1,...

A single-process run needs none of the distributed flags. With several processes, either
pass them (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) on every
process, or let JAX detect a TPU pod, a SLURM job or an Open MPI launch (`--distributed=auto`,
the default). Progress bars and summaries appear on process 0 only.

`--compilation_cache` (default auto) turns on JAX's persistent compilation cache: XLA
executables are stored on disk keyed by their program, compile options and jax version, so
a later run (or a later mode or seed of the grid) that compiles the same program loads it
instead: a rerun of a short CPU job skips most of its compiling. (In the offline grid the
saving was small, ~7% of a seed's runs: there the epochs, not compiles, dominate.) auto =
$JAX_COMPILATION_CACHE_DIR when set, else
`<asset cache>/xla` (`$SYNTHBANDIT_CACHE/xla`, default ~/.cache/synthbandit_jax/xla), kept
under 4 GB (least recently used entries go first); off = none; any other value = that dir.
The flag's default is $SYNTHBANDIT_COMPILATION_CACHE when set (e.g. off for every launch on a
machine), else auto.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Flags:
  """The holders of the common flags of a launch script (`.value` of each)."""
  config: Any
  workdir: Any
  progress: Any
  distributed: Any
  coordinator_address: Any
  num_processes: Any
  process_id: Any
  local_device_ids: Any
  compilation_cache: Any


def define_flags(workdir_help: str = "Output directory.") -> Flags:
  """Defines the flags every launch script takes; call once, at module import."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  holders = Flags(
      config=config_flags.DEFINE_config_file("config", None, "Config file (path[:variant])."),
      workdir=flags.DEFINE_string("workdir", None, workdir_help),
      progress=flags.DEFINE_bool("progress", True, "Show progress bars (process 0 only)."),
      distributed=flags.DEFINE_enum(
          "distributed", "auto", ["auto", "on", "off"],
          "jax.distributed: auto = initialise when the flags/environment name several "
          "processes or a TPU pod / SLURM / Open MPI launch is detected; on = always; off = "
          "never."),
      coordinator_address=flags.DEFINE_string(
          "coordinator_address", None, "host:port of process 0's coordinator (multi-process; "
          "default $JAX_COORDINATOR_ADDRESS)."),
      num_processes=flags.DEFINE_integer(
          "num_processes", None, "Number of processes (default $JAX_NUM_PROCESSES)."),
      process_id=flags.DEFINE_integer(
          "process_id", None, "This process's index, 0 .. num_processes-1 (default "
          "$JAX_PROCESS_ID)."),
      local_device_ids=flags.DEFINE_list(
          "local_device_ids", None, "Devices this process uses, e.g. 0,1 (default: all "
          "visible; $JAX_LOCAL_DEVICE_IDS)."),
      compilation_cache=flags.DEFINE_string(
          "compilation_cache", os.environ.get(CACHE_ENV) or "auto",
          "JAX's persistent compilation cache: auto = $JAX_COMPILATION_CACHE_DIR or <asset "
          f"cache>/xla; off; or a directory (default ${CACHE_ENV}, else auto)."))
  flags.mark_flags_as_required(["config", "workdir"])
  return holders


def start(f: Flags) -> None:
  """Logging, then jax.distributed when this is one process of several (before any device
  is touched). Fails with the flag names when the multi-process settings are incomplete."""
  quiet_library_logs()
  enable_compilation_cache(f.compilation_cache.value)
  from synthbandit_jax import parallel  # pylint: disable=import-outside-toplevel
  ids = [int(x) for x in f.local_device_ids.value] if f.local_device_ids.value else None
  try:
    parallel.initialize_distributed(
        f.coordinator_address.value, f.num_processes.value, f.process_id.value, ids,
        mode=f.distributed.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e


CACHE_ENV = "SYNTHBANDIT_COMPILATION_CACHE"  # the --compilation_cache default when set
CACHE_MAX_BYTES = 4 * 2 ** 30
CACHE_MIN_COMPILE_SECS = 0.5  # quicker programs are cheaper to recompile than to store


def enable_compilation_cache(setting: str | None) -> str | None:
  """Points JAX's persistent compilation cache at `setting` (see the module docstring);
  returns the directory used (None: off)."""
  import os  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  setting = (setting or "auto").strip()
  if setting.lower() in ("off", "none", "0", "false"):
    return None
  if setting.lower() == "auto":
    setting = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if not setting:
      from synthbandit_jax import assets  # pylint: disable=import-outside-toplevel
      setting = str(assets.cache_dir() / "xla")
  if "://" not in setting:  # local paths are created; remote ones (gs://) are JAX's business
    try:
      Path(setting).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise SystemExit(f"error: --compilation_cache={setting}: cannot create it ({e}); pass "
                       "another directory or --compilation_cache=off") from e
    setting = str(Path(setting).expanduser())
  jax.config.update("jax_compilation_cache_dir", setting)
  jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
  return setting


def is_main_process() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0


def _load_config(spec: str):
  path, _, arg = spec.partition(":")
  p = Path(path)
  if not p.exists():
    raise SystemExit(f"--config: no such file {path}")
  root = str(Path(__file__).resolve().parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location("_sb_config", p)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _valid_keys(cfg, prefix=""):
  keys = []
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if hasattr(v, "items"):
      keys += _valid_keys(v, name + ".")
    else:
      keys.append(name)
  return keys


def check_config_overrides(argv: list[str]) -> None:
  """Fails with the list of valid keys when a --config.X override names an unknown key.

  (ml_collections' own error for this is a bare AttributeError.)
  """
  spec = None
  for a in argv[1:]:
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
  if spec is None:
    return
  cfg = _load_config(spec)
  valid = _valid_keys(cfg)
  bad = []
  for a in argv[1:]:
    if a.startswith("--config."):
      key = a[len("--config."):].split("=", 1)[0]
      if key not in valid:
        bad.append(key)
  if bad:
    lines = "\n  ".join(valid)
    raise SystemExit(f"unknown config key(s): {', '.join(bad)}. Valid keys of {spec}:\n  "
                     f"{lines}")


def quiet_library_logs() -> None:
  """INFO for our own messages; WARNING and up for orbax/absl and jax internals."""
  import logging
  logging.getLogger().setLevel(logging.INFO)
  for name in ("absl", "jax", "orbax", "etils", "tensorstore"):
    logging.getLogger(name).setLevel(logging.WARNING)
