"""Per-image score tables: one row per pool image id, one float64 column per metric.

Files: `.csv` (`id,col1,col2,...`, plus an optional sidecar `<file>.meta.json` holding the
column directions), `.jsonl` (rows with "id" and numeric fields) and `.npz` (key "ids" plus
one 1-D array per column). Each column has a direction: "higher" or "lower" is better.
"""
from __future__ import annotations

import csv
import dataclasses
import io as _io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from synthbandit_jax import io as sio

DIRECTIONS = ("higher", "lower")
LOWER_IS_BETTER_WORDS = frozenset({
    "fid", "kid", "distance", "distances", "dist", "loss", "losses", "error", "errors", "lpips"})
_WORD_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_FORMATS = (".csv", ".jsonl", ".npz")


@dataclasses.dataclass
class ScoreTable:
  """Scores of images: `columns[name][i]` belongs to `ids[i]`."""
  ids: list[str]
  columns: dict[str, np.ndarray]  # float64 [N] each
  directions: dict[str, str]  # column -> "higher" or "lower"

  def __post_init__(self):
    self.ids = [str(i) for i in self.ids]
    n = len(self.ids)
    cols = {}
    for name, values in self.columns.items():
      arr = np.asarray(values, dtype=np.float64)
      if arr.shape != (n,):
        raise ValueError(f"score column {name!r} has shape {arr.shape}, expected ({n},)")
      cols[str(name)] = arr
    self.columns = cols
    dirs = dict(self.directions)
    for name in cols:
      dirs.setdefault(name, default_direction(name))
    extra = sorted(set(dirs) - set(cols))
    if extra:
      raise ValueError(f"directions given for unknown score columns {extra}; columns: "
                       f"{list(cols)}")
    for name, d in dirs.items():
      _check_direction(d, name)
    self.directions = {name: dirs[name] for name in cols}

  def __len__(self) -> int:
    return len(self.ids)


def _check_direction(direction: str, what: str) -> None:
  if direction not in DIRECTIONS:
    raise ValueError(f"direction of {what!r} is {direction!r}; use 'higher' or 'lower'")


def _words(name: str) -> list[str]:
  return [w.lower() for w in _WORD_RE.findall(name)]


def default_direction(name: str) -> str:
  """'lower' if a word part of `name` is fid/kid/distance/dist/loss/error/lpips, else 'higher'.

  Word parts split at non-letters, letter/digit changes and camelCase, so "fid_2048",
  "fid192", "FID" and "pairDist" are lower-is-better, while "fidelity" is not.
  """
  return "lower" if any(w in LOWER_IS_BETTER_WORDS for w in _words(name)) else "higher"


def _sidecar(path: Path) -> Path:
  return Path(str(path) + ".meta.json")


def _fmt(v: float) -> str:
  return "" if math.isnan(v) else repr(float(v))


def save_score_table(path: str | os.PathLike, table: ScoreTable) -> Path:
  """Writes `table` to `path` (.csv, .jsonl or .npz) plus `<path>.meta.json`, both atomically.

  NaN is written as an empty CSV cell, JSON null, or NaN in .npz.
  """
  path = Path(path)
  suffix = path.suffix.lower()
  names = list(table.columns)
  if "id" in names or (suffix == ".npz" and "ids" in names):
    raise ValueError(f"a score column may not be called 'id'/'ids' (file {path})")
  if suffix == ".csv":
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id"] + names)
    cols = [table.columns[n] for n in names]
    for i, rid in enumerate(table.ids):
      w.writerow([rid] + [_fmt(c[i]) for c in cols])
    sio.atomic_write_text(path, buf.getvalue())
  elif suffix == ".jsonl":
    rows = []
    for i, rid in enumerate(table.ids):
      row: dict[str, Any] = {"id": rid}
      for n in names:
        v = float(table.columns[n][i])
        row[n] = None if math.isnan(v) else v
      rows.append(row)
    sio.atomic_write_jsonl(path, rows)
  elif suffix == ".npz":
    sio.atomic_save_npz(path, ids=np.array(table.ids, dtype=str),
                        **{n: np.asarray(table.columns[n], np.float64) for n in names})
  else:
    raise ValueError(f"{path}: unsupported score table format {suffix!r}; use one of {_FORMATS}")
  sio.atomic_write_json(_sidecar(path), {"columns": names, "directions": table.directions,
                                         "num_rows": len(table.ids)})
  return path


def _to_float(value: Any, path: Path, row: str, column: str) -> float:
  """Parses one cell; errors name the file, row and column."""
  if value is None:
    return math.nan
  if isinstance(value, str):
    s = value.strip()
    if s == "" or s.lower() in ("nan", "null", "none"):
      return math.nan
    try:
      return float(s)
    except ValueError:
      pass
  elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
    return float(value)
  raise ValueError(f"{path}: {row}, column {column!r}: value {value!r} is not a number")


def _load_csv(path: Path) -> tuple[list[str], dict[str, list[float]]]:
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    header = None
    for header in reader:
      if any(c.strip() for c in header):
        break
    if not header:
      raise ValueError(f"{path}: empty score table; expected a header 'id,col1,col2,...'")
    header = [h.strip() for h in header]
    if "id" not in header:
      raise ValueError(f"{path}: header {header} has no 'id' column")
    id_col = header.index("id")
    names = [h for k, h in enumerate(header) if k != id_col]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup or any(not h for h in names):
      raise ValueError(f"{path}: header {header} has duplicate or empty column names {dup}")
    ids: list[str] = []
    cols: dict[str, list[float]] = {n: [] for n in names}
    for cells in reader:
      if not any(c.strip() for c in cells):
        continue
      where = f"line {reader.line_num}"
      if len(cells) != len(header):
        raise ValueError(f"{path}: {where} has {len(cells)} fields, header has {len(header)}")
      ids.append(cells[id_col].strip())
      for k, h in enumerate(header):
        if k != id_col:
          cols[h].append(_to_float(cells[k], path, where, h))
  return ids, cols


def _load_jsonl(path: Path) -> tuple[list[str], dict[str, list[float]]]:
  ids: list[str] = []
  cols: dict[str, list[float]] = {}
  for lineno, row in _numbered_jsonl(path):
    where = f"line {lineno}"
    if not isinstance(row, dict) or "id" not in row:
      raise ValueError(f"{path}: {where}: expected an object with an 'id' field")
    for k, v in row.items():
      if k == "id":
        continue
      if k not in cols:
        cols[k] = [math.nan] * len(ids)  # Column first seen here: earlier rows are NaN.
      cols[k].append(_to_float(v, path, where, k))
    ids.append(str(row["id"]))
    for k, c in cols.items():
      if len(c) < len(ids):
        c.append(math.nan)  # Field absent in this row.
  return ids, cols


def _numbered_jsonl(path: Path):
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e


def _load_npz(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
  with np.load(path, allow_pickle=False) as z:
    if "ids" not in z.files:
      raise ValueError(f"{path}: no 'ids' array (keys: {z.files})")
    ids = [str(i) for i in z["ids"].reshape(-1)]
    cols = {}
    for k in z.files:
      if k == "ids":
        continue
      arr = z[k]
      if arr.ndim != 1 or arr.shape[0] != len(ids):
        raise ValueError(f"{path}: column {k!r} has shape {arr.shape}, expected ({len(ids)},)")
      if arr.dtype.kind in "biuf":
        cols[k] = arr.astype(np.float64)
      else:
        cols[k] = np.array([_to_float(v.item() if hasattr(v, "item") else v, path, f"row {i}", k)
                            for i, v in enumerate(arr)], np.float64)
  return ids, cols


def load_score_table(path: str | os.PathLike,
                     directions: Mapping[str, str] | None = None) -> ScoreTable:
  """Reads a score table from .csv, .jsonl or .npz.

  Directions: `directions` argument > sidecar `<path>.meta.json` > `default_direction(name)`.
  Non-numeric values raise naming the file, row and column; duplicate ids raise naming them.
  """
  path = Path(path)
  suffix = path.suffix.lower()
  if not path.is_file():
    raise FileNotFoundError(f"score table {path} does not exist")
  if suffix == ".csv":
    ids, cols = _load_csv(path)
  elif suffix == ".jsonl":
    ids, cols = _load_jsonl(path)
  elif suffix == ".npz":
    ids, cols = _load_npz(path)
  else:
    raise ValueError(f"{path}: unsupported score table format {suffix!r}; use one of {_FORMATS}")
  _check_unique_ids(ids, str(path))
  dirs: dict[str, str] = {n: default_direction(n) for n in cols}
  side = _sidecar(path)
  if side.is_file():
    meta = sio.read_json(side)
    for n, d in (meta.get("directions") or {}).items():
      if n in dirs:
        _check_direction(d, f"{n} in {side}")
        dirs[n] = d
  if directions:
    unknown = sorted(set(directions) - set(cols))
    if unknown:
      raise ValueError(f"directions given for columns {unknown} that {path} does not have; "
                       f"its columns are {list(cols)}")
    for n, d in directions.items():
      _check_direction(d, n)
      dirs[n] = d
  return ScoreTable(ids=ids, columns={n: np.asarray(v, np.float64) for n, v in cols.items()},
                    directions=dirs)


def _check_unique_ids(ids: Sequence[str], what: str) -> None:
  seen, dups = set(), []
  for i in ids:
    if i in seen and i not in dups:
      dups.append(i)
    seen.add(i)
  if dups:
    raise ValueError(f"{what}: {len(dups)} duplicate id(s): {dups[:5]}"
                     + (" ..." if len(dups) > 5 else "") + "; each image needs one row")


def align_scores(table: ScoreTable, pool_ids: Sequence[str], *, allow_missing: bool = False,
                 allow_extra: bool | None = None) -> ScoreTable:
  """Reorders `table` to `pool_ids`.

  Pool ids absent from the table raise unless `allow_missing` (their scores become NaN).
  Table ids absent from the pool raise unless `allow_extra` (they are dropped);
  `allow_extra=None` follows `allow_missing`.
  """
  if allow_extra is None:
    allow_extra = allow_missing
  pool_ids = [str(i) for i in pool_ids]
  _check_unique_ids(pool_ids, "pool ids")
  pos = {rid: k for k, rid in enumerate(table.ids)}
  pool_set = set(pool_ids)
  missing = [i for i in pool_ids if i not in pos]
  extra = [i for i in table.ids if i not in pool_set]
  problems = []
  if missing and not allow_missing:
    problems.append(f"{len(missing)} pool id(s) have no score row, e.g. {missing[:5]} "
                    "(allow_missing=True gives them NaN)")
  if extra and not allow_extra:
    problems.append(f"{len(extra)} score row id(s) are not in the pool, e.g. {extra[:5]} "
                    "(allow_extra=True drops them)")
  if problems:
    raise ValueError("score table does not match the pool: " + "; ".join(problems)
                     + ". Check that the table was computed on this pool.")
  src = np.array([pos.get(i, -1) for i in pool_ids], dtype=np.int64)
  have = src >= 0
  cols = {}
  for n, v in table.columns.items():
    out = np.full(len(pool_ids), np.nan, np.float64)
    out[have] = v[src[have]]
    cols[n] = out
  return ScoreTable(ids=pool_ids, columns=cols, directions=dict(table.directions))


def rank_order(values: np.ndarray, direction: str) -> np.ndarray:
  """Indices of `values` best-first under `direction`; NaN last; ties keep input order."""
  _check_direction(direction, "rank_order")
  v = np.asarray(values, dtype=np.float64).reshape(-1)
  key = -v if direction == "higher" else v
  return np.argsort(key, kind="stable").astype(np.int64)
