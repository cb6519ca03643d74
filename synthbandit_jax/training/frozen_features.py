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

with `model.name` one of `HEAD_MODELS` ("linear_head": a new linear layer; "mlp_head": one
hidden layer). `feature_inputs` turns the training `Inputs` into the same `Inputs` whose bank,
val and test images are float32 feature vectors [N, D]; the epoch function uses float
banks as they are (uint8 banks are images, scaled to [0, 1]).

Features are cached per array under `cache_dir` (default WORKDIR/features), keyed by the
extractor's fingerprint and a sha256 of the image bytes, so the grid's datasets that share
the real splits compute them once and a resumed run reads them back.
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
  params = None
  weights = str(config.score.get("inception_weights", "") or "")
  if weights:
    from synthbandit_jax.weights import inception_import  # pylint: disable=g-import-not-at-top
    params = inception_import.cached_inception_params(weights)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[str(config.score.dtype)]
  return features_lib.inception_extractor(params, batch_size=int(config.score.batch_size),
                                          dtype=dtype, taps=(FEATURES[features],))


def _key(extractor, images: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(extractor.fingerprint.encode())
  h.update(repr((images.shape, str(images.dtype))).encode())
  h.update(np.ascontiguousarray(images).tobytes())
  return h.hexdigest()[:24]


def cached_features(extractor, tap: str, images: np.ndarray, cache_dir: Path, what: str, *,
                    progress: bool = False) -> np.ndarray:
  """float32 [N, D] features of uint8 images [N, H, W, C], read from or written to
  cache_dir/<what>-<key>.npz (atomic)."""
  from synthbandit_jax.metrics import features as features_lib  # pylint: disable=g-import-not-at-top
  path = Path(cache_dir) / f"{sio.safe_filename(what)}-{_key(extractor, images)}.npz"
  if path.exists():
    try:
      with np.load(path) as z:
        feats = z["features"]
      if feats.shape[0] == len(images):
        return feats
      log.warning("feature cache %s has %d rows for %d images; recomputing", path,
                  feats.shape[0], len(images))
    except (OSError, ValueError, KeyError) as e:
      log.warning("ignoring unreadable feature cache %s (%s)", path, e)
  out = features_lib.extract_arrays(extractor, images, nonfinite="raise", progress=progress)
  feats = np.asarray(out[tap], np.float32)
  from synthbandit_jax import parallel  # pylint: disable=g-import-not-at-top
  if parallel.is_main_process():  # every process computed the same features
    sio.atomic_save_npz(path, features=feats)
  return feats


def feature_inputs(config, inputs: Any, cache_dir: str | Path, *, progress: bool = True) -> Any:
  """`inputs` (training.inputs.Inputs) whose bank_images and eval_features hold the frozen
  backbone's float32 features of the bank, val and test images (see the module docstring).
  The images themselves stay in inputs.pool / train / val / test."""
  features = str(config.model.features)
  check_model_features(str(config.model.name), features)
  extractor = _extractor(config, features)
  tap = FEATURES[features]
  cache_dir = Path(cache_dir)
  n_pool = inputs.layout.num_pool
  parts = {"pool": inputs.bank_images[:n_pool], "train": inputs.bank_images[n_pool:],
           "val": inputs.val.images, "test": inputs.test.images}
  feats = {k: cached_features(extractor, tap, v, cache_dir, f"{features}-{k}", progress=progress)
           for k, v in parts.items()}
  bank = np.concatenate([feats["pool"], feats["train"]])
  log.info("model.features=%s: %d bank, %d val, %d test images -> %d-d features (%s)",
           features, len(bank), len(feats["val"]), len(feats["test"]), bank.shape[1], cache_dir)
  return dataclasses.replace(inputs, bank_images=bank,
                             eval_features={"val": feats["val"], "test": feats["test"]})
