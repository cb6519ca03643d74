"""Run the experiment grid (datasets x classifiers x modes x seeds) and write one table.

  python -m launch.grid --config=configs/grid.py --workdir=runs/grid
  python -m launch.grid --config=configs/grid.py --workdir=runs/grid \
      --config.grid.seeds=0,1,2,3,4 --config.grid.models=small_cnn,resnet18

Writes WORKDIR/grid.md (markdown table), grid.csv and grid.json (every run); each dataset's
pipeline and training runs live under WORKDIR/<dataset>/ and resume when re-run.
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
  from synthbandit_jax import grid  # after flags: keeps --help fast
  result = grid.run_grid(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
  if not common.is_main_process():
    return
  print()
  print(grid.format_markdown(result["table"]))
  print(f"{_WORKDIR.value}/grid.md, grid.csv, grid.json  ({result['wall_time_s'] / 60:.1f} min)")


def run():
  common.check_config_overrides(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
