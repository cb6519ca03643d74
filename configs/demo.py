"""The offline demo: MNIST-5k (real) and a controlled synthetic pool; the bandit chooses
among corruption-kind arms.

Command:  make demo            (or: python -m launch.train --config=configs/demo.py
                                 --workdir=runs/demo)
Variants: --config=configs/demo.py:paper   the reference bandit (UCB1, c=2, reward in %)
Hardware: 2 CPU cores; about 2 minutes (most of it compiling and building the pool).
Expected: real-only and the bandit reach ~0.93 test accuracy; synthetic-only (all
          corruptions, ~8% wrong labels, inverted and edge images) is lower; the bandit
          plays the `clean` arm most after its exploration round.

Data: MNIST-5k split 20% test / 20% val / 40% holdout / 20% real train (stratified, seed 0).
The holdout (2,000 real training images, never val/test) becomes the controlled pool: each
image once, as one of 13 variants (clean; noise, blur, occlusion at severities 1-3; invert;
edges; wrong label). Arms = one per corruption kind, each capped at 25 images per class,
plus a uniform random arm of the same size.
"""
from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data.real = "mnist5k"
  c.data.val_fraction = 0.2
  c.data.test_fraction = 0.2
  c.data.holdout_fraction = 0.4
  c.pool.kind = "controlled"
  c.pool.copies_per_image = 4
  c.arms.source = "groups"
  c.arms.k = 60
  c.arms.controls = "random"
  c.arms.add_real = True
  c.train.modes = "real,synthetic,mix50,bandit"
  c.train.epochs = 20
  c.train.batch_size = 32
  c.optim.learning_rate = 0.02
  c.bandit.name = "ucb1"
  c.bandit.c = 0.02
  c.bandit.reward = "accuracy"
  if arg == "paper":
    common.paper_bandit(c)
  elif arg not in (None, "", "default"):
    raise ValueError(f"configs/demo.py: unknown variant {arg!r} (valid: paper)")
  return c
