"""The jitted bandit epoch: select an arm, train on it, evaluate on real val, update the bandit.

One epoch is one jitted call (`make_epoch_fn`):

1. `plan_epoch`: the bandit picks an arm (inside jit, from its state and a fresh key); the
   arm's padded index row is shuffled with its valid entries first and cut into
   `ceil(K / batch_size)` static batches. Only `ceil(n_valid / batch_size)` of them are
   trained on; the tail of the last partial batch repeats valid images with loss weight 0.
2. `lax.scan` over the batches; `lax.cond` skips the batches past the arm's size, so a small
   arm costs only its own steps although every arm has the same static shape.
3. `evaluate` on the (padded, masked) real validation set.
4. `finish_epoch`: reward from the val accuracy, bandit update, best-val bookkeeping.

Arms are data (a padded `[A, K]` int32 index array into the image bank plus a mask), so
switching arms never recompiles. The same four pieces drive the host-streaming path
(`HostStreamingEpoch`) for banks that do not fit on the device.

All state is explicit: `new_state, metrics = epoch(state, bank, arms, val)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from synthbandit_jax import bandits as bandits_lib
from synthbandit_jax import parallel
from synthbandit_jax import xla_options

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from epoch to epoch (a pytree; checkpointed whole)."""
  epoch: jax.Array            # int32: epochs completed
  step: jax.Array             # int32: optimizer steps taken
  params: Any
  batch_stats: Any            # {} for models without BatchNorm
  opt_state: Any
  bandit_state: Any
  rng: jax.Array              # uint32[2] raw PRNG key, split every epoch, never reused
  prev_val_accuracy: jax.Array  # float32: last epoch's val accuracy (for the "gain" reward)
  best_val_accuracy: jax.Array  # float32
  best_epoch: jax.Array         # int32 (1-based epoch of the best val accuracy; 0 = none)
  best_params: Any
  best_batch_stats: Any
  images_seen: jax.Array        # int32: training images consumed so far


class Bank(NamedTuple):
  """The training bank every arm indexes into: uint8 NHWC images (or float32 [N, D]
  frozen-backbone features) + int32 labels."""
  images: jax.Array
  labels: jax.Array


class ArmArrays(NamedTuple):
  """Arms as static-shape data: `indices[a, :sizes[a]]` are arm a's bank rows."""
  indices: jax.Array  # int32 [A, K]
  mask: jax.Array     # bool [A, K]


class EvalSet(NamedTuple):
  """An evaluation set cut into equal batches: [B, E, H, W, C], [B, E], mask [B, E]."""
  images: jax.Array
  labels: jax.Array
  mask: jax.Array


def make_eval_set(images: np.ndarray, labels: np.ndarray, batch_size: int) -> EvalSet:
  """Pads an evaluation set to whole batches (padding masked out) and reshapes it."""
  n = len(labels)
  if n == 0:
    raise ValueError("evaluation set is empty: check data.val_fraction / the test split")
  nb = -(-n // batch_size)
  pad = nb * batch_size - n
  imgs = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labs = np.concatenate([labels.astype(np.int32), np.zeros((pad,), np.int32)])
  mask = np.arange(nb * batch_size) < n
  return EvalSet(imgs.reshape((nb, batch_size) + images.shape[1:]),
                 labs.reshape(nb, batch_size), mask.reshape(nb, batch_size))


def to_float(images: jax.Array) -> jax.Array:
  """uint8 images [0, 255] -> float32 [0, 1] (the classifiers' input convention); a float
  bank (frozen backbone features, training/frozen_features.py) is used as it is."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       bandit: bandits_lib.Bandit, num_arms: int, rng: jax.Array,
                       input_shape: tuple[int, ...]) -> TrainState:
  """Initialises params, optimizer and bandit state. `input_shape` is (1, H, W, C).

  The model and optimizer init run as one jitted program: run op by op, each initializer
  and each leaf's optimizer slot is its own small compile (SmallCNN 3.6 s -> 1.6 s,
  ResNet-18 9.9 s -> 5.2 s on 2 CPU cores). `bandit.init` runs as called (a user's bandit
  need not be jittable there)."""

  def init(rng):
    rng, init_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    # best_* are separate output buffers of the program (XLA gives each output its own), so
    # the epoch may donate the whole state: one buffer may not be donated twice.
    return rng, params, batch_stats, tx.init(params), params, batch_stats

  rng, params, batch_stats, opt_state, best_params, best_batch_stats = jax.jit(init)(rng)
  return TrainState(
      epoch=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=batch_stats, opt_state=opt_state,
      bandit_state=bandit.init(num_arms), rng=rng,
      prev_val_accuracy=jnp.zeros((), jnp.float32),
      best_val_accuracy=jnp.full((), -1.0, jnp.float32), best_epoch=jnp.zeros((), jnp.int32),
      best_params=best_params, best_batch_stats=best_batch_stats,
      images_seen=jnp.zeros((), jnp.int32))


def _constrain(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  if mesh is None or parallel.mesh_size(mesh) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))


def _apply(model: nn.Module, params, batch_stats, x, train: bool):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  if train and batch_stats:
    logits, new_vars = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits.astype(jnp.float32), new_vars["batch_stats"]
  return model.apply(variables, x, train=train).astype(jnp.float32), batch_stats


def train_step(model: nn.Module, tx: optax.GradientTransformation, state: TrainState,
               images: jax.Array, labels: jax.Array, loss_mask: jax.Array,
               mesh: Mesh | None = None):
  """One SGD step on a batch; entries with loss_mask False carry no loss weight.

  Returns (new_state, (loss_sum, correct, count)) with sums over the weighted entries.
  """
  images = _constrain(images, mesh)
  labels = _constrain(labels, mesh)
  weights = _constrain(loss_mask, mesh).astype(jnp.float32)
  count = jnp.maximum(weights.sum(), 1.0)

  def loss_fn(params):
    logits, new_bs = _apply(model, params, state.batch_stats, to_float(images), train=True)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = (per_example * weights).sum() / count
    correct = ((logits.argmax(-1) == labels) * weights).sum()
    return loss, (new_bs, correct)

  (loss, (new_bs, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(params=params, batch_stats=new_bs, opt_state=opt_state,
                            step=state.step + 1)
  return new_state, (loss * weights.sum(), correct, weights.sum())


def eval_batch(model: nn.Module, params, batch_stats, images: jax.Array, labels: jax.Array,
               mask: jax.Array, mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """(correct, count) on one masked batch, model in inference mode."""
  images = _constrain(images, mesh)
  logits, _ = _apply(model, params, batch_stats, to_float(images), train=False)
  hit = (logits.argmax(-1) == _constrain(labels, mesh)) & _constrain(mask, mesh)
  return hit.sum().astype(jnp.float32), mask.sum().astype(jnp.float32)


def evaluate(model: nn.Module, params, batch_stats, data: EvalSet,
             mesh: Mesh | None = None) -> jax.Array:
  """Accuracy in [0, 1] over a padded evaluation set (a `lax.scan` over its batches)."""
  def body(carry, xs):
    c, n = eval_batch(model, params, batch_stats, *xs, mesh=mesh)
    return (carry[0] + c, carry[1] + n), None
  (correct, count), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), tuple(data))
  return correct / jnp.maximum(count, 1.0)


def plan_epoch(bandit: bandits_lib.Bandit, state: TrainState, arms: ArmArrays,
               batch_size: int, warmup_epochs: int = 0):
  """Bandit picks the arm; returns its shuffled batches.

  Returns (state with a fresh rng, arm, batch_idx [S, B], loss_mask [S, B], n_steps,
  n_images) where S = ceil(K / B) is static and only the first n_steps batches are used.
  """
  rng, k_select, k_perm = jax.random.split(state.rng, 3)
  arm = jnp.asarray(bandit.select(state.bandit_state, k_select), jnp.int32)
  if warmup_epochs > 0:
    # Warm-up epochs train on the extra last arm row (e.g. the real train split) before
    # the bandit plays: early val accuracy mostly measures training progress, not arms.
    arm = jnp.where(state.epoch < warmup_epochs, arms.indices.shape[0] - 1, arm)
  idx = arms.indices[arm]
  valid = arms.mask[arm]
  k = idx.shape[0]
  num_batches = -(-k // batch_size)
  sort_keys = jnp.where(valid, jax.random.uniform(k_perm, (k,)), 2.0)
  shuffled = idx[jnp.argsort(sort_keys)]
  n_images = valid.sum().astype(jnp.int32)
  pos = jnp.arange(num_batches * batch_size)
  batch_idx = shuffled[pos % jnp.maximum(n_images, 1)].reshape(num_batches, batch_size)
  loss_mask = (pos < n_images).reshape(num_batches, batch_size)
  n_steps = (n_images + batch_size - 1) // batch_size
  return state.replace(rng=rng), arm, batch_idx, loss_mask, n_steps, n_images


def finish_epoch(bandit: bandits_lib.Bandit, reward_fn: RewardFn, state: TrainState,
                 arm: jax.Array, val_accuracy: jax.Array, n_images: jax.Array,
                 warmup_epochs: int = 0):
  """Reward, bandit update and best-val bookkeeping. Returns (state, reward)."""
  reward = jnp.asarray(reward_fn(val_accuracy, state.prev_val_accuracy), jnp.float32)
  bandit_state = bandit.update(state.bandit_state, arm, reward)
  if warmup_epochs > 0:
    in_warmup = state.epoch < warmup_epochs
    bandit_state = jax.tree.map(lambda old, new: jnp.where(in_warmup, old, new),
                                state.bandit_state, bandit_state)
  improved = val_accuracy > state.best_val_accuracy
  pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(improved, a, b), new, old)
  epoch = state.epoch + 1
  return state.replace(
      bandit_state=bandit_state, epoch=epoch, prev_val_accuracy=val_accuracy,
      best_val_accuracy=jnp.where(improved, val_accuracy, state.best_val_accuracy),
      best_epoch=jnp.where(improved, epoch, state.best_epoch),
      best_params=pick(state.params, state.best_params),
      best_batch_stats=pick(state.batch_stats, state.best_batch_stats),
      images_seen=state.images_seen + n_images), reward


@dataclasses.dataclass(frozen=True)
class EpochSpec:
  """The static pieces of an epoch: model, optimizer, bandit, reward and batch size."""
  model: nn.Module
  tx: optax.GradientTransformation
  bandit: bandits_lib.Bandit
  reward_fn: RewardFn
  batch_size: int
  mesh: Mesh | None = None
  # > 0: the first `warmup_epochs` epochs train on the LAST arm row (not a bandit arm: the
  # bandit is initialised with one arm fewer) and do not update the bandit.
  warmup_epochs: int = 0
  # Shardings of the TrainState (`parallel.state_shardings`); when given, every jitted
  # function returns the state with exactly these, so the next call never retraces.
  state_sharding: Any = None

  def out_shardings(self, *rest: int):
    """jit out_shardings: the state's, then replicated for `len(rest)` other outputs."""
    if self.state_sharding is None:
      return None
    repl = parallel.replicated(self.mesh)
    return (self.state_sharding,) + (repl,) * len(rest)


def _epoch_metrics(arm, reward, val_accuracy, loss_sum, correct, count, n_images, n_steps):
  return {
      "arm": arm, "reward": reward, "val_accuracy": val_accuracy,
      "train_loss": loss_sum / jnp.maximum(count, 1.0),
      "train_accuracy": correct / jnp.maximum(count, 1.0),
      "images": n_images, "steps": n_steps,
  }


def epoch_body(spec: EpochSpec, state: TrainState, bank: Bank, arms: ArmArrays,
               val: EvalSet):
  """One whole epoch as a traceable function (wrap it in `jax.jit`)."""
  state, arm, batch_idx, loss_mask, n_steps, n_images = plan_epoch(
      spec.bandit, state, arms, spec.batch_size, spec.warmup_epochs)

  def body(carry, xs):
    st, loss_sum, correct, count = carry
    s, bidx, lmask = xs

    def run(st):
      return train_step(spec.model, spec.tx, st, bank.images[bidx], bank.labels[bidx],
                        lmask, spec.mesh)

    def skip(st):
      zero = jnp.zeros((), jnp.float32)
      return st, (zero, zero, zero)

    st, (l, c, n) = jax.lax.cond(s < n_steps, run, skip, st)
    return (st, loss_sum + l, correct + c, count + n), None

  zero = jnp.zeros((), jnp.float32)
  steps = jnp.arange(batch_idx.shape[0])
  (state, loss_sum, correct, count), _ = jax.lax.scan(
      body, (state, zero, zero, zero), (steps, batch_idx, loss_mask))
  val_accuracy = evaluate(spec.model, state.params, state.batch_stats, val, spec.mesh)
  state, reward = finish_epoch(spec.bandit, spec.reward_fn, state, arm, val_accuracy,
                               n_images, spec.warmup_epochs)
  return state, _epoch_metrics(arm, reward, val_accuracy, loss_sum, correct, count,
                               n_images, n_steps)


class TraceCounter:
  """Counts how often a function is traced (i.e. compiled anew by jit)."""

  def __init__(self, fn):
    self.fn = fn
    self.count = 0

  def __call__(self, *args, **kwargs):
    self.count += 1
    return self.fn(*args, **kwargs)


def make_epoch_fn(spec: EpochSpec, donate: bool = True):
  """Returns a jitted `epoch(state, bank, arms, val) -> (state, metrics)`.

  The returned function has a `trace_counter` attribute; switching arms (new arm data of
  the same shape) or epochs never retraces it.
  """
  counter = TraceCounter(lambda state, bank, arms, val: epoch_body(spec, state, bank, arms,
                                                                    val))
  pinned = spec.out_shardings(1)
  fn = xla_options.jit(counter, donate_argnums=(0,) if donate else (),
               **({"out_shardings": pinned} if pinned else {}))
  fn.trace_counter = counter  # type: ignore[attr-defined]
  return fn


def make_eval_fn(model: nn.Module, mesh: Mesh | None = None):
  """Jitted `accuracy(params, batch_stats, eval_set)`."""
  return xla_options.jit(lambda params, bs, data: evaluate(model, params, bs, data, mesh))


class HostStreamingEpoch:
  """The same epoch for banks kept in host memory: batches are gathered on the host and
  streamed to the devices with a prefetch thread (`prefetch` batches ahead).

  Uses the very same `plan_epoch` / `train_step` / `eval_batch` / `finish_epoch` as the
  on-device epoch, so both paths agree up to float reassociation. With several processes
  (a global mesh), every process plans the same epoch and gathers only the rows of each
  batch that its own devices hold (`parallel.global_batch`).
  """

  def __init__(self, spec: EpochSpec, prefetch: int = 2):
    self.spec = spec
    self.prefetch = prefetch
    pin = lambda *rest: ({"out_shardings": spec.out_shardings(*rest)}  # pylint: disable=unnecessary-lambda-assignment
                         if spec.state_sharding is not None else {})
    self._plan = jax.jit(lambda st, arms: plan_epoch(spec.bandit, st, arms, spec.batch_size,
                                                     spec.warmup_epochs), **pin(1, 2, 3, 4, 5))
    self._step = xla_options.jit(
        lambda st, x, y, m: train_step(spec.model, spec.tx, st, x, y, m, spec.mesh),
        donate_argnums=(0,), **pin(1))
    self._eval = xla_options.jit(
        lambda p, bs, x, y, m: eval_batch(spec.model, p, bs, x, y, m, spec.mesh))
    self._finish = jax.jit(lambda st, arm, acc, n: finish_epoch(
        spec.bandit, spec.reward_fn, st, arm, acc, n, spec.warmup_epochs), **pin(1))

  def _put(self, make_batch, i: int, size: int):
    """Batch i on the devices; `make_batch(i, rows)` gives the host rows `rows` of it."""
    if self.spec.mesh is None:
      return jax.device_put(make_batch(i, slice(0, size)))
    return parallel.global_batch(lambda rows: make_batch(i, rows), size, self.spec.mesh)

  def _stream(self, make_batch, n, size):
    """Yields device batches 0..n-1, produced `prefetch` ahead on a worker thread."""
    return parallel.prefetch((self._put(make_batch, i, size) for i in range(n)),
                             max(1, self.prefetch))

  def evaluate(self, params, batch_stats, images: np.ndarray, labels: np.ndarray,
               eval_batch_size: int) -> jax.Array:
    """Accuracy over host arrays, streamed in padded batches."""
    es = make_eval_set(images, labels, eval_batch_size)
    correct = jnp.zeros((), jnp.float32)
    count = jnp.zeros((), jnp.float32)
    for x, y, m in self._stream(
        lambda i, r: (es.images[i][r], es.labels[i][r], es.mask[i][r]), len(es.labels),
        eval_batch_size):
      c, n = self._eval(params, batch_stats, x, y, m)
      correct, count = correct + c, count + n
    return correct / jnp.maximum(count, 1.0)

  def __call__(self, state: TrainState, bank_images: np.ndarray, bank_labels: np.ndarray,
               arms: ArmArrays, val_images: np.ndarray, val_labels: np.ndarray,
               eval_batch_size: int):
    state, arm, batch_idx, loss_mask, n_steps, n_images = self._plan(state, arms)
    batch_idx = np.asarray(batch_idx)
    loss_mask = np.asarray(loss_mask)
    n = int(n_steps)
    zero = jnp.zeros((), jnp.float32)
    loss_sum, correct, count = zero, zero, zero
    batches = self._stream(
        lambda i, r: (bank_images[batch_idx[i][r]], bank_labels[batch_idx[i][r]],
                      loss_mask[i][r]), n, batch_idx.shape[1])
    for x, y, m in batches:
      state, (l, c, k) = self._step(state, x, y, m)
      loss_sum, correct, count = loss_sum + l, correct + c, count + k
    val_accuracy = self.evaluate(state.params, state.batch_stats, val_images, val_labels,
                                 eval_batch_size)
    state, reward = self._finish(state, arm, val_accuracy, n_images)
    return state, _epoch_metrics(arm, reward, val_accuracy, loss_sum, correct, count,
                                 n_images, n_steps)
