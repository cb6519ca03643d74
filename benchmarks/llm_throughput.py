"""LLM generation throughput (tokens/s): our jitted Flax Llama `generate` vs. transformers.

  python benchmarks/llm_throughput.py                     # SmolLM2-135M-Instruct, batch 8
  python benchmarks/llm_throughput.py --tiny --repeats=2  # small random Llama, no asset
  python benchmarks/llm_throughput.py --batch=1 --new-tokens=128 --out=/tmp/llm.json

Model: by default SmolLM2-135M-Instruct from the GGUF asset (`assets.fetch(
"smollm2_135m_q4_1")`, or `--gguf=PATH`), dequantized to float32 by
`weights.llama_import.load_gguf`. The PyTorch peer is transformers' `LlamaForCausalLM` built
from the same config and loaded with exactly our float32 arrays (HF weight = our kernel^T),
so both sides compute with identical weights (checked bit for bit before timing). `--tiny`
instead builds a 2-layer random Llama (vocab 512, hidden 64) for a quick smoke test.

Batch: `--batch` rows of SmolLM2 chat prompts (system + user turn + assistant header, from
the GGUF's tokenizer and chat template; 54-59 real tokens each), left-padded to
`--prompt-len` columns (a longer prompt keeps its last `--prompt-len` tokens). Both sides
get the same [B, T] ids and 0/1 mask; positions are cumsum(mask) - 1 on both sides.

Decoding: greedy on both sides, exactly `--new-tokens` tokens per row:
- ours: `llama.generate(params, config, tokens, mask, N, eos_id=None)` -- one jitted call
  (prefill, then a `lax.while_loop` of N one-token steps with a preallocated KV cache);
- torch: `model.generate(ids, attention_mask=mask, do_sample=False, use_cache=True,
  max_new_tokens=N, min_new_tokens=N)` under `torch.inference_mode()`, with
  `generation_config.eos_token_id = None` (so no row stops early and no eos logit is
  masked, which keeps the greedy tokens comparable) and `pad_token_id` set.

Timing: `--warmup` untimed calls per side first (ours: the first call traces and compiles;
its time is reported as "compile+first"), then `--repeats` timed calls, interleaved ours /
torch so that load from other processes hits both alike. Reported per side:

  gen tok/s     = B * N / (total generate seconds)           (the headline; ratio = ours / torch)
  prefill tok/s = B * T / (prefill seconds)                  (padded prompt tokens)
  decode tok/s  = B * N / (total - prefill seconds)

The prefill seconds are measured by a separate prefill-only call that does what each
`generate` does before its first decode step: ours runs the model over the padded prompt
into a fresh cache of length T + N (logits only at each row's last real token, as
`generate` does); torch runs `model(ids, attention_mask, position_ids, use_cache=True,
logits_to_keep=1)` (what `generate` passes on its first step). Decode = total - prefill is therefore an estimate.

Agreement: for every row, the number of leading generated tokens on which both sides agree
(float32 on both sides, but different kernels, so long continuations may drift apart on
near-ties). It is printed, never fails the run.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

try:
  import synthbandit_jax  # noqa: F401  (installed, or run from the repo root)
except ImportError:  # run as `python benchmarks/llm_throughput.py` without installing
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax import io as sio
from synthbandit_jax.models import llama

# User turns of the default batch; with SmolLM2's chat template each prompt is 54-59 tokens.
_QUESTIONS = (
    "List ten attributes that vary between photos of golden retrievers, such as pose, lighting "
    "and background. Keep each item to one short line.",
    "Describe a car accident scene in detail, as a witness would report it to the police: "
    "the weather, the vehicles and what happened first.",
    "Write a short poem about the sea at night, in the style of an old sailor's song, with "
    "four verses and a chorus that repeats.",
    "Explain why the sky is blue to a curious ten year old child, in three sentences, "
    "without using any technical words.",
    "Give me a recipe for a quick vegetarian dinner for two people that uses chickpeas, "
    "spinach and rice, with the steps numbered.",
    "What are the main differences between a violin and a viola? Compare their size, "
    "sound and the music written for each.",
    "Summarize the plot of a detective story set in a snowy mountain village where the "
    "only road has been blocked for a week.",
    "Suggest five names for a small family bakery that specializes in sourdough bread and "
    "explain in one sentence why each name works.",
)

_TINY_CONFIG = llama.LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rope_theta=100000.0, tie_word_embeddings=True,
    max_position_embeddings=1024)


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--batch", type=int, default=8, help="Prompts per batch (rows), both sides.")
  p.add_argument("--prompt-len", "--prompt_len", type=int, default=64,
                 help="Padded prompt width T (the chat prompts are left-padded to it).")
  p.add_argument("--new-tokens", "--new_tokens", type=int, default=64,
                 help="Generated tokens per row, both sides.")
  p.add_argument("--repeats", type=int, default=3, help="Timed generate calls per side.")
  p.add_argument("--warmup", type=int, default=1,
                 help="Untimed warm-up calls per side (>= 1; ours compiles in the first).")
  p.add_argument("--tiny", action="store_true",
                 help="Small random Llama (no asset, random prompt ids): a smoke test.")
  p.add_argument("--gguf", default=None,
                 help="Llama GGUF file; default: the SmolLM2-135M-Instruct asset, "
                      "assets.fetch('smollm2_135m_q4_1').")
  p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                 help="Where both sides run; auto = gpu if JAX has one, else cpu.")
  p.add_argument("--torch-threads", "--torch_threads", type=int, default=0,
                 help="torch.set_num_threads value; 0 = os.cpu_count().")
  p.add_argument("--seed", type=int, default=0, help="Seed for the --tiny weights and ids.")
  p.add_argument("--out", "--json", dest="out", default=None,
                 help="Optional JSON file for the results (written atomically).")
  args = p.parse_args(argv)
  for name in ("batch", "prompt_len", "new_tokens", "repeats", "warmup"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
  return args


def _resolve_device(name: str) -> str:
  """'auto' -> 'gpu' when JAX's default backend is a GPU, else 'cpu'."""
  if name == "auto":
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
  return name


def _jax_device(kind: str) -> jax.Device:
  """The first JAX device of `kind` ('cpu' or 'gpu')."""
  try:
    return jax.devices(kind)[0]
  except RuntimeError as e:
    raise SystemExit(f"--device={kind}: JAX has no {kind} backend ({e}); "
                     "pass --device=cpu or install a jax build for that device.") from e


def _import_torch_and_transformers():
  """Returns (torch, transformers), or exits naming how to install them."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(
        f"llm_throughput: {e.name} is not installed, so there is no peer to compare with. "
        "Install the optional extra: `pip install -e .[torch]` and `pip install "
        "'transformers>=5'` (on the project's CPU machines: `.venv/bin/pip install "
        "torch==2.13.0 transformers==5.24.0`).") from None
  return torch, transformers


# ---------------------------------------------------------------- model and prompts


def _tiny_model(seed: int) -> tuple[llama.LlamaConfig, dict]:
  """_TINY_CONFIG with random float32 numpy params (std 0.3, norm scales ~1, so the logits
  are O(1) and greedy argmax is not decided by rounding noise)."""
  config = _TINY_CONFIG
  params = llama.Llama(config).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  new = [np.asarray(jax.random.normal(k, x.shape) * 0.3
                    + (1.0 if path[-1].key == "scale" else 0.0), np.float32)
         for k, (path, x) in zip(keys, leaves)]
  return config, jax.tree.unflatten(tree, new)


def _gguf_model(path: str | None) -> tuple[llama.LlamaConfig, dict, Any, str]:
  """(config, float32 numpy params, tokenizer or None, gguf path) of the GGUF model."""
  from synthbandit_jax.weights import llama_import  # pylint: disable=import-outside-toplevel
  if path is None:
    from synthbandit_jax import assets  # pylint: disable=import-outside-toplevel
    try:
      path = str(assets.fetch("smollm2_135m_q4_1"))
    except Exception as e:  # pylint: disable=broad-except
      raise SystemExit(f"llm_throughput: the SmolLM2 GGUF asset 'smollm2_135m_q4_1' could not "
                       f"be fetched ({type(e).__name__}: {e}); pass --gguf=PATH to a llama "
                       "GGUF file, or --tiny for a random model.") from e
  config, params = llama_import.load_gguf(path)
  tokenizer = None
  try:
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    d, f = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
  except Exception as e:  # pylint: disable=broad-except
    print(f"note: no tokenizer from {path} ({type(e).__name__}: {e}); using random prompt ids")
  return config, params, tokenizer, path


def _prompt_batch(tokenizer, config: llama.LlamaConfig, batch: int, width: int, pad_id: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """Left-padded int32 ids [B, width], bool mask [B, width] and each row's real length."""
  rows: list[list[int]] = []
  for i in range(batch):
    if tokenizer is not None:
      q = _QUESTIONS[i % len(_QUESTIONS)]
      enc = tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=True)
      ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    else:  # random ids, real lengths from width down to ~width / 2
      n = max(1, width - (5 * i) % max(1, width // 2))
      ids = np.random.default_rng(seed + i).integers(0, config.vocab_size, n).tolist()
    rows.append([int(t) for t in ids[-width:]])
  tokens = np.full((batch, width), pad_id, np.int32)
  mask = np.zeros((batch, width), bool)
  for i, ids in enumerate(rows):
    tokens[i, width - len(ids):] = ids
    mask[i, width - len(ids):] = True
  return tokens, mask, [len(r) for r in rows]


def _torch_llama(torch, transformers, config: llama.LlamaConfig, params: dict, device: str):
  """transformers' LlamaForCausalLM of `config` holding exactly `params` (float32)."""
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling:
    rope = dict(dict(config.rope_scaling), rope_theta=config.rope_theta)
  hc = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
      tie_word_embeddings=config.tie_word_embeddings,
      max_position_embeddings=config.max_position_embeddings,
      bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
  model = transformers.LlamaForCausalLM(hc).float().eval()
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy
  sd = {"model.embed_tokens.weight": t(params["embed"]["embedding"]),
        "model.norm.weight": t(params["norm"]["scale"])}
  for i in range(config.num_layers):
    p, w = f"model.layers.{i}.", llama.layer_weights(params, config, i)
    sd[p + "input_layernorm.weight"] = t(w["input_layernorm"])
    sd[p + "post_attention_layernorm.weight"] = t(w["post_attention_layernorm"])
    for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
      sd[p + f"self_attn.{k}.weight"] = t(w[k].T)
    for k in ("gate_proj", "up_proj", "down_proj"):
      sd[p + f"mlp.{k}.weight"] = t(w[k].T)
  if not config.tie_word_embeddings:
    sd["lm_head.weight"] = t(params["lm_head"]["kernel"].T)
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
  if missing or unexpected:
    raise RuntimeError(f"torch peer: state dict mismatch, missing={missing} "
                       f"unexpected={unexpected} (transformers {transformers.__version__})")
  if config.tie_word_embeddings:
    model.lm_head.weight = model.model.embed_tokens.weight
  model = model.to(device)
  # Identical weights, checked bit for bit (the tied head included).
  got = {k: v.detach().cpu() for k, v in model.state_dict().items()}
  for k, v in sd.items():
    if not torch.equal(got[k], v):
      raise RuntimeError(f"torch peer: weight {k} differs from ours after loading")
  if config.tie_word_embeddings and not torch.equal(
      model.lm_head.weight.detach().cpu(), sd["model.embed_tokens.weight"]):
    raise RuntimeError("torch peer: lm_head is not tied to the embedding")
  gc = model.generation_config
  gc.eos_token_id = None  # fixed token count on both sides (ours: eos_id=None)
  gc.bos_token_id = config.bos_token_id
  gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
  return model


# ---------------------------------------------------------------- runners


@functools.partial(jax.jit, static_argnames=("config", "cache_len"))
def _our_prefill(params, config: llama.LlamaConfig, tokens, mask, cache_len: int):
  """What `llama.generate` does before its first decode step (prompt into a fresh cache,
  logits only at each row's last real token)."""
  b, t = tokens.shape
  mask = mask.astype(bool)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  cache = llama.init_cache(config, b, cache_len)
  last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  logits, cache = llama.Llama(config).apply({"params": params}, tokens, positions, mask, cache,
                                            logits_at=last)
  return jnp.argmax(logits[:, 0], axis=-1), cache


class _OursRunner:
  """`llama.generate` (greedy, no eos) on device-resident params and prompts."""

  def __init__(self, config, params, tokens, mask, new_tokens: int, pad_id: int,
               device: jax.Device):
    self.config, self.n, self.pad_id = config, new_tokens, pad_id
    self.params = jax.device_put(params, device)
    self.tokens = jax.device_put(tokens, device)
    self.mask = jax.device_put(mask, device)

  def generate(self) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = llama.generate(self.params, self.config, self.tokens, self.mask, self.n,
                         eos_id=None, pad_id=self.pad_id)
    jax.block_until_ready(out)
    secs = time.perf_counter() - t0
    return secs, np.asarray(out["tokens"])

  def prefill(self) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(_our_prefill(self.params, self.config, self.tokens, self.mask,
                                       self.tokens.shape[1] + self.n))
    return time.perf_counter() - t0

  @staticmethod
  def compiles() -> dict[str, int]:
    """Executables in the jit caches (1 each: no recompiles across calls)."""
    return {"generate": llama.generate._cache_size(),  # pylint: disable=protected-access
            "prefill": _our_prefill._cache_size()}  # pylint: disable=protected-access


class _TorchRunner:
  """transformers' `generate` (greedy, fixed count) and a prefill-only forward."""

  def __init__(self, torch, model, tokens, mask, new_tokens: int, pad_id: int, device: str):
    self.torch, self.model, self.n, self.pad_id = torch, model, new_tokens, pad_id
    self.device = torch.device(device)
    self.ids = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
    self.mask = torch.from_numpy(mask.astype(np.int64)).to(self.device)
    self.pos = torch.from_numpy(np.maximum(np.cumsum(mask, axis=1) - 1, 0)).to(self.device)

  def _sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def generate(self) -> tuple[float, np.ndarray]:
    torch = self.torch
    self._sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
      out = self.model.generate(self.ids, attention_mask=self.mask, do_sample=False,
                                use_cache=True, max_new_tokens=self.n, min_new_tokens=self.n,
                                pad_token_id=self.pad_id)
    self._sync()
    secs = time.perf_counter() - t0
    new = out[:, self.ids.shape[1]:].cpu().numpy()
    if new.shape != (self.ids.shape[0], self.n):
      raise RuntimeError(f"torch generate returned {new.shape[1]} new tokens per row, "
                         f"expected --new-tokens={self.n}")
    return secs, new

  def prefill(self) -> float:
    torch = self.torch
    self._sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
      out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                       use_cache=True, logits_to_keep=1)
      _ = out.logits[:, -1].argmax(-1).cpu()
    self._sync()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- driver


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> list[int]:
  """Per row: how many leading generated tokens are equal."""
  out = []
  for a, b in zip(ours, theirs):
    diff = np.nonzero(a != b)[0]
    out.append(int(diff[0]) if diff.size else int(len(a)))
  return out


def _load_average() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def main(argv: Sequence[str] | None = None) -> None:
  args = _parse_args(argv)
  torch, transformers = _import_torch_and_transformers()
  kind = _resolve_device(args.device)
  if kind == "gpu" and not torch.cuda.is_available():
    raise SystemExit(f"--device=gpu but torch {torch.__version__} sees no CUDA device; "
                     "install a CUDA build of torch or pass --device=cpu.")
  jdev = _jax_device(kind)
  tdev = "cuda" if kind == "gpu" else "cpu"
  torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)

  t0 = time.perf_counter()
  tokenizer, source = None, "tiny random Llama"
  if args.tiny:
    config, params = _tiny_model(args.seed)
  else:
    config, params, tokenizer, source = _gguf_model(args.gguf)
  pad_id = 0
  if tokenizer is not None and tokenizer.pad_token_id is not None:
    pad_id = int(tokenizer.pad_token_id)
  b, t, n = args.batch, args.prompt_len, args.new_tokens
  if t + n > config.max_position_embeddings:
    print(f"note: --prompt-len + --new-tokens = {t + n} exceeds the model's "
          f"max_position_embeddings={config.max_position_embeddings}")
  tokens, mask, lengths = _prompt_batch(tokenizer, config, b, t, pad_id, args.seed)
  model = _torch_llama(torch, transformers, config, params, tdev)
  setup_s = time.perf_counter() - t0

  machine = {"jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
             "device": kind, "torch": torch.__version__, "transformers": transformers.__version__,
             "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "platform": platform.platform(), "python": platform.python_version()}
  if kind == "gpu":
    machine["torch_cuda_device"] = torch.cuda.get_device_name(0)
  n_params = llama.num_params(params)
  print(f"jax {machine['jax']} devices={machine['jax_devices']} | torch {machine['torch']} "
        f"threads={machine['torch_threads']} (os.cpu_count()={machine['cpu_count']}) | "
        f"transformers {machine['transformers']} | device={kind}")
  print(f"model: {source} ({n_params / 1e6:.1f}M params, {config.num_layers} layers, "
        f"hidden {config.hidden_size}, vocab {config.vocab_size}), float32 on both sides, "
        f"identical weights (checked); setup {setup_s:.1f}s")
  print(f"batch {b} x prompt {t} (left-padded; real lengths {min(lengths)}-{max(lengths)}, "
        f"{sum(lengths)} real tokens) + {n} new tokens, greedy, no eos stop; "
        f"warmup {args.warmup}, timed {args.repeats}")
  machine["load_average_before"] = _load_average()
  print(f"load average (1, 5, 15 min) before: {machine['load_average_before']} -- other "
        "processes on the machine distort both sides' numbers")

  ours = _OursRunner(config, params, tokens, mask, n, pad_id, jdev)
  peer = _TorchRunner(torch, model, tokens, mask, n, pad_id, tdev)
  warm: dict[str, list[float]] = {"ours": [], "torch": [], "ours_prefill": [],
                                  "torch_prefill": []}
  for _ in range(args.warmup):
    warm["ours"].append(ours.generate()[0])
    warm["ours_prefill"].append(ours.prefill())
    warm["torch"].append(peer.generate()[0])
    warm["torch_prefill"].append(peer.prefill())

  times: dict[str, list[float]] = {k: [] for k in warm}
  ours_tokens = torch_tokens = None
  for _ in range(args.repeats):  # interleaved, so background load hits both sides alike
    secs, ours_tokens = ours.generate()
    times["ours"].append(secs)
    times["ours_prefill"].append(ours.prefill())
    secs, torch_tokens = peer.generate()
    times["torch"].append(secs)
    times["torch_prefill"].append(peer.prefill())
  agree = _agreement(ours_tokens, torch_tokens)
  compiles = ours.compiles()

  res: dict[str, Any] = {}
  for side in ("ours", "torch"):
    total = statistics.median(times[side])
    pre = statistics.median(times[f"{side}_prefill"])
    dec = max(total - pre, 1e-9)
    res[side] = {"generate_s": total, "best_generate_s": min(times[side]),
                 "prefill_s": pre, "decode_s": dec,
                 "gen_tok_per_s": b * n / total, "best_gen_tok_per_s": b * n / min(times[side]),
                 "prefill_tok_per_s": b * t / pre, "decode_tok_per_s": b * n / dec,
                 "decode_ms_per_step": 1e3 * dec / n,
                 "first_call_s": warm[side][0]}
  ratio = {k: res["ours"][k] / res["torch"][k]
           for k in ("gen_tok_per_s", "best_gen_tok_per_s", "prefill_tok_per_s",
                     "decode_tok_per_s")}

  print("medians over timed calls; gen tok/s = B*N / generate s; prefill tok/s = B*T / "
        "prefill s; decode tok/s = B*N / (generate - prefill) s")
  print(f"{'side':>6} {'gen tok/s':>10} {'best':>8} {'prefill tok/s':>14} {'decode tok/s':>13}"
        f" {'ms/step':>8} {'generate s':>11} {'first call s':>13}")
  for side in ("ours", "torch"):
    r = res[side]
    print(f"{side:>6} {r['gen_tok_per_s']:>10.1f} {r['best_gen_tok_per_s']:>8.1f} "
          f"{r['prefill_tok_per_s']:>14.1f} {r['decode_tok_per_s']:>13.1f} "
          f"{r['decode_ms_per_step']:>8.1f} {r['generate_s']:>11.3f} {r['first_call_s']:>13.2f}")
  print(f" ratio {ratio['gen_tok_per_s']:>9.2f}x {ratio['best_gen_tok_per_s']:>7.2f}x "
        f"{ratio['prefill_tok_per_s']:>13.2f}x {ratio['decode_tok_per_s']:>12.2f}x   "
        "(ours / torch)")
  print(f"ours: compile+first generate {res['ours']['first_call_s']:.2f}s (torch first call "
        f"{res['torch']['first_call_s']:.2f}s), jit cache sizes {compiles} (1 = no recompiles)")
  print(f"greedy agreement (leading equal tokens of {n}, per row): {agree}; rows fully equal: "
        f"{sum(a == n for a in agree)}/{b}")
  if tokenizer is not None:
    row = int(np.argmin(agree))
    print(f"  row {row} ours : {tokenizer.decode(ours_tokens[row].tolist())!r}")
    print(f"  row {row} torch: {tokenizer.decode(torch_tokens[row].tolist())!r}")
  machine["load_average_after"] = _load_average()
  print(f"load average after: {machine['load_average_after']}")
  spread = {side: max(times[side]) / min(times[side]) for side in ("ours", "torch")}
  if max(spread.values()) > 1.5:
    print(f"WARNING: generate times vary {spread['ours']:.1f}x (ours) / {spread['torch']:.1f}x "
          "(torch) across repeats: other processes are using the CPU (torch with as many "
          "threads as cores collapses worst). Trust the 'best' column, or rerun pinned, e.g. "
          "`taskset -c 1 ... --torch-threads=1`.")

  if args.out:
    config_out = {"model": source, "num_params": n_params, "llama_config": repr(config),
                  "batch": b, "prompt_len": t, "prompt_real_lengths": lengths,
                  "new_tokens": n, "repeats": args.repeats, "warmup": args.warmup,
                  "tiny": args.tiny, "seed": args.seed, "dtype": "float32",
                  "decoding": "greedy, no eos stop, fixed new_tokens"}
    results = {"ours": res["ours"], "torch": res["torch"], "ratio_ours_over_torch": ratio,
               "seconds": times, "warmup_seconds": warm, "our_jit_cache_sizes": compiles,
               "greedy_agreement_prefix": agree, "repeat_spread_max_over_min": spread}
    path = sio.atomic_write_json(args.out, {"machine": machine, "config": config_out,
                                              "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
