"""Attribute extraction (SmolLM2-135M-Instruct, Flax) and prompt building.

Command:  python -m launch.attributes --config=configs/attributes.py --workdir=runs/attrs
          (own attributes, no LLM: --config.attributes_file=my_attributes.json)
Hardware: CPU; the 10 default classes take about 1-2 minutes (model load ~12 s, one batched
          generate call of 96 tokens ~30-50 s plus retries for classes that did not parse).
Expected: WORKDIR/attributes.json ({"model", "seed", "classes": {name: {"attributes", "raw",
          "attempts", "fallback", "warning"}}}) and WORKDIR/prompts.jsonl (10 x
          images_per_class rows: id, class, prompt, negative_prompt, attributes, seed, style).
          SmolLM2-135M is small: expect a few classes to need retries or to fall back to
          class-name-only prompts (recorded as warnings); use attributes_file for control.

Default classes are the ten MNIST digit names ("zero".."nine"), the classes of the demo's
real dataset (configs/demo.py).
"""
import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.classes = "zero,one,two,three,four,five,six,seven,eight,nine"
  c.attributes_file = ""   # JSON {class: {category: [values]}} or attributes.json: skips the LLM
  c.seed = 0
  c.llm = ml_collections.ConfigDict()
  c.llm.gguf = ""          # "" = the SmolLM2-135M-Instruct asset (assets.fetch)
  c.llm.max_new_tokens = 96
  c.llm.temperature = 0.7
  c.llm.top_p = 0.9
  c.llm.retries = 2
  c.llm.min_categories = 1
  c.llm.batch_size = 16
  c.prompts = ml_collections.ConfigDict()
  c.prompts.images_per_class = 50
  c.prompts.style = "photo"  # photo | art | both
  if arg not in (None, "", "default"):
    raise ValueError(f"configs/attributes.py: unknown variant {arg!r} (valid: default)")
  return c
