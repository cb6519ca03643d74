"""Flax AutoencoderKL (synthbandit_jax.models.vae) against diffusers' AutoencoderKL (PyTorch).

A tiny random VAE (block_out_channels (32, 64), 1 layer per block, 8 groups, 4 latent
channels, 32x32 images) with every bias / norm parameter perturbed away from its init, so a
swapped or dropped term cannot hide behind a zero. Tolerance: relative max error
(max|ours - torch| / max|torch|) under 1e-4 in float32 (measured ~1e-6, printed with -s);
bfloat16 compute under 5e-2 of the float32 output.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from synthbandit_jax.models import vae  # noqa: E402
from synthbandit_jax.weights import state_dict as sdict  # noqa: E402

TOL = 1e-4
BF16_TOL = 5e-2

TINY = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "act_fn": "silu", "sample_size": 32, "scaling_factor": 0.18215,
}


def _rel(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _nhwc(t) -> np.ndarray:
  return t.detach().float().numpy().transpose(0, 2, 3, 1)


def _nchw(a) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module", name="ref")
def _ref():
  """The torch reference model, its numpy state dict, and inputs."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**TINY).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # biases, GroupNorm scale / shift: move off 0 / 1
        p.add_(torch.randn_like(p) * 0.2)
      else:  # weights: keep the random init, rescale per tensor a little
        p.mul_(1.0 + 0.2 * torch.randn(()))
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  gen = torch.Generator().manual_seed(1)
  x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
  z = torch.randn(2, 4, 16, 16, generator=gen)
  with torch.no_grad():
    post = model.encode(x).latent_dist
    dec = model.decode(z).sample
  return {"model": model, "sd": sd, "x": x, "z": z, "mean": _nhwc(post.mean),
          "logvar": _nhwc(post.logvar), "dec": _nhwc(dec)}


@pytest.fixture(scope="module", name="ours")
def _ours(ref):
  config = vae.config_from_diffusers(dict(ref["model"].config))
  params = vae.params_from_torch(config, ref["sd"])
  return vae.AutoencoderKL(config), params, config


def test_config_from_diffusers(ours):
  _, _, config = ours
  assert config.block_out_channels == (32, 64)
  assert config.down_block_types == ("DownEncoderBlock2D",) * 2
  assert config.norm_num_groups == 8 and config.layers_per_block == 1
  assert config.scaling_factor == pytest.approx(0.18215) and config.shift_factor is None
  assert config.use_quant_conv and config.use_post_quant_conv and config.mid_block_add_attention
  assert config.downsample_factor == 2


def test_encode_decode_parity(ref, ours):
  model, params, config = ours
  x = jnp.asarray(_nhwc(ref["x"]))
  mean, logvar = model.apply({"params": params}, x, method=vae.AutoencoderKL.encode)
  assert mean.shape == logvar.shape == (2, 16, 16, 4) and mean.dtype == jnp.float32
  e_mean, e_logvar = _rel(mean, ref["mean"]), _rel(logvar, ref["logvar"])
  dec = model.apply({"params": params}, jnp.asarray(_nhwc(ref["z"])),
                    method=vae.AutoencoderKL.decode)
  assert dec.shape == (2, 32, 32, 3)
  e_dec = _rel(dec, ref["dec"])
  print(f"\nVAE fp32 rel err: mean {e_mean:.2e}, logvar {e_logvar:.2e}, decode {e_dec:.2e}")
  assert e_mean < TOL and e_logvar < TOL and e_dec < TOL
  # The perturbed model gives a non-trivial posterior (the test would see a broken logvar).
  assert np.abs(ref["logvar"]).max() > 0.1 and np.abs(ref["mean"]).std() > 0.1

  # Full forward (posterior mode -> decode), as diffusers' forward(sample_posterior=False).
  with torch.no_grad():
    full_ref = _nhwc(ref["model"](ref["x"]).sample)
  e_full = _rel(model.apply({"params": params}, x), full_ref)
  print(f"VAE fp32 rel err: forward {e_full:.2e}")
  assert e_full < TOL


def test_logvar_clipped_like_diffusers(ref, ours):
  """Push two logvar channels past diffusers' clamp range [-30, 20] via quant_conv's bias."""
  model, _, config = ours
  sd = dict(ref["sd"])
  bias = sd["quant_conv.bias"].copy()
  bias[4:6] = [60.0, -60.0]  # channels 4.. are logvar
  sd["quant_conv.bias"] = bias
  ref_model = copy.deepcopy(ref["model"])
  ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  with torch.no_grad():
    ref_logvar = _nhwc(ref_model.encode(ref["x"]).latent_dist.logvar)
  _, logvar = model.apply({"params": vae.params_from_torch(config, sd)},
                          jnp.asarray(_nhwc(ref["x"])), method=vae.AutoencoderKL.encode)
  assert float(ref_logvar[..., 0].min()) == 20.0 and float(ref_logvar[..., 1].max()) == -30.0
  np.testing.assert_allclose(np.asarray(logvar)[..., :2], ref_logvar[..., :2], rtol=0, atol=0)
  assert _rel(logvar, ref_logvar) < TOL


def test_latent_helpers(ref, ours):
  model, params, config = ours
  x = _nhwc(ref["x"])
  lat = vae.encode_to_latents(model, params, x)
  assert _rel(lat, ref["mean"] * config.scaling_factor) < TOL

  # uint8 input goes through VaeImageProcessor's x / 255 * 2 - 1.
  u8 = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  proc = diffusers.image_processor.VaeImageProcessor()
  pre = proc.preprocess(u8.astype(np.float32) / 255.0)  # numpy path: [0,1] NHWC -> [-1,1] NCHW
  with torch.no_grad():
    ref_u8 = _nhwc(ref["model"].encode(pre).latent_dist.mean) * config.scaling_factor
  assert _rel(vae.encode_to_latents(model, params, u8), ref_u8) < TOL

  # Sampling: mean + exp(logvar / 2) * N(0, 1) with the given key.
  rng = jax.random.key(3)
  sampled = np.asarray(vae.encode_to_latents(model, params, x, rng=rng))
  noise = np.asarray(jax.random.normal(rng, (2, 16, 16, 4)))
  expect = (ref["mean"] + np.exp(0.5 * ref["logvar"]) * noise) * config.scaling_factor
  assert _rel(sampled, expect) < TOL
  assert np.abs(sampled - np.asarray(lat)).max() > 1e-3

  # decode_latents divides by the scaling factor first.
  z = _nhwc(ref["z"])
  assert _rel(vae.decode_latents(model, params, z * config.scaling_factor), ref["dec"]) < TOL

  # shift_factor (SD3 / Flux convention): z = (mean - shift) * scale; decode inverts it.
  shifted = vae.AutoencoderKL(dataclasses.replace(config, shift_factor=0.25, scaling_factor=1.5))
  lat_s = vae.encode_to_latents(shifted, params, x)
  assert _rel(lat_s, (ref["mean"] - 0.25) * 1.5) < TOL
  assert _rel(vae.decode_latents(shifted, params, (z - 0.25) * 1.5), ref["dec"]) < TOL

  # Under another jit (as in the sampler) both inline: same results as the top-level calls,
  # which compile with the CPU compiler options that jax would reject on a nested jit.
  zs = z * config.scaling_factor
  nested = jax.jit(lambda p, x_, z_: (vae.encode_to_latents(model, p, x_),
                                      vae.decode_latents(model, p, z_)))(params, x, zs)
  assert _rel(nested[0], lat) < TOL
  assert _rel(nested[1], vae.decode_latents(model, params, zs)) < TOL


def test_to_uint8_matches_vae_image_processor():
  proc = diffusers.image_processor.VaeImageProcessor()
  rng = np.random.default_rng(0)
  vals = rng.uniform(-1.3, 1.3, (2, 8, 8, 3)).astype(np.float32)
  # Exact half-way points k + 0.5 after scaling, and the ends, where rounding choices differ.
  halves = ((np.arange(255, dtype=np.float32) + 0.5) / 127.5 - 1).astype(np.float32)
  vals.reshape(-1)[:255] = halves
  vals.reshape(-1)[255:260] = [-1.0, 1.0, -2.0, 2.0, 0.0]
  pil = proc.postprocess(_nchw(vals), output_type="pil")
  expect = np.stack([np.asarray(im) for im in pil])
  got = vae.to_uint8(vals)
  assert got.dtype == np.uint8 and got.shape == vals.shape
  np.testing.assert_array_equal(got, expect)


def test_load_save_pretrained(ref, tmp_path):
  ref["model"].save_pretrained(tmp_path, safe_serialization=True)
  assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
  model, params, config = vae.load(tmp_path)
  assert config == vae.config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
  dec = model.apply({"params": params}, jnp.asarray(_nhwc(ref["z"])),
                    method=vae.AutoencoderKL.decode)
  assert _rel(dec, ref["dec"]) < TOL
  model16, params16, _ = vae.load(tmp_path, dtype=jnp.bfloat16)
  assert model16.dtype == jnp.bfloat16
  assert jax.tree.leaves(params16)[0].dtype == np.float32


def test_legacy_attention_names(ref, ours, tmp_path):
  _, params, config = ours
  legacy = {}
  names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  n_renamed = 0
  for key, value in ref["sd"].items():
    for new, old in names.items():
      tag = f".attentions.0.{new}."
      if tag in key:
        key = key.replace(tag, f".attentions.0.{old}.")
        if value.ndim == 2:
          value = value[:, :, None, None]  # the 1x1-conv form of some converted checkpoints
        n_renamed += 1
    legacy[key] = value
  assert n_renamed == 16  # 4 projections x (weight, bias) x (encoder, decoder)
  converted = vae.params_from_torch(config, legacy)
  jax.tree.map(np.testing.assert_array_equal, converted, params)

  sdict.write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", legacy)
  (tmp_path / "config.json").write_text(json.dumps(dict(ref["model"].config)))
  _, loaded, _ = vae.load(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_shape_mismatch_names_parameter(ref, ours):
  _, _, config = ours
  bad = dict(ref["sd"])
  key = "decoder.up_blocks.1.resnets.0.conv1.weight"
  bad[key] = np.zeros((32, 64, 3, 1), np.float32)
  with pytest.raises(sdict.WeightsError, match=r"decoder\.up_blocks\.1\.resnets\.0\.conv1"):
    vae.params_from_torch(config, bad, where="bad_vae")
  missing = {k: v for k, v in ref["sd"].items() if k != "quant_conv.bias"}
  with pytest.raises(sdict.WeightsError, match="quant_conv/bias"):
    vae.params_from_torch(config, missing)


def test_state_dict_round_trip(ref, ours):
  _, params, config = ours
  back = vae.state_dict_from_params(config, params)
  assert set(back) == set(ref["sd"])
  for k, v in ref["sd"].items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  again = vae.params_from_torch(config, back)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # diffusers accepts the exported dict as is (strict).
  fresh = diffusers.AutoencoderKL(**TINY)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_config_errors():
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
    vae.config_from_diffusers({**TINY, "down_block_types": ["DownEncoderBlock2D",
                                                            "AttnDownEncoderBlock2D"]})
  with pytest.raises(ValueError, match="AttnUpDecoderBlock2D"):
    vae.config_from_diffusers({**TINY, "up_block_types": ["AttnUpDecoderBlock2D"] * 2})
  with pytest.raises(ValueError, match="layers_per_block"):
    vae.config_from_diffusers({k: v for k, v in TINY.items() if k != "layers_per_block"})
  with pytest.raises(ValueError, match="mystery_key"):
    vae.config_from_diffusers({**TINY, "mystery_key": 1})
  with pytest.raises(ValueError, match="act_fn"):
    vae.config_from_diffusers({**TINY, "act_fn": "gelu"})
  with pytest.raises(ValueError, match="latents_mean"):
    vae.config_from_diffusers({**TINY, "latents_mean": [0.0] * 4})
  with pytest.raises(ValueError, match="AutoencoderTiny"):
    vae.config_from_diffusers({**TINY, "_class_name": "AutoencoderTiny"})
  with pytest.raises(ValueError, match="norm_num_groups"):
    vae.config_from_diffusers({**TINY, "norm_num_groups": 24})
  # Metadata and force_upcast are accepted.
  cfg = vae.config_from_diffusers({**TINY, "_class_name": "AutoencoderKL", "force_upcast": True,
                                   "_diffusers_version": "0.30.0", "shift_factor": 0.1159})
  assert cfg.shift_factor == pytest.approx(0.1159)


def test_bf16_decode_close_to_fp32(ref, ours):
  model, params, config = ours
  model16 = vae.AutoencoderKL(config, dtype=jnp.bfloat16)
  z = _nhwc(ref["z"]) * config.scaling_factor
  out16 = vae.decode_latents(model16, params, z)
  assert out16.dtype == jnp.float32 and bool(jnp.isfinite(out16).all())
  err = _rel(out16, ref["dec"])
  print(f"\nVAE bf16 decode rel err vs torch fp32: {err:.2e}")
  assert err < BF16_TOL
