"""End-to-end runs of the trainer: outputs, resume after a hard kill, finished workdirs,
config mismatches, bad input (class mismatch, corrupt pool files, unknown config keys)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import tiny
from synthbandit_jax.data import pool as pool_lib
from synthbandit_jax.training import trainer

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("mode", "config", "arms", "epochs", "best_val_accuracy", "test_accuracy",
            "images_seen", "wall_time_s", "skipped_files")


def _launch(workdir, *overrides, check=True):
  # (Launches share the suite's compilation cache, tests/conftest.py: a later one loads
  # the executables an earlier one compiled.)
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", "--noprogress", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny.get_config()
  summary = trainer.run(config, workdir, progress=False)
  return workdir, config, summary


def test_outputs(finished):
  workdir, config, summary = finished
  assert summary["modes"] == ["real", "bandit"]
  for mode in ("real", "bandit"):
    r = json.loads((workdir / mode / "results.json").read_text())
    for key in REQUIRED:
      assert key in r, key
    assert len(r["epochs"]) == config.train.epochs
    assert sum(a["pulls"] for a in r["arms"]) == config.train.epochs
    assert r["images_seen"] == sum(e["images"] for e in r["epochs"])
    assert 0.0 <= r["test_accuracy"] <= 1.0
    assert r["best_val_accuracy"] == max(e["val_accuracy"] for e in r["epochs"])
  real = summary["runs"]["real"]
  assert real["test_accuracy"] > 0.6  # 8x8 digits are easy; a broken loop stays near 0.1
  bandit = summary["runs"]["bandit"]
  names = [a["name"] for a in bandit["arms"]]
  assert "clean" in names and "random" in names and "wrong_label" in names
  # UCB1 explores every arm once first, in order (4 epochs < 8 arms: the first four).
  assert [e["arm"] for e in bandit["epochs"]] == names[:4]
  # Arms are capped at k = 10 per class.
  assert all(a["size"] <= 10 * 10 for a in bandit["arms"])
  report = (workdir / "report.md").read_text()
  assert "| real |" in report and "| bandit |" in report
  assert (workdir / "val_accuracy.png").stat().st_size > 1000
  assert (workdir / "arms_bandit.png").stat().st_size > 1000


def test_finished_workdir_says_so_and_stops(finished, capsys):
  workdir, config, summary = finished
  again = trainer.run(config, workdir, progress=False)
  assert "holds a finished run" in capsys.readouterr().out
  assert again["comparison"] == summary["comparison"]
  with pytest.raises(trainer.FinishedRunError, match="--overwrite"):
    trainer.train_mode(config, None, "real", workdir / "real", if_finished="error")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
  """A bandit run hard-killed (os._exit) right after checkpointing epoch 2 of 4; tests
  resume copies of it."""
  killed = tmp_path_factory.mktemp("killed")
  proc = _launch(killed, "--config.train.modes=bandit", "--config.debug.crash_after_epoch=2",
                 check=False)
  assert proc.returncode == 17, proc.stderr[-3000:]
  assert (killed / "bandit" / "checkpoints").is_dir()
  assert not (killed / "bandit" / "results.json").exists()
  return killed


def test_resume_after_hard_kill_equals_uninterrupted(tmp_path, crashed, finished):
  # The uninterrupted reference is the `finished` run's bandit mode (same config; a mode's
  # run does not depend on which other modes the run has, nor on running in this process).
  full = finished[0]
  killed = tmp_path / "killed"
  shutil.copytree(crashed, killed)
  _launch(killed, "--config.train.modes=bandit")
  a = json.loads((full / "bandit" / "results.json").read_text())
  b = json.loads((killed / "bandit" / "results.json").read_text())
  strip = lambda eps: [{k: v for k, v in e.items() if k != "wall_time_s"} for e in eps]
  assert strip(a["epochs"]) == strip(b["epochs"])  # exact: same arms, rewards, losses
  assert a["test_accuracy"] == b["test_accuracy"]
  assert a["final_test_accuracy"] == b["final_test_accuracy"]
  assert a["arms"] == b["arms"]


def test_resume_with_other_config_is_refused(tmp_path, crashed):
  workdir = tmp_path / "w"
  shutil.copytree(crashed, workdir)
  proc = _launch(workdir, "--config.train.modes=bandit", "--config.optim.learning_rate=0.5",
                 check=False)
  assert proc.returncode != 0
  assert "optim.learning_rate" in proc.stderr and "--overwrite" in proc.stderr


def test_unknown_config_key_lists_valid_keys(tmp_path):
  proc = _launch(tmp_path / "w", "--config.bandit.cc=1.0", check=False)
  assert proc.returncode != 0
  assert "bandit.cc" in proc.stderr and "bandit.c\n" in proc.stderr


def _user_pool(tmp_path, extra_class=None, corrupt=False):
  """A small user pool in the pool format: digits-like 8x8 images."""
  from sklearn.datasets import load_digits
  d = load_digits()
  root = tmp_path / "pool"
  writer = pool_lib.PoolWriter(root)
  imgs, rows = [], []
  for i in range(300):
    img = np.round(d.images[i] * 255 / 16).astype(np.uint8)[:, :, None]
    imgs.append(img)
    rows.append({"id": f"u{i:04d}", "class": str(d.target[i]), "source": "user",
                 "extras": {}})
  if extra_class:
    imgs.append(imgs[0])
    rows.append({"id": "odd", "class": extra_class, "source": "user", "extras": {}})
  writer.write_shard(0, imgs, rows)
  writer.finalize()
  if corrupt:
    bad = root / [r for r in pool_lib.read_pool_rows(root)[1] if r["id"] == "u0003"][0]["path"]
    bad.write_bytes(b"not a png")
  return root


def _dir_config(root):
  c = tiny.get_config()
  c.pool.kind = "dir"
  c.pool.path = str(root)
  c.arms.source = "file"
  c.train.modes = "synthetic"
  c.train.epochs = 1
  return c


def test_pool_class_not_in_real_data_is_a_clear_error(tmp_path):
  root = _user_pool(tmp_path, extra_class="zebra")
  with pytest.raises(ValueError, match="zebra"):
    trainer.run(_dir_config(root), tmp_path / "w", progress=False)


def test_corrupt_pool_file_is_skipped_and_listed(tmp_path):
  root = _user_pool(tmp_path, corrupt=True)
  summary = trainer.run(_dir_config(root), tmp_path / "w", progress=False)
  skipped = summary["runs"]["synthetic"]["skipped_files"]
  assert [s["id"] for s in skipped] == ["u0003"]
  assert summary["data"]["counts"]["pool"] == 299
  assert "u0003" in (tmp_path / "w" / "report.md").read_text()


def test_seed_change_cannot_reuse_a_controlled_pool(tmp_path):
  """Another seed gives other splits: its val/test may be in the old pool's holdout."""
  c = tiny.get_config()
  c.train.modes = "real"
  c.train.epochs = 1
  trainer.run(c, tmp_path, progress=False)
  c.seed = 1
  with pytest.raises(ValueError, match="--overwrite"):
    trainer.run(c, tmp_path, progress=False)
  summary = trainer.run(c, tmp_path, overwrite=True, progress=False)
  assert summary["runs"]["real"]["config"]["seed"] == 1


def test_user_score_table_drives_topk_and_bandit_arms(tmp_path):
  from synthbandit_jax.data import scores as scores_lib
  from synthbandit_jax.training import inputs as inputs_lib
  c = tiny.get_config()
  inputs = inputs_lib.prepare_inputs(c, tmp_path, progress=False)  # builds the pool
  rows = inputs.pool.rows
  sev = np.array([r["extras"]["severity"] for r in rows], float)
  wrong = np.array([r["extras"]["kind"] == "wrong_label" for r in rows])
  bad = sev + 5.0 * wrong  # a distance-like column: lower is better
  table = scores_lib.ScoreTable(
      ids=list(inputs.pool.ids)[::-1],  # another order: the loader aligns by id
      columns={"quality": (-bad)[::-1], "fid_like": bad[::-1]},
      directions={"quality": "higher", "fid_like": "lower"})
  path = scores_lib.save_score_table(tmp_path / "scores.csv", table)
  c.scores.path = str(path)
  c.arms.source = "scores"
  c.arms.controls = ""
  c.arms.k = 5
  c.train.modes = "topk:fid_like,bandit"
  c.train.epochs = 2
  summary = trainer.run(c, tmp_path, progress=False)
  topk = summary["runs"]["topk:fid_like"]
  assert [a["name"] for a in topk["arms"]] == ["top:fid_like"]
  bandit = summary["runs"]["bandit"]
  assert [a["name"] for a in bandit["arms"]] == ["top:quality", "top:fid_like"]
  # Both rankings pick the same images (opposite directions of the same score): the best
  # 5 per class, never a wrong label.
  inp = inputs_lib.prepare_inputs(c, tmp_path, progress=False)
  arms = dict(inputs_lib.candidate_arms(c, inp))
  assert sorted(arms["top:quality"].tolist()) == sorted(arms["top:fid_like"].tolist())
  chosen = arms["top:quality"]
  assert not wrong[chosen].any()
  for cls in range(10):
    in_class = np.flatnonzero(inputs.pool.labels == cls)
    best = np.sort(bad[in_class])[:5]
    assert np.array_equal(np.sort(bad[np.intersect1d(chosen, in_class)]), best)


def test_host_streaming_run_matches_on_device_run(tmp_path):
  c = tiny.get_config()
  c.train.modes = "bandit"
  c.train.epochs = 3
  a = trainer.run(c, tmp_path / "a", progress=False)["runs"]["bandit"]
  c.data.on_device = False
  b = trainer.run(c, tmp_path / "b", progress=False)["runs"]["bandit"]
  assert [e["arm"] for e in a["epochs"]] == [e["arm"] for e in b["epochs"]]
  np.testing.assert_allclose([e["val_accuracy"] for e in a["epochs"]],
                             [e["val_accuracy"] for e in b["epochs"]], atol=2e-3)
  np.testing.assert_allclose([e["train_loss"] for e in a["epochs"]],
                             [e["train_loss"] for e in b["epochs"]], rtol=1e-3)


def test_class_mismatch_intersect_option(tmp_path):
  root = _user_pool(tmp_path, extra_class="zebra")
  # Keep only digits 0-4 in the pool (rewrite its metadata without the other rows).
  meta = root / pool_lib.METADATA_NAME
  rows = [json.loads(l) for l in meta.read_text().splitlines() if l.strip()]
  keep = [r for r in rows if r["class"] in {"0", "1", "2", "3", "4", "zebra"}]
  meta.write_text("".join(json.dumps(r) + "\n" for r in keep))
  c = _dir_config(root)
  with pytest.raises(ValueError, match=r"only in the real data \['5', '6', '7', '8', '9'\]"):
    c.pool.unknown_classes = "skip"
    trainer.run(c, tmp_path / "w0", progress=False)
  c.data.class_mismatch = "intersect"
  summary = trainer.run(c, tmp_path / "w", progress=False)
  assert summary["data"]["class_names"] == ["0", "1", "2", "3", "4"]
  assert any(s["id"] == "odd" for s in summary["skipped_files"])  # the 'zebra' row
  assert summary["runs"]["synthetic"]["test_accuracy"] > 0.5  # 5-way, trained on 0-4 only


def test_warmup_epochs_train_on_real_before_the_bandit(tmp_path):
  c = tiny.get_config()
  c.train.modes = "bandit"
  c.train.epochs = 4
  c.train.warmup_epochs = 2
  r = trainer.run(c, tmp_path, progress=False)["runs"]["bandit"]
  arms = [e["arm"] for e in r["epochs"]]
  assert arms[:2] == ["warmup:real", "warmup:real"]
  names = [a["name"] for a in r["arms"]]
  assert arms[2:] == names[:2]  # then UCB1 starts its round: arm 0, arm 1
  pulls = {a["name"]: a["pulls"] for a in r["arms"]}
  assert pulls["warmup:real"] == 2 and sum(pulls.values()) == 4
  assert r["epochs"][0]["images"] == r["data"]["counts"]["train"]


def test_frozen_backbone_run_trains_only_the_head(tmp_path):
  from synthbandit_jax import checkpoint as ckpt_lib
  c = tiny.get_config()
  c.train.modes = "real"
  c.train.epochs = 2
  c.model.frozen_backbone = True
  trainer.run(c, tmp_path, progress=False)
  restored = ckpt_lib.Checkpointer(tmp_path / "real" / "checkpoints")
  raw = restored._manager.restore(2)  # pylint: disable=protected-access
  params = raw["state"]["params"]
  # Initial params: the same seed and model, initialised afresh.
  from synthbandit_jax.models import classifiers
  import jax
  import jax.numpy as jnp
  model = classifiers.build_classifier("small_cnn", 10, frozen_backbone=True)
  init = model.init(jax.random.split(jax.random.PRNGKey(c.seed))[1],
                    jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  for a, b in zip(jax.tree.leaves(init["backbone"]), jax.tree.leaves(params["backbone"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(init["head"]), jax.tree.leaves(params["head"])))
