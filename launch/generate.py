"""Generate the synthetic pool from prompts.jsonl with a Stable Diffusion checkpoint (Flax).

  python -m launch.attributes --config=configs/attributes.py --workdir=runs/sd
  python -m launch.generate --config=configs/demo.py --workdir=runs/sd \
      --config.generate.model=/path/to/stable-diffusion-v1-5 \
      --config.generate.dtype=bfloat16 --config.generate.batch_size=32

The model is a diffusers-format directory (or an ``org/name`` already in the local Hugging
Face hub cache; see the README for getting one). Images go to WORKDIR/pool in the pool format
(metadata.jsonl + image shards), counts and images/s to WORKDIR/generate.json. Interrupted runs
resume from the last finished shard. Batches are sharded over all local devices; under
jax.distributed each process takes its share of the shards.
"""
from __future__ import annotations

import sys

from absl import app

from launch import common

_FLAGS = common.define_flags()
_CONFIG, _WORKDIR = _FLAGS.config, _FLAGS.workdir
_PROGRESS = _FLAGS.progress


def main(argv):
  del argv
  common.start(_FLAGS)
  from synthbandit_jax.generation import stage  # after flags: keeps --help fast
  s = stage.run_generation(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
  rate = f"{s['images_per_s']:.2f} images/s" if s["images_per_s"] else "nothing to do"
  print(f"\ngenerated {s['generated']} images ({s['shards_written']} of {s['shards']} shards "
        f"this run, {rate}) into {s['pool']}; flagged {s['flagged']}, dropped {s['dropped']}, "
        f"regenerated in float32 {s['regenerated']}"
        + ("" if s["complete"] else " -- pool not complete yet (other processes' shards)"))


def run():
  common.check_config_overrides(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
