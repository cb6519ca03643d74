"""The per-image score table of a synthetic pool, from precomputed features.

`score_pool` takes features that were already extracted (no network runs here) and returns a
`ScoreTable` with one row per pool image plus, alongside, which backbone and feature tap fed
each column (`ScoringResult.sources`), so reports can say so.

Columns (direction in brackets; `c` = the image's own class; "real" = the real-train set):

  dps               [higher] DPS on `dps_tap` (usability.dps; real and synthetic class Gaussians)
  fcs               [higher] FCS on `fcs_tap` (usability.fcs; p_c = mean real feature of c)
  u                 [higher] U = combine(dps, fcs, u_form): min-max normalised over the pool
  fid_192, fid_2048 [lower]  per-image Frechet distance ||x - mu_c||^2 + tr(S_c) to the real
                             class-c Gaussian on the taps of `fid_taps` (pool_192, pool_2048)
  ssim, psnr        [higher] against real reference images (baselines.ssim_psnr_against_
                             references; same class by default); only with images
  is                [higher] per-image Inception Score contribution KL(p(y|x) || p(y))
                             (baselines.inception_score_per_image); only with class probabilities
  realism           [higher] realism score (Kynkaanniemi et al. 2019) against all real images
                             on `knn_tap`
  prdc_in_manifold  [higher] 1 if the image lies in some real k-NN ball (precision vote), else 0
  prdc_density      [higher] number of real k-NN balls holding the image / k (density share)
  agg_mean, agg_median, agg_min, agg_max  [higher]
                             mean / median / min / max per image of the min-max normalised
                             metrics listed in `aggregate_columns`, each first oriented so
                             that higher is better (lower-is-better columns are negated).
                             Default (`aggregate_columns=None`): the paper's per-image metrics
                             that are present, in this order: dps, fcs, every fid column, ssim,
                             psnr, is. U is left out (it is dps and fcs again), and so are the
                             k-NN columns (not in the paper). The columns used are recorded in
                             `sources["agg_mean"]["columns"]`.

Real class statistics (for dps, fcs and the fid columns) use `max_per_set` random real images
per set (None = all; 64 = the paper), seeded by `seed`. Classes with fewer than 2 images get
regularised statistics (gaussian.class_stats logs a warning), never NaN. Classes without
synthetic images have no rows; a warning names them. Feature rows with NaN or Inf must have
been excluded by the caller: a ValueError names the first offending ids.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from synthbandit_jax import io as sio
from synthbandit_jax.data.scores import ScoreTable, save_score_table
from synthbandit_jax.metrics import baselines
from synthbandit_jax.metrics import gaussian
from synthbandit_jax.metrics import usability

PAPER_AGGREGATE_ORDER = ("dps", "fcs", "<fid>", "ssim", "psnr", "is")
AGGREGATES = ("mean", "median", "min", "max")
_INCEPTION = "Inception-V3 (FID network, TF 2015-12-05 weights)"
_VGG16 = "VGG16 (torchvision layout)"


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  """Which features and settings feed each score.

  dps_tap: feature key for DPS (the reference used the Inception 192-d tap).
  fcs_tap: feature key for FCS: "vgg_fc7" (the paper: VGG16 fc7 after ReLU, from
    `features.vgg16_extractor` with torchvision vgg16 weights; the scoring stage's
    score.fcs_backbone="vgg16") or "pool_2048" (the offline default). Features must be
    non-negative.
  fid_taps: (column name, feature key) pairs of the per-image Frechet distance columns; a
    pair whose key is missing from the features is skipped with a warning.
  knn_tap: feature key for the realism score and PRDC (missing: both skipped with a warning).
  u_form: "mean" (the reference's OursComp_Avg) or "product".
  max_per_set: real and synthetic images per Gaussian set (None = all; 64 = the paper).
  exclude_self: leave-one-out Syn_c for DPS (needs max_per_set=None).
  ssim_same_class / ssim_max_refs / ssim_reduce: see baselines.ssim_psnr_against_references.
  realism_k / prdc_k: the k of the k-NN radii.
  knn_max_real: at most this many real images (seeded random subset) for realism and PRDC.
  aggregate_columns: columns entering agg_*; None = the paper's metrics (module docstring).
  small_set / eps: regularisation of sets with fewer than 2 images (gaussian.class_stats).
  seed: seeds every random subset (Gaussian sets, SSIM references, k-NN reals).
  """
  dps_tap: str = "pool_192"
  fcs_tap: str = "pool_2048"
  fid_taps: tuple[tuple[str, str], ...] = (("fid_192", "pool_192"), ("fid_2048", "pool_2048"))
  knn_tap: str = "pool_2048"
  u_form: str = "mean"
  max_per_set: int | None = None
  exclude_self: bool = False
  ssim_same_class: bool = True
  ssim_max_refs: int | None = 64
  ssim_reduce: str = "mean"
  realism_k: int = 3
  prdc_k: int = 5
  knn_max_real: int | None = None
  aggregate_columns: tuple[str, ...] | None = None
  small_set: str = "pooled"
  eps: float = 1e-6
  seed: int = 0

  def validate(self) -> None:
    """Raises ValueError naming the bad config key."""
    if self.u_form not in usability.COMBINE_FORMS:
      raise ValueError(f"ScoringConfig.u_form={self.u_form!r} is not one of "
                       f"{usability.COMBINE_FORMS}")
    if self.exclude_self and self.max_per_set is not None:
      raise ValueError("ScoringConfig.exclude_self=True needs max_per_set=None (the "
                       "leave-one-out update is exact only for stats fitted on the whole pool)")
    if self.max_per_set is not None and self.max_per_set < 1:
      raise ValueError(f"ScoringConfig.max_per_set must be None or >= 1, got "
                       f"{self.max_per_set}")
    for key in ("realism_k", "prdc_k"):
      if getattr(self, key) < 1:
        raise ValueError(f"ScoringConfig.{key} must be >= 1, got {getattr(self, key)}")
    if self.knn_max_real is not None and self.knn_max_real < 2:
      raise ValueError(f"ScoringConfig.knn_max_real must be None or >= 2, got "
                       f"{self.knn_max_real}")
    if self.ssim_reduce not in baselines.REDUCTIONS:
      raise ValueError(f"ScoringConfig.ssim_reduce={self.ssim_reduce!r} is not one of "
                       f"{baselines.REDUCTIONS}")
    names = [name for name, _ in self.fid_taps]
    if len(set(names)) != len(names):
      raise ValueError(f"ScoringConfig.fid_taps has duplicate column names {names}")


class ScoringResult(NamedTuple):
  """`table`: the score table; `sources[column]`: backbone, tap and what the column is;
  `config`: the ScoringConfig as a dict."""
  table: ScoreTable
  sources: dict[str, dict[str, Any]]
  config: dict[str, Any]


def backbone_of(tap: str) -> str:
  """A readable name of the network behind a feature key ("pool_192" -> Inception-V3 ...)."""
  t = tap.lower()
  if t.startswith("vgg"):
    return _VGG16 + (" (fc7, 4096-d, after ReLU)" if "fc7" in t else "")
  if t.startswith(("pool_", "mixed_", "logits")):
    return _INCEPTION
  return f"unknown backbone (feature key {tap!r})"


def _log() -> logging.Logger:
  return logging.getLogger(__name__)


def _check_labels(labels, n: int, what: str) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,):
    raise ValueError(f"{what} must have shape ({n},), got {y.shape}")
  if n and not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{what} must be integer class indices, got dtype {y.dtype}")
  if n and y.min() < 0:
    raise ValueError(f"{what} must be >= 0, found {int(y.min())}")
  return y.astype(np.int64)


def _tap(features: Mapping[str, Any], key: str, n: int, what: str, ids: Sequence[str] | None,
         config_key: str) -> np.ndarray:
  """features[key] as a checked finite [n, D] array; errors name the key and bad ids."""
  if key not in features:
    raise ValueError(f"{what} features have no key {key!r} (set by ScoringConfig.{config_key});"
                     f" available keys: {sorted(features)}")
  x = np.asarray(features[key])
  if x.ndim != 2 or x.shape[0] != n:
    raise ValueError(f"{what} features[{key!r}] must be [{n}, D], got shape {x.shape}")
  bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
  if bad.size:
    names = [ids[i] for i in bad[:5]] if ids is not None else bad[:5].tolist()
    label = "ids" if ids is not None else "rows"
    raise ValueError(f"{what} features[{key!r}]: {bad.size} rows contain NaN or Inf, first "
                     f"{label} {names}; exclude those images before scoring")
  return x


def _class_label(c: int, class_names: Sequence[str] | None) -> str:
  return f"{c} ({class_names[c]})" if class_names is not None else str(c)


def _aggregate_columns(cfg: ScoringConfig, columns: Mapping[str, np.ndarray],
                       fid_names: Sequence[str]) -> list[str]:
  if cfg.aggregate_columns is not None:
    missing = [c for c in cfg.aggregate_columns if c not in columns]
    if missing:
      raise ValueError(f"ScoringConfig.aggregate_columns names columns {missing} that were "
                       f"not computed; computed: {list(columns)}")
    if not cfg.aggregate_columns:
      raise ValueError("ScoringConfig.aggregate_columns is empty; give None or some columns")
    return list(cfg.aggregate_columns)
  order: list[str] = []
  for name in PAPER_AGGREGATE_ORDER:
    order.extend(fid_names if name == "<fid>" else [name])
  return [c for c in order if c in columns]


def score_pool(ids: Sequence[str], labels, features: Mapping[str, Any], real_labels,
               real_features: Mapping[str, Any], *, config: ScoringConfig | None = None,
               images=None, real_images=None, pixel_scores=None, probs=None,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None) -> ScoringResult:
  """Scores every pool image (module docstring lists the columns); returns a ScoringResult.

  ids [N] pool image ids; labels [N] int class indices; features: feature key -> [N, D]
  (e.g. "pool_192", "pool_2048", "vgg_fc7"); real_labels [R] and real_features key -> [R, D]
  of the real training images, same keys. images [N, H, W(, C)] uint8 and real_images
  [R, H, W(, C)] (both or neither) add ssim/psnr; or pixel_scores = (ssim [N], psnr [N])
  computed elsewhere with the same settings (e.g. streamed: baselines.choose_ssim_references
  + ssim_psnr_with_references with cfg's ssim_* values and seed); probs [N, K] class
  probabilities add is.
  num_classes defaults to 1 + the largest label; class_names make warnings readable.
  """
  cfg = config or ScoringConfig()
  cfg.validate()
  ids = [str(i) for i in ids]
  n = len(ids)
  if n == 0:
    raise ValueError("score_pool got an empty pool (no ids)")
  y = _check_labels(labels, n, "labels")
  ry = _check_labels(real_labels, np.asarray(real_labels).shape[0], "real_labels")
  r = ry.shape[0]
  if r == 0:
    raise ValueError("score_pool needs real training images; real_labels is empty")
  c_num = int(num_classes) if num_classes is not None else int(max(y.max(), ry.max())) + 1
  if y.max() >= c_num or ry.max() >= c_num:
    raise ValueError(f"labels must lie in [0, num_classes={c_num}); found "
                     f"{int(max(y.max(), ry.max()))}")
  if class_names is not None and len(class_names) != c_num:
    raise ValueError(f"class_names has {len(class_names)} names for {c_num} classes")
  if (images is None) != (real_images is None):
    raise ValueError("give both images and real_images (for ssim/psnr) or neither")
  if pixel_scores is not None and images is not None:
    raise ValueError("give images/real_images or pixel_scores (precomputed ssim/psnr), not both")
  if pixel_scores is not None:
    pixel_scores = tuple(np.asarray(v, np.float64) for v in pixel_scores)
    if len(pixel_scores) != 2 or any(v.shape != (n,) for v in pixel_scores):
      raise ValueError(f"pixel_scores must be (ssim [{n}], psnr [{n}]), got shapes "
                       f"{[np.shape(v) for v in pixel_scores]}")

  syn_count = np.bincount(y, minlength=c_num)
  real_count = np.bincount(ry, minlength=c_num)
  empty = [_class_label(c, class_names) for c in np.flatnonzero(syn_count == 0)]
  if empty:
    _log().warning("classes without synthetic images are skipped (no rows to score): %s",
                   ", ".join(empty))
  no_real = [_class_label(c, class_names) for c in np.flatnonzero(real_count == 0)]
  if no_real:
    _log().warning("classes without real training images: %s; their real statistics fall "
                   "back to the pooled ones, so their scores mean little", ", ".join(no_real))

  stats_kw = dict(max_per_set=cfg.max_per_set, seed=cfg.seed, small_set=cfg.small_set,
                  eps=cfg.eps, class_names=class_names)
  real_stats: dict[str, gaussian.ClassStats] = {}

  def real_stats_of(key: str, x_real: np.ndarray) -> gaussian.ClassStats:
    if key not in real_stats:
      real_stats[key] = gaussian.class_stats(x_real, ry, c_num, what=f"real ({key})",
                                             **stats_kw)
    return real_stats[key]

  columns: dict[str, np.ndarray] = {}
  directions: dict[str, str] = {}
  sources: dict[str, dict[str, Any]] = {}
  sets = "all images" if cfg.max_per_set is None else f"{cfg.max_per_set} random images"

  # DPS
  x = _tap(features, cfg.dps_tap, n, "pool", ids, "dps_tap")
  xr = _tap(real_features, cfg.dps_tap, r, "real", None, "dps_tap")
  if xr.shape[1] != x.shape[1]:
    raise ValueError(f"features[{cfg.dps_tap!r}] has dimension {x.shape[1]} in the pool and "
                     f"{xr.shape[1]} in the real set; extract both with the same network")
  syn_stats = gaussian.class_stats(x, y, c_num, what=f"synthetic ({cfg.dps_tap})", **stats_kw)
  columns["dps"] = usability.dps(x, y, real_stats_of(cfg.dps_tap, xr), syn_stats,
                                 exclude_self=cfg.exclude_self)
  directions["dps"] = "higher"
  sources["dps"] = {"backbone": backbone_of(cfg.dps_tap), "tap": cfg.dps_tap,
                    "what": f"(d(Syn_c) + d(Syn_not_c)) / (d(Real_c) + d(Real_not_c)), "
                            f"Gaussians of {sets} per set, exclude_self={cfg.exclude_self}"}

  # FCS
  x = _tap(features, cfg.fcs_tap, n, "pool", ids, "fcs_tap")
  xr = _tap(real_features, cfg.fcs_tap, r, "real", None, "fcs_tap")
  if xr.shape[1] != x.shape[1]:
    raise ValueError(f"features[{cfg.fcs_tap!r}] has dimension {x.shape[1]} in the pool and "
                     f"{xr.shape[1]} in the real set; extract both with the same network")
  columns["fcs"] = usability.fcs(x, y, real_stats_of(cfg.fcs_tap, xr).in_class.mean)
  directions["fcs"] = "higher"
  sources["fcs"] = {"backbone": backbone_of(cfg.fcs_tap), "tap": cfg.fcs_tap,
                    "what": f"1 / KL(p_c || q_x), p_c = mean real feature of class c ({sets})"}

  # U
  columns["u"] = usability.combine(columns["dps"], columns["fcs"], cfg.u_form)
  directions["u"] = "higher"
  sources["u"] = {"backbone": f"dps: {sources['dps']['backbone']}; fcs: "
                              f"{sources['fcs']['backbone']}",
                  "tap": f"dps: {cfg.dps_tap}; fcs: {cfg.fcs_tap}",
                  "what": f"U ({cfg.u_form}) of min-max normalised DPS and FCS"}

  # Per-image Frechet distance to the real class Gaussian.
  fid_names = []
  for name, key in cfg.fid_taps:
    if key not in features or key not in real_features:
      _log().warning("column %s skipped: feature key %r is missing from the %s features "
                     "(ScoringConfig.fid_taps)", name, key,
                     "pool" if key not in features else "real")
      continue
    x = _tap(features, key, n, "pool", ids, "fid_taps")
    xr = _tap(real_features, key, r, "real", None, "fid_taps")
    columns[name] = _class_point_frechet(x, y, real_stats_of(key, xr).in_class)
    directions[name] = "lower"
    sources[name] = {"backbone": backbone_of(key), "tap": key,
                     "what": f"||x - mu_c||^2 + tr(S_c), real class-c Gaussian ({sets})"}
    fid_names.append(name)

  # SSIM / PSNR
  if images is not None or pixel_scores is not None:
    if pixel_scores is not None:
      s, p = pixel_scores
    else:
      s, p = baselines.ssim_psnr_against_references(
          images, y, real_images, ry, same_class=cfg.ssim_same_class,
          max_refs=cfg.ssim_max_refs, reduce=cfg.ssim_reduce, seed=cfg.seed)
    refs = "its own class" if cfg.ssim_same_class else "all classes"
    how = (f"{cfg.ssim_reduce} over up to {cfg.ssim_max_refs or 'all'} real-train images of "
           f"{refs}")
    for name, v in (("ssim", s), ("psnr", p)):
      columns[name] = v
      directions[name] = "higher"
      sources[name] = {"backbone": "pixels", "tap": None, "what": f"{name.upper()}, {how}"}

  # Inception Score contribution
  if probs is not None:
    pr = np.asarray(probs)
    if pr.ndim != 2 or pr.shape[0] != n:
      raise ValueError(f"probs must be [{n}, K] class probabilities, got shape {pr.shape}")
    columns["is"] = baselines.inception_score_per_image(pr)
    directions["is"] = "higher"
    sources["is"] = {"backbone": _INCEPTION, "tap": "logits (softmax)",
                     "what": "KL(p(y|x) || p(y)), p(y) = mean over the pool"}

  # k-NN metrics
  _knn_columns(cfg, features, real_features, ids, n, r, columns, directions, sources)

  # Normalised aggregates
  agg_cols = _aggregate_columns(cfg, columns, fid_names)
  oriented = {c: (columns[c] if directions[c] == "higher" else -columns[c]) for c in agg_cols}
  aggs = usability.normalised_aggregates(oriented)
  for how in AGGREGATES:
    name = f"agg_{how}"
    columns[name] = aggs[how]
    directions[name] = "higher"
    sources[name] = {"backbone": "mixed", "tap": None, "columns": list(agg_cols),
                     "what": f"{how} of the min-max normalised columns {agg_cols}, oriented "
                             "higher = better"}

  table = ScoreTable(ids=ids, columns=columns, directions=directions)
  return ScoringResult(table=table, sources=sources, config=dataclasses.asdict(cfg))


def _class_point_frechet(x: np.ndarray, y: np.ndarray, st: gaussian.SetStats) -> np.ndarray:
  """usability.point_frechet of each row to its class Gaussian, float64, one class at a
  time (memory bounded by the largest class, never [N, D] of gathered means)."""
  out = np.empty(x.shape[0], np.float64)
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    diff = np.asarray(x[idx], np.float64) - st.mean[c]
    out[idx] = np.einsum("nd,nd->n", diff, diff) + st.trace[c]
  return out


def _knn_columns(cfg: ScoringConfig, features, real_features, ids, n: int, r: int,
                 columns: dict, directions: dict, sources: dict) -> None:
  """Adds realism, prdc_in_manifold and prdc_density (or warns why not)."""
  key = cfg.knn_tap
  if key not in features or key not in real_features:
    _log().warning("realism and PRDC skipped: feature key %r (ScoringConfig.knn_tap) is "
                   "missing from the %s features", key, "pool" if key not in features else "real")
    return
  x = _tap(features, key, n, "pool", ids, "knn_tap")
  xr = _tap(real_features, key, r, "real", None, "knn_tap")
  if cfg.knn_max_real is not None and r > cfg.knn_max_real:
    rng = np.random.default_rng([cfg.seed, 1])
    xr = xr[np.sort(rng.choice(r, size=cfg.knn_max_real, replace=False))]
  reals = xr.shape[0]
  what = f"against {reals} real-train images (all classes)"
  if reals > cfg.realism_k:
    columns["realism"] = baselines.realism_score(xr, x, k=cfg.realism_k)
    directions["realism"] = "higher"
    sources["realism"] = {"backbone": backbone_of(key), "tap": key,
                          "what": f"realism score, k={cfg.realism_k}, {what}"}
  else:
    _log().warning("realism skipped: %d real images, need more than realism_k=%d", reals,
                   cfg.realism_k)
  if reals > cfg.prdc_k and n > cfg.prdc_k:
    pr = baselines.prdc_memberships(xr, x, k=cfg.prdc_k)
    columns["prdc_in_manifold"] = pr.in_real_manifold.astype(np.float64)
    columns["prdc_density"] = pr.density_contribution
    for name, desc in (("prdc_in_manifold", "1 if inside a real k-NN ball"),
                       ("prdc_density", "real k-NN balls holding the image / k")):
      directions[name] = "higher"
      sources[name] = {"backbone": backbone_of(key), "tap": key,
                       "what": f"{desc}, k={cfg.prdc_k}, {what}"}
  else:
    _log().warning("PRDC skipped: %d real and %d pool images, need more than prdc_k=%d of each",
                   reals, n, cfg.prdc_k)


def save_scoring_result(path, result: ScoringResult):
  """Writes result.table with save_score_table (.csv/.jsonl/.npz plus <path>.meta.json) and
  the sources and config to <path>.sources.json; returns the table path."""
  out = save_score_table(path, result.table)
  sio.atomic_write_json(str(out) + ".sources.json",
                        {"sources": result.sources, "config": result.config})
  return out
