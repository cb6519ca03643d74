"""The offline generator trainer: it learns, saves a loadable SD pipeline, resumes exactly.

A tiny config (8x8 images, 4x4x4 latents, 8/16-channel UNet, 1-layer 16-wide text encoder)
trains on 8 synthetic two-class images, so every step sees the same fixed batch. Checks:

* learning: the deterministic probe losses (VAE reconstruction L1 on the fixed batch; the
  epsilon loss on fixed latents, timesteps and noise) after training vs. before it (measured
  here by a helper session: VAE 0.995 -> 0.16, UNet 1.32 -> 0.44 in the 100 + 150 steps below);
* the saved directory loads with `diffusion.load_pipeline` and `Pipeline.generate` makes
  images of the right shape; diffusers' StableDiffusionPipeline loads it too and makes the
  same images from the same latents (float32, max abs error < 1e-4 on [0, 1] images);
* resume: a run stopped twice (mid-VAE, mid-UNet) and rerun gives exactly the params of one
  uninterrupted run, the `trained` one (bitwise equal; every random draw is a function of
  (seed, phase, step));
* a finished directory is not retrained; a changed config is refused naming the field, both
  for a finished directory and for a checkpoint.
Skips when CLIP's BPE vocabulary (offline asset) is unavailable.

Cost: almost all of it is XLA compilation (the VAE and UNet training steps, ~1 min on 2 CPU
cores, shared by every config of this architecture; the sampler, ~15 s per SampleSettings),
not steps (~10 ms each). So one trained directory, loaded once (`loaded`), serves every test,
and the two sampling tests use the same settings and batch shape.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from synthbandit_jax import assets
from synthbandit_jax.generation import diffusion, train_generator as tg
from synthbandit_jax.models import clip_text

CLASSES = ["zero", "one"]
PROMPTS = {"zero": ["a photo of a zero, thick strokes", "a photo of a zero, thin"],
           "one": ["a photo of a one, slanted", "a photo of a one"]}
TINY = tg.GeneratorConfig(
    image_size=8, vae_block_out_channels=(8, 8), vae_norm_num_groups=4,
    vae_steps=100, vae_batch_size=8, vae_learning_rate=1e-2,
    unet_block_out_channels=(8, 16), unet_down_block_types=("DownBlock2D",
                                                            "CrossAttnDownBlock2D"),
    unet_up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), unet_attention_heads=(1, 2),
    unet_norm_num_groups=4, text_hidden_size=16, text_num_layers=1, text_num_heads=2,
    text_intermediate_size=32, unet_steps=150, unet_batch_size=8, unet_learning_rate=1e-2,
    warmup_steps=2, checkpoint_every=50, ema_decay=0.9)
# Input-validation tests that never train.
SHORT = dataclasses.replace(TINY, vae_steps=5, unet_steps=7, checkpoint_every=3)
# One sampler compilation for both sampling tests: the same settings, 3 prompts.
SETTINGS = diffusion.SampleSettings(sampler="ddim", steps=3, guidance_scale=3.0)


@pytest.fixture(name="bpe", scope="module")
def _bpe():
  try:
    return assets.fetch("clip_bpe_vocab")
  except assets.AssetError as e:
    pytest.skip(f"CLIP BPE asset unavailable: {e}")


def _data():
  """8 RGB 8x8 images: a horizontal bar ("zero") or a vertical bar ("one"), shifted."""
  images = np.zeros((8, 8, 8, 3), np.uint8)
  labels = np.arange(8) % 2
  for i in range(8):
    k = 1 + i // 2
    if labels[i] == 0:
      images[i, k:k + 2, 1:7] = 255
    else:
      images[i, 1:7, k:k + 2] = 255
  return images, labels


def _train(out, config, bpe, **kw):
  images, labels = _data()
  return tg.train_generator(images, labels, CLASSES, PROMPTS, out, config, progress=False,
                            bpe_path=bpe, **kw)


def _params_equal(a, b) -> bool:
  same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
  return all(jax.tree.leaves(same))


@pytest.fixture(name="trained", scope="module")
def _trained(bpe, tmp_path_factory):
  out = tmp_path_factory.mktemp("gen") / "generator"
  return out, _train(out, TINY, bpe)


@pytest.fixture(name="loaded", scope="module")
def _loaded(trained):
  """The trained directory through `diffusion.load_pipeline` (one Pipeline: its compiled
  sampler is shared)."""
  return diffusion.load_pipeline(trained[0])


def test_training_lowers_the_probe_losses(trained):
  _, s = trained
  print({k: v for k, v in s.items() if k.startswith("probe_")})
  assert s["complete"] and not s["skipped"]
  assert s["vae_steps"] == TINY.vae_steps and s["unet_steps"] == TINY.unet_steps
  assert s["probe_vae_final"] < 0.35 * s["probe_vae_initial"]
  assert s["probe_unet_final"] < 0.6 * s["probe_unet_initial"]
  assert np.isfinite(s["scaling_factor"]) and s["scaling_factor"] > 0
  assert len(s["vae_losses"]) == TINY.vae_steps and len(s["unet_losses"]) == TINY.unet_steps


def test_saved_pipeline_loads_and_generates(trained, loaded):
  out, s = trained
  assert not (out.parent / (out.name + "_work")).exists()  # the work dir is cleaned up
  pipe = loaded
  assert pipe.vae_config.scaling_factor == pytest.approx(s["scaling_factor"], rel=1e-12)
  assert pipe.unet_config == TINY.unet_config()
  settings = SETTINGS
  assert pipe.latent_shape(settings) == (4, 4, 4)
  noise = diffusion.image_noise(0, ["a", "b", "c"], pipe.latent_shape(settings))
  images = pipe.generate(["a photo of a zero", "a photo of a one", ""], noise,
                         settings=settings)
  assert images.shape == (3, 8, 8, 3) and np.isfinite(images).all()
  assert float(images.std()) > 1e-3


def test_saved_pipeline_matches_diffusers(trained, loaded):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  out, _ = trained
  ref = diffusers.StableDiffusionPipeline.from_pretrained(
      str(out), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  ref.set_progress_bar_config(disable=True)
  pipe = loaded
  settings = SETTINGS
  noise = diffusion.image_noise(1, ["a", "b", "c"], pipe.latent_shape(settings))
  prompts = ["a photo of a zero", "a photo of a one, slanted", ""]
  ours = np.clip(pipe.generate(prompts, noise, settings=settings) / 2 + 0.5, 0, 1)
  with torch.no_grad():
    theirs = ref(prompt=prompts, num_inference_steps=3, guidance_scale=3.0, height=8, width=8,
                 latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
                 output_type="np").images
  err = float(np.abs(ours - theirs).max())
  print(f"ours vs diffusers: max abs err {err:.2e}")
  assert err < 1e-4


def test_finished_dir_is_not_retrained_and_other_config_is_refused(trained, bpe):
  out, s = trained
  again = _train(out, TINY, bpe)
  assert again["skipped"] and again["unet_losses"] == s["unet_losses"]
  # checkpoint_every does not change the model: still a finished directory.
  assert _train(out, dataclasses.replace(TINY, checkpoint_every=99), bpe)["skipped"]
  with pytest.raises(ValueError, match=r"unet_steps: 150 -> 151"):
    _train(out, dataclasses.replace(TINY, unet_steps=151), bpe)
  images, labels = _data()
  with pytest.raises(ValueError, match="other data"):
    tg.train_generator(images, 1 - labels, CLASSES, PROMPTS, out, TINY, progress=False,
                       bpe_path=bpe)


def test_interrupted_run_resumes_to_the_same_params(trained, loaded, bpe, tmp_path):
  """TINY stopped at steps 2 and vae_steps + 3 (off its checkpoint_every=50 grid, so the
  resumes start from the stop checkpoints) against the uninterrupted `trained` run."""
  _, whole = trained
  out = tmp_path / "parts"
  first = _train(out, TINY, bpe, max_steps=2)  # inside the VAE phase
  assert not first["complete"] and first["vae_steps"] == 2 and not out.exists()
  with pytest.raises(ValueError, match=r"vae_kl_weight"):
    _train(out, dataclasses.replace(TINY, vae_kl_weight=0.5), bpe)
  second = _train(out, TINY, bpe, max_steps=TINY.vae_steps + 3)  # inside the UNet phase
  assert not second["complete"] and second["resumed_from_step"] == 2
  assert second["unet_steps"] == 3
  third = _train(out, TINY, bpe)
  assert third["complete"] and third["resumed_from_step"] == TINY.vae_steps + 3
  assert third["vae_losses"] == whole["vae_losses"]
  assert third["unet_losses"] == whole["unet_losses"]
  a, b = loaded, diffusion.load_pipeline(out)
  assert _params_equal(a.params, b.params)
  assert a.vae_config.scaling_factor == b.vae_config.scaling_factor


def test_config_dict_round_trip_and_errors():
  d = tg.config_defaults()
  assert d["seed"] == -1
  cfg = tg.config_from_dict(d, seed=7)
  assert cfg.seed == 7 and dataclasses.replace(cfg, seed=0) == tg.GeneratorConfig()
  assert tg.config_from_dict({"seed": 3}, seed=7).seed == 3
  assert tg.config_from_dict({"unet_block_out_channels": [32, 64, 64]}) == tg.GeneratorConfig()
  with pytest.raises(ValueError, match="unknown key.*unet_channels"):
    tg.config_from_dict({"unet_channels": (8,)})
  with pytest.raises(ValueError, match="image_size=36"):
    tg.GeneratorConfig(image_size=36)
  with pytest.raises(ValueError, match="cfg_drop"):
    tg.GeneratorConfig(cfg_drop=1.0)
  with pytest.raises(ValueError, match="attention heads"):
    tg.GeneratorConfig(unet_attention_heads=(3, 8, 8))


def test_missing_prompts_name_the_class(bpe, tmp_path):
  images, labels = _data()
  with pytest.raises(ValueError, match=r"\['one'\]"):
    tg.train_generator(images, labels, CLASSES, {"zero": PROMPTS["zero"]}, tmp_path / "g",
                       SHORT, progress=False, bpe_path=bpe)


def test_prepare_images_resize_and_pad():
  gray = np.zeros((2, 28, 28, 1), np.uint8)
  gray[:, 10:18, 10:18] = 200
  r = tg.prepare_images(gray, 32, "resize")
  p = tg.prepare_images(gray, 32, "pad")
  assert r.shape == p.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(p[:, 2:30, 2:30, 0], gray[..., 0])
  np.testing.assert_array_equal(p[..., 0], p[..., 2])
  assert r[0, 16, 16, 1] == 200 and r[0, 0, 0, 0] == 0
  with pytest.raises(ValueError, match="larger than image_size"):
    tg.prepare_images(gray, 16, "pad")


def test_host_optimizer_init_equals_optax_init():
  params = {"a": np.ones((3, 2), np.float32), "b": {"c": np.zeros((4,), np.float32)}}
  for wd, clip in ((0.0, 0.0), (1e-4, 1.0)):
    tx = tg._optimizer(wd, clip)  # pylint: disable=protected-access
    ours, ref = tg.opt_init(tx, params), tx.init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      assert a.dtype == b.dtype and np.array_equal(a, b)


def test_ravel_matches_jax_ravel_pytree():
  from jax.flatten_util import ravel_pytree  # pylint: disable=import-outside-toplevel
  tree = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": {"z": np.ones(2, np.float32),
                                                                   "y": np.full((1,), 7.0, np.float32)}}
  flat = tg.ravel(tree)
  np.testing.assert_array_equal(flat, np.asarray(ravel_pytree(tree)[0]))
  assert _params_equal(tg.unravel(flat, tree), tree)


def test_tokenizer_vocab_matches_config(bpe, tmp_path):
  tok = clip_text.load_tokenizer(clip_text.write_tokenizer_files(tmp_path / "tok", bpe))
  assert len(tok) == tg.GeneratorConfig().text_vocab_size
