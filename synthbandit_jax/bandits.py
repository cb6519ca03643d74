"""Pure-functional multi-armed bandits: jittable, vmappable, one small interface.

A bandit is a triple of pure functions, in the style of optax's GradientTransformation:

  init(num_arms: int) -> state                   # num_arms is a static Python int
  select(state, key) -> arm                      # int32 scalar, the arm to pull next
  update(state, arm, reward) -> new_state        # reward: float32 scalar

Every state is a NamedTuple of float32 / int32 arrays (a pytree) with at least

  counts  int32 [A]   pulls per arm
  sums    float32 [A] total (undiscounted) reward per arm
  t       int32 []    total number of updates

so callers can report pulls and mean rewards (`arm_means`) without knowing the algorithm.
`select` and `update` contain no Python control flow on traced values: they run under
`jax.jit`, inside `lax.scan`, and under `jax.vmap` over a batch of states and keys. States are
plain pytrees, so they checkpoint like model parameters.

Example:

  bandit = make_bandit("ucb1", c=1.0)
  state = bandit.init(4)
  select, update = jax.jit(bandit.select), jax.jit(bandit.update)
  for key in jax.random.split(jax.random.key(0), 20):
    arm = select(state, key)
    reward = train_one_epoch_on(arm)     # e.g. reward_fn("accuracy")(val_acc, prev_val_acc)
    state = update(state, arm, reward)
  print(state.counts, arm_means(state))

  # 64 independent bandits at once:
  states = jax.vmap(lambda _: bandit.init(4))(jnp.arange(64))
  arms = jax.vmap(bandit.select)(states, jax.random.split(jax.random.key(1), 64))

Bit-exact batching: XLA contracts a multiply that feeds an add into one fused multiply-add
when both land in the same kernel, and vmap changes how operations are grouped into kernels.
The arithmetic here is therefore written so that products are folded into divisions or
applied after the add, and updates use one-hot masks instead of scatters; a vmapped batch of
states then equals a loop over single states bit for bit (tests/test_bandits.py checks it).
The one exception is EXP3: XLA's CPU exp() can differ in the last bit between its scalar and
vectorised code paths, so EXP3 log-weights agree to ~1e-7 (the selected arms still agree).

Keys are consumed by `select` only; split a fresh key for every call. The reward scale is the
caller's business: the exploration constants below assume rewards in [0, 1] unless stated.
The arm passed to `update` must lie in [0, A); an out-of-range arm matches no one-hot mask,
so the per-arm statistics stay unchanged and only `t` advances (no error under jit).
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

__all__ = [
    "Bandit",
    "BanditState",
    "BasicState",
    "DiscountedState",
    "SlidingWindowState",
    "Exp3State",
    "ucb1",
    "discounted_ucb",
    "sliding_window_ucb",
    "exp3",
    "exp3_probabilities",
    "gaussian_thompson",
    "epsilon_greedy",
    "fixed",
    "uniform",
    "make_bandit",
    "bandit_names",
    "arm_means",
    "reward_fn",
    "reward_names",
]


# ----------------------------------------------------------------------------- states


class BasicState(NamedTuple):
  """Counts and reward sums per arm: the state of UCB1, Thompson, epsilon-greedy, fixed, uniform."""
  counts: jax.Array  # int32 [A]
  sums: jax.Array  # float32 [A]
  t: jax.Array  # int32 []


class DiscountedState(NamedTuple):
  """State of discounted UCB: all-time statistics plus discounted counts and sums."""
  counts: jax.Array  # int32 [A]
  sums: jax.Array  # float32 [A]
  t: jax.Array  # int32 []
  disc_counts: jax.Array  # float32 [A], sum_s gamma^(t-s) 1{arm_s = a}
  disc_sums: jax.Array  # float32 [A], sum_s gamma^(t-s) 1{arm_s = a} r_s


class SlidingWindowState(NamedTuple):
  """State of sliding-window UCB: all-time statistics plus a ring buffer of the last pulls."""
  counts: jax.Array  # int32 [A]
  sums: jax.Array  # float32 [A]
  t: jax.Array  # int32 []
  window_arms: jax.Array  # int32 [W], -1 = empty slot; slot t % W holds pull t
  window_rewards: jax.Array  # float32 [W]


class Exp3State(NamedTuple):
  """State of EXP3: all-time statistics plus log-weights (see `exp3_probabilities`)."""
  counts: jax.Array  # int32 [A]
  sums: jax.Array  # float32 [A]
  t: jax.Array  # int32 []
  log_weights: jax.Array  # float32 [A], shifted so that the maximum is 0


BanditState = Union[BasicState, DiscountedState, SlidingWindowState, Exp3State]


class Bandit(NamedTuple):
  """A bandit algorithm as three pure functions (see the module docstring)."""
  init: Callable[[int], Any]
  select: Callable[[Any, jax.Array], jax.Array]
  update: Callable[[Any, jax.Array, jax.Array], Any]


# ----------------------------------------------------------------------------- helpers


def _check_num_arms(num_arms: int) -> int:
  try:
    n = operator.index(num_arms)
  except TypeError:
    raise ValueError(
        f"bandit init: num_arms must be a static Python int, got {type(num_arms).__name__} "
        f"{num_arms!r}; pass len(arms), not a traced value.") from None
  if n < 1:
    raise ValueError(f"bandit init: num_arms must be >= 1, got {n}.")
  return n


def _basic_init(num_arms: int) -> BasicState:
  a = _check_num_arms(num_arms)
  return BasicState(
      counts=jnp.zeros((a,), jnp.int32),
      sums=jnp.zeros((a,), jnp.float32),
      t=jnp.zeros((), jnp.int32))


def _one_hot(arm: jax.Array, num_arms: int) -> jax.Array:
  """Boolean [A] mask of `arm`."""
  return jnp.arange(num_arms, dtype=jnp.int32) == jnp.asarray(arm, jnp.int32)


def _record(state: Any, arm: jax.Array, reward: jax.Array) -> dict[str, jax.Array]:
  """All-time counts / sums / t after one pull, as keyword arguments for `_replace`."""
  hot = _one_hot(arm, state.counts.shape[0])
  reward = jnp.asarray(reward, jnp.float32)
  return dict(
      counts=state.counts + hot.astype(jnp.int32),
      sums=state.sums + jnp.where(hot, reward, jnp.float32(0.0)),
      t=state.t + jnp.int32(1))


def _first_true(mask: jax.Array) -> jax.Array:
  """Index of the first True entry (0 if none): argmax returns the lowest index on ties."""
  return jnp.argmax(mask).astype(jnp.int32)


def _argmax(values: jax.Array) -> jax.Array:
  """Argmax with ties broken towards the lowest index, as int32."""
  return jnp.argmax(values).astype(jnp.int32)


def _with_unplayed_first(unplayed: jax.Array, choice: jax.Array) -> jax.Array:
  """The first unplayed arm if there is one, else `choice`."""
  return jnp.where(jnp.any(unplayed), _first_true(unplayed), choice).astype(jnp.int32)


def _check(cond: bool, what: str) -> None:
  if not cond:
    raise ValueError(what)


def arm_means(state: Any) -> jax.Array:
  """Empirical all-time mean reward per arm, float32 [A] (0 for arms never pulled).

  Works for every state in this module (all carry `counts` and `sums`); for discounted and
  sliding-window UCB it is the undiscounted mean, not the statistic the algorithm acts on.
  """
  counts = jnp.asarray(state.counts)
  return jnp.where(counts > 0, state.sums / jnp.maximum(counts, 1).astype(jnp.float32),
                   jnp.float32(0.0))


# ----------------------------------------------------------------------------- UCB family


def ucb1(c: float = 1.0) -> Bandit:
  """UCB1 (Auer, Cesa-Bianchi & Fischer 2002, "Finite-time analysis of the MAB problem").

  Each arm is played once first, in index order (the first arm with count 0). Afterwards

    arm_t = argmax_a  mean_a + c * sqrt(ln t / n_a),

  with t = total pulls so far, n_a = pulls of arm a, mean_a = average reward of arm a; ties
  go to the lowest index. c = sqrt(2) with rewards in [0, 1] is the classic UCB1 index
  sqrt(2 ln t / n_a) whose regret bound is sum_{a: D_a>0} 8 ln T / D_a + (1 + pi^2/3) D_a.

  Paper-faithful preset (Kerim et al. 2024 reference code): c = 2 with reward = validation
  accuracy in percent (0-100). The bonus is then at most 2 * sqrt(ln T) points (about 3.5 for
  T = 20 epochs, i.e. ~3.5% of the reward range), the same as c ~ 0.02 with rewards in
  [0, 1]: the exploration bonus is negligible and the bandit is near-greedy after the first
  round. The reward scale is the caller's business (see `reward_fn(..., scale=100)`).

  Args:
    c: exploration constant (>= 0).
  """
  _check(c >= 0, f"ucb1: c must be >= 0, got {c}.")
  c2 = jnp.float32(c * c)

  def select(state: BasicState, key: jax.Array) -> jax.Array:
    del key  # deterministic
    n = jnp.maximum(state.counts, 1).astype(jnp.float32)
    log_t = jnp.log(jnp.maximum(state.t, 1).astype(jnp.float32))
    # c * sqrt(x) written as sqrt(c^2 x): no product feeds the add ("Bit-exact batching").
    index = state.sums / n + jnp.sqrt(c2 * log_t / n)
    return _with_unplayed_first(state.counts == 0, _argmax(index))

  def update(state: BasicState, arm: jax.Array, reward: jax.Array) -> BasicState:
    return state._replace(**_record(state, arm, reward))

  return Bandit(_basic_init, select, update)


def discounted_ucb(c: float = 1.0, gamma: float = 0.9) -> Bandit:
  """Discounted UCB (Garivier & Moulines 2011, "On upper-confidence bound policies for
  switching bandit problems").

  After every update all arms are decayed:  N_a <- gamma N_a + 1{arm = a},
  S_a <- gamma S_a + 1{arm = a} r.  Unplayed arms (all-time count 0) are selected first, in
  index order; afterwards

    arm_t = argmax_a  S_a / N_a + c * sqrt(ln(N_total) / N_a),   N_total = sum_a N_a,

  ties to the lowest index. c corresponds to 2 B sqrt(xi) in the paper (B bounds the reward).
  An arm whose discounted count underflowed to 0 gets an infinite bonus (it is played again).

  Args:
    c: exploration constant (>= 0).
    gamma: discount factor in (0, 1]; gamma = 1 is UCB1 with t counted as N_total.
  """
  _check(c >= 0, f"discounted_ucb: c must be >= 0, got {c}.")
  _check(0 < gamma <= 1, f"discounted_ucb: gamma must be in (0, 1], got {gamma}.")
  c2, g32, inv_g32 = jnp.float32(c * c), jnp.float32(gamma), jnp.float32(1.0 / gamma)

  def init(num_arms: int) -> DiscountedState:
    base = _basic_init(num_arms)
    a = base.counts.shape[0]
    return DiscountedState(*base, disc_counts=jnp.zeros((a,), jnp.float32),
                           disc_sums=jnp.zeros((a,), jnp.float32))

  def select(state: DiscountedState, key: jax.Array) -> jax.Array:
    del key
    nd = state.disc_counts
    positive = nd > 0
    safe_n = jnp.where(positive, nd, jnp.float32(1.0))
    log_total = jnp.log(jnp.maximum(jnp.sum(nd), jnp.float32(1.0)))
    index = jnp.where(positive, state.disc_sums / safe_n + jnp.sqrt(c2 * log_total / safe_n),
                      jnp.float32(jnp.inf))
    return _with_unplayed_first(state.counts == 0, _argmax(index))

  def update(state: DiscountedState, arm: jax.Array, reward: jax.Array) -> DiscountedState:
    hot = _one_hot(arm, state.counts.shape[0])
    reward = jnp.asarray(reward, jnp.float32)
    # gamma * N + 1{arm} as gamma * (N + 1{arm} / gamma): no product feeds an add, so the
    # result does not depend on FMA contraction (see "Bit-exact batching" above).
    zero = jnp.float32(0.0)
    return state._replace(
        **_record(state, arm, reward),
        disc_counts=g32 * (state.disc_counts + jnp.where(hot, inv_g32, zero)),
        disc_sums=g32 * (state.disc_sums + jnp.where(hot, reward * inv_g32, zero)))

  return Bandit(init, select, update)


def sliding_window_ucb(c: float = 1.0, window: int = 10) -> Bandit:
  """Sliding-window UCB (Garivier & Moulines 2011, "On upper-confidence bound policies for
  switching bandit problems").

  Statistics over the last `window` pulls only, kept in a fixed-size ring buffer of
  (arm, reward). With N_a, S_a the count and reward sum of arm a inside the window:

    arm_t = argmax_a  S_a / N_a + c * sqrt(ln(min(t, window)) / N_a),

  t = total pulls so far, ties to the lowest index. Arms with no pull inside the window are
  selected first, in index order (so with window < num_arms the bandit cycles). c
  corresponds to B sqrt(xi) in the paper.

  Args:
    c: exploration constant (>= 0).
    window: number of most recent pulls kept (static int >= 1).
  """
  _check(c >= 0, f"sliding_window_ucb: c must be >= 0, got {c}.")
  try:
    window = operator.index(window)
  except TypeError:
    raise ValueError(f"sliding_window_ucb: window must be an int, got {window!r}.") from None
  _check(window >= 1, f"sliding_window_ucb: window must be >= 1, got {window}.")
  c2 = jnp.float32(c * c)

  def init(num_arms: int) -> SlidingWindowState:
    base = _basic_init(num_arms)
    return SlidingWindowState(*base, window_arms=jnp.full((window,), -1, jnp.int32),
                              window_rewards=jnp.zeros((window,), jnp.float32))

  def select(state: SlidingWindowState, key: jax.Array) -> jax.Array:
    del key
    a = state.counts.shape[0]
    member = state.window_arms[:, None] == jnp.arange(a, dtype=jnp.int32)[None, :]  # [W, A]
    win_counts = jnp.sum(member.astype(jnp.int32), axis=0)
    win_sums = jnp.sum(jnp.where(member, state.window_rewards[:, None], jnp.float32(0.0)),
                       axis=0)
    n = jnp.maximum(win_counts, 1).astype(jnp.float32)
    log_t = jnp.log(jnp.clip(state.t, 1, window).astype(jnp.float32))
    index = win_sums / n + jnp.sqrt(c2 * log_t / n)
    return _with_unplayed_first(win_counts == 0, _argmax(index))

  def update(state: SlidingWindowState, arm: jax.Array,
             reward: jax.Array) -> SlidingWindowState:
    rec = _record(state, arm, reward)
    slot = jnp.arange(window, dtype=jnp.int32) == state.t % jnp.int32(window)
    return state._replace(
        **rec,
        window_arms=jnp.where(slot, jnp.asarray(arm, jnp.int32), state.window_arms),
        window_rewards=jnp.where(slot, jnp.asarray(reward, jnp.float32), state.window_rewards))

  return Bandit(init, select, update)


# ----------------------------------------------------------------------------- randomised


def exp3_probabilities(state: Exp3State, gamma: float) -> jax.Array:
  """EXP3's arm distribution p = (1 - gamma) w / sum(w) + gamma / A, float32 [A].

  `gamma` must be the one the bandit was built with (it is not stored in the state).
  """
  log_w = state.log_weights
  w = jnp.exp(log_w - jnp.max(log_w))
  return jnp.float32(1.0 - gamma) * (w / jnp.sum(w)) + jnp.float32(gamma / log_w.shape[0])


def exp3(gamma: float = 0.1, reward_range: tuple[float, float] = (0.0, 1.0)) -> Bandit:
  """EXP3 (Auer, Cesa-Bianchi, Freund & Schapire 2002, "The nonstochastic multiarmed bandit
  problem").

    p_a = (1 - gamma) w_a / sum_b w_b + gamma / A,     arm_t ~ p (sampled with the key),
    x = (r - lo) / (hi - lo) clipped to [0, 1],         xhat = x / p_{arm_t},
    w_{arm_t} <- w_{arm_t} * exp(gamma * xhat / A).

  Weights are kept in log space, shifted so their maximum is 0 (p is unchanged).
  `select` samples p as the mixture it is: with probability gamma a uniform arm, otherwise
  an arm drawn from softmax(log w). `exp3_probabilities(state, gamma)` returns p.

  Args:
    gamma: exploration rate in (0, 1].
    reward_range: (lo, hi) of the rewards the caller passes, lo < hi.
  """
  _check(0 < gamma <= 1, f"exp3: gamma must be in (0, 1], got {gamma}.")
  lo, hi = (float(v) for v in reward_range)
  _check(hi > lo, f"exp3: reward_range must be (lo, hi) with lo < hi, got {reward_range}.")
  lo32, inv_span32, g32 = jnp.float32(lo), jnp.float32(1.0 / (hi - lo)), jnp.float32(gamma)
  inv_keep = jnp.float32(1.0 / (1.0 - gamma)) if gamma < 1 else jnp.float32(jnp.inf)

  def init(num_arms: int) -> Exp3State:
    base = _basic_init(num_arms)
    return Exp3State(*base, log_weights=jnp.zeros(base.counts.shape, jnp.float32))

  def select(state: Exp3State, key: jax.Array) -> jax.Array:
    k_explore, k_uniform, k_weights = jax.random.split(key, 3)
    num_arms = state.counts.shape[0]
    explore = jax.random.uniform(k_explore, (), jnp.float32) < g32
    uniform_arm = jax.random.randint(k_uniform, (), 0, num_arms, jnp.int32)
    weighted_arm = jax.random.categorical(k_weights, state.log_weights).astype(jnp.int32)
    return jnp.where(explore, uniform_arm, weighted_arm)

  def update(state: Exp3State, arm: jax.Array, reward: jax.Array) -> Exp3State:
    num_arms = state.counts.shape[0]
    hot = _one_hot(arm, num_arms)
    x = jnp.clip((jnp.asarray(reward, jnp.float32) - lo32) * inv_span32, 0.0, 1.0)
    # p_arm and gamma * xhat / A as scalar divisions, so no product feeds an add.
    w = jnp.exp(state.log_weights)  # max is 0: no overflow
    w_arm = w[jnp.asarray(arm, jnp.int32)]
    p_arm = w_arm / (jnp.sum(w) * inv_keep) + jnp.float32(gamma / num_arms)
    step = x / (p_arm * jnp.float32(num_arms / gamma))
    log_w = state.log_weights + jnp.where(hot, step, jnp.float32(0.0))
    return state._replace(**_record(state, arm, reward), log_weights=log_w - jnp.max(log_w))

  return Bandit(init, select, update)


def gaussian_thompson(prior_mean: float = 0.5, prior_std: float = 1.0,
                      obs_std: float = 0.1) -> Bandit:
  """Gaussian Thompson sampling (Thompson 1933; Agrawal & Goyal 2013, "Further optimal regret
  bounds for Thompson sampling").

  Each arm's mean has prior N(prior_mean, prior_std^2); rewards are modelled as
  N(mean, obs_std^2). The conjugate posterior of an arm with n pulls and reward sum S is

    precision = 1 / prior_std^2 + n / obs_std^2,
    mean_post = (prior_mean / prior_std^2 + S / obs_std^2) / precision,

  and arm_t = argmax_a of one draw theta_a ~ N(mean_post_a, 1 / precision_a) per arm.

  Args:
    prior_mean: prior mean of every arm's reward.
    prior_std: prior standard deviation (> 0).
    obs_std: assumed reward noise standard deviation (> 0); small values make the posterior
      concentrate fast (greedier), use ~0.5 for Bernoulli rewards.
  """
  _check(prior_std > 0, f"gaussian_thompson: prior_std must be > 0, got {prior_std}.")
  _check(obs_std > 0, f"gaussian_thompson: obs_std must be > 0, got {obs_std}.")
  # Multiplying numerator and denominator by obs_std^2 (rho = obs_std^2 / prior_std^2):
  # mean_post = (rho m0 + S) / (rho + n), std_post = obs_std / sqrt(rho + n).
  rho = jnp.float32(obs_std**2 / prior_std**2)
  rho_m0 = jnp.float32(obs_std**2 / prior_std**2 * prior_mean)
  inv_obs_std = jnp.float32(1.0 / obs_std)

  def select(state: BasicState, key: jax.Array) -> jax.Array:
    shrunk_n = rho + state.counts.astype(jnp.float32)
    mean = (rho_m0 + state.sums) / shrunk_n
    noise = jax.random.normal(key, state.sums.shape, jnp.float32)
    return _argmax(mean + noise / (jnp.sqrt(shrunk_n) * inv_obs_std))

  def update(state: BasicState, arm: jax.Array, reward: jax.Array) -> BasicState:
    return state._replace(**_record(state, arm, reward))

  return Bandit(_basic_init, select, update)


def epsilon_greedy(epsilon: float = 0.1, decay: float = 0.0) -> Bandit:
  """Epsilon-greedy (Sutton & Barto 2018, sec. 2.2; the decaying rate follows the idea of
  Auer et al. 2002's epsilon_n-greedy, eps_n ~ 1/n).

  Unplayed arms are selected first, in index order. Afterwards, with probability
  eps_t = epsilon / (1 + decay * t) a uniformly random arm, otherwise argmax_a mean_a (ties
  to the lowest index); t = total pulls so far.

  Args:
    epsilon: exploration probability in [0, 1].
    decay: >= 0; 0 keeps epsilon constant.
  """
  _check(0 <= epsilon <= 1, f"epsilon_greedy: epsilon must be in [0, 1], got {epsilon}.")
  _check(decay >= 0, f"epsilon_greedy: decay must be >= 0, got {decay}.")
  e32, d32 = jnp.float32(epsilon), jnp.float32(decay)

  def select(state: BasicState, key: jax.Array) -> jax.Array:
    a = state.counts.shape[0]
    k_explore, k_arm = jax.random.split(key)
    eps = e32 / (jnp.float32(1.0) + d32 * state.t.astype(jnp.float32))
    explore = jax.random.uniform(k_explore, (), jnp.float32) < eps
    random_arm = jax.random.randint(k_arm, (), 0, a, jnp.int32)
    greedy = _argmax(arm_means(state))
    return _with_unplayed_first(state.counts == 0, jnp.where(explore, random_arm, greedy))

  def update(state: BasicState, arm: jax.Array, reward: jax.Array) -> BasicState:
    return state._replace(**_record(state, arm, reward))

  return Bandit(_basic_init, select, update)


# ----------------------------------------------------------------------------- controls


def fixed(arm: int = 0) -> Bandit:
  """Always selects `arm` (the non-bandit training modes); update only counts pulls.

  Args:
    arm: the arm to pull, checked against num_arms at init.
  """
  try:
    arm = operator.index(arm)
  except TypeError:
    raise ValueError(f"fixed: arm must be an int, got {arm!r}.") from None
  _check(arm >= 0, f"fixed: arm must be >= 0, got {arm}.")

  def init(num_arms: int) -> BasicState:
    n = _check_num_arms(num_arms)
    _check(arm < n, f"fixed: arm={arm} is out of range for num_arms={n}.")
    return _basic_init(n)

  def select(state: BasicState, key: jax.Array) -> jax.Array:
    del state, key
    return jnp.asarray(arm, jnp.int32)

  def update(state: BasicState, arm_: jax.Array, reward: jax.Array) -> BasicState:
    return state._replace(**_record(state, arm_, reward))

  return Bandit(init, select, update)


def uniform() -> Bandit:
  """A uniformly random arm every round, drawn with the key (a control without learning)."""

  def select(state: BasicState, key: jax.Array) -> jax.Array:
    return jax.random.randint(key, (), 0, state.counts.shape[0], jnp.int32)

  def update(state: BasicState, arm: jax.Array, reward: jax.Array) -> BasicState:
    return state._replace(**_record(state, arm, reward))

  return Bandit(_basic_init, select, update)


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Bandit]] = {
    "ucb1": ucb1,
    "discounted_ucb": discounted_ucb,
    "sliding_window_ucb": sliding_window_ucb,
    "exp3": exp3,
    "thompson": gaussian_thompson,
    "epsilon_greedy": epsilon_greedy,
    "fixed": fixed,
    "uniform": uniform,
}


def bandit_names() -> tuple[str, ...]:
  """Names accepted by `make_bandit`."""
  return tuple(_REGISTRY)


def make_bandit(name: str, **kwargs: Any) -> Bandit:
  """Builds a bandit by registry name, e.g. make_bandit("discounted_ucb", gamma=0.8).

  Raises:
    ValueError: unknown name or keyword argument (the message lists the valid ones).
  """
  if name not in _REGISTRY:
    raise ValueError(f"make_bandit: unknown bandit {name!r}; valid names: "
                     f"{', '.join(_REGISTRY)}.")
  ctor = _REGISTRY[name]
  valid = tuple(inspect.signature(ctor).parameters)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"make_bandit: bandit {name!r} got unknown argument(s) {unknown}; valid: "
                     f"{', '.join(valid) if valid else '(none)'}.")
  return ctor(**kwargs)


# ----------------------------------------------------------------------------- rewards

_REWARDS = ("accuracy", "gain")


def reward_names() -> tuple[str, ...]:
  """Names accepted by `reward_fn`."""
  return _REWARDS


def reward_fn(name: str, scale: float = 1.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns a jittable f(val_acc, prev_val_acc) -> float32 reward; val_acc is in [0, 1].

  "accuracy": scale * val_acc.  "gain": scale * (val_acc - prev_val_acc).
  scale = 100 gives the paper's percent (pair it with ucb1(c=2) for the faithful preset).
  """
  if name not in _REWARDS:
    raise ValueError(f"reward_fn: unknown reward {name!r}; valid names: {', '.join(_REWARDS)}.")
  if not math.isfinite(scale):
    raise ValueError(f"reward_fn: scale must be finite, got {scale}.")
  s32 = jnp.float32(scale)

  def accuracy(val_acc: jax.Array, prev_val_acc: jax.Array) -> jax.Array:
    del prev_val_acc
    return s32 * jnp.asarray(val_acc, jnp.float32)

  def gain(val_acc: jax.Array, prev_val_acc: jax.Array) -> jax.Array:
    return s32 * (jnp.asarray(val_acc, jnp.float32) - jnp.asarray(prev_val_acc, jnp.float32))

  return accuracy if name == "accuracy" else gain
