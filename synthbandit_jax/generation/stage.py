"""The generation stage: prompts.jsonl -> a synthetic pool, sharded over devices, resumable.

`run_generation(config, workdir)` reads ``config.generate`` (keys in configs/common.py) and
writes the pool of the foundation issue's format:

  WORKDIR/pool/images/shard_XXXXX/<id>.png   generated images
  WORKDIR/pool/metadata/shard_XXXXX.jsonl    rows of a finished shard (written last)
  WORKDIR/pool/metadata.jsonl                all rows (once every shard is done)
  WORKDIR/pool/generation.json               what made the pool (model, sampler, seed, ...)
  WORKDIR/generate.json                      counts, flagged images, wall time, images/s

Work is cut into shards of ``shard_size`` prompts; with several processes (multi-host) each
takes the shards ``s % process_count == process_index``. A finished shard (its metadata file
exists) is skipped, so an interrupted run resumes where it stopped; resuming with settings
that would change the images is refused, naming the keys.

Within a shard, batches of ``batch_size`` images (global over all local devices; a short last
batch is padded and the padding dropped) go through one jitted call each, inputs sharded over
the device mesh along the batch. Each image's initial noise comes from (seed, image id)
(`diffusion.image_noise`), so the images do not depend on the device count, batch
composition or resume point.

Bad images: an image with a non-finite value, or whose brightest pixel is at most
``black_level`` (what half-precision overflow or a safety filter produces), is counted;
``on_bad="regenerate"`` redoes it in float32 when the run computes in bf16/fp16, then
flags it if still bad; ``"flag"`` keeps it with ``extras.flag`` set; ``"drop"`` leaves it
out of the pool. Counts go to generate.json.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax import io as sio
from synthbandit_jax import parallel
from synthbandit_jax.data import pool as pool_lib

log = logging.getLogger(__name__)

ON_BAD = ("regenerate", "flag", "drop")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Keys whose change alters the images: a resume with other values is refused.
_IDENTITY_KEYS = ("model", "sampler", "steps", "guidance_scale", "height", "width", "seed",
                  "clip_skip", "negative_prompts", "prompts_sha256")


def read_prompts(path: str | Path) -> list[dict]:
  """prompts.jsonl rows (id, class, prompt; optional negative_prompt ...), validated."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompts file {path} does not exist; make it with "
                            "launch/attributes.py or write one row per image: "
                            '{"id": ..., "class": ..., "prompt": ...}')
  rows, seen = [], set()
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
    missing = [k for k in ("id", "class", "prompt") if not isinstance(row.get(k), str)]
    if missing:
      raise ValueError(f"{path}:{n}: field(s) {missing} missing or not strings")
    if row["id"] in seen:
      raise ValueError(f"{path}:{n}: duplicate id {row['id']!r}")
    seen.add(row["id"])
    rows.append(row)
  if not rows:
    raise ValueError(f"{path} has no prompts")
  return rows


def bad_image_flags(images: np.ndarray, black_level: int) -> list[str | None]:
  """Per image: "nan" (non-finite values), "black" (max pixel <= black_level) or None."""
  flags = []
  for img in images:
    if not np.isfinite(img).all():
      flags.append("nan")
    elif to_uint8(img).max() <= black_level:
      flags.append("black")
    else:
      flags.append(None)
  return flags


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 as diffusers' image processor does ((x/2+0.5) clip, *255, round)."""
  x = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
  x = np.clip(x / 2.0 + 0.5, 0.0, 1.0)
  return np.round(x * 255.0).astype(np.uint8)


class _Batches:
  """Runs one padded, sharded batch through a sampling function."""

  def __init__(self, sample: Callable, mesh, batch_size: int):
    self.sample, self.mesh, self.batch_size = sample, mesh, batch_size
    self.sharding = parallel.batch_sharded(mesh)

  def __call__(self, ids: np.ndarray, uncond: np.ndarray, noise: np.ndarray) -> np.ndarray:
    n = len(ids)
    pad = self.batch_size - n
    if pad:
      rep = lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)], axis=0)
      ids, uncond, noise = rep(ids), rep(uncond), rep(noise)
    put = lambda a: jax.device_put(a, self.sharding)
    out = self.sample(put(ids), put(uncond), put(noise))
    return np.asarray(jax.device_get(out))[:n]


def _identity(g, model_name: str, prompts_path: Path) -> dict:
  return {"model": model_name, "sampler": str(g.sampler), "steps": int(g.steps),
          "guidance_scale": float(g.guidance_scale), "height": int(g.height),
          "width": int(g.width), "seed": int(g.seed), "clip_skip": int(g.clip_skip),
          "negative_prompts": bool(g.negative_prompts),
          "prompts_sha256": _sha256(prompts_path)}


def _sha256(path: Path) -> str:
  import hashlib  # pylint: disable=import-outside-toplevel
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_resume(pool_dir: Path, ident: dict) -> None:
  f = pool_dir / "generation.json"
  if not f.is_file():
    return
  old = json.loads(f.read_text())
  changed = [k for k in _IDENTITY_KEYS if old.get(k) != ident.get(k)]
  if changed:
    detail = ", ".join(f"{k}: {old.get(k)!r} -> {ident.get(k)!r}" for k in changed)
    raise ValueError(
        f"{pool_dir} was generated with other settings ({detail}); resuming would mix two "
        "pools. Use a new workdir, or delete the pool to regenerate it")


def generate_pool(pipeline, rows: Sequence[dict], pool_dir: str | Path, *, settings,
                  seed: int, batch_size: int, shard_size: int, on_bad: str = "regenerate",
                  black_level: int = 4, source: str | None = None,
                  process_index: int = 0, process_count: int = 1, mesh=None,
                  identity: dict | None = None, progress: bool = True,
                  max_shards: int | None = None, negative_prompts: bool = True) -> dict:
  """Generates `rows` into the pool at `pool_dir`; returns counts (see module docstring)."""
  if on_bad not in ON_BAD:
    raise ValueError(f"generate.on_bad must be one of {ON_BAD}, got {on_bad!r}")
  if shard_size < 1 or batch_size < 1:
    raise ValueError(f"generate.shard_size ({shard_size}) and generate.batch_size "
                     f"({batch_size}) must be >= 1")
  pool_dir = Path(pool_dir)
  mesh = mesh if mesh is not None else parallel.make_mesh()
  parallel.check_divisible(batch_size, mesh, "generate.batch_size")
  if identity is not None:
    _check_resume(pool_dir, identity)
    parallel.sync("generate: resume checked")  # all read generation.json before it is rewritten
    if process_index == 0:
      sio.atomic_write_json(pool_dir / "generation.json", identity)
  writer = pool_lib.PoolWriter(pool_dir)
  num_shards = -(-len(rows) // shard_size)
  mine = [s for s in range(num_shards) if s % process_count == process_index]
  todo = [s for s in mine if not writer.shard_done(s)]
  if max_shards is not None:
    todo = todo[:max_shards]
  latent_shape = pipeline.latent_shape(settings)
  run = _Batches(lambda *a: pipeline.sample_fn(settings)(pipeline.params, *a), mesh,
                 batch_size)
  fallback = None
  is_half = pipeline.unet.dtype != jnp.float32
  counts = {"generated": 0, "flagged": 0, "dropped": 0, "regenerated": 0, "nan": 0,
            "black": 0}
  source = source or f"sd:{pipeline.name}"
  total = sum(min(shard_size, len(rows) - s * shard_size) for s in todo)
  bar = _progress(total, progress and process_index == 0)
  t0 = time.perf_counter()
  for s in todo:
    shard_rows = rows[s * shard_size:(s + 1) * shard_size]
    images, meta = [], []
    for b in range(0, len(shard_rows), batch_size):
      chunk = shard_rows[b:b + batch_size]
      ids = [r["id"] for r in chunk]
      tok = pipeline.tokenize([r["prompt"] for r in chunk])
      unc = pipeline.tokenize([(r.get("negative_prompt") or "") if negative_prompts else ""
                               for r in chunk])
      noise = _noise(seed, ids, latent_shape)
      out = run(tok, unc, noise)
      flags = bad_image_flags(out, black_level)
      redo = [i for i, f in enumerate(flags) if f]
      if redo and on_bad == "regenerate" and is_half:
        if fallback is None:
          fp32 = pipeline.with_dtype(jnp.float32)
          fallback = _Batches(lambda *a: fp32.sample_fn(settings)(fp32.params, *a), mesh,
                              batch_size)
        again = fallback(tok[redo], unc[redo], noise[redo])
        for j, i in enumerate(redo):
          out[i] = again[j]
        counts["regenerated"] += len(redo)
        for j, (i, f) in enumerate(zip(redo, bad_image_flags(again, black_level))):
          flags[i] = f
      for img, row, flag in zip(out, chunk, flags):
        if flag:
          counts[flag] += 1
          if on_bad == "drop":
            counts["dropped"] += 1
            continue
          counts["flagged"] += 1
        images.append(to_uint8(img))
        meta.append(_pool_row(row, source, seed, settings, flag))
      bar.update(len(chunk))
      counts["generated"] += len(chunk)
      dt = time.perf_counter() - t0
      bar.set_postfix_str(f"{counts['generated'] / max(dt, 1e-9):.2f} img/s")
    writer.write_shard(s, images, meta)
  bar.close()
  wall = time.perf_counter() - t0
  if process_count > 1:
    # Wait for every process's shards: then process 0 sees the whole pool and finalises it.
    parallel.sync("generate: shards written")
  done = writer.finished_shards()
  complete = all(s in done for s in range(num_shards))
  if complete and process_index == 0:
    writer.finalize(num_shards)
  return {**counts, "shards": num_shards, "shards_written": len(todo),
          "complete": complete, "wall_time_s": wall,
          "images_per_s": counts["generated"] / wall if wall > 0 and counts["generated"]
          else None}


def _noise(seed: int, ids: Sequence[str], latent_shape) -> np.ndarray:
  from synthbandit_jax.generation import diffusion  # pylint: disable=import-outside-toplevel
  return diffusion.image_noise(seed, ids, tuple(latent_shape))


def _pool_row(row: dict, source: str, seed: int, settings, flag: str | None) -> dict:
  extras = {k: v for k, v in row.items()
            if k not in ("id", "class", "prompt", "attributes", "seed", "path")}
  extras.update({"sampler": settings.sampler, "steps": settings.steps,
                 "guidance_scale": settings.guidance_scale, "prompt_seed": row.get("seed")})
  if flag:
    extras["flag"] = flag
  return {"id": row["id"], "class": row["class"], "source": source, "prompt": row["prompt"],
          "attributes": row.get("attributes") or {}, "seed": int(seed), "extras": extras}


def _progress(total: int, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc="generate", unit="img", disable=not enabled)


def run_generation(config, workdir: str | Path, *, progress: bool = True,
                   pipeline: Any = None) -> dict:
  """The stage as launch/generate.py runs it (see the module docstring)."""
  from synthbandit_jax.generation import diffusion  # pylint: disable=import-outside-toplevel
  workdir = Path(workdir)
  g = config.generate
  if g.dtype not in DTYPES:
    raise ValueError(f"generate.dtype must be one of {sorted(DTYPES)}, got {g.dtype!r}")
  prompts_path = Path(g.prompts) if g.prompts else workdir / "prompts.jsonl"
  rows = read_prompts(prompts_path)
  if int(g.max_images) > 0:
    rows = rows[:int(g.max_images)]
  if pipeline is None:
    if not g.model:
      raise ValueError("generate.model is empty: give a diffusers Stable Diffusion directory "
                       "or a hub id already in the local hub cache")
    pipeline = diffusion.load_pipeline(g.model, dtype=DTYPES[g.dtype],
                                       attention_impl=g.attention_impl or None)
  settings = diffusion.SampleSettings(
      sampler=str(g.sampler), steps=int(g.steps), guidance_scale=float(g.guidance_scale),
      height=int(g.height), width=int(g.width), clip_skip=int(g.clip_skip))
  pool_dir = Path(g.out) if g.out else workdir / "pool"
  ident = _identity(g, str(g.model or pipeline.name), prompts_path)
  summary = generate_pool(
      pipeline, rows, pool_dir, settings=settings, seed=int(g.seed),
      batch_size=int(g.batch_size), shard_size=int(g.shard_size), on_bad=str(g.on_bad),
      black_level=int(g.black_level), process_index=jax.process_index(),
      process_count=jax.process_count(), identity=ident, progress=progress,
      negative_prompts=bool(g.negative_prompts))
  summary.update({"pool": str(pool_dir), "prompts": str(prompts_path), "images": len(rows),
                  "model": ident["model"], "dtype": g.dtype,
                  "devices": jax.local_device_count(), "processes": jax.process_count(),
                  "backend": jax.default_backend()})
  if jax.process_index() == 0:
    sio.atomic_write_json(workdir / "generate.json", summary)
  return summary
