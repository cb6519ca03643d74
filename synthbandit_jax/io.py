"""Atomic file writes and small readers.

Every file the project writes goes to a temporary name in the same directory and is renamed
into place, so a killed run never leaves a half-written file that a resumed run would trust.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def _to_jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray) or hasattr(obj, "__array__") and hasattr(obj, "shape"):
    return _to_jsonable(np.asarray(obj).tolist())
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, Path):
    return str(obj)
  return obj


def safe_filename(name: str) -> str:
  """`name` with every character outside [A-Za-z0-9._-] replaced by '_' (e.g. "topk:u")."""
  return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  """Writes `data` to `path` via a temporary file in the same directory and a rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
  return atomic_write_text(path, json.dumps(_to_jsonable(obj), indent=indent) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
  lines = [json.dumps(_to_jsonable(r), ensure_ascii=False) for r in rows]
  return atomic_write_text(path, "".join(l + "\n" for l in lines))


def read_json(path: str | os.PathLike) -> Any:
  path = Path(path)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads a JSON-lines file; a bad line raises an error naming the file and line number."""
  path = Path(path)
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not valid JSON ({e})") from e
  return rows


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
  import io as _io
  buf = _io.BytesIO()
  np.savez(buf, **arrays)
  return atomic_write_bytes(path, buf.getvalue())
