"""Tests for generation/prompts.py and launch/attributes.py (user attributes file, no LLM)."""
from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from synthbandit_jax.generation import prompts as gp

ROOT = Path(__file__).resolve().parent.parent

ATTRS = {
    "golden retriever": {"pose": ["sitting", "running", "lying"], "background": ["park", "beach"]},
    "Crème brûlée": {"color": ["golden", "dark"]},
    "empty one": {},
}


def test_rows_fields_ids_and_determinism():
  rows = gp.build_prompts(ATTRS, images_per_class=40, seed=1)
  again = gp.build_prompts(ATTRS, images_per_class=40, seed=1)
  other = gp.build_prompts(ATTRS, images_per_class=40, seed=2)
  assert rows == again and rows != other
  assert len(rows) == 120 and len({r["id"] for r in rows}) == 120
  assert rows[0]["id"] == "000-000000" and rows[-1]["id"] == "002-000039"
  assert len({r["seed"] for r in rows}) == 120
  for r in rows:
    assert set(r) == {"id", "class", "prompt", "negative_prompt", "attributes", "seed", "style"}
    assert r["style"] == "photo" and r["class"] in r["prompt"]
    assert set(r["attributes"]) == set(ATTRS[r["class"]])
    for cat, val in r["attributes"].items():
      assert val in ATTRS[r["class"]][cat] and val in r["prompt"]
    assert "cartoon" in r["negative_prompt"]
  # The class without attributes: class-name-only prompts.
  assert all(r["attributes"] == {} for r in rows if r["class"] == "empty one")
  assert any(r["prompt"].startswith("a photo of an empty one,") for r in rows)


def test_rows_stable_when_other_classes_change():
  a = gp.build_prompts(ATTRS, images_per_class=5, seed=0)
  b = gp.build_prompts(ATTRS, images_per_class=9, seed=0)
  assert [r for r in b if r["id"].endswith(tuple(f"{k:06d}" for k in range(5)))] == a


def test_sampling_covers_values_roughly_uniformly():
  rows = gp.build_prompts({"dog": ATTRS["golden retriever"]}, images_per_class=600, seed=4)
  pose = collections.Counter(r["attributes"]["pose"] for r in rows)
  assert set(pose) == {"sitting", "running", "lying"}
  assert all(150 < n < 250 for n in pose.values()), pose  # 200 expected each
  templates = collections.Counter(r["prompt"].split(" dog")[0] for r in rows)
  assert len(templates) == len(gp.PHOTO_TEMPLATES)


def test_styles_and_custom_templates():
  art = gp.build_prompts(ATTRS, images_per_class=20, seed=0, style="art")
  assert {r["style"] for r in art} == {"art"}
  assert all(any(w in r["prompt"] for w in ("painting", "sketch", "cartoon", "watercolor",
                                            "digital art")) for r in art)
  both = gp.build_prompts(ATTRS, images_per_class=4, seed=0, style="both")
  assert [r["style"] for r in both[:4]] == ["photo", "art", "photo", "art"]
  custom = gp.build_prompts({"cat": {"color": ["black"]}}, images_per_class=2, seed=0,
                            templates={"photo": ["{cls} pic{attrs}"]})
  assert [r["prompt"] for r in custom] == ["cat pic, black color"] * 2
  with pytest.raises(ValueError, match="style"):
    gp.build_prompts(ATTRS, images_per_class=1, seed=0, style="sketchy")
  with pytest.raises(ValueError, match="cls"):
    gp.build_prompts(ATTRS, images_per_class=1, seed=0, templates={"photo": ["no class"]})
  with pytest.raises(ValueError, match="images_per_class"):
    gp.build_prompts(ATTRS, images_per_class=0, seed=0)


def test_write_prompts_roundtrip(tmp_path):
  rows = gp.build_prompts(ATTRS, images_per_class=3, seed=0)
  p = gp.write_prompts(tmp_path / "prompts.jsonl", rows)
  lines = p.read_text(encoding="utf-8").splitlines()
  assert [json.loads(x) for x in lines] == rows
  assert "Crème brûlée" in p.read_text(encoding="utf-8")
  assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def _launch(workdir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "launch.attributes", "--config=configs/attributes.py",
       f"--workdir={workdir}", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_launch_with_user_attributes_file(tmp_path):
  user = tmp_path / "mine.json"
  user.write_text(json.dumps({"golden retriever": ATTRS["golden retriever"],
                              "Crème brûlée": ATTRS["Crème brûlée"], "unused": {"a": ["b"]}}),
                  encoding="utf-8")
  wd = tmp_path / "wd"
  args = ["--config.classes=golden retriever,Crème brûlée", f"--config.attributes_file={user}",
          "--config.prompts.images_per_class=7", "--config.prompts.style=both"]
  r = _launch(wd, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  attrs = json.loads((wd / "attributes.json").read_text(encoding="utf-8"))
  assert list(attrs["classes"]) == ["golden retriever", "Crème brûlée"]
  assert attrs["classes"]["Crème brûlée"]["attributes"] == {"color": ["golden", "dark"]}
  rows = [json.loads(x) for x in (wd / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
  assert rows == gp.build_prompts(attrs, images_per_class=7, seed=0, style="both")
  # A class missing from the user file: error naming the file and the class.
  r = _launch(tmp_path / "wd2", "--config.classes=golden retriever,zebra",
              f"--config.attributes_file={user}")
  assert r.returncode != 0 and "mine.json" in r.stderr and "zebra" in r.stderr
  r = _launch(tmp_path / "wd3", "--config.nope=1")
  assert r.returncode != 0 and "unknown config key" in r.stderr


def test_launch_reuses_existing_attributes(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  from synthbandit_jax.generation import attributes as ga
  prev = ga.normalize_attributes({"one": {"stroke": ["thin", "bold"]}})
  prev["seed"] = 3
  ga.write_attributes(wd / "attributes.json", prev)
  # Same classes and seed: no LLM (an unloadable gguf path proves it is not touched).
  r = _launch(wd, "--config.classes=one", "--config.seed=3",
              f"--config.llm.gguf={tmp_path / 'absent.gguf'}",
              "--config.prompts.images_per_class=2")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(x) for x in (wd / "prompts.jsonl").read_text().splitlines()]
  assert len(rows) == 2 and all(r["attributes"]["stroke"] in ("thin", "bold") for r in rows)
  # Other seed: refuses without --overwrite; with it, tries the LLM (absent file -> named).
  r = _launch(wd, "--config.classes=one", "--config.seed=4",
              f"--config.llm.gguf={tmp_path / 'absent.gguf'}")
  assert r.returncode != 0 and "--overwrite" in r.stderr
  r = _launch(wd, "--config.classes=one", "--config.seed=4", "--overwrite",
              f"--config.llm.gguf={tmp_path / 'absent.gguf'}")
  assert r.returncode != 0 and "absent.gguf" in r.stderr


def test_phrases_per_category():
  assert gp._phrase("color", "red") == "red color"
  assert gp._phrase("background", "city street") == "city street background"
  assert gp._phrase("color", "dark red color") == "dark red color"
  assert gp._phrase("type", "parrot") == "parrot"
  assert gp._phrase("viewpoint", "side view") == "side view"
  rows = gp.build_prompts({"bird": {"type": ["parrot"], "viewpoint": ["from above"]}},
                          images_per_class=1, seed=0)
  assert "parrot, from above" in rows[0]["prompt"] and "type" not in rows[0]["prompt"]
