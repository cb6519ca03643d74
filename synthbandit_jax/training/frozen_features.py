"""Frozen pretrained backbone + a new head, trained on cached backbone features.

The paper's classifiers are pretrained networks whose backbone stays frozen while a new head
trains. With a frozen backbone (inference mode, no augmentation) the features of an image
are the same every epoch, so computing them once and training the head on them gives the
same head as running the backbone inside every step, at a fraction of the cost (on CPU the
FID Inception-V3 runs at ~10-30 images/s; the head trains at thousands).

`config.model.features` names the backbone tap:

  ""                 train on images (every classifier except the heads)
  "inception_2048"   the FID Inception-V3's 2048-d pool features (the offline asset), also
  "inception_768" / "inception_192" / "inception_64"   its earlier taps (spatially averaged)

at `model.features_size` pixels (0 = 299, the network's own size; any size >= 75 works, at
~(size / 299)^2 of the cost), with `model.name` one of `HEAD_MODELS` ("linear_head": a new
linear layer; "mlp_head": one hidden layer). `feature_inputs` turns the training `Inputs` into the same `Inputs` whose bank,
val and test images are float32 feature vectors [N, D]; the epoch function uses float
banks as they are (uint8 banks are images, scaled to [0, 1]).

Features are cached per image under `cache_dir` (default WORKDIR/features), keyed by the
extractor's fingerprint and a sha1 of the image bytes, so an image is computed once however
many splits, datasets (the grid's share the real images) or runs it appears in.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from synthbandit_jax import io as sio

log = logging.getLogger(__name__)

HEAD_MODELS = ("linear_head", "mlp_head")
FEATURES = {"inception_2048": "pool_2048", "inception_768": "mixed_6e_768",
            "inception_192": "pool_192", "inception_64": "pool_64"}


def check_model_features(model_name: str, features: str) -> None:
  """Errors for a head without features, features without a head, or an unknown tap."""
  features = str(features or "")
  if features and features not in FEATURES:
    raise ValueError(f"config model.features={features!r}: unknown; valid: \"\" (images) or "
                     f"{sorted(FEATURES)}")
  if model_name in HEAD_MODELS and not features:
    raise ValueError(f"config model.name={model_name!r} trains a head on frozen backbone "
                     f"features: set model.features to one of {sorted(FEATURES)}")
  if features and model_name not in HEAD_MODELS:
    raise ValueError(f"config model.features={features!r} replaces the images by feature "
                     f"vectors, which model.name={model_name!r} cannot take; use one of "
                     f"{list(HEAD_MODELS)}")


def _extractor(config, features: str):
  from synthbandit_jax.metrics import features as features_lib  # pylint: disable=g-import-not-at-top
  from synthbandit_jax.metrics import stage  # pylint: disable=g-import-not-at-top
  from synthbandit_jax.weights import inception_import  # pylint: disable=g-import-not-at-top
  # The scoring stage's checks and loader: the same network as the scores use.
  params = inception_import.cached_inception_params(stage.inception_weights(config.score))
  dtype = stage.compute_dtype(config.score)
  size = int(config.model.get("features_size", 0) or 0) or None
  return features_lib.inception_extractor(params, batch_size=int(config.score.batch_size),
                                          dtype=dtype, taps=(FEATURES[features],),
                                          input_size=size,
                                          microbatch=stage.inception_microbatch(config.score))


def _image_keys(images: np.ndarray) -> np.ndarray:
  """sha1 of each image's bytes (and shape, dtype) as 20-byte keys [N]."""
  tag = repr((images.shape[1:], str(images.dtype))).encode()
  return np.array([hashlib.sha1(tag + np.ascontiguousarray(im).tobytes()).digest()
                   for im in images], dtype="S20")


def _read_store(store: Path) -> dict[bytes, np.ndarray]:
  known: dict[bytes, np.ndarray] = {}
  for f in sorted(store.glob("*.npz")):
    try:
      with np.load(f) as z:
        keys, feats = z["keys"], z["features"]
      if len(keys) != len(feats):
        raise ValueError(f"{len(keys)} keys for {len(feats)} rows")
    except (OSError, ValueError, KeyError) as e:
      log.warning("ignoring unreadable feature cache shard %s (%s)", f, e)
      continue
    known.update(zip(keys.tolist(), feats))
  return known


def cached_features(extractor, tap: str, images: np.ndarray, cache_dir: str | Path, *,
                    progress: bool = False) -> np.ndarray:
  """float32 [N, D] features of uint8 images [N, H, W, C] through a per-image cache.

  The cache is a directory per (tap, extractor fingerprint) under `cache_dir` holding .npz
  shards of {keys: sha1 of the image bytes, features}; images already there (from any
  earlier call: another split, dataset or run) are not recomputed, duplicates are computed
  once, and the new ones are added as one more shard (written atomically, by process 0).
  With several processes each extracts its share of the new images (`_extract_shared`).
  Images with NaN/Inf features raise a ValueError naming their rows.
  """
  from synthbandit_jax import parallel  # pylint: disable=g-import-not-at-top
  store = Path(cache_dir) / f"{sio.safe_filename(tap)}-{extractor.fingerprint[:16]}"
  keys = _image_keys(images)
  known = _read_store(store) if store.exists() else {}
  todo = {}
  for i, k in enumerate(keys.tolist()):
    if k not in known and k not in todo:
      todo[k] = i
  if todo:
    rows = np.fromiter(todo.values(), np.int64, len(todo))
    log.info("features %s: %d of %d images not cached yet (%s)", tap, len(rows), len(images),
             store)
    new = _extract_shared(extractor, tap, images[rows], progress=progress)
    bad = np.flatnonzero(~np.isfinite(new).all(axis=1))
    if len(bad):  # every process holds the same `new`: all raise alike
      raise ValueError(f"features {tap}: {len(bad)} of {len(rows)} new images have non-finite "
                       f"features (input rows {rows[bad[:5]].tolist()}"
                       + (", ..." if len(bad) > 5 else "") + "); check those images")
    new_keys = keys[rows]
    if parallel.is_main_process():  # every process holds the same features
      name = hashlib.sha1(b"".join(sorted(new_keys.tolist()))).hexdigest()[:16]
      sio.atomic_save_npz(store / f"{name}.npz", keys=new_keys, features=new)
    known.update(zip(new_keys.tolist(), new))
  if not len(images):
    dim = next(iter(extractor.feature_dims(images.shape[1:]).values()))
    return np.zeros((0, dim), np.float32)
  return np.stack([known[k] for k in keys.tolist()]).astype(np.float32, copy=False)


def _extract_shared(extractor, tap: str, images: np.ndarray, *, progress: bool,
                    process_index: int | None = None, process_count: int | None = None,
                    gather: Any = None) -> np.ndarray:
  """float32 [N, D] features of `images`, computed once across processes: each extracts
  every process_count-th image on its own devices (`parallel.process_slice`, as the scoring
  stage does) and the pieces are gathered (`parallel.gather_process_slices`), so every
  process returns all N rows in order. (`process_index`, `process_count`, `gather` default
  to this run's; tests pass their own.)
  """
  from synthbandit_jax import parallel  # pylint: disable=g-import-not-at-top
  from synthbandit_jax.metrics import features as features_lib  # pylint: disable=g-import-not-at-top
  mine = parallel.process_slice(len(images), process_index, process_count)
  # NaN/Inf rows are kept here and reported by the caller once all rows are together.
  part = np.asarray(features_lib.extract_arrays(extractor, images[mine], nonfinite="keep",
                                                progress=progress)[tap], np.float32)
  return parallel.gather_process_slices(part, len(images), process_count=process_count,
                                        gather=gather)


def feature_inputs(config, inputs: Any, cache_dir: str | Path, *, progress: bool = True) -> Any:
  """`inputs` (training.inputs.Inputs) whose bank_images and eval_features hold the frozen
  backbone's float32 features of the bank, val and test images (see the module docstring).
  The images themselves stay in inputs.pool / train / val / test."""
  features = str(config.model.features)
  check_model_features(str(config.model.name), features)
  extractor = _extractor(config, features)
  tap = FEATURES[features]
  cache_dir = Path(cache_dir)
  # One pass over bank, val and test: the cache is read once and the missing images are
  # extracted in one run (one compiled shape, one progress bar).
  sizes = [len(inputs.bank_images), len(inputs.val.images), len(inputs.test.images)]
  every = np.concatenate([inputs.bank_images, inputs.val.images, inputs.test.images])
  bank, val, test = np.split(cached_features(extractor, tap, every, cache_dir,
                                             progress=progress), np.cumsum(sizes)[:2])
  log.info("model.features=%s: %d bank, %d val, %d test images -> %d-d features (%s)",
           features, len(bank), len(val), len(test), bank.shape[1], cache_dir)
  return dataclasses.replace(inputs, bank_images=bank, eval_features={"val": val, "test": test})
