"""Llama-family decoder in Flax linen, with an explicit KV cache and jitted generation.

Architecture (matches transformers' ``LlamaForCausalLM``): token embedding, ``num_layers``
pre-norm blocks (RMSNorm -> grouped-query attention with rotary embeddings -> residual,
RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, LM head (tied to the embedding or not).
Rotary embeddings use the HF "rotate_half" layout: the first and second halves of each head
dimension form the (x, y) pairs, ``inv_freq[i] = theta ** (-2i / head_dim)``.

Params are float32; ``dtype`` sets the compute dtype (bfloat16 on accelerators). Norms,
softmax statistics and logits are float32. The layers are an unrolled Python loop (not
``nn.scan``): each layer's weights and KV cache are separate buffers, so a decode step inside
``generate``'s while loop reads them in place. (A scanned stack makes XLA copy every layer's
weight slice and the whole stacked cache on every step: 1.5x slower decoding on CPU.)
Q/K/V and gate/up are fused into one matmul each (one weight read, one GEMM call):

    params = {"embed": {"embedding": [V, D]},
              "layers_0" ... "layers_{L-1}": {
                  "input_norm": {"scale": [D]},
                  "attn": {"qkv_proj": {"kernel": [D, (H + 2 * Hkv) * Dh]},   # q | k | v
                           "o_proj": {"kernel": [H * Dh, D]}},
                  "post_attention_norm": {"scale": [D]},
                  "mlp": {"gate_up_proj": {"kernel": [D, 2 * F]},             # gate | up
                          "down_proj": {"kernel": [F, D]}}},
              "norm": {"scale": [D]},
              "lm_head": {"kernel": [D, V]}}          # only when not tied

Kernels are HF weights transposed ([in, out]); `layer_weights` gives one layer back as
HF-named [in, out] arrays (q, k, v, gate, up split out).

KV cache: a plain pytree (see `init_cache`), passed in and returned explicitly:

    logits, cache = model.apply({"params": params}, tokens, positions, mask, cache)

``cache["k"]`` / ``cache["v"]`` are tuples of L arrays [B, Hkv, S, Dh] (heads before slots,
so the attention contracts without a transpose). ``tokens``/``positions``/``mask`` are
[B, T]. The T new tokens are written at cache slots ``cache["index"] .. index + T - 1``; a
query at slot q attends to key slot s iff ``s <= q`` and slot s holds a real token
(``cache["mask"]``). Positions are explicit, so left- and right-padded batches both work
(padding slots are simply never attended to). With ``cache=None`` a cache of length T is
created, i.e. a plain full-sequence forward.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Cache = dict


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama decoder (names follow HF's ``LlamaConfig`` where possible).

  ``rope_scaling``: None, or a tuple of (key, value) pairs (hashable, so the config can be a
  static jit argument) with ``rope_type`` "linear" (``factor``) or "llama3" (``factor``,
  ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  rope_scaling: tuple | None = None
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig: num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Rotary inverse frequencies [head_dim // 2] (float64 numpy), with optional scaling."""
  d = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  if not config.rope_scaling:
    return inv
  rs = dict(config.rope_scaling)
  kind = rs.get("rope_type", rs.get("type", "default"))
  if kind == "default":
    return inv
  if kind == "linear":
    return inv / float(rs["factor"])
  if kind == "llama3":
    factor = float(rs["factor"])
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_ctx = float(rs["original_max_position_embeddings"])
    wavelen = 2 * np.pi / inv
    low_wl, high_wl = old_ctx / low, old_ctx / high
    scaled = np.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(is_mid, mid, scaled)
  raise ValueError(f"LlamaConfig.rope_scaling: rope_type {kind!r} is not supported "
                   "(use None, 'default', 'linear' or 'llama3')")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x [B, T, H, D] by positions [B, T] in the HF rotate_half layout."""
  ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with a learned scale (computed in float32, like HF)."""
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (scale * xf.astype(self.dtype).astype(jnp.float32)).astype(self.dtype)


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(0.02), name=name)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
              implementation: str | None = None) -> jax.Array:
  """Grouped-query attention; q [B, T, H, Dh], k/v [B, Hkv, S, Dh], mask [B, T, S] bool.

  Returns [B, T, H, Dh]. implementation=None: two einsums with float32 scores and softmax
  (no layout change of the cache; XLA's generic path). Otherwise ("cudnn", "xla") it goes
  to `jax.nn.dot_product_attention` (fused kernels on GPU) with k/v in its [B, S, Hkv, Dh]
  layout.
  """
  b, t, h, dh = q.shape
  hkv = k.shape[1]
  if implementation is not None:
    return jax.nn.dot_product_attention(
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask[:, None],
        scale=scale, implementation=implementation)
  qg = q.reshape(b, t, hkv, h // hkv, dh)
  s = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", p, v)
  return out.reshape(b, t, h, dh)


class LlamaAttention(nn.Module):
  """Grouped-query self-attention that reads and writes one layer's KV cache."""
  config: LlamaConfig
  dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, positions, attn_mask, index, k_cache, v_cache):
    c = self.config
    b, t, _ = x.shape
    nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    qkv = _dense(nq + 2 * nkv, "qkv_proj", self.dtype)(x)
    q, k, v = jnp.split(qkv, [nq, nq + nkv], axis=-1)
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    inv_freq = rope_inv_freq(c)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    k = k.astype(k_cache.dtype).transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh]
    v = v.astype(v_cache.dtype).transpose(0, 2, 1, 3)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k, (0, 0, index, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v, (0, 0, index, 0))
    out = attention(q, k_cache.astype(self.dtype), v_cache.astype(self.dtype), attn_mask,
                    c.head_dim ** -0.5, self.attention_impl)
    out = out.reshape(b, t, nq)
    return _dense(c.hidden_size, "o_proj", self.dtype)(out), k_cache, v_cache


class LlamaMLP(nn.Module):
  """SwiGLU MLP: down(silu(gate(x)) * up(x)), gate and up as one fused matmul."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    g, u = jnp.split(_dense(2 * c.intermediate_size, "gate_up_proj", self.dtype)(x), 2,
                     axis=-1)
    return _dense(c.hidden_size, "down_proj", self.dtype)(nn.silu(g) * u)


class LlamaBlock(nn.Module):
  """One pre-norm decoder layer: (x, kv) -> (x, updated kv)."""
  config: LlamaConfig
  dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, positions, attn_mask, index, kv):
    k_cache, v_cache = kv
    c = self.config
    h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_norm")(x)
    h, k_cache, v_cache = LlamaAttention(c, self.dtype, self.attention_impl, name="attn")(
        h, positions, attn_mask, index, k_cache, v_cache)
    x = x + h
    h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_norm")(x)
    x = x + LlamaMLP(c, self.dtype, name="mlp")(h)
    return x, (k_cache, v_cache)


def init_cache(config: LlamaConfig, batch: int, max_len: int,
               dtype: Any = jnp.float32) -> Cache:
  """An empty KV cache: k, v = tuples of L arrays [B, Hkv, max_len, Dh]; mask [B, max_len]
  bool; index () int32."""
  shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return {"k": zeros(), "v": zeros(), "mask": jnp.zeros((batch, max_len), bool),
          "index": jnp.zeros((), jnp.int32)}


def layer_weights(params: Mapping, config: LlamaConfig, i: int) -> dict:
  """Layer i's weights as HF-named [in, out] kernels (fused q|k|v and gate|up split):
  {"input_layernorm", "post_attention_layernorm": [D]; "q_proj", "k_proj", "v_proj",
  "o_proj", "gate_proj", "up_proj", "down_proj": [in, out]} (numpy or jax arrays)."""
  c, p = config, params[f"layers_{i}"]
  nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  qkv = p["attn"]["qkv_proj"]["kernel"]
  gu = p["mlp"]["gate_up_proj"]["kernel"]
  f = c.intermediate_size
  return {"input_layernorm": p["input_norm"]["scale"],
          "post_attention_layernorm": p["post_attention_norm"]["scale"],
          "q_proj": qkv[:, :nq], "k_proj": qkv[:, nq:nq + nkv], "v_proj": qkv[:, nq + nkv:],
          "o_proj": p["attn"]["o_proj"]["kernel"],
          "gate_proj": gu[:, :f], "up_proj": gu[:, f:],
          "down_proj": p["mlp"]["down_proj"]["kernel"]}


class Llama(nn.Module):
  """Llama causal LM. ``__call__(tokens, positions, mask=None, cache=None) -> (logits, cache)``.

  logits: float32 [B, T, vocab]. ``mask`` [B, T] marks real (non-padding) tokens (default
  all real); ``positions`` default to ``cumsum(mask) - 1`` when None (only meaningful
  without a cache, i.e. for a fresh sequence).
  """
  config: LlamaConfig
  dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, tokens, positions=None, mask=None, cache: Cache | None = None,
               logits_at: jax.Array | None = None):
    """`logits_at` [B] (optional): compute the logits only at these positions -> [B, 1, V]
    (a prompt's prefill needs only its last real token's logits)."""
    c = self.config
    b, t = tokens.shape
    if mask is None:
      mask = jnp.ones((b, t), bool)
    mask = mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    if cache is None:
      cache = init_cache(c, b, t, self.dtype)
    index = cache["index"]
    s = cache["k"][0].shape[2]
    kv_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
    q_slot = index + jnp.arange(t)
    k_slot = jnp.arange(s)
    allowed = (k_slot[None, :] <= q_slot[:, None])[None] & kv_mask[:, None, :]
    # A query always sees itself, so padded query rows never have an empty softmax.
    attn_mask = allowed | (k_slot[None, :] == q_slot[:, None])[None]  # [B, T, S]

    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(0.02), name="embed")
    x = embed(tokens)
    k_new, v_new = [], []
    for i in range(c.num_layers):
      x, (k_i, v_i) = LlamaBlock(c, self.dtype, self.attention_impl, name=f"layers_{i}")(
          x, positions, attn_mask, index, (cache["k"][i], cache["v"][i]))
      k_new.append(k_i)
      v_new.append(v_i)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(c.vocab_size, "lm_head", self.dtype)(x)
    new_cache = {"k": tuple(k_new), "v": tuple(v_new), "mask": kv_mask, "index": index + t}
    return logits.astype(jnp.float32), new_cache


def forward(params: PyTree, config: LlamaConfig, tokens, mask=None, *,
            dtype: Any = jnp.float32) -> jax.Array:
  """Full-sequence logits [B, T, V] (no cache); positions from the mask."""
  logits, _ = Llama(config, dtype).apply({"params": params}, tokens, None, mask)
  return logits


_NUCLEUS_CANDIDATES = 256


def _pick(probs: jax.Array, ids: jax.Array | None, rng: jax.Array) -> jax.Array:
  """Inverse-CDF draw from unnormalised probs [B, K] (ids [B, K] maps columns to tokens).
  One uniform per row: a categorical over the vocabulary would draw V Gumbel numbers."""
  cum = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(rng, (probs.shape[0], 1), jnp.float32) * cum[:, -1:]
  col = jnp.minimum(jnp.sum(cum <= u, axis=-1), probs.shape[-1] - 1)
  tok = col if ids is None else jnp.take_along_axis(ids, col[:, None], axis=-1)[:, 0]
  return tok.astype(jnp.int32)


def _sample(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Greedy (temperature == 0) or temperature + nucleus sampling; logits [B, V] float32.

  Nucleus: the most likely tokens whose probabilities, summed in descending order, reach
  `top_p` (the token crossing it included). It is found among the 256 most likely tokens
  (`lax.top_k`, ~20 ms at B = 40, V = 49152 on CPU); only when some row's nucleus is larger
  is it the set {p >= tau} with tau found by bisection over the whole vocabulary (~80 ms;
  a [B, V] sort would take ~0.9 s, twice a SmolLM2 decode step).
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  if top_p >= 1.0:
    return _pick(jnp.exp(logits - lse), None, rng)
  v = logits.shape[-1]
  k = min(_NUCLEUS_CANDIDATES, v)
  top_logits, top_ids = jax.lax.top_k(logits, k)  # descending
  top_probs = jnp.exp(top_logits - lse)
  keep = (jnp.cumsum(top_probs, axis=-1) - top_probs) < top_p  # always keeps the top token
  kept = jnp.where(keep, top_probs, 0.0)
  if k == v:
    return _pick(kept, top_ids, rng)
  # The nucleus fits in the candidates unless the last one is kept with the mass short.
  fits = jnp.all(~keep[:, -1] | (jnp.sum(kept, axis=-1) >= top_p))

  def bisection(_):
    probs = jnp.exp(logits - lse)
    mass = lambda tau: jnp.sum(jnp.where(probs >= tau[:, None], probs, 0.0), axis=-1)

    def step(_, lo_hi):  # invariant: mass(lo) >= top_p > mass(hi)
      lo, hi = lo_hi
      mid = 0.5 * (lo + hi)
      ok = mass(mid) >= top_p
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 40, step, (jnp.zeros_like(top_probs[:, 0]), top_probs[:, 0]))
    return _pick(jnp.where(probs >= lo[:, None], probs, 0.0), None, rng)

  return jax.lax.cond(fits, lambda _: _pick(kept, top_ids, rng), bisection, None)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature",
                                             "top_p", "eos_id", "pad_id", "dtype"))
def generate(params: PyTree, config: LlamaConfig, prompt_tokens: jax.Array,
             prompt_mask: jax.Array, max_new_tokens: int, *, rng: jax.Array | None = None,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None,
             pad_id: int = 0, dtype: Any = jnp.float32, prefix_tokens: jax.Array | None = None,
             prefix_mask: jax.Array | None = None,
             prefix_index: jax.Array | None = None) -> dict:
  """Jitted generation for a padded batch of prompts (left- or right-padded, any mix).

  Args:
    prompt_tokens: int [B, T]; prompt_mask: [B, T], True/1 for real tokens (each row needs
      at least one).
    max_new_tokens: static number of decode steps (cache length = P + T + max_new_tokens).
    rng: PRNG key, required when temperature > 0 (folded with the step number).
    temperature: 0.0 = greedy; otherwise softmax temperature, with nucleus ``top_p``.
    eos_id: a row stops after emitting it (it is kept in the output); later slots = pad_id.
      The loop ends early once every row has stopped.
    prefix_tokens, prefix_mask, prefix_index: optional shared prompt prefixes. int [G, P]
      and [G, P] mask (G prefixes, padded like the prompts), and int [B] in [0, G): row b's
      prompt is the real tokens of prefix ``prefix_index[b]`` followed by row b of
      `prompt_tokens`. Each prefix runs through the model once and its KV cache is copied
      to its rows, so B prompts sharing a long start (a system prompt, worked examples) cost
      G * P + B * T prefill tokens instead of B * (P + T). Same result as the joined
      prompts (up to float rounding).
  Returns:
    {"tokens": int32 [B, max_new_tokens], "lengths": int32 [B] (tokens emitted, incl. eos),
     "finished": bool [B] (emitted eos)}.
  """
  if temperature > 0.0 and rng is None:
    raise ValueError("generate: temperature > 0 needs an rng key")
  if rng is None:
    rng = jax.random.key(0)
  if (prefix_tokens is None) != (prefix_index is None):
    raise ValueError("generate: prefix_tokens and prefix_index go together")
  model = Llama(config, dtype)
  b, t = prompt_tokens.shape
  mask = prompt_mask.astype(bool)
  if prefix_tokens is None:
    p = 0
    start = jnp.zeros((b,), jnp.int32)
    cache = init_cache(config, b, t + max_new_tokens, dtype)
  else:
    g, p = prefix_tokens.shape
    pmask = (jnp.ones((g, p), bool) if prefix_mask is None else prefix_mask.astype(bool))
    ppos = jnp.maximum(jnp.cumsum(pmask, axis=1) - 1, 0)
    _, pcache = model.apply({"params": params}, prefix_tokens, ppos, pmask,
                            init_cache(config, g, p, dtype),
                            logits_at=jnp.zeros((g,), jnp.int32))
    idx = jnp.asarray(prefix_index, jnp.int32)
    pad = ((0, 0), (0, 0), (0, t + max_new_tokens), (0, 0))
    cache = {"k": tuple(jnp.pad(k[idx], pad) for k in pcache["k"]),
             "v": tuple(jnp.pad(v[idx], pad) for v in pcache["v"]),
             "mask": jnp.pad(pmask[idx], ((0, 0), (0, t + max_new_tokens))),
             "index": jnp.asarray(p, jnp.int32)}
    start = jnp.sum(pmask, axis=1).astype(jnp.int32)[idx]
  positions = start[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  logits, cache = model.apply({"params": params}, prompt_tokens, positions, mask, cache,
                              logits_at=last)
  next_logits = logits[:, 0]
  # Position of the first new token.
  next_pos = (start + jnp.sum(mask, axis=1)).astype(jnp.int32)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  lengths = jnp.zeros((b,), jnp.int32)

  def cond(state):
    i, _, _, _, done, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, next_logits, cache, out, done, lengths, finished = state
    tok = _sample(next_logits, jax.random.fold_in(rng, i), temperature, top_p)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    lengths = lengths + (~done).astype(jnp.int32)
    if eos_id is not None:
      hit = (~done) & (tok == eos_id)
      finished = finished | hit
      done = done | hit
    logits, cache = model.apply({"params": params}, tok[:, None], (next_pos + i)[:, None],
                                jnp.ones((b, 1), bool), cache)
    return i + 1, logits[:, 0], cache, out, done, lengths, finished

  state = (jnp.zeros((), jnp.int32), next_logits, cache, out, done, lengths,
           jnp.zeros((b,), bool))
  _, _, _, out, _, lengths, finished = jax.lax.while_loop(cond, body, state)
  return {"tokens": out, "lengths": lengths, "finished": finished}


def num_params(params: Mapping) -> int:
  """Total number of parameters in a params pytree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
