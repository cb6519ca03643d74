"""Tests for VGG16 (models/vgg.py), its torchvision importer (weights/vgg_import.py) and
`features.vgg16_extractor`.

The reference is torchvision's vgg16 rebuilt from plain torch modules with the same attribute
paths and indices (torchvision itself is not installable here; when it is importable it is
compared too). Weights are random (He init, seeded), loaded into torch with
``load_state_dict(strict=True)``, so the key layout is checked as well.

Tolerances (float32, CPU): fc7 / logits max |ours - torch| <= 1e-4 * max |torch|; measured
here 3.1e-6 (uint8 28x28 -> 224x224 full path) and 3.1e-6 / 3.1e-6 (fc7 / logits, 64x96
preprocessed input). With Winograd layers (models/winograd.py) the same bound: measured
2.4e-6 at 224 px with the CPU default plan, 3.0e-6 / 3.8e-6 with every layer but the first by
F(2x2, 3x3) / F(4x4, 3x3). Preprocessing against ``F.interpolate(bilinear, align_corners=False,
antialias=...)`` + normalisation: max |ours - torch| <= 1e-4 * max |torch| (measured 2.3e-5
with antialias, 6.5e-5 without: torch computes its interpolation weights in float32, ours in
float64).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax.numpy as jnp

from synthbandit_jax import parallel
from synthbandit_jax.metrics import features as feat
from synthbandit_jax.models import vgg
from synthbandit_jax.weights import state_dict as sd_lib
from synthbandit_jax.weights import vgg_import
from tests import xla_flags

REPO = Path(__file__).resolve().parents[1]

REL_TOL = 1e-4
# Micro-batched vs whole-batch rows (same float32 math; XLA may sum a smaller batch's
# convolutions in another order): measured 1.3e-6 at 32x40 (0 at 224x224).
MICROBATCH_REL_TOL = 1e-5


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_state_dict(seed: int = 0, with_fc8: bool = True) -> dict[str, np.ndarray]:
  """A torchvision-named vgg16 state dict of He-initialised float32 numpy arrays."""
  rng = np.random.default_rng(seed)
  sd = {}
  c = 3
  for k, width in zip(vgg.CONV_INDICES, [v for v in vgg.VGG16_CFG if v != "M"]):
    std = float(np.sqrt(2.0 / (c * 9)))
    sd[f"features.{k}.weight"] = rng.standard_normal((width, c, 3, 3), np.float32) * std
    sd[f"features.{k}.bias"] = rng.standard_normal(width, np.float32) * 0.01
    c = width
  dims = [(25088, 4096), (4096, 4096)] + ([(4096, 1000)] if with_fc8 else [])
  for k, (i, o) in zip(vgg.FC_INDICES, dims):
    sd[f"classifier.{k}.weight"] = rng.standard_normal((o, i), np.float32) * float(np.sqrt(2.0 / i))
    sd[f"classifier.{k}.bias"] = rng.standard_normal(o, np.float32) * 0.01
  return sd


def _torch_vgg16():
  """torchvision.models.vgg16's module tree from plain torch modules (eval mode)."""
  torch = pytest.importorskip("torch")
  nn = torch.nn
  layers, c = [], 3
  for v in vgg.VGG16_CFG:
    if v == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      c = v

  class VGG(nn.Module):

    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(*layers)
      self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
      self.classifier = nn.Sequential(
          nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
          nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=0.5), nn.Linear(4096, 1000))

    def forward(self, x):
      return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

  return VGG().eval()


def _torch_fc7_and_logits(model, x_nchw: np.ndarray):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    h = torch.flatten(model.avgpool(model.features(torch.from_numpy(x_nchw))), 1)
    return model.classifier[:5](h).numpy(), model.classifier(h).numpy()


def _torch_preprocess(images: np.ndarray, antialias: bool, float_input: bool = False,
                      size: int = 224):
  """torch reference of vgg.preprocess: NHWC (uint8 or [0,1] float) -> NCHW float32."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  x = x[:, :3]
  if not float_input:
    x = x / 255.0
  if tuple(x.shape[2:]) != (size, size):
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                      antialias=antialias)
  mean = torch.tensor(vgg.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(vgg.IMAGENET_STD).view(1, 3, 1, 1)
  return ((x - mean) / std).numpy()


@pytest.fixture(scope="module")
def state_dict():
  return random_state_dict(0)


@pytest.fixture(scope="module")
def torch_model(state_dict):
  torch = pytest.importorskip("torch")
  model = _torch_vgg16()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return model


@pytest.fixture(scope="module")
def params(state_dict):
  return vgg_import.params_from_torchvision(state_dict)


# --------------------------------------------------------------------------
# Architecture and import.
# --------------------------------------------------------------------------


def test_param_tree_matches_torchvision_layout():
  shapes = vgg.param_shapes(with_logits=True)
  assert vgg.CONV_INDICES == (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
  assert shapes["features_0"]["kernel"] == (3, 3, 3, 64)
  assert shapes["features_28"]["kernel"] == (3, 3, 512, 512)
  assert shapes["classifier_0"]["kernel"] == (25088, 4096)
  assert shapes["classifier_3"]["kernel"] == (4096, 4096)
  assert shapes["classifier_6"]["kernel"] == (4096, 1000)
  assert vgg.num_params(with_logits=True) == 138_357_544  # torchvision's count


def test_import_layout_and_fc8_handling(state_dict, params):
  np.testing.assert_array_equal(params["features_5"]["kernel"],
                                state_dict["features.5.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["classifier_3"]["kernel"],
                                state_dict["classifier.3.weight"].T)
  np.testing.assert_array_equal(params["classifier_0"]["bias"], state_dict["classifier.0.bias"])
  assert "classifier_6" in params
  no_fc8 = vgg_import.params_from_torchvision(state_dict, with_logits=False)
  assert "classifier_6" not in no_fc8
  # The inverse gives the torch tensors back.
  back = vgg_import.to_torchvision(params)
  assert set(back) == set(state_dict)
  np.testing.assert_array_equal(back["features.28.weight"], state_dict["features.28.weight"])


def test_import_errors_name_the_parameter(state_dict):
  sd = dict(state_dict)
  sd["features.5.weight"] = np.zeros((128, 64, 5, 5), np.float32)
  with pytest.raises(sd_lib.WeightsError, match=r"features\.5\.weight.*\(5, 5, 64, 128\).*"
                     r"\(3, 3, 64, 128\)"):
    vgg_import.params_from_torchvision(sd, where="my.pth")
  sd = {k: v for k, v in state_dict.items() if k != "classifier.3.bias"}
  with pytest.raises(sd_lib.WeightsError, match=r"my\.pth.*classifier_3/bias"):
    vgg_import.params_from_torchvision(sd, where="my.pth")
  sd = dict(state_dict, **{"features.1.running_mean": np.zeros(64, np.float32)})
  with pytest.raises(sd_lib.WeightsError, match=r"features\.1\.running_mean.*vgg16_bn"):
    vgg_import.params_from_torchvision(sd)
  sd = {k: v for k, v in state_dict.items() if not k.startswith("classifier.6")}
  with pytest.raises(sd_lib.WeightsError, match=r"classifier_6/(bias|kernel)"):
    vgg_import.params_from_torchvision(sd, with_logits=True)


def test_load_pth_then_cache_without_torch(tmp_path, state_dict, monkeypatch):
  torch = pytest.importorskip("torch")
  pth = tmp_path / "vgg16.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pth)
  p1 = vgg_import.cached_vgg16_params(pth, cache_dir=tmp_path / "cache")
  cache = vgg_import.cache_path(pth, tmp_path / "cache")
  assert cache.is_file() and cache.parent == tmp_path / "cache" / "flax"

  def no_torch(path):
    raise AssertionError(f"torch pickle {path} read again despite the cache")

  monkeypatch.setattr(sd_lib, "read_torch_bin", no_torch)
  p2 = vgg_import.cached_vgg16_params(pth, cache_dir=tmp_path / "cache")
  np.testing.assert_array_equal(p1["features_0"]["kernel"], p2["features_0"]["kernel"])
  np.testing.assert_array_equal(p2["classifier_6"]["bias"], state_dict["classifier.6.bias"])
  with pytest.raises(FileNotFoundError, match=r"missing\.pth.*IMAGENET1K_V1"):
    vgg_import.cached_vgg16_params(tmp_path / "missing.pth")


def test_load_safetensors(tmp_path, state_dict):
  sd = {k: v for k, v in state_dict.items() if not k.startswith("classifier.6")}
  path = sd_lib.write_safetensors(tmp_path / "vgg16.safetensors", sd)
  p = vgg_import.cached_vgg16_params(path, cache_dir=tmp_path / "cache")
  assert "classifier_6" not in p
  assert not (tmp_path / "cache").exists()  # safetensors files need no cache
  np.testing.assert_array_equal(p["classifier_0"]["kernel"], sd["classifier.0.weight"].T)
  del p
  with pytest.raises(sd_lib.WeightsError, match=r"unknown suffix '\.npz'"):
    (tmp_path / "w.npz").write_bytes(b"x")
    vgg_import.load_vgg16(tmp_path / "w.npz")


# --------------------------------------------------------------------------
# Pooling and preprocessing against torch.
# --------------------------------------------------------------------------


def test_adaptive_pool_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  for h, w in [(7, 7), (1, 1), (2, 3), (5, 9), (10, 14), (13, 6)]:
    x = rng.normal(size=(2, h, w, 4)).astype(np.float32)
    ref = torch.nn.AdaptiveAvgPool2d((7, 7))(torch.from_numpy(x).permute(0, 3, 1, 2))
    got = np.asarray(vgg.adaptive_avg_pool(jnp.asarray(x)))
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("antialias", [True, False])
def test_preprocess_matches_torch_interpolate(antialias):
  pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  cases = [(8, 8, 1), (28, 28, 3), (512, 512, 3), (300, 150, 4), (224, 224, 3), (225, 700, 3)]
  for h, w, c in cases:
    u = rng.integers(0, 256, (2, h, w, c), dtype=np.uint8)
    ref = _torch_preprocess(u, antialias).transpose(0, 2, 3, 1)
    got = np.asarray(vgg.preprocess(u, antialias=antialias))
    assert got.shape == (2, 224, 224, 3)
    assert _rel_err(got, ref) < REL_TOL, (h, w, c, _rel_err(got, ref))
  # Float input in [0, 1] and grayscale without a channel axis.
  f = rng.uniform(size=(1, 40, 60, 3)).astype(np.float32)
  ref = _torch_preprocess(f, antialias, float_input=True).transpose(0, 2, 3, 1)
  assert _rel_err(vgg.preprocess(f, antialias=antialias), ref) < REL_TOL
  g = rng.integers(0, 256, (1, 20, 20), dtype=np.uint8)
  np.testing.assert_array_equal(vgg.preprocess(g), vgg.preprocess(g[..., None]))


def test_antialias_matters_when_downscaling():
  # A 1-pixel checkerboard: plain bilinear at 512 -> 224 aliases, the antialiased filter
  # averages it to (nearly) flat grey.
  x = ((np.indices((512, 512)).sum(0) % 2) * 255).astype(np.uint8)[None, ..., None]
  aa = np.asarray(vgg.resize_bilinear(jnp.asarray(x, jnp.float32), 224, antialias=True))
  plain = np.asarray(vgg.resize_bilinear(jnp.asarray(x, jnp.float32), 224, antialias=False))
  assert aa.std() < 0.1 * plain.std()
  with pytest.raises(ValueError, match="uint8"):
    vgg.preprocess(np.zeros((1, 8, 8, 3), np.int32))


# --------------------------------------------------------------------------
# Network parity.
# --------------------------------------------------------------------------


def test_fc7_matches_torch_on_small_preprocessed_input(params, torch_model):
  """64x96 input: a 2x3 last map, so adaptive pooling (overlapping windows) is exercised."""
  x = np.random.default_rng(2).normal(size=(1, 3, 64, 96)).astype(np.float32)
  fc7_ref, logits_ref = _torch_fc7_and_logits(torch_model, x)
  out = vgg.VGG16(with_logits=True).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                          preprocessed=True)
  assert out["fc7"].shape == (1, 4096) and out["fc7"].dtype == jnp.float32
  assert (fc7_ref > 0).mean() > 0.2  # He init keeps activations alive: the test has teeth
  assert _rel_err(out["fc7"], fc7_ref) < REL_TOL
  assert _rel_err(out["logits"], logits_ref) < REL_TOL
  with pytest.raises(ValueError, match="at least 32x32"):
    vgg.VGG16().apply({"params": params}, jnp.zeros((1, 16, 16, 3)), preprocessed=True)


@pytest.mark.parametrize("m", (2, 4))
def test_winograd_layers_match_torch(params, torch_model, m):
  """Every conv layer but the 3-channel first one by Winograd F(m x m, 3x3) (a plan the
  default never picks, so both tile sizes meet every width): fc7 / logits still within
  REL_TOL of torch, and the params are untouched."""
  x = np.random.default_rng(2).normal(size=(1, 3, 64, 96)).astype(np.float32)
  fc7_ref, logits_ref = _torch_fc7_and_logits(torch_model, x)
  plan = {f"features_{k}": m for k in vgg.CONV_INDICES[1:]}
  variables = {"params": params, vgg.WINOGRAD_COLLECTION: vgg.winograd_kernels(params, plan)}
  assert variables["winograd"]["features_2"].shape == ((m + 2) ** 2, 64, 64)
  out = vgg.VGG16(with_logits=True).apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                          preprocessed=True)
  assert _rel_err(out["fc7"], fc7_ref) < REL_TOL
  assert _rel_err(out["logits"], logits_ref) < REL_TOL


@pytest.mark.parametrize("winograd", (None, False))
def test_extractor_full_224_path_matches_torch(params, torch_model, winograd):
  """uint8 grayscale 28x28 -> extractor (resize + normalise + VGG16) vs torch, with the CPU
  default (None: Winograd's 14-56 px layers) and with direct convolutions only."""
  img = np.random.default_rng(3).integers(0, 256, (1, 28, 28, 1), dtype=np.uint8)
  fc7_ref, _ = _torch_fc7_and_logits(torch_model, _torch_preprocess(img, antialias=True))
  ext = feat.vgg16_extractor(params, batch_size=1, mesh=parallel.make_mesh(1),
                             winograd=winograd)
  out = ext(img)
  assert set(out) == {"vgg_fc7"} and out["vgg_fc7"].shape == (1, 4096)
  assert _rel_err(out["vgg_fc7"], fc7_ref) < REL_TOL
  assert "vgg16" in ext.name and "antialias=True" in ext.name
  # on CPU in float32 the default is Winograd, and the name (feature cache key) says so
  assert ("conv=winograd" in ext.name) == (winograd is None)


def test_extractor_winograd_needs_float32(params):
  with pytest.raises(ValueError, match="winograd=True needs dtype float32, got bfloat16"):
    feat.vgg16_extractor(params, dtype=jnp.bfloat16, winograd=True, mesh=parallel.make_mesh(1))
  ext = feat.vgg16_extractor(params, dtype=jnp.bfloat16, mesh=parallel.make_mesh(1))
  assert "conv=winograd" not in ext.name  # the default leaves bf16 direct


def test_extractor_input_size_matches_torch_at_that_size(params, torch_model):
  """input_size=64: torch resizes to 64x64 (a 2x2 last map, adaptive-pooled to 7x7)."""
  img = np.random.default_rng(5).integers(0, 256, (2, 28, 40, 3), dtype=np.uint8)
  fc7_ref, _ = _torch_fc7_and_logits(torch_model, _torch_preprocess(img, True, size=64))
  ext = feat.vgg16_extractor(params, batch_size=2, mesh=parallel.make_mesh(1), input_size=64)
  assert "size=64," in ext.name
  assert _rel_err(ext(img)["vgg_fc7"], fc7_ref) < REL_TOL
  with pytest.raises(ValueError, match="input_size=31: VGG16 needs >= 32"):
    feat.vgg16_extractor(params, input_size=31)
  with pytest.raises(ValueError, match="input_size=16: needs >= 32"):
    vgg.VGG16(input_size=16).apply({"params": params}, jnp.asarray(img))


def test_torchvision_vgg16_if_available(state_dict, torch_model):
  torch = pytest.importorskip("torch")
  tv = pytest.importorskip("torchvision")
  model = tv.models.vgg16(weights=None).eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  x = np.random.default_rng(4).normal(size=(1, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    h = torch.flatten(model.avgpool(model.features(torch.from_numpy(x))), 1)
    fc7_tv = model.classifier[:5](h).numpy()
  fc7_ref, _ = _torch_fc7_and_logits(torch_model, x)
  np.testing.assert_allclose(fc7_tv, fc7_ref, rtol=0, atol=1e-6 * np.abs(fc7_ref).max())


def test_extractor_arguments(params):
  mesh = parallel.make_mesh(1)
  with pytest.raises(ValueError, match="exactly one of params="):
    feat.vgg16_extractor(mesh=mesh)
  with pytest.raises(ValueError, match=r"unknown \['fc6'\]"):
    feat.vgg16_extractor(params, taps=("fc6",), mesh=mesh)
  no_fc8 = {k: v for k, v in params.items() if k != "classifier_6"}
  with pytest.raises(ValueError, match="classifier_6"):
    feat.vgg16_extractor(no_fc8, taps=("vgg_fc7", "vgg_logits"), mesh=mesh)
  ext = feat.vgg16_extractor(params, batch_size=2, mesh=mesh, taps=("vgg_fc7", "vgg_logits"))
  assert ext.feature_dims((28, 28, 1)) == {"vgg_fc7": 4096, "vgg_logits": 1000}


def test_microbatched_conv_stack_gives_the_same_rows(params, torch_model):
  """`vgg.apply_microbatched` (the CPU extractor's default path) against the whole batch at
  once (within MICROBATCH_REL_TOL) and against torch: 4 different images, micro-batches of
  1 and 3 (lowered to 2, the largest divisor of 4) in one block, and of 1 in 2 device
  blocks. Rows must stay in order, so each row is checked against its own image's
  reference."""
  import jax  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(6).normal(size=(4, 3, 32, 40)).astype(np.float32)
  fc7_ref, _ = _torch_fc7_and_logits(torch_model, x)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  model, variables = vgg.VGG16(), {"params": {k: v for k, v in params.items()
                                              if k != "classifier_6"}}
  whole = np.asarray(model.apply(variables, xj, preprocessed=True)["fc7"])
  assert _rel_err(whole, fc7_ref) < REL_TOL
  for microbatch, shards in ((1, 1), (3, 1), (1, 2)):
    run = jax.jit(lambda v, t, m=microbatch, s=shards: vgg.apply_microbatched(
        model, v, t, microbatch=m, shards=s, preprocessed=True))
    assert "scan[" in str(jax.make_jaxpr(run)(variables, xj))  # the loop path is taken
    got = np.asarray(run(variables, xj)["fc7"])
    for i in range(4):
      assert _rel_err(got[i], whole[i]) < MICROBATCH_REL_TOL, (microbatch, shards, i)
  # 4 rows in 2 blocks of 2: a micro-batch of 2 is one step, as is 0: no loop.
  for microbatch in (2, 0):
    one_step = jax.make_jaxpr(lambda v, t, m=microbatch: vgg.apply_microbatched(
        model, v, t, microbatch=m, shards=2, preprocessed=True))(variables, xj)
    assert "scan[" not in str(one_step)
  ext = feat.vgg16_extractor(params, batch_size=4, mesh=parallel.make_mesh(1), input_size=32,
                             microbatch=1)
  img = np.random.default_rng(7).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  ref, _ = _torch_fc7_and_logits(torch_model, _torch_preprocess(img, True, size=32))
  assert _rel_err(ext(img)["vgg_fc7"], ref) < REL_TOL
  with pytest.raises(ValueError, match="microbatch=-1: needs >= 0"):
    feat.vgg16_extractor(params, microbatch=-1, mesh=parallel.make_mesh(1))


_TWO_DEVICE_SCRIPT = """
import sys
import numpy as np, jax, jax.numpy as jnp
from synthbandit_jax import parallel
from synthbandit_jax.metrics import features as feat
from synthbandit_jax.models import vgg
from synthbandit_jax.weights import vgg_import
from tests.test_vgg import random_state_dict
assert jax.local_device_count() == 2, jax.local_devices()
params = vgg_import.params_from_torchvision(random_state_dict(0), with_logits=False)
images = np.random.default_rng(8).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
ext = feat.vgg16_extractor(params, batch_size=4, input_size=32, microbatch=1)
fc7 = feat.extract_arrays(ext, images)["vgg_fc7"]
mesh = parallel.make_mesh()
x = jax.device_put(jnp.asarray(images), parallel.batch_sharded(mesh))
p = jax.device_put(params, parallel.replicated(mesh))
gathers = []
for shards in (2, 1):
  f = jax.jit(lambda p, x, s=shards: vgg.apply_microbatched(
      vgg.VGG16(input_size=32), {"params": p}, x, microbatch=1, shards=s))
  gathers.append("all-gather" in f.lower(p, x).compile().as_text())
np.savez(sys.argv[1], fc7=fc7, images=images, gathers=np.array(gathers))
"""


def test_microbatches_over_two_devices_stay_local(params, tmp_path):
  """2 CPU devices, batch 4 (2 rows each), micro-batches of 1: the extractor's rows equal the
  whole batch on one device (within MICROBATCH_REL_TOL), and with ``shards`` = the device
  count the compiled program gathers nothing across devices (with ``shards=1`` the same loop
  over a sharded batch does: the check can fail)."""
  out = tmp_path / "two.npz"
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT, str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stdout + res.stderr
  got = np.load(out)
  no_fc8 = {k: v for k, v in params.items() if k != "classifier_6"}
  whole = vgg.VGG16(input_size=32).apply({"params": no_fc8}, jnp.asarray(got["images"]))["fc7"]
  assert _rel_err(got["fc7"], whole) < MICROBATCH_REL_TOL
  assert got["gathers"].tolist() == [False, True]
