"""Multi-process runs as on several hosts: two local JAX processes with CPU collectives.

The training run goes through the real launcher (`launch.train` with the distributed flags)
on a global mesh of 2 processes x 2 devices, crashes after epoch 1 on both processes and
resumes from the shared orbax checkpoint (switching to the host-streaming input path and a
model axis on the resume, so both input paths and split parameters run multi-process); its
results must equal one process with 4 devices. The helpers (gather, the bandit-state check, the shared-workdir check, slicing)
are checked on their own. Scoring and generation have their own two-process tests in
test_score_stage.py and test_generate_stage.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from synthbandit_jax import parallel
from tests import multihost

ROOT = multihost.ROOT

_TRAIN = """
# The launcher initialises jax.distributed from its own flags.
sys.argv = ["launch.train", "--config=configs/tiny.py", "--workdir={wd}", "--noprogress",
            "--config.train.epochs=3", "--config.train.modes=bandit",
            "--coordinator_address=" + ADDRESS, "--num_processes=" + str(NPROC),
            "--process_id=" + str(PID)] + {extra!r}
from launch import train
train.run()
"""

_ONE = """
init()
from configs import tiny
from synthbandit_jax.training import trainer
c = tiny.get_config()
c.train.epochs = 3
c.train.modes = "bandit"
s = trainer.run(c, {wd!r}, progress=False)
emit(s["runs"]["bandit"])
"""


def _summary(r: dict) -> dict:
  return {"arms": [e["arm"] for e in r["epochs"]],
          "val": [e["val_accuracy"] for e in r["epochs"]],
          "loss": [e["train_loss"] for e in r["epochs"]],
          "test": r["test_accuracy"], "pulls": [a["pulls"] for a in r["arms"]]}


def test_two_process_training_resumes_and_matches_one_process(tmp_path):
  # The three launches (5 processes) share the suite's compilation cache (tests/conftest.py):
  # later processes load the executables earlier ones compiled (same numbers).
  one = multihost.run_processes(_ONE.format(wd=str(tmp_path / "one")), 1, 4)[0]
  wd = tmp_path / "two"
  # First attempt: both processes hard-exit right after checkpointing epoch 1.
  crashed = multihost.spawn(_TRAIN.format(wd=wd, extra=["--config.debug.crash_after_epoch=1"]),
                            2, 2, timeout=400)
  assert all(rc != 0 for rc, _, _ in crashed), [rc for rc, _, _ in crashed]
  assert not (wd / "bandit" / "results.json").exists()
  # Resume on both with the host-streaming input path and a (data 2 x model 2) mesh, the
  # large leaves split over each host's two devices (neither setting is part of a run's
  # identity, so the checkpoint is reused; saving it gathers the split leaves).
  multihost.run_processes(_TRAIN.format(wd=wd, extra=["--config.data.on_device=False",
                                                      "--config.parallel.model_axis=2"]),
                          2, 2, timeout=400)
  two = json.loads((wd / "bandit" / "results.json").read_text())
  assert two["num_processes"] == 2 and two["num_devices"] == 4
  assert two["mesh"] == {"data": 2, "model": 2}
  assert one["num_processes"] == 1 and one["num_devices"] == 4
  a, b = _summary(one), _summary(two)
  # Same global mesh size; the cross-process all-reduce may sum in another order, so losses
  # agree to float32 rounding (observed ~1e-7 relative), val/test accuracies exactly (the
  # same images are right), and the bandit makes the same choices.
  assert a["arms"] == b["arms"] and a["pulls"] == b["pulls"]
  np.testing.assert_allclose(a["val"], b["val"], atol=1e-6)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  assert abs(a["test"] - b["test"]) < 1e-6
  # The resumed run really resumed (epoch 1 came from the crashed attempt's checkpoint).
  assert [e["epoch"] for e in two["epochs"]] == [1, 2, 3]
  assert (wd / "report.md").exists() and (wd / "results.json").exists()


_HELPERS = """
init()
import jax, numpy as np
from synthbandit_jax import parallel
out = {{}}
rows = np.arange(PID + 2, dtype=np.float32).reshape(-1, 1) + 10 * PID
out["gather"] = [g.ravel().tolist() for g in parallel.gather_rows(rows)]
out["slice"] = parallel.process_slice(7).tolist()
out["regathered"] = parallel.gather_process_slices(
    np.arange(7.0)[parallel.process_slice(7)] * 10, 7).tolist()
parallel.assert_same_on_all_processes({{"a": np.ones(3)}}, "equal tree")
try:
  parallel.assert_same_on_all_processes({{"a": np.full(3, PID)}}, "the test tree")
  out["diverged"] = None
except AssertionError as e:
  out["diverged"] = str(e)
mesh = parallel.make_global_mesh()
out["mesh"] = parallel.mesh_size(mesh)
out["rows"] = [parallel.local_rows(8, mesh).start, parallel.local_rows(8, mesh).stop]
batch = parallel.global_batch(lambda r: np.arange(8)[r] * 1.0, 8, mesh)
out["batch_sum"] = float(jax.jit(lambda x: x.sum())(batch))
parallel.check_shared_directory({shared!r})
try:
  parallel.check_shared_directory({private!r} + str(PID))
  out["private"] = None
except RuntimeError as e:
  out["private"] = str(e)
emit(out)
"""


def test_helpers_two_processes(tmp_path):
  script = _HELPERS.format(shared=str(tmp_path / "shared"), private=str(tmp_path / "own"))
  out = multihost.run_processes(script, 2, 2, timeout=300)
  for pid, o in enumerate(out):
    assert o["gather"] == [[0.0, 1.0], [10.0, 11.0, 12.0]]  # unequal lengths kept apart
    assert o["slice"] == list(range(pid, 7, 2))
    assert o["regathered"] == [10.0 * i for i in range(7)]  # both shares, back in order
    assert o["diverged"] is not None and "the test tree differs between processes" in \
        o["diverged"]
    assert o["mesh"] == 4
    assert o["rows"] == [4 * pid, 4 * pid + 4]  # each process holds its own half
    assert o["batch_sum"] == sum(range(8))  # the global batch is whole
    assert o["private"] is not None and "not one shared directory" in o["private"]


def test_single_process_helpers_are_plain(tmp_path):
  assert parallel.gather_rows(np.ones((3, 2)))[0].shape == (3, 2)
  assert parallel.process_slice(5).tolist() == list(range(5))
  assert parallel.gather_process_slices(np.arange(5), 5).tolist() == list(range(5))
  parallel.assert_same_on_all_processes({"x": np.ones(2)}, "x")  # nothing to compare
  parallel.check_shared_directory(tmp_path)
  parallel.sync("nothing")
  mesh = parallel.make_global_mesh()
  assert parallel.mesh_size(mesh) == len(parallel.make_mesh().devices.ravel())


def test_initialize_distributed_needs_complete_settings(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert parallel.initialize_distributed() is False  # a plain single run
  assert parallel.initialize_distributed(mode="off") is False
  with pytest.raises(ValueError, match="missing: --coordinator_address, --process_id"):
    parallel.initialize_distributed(num_processes=2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
  with pytest.raises(ValueError, match="needs --process_id"):
    parallel.initialize_distributed()
  with pytest.raises(ValueError, match="auto, on or off"):
    parallel.initialize_distributed(mode="maybe")


def test_launcher_reports_incomplete_distributed_flags():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(var, None)
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=configs/tiny.py", "--workdir=/tmp/x",
       "--num_processes=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "missing: --coordinator_address, --process_id" in proc.stderr
