"""A tiny random-weight Stable Diffusion pipeline in the diffusers layout, built locally.

Used by the pipeline and generation-stage tests: diffusers (PyTorch) builds and saves it, our
Flax loader reads it back, and diffusers' own StableDiffusionPipeline is the reference. The
tokenizer is CLIP's real BPE vocabulary (offline asset), so prompts tokenize as in SD.
"""
from __future__ import annotations

from pathlib import Path

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                 clip_sample=False, prediction_type="epsilon", timestep_spacing="leading")


def build(root: str | Path, *, seed: int = 0, sample_size: int = 8,
          scale: float = 0.05) -> Path:
  """Saves a tiny SD pipeline (random, perturbed weights) under `root`; returns it."""
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from synthbandit_jax.models import clip_text  # pylint: disable=import-outside-toplevel

  root = Path(root)
  torch.manual_seed(seed)
  tok_dir = root / "tokenizer"
  clip_text.write_tokenizer_files(tok_dir)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id))
  unet = diffusers.UNet2DConditionModel(
      sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=8, norm_num_groups=8)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2)
  with torch.no_grad():
    for model in (text_encoder, unet, vae):
      for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
      unet=unet.eval(), scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(root)
  return root


def reference_pipeline(root: str | Path, scheduler: str = "dpmpp_2m"):
  """diffusers' StableDiffusionPipeline on the saved directory, with the given sampler."""
  import diffusers  # pylint: disable=import-outside-toplevel
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      str(root), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  cls = {"dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "ddim": diffusers.DDIMScheduler,
         "euler": diffusers.EulerDiscreteScheduler}[scheduler]
  pipe.scheduler = cls.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  return pipe
