"""Attribute extraction (SmolLM2-135M-Instruct, Flax) and prompt building.

Command:  python -m launch.attributes --config=configs/attributes.py --workdir=runs/attrs
          (own attributes, no LLM: --config.attributes_file=my_attributes.json)
Hardware: CPU. The 10 default classes: 97 s wall measured on 2 cores at load ~1 (model
          load + compile ~22 s, one batched call of 40 questions 38.5 s, retry calls of 8 and
          3 questions 21 s and 9 s; every class got 3-4 categories, none fell back); 143 s at
          load ~4.
Expected: WORKDIR/attributes.json ({"model", "seed", "mode", "classes": {name: {"attributes",
          "raw", "attempts", "fallback", "warning"}}}) and WORKDIR/prompts.jsonl (10 x
          images_per_class rows: id, class, prompt, negative_prompt, attributes, seed, style).
          extract_attributes(mode="categories", the default) asks one short question per
          (class, category: type, color, background, viewpoint) after two worked examples;
          every MNIST name and "car accident", "bird", "dog", "golden retriever", "bicycle",
          "apple" got 3-4 categories without fallback. The
          135M model knows little: for the digit names the values are generic (colours,
          camera angles) or junk ("type" of "seven": orange, lemon, kiwi); natural classes
          get some real ones (bird types: jay, hawk, sparrow, eagle, falcon). Use
          attributes_file for control. mode="free" is the paper's open question (the LLM
          picks the categories); SmolLM2 mostly copies the example ("color: red, blue,
          green") there: 7/10 digit names parsed, with junk like {"blue": ["5.5cm"]}.

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
  c.llm.max_new_tokens = 40  # per reply: a five-item list needs ~20-30 tokens
  c.llm.temperature = 0.7
  c.llm.top_p = 0.9
  c.llm.retries = 2
  c.llm.min_categories = 1
  c.llm.batch_size = 48      # questions per generate call (one call for 10 classes x 4)
  c.llm.mode = "categories"  # categories (one question per class x category) | free (paper)
  c.llm.categories = "type,color,background,viewpoint"  # mode=categories; comma-separated
  c.prompts = ml_collections.ConfigDict()
  c.prompts.images_per_class = 50
  c.prompts.style = "photo"  # photo | art | both
  if arg not in (None, "", "default"):
    raise ValueError(f"configs/attributes.py: unknown variant {arg!r} (valid: default)")
  return c
