"""Reports of a workdir: report.md with PNG plots beside it, and a self-contained report.html.

`write_report(workdir, summary)` writes WORKDIR/report.md, its PNG plots and (by default)
WORKDIR/report.html. `write_html_report(workdir, summary)` writes report.html only: one file,
every image embedded as a base64 PNG `data:` URI, inline CSS, no script and no network
access, so it can be mailed or opened anywhere. Both are written atomically.

Sections, each left out when its input is absent:

  1. Results: per training mode the test accuracy (at the best-val parameters), best val
     accuracy and its epoch, images seen, train time, arms, most pulled arm
     (`summary["comparison"]`, or rows derived from `summary["runs"]`).
  2. Training curves: val accuracy per epoch per mode (val_accuracy.png); per mode with more
     than one arm the arm chosen per epoch and the pulls per arm (arms_<mode>.png); reward
     curves (rewards.png): the reward of every epoch per bandit mode, and per bandit mode the
     running mean reward of each arm,

       mean_a(t) = sum(r_e for e <= t if arm_e = a) / #{e <= t : arm_e = a}

     over the epochs after the warm-up (warm-up epochs do not update the bandit). For a
     bandit that keeps plain sums (UCB1, Thompson, epsilon-greedy) the last value equals the
     arm's `mean_reward`.
  3. Score distributions: one histogram per column of the score table (score_distributions.png;
     direction from the `.meta.json` sidecar via `scores.load_score_table`, overridden by
     config `scores.directions`).
  4. Best and worst images per metric: the `per_metric` (10) best images, best first, and the
     `per_metric` worst, worst first (direction-aware `scores.rank_order`; NaN scores are not
     ranked; the two rows overlap when fewer than 2 * per_metric images are scored), each
     with its class and score under it, read from the pool as thumbnails of at most
     `thumb_size` (64) px. Missing or unreadable files and ids not in the pool become grey
     placeholders naming the reason. In report.md one PNG grid per metric
     (extremes_<metric>.png) plus a table of the ids.
  5. Metric validation (WORKDIR/metric_validation.json of the scoring stage, or the one
     beside the score table): Spearman with the ground-truth quality order and wrong-label
     AUROC per metric, and the verdict.
  6. Stage timings (`stages`, or `summary["pipeline"]["stages"]`: {stage: {"seconds",
     "status", "hash", "counts"}}): a table and a horizontal bar chart (stage_timings.png).
  7. The config (a collapsed <details> with its JSON) and the skipped files.
  8. Notes: inputs that were named but could not be read (an unreadable score table, a pool
     path that is not a pool, ...). A broken optional input never stops the report.

Inputs found without being passed: the score table at config `scores.path`, else
WORKDIR/scores.csv; the pool at `summary["data"]["pool"]`, else WORKDIR/pool; the validation
at WORKDIR/metric_validation.json, else beside the score table.

All text placed in HTML is escaped (class names and prompts may hold `<>&"`); in markdown
tables `|` is escaped.
"""
from __future__ import annotations

import base64
import dataclasses
import html as _html
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from PIL import Image, ImageDraw, ImageFont  # pylint: disable=wrong-import-position

from synthbandit_jax import io as sio  # pylint: disable=wrong-import-position
from synthbandit_jax.data import images as images_lib  # pylint: disable=wrong-import-position
from synthbandit_jax.data import pool as pool_lib  # pylint: disable=wrong-import-position
from synthbandit_jax.data import scores as scores_lib  # pylint: disable=wrong-import-position

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
VALIDATION_JSON = "metric_validation.json"
_DPI = 110


# ------------------------------------------------------------------------------ figures


def _png(fig, dpi: int = _DPI) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return buf.getvalue()


def _save_fig(fig, path: Path) -> Path:
  return sio.atomic_write_bytes(path, _png(fig))


def _val_accuracy_fig(runs: dict[str, dict]):
  fig, ax = plt.subplots(figsize=(7, 4))
  for mode, r in runs.items():
    ep = [e["epoch"] for e in r["epochs"]]
    ax.plot(ep, [e["val_accuracy"] for e in r["epochs"]], marker="o", ms=3, label=mode)
  ax.set_xlabel("epoch")
  ax.set_ylabel("val accuracy (real)")
  ax.set_title("Validation accuracy per epoch")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def plot_val_accuracy(runs: dict[str, dict], path: Path) -> Path:
  """Val accuracy per epoch, one line per mode."""
  return _save_fig(_val_accuracy_fig(runs), path)


def _arms_fig(result: dict):
  names = [a["name"] for a in result["arms"]]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 2.5),
                                 gridspec_kw={"width_ratios": [3, 1]})
  ep = [e["epoch"] for e in result["epochs"]]
  arm_idx = [e["arm_index"] for e in result["epochs"]]
  sc = ax1.scatter(ep, arm_idx, c=[e["val_accuracy"] for e in result["epochs"]],
                   cmap="viridis", s=40, zorder=3)
  ax1.plot(ep, arm_idx, color="grey", lw=0.6, zorder=2)
  ax1.set_yticks(range(len(names)), names, fontsize=8)
  ax1.set_xlabel("epoch")
  ax1.set_title(f"{result['mode']}: arm chosen per epoch (colour = val accuracy)")
  ax1.grid(alpha=0.3)
  fig.colorbar(sc, ax=ax1, fraction=0.04)
  ax2.barh(range(len(names)), [a["pulls"] for a in result["arms"]], color="tab:blue")
  ax2.set_yticks(range(len(names)), [""] * len(names))
  ax2.set_xlabel("pulls")
  ax2.set_ylim(ax1.get_ylim())
  return fig


def plot_arms(result: dict, path: Path) -> Path:
  """Arm chosen per epoch (left) and pulls per arm (right) for one mode."""
  return _save_fig(_arms_fig(result), path)


def _is_bandit_mode(result: dict) -> bool:
  return bool(result.get("uses_bandit", True)) and len(result.get("arms") or []) >= 2 and bool(
      result.get("epochs"))


def running_mean_rewards(result: dict) -> dict[str, np.ndarray]:
  """Per arm the running mean of its rewards after each epoch (NaN before its first pull).

  `result` is a mode's results dict (`trainer.train_mode`). Epochs 1..warmup_epochs are
  left out (the bandit does not learn from them). Returns {arm name: float64 [num epochs]}
  for every arm pulled at least once after the warm-up, in the order of `result["arms"]`.
  """
  warmup = int(result.get("warmup_epochs") or 0)
  epochs = result.get("epochs") or []
  order = [a["name"] for a in result.get("arms") or []]
  sums: dict[str, float] = {}
  counts: dict[str, int] = {}
  out: dict[str, list[float]] = {}
  for k, e in enumerate(epochs):
    if int(e["epoch"]) > warmup:
      a = e["arm"]
      sums[a] = sums.get(a, 0.0) + float(e["reward"])
      counts[a] = counts.get(a, 0) + 1
      if a not in out:
        out[a] = [math.nan] * k
    for a, vals in out.items():
      vals.append(sums[a] / counts[a])
  names = [n for n in order if n in out] + [n for n in out if n not in order]
  return {n: np.asarray(out[n], np.float64) for n in names}


def reward_curves_png(runs: dict[str, dict]) -> bytes | None:
  """Reward per epoch of every bandit mode (first panel) and, per bandit mode, the running
  mean reward per arm; None when no mode has a bandit over two or more arms."""
  modes = [m for m, r in runs.items() if _is_bandit_mode(r)]
  if not modes:
    return None
  panels = 1 + len(modes)
  ncols = min(2, panels)
  nrows = -(-panels // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 3.6 * nrows), squeeze=False)
  flat = axes.reshape(-1)
  ax = flat[0]
  for m in modes:
    r = runs[m]
    ax.plot([e["epoch"] for e in r["epochs"]], [e["reward"] for e in r["epochs"]],
            marker="o", ms=3, label=m)
  warm = max(int(runs[m].get("warmup_epochs") or 0) for m in modes)
  if warm:
    ax.axvspan(0.5, warm + 0.5, color="grey", alpha=0.15, label="warm-up")
  ax.axhline(0.0, color="black", lw=0.5)
  ax.set_xlabel("epoch")
  ax.set_ylabel("reward")
  ax.set_title("Reward per epoch (bandit modes)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  for ax, m in zip(flat[1:], modes):
    r = runs[m]
    ep = [e["epoch"] for e in r["epochs"]]
    means = running_mean_rewards(r)
    for name, vals in means.items():
      line, = ax.plot(ep, vals, drawstyle="steps-post", label=name)
      pulled = [k for k, e in enumerate(r["epochs"]) if e["arm"] == name and not np.isnan(
          vals[k])]
      ax.plot([ep[k] for k in pulled], vals[pulled], "o", ms=3, color=line.get_color())
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("running mean reward")
    ax.set_title(f"{m}: running mean reward per arm", fontsize=10)
    ax.grid(alpha=0.3)
    if means:
      ax.legend(fontsize=6, ncol=1 if len(means) <= 8 else 2)
  for ax in flat[panels:]:
    ax.set_visible(False)
  fig.tight_layout()
  return _png(fig)


def score_distributions_png(table: scores_lib.ScoreTable) -> bytes | None:
  """One histogram per score column (finite values; the title names the direction and the
  count of NaN/inf values left out); None for a table without columns or rows."""
  names = list(table.columns)
  if not names or not len(table):
    return None
  ncols = min(4, len(names))
  nrows = -(-len(names) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.5 * nrows), squeeze=False)
  flat = axes.reshape(-1)
  for ax, name in zip(flat, names):
    v = table.columns[name]
    fin = v[np.isfinite(v)]
    if fin.size:
      ax.hist(fin, bins=min(40, max(5, int(np.sqrt(fin.size)))), color="tab:blue", alpha=0.8)
    arrow = "\u2191" if table.directions[name] == "higher" else "\u2193"
    left_out = v.size - fin.size
    ax.set_title(f"{name} ({arrow} {table.directions[name]} is better)\nn={fin.size}"
                 + (f", {left_out} NaN/inf left out" if left_out else ""), fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in flat[len(names):]:
    ax.set_visible(False)
  fig.tight_layout()
  return _png(fig, dpi=90)


_STATUS_COLOURS = {"done": "tab:blue", "ok": "tab:blue", "ran": "tab:blue", "success": "tab:blue",
                   "cached": "tab:gray", "skipped": "tab:gray", "reused": "tab:gray",
                   "failed": "tab:red", "error": "tab:red"}


def stage_timings_png(stages: Mapping[str, Mapping[str, Any]]) -> bytes | None:
  """Horizontal bars of the seconds per stage (colour = status); None without stages."""
  if not stages:
    return None
  names = list(stages)
  raw = [_num(stages[n].get("seconds")) for n in names]
  known = [s is not None and math.isfinite(s) for s in raw]
  secs = [s if ok else 0.0 for s, ok in zip(raw, known)]
  status = [str(stages[n].get("status", "")) for n in names]
  fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.3))
  y = np.arange(len(names))
  ax.barh(y, secs, color=[_STATUS_COLOURS.get(s.lower(), "tab:blue") for s in status])
  ax.set_yticks(y, names, fontsize=8)
  ax.invert_yaxis()
  top = max(secs) if secs else 0.0
  for k, (s, ok, st) in enumerate(zip(secs, known, status)):
    ax.text(s + 0.01 * (top or 1.0), k, (f"{s:.1f} s" if ok else "n/a") + f" {st}",
            va="center", fontsize=7)
  ax.set_xlim(0, (top or 1.0) * 1.25)
  ax.set_xlabel("seconds")
  ax.set_title("Stage timings")
  ax.grid(alpha=0.3, axis="x")
  return _png(fig)


# ------------------------------------------------------------------- best / worst images


@dataclasses.dataclass
class Tile:
  """One image of a best/worst row: `image` is a uint8 HWC thumbnail, or None with `problem`
  saying why (missing file, unreadable, not in the pool)."""
  id: str
  label: str | None
  score: float
  image: np.ndarray | None
  problem: str | None = None


@dataclasses.dataclass
class MetricExtremes:
  """The best images (best first) and worst images (worst first) of one score column."""
  metric: str
  direction: str
  num_ranked: int  # rows with a non-NaN score
  num_nan: int
  best: list[Tile]
  worst: list[Tile]


def _thumbnail(path: Path, size: int) -> np.ndarray:
  """uint8 RGB image whose longer side is `size` px (nearest when enlarging tiny images)."""
  img = images_lib.prepare_image(images_lib.read_image_native(path), channels=3)
  h, w = img.shape[:2]
  s = size / max(h, w)
  out = (max(1, round(h * s)), max(1, round(w * s)))
  if out == (h, w):
    return img
  return images_lib.resize(img, out, method="nearest" if s > 1 else "area")


def metric_extremes(table: scores_lib.ScoreTable, pool_rows: Mapping[str, dict],
                    pool_root: Path, *, per_metric: int = 10, thumb_size: int = 64
                    ) -> list[MetricExtremes]:
  """Best and worst `per_metric` images of every column of `table` (see module docstring).

  `pool_rows` maps id -> pool metadata row (`pool.read_pool_rows`); image paths are relative
  to `pool_root`. Each image file is read once however many metrics show it.
  """
  cache: dict[str, tuple[np.ndarray | None, str | None]] = {}

  def tile(i: int, values: np.ndarray) -> Tile:
    rid = table.ids[i]
    row = pool_rows.get(rid)
    if rid not in cache:
      if row is None:
        cache[rid] = (None, "not in the pool")
      else:
        path = Path(row["path"])
        path = path if path.is_absolute() else pool_root / path
        try:
          cache[rid] = (_thumbnail(path, thumb_size), None)
        except images_lib.ImageReadError as e:
          cache[rid] = (None, "missing file" if not path.exists() else
                        f"unreadable: {getattr(e, 'reason', e)}")
        except (OSError, ValueError) as e:
          cache[rid] = (None, f"unreadable: {e}")
    image, problem = cache[rid]
    return Tile(rid, row["class"] if row else None, float(values[i]), image, problem)

  out = []
  for name, values in table.columns.items():
    direction = table.directions[name]
    order = scores_lib.rank_order(values, direction)
    ranked = order[~np.isnan(values[order])]
    best = [tile(int(i), values) for i in ranked[:per_metric]]
    worst = [tile(int(i), values) for i in ranked[::-1][:per_metric]]
    out.append(MetricExtremes(name, direction, int(ranked.size),
                              int(values.size - ranked.size), best, worst))
  return out


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font only.
    return ImageFont.load_default()


def _clip_text(draw, text: str, font, width: int) -> str:
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "\u2026", font=font) > width:
    text = text[:-1]
  return text + "\u2026"


def _fmt_score(v: float) -> str:
  return "n/a" if math.isnan(v) else f"{v:.4g}"


def extremes_grid_png(ex: MetricExtremes, thumb_size: int = 64) -> bytes:
  """A PNG with the best row over the worst row, class and score under each image."""
  font = _font(10)
  cols = max(len(ex.best), len(ex.worst), 1)
  cell_w, cap_h, label_w, head_h = thumb_size + 8, 26, 44, 18
  row_h = thumb_size + cap_h + 6
  canvas = Image.new("RGB", (label_w + cols * cell_w, head_h + 2 * row_h), "white")
  draw = ImageDraw.Draw(canvas)
  draw.text((4, 3), f"{ex.metric} ({ex.direction} is better): best first, worst first",
            fill="black", font=font)
  for r, (name, tiles) in enumerate((("best", ex.best), ("worst", ex.worst))):
    y0 = head_h + r * row_h
    draw.text((4, y0 + thumb_size // 2 - 6), name, fill="black", font=font)
    for c, t in enumerate(tiles):
      x0 = label_w + c * cell_w + 4
      if t.image is not None:
        im = Image.fromarray(t.image)
        canvas.paste(im, (x0 + (thumb_size - im.width) // 2, y0 + (thumb_size - im.height) // 2))
      else:
        draw.rectangle([x0, y0, x0 + thumb_size - 1, y0 + thumb_size - 1], fill=(210, 210, 210))
        draw.text((x0 + 3, y0 + thumb_size // 2 - 6),
                  _clip_text(draw, t.problem or "no image", font, thumb_size - 6),
                  fill="black", font=font)
      draw.text((x0, y0 + thumb_size + 2),
                _clip_text(draw, str(t.label) if t.label is not None else "?", font, cell_w - 6),
                fill="black", font=font)
      draw.text((x0, y0 + thumb_size + 14), _fmt_score(t.score), fill=(60, 60, 60), font=font)
  buf = io.BytesIO()
  canvas.save(buf, format="PNG", optimize=True)
  return buf.getvalue()


# --------------------------------------------------------------------- collecting inputs


@dataclasses.dataclass
class Figure:
  """A plot: `filename` beside report.md, `png` the bytes (embedded in report.html)."""
  filename: str
  title: str
  png: bytes


@dataclasses.dataclass
class ReportData:
  """Everything both renderers show; optional parts are None / empty when absent."""
  summary: dict
  comparison: list[dict]
  runs: dict[str, dict]
  figures: dict[str, Figure]  # keys: val_accuracy, arms/<mode>, rewards, scores,
  #                             extremes/<metric>, stages
  scores_path: Path | None = None
  score_table: scores_lib.ScoreTable | None = None
  pool_dir: Path | None = None
  extremes: list[MetricExtremes] = dataclasses.field(default_factory=list)
  validation: dict | None = None
  stages: dict[str, dict] | None = None
  notes: list[str] = dataclasses.field(default_factory=list)


def _num(v: Any) -> float | None:
  if isinstance(v, bool) or v is None:
    return None
  try:
    return float(v)
  except (TypeError, ValueError):
    return None


def _comparison(summary: dict, runs: dict[str, dict]) -> list[dict]:
  if summary.get("comparison"):
    return list(summary["comparison"])
  rows = []
  for m, r in runs.items():
    arms = r.get("arms") or []
    rows.append({"mode": m, "test_accuracy": r.get("test_accuracy"),
                 "best_val_accuracy": r.get("best_val_accuracy"),
                 "best_epoch": r.get("best_epoch"), "images_seen": r.get("images_seen"),
                 "wall_time_s": r.get("wall_time_s"), "arms": len(arms),
                 "most_pulled_arm": max(arms, key=lambda a: a["pulls"])["name"] if arms else None})
  return rows


def _config(summary: dict) -> dict:
  cfg = summary.get("config")
  return cfg if isinstance(cfg, dict) else {}


def _load_scores(workdir: Path, summary: dict, scores_path, notes: list[str]):
  scfg = _config(summary).get("scores") or {}
  if scores_path is not None:
    path, named = Path(scores_path), True
  elif scfg.get("path"):
    path, named = Path(scfg["path"]), True
  elif (workdir / "scores.csv").is_file():
    path, named = workdir / "scores.csv", False
  else:
    return None, None
  if not path.is_file():
    if named:
      notes.append(f"score table {path} does not exist: score distributions and best/worst "
                   "images are left out")
    return None, None
  try:
    table = scores_lib.load_score_table(path)
    overrides = [kv.split(":", 1) for kv in str(scfg.get("directions") or "").split(",")
                 if ":" in kv]
    for col, d in overrides:
      col, d = col.strip(), d.strip()
      if col in table.directions and d in scores_lib.DIRECTIONS:
        table.directions[col] = d
  except (ValueError, OSError) as e:
    notes.append(f"score table {path} could not be read ({e}): score distributions and "
                 "best/worst images are left out")
    return path, None
  return path, table


def _load_pool_rows(workdir: Path, summary: dict, pool_dir, notes: list[str]):
  if pool_dir is not None:
    root, named = Path(pool_dir), True
  elif (summary.get("data") or {}).get("pool"):
    root, named = Path(summary["data"]["pool"]), True
  else:
    root, named = workdir / "pool", False
  try:
    base, rows = pool_lib.read_pool_rows(root)
  except FileNotFoundError as e:
    if named:
      notes.append(f"pool {root} could not be read ({e}): best/worst images are left out")
    return None, None
  except (ValueError, OSError) as e:
    notes.append(f"pool {root} could not be read ({e}): best/worst images are left out")
    return None, None
  return base, {r["id"]: r for r in rows}


def _load_validation(workdir: Path, scores_path: Path | None, validation, notes: list[str]):
  if isinstance(validation, Mapping):
    data = dict(validation)
  elif isinstance(validation, (list, tuple)):
    data = {"rows": list(validation)}
  else:
    if validation is not None:
      path = Path(validation)
    else:
      cands = [workdir / VALIDATION_JSON]
      if scores_path is not None:
        cands.append(scores_path.parent / VALIDATION_JSON)
      path = next((p for p in cands if p.is_file()), None)
      if path is None:
        return None
    try:
      data = sio.read_json(path)
    except (ValueError, OSError) as e:
      notes.append(f"metric validation {path} could not be read ({e}); left out")
      return None
  rows = data.get("rows") if isinstance(data, dict) else None
  if not isinstance(rows, list) or not all(isinstance(r, dict) and "metric" in r for r in rows):
    notes.append("metric validation has no 'rows' list of {metric, spearman, "
                 "auroc_wrong_label, n, ...} (format of metrics/stage.py); left out")
    return None
  return data


def _stages(summary: dict, stages, notes: list[str]) -> dict[str, dict] | None:
  if stages is None:
    pipe = summary.get("pipeline")
    stages = pipe.get("stages") if isinstance(pipe, dict) else None
  if not stages:
    return None
  if not isinstance(stages, Mapping) or not all(isinstance(v, Mapping) for v in stages.values()):
    notes.append("stage timings must be {stage: {seconds, status, hash, counts}}; left out")
    return None
  return {str(k): dict(v) for k, v in stages.items()}


def collect_report_data(workdir: str | Path, summary: dict, *, scores_path=None, pool_dir=None,
                        validation=None, stages=None, per_metric: int = 10,
                        thumb_size: int = 64, grids: bool = False) -> ReportData:
  """Reads the optional inputs and renders every plot to PNG bytes (see module docstring).

  `grids` also renders one best/worst PNG grid per metric (for report.md).
  """
  workdir = Path(workdir)
  runs = summary.get("runs") or {}
  notes: list[str] = []
  figs: dict[str, Figure] = {}
  if runs:
    figs["val_accuracy"] = Figure("val_accuracy.png", "Validation accuracy per epoch",
                                  _png(_val_accuracy_fig(runs)))
    for mode, r in runs.items():
      if len(r.get("arms") or []) >= 2 and r.get("epochs"):
        figs[f"arms/{mode}"] = Figure(f"arms_{sio.safe_filename(mode)}.png",
                                      f"{mode}: arms", _png(_arms_fig(r)))
    rew = reward_curves_png(runs)
    if rew is not None:
      figs["rewards"] = Figure("rewards.png", "Reward curves", rew)
  spath, table = _load_scores(workdir, summary, scores_path, notes)
  extremes: list[MetricExtremes] = []
  pool_root = None
  if table is not None:
    png = score_distributions_png(table)
    if png is not None:
      figs["scores"] = Figure("score_distributions.png", "Score distributions", png)
    pool_root, rows = _load_pool_rows(workdir, summary, pool_dir, notes)
    if rows is not None:
      extremes = metric_extremes(table, rows, pool_root, per_metric=per_metric,
                                 thumb_size=thumb_size)
      if grids:
        for ex in extremes:
          figs[f"extremes/{ex.metric}"] = Figure(
              f"extremes_{sio.safe_filename(ex.metric)}.png", f"{ex.metric}: best and worst",
              extremes_grid_png(ex, thumb_size))
  st = _stages(summary, stages, notes)
  if st:
    figs["stages"] = Figure("stage_timings.png", "Stage timings", stage_timings_png(st))
  val = _load_validation(workdir, spath, validation, notes)
  for n in notes:
    log.warning("report: %s", n)
  return ReportData(summary=summary, comparison=_comparison(summary, runs), runs=runs,
                    figures=figs, scores_path=spath, score_table=table, pool_dir=pool_root,
                    extremes=extremes, validation=val, stages=st, notes=notes)


# -------------------------------------------------------------------------- markdown


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return "n/a" if math.isnan(v) else f"{v:.4f}"
  return "" if v is None else str(v)


def _md_cell(v: Any) -> str:
  return _fmt(v).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def _seconds(v: Any) -> str:
  x = _num(v)
  return "" if x is None else f"{x:.1f}"


def _result_rows(comparison: Sequence[dict]) -> list[tuple]:
  return [(r.get("mode"), r.get("test_accuracy"), r.get("best_val_accuracy"),
           r.get("best_epoch"), r.get("images_seen"), _seconds(r.get("wall_time_s")),
           r.get("arms"), r.get("most_pulled_arm")) for r in comparison]


_RESULT_HEADER = ("mode", "test acc", "best val acc", "best epoch", "images seen",
                  "train time (s)", "arms", "most pulled arm")
_VALIDATION_HEADER = ("metric", "direction", "spearman", "spearman p", "AUROC wrong label", "n",
                      "n wrong label", "n NaN")


def _nan_last(x: Any) -> float:
  x = _num(x)
  return math.inf if x is None or math.isnan(x) else -x


def _validation_rows(validation: dict) -> list[tuple]:
  """Rows best Spearman first (ties: higher AUROC, then name), as metric_validation.md."""
  rows = sorted(validation["rows"], key=lambda r: (_nan_last(r.get("spearman")),
                                                   _nan_last(r.get("auroc_wrong_label")),
                                                   str(r["metric"])))
  return [(r["metric"], r.get("direction"), _num(r.get("spearman")), _num(r.get("spearman_p")),
           _num(r.get("auroc_wrong_label")), r.get("n"), r.get("n_wrong_label"), r.get("n_nan"))
          for r in rows]


def _counts_text(counts: Any) -> str:
  if isinstance(counts, Mapping):
    return ", ".join(f"{k}: {v}" for k, v in counts.items())
  return "" if counts is None else str(counts)


def _stage_rows(stages: dict[str, dict]) -> list[tuple]:
  return [(name, s.get("status"), _seconds(s.get("seconds")), str(s.get("hash") or "")[:12],
           _counts_text(s.get("counts"))) for name, s in stages.items()]


_STAGE_HEADER = ("stage", "status", "seconds", "hash", "counts")


def _data_line(summary: dict) -> str | None:
  counts = (summary.get("data") or {}).get("counts") or {}
  if not counts:
    return None
  return (f"Data: {counts.get('train')} real train, {counts.get('val')} real val (bandit "
          f"reward), {counts.get('test')} real test, {counts.get('pool')} synthetic pool "
          f"images, {counts.get('classes')} classes.")


def render_markdown(summary: dict, plots: dict[str, str], data: ReportData | None = None) -> str:
  """report.md text. `plots` maps "val_accuracy" and mode names to PNG file names (the
  original API); `data` (from `collect_report_data`) adds the other sections, whose PNGs are
  named by `data.figures[...].filename`."""
  runs = summary.get("runs") or {}
  figs = data.figures if data is not None else {}
  out = ["# synthbandit_jax report", ""]
  line = _data_line(summary)
  if line:
    out += [line, ""]
  comparison = data.comparison if data is not None else summary.get("comparison") or []
  if comparison:
    out += ["## Test accuracy on real data", "",
            "Test accuracy uses the parameters with the best val accuracy. `images seen` is "
            "the training budget each mode consumed.", ""]
    out.append(_table(_RESULT_HEADER, _result_rows(comparison)))
    out.append("")
  if "val_accuracy" in plots:
    out += [f"![val accuracy]({plots['val_accuracy']})", ""]
  if "rewards" in figs:
    out += ["## Rewards", "",
            "Left: the reward of every epoch per bandit mode. Then per bandit mode the running "
            "mean reward of each arm (warm-up epochs left out).", "",
            f"![reward curves]({figs['rewards'].filename})", ""]
  for mode, r in runs.items():
    if len(r.get("arms") or []) < 2:
      continue
    out += [f"## Mode `{mode}` (bandit: {r.get('bandit')})", ""]
    out.append(_table(["arm", "size", "pulls", "mean reward"],
                      [(a["name"], a.get("size"), a["pulls"], a["mean_reward"])
                       for a in r["arms"]]))
    out.append("")
    if mode in plots:
      out += [f"![arms of {mode}]({plots[mode]})", ""]
    out.append(_table(["epoch", "arm", "reward", "val acc", "train loss", "train acc"],
                      [(e["epoch"], e["arm"], e["reward"], e["val_accuracy"], e["train_loss"],
                        e["train_accuracy"]) for e in r["epochs"]]))
    out.append("")
  if data is not None and "scores" in figs:
    out += ["## Score distributions", "", f"Score table: `{data.scores_path}`.", "",
            f"![score distributions]({figs['scores'].filename})", ""]
  if data is not None and data.extremes:
    out += ["## Best and worst images per metric", "",
            f"Pool: `{data.pool_dir}`. Best row best first, worst row worst first.", ""]
    for ex in data.extremes:
      out += [f"### {ex.metric} ({ex.direction} is better; {ex.num_ranked} ranked, "
              f"{ex.num_nan} without a score)", ""]
      key = f"extremes/{ex.metric}"
      if key in figs:
        out += [f"![best and worst by {ex.metric}]({figs[key].filename})", ""]
      rows = []
      for k in range(max(len(ex.best), len(ex.worst))):
        b = ex.best[k] if k < len(ex.best) else None
        w = ex.worst[k] if k < len(ex.worst) else None
        rows.append((k + 1, *(_tile_cells(b)), *(_tile_cells(w))))
      out.append(_table(["rank", "best id", "class", "score", "worst id", "class", "score"],
                        rows))
      out.append("")
  if summary.get("metric_validation_md"):
    body = summary["metric_validation_md"].split("\n", 1)[1].strip()  # drop its title
    out += ["## Is the metric any good? (from the scoring stage)", "", body, ""]
  elif data is not None and data.validation:
    out += ["## Is the metric any good? (from the scoring stage)", "",
            "Spearman: correlation with the ground-truth quality order. AUROC: flagging "
            "wrong-label images.", "",
            _table(_VALIDATION_HEADER, _validation_rows(data.validation)), ""]
    if data.validation.get("verdict"):
      out += [str(data.validation["verdict"]), ""]
  if data is not None and data.stages:
    out += ["## Stage timings", "", _table(_STAGE_HEADER, _stage_rows(data.stages)), ""]
    if "stages" in figs:
      out += [f"![stage timings]({figs['stages'].filename})", ""]
  if data is not None and _config(summary):
    out += ["## Config", "", "<details><summary>config JSON</summary>", "", "```json",
            json.dumps(_config(summary), indent=2, sort_keys=True, default=str), "```", "",
            "</details>", ""]
  skipped = summary.get("skipped_files") or []
  out += ["## Skipped files", ""]
  if skipped:
    out += [f"- `{s.get('path')}` ({s.get('source', '')}): {s.get('reason')}" for s in skipped]
  else:
    out.append("None: every image was readable.")
  out.append("")
  if data is not None and data.notes:
    out += ["## Report notes", ""] + [f"- {n}" for n in data.notes] + [""]
  return "\n".join(out)


def _tile_cells(t: Tile | None) -> tuple:
  if t is None:
    return ("", "", "")
  return (t.id, t.label if t.label is not None else "?", _fmt_score(t.score))


# ------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1200px;padding:0 16px;color:#222;line-height:1.4}
h1{margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img.plot{max-width:100%;height:auto;border:1px solid #eee}
nav a{margin-right:12px}.muted{color:#666;font-size:13px}
.strip{display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px;margin:4px 0 10px}
.strip .rowlabel{width:48px;font-weight:600;padding-top:24px}
figure.tile{margin:0;width:76px;text-align:center;font-size:11px}
figure.tile img{image-rendering:pixelated;border:1px solid #ddd}
figure.tile .missing{width:64px;height:64px;background:#ddd;display:flex;align-items:center;
justify-content:center;font-size:10px;margin:auto;overflow:hidden}
figcaption .cls{font-weight:600;overflow-wrap:anywhere}figcaption .id{color:#777;
overflow-wrap:anywhere}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
"""


def _e(v: Any) -> str:
  return _html.escape("" if v is None else str(v), quote=True)


def _data_uri(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>",
         "<tbody>"]
  for row in rows:
    cells = []
    for v in row:
      cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
      cells.append(f"<td{cls}>{_e(_fmt(v))}</td>")
    out.append("<tr>" + "".join(cells) + "</tr>")
  out.append("</tbody></table>")
  return "\n".join(out)


def _html_img(fig: Figure) -> str:
  return f'<p><img class="plot" src="{_data_uri(fig.png)}" alt="{_e(fig.title)}"></p>'


def _html_tile(t: Tile, png_cache: dict[str, bytes]) -> str:
  if t.image is not None:
    if t.id not in png_cache:
      png_cache[t.id] = images_lib.encode_png(t.image)
    h, w = t.image.shape[:2]
    pic = (f'<img src="{_data_uri(png_cache[t.id])}" width="{w}" height="{h}" '
           f'alt="{_e(t.id)}">')
  else:
    pic = f'<div class="missing">{_e(t.problem or "no image")}</div>'
  label = t.label if t.label is not None else "?"
  return (f'<figure class="tile" data-id="{_e(t.id)}">{pic}<figcaption>'
          f'<span class="cls">{_e(label)}</span><br>{_e(_fmt_score(t.score))}<br>'
          f'<span class="id">{_e(t.id)}</span></figcaption></figure>')


def render_html(data: ReportData, workdir: str | Path | None = None) -> str:
  """The report.html text (see module docstring)."""
  summary, figs = data.summary, data.figures
  sections: list[tuple[str, str, str]] = []  # (anchor, title, body)

  body = []
  line = _data_line(summary)
  if line:
    body.append(f"<p>{_e(line)}</p>")
  if data.comparison:
    body.append("<p class=\"muted\">Test accuracy uses the parameters with the best val "
                "accuracy. <em>images seen</em> is the training budget each mode consumed.</p>")
    body.append(_html_table(_RESULT_HEADER, _result_rows(data.comparison)))
  if body:
    sections.append(("results", "Results", "\n".join(body)))

  body = []
  if "val_accuracy" in figs:
    body.append(_html_img(figs["val_accuracy"]))
  if "rewards" in figs:
    body.append("<h3>Rewards</h3><p class=\"muted\">First panel: reward of every epoch per "
                "bandit mode (grey: warm-up). Then per bandit mode the running mean reward of "
                "each arm (warm-up epochs left out).</p>")
    body.append(_html_img(figs["rewards"]))
  for mode, r in data.runs.items():
    if len(r.get("arms") or []) < 2:
      continue
    body.append(f"<h3>Mode <code>{_e(mode)}</code> (bandit: {_e(r.get('bandit'))})</h3>")
    body.append(_html_table(["arm", "size", "pulls", "mean reward"],
                            [(a["name"], a.get("size"), a["pulls"], a["mean_reward"])
                             for a in r["arms"]]))
    if f"arms/{mode}" in figs:
      body.append(_html_img(figs[f"arms/{mode}"]))
    body.append("<details><summary>epochs</summary>" + _html_table(
        ["epoch", "arm", "reward", "val acc", "train loss", "train acc"],
        [(e["epoch"], e["arm"], e["reward"], e["val_accuracy"], e["train_loss"],
          e["train_accuracy"]) for e in r["epochs"]]) + "</details>")
  if body:
    sections.append(("training", "Training curves and arms", "\n".join(body)))

  if "scores" in figs:
    sections.append(("score-distributions", "Score distributions",
                     f"<p class=\"muted\">Score table: <code>{_e(data.scores_path)}</code>"
                     "</p>\n" + _html_img(figs["scores"])))

  if data.extremes:
    cache: dict[str, bytes] = {}
    body = [f"<p class=\"muted\">Pool: <code>{_e(data.pool_dir)}</code>. The best row is "
            "best first, the worst row worst first; under each image its class, score and "
            "id.</p>"]
    for ex in data.extremes:
      anchor = sio.safe_filename(ex.metric)
      body.append(f'<div class="metric" id="extremes-{_e(anchor)}">')
      body.append(f"<h3>{_e(ex.metric)} <span class=\"muted\">({_e(ex.direction)} is better; "
                  f"{ex.num_ranked} ranked, {ex.num_nan} without a score)</span></h3>")
      for name, tiles in (("best", ex.best), ("worst", ex.worst)):
        body.append(f'<div class="strip" id="{name}-{_e(anchor)}">'
                    f'<div class="rowlabel">{name}</div>'
                    + "".join(_html_tile(t, cache) for t in tiles) + "</div>")
      body.append("</div>")
    sections.append(("extremes", "Best and worst images per metric", "\n".join(body)))

  if data.validation:
    body = ["<p class=\"muted\">Spearman: correlation with the ground-truth quality order "
            "(clean &gt; severity 1 &gt; 2 &gt; 3 and style shifts &gt; wrong label). AUROC: "
            "flagging wrong-label images.</p>",
            _html_table(_VALIDATION_HEADER, _validation_rows(data.validation))]
    if data.validation.get("verdict"):
      body.append(f"<p><strong>{_e(data.validation['verdict'])}</strong></p>")
    sections.append(("validation", "Is the metric any good?", "\n".join(body)))
  elif summary.get("metric_validation_md"):
    sections.append(("validation", "Is the metric any good?",
                     f"<pre>{_e(summary['metric_validation_md'])}</pre>"))

  if data.stages:
    body = [_html_table(_STAGE_HEADER, _stage_rows(data.stages))]
    if "stages" in figs:
      body.append(_html_img(figs["stages"]))
    sections.append(("stages", "Stage timings", "\n".join(body)))

  cfg = _config(summary)
  if cfg:
    sections.append(("config", "Config",
                     "<details><summary>config JSON</summary><pre>"
                     + _e(json.dumps(cfg, indent=2, sort_keys=True, default=str))
                     + "</pre></details>"))
  skipped = summary.get("skipped_files") or []
  if skipped:
    items = "".join(f"<li><code>{_e(s.get('path'))}</code> ({_e(s.get('source', ''))}): "
                    f"{_e(s.get('reason'))}</li>" for s in skipped)
    sections.append(("skipped", "Skipped files", f"<ul>{items}</ul>"))
  else:
    sections.append(("skipped", "Skipped files", "<p>None: every image was readable.</p>"))
  if data.notes:
    items = "".join(f"<li>{_e(n)}</li>" for n in data.notes)
    sections.append(("notes", "Report notes", f"<ul>{items}</ul>"))

  nav = " ".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
  where = f'<p class="muted">workdir: <code>{_e(workdir)}</code></p>' if workdir else ""
  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>synthbandit_jax report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>synthbandit_jax report</h1>", where, f"<nav>{nav}</nav>"]
  for anchor, title, content in sections:
    parts.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{content}\n</section>')
  parts.append("</body></html>")
  return "\n".join(p for p in parts if p) + "\n"


# ------------------------------------------------------------------------------ writers


def write_html_report(workdir: str | Path, summary: dict, *, scores_path=None, pool_dir=None,
                      validation=None, stages=None, per_metric: int = 10,
                      thumb_size: int = 64) -> Path:
  """Writes the self-contained WORKDIR/report.html; returns its path.

  Args:
    workdir: the run directory (also where optional inputs are looked for).
    summary: the dict `trainer.run` returns (runs, comparison, config, data, skipped_files;
      optional "pipeline": {"stages": ...}). A summary without "runs" gives a report of the
      other sections only.
    scores_path: score table (.csv/.jsonl/.npz); None -> config scores.path, else
      WORKDIR/scores.csv when it exists.
    pool_dir: pool root (or its metadata.jsonl); None -> summary["data"]["pool"], else
      WORKDIR/pool.
    validation: metric validation as the dict of metric_validation.json, its list of rows,
      or a path; None -> WORKDIR/metric_validation.json, else the one beside the score table.
    stages: {stage: {"seconds", "status", "hash", "counts"}}; None ->
      summary["pipeline"]["stages"].
    per_metric: images in each best/worst row. thumb_size: longest thumbnail side in px.
  """
  workdir = Path(workdir)
  data = collect_report_data(workdir, summary, scores_path=scores_path, pool_dir=pool_dir,
                             validation=validation, stages=stages, per_metric=per_metric,
                             thumb_size=thumb_size)
  return sio.atomic_write_text(workdir / REPORT_HTML, render_html(data, workdir))


def write_report(workdir: str | Path, summary: dict, *, scores_path=None, pool_dir=None,
                 validation=None, stages=None, html: bool = True, per_metric: int = 10,
                 thumb_size: int = 64) -> Path:
  """Writes report.md and its PNGs into workdir (and report.html unless `html=False`);
  returns the report.md path. Arguments as in `write_html_report`."""
  workdir = Path(workdir)
  data = collect_report_data(workdir, summary, scores_path=scores_path, pool_dir=pool_dir,
                             validation=validation, stages=stages, per_metric=per_metric,
                             thumb_size=thumb_size, grids=True)
  plots: dict[str, str] = {}
  for key, fig in data.figures.items():
    sio.atomic_write_bytes(workdir / fig.filename, fig.png)
    if key == "val_accuracy":
      plots[key] = fig.filename
    elif key.startswith("arms/"):
      plots[key.split("/", 1)[1]] = fig.filename
  if html:
    sio.atomic_write_text(workdir / REPORT_HTML, render_html(data, workdir))
  return sio.atomic_write_text(workdir / REPORT_MD, render_markdown(summary, plots, data))
