"""Score a synthetic pool: Inception features, DPS / FCS / U and baseline metrics per image.

  python -m launch.score --config=configs/demo.py --workdir=runs/demo \
      --config.score.max_pool_images=500 --config.score.max_real_images=300
  python -m launch.train --config=configs/demo.py --workdir=runs/demo_scored \
      --config.arms.source=scores --config.scores.path=runs/demo/scores.csv \
      --config.scores.allow_missing=True

Writes WORKDIR/scores.csv (one row per scored pool image; directions and the feature tap
of every column in the .meta.json / .sources.json sidecars), WORKDIR/features/*.npz, and
for a controlled pool WORKDIR/metric_validation.md (does each metric order the images by
their known quality; does it flag wrong labels).
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
  from synthbandit_jax.metrics import stage  # after flags: keeps --help fast
  summary = stage.run_scoring(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
  if not common.is_main_process():
    return
  print(f"\nscored {summary['scored_pool_images']} of {summary['pool_images']} pool images "
        f"against {summary['real_images']} real images in {summary['wall_time_s']:.0f} s: "
        f"{summary['scores']}")
  if "verdict" in summary:
    print(open(f"{_WORKDIR.value}/metric_validation.md", encoding="utf-8").read())


def run():
  common.check_config_overrides(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
