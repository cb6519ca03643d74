"""The scoring stage: features of the real train split and the synthetic pool, the per-image
score table, and (for a controlled pool) the metric validation table.

`run_scoring(config, workdir)` writes

  WORKDIR/features/real_train.npz, pool.npz  Inception taps (reused when still valid)
  WORKDIR/features/real_train_vgg16.npz, pool_vgg16.npz   VGG16 fc7 (score.fcs_backbone=vgg16)
  WORKDIR/scores.csv (+ .meta.json, .sources.json)   one row per scored pool image
  WORKDIR/metric_validation.md / .json       Spearman and wrong-label AUROC per metric
                                             (only when the pool has ground truth)
  WORKDIR/scoring.json                       the summary (incl. "fcs_backbone")

and returns a summary dict. Train with the result via `--config.arms.source=scores
--config.scores.path=WORKDIR/scores.csv`.

Features come from the FID Inception-V3 (offline asset): DPS, the FID columns, realism and
PRDC always use its taps. The FCS backbone is `score.fcs_backbone`:

  "inception"  the Inception 2048-d pool tap (default; needs no extra weights);
  "vgg16"      VGG16 fc7 (4096-d, after ReLU), the paper's choice
               (`features.vgg16_extractor`); needs `score.vgg16_weights`, a torchvision vgg16
               state dict made once on a machine with internet access:
               ``torch.save(torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict(),
               path)``. A .pth needs torch the first time only (msgpack params cache).

With "vgg16" an image is scored only if both networks gave finite features. The scores'
``.sources.json`` (``sources["fcs"]``: backbone, tap and, for VGG16, the weights file) and
``scoring.json`` (``fcs_backbone``) say which backbone fed FCS.

Inception Score column ``is`` (only when the Inception has its 1008-way fc layer, i.e. with
`score.inception_weights` = a pytorch-fid state dict; the offline TorchScript asset has no
fc, checked: its 376 tensors end at the last mixed block): for a scored pool image x,

  is(x) = KL(p(y|x) || p(y)) = sum_k p_k(x) (log p_k(x) - log pbar_k)   (nats),
  p(y|x) = softmax over the 1008 logits of the FID Inception (tap "logits_1008"; all 1008
           outputs, as the TF Inception Score code and torch-fidelity use them),
  pbar   = the mean of p(y|x) over the scored pool images (the same rows as the table),

so exp(mean of the column) is the Inception Score of the scored pool (one split). Higher =
a confident prediction of an ImageNet class that is not over-represented in the pool.

Memory: the real train split comes from the real-data loaders (in memory, it is small). The
pool is never loaded whole: `extract_pool_features` streams the rows to score from disk
(decoding on a host prefetch thread, `features.extract_reader`), runs every feature network
on each batch in one pass and computes the per-image SSIM / PSNR of the batch against the
class references (`baselines.ssim_psnr_with_references`, references chosen once up front by
`baselines.choose_ssim_references`), so host memory holds a few image batches plus the
[N, D] features and device memory one batch per network, whatever the pool size. Pool
features are cached per network (features/pool*.npz) under a key of the extractor
fingerprint, the scored rows (id, class, path, file size and mtime), the classes and the
image loading options; with valid caches the pass only decodes images for SSIM / PSNR.

`score.max_pool_images` / `score.max_real_images` subsample (seeded, stratified by class)
for quick runs; unscored pool images then have no row and rank last. The pool subsample is
drawn from the metadata rows (before any image is read), so an unreadable file drops its row
instead of being replaced. On CPU the Inception runs at ~10 images/s (299x299, fp32) and
VGG16 at ~5 images/s (224x224).

`score.inception_size` (0 = 299) resizes the images to another side for the Inception
instead (>= 75; the compute scales with the side squared: 139 is ~4.6x less). Every
Inception-based column (DPS, FCS with the Inception backbone, the FID columns, realism,
PRDC, IS) then uses those features, and the values are not comparable with FIDs computed
at 299 (`scoring.json` records the size and the extractor). The rankings change too:
measured on the demo's 28 px digits (139 vs 299), Spearman 0.94 for DPS and 0.98 for
fid_192 but only 0.24 for FCS, 0.45 for fid_2048 and 0.36 for realism; on a controlled pool
U and DPS validated as well at 139, realism and fid_2048 much worse (configs/demo.py).
`score.vgg16_size` (0 = 224) does the same for VGG16 when it is the FCS backbone (>= 32;
112 is 4x less compute); `scoring.json` records it as "vgg16_size". `score.vgg16_microbatch`
(-1 = 2 on CPU, off on GPU; 0 = off) is how many images per step VGG16's conv stack takes
inside each batch (`models.vgg.apply_microbatched`: faster on CPU, same features to float
rounding, so not recorded); `score.inception_microbatch` (-1 = 4 on CPU) the same for the
Inception. `score.vgg16_winograd` (-1 = on for float32 on CPU, 0 = off, 1 = on) runs VGG16's
14-56 px layers by Winograd's algorithm (`models.winograd`: faster on CPU, fc7 the same to
a few 1e-6 relative; the extractor's name, recorded, says "conv=winograd").
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from synthbandit_jax import io as sio
from synthbandit_jax import parallel
from synthbandit_jax.data import pool as pool_lib
from synthbandit_jax.data import real as real_lib
from synthbandit_jax.metrics import baselines
from synthbandit_jax.metrics import features as features_lib
from synthbandit_jax.metrics import scoring
from synthbandit_jax.metrics import validation
from synthbandit_jax.training import inputs as inputs_lib

FCS_BACKBONES = ("inception", "vgg16")
_FCS_TAPS = {"inception": "pool_2048", "vgg16": features_lib.VGG_FC7_TAP}
LOGITS_TAP = "logits_1008"  # = synthbandit_jax.models.inception.LOGITS_TAP
# Feature networks of the stage and the cache files of their features.
INCEPTION, VGG16 = "inception", "vgg16"
_CACHE_NAMES = {INCEPTION: ("real_train.npz", "pool.npz"),
                VGG16: ("real_train_vgg16.npz", "pool_vgg16.npz")}


def _subsample(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
  """Row indices: all rows, or about `cap` rows, an equal seeded share per class."""
  n = len(labels)
  if cap <= 0 or cap >= n:
    return np.arange(n)
  per_class = max(1, cap // len(np.unique(labels)))
  return inputs_lib.cap_per_class(np.arange(n), labels, per_class, seed)


def _part(name: str) -> str:
  """This process's cache file: `pool.npz` alone, `pool.part-00001-of-00002.npz` with two."""
  count = jax.process_count()
  if count == 1:
    return name
  stem, ext = name.rsplit(".", 1)
  return f"{stem}.part-{jax.process_index():05d}-of-{count:05d}.{ext}"


def _gather_feature_set(local: features_lib.FeatureSet,
                        order: Sequence[str]) -> features_lib.FeatureSet:
  """The FeatureSets of all processes (disjoint slices of `order`, the ids of the whole
  set) merged into one, rows in the order of `order`: what one process would have made."""
  if jax.process_count() == 1:
    return local
  pos = {i: k for k, i in enumerate(order)}
  where = np.concatenate(parallel.gather_rows(np.asarray([pos[i] for i in local.ids],
                                                         np.int64)))
  rank = np.argsort(where, kind="stable")
  labels = np.concatenate(parallel.gather_rows(local.labels.astype(np.int32)))[rank]
  feats = {t: np.concatenate(parallel.gather_rows(np.asarray(local.features[t])))[rank]
           for t in sorted(local.features)}
  extra = parallel.gather_json({"skipped": local.skipped, "bad": local.bad})
  by_pos = lambda e: pos.get(e.get("id"), len(pos))  # pylint: disable=unnecessary-lambda-assignment
  return features_lib.FeatureSet(
      ids=[order[k] for k in where[rank]], labels=labels, class_names=local.class_names,
      features=feats, skipped=sorted((e for x in extra for e in x["skipped"]), key=by_pos),
      bad=sorted((e for x in extra for e in x["bad"]), key=by_pos),
      meta=dict(local.meta, processes=jax.process_count()))


def _features(extractor, images, ids, labels, class_names, path: Path, progress: bool):
  """Features of in-memory images, cached in `path` when the ids and extractor match."""
  if path.exists():
    try:
      cached = features_lib.load_features(path)
      if (cached.ids == list(ids) and
          cached.meta.get("fingerprint") == extractor.fingerprint):
        return cached
    except (ValueError, KeyError, OSError) as e:
      logging.warning("ignoring unreadable feature cache %s (%s)", path, e)
  fs = features_lib.extract_feature_set(extractor, images, ids=ids, labels=labels,
                                        class_names=class_names, progress=progress)
  fs.meta["fingerprint"] = extractor.fingerprint
  features_lib.save_features(path, fs)
  return fs


def fcs_backbone(score_config) -> str:
  """`score.fcs_backbone`, checked (ValueError naming the key and the choices)."""
  backbone = str(score_config.get("fcs_backbone", "inception")).strip().lower()
  if backbone not in FCS_BACKBONES:
    raise ValueError(f"score.fcs_backbone={backbone!r} is not one of {FCS_BACKBONES} "
                     "(\"inception\": Inception 2048-d pool tap; \"vgg16\": VGG16 fc7, needs "
                     "score.vgg16_weights)")
  return backbone


def vgg16_weights(score_config) -> Path:
  """The checked `score.vgg16_weights` file; errors name the key and how to make the file."""
  from synthbandit_jax.weights import vgg_import  # pylint: disable=import-outside-toplevel
  raw = str(score_config.get("vgg16_weights", "") or "").strip()
  if not raw:
    raise ValueError(
        "score.fcs_backbone='vgg16' needs score.vgg16_weights, the path of a torchvision vgg16 "
        f"state dict (.pth or .safetensors); {vgg_import.HOW_TO}, then pass "
        "--config.score.vgg16_weights=/path/vgg16.pth (or use score.fcs_backbone=inception)")
  path = Path(raw).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"score.vgg16_weights={raw!r}: no such file; {vgg_import.HOW_TO}")
  return path


def inception_weights(score_config) -> Path | None:
  """The checked `score.inception_weights` file, or None for the offline asset."""
  from synthbandit_jax.weights import inception_import  # pylint: disable=import-outside-toplevel
  raw = str(score_config.get("inception_weights", "") or "").strip()
  if not raw:
    return None
  path = Path(raw).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"score.inception_weights={raw!r}: no such file; "
                            f"{inception_import.PYTORCH_FID_HOW_TO}")
  return path


SCORE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(score_config):
  """`score.dtype` as a jnp dtype (the feature networks' compute dtype), checked."""
  name = str(score_config.dtype)
  if name not in SCORE_DTYPES:
    raise ValueError(f"score.dtype={name!r}: use one of {sorted(SCORE_DTYPES)}")
  return SCORE_DTYPES[name]


def _input_side(score_config, key: str, network: str, own: int, minimum: int,
                own_note: str) -> int | None:
  """`score.<key>`: None (0 or `own`, the network's own side) or the side, checked."""
  size = int(score_config.get(key, 0) or 0)
  if size == 0 or size == own:
    return None
  if size < minimum:
    raise ValueError(f"score.{key}={size}: {network} needs >= {minimum} pixels "
                     f"(0 = {own}, {own_note})")
  return size


def inception_size(score_config) -> int | None:
  """`score.inception_size`: None (299, FID's own input) or the side, checked (>= 75)."""
  from synthbandit_jax.models import inception as inc  # pylint: disable=import-outside-toplevel
  return _input_side(score_config, "inception_size", "the Inception", inc.INPUT_SIZE,
                     inc.MIN_INPUT_SIZE, "the size FID is defined at")


def vgg16_size(score_config) -> int | None:
  """`score.vgg16_size`: None (224, VGG16's own input) or the side, checked (>= 32)."""
  from synthbandit_jax.models import vgg as vgg_lib  # pylint: disable=import-outside-toplevel
  return _input_side(score_config, "vgg16_size", "VGG16", vgg_lib.INPUT_SIZE,
                     vgg_lib.MIN_INPUT_SIZE, "its own input size")


def _microbatch(score_config, key: str, cpu_default: int, what: str) -> int | None:
  value = score_config.get(key, -1)
  if isinstance(value, bool) or not isinstance(value, int) or value < -1:
    raise ValueError(f"score.{key}={value!r}: -1 (auto: {cpu_default} on CPU, off on GPU), 0 "
                     f"(off) or the images per step of {what}")
  return None if value == -1 else value


def vgg16_microbatch(score_config) -> int | None:
  """`score.vgg16_microbatch`: None (-1: the extractor's default, 2 images per step of the
  conv stack on CPU, off elsewhere), 0 (off: the whole batch at once) or images per step."""
  return _microbatch(score_config, "vgg16_microbatch", features_lib.VGG_CPU_MICROBATCH,
                     "VGG16's conv stack")


def vgg16_winograd(score_config) -> bool | None:
  """`score.vgg16_winograd`: None (-1: the extractor's default, on for float32 on CPU), False
  (0) or True (1: float32 only)."""
  value = score_config.get("vgg16_winograd", -1)
  if isinstance(value, bool) or value not in (-1, 0, 1):
    raise ValueError(f"score.vgg16_winograd={value!r}: -1 (auto: on for float32 on CPU), 0 "
                     "(off) or 1 (on)")
  return None if value == -1 else bool(value)


def inception_microbatch(score_config) -> int | None:
  """`score.inception_microbatch`: None (-1: the extractor's default, 4 images per step of
  the Inception on CPU, off elsewhere), 0 (off) or images per step."""
  return _microbatch(score_config, "inception_microbatch",
                     features_lib.INCEPTION_CPU_MICROBATCH, "the Inception")


def _join(a: features_lib.FeatureSet, b: features_lib.FeatureSet) -> features_lib.FeatureSet:
  """The rows of `a` that `b` also has (in `a`'s order), with the taps of both."""
  if set(a.features) & set(b.features):
    raise ValueError(f"feature taps overlap: {sorted(set(a.features) & set(b.features))}")
  pos_b = {i: k for k, i in enumerate(b.ids)}
  keep = [k for k, i in enumerate(a.ids) if i in pos_b]
  rows_b = [pos_b[a.ids[k]] for k in keep]
  feats = {t: v[keep] for t, v in a.features.items()}
  feats.update({t: v[rows_b] for t, v in b.features.items()})
  seen = {e["id"] for e in a.bad}
  bad = a.bad + [e for e in b.bad if e["id"] not in seen]
  return features_lib.FeatureSet(
      ids=[a.ids[k] for k in keep], labels=a.labels[keep], class_names=a.class_names,
      features=feats, skipped=a.skipped, bad=bad, meta={"parts": [a.meta, b.meta]})


# ------------------------------------------------------------------------------- the pool


@dataclasses.dataclass(frozen=True)
class PoolSpec:
  """The pool rows a config scores and how their images are read (no image is loaded).

  root: the pool directory. rows: its metadata rows of the scored classes, in metadata
  order. class_names: the label order (the real train split's). load_options: image loading
  options of `synthbandit_jax.data.pool.PoolReader` (channels, image_size, alpha,
  resize_method, fit: the real images' channels and size). skipped: rows left out by
  `pool.unknown_classes="skip"` ({"id", "path", "reason"}).
  """
  root: Path
  rows: list
  class_names: list
  load_options: dict
  skipped: list

  @property
  def labels(self) -> np.ndarray:
    """int32 label of every row."""
    index = {c: k for k, c in enumerate(self.class_names)}
    return np.array([index[r["class"]] for r in self.rows], np.int32)


def _restrict_classes(ds: real_lib.ImageDataset, keep: Sequence[str]) -> real_lib.ImageDataset:
  """The images of the classes `keep` (in that order), relabelled."""
  where = {c: i for i, c in enumerate(ds.class_names)}
  old = np.asarray([where[c] for c in keep])
  sub = ds.subset(np.flatnonzero(np.isin(ds.labels, old)))
  remap = np.full(len(ds.class_names), -1, np.int64)
  remap[old] = np.arange(len(keep))
  sub.labels = remap[sub.labels].astype(np.int32)
  sub.class_names = list(keep)
  return sub


def _pool_root(config, workdir: Path, splits: Mapping, class_names: Sequence[str],
               progress: bool) -> Path:
  """The pool directory of `config` (building the controlled pool first), resolved as
  `training.inputs.prepare_inputs` does."""
  return inputs_lib.pool_root(
      config, workdir, dict(splits), list(class_names), progress=progress,
      rebuild_hint="Pick another --workdir / pool.path, or remove the pool to rebuild it.")


def pool_spec(config, workdir: str | Path, train: real_lib.ImageDataset, splits: Mapping, *,
              progress: bool = True) -> tuple[PoolSpec, real_lib.ImageDataset]:
  """The PoolSpec of `config` and the real train split restricted to the shared classes.

  Reads only the pool's metadata. The class checks are those of `prepare_inputs`:
  pool.unknown_classes ("error" | "skip") and data.class_mismatch ("intersect" keeps the
  classes both sides have; otherwise differing class sets raise, naming them).
  """
  class_names = list(train.class_names)
  root = _pool_root(config, Path(workdir), splits, class_names, progress)
  unknown = config.pool.unknown_classes
  if unknown not in ("error", "skip"):
    raise ValueError(f"config pool.unknown_classes must be 'error' or 'skip', got {unknown!r}")
  root, rows = pool_lib.read_pool_rows(root)
  skipped = []
  if unknown == "skip":
    known = set(class_names)
    skipped = [{"id": r["id"], "path": r["path"],
                "reason": f"class {r['class']!r} not in class_names"}
               for r in rows if r["class"] not in known]
    rows = [r for r in rows if r["class"] in known]
    if skipped:
      logging.warning("%s: left out %d rows of classes not in the real data", root,
                      len(skipped))
  real_set, pool_set = set(class_names), {r["class"] for r in rows}
  if real_set != pool_set:
    only_real, only_pool = sorted(real_set - pool_set), sorted(pool_set - real_set)
    if config.data.class_mismatch != "intersect":
      raise ValueError(
          f"real and synthetic class sets differ: only in the real data {only_real}, only in "
          f"the pool {only_pool}. Fix the data, or set --config.data.class_mismatch=intersect "
          f"to score the classes both have.")
    keep = [c for c in class_names if c in pool_set]
    if not keep:
      raise ValueError("real and synthetic data share no class")
    logging.warning("class_mismatch=intersect: dropping real-only classes %s and pool-only "
                    "classes %s", only_real, only_pool)
    train = _restrict_classes(train, keep)
    rows = [r for r in rows if r["class"] in set(keep)]
    class_names = keep
  opts = dict(channels=int(train.images.shape[3]), image_size=tuple(train.images.shape[1:3]),
              alpha=config.data.alpha, resize_method=config.data.resize_method,
              fit=config.data.fit)
  return PoolSpec(root=Path(root), rows=rows, class_names=class_names, load_options=opts,
                  skipped=skipped), train


@dataclasses.dataclass
class PoolExtraction:
  """What one pass over pool rows gives.

  features: network name -> FeatureSet (rows in the order read; non-finite rows in `bad`).
  ssim, psnr: image id -> value for every image read (empty without references).
  skipped: rows that could not be read ({"id", "path", "reason"}).
  """
  features: dict
  ssim: dict
  psnr: dict
  skipped: list


def extract_pool_features(rows: Sequence[Mapping], *, root: str | Path,
                          class_names: Sequence[str], load_options: Mapping,
                          extractors: Mapping[str, features_lib.FeatureExtractor],
                          references: baselines.SSIMReferences | None = None,
                          prefetch_batches: int = 2, progress: bool = False,
                          batch_size: int | None = None) -> PoolExtraction:
  """Features (and SSIM / PSNR) of the pool images `rows`, streamed from disk in one pass.

  rows: metadata rows (from `PoolSpec.rows`, any subset in any order; only "id" is used, the
  rest is read from the pool's metadata), root / class_names / load_options: as in
  `PoolSpec`. extractors: name -> FeatureExtractor, all run on each decoded batch (one batch
  size). references: with them, every image's SSIM and PSNR against its class's references
  (chosen once for the whole pool, so a slice of the rows gets the values the whole pool
  would). Host and device memory are bounded by a few batches (`features.extract_reader`).

  Every result depends only on the image itself (and the fixed references), so the rows can
  be split across processes, e.g. ``rows[process_index::process_count]``, and the
  PoolExtractions merged by id.
  """
  names = list(extractors)
  nets = [extractors[n] for n in names]
  size = batch_size or (nets[0].batch_size if nets else 32)
  reader = pool_lib.iter_pool(root, batch_size=size, class_names=list(class_names),
                              ids=[r["id"] for r in rows], **dict(load_options))
  ssim: dict[str, float] = {}
  psnr: dict[str, float] = {}

  def pixels(images: np.ndarray, batch_rows: list) -> None:
    s, p = baselines.ssim_psnr_with_references(images, reader.labels(batch_rows), references)
    for r, a, b in zip(batch_rows, s.tolist(), p.tolist()):
      ssim[r["id"]], psnr[r["id"]] = a, b

  shape = features_lib._image_shape(load_options.get("image_size"),  # pylint: disable=protected-access
                                    load_options.get("channels"))
  sets = features_lib.extract_reader(
      nets, reader, image_shape=shape, prefetch_batches=prefetch_batches, progress=progress,
      on_host_batch=pixels if references is not None else None)
  return PoolExtraction(features=dict(zip(names, sets)), ssim=ssim, psnr=psnr,
                        skipped=list(reader.skipped))


def _cache_key(extractor: features_lib.FeatureExtractor, spec: PoolSpec,
               rows: Sequence[Mapping]) -> dict:
  reader = pool_lib.iter_pool(spec.root, batch_size=1, class_names=spec.class_names,
                              ids=[r["id"] for r in rows], **spec.load_options)
  return features_lib.pool_cache_key(extractor, reader, load_options=spec.load_options)


def _cached_pool_features(path: Path, key: dict) -> features_lib.FeatureSet | None:
  if not path.is_file():
    return None
  try:
    cached = features_lib.load_features(path)
  except (ValueError, KeyError, OSError) as e:
    logging.warning("ignoring unreadable feature cache %s (%s)", path, e)
    return None
  return cached if cached.meta.get("cache_key", {}).get("key") == key["key"] else None


def _pool_features(spec: PoolSpec, rows: Sequence[Mapping],
                   extractors: Mapping[str, features_lib.FeatureExtractor], fdir: Path,
                   references: baselines.SSIMReferences | None, progress: bool
                   ) -> tuple[dict, dict, dict, list]:
  """Per network the pool FeatureSet (cached ones reused), and SSIM / PSNR by id."""
  keys = {n: _cache_key(e, spec, rows) for n, e in extractors.items()}
  out = {n: _cached_pool_features(fdir / _part(_CACHE_NAMES[n][1]), keys[n])
         for n in extractors}
  todo = {n: extractors[n] for n, fs in out.items() if fs is None}
  if not todo and references is None:
    return out, {}, {}, []
  ex = extract_pool_features(rows, root=spec.root, class_names=spec.class_names,
                             load_options=spec.load_options, extractors=todo,
                             references=references, progress=progress,
                             batch_size=next(iter(extractors.values())).batch_size)
  for n, fs in ex.features.items():
    fs.meta.update(fingerprint=extractors[n].fingerprint, cache_key=keys[n])
    features_lib.save_features(fdir / _part(_CACHE_NAMES[n][1]), fs)
    out[n] = fs
  return out, ex.ssim, ex.psnr, ex.skipped


def _probs(logits: np.ndarray) -> np.ndarray:
  """softmax in float64 (rows sum to 1)."""
  return special.softmax(np.asarray(logits, np.float64), axis=1)


def run_scoring(config, workdir: str | Path, *, progress: bool = True,
                extractor: features_lib.FeatureExtractor | None = None,
                fcs_extractor: features_lib.FeatureExtractor | None = None) -> dict:
  """Scores the configured pool against the real train split (see module docstring).

  `extractor` replaces the Inception extractor (taps pool_192, pool_2048, and optionally
  logits_1008 for the "is" column) and `fcs_extractor` the VGG16 one (tap vgg_fc7; used
  with score.fcs_backbone="vgg16"); both need the batch size score.batch_size when both run.
  """
  from synthbandit_jax.weights import inception_import  # pylint: disable=import-outside-toplevel
  workdir = Path(workdir)
  t0 = time.perf_counter()
  sc = config.score
  backbone = fcs_backbone(sc)
  weights = vgg16_weights(sc) if backbone == "vgg16" and fcs_extractor is None else None
  vgg_size = vgg16_size(sc) if backbone == "vgg16" and fcs_extractor is None else None
  vgg_micro = vgg16_microbatch(sc) if backbone == "vgg16" and fcs_extractor is None else None
  vgg_wino = vgg16_winograd(sc) if backbone == "vgg16" and fcs_extractor is None else None
  inc_micro = inception_microbatch(sc)
  inc_weights = inception_weights(sc) if extractor is None else None
  splits, skipped = inputs_lib.real_splits(config)
  spec, train = pool_spec(config, workdir, splits["train"], splits, progress=progress)
  seed = int(config.seed)
  dtype = compute_dtype(sc)
  own_extractor = extractor is None
  size = None
  if own_extractor:
    size = inception_size(sc)
    params = inception_import.cached_inception_params(inc_weights)
    taps = features_lib.DEFAULT_INCEPTION_TAPS + ((LOGITS_TAP,) if "fc" in params else ())
    extractor = features_lib.inception_extractor(params, batch_size=int(sc.batch_size),
                                                 dtype=dtype, taps=taps, input_size=size,
                                                 microbatch=inc_micro)
  if backbone == "vgg16" and fcs_extractor is None:
    fcs_extractor = features_lib.vgg16_extractor(weights=weights, batch_size=int(sc.batch_size),
                                                 dtype=dtype, input_size=vgg_size,
                                                 microbatch=vgg_micro, winograd=vgg_wino)
  extractors = {INCEPTION: extractor}
  if backbone == "vgg16":
    extractors[VGG16] = fcs_extractor
  pool_rows = [spec.rows[k] for k in _subsample(spec.labels, int(sc.max_pool_images), seed)]
  real = train.subset(_subsample(train.labels, int(sc.max_real_images), seed + 1))
  names = spec.class_names
  fdir = workdir / "features"

  # Multi-host: each process extracts every process_count-th image (real and pool) on its
  # own devices; the pieces are gathered so every process holds what one process would.
  mine = parallel.process_slice(len(real.ids))
  real_ids = list(real.ids)
  real_sets = {n: _gather_feature_set(
      _features(e, real.images[mine], [real_ids[k] for k in mine], real.labels[mine], names,
                fdir / _part(_CACHE_NAMES[n][0]), progress), real_ids)
               for n, e in extractors.items()}
  real_fs = real_sets[INCEPTION]
  if backbone == "vgg16":
    real_fs = _join(real_fs, real_sets[VGG16])
  real_pos = {i: k for k, i in enumerate(real.ids)}
  keep_real = np.asarray([real_pos[i] for i in real_fs.ids], int)
  cfg = scoring.ScoringConfig(
      fcs_tap=_FCS_TAPS[backbone], u_form=sc.u_form, max_per_set=int(sc.max_per_set) or None,
      seed=seed, ssim_max_refs=int(sc.ssim_max_refs))
  index = {c: k for k, c in enumerate(names)}
  references = baselines.choose_ssim_references(
      np.array([index[r["class"]] for r in pool_rows], np.int32), real.images[keep_real],
      real_fs.labels, same_class=cfg.ssim_same_class, max_refs=cfg.ssim_max_refs,
      reduce=cfg.ssim_reduce, seed=cfg.seed)

  pool_sets, ssim, psnr, unreadable = _pool_features(
      spec, [pool_rows[k] for k in parallel.process_slice(len(pool_rows))], extractors, fdir,
      references, progress)
  if jax.process_count() > 1:
    pool_ids = [r["id"] for r in pool_rows]
    pool_sets = {n: _gather_feature_set(fs, pool_ids) for n, fs in pool_sets.items()}
    parts = parallel.gather_json({"ssim": ssim, "psnr": psnr, "unreadable": unreadable})
    ssim = {k: v for part in parts for k, v in part["ssim"].items()}
    psnr = {k: v for part in parts for k, v in part["psnr"].items()}
    unreadable = [e for part in parts for e in part["unreadable"]]
  pool_fs = pool_sets[INCEPTION]
  if backbone == "vgg16":
    pool_fs = _join(pool_fs, pool_sets[VGG16])
  if real_fs.bad or pool_fs.bad:
    logging.warning("%d real and %d pool images have non-finite features and are excluded: "
                    "%s", len(real_fs.bad), len(pool_fs.bad),
                    [b["id"] for b in (real_fs.bad + pool_fs.bad)[:10]])
  if not pool_fs.ids:
    raise ValueError(f"{spec.root}: none of the {len(pool_rows)} pool images to score could be "
                     "read and gave finite features (see the warnings)")
  pixel_scores = (np.array([ssim.get(i, np.nan) for i in pool_fs.ids]),
                  np.array([psnr.get(i, np.nan) for i in pool_fs.ids]))
  probs = None
  if LOGITS_TAP in pool_fs.features:
    probs = _probs(pool_fs.features[LOGITS_TAP])
  result = scoring.score_pool(
      pool_fs.ids, pool_fs.labels, pool_fs.features, real_fs.labels, real_fs.features,
      config=cfg, pixel_scores=pixel_scores, probs=probs, num_classes=len(names),
      class_names=names)
  result.sources["fcs"]["fcs_backbone"] = backbone
  if backbone == "vgg16":
    result.sources["fcs"]["extractor"] = fcs_extractor.name
    result.sources["fcs"]["weights"] = str(weights) if weights is not None else None
  if "is" in result.sources:
    result.sources["is"]["weights"] = str(inc_weights) if inc_weights is not None else None
  main = parallel.is_main_process()  # every process holds the same table; one writes it
  scores_path = workdir / "scores.csv"
  if main:
    scores_path = scoring.save_scoring_result(scores_path, result)
  skipped = skipped + [dict(s, source="pool") for s in spec.skipped + unreadable]
  summary = {
      "scores": str(scores_path), "scored_pool_images": len(pool_fs.ids),
      "pool_images": len(spec.rows), "real_images": len(real_fs.ids),
      "excluded": real_fs.bad + pool_fs.bad, "skipped_files": skipped,
      "fcs_backbone": backbone, "fcs_tap": cfg.fcs_tap,
      "inception_extractor": extractor.name,
      # the Inception's input side (None: a caller-supplied extractor)
      "inception_size": (size or 299) if own_extractor else None,
      "inception_score_column": "is" in result.table.columns,
      # VGG16's input side when it is the FCS backbone (None: not used, or caller-supplied)
      "vgg16_size": (vgg_size or 224) if backbone == "vgg16" and weights is not None else None,
      "sources": result.sources, "wall_time_s": None,
  }
  rows_by_id = {r["id"]: r for r in pool_rows}
  rows = [rows_by_id[i] for i in pool_fs.ids]
  if all("kind" in (r.get("extras") or {}) for r in rows):
    table = validation.validate_metrics(result.table, rows)
    ok, verdict = validation.u_beats_baselines(table)
    text = ("# Is the metric any good? (controlled pool)\n\n"
            "Spearman: correlation with the ground-truth quality order (clean > severity 1 > "
            "2 > 3 and style shifts > wrong label). AUROC: flagging wrong-label images.\n\n"
            + validation.format_validation_table(table) + "\n\n" + verdict + "\n")
    if main:
      sio.atomic_write_text(workdir / "metric_validation.md", text)
      sio.atomic_write_json(workdir / "metric_validation.json",
                            {"rows": table, "u_beats_baselines": ok, "verdict": verdict})
    summary.update(validation=table, u_beats_baselines=ok, verdict=verdict)
  summary["wall_time_s"] = time.perf_counter() - t0
  summary["processes"] = jax.process_count()
  if main:
    sio.atomic_write_json(workdir / "scoring.json", summary)
  parallel.sync("scoring: written")
  return summary
