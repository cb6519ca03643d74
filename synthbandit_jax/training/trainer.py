"""The training driver: runs each configured mode in its own directory, checkpointing every
epoch, resuming interrupted runs, and writing results.json, report.md and plots.

Layout of a workdir:

  WORKDIR/config.json            the config of the last invocation
  WORKDIR/pool/                  the controlled pool (when pool.kind = controlled)
  WORKDIR/<mode>/checkpoints/    orbax checkpoints, one per epoch (last `checkpoint.keep`)
  WORKDIR/<mode>/config.json     the config (and its fingerprint) the mode was trained with
  WORKDIR/<mode>/results.json    that mode's result (see `train_mode`)
  WORKDIR/results.json           all modes plus a comparison table
  WORKDIR/report.md, *.png       the report and its plots

Multi-process runs (`parallel.initialize_distributed`): every process runs this same code on
the global mesh (`parallel.make_global_mesh`); the bandit state is asserted identical on all
processes every epoch; orbax writes the checkpoints (primary process, shared workdir); only
process 0 writes config.json, results.json and the report.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from synthbandit_jax import arms as arms_lib
from synthbandit_jax import bandits as bandits_lib
from synthbandit_jax import checkpoint as ckpt_lib
from synthbandit_jax import io as sio
from synthbandit_jax import parallel
from synthbandit_jax import report as report_lib
from synthbandit_jax.models import classifiers
from synthbandit_jax.training import epoch as epoch_lib
from synthbandit_jax.training import frozen_features
from synthbandit_jax.training import inputs as inputs_lib
from synthbandit_jax.training import optim as optim_lib

# Config sections that do not change a run's numbers (resuming with other values is fine).
# score / attributes / generator / generate: the earlier stages' own settings (the pipeline
# tracks what they change through its stage hashes).
_NOT_FINGERPRINTED = ("debug", "parallel", "checkpoint", "train.epochs", "data.on_device",
                      "data.prefetch", "score", "attributes", "generator", "generate")


class FinishedRunError(RuntimeError):
  """Raised by `train_mode(..., if_finished="error")` for a finished run directory."""


def flatten_config(d: dict, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten_config(v, key + "."))
    else:
      out[key] = v
  return out


def config_dict(config) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json())
  return json.loads(json.dumps(config))


def fingerprint(config) -> tuple[str, dict[str, Any]]:
  """A hash over the config keys that change a run's numbers, and those keys."""
  flat = flatten_config(config_dict(config))
  keep = {k: v for k, v in flat.items()
          if not any(k == p or k.startswith(p + ".") for p in _NOT_FINGERPRINTED)}
  blob = json.dumps(keep, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16], keep


def mode_dirname(mode: str) -> str:
  return sio.safe_filename(mode)


def bandit_from_config(bandit_cfg, name: str | None = None) -> bandits_lib.Bandit:
  """Builds the configured bandit; each algorithm takes the config values it uses."""
  name = name or bandit_cfg.name
  scale = float(bandit_cfg.reward_scale)
  available = {
      "c": float(bandit_cfg.c), "gamma": float(bandit_cfg.gamma),
      "window": int(bandit_cfg.window), "epsilon": float(bandit_cfg.epsilon),
      "decay": float(bandit_cfg.decay), "prior_mean": float(bandit_cfg.prior_mean) * scale,
      "prior_std": float(bandit_cfg.prior_std) * scale,
      "obs_std": float(bandit_cfg.obs_std) * scale,
  }
  if name == "exp3":
    lo = -scale if bandit_cfg.reward == "gain" else 0.0
    return bandits_lib.make_bandit("exp3", gamma=float(bandit_cfg.exp3_gamma),
                                   reward_range=(lo, scale))
  if name not in bandits_lib.bandit_names():
    raise ValueError(f"config bandit.name: unknown bandit {name!r}; valid: "
                     f"{', '.join(bandits_lib.bandit_names())}")
  params = inspect.signature(bandits_lib._REGISTRY[name]).parameters  # pylint: disable=protected-access
  return bandits_lib.make_bandit(name, **{k: v for k, v in available.items() if k in params})


def _arm_report(names, bandit_state) -> list[dict]:
  counts = np.asarray(bandit_state.counts)
  sums = np.asarray(bandit_state.sums)
  return [{"name": n, "pulls": int(counts[i]),
           "mean_reward": float(sums[i] / counts[i]) if counts[i] else None}
          for i, n in enumerate(names)]


def train_mode(config, inputs: inputs_lib.Inputs, mode: str, run_dir: str | Path, *,
               bandit: bandits_lib.Bandit | None = None,
               reward_fn: epoch_lib.RewardFn | None = None,
               overwrite: bool = False, resume: bool = True, if_finished: str = "skip",
               progress: bool = True) -> dict:
  """Trains one mode (real, synthetic, mixNN, topk:COL, group:NAME, bandit[:ALGO], uniform).

  Checkpoints every epoch under run_dir/checkpoints and resumes from the last one. A
  `bandit` or `reward_fn` given here replaces the configured one (research extensions).

  Returns the mode's results dict (also written to run_dir/results.json): mode, config,
  arms [{name, size, pulls, mean_reward}], epochs [{epoch, arm, reward, val_accuracy,
  train_loss, train_accuracy, images, wall_time_s}], best_val_accuracy, best_epoch,
  test_accuracy, images_seen, wall_time_s, skipped_files, ...
  """
  run_dir = Path(run_dir)
  epochs = int(config.train.epochs)
  results_path = run_dir / "results.json"
  fp, fp_items = fingerprint(config)
  main = parallel.is_main_process()
  if overwrite and run_dir.exists() and main:
    shutil.rmtree(run_dir)
  parallel.sync(f"train_mode {mode}: overwrite")
  if results_path.exists():
    done = sio.read_json(results_path)
    if done.get("fingerprint") == fp and done.get("epochs_completed", 0) >= epochs:
      msg = (f"{run_dir} holds a finished run of mode '{mode}' ({epochs} epochs, test "
             f"accuracy {done['test_accuracy']:.4f}); pass --overwrite to train it again")
      if if_finished == "error":
        raise FinishedRunError(msg)
      logging.info(msg)
      return done

  # Check that a stored checkpoint belongs to this config before touching it.
  cfg_path = run_dir / "config.json"
  ckpt_dir = run_dir / "checkpoints"
  if cfg_path.exists() and ckpt_dir.exists():
    stored = sio.read_json(cfg_path)
    if stored.get("fingerprint") != fp:
      old = stored.get("fingerprinted", {})
      diff = sorted(k for k in set(old) | set(fp_items) if old.get(k) != fp_items.get(k))
      raise ValueError(
          f"{run_dir} holds checkpoints of a run with another config (differs in: "
          f"{', '.join(diff[:10])}). Pass --overwrite to discard them, or use another "
          f"--workdir.")
    if not resume:
      raise ValueError(f"{run_dir} holds an unfinished run; resume it (the default) or pass "
                       f"--overwrite to start again")
  parallel.sync(f"train_mode {mode}: checked")  # everyone read config.json before it changes
  if main:
    sio.atomic_write_json(cfg_path, {"fingerprint": fp, "fingerprinted": fp_items,
                                     "config": config_dict(config), "mode": mode})

  named_arms, uses_bandit = inputs_lib.mode_arms(config, inputs, mode)
  warmup = int(config.train.warmup_epochs) if uses_bandit else 0
  if warmup < 0:
    raise ValueError(f"config train.warmup_epochs must be >= 0, got {warmup}")
  if warmup:
    # The warm-up arm is the last row; the bandit only sees the arms before it.
    named_arms = list(named_arms) + [("warmup:real", inputs.layout.real_rows)]
  arms = arms_lib.pad_arms(named_arms)
  num_bandit_arms = arms.num_arms - (1 if warmup else 0)
  if uses_bandit:
    if mode == "uniform":
      bandit, bandit_name = bandits_lib.uniform(), "uniform"
    elif mode == "bandit:paper":
      # The reference code's bandit whatever bandit.* says: UCB1, c = 2, reward = val
      # accuracy in percent.
      bandit_name = "paper"
      bandit = bandits_lib.make_bandit("ucb1", c=2.0)
      if reward_fn is None:
        reward_fn = bandits_lib.reward_fn("accuracy", 100.0)
    elif mode.startswith("bandit:"):
      bandit_name = mode.split(":", 1)[1]
      bandit = bandit_from_config(config.bandit, bandit_name)
    elif bandit is None:
      bandit, bandit_name = bandit_from_config(config.bandit), config.bandit.name
    else:
      bandit_name = "custom"
  else:
    bandit, bandit_name = bandits_lib.fixed(0), "fixed"
  if reward_fn is None:
    reward_fn = bandits_lib.reward_fn(config.bandit.reward, float(config.bandit.reward_scale))

  mesh = parallel.make_global_mesh(int(config.parallel.num_devices),
                                  int(config.parallel.get("model_axis", 1)))
  batch_size = int(config.train.batch_size)
  eval_batch_size = int(config.train.eval_batch_size)
  parallel.check_divisible(batch_size, mesh, "train.batch_size")
  parallel.check_divisible(eval_batch_size, mesh, "train.eval_batch_size")

  num_classes = len(inputs.class_names)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.model.dtype)
  if dtype is None:
    raise ValueError(f"config model.dtype must be 'float32' or 'bfloat16', got "
                     f"{config.model.dtype!r}")
  model = classifiers.build_classifier(config.model.name, num_classes, dtype=dtype,
                                       frozen_backbone=bool(config.model.frozen_backbone))
  input_shape = (1,) + inputs.bank_images.shape[1:]
  rng = jax.random.PRNGKey(int(config.seed))
  steps_per_epoch = -(-arms.indices.shape[1] // batch_size)
  # The optimizer's frozen-backbone mask needs the params' structure only: eval_shape
  # traces the init without running it (the real init happens once, in create_train_state).
  probe = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                            jnp.zeros(input_shape, jnp.float32), train=False))
  tx = optim_lib.make_optimizer(
      config.optim, probe["params"], steps_per_epoch * epochs,
      trainable="head" if (config.model.frozen_backbone and
                           config.model.name not in frozen_features.HEAD_MODELS) else "all")
  # Host values first: with several processes the state must become a global array
  # (replicated, or split over a model axis: parallel.state_shardings).
  state = parallel.place_state(
      epoch_lib.create_train_state(model, tx, bandit, num_bandit_arms, rng, input_shape), mesh)
  state_sharding = parallel.state_shardings(state, mesh)

  repl = parallel.replicated(mesh)
  val_x, val_y = inputs.eval_arrays("val")
  val_set = jax.device_put(epoch_lib.make_eval_set(val_x, val_y, eval_batch_size), repl)
  test_set = jax.device_put(epoch_lib.make_eval_set(*inputs.eval_arrays("test"),
                                                    eval_batch_size), repl)
  arm_arrays = jax.device_put(epoch_lib.ArmArrays(arms.indices, arms.mask), repl)
  eval_fn = epoch_lib.make_eval_fn(model, mesh)
  spec = epoch_lib.EpochSpec(model, tx, bandit, reward_fn, batch_size, mesh, warmup,
                             state_sharding=state_sharding)

  on_device = bool(config.data.on_device)
  if on_device:
    bank = jax.device_put(epoch_lib.Bank(inputs.bank_images, inputs.bank_labels), repl)
    epoch_fn = epoch_lib.make_epoch_fn(spec)
    run_epoch = lambda st: epoch_fn(st, bank, arm_arrays, val_set)
  else:
    streamer = epoch_lib.HostStreamingEpoch(spec, prefetch=int(config.data.prefetch))
    run_epoch = lambda st: streamer(st, inputs.bank_images, inputs.bank_labels, arm_arrays,
                                    val_x, val_y, eval_batch_size)

  ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=int(config.checkpoint.keep))
  history: dict[str, list] = {"epochs": []}
  if resume and ckpt.latest_epoch() is not None:
    state, history = ckpt.restore(state)
    logging.info("mode %s: resuming from epoch %d in %s", mode, int(state.epoch), run_dir)
  else:
    state = state.replace(prev_val_accuracy=eval_fn(state.params, state.batch_stats, val_set))
  state = parallel.place_state(state, mesh)

  start = int(state.epoch)
  bar = tqdm(total=epochs, initial=start, desc=f"{mode:>12}", unit="epoch",
             disable=not (progress and main), dynamic_ncols=True)
  crash_after = int(config.debug.crash_after_epoch)
  try:
    for _ in range(start, epochs):
      t0 = time.perf_counter()
      state, metrics = run_epoch(state)
      metrics = jax.device_get(metrics)
      wall = time.perf_counter() - t0
      e = int(state.epoch)
      arm = int(metrics["arm"])
      history["epochs"].append({
          "epoch": e, "arm": arms.names[arm], "arm_index": arm,
          "reward": float(metrics["reward"]), "val_accuracy": float(metrics["val_accuracy"]),
          "train_loss": float(metrics["train_loss"]),
          "train_accuracy": float(metrics["train_accuracy"]),
          "images": int(metrics["images"]), "wall_time_s": wall})
      # The bandit runs inside jit on every process from replicated state: a difference
      # here means the processes diverged (different data, config or code).
      parallel.assert_same_on_all_processes(
          (state.bandit_state, state.epoch), f"mode {mode}: bandit state after epoch {e}")
      ckpt.save(e, state, history)
      bar.set_postfix(arm=arms.names[arm][:16], loss=f"{float(metrics['train_loss']):.3f}",
                      acc=f"{float(metrics['train_accuracy']):.3f}",
                      val=f"{float(metrics['val_accuracy']):.3f}")
      bar.update(1)
      if e == crash_after:
        bar.close()
        logging.warning("debug.crash_after_epoch=%d: hard exit to simulate a crash", e)
        os._exit(17)  # pylint: disable=protected-access
  finally:
    bar.close()
    ckpt.close()

  best_params = state.best_params
  best_bs = state.best_batch_stats
  test_accuracy = float(eval_fn(best_params, best_bs, test_set))
  final_test = float(eval_fn(state.params, state.batch_stats, test_set))
  arm_rows = _arm_report(arms.names[:num_bandit_arms], state.bandit_state)
  if warmup:
    arm_rows.append({"name": arms.names[-1], "pulls": min(warmup, int(state.epoch)),
                     "mean_reward": None})
  for row, size in zip(arm_rows, arms.sizes):
    row["size"] = int(size)
  results = {
      "mode": mode,
      "config": config_dict(config),
      "fingerprint": fp,
      "uses_bandit": uses_bandit,
      "bandit": bandit_name,
      "warmup_epochs": warmup,
      "arms": arm_rows,
      "epochs": history["epochs"],
      "epochs_completed": int(state.epoch),
      "best_val_accuracy": float(state.best_val_accuracy),
      "best_epoch": int(state.best_epoch),
      "test_accuracy": test_accuracy,
      "final_test_accuracy": final_test,
      "images_seen": int(state.images_seen),
      "wall_time_s": float(sum(r["wall_time_s"] for r in history["epochs"])),
      "num_devices": parallel.mesh_size(mesh),
      "mesh": dict(mesh.shape),
      "num_processes": jax.process_count(),
      "data": inputs_lib.describe(inputs),
      "skipped_files": inputs.skipped,
  }
  if main:
    sio.atomic_write_json(results_path, results)
  parallel.sync(f"train_mode {mode}: done")
  return results


def comparison_rows(runs: dict[str, dict]) -> list[dict]:
  return [{"mode": m, "test_accuracy": r["test_accuracy"],
           "best_val_accuracy": r["best_val_accuracy"], "best_epoch": r["best_epoch"],
           "images_seen": r["images_seen"], "wall_time_s": r["wall_time_s"],
           "arms": len(r["arms"]),
           "most_pulled_arm": max(r["arms"], key=lambda a: a["pulls"])["name"]}
          for m, r in runs.items()]


def run(config, workdir: str | Path, *, overwrite: bool = False, resume: bool = True,
        bandit: bandits_lib.Bandit | None = None,
        reward_fn: epoch_lib.RewardFn | None = None, progress: bool = True,
        inputs: inputs_lib.Inputs | None = None) -> dict:
  """Runs every mode of config.train.modes into workdir and writes the report.

  A `bandit` / `reward_fn` passed here is used by the "bandit" mode instead of the
  configured one. Returns the dict written to WORKDIR/results.json.
  """
  workdir = Path(workdir)
  modes = [m.strip() for m in str(config.train.modes).split(",") if m.strip()]
  if not modes:
    raise ValueError("config train.modes is empty")
  dirs = [mode_dirname(m) for m in modes]
  if len(set(dirs)) != len(dirs):
    raise ValueError(f"config train.modes has duplicates: {modes}")
  # Multi-host: every process must see one workdir before deciding anything from its files.
  parallel.check_shared_directory(workdir)
  top = workdir / "results.json"
  fp, _ = fingerprint(config)
  if top.exists() and not overwrite:
    done = sio.read_json(top)
    if (done.get("fingerprint") == fp and done.get("modes") == modes and
        all(r.get("epochs_completed", 0) >= int(config.train.epochs)
            for r in done.get("runs", {}).values())):
      if parallel.is_main_process():
        print(f"{workdir} holds a finished run (results.json, report.md); nothing to do. "
              f"Pass --overwrite to run it again or choose another --workdir.")
      return done
  main = parallel.is_main_process()
  if overwrite and main:
    for d in dirs:
      shutil.rmtree(workdir / d, ignore_errors=True)
    if config.pool.kind == "controlled" and not config.pool.path:
      shutil.rmtree(workdir / "pool", ignore_errors=True)  # rebuilt for this config
    for name in ("results.json", "report.md"):
      (workdir / name).unlink(missing_ok=True)
  workdir.mkdir(parents=True, exist_ok=True)
  if main:
    sio.atomic_write_json(workdir / "config.json", config_dict(config))
  parallel.sync("run: workdir ready")

  t0 = time.perf_counter()
  if inputs is None:
    inputs = inputs_lib.prepare_inputs(config, workdir, progress=progress)
  features = str(config.model.get("features", "") or "")
  frozen_features.check_model_features(str(config.model.name), features)
  if features and inputs.eval_features is None:
    cache = str(config.model.get("features_cache", "") or "") or str(workdir / "features")
    inputs = frozen_features.feature_inputs(config, inputs, cache, progress=progress)
  if inputs.skipped:
    logging.warning("%d unreadable files were skipped: %s", len(inputs.skipped),
                    [s.get("path") for s in inputs.skipped[:10]])
  runs = {}
  for mode, d in zip(modes, dirs):
    runs[mode] = train_mode(
        config, inputs, mode, workdir / d, resume=resume, progress=progress,
        bandit=bandit if mode == "bandit" else None,
        reward_fn=reward_fn)
  summary = {
      "fingerprint": fp,
      "modes": modes,
      "config": config_dict(config),
      "data": inputs_lib.describe(inputs),
      "comparison": comparison_rows(runs),
      "runs": runs,
      "skipped_files": inputs.skipped,
      "wall_time_s": time.perf_counter() - t0,
  }
  if config.scores.path:
    validation_md = Path(config.scores.path).parent / "metric_validation.md"
    if validation_md.exists():  # written by launch/score.py beside the score table
      summary["metric_validation_md"] = validation_md.read_text(encoding="utf-8")
  if main:
    sio.atomic_write_json(top, summary)
    report_lib.write_report(workdir, summary)
  parallel.sync("run: report written")
  return summary
