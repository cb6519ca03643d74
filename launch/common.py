"""Shared pieces of the absl launch scripts: the common flags (config, workdir, progress and
jax.distributed), config-override validation, logging, and the multi-process start-up.

Every launch script calls `define_flags()` at import and `start()` first thing in `main`:

  --config=FILE[:ARG] --workdir=DIR [--noprogress]
  --distributed=auto|on|off  --coordinator_address=HOST:PORT  --num_processes=N
  --process_id=I  --local_device_ids=0,1,...

A single-process run needs none of the distributed flags. With several processes, either
pass them (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) on every
process, or let JAX detect a TPU pod, a SLURM job or an Open MPI launch (`--distributed=auto`,
the default). Progress bars and summaries appear on process 0 only.
"""
from __future__ import annotations

import dataclasses
import importlib.util
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
          "visible; $JAX_LOCAL_DEVICE_IDS)."))
  flags.mark_flags_as_required(["config", "workdir"])
  return holders


def start(f: Flags) -> None:
  """Logging, then jax.distributed when this is one process of several (before any device
  is touched). Fails with the flag names when the multi-process settings are incomplete."""
  quiet_library_logs()
  from synthbandit_jax import parallel  # pylint: disable=import-outside-toplevel
  ids = [int(x) for x in f.local_device_ids.value] if f.local_device_ids.value else None
  try:
    parallel.initialize_distributed(
        f.coordinator_address.value, f.num_processes.value, f.process_id.value, ids,
        mode=f.distributed.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e


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
