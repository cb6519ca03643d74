"""Parity of generation/schedulers.py with diffusers' DDIM, DPM-Solver++ 2M and Euler schedulers.

Each sampler runs a full loop, jitted inside lax.fori_loop, with a deterministic fake model
(model_output = 0.5 * x_in + 0.3 * sin(0.01 t + pattern), computed the same way in torch and
jax) and every step's sample is compared with diffusers' (max-abs error relative to the
reference's max-abs, tolerance 1e-5; only the squaredcos Euler runs, whose sigma_max is 2e4,
get a bound that grows with it). Each step is also run alone on diffusers' own input and
compared (tolerance 1e-5 of the step's scale). Timesteps must be equal exactly, except
Euler's fractional Karras timesteps (2 ulp; see test_matches_diffusers).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthbandit_jax.generation import schedulers as sch

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

TOL = 1e-5
STEPS = (1, 2, 10, 25, 50)
SHAPE = (2, 6, 6, 4)  # NHWC; the schedulers are elementwise

SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SD2V = {**SD15, "prediction_type": "v_prediction"}
CONFIGS = {
    # name: (diffusers config dict, kinds it is run with)
    "sd15": (SD15, sch.KINDS),
    "sd15_leading": ({**SD15, "timestep_spacing": "leading"}, sch.KINDS),
    "sd2_v_trailing": ({**SD2V, "timestep_spacing": "trailing"}, sch.KINDS),
    "sd2_v_leading": ({**SD2V, "timestep_spacing": "leading"}, sch.KINDS),
    "linear_linspace_clip": ({"beta_schedule": "linear", "beta_start": 0.0001,
                              "beta_end": 0.02, "timestep_spacing": "linspace",
                              "clip_sample": True, "set_alpha_to_one": True}, sch.KINDS),
    "cosine_sample_trailing": ({"beta_schedule": "squaredcos_cap_v2",
                                "prediction_type": "sample", "timestep_spacing": "trailing",
                                "clip_sample": True, "clip_sample_range": 2.0}, sch.KINDS),
    "sd15_karras": ({**SD15, "use_karras_sigmas": True}, ("euler", "dpmpp_2m")),
    "sd15_karras_leading": ({**SD15, "use_karras_sigmas": True, "timestep_spacing": "leading"},
                            ("euler", "dpmpp_2m")),
    "sd2_v_karras_sigma_min": ({**SD2V, "use_karras_sigmas": True,
                                "final_sigmas_type": "sigma_min"}, ("euler", "dpmpp_2m")),
    "cosine_karras": ({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True},
                      ("euler", "dpmpp_2m")),
    "dpm_no_lower_order_final": ({**SD15, "lower_order_final": False}, ("dpmpp_2m",)),
    "dpm_sigma_min_lof": ({**SD15, "final_sigmas_type": "sigma_min"}, ("dpmpp_2m",)),
    "dpm_sigma_min_no_lof": ({**SD15, "final_sigmas_type": "sigma_min",
                              "lower_order_final": False}, ("dpmpp_2m",)),
    "dpm_euler_at_final": ({**SD15, "final_sigmas_type": "sigma_min", "euler_at_final": True},
                           ("dpmpp_2m",)),
    "dpm_heun": ({**SD2V, "solver_type": "heun", "timestep_spacing": "trailing"},
                 ("dpmpp_2m",)),
}
CASES = [(name, kind) for name, (_, kinds) in CONFIGS.items() for kind in kinds]

_RNG = np.random.default_rng(0)
PATTERN = _RNG.standard_normal(SHAPE).astype(np.float32)
NOISE = _RNG.standard_normal(SHAPE).astype(np.float32)


def _diffusers_scheduler(kind: str, cfg: dict, n: int | None = None):
  cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
         "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[kind]
  s = cls.from_config(cfg)
  if n is not None:
    s.set_timesteps(n)
  return s


def _fake_torch(x_in, t, pattern):
  return 0.5 * x_in + 0.3 * torch.sin(0.01 * t.to(torch.float32) + pattern)


def _fake_jax(x_in, t, pattern):
  return 0.5 * x_in + 0.3 * jnp.sin(0.01 * t + pattern)


def _diffusers_trajectory(s, x, begin: int = 0):
  pattern = torch.from_numpy(PATTERN)
  x = torch.from_numpy(x)
  traj = []
  if hasattr(s, "set_begin_index"):
    # Without it diffusers finds the step index by looking timesteps[0] up, and takes the
    # second match when it repeats: DPM++ with squaredcos_cap_v2 + Karras sigmas has
    # timesteps 998, 998, 998, ... and then skips a step and overruns its sigmas (IndexError).
    s.set_begin_index(begin)
  for t in s.timesteps[begin:]:
    out = _fake_torch(s.scale_model_input(x, t), t, pattern)
    x = s.step(out, t, x).prev_sample
    traj.append(x.numpy().copy())
  return np.stack(traj)


@jax.jit
def _our_trajectory(plan: sch.Plan, x_t: jax.Array) -> jax.Array:
  """Every step's sample, from a fori_loop with a traced step index."""
  n = plan.num_inference_steps

  def body(i, carry):
    x, state, traj = carry
    out = _fake_jax(sch.scale_model_input(plan, x, i), plan.timesteps[i], PATTERN)
    x, state = sch.step(plan, state, out, i, x)
    return x, state, traj.at[i].set(x)

  init = (x_t, sch.init_state(plan, x_t.shape), jnp.zeros((n,) + x_t.shape, jnp.float32))
  return jax.lax.fori_loop(0, n, body, init)[2]


def _rel(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _local_err(got, want, want_prev) -> float:
  """A step's max-abs error relative to the larger max-abs of its input and output."""
  scale = max(np.max(np.abs(want)), np.max(np.abs(want_prev)))
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / scale)


_step = jax.jit(sch.step)


def _teacher_forced(plan: sch.Plan, inputs: np.ndarray) -> np.ndarray:
  """Our step i applied to diffusers' sample entering step i (traced i, jitted)."""
  state = sch.init_state(plan, SHAPE)
  outs = []
  for i, x in enumerate(inputs):
    i = jnp.int32(i)
    model_out = _fake_jax(sch.scale_model_input(plan, x, i), plan.timesteps[i], PATTERN)
    x_next, state = _step(plan, state, model_out, i, jnp.asarray(x))
    outs.append(np.asarray(x_next))
  return np.stack(outs)


@pytest.mark.parametrize("name,kind", CASES)
def test_matches_diffusers(name, kind):
  cfg_dict = CONFIGS[name][0]
  cfg = sch.config_from_diffusers(cfg_dict)
  worst = []
  for n in STEPS:
    ref = _diffusers_scheduler(kind, cfg_dict, n)
    plan = sch.make_plan(kind, cfg, n)
    ref_t = ref.timesteps.numpy()
    ours_t = np.asarray(sch.timesteps(plan))
    assert ours_t.shape == (n,), (name, kind, n, ours_t.shape)
    if kind == "euler" and cfg.use_karras_sigmas:
      # Fractional timesteps from log-sigma interpolation. torch's vectorised float32 sqrt
      # (building the training sigmas) is not correctly rounded (1 ulp off at a few of the
      # 1000 entries on this CPU), numpy's is; that ulp reaches some timesteps, most in
      # relative terms near t = 0 (seen: 2e-6 of one training step at t = 3, diffusers
      # 0.42.1 / torch 2.13). atol 1e-5 steps is far below anything the UNet resolves.
      np.testing.assert_allclose(ours_t, ref_t, rtol=2.0**-22, atol=1e-5)
    else:
      assert np.array_equal(ours_t, ref_t.astype(np.float32)), (name, kind, n, ours_t, ref_t)
    if kind != "euler":
      assert np.array_equal(ours_t, np.round(ours_t))
    ref_sigma = np.float32(ref.init_noise_sigma)
    # diffusers builds the training sigmas from float32 torch tensors, we in float64 and
    # round once, so a sigma (and Euler's init_noise_sigma = the largest one) may differ by
    # one float32 ulp (seen with diffusers 0.42.1 / torch 2.13 at N = 1); nothing coarser.
    np.testing.assert_allclose(np.asarray(plan.init_noise_sigma), ref_sigma, rtol=2.0**-23,
                               atol=0, err_msg=str((name, kind, n)))
    x_t = NOISE * ref_sigma
    want = _diffusers_trajectory(ref, x_t)
    got = np.asarray(_our_trajectory(plan, jnp.asarray(x_t)))
    assert got.dtype == np.float32 and got.shape == want.shape
    # Free-running trajectory, every step against diffusers'. float32 rounding of x_T's scale
    # survives into x_0: where sigma_max is huge (squaredcos_cap_v2 at t=999: 2e4) Euler's
    # steps cancel 2e4-sized terms, and diffusers' own x_0 is off by ~1e-3 of its size
    # (XLA's fused multiply-add rounds differently from torch), so the bound grows with it.
    tol = max(TOL, 4 * 2.0**-24 * float(ref_sigma))
    errs = [_rel(g, w) for g, w in zip(got, want)]
    assert max(errs) < tol, (name, kind, n, tol, errs)
    # Each step on diffusers' own input: the local error, relative to the step's scale.
    inputs = np.concatenate([x_t[None], want[:-1]])
    local = [_local_err(g, w, p) for g, w, p in zip(_teacher_forced(plan, inputs), want, inputs)]
    assert max(local) < TOL, (name, kind, n, local)
    worst.append((n, max(errs), max(local)))
  print(f"{kind:9s} {name:24s} N: trajectory / local rel err "
        + ", ".join(f"{n}: {e:.1e}/{le:.1e}" for n, e, le in worst))


def test_sample_loop_and_dtypes():
  cfg = sch.config_from_diffusers({**SD15, "timestep_spacing": "leading"})
  for kind in sch.KINDS:
    plan = sch.make_plan(kind, cfg, 10)
    x_t = jnp.asarray(NOISE) * plan.init_noise_sigma
    traj = _our_trajectory(plan, x_t)
    loop = jax.jit(lambda p, x: sch.sample_loop(p, lambda xi, t: _fake_jax(xi, t, PATTERN), x))
    x0 = loop(plan, x_t)
    assert x0.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(traj[-1]))
    # A bfloat16 model: the sample and the state stay float32.
    state = sch.init_state(plan, SHAPE)
    out = jnp.ones(SHAPE, jnp.bfloat16)
    x_in = sch.scale_model_input(plan, x_t.astype(jnp.bfloat16), 0)
    assert x_in.dtype == jnp.float32
    x1, state = jax.jit(sch.step)(plan, state, out, jnp.int32(0), x_t.astype(jnp.bfloat16))
    assert x1.dtype == jnp.float32 and int(state.count) == 1
    if kind == "dpmpp_2m":
      assert state.prev_x0.dtype == jnp.float32
    else:
      assert state.prev_x0 is None


@pytest.mark.parametrize("kind", sch.KINDS)
def test_partial_loop_like_img2img(kind):
  """Starting at step k (diffusers' set_begin_index): DPM++ begins first order there too."""
  cfg_dict = {**SD15, "timestep_spacing": "trailing"}
  n, begin = 20, 7
  ref = _diffusers_scheduler(kind, cfg_dict, n)
  want = _diffusers_trajectory(ref, NOISE.copy(), begin=begin)[-1]
  plan = sch.make_plan(kind, sch.config_from_diffusers(cfg_dict), n)
  got = sch.sample_loop(plan, lambda xi, t: _fake_jax(xi, t, PATTERN), jnp.asarray(NOISE),
                        start=begin)
  err = _rel(got, want)
  print(f"{kind} from step {begin}/{n}: rel err {err:.1e}")
  assert err < TOL


@pytest.mark.parametrize("cfg_dict", [SD15, SD2V, {"beta_schedule": "squaredcos_cap_v2"},
                                      {"beta_schedule": "linear", "num_train_timesteps": 500}])
def test_add_noise_and_targets(cfg_dict):
  cfg = sch.config_from_diffusers(cfg_dict)
  ref = diffusers.DDIMScheduler.from_config(cfg_dict)
  np.testing.assert_array_equal(sch.alphas_cumprod(cfg), ref.alphas_cumprod.numpy())
  x0 = _RNG.standard_normal((5, 3, 3, 2)).astype(np.float32)
  noise = _RNG.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 1, 250, cfg.num_train_timesteps // 2, cfg.num_train_timesteps - 1])
  tt = torch.from_numpy(t)
  want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
  got = jax.jit(sch.add_noise, static_argnums=0)(cfg, x0, noise, t)
  err = _rel(got, want)
  want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
  err_v = _rel(sch.velocity_target(cfg, x0, noise, t), want_v)
  print(f"add_noise rel err {err:.1e}, velocity rel err {err_v:.1e}")
  assert err < 1e-6 and err_v < 1e-6
  target = np.asarray(sch.prediction_target(cfg, x0, noise, t))
  expect = {"epsilon": noise, "sample": x0, "v_prediction": want_v}[cfg.prediction_type]
  np.testing.assert_allclose(target, expect, rtol=1e-6, atol=1e-6)
  # A scalar timestep broadcasts over the batch.
  one = np.asarray(sch.add_noise(cfg, x0, noise, 300))
  np.testing.assert_allclose(one, np.asarray(sch.add_noise(cfg, x0, noise, np.full(5, 300))))


def test_config_defaults_follow_sd15_and_diffusers():
  assert sch.config_from_diffusers(SD15) == sch.SchedulerConfig()
  # A pipeline's loaded PNDM config lists the keys it defaulted; diffusers re-defaults them
  # per class (Euler/DPM++ get "linspace"), and so do we.
  pndm = dict(diffusers.PNDMScheduler.from_config(SD15).config)
  assert "timestep_spacing" in pndm["_use_default_values"]
  cfg = sch.config_from_diffusers(pndm)
  assert cfg == sch.SchedulerConfig()
  for kind in sch.KINDS:
    ref = _diffusers_scheduler(kind, pndm, 10)
    got = np.asarray(sch.make_plan(kind, cfg, 10).timesteps)
    np.testing.assert_array_equal(got, ref.timesteps.numpy().astype(np.float32))
  # Missing keys take diffusers' class defaults (DDIM: linear betas, clipping, alpha 1).
  bare = sch.config_from_diffusers({})
  assert (bare.beta_schedule, bare.clip_sample, bare.set_alpha_to_one, bare.steps_offset) == \
      ("linear", True, True, 0)
  assert sch.config_from_diffusers({**SD15, "solver_order": 2, "algorithm_type": "dpmsolver++",
                                    "lambda_min_clipped": float("-inf"),
                                    "use_exponential_sigmas": None,
                                    "variance_type": None}) == sch.SchedulerConfig()


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "cosine"), ("prediction_type", "flow_prediction"),
    ("timestep_spacing", "uniform"), ("final_sigmas_type", "max"), ("solver_type", "bh2"),
    ("rescale_betas_zero_snr", True), ("thresholding", True), ("solver_order", 3),
    ("algorithm_type", "sde-dpmsolver++"), ("use_exponential_sigmas", True),
    ("interpolation_type", "log_linear"), ("timestep_type", "continuous"),
    ("variance_type", "learned_range"), ("sigma_max", 80.0), ("lambda_min_clipped", -5.1),
    ("steps_offset", "1"), ("clip_sample", "yes"), ("use_karras_sigmas", 1),
    ("num_train_timesteps", 1), ("beta_end", 1.5), ("trained_betas", [0.1, 0.2]),
])
def test_bad_config_values_name_the_key(key, value):
  with pytest.raises(ValueError, match=key):
    sch.config_from_diffusers({**SD15, key: value})


def test_bad_plan_arguments():
  cfg = sch.SchedulerConfig()
  with pytest.raises(ValueError, match="kind"):
    sch.make_plan("pndm", cfg, 10)
  for n in (0, 1001, 2.5, True):
    with pytest.raises(ValueError, match="num_inference_steps"):
      sch.make_plan("ddim", cfg, n)
  # steps_offset pushes DDIM's leading grid past the last training timestep.
  with pytest.raises(ValueError, match="steps_offset"):
    sch.make_plan("ddim", cfg, 1000)
  # diffusers' trailing np.arange yields N+1 timesteps for some N (e.g. 61): refused.
  trailing = sch.config_from_diffusers({**SD15, "timestep_spacing": "trailing"})
  with pytest.raises(ValueError, match="num_inference_steps=61"):
    sch.make_plan("euler", trailing, 61)


def test_trained_betas_round_trip():
  ref = diffusers.DDIMScheduler.from_config(SD15)
  betas = ref.betas.numpy().astype(np.float64).tolist()
  cfg = sch.config_from_diffusers({**SD15, "trained_betas": betas})
  np.testing.assert_array_equal(sch.alphas_cumprod(cfg), ref.alphas_cumprod.numpy())
  with pytest.raises(ValueError, match="trained_betas"):
    sch.config_from_diffusers({**SD15, "trained_betas": "0.1"})
  with pytest.raises(ValueError, match="trained_betas"):
    sch.config_from_diffusers({**SD15, "trained_betas": [0.1, "x"] * 500})


@pytest.mark.parametrize("extra,n,last_second_order", [
    ({}, 10, 0.0), ({}, 25, 0.0),  # final sigma 0: always first order at the end
    ({"lower_order_final": False}, 10, 0.0),  # ... whatever lower_order_final says
    ({"final_sigmas_type": "sigma_min"}, 10, 0.0),  # lower_order_final with N < 15
    ({"final_sigmas_type": "sigma_min"}, 25, 1.0),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False}, 10, 1.0),
    ({"final_sigmas_type": "sigma_min", "euler_at_final": True}, 25, 0.0),
])
def test_dpm_final_step_order(extra, n, last_second_order):
  plan = sch.make_plan("dpmpp_2m", sch.config_from_diffusers({**SD15, **extra}), n)
  second = np.asarray(plan.tables["second_order"])
  assert second[0] == 0.0 and np.all(second[1:-1] == 1.0)
  assert second[-1] == last_second_order
  sigmas = np.asarray(plan.tables["sigmas"])
  assert (sigmas[-1] == 0.0) == ("final_sigmas_type" not in extra)


def test_full_diffusers_configs_load_silently(caplog):
  """Each class's saved config (every key it writes) converts without warnings or errors."""
  for kind in sch.KINDS:
    saved = dict(_diffusers_scheduler(kind, {**SD15, "timestep_spacing": "trailing"}).config)
    with caplog.at_level("WARNING", logger=sch.__name__):
      cfg = sch.config_from_diffusers(saved)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert cfg == sch.SchedulerConfig(timestep_spacing="trailing")
  with caplog.at_level("WARNING", logger=sch.__name__):
    sch.config_from_diffusers({**SD15, "predict_x0": True})
  assert "predict_x0" in caplog.text
