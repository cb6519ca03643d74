"""The Flax Stable Diffusion pipeline against diffusers' StableDiffusionPipeline (PyTorch).

A tiny random-weight pipeline (tests/sd_tiny.py) is saved in the diffusers layout; our loader
reads it and, from the same initial latents, must produce the same images as diffusers for
each sampler. Tolerance: max |ours - diffusers| < 1e-4 on images in [0, 1] (float32; measured
1e-6 to 4e-6 on this machine; an 8-bit quantisation step is 3.9e-3).

Cost: every distinct SampleSettings is one XLA compilation of the whole sampler (~10-15 s on
2 CPU cores), so the tests share settings where they can: DDIM 3 steps at guidance 7.5 serves
the DDIM parity case, clip_skip's unskipped run and the bf16 test's float32 reference.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from synthbandit_jax import assets  # noqa: E402
from synthbandit_jax.generation import diffusion  # noqa: E402
from synthbandit_jax.weights import state_dict as sdict  # noqa: E402
from tests import sd_tiny  # noqa: E402

PROMPTS = ["a photo of a red car at night", "an oil painting of a seven"]
NEGATIVE = ["blurry", ""]
TOL = 1e-4


@pytest.fixture(name="sd_dir", scope="module")
def _sd_dir(tmp_path_factory):
  try:
    return sd_tiny.build(tmp_path_factory.mktemp("tiny_sd"))
  except assets.AssetError as e:
    pytest.skip(f"CLIP BPE asset unavailable: {e}")


@pytest.fixture(name="pipe", scope="module")
def _pipe(sd_dir):
  return diffusion.load_pipeline(sd_dir)


_REFERENCES: dict = {}


def _reference_pipeline(sd_dir, sampler):
  """diffusers' pipeline for (directory, sampler), loaded once (a call resets the scheduler's
  state in set_timesteps)."""
  key = (str(sd_dir), sampler)
  if key not in _REFERENCES:
    _REFERENCES[key] = sd_tiny.reference_pipeline(sd_dir, sampler)
  return _REFERENCES[key]


def _reference(sd_dir, sampler, noise, steps, guidance, **kw):
  ref = _reference_pipeline(sd_dir, sampler)
  latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    out = ref(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps,
              guidance_scale=guidance, latents=latents, output_type="np", height=16,
              width=16, **kw)
  return out.images


@pytest.mark.parametrize("sampler,steps,guidance", [
    ("dpmpp_2m", 6, 7.5), ("ddim", 3, 7.5), ("euler", 5, 4.0), ("dpmpp_2m", 4, 1.0)])
def test_pipeline_matches_diffusers(sd_dir, pipe, sampler, steps, guidance):
  noise = diffusion.image_noise(0, ["a", "b"], pipe.latent_shape(diffusion.SampleSettings()))
  settings = diffusion.SampleSettings(sampler=sampler, steps=steps, guidance_scale=guidance)
  ours = pipe.generate(PROMPTS, noise, NEGATIVE, settings)
  ours = np.clip(ours / 2 + 0.5, 0, 1)
  ref = _reference(sd_dir, sampler, noise, steps, guidance)
  assert ours.shape == ref.shape == (2, 16, 16, 3)
  err = float(np.abs(ours - ref).max())
  print(f"{sampler} steps={steps} guidance={guidance}: max abs err {err:.2e}")
  assert err < TOL, err
  assert ref.std() > 0.01  # the images are not flat: the comparison means something


def test_clip_skip_matches_diffusers(sd_dir, pipe):
  # diffusers' own clip_skip path reaches for `text_encoder.text_model`, which transformers 5
  # no longer has; the reference embeddings are built the way diffusers defines clip_skip
  # (hidden_states[-(clip_skip + 1)], then the final layer norm) and passed in.
  ref_pipe = _reference_pipeline(sd_dir, "ddim")
  te = ref_pipe.text_encoder

  def embed(texts):
    ids = torch.from_numpy(pipe.tokenize(texts).astype(np.int64))
    with torch.no_grad():
      hidden = te(ids, output_hidden_states=True).hidden_states[-2]
      return te.final_layer_norm(hidden)

  noise = diffusion.image_noise(3, ["a", "b"], pipe.latent_shape(diffusion.SampleSettings()))
  settings = diffusion.SampleSettings(sampler="ddim", steps=3, clip_skip=1)
  ours = np.clip(pipe.generate(PROMPTS, noise, NEGATIVE, settings) / 2 + 0.5, 0, 1)
  with torch.no_grad():
    ref = ref_pipe(prompt_embeds=embed(PROMPTS), negative_prompt_embeds=embed(NEGATIVE),
                   num_inference_steps=3, guidance_scale=7.5, output_type="np", height=16,
                   width=16, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
                   ).images
  assert float(np.abs(ours - ref).max()) < TOL
  plain = np.clip(pipe.generate(PROMPTS, noise, NEGATIVE,
                                diffusion.SampleSettings(sampler="ddim", steps=3)) / 2 + 0.5,
                  0, 1)
  assert float(np.abs(plain - ref).max()) > 10 * TOL  # clip_skip changed the images


def test_noise_depends_only_on_seed_and_id():
  a = diffusion.image_noise(7, ["x", "y", "z"], (4, 4, 4))
  b = diffusion.image_noise(7, ["z", "x"], (4, 4, 4))
  np.testing.assert_array_equal(a[2], b[0])
  np.testing.assert_array_equal(a[0], b[1])
  assert not np.allclose(a[0], a[1])
  # (three ids, as in `a`: one shape, one set of eager compilations)
  assert not np.allclose(a[0], diffusion.image_noise(8, ["x", "y", "z"], (4, 4, 4))[0])
  assert abs(float(a.std()) - 1.0) < 0.3


def test_bf16_pipeline_runs_close_to_fp32(pipe):
  noise = diffusion.image_noise(0, ["a", "b"], pipe.latent_shape(diffusion.SampleSettings()))
  s = diffusion.SampleSettings(sampler="ddim", steps=3)
  full = pipe.generate(PROMPTS, noise, NEGATIVE, s)
  half = pipe.with_dtype(jnp.bfloat16).generate(PROMPTS, noise, NEGATIVE, s)
  assert np.isfinite(half).all()
  # bf16 keeps ~3 significant digits; guidance 7.5 amplifies the difference of two noisy
  # predictions, so compare in relative L2 (measured ~2e-2), not per pixel.
  rel = float(np.linalg.norm(half - full) / np.linalg.norm(full))
  print(f"bf16 vs fp32 relative L2: {rel:.2e}")
  assert rel < 5e-2


def test_missing_component_names_the_file(sd_dir, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  broken = tmp_path / "broken"
  shutil.copytree(sd_dir, broken)
  (broken / "unet" / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"unet/config\.json"):
    diffusion.load_pipeline(broken)
  shutil.rmtree(broken / "unet")
  shutil.copytree(sd_dir / "unet", broken / "unet")
  (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="vae"):
    diffusion.load_pipeline(broken)


def test_shape_mismatch_names_parameter(sd_dir, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  broken = tmp_path / "broken"
  shutil.copytree(sd_dir, broken)
  f = broken / "unet" / "diffusion_pytorch_model.safetensors"
  tensors = sdict.read_safetensors(f)
  tensors["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)
  sdict.write_safetensors(f, tensors)
  with pytest.raises(ValueError, match=r"conv_in\.weight.*\(5, 5, 4, 32\).*\(3, 3, 4, 32\)"):
    diffusion.load_pipeline(broken)


def test_hub_cache_lookup(sd_dir, tmp_path, monkeypatch):
  import shutil  # pylint: disable=import-outside-toplevel
  repo = tmp_path / "hub" / "models--org--tiny-sd"
  shutil.copytree(sd_dir, repo / "snapshots" / "abc123")
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("abc123")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  assert diffusion.resolve_model_dir("org/tiny-sd") == repo / "snapshots" / "abc123"
  with pytest.raises(FileNotFoundError, match=r"org/other.*snapshot_download"):
    diffusion.resolve_model_dir("org/other")


def test_save_pipeline_round_trip(sd_dir, pipe, tmp_path):
  """Our writer: our loader gets identical params and diffusers makes identical images."""
  import jax  # pylint: disable=import-outside-toplevel
  out = diffusion.save_pipeline(pipe, tmp_path / "saved")
  again = diffusion.load_pipeline(out)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      pipe.params, again.params)
  assert all(jax.tree.leaves(same))
  assert again.unet_config == pipe.unet_config and again.vae_config == pipe.vae_config
  assert again.scheduler_config == pipe.scheduler_config
  noise = diffusion.image_noise(1, ["a", "b"], pipe.latent_shape(diffusion.SampleSettings()))
  ref_orig = _reference(sd_dir, "ddim", noise, 3, 7.5)
  ref_saved = _reference(out, "ddim", noise, 3, 7.5)
  assert float(np.abs(ref_orig - ref_saved).max()) < 1e-6
  # Saving over an existing directory replaces it whole.
  diffusion.save_pipeline(again, out)
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"])
