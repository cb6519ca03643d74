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
  cache = sorted(p.name for p in (tmp_path / "run" / "features").glob("*.npz"))
  assert [n.split("-")[1] for n in cache] == ["pool", "test", "train", "val"], cache

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
