"""Prompt building: one text-to-image prompt per synthetic image, attributes sampled per image.

For each class and image k, one value is drawn per attribute category (a numpy Generator seeded
from the global seed, the class index and k, so a row does not depend on how many images the
other classes get) and phrased into a template: photorealistic (the paper's SP set) or
artistic (SA). Rows of prompts.jsonl:
  {"id": "003-000017", "class": str, "prompt": str, "negative_prompt": str,
   "attributes": {category: value}, "seed": int, "style": "photo" | "art"}
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from synthbandit_jax import io as sio

# Photorealistic templates (SP). {cls} = class name, {attrs} = ", "-joined attribute phrases
# (may be empty), {article} = "a" / "an".
PHOTO_TEMPLATES: tuple[str, ...] = (
    "a photo of {article} {cls}{attrs}, high quality, detailed",
    "a realistic photograph of {article} {cls}{attrs}, sharp focus, natural lighting",
    "a close-up photo of {article} {cls}{attrs}, 4k, highly detailed",
    "a high resolution photo of {article} {cls}{attrs}, professional photography",
    "a DSLR photo of {article} {cls}{attrs}, realistic, detailed",
)
# Artistic templates (SA).
ART_TEMPLATES: tuple[str, ...] = (
    "a painting of {article} {cls}{attrs}, artistic",
    "a pencil sketch of {article} {cls}{attrs}",
    "a cartoon of {article} {cls}{attrs}, colorful",
    "a watercolor illustration of {article} {cls}{attrs}",
    "an oil painting of {article} {cls}{attrs}, brush strokes",
    "a digital art rendering of {article} {cls}{attrs}",
)
PHOTO_NEGATIVE = ("blurry, low quality, lowres, jpeg artifacts, deformed, distorted, cropped, "
                  "watermark, text, cartoon, painting, drawing, illustration")
ART_NEGATIVE = "blurry, low quality, lowres, jpeg artifacts, deformed, watermark, text"
STYLES = ("photo", "art", "both")


def _article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" else "a"


# Categories whose values read on their own in a prompt ("parrot", "side view"); values of
# other categories get the category appended ("red color", "city street background").
STANDALONE_CATEGORIES = frozenset({
    "type", "kind", "kinds", "breed", "species", "variety", "model", "viewpoint", "view",
    "camera angle", "camera angles", "angle"})


def _phrase(category: str, value: str) -> str:
  """'red' + 'color' -> 'red color'; values that already name the category, and values of
  STANDALONE_CATEGORIES ('parrot' of 'type', 'side view' of 'viewpoint'), stay as they are."""
  v, c = value.strip(), category.strip()
  if not c or c.lower() in v.lower() or c.lower() in STANDALONE_CATEGORIES:
    return v
  return f"{v} {c}"


def _image_seed(seed: int, class_index: int, k: int) -> int:
  ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 7919, class_index, k])
  return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def _class_attributes(attributes: Mapping) -> dict[str, dict[str, list[str]]]:
  """{class: {category: [values]}} from the attributes.json structure or the plain map."""
  if "classes" in attributes and isinstance(attributes["classes"], Mapping):
    return {str(c): dict(e.get("attributes", {})) for c, e in attributes["classes"].items()}
  return {str(c): dict(a) for c, a in attributes.items()}


def _check_templates(templates: Sequence[str], where: str) -> tuple[str, ...]:
  templates = tuple(templates)
  if not templates:
    raise ValueError(f"{where}: no templates given")
  for t in templates:
    if "{cls}" not in t:
      raise ValueError(f"{where}: template {t!r} lacks the '{{cls}}' placeholder")
    try:
      t.format(cls="x", attrs="", article="a")
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f"{where}: template {t!r} uses an unknown placeholder ({e}); allowed: "
                       f"{{cls}}, {{attrs}}, {{article}}") from e
  return templates


def build_prompts(attributes: Mapping, *, images_per_class: int, seed: int,
                  style: str = "photo", templates: Mapping[str, Sequence[str]] | None = None,
                  negative_prompts: Mapping[str, str] | None = None) -> list[dict]:
  """Rows of prompts.jsonl for every class of `attributes` (classes in the given order).

  Args:
    attributes: the attributes.json structure, or {class: {category: [values]}}. A class with
      no categories gets class-name-only prompts.
    images_per_class: prompts per class.
    seed: global seed; each row's draws and its "seed" come from (seed, class index, k).
    style: "photo" (SP templates), "art" (SA templates) or "both" (alternating per image).
    templates: optional {"photo": [...], "art": [...]} overriding the built-in templates;
      placeholders {cls}, {attrs}, {article}.
    negative_prompts: optional {"photo": str, "art": str}.
  """
  if style not in STYLES:
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
  if int(images_per_class) < 1:
    raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
  tmpl = {"photo": PHOTO_TEMPLATES, "art": ART_TEMPLATES}
  for key, ts in (templates or {}).items():
    if key not in ("photo", "art"):
      raise ValueError(f"templates: unknown style {key!r} (valid: photo, art)")
    tmpl[key] = _check_templates(ts, f"templates[{key!r}]")
  neg = {"photo": PHOTO_NEGATIVE, "art": ART_NEGATIVE, **(negative_prompts or {})}
  classes = _class_attributes(attributes)
  if not classes:
    raise ValueError("attributes has no classes")
  rows = []
  for ci, (cls, cats) in enumerate(classes.items()):
    cats = {c: list(v) for c, v in cats.items() if v}
    for k in range(int(images_per_class)):
      rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, ci, k]))
      row_style = style if style != "both" else ("photo", "art")[k % 2]
      chosen = {c: vals[int(rng.integers(len(vals)))] for c, vals in cats.items()}
      template = tmpl[row_style][int(rng.integers(len(tmpl[row_style])))]
      phrases = [_phrase(c, v) for c, v in chosen.items()]
      attrs = (", " + ", ".join(phrases)) if phrases else ""
      prompt = template.format(cls=cls, attrs=attrs, article=_article(cls))
      prompt = re.sub(r"\s+", " ", prompt).strip()
      rows.append({"id": f"{ci:03d}-{k:06d}", "class": cls, "prompt": prompt,
                   "negative_prompt": neg[row_style], "attributes": chosen,
                   "seed": _image_seed(seed, ci, k), "style": row_style})
  return rows


def write_prompts(path: str | os.PathLike, rows: Sequence[Mapping]) -> Path:
  """Writes prompts.jsonl atomically (one JSON object per line, UTF-8)."""
  import json  # pylint: disable=import-outside-toplevel
  ids = [r["id"] for r in rows]
  if len(set(ids)) != len(ids):
    raise ValueError(f"write_prompts({path}): duplicate ids")
  text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)
  return sio.atomic_write_text(path, text)
