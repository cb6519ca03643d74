"""The whole method as one resumable pipeline: class names -> trained classifiers + report.

Stages, in order (`launch/run.py --stages=...` runs a subset):

  attributes  class attributes from the LLM (or attributes.file) -> attributes.json, prompts.jsonl
  generator   (generate.model == "offline") trains the demo's small text-to-image model on
              the real train split -> WORKDIR/generator (diffusers layout)
  generate    prompts.jsonl -> WORKDIR/pool with the diffusion model (SD or the generator)
  score       usability and baseline scores of the pool -> WORKDIR/scores.csv
  train       every training mode (real, synthetic, mixes, top-k, bandit...) -> results.json
  report      report.md and the self-contained report.html

Each stage has a hash over the config keys it reads and the hashes of the stages it reads
from. `WORKDIR/stages.json` records, per stage, the hash it ran with, its status, wall time
and counts. A stage whose outputs exist and whose hash is unchanged is skipped, so re-running
after a crash redoes only what is missing, and changing only the training config redoes only
training and the report. When a stage's hash changed, its old outputs are moved to
`WORKDIR/superseded/<stage>-<old hash>/` (nothing is deleted) and it runs again.

Drop-ins: a pool of your own (`pool.kind=dir`, `pool.path=...`) skips attributes, generator and
generate; a score table of your own (`scores.path=...`) skips scoring; arms that do not come
from scores (`arms.source=groups|file`) skip scoring too; `pool.kind=controlled` builds the
controlled pool (no generation).

With several processes (jax.distributed, see README "Multi-host runs") every process runs the
pipeline: generate, score and train split their work across the processes; attributes,
generator and report run on process 0 while the others wait; only process 0 writes
stages.json and moves superseded outputs. The workdir must be shared by all processes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections

from synthbandit_jax import io as sio
from synthbandit_jax import parallel
from synthbandit_jax.training import trainer

log = logging.getLogger(__name__)

STAGES = ("attributes", "generator", "generate", "score", "train", "report")
# Stages that run on process 0 only (small, or single-device by nature); the others wait.
MAIN_PROCESS_STAGES = ("attributes", "generator", "report")
STATE_FILE = "stages.json"
OFFLINE_MODEL = "offline"


def _select(flat: dict, prefixes: Sequence[str], exclude: Sequence[str] = ()) -> dict:
  def match(k, p):
    return k == p or k.startswith(p + ".")
  return {k: v for k, v in flat.items()
          if any(match(k, p) for p in prefixes) and not any(match(k, p) for p in exclude)}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One pipeline stage: the config keys it reads, its upstream stages, outputs and runner."""
  name: str
  keys: tuple[str, ...]
  upstream: tuple[str, ...]
  outputs: Callable[[Path], list[Path]]
  run: Callable[[Any, Path, bool], dict]
  exclude: tuple[str, ...] = ()


# --------------------------------------------------------------------------- the stages

def _real_class_names(config) -> list[str]:
  from synthbandit_jax.training import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  splits, _ = inputs_lib.real_splits(config)
  return list(splits["train"].class_names)


def prompt_names(config, class_names: Sequence[str]) -> list[str]:
  """The names the LLM and the prompts use for each real class (attributes.prompt_names)."""
  spec = str(config.attributes.prompt_names).strip()
  if not spec:
    return list(class_names)
  names = [n.strip() for n in spec.split(",")]
  if len(names) != len(class_names) or "" in names:
    raise ValueError(f"attributes.prompt_names has {len(names)} names ({spec!r}); it needs "
                     f"one non-empty name per real class, in the order {list(class_names)}")
  return names


def _run_attributes(config, workdir: Path, progress: bool) -> dict:
  del progress
  from synthbandit_jax.generation import attributes as ga  # pylint: disable=g-import-not-at-top
  from synthbandit_jax.generation import prompts as gp  # pylint: disable=g-import-not-at-top
  a = config.attributes
  classes = _real_class_names(config)
  names = prompt_names(config, classes)
  if a.file:
    attrs = ga.load_attributes(a.file, names)
  else:
    llm = ga.load_llm(a.llm.gguf or None)
    attrs = ga.extract_attributes(
        names, llm, seed=int(config.seed), retries=int(a.llm.retries),
        min_categories=int(a.llm.min_categories), max_new_tokens=int(a.llm.max_new_tokens),
        temperature=float(a.llm.temperature), top_p=float(a.llm.top_p),
        batch_size=int(a.llm.batch_size), mode=str(a.llm.mode),
        categories=str(a.llm.categories))
  ga.write_attributes(workdir / "attributes.json", attrs)
  rows = gp.build_prompts(attrs, images_per_class=int(a.images_per_class),
                          seed=int(config.seed), style=a.style)
  to_class = dict(zip(names, classes))
  for r in rows:  # pool rows carry the real class name; the prompt keeps the spoken one
    r["prompt_class"] = r["class"]
    r["class"] = to_class[r["class"]]
  gp.write_prompts(workdir / "prompts.jsonl", rows)
  fallbacks = sum(bool(e.get("fallback")) for e in attrs["classes"].values())
  return {"classes": len(classes), "prompts": len(rows), "fallback_classes": fallbacks}


def _prompts_by_class(workdir: Path) -> dict[str, list[str]]:
  from synthbandit_jax.generation import stage as gen_stage  # pylint: disable=g-import-not-at-top
  out: dict[str, list[str]] = {}
  for r in gen_stage.read_prompts(workdir / "prompts.jsonl"):
    out.setdefault(r["class"], []).append(r["prompt"])
  return out


def _run_generator(config, workdir: Path, progress: bool) -> dict:
  from synthbandit_jax.generation import train_generator as tg  # pylint: disable=g-import-not-at-top
  from synthbandit_jax.training import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  splits, _ = inputs_lib.real_splits(config)
  train = splits["train"]
  gcfg = tg.config_from_dict(config.generator.to_dict(), seed=int(config.seed))
  summary = tg.train_generator(train.images, train.labels, list(train.class_names),
                               _prompts_by_class(workdir), workdir / "generator", gcfg,
                               progress=progress)
  keep = ("vae_loss_last", "unet_loss_last", "images_seen", "resumed_from_step",
          "time_total_s")
  return {k: summary[k] for k in keep if k in summary}


def _model_path(config, workdir: Path) -> str:
  model = str(config.generate.model)
  return str(workdir / "generator") if model == OFFLINE_MODEL else model


def _run_generate(config, workdir: Path, progress: bool) -> dict:
  from synthbandit_jax.generation import stage as gen_stage  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.generate.model = _model_path(config, workdir)
  cfg.generate.out = str(workdir / "pool")
  cfg.generate.prompts = str(workdir / "prompts.jsonl")
  s = gen_stage.run_generation(cfg, workdir, progress=progress)
  return {k: s[k] for k in ("generated", "flagged", "dropped", "regenerated", "images_per_s")}


def _run_score(config, workdir: Path, progress: bool) -> dict:
  from synthbandit_jax.metrics import stage as score_stage  # pylint: disable=g-import-not-at-top
  s = score_stage.run_scoring(config, workdir, progress=progress)
  return {"scored_pool_images": s["scored_pool_images"], "real_images": s["real_images"]}


def _run_train(config, workdir: Path, progress: bool) -> dict:
  s = trainer.run(config, workdir, progress=progress)
  return {row["mode"]: round(float(row["test_accuracy"]), 4) for row in s["comparison"]}


def _run_report(config, workdir: Path, progress: bool) -> dict:
  del progress
  from synthbandit_jax import report  # pylint: disable=g-import-not-at-top
  summary = sio.read_json(workdir / "results.json")
  state = _read_state(workdir)
  summary["pipeline"] = {"stages": state}
  sio.atomic_write_json(workdir / "results.json", summary)
  scores = Path(config.scores.path) if config.scores.path else None
  pool_dir = Path(config.pool.path) if config.pool.path else workdir / "pool"
  report.write_report(workdir, summary, scores_path=scores, pool_dir=pool_dir, stages=state)
  return {"report": "report.html, report.md"}


_TRAIN_KEYS = ("seed", "data", "pool", "scores", "arms", "model", "optim", "train", "bandit")
_TRAIN_EXCLUDE = ("train.epochs",)  # more epochs resume the same runs (trainer's own rule)


def _train_outputs(workdir: Path) -> list[Path]:
  return [workdir / "results.json"]


def _train_superseded(config, workdir: Path) -> list[Path]:
  modes = [m.strip() for m in str(config.train.modes).split(",") if m.strip()]
  previous = workdir / "config.json"  # the trainer's record of the modes it last ran
  if previous.is_file():
    try:
      modes += str(sio.read_json(previous)["train"]["modes"]).split(",")
    except (KeyError, TypeError, ValueError):
      pass
  paths = sorted({workdir / trainer.mode_dirname(m.strip()) for m in modes if m.strip()})
  return paths + [workdir / n for n in ("results.json", "report.md", "config.json")]


STAGE_DEFS = {
    "attributes": Stage("attributes", ("seed", "data", "attributes"), (),
                        lambda w: [w / "attributes.json", w / "prompts.jsonl"],
                        _run_attributes, exclude=("data.on_device", "data.prefetch")),
    "generator": Stage("generator", ("seed", "data", "generator"), ("attributes",),
                       lambda w: [w / "generator" / "model_index.json"], _run_generator,
                       exclude=("data.on_device", "data.prefetch")),
    "generate": Stage("generate", ("generate",), ("attributes", "generator"),
                      lambda w: [w / "pool" / "metadata.jsonl"], _run_generate),
    "score": Stage("score", ("seed", "data", "pool", "score"), ("generate",),
                   lambda w: [w / "scores.csv"], _run_score,
                   exclude=("data.on_device", "data.prefetch")),
    "train": Stage("train", _TRAIN_KEYS, ("generate", "score"), _train_outputs, _run_train,
                   exclude=_TRAIN_EXCLUDE),
    "report": Stage("report", ("report",), ("train",), lambda w: [w / "report.html"],
                    _run_report),
}


# ------------------------------------------------------------------------ orchestration

def resolve_config(config, workdir: Path) -> ml_collections.ConfigDict:
  """The config with the pipeline's own paths filled in (pool, scores)."""
  cfg = ml_collections.ConfigDict(trainer.config_dict(config))
  if cfg.pool.kind == "dir" and not cfg.pool.path:
    cfg.pool.path = str(workdir / "pool")
  if cfg.arms.source == "scores" and not cfg.scores.path:
    cfg.scores.path = str(workdir / "scores.csv")
    cfg.scores.allow_missing = True
  return cfg


def enabled_stages(config) -> dict[str, str | None]:
  """{stage: None if it runs, else why not} for `config` (before path resolution)."""
  why: dict[str, str | None] = {s: None for s in STAGES}
  generated = config.pool.kind == "dir" and not config.pool.path
  if not generated:
    reason = ("pool.kind=controlled (built in the train stage)"
              if config.pool.kind == "controlled" else f"pool provided: {config.pool.path}")
    for s in ("attributes", "generator", "generate"):
      why[s] = reason
  elif str(config.generate.model) != OFFLINE_MODEL:
    why["generator"] = f"generate.model={config.generate.model!r} (not 'offline')"
  if config.scores.path:
    why["score"] = f"scores provided: {config.scores.path}"
  elif config.arms.source != "scores":
    why["score"] = f"arms.source={config.arms.source!r} does not use scores"
  return why


def stage_hash(name: str, flat: dict, upstream_hashes: dict[str, str]) -> str:
  st = STAGE_DEFS[name]
  blob = json.dumps({"stage": name, "config": _select(flat, st.keys, st.exclude),
                     "upstream": {u: upstream_hashes.get(u) for u in st.upstream}},
                    sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _read_state(workdir: Path) -> dict:
  f = workdir / STATE_FILE
  return sio.read_json(f) if f.is_file() else {}


def _supersede(workdir: Path, paths: Sequence[Path], tag: str) -> list[str]:
  moved = []
  dest = workdir / "superseded" / tag
  for p in paths:
    if p.exists():
      target = dest / p.relative_to(workdir)
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
      os.replace(p, target)
      moved.append(str(p.relative_to(workdir)))
  return moved


def _stage_paths(name: str, config, workdir: Path) -> list[Path]:
  """Everything a stage owns (moved aside when its hash changes)."""
  if name == "attributes":
    return [workdir / "attributes.json", workdir / "prompts.jsonl"]
  if name == "generator":
    return [workdir / "generator", workdir / "generator_work"]
  if name == "generate":
    return [workdir / "pool", workdir / "generate.json"]
  if name == "score":
    return [workdir / n for n in ("scores.csv", "scores.csv.meta.json",
                                  "scores.csv.sources.json", "scoring.json", "features",
                                  "metric_validation.md", "metric_validation.json")]
  if name == "train":
    return _train_superseded(config, workdir)
  return [workdir / "report.html"]


def run_pipeline(config, workdir: str | Path, *, stages: Sequence[str] | None = None,
                 progress: bool = True, runners: dict[str, Callable] | None = None) -> dict:
  """Runs (or skips) every stage; returns the stage table also kept in stages.json.

  `stages` restricts the run to those stages (earlier ones must be finished already or not
  needed; later ones are left alone); `runners` replaces stage functions (tests, research
  extensions).
  """
  workdir = Path(workdir)
  main = parallel.is_main_process()
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
  parallel.check_shared_directory(workdir)
  wanted = list(stages) if stages else list(STAGES)
  unknown = [s for s in wanted if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
  why_not = enabled_stages(config)
  cfg = resolve_config(config, workdir)
  flat = trainer.flatten_config(trainer.config_dict(cfg))
  state = _read_state(workdir)
  parallel.sync("pipeline: state read")  # every process decides from the same stages.json
  hashes: dict[str, str] = {}
  t_all = time.perf_counter()
  last = max(STAGES.index(s) for s in wanted)
  for name in STAGES[:last + 1]:  # stages after the last wanted one are left alone
    st = STAGE_DEFS[name]
    if why_not[name] is not None:
      state[name] = {"status": "not needed", "reason": why_not[name]}
      continue
    h = stage_hash(name, flat, hashes)
    hashes[name] = h
    prev = state.get(name, {})
    outputs_ok = all(p.exists() for p in st.outputs(workdir))
    if prev.get("hash") == h and prev.get("status") == "done" and outputs_ok:
      log.info("stage %s: up to date (hash %s), skipped", name, h)
      print(f"[{name}] up to date, skipped")
      continue
    if name not in wanted:
      if prev.get("status") == "done" and prev.get("hash") != h:
        raise ValueError(
            f"stage {name!r} ran with other settings (hash {prev.get('hash')} != {h}) and is "
            f"not in --stages={','.join(wanted)}; add it (its outputs would be stale)")
      if not outputs_ok:
        raise ValueError(f"stage {name!r} has not run in {workdir}; add it to --stages "
                         f"(needed by the later stages)")
      continue
    if prev.get("hash") not in (None, h) and main:
      moved = _supersede(workdir, _stage_paths(name, cfg, workdir), f"{name}-{prev['hash']}")
      if moved:
        print(f"[{name}] settings changed: moved {moved} to superseded/{name}-{prev['hash']}")
    state[name] = {"hash": h, "status": "running", "started": time.time()}
    if main:
      sio.atomic_write_json(workdir / STATE_FILE, state)
      print(f"[{name}] running")
    parallel.sync(f"pipeline: {name} starts")
    t0 = time.perf_counter()
    run = (runners or {}).get(name, st.run)
    counts = {}
    if main or name not in MAIN_PROCESS_STAGES:
      counts = run(cfg, workdir, progress and main) or {}
    parallel.sync(f"pipeline: {name} finished")
    state[name] = {"hash": h, "status": "done", "seconds": round(time.perf_counter() - t0, 2),
                   "counts": counts}
    if main:
      sio.atomic_write_json(workdir / STATE_FILE, state)
      print(f"[{name}] done in {state[name]['seconds']:.0f} s {counts}")
  state["_total_seconds"] = round(time.perf_counter() - t_all, 2)
  if main:
    sio.atomic_write_json(workdir / STATE_FILE, state)
  return state
