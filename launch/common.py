"""Shared pieces of the absl launch scripts: config-override validation and logging."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


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
