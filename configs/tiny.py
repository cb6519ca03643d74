"""A seconds-long smoke run: sklearn's 8x8 digits and a controlled pool.

Command:  python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
Hardware: any CPU; about 30 s (mostly compilation).
Expected: real-only reaches ~0.85-0.95 test accuracy in 4 epochs; used by the tests.
"""
from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data.real = "digits"
  c.data.val_fraction = 0.2
  c.data.test_fraction = 0.2
  c.data.holdout_fraction = 0.3
  c.pool.kind = "controlled"
  c.arms.source = "groups"
  c.arms.k = 10
  c.arms.controls = "random"
  c.train.modes = "real,bandit"
  c.train.epochs = 4
  c.train.batch_size = 16
  c.train.eval_batch_size = 128
  c.optim.learning_rate = 0.02
  if arg == "paper":
    common.paper_bandit(c)
  elif arg not in (None, "", "default"):
    raise ValueError(f"configs/tiny.py: unknown variant {arg!r} (valid: paper)")
  return c
