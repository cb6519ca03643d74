"""Stable Diffusion generation throughput (images/s): our Flax `Pipeline` vs. diffusers.

  python benchmarks/sd_throughput.py --config=tiny                        # smoke test, CPU
  python benchmarks/sd_throughput.py --config=sd15 --height=256 --width=256 --steps=2 \
      --batch=1 --repeats=2                                              # small, CPU
  python benchmarks/sd_throughput.py --torch-compile --json=/tmp/sd.json  # GPU: the target

Model: random weights with a real architecture, built by diffusers / transformers (PyTorch),
saved with `StableDiffusionPipeline.save_pretrained` into a temporary directory (or
`--model-dir`, kept and reused on the next run), then loaded by both sides from that one
directory, so both compute with the same float32 weights:
- "sd15": Stable Diffusion 1.5's architecture: UNet block_out_channels (320, 640, 1280,
  1280), 2 layers per block, 8 heads ("attention_head_dim"), cross_attention_dim 768,
  sample_size 64 (860M params); VAE (128, 256, 512, 512) (84M); CLIP ViT-L/14 text tower
  (12 layers, width 768, 12 heads, MLP 3072, quick_gelu, vocab 49408; 123M); SD 1.5's PNDM
  scheduler_config.json (each side derives the `--sampler` from it, as diffusers'
  `from_config` does). Default images 512x512.
- "tiny": the 2-block UNet / VAE / 2-layer CLIP of tests/sd_tiny.py (width 32), for a smoke
  test. Default images 32x32 (latents 16x16).
The tokenizer is CLIP's real BPE vocabulary (`clip_text.write_tokenizer_files`, offline asset)
read by transformers' CLIPTokenizer on both sides. Random weights do not change the work done
per image (no early exits), so the timings hold for the real checkpoint.

What one timed generation is, on both sides: B prompt strings in (negative prompt "", so
classifier-free guidance runs the UNet on a 2B batch when --guidance > 1), the same initial
latents already on the device, --steps steps of --sampler, VAE decode, images back on the
host as numpy:
- ours: tokenize, then the AOT-compiled `Pipeline.sample_fn(settings)` (text encoding, the
  `lax.fori_loop` over the steps and the VAE decode in one XLA program), then `np.asarray`;
  i.e. `Pipeline.generate` with its compile taken out. Compute dtype --dtype (params stay
  float32, cast inside the program). Attention: `jax.nn.dot_product_attention`, cuDNN's fused
  kernel on GPU for bf16 where the head size allows (see models/sd_blocks.py), XLA otherwise.
- diffusers: `StableDiffusionPipeline(prompt=..., latents=..., num_inference_steps,
  guidance_scale, height, width, output_type="np")` with weights in --torch-dtype, the
  scheduler class matching --sampler (`DPMSolverMultistepScheduler` / `DDIMScheduler` /
  `EulerDiscreteScheduler.from_config`), PyTorch SDPA attention (diffusers' default
  AttnProcessor2_0). With --torch-compile also a second pipeline sharing the same modules
  whose UNet is `torch.compile(unet)`.

Timing: compile (ours: `lower` + `compile`, AOT) and --warmup untimed runs per side (torch:
cuDNN autotuning, torch.compile's compile) are reported separately; then --repeats timed
runs, interleaved ours / torch / torch.compile so that load from other processes hits all
sides alike. Every run ends with the images on the host (np.asarray / .cpu()), and
`torch.cuda.synchronize()` is called around torch's runs. Reported per batch size:

  img/s          = B * repeats / (total seconds of the timed runs)
  ratio          = ours img/s / peer img/s   (> 1: ours is faster); ratio(best) uses each
                   side's fastest run (less sensitive to other load)
  UNet step ms   = median of --unet-repeats single UNet calls on the guidance batch 2B
                   (ours: a jitted `unet.apply`, block_until_ready; theirs: `pipe.unet(...)`
                   under inference_mode, synchronize), after 2 warm-up calls
  MFU            = FLOPs / seconds / --peak-tflops, with FLOPs from XLA's cost analysis of the
                   *lowered* (unoptimised) HLO of our UNet / VAE decoder / text encoder with
                   XLA attention forced (cuDNN's attention is a custom call whose FLOPs XLA
                   does not count). Convolutions count only taps inside the image (no padding
                   taps), a multiply-add is 2 FLOPs, elementwise ops count too.
                   unet MFU     = UNet FLOPs(2B) / UNet step seconds
                   gen MFU      = UNet FLOPs(2B) * steps / generation seconds (the issue's
                                  definition: text encoder and VAE time count, their FLOPs not)
                   pipeline MFU = (UNet * steps + VAE decode + text encoder) FLOPs / gen secs
                   --peak-tflops defaults to 989 (H100/H200 SXM dense bf16) for bf16 on such a
                   GPU; elsewhere achieved TFLOP/s are printed and MFU needs the flag.

Agreement: max |ours - theirs| over the images in [0, 1] of the first warm-up run is printed
(a check that both sides compute the same thing; at float32 on both sides it was 1e-6 to 4e-6 on
the tiny and sd15 (256x256) configs; bf16 vs fp16 differ more). It never fails the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# JAX and PyTorch share the GPU in this process: without this JAX would reserve 75% of its
# memory up front and leave diffusers too little at batch 32 (set the variable to override).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

try:
  import synthbandit_jax  # noqa: F401  (installed, or run from the repo root)
except ImportError:  # run as `python benchmarks/sd_throughput.py` without installing
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax import io as sio
from synthbandit_jax.generation import diffusion
from synthbandit_jax.models import clip_text
from synthbandit_jax.models import vae as vae_lib

# Stable Diffusion 1.5's scheduler/scheduler_config.json (a PNDMScheduler); both sides derive
# the benchmarked sampler from it (diffusers: `<SamplerClass>.from_config`; ours:
# `schedulers.config_from_diffusers`, which applies the same per-class defaults).
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", trained_betas=None, skip_prk_steps=True,
                      set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

# Architectures (diffusers / transformers constructor kwargs). The text tower's vocab size and
# special-token ids come from the tokenizer.
ARCHS: dict[str, dict[str, Any]] = {
    "sd15": {
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77,
                     hidden_act="quick_gelu", projection_dim=768),
        "unet": dict(sample_size=64, in_channels=4, out_channels=4,
                     block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4,
                    block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                    norm_num_groups=32, sample_size=512),
        "size": 512,
    },
    "tiny": {  # tests/sd_tiny.py's architecture, with a larger default image
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=77,
                     hidden_act="quick_gelu"),
        "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                     layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=8, norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                    norm_num_groups=8, sample_size=32),
        "size": 32,
    },
}

SAMPLER_CLASSES = {"dpmpp_2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler",
                   "euler": "EulerDiscreteScheduler"}

# Cycled to fill a batch (the content does not change the work: every prompt is padded to 77).
PROMPTS = (
    "a photo of a red sports car parked on a wet street at night, neon reflections",
    "an oil painting of a lighthouse on a cliff during a storm",
    "a golden retriever puppy playing in autumn leaves, shallow depth of field",
    "a bowl of ramen with a soft boiled egg, studio lighting, top view",
    "a watercolor map of an imaginary island with mountains and rivers",
    "a portrait of an old fisherman with a white beard, 35mm film",
    "a futuristic city skyline at sunset, highly detailed, digital art",
    "a handwritten digit seven on lined paper, macro photo",
)

H100_BF16_DENSE_TFLOPS = 989.0


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n", 1)[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--config", choices=sorted(ARCHS), default="sd15",
                 help="Architecture of the random-weight pipeline.")
  p.add_argument("--model-dir", "--model_dir", default=None,
                 help="Diffusers directory to reuse (built there if it has no "
                      "model_index.json); default: a temporary directory, deleted at the end.")
  p.add_argument("--height", type=int, default=None,
                 help="Image height (default: 512 for sd15, 32 for tiny).")
  p.add_argument("--width", type=int, default=None,
                 help="Image width (default: 512 for sd15, 32 for tiny).")
  p.add_argument("--steps", type=int, default=50, help="Denoising steps.")
  p.add_argument("--guidance", type=float, default=7.5,
                 help="Classifier-free guidance scale (> 1 doubles the UNet batch).")
  p.add_argument("--batch", default="8,32", help="Images per call; a comma list sweeps.")
  p.add_argument("--sampler", choices=sorted(SAMPLER_CLASSES), default="dpmpp_2m")
  p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                 help="Our compute dtype (auto: bfloat16 on GPU, float32 on CPU).")
  p.add_argument("--torch-dtype", "--torch_dtype", choices=["auto", "float32", "float16"],
                 default="auto", help="diffusers' weight dtype (auto: float16 on GPU, "
                 "float32 on CPU).")
  p.add_argument("--torch-compile", "--torch_compile", action="store_true",
                 help="Also time diffusers with unet = torch.compile(unet).")
  p.add_argument("--torch-compile-mode", "--torch_compile_mode", default=None,
                 help="torch.compile mode (e.g. max-autotune); default: torch's default.")
  p.add_argument("--channels-last", "--channels_last", action="store_true",
                 help="diffusers' UNet and VAE in torch.channels_last (diffusers' speed tip).")
  p.add_argument("--peak-tflops", "--peak_tflops", type=float, default=None,
                 help="Peak dense TFLOP/s for MFU (default: 989 for bf16 on an H100/H200; "
                      "elsewhere MFU is printed only when given).")
  p.add_argument("--repeats", type=int, default=3, help="Timed generations per side.")
  p.add_argument("--warmup", type=int, default=1,
                 help="Untimed generations per side after compiling (>= 1).")
  p.add_argument("--unet-repeats", "--unet_repeats", type=int, default=10,
                 help="Timed single UNet calls per side (0 skips the UNet step timing).")
  p.add_argument("--skip-torch", "--skip_torch", action="store_true",
                 help="Time ours only (diffusers is still needed to build the model dir).")
  p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                 help="Where both sides run; auto = gpu if JAX has one, else cpu.")
  p.add_argument("--torch-threads", "--torch_threads", type=int, default=0,
                 help="torch.set_num_threads value; 0 = os.cpu_count().")
  p.add_argument("--seed", type=int, default=0, help="Seed for the weights and latents.")
  p.add_argument("--json", default=None, help="Optional JSON file for the results.")
  args = p.parse_args(argv)
  try:
    args.batch_sizes = [int(b) for b in str(args.batch).split(",") if b.strip()]
  except ValueError:
    p.error(f"--batch must be integers separated by commas; got {args.batch!r}")
  if not args.batch_sizes or min(args.batch_sizes) < 1:
    p.error(f"--batch needs positive values; got {args.batch!r}")
  for name in ("steps", "repeats", "warmup"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
  if args.unet_repeats < 0:
    p.error(f"--unet-repeats must be >= 0; got {args.unet_repeats}")
  size = ARCHS[args.config]["size"]
  args.height = args.height or size
  args.width = args.width or size
  return args


# ---------------------------------------------------------------- setup


def _resolve_device(name: str) -> str:
  """'auto' -> 'gpu' when JAX's default backend is a GPU, else 'cpu'."""
  if name == "auto":
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
  return name


def _jax_device(kind: str) -> jax.Device:
  try:
    return jax.devices(kind)[0]
  except RuntimeError as e:
    raise SystemExit(f"--device={kind}: JAX has no {kind} backend ({e}); pass --device=cpu "
                     "or install a jax build for that device.") from e


def _import_torch_stack():
  """(torch, diffusers, transformers), or exit naming how to install them."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import diffusers  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(
        f"sd_throughput: {e.name or e} is not installed; the PyTorch peer (and building the "
        "random-weight model directory) needs torch, diffusers and transformers: "
        "`.venv/bin/pip install torch==2.13.0 diffusers==0.42.1 transformers==5.24.0` (offline: "
        "`pip download diffusers==0.42.1 --no-deps` elsewhere and `pip install --no-deps` the "
        "wheel), or pass --skip-torch with an existing --model-dir.") from None
  return torch, diffusers, transformers


def build_model_dir(config: str, root: Path, seed: int) -> Path:
  """Saves a random-weight SD pipeline of architecture `config` in the diffusers layout."""
  torch, diffusers, transformers = _import_torch_stack()
  arch = ARCHS[config]
  torch.manual_seed(seed)
  tok_dir = clip_text.write_tokenizer_files(root / "tokenizer")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
      **arch["text"]))
  unet = diffusers.UNet2DConditionModel(**arch["unet"])
  vae = diffusers.AutoencoderKL(**arch["vae"])
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
      scheduler=diffusers.PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(root)
  del pipe, unet, vae, text_encoder
  gc.collect()
  return root


def _dir_summary(root: Path) -> dict[str, Any]:
  """The saved UNet / VAE / text-encoder configs' key sizes (to check what was reused)."""
  read = lambda p: json.loads((root / p).read_text())
  un, va, te = read("unet/config.json"), read("vae/config.json"), read("text_encoder/config.json")
  return {"unet_block_out_channels": un.get("block_out_channels"),
          "unet_sample_size": un.get("sample_size"),
          "vae_block_out_channels": va.get("block_out_channels"),
          "text_layers": te.get("num_hidden_layers"), "text_hidden": te.get("hidden_size")}


def _prompts(b: int) -> list[str]:
  return [PROMPTS[i % len(PROMPTS)] for i in range(b)]


def _stats(times: list[float], b: int) -> dict[str, float]:
  return {"img_per_s": b * len(times) / sum(times), "best_img_per_s": b / min(times),
          "median_s": statistics.median(times)}


def _shape_structs(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _lowered_flops(fn: Callable, *args) -> float | None:
  """XLA's FLOP count of `jit(fn)` on the unoptimised HLO (None if the backend has none)."""
  try:
    ca = jax.jit(fn).lower(*args).cost_analysis()
  except Exception as e:  # pylint: disable=broad-except  (backend without cost analysis)
    print(f"  note: cost analysis failed ({type(e).__name__}: {e}); no FLOPs / MFU")
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  flops = (ca or {}).get("flops")
  return float(flops) if flops else None


def _flop_counts(pipe: diffusion.Pipeline, b: int, guided: bool,
                 latent: tuple[int, int, int]) -> dict[str, float | None]:
  """UNet (on the guidance batch), VAE-decode and text-encoder FLOPs, XLA attention forced."""
  bb = 2 * b if guided else b
  h, w, c = latent
  dt = pipe.unet.dtype
  un = pipe.unet.clone(attention_impl="xla")
  te = pipe.text_encoder.clone(attention_impl="xla")
  va = pipe.vae
  params = _shape_structs(pipe.params)
  ctx_dim = int(pipe.unet_config.cross_attention_dim)
  x = jax.ShapeDtypeStruct((bb, h, w, c), dt)
  t = jax.ShapeDtypeStruct((), jnp.float32)
  ctx = jax.ShapeDtypeStruct((bb, 77, ctx_dim), dt)
  ids = jax.ShapeDtypeStruct((bb, 77), jnp.int32)
  z = jax.ShapeDtypeStruct((b, h, w, c), jnp.float32)
  return {
      "unet_per_step": _lowered_flops(
          lambda p, x, t, ctx: un.apply({"params": p}, x, t, ctx), params["unet"], x, t, ctx),
      "vae_decode": _lowered_flops(
          lambda p, z: va.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode),
          params["vae"], z),
      "text_encoder": _lowered_flops(
          lambda p, ids: te.apply({"params": p}, ids)[0], params["text_encoder"], ids),
  }


# ---------------------------------------------------------------- ours (JAX)


class _Ours:
  """Our pipeline at one batch size: AOT-compiled `sample_fn`, timed like `generate`."""

  def __init__(self, pipe: diffusion.Pipeline, settings: diffusion.SampleSettings,
               noise: np.ndarray):
    self.pipe, self.settings = pipe, settings
    b = noise.shape[0]
    self.prompts, self.negative = _prompts(b), [""] * b
    self.noise = jax.device_put(noise)
    ids = jnp.asarray(pipe.tokenize(self.prompts))
    fn = pipe.sample_fn(settings)
    t0 = time.perf_counter()
    lowered = fn.lower(pipe.params, ids, ids, self.noise)
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    t2 = time.perf_counter()
    self.lower_s, self.compile_s = t1 - t0, t2 - t1

  def run(self) -> tuple[float, np.ndarray]:
    """One generation, prompts to host images in [-1, 1]; returns (seconds, images)."""
    t0 = time.perf_counter()
    ids = jnp.asarray(self.pipe.tokenize(self.prompts))
    uncond = jnp.asarray(self.pipe.tokenize(self.negative))
    images = np.asarray(self.compiled(self.pipe.params, ids, uncond, self.noise))
    return time.perf_counter() - t0, images


def _time_our_unet(pipe: diffusion.Pipeline, bb: int, latent: tuple[int, int, int],
                   repeats: int, seed: int) -> dict[str, Any]:
  """Median seconds of one jitted UNet call on a (bb, h, w, c) batch (+ its compile time)."""
  un = pipe.unet
  kx, kc = jax.random.split(jax.random.key(seed + 7))
  x = jax.random.normal(kx, (bb,) + latent, jnp.float32).astype(un.dtype)
  ctx = jax.random.normal(kc, (bb, 77, int(pipe.unet_config.cross_attention_dim)),
                          jnp.float32).astype(un.dtype)
  t = jnp.float32(999.0)
  t0 = time.perf_counter()
  step = jax.jit(lambda p, x, t, c: un.apply({"params": p}, x, t, c)).lower(
      pipe.params["unet"], x, t, ctx).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(2 + repeats):
    t0 = time.perf_counter()
    step(pipe.params["unet"], x, t, ctx).block_until_ready()
    if i >= 2:
      times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "times": times, "compile_s": compile_s}


# ---------------------------------------------------------------- diffusers (PyTorch)


@dataclasses.dataclass
class _TorchSide:
  torch: Any
  pipe: Any
  device: Any

  def sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def run(self, prompts: list[str], latents: Any, args: argparse.Namespace
          ) -> tuple[float, np.ndarray]:
    """One generation, prompts to host images in [0, 1]; returns (seconds, images)."""
    self.sync()
    t0 = time.perf_counter()
    out = self.pipe(prompt=prompts, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, height=args.height, width=args.width,
                    latents=latents, output_type="np")
    self.sync()
    return time.perf_counter() - t0, out.images

  def time_unet(self, bb: int, latent: tuple[int, int, int], repeats: int, seed: int
                ) -> dict[str, Any]:
    torch = self.torch
    unet = self.pipe.unet
    dt = self.pipe.unet.dtype
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    h, w, c = latent
    x = torch.randn((bb, c, h, w), generator=g).to(self.device, dt)
    ctx = torch.randn((bb, 77, self.pipe.text_encoder.config.hidden_size),
                      generator=g).to(self.device, dt)
    t = torch.tensor(999, device=self.device)
    times, warm = [], []
    with torch.inference_mode():
      for i in range(2 + repeats):
        self.sync()
        t0 = time.perf_counter()
        unet(x, t, encoder_hidden_states=ctx, return_dict=False)
        self.sync()
        (times if i >= 2 else warm).append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times": times, "warmup_s": warm}


def _torch_sides(root: Path, args: argparse.Namespace, tdtype_name: str, kind: str
                 ) -> tuple[Any, dict[str, _TorchSide]]:
  torch, diffusers, _ = _import_torch_stack()
  device = torch.device("cuda" if kind == "gpu" else "cpu")
  tdtype = {"float32": torch.float32, "float16": torch.float16}[tdtype_name]
  cls = getattr(diffusers, SAMPLER_CLASSES[args.sampler])
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      str(root), torch_dtype=tdtype, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.scheduler = cls.from_config(pipe.scheduler.config)
  pipe = pipe.to(device)
  if args.channels_last:
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
  pipe.set_progress_bar_config(disable=True)
  sides = {"torch": _TorchSide(torch, pipe, device)}
  if args.torch_compile:
    kw = {"mode": args.torch_compile_mode} if args.torch_compile_mode else {}
    comps = dict(pipe.components)
    comps["unet"] = torch.compile(pipe.unet, **kw)  # shares the eager UNet's weights
    comps["scheduler"] = cls.from_config(pipe.scheduler.config)
    cpipe = diffusers.StableDiffusionPipeline(**comps, requires_safety_checker=False)
    cpipe.set_progress_bar_config(disable=True)
    sides["torch_compile"] = _TorchSide(torch, cpipe, device)
  return torch, sides


# ---------------------------------------------------------------- driver


def _bench_batch(b: int, pipe: diffusion.Pipeline, settings: diffusion.SampleSettings,
                 sides: dict[str, _TorchSide], args: argparse.Namespace,
                 flops: dict[str, float | None], peak: float | None) -> dict[str, Any]:
  guided = args.guidance > 1.0
  bb = 2 * b if guided else b
  latent = pipe.latent_shape(settings)
  noise = diffusion.image_noise(args.seed, [f"img{i}" for i in range(b)], latent)
  prompts = _prompts(b)
  notes: dict[str, str] = {}

  ours = _Ours(pipe, settings, noise)
  print(f"  [batch {b}] ours: lower {ours.lower_s:.1f}s, compile {ours.compile_s:.1f}s")
  warm: dict[str, list[float]] = {"ours": []}
  first: dict[str, np.ndarray] = {}
  for _ in range(args.warmup):
    s, img = ours.run()
    warm["ours"].append(s)
    first.setdefault("ours", np.clip(img / 2 + 0.5, 0, 1))
  latents = {}
  for name in list(sides):
    side = sides[name]
    torch = side.torch
    latents[name] = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()).to(
        side.device, side.pipe.unet.dtype)
    try:
      warm[name] = []
      for _ in range(args.warmup):
        s, img = side.run(prompts, latents[name], args)
        warm[name].append(s)
        first.setdefault(name, np.asarray(img, np.float32))
    except Exception as e:  # pylint: disable=broad-except  (torch.compile failures)
      if name != "torch_compile":
        raise
      notes[name] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      del sides[name], warm[name]
  agree = {n: float(np.abs(first["ours"] - im).max()) for n, im in first.items() if n != "ours"}

  times: dict[str, list[float]] = {"ours": []}
  times.update({name: [] for name in sides})
  for _ in range(args.repeats):  # interleaved, so background load hits every side alike
    times["ours"].append(ours.run()[0])
    for name, side in sides.items():
      times[name].append(side.run(prompts, latents[name], args)[0])

  row: dict[str, Any] = {"batch": b, "unet_batch": bb, "latent_hwc": list(latent),
                         "ours_lower_s": ours.lower_s, "ours_compile_s": ours.compile_s,
                         "warmup_s": warm, "run_s": times, "max_abs_diff_vs_ours": agree,
                         "ours_finite": bool(np.isfinite(first["ours"]).all()), "notes": notes}
  for name, ts in times.items():
    for k, v in _stats(ts, b).items():
      row[f"{name}_{k}"] = v
  for name in sides:
    row[f"ratio_vs_{name}"] = row["ours_img_per_s"] / row[f"{name}_img_per_s"]
    row[f"best_ratio_vs_{name}"] = row["ours_best_img_per_s"] / row[f"{name}_best_img_per_s"]

  if args.unet_repeats:
    u = _time_our_unet(pipe, bb, latent, args.unet_repeats, args.seed)
    row["ours_unet_step_s"], row["ours_unet_compile_s"] = u["median_s"], u["compile_s"]
    row["ours_unet_step_times"] = u["times"]
    for name, side in sides.items():
      tu = side.time_unet(bb, latent, args.unet_repeats, args.seed)
      row[f"{name}_unet_step_s"] = tu["median_s"]
      row[f"{name}_unet_step_times"] = tu["times"]
      row[f"{name}_unet_warmup_s"] = tu["warmup_s"]
      row[f"unet_ratio_vs_{name}"] = tu["median_s"] / u["median_s"]

  # FLOP rates (ours), from the median timed generation and UNet call.
  fu, fv, ft = flops["unet_per_step"], flops["vae_decode"], flops["text_encoder"]
  gen_s = row["ours_median_s"]
  rates: dict[str, float] = {}
  if fu:
    rates["gen_unet_tflops"] = fu * args.steps / gen_s / 1e12
    if fv and ft:
      rates["pipeline_tflops"] = (fu * args.steps + fv + ft) / gen_s / 1e12
    if "ours_unet_step_s" in row:
      rates["unet_tflops"] = fu / row["ours_unet_step_s"] / 1e12
  row["ours_achieved_tflops"] = rates
  if peak:
    row["ours_mfu"] = {k.replace("_tflops", ""): v / peak for k, v in rates.items()}
  return row


def _machine(kind: str, torch: Any) -> dict[str, Any]:
  info: dict[str, Any] = {"jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
                          "jax_device_kind": jax.devices()[0].device_kind, "device": kind,
                          "cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}
  try:
    info["load_average"] = [round(v, 2) for v in os.getloadavg()]
  except (AttributeError, OSError):
    pass
  if torch is not None:
    import diffusers  # pylint: disable=import-outside-toplevel
    info.update(torch=torch.__version__, diffusers=diffusers.__version__,
                torch_threads=torch.get_num_threads())
    if kind == "gpu":
      info["torch_cuda_device"] = torch.cuda.get_device_name(0)
  return info


def _print_table(rows: list[dict[str, Any]], peers: list[str], peak: float | None) -> None:
  print("img/s = all timed runs; ratio = ours / peer (> 1: ours faster); ratio(best) = "
        "fastest run of each side; UNet ms = one call on the guidance batch")
  head = f"{'batch':>5} {'ours img/s':>11}"
  for p in peers:
    head += f" {p + ' img/s':>19} {'ratio':>6} {'(best)':>7}"
  head += f" {'ours UNet ms':>13}"
  for p in peers:
    head += f" {p + ' UNet ms':>19} {'ratio':>6}"
  print(head)
  for r in rows:
    line = f"{r['batch']:>5} {r['ours_img_per_s']:>11.3f}"
    for p in peers:
      if f"{p}_img_per_s" in r:
        line += (f" {r[f'{p}_img_per_s']:>19.3f} {r[f'ratio_vs_{p}']:>5.2f}x"
                 f" {r[f'best_ratio_vs_{p}']:>6.2f}x")
      else:
        line += f" {'-':>19} {'-':>6} {'-':>7}"
    line += f" {r['ours_unet_step_s'] * 1e3:>13.1f}" if "ours_unet_step_s" in r else \
        f" {'-':>13}"
    for p in peers:
      if f"{p}_unet_step_s" in r:
        line += f" {r[f'{p}_unet_step_s'] * 1e3:>19.1f} {r[f'unet_ratio_vs_{p}']:>5.2f}x"
      else:
        line += f" {'-':>19} {'-':>6}"
    print(line)
  print("ours, achieved TFLOP/s (MFU at --peak-tflops" +
        (f"={peak:g})" if peak else ": not given, so no MFU)") +
        "; compile = AOT lower + compile of the whole sampler; first = first warm-up run")
  for r in rows:
    parts = []
    for k, v in r["ours_achieved_tflops"].items():
      mfu = r.get("ours_mfu", {}).get(k.replace("_tflops", ""))
      parts.append(f"{k.replace('_tflops', '')} {v:.3g}" + (f" ({mfu:.1%})" if mfu else ""))
    compile_s = r["ours_lower_s"] + r["ours_compile_s"]
    print(f"  batch {r['batch']}: " + ", ".join(parts) +
          f" | compile {compile_s:.1f}s, first {r['warmup_s']['ours'][0]:.2f}s" +
          "".join(f" | {p} first {r['warmup_s'][p][0]:.2f}s" for p in peers
                  if p in r["warmup_s"]) +
          "".join(f" | max|ours-{p}| {d:.2g}" for p, d in r["max_abs_diff_vs_ours"].items()))


def main(argv: Sequence[str] | None = None) -> None:
  args = _parse_args(argv)
  kind = _resolve_device(args.device)
  jdev = _jax_device(kind)
  on_gpu = kind == "gpu"
  dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
  tdtype_name = (args.torch_dtype if args.torch_dtype != "auto"
                 else ("float16" if on_gpu else "float32"))
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  peak = args.peak_tflops
  if peak is None and on_gpu and dtype_name == "bfloat16" and any(
      k in jdev.device_kind for k in ("H100", "H200")):
    peak = H100_BF16_DENSE_TFLOPS

  torch = None
  if not args.skip_torch:
    torch, _, _ = _import_torch_stack()
    if on_gpu and not torch.cuda.is_available():
      raise SystemExit(f"--device=gpu but torch {torch.__version__} sees no CUDA device; "
                       "install a CUDA build of torch, pass --device=cpu or --skip-torch.")
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)

  tmp = None
  if args.model_dir:
    root = Path(args.model_dir).expanduser()
  else:
    tmp = tempfile.TemporaryDirectory(prefix=f"sd_throughput_{args.config}_")
    root = Path(tmp.name)
  try:
    with jax.default_device(jdev):
      _run(args, root, kind, dtype, dtype_name, tdtype_name, peak, torch)
  finally:
    if tmp is not None:
      tmp.cleanup()


def _run(args: argparse.Namespace, root: Path, kind: str, dtype: Any, dtype_name: str,
         tdtype_name: str, peak: float | None, torch: Any) -> None:
  t0 = time.perf_counter()
  if (root / "model_index.json").is_file():
    summary = _dir_summary(root)
    print(f"reusing the pipeline in {root} ({summary})")
    want = list(ARCHS[args.config]["unet"]["block_out_channels"])
    if summary["unet_block_out_channels"] != want:
      print(f"  note: its UNet has block_out_channels {summary['unet_block_out_channels']}, "
            f"not --config={args.config}'s {want}: the directory's architecture is timed")
    build_s = 0.0
  else:
    print(f"building a random-weight {args.config} pipeline in {root} ...", flush=True)
    build_model_dir(args.config, root, args.seed)
    build_s = time.perf_counter() - t0
  t1 = time.perf_counter()
  pipe = diffusion.load_pipeline(root, dtype=dtype)
  load_s = time.perf_counter() - t1
  settings = diffusion.SampleSettings(sampler=args.sampler, steps=args.steps,
                                      guidance_scale=args.guidance, height=args.height,
                                      width=args.width)
  latent = pipe.latent_shape(settings)  # checks the VAE factor
  factor = pipe.vae_scale * 2 ** pipe.unet_config.num_upsamplers
  if args.height % factor or args.width % factor:
    raise SystemExit(f"--height/--width {args.height}x{args.width}: this model needs multiples "
                     f"of {factor} (VAE x{pipe.vae_scale} times the UNet's "
                     f"{2 ** pipe.unet_config.num_upsamplers} for its downsamplers)")
  sides: dict[str, _TorchSide] = {}
  torch_load_s = 0.0
  if torch is not None:
    t2 = time.perf_counter()
    torch, sides = _torch_sides(root, args, tdtype_name, kind)
    torch_load_s = time.perf_counter() - t2

  machine = _machine(kind, torch)
  n_params = {k: int(sum(np.prod(a.shape) for a in jax.tree.leaves(v)))
              for k, v in pipe.params.items()}
  print(f"jax {machine['jax']} {machine['jax_devices']}" +
        (f" | torch {machine['torch']} threads={machine['torch_threads']}, diffusers "
         f"{machine['diffusers']}" if torch is not None else " | torch: skipped") +
        f" | device={kind} ({machine['jax_device_kind']}) | load average "
        f"{machine.get('load_average')}")
  print(f"{args.config}: params " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in n_params.items())
        + f" | {args.height}x{args.width} (latent {latent[0]}x{latent[1]}), {args.sampler} "
        f"x{args.steps} steps, guidance {args.guidance} | ours {dtype_name}, diffusers "
        f"{tdtype_name} | build {build_s:.0f}s, load ours {load_s:.0f}s, diffusers "
        f"{torch_load_s:.0f}s")

  rows = []
  flops_all = {}
  for b in args.batch_sizes:
    flops = _flop_counts(pipe, b, args.guidance > 1.0, latent)
    flops_all[b] = flops
    print(f"  [batch {b}] XLA FLOPs: UNet/step {flops['unet_per_step'] or 0:.4g}, "
          f"VAE decode {flops['vae_decode'] or 0:.4g}, text encoder "
          f"{flops['text_encoder'] or 0:.4g}", flush=True)
    row = _bench_batch(b, pipe, settings, sides, args, flops, peak)
    row["flops"] = flops
    if "load_average" in machine:
      row["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    rows.append(row)
    for name, note in row["notes"].items():
      print(f"  [batch {b}] {name}: {note}")

  peers = [p for p in ("torch", "torch_compile") if any(f"{p}_img_per_s" in r for r in rows)]
  _print_table(rows, peers, peak)

  if args.json:
    config = {k: v for k, v in vars(args).items() if k != "batch"}
    config.update(dtype=dtype_name, torch_dtype=tdtype_name, peak_tflops=peak,
                  model=_dir_summary(root), params=n_params,
                  flops_source="XLA cost_analysis of the lowered (unoptimised) HLO, XLA "
                  "attention forced; conv taps in the padding not counted")
    path = sio.atomic_write_json(args.json, {"machine": machine, "config": config,
                                             "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
