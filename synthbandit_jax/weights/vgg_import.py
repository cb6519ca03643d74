"""torchvision VGG16 state dict -> `synthbandit_jax.models.vgg.VGG16` params, with a cache.

No model hub is reachable here, so the ImageNet weights come from a file the user made once
on a machine with internet access:

    import torch, torchvision
    torch.save(torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict(), "vgg16.pth")

(or the same tensors written as ``.safetensors``). Keys are torchvision's:

    features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}   conv  (O, I, 3, 3), (O,)
    classifier.{0,3,6}.{weight,bias}                               fc6, fc7, fc8  (out, in)

They map one to one onto the Flax tree (``features.0.weight`` -> ``features_0/kernel``, conv
OIHW -> HWIO, linear (out, in) -> (in, out)) through
`synthbandit_jax.weights.state_dict.to_flax`, which checks that every parameter is filled and
every tensor used, and names the parameter and both shapes on a mismatch. fc6's input order
needs no permutation: `VGG16` flattens its 7x7x512 map in torch's (C, H, W) order.

A ``.pth`` pickle needs torch to read; `cached_vgg16_params` reads it once and keeps the
params as ``<cache_dir>/flax/vgg16_<sha256[:12]>.msgpack`` (the hash is the file's), so later
runs need no torch. A ``.safetensors`` file is read directly (no torch, no cache).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from synthbandit_jax import assets
from synthbandit_jax.models import vgg
from synthbandit_jax.weights import inception_import
from synthbandit_jax.weights import state_dict as sd_lib

HOW_TO = ('make it on a machine with internet access: torch.save(torchvision.models.vgg16('
          'weights="IMAGENET1K_V1").state_dict(), "vgg16.pth")')
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_FC8 = re.compile(r"classifier\.6\.(weight|bias)")


def _pre_transposed(w: Any, block: int = 256) -> Any:
  """A 2-D (out, in) weight as an F-ordered array of the same shape and values.

  `to_flax` turns a Linear weight into ``ascontiguousarray(w.T)``; for fc6 (4096 x 25088)
  numpy's plain transposing copy is cache-unfriendly (~1.2-1.6 s). Copying in 256 x 256
  tiles here (~0.4 s) makes ``w.T`` already C-contiguous, so `to_flax` copies nothing.
  """
  if hasattr(w, "detach"):  # a torch tensor
    w = w.detach().cpu().float().numpy()
  w = np.asarray(w)
  if w.ndim != 2:
    return w  # to_flax reports the shape error
  out = np.empty((w.shape[1], w.shape[0]), np.float32)
  for i in range(0, w.shape[0], block):
    for j in range(0, w.shape[1], block):
      out[j:j + block, i:i + block] = w[i:i + block, j:j + block].T
  return out.T


def params_from_torchvision(state_dict: Mapping[str, Any], *, with_logits: bool | None = None,
                            where: str = "VGG16 state dict") -> dict:
  """A torchvision vgg16 state dict (numpy arrays or torch tensors) -> `VGG16` params.

  Args:
    state_dict: torchvision key -> tensor (a ``"state_dict"`` wrapper is unwrapped by
      `load_vgg16`, not here).
    with_logits: keep fc8 (``classifier_6``). None: keep it when the dict has it. False: the
      fc8 tensors are ignored. True: they are required.
    where: names the source (a file) in errors.
  Returns:
    nested dict of float32 numpy arrays for ``VGG16(with_logits=...)``.
  Raises:
    WeightsError naming missing, unused or mis-shaped parameters (with both shapes).
  """
  if with_logits is None:
    with_logits = "classifier.6.weight" in state_dict
  num_classes = vgg.NUM_CLASSES
  if with_logits and "classifier.6.weight" in state_dict:
    num_classes = int(np.shape(state_dict["classifier.6.weight"])[0])
  expected = vgg.param_shapes(with_logits=with_logits, num_classes=num_classes)
  ignore = () if with_logits else (_FC8.pattern,)
  sd = {k: (_pre_transposed(v) if k.startswith("classifier.") and k.endswith(".weight") else v)
        for k, v in state_dict.items()}
  try:
    return sd_lib.to_flax(sd, expected, ignore=ignore, where=where)
  except sd_lib.WeightsError as e:
    raise sd_lib.WeightsError(f"{e}. Expected torchvision.models.vgg16 keys features."
                              f"{{{','.join(map(str, vgg.CONV_INDICES))}}}.weight/bias and "
                              "classifier.{0,3,6}.weight/bias (vgg16_bn is not supported)") from e


def to_torchvision(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `params_from_torchvision`: `VGG16` params -> torchvision-named numpy
  state dict (e.g. to write a test weights file with `state_dict.write_safetensors`)."""
  return sd_lib.from_flax(params, list_names=("features", "classifier"))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a ``.pth``/``.pt``/``.bin`` (needs torch) or ``.safetensors`` file."""
  path = Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"VGG16 weights file {path} does not exist; {HOW_TO}")
  if path.suffix == ".safetensors":
    return sd_lib.read_safetensors(path, HOW_TO)
  if path.suffix in TORCH_SUFFIXES:
    return sd_lib.read_torch_bin(path)
  raise sd_lib.WeightsError(f"VGG16 weights file {path}: unknown suffix {path.suffix!r}; use a "
                            f"torch state dict ({', '.join(TORCH_SUFFIXES)}) or .safetensors")


def load_vgg16(path: str | os.PathLike, *, with_logits: bool | None = None) -> dict:
  """`VGG16` params from a torchvision vgg16 state dict file (see `read_state_dict`)."""
  sd = read_state_dict(path)
  return params_from_torchvision(sd, with_logits=with_logits, where=str(path))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
  """sha256 (hex) of a file's bytes, read in chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def cache_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
  """Where `cached_vgg16_params` keeps the params of the weights file `path`."""
  root = Path(cache_dir).expanduser() if cache_dir is not None else assets.cache_dir()
  return root / "flax" / f"vgg16_{file_sha256(path)[:12]}.msgpack"


def cached_vgg16_params(path: str | os.PathLike,
                        cache_dir: str | os.PathLike | None = None) -> dict:
  """`VGG16` params of a weights file: msgpack cache for torch pickles, else `load_vgg16`.

  For a ``.pth``/``.pt``/``.bin`` file the params (fc8 included when present) are cached as
  `cache_path(path, cache_dir)` (cache_dir defaults to `synthbandit_jax.assets.cache_dir()`),
  keyed by the file's sha256, so torch is needed only the first time and a changed file is
  never served stale params. ``.safetensors`` files are read directly every time.
  """
  path = Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"VGG16 weights file {path} does not exist; {HOW_TO}")
  if path.suffix not in TORCH_SUFFIXES:
    return load_vgg16(path)
  target = cache_path(path, cache_dir)
  if target.is_file():
    try:
      return inception_import.load_params(target)
    except ValueError:
      target.unlink(missing_ok=True)  # unreadable (interrupted or foreign file): rebuild
  params = load_vgg16(path)
  inception_import.save_params(target, params)
  return params
