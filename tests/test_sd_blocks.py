"""Shared SD blocks and the torch->flax state-dict converter against diffusers (PyTorch).

Tolerance: relative max error (max|ours - torch| / max|torch|) under 1e-5 in float32; the
measured errors are ~1e-7.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers.models.attention_processor import Attention as TorchAttention  # noqa: E402
from diffusers.models.resnet import Downsample2D as TorchDown  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D as TorchResnet  # noqa: E402
from diffusers.models.resnet import Upsample2D as TorchUp  # noqa: E402

from synthbandit_jax.models import sd_blocks  # noqa: E402
from synthbandit_jax.weights import state_dict as sdict  # noqa: E402

TOL = 1e-5


def _rel(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _perturbed(module):
  torch.manual_seed(0)
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0.0, 0.2)
  return module.eval()


def _params(module, torch_sd, *args):
  expected = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  return sdict.to_flax(torch_sd, expected)


@pytest.fixture(name="x")
def _x():
  torch.manual_seed(1)
  return torch.randn(2, 32, 8, 8)


@pytest.mark.parametrize("out_ch,temb", [(64, 16), (32, None)])
def test_resnet_block(x, out_ch, temb):
  eps = 1e-5 if temb else 1e-6
  ref_mod = _perturbed(TorchResnet(in_channels=32, out_channels=out_ch, temb_channels=temb,
                                   groups=8, eps=eps))
  te = torch.randn(2, temb) if temb else None
  ref = _nhwc(ref_mod(x, te))
  ours = sd_blocks.ResnetBlock2D(out_ch, groups=8, eps=eps, use_time_emb=temb is not None)
  args = (jnp.asarray(_nhwc(x)),) + ((jnp.asarray(te.numpy()),) if temb else ())
  out = ours.apply({"params": _params(ours, ref_mod.state_dict(), *args)}, *args)
  assert _rel(out, ref) < TOL


@pytest.mark.parametrize("vae_form", [False, True])
def test_downsample(x, vae_form):
  ref_mod = _perturbed(TorchDown(32, use_conv=True, out_channels=32,
                                 padding=0 if vae_form else 1, name="op"))
  torch_sd = {k.replace("op.", "conv."): v for k, v in ref_mod.state_dict().items()}
  ours = sd_blocks.Downsample2D(32, pad_right_bottom=vae_form)
  xs = jnp.asarray(_nhwc(x))
  out = ours.apply({"params": _params(ours, torch_sd, xs)}, xs)
  assert out.shape == (2, 4, 4, 32)
  assert _rel(out, _nhwc(ref_mod(x))) < TOL


def test_upsample(x):
  ref_mod = _perturbed(TorchUp(32, use_conv=True, out_channels=16))
  ours = sd_blocks.Upsample2D(16)
  xs = jnp.asarray(_nhwc(x))
  out = ours.apply({"params": _params(ours, ref_mod.state_dict(), xs)}, xs)
  assert _rel(out, _nhwc(ref_mod(x))) < TOL


def test_cross_attention():
  ref_mod = _perturbed(TorchAttention(query_dim=32, cross_attention_dim=24, heads=4,
                                      dim_head=8, bias=False))
  tok, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
  ours = sd_blocks.Attention(4, 8)
  args = (jnp.asarray(tok.numpy()), jnp.asarray(ctx.numpy()))
  out = ours.apply({"params": _params(ours, ref_mod.state_dict(), *args)}, *args)
  assert _rel(out, ref_mod(tok, ctx).detach().numpy()) < TOL
  upcast = sd_blocks.Attention(4, 8, upcast=True, dtype=jnp.bfloat16)
  out16 = upcast.apply({"params": _params(ours, ref_mod.state_dict(), *args)}, *args)
  assert out16.dtype == jnp.bfloat16
  assert _rel(out16.astype(jnp.float32), out) < 3e-2


def test_vae_spatial_attention(x):
  ref_mod = _perturbed(TorchAttention(
      32, heads=1, dim_head=32, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=8,
      residual_connection=True, bias=True, upcast_softmax=True,
      _from_deprecated_attn_block=True))
  ours = sd_blocks.Attention(1, 32, qkv_bias=True, spatial_norm_groups=8, eps=1e-6)
  xs = jnp.asarray(_nhwc(x))
  out = ours.apply({"params": _params(ours, ref_mod.state_dict(), xs)}, xs)
  assert _rel(out, _nhwc(ref_mod(x))) < TOL


def test_group_norm_matches_torch_on_large_offsets():
  # A mean far from zero is where E[x^2] - E[x]^2 loses digits; two-pass statistics do not.
  # The reference is float64 on the same float32 input (torch's own float32 CPU kernel is
  # off by ~10x the output scale here); 5e-3 is the input's float32 quantisation (3e-5 steps
  # on a 0.01 spread).
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((2, 6, 6, 16)) * 0.01 + 300.0).astype(np.float32)
  x64 = torch.from_numpy(x.transpose(0, 3, 1, 2)).double()
  ref = torch.nn.functional.group_norm(x64, 4, eps=1e-6)
  ours = sd_blocks.GroupNorm(4, 1e-6)
  out = ours.apply(ours.init(jax.random.key(0), x), x)
  assert _rel(out, _nhwc(ref)) < 5e-3


def test_attention_impl_choice():
  assert sd_blocks.resolve_attention_impl("xla", jnp.bfloat16) == "xla"
  if jax.default_backend() == "cpu":
    assert sd_blocks.resolve_attention_impl(None, jnp.bfloat16) == "xla"
  with pytest.raises(ValueError, match="attention_impl"):
    sd_blocks.resolve_attention_impl("flash", jnp.float32)


# ----------------------------------------------------------------- state_dict converter

def _tree():
  return {"down_blocks_0": {"resnets_1": {"conv1": {"kernel": np.zeros((3, 3, 4, 8)),
                                                    "bias": np.zeros(8)}}},
          "time_embedding": {"linear_1": {"kernel": np.zeros((4, 5))}},
          "norm": {"scale": np.zeros(4)}, "embed": {"embedding": np.zeros((10, 4))}}


def test_to_flax_layouts_and_round_trip():
  rng = np.random.default_rng(0)
  torch_sd = {
      "down_blocks.0.resnets.1.conv1.weight": rng.standard_normal((8, 4, 3, 3)),
      "down_blocks.0.resnets.1.conv1.bias": rng.standard_normal(8),
      "time_embedding.linear_1.weight": rng.standard_normal((5, 4)),
      "norm.weight": rng.standard_normal(4),
      "embed.weight": rng.standard_normal((10, 4)),
      "position_ids": np.arange(3),
  }
  params = sdict.to_flax(torch_sd, _tree(), ignore=["position_ids"])
  conv = params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]
  np.testing.assert_allclose(conv[1, 2, 3, 5], torch_sd["down_blocks.0.resnets.1.conv1.weight"]
                             [5, 3, 1, 2], rtol=1e-6)
  np.testing.assert_allclose(params["time_embedding"]["linear_1"]["kernel"],
                             torch_sd["time_embedding.linear_1.weight"].T, rtol=1e-6)
  back = sdict.from_flax(params)
  assert set(back) == set(torch_sd) - {"position_ids"}
  for k, v in back.items():
    np.testing.assert_allclose(v, torch_sd[k], rtol=1e-6)


def test_to_flax_errors_name_parameters():
  good = sdict.from_flax(jax.tree.map(np.ones_like, _tree()))
  with pytest.raises(sdict.WeightsError, match=r"unet/.*fit no model parameter.*extra\.weight"):
    sdict.to_flax({**good, "extra.weight": np.zeros(3)}, _tree(), where="unet/")
  missing = dict(good)
  del missing["norm.weight"]
  with pytest.raises(sdict.WeightsError, match=r"no tensor.*norm/scale"):
    sdict.to_flax(missing, _tree())
  bad = {**good, "norm.weight": np.zeros(5)}
  with pytest.raises(sdict.WeightsError, match=r"'norm\.weight'.*\(5,\).*\(4,\)"):
    sdict.to_flax(bad, _tree())


def test_safetensors_writer_is_read_by_the_reference(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  tensors = {"a.weight": np.random.default_rng(0).random((3, 4)).astype(np.float32),
             "b": np.arange(5, dtype=np.int64), "c": np.ones((2, 2, 1, 1), np.float16)}
  path = sdict.write_safetensors(tmp_path / "m.safetensors", tensors)
  ref = st.load_file(str(path))
  assert set(ref) == set(tensors)
  for k, v in tensors.items():
    assert ref[k].dtype == v.dtype and np.array_equal(ref[k], v)
  ours = sdict.read_safetensors(path)
  assert all(np.array_equal(ours[k], v) for k, v in tensors.items())


def test_weight_files_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    sdict.weight_files(tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text(
      '{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
  with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
    sdict.weight_files(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    sdict.read_config(tmp_path)
