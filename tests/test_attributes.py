"""Tests for generation/attributes.py: the parser, retries/fallback, files, and SmolLM2."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from synthbandit_jax.generation import attributes as ga

ROOT = Path(__file__).resolve().parent.parent

# (messy LLM text, expected parse) pairs written to look like what small chat models emit.
PARSE_CASES = [
    ("color: red, blue, green\nsize: small, medium, large",
     {"color": ["red", "blue", "green"], "size": ["small", "medium", "large"]}),
    ("- Color: Red, Blue, Green.\n* Pose: sitting; standing; running\n• Background: park / beach",
     {"color": ["red", "blue", "green"], "pose": ["sitting", "standing", "running"],
      "background": ["park", "beach"]}),
    ("1. **Lighting**: daylight, night, golden hour\n2) **Viewpoint:** front, side, rear view",
     {"lighting": ["daylight", "night", "golden hour"],
      "viewpoint": ["front", "side", "rear view"]}),
    ("Here are some attributes:\n\n1. Weather - sunny, rainy, foggy\n2. Time of day - morning, "
     "evening\n\nI hope this helps!",
     {"weather": ["sunny", "rainy", "foggy"], "time of day": ["morning", "evening"]}),
    ('```json\n{"color": ["Red", "red ", "BLUE"], "age": ["puppy", "adult"]}\n```',
     {"color": ["red", "blue"], "age": ["puppy", "adult"]}),
    ('[{"category": "Material", "values": ["wood", "metal"]}, '
     '{"name": "Shape", "values": "round, square"}]',
     {"material": ["wood", "metal"], "shape": ["round", "square"]}),
    ("The fur color can vary, such as golden, cream, and dark red.\n"
     "Different backgrounds like grass, snow or a living room.",
     {"fur color": ["golden", "cream", "dark red"],
      "backgrounds": ["grass", "snow", "a living room"]}),
    ("Color:\n  - red\n  - blue\nSize:\n  - tiny\n  - huge\n",
     {"color": ["red", "blue"], "size": ["tiny", "huge"]}),
    ("color: red, red, Red!, , blue\ncolor: green, blue",
     {"color": ["red", "blue", "green"]}),
    ("Stroke width = thin, thick\nSlant (left, right, upright)",
     {"stroke width": ["thin", "thick"], "slant": ["left", "right", "upright"]}),
    ("Category 1: value1, value2, value3\ncategory: food\nvalues: value1", {}),
    ("This is an empty sentence.", {}),
    ("", {}),
    ("   \n\n  ", {}),
    ("category: food, category: dog, category: cat", {}),
    ("Écriture: cursive, imprimée\n颜色: 红, 蓝",
     {"écriture": ["cursive", "imprimée"], "颜色": ["红", "蓝"]}),
]


@pytest.mark.parametrize("text,expected", PARSE_CASES)
def test_parse_attributes_messy_text(text, expected):
  assert ga.parse_attributes(text) == expected


def test_parse_caps_lengths_and_counts():
  many = "\n".join(f"cat{i} x: " + ", ".join(f"v{i}_{j}" for j in range(20)) for i in range(20))
  out = ga.parse_attributes(many)
  assert len(out) == ga.MAX_CATEGORIES
  assert all(len(v) == ga.MAX_VALUES for v in out.values())
  assert list(out)[0] == "cat0 x" and out["cat0 x"][:2] == ["v0_0", "v0_1"]
  long_value = "color: " + " ".join(["word"] * 30) + ", blue"
  assert ga.parse_attributes(long_value) == {"color": ["blue"]}  # > MAX_VALUE_WORDS dropped
  # Lines that are sentences (more than 4 words before the colon) are not categories.
  assert ga.parse_attributes("I think that the best answer is: red, blue") == {}


class ScriptedLLM:
  """Fake chat model for mode="free": replies from a script per class."""
  name = "scripted"

  def __init__(self, script: dict[str, list[str]]):
    self.script = {k: list(v) for k, v in script.items()}
    self.calls: list[tuple[list[str], int]] = []

  def chat(self, prompts, *, max_new_tokens, seed, temperature, top_p):
    self.calls.append((list(prompts), seed))
    out = []
    for p in prompts:
      key = next(k for k in self.script if ga.attribute_prompt(k) == p)
      out.append(self.script[key].pop(0) if self.script[key] else "")
    return out


class CategoryLLM:
  """Fake chat model for mode="categories": replies from a script per (class, category),
  keyed by the last user message; records every call."""
  name = "categories"

  def __init__(self, script: dict[tuple[str, str], list[str]]):
    self.script = {k: list(v) for k, v in script.items()}
    self.calls: list[tuple[list, int]] = []

  def chat(self, prompts, *, max_new_tokens, seed, temperature, top_p):
    self.calls.append((list(prompts), seed))
    out = []
    for p in prompts:
      assert isinstance(p, list) and p[-1]["role"] == "user"
      key = next(k for k in self.script if ga.category_messages(*k) == p)
      out.append(self.script[key].pop(0) if self.script[key] else "")
    return out


class SeededLLM:
  """Fake chat model whose reply is a pure function of (prompt, seed)."""
  name = "seeded"

  def chat(self, prompts, *, max_new_tokens, seed, temperature, top_p):
    import hashlib
    out = []
    for p in prompts:
      h = hashlib.sha256(f"{json.dumps(p)}|{seed}".encode()).hexdigest()
      out.append(f"color: c{h[:3]}, c{h[3:6]}\nsize: s{h[6:9]}, s{h[9:12]}")
    return out


def test_retry_then_success_and_fallback():
  llm = ScriptedLLM({
      "golden retriever": ["", "junk junk", "- Fur: golden, cream\n- Pose: sitting, running"],
      "car accident": ["Weather: rain, snow"],
      "never": ["nothing here", "", "still nothing"],
  })
  out = ga.extract_attributes(["golden retriever", "car accident", "never"], llm, seed=3,
                              retries=2, mode="free")
  c = out["classes"]
  assert c["car accident"] == {"attributes": {"weather": ["rain", "snow"]},
                               "raw": [{"question": "free", "attempt": 0,
                                        "text": "Weather: rain, snow"}], "attempts": 1,
                               "fallback": False, "warning": None}
  g = c["golden retriever"]
  assert g["attempts"] == 3 and not g["fallback"]
  assert [r["text"] for r in g["raw"]] == [
      "", "junk junk", "- Fur: golden, cream\n- Pose: sitting, running"]
  assert [r["attempt"] for r in g["raw"]] == [0, 1, 2]
  assert g["attributes"] == {"fur": ["golden", "cream"], "pose": ["sitting", "running"]}
  n = c["never"]
  assert n["fallback"] and n["attributes"] == {} and n["attempts"] == 3
  assert "never" in n["warning"] and "3 attempt" in n["warning"]
  assert out["model"] == "scripted" and out["seed"] == 3 and out["mode"] == "free"
  # Only unresolved classes were asked again; every attempt used a fresh seed.
  assert [len(p) for p, _ in llm.calls] == [3, 2, 2]
  assert len({s for _, s in llm.calls}) == 3


def test_min_categories_and_bounded_retries():
  llm = ScriptedLLM({"cat": ["color: black, white"] * 5})
  out = ga.extract_attributes(["cat"], llm, seed=0, retries=1, min_categories=2, mode="free")
  e = out["classes"]["cat"]
  assert e["attempts"] == 2 and e["fallback"] and len(e["raw"]) == 2
  with pytest.raises(ValueError, match="retries"):
    ga.extract_attributes(["cat"], llm, retries=-1)
  with pytest.raises(ValueError, match="duplicate"):
    ga.extract_attributes(["cat", "cat"], llm)
  with pytest.raises(ValueError, match="empty"):
    ga.extract_attributes(["cat", "  "], llm)
  with pytest.raises(ValueError, match="mode"):
    ga.extract_attributes(["cat"], llm, mode="chatty")
  with pytest.raises(ValueError, match="duplicate categories"):
    ga.extract_attributes(["cat"], llm, categories=["color", "Color"])


@pytest.mark.parametrize("mode", ga.MODES)
def test_deterministic_for_seed_and_unicode_names(tmp_path, mode):
  names = ["golden retriever", "Crème brûlée", "rock'n'roll (live!)", "猫", "T-shirt/top"]
  a = ga.extract_attributes(names, SeededLLM(), seed=11, mode=mode)
  b = ga.extract_attributes(names, SeededLLM(), seed=11, mode=mode)
  c = ga.extract_attributes(names, SeededLLM(), seed=12, mode=mode)
  assert a == b and a != c
  assert list(a["classes"]) == names
  expected = {"color", "size"} if mode == "free" else set(ga.DEFAULT_CATEGORIES)
  for n in names:
    assert n in ga.attribute_prompt(n)
    assert all(n in ga.category_messages(n, k)[-1]["content"] for k in ga.DEFAULT_CATEGORIES)
    assert set(a["classes"][n]["attributes"]) == expected
  p = ga.write_attributes(tmp_path / "attributes.json", a)
  assert "Crème brûlée" in p.read_text(encoding="utf-8")  # not \u-escaped
  assert ga.load_attributes(p) == a
  assert ga.load_attributes(p, ["猫"])["classes"] == {"猫": a["classes"]["猫"]}


def test_user_attributes_file_layouts_and_errors(tmp_path):
  simple = {"zero": {"stroke": ["thin", "thick"]}, "éclair": {"glaze": ["chocolate"]}}
  p = tmp_path / "user.json"
  p.write_text(json.dumps(simple), encoding="utf-8")
  out = ga.load_attributes(p)
  assert out["model"] == "user"
  assert out["classes"]["éclair"] == {"attributes": {"glaze": ["chocolate"]}, "raw": [],
                                      "attempts": 0, "fallback": False, "warning": None}
  with pytest.raises(ValueError, match=r"user\.json.*lacks class.*'one'"):
    ga.load_attributes(p, ["zero", "one"])
  with pytest.raises(FileNotFoundError, match="nope.json"):
    ga.load_attributes(tmp_path / "nope.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json", encoding="utf-8")
  with pytest.raises(ValueError, match="bad.json"):
    ga.load_attributes(bad)
  bad.write_text(json.dumps({"zero": {"stroke": "thin", "width": []}}), encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.json.*'zero'.*'width'"):
    ga.load_attributes(bad)
  bad.write_text(json.dumps({"zero": ["thin"]}), encoding="utf-8")
  with pytest.raises(ValueError, match=r"class 'zero'"):
    ga.load_attributes(bad)


def test_llm_missing_gguf_names_file(tmp_path):
  if importlib.util.find_spec("gguf") is None:
    pytest.skip("needs the gguf package")
  with pytest.raises(FileNotFoundError, match=r"missing\.gguf.*smollm2_135m_q4_1"):
    ga.LLM(tmp_path / "missing.gguf")
  bad = tmp_path / "broken.gguf"
  bad.write_bytes(b"GGUF" + b"\x00" * 13)
  with pytest.raises(ValueError, match=r"broken\.gguf.*smollm2_135m_q4_1"):
    ga.LLM(bad)


def _smollm2_path():
  for mod in ("gguf", "transformers"):
    if importlib.util.find_spec(mod) is None:
      pytest.skip(f"SmolLM2 test needs the {mod} package")
  from synthbandit_jax import assets
  try:
    return assets.fetch("smollm2_135m_q4_1")
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"SmolLM2 GGUF asset unavailable: {e}")


def test_launch_with_smollm2_writes_attributes_and_is_deterministic(tmp_path):
  """Real model, 2 classes, short replies: valid attributes.json with raw text, per seed."""
  _smollm2_path()
  # (load_llm itself has the weights and the tokenizer share one parse of the file.)
  # (No wall-time assertion: the stage's speed is measured by benchmarks/llm_throughput.py;
  # a timed test fails on a loaded machine without anything being wrong.)
  llm = ga.load_llm()
  kw = dict(seed=5, retries=0, max_new_tokens=12, temperature=0.7, top_p=0.9)
  a = ga.extract_attributes(["golden retriever", "bicycle"], llm, **kw)
  b = ga.extract_attributes(["golden retriever", "bicycle"], llm, **kw)
  assert a == b
  assert a["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
  for e in a["classes"].values():
    assert [r["question"] for r in e["raw"]] == list(ga.DEFAULT_CATEGORIES)
    assert all(isinstance(r["text"], str) for r in e["raw"])
    assert any(r["text"].strip() for r in e["raw"])
    assert e["fallback"] == (e["attributes"] == {})
  # One batched call, shared prefixes (one per category), [B, T] padded to a multiple of 8.
  assert len(llm.calls) == 2 and llm.calls[0]["rows"] == 8
  p = ga.write_attributes(tmp_path / "attributes.json", a)
  assert ga.load_attributes(p) == a


def test_copies_of_the_prompt_example_do_not_count():
  """Small models often echo the prompt's example ("color: red, blue, green"); those lines
  say nothing about the class, so they are dropped and an echo-only reply is retried."""
  example = ga.attribute_prompt("x").split("like this:", 1)[1].strip()
  llm = ScriptedLLM({
      "dog": [example, example + "\nbreed: beagle, poodle"],
      "cat": [example] * 3,
  })
  out = ga.extract_attributes(["dog", "cat"], llm, seed=1, retries=2, mode="free")
  dog = out["classes"]["dog"]
  assert dog["attempts"] == 2 and dog["attributes"] == {"breed": ["beagle", "poodle"]}
  cat = out["classes"]["cat"]
  assert cat["fallback"] and cat["attempts"] == 3 and cat["attributes"] == {}
  # A real colour list that merely shares the category name is kept.
  llm = ScriptedLLM({"fox": ["color: red, silver, arctic white"]})
  assert ga.extract_attributes(["fox"], llm, seed=0, mode="free")["classes"]["fox"][
      "attributes"] == {
      "color": ["red", "silver", "arctic white"]}


# Replies to one category question, as SmolLM2-135M writes them (seen on this machine).
VALUE_CASES = [
    ("blue, green, gold, silver, white, red, black, silver, white, beige, beige", "zero",
     ["blue", "green", "gold", "silver", "white", "red", "black", "beige"]),
    ("zero, zero zero, zero zero zero, zero zero zero zero", "zero", []),
    ("car accident, highway, road, road trip, plane crash, plane crash", "car accident",
     ["highway", "road", "road trip", "plane crash"]),
    ("1. Blue\n2. Red\n3. Gold\n4. White", "dog", ["blue", "red", "gold", "white"]),
    ("The colors are: blue, red, green, yellow, and white.", "six",
     ["blue", "red", "green", "yellow", "white"]),
    ("The bird can be a: \n\n * Blue\n * Green\n * Red", "bird", ["blue", "green", "red"]),
    ("a jay, a hawk, a sparrow, an eagle", "bird", ["jay", "hawk", "sparrow", "eagle"]),
    ("7, 8, 9, 10, 11", "seven", []),
    ("beachfront, beachfront beachfront beach, car park", "three", ["beachfront", "car park"]),
    ('["poodle", "Beagle"]', "dog", ["poodle", "beagle"]),
    ("The zero can be any color, but it can also be any color that is not a color.", "zero",
     []),
    ("", "x", []),
]


@pytest.mark.parametrize("text,name,expected", VALUE_CASES)
def test_parse_values(text, name, expected):
  assert ga.parse_values(text, name) == expected


def test_category_messages_use_two_other_example_subjects():
  m = ga.category_messages("dog", "color")
  assert [x["role"] for x in m] == ["user", "assistant", "user", "assistant", "user"]
  assert "a bicycle" in m[0]["content"] and "a teapot" in m[2]["content"]
  assert m[-1]["content"] == "List five colors of a dog. Answer with a comma-separated list."
  m = ga.category_messages("racing bicycle", "type")  # the class is never its own example
  assert "bicycle" not in m[0]["content"] + m[2]["content"]
  assert m[-1]["content"].startswith("List five different kinds of racing bicycle.")
  m = ga.category_messages("owl", "weather")  # no built-in question: bare, no examples
  assert m == [{"role": "user", "content": "List five different weather for a photo of an "
                                           "owl. Answer with a comma-separated list."}]


def test_categories_mode_retries_only_failed_questions_and_rejects_copies():
  copy = ga.CATEGORY_QUESTIONS["background"][1][0]  # the bicycle example, verbatim
  llm = CategoryLLM({
      ("dog", "color"): ["brown, black, white"],
      ("dog", "background"): [copy, "dog dog, dog", "park, beach, sofa"],
      ("owl", "color"): ["7, 8", "", "zero"],
      ("owl", "background"): ["forest, barn, night sky"],
  })
  out = ga.extract_attributes(["dog", "owl"], llm, seed=2, retries=2,
                              categories=["color", "background"], min_categories=2)
  dog, owl = out["classes"]["dog"], out["classes"]["owl"]
  assert out["mode"] == "categories"
  assert dog["attributes"] == {"color": ["brown", "black", "white"],
                               "background": ["park", "beach", "sofa"]}
  assert dog["attempts"] == 3 and not dog["fallback"]
  assert [(r["question"], r["attempt"]) for r in dog["raw"]] == [
      ("color", 0), ("background", 0), ("background", 1), ("background", 2)]
  assert owl["fallback"] and owl["attributes"] == {} and "background" in owl["warning"]
  assert [len(p) for p, _ in llm.calls] == [4, 2, 2]  # only open questions asked again
  assert len({s for _, s in llm.calls}) == 3
  # A copy with the example subject's name dropped is still a copy ("porcelain teapot").
  llm = CategoryLLM({("six", "type"): ["glass, silver, copper, porcelain, cast iron",
                                       "round six, curly six"]})
  e = ga.extract_attributes(["six"], llm, seed=0, categories=["type"])["classes"]["six"]
  assert e["attempts"] == 2 and e["attributes"] == {"type": ["round six", "curly six"]}
  # With min_categories=1 the owl keeps its one good category.
  llm = CategoryLLM({("owl", "color"): ["7, 8"], ("owl", "background"): ["forest, barn"]})
  out = ga.extract_attributes(["owl"], llm, seed=2, retries=0,
                              categories=["color", "background"])
  assert out["classes"]["owl"]["attributes"] == {"background": ["forest", "barn"]}
