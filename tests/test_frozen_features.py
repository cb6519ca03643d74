"""Frozen pretrained backbone + new head (model.features): features once, head trained on them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from synthbandit_jax.metrics import features as features_lib
from synthbandit_jax.models import classifiers
from synthbandit_jax.training import epoch as epoch_lib
from synthbandit_jax.training import frozen_features as ff
from synthbandit_jax.training import trainer


def _config(**model):
  c = tiny.get_config()
  c.data.max_per_class = 30          # 300 digits: 60 val, 60 test, 90 held out, 90 train
  c.pool.kinds = "clean,noise"
  c.pool.severities = "1"
  c.train.modes = "real,bandit"
  c.train.epochs = 6
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-2
  c.score.batch_size = 16
  for k, v in model.items():
    c.model[k] = v
  return c


def test_config_errors_name_the_keys():
  with pytest.raises(ValueError, match="model.features"):
    ff.check_model_features("linear_head", "")
  with pytest.raises(ValueError, match="small_cnn"):
    ff.check_model_features("small_cnn", "inception_2048")
  with pytest.raises(ValueError, match="unknown"):
    ff.check_model_features("linear_head", "inception_999")
  ff.check_model_features("small_cnn", "")
  ff.check_model_features("mlp_head", "inception_768")
  head = classifiers.build_classifier("linear_head", 3)
  with pytest.raises(ValueError, match="feature vectors"):
    head.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))


def test_float_banks_are_used_as_they_are():
  x = jnp.asarray([[0.5, 300.0]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(epoch_lib.to_float(x)), np.asarray(x))
  u = jnp.asarray([[0, 255]], jnp.uint8)
  np.testing.assert_allclose(np.asarray(epoch_lib.to_float(u)), [[0.0, 1.0]])


def test_extractor_is_the_fid_inception_tap():
  c = _config()
  ext = ff._extractor(c, "inception_768")  # pylint: disable=protected-access
  assert ext.name.startswith("inception_v3_fid(taps=mixed_6e_768,")
  assert ext.feature_dims((8, 8, 1)) == {"mixed_6e_768": 768}
  c.model.features_size = 96
  small = ff._extractor(c, "inception_2048")  # pylint: disable=protected-access
  assert "input_size=96" in small.name and small.fingerprint != ext.fingerprint
  feats = features_lib.extract_arrays(small, np.zeros((2, 8, 8, 1), np.uint8))
  assert feats["pool_2048"].shape == (2, 2048) and np.isfinite(feats["pool_2048"]).all()
  c.model.features_size = 60
  with pytest.raises(ValueError, match="75"):
    ff._extractor(c, "inception_2048")  # pylint: disable=protected-access


def _pixel_extractor(config, features):
  """A cheap stand-in for the FID Inception (which runs at ~2-10 images/s on this CPU): the
  flattened pixels in [0, 1], returned under the configured tap's name."""
  del config
  tap = ff.FEATURES[features]
  return features_lib.FeatureExtractor(
      lambda p, x: {tap: x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0}, {},
      batch_size=16, name=f"pixels-as-{tap}")


def test_head_on_frozen_features_trains_and_reuses_the_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(ff, "_extractor", _pixel_extractor)
  c = _config(name="linear_head", features="inception_2048")
  out = trainer.run(c, tmp_path / "run", progress=False)
  # One store (tap + network) with a shard per split that had new images; the controlled
  # pool's clean copies are the held-out images themselves, but no image is stored twice.
  stores = list((tmp_path / "run" / "features").iterdir())
  assert len(stores) == 1 and stores[0].name.startswith("pool_2048-"), stores
  keys = np.concatenate([np.load(f)["keys"] for f in stores[0].glob("*.npz")])
  assert len(keys) == len(set(keys.tolist()))

  # The bank / val / test the head trained on are the extractor's features of the images.
  inputs = trainer.inputs_lib.prepare_inputs(c, tmp_path / "run", progress=False)
  fed = ff.feature_inputs(c, inputs, tmp_path / "run" / "features", progress=False)
  # (XLA computes x / 255 as x * (1/255): equal to numpy's division within one float32 ulp.)
  pixels = lambda x: x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)
  for split in ("val", "test"):
    np.testing.assert_allclose(fed.eval_features[split], pixels(getattr(inputs, split).images),
                               rtol=1.2e-7, atol=0)
  np.testing.assert_allclose(fed.bank_images, pixels(inputs.bank_images), rtol=1.2e-7, atol=0)
  assert fed.bank_images.dtype == np.float32
  assert fed.bank_labels is inputs.bank_labels

  # 10 digit classes, chance 0.1; a linear head on the 64 pixels (logistic regression)
  # gets far above it (observed: linear head 0.77 real-only, 0.70 bandit; MLP head 0.88).
  real = out["runs"]["real"]
  assert real["test_accuracy"] >= 0.5, (real["test_accuracy"], real["epochs"])
  assert out["runs"]["bandit"]["epochs_completed"] == c.train.epochs

  # A second run (an MLP head, same data) in another workdir reads every feature from the
  # first run's cache.
  def fail(*a, **k):
    raise AssertionError("features recomputed despite a valid cache")
  monkeypatch.setattr(features_lib, "extract_arrays", fail)
  c2 = _config(name="mlp_head", features="inception_2048")
  c2.model.features_cache = str(tmp_path / "run" / "features")
  c2.train.modes = "real"
  out2 = trainer.run(c2, tmp_path / "run2", progress=False)
  assert out2["runs"]["real"]["test_accuracy"] >= 0.5, out2["runs"]["real"]["test_accuracy"]


def test_per_image_cache_computes_each_image_once(tmp_path, monkeypatch):
  ext = _pixel_extractor(None, "inception_2048")
  real_extract = features_lib.extract_arrays
  computed = []

  def counting(extractor, images, **kw):
    computed.append(len(images))
    return real_extract(extractor, images, **kw)
  monkeypatch.setattr(features_lib, "extract_arrays", counting)
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
  b = rng.integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
  x = np.concatenate([a, a[:2]])                      # duplicates within one call
  fx = ff.cached_features(ext, "pool_2048", x, tmp_path)
  np.testing.assert_allclose(fx, x.reshape(7, -1) / np.float32(255.0), rtol=1.2e-7, atol=0)
  y = np.concatenate([b, a[3:]])                      # 3 new images + 2 cached ones
  fy = ff.cached_features(ext, "pool_2048", y, tmp_path)
  np.testing.assert_allclose(fy, y.reshape(5, -1) / np.float32(255.0), rtol=1.2e-7, atol=0)
  assert computed == [5, 3]
  ff.cached_features(ext, "pool_2048", np.concatenate([b, a]), tmp_path)
  assert computed == [5, 3]                            # all cached now
  # Broken shards are reported and ignored (their images are recomputed), never fatal.
  for shard in tmp_path.glob("pool_2048-*/*.npz"):
    shard.write_bytes(b"not an npz")
  fa = ff.cached_features(ext, "pool_2048", a, tmp_path)
  assert computed == [5, 3, 5]
  np.testing.assert_allclose(fa, a.reshape(5, -1) / np.float32(255.0), rtol=1.2e-7, atol=0)


def test_processes_extract_their_share_and_all_get_every_row():
  """Three processes as on three hosts (simulated: the gather hands each process the pieces
  all three computed): each extracts only every third image, and each gets all rows back
  in order, equal to one process's features."""
  ext = _pixel_extractor(None, "inception_2048")
  images = np.random.default_rng(1).integers(0, 256, (7, 4, 4, 1), dtype=np.uint8)
  want = images.reshape(7, -1) / np.float32(255.0)
  seen = []
  real_extract = features_lib.extract_arrays

  def counting(extractor, imgs, **kw):
    seen.append(len(imgs))
    return real_extract(extractor, imgs, **kw)

  # What process p computes: images p, p + 3, ...
  pieces = [real_extract(ext, images[p::3])["pool_2048"] for p in range(3)]

  def gather(part, pi):
    np.testing.assert_array_equal(part, pieces[pi])  # this process's own share
    return pieces

  for pi in range(3):
    out = ff._extract_shared(ext, "pool_2048", images, progress=False,  # pylint: disable=protected-access
                             process_index=pi, process_count=3,
                             gather=lambda x, pi=pi: gather(x, pi))
    np.testing.assert_allclose(out, want, rtol=1.2e-7, atol=0)
  import unittest.mock  # pylint: disable=import-outside-toplevel
  with unittest.mock.patch.object(features_lib, "extract_arrays", counting):
    ff._extract_shared(ext, "pool_2048", images, progress=False, process_index=1,  # pylint: disable=protected-access
                       process_count=3, gather=lambda x: pieces)
  assert seen == [2]  # this process extracted its own two images only


def test_nonfinite_features_raise_naming_the_rows(tmp_path):
  ext = features_lib.FeatureExtractor(
      lambda p, x: {"pool_2048": jnp.where(x.reshape(x.shape[0], -1) > 250, jnp.nan, 1.0)},
      {}, batch_size=4, name="nan-for-bright")
  images = np.random.default_rng(2).integers(0, 200, (5, 2, 2, 1), dtype=np.uint8)
  images[3, 0, 0, 0] = 255
  with pytest.raises(ValueError, match=r"pool_2048: 1 of 5 new images have non-finite "
                                       r"features \(input rows \[3\]\)"):
    ff.cached_features(ext, "pool_2048", images, tmp_path)
  assert not list(tmp_path.glob("*/*.npz"))  # nothing cached
