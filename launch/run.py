"""The whole pipeline in one command: attributes, (generator), generation, scoring, training,
report. Re-running resumes; only stages whose settings changed are redone.

  python -m launch.run --config=configs/demo.py --workdir=runs/demo          # = make demo
  python -m launch.run --config=configs/demo.py --workdir=runs/demo \
      --config.train.modes=real,bandit:exp3            # redoes only train + report
  python -m launch.run --config=configs/demo.py --workdir=runs/demo --stages=score,train
  python -m launch.run --config=configs/demo.py --workdir=runs/sd \
      --config.generate.model=/data/stable-diffusion-v1-5 --config.data.real=folder:/data/cars

Stage table (hash, status, seconds, counts) in WORKDIR/stages.json and results.json
("pipeline"); outputs as documented in synthbandit_jax/pipeline.py and the README.
"""
from __future__ import annotations

import sys

from absl import app, flags

from launch import common

_FLAGS = common.define_flags()
_CONFIG, _WORKDIR = _FLAGS.config, _FLAGS.workdir
_STAGES = flags.DEFINE_list("stages", [], "Run only these stages (default: all that apply): "
                            "attributes, generator, generate, score, train, report.")
_PROGRESS = _FLAGS.progress


def main(argv):
  del argv
  common.start(_FLAGS)
  from synthbandit_jax import pipeline  # after flags: keeps --help fast
  try:
    state = pipeline.run_pipeline(_CONFIG.value, _WORKDIR.value, stages=_STAGES.value or None,
                                  progress=_PROGRESS.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
  if not common.is_main_process():
    return
  print(f"\n{'stage':<12}{'status':<12}{'seconds':>9}  details")
  for name in pipeline.STAGES:
    s = state.get(name, {})
    detail = s.get("reason") or s.get("counts") or ""
    secs = f"{s['seconds']:.0f}" if "seconds" in s else "-"
    print(f"{name:<12}{s.get('status', '-'):<12}{secs:>9}  {detail}")
  print(f"\nreport: {_WORKDIR.value}/report.html  (and report.md, results.json)")


def run():
  common.check_config_overrides(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
