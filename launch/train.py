"""Train classifiers on real + synthetic data with a bandit choosing the synthetic subset.

  python -m launch.train --config=configs/demo.py --workdir=runs/demo
  python -m launch.train --config=configs/demo.py:paper --workdir=runs/paper \
      --config.bandit.c=1.0 --config.train.epochs=30

Runs every mode of config.train.modes (each in WORKDIR/<mode>/, checkpointed each epoch),
then writes WORKDIR/results.json, WORKDIR/report.md and plots. Re-running the command on an
interrupted workdir resumes it; on a finished one it says so and stops (--overwrite redoes).
"""
from __future__ import annotations

import sys

from absl import app, flags

from launch import common

_FLAGS = common.define_flags()
_CONFIG, _WORKDIR = _FLAGS.config, _FLAGS.workdir
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard what the workdir holds.")
_RESUME = flags.DEFINE_bool("resume", True, "Resume an interrupted run in the workdir.")
_PROGRESS = _FLAGS.progress


def main(argv):
  del argv
  common.start(_FLAGS)
  from synthbandit_jax.training import trainer  # after flags: keeps --help fast
  summary = trainer.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                        resume=_RESUME.value, progress=_PROGRESS.value)
  if not common.is_main_process():
    return
  print()
  print(f"{'mode':<14}{'test acc':>10}{'best val':>10}{'images':>10}  most pulled arm")
  for row in summary["comparison"]:
    print(f"{row['mode']:<14}{row['test_accuracy']:>10.4f}{row['best_val_accuracy']:>10.4f}"
          f"{row['images_seen']:>10d}  {row['most_pulled_arm']}")
  print(f"\nreport: {_WORKDIR.value}/report.md   results: {_WORKDIR.value}/results.json")


def run():
  common.check_config_overrides(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
