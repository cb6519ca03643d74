"""The generation stage: prompts.jsonl -> pool, resumable, device-count independent.

Cost: each jitted sampler is one XLA compilation (~10 s on 2 CPU cores) per Pipeline object
and batch shape, so the in-process runs share one loaded pipeline (`pipe`, what
run_generation itself loads from the same directory) and mostly one batch shape (8); the
loading path of run_generation (generate.model) runs in the subprocess tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from synthbandit_jax import assets
from synthbandit_jax.data import pool as pool_lib
from synthbandit_jax.generation import diffusion, stage
from tests import xla_flags

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["zero", "one", "two"]


def _rows(n: int) -> list[dict]:
  return [{"id": f"{i % 3:03d}-{i:06d}", "class": CLASSES[i % 3],
           "prompt": f"a photo of the digit {CLASSES[i % 3]}, variant {i}",
           "negative_prompt": "blurry", "attributes": {"variant": str(i)}, "seed": i}
          for i in range(n)]


def _config(workdir: Path, model: Path, **over):
  sys.path.insert(0, str(ROOT))
  from configs import demo  # pylint: disable=import-outside-toplevel
  c = demo.get_config()
  g = c.generate
  g.model, g.steps, g.sampler, g.guidance_scale = str(model), 3, "ddim", 5.0
  g.batch_size, g.shard_size = 8, 4  # batch 8: the shape of the `ref8` pool's jitted call
  for k, v in over.items():
    setattr(g, k, v)
  return c


def _write_prompts(workdir: Path, n: int) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n)))


@pytest.fixture(name="sd_dir", scope="module")
def _sd_dir(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from tests import sd_tiny  # pylint: disable=import-outside-toplevel
  try:
    return sd_tiny.build(tmp_path_factory.mktemp("tiny_sd"))
  except assets.AssetError as e:
    pytest.skip(f"CLIP BPE asset unavailable: {e}")


def _images(pool_dir: Path) -> dict[str, np.ndarray]:
  p = pool_lib.read_pool(pool_dir)
  return {r["id"]: img for r, img in zip(p.rows, p.images)}


@pytest.fixture(name="pipe", scope="module")
def _pipe(sd_dir):
  """The pipeline run_generation loads from sd_dir (generate.dtype float32), loaded once so
  that in-process runs reuse its compiled sampler."""
  return diffusion.load_pipeline(sd_dir)


@pytest.fixture(name="ref8", scope="module")
def _ref8(sd_dir, pipe, tmp_path_factory):
  """The images of 8 prompts from one process on one device, in one batch of 8."""
  wd = tmp_path_factory.mktemp("ref8")
  _write_prompts(wd, 8)
  s = stage.run_generation(_config(wd, sd_dir, batch_size=8, shard_size=8), wd,
                           progress=False, pipeline=pipe)
  assert (s["devices"], s["processes"], s["generated"]) == (1, 1, 8)
  return _images(wd / "pool")


def _max_diff(a: dict, b: dict) -> int:
  assert a.keys() == b.keys()
  return max(int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a)


def test_generate_resume_and_refuse_changes(sd_dir, pipe, tmp_path):
  wd = tmp_path / "run"
  _write_prompts(wd, 6)
  s = stage.run_generation(_config(wd, sd_dir), wd, progress=False, pipeline=pipe)
  assert (s["generated"], s["shards"], s["shards_written"], s["complete"]) == (6, 2, 2, True)
  pool = pool_lib.read_pool(wd / "pool")
  assert [r["id"] for r in pool.rows] == [r["id"] for r in _rows(6)]
  assert pool.images.shape == (6, 16, 16, 3) and pool.images.dtype == np.uint8
  row = pool.rows[1]
  assert row["class"] == "one" and row["prompt"].startswith("a photo of the digit one")
  assert row["extras"]["sampler"] == "ddim" and row["extras"]["negative_prompt"] == "blurry"
  assert row["attributes"] == {"variant": "1"}
  assert json.loads((wd / "generate.json").read_text())["generated"] == 6
  first = _images(wd / "pool")

  # Interrupted after shard 0: only shard 1 is redone, and it comes out the same.
  (wd / "pool" / "metadata" / "shard_00001.jsonl").unlink()
  (wd / "pool" / "metadata.jsonl").unlink()
  s = stage.run_generation(_config(wd, sd_dir), wd, progress=False, pipeline=pipe)
  assert (s["generated"], s["shards_written"], s["complete"]) == (2, 1, True)
  again = _images(wd / "pool")
  assert all(np.array_equal(first[k], again[k]) for k in first)

  with pytest.raises(ValueError, match=r"steps: 3 -> 4"):
    stage.run_generation(_config(wd, sd_dir, steps=4), wd, progress=False, pipeline=pipe)


def test_images_do_not_depend_on_batching(sd_dir, pipe, ref8, tmp_path):
  """One image per call (shards of 5 and 3) against `ref8` (all 8 in one call)."""
  wd = tmp_path / "b"
  _write_prompts(wd, 8)
  stage.run_generation(_config(wd, sd_dir, batch_size=1, shard_size=5), wd, progress=False,
                       pipeline=pipe)
  diff = _max_diff(ref8, _images(wd / "pool"))
  assert diff <= 1, diff  # at most one 8-bit level of float rounding between batch shapes


_MULTI = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax
from tests.test_generate_stage import _config, _write_prompts
from synthbandit_jax.generation import stage
from pathlib import Path
assert jax.device_count() == {n}, jax.device_count()
wd = Path({wd!r})
_write_prompts(wd, 8)
s = stage.run_generation(_config(wd, Path({model!r}), batch_size=8, shard_size=8), wd,
                         progress=False)
print(json.dumps(s["devices"]))
"""


def test_one_vs_eight_devices(sd_dir, ref8, tmp_path):
  """A process with 8 devices (batch 8 split 8 ways) against `ref8` (1 device, the same
  batch of 8, made in this process)."""
  n = 8
  wd = tmp_path / f"dev{n}"
  env = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={n}"),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", _MULTI.format(root=str(ROOT), n=n, wd=str(wd),
                                           model=str(sd_dir))],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == str(n)  # s["devices"]
  diff = _max_diff(ref8, _images(wd / "pool"))
  assert diff <= 1, diff


class _StubPipeline:
  """Returns NaN images for ids in `bad` when computing in bf16, good ones in float32."""
  name = "stub"

  def __init__(self, dtype=jnp.bfloat16, bad=("p1",), black=("p2",), ids=None):
    self.unet = type("U", (), {"dtype": dtype})()
    self.params = {}
    self.bad, self.black, self.dtype = set(bad), set(black), dtype
    self._ids = ids if ids is not None else []  # shared with the float32 copy

  def latent_shape(self, settings):
    del settings
    return (2, 2, 4)

  def tokenize(self, prompts):
    # Token row = [index of the prompt in a registry shared with the float32 copy]; the
    # stub's prompts are the image ids.
    for p in prompts:
      if p not in self._ids:
        self._ids.append(p)
    return np.asarray([[self._ids.index(p)] for p in prompts], np.int32)

  def with_dtype(self, dtype):
    return _StubPipeline(dtype, self.bad, self.black, self._ids)

  def sample_fn(self, settings):
    del settings
    def fn(params, ids, uncond, noise):
      del params, uncond
      out = np.full((len(noise), 4, 4, 3), 0.2, np.float32)
      for i, k in enumerate(np.asarray(ids)[:, 0]):
        name = self._ids[int(k)]
        if name in self.bad and self.dtype != jnp.float32:
          out[i] = np.nan
        if name in self.black:
          out[i] = -1.0
      return out
    return fn


@pytest.mark.parametrize("on_bad,kept,flags", [
    ("regenerate", 3, {"p1": None, "p2": "black"}), ("flag", 3, {"p1": "nan", "p2": "black"}),
    ("drop", 1, {})])
def test_bad_images(tmp_path, on_bad, kept, flags):
  rows = [{"id": f"p{i}", "class": "zero", "prompt": f"p{i}"} for i in range(3)]
  s = stage.generate_pool(_StubPipeline(), rows, tmp_path / "pool",
                          settings=diffusion.SampleSettings(), seed=0, batch_size=1,
                          shard_size=3, on_bad=on_bad, progress=False)
  pool = pool_lib.read_pool(tmp_path / "pool")
  assert len(pool.rows) == kept
  got = {r["id"]: r["extras"].get("flag") for r in pool.rows}
  for k, f in flags.items():
    assert got[k] == f
  assert s["black"] == 1
  assert s["nan"] == (0 if on_bad == "regenerate" else 1)
  assert s["regenerated"] == (2 if on_bad == "regenerate" else 0)


def test_bad_image_flags_and_uint8():
  imgs = np.stack([np.zeros((2, 2, 3)), np.full((2, 2, 3), -1.0), np.full((2, 2, 3), np.nan)])
  assert stage.bad_image_flags(imgs, 4) == [None, "black", "nan"]
  u = stage.to_uint8(np.array([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0], np.float32))
  np.testing.assert_array_equal(u, [0, 64, 128, 255, 255, 255])


def test_prompts_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="launch/attributes.py"):
    stage.read_prompts(tmp_path / "nope.jsonl")
  f = tmp_path / "p.jsonl"
  f.write_text('{"id": "a", "class": "x", "prompt": "p"}\n{"id": "a", "class": "x", '
               '"prompt": "q"}\n')
  with pytest.raises(ValueError, match=r"p\.jsonl:2: duplicate id 'a'"):
    stage.read_prompts(f)
  f.write_text('{"id": "a", "prompt": "p"}\n')
  with pytest.raises(ValueError, match=r"p\.jsonl:1.*class"):
    stage.read_prompts(f)


_TWO_PROCESSES = r"""
init()
from pathlib import Path
from tests.test_generate_stage import _config
from synthbandit_jax.generation import stage
wd = Path({wd!r})
s = stage.run_generation(_config(wd, Path({model!r}), batch_size=2, shard_size=2), wd,
                         progress=False)
emit({{k: s[k] for k in ("generated", "shards", "shards_written", "complete")}})
"""


def test_two_processes_split_the_shards_and_resume_per_host(sd_dir, ref8, tmp_path):
  """Two JAX processes (as two hosts) generate one pool: each writes its own shards, the
  pool has every id exactly once and the images of a single-process run (`ref8`; batches
  of 2 here, of 8 there: the same one-level float rounding allowance as between any two
  batchings); a host that lost a shard redoes only that shard."""
  from tests import multihost  # pylint: disable=import-outside-toplevel
  wd = tmp_path / "two"
  _write_prompts(wd, 8)
  script = _TWO_PROCESSES.format(wd=str(wd), model=str(sd_dir))
  # The resumed run loads the first run's compiled programs from the suite's compilation
  # cache (tests/conftest.py) instead of compiling them again (same program, same executable).
  out = multihost.run_processes(script, nproc=2, devices_per_process=1, timeout=300)
  # 4 shards: process p takes shards s % 2 == p.
  assert [o["shards_written"] for o in out] == [2, 2]
  assert [o["generated"] for o in out] == [4, 4]
  assert all(o["complete"] for o in out)
  rows = [json.loads(l) for l in (wd / "pool" / "metadata.jsonl").read_text().splitlines()]
  assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in _rows(8))  # no gap, no dup
  a, b = ref8, _images(wd / "pool")
  assert a.keys() == b.keys()
  assert max(int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a) <= 1
  # Process 1 "crashed" before finishing shard 3 (its metadata file marks it done).
  (wd / "pool" / "metadata" / "shard_00003.jsonl").unlink()
  (wd / "pool" / "metadata.jsonl").unlink()
  out = multihost.run_processes(script, nproc=2, devices_per_process=1, timeout=300)
  assert [o["shards_written"] for o in out] == [0, 1]
  assert all(o["complete"] for o in out)
  c = _images(wd / "pool")
  assert c.keys() == a.keys()
  assert max(int(np.abs(a[k].astype(int) - c[k].astype(int)).max()) for k in a) <= 1
