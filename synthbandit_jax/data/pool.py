"""The synthetic image pool on disk: a sharded writer and streaming readers.

Layout of a pool rooted at `root`:

```
root/images/shard_00000/<id>.png      one file per image
root/metadata/shard_00000.jsonl       rows of that shard; written LAST, so it marks the shard done
root/metadata.jsonl                   all rows in shard order (written by PoolWriter.finalize)
```

A pool made by hand needs only `root/metadata.jsonl` and the image files it names (paths
relative to `root`, or absolute). Each metadata row has the fields

  id (unique str), class (str), path (str), source (str, e.g. "controlled", "sd-1.5", "user"),
  prompt (str | None), attributes (dict), seed (int | None), extras (dict, free-form).

`id`, `class` and `path` are required when reading; the others default to source="user",
prompt=None, attributes={}, seed=None, extras={}.

Corrupt or missing image files never stop a read: they are left out, listed in `skipped`
({"id", "path", "reason"}) and logged as a warning. A row is never relabelled.
"""
from __future__ import annotations

import collections
import dataclasses
import io as _io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from synthbandit_jax import io as sio
from synthbandit_jax.data import images as imgs

log = logging.getLogger(__name__)

FIELDS = ("id", "class", "path", "source", "prompt", "attributes", "seed", "extras")
REQUIRED_READ_FIELDS = ("id", "class", "path")
REQUIRED_WRITE_FIELDS = ("id", "class", "source")
METADATA_NAME = "metadata.jsonl"
_SHARD_RE = re.compile(r"^shard_(\d+)\.jsonl$")
_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
_IMAGE_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}


class PoolFormatError(ValueError):
  """A pool's metadata is malformed (missing fields, wrong types, duplicate ids, ...)."""


def shard_name(shard: int) -> str:
  """Returns the directory / file stem of a shard, e.g. `shard_00003`."""
  if shard < 0:
    raise ValueError(f"shard index must be >= 0, got {shard}")
  return f"shard_{shard:05d}"


def _defaults() -> dict[str, Any]:
  return {"source": "user", "prompt": None, "attributes": {}, "seed": None, "extras": {}}


def _check_row(row: Any, where: str, required: Sequence[str]) -> dict:
  """Validates one metadata row and returns a copy with optional fields filled in."""
  if not isinstance(row, dict):
    raise PoolFormatError(
        f"{where}: a metadata row must be a JSON object, got {type(row).__name__}")
  missing = [f for f in required if f not in row or row[f] is None]
  if missing:
    raise PoolFormatError(
        f"{where}: metadata row is missing required field(s) {missing} "
        f"(row id: {row.get('id')!r}); every row needs {list(required)}")
  out = _defaults()
  out.update(row)
  problems = []
  for key in ("id", "class", "path", "source"):
    if key in out and not isinstance(out[key], str):
      problems.append(f"'{key}' must be a string, got {type(out[key]).__name__}")
  if isinstance(out.get("id"), str) and not out["id"]:
    problems.append("'id' must not be empty")
  if isinstance(out.get("class"), str) and not out["class"]:
    problems.append("'class' must not be empty")
  if out["prompt"] is not None and not isinstance(out["prompt"], str):
    problems.append(f"'prompt' must be a string or null, got {type(out['prompt']).__name__}")
  seed = out["seed"]
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
    problems.append(f"'seed' must be an integer or null, got {seed!r}")
  for key in ("attributes", "extras"):
    if not isinstance(out[key], dict):
      problems.append(f"'{key}' must be an object/dict, got {type(out[key]).__name__}")
  if problems:
    raise PoolFormatError(f"{where} (id {row.get('id')!r}): " + "; ".join(problems))
  if isinstance(seed, np.integer):
    out["seed"] = int(seed)
  return out


def _read_jsonl_lines(path: Path) -> list[tuple[int, Any]]:
  """Reads a JSON-lines file into (line number, value) pairs, naming the file on errors."""
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        out.append((lineno, json.loads(line)))
      except json.JSONDecodeError as e:
        raise PoolFormatError(f"{path}:{lineno}: not valid JSON ({e})") from e
  return out


def _check_unique(entries: Sequence[tuple[str, str]], what: str) -> None:
  """Raises naming duplicated ids; `entries` are (id, "file:line") pairs."""
  first: dict[str, str] = {}
  dups: list[str] = []
  n_dup = 0
  for rid, where in entries:
    if rid in first:
      n_dup += 1
      if len(dups) < 5:
        dups.append(f"{rid!r} at {where} (first at {first[rid]})")
    else:
      first[rid] = where
  if n_dup:
    raise PoolFormatError(
        f"{what}: {n_dup} duplicate id(s): " + "; ".join(dups)
        + ("; ..." if n_dup > len(dups) else "") + ". Ids must be unique across the pool.")


# ----------------------------------------------------------------------------------- writer


def _encode(img: np.ndarray, fmt: str) -> bytes:
  if fmt == "png":
    return imgs.encode_png(img)
  from PIL import Image  # JPEG: lossy, only when asked for.
  arr = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
  if arr.ndim == 3 and arr.shape[-1] == 4:
    arr = imgs.convert_channels(arr, 3)
  buf = _io.BytesIO()
  Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


class PoolWriter:
  """Writes a pool shard by shard; a shard counts as done once its metadata file exists.

  Usage:
    writer = PoolWriter(root)
    for shard, (images, rows) in enumerate(batches):
      if not writer.shard_done(shard):
        writer.write_shard(shard, images, rows)
    writer.finalize()   # -> root/metadata.jsonl
  """

  def __init__(self, root: str | os.PathLike, *, image_format: str = "png"):
    if image_format.lower() not in _IMAGE_FORMATS:
      raise ValueError(
          f"image_format={image_format!r} is not supported; use one of {sorted(_IMAGE_FORMATS)}")
    self.root = Path(root)
    self.image_format = _IMAGE_FORMATS[image_format.lower()]

  def shard_metadata_path(self, shard: int) -> Path:
    """Path of the metadata file that marks `shard` finished."""
    return self.root / "metadata" / f"{shard_name(shard)}.jsonl"

  def shard_done(self, shard: int) -> bool:
    """True if `shard` was completely written (its metadata file exists)."""
    return self.shard_metadata_path(shard).is_file()

  def write_shard(self, shard: int, images: Sequence[np.ndarray], rows: Sequence[dict]) -> None:
    """Writes the images of one shard (each atomically), then its metadata file (last).

    Rows need `id`, `class` and `source`; `path` defaults to
    `images/shard_XXXXX/<id>.<ext>`; the other fields default as in the module docstring.
    Rewriting a finished shard replaces it.
    """
    if len(images) != len(rows):
      raise ValueError(
          f"write_shard({shard}): got {len(images)} images but {len(rows)} rows; "
          "pass one metadata row per image")
    meta_path = self.shard_metadata_path(shard)
    checked = []
    for k, row in enumerate(rows):
      where = f"write_shard({shard}) row {k}"
      if isinstance(row, dict) and "path" not in row:
        rid = row.get("id")
        if isinstance(rid, str) and not _SAFE_ID_RE.match(rid):
          raise PoolFormatError(
              f"{where}: id {rid!r} cannot be used as a file name (allowed: letters, digits and "
              "'._+=-', not starting with a symbol); give the row an explicit 'path'")
        row = dict(row, path=f"images/{shard_name(shard)}/{rid}.{self.image_format}")
      checked.append(_check_row(row, where, REQUIRED_WRITE_FIELDS + ("path",)))
    _check_unique([(r["id"], f"row {k}") for k, r in enumerate(checked)],
                  f"write_shard({shard})")
    for k, (img, row) in enumerate(zip(images, checked)):
      arr = np.asarray(img)
      if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (
          arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
        raise ValueError(
            f"write_shard({shard}) image {k} (id {row['id']!r}): expected a uint8 HWC image with "
            f"1-4 channels, got dtype {arr.dtype} shape {arr.shape}")
      path = Path(row["path"])
      target = path if path.is_absolute() else self.root / path
      sio.atomic_write_bytes(target, _encode(arr, self.image_format))
    sio.atomic_write_jsonl(meta_path, checked)

  def finished_shards(self) -> list[int]:
    """Indices of the finished shards, ascending."""
    mdir = self.root / "metadata"
    if not mdir.is_dir():
      return []
    out = []
    for p in mdir.iterdir():
      m = _SHARD_RE.match(p.name)
      if m and p.is_file():
        out.append(int(m.group(1)))
    return sorted(out)

  def finalize(self, num_shards: int | None = None) -> Path:
    """Merges the shard metadata files, in shard order, into `root/metadata.jsonl`.

    With `num_shards`, shards 0..num_shards-1 must all be finished (else an error lists the
    missing ones) and no others may exist.
    """
    shards = self.finished_shards()
    if num_shards is not None:
      missing = sorted(set(range(num_shards)) - set(shards))
      extra = sorted(set(shards) - set(range(num_shards)))
      if missing or extra:
        raise ValueError(
            f"{self.root}: expected shards 0..{num_shards - 1}; unfinished: {missing[:10]}, "
            f"unexpected: {extra[:10]}. Write the missing shards (or remove stray "
            "metadata/shard_*.jsonl files) before finalize()")
    if not shards:
      raise FileNotFoundError(
          f"{self.root / 'metadata'}: no finished shard metadata files (shard_XXXXX.jsonl); "
          "write shards with PoolWriter.write_shard before finalize()")
    rows, entries = [], []
    for s in shards:
      path = self.shard_metadata_path(s)
      for lineno, row in _read_jsonl_lines(path):
        row = _check_row(row, f"{path}:{lineno}", REQUIRED_READ_FIELDS)
        rows.append(row)
        entries.append((row["id"], f"{path}:{lineno}"))
    _check_unique(entries, str(self.root))
    return sio.atomic_write_jsonl(self.root / METADATA_NAME, rows)


# ----------------------------------------------------------------------------------- reader


@dataclasses.dataclass
class Pool:
  """Images of a pool in memory, with labels and the metadata rows in the same order."""
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N], indices into class_names
  class_names: list[str]
  ids: list[str]
  rows: list[dict]
  skipped: list[dict] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.ids)

  def subset(self, idx: Any) -> "Pool":
    """The pool restricted to `idx` (integer indices or a boolean mask), in that order."""
    idx = np.asarray(idx)
    if idx.dtype == bool:
      if idx.shape != (len(self),):
        raise ValueError(f"boolean mask has shape {idx.shape}, expected ({len(self)},)")
      idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64).reshape(-1)
    return Pool(images=self.images[idx], labels=self.labels[idx],
                class_names=list(self.class_names), ids=[self.ids[i] for i in idx],
                rows=[self.rows[i] for i in idx], skipped=list(self.skipped))


def _locate_metadata(root: Path) -> tuple[Path, list[Path]]:
  """Returns (pool root, metadata files to read in order)."""
  if root.is_file():
    return root.parent, [root]
  main = root / METADATA_NAME
  if main.is_file():
    return root, [main]
  shards = PoolWriter(root).finished_shards()
  if shards:
    log.warning("%s: no %s yet (PoolWriter.finalize() not run); reading %d shard metadata "
                "files", root, METADATA_NAME, len(shards))
    return root, [PoolWriter(root).shard_metadata_path(s) for s in shards]
  raise FileNotFoundError(
      f"{root}: not a pool: no {METADATA_NAME} and no metadata/shard_*.jsonl. A pool needs a "
      f"{METADATA_NAME} with one JSON row per image (fields {list(REQUIRED_READ_FIELDS)})")


def read_pool_rows(root: str | os.PathLike) -> tuple[Path, list[dict]]:
  """Reads and validates a pool's metadata; returns (pool root, rows with defaults filled).

  `root` is the pool directory or its metadata.jsonl. Missing fields, wrong types and
  duplicate ids raise PoolFormatError naming the file and line.
  """
  base, files = _locate_metadata(Path(root))
  rows, entries = [], []
  for path in files:
    for lineno, row in _read_jsonl_lines(path):
      row = _check_row(row, f"{path}:{lineno}", REQUIRED_READ_FIELDS)
      rows.append(row)
      entries.append((row["id"], f"{path}:{lineno}"))
  _check_unique(entries, str(base))
  return base, rows


def _resolve_classes(rows: list[dict], class_names: Sequence[str] | None, unknown_classes: str,
                     base: Path) -> tuple[list[str], list[dict], list[dict]]:
  """Returns (class names, kept rows, skipped entries for rows of unknown classes)."""
  if unknown_classes not in ("error", "skip"):
    raise ValueError(f"unknown_classes={unknown_classes!r}; use 'error' or 'skip'")
  if class_names is None:
    return sorted({r["class"] for r in rows}), rows, []
  names = list(class_names)
  dup = [n for n, c in collections.Counter(names).items() if c > 1]
  if dup:
    raise ValueError(f"class_names has duplicates: {dup}")
  known = set(names)
  unknown = collections.Counter(r["class"] for r in rows if r["class"] not in known)
  if not unknown:
    return names, rows, []
  if unknown_classes == "error":
    listed = ", ".join(f"{c!r} ({n} rows)" for c, n in sorted(unknown.items()))
    raise ValueError(
        f"{base}: the pool has {len(unknown)} class(es) not in class_names: {listed}. Fix the "
        "'class' fields or class_names, or pass unknown_classes='skip' to leave those rows out")
  kept, skipped = [], []
  for r in rows:
    if r["class"] in known:
      kept.append(r)
    else:
      skipped.append({"id": r["id"], "path": r["path"],
                      "reason": f"class {r['class']!r} not in class_names"})
  log.warning("%s: left out %d rows of %d classes not in class_names: %s", base, len(skipped),
              len(unknown), sorted(unknown))
  return names, kept, skipped


def _norm_size(image_size: Any) -> tuple[int, int] | None:
  """None, an int (square) or (H, W) -> None or (H, W)."""
  if image_size is None:
    return None
  if isinstance(image_size, (int, np.integer)):
    size = (int(image_size), int(image_size))
  else:
    size = tuple(int(s) for s in image_size)
  if len(size) != 2 or min(size) <= 0:
    raise ValueError(f"image_size={image_size!r}: use an int or (height, width), both > 0")
  return size


@dataclasses.dataclass(frozen=True)
class _LoadOptions:
  channels: int | None = 3
  image_size: Any = None
  alpha: str = "white"
  resize_method: str = "bilinear"
  fit: str = "stretch"


def _image_path(base: Path, row: dict) -> Path:
  p = Path(row["path"])
  return p if p.is_absolute() else base / p


def _try_load(base: Path, row: dict, opts: _LoadOptions) -> tuple[np.ndarray | None, str | None]:
  """Loads one image; returns (image, None) or (None, reason)."""
  path = _image_path(base, row)
  if not path.is_file():
    return None, f"missing file: {path}"
  try:
    img = imgs.load_image_file(path, channels=opts.channels, size=opts.image_size,
                               alpha=opts.alpha, resize_method=opts.resize_method, fit=opts.fit)
  except imgs.ImageReadError as e:
    return None, f"unreadable image: {getattr(e, 'reason', e)}"
  except OSError as e:  # Permission problems, I/O errors.
    return None, f"unreadable image: {e}"
  return img, None


def _skip(skipped: list[dict], row: dict, reason: str) -> None:
  skipped.append({"id": row["id"], "path": row["path"], "reason": reason})
  log.warning("pool image %r (%s) skipped: %s", row["id"], row["path"], reason)


def _size_error(base: Path, first: tuple[dict, tuple], row: dict, shape: tuple) -> ValueError:
  a = "x".join(str(d) for d in first[1])
  b = "x".join(str(d) for d in shape)
  return ValueError(
      f"{base}: images have different sizes: {first[0]['path']} is {a} but {row['path']} is "
      f"{b} (HxWxC). Pass image_size=... (and channels=1 or 3) to bring them to one shape")


def read_pool(root: str | os.PathLike, *, class_names: Sequence[str] | None = None,
              channels: int | None = 3, image_size: Any = None, alpha: str = "white",
              resize_method: str = "bilinear", fit: str = "stretch",
              unknown_classes: str = "error") -> Pool:
  """Loads a whole pool into memory.

  Args:
    root: pool directory (or its metadata.jsonl).
    class_names: label order; None -> the sorted classes of the pool.
    channels: 1, 3, or None (the files' own, alpha removed); see `images.load_image_file`.
    image_size: None (keep; all images must then share one size), an int, or (H, W).
    alpha, resize_method, fit: passed to `images.load_image_file`.
    unknown_classes: "error" (default) raises if the pool has classes not in `class_names`;
      "skip" leaves those rows out and lists them in `Pool.skipped`.

  Returns:
    A Pool. Corrupt or missing image files are left out and listed in `Pool.skipped`.
  """
  base, rows = read_pool_rows(root)
  names, rows, skipped = _resolve_classes(rows, class_names, unknown_classes, base)
  index = {n: k for k, n in enumerate(names)}
  image_size = _norm_size(image_size)
  opts = _LoadOptions(channels, image_size, alpha, resize_method, fit)
  buf: np.ndarray | None = None
  first = None
  kept: list[dict] = []
  for row in rows:
    img, reason = _try_load(base, row, opts)
    if img is None:
      _skip(skipped, row, reason)
      continue
    if buf is None:
      buf = np.empty((len(rows),) + img.shape, np.uint8)
      first = (row, img.shape)
    elif img.shape != buf.shape[1:]:
      raise _size_error(base, first, row, img.shape)
    buf[len(kept)] = img
    kept.append(row)
  if buf is None:
    shape = (image_size or (0, 0)) + (channels or 3,)
    images = np.zeros((0,) + shape, np.uint8)
  else:
    images = buf[:len(kept)]
  labels = np.array([index[r["class"]] for r in kept], dtype=np.int32)
  return Pool(images=images, labels=labels, class_names=names, ids=[r["id"] for r in kept],
              rows=kept, skipped=skipped)


class PoolReader:
  """Streams a pool in batches of `(images uint8 [B,H,W,C], rows)` with bounded memory.

  Attributes (set before iteration): `root`, `rows` (rows to be read, after the class filter),
  `class_names`, `class_index` (class name -> label). `skipped` lists rows left out
  ({"id", "path", "reason"}): unknown classes at once, corrupt/missing files as iteration
  reaches them; it is complete once the iteration ends. Iterating again starts over.

  `ids` restricts the read to those rows, in that order (e.g. a seeded subsample, or one
  process's slice of the pool); an id that the metadata lacks raises a KeyError naming the
  first such ids. Ids of rows left out by the class filter stay left out (in `skipped`).
  """

  def __init__(self, root: str | os.PathLike, *, batch_size: int,
               class_names: Sequence[str] | None = None, channels: int | None = 3,
               image_size: Any = None, alpha: str = "white", resize_method: str = "bilinear",
               fit: str = "stretch", unknown_classes: str = "error",
               ids: Sequence[str] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = batch_size
    self.root, rows = read_pool_rows(root)
    if ids is not None:
      rows = _select_rows(rows, ids, self.root)
    self.class_names, self.rows, self._class_skipped = _resolve_classes(
        rows, class_names, unknown_classes, self.root)
    self.class_index = {n: k for k, n in enumerate(self.class_names)}
    self._opts = _LoadOptions(channels, _norm_size(image_size), alpha, resize_method, fit)
    self.skipped: list[dict] = list(self._class_skipped)

  def __len__(self) -> int:
    """Number of rows to read (corrupt files may make the yielded total smaller)."""
    return len(self.rows)

  def labels(self, rows: Sequence[dict]) -> np.ndarray:
    """int32 labels of `rows` (as yielded) under `class_names`."""
    return np.array([self.class_index[r["class"]] for r in rows], dtype=np.int32)

  def __iter__(self) -> Iterator[tuple[np.ndarray, list[dict]]]:
    self.skipped = list(self._class_skipped)
    first = None
    batch: list[np.ndarray] = []
    batch_rows: list[dict] = []
    for row in self.rows:
      img, reason = _try_load(self.root, row, self._opts)
      if img is None:
        _skip(self.skipped, row, reason)
        continue
      if first is None:
        first = (row, img.shape)
      elif img.shape != first[1]:
        raise _size_error(self.root, first, row, img.shape)
      batch.append(img)
      batch_rows.append(row)
      if len(batch) == self.batch_size:
        yield np.stack(batch), batch_rows
        batch, batch_rows = [], []
    if batch:
      yield np.stack(batch), batch_rows


def _select_rows(rows: list[dict], ids: Sequence[str], base: Path) -> list[dict]:
  """The rows of `ids`, in that order; KeyError naming the first ids the pool lacks."""
  by_id = {r["id"]: r for r in rows}
  ids = [str(i) for i in ids]
  missing = [i for i in ids if i not in by_id]
  if missing:
    raise KeyError(
        f"{base}: {len(missing)} of the {len(ids)} requested ids are not in the pool's "
        f"metadata, first: {missing[:5]}; the ids must come from this pool's metadata.jsonl")
  _check_unique([(i, f"ids[{k}]") for k, i in enumerate(ids)], f"{base}: requested ids")
  return [by_id[i] for i in ids]


def iter_pool(root: str | os.PathLike, *, batch_size: int, **options: Any) -> PoolReader:
  """Streams a pool in batches; returns an iterable PoolReader.

  `options` are those of `read_pool`, plus `ids` (read only those rows, in that order; see
  `PoolReader`). The last batch may be smaller. Rows left out (unknown classes, corrupt or
  missing files) are in `reader.skipped` once iteration ends:

    reader = iter_pool(root, batch_size=64, image_size=299)
    for images, rows in reader: ...
    print(reader.skipped)
  """
  return PoolReader(root, batch_size=batch_size, **options)


def pool_summary(pool: Pool) -> dict:
  """Counts of a loaded pool: per class (all class_names), per source, per (class, source)."""
  per_class = {n: 0 for n in pool.class_names}
  for lab in np.asarray(pool.labels).tolist():
    per_class[pool.class_names[lab]] += 1
  per_source = collections.Counter(r.get("source", "user") for r in pool.rows)
  per_class_source: dict[str, dict[str, int]] = {}
  for r in pool.rows:
    d = per_class_source.setdefault(r["class"], {})
    d[r.get("source", "user")] = d.get(r.get("source", "user"), 0) + 1
  return {
      "num_images": len(pool),
      "num_skipped": len(pool.skipped),
      "image_shape": list(pool.images.shape[1:]),
      "per_class": per_class,
      "per_source": dict(sorted(per_source.items())),
      "per_class_source": per_class_source,
  }
