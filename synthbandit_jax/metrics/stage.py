"""The scoring stage: features of the real train split and the synthetic pool, the per-image
score table, and (for a controlled pool) the metric validation table.

`run_scoring(config, workdir)` writes

  WORKDIR/features/real_train.npz, pool.npz  Inception taps (reused when the ids match)
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
``scoring.json`` (``fcs_backbone``) say which backbone fed FCS. On CPU the Inception runs at
~10 images/s (299x299, fp32) and VGG16 at ~5 images/s (224x224), so
`score.max_pool_images` / `score.max_real_images` subsample (seeded, stratified by class)
for quick runs; unscored pool images then have no row and rank last.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from synthbandit_jax import io as sio
from synthbandit_jax.metrics import features as features_lib
from synthbandit_jax.metrics import scoring
from synthbandit_jax.metrics import validation
from synthbandit_jax.training import inputs as inputs_lib

FCS_BACKBONES = ("inception", "vgg16")
_FCS_TAPS = {"inception": "pool_2048", "vgg16": features_lib.VGG_FC7_TAP}


def _subsample(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
  """Row indices: all rows, or about `cap` rows, an equal seeded share per class."""
  n = len(labels)
  if cap <= 0 or cap >= n:
    return np.arange(n)
  per_class = max(1, cap // len(np.unique(labels)))
  return inputs_lib.cap_per_class(np.arange(n), labels, per_class, seed)


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


def run_scoring(config, workdir: str | Path, *, progress: bool = True,
                extractor: features_lib.FeatureExtractor | None = None,
                fcs_extractor: features_lib.FeatureExtractor | None = None) -> dict:
  """Scores the configured pool against the real train split (see module docstring).

  `extractor` replaces the Inception extractor (taps pool_192, pool_2048) and
  `fcs_extractor` the VGG16 one (tap vgg_fc7; used with score.fcs_backbone="vgg16").
  """
  workdir = Path(workdir)
  t0 = time.perf_counter()
  sc = config.score
  backbone = fcs_backbone(sc)
  weights = vgg16_weights(sc) if backbone == "vgg16" and fcs_extractor is None else None
  inputs = inputs_lib.prepare_inputs(config, workdir, progress=progress, load_scores=False)
  seed = int(config.seed)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[sc.dtype]
  if extractor is None:
    extractor = features_lib.inception_extractor(batch_size=int(sc.batch_size), dtype=dtype)
  if backbone == "vgg16" and fcs_extractor is None:
    fcs_extractor = features_lib.vgg16_extractor(weights=weights, batch_size=int(sc.batch_size),
                                                 dtype=dtype)
  pool_rows = _subsample(inputs.pool.labels, int(sc.max_pool_images), seed)
  real_rows = _subsample(inputs.train.labels, int(sc.max_real_images), seed + 1)
  pool = inputs.pool.subset(pool_rows)
  real = inputs.train.subset(real_rows)
  names = inputs.class_names
  fdir = workdir / "features"
  real_fs = _features(extractor, real.images, real.ids, real.labels, names,
                      fdir / "real_train.npz", progress)
  pool_fs = _features(extractor, pool.images, pool.ids, pool.labels, names,
                      fdir / "pool.npz", progress)
  if backbone == "vgg16":
    real_fs = _join(real_fs, _features(fcs_extractor, real.images, real.ids, real.labels, names,
                                       fdir / "real_train_vgg16.npz", progress))
    pool_fs = _join(pool_fs, _features(fcs_extractor, pool.images, pool.ids, pool.labels, names,
                                       fdir / "pool_vgg16.npz", progress))
  if real_fs.bad or pool_fs.bad:
    logging.warning("%d real and %d pool images have non-finite features and are excluded: "
                    "%s", len(real_fs.bad), len(pool_fs.bad),
                    [b["id"] for b in (real_fs.bad + pool_fs.bad)[:10]])
  pool_pos = {i: k for k, i in enumerate(pool.ids)}
  real_pos = {i: k for k, i in enumerate(real.ids)}
  keep_pool = np.asarray([pool_pos[i] for i in pool_fs.ids], int)
  keep_real = np.asarray([real_pos[i] for i in real_fs.ids], int)
  cfg = scoring.ScoringConfig(
      fcs_tap=_FCS_TAPS[backbone], u_form=sc.u_form, max_per_set=int(sc.max_per_set) or None,
      seed=seed, ssim_max_refs=int(sc.ssim_max_refs))
  result = scoring.score_pool(
      pool_fs.ids, pool_fs.labels, pool_fs.features, real_fs.labels, real_fs.features,
      config=cfg, images=pool.images[keep_pool], real_images=real.images[keep_real],
      num_classes=len(names), class_names=names)
  result.sources["fcs"]["fcs_backbone"] = backbone
  if backbone == "vgg16":
    result.sources["fcs"]["extractor"] = fcs_extractor.name
    result.sources["fcs"]["weights"] = str(weights) if weights is not None else None
  scores_path = scoring.save_scoring_result(workdir / "scores.csv", result)
  summary = {
      "scores": str(scores_path), "scored_pool_images": len(pool_fs.ids),
      "pool_images": len(inputs.pool), "real_images": len(real_fs.ids),
      "excluded": real_fs.bad + pool_fs.bad, "skipped_files": inputs.skipped,
      "fcs_backbone": backbone, "fcs_tap": cfg.fcs_tap,
      "sources": result.sources, "wall_time_s": None,
  }
  rows_by_id = {r["id"]: r for r in inputs.pool.rows}
  rows = [rows_by_id[i] for i in pool_fs.ids]
  if all("kind" in (r.get("extras") or {}) for r in rows):
    table = validation.validate_metrics(result.table, rows)
    ok, verdict = validation.u_beats_baselines(table)
    text = ("# Is the metric any good? (controlled pool)\n\n"
            "Spearman: correlation with the ground-truth quality order (clean > severity 1 > "
            "2 > 3 and style shifts > wrong label). AUROC: flagging wrong-label images.\n\n"
            + validation.format_validation_table(table) + "\n\n" + verdict + "\n")
    sio.atomic_write_text(workdir / "metric_validation.md", text)
    sio.atomic_write_json(workdir / "metric_validation.json",
                          {"rows": table, "u_beats_baselines": ok, "verdict": verdict})
    summary.update(validation=table, u_beats_baselines=ok, verdict=verdict)
  summary["wall_time_s"] = time.perf_counter() - t0
  sio.atomic_write_json(workdir / "scoring.json", summary)
  return summary
