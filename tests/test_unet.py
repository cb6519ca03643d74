"""Tests for models/unet.py: Flax UNet2DConditionModel vs diffusers' PyTorch UNet2DConditionModel.

Reference: tiny diffusers models built locally (random weights, every parameter perturbed so
that zero-initialised layers cannot hide a bug), float32 on CPU. Parity tolerance: relative
error ||ours - ref|| / ||ref|| < 1e-4 (observed ~1e-6). Cases:

* sd1: attention_head_dim 8 (= 8 heads, diffusers' naming quirk), 1x1 conv projections.
* sd2: attention_head_dim (2, 4) per block, use_linear_projection, upcast_attention.
* deep3: three blocks, per-block lists layers_per_block (2, 1, 1) and
  transformer_layers_per_block (2, 1, 2) (the mid block takes the last entry, the up blocks the
  reversed list), downsample_padding 0, flip_sin_to_cos False, freq_shift 1,
  center_input_sample, mid_block_scale_factor 2.

Timestep forms: the parity cases use an int (B,) vector (sd1), a Python float scalar (sd2) and a
fractional float (B,) vector (deep3); test_timestep_forms adds an int scalar and compares the
three forms on sd2. (Each (case, form, dtype) is a separate jit compilation, ~4-8 s on 2 CPU
cores, so the file spends them sparingly: sd2's float scalar comes from its parity case and
its int (B,) vector is shared by the forms, save/load and bf16 tests.)
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthbandit_jax.models import unet
from synthbandit_jax.weights import state_dict as sdw

_HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))
pytestmark = pytest.mark.skipif(not _HAVE_TORCH, reason="needs torch and diffusers")

REL_TOL = 1e-4  # fp32 relative L2 error vs diffusers
BF16_TOL = 5e-2  # bf16 compute vs the fp32 reference (relative L2)

_BASE = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
             layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CASES = {
    "sd1": dict(_BASE, attention_head_dim=8),
    "sd2": dict(_BASE, attention_head_dim=(2, 4), use_linear_projection=True,
                upcast_attention=True),
    "deep3": dict(_BASE, block_out_channels=(16, 32, 32), layers_per_block=(2, 1, 1),
                  transformer_layers_per_block=(2, 1, 2), attention_head_dim=(2, 4, 4),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                  center_input_sample=True, mid_block_scale_factor=2.0),
}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.lru_cache(maxsize=None)
def _torch_model(case: str):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel as TorchUNet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = TorchUNet(**CASES[case]).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, sd


@functools.lru_cache(maxsize=None)
def _ours(case: str):
  model, sd = _torch_model(case)
  config = unet.config_from_diffusers(dict(model.config))
  return config, unet.params_from_torch(config, sd)


@functools.lru_cache(maxsize=None)
def _forward(config: unet.UNetConfig, dtype=jnp.float32):
  return jax.jit(unet.UNet2DConditionModel(config, dtype=dtype).apply)


def _inputs(batch: int = 2, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 16, 16, 4)).astype(np.float32)  # NHWC
  ctx = rng.standard_normal((batch, 7, 16)).astype(np.float32)
  return x, ctx


def _reference(case: str, x, t, ctx) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  model, _ = _torch_model(case)
  tt = torch.from_numpy(np.asarray(t)) if isinstance(t, np.ndarray) else t
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), tt, torch.from_numpy(ctx)).sample
  return out.numpy().transpose(0, 2, 3, 1)


_PARITY_T = {"sd1": np.array([10, 731]), "sd2": 731.0, "deep3": np.array([3.5, 999.25], np.float32)}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case):
  config, params = _ours(case)
  x, ctx = _inputs()
  t = _PARITY_T[case]
  ref = _reference(case, x, t, ctx)
  out = np.asarray(_forward(config)({"params": params}, x, t, ctx))
  err = _rel(out, ref)
  print(f"{case}: rel L2 error {err:.2e}, max abs {np.abs(out - ref).max():.2e} "
        f"(ref max {np.abs(ref).max():.2f})")
  assert out.shape == ref.shape == (2, 16, 16, 4)
  assert err < REL_TOL


def test_timestep_forms():
  """int scalar == float scalar == (B,) int vector of the same value, each == diffusers; the
  timestep changes the output. On sd2, whose float-scalar trace is the parity test's and whose
  int-vector trace the load/save and bf16 tests reuse: one new compilation (the int scalar)."""
  config, params = _ours("sd2")
  x, ctx = _inputs()
  fwd = _forward(config)
  p = {"params": params}
  t_int = np.asarray(fwd(p, x, 500, ctx))
  t_float = np.asarray(fwd(p, x, 500.0, ctx))  # same trace as the sd2 parity test
  t_vec = np.asarray(fwd(p, x, np.array([500, 500]), ctx))
  np.testing.assert_allclose(t_int, t_float, rtol=0, atol=1e-6)
  np.testing.assert_allclose(t_int, t_vec, rtol=0, atol=1e-6)
  err = _rel(t_int, _reference("sd2", x, 500, ctx))
  print(f"int scalar timestep: rel L2 error {err:.2e}")
  assert err < REL_TOL
  other = np.asarray(fwd(p, x, np.array([500, 20]), ctx))
  np.testing.assert_allclose(other[0], t_int[0], rtol=0, atol=1e-6)
  assert _rel(other[1], t_int[1]) > 1e-3


def test_timestep_embedding_matches_diffusers():
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers.models import embeddings  # pylint: disable=g-import-not-at-top
  t = np.array([0, 1, 17, 999], np.int64)
  for dim, flip, shift in ((32, True, 0), (33, False, 1)):
    ref = embeddings.get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                 downscale_freq_shift=shift).numpy()
    out = np.asarray(unet.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip,
                                             downscale_freq_shift=shift))
    assert out.dtype == np.float32 and out.shape == ref.shape
    # float32 sin/cos of t * freq with t up to 999: one ulp of freq moves the angle ~6e-5.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_round_trip_state_dict():
  config, params = _ours("sd2")
  _, sd = _torch_model("sd2")
  back = unet.state_dict_from_params(config, params)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  bad = jax.tree.map(lambda a: a, params)
  bad["conv_in"]["kernel"] = bad["conv_in"]["kernel"][..., :-1]
  with pytest.raises(sdw.WeightsError, match="conv_in/kernel"):
    unet.state_dict_from_params(config, bad)


def test_load_save_pretrained_dir(tmp_path):
  model, _ = _torch_model("sd2")
  model.save_pretrained(tmp_path, safe_serialization=True)
  assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
  module, params, config = unet.load(tmp_path)
  ref_config, ref_params = _ours("sd2")
  assert config == ref_config
  assert module == unet.UNet2DConditionModel(ref_config)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  x, ctx = _inputs(seed=3)
  t = np.array([250, 250])
  out = np.asarray(_forward(config)({"params": params}, x, t, ctx))
  assert _rel(out, _reference("sd2", x, t, ctx)) < REL_TOL
  module16, _, _ = unet.load(tmp_path, dtype=jnp.bfloat16)
  assert module16.dtype == jnp.bfloat16


def test_load_rejects_other_class(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
  with pytest.raises(ValueError, match="AutoencoderKL"):
    unet.load(tmp_path)


def test_shape_mismatch_names_parameter():
  config, _ = _ours("sd1")
  _, sd = _torch_model("sd1")
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  bad = dict(sd)
  bad[name] = sd[name][:, :-1]
  with pytest.raises(sdw.WeightsError, match=name.replace(".", r"\.")):
    unet.params_from_torch(config, bad, where="tiny-unet")
  missing = {k: v for k, v in sd.items() if k != "mid_block.resnets.1.conv1.weight"}
  with pytest.raises(sdw.WeightsError, match="tiny-unet.*mid_block/resnets_1/conv1/kernel"):
    unet.params_from_torch(config, missing, where="tiny-unet")
  # The SD2 (linear projection) layout does not load into the SD1 (1x1 conv) model.
  sd2_config, _ = _ours("sd2")
  with pytest.raises(sdw.WeightsError, match="proj_in"):
    unet.params_from_torch(dataclasses.replace(sd2_config, use_linear_projection=False),
                           _torch_model("sd2")[1])


@pytest.mark.parametrize("key,value", [
    ("addition_embed_type", "text_time"),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("time_cond_proj_dim", 256),
    ("dual_cross_attention", True),
    ("only_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("attention_type", "gated"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("act_fn", "gelu"),
    ("encoder_hid_dim", 32),
])
def test_unsupported_config_names_key(key, value):
  cfg = dict(CASES["sd1"], **{key: value})
  with pytest.raises(ValueError, match=key) as info:
    unet.config_from_diffusers(cfg)
  assert str(value if not isinstance(value, list) else value[0]) in str(info.value)


def test_head_count_rule_and_real_sd_configs():
  """SD configs store the number of heads in attention_head_dim (diffusers' rule
  ``heads = num_attention_heads or attention_head_dim``); full-size param counts match
  diffusers' meta-device models for SD 1.5 and SD 2.1 layouts."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel as TorchUNet  # pylint: disable=g-import-not-at-top
  sd15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
  sd21 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
              use_linear_projection=True, upcast_attention=True, num_class_embeds=None,
              class_embed_type=None, dual_cross_attention=False, only_cross_attention=False,
              resnet_time_scale_shift="default", _class_name="UNet2DConditionModel",
              _diffusers_version="0.8.0")
  c15, c21 = unet.config_from_diffusers(sd15), unet.config_from_diffusers(sd21)
  assert c15.num_attention_heads == (8, 8, 8, 8)
  assert c21.num_attention_heads == (5, 10, 20, 20)  # head dim 64 everywhere
  assert unet.config_from_diffusers(dict(sd15, num_attention_heads=4)).num_attention_heads == (
      4, 4, 4, 4)
  for cfg, c in ((sd15, c15), (sd21, c21)):
    with torch.device("meta"):
      ref = TorchUNet(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    shapes = unet.param_shapes(c)
    n_ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    n_ref = sum(p.numel() for p in ref.parameters())
    assert (n_ours, len(jax.tree.leaves(shapes))) == (n_ref, len(list(ref.parameters())))
  assert n_ref == 865_910_724  # SD 2.1's published UNet size


def test_bad_inputs_raise():
  config, params = _ours("sd1")
  module = unet.UNet2DConditionModel(config)
  p = {"params": params}
  ctx = jnp.zeros((2, 7, 16))
  with pytest.raises(ValueError, match="multiples of 2"):
    jax.eval_shape(module.apply, p, jnp.zeros((2, 15, 16, 4)), 1, ctx)
  with pytest.raises(ValueError, match="timesteps"):
    jax.eval_shape(module.apply, p, jnp.zeros((2, 16, 16, 4)), jnp.zeros((3,)), ctx)
  with pytest.raises(ValueError, match="cross_attention_dim"):
    jax.eval_shape(module.apply, p, jnp.zeros((2, 16, 16, 4)), 1, jnp.zeros((2, 7, 8)))
  with pytest.raises(ValueError, match="attention_head_dim"):
    unet.config_from_diffusers(dict(CASES["sd1"], attention_head_dim=3))


def test_bf16_forward_close_to_fp32():
  config, params = _ours("sd2")
  x, ctx = _inputs(seed=5)
  t = np.array([100, 900])
  ref = np.asarray(_forward(config)({"params": params}, x, t, ctx))
  out = _forward(config, jnp.bfloat16)({"params": params}, x, t, ctx)
  assert out.dtype == jnp.bfloat16
  err = _rel(np.asarray(out, np.float32), ref)
  print(f"bf16 vs fp32: rel L2 error {err:.2e}")
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert err < BF16_TOL
