"""Attribute extraction with the Flax LLM, then prompts for the generation stage.

  python -m launch.attributes --config=configs/attributes.py --workdir=runs/attrs
  python -m launch.attributes --config=configs/attributes.py --workdir=runs/attrs \
      --config.classes="golden retriever,car accident" --config.prompts.images_per_class=100
  python -m launch.attributes --config=configs/attributes.py --workdir=runs/attrs \
      --config.attributes_file=my_attributes.json       # no LLM

Writes WORKDIR/attributes.json and WORKDIR/prompts.jsonl. An existing attributes.json made for
the same classes and seed is reused (no LLM call) unless --overwrite; prompts.jsonl is always
rebuilt from it (cheap).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags, logging

from launch import common

_FLAGS = common.define_flags()
_CONFIG, _WORKDIR = _FLAGS.config, _FLAGS.workdir
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Ask the LLM again even if attributes.json "
                               "exists for the same classes and seed.")


def parse_classes(spec: str) -> list[str]:
  """Comma-separated class names -> list (whitespace trimmed, empties are an error)."""
  names = [n.strip() for n in str(spec).split(",")]
  if not spec or not any(names):
    raise SystemExit("config.classes is empty: give comma-separated class names")
  if "" in names:
    raise SystemExit(f"config.classes {spec!r} has an empty name (stray comma?)")
  return names


def main(argv):
  del argv
  common.start(_FLAGS)
  from synthbandit_jax.generation import attributes as ga  # after flags: keeps --help fast
  from synthbandit_jax.generation import prompts as gp
  from synthbandit_jax import parallel
  cfg = _CONFIG.value
  workdir = Path(_WORKDIR.value)
  if not parallel.is_main_process():  # a small single-device job: process 0 does it
    parallel.sync("attributes done")
    return
  names = parse_classes(cfg.classes)
  out_path = workdir / "attributes.json"
  t0 = time.time()
  if cfg.attributes_file:
    attrs = ga.load_attributes(cfg.attributes_file, names)
    logging.info("attributes from %s (no LLM)", cfg.attributes_file)
  else:
    attrs = None
    if out_path.exists() and not _OVERWRITE.value:
      try:
        prev = ga.load_attributes(out_path)
      except (ValueError, OSError) as e:
        raise SystemExit(f"{out_path} exists but is unreadable ({e}); rerun with --overwrite")
      if (list(prev["classes"]) == names and prev.get("seed") == cfg.seed
          and prev.get("mode", cfg.llm.mode) == cfg.llm.mode):
        attrs = prev
        logging.info("reusing %s (same classes and seed; --overwrite to redo)", out_path)
      else:
        raise SystemExit(f"{out_path} was made for other classes, another seed or mode "
                         f"(seed {prev.get('seed')}, mode {prev.get('mode')}, classes "
                         f"{list(prev['classes'])}); use "
                         f"--overwrite or another --workdir")
    if attrs is None:
      llm = ga.load_llm(cfg.llm.gguf or None)
      logging.info("LLM %s loaded in %.1f s", llm.name, time.time() - t0)
      attrs = ga.extract_attributes(
          names, llm, seed=cfg.seed, retries=cfg.llm.retries,
          min_categories=cfg.llm.min_categories, max_new_tokens=cfg.llm.max_new_tokens,
          temperature=cfg.llm.temperature, top_p=cfg.llm.top_p,
          batch_size=cfg.llm.batch_size, mode=cfg.llm.mode, categories=cfg.llm.categories)
  ga.write_attributes(out_path, attrs)
  rows = gp.build_prompts(attrs, images_per_class=cfg.prompts.images_per_class, seed=cfg.seed,
                          style=cfg.prompts.style)
  gp.write_prompts(workdir / "prompts.jsonl", rows)
  print(f"{'class':<24}{'categories':>11}{'attempts':>9}  fallback")
  for name, e in attrs["classes"].items():
    print(f"{name[:23]:<24}{len(e['attributes']):>11}{e['attempts']:>9}  "
          f"{'yes' if e['fallback'] else 'no'}")
  print(f"\n{len(rows)} prompts in {time.time() - t0:.1f} s: {workdir / 'prompts.jsonl'}   "
        f"attributes: {out_path}")
  parallel.sync("attributes done")


def run():
  common.check_config_overrides(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
