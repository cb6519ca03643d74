"""synthbandit_jax: multi-armed-bandit training on synthetic data, in JAX/Flax.

The functional API (pure functions over explicit state):

Bandits (init / select / update, jittable and vmappable):
  Bandit, ucb1, discounted_ucb, sliding_window_ucb, exp3, gaussian_thompson,
  epsilon_greedy, fixed, uniform, make_bandit, arm_means, reward_fn
Arms (padded static-shape index sets over the training bank):
  Arms, pad_arms, topk_arms, random_arm, all_arm, group_arms, mix_arm, arms_from_file,
  with_real, BankLayout
The jitted epoch (bandit picks the arm inside jit, lax.scan over its batches, val reward):
  TrainState, Bank, ArmArrays, EvalSet, EpochSpec, create_train_state, make_epoch_fn,
  make_eval_fn, make_eval_set, epoch_body, plan_epoch, train_step, evaluate, finish_epoch,
  HostStreamingEpoch
Runs, modes, data:
  run, train_mode, prepare_inputs, mode_arms, load_real, ImageDataset, make_splits,
  stratified_split, read_pool, iter_pool, PoolWriter, Pool, build_controlled_pool,
  ScoreTable, load_score_table, save_score_table, align_scores, build_classifier
Scoring (features -> per-image scores; see launch/score.py):
  InceptionV3FID, FeatureExtractor, inception_extractor, score_pool, ScoringConfig,
  validate_metrics, run_scoring
"""
# Names are imported on first use (PEP 562), so `import synthbandit_jax` and the launch
# scripts that need one part do not pay for the rest (scipy, matplotlib, orbax, sklearn).
_EXPORTS = {
    "ArmArrays": "synthbandit_jax.training.epoch",
    "Arms": "synthbandit_jax.arms",
    "Bandit": "synthbandit_jax.bandits",
    "Bank": "synthbandit_jax.training.epoch",
    "BankLayout": "synthbandit_jax.arms",
    "EpochSpec": "synthbandit_jax.training.epoch",
    "EvalSet": "synthbandit_jax.training.epoch",
    "FeatureExtractor": "synthbandit_jax.metrics.features",
    "HostStreamingEpoch": "synthbandit_jax.training.epoch",
    "ImageDataset": "synthbandit_jax.data.real",
    "InceptionV3FID": "synthbandit_jax.models.inception",
    "Pool": "synthbandit_jax.data.pool",
    "PoolWriter": "synthbandit_jax.data.pool",
    "ScoreTable": "synthbandit_jax.data.scores",
    "ScoringConfig": "synthbandit_jax.metrics.scoring",
    "TrainState": "synthbandit_jax.training.epoch",
    "align_scores": "synthbandit_jax.data.scores",
    "all_arm": "synthbandit_jax.arms",
    "arm_means": "synthbandit_jax.bandits",
    "arms_from_file": "synthbandit_jax.arms",
    "build_classifier": "synthbandit_jax.models.classifiers",
    "build_controlled_pool": "synthbandit_jax.data.controlled",
    "create_train_state": "synthbandit_jax.training.epoch",
    "discounted_ucb": "synthbandit_jax.bandits",
    "epoch_body": "synthbandit_jax.training.epoch",
    "epsilon_greedy": "synthbandit_jax.bandits",
    "evaluate": "synthbandit_jax.training.epoch",
    "exp3": "synthbandit_jax.bandits",
    "finish_epoch": "synthbandit_jax.training.epoch",
    "fixed": "synthbandit_jax.bandits",
    "gaussian_thompson": "synthbandit_jax.bandits",
    "group_arms": "synthbandit_jax.arms",
    "inception_extractor": "synthbandit_jax.metrics.features",
    "iter_pool": "synthbandit_jax.data.pool",
    "load_real": "synthbandit_jax.data.real",
    "load_score_table": "synthbandit_jax.data.scores",
    "make_bandit": "synthbandit_jax.bandits",
    "make_epoch_fn": "synthbandit_jax.training.epoch",
    "make_eval_fn": "synthbandit_jax.training.epoch",
    "make_eval_set": "synthbandit_jax.training.epoch",
    "make_splits": "synthbandit_jax.data.splits",
    "mix_arm": "synthbandit_jax.arms",
    "mode_arms": "synthbandit_jax.training.inputs",
    "pad_arms": "synthbandit_jax.arms",
    "plan_epoch": "synthbandit_jax.training.epoch",
    "prepare_inputs": "synthbandit_jax.training.inputs",
    "random_arm": "synthbandit_jax.arms",
    "read_pool": "synthbandit_jax.data.pool",
    "reward_fn": "synthbandit_jax.bandits",
    "run": "synthbandit_jax.training.trainer",
    "run_scoring": "synthbandit_jax.metrics.stage",
    "save_score_table": "synthbandit_jax.data.scores",
    "score_pool": "synthbandit_jax.metrics.scoring",
    "sliding_window_ucb": "synthbandit_jax.bandits",
    "stratified_split": "synthbandit_jax.data.splits",
    "topk_arms": "synthbandit_jax.arms",
    "train_mode": "synthbandit_jax.training.trainer",
    "train_step": "synthbandit_jax.training.epoch",
    "ucb1": "synthbandit_jax.bandits",
    "uniform": "synthbandit_jax.bandits",
    "validate_metrics": "synthbandit_jax.metrics.validation",
    "with_real": "synthbandit_jax.arms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  import importlib  # pylint: disable=import-outside-toplevel
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"
