"""Stable Diffusion in Flax: load a diffusers directory, sample images with guidance.

`load_pipeline(path_or_repo_id)` reads the standard diffusers layout

    model_index.json
    text_encoder/{config.json, model.safetensors | pytorch_model.bin}
    tokenizer/{vocab.json, merges.txt, tokenizer_config.json, ...}
    unet/{config.json, diffusion_pytorch_model.safetensors | .bin}
    vae/{config.json, diffusion_pytorch_model.safetensors | .bin}
    scheduler/scheduler_config.json

from a local directory or from the user's Hugging Face hub cache (``org/name`` is looked up
under ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``; nothing is
downloaded) into our own Flax modules (models/clip_text.py, unet.py, vae.py) and samplers
(generation/schedulers.py). A missing component names the missing file; a weight that does
not fit names the parameter and both shapes.

`Pipeline.sample(ids, uncond_ids, noise)` is one jitted call per batch shape: text encoding,
the whole denoising loop (`lax.fori_loop` over the sampler's steps, classifier-free guidance
on a doubled batch), and VAE decoding. Inputs may be sharded over a device mesh along the
batch; params are replicated. The sampler state is float32 whatever the model dtype.

Classifier-free guidance as diffusers does it: eps = eps_u + g * (eps_c - eps_u); with
g <= 1 the unconditional pass is skipped (eps = eps_c).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax import io as sio
from synthbandit_jax import xla_options
from synthbandit_jax.generation import schedulers
from synthbandit_jax.models import clip_text, unet as unet_lib, vae as vae_lib
from synthbandit_jax.weights import state_dict as sdict

PyTree = Any

COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
_HOW_TO = ("a diffusers-format directory is what StableDiffusionPipeline.save_pretrained "
           "writes; on a machine with internet: python -c \"from huggingface_hub import "
           "snapshot_download; print(snapshot_download('stable-diffusion-v1-5/"
           "stable-diffusion-v1-5', allow_patterns=['*.json', '*.txt', '*.safetensors']))\" "
           "and copy the printed directory (or the hub cache) to this machine")


def hub_cache_dirs() -> list[Path]:
  """Where a Hugging Face hub cache may live, in huggingface_hub's order of precedence."""
  out = []
  if os.environ.get("HF_HUB_CACHE"):
    out.append(Path(os.environ["HF_HUB_CACHE"]))
  if os.environ.get("HF_HOME"):
    out.append(Path(os.environ["HF_HOME"]) / "hub")
  out.append(Path.home() / ".cache" / "huggingface" / "hub")
  return out


def resolve_model_dir(model: str | os.PathLike, revision: str = "main") -> Path:
  """A local diffusers directory, or the snapshot of ``org/name`` in the local hub cache."""
  p = Path(model).expanduser()
  if p.is_dir():
    return p
  text = str(model)
  if text.count("/") == 1 and not text.startswith((".", "/", "~")):
    looked = []
    for cache in hub_cache_dirs():
      repo = cache / ("models--" + text.replace("/", "--"))
      looked.append(str(repo))
      ref = repo / "refs" / revision
      snap = repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)
      if snap.is_dir():
        return snap
      snaps = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
      if len(snaps) == 1 and not ref.is_file():
        return snaps[0]
    raise FileNotFoundError(
        f"model {text!r} is neither a directory nor in a local hub cache (looked in "
        f"{looked}); {_HOW_TO}")
  raise FileNotFoundError(f"model directory {p} does not exist; {_HOW_TO}")


def check_layout(root: Path) -> dict:
  """Validates a diffusers pipeline directory; returns model_index.json (or {})."""
  index = {}
  if (root / "model_index.json").is_file():
    try:
      index = json.loads((root / "model_index.json").read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{root / 'model_index.json'} is not valid JSON ({e})") from e
  problems = []
  for comp, needed in (("text_encoder", "config.json"), ("unet", "config.json"),
                       ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
    if not (root / comp / needed).is_file():
      problems.append(str(root / comp / needed))
  tok = root / "tokenizer"
  if not (tok / "tokenizer.json").is_file() and not (
      (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()):
    problems.append(f"{tok}/vocab.json + merges.txt (or tokenizer.json)")
  if problems:
    raise FileNotFoundError(f"{root} is not a complete Stable Diffusion pipeline: missing "
                            f"{', '.join(problems)}; {_HOW_TO}")
  return index


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """What one jitted sampling function is specialised on (all static)."""
  sampler: str = "dpmpp_2m"
  steps: int = 25
  guidance_scale: float = 7.5
  height: int = 0  # 0 = the UNet's sample_size * VAE downscale
  width: int = 0
  clip_skip: int = 0


@dataclasses.dataclass
class Pipeline:
  """Modules (with their compute dtype), params (float32) and configs of one SD checkpoint."""
  text_encoder: Any
  unet: Any
  vae: Any
  tokenizer: Any
  params: dict  # {"text_encoder", "unet", "vae"}
  unet_config: Any
  vae_config: Any
  scheduler_config: Any
  name: str = "sd"
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def vae_scale(self) -> int:
    return 2 ** (len(self.vae_config.block_out_channels) - 1)

  @property
  def latent_channels(self) -> int:
    return int(self.unet_config.in_channels)

  def image_size(self, s: SampleSettings) -> tuple[int, int]:
    default = int(self.unet_config.sample_size) * self.vae_scale
    h, w = (s.height or default), (s.width or default)
    if h % self.vae_scale or w % self.vae_scale:
      raise ValueError(f"height/width {h}x{w} must be multiples of {self.vae_scale} (the VAE "
                       "downscale factor)")
    return h, w

  def latent_shape(self, s: SampleSettings) -> tuple[int, int, int]:
    h, w = self.image_size(s)
    return h // self.vae_scale, w // self.vae_scale, self.latent_channels

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    return clip_text.tokenize(self.tokenizer, list(prompts))

  def with_dtype(self, dtype: Any) -> "Pipeline":
    """The same pipeline computing in `dtype` (params untouched)."""
    return dataclasses.replace(
        self, text_encoder=self.text_encoder.clone(dtype=dtype),
        unet=self.unet.clone(dtype=dtype), vae=self.vae.clone(dtype=dtype), _compiled={})

  def sample_fn(self, s: SampleSettings):
    """The jitted ``(params, ids, uncond_ids, noise) -> images in [-1, 1] (float32)``."""
    if s not in self._compiled:
      self._compiled[s] = xla_options.jit(self._build_sample(s))
    return self._compiled[s]

  def _build_sample(self, s: SampleSettings):
    plan = schedulers.make_plan(s.sampler, self.scheduler_config, s.steps)
    guided = s.guidance_scale > 1.0
    te, un, va = self.text_encoder, self.unet, self.vae
    g = jnp.float32(s.guidance_scale)

    def sample(params, ids, uncond_ids, noise):
      # Params stay float32 in the Pipeline; the UNet's copy in the compute dtype is made
      # once per call here, not re-cast inside every denoising step.
      unet_params = jax.tree.map(
          lambda a: a.astype(un.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
          params["unet"])
      enc = lambda x: te.apply({"params": params["text_encoder"]}, x, clip_skip=s.clip_skip)[0]
      ctx = enc(ids)
      if guided:
        ctx = jnp.concatenate([enc(uncond_ids), ctx], axis=0)

      def model_fn(x, t):
        xin = jnp.concatenate([x, x], axis=0) if guided else x
        out = un.apply({"params": unet_params}, xin.astype(un.dtype), t, ctx)
        out = out.astype(jnp.float32)
        if guided:
          eps_u, eps_c = jnp.split(out, 2, axis=0)
          out = eps_u + g * (eps_c - eps_u)
        return out

      x_t = noise.astype(jnp.float32) * plan.init_noise_sigma
      latents = schedulers.sample_loop(plan, model_fn, x_t)
      images = vae_lib.decode_latents(va, params["vae"], latents)
      return images.astype(jnp.float32)

    return sample

  def generate(self, prompts: Sequence[str], noise: np.ndarray | jax.Array,
               negative_prompts: Sequence[str] | None = None,
               settings: SampleSettings = SampleSettings()) -> np.ndarray:
    """Images (float32 in [-1, 1], NHWC) for `prompts` from the given initial `noise`."""
    neg = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if len(neg) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(neg)} negative prompts")
    fn = self.sample_fn(settings)
    return np.asarray(fn(self.params, jnp.asarray(self.tokenize(prompts)),
                         jnp.asarray(self.tokenize(neg)), noise))


def image_noise(seed: int, ids: Sequence[str], shape: tuple[int, ...]) -> np.ndarray:
  """Initial latent noise per image from (global seed, image id), on the CPU backend.

  The key is ``fold_in(key(seed), crc32(id))``, so an image's noise does not depend on its
  batch, the number of devices, the machine, or where a run was resumed.
  """
  cpu = jax.local_devices(backend="cpu")[0]  # this process's (multi-host: not process 0's)
  with jax.default_device(cpu):
    base = jax.random.key(int(seed) & 0xFFFFFFFF)
    folds = jnp.asarray([zlib.crc32(str(i).encode("utf-8")) for i in ids], jnp.uint32)
    keys = jax.vmap(lambda f: jax.random.fold_in(base, f))(folds)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
  return np.asarray(noise)


def load_pipeline(model: str | os.PathLike, *, dtype: Any = jnp.float32,
                  attention_impl: str | None = None, revision: str = "main") -> Pipeline:
  """Loads a diffusers-format SD 1.x / 2.x pipeline directory into our Flax modules."""
  root = resolve_model_dir(model, revision)
  check_layout(root)
  te, te_params = clip_text.load(root / "text_encoder", dtype=dtype)
  un, un_params, un_cfg = unet_lib.load(root / "unet", dtype=dtype)
  va, va_params, va_cfg = vae_lib.load(root / "vae", dtype=dtype)
  if attention_impl is not None:
    te, un = te.clone(attention_impl=attention_impl), un.clone(attention_impl=attention_impl)
  tok = clip_text.load_tokenizer(root / "tokenizer")
  cfg_file = root / "scheduler" / "scheduler_config.json"
  try:
    sched_cfg = schedulers.config_from_diffusers(json.loads(cfg_file.read_text()))
  except (json.JSONDecodeError, ValueError) as e:
    raise ValueError(f"{cfg_file}: {e}") from e
  te_dim = te.config.hidden_size
  if un_cfg.cross_attention_dim != te_dim:
    raise ValueError(f"{root}: unet cross_attention_dim {un_cfg.cross_attention_dim} != "
                     f"text_encoder hidden_size {te_dim}; the components do not belong together")
  if un_cfg.in_channels != va_cfg.latent_channels:
    raise ValueError(f"{root}: unet in_channels {un_cfg.in_channels} != vae latent_channels "
                     f"{va_cfg.latent_channels}")
  params = {"text_encoder": te_params, "unet": un_params, "vae": va_params}
  params = jax.tree.map(jnp.asarray, params)
  return Pipeline(te, un, va, tok, params, un_cfg, va_cfg, sched_cfg, name=root.name)


# ------------------------------------------------------------------------------- saving

DIFFUSERS_VERSION = "0.42.1"  # the format version written into the config files


def _plain(value: Any) -> Any:
  if isinstance(value, tuple):
    return [_plain(v) for v in value]
  return value


def unet_diffusers_config(cfg: Any) -> dict:
  """diffusers UNet2DConditionModel config.json for our UNetConfig."""
  out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION}
  for f in dataclasses.fields(cfg):
    out[f.name] = _plain(getattr(cfg, f.name))
  # diffusers' SD quirk: the head count travels as attention_head_dim.
  out["attention_head_dim"] = out.pop("num_attention_heads")
  out["num_attention_heads"] = None
  return out


def vae_diffusers_config(cfg: Any) -> dict:
  """diffusers AutoencoderKL config.json for our VAEConfig."""
  out = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
         "act_fn": "silu"}
  for f in dataclasses.fields(cfg):
    out[f.name] = _plain(getattr(cfg, f.name))
  return out


def text_encoder_hf_config(cfg: Any, bos_token_id: int | None = None) -> dict:
  """transformers CLIPTextModel config.json for our CLIPTextConfig."""
  out = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
         "torch_dtype": "float32"}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if value is not None:
      out[f.name] = _plain(value)
  if bos_token_id is not None:
    out["bos_token_id"] = int(bos_token_id)
  return out


def scheduler_diffusers_config(cfg: Any, class_name: str = "DDIMScheduler") -> dict:
  """scheduler_config.json for our SchedulerConfig (readable by every sampler here)."""
  out = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if value is not None:
      out[f.name] = _plain(value)
  return out


def save_pipeline(pipeline: Pipeline, directory: str | os.PathLike, *,
                  scheduler_class: str = "DDIMScheduler") -> Path:
  """Writes `pipeline` as a diffusers-format directory (safetensors weights, no torch).

  The result loads with `load_pipeline` and with diffusers' StableDiffusionPipeline. The
  directory appears whole or not at all: everything is written into a temporary sibling that
  is renamed at the end (an existing `directory` is replaced).
  """
  directory = Path(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    host = jax.device_get(pipeline.params)
    te_cfg = pipeline.text_encoder.config
    parts = {
        "text_encoder": ("model.safetensors", text_encoder_hf_config(
            te_cfg, getattr(pipeline.tokenizer, "bos_token_id", None)),
                         clip_text.state_dict_from_params(te_cfg, host["text_encoder"])),
        "unet": ("diffusion_pytorch_model.safetensors",
                 unet_diffusers_config(pipeline.unet_config),
                 unet_lib.state_dict_from_params(pipeline.unet_config, host["unet"])),
        "vae": ("diffusion_pytorch_model.safetensors",
                vae_diffusers_config(pipeline.vae_config),
                vae_lib.state_dict_from_params(pipeline.vae_config, host["vae"])),
    }
    for comp, (fname, cfg, tensors) in parts.items():
      sio.atomic_write_json(tmp / comp / "config.json", cfg)
      sdict.write_safetensors(tmp / comp / fname, tensors)
    sio.atomic_write_json(tmp / "scheduler" / "scheduler_config.json",
                          scheduler_diffusers_config(pipeline.scheduler_config,
                                                     scheduler_class))
    pipeline.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    sio.atomic_write_json(tmp / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler_class], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False})
    if directory.exists():
      old = directory.with_name(f".{directory.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory
