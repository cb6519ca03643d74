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
from synthbandit_jax.arms import (Arms, BankLayout, all_arm, arms_from_file, group_arms,
                                  mix_arm, pad_arms, random_arm, topk_arms, with_real)
from synthbandit_jax.bandits import (Bandit, arm_means, discounted_ucb, epsilon_greedy, exp3,
                                     fixed, gaussian_thompson, make_bandit, reward_fn,
                                     sliding_window_ucb, ucb1, uniform)
from synthbandit_jax.data.controlled import build_controlled_pool
from synthbandit_jax.data.pool import Pool, PoolWriter, iter_pool, read_pool
from synthbandit_jax.data.real import ImageDataset, load_real
from synthbandit_jax.data.scores import (ScoreTable, align_scores, load_score_table,
                                         save_score_table)
from synthbandit_jax.data.splits import make_splits, stratified_split
from synthbandit_jax.metrics.features import FeatureExtractor, inception_extractor
from synthbandit_jax.metrics.scoring import ScoringConfig, score_pool
from synthbandit_jax.metrics.stage import run_scoring
from synthbandit_jax.metrics.validation import validate_metrics
from synthbandit_jax.models.classifiers import build_classifier
from synthbandit_jax.models.inception import InceptionV3FID
from synthbandit_jax.training.epoch import (ArmArrays, Bank, EpochSpec, EvalSet,
                                            HostStreamingEpoch, TrainState, create_train_state,
                                            epoch_body, evaluate, finish_epoch, make_epoch_fn,
                                            make_eval_fn, make_eval_set, plan_epoch, train_step)
from synthbandit_jax.training.inputs import mode_arms, prepare_inputs
from synthbandit_jax.training.trainer import run, train_mode

__version__ = "0.1.0"
