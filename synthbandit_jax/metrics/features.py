"""Feature extraction for any feature network, jitted once and sharded over a device mesh.

A feature function is ``apply_fn(params, images_uint8) -> {tap: [B, D]}``: it takes a batch
of uint8 NHWC images (preprocessing belongs inside it, so only uint8 crosses to the device)
and returns a dict of 2-D feature arrays. `FeatureExtractor` jits it once with the batch
sharded over the mesh's ``data`` axis (``NamedSharding(mesh, P("data"))``) and the params
replicated. Every device batch has exactly ``batch_size`` rows: the last partial batch is
zero-padded and the padding rows dropped from the output, so a run never recompiles
(`FeatureExtractor.trace_count` counts traces).

Entry points:

  extract_arrays(extractor, images)            in-memory images -> {tap: float32 [N, D]}
  extract_feature_set(extractor, images, ...)  in-memory images -> FeatureSet (bad rows out)
  extract_pool(extractor, pool_root, ...)      a pool on disk, streamed -> FeatureSet
  extract_pool_cached(extractor, pool_root, cache_path, ...)   the same, cached as .npz
  extract_reader([extractors], reader, on_host_batch=...)   one pass, several extractors
  inception_extractor(...)                     the FID Inception-V3 taps
  vgg16_extractor(params | weights=...)        VGG16 fc7 (tap "vgg_fc7"), the paper's FCS features

Streaming: images are decoded by `synthbandit_jax.data.pool.iter_pool` on a host thread
(`prefetch`), re-batched to ``batch_size``, padded and put on the devices there; the main
thread dispatches batch i+1 before it copies batch i's features back, so decoding, transfer
and device compute overlap. Host memory holds at most ``prefetch + 3`` image batches
whatever the pool size (plus the output features, preallocated once).

Bad input: rows whose features are NaN or Inf in any tap are never kept silently. In a
`FeatureSet` they are excluded and listed in ``bad`` ({"id", "path", "reason"}); unreadable
files are listed in ``skipped`` by the pool reader. `extract_arrays` keeps every row (its
output is positional) and warns, or raises with ``nonfinite="raise"``.

Cache key (`extract_pool_cached`): the sha256 of the canonical JSON of
  * ``format``: `CACHE_FORMAT`;
  * ``extractor``: `FeatureExtractor.fingerprint` = sha256 of the extractor's ``name``
    (which must describe the feature function: taps, dtype, resize policy, ...), its param
    ``dtype`` and `params_fingerprint` (sha256 over every param's tree path, dtype, shape and
    bytes);
  * ``pool``: for every metadata row to be read, in order: id, class, path and, with
    ``stat_files=True`` (default), the image file's size and mtime (ns), so a rewritten
    image invalidates the cache;
  * ``class_names`` and the image loading options (channels, image_size, alpha,
    resize_method, fit, unknown_classes).
The batch size, prefetch depth and device count are not part of the key (they do not change
the features beyond float rounding). A cache whose key differs is recomputed and replaced.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from synthbandit_jax import io as sio
from synthbandit_jax import parallel
from synthbandit_jax import xla_options
from synthbandit_jax.data import pool as pool_lib

log = logging.getLogger(__name__)

T = TypeVar("T")
ApplyFn = Callable[[Any, jax.Array], Mapping[str, jax.Array]]

CACHE_FORMAT = "synthbandit_jax.features/1"
DEFAULT_INCEPTION_TAPS = ("pool_192", "pool_2048")
VGG_FC7_TAP = "vgg_fc7"
VGG_LOGITS_TAP = "vgg_logits"
# Images per step of VGG16's convolution stack on CPU (`vgg16_extractor(microbatch=None)`):
# 1 and 2 were the fastest of 0 (whole batch), 1, 2 and 4 on the 2-core machine
# (benchmarks/README.md, "score_throughput.py").
VGG_CPU_MICROBATCH = 2
# The same for the Inception (`inception_extractor(microbatch=None)`): 4 had the best mean of
# 0, 1, 2 and 4 at batch 8 and of 0, 2, 4 and 8 at batch 32 on the 2-core machine.
INCEPTION_CPU_MICROBATCH = 4
_FEATURE_PREFIX = "feature__"
NONFINITE_MODES = ("warn", "raise", "keep")


# ----------------------------------------------------------------------------- fingerprints


def params_fingerprint(params: Any) -> str:
  """sha256 (hex) over every leaf's tree path, dtype, shape and bytes."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  h.update(str(treedef).encode())
  for path, leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.name}|{a.shape}|".encode())
    h.update(a.reshape(-1).view(np.uint8))
  return h.hexdigest()


def _sha256_json(obj: Any) -> str:
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -------------------------------------------------------------------------------- extractor


class FeatureExtractor:
  """A feature function jitted once over a mesh, with replicated params.

  Args:
    apply_fn: ``apply_fn(params, images_uint8 [B, H, W, C]) -> {tap: [B, D]}``; jittable.
      Outputs are cast to float32.
    params: the params pytree (host or device arrays).
    batch_size: rows per device batch (all devices together); a multiple of the number of
      devices in `mesh`.
    mesh: a mesh with a ``data`` axis; default: all local devices
      (`synthbandit_jax.parallel.make_mesh()`).
    dtype: if set, floating-point params are cast to it before they are placed on the
      devices (e.g. jnp.bfloat16 halves their memory). None keeps them. For bf16 compute
      with float32 params, build `apply_fn` with the model's compute dtype instead (as
      `inception_extractor` does).
    name: a description of `apply_fn` (network, taps, compute dtype, preprocessing). It is
      part of `fingerprint`, i.e. of the feature cache key, so two different feature
      functions must not share a name. Default: ``apply_fn.__qualname__``.
  """

  def __init__(self, apply_fn: ApplyFn, params: Any, *, batch_size: int,
               mesh: Mesh | None = None, dtype: Any = None, name: str | None = None):
    if not callable(apply_fn):
      raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
        or batch_size < 1:
      raise ValueError(f"FeatureExtractor batch_size must be an int >= 1, got {batch_size!r}")
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    if parallel.DATA_AXIS not in self.mesh.axis_names:
      raise ValueError(
          f"FeatureExtractor mesh has axes {self.mesh.axis_names}; it needs a "
          f"{parallel.DATA_AXIS!r} axis (build it with synthbandit_jax.parallel.make_mesh)")
    n_dev = parallel.mesh_size(self.mesh)
    if batch_size % n_dev:
      lower = batch_size // n_dev * n_dev
      hint = f"{lower} or {lower + n_dev}" if lower else f"{n_dev}"
      raise ValueError(
          f"FeatureExtractor batch_size={batch_size} must be a multiple of the number of "
          f"devices in the mesh ({n_dev}); use batch_size={hint}, or a mesh over fewer "
          "devices (synthbandit_jax.parallel.make_mesh(num_devices=...))")
    self.batch_size = int(batch_size)
    self.dtype = None if dtype is None else jnp.dtype(dtype)
    self.name = name or getattr(apply_fn, "__qualname__", type(apply_fn).__name__)
    self._apply_fn = apply_fn
    if self.dtype is not None:
      params = jax.tree.map(
          lambda a: a.astype(self.dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
          else a, params)
    self._replicated = parallel.replicated(self.mesh)
    self._batch_sharding = parallel.batch_sharded(self.mesh)
    self.params = jax.device_put(params, self._replicated)
    self._traces = 0
    self._fingerprint: str | None = None
    self._jitted = xla_options.jit(
        self._traced, cpu_options=xla_options.FEATURE_CPU_OPTIONS,
        in_shardings=(self._replicated, self._batch_sharding),
        out_shardings=self._batch_sharding)

  def _traced(self, params: Any, images: jax.Array) -> dict[str, jax.Array]:
    self._traces += 1  # runs only while tracing
    return self._checked(self._apply_fn(params, images), images.shape[0])

  def _checked(self, out: Any, batch: int) -> dict[str, jax.Array]:
    if not isinstance(out, Mapping) or not out:
      raise TypeError(
          f"feature function {self.name!r} must return a non-empty dict {{tap: [B, D]}}, got "
          f"{type(out).__name__}")
    res = {}
    for tap, v in out.items():
      if v.ndim != 2 or v.shape[0] != batch:
        raise ValueError(
            f"feature function {self.name!r} returned tap {tap!r} with shape {tuple(v.shape)}; "
            f"every tap must be [batch, dim] with batch={batch} (flatten or pool it first)")
      res[str(tap)] = v.astype(jnp.float32)
    return res

  @property
  def trace_count(self) -> int:
    """How many times the feature function was traced (1 per image shape and dtype)."""
    return self._traces

  @property
  def num_devices(self) -> int:
    """Devices the batch is sharded over."""
    return parallel.mesh_size(self.mesh)

  @property
  def fingerprint(self) -> str:
    """sha256 of (name, param dtype, params_fingerprint); part of the feature cache key."""
    if self._fingerprint is None:
      self._fingerprint = _sha256_json({
          "name": self.name, "dtype": None if self.dtype is None else self.dtype.name,
          "params": params_fingerprint(self.params)})
    return self._fingerprint

  def feature_dims(self, image_shape: Sequence[int]) -> dict[str, int]:
    """{tap: D} for images of shape (H, W, C), by abstract evaluation (no compile)."""
    x = jax.ShapeDtypeStruct((self.batch_size,) + tuple(image_shape), jnp.uint8)
    out = jax.eval_shape(lambda p, im: self._checked(self._apply_fn(p, im), self.batch_size),
                         self.params, x)
    return {k: int(v.shape[1]) for k, v in out.items()}

  def put(self, images: np.ndarray) -> jax.Array:
    """Pads up to `batch_size` uint8 images with zero rows and shards them over the mesh."""
    images = np.asarray(images)
    n = images.shape[0]
    if n > self.batch_size:
      raise ValueError(f"put() got {n} images, more than batch_size={self.batch_size}")
    if n < self.batch_size:
      padded = np.zeros((self.batch_size,) + images.shape[1:], images.dtype)
      padded[:n] = images
      images = padded
    return jax.device_put(images, self._batch_sharding)

  def apply(self, x: jax.Array) -> dict[str, jax.Array]:
    """Runs the jitted feature function on one full device batch (from `put`)."""
    return self._jitted(self.params, x)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Features of at most `batch_size` images, as float32 numpy arrays (no NaN check)."""
    n = len(images)
    out = jax.device_get(self.apply(self.put(_check_images(images, "images"))))
    return {k: np.asarray(v[:n], np.float32) for k, v in out.items()}

  def __repr__(self) -> str:
    return (f"FeatureExtractor(name={self.name!r}, batch_size={self.batch_size}, "
            f"devices={self.num_devices}, dtype={self.dtype})")


def _check_images(images: Any, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(
        f"{what}: expected uint8 images [N, H, W, C], got dtype {images.dtype} shape "
        f"{images.shape}")
  return images


# --------------------------------------------------------------------------------- prefetch

prefetch = parallel.prefetch  # the shared host-side prefetch thread



def _check_compatible(extractors: Sequence[FeatureExtractor]) -> None:
  if not extractors:
    raise ValueError("need at least one FeatureExtractor")
  sizes = {e.batch_size for e in extractors}
  if len(sizes) != 1:
    raise ValueError(
        "extractors that share one pass over the images need one batch_size, got "
        + ", ".join(f"{e.name}: {e.batch_size}" for e in extractors))


def _device_batches(extractors: Sequence[FeatureExtractor],
                    chunks: Iterable[tuple[np.ndarray, list]], keep_host: bool = False
                    ) -> Iterator[tuple[list[jax.Array], int, list, np.ndarray | None]]:
  """Re-batches host chunks (images, per-row info) into full device batches (last padded),
  one per extractor (shared when their shardings agree), plus the host images of the batch
  (only with `keep_host`)."""
  size = extractors[0].batch_size

  def put(cat: np.ndarray, n: int):
    placed: list[jax.Array] = []
    for k, e in enumerate(extractors):
      same = next((placed[j] for j in range(k)
                   if extractors[j]._batch_sharding == e._batch_sharding), None)  # pylint: disable=protected-access
      placed.append(same if same is not None else e.put(cat))
    return placed, n, (cat[:n] if keep_host else None)

  held: list[np.ndarray] = []
  held_info: list = []
  count = 0
  for images, info in chunks:
    images = _check_images(images, "feature input batch")
    if len(images) != len(info):
      raise ValueError(f"feature input batch has {len(images)} images but {len(info)} rows")
    held.append(images)
    held_info.extend(info)
    count += len(images)
    while count >= size:
      cat = held[0] if len(held) == 1 else np.concatenate(held)
      placed, n, host = put(cat[:size], size)
      yield placed, n, held_info[:size], host
      rest = cat[size:]
      held = [rest] if len(rest) else []
      held_info = held_info[size:]
      count -= size
  if count:
    cat = held[0] if len(held) == 1 else np.concatenate(held)
    placed, n, host = put(cat, count)
    yield placed, n, held_info, host


def _nonfinite_reasons(out: Mapping[str, np.ndarray]) -> list[str | None]:
  """Per row: None if finite in every tap, else a reason naming the taps."""
  n = len(next(iter(out.values())))
  parts: list[list[str]] = [[] for _ in range(n)]
  for tap, v in out.items():
    nan = np.isnan(v).any(axis=1)
    inf = np.isinf(v).any(axis=1)
    for i in np.flatnonzero(nan | inf):
      kinds = "/".join(k for k, f in (("NaN", nan[i]), ("Inf", inf[i])) if f)
      parts[i].append(f"{tap} ({kinds})")
  return [f"non-finite features in {', '.join(p)}" if p else None for p in parts]


class _Collector:
  """Gathers per-batch features into preallocated float32 buffers."""

  def __init__(self, capacity: int, drop_nonfinite: bool):
    self.capacity = max(int(capacity), 1)
    self.drop = drop_nonfinite
    self.buffers: dict[str, np.ndarray] | None = None
    self.n = 0
    self.info: list = []
    self.bad: list[tuple[Any, str]] = []

  def add(self, out: Mapping[str, np.ndarray], info: list) -> None:
    reasons = _nonfinite_reasons(out)
    self.bad.extend((i, r) for i, r in zip(info, reasons) if r is not None)
    keep = np.array([r is None or not self.drop for r in reasons], bool)
    k = int(keep.sum())
    if self.buffers is None:
      self.buffers = {t: np.empty((self.capacity, v.shape[1]), np.float32)
                      for t, v in out.items()}
    if self.n + k > self.capacity:  # only if the caller's capacity was a guess
      self.capacity = max(2 * self.capacity, self.n + k)
      for t, b in self.buffers.items():
        grown = np.empty((self.capacity, b.shape[1]), np.float32)
        grown[:self.n] = b[:self.n]
        self.buffers[t] = grown
    for t, v in out.items():
      self.buffers[t][self.n:self.n + k] = v[keep]
    self.info.extend(i for i, kp in zip(info, keep) if kp)
    self.n += k

  def result(self) -> dict[str, np.ndarray] | None:
    if self.buffers is None:
      return None
    return {t: (b if self.n == len(b) else b[:self.n].copy()) for t, b in self.buffers.items()}


HostFn = Callable[[np.ndarray, list], None]


def _run_many(extractors: Sequence[FeatureExtractor], chunks: Iterable[tuple[np.ndarray, list]],
              *, total: int, drop_nonfinite: bool, prefetch_batches: int, progress: bool,
              desc: str, on_host_batch: HostFn | None = None
              ) -> tuple[list[_Collector], float]:
  """Streams chunks through every extractor in one pass (each host batch is decoded and put
  on the devices once); `on_host_batch(images, rows)` sees each batch's host images (e.g.
  for pixel metrics) in order. Returns one collector per extractor and the seconds taken."""
  from tqdm import tqdm
  extractors = list(extractors)
  if extractors:
    _check_compatible(extractors)
  collectors = [_Collector(total, drop_nonfinite) for _ in extractors]
  start = time.perf_counter()
  with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True,
            smoothing=0.1) as bar:
    pending = None

    def finish(item):
      outs_dev, n, info, host = item
      for collector, out_dev in zip(collectors, outs_dev):
        out = jax.device_get(out_dev)
        collector.add({t: np.asarray(v[:n]) for t, v in out.items()}, info)
      if on_host_batch is not None:
        on_host_batch(host, info)
      bar.update(n)

    if extractors:
      source = _device_batches(extractors, chunks, keep_host=on_host_batch is not None)
    else:  # pixel metrics only: no device features
      source = (([], len(info), info, _check_images(images, "input batch"))
                for images, info in chunks)
    batches = prefetch(source, prefetch_batches)
    try:
      for placed, n, info, host in batches:
        outs_dev = [e.apply(x) for e, x in zip(extractors, placed)]  # asynchronous dispatch
        if pending is not None:
          finish(pending)
        pending = (outs_dev, n, info, host)
      if pending is not None:
        finish(pending)
    finally:
      batches.close()
  return collectors, time.perf_counter() - start


def _run(extractor: FeatureExtractor, chunks: Iterable[tuple[np.ndarray, list]], *,
         total: int, drop_nonfinite: bool, prefetch_batches: int, progress: bool,
         desc: str) -> tuple[_Collector, float]:
  """Streams chunks through the extractor; returns the collector and the seconds taken."""
  (collector,), seconds = _run_many([extractor], chunks, total=total,
                                    drop_nonfinite=drop_nonfinite,
                                    prefetch_batches=prefetch_batches, progress=progress,
                                    desc=desc)
  return collector, seconds


# ------------------------------------------------------------------------------ feature sets


@dataclasses.dataclass
class FeatureSet:
  """Features of a set of images, one row per kept image.

  Attributes:
    ids: image ids, in pool order (skipped and bad images left out).
    labels: int32 [N], indices into `class_names`.
    class_names: the label order.
    features: {tap: float32 [N, D]}, rows aligned with `ids`; all finite.
    skipped: images that could not be read ({"id", "path", "reason"}).
    bad: images whose features were NaN/Inf ({"id", "path", "reason"}), excluded.
    meta: free-form information (extractor name and fingerprint, timing, cache key).
  """
  ids: list[str]
  labels: np.ndarray
  class_names: list[str]
  features: dict[str, np.ndarray]
  skipped: list[dict] = dataclasses.field(default_factory=list)
  bad: list[dict] = dataclasses.field(default_factory=list)
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.ids = [str(i) for i in self.ids]
    self.labels = np.asarray(self.labels, np.int32).reshape(-1)
    self.class_names = [str(c) for c in self.class_names]
    n = len(self.ids)
    if len(self.labels) != n:
      raise ValueError(f"FeatureSet: {n} ids but {len(self.labels)} labels")
    for tap, v in self.features.items():
      if np.ndim(v) != 2 or len(v) != n:
        raise ValueError(
            f"FeatureSet: tap {tap!r} has shape {np.shape(v)}, expected [{n}, D] (one row per id)")
    if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise ValueError(f"FeatureSet: labels must lie in [0, {len(self.class_names)}), got "
                       f"[{self.labels.min()}, {self.labels.max()}]")

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def classes(self) -> list[str]:
    """The class name of every row."""
    return [self.class_names[k] for k in self.labels.tolist()]

  def index_of(self, ids: Sequence[str]) -> np.ndarray:
    """Row indices of `ids`; raises KeyError naming the first ids that have no features."""
    where = {i: k for k, i in enumerate(self.ids)}
    missing = [i for i in ids if i not in where]
    if missing:
      left_out = {d["id"]: d["reason"] for d in self.skipped + self.bad}
      shown = ", ".join(f"{i!r}" + (f" ({left_out[i]})" if i in left_out else "")
                        for i in missing[:5])
      raise KeyError(
          f"{len(missing)} of {len(ids)} requested ids have no features: {shown}"
          + (", ..." if len(missing) > 5 else "") + ". They are not in this feature set (left "
          "out as unreadable/non-finite, or from another pool); drop them or re-extract")
    return np.array([where[i] for i in ids], np.int64)

  def select(self, ids: Sequence[str]) -> "FeatureSet":
    """The rows of `ids`, in that order (see `index_of` for missing ids)."""
    idx = self.index_of(list(ids))
    return dataclasses.replace(
        self, ids=[self.ids[k] for k in idx], labels=self.labels[idx],
        features={t: v[idx] for t, v in self.features.items()})


def _bad_entries(bad: list[tuple[dict, str]]) -> list[dict]:
  out = [{"id": r["id"], "path": r.get("path"), "reason": reason} for r, reason in bad]
  for d in out[:20]:
    log.warning("image %r (%s) excluded: %s", d["id"], d["path"], d["reason"])
  if len(out) > 20:
    log.warning("... and %d more images with non-finite features excluded", len(out) - 20)
  return out


# ---------------------------------------------------------------------------- entry points


def extract_arrays(extractor: FeatureExtractor, images: np.ndarray, *, nonfinite: str = "warn",
                   prefetch_batches: int = 2, progress: bool = False) -> dict[str, np.ndarray]:
  """Features of in-memory uint8 images [N, H, W, C]: {tap: float32 [N, D]}, in order.

  All rows are returned (the output is positional). Rows with NaN/Inf features are
  reported: ``nonfinite="warn"`` logs a warning listing them, ``"raise"`` raises a
  ValueError, ``"keep"`` returns them silently (for callers that check the rows
  themselves). Use `extract_feature_set` to have them excluded instead.
  """
  if nonfinite not in NONFINITE_MODES:
    raise ValueError(f"nonfinite={nonfinite!r}; use one of {NONFINITE_MODES}")
  images = _check_images(images, "extract_arrays images")
  n = len(images)
  size = extractor.batch_size
  chunks = ((images[s:s + size], list(range(s, min(s + size, n)))) for s in range(0, n, size))
  col, _ = _run(extractor, chunks, total=n, drop_nonfinite=False,
                prefetch_batches=prefetch_batches, progress=progress, desc="features")
  feats = col.result()
  if feats is None:
    feats = {t: np.zeros((0, d), np.float32)
             for t, d in extractor.feature_dims(images.shape[1:]).items()}
  if col.bad:
    listed = "; ".join(f"row {i}: {r}" for i, r in col.bad[:5])
    msg = (f"{len(col.bad)} of {n} images have non-finite features ({listed}"
           + ("; ..." if len(col.bad) > 5 else "") + ")")
    if nonfinite == "raise":
      raise ValueError(msg + ". Check those images, or use extract_feature_set to exclude them")
    if nonfinite == "warn":
      log.warning("%s; they are kept in the output", msg)
  return feats


def extract_feature_set(extractor: FeatureExtractor, images: np.ndarray, *,
                        ids: Sequence[str] | None = None, labels: Any = None,
                        class_names: Sequence[str] | None = None, prefetch_batches: int = 2,
                        progress: bool = False) -> FeatureSet:
  """A FeatureSet of in-memory uint8 images; rows with NaN/Inf features go to ``bad``.

  `ids` default to "0", "1", ...; `labels` (int, into `class_names`) default to 0 with
  class_names ["all"].
  """
  images = _check_images(images, "extract_feature_set images")
  n = len(images)
  ids = [str(k) for k in range(n)] if ids is None else [str(i) for i in ids]
  if len(ids) != n or len(set(ids)) != n:
    raise ValueError(f"extract_feature_set: need {n} unique ids, got {len(ids)} "
                     f"({len(set(ids))} unique)")
  labels = np.zeros(n, np.int32) if labels is None else np.asarray(labels, np.int32)
  if labels.shape != (n,):
    raise ValueError(f"extract_feature_set: labels must have shape ({n},), got {labels.shape}")
  if class_names is None:
    class_names = ["all"] if n == 0 else [str(k) for k in range(int(labels.max()) + 1)]
  size = extractor.batch_size
  rows = [{"id": i, "path": None, "label": int(l)} for i, l in zip(ids, labels)]
  chunks = ((images[s:s + size], rows[s:s + size]) for s in range(0, n, size))
  col, seconds = _run(extractor, chunks, total=n, drop_nonfinite=True,
                      prefetch_batches=prefetch_batches, progress=progress, desc="features")
  feats = col.result()
  if feats is None:
    feats = {t: np.zeros((0, d), np.float32)
             for t, d in extractor.feature_dims(images.shape[1:]).items()}
  return FeatureSet(ids=[r["id"] for r in col.info],
                    labels=np.array([r["label"] for r in col.info], np.int32),
                    class_names=list(class_names), features=feats, skipped=[],
                    bad=_bad_entries(col.bad), meta=_meta(extractor, n, seconds))


def _meta(extractor: FeatureExtractor, n: int, seconds: float) -> dict:
  return {"extractor": extractor.name, "batch_size": extractor.batch_size,
          "devices": extractor.num_devices, "images": n, "seconds": round(seconds, 3),
          "images_per_s": round(n / seconds, 2) if seconds > 0 else None}


_LOAD_DEFAULTS = dict(class_names=None, channels=3, image_size=None, alpha="white",
                      resize_method="bilinear", fit="stretch", unknown_classes="error")


def _image_shape(image_size: Any, channels: int | None) -> tuple[int, int, int] | None:
  """(H, W, C) when the loading options fix it, else None."""
  if image_size is None or channels is None:
    return None
  if isinstance(image_size, (int, np.integer)):
    return (int(image_size), int(image_size), int(channels))
  h, w = image_size
  return (int(h), int(w), int(channels))


def extract_reader(extractors: Sequence[FeatureExtractor], reader: pool_lib.PoolReader, *,
                   image_shape: tuple[int, int, int] | None = None, prefetch_batches: int = 2,
                   progress: bool = False, on_host_batch: HostFn | None = None
                   ) -> list[FeatureSet]:
  """Streams a PoolReader once through several extractors; one FeatureSet per extractor.

  Each image is decoded once (on the prefetch thread) and put on the devices once when the
  extractors share a sharding; the extractors need one batch size. `on_host_batch(images,
  rows)` is called on the main thread with each batch's uint8 host images and metadata rows
  (in pool order, before the NaN check), e.g. to compute pixel metrics on the fly. Host
  memory holds at most ``prefetch_batches + 3`` image batches whatever the pool size.
  `image_shape` (H, W, C) sizes the empty feature arrays of a pool without readable images.
  Each FeatureSet excludes (``bad``) only its own extractor's non-finite rows.
  """
  extractors = list(extractors)
  cols, seconds = _run_many(extractors, reader, total=len(reader), drop_nonfinite=True,
                            prefetch_batches=prefetch_batches, progress=progress,
                            desc=f"features {reader.root.name}", on_host_batch=on_host_batch)
  out = []
  for extractor, col in zip(extractors, cols):
    feats = col.result()
    if feats is None:
      feats = {} if image_shape is None else {
          t: np.zeros((0, d), np.float32)
          for t, d in extractor.feature_dims(image_shape).items()}
      log.warning("%s: no readable images; the feature set is empty", reader.root)
    out.append(FeatureSet(ids=[r["id"] for r in col.info], labels=reader.labels(col.info),
                          class_names=list(reader.class_names), features=feats,
                          skipped=list(reader.skipped), bad=_bad_entries(col.bad),
                          meta=dict(_meta(extractor, len(reader), seconds),
                                    pool=str(reader.root))))
  return out


def _extract_reader(extractor: FeatureExtractor, reader: pool_lib.PoolReader, *,
                    image_shape: tuple[int, int, int] | None, prefetch_batches: int,
                    progress: bool) -> FeatureSet:
  (fs,) = extract_reader([extractor], reader, image_shape=image_shape,
                         prefetch_batches=prefetch_batches, progress=progress)
  return fs


def extract_pool(extractor: FeatureExtractor, pool_root: str | os.PathLike, *,
                 batch_size: int | None = None, class_names: Sequence[str] | None = None,
                 channels: int | None = 3, image_size: Any = None, alpha: str = "white",
                 resize_method: str = "bilinear", fit: str = "stretch",
                 unknown_classes: str = "error", prefetch_batches: int = 2,
                 progress: bool = False) -> FeatureSet:
  """Streams a pool from disk through the extractor; returns its FeatureSet.

  Args:
    extractor: a FeatureExtractor.
    pool_root: pool directory (or its metadata.jsonl), see synthbandit_jax.data.pool.
    batch_size: images decoded per host batch (default: the extractor's batch size); they
      are re-batched to the extractor's batch size.
    class_names, channels, image_size, alpha, resize_method, fit, unknown_classes: image
      loading options of `synthbandit_jax.data.pool.iter_pool`.
    prefetch_batches: device batches prepared ahead by the host thread.
    progress: show a tqdm bar with images/s.

  Unreadable images are in ``skipped``, images with NaN/Inf features in ``bad``; neither has
  a row in ``features``.
  """
  reader = pool_lib.iter_pool(
      pool_root, batch_size=batch_size or extractor.batch_size, class_names=class_names,
      channels=channels, image_size=image_size, alpha=alpha, resize_method=resize_method,
      fit=fit, unknown_classes=unknown_classes)
  return _extract_reader(extractor, reader, image_shape=_image_shape(image_size, channels),
                         prefetch_batches=prefetch_batches, progress=progress)


# ------------------------------------------------------------------------------------ cache


def _json_default(obj: Any) -> Any:
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, Path):
    return str(obj)
  raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_features(path: str | os.PathLike, features: FeatureSet) -> Path:
  """Writes a FeatureSet as .npz (atomically); `load_features` reads it back."""
  arrays = {
      "ids": np.array(features.ids, dtype=str),
      "labels": np.asarray(features.labels, np.int32),
      "class_names": np.array(features.class_names, dtype=str),
  }
  for tap, v in features.features.items():
    arrays[_FEATURE_PREFIX + tap] = np.asarray(v, np.float32)
  info = {"format": CACHE_FORMAT, "taps": list(features.features), "skipped": features.skipped,
          "bad": features.bad, "meta": features.meta}
  arrays["info"] = np.array(json.dumps(info, default=_json_default))
  return sio.atomic_save_npz(path, **arrays)


def load_features(path: str | os.PathLike) -> FeatureSet:
  """Reads a FeatureSet written by `save_features`."""
  path = Path(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      info = json.loads(str(z["info"]))
      if info.get("format") != CACHE_FORMAT:
        raise ValueError(f"format {info.get('format')!r}, expected {CACHE_FORMAT!r}")
      return FeatureSet(ids=z["ids"].tolist(), labels=z["labels"],
                        class_names=z["class_names"].tolist(),
                        features={t: z[_FEATURE_PREFIX + t] for t in info["taps"]},
                        skipped=info["skipped"], bad=info["bad"], meta=info["meta"])
  except FileNotFoundError as e:
    raise FileNotFoundError(f"feature file {path} does not exist") from e
  except Exception as e:  # zip, key, json and shape errors
    raise ValueError(f"{path}: not a feature file written by save_features ({e}); delete it "
                     "to recompute") from e


def pool_cache_key(extractor: FeatureExtractor, reader: pool_lib.PoolReader, *,
                   load_options: Mapping[str, Any], stat_files: bool = True) -> dict[str, str]:
  """The cache key parts (module docstring) and their combined sha256 under "key"."""
  rows = []
  for r in reader.rows:
    entry = [r["id"], r["class"], r["path"]]
    if stat_files:
      p = Path(r["path"])
      try:
        st = (p if p.is_absolute() else reader.root / p).stat()
        entry += [st.st_size, st.st_mtime_ns]
      except OSError:
        entry += [None, None]
    rows.append(entry)
  parts = {
      "format": CACHE_FORMAT,
      "extractor": extractor.fingerprint,
      "pool": _sha256_json(rows),
      "class_names": _sha256_json(list(reader.class_names)),
      "load": _sha256_json({k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in sorted(load_options.items())}),
  }
  return dict(parts, key=_sha256_json(parts))


def extract_pool_cached(extractor: FeatureExtractor, pool_root: str | os.PathLike,
                        cache_path: str | os.PathLike, *, refresh: bool = False,
                        stat_files: bool = True, batch_size: int | None = None,
                        prefetch_batches: int = 2, progress: bool = False,
                        **load_options: Any) -> FeatureSet:
  """`extract_pool` with an .npz cache at `cache_path`.

  The cache is reused when its key (module docstring: extractor fingerprint, pool rows and
  file stats, classes, loading options) equals the current one; otherwise (or with
  ``refresh=True``) the features are recomputed and the cache replaced. `load_options` are
  those of `extract_pool` (class_names, channels, image_size, ...).
  """
  unknown = sorted(set(load_options) - set(_LOAD_DEFAULTS))
  if unknown:
    raise TypeError(f"extract_pool_cached got unknown option(s) {unknown}; image loading "
                    f"options are {sorted(_LOAD_DEFAULTS)}")
  opts = dict(_LOAD_DEFAULTS, **load_options)
  reader = pool_lib.iter_pool(pool_root, batch_size=batch_size or extractor.batch_size, **opts)
  key_opts = {k: v for k, v in opts.items() if k != "class_names"}
  parts = pool_cache_key(extractor, reader, load_options=key_opts, stat_files=stat_files)
  cache_path = Path(cache_path)
  if cache_path.is_file() and not refresh:
    try:
      cached = load_features(cache_path)
    except ValueError as e:
      log.warning("feature cache unreadable, recomputing: %s", e)
    else:
      old = cached.meta.get("cache_key", {})
      if old.get("key") == parts["key"]:
        log.info("%s: reusing cached features (%d images)", cache_path, len(cached))
        return cached
      changed = [k for k in parts if k != "key" and old.get(k) != parts[k]]
      log.info("%s: cache is stale (changed: %s); recomputing", cache_path,
               ", ".join(changed) or "unknown")
  fs = _extract_reader(extractor, reader,
                       image_shape=_image_shape(opts["image_size"], opts["channels"]),
                       prefetch_batches=prefetch_batches, progress=progress)
  fs.meta["cache_key"] = parts
  save_features(cache_path, fs)
  return fs


# -------------------------------------------------------------------------------- inception


def _on_cpu(mesh: Mesh) -> bool:
  """Whether every device of `mesh` is a CPU (where the CPU-only speed-ups are on)."""
  return all(d.platform == "cpu" for d in mesh.devices.flat)


def _microbatch_for(mesh: Mesh, microbatch: int | None, cpu_default: int, who: str) -> int:
  """An extractor's `microbatch`: None -> `cpu_default` on a mesh of CPUs, else 0 (off)."""
  if microbatch is None:
    return cpu_default if _on_cpu(mesh) else 0
  if int(microbatch) < 0:
    raise ValueError(f"{who} microbatch={microbatch}: needs >= 0 (0 = off)")
  return int(microbatch)


def inception_extractor(params: Any = None, *, batch_size: int = 64, dtype: Any = jnp.float32,
                        taps: Sequence[str] = DEFAULT_INCEPTION_TAPS, mesh: Mesh | None = None,
                        resize: str = "tf", precision: Any = None,
                        input_size: int | None = None,
                        microbatch: int | None = None) -> FeatureExtractor:
  """A FeatureExtractor for the FID Inception-V3 taps.

  Args:
    params: Flax params of `InceptionV3FID`; default `cached_fid_inception_params()`.
    batch_size: a multiple of the mesh's device count.
    dtype: compute dtype (jnp.bfloat16 on GPU/TPU); params stay float32, taps float32.
    taps: any of `synthbandit_jax.models.inception.TAPS`, plus "logits_1008" if `params`
      has the fc layer.
    mesh: default all local devices.
    resize: "tf" (NVlabs / fid-helper) or "torch" (pytorch-fid), see `inception.preprocess`.
    precision: convolution precision (e.g. jax.lax.Precision.HIGHEST).
    input_size: the side the images are resized to (default 299, the network's own and the
      one FID is defined at). Any size >= 75 works (the taps are spatial means): smaller
      inputs cost ~(size / 299)^2 of the compute, for a frozen backbone on small images.
    microbatch: images per step of the network on each device
      (`synthbandit_jax.parallel.microbatched`; the same taps up to float rounding, faster on
      CPU where a whole batch's activations leave the caches); 0 = the whole batch at once.
      None = `INCEPTION_CPU_MICROBATCH` when the mesh's devices are CPUs, else 0. Not part of
      `name` (it does not change what is computed).
  """
  from synthbandit_jax.models import inception as inc  # pylint: disable=import-outside-toplevel
  if params is None:
    from synthbandit_jax.weights import inception_import  # pylint: disable=import-outside-toplevel
    params = inception_import.cached_fid_inception_params()
  taps = tuple(taps)
  known = tuple(inc.TAPS) + (inc.LOGITS_TAP,)
  unknown = [t for t in taps if t not in known]
  if not taps or unknown:
    raise ValueError(f"inception_extractor taps={list(taps)}: unknown {unknown}; choose from "
                     f"{list(known)}")
  if resize not in inc.RESIZE_METHODS:
    raise ValueError(f"inception_extractor resize={resize!r}; use one of {inc.RESIZE_METHODS}")
  with_logits = inc.LOGITS_TAP in taps
  if with_logits and "fc" not in params:
    raise ValueError(
        f"tap {inc.LOGITS_TAP!r} needs the fc layer (params['fc']), which these params lack "
        "(the fid-helper TorchScript file has none); drop it from taps or load params with fc")
  if not with_logits:
    params = {k: v for k, v in params.items() if k != "fc"}
  size = inc.INPUT_SIZE if input_size is None else int(input_size)
  if size < inc.MIN_INPUT_SIZE:
    raise ValueError(f"inception_extractor input_size={input_size}: Inception-V3 needs >= "
                     f"{inc.MIN_INPUT_SIZE} pixels (its stem and reductions shrink the map "
                     "to 1x1 there)")
  model = inc.InceptionV3FID(with_logits=with_logits, dtype=dtype, precision=precision)
  mesh = mesh if mesh is not None else parallel.make_mesh()
  microbatch = _microbatch_for(mesh, microbatch, INCEPTION_CPU_MICROBATCH,
                               "inception_extractor")
  shards = parallel.mesh_size(mesh)

  def apply_fn(p, images):
    def net(rows):
      out = model.apply({"params": p}, inc.preprocess(rows, resize=resize, size=size))
      return {t: out[t] for t in taps}
    return parallel.microbatched(net, images, microbatch=microbatch, shards=shards)

  name = (f"inception_v3_fid(taps={','.join(taps)},dtype={jnp.dtype(dtype).name},"
          f"resize={resize},precision={precision}"
          + ("" if size == inc.INPUT_SIZE else f",input_size={size}") + ")")
  return FeatureExtractor(apply_fn, params, batch_size=batch_size, mesh=mesh, name=name)


# ------------------------------------------------------------------------------------ vgg16


def vgg16_extractor(params: Any = None, *, weights: str | os.PathLike | None = None,
                    batch_size: int = 32, dtype: Any = jnp.float32,
                    taps: Sequence[str] = (VGG_FC7_TAP,), mesh: Mesh | None = None,
                    antialias: bool = True, precision: Any = None,
                    cache_dir: str | os.PathLike | None = None,
                    input_size: int | None = None,
                    microbatch: int | None = None,
                    winograd: bool | None = None) -> FeatureExtractor:
  """A FeatureExtractor for torchvision VGG16's fc7 (4096-d, after ReLU): tap "vgg_fc7".

  Images (uint8, any size, 1/3/4 channels) are resized to 224x224 (or `input_size`; torch
  bilinear, `antialias`) and ImageNet-normalised inside the jitted function
  (`synthbandit_jax.models.vgg.preprocess`).

  Args:
    params: Flax params of `VGG16` (`synthbandit_jax.weights.vgg_import`); or
    weights: a torchvision vgg16 state dict file (.pth needs torch once, then a msgpack
      cache in `cache_dir` is used; .safetensors needs no torch). Exactly one of the two.
    batch_size: a multiple of the mesh's device count.
    dtype: compute dtype (jnp.bfloat16 on GPU/TPU); params stay float32, taps float32.
    taps: "vgg_fc7" and/or "vgg_logits" (the latter needs fc8, params["classifier_6"]).
    mesh: default all local devices.
    antialias: resize antialiasing (see `synthbandit_jax.models.vgg`).
    precision: conv/dense precision (e.g. jax.lax.Precision.HIGHEST).
    cache_dir: msgpack params cache root for `weights` (default the assets cache).
    input_size: the resize side; None = 224 (the network's own). >= 32 costs ~(size/224)^2
      of the compute; the features then differ from those at 224 px.
    microbatch: images per step of the convolution stack on each device
      (`synthbandit_jax.models.vgg.apply_microbatched`; the same features up to float
      rounding, faster on CPU where a whole batch's activations leave the caches); 0 = the
      whole batch at once. Not part of `name` (it does not change what is computed).
      None = `VGG_CPU_MICROBATCH` when the mesh's devices are CPUs, else 0.
    winograd: run the 14-56 px layers by Winograd's algorithm (`vgg.winograd_plan`;
      kernels transformed once here, ~116 MB more host memory at 224 px; 10-20% faster on
      CPU; fc7 2.4e-6 relative from torch's, 2.1e-6 without; float32 only). None = on
      when the mesh's devices are CPUs and `dtype` is float32. When on, `name` says
      "conv=winograd", so its features are cached apart from the direct convolution's.
  """
  from synthbandit_jax.models import vgg as vgg_lib  # pylint: disable=import-outside-toplevel
  size = vgg_lib.INPUT_SIZE if input_size is None else int(input_size)
  if size < vgg_lib.MIN_INPUT_SIZE:
    raise ValueError(f"vgg16_extractor input_size={size}: VGG16 needs >= "
                     f"{vgg_lib.MIN_INPUT_SIZE} (None = {vgg_lib.INPUT_SIZE})")
  if (params is None) == (weights is None):
    raise ValueError("vgg16_extractor needs exactly one of params= (VGG16 Flax params) or "
                     "weights= (a torchvision vgg16 state dict file)")
  if params is None:
    from synthbandit_jax.weights import vgg_import  # pylint: disable=import-outside-toplevel
    params = vgg_import.cached_vgg16_params(weights, cache_dir=cache_dir)
  taps = tuple(taps)
  known = (VGG_FC7_TAP, VGG_LOGITS_TAP)
  unknown = [t for t in taps if t not in known]
  if not taps or unknown:
    raise ValueError(f"vgg16_extractor taps={list(taps)}: unknown {unknown}; choose from "
                     f"{list(known)}")
  with_logits = VGG_LOGITS_TAP in taps
  if with_logits and "classifier_6" not in params:
    raise ValueError(f"tap {VGG_LOGITS_TAP!r} needs fc8 (params['classifier_6']), which these "
                     "params lack; drop it from taps or load a state dict with classifier.6")
  num_classes = vgg_lib.NUM_CLASSES
  if with_logits:
    num_classes = int(np.shape(params["classifier_6"]["bias"])[0])
  else:
    params = {k: v for k, v in params.items() if k != "classifier_6"}
  model = vgg_lib.VGG16(with_logits=with_logits, num_classes=num_classes, dtype=dtype,
                        precision=precision, antialias=antialias, input_size=size)

  mesh = mesh if mesh is not None else parallel.make_mesh()
  microbatch = _microbatch_for(mesh, microbatch, VGG_CPU_MICROBATCH, "vgg16_extractor")
  shards = parallel.mesh_size(mesh)
  float32 = jnp.dtype(dtype) == jnp.float32
  if winograd is None:
    winograd = float32 and _on_cpu(mesh)
  elif winograd and not float32:
    raise ValueError(f"vgg16_extractor winograd=True needs dtype float32, got "
                     f"{jnp.dtype(dtype).name} (Winograd's transforms amplify rounding); "
                     "use winograd=False")
  held = params
  if winograd:  # the kernels are transformed once, here, and held beside the params
    held = {"params": params, vgg_lib.WINOGRAD_COLLECTION: vgg_lib.winograd_kernels(
        params, vgg_lib.winograd_plan(size))}

  def apply_fn(p, images):
    variables = p if winograd else {"params": p}
    out = vgg_lib.apply_microbatched(model, variables, images, microbatch=microbatch,
                                     shards=shards)
    return {t: out["fc7" if t == VGG_FC7_TAP else "logits"] for t in taps}

  name = (f"vgg16_torchvision(taps={','.join(taps)},dtype={jnp.dtype(dtype).name},"
          f"size={size},antialias={antialias},precision={precision}"
          + (",conv=winograd" if winograd else "") + ")")
  return FeatureExtractor(apply_fn, held, batch_size=batch_size, mesh=mesh, name=name)
