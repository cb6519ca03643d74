"""Reports: a markdown summary of a workdir's results and PNG plots beside it.

`write_report(workdir, summary)` writes WORKDIR/report.md, WORKDIR/val_accuracy.png and,
for every mode with more than one arm, WORKDIR/arms_<mode>.png (arm chosen per epoch and
pulls per arm). All files are written atomically.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from synthbandit_jax import io as sio  # pylint: disable=wrong-import-position


def _save_fig(fig, path: Path) -> Path:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  return sio.atomic_write_bytes(path, buf.getvalue())


def plot_val_accuracy(runs: dict[str, dict], path: Path) -> Path:
  """Val accuracy per epoch, one line per mode."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for mode, r in runs.items():
    ep = [e["epoch"] for e in r["epochs"]]
    ax.plot(ep, [e["val_accuracy"] for e in r["epochs"]], marker="o", ms=3, label=mode)
  ax.set_xlabel("epoch")
  ax.set_ylabel("val accuracy (real)")
  ax.set_title("Validation accuracy per epoch")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save_fig(fig, path)


def plot_arms(result: dict, path: Path) -> Path:
  """Arm chosen per epoch (left) and pulls per arm (right) for one mode."""
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
  return _save_fig(fig, path)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4f}"
    return "" if v is None else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def render_markdown(summary: dict, plots: dict[str, str]) -> str:
  runs = summary["runs"]
  counts = summary.get("data", {}).get("counts", {})
  out = ["# synthbandit_jax report", ""]
  if counts:
    out += [f"Data: {counts.get('train')} real train, {counts.get('val')} real val (bandit "
            f"reward), {counts.get('test')} real test, {counts.get('pool')} synthetic pool "
            f"images, {counts.get('classes')} classes.", ""]
  out += ["## Test accuracy on real data", "",
          "Test accuracy uses the parameters with the best val accuracy. `images seen` is "
          "the training budget each mode consumed.", ""]
  rows = [(r["mode"], r["test_accuracy"], r["best_val_accuracy"], r["best_epoch"],
           r["images_seen"], f"{r['wall_time_s']:.1f}", r["arms"], r["most_pulled_arm"])
          for r in summary["comparison"]]
  out.append(_table(["mode", "test acc", "best val acc", "best epoch", "images seen",
                     "train time (s)", "arms", "most pulled arm"], rows))
  out.append("")
  if "val_accuracy" in plots:
    out += [f"![val accuracy]({plots['val_accuracy']})", ""]
  for mode, r in runs.items():
    if len(r["arms"]) < 2:
      continue
    out += [f"## Mode `{mode}` (bandit: {r.get('bandit')})", ""]
    out.append(_table(["arm", "size", "pulls", "mean reward"],
                      [(a["name"], a["size"], a["pulls"], a["mean_reward"])
                       for a in r["arms"]]))
    out.append("")
    if mode in plots:
      out += [f"![arms of {mode}]({plots[mode]})", ""]
    out.append(_table(["epoch", "arm", "reward", "val acc", "train loss", "train acc"],
                      [(e["epoch"], e["arm"], e["reward"], e["val_accuracy"], e["train_loss"],
                        e["train_accuracy"]) for e in r["epochs"]]))
    out.append("")
  if summary.get("metric_validation_md"):
    body = summary["metric_validation_md"].split("\n", 1)[1].strip()  # drop its title
    out += ["## Is the metric any good? (from the scoring stage)", "", body, ""]
  skipped = summary.get("skipped_files") or []
  out += ["## Skipped files", ""]
  if skipped:
    out += [f"- `{s.get('path')}` ({s.get('source', '')}): {s.get('reason')}" for s in skipped]
  else:
    out.append("None: every image was readable.")
  out.append("")
  return "\n".join(out)


def write_report(workdir: str | Path, summary: dict) -> Path:
  """Writes report.md and the plots into workdir; returns the report path."""
  workdir = Path(workdir)
  plots = {"val_accuracy": plot_val_accuracy(summary["runs"],
                                             workdir / "val_accuracy.png").name}
  for mode, r in summary["runs"].items():
    if len(r["arms"]) >= 2:
      plots[mode] = plot_arms(r, workdir / f"arms_{sio.safe_filename(mode)}.png").name
  return sio.atomic_write_text(workdir / "report.md", render_markdown(summary, plots))
