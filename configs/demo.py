"""The offline demo, end to end: MNIST-5k classes -> attributes -> a generated pool -> scores
-> a bandit over metric-ranked arms -> test accuracy on real data.

Command:  make demo      (= python -m launch.run --config=configs/demo.py --workdir=runs/demo)
Variants: configs/demo.py:controlled   the controlled pool (corrupted real holdout images,
                                       known ground truth) and corruption-kind arms; no
                                       generation (python -m launch.train or launch.run)
          configs/demo.py:paper        the controlled demo with the reference bandit (UCB1,
                                       c=2, reward in %)
Hardware: 2 CPU cores. Default: 27.5 minutes measured on 2 otherwise idle cores (load ~1.5):
          attributes with SmolLM2 98 s, training the generator 700 s, generating 1,000
          images 107 s, scoring them 419 s, training 6 modes 311 s, report 10 s; 57 minutes
          with the 2 cores shared with other jobs (load 4-7; README).
          controlled: about 2 minutes.
Expected: default -- the generator's digits carry their class (a pixel SVM trained on the real
          train split takes 999 of the 1,000 for their prompted class) but are unlike real ones
          in style (thick, smooth, less varied strokes); real-only ~0.975 test accuracy;
          synthetic-only clearly lower (~0.78); the bandit near real-only (0.972 at seed 0).
          controlled -- real-only and the bandit ~0.95-0.97; the synthetic-only run (all
          corruptions, ~8% wrong labels) lower.

Data: MNIST-5k split 20% test / 20% val / 60% real train (stratified, seed 0). The attribute
stage asks SmolLM2 about the digit names ("zero".."nine"), 100 prompts per class; the
generator (generate.model="offline") is trained on the real train split only.
"""
from configs import common

DIGITS = "zero,one,two,three,four,five,six,seven,eight,nine"


def controlled(c):
  """The controlled-pool demo (the first demo of the project)."""
  c.data.holdout_fraction = 0.4
  c.pool.kind = "controlled"
  c.pool.path = ""
  c.pool.copies_per_image = 4
  c.arms.source = "groups"
  c.arms.k = 60
  c.arms.controls = "random"
  c.arms.add_real = True
  c.train.modes = "real,synthetic,mix50,bandit"
  return c


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data.real = "mnist5k"
  c.data.val_fraction = 0.2
  c.data.test_fraction = 0.2
  c.data.holdout_fraction = 0.0
  c.train.epochs = 20
  c.train.batch_size = 32
  c.optim.learning_rate = 0.02
  c.bandit.name = "ucb1"
  c.bandit.c = 0.02
  c.bandit.reward = "accuracy"

  # The full pipeline.
  c.attributes.prompt_names = DIGITS
  c.attributes.images_per_class = 100
  c.attributes.style = "photo"
  c.generate.model = "offline"
  c.generate.sampler = "dpmpp_2m"
  c.generate.steps = 20
  c.generate.guidance_scale = 5.0
  c.generate.negative_prompts = False  # the generator learned "" as its unconditional prompt
  c.generate.batch_size = 50
  c.generate.shard_size = 100
  c.pool.kind = "dir"
  c.pool.path = ""
  c.score.max_real_images = 500
  c.arms.source = "scores"
  c.arms.rankings = "u,dps,fcs,fid_2048,ssim,psnr,realism"
  c.arms.k = 40
  c.arms.controls = "random"
  c.arms.add_real = True
  c.train.modes = "real,synthetic,mix25,topk:u,bandit,uniform"

  if arg == "controlled":
    controlled(c)
  elif arg == "paper":
    controlled(c)
    common.paper_bandit(c)
  elif arg not in (None, "", "default"):
    raise ValueError(f"configs/demo.py: unknown variant {arg!r} (valid: controlled, paper)")
  return c
