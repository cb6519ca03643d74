"""The offline demo, end to end: MNIST-5k classes -> attributes -> a generated pool -> scores
-> a bandit over metric-ranked arms -> test accuracy on real data.

Command:  make demo      (= python -m launch.run --config=configs/demo.py --workdir=runs/demo)
Variants: configs/demo.py:controlled   the controlled pool (corrupted real holdout images,
                                       known ground truth) and corruption-kind arms; no
                                       generation (python -m launch.train or launch.run)
          configs/demo.py:paper        the controlled demo with the reference bandit (UCB1,
                                       c=2, reward in %)
Hardware: 2 CPU cores. Default: 14.9 minutes measured on 2 otherwise idle cores
          (2026-12-01): attributes with SmolLM2 87 s, training the generator 494 s (VAE 200
          + UNet 2,200 steps), generating 1,000 images 63 s, scoring them 55 s (Inception
          at 139 px), training 6 modes x 12 epochs 167 s, report 8 s (16.2 minutes in an
          earlier session on another machine; 19.3 before synthbandit_jax/xla_options.py).
          Shared cores take much longer (57 minutes for an earlier, heavier version at
          load 4-7; README).
          controlled: about 2 minutes.
Expected: default -- the generator's digits carry their class (a pixel SVM trained on the real
          train split takes 98.3% of the 1,000 for their prompted class) but are unlike
          real ones in style (thick, smooth, less varied strokes); real-only ~0.975 test
          accuracy; synthetic-only clearly lower (~0.75-0.77); the bandit near real-only
          (0.972 at seed 0).
          controlled -- real-only and the bandit ~0.95-0.97; the synthetic-only run (all
          corruptions, ~8% wrong labels) lower.

The budget choices (issue: 20 minutes): 12 training epochs (val accuracy plateaus by ~8),
DPM-Solver++ with 15 steps, 200 VAE steps, and the scoring Inception at 139 px for the 28 px
digits (`score.inception_size`; 4.6x less compute than FID's 299). On a controlled pool (800
images, 300 references) the metric validation at 139 vs 299 px: U Spearman 0.466 vs 0.446,
wrong-label AUROC 0.261 vs 0.258; DPS 0.314 vs 0.337; FCS 0.577 vs 0.497; but realism 0.015
vs 0.339 and fid_2048 0.189 vs 0.463 (199 px: 0.152, 0.301): the Inception-feature baselines
are worse at 139, so pass --config.score.inception_size=0 for the paper's comparison (+5.5
minutes). Cutting the UNet to 1,500 steps instead left 17% of the digits unrecognizable
(SVM 0.825; synthetic-only 0.66), so it keeps its 2,200.

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
  c.train.epochs = 12
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
  # The 20-minute budget: 200 VAE steps instead of the generator's default 250 (its UNet
  # keeps all 2,200: with 1,500, 17% of the digits were no longer recognizable).
  c.generator.vae_steps = 200
  c.generate.sampler = "dpmpp_2m"
  c.generate.steps = 15
  c.generate.guidance_scale = 5.0
  c.generate.negative_prompts = False  # the generator learned "" as its unconditional prompt
  c.generate.batch_size = 50
  c.generate.shard_size = 100
  c.pool.kind = "dir"
  c.pool.path = ""
  c.score.max_real_images = 500
  # The Inception sees the 28 px digits at 139 px instead of 299: ~4.6x less compute. On a
  # controlled pool (800 images, 300 references) U's and DPS's validation numbers were the same
  # as at 299; realism and fid_2048 lost rank correlation (configs docstring above).
  c.score.inception_size = 139
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
