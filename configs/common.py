"""The full default config tree; every config file starts from `base_config()`.

Keys (all overridable from the command line, e.g. `--config.bandit.c=1.0`):

seed                      run seed (splits, pool, arms, init, bandit)
data.real                 "mnist5k" | "digits" | "folder:/root" | "npz:/file.npz" | "tfds:cifar10"
data.channels             1 or 3 (grayscale/RGB conversion); 0 keeps the dataset's own
data.image_size           0 keeps the native size; else resize to image_size x image_size
data.alpha                RGBA/LA policy: "white" | "black" | "drop"
data.resize_method        "nearest" | "bilinear" | "bicubic" | "lanczos" | "area"
data.fit                  "stretch" | "center_crop" (aspect-ratio policy when resizing)
data.val_fraction         the bandit's reward split (of train when a test split is given)
data.test_fraction        used only when the dataset has no test split of its own
data.holdout_fraction     real train images held out to build the controlled pool
data.max_per_class        0 = all images; else subsample each class (seeded)
data.split_seed           seed of the splits and subsample; -1 = the run seed (a grid over
                          seeds with fixed data sets it to 0)
data.class_mismatch       "error" | "intersect": real and synthetic class sets differ
data.on_device            True: bank on device, one jitted call per epoch;
                          False: host streaming with prefetch
data.prefetch             host-streaming batches prefetched
pool.kind                 "controlled" (built from the holdout) | "dir" (an existing pool)
pool.path                 pool directory ("" = WORKDIR/pool for the controlled pool)
pool.kinds / severities / copies_per_image    controlled-pool recipe
pool.unknown_classes      "error" | "skip" pool rows whose class is not a real class
scores.path               per-image score table (.csv/.jsonl/.npz), "" = none
scores.directions         "col:lower,col2:higher" overrides of ranking directions
scores.allow_missing      pool images without a score row get NaN (never in a top-k arm)
score.dtype               launch/score.py: Inception/VGG16 compute dtype "float32" | "bfloat16"
score.batch_size          images per feature batch (a multiple of the device count)
score.inception_size      Inception input side, 0 = 299 (FID's); >= 75: ~(size/299)^2 of the
                          compute, values not comparable with FIDs at 299
score.max_pool_images     0 = score the whole pool; else a class-stratified seeded subset
score.max_real_images     0 = all real train images as references; else a subset
score.u_form              "mean" (of min-max normalised DPS and FCS) | "product"
score.max_per_set         0 = all images per Gaussian set; 64 = the paper's reference size
score.ssim_max_refs       real references per image for SSIM/PSNR
score.fcs_backbone        FCS features: "inception" (2048-d pool tap) | "vgg16" (fc7, the paper's)
score.vgg16_size          VGG16 input side for fcs_backbone=vgg16, 0 = 224 (its own); >= 32:
                          ~(size/224)^2 of the compute, fc7 features not those at 224
score.vgg16_microbatch    images per step of VGG16's conv stack inside a batch: -1 = 2 on CPU
                          (faster there: activations stay in cache), off on GPU; 0 = off
score.inception_microbatch  the same for the Inception: -1 = 4 on CPU, off on GPU; 0 = off
score.vgg16_winograd      VGG16's 14-56 px layers by Winograd's algorithm: -1 = on for float32
                          on CPU (faster there), 0 = off, 1 = on (float32 only)
score.vgg16_weights       torchvision vgg16 state dict (.pth/.safetensors) for fcs_backbone=vgg16;
                          make it where there is internet: torch.save(torchvision.models.vgg16(
                          weights="IMAGENET1K_V1").state_dict(), path)
score.inception_weights   "" = the offline FID Inception asset (no fc layer: no "is" column); a
                          pytorch-fid state dict (.pth/.safetensors, has the 1008-way fc) adds
                          the per-image Inception Score column "is"
attributes.prompt_names   launch/run.py: the name the LLM and prompts use per real class, in class
                          order ("" = the class names; MNIST: "zero,one,...,nine")
attributes.file           JSON {class: {category: [values]}} (or an attributes.json): no LLM
attributes.llm.*          gguf ("" = SmolLM2 asset), max_new_tokens, temperature, top_p,
                          retries, min_categories, batch_size, mode ("categories": one question
                          per class x category of the comma-separated `categories`; "free": the
                          paper's open question), categories (see configs/attributes.py)
attributes.images_per_class / style   prompts per class; "photo" | "art" | "both"
generator.*               launch/run.py with generate.model="offline": the demo's own small
                          text-to-image model (fields of generation.train_generator's
                          GeneratorConfig; see its docstring)
generate.model            launch/generate.py: diffusers SD 1.x/2.x directory or hub id (cached);
                          launch/run.py: "offline" = the generator stage's model
generate.prompts          prompts.jsonl ("" = WORKDIR/prompts.jsonl)
generate.out              pool directory to write ("" = WORKDIR/pool)
generate.sampler          "dpmpp_2m" | "ddim" | "euler"
generate.steps / guidance_scale / clip_skip   sampling; guidance <= 1 skips the uncond pass
generate.negative_prompts use the prompts' negative prompts for the unconditional pass (False:
                          the empty prompt; right for models trained without them)
generate.height / width   0 = the UNet's native size
generate.batch_size       images per jitted call (global; a multiple of the device count)
generate.shard_size       prompts per pool shard (the unit of resuming)
generate.seed             noise seed: each image's noise comes from (seed, image id)
generate.dtype            "float32" | "bfloat16" | "float16" compute (params stay float32)
generate.attention_impl   "" = cuDNN fused attention on GPU in bf16/fp16, XLA elsewhere
generate.on_bad           NaN/black images: "regenerate" (in float32) | "flag" | "drop"
generate.black_level      an image whose brightest pixel is <= this counts as black
generate.max_images       0 = every prompt; else the first N (quick runs)
arms.source               "groups" (controlled kinds) | "scores" (top-k per ranking) | "file"
arms.file                 JSON {"arm": [pool ids]} for source="file"
arms.k                    images per class per arm (groups and top-k); 0 = no cap
arms.rankings             comma list of score columns ("" = all columns)
arms.controls             comma list of control arms: "random", "all"
arms.add_real             add the real train split to every arm
model.name                "small_cnn" | "resnet18" | "resnet50" | "vgg" | "vit_tiny" | "vit_small"
                          | "linear_head" | "mlp_head" (with model.features)
model.dtype               "float32" | "bfloat16" (compute; params stay float32)
model.frozen_backbone     train only the head
model.features            "" (train on images) | "inception_2048" (or _768/_192/_64): train a new
                          head (model.name "linear_head" | "mlp_head") on the frozen FID
                          Inception-V3's features, computed once (training/frozen_features.py)
model.features_cache      where those features are cached ("" = WORKDIR/features)
model.features_size       the backbone's input side in pixels (0 = 299, its own; >= 75)
optim.name                "sgd" | "adam" | "adamw"
optim.learning_rate, optim.momentum, optim.weight_decay, optim.schedule ("constant"|"cosine")
train.modes               comma list: real, synthetic, mixNN (NN = % synthetic), topk:COL,
                          group:NAME, bandit, bandit:ALGO, bandit:paper (UCB1, c=2, reward
                          in %, whatever bandit.* says), uniform
train.epochs, train.batch_size, train.eval_batch_size
train.warmup_epochs       bandit modes: first train this many epochs on the real split
                          before the bandit plays (0 = off; the paper has none)
bandit.name               ucb1 | discounted_ucb | sliding_window_ucb | exp3 | thompson |
                          epsilon_greedy | uniform
bandit.c, gamma, window, exp3_gamma, epsilon, decay, prior_mean, prior_std, obs_std
bandit.reward             "accuracy" | "gain" (val accuracy gain over the previous epoch)
bandit.reward_scale       1.0 = reward in [0, 1]; 100.0 = the paper's percent
checkpoint.keep           checkpoints kept per mode
parallel.num_devices      training mesh: 0 = all devices (of all processes in a multi-host run,
                          where it must stay 0); generation and scoring use each process's
                          local devices
parallel.model_axis       training: devices on a `model` mesh axis (1 = pure data parallel);
                          > 1 splits each large parameter / optimizer leaf over that many
                          devices of one host (parallel.state_shardings)
debug.crash_after_epoch   testing aid: hard-exit right after saving this epoch (-1 = off)
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.real = "mnist5k"
  c.data.channels = 0
  c.data.image_size = 0
  c.data.alpha = "white"
  c.data.resize_method = "bilinear"
  c.data.fit = "stretch"
  c.data.val_fraction = 0.2
  c.data.test_fraction = 0.2
  c.data.holdout_fraction = 0.0
  c.data.max_per_class = 0
  c.data.split_seed = -1
  c.data.class_mismatch = "error"
  c.data.on_device = True
  c.data.prefetch = 2

  c.pool = ml_collections.ConfigDict()
  c.pool.kind = "controlled"
  c.pool.path = ""
  c.pool.kinds = "clean,noise,blur,occlusion,invert,edges,wrong_label"
  c.pool.severities = "1,2,3"
  c.pool.copies_per_image = 1
  c.pool.unknown_classes = "error"

  c.scores = ml_collections.ConfigDict()
  c.scores.path = ""
  c.scores.directions = ""
  c.scores.allow_missing = False

  c.score = ml_collections.ConfigDict()
  c.score.dtype = "float32"
  c.score.batch_size = 32
  c.score.inception_size = 0
  c.score.max_pool_images = 0
  c.score.max_real_images = 0
  c.score.u_form = "mean"
  c.score.max_per_set = 0
  c.score.ssim_max_refs = 64
  c.score.fcs_backbone = "inception"
  c.score.vgg16_weights = ""
  c.score.vgg16_size = 0
  c.score.vgg16_microbatch = -1
  c.score.vgg16_winograd = -1
  c.score.inception_microbatch = -1
  c.score.inception_weights = ""

  c.attributes = ml_collections.ConfigDict()
  c.attributes.prompt_names = ""
  c.attributes.file = ""
  c.attributes.images_per_class = 50
  c.attributes.style = "photo"
  c.attributes.llm = ml_collections.ConfigDict()
  c.attributes.llm.gguf = ""
  c.attributes.llm.max_new_tokens = 40
  c.attributes.llm.temperature = 0.7
  c.attributes.llm.top_p = 0.9
  c.attributes.llm.retries = 2
  c.attributes.llm.min_categories = 1
  c.attributes.llm.batch_size = 48
  c.attributes.llm.mode = "categories"
  c.attributes.llm.categories = "type,color,background,viewpoint"

  c.generator = generator_defaults()

  c.generate = ml_collections.ConfigDict()
  c.generate.model = ""
  c.generate.prompts = ""
  c.generate.out = ""
  c.generate.sampler = "dpmpp_2m"
  c.generate.steps = 25
  c.generate.guidance_scale = 7.5
  c.generate.clip_skip = 0
  c.generate.negative_prompts = True
  c.generate.height = 0
  c.generate.width = 0
  c.generate.batch_size = 8
  c.generate.shard_size = 64
  c.generate.seed = 0
  c.generate.dtype = "float32"
  c.generate.attention_impl = ""
  c.generate.on_bad = "regenerate"
  c.generate.black_level = 4
  c.generate.max_images = 0

  c.arms = ml_collections.ConfigDict()
  c.arms.source = "groups"
  c.arms.file = ""
  c.arms.k = 0
  c.arms.rankings = ""
  c.arms.controls = "random"
  c.arms.add_real = False

  c.model = ml_collections.ConfigDict()
  c.model.name = "small_cnn"
  c.model.dtype = "float32"
  c.model.frozen_backbone = False
  c.model.features = ""
  c.model.features_cache = ""
  c.model.features_size = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"
  c.optim.learning_rate = 0.02
  c.optim.momentum = 0.9
  c.optim.weight_decay = 0.0
  c.optim.schedule = "constant"

  c.train = ml_collections.ConfigDict()
  c.train.modes = "real,synthetic,mix50,bandit"
  c.train.epochs = 20
  c.train.batch_size = 32
  c.train.eval_batch_size = 500
  c.train.warmup_epochs = 0

  c.bandit = ml_collections.ConfigDict()
  c.bandit.name = "ucb1"
  # Rewards are val accuracies in [0, 1]; arms differ by ~0.01-0.05, so c must be of that
  # order for a ~20-epoch run (the classic sqrt(2) explores almost uniformly).
  c.bandit.c = 0.02
  c.bandit.gamma = 0.9
  c.bandit.window = 10
  c.bandit.exp3_gamma = 0.1
  c.bandit.epsilon = 0.1
  c.bandit.decay = 0.0
  c.bandit.prior_mean = 0.5
  c.bandit.prior_std = 1.0
  c.bandit.obs_std = 0.1
  c.bandit.reward = "accuracy"
  c.bandit.reward_scale = 1.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2

  c.parallel = ml_collections.ConfigDict()
  c.parallel.num_devices = 0
  c.parallel.model_axis = 1

  c.debug = ml_collections.ConfigDict()
  c.debug.crash_after_epoch = -1
  return c


def generator_defaults() -> ml_collections.ConfigDict:
  """The generator stage's settings: GeneratorConfig's fields (defaults from there)."""
  from synthbandit_jax.generation import train_generator  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(train_generator.config_defaults())


def paper_bandit(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The reference code's bandit: UCB1, c = 2, reward = val accuracy in percent (0-100)."""
  c.bandit.name = "ucb1"
  c.bandit.c = 2.0
  c.bandit.reward = "accuracy"
  c.bandit.reward_scale = 100.0
  return c
