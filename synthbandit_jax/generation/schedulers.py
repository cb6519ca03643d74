"""Pure-functional, jittable diffusion samplers that reproduce diffusers' schedulers.

Three deterministic samplers, each equal (to float32 rounding) to diffusers 0.42's scheduler
of the same config: DDIM with eta=0 (`DDIMScheduler`), DPM-Solver++ 2M (`DPMSolverMultistep
Scheduler`, algorithm_type "dpmsolver++", solver_order 2) and Euler with s_churn=0
(`EulerDiscreteScheduler`). diffusers keeps a mutable step counter inside the scheduler; here
everything the loop needs is precomputed on the host into a `Plan` (a pytree of float32
arrays), and `step(plan, state, model_output, i, x)` is a pure function of a traced step
index `i`, so a whole sampling loop runs inside `jax.lax.fori_loop` / `scan` under `jit`.

Usage::

  cfg = config_from_diffusers(json.load(open("scheduler/scheduler_config.json")))
  plan = make_plan("dpmpp_2m", cfg, 25)
  x = noise * plan.init_noise_sigma
  x0 = sample_loop(plan, lambda x_in, t: unet(x_in, t), x)   # or step by step:
  state = init_state(plan, x.shape)
  for i in range(plan.num_inference_steps):
    out = unet(scale_model_input(plan, x, i), plan.timesteps[i])
    x, state = step(plan, state, out, i, x)

Noise schedule (training, T = num_train_timesteps): betas are "linear" (linspace(b0, b1, T)),
"scaled_linear" (linspace(sqrt b0, sqrt b1, T)^2, Stable Diffusion) or "squaredcos_cap_v2"
(Nichol & Dhariwal's cosine alpha-bar, betas capped at 0.999); acp_t = prod_{s<=t} (1 - beta_s)
(`alphas_cumprod`). The forward process is x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps
(`add_noise`); the Karras/EDM noise level is sigma_t = sqrt((1 - acp_t) / acp_t), and the
variance-preserving pair is alpha = 1/sqrt(1 + sigma^2), sigma_vp = sigma * alpha. The float32
tables are built exactly as torch builds them (torch.linspace's fused two-sided formula,
cumprod accumulated in float64), so the plans' timesteps equal diffusers' bit for bit, except
Euler's fractional Karras timesteps, which can differ in the last float32 bit: torch's
vectorised float32 sqrt (in sigma_t) is not correctly rounded on some CPUs, numpy's is.

Model outputs (`prediction_type`): "epsilon" (eps), "v_prediction" (v = sqrt(acp) eps -
sqrt(1 - acp) x0, Salimans & Ho 2022) or "sample" (x0 itself). Each sampler first turns the
output into x0 (and eps) at the current noise level.

Samplers (step i goes from timesteps[i] towards the next noise level):
  ddim      (Song et al. 2021, eta=0): with a = acp at t_i, a' = acp at t_i - T//N (diffusers
            uses that previous timestep for every spacing; below 0 it is 1 when
            set_alpha_to_one else acp_0):  x0 optionally clipped to +-clip_sample_range,
            x_next = sqrt(a') x0 + sqrt(1 - a') eps.
  euler     (Karras et al. 2022, Alg. 2 with s_churn=0): the model sees x / sqrt(sigma_i^2 + 1);
            d = (x - x0) / sigma_i, x_next = x + (sigma_{i+1} - sigma_i) d.
  dpmpp_2m  (Lu et al. 2022, DPM-Solver++(2M), data prediction): lambda = log(alpha/sigma_vp),
            h = lambda_{i+1} - lambda_i, r = (lambda_i - lambda_{i-1}) / h, D0 = x0_i,
            D1 = (x0_i - x0_{i-1}) / r;
            x_next = (sigma_vp_{i+1}/sigma_vp_i) x - alpha_{i+1} (e^{-h} - 1) (D0 + D1/2)
            ("midpoint"; "heun" uses + alpha_{i+1} ((e^{-h} - 1)/h + 1) D1 instead of the D1/2
            term). The first step of a run, and the last step when final_sigmas_type is "zero"
            or euler_at_final, or lower_order_final with N < 15, are first order (D1 = 0).
            With the final sigma 0 the first-order update returns x0 exactly.

Plan tables (`Plan.tables`, float32, N = num_inference_steps):
  ddim:     sqrt_acp, sqrt_one_minus_acp (at t_i), sqrt_acp_prev, sqrt_one_minus_acp_prev [N]
  euler:    sigmas [N+1] (last 0, or sigma at t=0 for final_sigmas_type "sigma_min")
  dpmpp_2m: sigmas [N+1]; alpha, sigma_vp [N] (x0 conversion at step i); coef_x, coef_x0,
            coef_diff [N] (x_next = coef_x x + coef_x0 x0_i + coef_diff (x0_i - x0_{i-1}));
            second_order [N] (1.0 where the step may use the previous x0, else 0.0)
Timesteps (`Plan.timesteps`, float32 [N], what the UNet is fed) are integer-valued for ddim and
dpmpp_2m and may be fractional for euler (linspace spacing, Karras sigmas), as in diffusers.

`state` is a `SamplerState(count, prev_x0)`: count = steps taken in this run (so a loop that
starts at i > 0, img2img style, still begins with a first-order DPM++ step, as diffusers
does), prev_x0 = the previous x0 prediction (DPM++ only; None otherwise). All arithmetic on
the sample is float32 whatever the model's dtype.

Diffusers quirks reproduced on purpose (documented because they surprise):
  * Missing config keys take diffusers' class defaults, which differ per scheduler:
    timestep_spacing defaults to "leading" for DDIM and "linspace" for Euler and DPM++ (so
    SD 1.5's scheduler_config.json, which names none, gives different grids per sampler).
  * "linspace" spacing with N=1 gives timestep 0 for DDIM and Euler (np.linspace(0, T-1, 1)).
  * Euler's Karras sigmas span the interpolated sigmas at the first and last *inference*
    timesteps; DPM++'s span the full training range (sigma at t=0 .. t=T-1).
  * DPM++ Karras timesteps are rounded to integers (truncated for squaredcos_cap_v2), and
    DPM++'s "leading" spacing uses T // (N+1), unlike DDIM's/Euler's T // N.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("ddim", "dpmpp_2m", "euler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVER_TYPES = ("midpoint", "heun")
# diffusers' default timestep_spacing per scheduler class (used when the config names none).
DEFAULT_SPACING = {"ddim": "leading", "dpmpp_2m": "linspace", "euler": "linspace"}

Array = Any


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The scheduler settings the samplers read (defaults: Stable Diffusion 1.5's config).

  Fields mirror the keys of diffusers' scheduler_config.json. Which sampler reads what:
  all: num_train_timesteps, beta_*, trained_betas, prediction_type, timestep_spacing,
  steps_offset; ddim: set_alpha_to_one, clip_sample, clip_sample_range; euler and dpmpp_2m:
  use_karras_sigmas, final_sigmas_type; dpmpp_2m: lower_order_final, euler_at_final,
  solver_type. `timestep_spacing=None` means diffusers' per-class default (DEFAULT_SPACING).
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  trained_betas: tuple[float, ...] | None = None
  prediction_type: str = "epsilon"
  timestep_spacing: str | None = None
  steps_offset: int = 1
  set_alpha_to_one: bool = False
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  use_karras_sigmas: bool = False
  final_sigmas_type: str = "zero"
  lower_order_final: bool = True
  euler_at_final: bool = False
  solver_type: str = "midpoint"

  def __post_init__(self):
    def choice(key, allowed, allow_none=False):
      value = getattr(self, key)
      if not (value is None and allow_none) and value not in allowed:
        raise ValueError(f"scheduler config {key}={value!r} is not supported; use one of "
                         f"{', '.join(map(repr, allowed))}")
    choice("beta_schedule", BETA_SCHEDULES)
    choice("prediction_type", PREDICTION_TYPES)
    choice("timestep_spacing", TIMESTEP_SPACINGS, allow_none=True)
    choice("final_sigmas_type", FINAL_SIGMAS_TYPES)
    choice("solver_type", SOLVER_TYPES)
    for key in ("num_train_timesteps", "steps_offset"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"scheduler config {key}={value!r} must be an integer")
    if self.num_train_timesteps < 2:
      raise ValueError(f"scheduler config num_train_timesteps={self.num_train_timesteps} must "
                       "be at least 2")
    if self.steps_offset < 0:
      raise ValueError(f"scheduler config steps_offset={self.steps_offset} must be >= 0")
    for key in ("beta_start", "beta_end", "clip_sample_range"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"scheduler config {key}={value!r} must be a number")
    if not 0 < self.beta_start < 1 or not 0 < self.beta_end < 1:
      raise ValueError(f"scheduler config beta_start={self.beta_start}, beta_end="
                       f"{self.beta_end} must lie in (0, 1)")
    if self.clip_sample_range <= 0:
      raise ValueError(f"scheduler config clip_sample_range={self.clip_sample_range} must be "
                       "positive")
    for key in ("set_alpha_to_one", "clip_sample", "use_karras_sigmas", "lower_order_final",
                "euler_at_final"):
      if not isinstance(getattr(self, key), bool):
        raise ValueError(f"scheduler config {key}={getattr(self, key)!r} must be true or false")
    if self.trained_betas is not None:
      betas = np.asarray(self.trained_betas, dtype=np.float64)
      if betas.shape != (self.num_train_timesteps,):
        raise ValueError(f"scheduler config trained_betas has {betas.size} values but "
                         f"num_train_timesteps={self.num_train_timesteps}; give one beta per "
                         "training timestep")
      if not np.all((betas > 0) & (betas < 1)):
        raise ValueError("scheduler config trained_betas must all lie in (0, 1)")


# Keys that change the math, with the only value we implement (diffusers' default).
_MUST_EQUAL: dict[str, tuple[Any, str]] = {
    "rescale_betas_zero_snr": (False, "zero-terminal-SNR rescaling is not implemented"),
    "thresholding": (False, "dynamic thresholding is not implemented (and unsuited to latent "
                            "diffusion)"),
    "use_exponential_sigmas": (False, "only Karras sigmas are implemented"),
    "use_beta_sigmas": (False, "only Karras sigmas are implemented"),
    "use_lu_lambdas": (False, "only Karras sigmas are implemented"),
    "use_flow_sigmas": (False, "flow-matching sigmas are not implemented"),
    "use_dynamic_shifting": (False, "flow-matching shifts are not implemented"),
    "solver_order": (2, "only DPM-Solver++ 2M (solver_order 2) is implemented"),
    "algorithm_type": ("dpmsolver++", "only algorithm_type 'dpmsolver++' is implemented"),
    "interpolation_type": ("linear", "only linear sigma interpolation is implemented"),
    "timestep_type": ("discrete", "only discrete timesteps are implemented"),
    "variance_type": (None, "learned variances are not implemented"),
    "sigma_min": (None, "custom Karras sigma_min is not implemented"),
    "sigma_max": (None, "custom Karras sigma_max is not implemented"),
    "lambda_min_clipped": (-math.inf, "lambda clipping is not implemented"),
}
# Keys that only matter for settings we reject above, or for other schedulers.
_IGNORED = frozenset({
    "skip_prk_steps", "dynamic_thresholding_ratio", "sample_max_value", "flow_shift",
    "time_shift_type",
})
# diffusers' class defaults (DDIM's for the DDIM-only keys), used for keys a config omits.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
    "timestep_spacing": None, "steps_offset": 0, "set_alpha_to_one": True,
    "clip_sample": True, "clip_sample_range": 1.0, "use_karras_sigmas": False,
    "final_sigmas_type": "zero", "lower_order_final": True, "euler_at_final": False,
    "solver_type": "midpoint",
}


def _is_default(value: Any, want: Any) -> bool:
  """Whether a config value equals the only setting we implement."""
  if want is None:
    return value is None
  if isinstance(want, bool):  # diffusers also writes null for unset use_* flags
    return value is None or value is want
  if isinstance(want, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == want
  return type(value) is type(want) and value == want


def config_from_diffusers(cfg: Mapping[str, Any]) -> SchedulerConfig:
  """A `SchedulerConfig` from a diffusers scheduler_config.json dict.

  Keys the dict omits (or lists in diffusers' ``_use_default_values``) take diffusers' class
  defaults, so the result samples like ``DDIMScheduler/EulerDiscreteScheduler/
  DPMSolverMultistepScheduler.from_config(cfg)``: e.g. SD 1.5's file (PNDM, no
  timestep_spacing) gives `SchedulerConfig()`. Keys for settings we do not implement
  (rescale_betas_zero_snr, thresholding, solver_order != 2, ...) raise ValueError naming the
  key when set to anything but their default; unknown keys are ignored with a warning.
  """
  if not isinstance(cfg, Mapping):
    raise ValueError(f"scheduler config must be a dict (scheduler_config.json), got "
                     f"{type(cfg).__name__}")
  defaulted = set(cfg.get("_use_default_values") or ())
  kwargs: dict[str, Any] = {}
  for key, value in cfg.items():
    if key.startswith("_") or key in defaulted or key in _IGNORED:
      continue
    if key in _MUST_EQUAL:
      want, why = _MUST_EQUAL[key]
      if not _is_default(value, want):
        raise ValueError(f"scheduler config {key}={value!r} is not supported: {why}; "
                         f"use {want!r} or drop the key")
      continue
    if key not in _DIFFUSERS_DEFAULTS:
      log.warning("scheduler config key %r (=%r) is not used by synthbandit_jax's samplers; "
                  "ignored", key, value)
      continue
    if key == "trained_betas" and value is not None:
      try:
        if isinstance(value, (str, bytes)):
          raise TypeError
        value = tuple(float(v) for v in value)
      except (TypeError, ValueError):
        raise ValueError(f"scheduler config trained_betas={value!r} must be a list of floats "
                         "or null") from None
    if key == "use_karras_sigmas" and value is None:  # EulerDiscreteScheduler allows None
      value = False
    if isinstance(value, float) and key in ("num_train_timesteps", "steps_offset") and \
        value.is_integer():
      value = int(value)
    kwargs[key] = value
  merged = {**_DIFFUSERS_DEFAULTS, **kwargs}
  return SchedulerConfig(**merged)


# ----------------------------------------------------------------------------- noise schedule

def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(start, end, n, dtype=float32), bit for bit.

  torch fills the first half as start + step*i and the second as end - step*(n-1-i), each a
  single rounding (fused multiply-add), with step = (end - start) / (n - 1) in float32.
  """
  s, e = np.float32(start), np.float32(end)
  if n == 1:
    return np.array([s], np.float32)
  step = np.float32((e - s) / np.float32(n - 1))
  idx = np.arange(n, dtype=np.float64)
  head = (np.float64(s) + np.float64(step) * idx).astype(np.float32)
  tail = (np.float64(e) - np.float64(step) * (n - 1 - idx)).astype(np.float32)
  return np.where(np.arange(n) < n // 2, head, tail).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's squaredcos_cap_v2: beta_i = 1 - abar((i+1)/n) / abar(i/n)."""
  def abar(u: float) -> float:
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)],
                  np.float32)


@functools.lru_cache(maxsize=32)
def _alphas_cumprod_cached(config: SchedulerConfig) -> np.ndarray:
  t = config.num_train_timesteps
  if config.trained_betas is not None:
    betas = np.asarray(config.trained_betas, np.float32)
  elif config.beta_schedule == "linear":
    betas = _torch_linspace_f32(config.beta_start, config.beta_end, t)
  elif config.beta_schedule == "scaled_linear":
    betas = _torch_linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, t) ** 2
  else:
    betas = _cosine_betas(t)
  alphas = np.float32(1.0) - betas.astype(np.float32)
  acp = np.cumprod(alphas.astype(np.float64)).astype(np.float32)  # torch accumulates in f64
  acp.setflags(write=False)
  return acp


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
  """acp_t = prod_{s<=t} (1 - beta_s), float32 [num_train_timesteps] (read-only)."""
  return _alphas_cumprod_cached(config)


def _train_sigmas(acp: np.ndarray) -> np.ndarray:
  """sigma_t = sqrt((1 - acp_t) / acp_t) in float32, increasing in t."""
  return np.sqrt((np.float32(1.0) - acp) / acp).astype(np.float32)


def _sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timestep whose log-sigma linearly interpolates to each sigma.

  One scalar at a time on purpose: numpy's vectorised float64 log can differ from the scalar
  one in the last bit, and diffusers takes the scalar path (its timesteps must match exactly).
  """
  n = log_train_sigmas.shape[0]
  out = np.empty(len(sigmas), np.float64)
  for k, sigma in enumerate(np.asarray(sigmas, np.float64)):
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low_idx = min(max(int(np.searchsorted(log_train_sigmas, log_sigma, side="right")) - 1, 0),
                  n - 2)
    low, high = log_train_sigmas[low_idx], log_train_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    out[k] = (1 - w) * np.int64(low_idx) + w * np.int64(low_idx + 1)
  return out


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma^(1/rho), max to min."""
  ramp = np.linspace(0, 1, n)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (hi + ramp * (lo - hi)) ** rho


# ----------------------------------------------------------------------------- plans

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["timesteps", "init_noise_sigma", "tables"],
                   meta_fields=["kind", "prediction_type", "clip_sample_range"])
@dataclasses.dataclass(frozen=True, eq=False)  # arrays inside: compare tables explicitly
class Plan:
  """Everything one sampling run needs (a pytree: arrays are leaves, the rest is static).

  `timesteps` f32[N]: what the model is fed at step i; `init_noise_sigma` f32[]: multiply unit
  noise by it to get x_T; `tables`: the per-step float32 tables of the sampler (module
  docstring); `clip_sample_range`: DDIM's x0 clip (None: no clipping).
  """
  kind: str
  prediction_type: str
  clip_sample_range: float | None
  timesteps: Array
  init_noise_sigma: Array
  tables: dict[str, Array]

  @property
  def num_inference_steps(self) -> int:
    return int(self.timesteps.shape[0])


class SamplerState(NamedTuple):
  """Carry of a sampling loop: steps taken so far, and DPM++'s previous x0 prediction."""
  count: Array
  prev_x0: Array | None


def _spacing(kind: str, config: SchedulerConfig) -> str:
  return config.timestep_spacing or DEFAULT_SPACING[kind]


def _check_timesteps(kind: str, config: SchedulerConfig, n: int, ts: np.ndarray) -> None:
  t_max = config.num_train_timesteps - 1
  spacing = _spacing(kind, config)
  if ts.shape != (n,):
    raise ValueError(
        f"{kind} with timestep_spacing={spacing!r} gives {ts.shape[0]} timesteps for "
        f"num_inference_steps={n} (diffusers' np.arange rounding); pick another "
        "num_inference_steps or spacing")
  if ts.min() < 0 or ts.max() > t_max:
    raise ValueError(
        f"{kind} with timestep_spacing={spacing!r}, steps_offset={config.steps_offset} and "
        f"num_inference_steps={n} gives timesteps outside [0, {t_max}] "
        f"({ts.min()}..{ts.max()}); lower steps_offset or num_inference_steps")


def _ddim_plan(config: SchedulerConfig, n: int) -> Plan:
  t_train = config.num_train_timesteps
  spacing = _spacing("ddim", config)
  if spacing == "linspace":
    ts = np.linspace(0, t_train - 1, n).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    ts = (np.arange(0, n) * (t_train // n)).round()[::-1].astype(np.int64) + config.steps_offset
  else:
    ts = np.round(np.arange(t_train, 0, -t_train / n)).astype(np.int64) - 1
  _check_timesteps("ddim", config, n, ts)
  acp = alphas_cumprod(config)
  final = np.float32(1.0) if config.set_alpha_to_one else acp[0]
  prev = ts - t_train // n  # diffusers' previous timestep, whatever the spacing
  a = acp[ts]
  a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final).astype(np.float32)
  one = np.float32(1.0)
  tables = {"sqrt_acp": np.sqrt(a), "sqrt_one_minus_acp": np.sqrt(one - a),
            "sqrt_acp_prev": np.sqrt(a_prev), "sqrt_one_minus_acp_prev": np.sqrt(one - a_prev)}
  return Plan("ddim", config.prediction_type,
              float(config.clip_sample_range) if config.clip_sample else None,
              ts.astype(np.float32), np.float32(1.0), tables)


def _euler_plan(config: SchedulerConfig, n: int) -> Plan:
  t_train = config.num_train_timesteps
  spacing = _spacing("euler", config)
  if spacing == "linspace":
    ts = np.linspace(0, t_train - 1, n, dtype=np.float32)[::-1].copy()
  elif spacing == "leading":
    ts = (np.arange(0, n) * (t_train // n)).round()[::-1].astype(np.float32)
    ts += config.steps_offset
  else:
    ts = np.arange(t_train, 0, -t_train / n).round().astype(np.float32) - 1
  _check_timesteps("euler", config, n, ts)
  train_sigmas = _train_sigmas(alphas_cumprod(config))
  sigmas = np.interp(ts, np.arange(t_train), train_sigmas)
  if config.use_karras_sigmas:
    # Euler spans the sigmas at the first and last *inference* timesteps (diffusers).
    sigmas = _karras(float(sigmas[-1]), float(sigmas[0]), n)
    ts = _sigma_to_t(sigmas, np.log(train_sigmas))
  last = train_sigmas[0] if config.final_sigmas_type == "sigma_min" else 0.0
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
  top = sigmas.max()
  init = top if spacing in ("linspace", "trailing") else np.sqrt(top * top + np.float32(1.0))
  return Plan("euler", config.prediction_type, None, np.asarray(ts, np.float32),
              np.float32(init), {"sigmas": sigmas})


def _dpm_plan(config: SchedulerConfig, n: int) -> Plan:
  t_train = config.num_train_timesteps
  spacing = _spacing("dpmpp_2m", config)
  last_t = t_train  # lambda_min_clipped = -inf: nothing clipped
  if spacing == "linspace":
    ts = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    ratio = last_t // (n + 1)
    ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
  else:
    ts = np.arange(last_t, 0, -t_train / n).round().astype(np.int64) - 1
  _check_timesteps("dpmpp_2m", config, n, ts)
  train_sigmas = _train_sigmas(alphas_cumprod(config))
  if config.use_karras_sigmas:
    # DPM++ spans the whole training range; its timesteps are integers (rounded, or truncated
    # by the int64 cast for squaredcos_cap_v2).
    sigmas = _karras(float(train_sigmas[0]), float(train_sigmas[-1]), n)
    tf = _sigma_to_t(sigmas, np.log(train_sigmas))
    ts = (np.trunc(tf) if config.beta_schedule == "squaredcos_cap_v2" else tf.round())
    ts = ts.astype(np.int64)
  else:
    sigmas = np.interp(ts, np.arange(t_train), train_sigmas)
  last = train_sigmas[0] if config.final_sigmas_type == "sigma_min" else 0.0
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)

  # Per-step coefficients in float32 with diffusers' operation order.
  f32, one = np.float32, np.float32(1.0)
  alpha = (one / np.sqrt(sigmas * sigmas + one)).astype(f32)  # [N+1]
  sigma_vp = (sigmas * alpha).astype(f32)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    lam = (np.log(alpha) - np.log(sigma_vp)).astype(f32)  # +inf where sigma = 0
    coef_x = np.zeros(n, f32)
    coef_x0 = np.zeros(n, f32)
    coef_diff = np.zeros(n, f32)
    second = np.zeros(n, f32)
    first_at_end = (config.euler_at_final or config.final_sigmas_type == "zero" or
                    (config.lower_order_final and n < 15))
    for i in range(n):
      h = f32(lam[i + 1] - lam[i])
      expm = f32(np.exp(-h) - one)  # e^{-h} - 1
      coef_x[i] = f32(sigma_vp[i + 1] / sigma_vp[i])
      phi = f32(alpha[i + 1] * expm)
      coef_x0[i] = -phi
      if i >= 1 and not (i == n - 1 and first_at_end):
        r = f32(f32(lam[i] - lam[i - 1]) / h)
        inv_r = f32(one / r)
        if config.solver_type == "midpoint":
          coef_diff[i] = f32(-f32(0.5) * phi) * inv_r
        else:
          coef_diff[i] = f32(alpha[i + 1] * f32(f32(expm / h) + one)) * inv_r
        second[i] = 1.0
  tables = {"sigmas": sigmas, "alpha": alpha[:n].copy(), "sigma_vp": sigma_vp[:n].copy(),
            "coef_x": coef_x, "coef_x0": coef_x0, "coef_diff": coef_diff,
            "second_order": second}
  for name, table in tables.items():
    if name != "sigmas" and not np.all(np.isfinite(table)):
      raise ValueError(f"dpmpp_2m table {name} is not finite for this config (sigmas "
                       f"{sigmas.tolist()}); check beta_* and final_sigmas_type")
  return Plan("dpmpp_2m", config.prediction_type, None, ts.astype(np.float32), np.float32(1.0),
              tables)


def make_plan(kind: str, config: SchedulerConfig, num_inference_steps: int) -> Plan:
  """The timesteps and per-step tables of `kind` ("ddim", "dpmpp_2m", "euler") for N steps."""
  if kind not in KINDS:
    raise ValueError(f"sampler kind {kind!r} is not supported; use one of {', '.join(KINDS)}")
  if not isinstance(config, SchedulerConfig):
    raise ValueError(f"config must be a SchedulerConfig (see config_from_diffusers), got "
                     f"{type(config).__name__}")
  n = num_inference_steps
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not \
      1 <= n <= config.num_train_timesteps:
    raise ValueError(f"num_inference_steps={n!r} must be an integer in [1, "
                     f"num_train_timesteps={config.num_train_timesteps}]")
  n = int(n)
  plan = {"ddim": _ddim_plan, "euler": _euler_plan, "dpmpp_2m": _dpm_plan}[kind](config, n)
  return dataclasses.replace(
      plan, timesteps=jnp.asarray(plan.timesteps, jnp.float32),
      init_noise_sigma=jnp.asarray(plan.init_noise_sigma, jnp.float32),
      tables={k: jnp.asarray(v, jnp.float32) for k, v in plan.tables.items()})


def timesteps(plan: Plan) -> Array:
  """The model timesteps of the plan, f32[N] (integer-valued for ddim and dpmpp_2m)."""
  return plan.timesteps


# ----------------------------------------------------------------------------- stepping

def init_state(plan: Plan, x_shape: tuple[int, ...]) -> SamplerState:
  """The loop carry before step 0 (DPM++ keeps a zero previous-x0 of the sample's shape)."""
  prev = jnp.zeros(x_shape, jnp.float32) if plan.kind == "dpmpp_2m" else None
  return SamplerState(jnp.zeros((), jnp.int32), prev)


def scale_model_input(plan: Plan, x: Array, i: Array) -> Array:
  """The model's input at step i: x / sqrt(sigma_i^2 + 1) for Euler, x itself otherwise."""
  x = jnp.asarray(x, jnp.float32)
  if plan.kind != "euler":
    return x
  sigma = plan.tables["sigmas"][i]
  return x / jnp.sqrt(sigma * sigma + 1.0)


def _x0_and_eps(prediction_type: str, out: Array, x: Array, sqrt_a: Array,
                sqrt_1ma: Array) -> tuple[Array, Array | None]:
  """(x0, eps) from a model output in the variance-preserving parametrisation."""
  if prediction_type == "epsilon":
    return (x - sqrt_1ma * out) / sqrt_a, out
  if prediction_type == "v_prediction":
    return sqrt_a * x - sqrt_1ma * out, sqrt_a * out + sqrt_1ma * x
  return out, None  # "sample": eps computed by the caller where needed


def step(plan: Plan, state: SamplerState, model_output: Array, i: Array,
         x: Array) -> tuple[Array, SamplerState]:
  """One sampler step from timesteps[i]: returns (x_next, state), all float32.

  `i` may be a traced int32 (inside fori_loop/scan); `model_output` is the model's output for
  `scale_model_input(plan, x, i)` at `plan.timesteps[i]`.
  """
  x = jnp.asarray(x, jnp.float32)
  out = jnp.asarray(model_output, jnp.float32)
  tb = plan.tables
  count = state.count + 1
  if plan.kind == "ddim":
    sqrt_a, sqrt_1ma = tb["sqrt_acp"][i], tb["sqrt_one_minus_acp"][i]
    x0, eps = _x0_and_eps(plan.prediction_type, out, x, sqrt_a, sqrt_1ma)
    if eps is None:
      eps = (x - sqrt_a * x0) / sqrt_1ma
    if plan.clip_sample_range is not None:
      x0 = jnp.clip(x0, -plan.clip_sample_range, plan.clip_sample_range)
    x_next = tb["sqrt_acp_prev"][i] * x0 + tb["sqrt_one_minus_acp_prev"][i] * eps
    return x_next, SamplerState(count, None)
  if plan.kind == "euler":
    sigma, sigma_next = tb["sigmas"][i], tb["sigmas"][i + 1]
    if plan.prediction_type == "epsilon":
      x0 = x - sigma * out
    elif plan.prediction_type == "v_prediction":
      x0 = out * (-sigma / jnp.sqrt(sigma * sigma + 1.0)) + x / (sigma * sigma + 1.0)
    else:
      x0 = out
    d = (x - x0) / sigma
    return x + d * (sigma_next - sigma), SamplerState(count, None)
  # dpmpp_2m
  x0, _ = _x0_and_eps(plan.prediction_type, out, x, tb["alpha"][i], tb["sigma_vp"][i])
  use_prev = (state.count > 0) & (tb["second_order"][i] > 0)
  c_diff = jnp.where(use_prev, tb["coef_diff"][i], 0.0)
  x_next = tb["coef_x"][i] * x + tb["coef_x0"][i] * x0 + c_diff * (x0 - state.prev_x0)
  return x_next, SamplerState(count, x0)


def sample_loop(plan: Plan, model_fn: Callable[[Array, Array], Array], x_T: Array,
                start: int = 0) -> Array:
  """Runs steps start..N-1 with lax.fori_loop; `model_fn(x_scaled, t)` is a pure function.

  `x_T` is the starting sample (unit noise * plan.init_noise_sigma, as diffusers'
  prepare_latents). Returns x_0 in float32. Jit the caller to reuse the compiled loop.
  """
  x_T = jnp.asarray(x_T, jnp.float32)

  def body(i, carry):
    x, state = carry
    out = model_fn(scale_model_input(plan, x, i), plan.timesteps[i])
    return step(plan, state, out, i, x)

  x, _ = jax.lax.fori_loop(start, plan.num_inference_steps, body,
                           (x_T, init_state(plan, x_T.shape)))
  return x


# ----------------------------------------------------------------------------- training

def _acp_at(config: SchedulerConfig, t: Array, ndim: int) -> Array:
  acp = jnp.asarray(alphas_cumprod(config))[jnp.asarray(t, jnp.int32)]
  return acp.reshape(acp.shape + (1,) * (ndim - acp.ndim))


def add_noise(config: SchedulerConfig, x0: Array, noise: Array, t: Array) -> Array:
  """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) noise (DDPM/DDIM's add_noise).

  `t`: integer training timesteps, a scalar or one per leading index of x0 (e.g. [B] for
  NHWC batches); broadcast over the remaining axes.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  acp = _acp_at(config, t, x0.ndim)
  return jnp.sqrt(acp) * x0 + jnp.sqrt(1.0 - acp) * jnp.asarray(noise, jnp.float32)


def velocity_target(config: SchedulerConfig, x0: Array, noise: Array, t: Array) -> Array:
  """v = sqrt(acp_t) noise - sqrt(1 - acp_t) x0 (diffusers' get_velocity)."""
  x0 = jnp.asarray(x0, jnp.float32)
  acp = _acp_at(config, t, x0.ndim)
  return jnp.sqrt(acp) * jnp.asarray(noise, jnp.float32) - jnp.sqrt(1.0 - acp) * x0


def prediction_target(config: SchedulerConfig, x0: Array, noise: Array, t: Array) -> Array:
  """The training target for config.prediction_type: noise, velocity or x0."""
  if config.prediction_type == "epsilon":
    return jnp.asarray(noise, jnp.float32)
  if config.prediction_type == "v_prediction":
    return velocity_target(config, x0, noise, t)
  return jnp.asarray(x0, jnp.float32)
