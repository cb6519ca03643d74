"""Tests for models/llama.py and weights/llama_import.py.

Parity references are transformers' PyTorch LlamaForCausalLM (float32): a tiny random model
saved with save_pretrained (logits within 1e-4 max abs), and SmolLM2-135M-Instruct built by
transformers' own GGUF reader (greedy 40-token continuations identical).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthbandit_jax.models import llama
from synthbandit_jax.weights import llama_import as li
from tests import gguf_once

_HAVE_TF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
_HAVE_GGUF = importlib.util.find_spec("gguf") is not None
needs_tf = pytest.mark.skipif(not _HAVE_TF, reason="needs torch and transformers "
                              "(pip install 'transformers>=5')")

LOGIT_TOL = 1e-4  # max abs error of float32 logits vs PyTorch (observed ~1e-6)

_CASES = {
    "theta1e4_untied": dict(rope_theta=10000.0, tie=False, scaling=None),
    "theta1e5_tied": dict(rope_theta=100000.0, tie=True, scaling=None),
    "llama3_scaling": dict(rope_theta=500000.0, tie=False,
                           scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
}


@functools.lru_cache(maxsize=None)
def _tiny_hf(case: str):
  """(torch model, save dir) of a tiny random LlamaForCausalLM; weights ~N(0, 0.3)."""
  import tempfile

  import torch
  from transformers import LlamaConfig as HFConfig
  from transformers import LlamaForCausalLM
  c = _CASES[case]
  rope = {"rope_type": "default", "rope_theta": c["rope_theta"]}
  if c["scaling"]:
    rope = dict(c["scaling"], rope_theta=c["rope_theta"])
  torch.manual_seed(0)
  hc = HFConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                tie_word_embeddings=c["tie"], max_position_embeddings=64, rms_norm_eps=1e-6)
  model = LlamaForCausalLM(hc).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  d = tempfile.mkdtemp(prefix=f"tiny_llama_{case}_")
  model.save_pretrained(d)
  return model, d


def _padded_batch(rng: np.random.Generator, vocab: int = 128, t: int = 10):
  tokens = rng.integers(0, vocab, (3, t)).astype(np.int32)
  mask = np.ones((3, t), bool)
  mask[1, :4] = False   # left padded
  mask[2, 6:] = False   # right padded
  return tokens, mask


def _positions(mask):
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@needs_tf
@pytest.mark.parametrize("case", list(_CASES))
def test_logits_match_transformers(case, tmp_path):
  import torch
  model, d = _tiny_hf(case)
  config, params = li.load_hf_dir(d)
  assert config.tie_word_embeddings == _CASES[case]["tie"]
  assert config.rope_theta == _CASES[case]["rope_theta"]
  assert (config.rope_scaling is None) == (_CASES[case]["scaling"] is None)
  assert ("lm_head" in params) != config.tie_word_embeddings
  tokens, mask = _padded_batch(np.random.default_rng(1))
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(_positions(mask))).logits.numpy()
  ours = np.asarray(llama.forward(params, config, tokens, mask))
  err = np.abs(ours - ref)[mask].max()
  assert err < LOGIT_TOL, err
  assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers


@needs_tf
def test_bf16_safetensors_and_errors(tmp_path):
  import torch
  model, _ = _tiny_hf("theta1e4_untied")
  d = tmp_path / "bf16"
  model.to(torch.bfloat16).save_pretrained(d)
  model.float()
  cfg, params = li.load_hf_dir(d)
  ref = model.model.layers[1].mlp.up_proj.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(llama.layer_weights(params, cfg, 1)["up_proj"], ref.T)
  # Truncated safetensors -> error naming the file.
  st = d / "model.safetensors"
  st.write_bytes(st.read_bytes()[:-100])
  with pytest.raises(ValueError, match="model.safetensors"):
    li.load_hf_dir(d)
  with pytest.raises(FileNotFoundError, match="config.json"):
    li.load_hf_dir(tmp_path / "nowhere")


def test_gguf_errors_name_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"missing\.gguf.*smollm2_135m_q4_1"):
    li.load_gguf(tmp_path / "missing.gguf")
  if not _HAVE_GGUF:
    return
  bad = tmp_path / "broken.gguf"
  bad.write_bytes(b"GGUF" + b"\x00" * 13)
  with pytest.raises(ValueError, match=r"broken\.gguf.*smollm2_135m_q4_1"):
    li.load_gguf(bad)


@pytest.mark.skipif(not _HAVE_GGUF, reason="needs the gguf package")
def test_one_gguf_parse_shares_a_reader_per_file_and_restores(tmp_path):
  import gguf
  paths = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
  for i, path in enumerate(paths):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.value", i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  original = gguf.GGUFReader
  with li.one_gguf_parse():
    a = gguf.GGUFReader(str(paths[0]))
    assert gguf.GGUFReader(tmp_path / "." / "a.gguf") is a  # same file, another spelling
    b = gguf.GGUFReader(paths[1])
    assert b is not a
    assert [int(r.fields["test.value"].contents()) for r in (a, b)] == [0, 1]
    outer = gguf.GGUFReader
    with li.one_gguf_parse():  # nests (an LLM built inside such a block): no deadlock
      assert gguf.GGUFReader(paths[0]) is a
    assert gguf.GGUFReader is outer
  assert gguf.GGUFReader is original
  assert gguf.GGUFReader(paths[0]) is not gguf.GGUFReader(paths[0])
  with pytest.raises(RuntimeError, match="inside"):
    with li.one_gguf_parse():
      raise RuntimeError("inside")
  assert gguf.GGUFReader is original


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)  # 6 heads of dim 8
  np.testing.assert_array_equal(li.unpermute_qk(li.permute_qk(w, 6), 6), w)
  # Hand-computed: within a head, HF rows [0..3 | 4..7] (halves) are stored interleaved.
  p = li.permute_qk(w, 6)
  np.testing.assert_array_equal(p[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])


def _random_params(config: llama.LlamaConfig, seed: int = 0):
  # The module's own parameter tree (eval_shape: traced, not run), filled from numpy: a
  # jax.random draw per distinct leaf shape is one XLA compile each (~1 s on 2 cores).
  shapes = jax.eval_shape(lambda: llama.Llama(config).init(
      jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  # Larger weights than the 0.02 init, so logits are O(1) and argmax is not a coin flip;
  # norm scales around 1.
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed + 1)
  new = [jnp.asarray(rng.normal(0.0, 0.3, x.shape).astype(np.float32)
                     + (1.0 if path[-1].key == "scale" else 0.0))
         for path, x in leaves]
  return jax.tree.unflatten(tree, new)


@functools.lru_cache(maxsize=None)
def _jit_forward(config: llama.LlamaConfig):
  """One jitted full forward per config (shared by every reference loop)."""
  return jax.jit(functools.partial(llama.forward, config=config))


_CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                         tie_word_embeddings=False)


def test_kv_cache_decoding_equals_full_forward():
  params = _random_params(_CFG)
  tokens, mask = _padded_batch(np.random.default_rng(2), vocab=64, t=12)
  full = np.asarray(_jit_forward(_CFG)(params, tokens=tokens, mask=mask))
  apply = jax.jit(llama.Llama(_CFG).apply)
  pos = _positions(mask)
  cache = llama.init_cache(_CFG, 3, 16)
  # Prefill 5 tokens, then 1, then 2 at a time, then 4.
  outs = []
  for a, b in [(0, 5), (5, 6), (6, 8), (8, 12)]:
    logits, cache = apply({"params": params}, tokens[:, a:b], pos[:, a:b], mask[:, a:b], cache)
    outs.append(np.asarray(logits))
  assert int(cache["index"]) == 12
  np.testing.assert_allclose(np.concatenate(outs, axis=1)[mask], full[mask], atol=1e-5)


def _argmax_loop(params, config, prompt, n):
  """Reference: re-runs the full forward each step (sequence right-padded to a fixed length,
  so one compile serves all steps and rows)."""
  fwd = _jit_forward(config)
  size = 32
  seq = list(prompt)
  for _ in range(n):
    buf = np.zeros((1, size), np.int32)
    buf[0, :len(seq)] = seq
    logits = fwd(params, tokens=buf, mask=np.arange(size)[None] < len(seq))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_generate_equals_argmax_loop_and_stops_at_eos():
  params = _random_params(_CFG, seed=3)
  tokens, mask = _padded_batch(np.random.default_rng(3), vocab=64, t=8)
  n = 6
  out = llama.generate(params, _CFG, tokens, mask, n)
  got = np.asarray(out["tokens"])
  refs = [_argmax_loop(params, _CFG, tokens[i][mask[i]].tolist(), n) for i in range(3)]
  for i in range(3):
    assert got[i].tolist() == refs[i], i
  np.testing.assert_array_equal(np.asarray(out["lengths"]), [n] * 3)
  # Stop at eos: use row 0's third token as eos id.
  eos = refs[0][2]
  out = llama.generate(params, _CFG, tokens, mask, n, eos_id=eos, pad_id=-1)
  got = np.asarray(out["tokens"])
  for i in range(3):
    stop = refs[i].index(eos) + 1 if eos in refs[i] else n
    assert got[i, :stop].tolist() == refs[i][:stop]
    assert (got[i, stop:] == -1).all()
    assert int(out["lengths"][i]) == stop
    assert bool(out["finished"][i]) == (eos in refs[i])


def test_sampling_top_p_and_rng():
  params = _random_params(_CFG, seed=4)
  tokens, mask = _padded_batch(np.random.default_rng(4), vocab=64, t=8)
  greedy = np.asarray(llama.generate(params, _CFG, tokens, mask, 5)["tokens"])
  k1, k2 = jax.random.split(jax.random.key(0))
  nucleus = llama.generate(params, _CFG, tokens, mask, 5, rng=k1, temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(np.asarray(nucleus["tokens"]), greedy)
  a = np.asarray(llama.generate(params, _CFG, tokens, mask, 5, rng=k1, temperature=3.0)["tokens"])
  b = np.asarray(llama.generate(params, _CFG, tokens, mask, 5, rng=k1, temperature=3.0)["tokens"])
  c = np.asarray(llama.generate(params, _CFG, tokens, mask, 5, rng=k2, temperature=3.0)["tokens"])
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a >= 0).all() and (a < 64).all()


@pytest.mark.skipif(not (_HAVE_TF and _HAVE_GGUF),
                    reason="SmolLM2 parity needs torch, transformers and gguf "
                    "(pip install gguf 'transformers>=5')")
def test_smollm2_gguf_greedy_matches_transformers(monkeypatch):
  import torch
  from transformers import AutoTokenizer
  from transformers import LlamaConfig as HFConfig
  from transformers import LlamaForCausalLM
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  from synthbandit_jax import assets
  try:
    path = str(assets.fetch("smollm2_135m_q4_1"))
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"SmolLM2 GGUF asset unavailable: {e}")
  # Our reader, transformers' config + tensor reader and its tokenizer parse the file once
  # between them (not four times, ~8 s each); see tests/gguf_once.py.
  gguf_once.parse_once(monkeypatch)
  config, params = li.load_gguf(path)
  assert (config.rope_theta, config.tie_word_embeddings) == (100000.0, True)
  assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)

  # Reference: transformers' own GGUF reader (its own Q/K un-permutation) into PyTorch Llama.
  hf_cfg = load_gguf_checkpoint(path, return_tensors=False)["config"]
  hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("_model_name_or_path", "model_type")}
  model = LlamaForCausalLM(HFConfig(**hf_cfg)).float().eval()
  sd = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
  for name in ("q_proj", "k_proj"):
    np.testing.assert_array_equal(llama.layer_weights(params, config, 7)[name],
                                  sd[f"model.layers.7.self_attn.{name}.weight"].numpy().T)
  model.load_state_dict(sd, strict=False)
  model.lm_head.weight = model.model.embed_tokens.weight

  d, f = os.path.split(path)
  tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
  prompts = ["List ten attributes that vary between photos of golden retrievers.",
             "Describe a car accident scene in detail."]
  ids = []
  for q in prompts:
    enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                  tokenize=True)
    ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
  n = 40
  ref = []
  with torch.no_grad():
    for x in ids:
      o = model.generate(torch.tensor([x]), max_new_tokens=n, do_sample=False)
      ref.append(o[0, len(x):].tolist())
  t = max(len(x) for x in ids)
  tokens = np.zeros((len(ids), t), np.int32)
  mask = np.zeros((len(ids), t), bool)
  for i, x in enumerate(ids):  # left-padded batch
    tokens[i, t - len(x):] = x
    mask[i, t - len(x):] = True
  out = llama.generate(params, config, tokens, mask, n, eos_id=config.eos_token_id)
  for i in range(len(ids)):
    ours = np.asarray(out["tokens"][i, :int(out["lengths"][i])]).tolist()
    assert len(ref[i]) == n and ours == ref[i], (tok.decode(ours), tok.decode(ref[i]))


def test_attention_einsum_path_equals_dot_product_attention():
  """The CPU einsum path (cache layout [B, Hkv, S, Dh]) == jax.nn.dot_product_attention
  (the path taken with attention_impl set, e.g. "cudnn" on GPU), GQA and a padded mask."""
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(2, 3, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 2, 7, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 2, 7, 8)), jnp.float32)
  mask = rng.random((2, 3, 7)) < 0.6
  mask[:, :, 0] = True
  a = llama.attention(q, k, v, jnp.asarray(mask), 8 ** -0.5)
  b = llama.attention(q, k, v, jnp.asarray(mask), 8 ** -0.5, implementation="xla")
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_params_layout_one_dict_per_layer():
  params = _random_params(_CFG)
  assert sorted(k for k in params if k.startswith("layers_")) == ["layers_0", "layers_1"]
  shapes = li.expected_shapes(_CFG)
  assert jax.tree.map(lambda x: tuple(x.shape), params) == shapes
  cache = llama.init_cache(_CFG, 3, 16)
  assert len(cache["k"]) == _CFG.num_layers and cache["k"][0].shape == (3, 2, 16, 8)


def test_shared_prefixes_equal_joined_prompts():
  """generate(prefix_tokens=..., prefix_index=...) == generate on the joined prompts: two
  left-padded prefixes of different lengths, four rows with left- and right-padded suffixes."""
  params = _random_params(_CFG, seed=6)
  rng = np.random.default_rng(6)
  prefixes = [rng.integers(0, 64, 7).tolist(), rng.integers(0, 64, 4).tolist()]
  suffixes = [rng.integers(0, 64, n).tolist() for n in (3, 1, 5, 2)]
  index = [0, 1, 1, 0]
  p_tok = np.zeros((2, 8), np.int32)
  p_mask = np.zeros((2, 8), bool)
  for g, x in enumerate(prefixes):
    p_tok[g, 8 - len(x):], p_mask[g, 8 - len(x):] = x, True
  s_tok = np.zeros((4, 6), np.int32)
  s_mask = np.zeros((4, 6), bool)
  for i, x in enumerate(suffixes):
    if i % 2:  # right padded
      s_tok[i, :len(x)], s_mask[i, :len(x)] = x, True
    else:
      s_tok[i, 6 - len(x):], s_mask[i, 6 - len(x):] = x, True
  n = 6
  got = llama.generate(params, _CFG, s_tok, s_mask, n, prefix_tokens=p_tok, prefix_mask=p_mask,
                       prefix_index=np.asarray(index, np.int32))
  joined = [prefixes[g] + x for g, x in zip(index, suffixes)]
  t = max(len(x) for x in joined)
  j_tok = np.zeros((4, t), np.int32)
  j_mask = np.zeros((4, t), bool)
  for i, x in enumerate(joined):
    j_tok[i, t - len(x):], j_mask[i, t - len(x):] = x, True
  ref = llama.generate(params, _CFG, j_tok, j_mask, n)
  np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(ref["tokens"]))
  for i, x in enumerate(joined):
    assert np.asarray(got["tokens"][i]).tolist() == _argmax_loop(params, _CFG, x, n)


def _nucleus_ref(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
  """numpy reference: the sorted-vocabulary nucleus, renormalised."""
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  keep = (np.cumsum(p[order]) - p[order]) < top_p
  q = np.zeros_like(p)
  q[order[keep]] = p[order[keep]]
  return q / q.sum()


@pytest.mark.parametrize("vocab,slope,top_p", [(40, 0.4, 0.8),       # nucleus of a few tokens
                                               (1000, 0.002, 0.6)])  # > 256: full sort path
def test_nucleus_sampling_matches_sorted_reference(vocab, slope, top_p):
  logits = -slope * np.arange(vocab, dtype=np.float32)
  np.random.default_rng(0).shuffle(logits)
  ref = _nucleus_ref(logits, 0.7, top_p)
  n = 20000
  batch = np.broadcast_to(logits, (n, vocab))
  tokens = np.asarray(jax.jit(lambda l, k: llama._sample(l, k, 0.7, top_p))(
      jnp.asarray(batch), jax.random.key(3)))
  freq = np.bincount(tokens, minlength=vocab) / n
  assert set(np.nonzero(freq)[0]) <= set(np.nonzero(ref)[0])  # never outside the nucleus
  if vocab == 40:
    np.testing.assert_allclose(freq, ref, atol=0.015)
  else:  # many small probabilities: compare the mass of the nucleus halves
    inside = np.nonzero(ref)[0]
    assert len(inside) > 256
    half = inside[np.argsort(-ref[inside])][:len(inside) // 2]
    assert abs(freq[half].sum() - ref[half].sum()) < 0.015
