"""The report: report.md + PNGs and the self-contained report.html on a synthetic workdir (a
tiny PoolWriter pool, a score table with a sidecar, metric_validation.json, stage timings and
a summary shaped like `trainer.run`'s). Checks the best/worst image order per direction,
self-containment, HTML escaping, and that absent inputs leave their sections out."""
from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthbandit_jax import report
from synthbandit_jax.data import pool as pool_lib
from synthbandit_jax.data import scores as scores_lib
from synthbandit_jax.training import trainer

N = 24
EVIL = "<b>&"  # a class name that must be escaped in HTML
CLASSES = ("cat", EVIL, "dog")
IDS = [f"img{i:02d}" for i in range(N)]
# "quality" is lower-is-better only through the sidecar (its name would default to higher).
QUALITY = np.array([(7 * i) % N for i in range(N)], np.float64)  # a permutation of 0..23
U = np.array([((5 * i + 3) % N) / 10.0 for i in range(N)], np.float64)
U[4] = math.nan  # never ranked
MISSING_ID = IDS[int(np.argmin(QUALITY))]  # best by quality, its file deleted


def _epoch(e, arm, idx, reward, val):
  return {"epoch": e, "arm": arm, "arm_index": idx, "reward": reward, "val_accuracy": val,
          "train_loss": 1.0 / e, "train_accuracy": 0.5 + 0.01 * e, "images": 100,
          "wall_time_s": 0.5}


def _run(mode, arms, epochs, uses_bandit, bandit, warmup=0):
  vals = [e["val_accuracy"] for e in epochs]
  return {"mode": mode, "config": {}, "fingerprint": "f", "uses_bandit": uses_bandit,
          "bandit": bandit, "warmup_epochs": warmup, "arms": arms, "epochs": epochs,
          "epochs_completed": len(epochs), "best_val_accuracy": max(vals),
          "best_epoch": int(np.argmax(vals)) + 1, "test_accuracy": 0.8 + 0.01 * len(arms),
          "final_test_accuracy": 0.8, "images_seen": 100 * len(epochs),
          "wall_time_s": 0.5 * len(epochs), "num_devices": 1, "data": {},
          "skipped_files": []}


def _summary(pool_root=None, config=None) -> dict:
  """A summary of the shape trainer.run returns (comparison built by trainer itself)."""
  real = _run("real", [{"name": "real", "pulls": 4, "mean_reward": None, "size": 50}],
              [_epoch(e, "real", 0, 0.1, 0.5 + 0.1 * e) for e in range(1, 5)], False, "fixed")
  rewards = [0.3, 0.2, -0.1, 0.05, 0.4, 0.1]
  arms_seq = ["warmup:real", "clean", "noise:1", EVIL, "clean", "clean"]
  names = ["clean", "noise:1", EVIL, "warmup:real"]
  bandit_epochs = [_epoch(e, a, names.index(a), r, 0.4 + 0.05 * e)
                   for e, (a, r) in enumerate(zip(arms_seq, rewards), 1)]
  bandit_arms = [{"name": "clean", "pulls": 3, "mean_reward": (0.2 + 0.4 + 0.1) / 3, "size": 10},
                 {"name": "noise:1", "pulls": 1, "mean_reward": -0.1, "size": 10},
                 {"name": EVIL, "pulls": 1, "mean_reward": 0.05, "size": 10},
                 {"name": "warmup:real", "pulls": 1, "mean_reward": None, "size": 50}]
  bandit = _run("bandit", bandit_arms, bandit_epochs, True, "ucb1", warmup=1)
  runs = {"real": real, "bandit": bandit}
  return {"fingerprint": "f", "modes": list(runs),
          "config": config if config is not None else {"seed": 0, "train": {"epochs": 4}},
          "data": {"counts": {"train": 50, "val": 20, "test": 20, "pool": N, "classes": 3},
                   "class_names": list(CLASSES), "pool": str(pool_root) if pool_root else None},
          "comparison": trainer.comparison_rows(runs), "runs": runs,
          "skipped_files": [{"path": "x/bad.png", "source": "pool", "reason": f"class {EVIL}"}],
          "wall_time_s": 3.0}


STAGES = {"generate": {"seconds": 12.5, "status": "done", "hash": "abcdef0123456789",
                       "counts": {"images": N}},
          "score": {"seconds": 3.25, "status": "cached", "hash": "0123", "counts": {"rows": N}},
          "train": {"seconds": None, "status": "failed", "hash": None, "counts": None}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
  wd = tmp_path_factory.mktemp("report")
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(N)]
  rows = [{"id": rid, "class": CLASSES[i % 3], "source": "user", "prompt": f"a <{i}> & more"}
          for i, rid in enumerate(IDS)]
  writer = pool_lib.PoolWriter(wd / "pool")
  writer.write_shard(0, images[:12], rows[:12])
  writer.write_shard(1, images[12:], rows[12:])
  writer.finalize()
  (wd / "pool" / "images" / "shard_00000" / f"{MISSING_ID}.png").unlink()
  scores_lib.save_score_table(wd / "scores.csv", scores_lib.ScoreTable(
      ids=IDS, columns={"quality": QUALITY, "u": U},
      directions={"quality": "lower", "u": "higher"}))
  (wd / "metric_validation.json").write_text(json.dumps({
      "rows": [{"metric": "u", "direction": "higher", "spearman": 0.9, "spearman_p": 0.001,
                "auroc_wrong_label": 0.95, "n": N, "n_wrong_label": 4, "n_nan": 1},
               {"metric": "quality", "direction": "lower", "spearman": float("nan"),
                "spearman_p": float("nan"), "auroc_wrong_label": 0.5, "n": N,
                "n_wrong_label": 4, "n_nan": 0}],
      "u_beats_baselines": True, "verdict": "U beats every baseline <really>"}))
  return wd


def _expected(values, direction):
  """(best first, worst first) ids, computed independently of rank_order."""
  pairs = [(v, i) for i, v in zip(IDS, values) if not math.isnan(v)]
  asc = [i for _, i in sorted(pairs)]
  best = asc if direction == "lower" else asc[::-1]
  return best[:10], best[::-1][:10]


def _strip_ids(html: str, row: str, metric: str) -> list[str]:
  start = html.index(f'id="{row}-{metric}"')
  end = html.index("</figure></div>", start)
  return re.findall(r'data-id="([^"]*)"', html[start:end])


@pytest.fixture(scope="module")
def full_html(workdir) -> str:
  path = report.write_html_report(workdir, _summary(workdir / "pool"), stages=STAGES)
  assert path == workdir / "report.html"
  return path.read_text(encoding="utf-8")


def test_html_is_self_contained(full_html):
  assert "http://" not in full_html and "https://" not in full_html
  assert "<script" not in full_html.lower() and "<link" not in full_html.lower()
  srcs = re.findall(r'src="([^"]*)"', full_html)
  # val accuracy, arms of bandit, rewards, score histograms and stage chart, plus one per
  # tile (2 metrics x 20) except those of the deleted file (a placeholder, not an <img>).
  tiles = [i for m, v, d in (("quality", QUALITY, "lower"), ("u", U, "higher"))
           for row in _expected(v, d) for i in row]
  assert len(tiles) == 40 and tiles.count(MISSING_ID) == 2
  assert len(srcs) == 5 + 40 - 2
  for s in srcs:
    assert s.startswith("data:image/png;base64,"), s[:60]
    img = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
    img.load()
    assert img.format == "PNG"
  assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', full_html))
  assert len(full_html) < 1_500_000


def test_best_and_worst_order_follows_direction(full_html):
  for metric, values, direction in (("quality", QUALITY, "lower"), ("u", U, "higher")):
    best, worst = _expected(values, direction)
    assert _strip_ids(full_html, "best", metric) == best, metric
    assert _strip_ids(full_html, "worst", metric) == worst, metric
  # Sanity of the fixture: lower-is-better puts the smallest value first.
  assert _strip_ids(full_html, "best", "quality")[0] == IDS[int(np.argmin(QUALITY))]
  assert _strip_ids(full_html, "best", "u")[0] == IDS[int(np.nanargmax(U))]
  assert IDS[4] not in _strip_ids(full_html, "best", "u") + _strip_ids(full_html, "worst", "u")


def test_tiles_show_class_score_and_missing_file(full_html):
  best_q = _expected(QUALITY, "lower")[0]
  start = full_html.index('id="best-quality"')
  tile = full_html[full_html.index(f'data-id="{best_q[1]}"', start):]
  tile = tile[:tile.index("</figure>")]
  k = IDS.index(best_q[1])
  assert "<img src=\"data:image/png" in tile and 'width="53" height="64"' in tile  # 12x10 -> 64
  assert report._e(CLASSES[k % 3]) in tile and f"{QUALITY[k]:.4g}" in tile
  missing = full_html[full_html.index(f'data-id="{MISSING_ID}"'):]
  missing = missing[:missing.index("</figure>")]
  assert "missing file" in missing and "<img" not in missing


def test_html_escapes_text(full_html):
  assert EVIL not in full_html
  assert "&lt;b&gt;&amp;" in full_html  # class names in tiles, arms table, skipped files
  assert "U beats every baseline &lt;really&gt;" in full_html


def test_html_sections(full_html):
  for anchor in ("results", "training", "score-distributions", "extremes", "validation",
                 "stages", "config", "skipped"):
    assert f'<section id="{anchor}">' in full_html, anchor
  assert 'id="notes"' not in full_html
  results = full_html[full_html.index('<section id="results">'):]
  results = results[:results.index("</section>")]
  assert "<td>bandit</td>" in results and "<td>clean</td>" in results  # most pulled arm
  assert '<td class="num">0.8400</td>' in results  # bandit test accuracy (4 arms)
  stages = full_html[full_html.index('<section id="stages">'):]
  stages = stages[:stages.index("</section>")]
  for cell in ("<td>generate</td>", "<td>12.5</td>", "<td>abcdef012345</td>",
               "<td>images: 24</td>", "<td>cached</td>", "<td>failed</td>"):
    assert cell in stages, cell
  val = full_html[full_html.index('<section id="validation">'):]
  assert val.index("<td>u</td>") < val.index("<td>quality</td>")  # NaN Spearman last
  assert "<details><summary>config JSON</summary>" in full_html


def test_running_mean_rewards_skips_warmup_and_matches_arm_means():
  bandit = _summary()["runs"]["bandit"]
  means = report.running_mean_rewards(bandit)
  assert list(means) == ["clean", "noise:1", EVIL]  # warm-up arm never counted
  np.testing.assert_allclose(means["clean"], [np.nan, 0.2, 0.2, 0.2, 0.3, 0.7 / 3],
                             rtol=1e-12)
  np.testing.assert_allclose(means["noise:1"], [np.nan, np.nan, -0.1, -0.1, -0.1, -0.1])
  for arm in bandit["arms"][:3]:
    assert means[arm["name"]][-1] == pytest.approx(arm["mean_reward"], rel=1e-12)


def test_write_report_markdown_and_pngs(workdir):
  summary = _summary(workdir / "pool")
  summary["pipeline"] = {"stages": STAGES}
  md_path = report.write_report(workdir, summary)
  md = md_path.read_text(encoding="utf-8")
  assert md_path == workdir / "report.md"
  assert "| real |" in md and "| bandit |" in md
  for name in ("val_accuracy.png", "arms_bandit.png", "rewards.png", "score_distributions.png",
               "extremes_quality.png", "extremes_u.png", "stage_timings.png"):
    assert f"]({name})" in md, name
    assert Image.open(workdir / name).format == "PNG"
  assert "## Stage timings" in md and "| generate | done | 12.5 |" in md
  assert "## Is the metric any good?" in md and "| u | higher | 0.9000 |" in md
  assert "<details><summary>config JSON</summary>" in md
  # The ids table of the best/worst section, in rank order.
  best, worst = _expected(QUALITY, "lower")
  sec = md[md.index("### quality"):md.index("### u")]
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in sec.splitlines()
           if re.match(r"^\| \d+ \|", line)]
  assert [c[0] for c in cells] == [str(k) for k in range(1, 11)]
  assert [c[1] for c in cells] == best and [c[4] for c in cells] == worst
  assert (workdir / "report.html").is_file()


def test_missing_inputs_leave_sections_out(tmp_path):
  summary = _summary(pool_root=None)
  md = report.write_report(tmp_path, summary).read_text()
  html = (tmp_path / "report.html").read_text()
  for anchor in ("score-distributions", "extremes", "validation", "stages", "notes"):
    assert f'<section id="{anchor}">' not in html, anchor
  for title in ("Score distributions", "Best and worst", "Is the metric", "Stage timings",
                "Report notes"):
    assert title not in md, title
  assert '<section id="results">' in html and "rewards.png" in md
  assert sorted(p.name for p in tmp_path.glob("*.png")) == [
      "arms_bandit.png", "rewards.png", "val_accuracy.png"]


def test_scores_without_pool_show_histograms_only(tmp_path, workdir):
  html = report.write_html_report(tmp_path, _summary(), scores_path=workdir / "scores.csv"
                                  ).read_text()
  assert '<section id="score-distributions">' in html
  assert '<section id="extremes">' not in html and 'id="notes"' not in html


def test_named_but_broken_inputs_become_notes(tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("id,u\na,notanumber\n")
  summary = _summary(pool_root=tmp_path / "nopool", config={"scores": {"path": str(bad)}})
  html = report.write_html_report(tmp_path, summary, validation={"oops": 1}).read_text()
  notes = html[html.index('<section id="notes">'):]
  assert "bad.csv could not be read" in notes and "notanumber" in notes
  assert "metric validation has no &#x27;rows&#x27;" in notes
  assert '<section id="score-distributions">' not in html
  gone = report.write_html_report(tmp_path, _summary(), scores_path=tmp_path / "nope.csv")
  assert "nope.csv does not exist" in gone.read_text()


def test_summary_without_runs(tmp_path, workdir):
  """A pipeline that only generated and scored still gets a report."""
  html = report.write_html_report(tmp_path, {"config": {}}, scores_path=workdir / "scores.csv",
                                  pool_dir=workdir / "pool", stages=STAGES).read_text()
  assert '<section id="results">' not in html and '<section id="extremes">' in html
  assert '<section id="stages">' in html
