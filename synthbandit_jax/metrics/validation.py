"""Is the metric any good? Each score column checked against a controlled pool's ground truth.

A controlled pool (data/controlled.py) holds real held-out images passed through corruptions
of known kind and severity; each row carries extras {"kind", "severity", "true_class"}. The
ground-truth quality level of a row (higher = better training data) is

  clean                         3
  noise / blur / occlusion, 1   2   (severity s of a graded kind: 3 - s)
  noise / blur / occlusion, 2   1
  noise / blur / occlusion, 3   0
  invert, edges (style shifts)  0   (as bad as the worst graded corruption: the image keeps
                                     its shape but leaves the real image distribution)
  wrong_label                  -1   (the lowest: a clean image under another class's label
                                     teaches the wrong class)

For every metric column of a ScoreTable, oriented so that higher = better (a "lower" column is
negated):

  spearman           Spearman rank correlation (scipy.stats.spearmanr) of the oriented score
                     with the quality level over the rows; positive = the metric agrees.
  auroc_wrong_label  AUROC (sklearn.metrics.roc_auc_score) of flagging wrong-label images:
                     positives = kind "wrong_label", flag score = minus the oriented score
                     (a low usability flags). 1 = every wrong-label image scores below every
                     other image, 0.5 = chance, 0 = exactly reversed.

Rows whose metric value is NaN are left out of that metric (n counts the rows used). AUROC
is rank based, so the scores are replaced by their ranks first (+inf, e.g. a PSNR of an
exact copy, stays the largest); a metric constant over the rows gets Spearman NaN and AUROC
0.5; with no wrong-label rows (or only those) AUROC is NaN.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from synthbandit_jax.data.scores import ScoreTable

CLEAN_LEVEL = 3
STYLE_SHIFT_LEVEL = 0
WRONG_LABEL_LEVEL = -1
GRADED_KINDS = ("noise", "blur", "occlusion")
STYLE_SHIFT_KINDS = ("invert", "edges")
#: Columns that are the proposed method (not baselines) for `u_beats_baselines`.
OURS = ("u", "dps", "fcs")
OURS_PREFIXES = ("agg_",)


def quality_level(extras: Mapping[str, Any]) -> int:
  """Ground-truth quality level of one controlled row's extras (module docstring)."""
  kind = extras.get("kind")
  if kind == "clean":
    return CLEAN_LEVEL
  if kind == "wrong_label":
    return WRONG_LABEL_LEVEL
  if kind in STYLE_SHIFT_KINDS:
    return STYLE_SHIFT_LEVEL
  if kind in GRADED_KINDS:
    sev = extras.get("severity")
    if sev not in (1, 2, 3):
      raise ValueError(f"controlled row of kind {kind!r} has severity {sev!r}; expected 1, 2 "
                       "or 3")
    return CLEAN_LEVEL - int(sev)
  raise ValueError(f"unknown controlled kind {kind!r}; expected clean, wrong_label, "
                   f"{', '.join(GRADED_KINDS + STYLE_SHIFT_KINDS)}")


def ground_truth(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(ids, quality level [N] int, is_wrong_label [N] bool) of controlled-pool rows."""
  ids, levels, wrong = [], [], []
  for k, row in enumerate(rows):
    extras = row.get("extras") or {}
    if "kind" not in extras:
      raise ValueError(f"row {k} (id {row.get('id')!r}) has no extras['kind']; validation needs "
                       "the rows of a controlled pool (data/controlled.py)")
    try:
      levels.append(quality_level(extras))
    except ValueError as e:
      raise ValueError(f"row {k} (id {row.get('id')!r}): {e}") from None
    ids.append(str(row["id"]))
    wrong.append(extras["kind"] == "wrong_label")
  return ids, np.asarray(levels, np.int64), np.asarray(wrong, bool)


def _spearman(score: np.ndarray, level: np.ndarray) -> tuple[float, float]:
  if np.ptp(score) == 0 or np.ptp(level) == 0:
    return math.nan, math.nan
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = stats.spearmanr(stats.rankdata(score), level)
  return float(res.statistic), float(res.pvalue)


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
  if positive.all() or not positive.any():
    return math.nan
  return float(skm.roc_auc_score(positive, stats.rankdata(-score)))


def validate_metrics(table: ScoreTable, rows: Sequence[Mapping[str, Any]], *,
                     columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """One dict per metric column (all of the table's, or `columns`): metric, direction,
  spearman, spearman_p, auroc_wrong_label, n (rows with a finite-or-inf value),
  n_wrong_label (positives among them), n_nan (rows left out). Definitions in the module
  docstring. Every row id must be in the table; table ids not in `rows` are ignored."""
  ids, level, wrong = ground_truth(rows)
  if not ids:
    raise ValueError("validate_metrics got no controlled rows")
  pos = {rid: k for k, rid in enumerate(table.ids)}
  missing = [i for i in ids if i not in pos]
  if missing:
    raise ValueError(f"{len(missing)} controlled row id(s) have no score row, e.g. "
                     f"{missing[:5]}; score the controlled pool itself")
  src = np.asarray([pos[i] for i in ids], np.int64)
  names = list(table.columns) if columns is None else list(columns)
  unknown = [c for c in names if c not in table.columns]
  if unknown:
    raise ValueError(f"columns {unknown} are not in the score table; it has "
                     f"{list(table.columns)}")
  out = []
  for name in names:
    direction = table.directions[name]
    v = table.columns[name][src]
    score = v if direction == "higher" else -v
    keep = ~np.isnan(score)
    s, lv, wr = score[keep], level[keep], wrong[keep]
    rho, p = _spearman(s, lv) if s.size >= 2 else (math.nan, math.nan)
    out.append({"metric": name, "direction": direction, "spearman": rho, "spearman_p": p,
                "auroc_wrong_label": _auroc(s, wr), "n": int(s.size),
                "n_wrong_label": int(wr.sum()), "n_nan": int((~keep).sum())})
  return out


def _key(x: float) -> float:
  return -x if not math.isnan(x) else math.inf


def _fmt(x: float) -> str:
  return "n/a" if math.isnan(x) else f"{x:.3f}"


def format_validation_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown table (metric | spearman | auroc_wrong_label | n), best Spearman first (ties:
  higher AUROC first, then name; NaN last)."""
  order = sorted(rows, key=lambda r: (_key(r["spearman"]), _key(r["auroc_wrong_label"]),
                                      r["metric"]))
  lines = ["| metric | spearman | auroc_wrong_label | n |", "| --- | ---: | ---: | ---: |"]
  for r in order:
    lines.append(f"| {r['metric']} | {_fmt(r['spearman'])} | {_fmt(r['auroc_wrong_label'])} "
                 f"| {r['n']} |")
  return "\n".join(lines) + "\n"


def is_baseline(metric: str) -> bool:
  """True unless the column is the method itself: u, dps, fcs or an agg_* combination."""
  return metric not in OURS and not metric.startswith(OURS_PREFIXES)


def u_beats_baselines(rows: Sequence[Mapping[str, Any]], *, u: str = "u",
                      baselines: Sequence[str] | None = None) -> tuple[bool, str]:
  """Does U beat every single baseline metric on both Spearman and wrong-label AUROC?

  Baselines: `baselines`, or every row for which `is_baseline` holds (not u, dps, fcs,
  agg_*). "Beat" is strict (a tie does not beat); a baseline whose value is NaN on a criterion
  cannot be compared and is named as such (it does not count against U). Returns (verdict,
  one plain sentence with the numbers).
  """
  by_name = {r["metric"]: r for r in rows}
  if u not in by_name:
    raise ValueError(f"no validation row for {u!r}; rows: {sorted(by_name)}")
  names = [m for m in by_name if is_baseline(m) and m != u] if baselines is None else list(
      baselines)
  unknown = [m for m in names if m not in by_name]
  if unknown:
    raise ValueError(f"baselines {unknown} have no validation row; rows: {sorted(by_name)}")
  if not names:
    return False, "no baseline metrics to compare U with"
  ur = by_name[u]
  crits = (("spearman", "Spearman"), ("auroc_wrong_label", "wrong-label AUROC"))
  for key, label in crits:
    if math.isnan(ur[key]):
      return False, f"U does not beat the baselines: its {label} is undefined (NaN)"
  losses, skipped = [], []
  for key, label in crits:
    beaten_by = []
    for m in names:
      val = by_name[m][key]
      if math.isnan(val):
        skipped.append(f"{m} ({label})")
      elif val >= ur[key]:
        beaten_by.append(f"{m} {_fmt(val)}")
    if beaten_by:
      losses.append(f"on {label} (U {_fmt(ur[key])}) by {', '.join(beaten_by)}")
  note = f"; not comparable (NaN): {', '.join(skipped)}" if skipped else ""
  if losses:
    return False, ("U does NOT beat every baseline: matched or beaten "
                   + "; ".join(losses) + note)
  best = {key: max((by_name[m][key] for m in names if not math.isnan(by_name[m][key])),
                   default=math.nan) for key, _ in crits}
  return True, (f"U beats every baseline ({len(names)}) on both criteria: Spearman "
                f"{_fmt(ur['spearman'])} vs best baseline {_fmt(best['spearman'])}, "
                f"wrong-label AUROC {_fmt(ur['auroc_wrong_label'])} vs best baseline "
                f"{_fmt(best['auroc_wrong_label'])}{note}")
