"""The pipeline's orchestration: stage hashes, skipping, superseding, subsets, drop-ins.

Stage bodies are replaced by cheap recorders (`runners=`); the real stages have their own
tests (attributes, generation, scoring, training), and tests/test_pipeline_e2e.py runs them
together.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from synthbandit_jax import pipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from configs import common  # noqa: E402  pylint: disable=wrong-import-position


def _config():
  c = common.base_config()
  c.pool.kind = "dir"
  c.pool.path = ""
  c.generate.model = "offline"
  c.arms.source = "scores"
  return c


class Recorder:
  """Stage runners that write each stage's outputs and log the calls."""

  def __init__(self):
    self.calls: list[str] = []

  def runners(self):
    def make(name):
      def run(cfg, workdir, progress):
        del progress
        self.calls.append(name)
        for p in pipeline.STAGE_DEFS[name].outputs(workdir):
          p.parent.mkdir(parents=True, exist_ok=True)
          p.write_text(json.dumps({"stage": name, "lr": cfg.optim.learning_rate}))
        return {"n": 1}
      return run
    return {s: make(s) for s in pipeline.STAGES}


def test_runs_all_then_skips_then_redoes_only_what_changed(tmp_path):
  rec = Recorder()
  state = pipeline.run_pipeline(_config(), tmp_path, runners=rec.runners(), progress=False)
  assert rec.calls == list(pipeline.STAGES)
  assert all(state[s]["status"] == "done" for s in pipeline.STAGES)
  assert json.loads((tmp_path / "stages.json").read_text())["train"]["counts"] == {"n": 1}

  rec.calls.clear()
  pipeline.run_pipeline(_config(), tmp_path, runners=rec.runners(), progress=False)
  assert rec.calls == []

  c = _config()
  c.optim.learning_rate = 0.5  # a training-only change
  old_hash = state["train"]["hash"]
  pipeline.run_pipeline(c, tmp_path, runners=rec.runners(), progress=False)
  assert rec.calls == ["train", "report"]
  # The old results were moved aside, not deleted.
  old = tmp_path / "superseded" / f"train-{old_hash}" / "results.json"
  assert json.loads(old.read_text())["lr"] == 0.02
  assert json.loads((tmp_path / "results.json").read_text())["lr"] == 0.5

  rec.calls.clear()
  c.generate.steps = 7  # generation changed: generate, score, train, report redo
  pipeline.run_pipeline(c, tmp_path, runners=rec.runners(), progress=False)
  assert rec.calls == ["generate", "score", "train", "report"]


def test_crash_mid_stage_resumes_that_stage(tmp_path):
  rec = Recorder()
  runners = rec.runners()

  def crash(cfg, workdir, progress):
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    pipeline.run_pipeline(_config(), tmp_path, runners={**runners, "score": crash},
                          progress=False)
  state = json.loads((tmp_path / "stages.json").read_text())
  assert state["score"]["status"] == "running"
  rec.calls.clear()
  pipeline.run_pipeline(_config(), tmp_path, runners=runners, progress=False)
  assert rec.calls == ["score", "train", "report"]
  assert not (tmp_path / "superseded").exists()  # same settings: resumed, nothing moved


def test_stage_subset(tmp_path):
  rec = Recorder()
  with pytest.raises(ValueError, match="'attributes' has not run"):
    pipeline.run_pipeline(_config(), tmp_path, stages=["score", "train"],
                          runners=rec.runners(), progress=False)
  pipeline.run_pipeline(_config(), tmp_path, runners=rec.runners(), progress=False)
  c = _config()
  c.generate.steps = 3
  with pytest.raises(ValueError, match="stage 'generate' ran with other settings"):
    pipeline.run_pipeline(c, tmp_path, stages=["train"], runners=rec.runners(),
                          progress=False)
  rec.calls.clear()
  c = _config()
  c.bandit.c = 1.0
  pipeline.run_pipeline(c, tmp_path, stages=["train"], runners=rec.runners(), progress=False)
  assert rec.calls == ["train"]
  with pytest.raises(ValueError, match="unknown stage"):
    pipeline.run_pipeline(c, tmp_path, stages=["scoring"], progress=False)


def test_drop_ins_skip_stages(tmp_path):
  c = _config()
  c.pool.path = "/data/my_pool"
  c.scores.path = "/data/my_scores.csv"
  why = pipeline.enabled_stages(c)
  assert why["attributes"] and why["generator"] and why["generate"]
  assert "scores provided" in why["score"]
  assert why["train"] is None and why["report"] is None
  c = _config()
  c.generate.model = "/models/sd15"
  why = pipeline.enabled_stages(c)
  assert why["generator"] and why["generate"] is None
  c = _config()
  c.pool.kind = "controlled"
  c.arms.source = "groups"
  why = pipeline.enabled_stages(c)
  assert "controlled" in why["generate"] and "groups" in why["score"]
  resolved = pipeline.resolve_config(_config(), tmp_path)
  assert resolved.pool.path == str(tmp_path / "pool")
  assert resolved.scores.path == str(tmp_path / "scores.csv")


def test_prompt_names():
  c = _config()
  assert pipeline.prompt_names(c, ["0", "1"]) == ["0", "1"]
  c.attributes.prompt_names = "zero, one"
  assert pipeline.prompt_names(c, ["0", "1"]) == ["zero", "one"]
  c.attributes.prompt_names = "zero"
  with pytest.raises(ValueError, match=r"attributes.prompt_names has 1 names"):
    pipeline.prompt_names(c, ["0", "1"])


_TWO_PROCESSES = """
init()
from synthbandit_jax import pipeline
from tests.test_pipeline import Recorder, _config
calls = []
for lr in (0.1, 0.1, 0.2):  # run, rerun (all skipped), change only the training config
  rec = Recorder()
  c = _config()
  c.optim.learning_rate = lr
  pipeline.run_pipeline(c, {wd!r}, runners=rec.runners(), progress=False)
  calls.append(rec.calls)
emit(calls)
"""


def test_two_processes_share_one_pipeline(tmp_path):
  """As on two hosts: the main-process stages run once (process 0), the sharded ones on
  both, and both processes make the same skip / redo decisions from one stages.json."""
  from tests import multihost  # pylint: disable=import-outside-toplevel
  p0, p1 = multihost.run_processes(_TWO_PROCESSES.format(wd=str(tmp_path)), 2, 1, timeout=300)
  assert p0 == [list(pipeline.STAGES), [], ["train", "report"]]
  assert p1 == [["generate", "score", "train"], [], ["train"]]
  state = json.loads((tmp_path / "stages.json").read_text())
  assert all(state[s]["status"] == "done" for s in pipeline.STAGES)
