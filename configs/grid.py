"""The paper's experiment grid, offline: datasets x classifiers x modes x metrics x seeds.

Command:  python -m launch.grid --config=configs/grid.py --workdir=runs/grid
Variants: configs/grid.py:paper   the paper's training recipe (20 epochs, SGD lr 1e-3,
                                  momentum 0.9, batch 8); slower
Hardware: 2 CPU cores. Default: about 30 minutes when the generated dataset's upstream
          stages are already done (point grid.generated_from at a finished `make demo`
          workdir to reuse its pool and scores); otherwise add the demo's ~15 minutes.
Expected: WORKDIR/grid.md, grid.csv, grid.json: test accuracy (mean +- std over 3 seeds) per
          dataset (generated pool, controlled pool), classifier (small_cnn from scratch;
          inception_frozen: the frozen FID Inception-V3, a new linear head on its features)
          and mode: real only,
          synthetic only, synthetic + real mixes, top-k by SSIM / PSNR / FID / DPS / FCS / U,
          the bandit variants (our UCB, the paper's UCB, discounted UCB, EXP3) and the
          uniform-random arm.

The real splits are fixed across seeds (data.split_seed = 0) so that the scores, computed
once per dataset against the real train split, never see another seed's val or test images;
seeds vary initialisation, batches, random-control arms and the bandit.
"""
import ml_collections

from configs import demo

METRIC_MODES = "topk:ssim,topk:psnr,topk:fid_2048,topk:dps,topk:fcs,topk:u"
BANDIT_MODES = "bandit,bandit:paper,bandit:discounted_ucb,bandit:exp3,uniform"


def get_config(arg: str | None = None):
  c = demo.get_config()
  c.grid = ml_collections.ConfigDict()
  c.grid.datasets = "generated,controlled"
  c.grid.models = "small_cnn,inception_frozen"
  c.grid.seeds = "0,1,2"
  c.grid.split_seed = 0
  c.grid.modes = f"real,synthetic,mix25,{METRIC_MODES},{BANDIT_MODES}"
  c.grid.generated_from = ""
  c.train.epochs = 10
  # Limited real data, as in the paper's setting (and the controlled dataset): 100 real train
  # images per class for both datasets. The split puts test and val first, so they are the
  # demo's own test / val images and the holdout is the rest of the demo's train split (a
  # reused demo's scores never saw val or test).
  c.data.holdout_fraction = 0.4
  # The paper's metrics as arms (+ the random control): 7 arms over 10 epochs.
  c.arms.rankings = "u,dps,fcs,fid_2048,ssim,psnr"
  c.score.max_pool_images = 1000
  # inception_frozen: the frozen Inception sees the 28 px digits at 139 px (5x upsampled)
  # instead of FID's 299: ~12x faster on this CPU (measured 19.7 vs 1.6 images/s under load).
  c.model.features_size = 139
  if arg == "paper":
    c.train.epochs = 20
    c.train.batch_size = 8
    c.optim.name = "sgd"
    c.optim.learning_rate = 1e-3
    c.optim.momentum = 0.9
  elif arg not in (None, "", "default"):
    raise ValueError(f"configs/grid.py: unknown variant {arg!r} (valid: paper)")
  return c
