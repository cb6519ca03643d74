"""PyTorch state dicts (safetensors / .bin files, diffusers and transformers layouts) -> Flax.

Two pieces every importer of a PyTorch checkpoint needs:

* `read_weights(directory)`: the tensors of one model component directory as float32 numpy
  arrays. It understands the files ``save_pretrained`` writes: ``model.safetensors`` /
  ``diffusion_pytorch_model.safetensors`` (and their ``-00001-of-0000N`` shards with the
  ``*.index.json`` map), or the legacy ``pytorch_model.bin`` / ``diffusion_pytorch_model.bin``
  (these need torch). Safetensors files are parsed directly, without torch.
* `to_flax(state_dict, expected)`: a state dict in PyTorch naming -> a nested Flax params dict,
  for Flax modules whose submodule names mirror the PyTorch attribute paths with list indices
  joined by an underscore (``down_blocks.0.resnets.1.conv1.weight`` ->
  ``down_blocks_0/resnets_1/conv1/kernel``). The Flax leaf name chooses the layout change:

      kernel, rank 2 (Dense)      torch (out, in)        -> (in, out)
      kernel, rank 4 (Conv)       torch (O, I, H, W)     -> (H, W, I, O)
      kernel from a 1x1 conv kept as Dense: (O, I, 1, 1) -> (I, O)
      scale (LayerNorm/GroupNorm) torch ``weight``       -> as is
      embedding (nn.Embed)        torch ``weight``       -> as is
      bias                                              -> as is

  Checks are strict: every target leaf must be filled and every source tensor used (minus
  names the caller says to ignore, e.g. ``position_ids`` buffers); a shape mismatch names the
  parameter and both shapes. `rename` maps a torch key to the key the Flax tree uses when the
  two namings differ (for example diffusers' attention ``to_out.0`` -> ``to_out``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

PyTree = Any

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class WeightsError(ValueError):
  """A checkpoint that does not fit the model (names the parameter and the shapes)."""


def read_safetensors(path: str | os.PathLike, how_to: str = "") -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy arrays (BF16 -> float32); no torch needed."""
  path = Path(path)
  hint = f": {how_to}" if how_to else ""
  data = path.read_bytes()
  try:
    (n,) = np.frombuffer(data[:8], "<u8")
    header = json.loads(data[8:8 + int(n)])
  except Exception as e:
    raise WeightsError(f"safetensors file {path} has a broken header ({e}){hint}") from e
  base = 8 + int(n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    if base + end > len(data):
      raise WeightsError(f"safetensors file {path}: tensor {name!r} runs past the end of the "
                         f"file (truncated?){hint}")
    raw = data[base + start: base + end]
    dt = info["dtype"]
    if dt == "BF16":
      arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif dt in _ST_DTYPES:
      arr = np.frombuffer(raw, np.dtype(_ST_DTYPES[dt]).newbyteorder("<"))
    else:
      raise WeightsError(f"safetensors file {path}: tensor {name!r} has unsupported dtype {dt}")
    out[name] = arr.reshape(info["shape"])
  return out


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a pickled PyTorch state dict (``*.bin`` / ``*.pth``); needs torch."""
  path = Path(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsError(f"{path} is a PyTorch pickle; reading it needs torch "
                       "(pip install -e '.[torch]'), or convert it to .safetensors") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise WeightsError(f"{path} could not be read as a PyTorch state dict: {e}") from e
  if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise WeightsError(f"{path} holds a {type(sd).__name__}, not a state dict")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in sd.items() if hasattr(v, "detach")}


def _to_float32(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
          for k, v in sd.items()}


def weight_files(directory: str | os.PathLike) -> list[Path]:
  """The weight file(s) of one component directory, in the preference order of WEIGHT_FILES.

  Sharded checkpoints are found through ``<name>.index.json``. Raises FileNotFoundError naming
  the directory and the file names looked for.
  """
  d = Path(directory)
  if not d.is_dir():
    raise FileNotFoundError(f"{d} is not a directory")
  for name in WEIGHT_FILES:
    if (d / name).is_file():
      return [d / name]
    index = d / f"{name}.index.json"
    if index.is_file():
      try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise WeightsError(f"{index} is not a valid shard index ({e})") from e
      missing = [s for s in shards if not (d / s).is_file()]
      if missing:
        raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {missing}")
      return [d / s for s in shards]
  raise FileNotFoundError(
      f"no weights in {d}: looked for {', '.join(WEIGHT_FILES)} (or sharded "
      "'<name>.index.json'); a diffusers/transformers save_pretrained directory has one")


def read_weights(directory: str | os.PathLike, how_to: str = "") -> dict[str, np.ndarray]:
  """All tensors of a component directory as numpy arrays (floats widened to float32)."""
  out: dict[str, np.ndarray] = {}
  for f in weight_files(directory):
    if f.suffix == ".safetensors":
      out.update(read_safetensors(f, how_to))
    else:
      out.update(read_torch_bin(f))
  return _to_float32(out)


def read_config(directory: str | os.PathLike, name: str = "config.json") -> dict:
  """``config.json`` of a component directory, with errors that name the file."""
  f = Path(directory) / name
  if not f.is_file():
    raise FileNotFoundError(f"{f} does not exist (a save_pretrained directory has one)")
  try:
    cfg = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise WeightsError(f"{f} is not valid JSON ({e})") from e
  if not isinstance(cfg, dict):
    raise WeightsError(f"{f} must hold a JSON object")
  return cfg


# ------------------------------------------------------------------------ torch -> flax

_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def flax_path(torch_key: str) -> tuple[str, ...]:
  """``a.b.0.c.weight`` -> ``('a', 'b_0', 'c', 'weight')`` (list indices joined to names)."""
  return tuple(_INDEX.sub(r"_\1", torch_key).split("."))


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(leaf) if isinstance(leaf, tuple) else tuple(leaf.shape)


def _convert(name: str, leaf: str, arr: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel":
    if arr.ndim == 4 and len(want) == 4:
      arr = np.transpose(arr, (2, 3, 1, 0))
    elif arr.ndim == 4 and len(want) == 2 and arr.shape[2:] == (1, 1):
      arr = arr[:, :, 0, 0].T
    elif arr.ndim == 2 and len(want) == 2:
      arr = arr.T
  if tuple(arr.shape) != tuple(want):
    raise WeightsError(f"parameter {name!r}: the checkpoint has shape {tuple(arr.shape)} "
                       f"(after the torch->flax layout change), the model expects {want}")
  return np.ascontiguousarray(arr, dtype=np.float32)


def to_flax(state_dict: Mapping[str, np.ndarray], expected: PyTree, *,
            rename: Callable[[str], str] | None = None,
            ignore: Iterable[str] = (), where: str = "checkpoint") -> dict:
  """Converts a torch-named state dict into the nested params dict shaped like `expected`.

  Args:
    state_dict: torch key -> array (numpy or torch tensor).
    expected: the Flax params tree (arrays, ShapeDtypeStructs or shape tuples).
    rename: maps a torch key (before the index join) to the one the Flax tree uses.
    ignore: regular expressions of torch keys that are buffers, not parameters.
    where: names the source in errors (a file or directory).
  Raises:
    WeightsError naming the parameter for missing, unused or mis-shaped tensors.
  """
  targets = {p: _shape(v) for p, v in _flatten(expected).items()}
  ignore_res = [re.compile(p) for p in ignore]
  by_path: dict[tuple[str, ...], str] = {}
  unused = []
  for key in state_dict:
    if any(r.fullmatch(key) for r in ignore_res):
      continue
    path = flax_path(rename(key) if rename else key)
    stem, last = path[:-1], path[-1]
    hit = None
    if last == "weight":
      for leaf in ("kernel", "scale", "embedding"):
        if stem + (leaf,) in targets:
          hit = stem + (leaf,)
          break
    elif stem + (last,) in targets:
      hit = stem + (last,)
    if hit is None:
      unused.append(key)
    else:
      by_path[hit] = key
  missing = sorted("/".join(p) for p in targets if p not in by_path)
  if missing or unused:
    parts = []
    if missing:
      parts.append(f"{len(missing)} model parameter(s) have no tensor in the checkpoint, "
                   f"e.g. {missing[:5]}")
    if unused:
      parts.append(f"{len(unused)} checkpoint tensor(s) fit no model parameter, "
                   f"e.g. {sorted(unused)[:5]}")
    raise WeightsError(f"{where} does not match the model config: " + "; ".join(parts))
  out: dict = {}
  for path, key in by_path.items():
    arr = state_dict[key]
    if hasattr(arr, "detach"):
      arr = arr.detach().cpu().float().numpy()
    value = _convert(key, path[-1], np.asarray(arr), targets[path])
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


# Module-list attribute names of diffusers / transformers models: ``X_N`` in a Flax path is
# ``X.N`` in torch only for these (``linear_1`` of a TimestepEmbedding stays ``linear_1``).
LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
              "downsamplers", "upsamplers", "layers", "to_out", "net")


def from_flax(params: PyTree, *, list_names: Iterable[str] = LIST_NAMES,
              rename: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
  """The inverse of `to_flax`: a Flax params tree -> a torch-named state dict (numpy).

  A path element ``X_N`` becomes ``X.N`` when X is in `list_names`; `rename` then maps the
  dotted key (``down_blocks.0.resnets.1.conv1.weight``) to the torch key when they differ.
  """
  lists = set(list_names)

  def torch_name(p: str) -> str:
    m = re.fullmatch(r"(.+)_(\d+)", p)
    return f"{m.group(1)}.{m.group(2)}" if m and m.group(1) in lists else p

  out = {}
  for path, v in _flatten(params).items():
    v = np.asarray(v, np.float32)
    leaf = path[-1]
    key = ".".join(torch_name(p) for p in path[:-1])
    key = f"{key}.{'weight' if leaf in ('kernel', 'scale', 'embedding') else leaf}"
    key = rename(key) if rename else key
    if leaf == "kernel" and v.ndim == 4:
      v = np.transpose(v, (3, 2, 0, 1))
    elif leaf == "kernel" and v.ndim == 2:
      v = v.T
    out[key] = np.ascontiguousarray(v)
  return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> Path:
  """Writes numpy arrays as a .safetensors file (atomically; no torch or safetensors needed)."""
  from synthbandit_jax import io as sio  # pylint: disable=g-import-not-at-top
  names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
  header, chunks, offset = {}, [], 0
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in names:
      raise WeightsError(f"tensor {name!r}: dtype {arr.dtype} cannot be written to safetensors")
    raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  return sio.atomic_write_bytes(path, np.array(len(blob), "<u8").tobytes() + blob + b"".join(chunks))
