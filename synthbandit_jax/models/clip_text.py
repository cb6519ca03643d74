"""The CLIP text encoder of Stable Diffusion in Flax, plus its tokenizer files.

Architecture (transformers' ``CLIPTextModel``; SD 1.x uses OpenAI CLIP ViT-L/14, SD 2.x
OpenCLIP ViT-H/14): for token ids ``x`` of shape (B, T),

    h_0    = token_embedding[x] + position_embedding[0 .. T-1]
    for l = 1 .. L (pre-norm blocks):
      h_l  = h_{l-1} + out_proj(causal_attention(q/k/v_proj(layer_norm1(h_{l-1}))))
      h_l  = h_l + fc2(act(fc1(layer_norm2(h_l))))
    last   = final_layer_norm(h_{L - clip_skip})
    pooled = final_layer_norm(h_L)[b, eos_position(x_b)]

with ``act`` = quick_gelu ``x * sigmoid(1.702 x)`` (SD 1.x) or exact erf GELU (SD 2.x), and
attention scaled by ``head_dim ** -0.5`` with a causal mask (token t sees tokens <= t, so the
padding after the end-of-text token never changes earlier positions and no attention mask is
needed). ``clip_skip`` follows diffusers' ``encode_prompt``: take ``hidden_states[-(clip_skip +
1)]`` of the encoder (index 0 is the embedding output) and apply the final layer norm;
``clip_skip=0`` is exactly transformers' ``last_hidden_state``. ``pooled`` is always
transformers' ``pooler_output`` (from the last layer, whatever ``clip_skip``), as diffusers uses
it. The EOS position is transformers' rule: the first position holding ``eos_token_id``, or,
for old configs that carry the wrong ``eos_token_id == 2``, the argmax of the ids (the
end-of-text token 49407 is the largest id of the vocabulary).

Naming: the Flax submodules mirror the PyTorch attribute paths (``text_model/encoder/layers_3/
self_attn/q_proj/kernel`` is ``text_model.encoder.layers.3.self_attn.q_proj.weight``), so
`synthbandit_jax.weights.state_dict.to_flax` / `from_flax` convert a transformers state dict
with no renaming; the non-persistent ``position_ids`` buffer that older checkpoints carry is
ignored. transformers 5 drops the ``text_model.`` prefix in memory and in ``save_pretrained``
files (and loads both layouts); `params_from_torch` accepts both too, and
`state_dict_from_params` writes the prefixed (hub / SD checkpoint) layout by default.

Precision: params are float32; ``dtype`` is the compute dtype of the matmuls (bfloat16 on
accelerators). The residual stream, layer-norm statistics and the attention softmax stay
float32, and both outputs are float32.

Tokenizer: transformers' ``CLIPTokenizer`` needs ``vocab.json`` and ``merges.txt``. No model hub
is reachable, so `write_tokenizer_files` rebuilds them from CLIP's BPE merges file
``bpe_simple_vocab_16e6.txt.gz`` (an offline asset) exactly as CLIP defines its vocabulary:

* a reversible byte -> unicode table: the 188 printable bytes ``!``..``~``, ``¡``..``¬``,
  ``®``..``ÿ`` map to themselves, the other 68 bytes (in increasing order) to ``chr(256 + n)``;
* merges = lines 1 .. 48894 of the file (line 0 is a version header; 49152 - 256 - 2 merges);
* vocab = the 256 byte characters (in table order), the same 256 with ``</w>`` appended, the
  concatenation of every merge pair in file order, then ``<|startoftext|>`` (49406) and
  ``<|endoftext|>`` (49407): 49408 tokens.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from synthbandit_jax import io as sio
from synthbandit_jax.models import sd_blocks
from synthbandit_jax.weights import state_dict as sdict

PyTree = Any
Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu")
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # 48894
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
# Torch keys that are buffers, not parameters (older checkpoints saved them).
IGNORED_KEYS = (r"(.*\.)?position_ids",)
PREFIX = "text_model."


# ---------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Hyper-parameters of a CLIP text encoder (names follow transformers' ``CLIPTextConfig``).

  SD 1.x (OpenAI CLIP ViT-L/14): hidden 768, 12 layers, 12 heads, intermediate 3072,
  quick_gelu. SD 2.x (OpenCLIP ViT-H/14): hidden 1024, 23 layers, 16 heads, intermediate 4096,
  gelu. Both: vocab 49408, 77 positions, layer_norm_eps 1e-5.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = None
  eos_token_id: int = 49407
  pad_token_id: int | None = 1

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not supported; use one "
                       f"of {ACTIVATIONS}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPTextConfig: hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"CLIPTextConfig.{name} must be positive, got {getattr(self, name)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings", "hidden_act",
                  "layer_norm_eps", "eos_token_id")


def config_from_hf(cfg: Mapping[str, Any], where: str = "config") -> CLIPTextConfig:
  """A transformers ``CLIPTextModel`` config.json (as a dict) -> `CLIPTextConfig`.

  Keys that change shapes or numerics are required (a missing one raises KeyError naming it and
  `where`); ``projection_dim`` and ``pad_token_id`` are optional.
  """
  if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), Mapping):
    raise KeyError(f"{where} is a full CLIPModel config (it has 'text_config' but no "
                   "'hidden_size'); pass cfg['text_config'] or use a CLIPTextModel directory")
  missing = [k for k in _REQUIRED_KEYS if cfg.get(k) is None]
  if missing:
    raise KeyError(f"{where} lacks the CLIPTextModel key(s) {missing}; a transformers "
                   "CLIPTextModel config.json has them")
  proj = cfg.get("projection_dim")
  pad = cfg.get("pad_token_id")
  return CLIPTextConfig(
      vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
      intermediate_size=int(cfg["intermediate_size"]),
      num_hidden_layers=int(cfg["num_hidden_layers"]),
      num_attention_heads=int(cfg["num_attention_heads"]),
      max_position_embeddings=int(cfg["max_position_embeddings"]),
      hidden_act=str(cfg["hidden_act"]), layer_norm_eps=float(cfg["layer_norm_eps"]),
      projection_dim=None if proj is None else int(proj),
      eos_token_id=int(cfg["eos_token_id"]), pad_token_id=None if pad is None else int(pad))


# ---------------------------------------------------------------------------------- model


def _layer_norm(config: CLIPTextConfig, name: str, dtype: Dtype) -> nn.LayerNorm:
  # Two-pass variance like torch (flax's default E[x^2]-E[x]^2 loses digits); stats in float32.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)


class _Embeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    t = input_ids.shape[-1]
    if t > c.max_position_embeddings:
      raise ValueError(f"CLIPTextEncoder: sequence length {t} exceeds max_position_embeddings="
                       f"{c.max_position_embeddings}; tokenize with max_length <= "
                       f"{c.max_position_embeddings}")
    tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
                   name="token_embedding")(input_ids)
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=jnp.float32,
                   param_dtype=jnp.float32, name="position_embedding")(jnp.arange(t))
    return tok + pos[None]


class _SelfAttention(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    b, t, _ = x.shape
    shape = (b, t, c.num_attention_heads, c.head_dim)
    q = _dense(c.hidden_size, "q_proj", self.dtype)(x).reshape(shape)
    k = _dense(c.hidden_size, "k_proj", self.dtype)(x).reshape(shape)
    v = _dense(c.hidden_size, "v_proj", self.dtype)(x).reshape(shape)
    o = sd_blocks.attention(q, k, v, impl=self.attention_impl, is_causal=True)
    return _dense(c.hidden_size, "out_proj", self.dtype)(o.reshape(b, t, c.hidden_size))


class _MLP(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    h = _dense(c.intermediate_size, "fc1", self.dtype)(x)
    return _dense(c.hidden_size, "fc2", self.dtype)(_activation(c.hidden_act, h))


class _EncoderLayer(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    c = self.config
    y = _layer_norm(c, "layer_norm1", self.dtype)(h)
    y = _SelfAttention(c, self.dtype, self.attention_impl, name="self_attn")(y)
    h = h + y.astype(jnp.float32)
    y = _MLP(c, self.dtype, name="mlp")(_layer_norm(c, "layer_norm2", self.dtype)(h))
    return h + y.astype(jnp.float32)


class _Encoder(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, h: jax.Array) -> list[jax.Array]:
    """All hidden states: [embeddings, layer 1 output, ..., layer L output] (float32)."""
    states = [h]
    for i in range(self.config.num_hidden_layers):
      h = _EncoderLayer(self.config, self.dtype, self.attention_impl, name=f"layers_{i}")(h)
      states.append(h)
    return states


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Index of the EOS token per row (transformers' rule; see the module docstring)."""
  ids = jnp.asarray(input_ids).astype(jnp.int32)
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class _TextTransformer(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array, clip_skip: int) -> tuple[jax.Array, jax.Array]:
    c = self.config
    h = _Embeddings(c, name="embeddings")(input_ids)
    states = _Encoder(c, self.dtype, self.attention_impl, name="encoder")(h)
    final_ln = _layer_norm(c, "final_layer_norm", jnp.float32)
    last = final_ln(states[-1])
    pos = eos_positions(input_ids, c.eos_token_id)
    pooled = jnp.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]
    if clip_skip:
      last = final_ln(states[-(clip_skip + 1)])
    return last, pooled


class CLIPTextEncoder(nn.Module):
  """CLIP text encoder: ``(input_ids (B, T) int) -> (last_hidden_state (B, T, D), pooled (B, D))``.

  Params: ``model.apply({"params": params}, ids, clip_skip=0)``; `clip_skip` is a Python int
  (static under jit) in [0, num_hidden_layers]. Both outputs are float32.
  """
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array, *, clip_skip: int = 0
               ) -> tuple[jax.Array, jax.Array]:
    if input_ids.ndim != 2:
      raise ValueError(f"CLIPTextEncoder: input_ids must be (batch, seq_len), got shape "
                       f"{tuple(input_ids.shape)}")
    skip = int(clip_skip)
    if not 0 <= skip <= self.config.num_hidden_layers:
      raise ValueError(f"CLIPTextEncoder: clip_skip={clip_skip} must be in [0, "
                       f"{self.config.num_hidden_layers}] (the number of hidden layers)")
    return _TextTransformer(self.config, self.dtype, self.attention_impl,
                            name="text_model")(input_ids, skip)


# ---------------------------------------------------------------------------- weights


def param_shapes(config: CLIPTextConfig) -> PyTree:
  """The params tree of `CLIPTextEncoder(config)` as ShapeDtypeStructs (no compute)."""
  model = CLIPTextEncoder(config)
  ids = jax.ShapeDtypeStruct((1, min(8, config.max_position_embeddings)), jnp.int32)
  return jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), i), ids)["params"]


def _add_prefix(key: str) -> str:
  return key if key.startswith(PREFIX) else PREFIX + key


def params_from_torch(config: CLIPTextConfig, state_dict: Mapping[str, Any],
                      where: str = "text_encoder") -> dict:
  """A transformers ``CLIPTextModel`` state dict (numpy or torch tensors) -> Flax params.

  Accepts both key layouts: the hub / transformers 4 one (``text_model.encoder.layers.0...``,
  what SD checkpoints hold) and transformers 5's in-memory and ``save_pretrained`` one without
  the ``text_model.`` prefix. Raises `WeightsError` naming the parameter (and both shapes) when
  the checkpoint does not fit `config`; ``position_ids`` buffers are ignored.
  """
  return sdict.to_flax(state_dict, param_shapes(config), rename=_add_prefix,
                       ignore=IGNORED_KEYS, where=where)


def state_dict_from_params(config: CLIPTextConfig, params: PyTree, *,
                           text_model_prefix: bool = True) -> dict[str, np.ndarray]:
  """Flax params -> a transformers ``CLIPTextModel`` state dict (numpy float32).

  Keys are ``text_model.…`` (the hub / SD checkpoint layout, which transformers 4 and 5 both
  load) or, with ``text_model_prefix=False``, transformers 5's unprefixed layout. Checks the
  tree against `config` first (WeightsError naming the parameter on a mismatch).
  """
  want = {"/".join(p): tuple(v.shape) for p, v in flatten_dict(param_shapes(config)).items()}
  have = {"/".join(p): tuple(np.shape(v)) for p, v in flatten_dict(params).items()}
  if set(want) != set(have):
    raise sdict.WeightsError(
        f"params do not match the CLIPTextConfig: missing {sorted(set(want) - set(have))[:5]}, "
        f"unexpected {sorted(set(have) - set(want))[:5]}")
  for name, shape in want.items():
    if have[name] != shape:
      raise sdict.WeightsError(f"parameter {name!r} has shape {have[name]}, the config expects "
                               f"{shape}")
  out = sdict.from_flax(params)
  return out if text_model_prefix else {k[len(PREFIX):]: v for k, v in out.items()}


def load(directory: str | os.PathLike, dtype: Dtype = jnp.float32
         ) -> tuple[CLIPTextEncoder, dict]:
  """Reads a ``save_pretrained`` CLIPTextModel directory (e.g. an SD ``text_encoder/``).

  Needs ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, which needs torch).
  Returns the module and its float32 params.
  """
  d = Path(directory)
  config = config_from_hf(sdict.read_config(d), where=str(d / "config.json"))
  params = params_from_torch(config, sdict.read_weights(d), where=str(d))
  return CLIPTextEncoder(config, dtype=dtype), params


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
  """CLIP/GPT-2's reversible byte -> printable unicode character table (256 entries).

  Printable Latin-1 bytes map to themselves; the remaining bytes, in increasing order, map to
  ``chr(256 + n)``. Dict order is the vocabulary order of the 256 base tokens.
  """
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in keep}
  n = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + n)
      n += 1
  return table


def _read_merges(bpe_path: Path) -> list[tuple[str, str]]:
  try:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"{bpe_path} is not a gzipped CLIP BPE merges file "
                     f"(bpe_simple_vocab_16e6.txt.gz): {e}") from e
  body = lines[1:NUM_MERGES + 1]
  if len(body) < NUM_MERGES:
    raise ValueError(f"{bpe_path} has {len(body)} merge lines after the header; CLIP's "
                     f"bpe_simple_vocab_16e6.txt.gz has at least {NUM_MERGES}")
  merges = []
  for i, line in enumerate(body, start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{bpe_path} line {i}: expected two space-separated symbols, got "
                       f"{line!r}")
    merges.append((parts[0], parts[1]))
  return merges


def clip_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
  """CLIP's token list (index = id) from its merges (see the module docstring)."""
  base = list(bytes_to_unicode().values())
  vocab = base + [b + "</w>" for b in base] + [a + b for a, b in merges]
  return vocab + [BOS_TOKEN, EOS_TOKEN]


def write_tokenizer_files(directory: str | os.PathLike, bpe_path: str | os.PathLike | None = None,
                          model_max_length: int = 77, pad_token: str = EOS_TOKEN) -> Path:
  """Writes a transformers ``CLIPTokenizer`` directory from CLIP's BPE merges file.

  Files (each written atomically): ``vocab.json``, ``merges.txt`` (``#version: 0.2`` header
  then the 48894 merges), ``tokenizer_config.json``, ``special_tokens_map.json``.

  Args:
    directory: where to write (created if needed).
    bpe_path: ``bpe_simple_vocab_16e6.txt.gz``; None fetches the ``clip_bpe_vocab`` asset.
    model_max_length: the tokenizer's default ``max_length`` (77 for SD).
    pad_token: ``"<|endoftext|>"`` for SD 1.x (OpenAI CLIP), ``"!"`` for SD 2.x (OpenCLIP).
  Returns:
    The directory.
  """
  if bpe_path is None:
    from synthbandit_jax import assets  # pylint: disable=g-import-not-at-top
    bpe_path = assets.fetch("clip_bpe_vocab")
  bpe_path = Path(bpe_path)
  if not bpe_path.is_file():
    raise FileNotFoundError(f"CLIP BPE merges file {bpe_path} does not exist; pass the path of "
                            "bpe_simple_vocab_16e6.txt.gz or None to fetch the asset")
  merges = _read_merges(bpe_path)
  tokens = clip_vocab(merges)
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
    raise ValueError(f"{bpe_path} yields {len(vocab)} distinct tokens ({len(tokens)} in all), "
                     f"CLIP's vocabulary has {VOCAB_SIZE}; is it the right file?")
  if pad_token not in vocab:
    raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary; use "
                     f"{EOS_TOKEN!r} (SD 1.x) or '!' (SD 2.x)")
  d = Path(directory)
  special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
             "pad_token": pad_token}
  sio.atomic_write_text(d / "vocab.json", json.dumps(vocab, ensure_ascii=False))
  sio.atomic_write_text(d / "merges.txt",
                        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  sio.atomic_write_json(d / "special_tokens_map.json", special)
  sio.atomic_write_json(d / "tokenizer_config.json", {
      "tokenizer_class": "CLIPTokenizer", "model_max_length": int(model_max_length),
      "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special})
  return d


def load_tokenizer(directory: str | os.PathLike):
  """transformers ``CLIPTokenizer.from_pretrained(directory)`` with a clear missing-file error."""
  d = Path(directory)
  if not d.is_dir():
    raise FileNotFoundError(f"tokenizer directory {d} does not exist; create it with "
                            "clip_text.write_tokenizer_files(directory)")
  if not (d / "tokenizer.json").is_file():
    missing = [n for n in ("vocab.json", "merges.txt") if not (d / n).is_file()]
    if missing:
      raise FileNotFoundError(f"tokenizer directory {d} lacks {missing}; create them with "
                              "clip_text.write_tokenizer_files(directory)")
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  return CLIPTokenizer.from_pretrained(str(d))


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
  """Prompts -> int32 ids (B, max_length), padded and truncated like diffusers' SD pipeline.

  ``<|startoftext|>`` prompt tokens ``<|endoftext|>`` then pad tokens; a long prompt is cut so
  that the end-of-text token is still the last one.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  enc = tokenizer(list(prompts), padding="max_length", max_length=int(max_length),
                  truncation=True, return_tensors="np")
  return np.asarray(enc["input_ids"], dtype=np.int32)
