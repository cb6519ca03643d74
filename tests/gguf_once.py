"""Parse each GGUF file once per test: `gguf.GGUFReader` memoised by path (and
`gguf.get_tensor_name_map` by its arguments).

Our loader (`llama_import.load_gguf`), transformers' `load_gguf_checkpoint` (config, tensors)
and transformers' tokenizer config each open the file with `gguf.GGUFReader`; parsing
SmolLM2-135M's metadata (49152 tokens, 48900 merges) costs ~8 s apiece on 2 CPU cores. The
reader is a read-only view of the file (np.memmap, mode "r"); each caller still interprets
it its own way (dequantisation, Q/K un-permutation, config mapping), so sharing the parse
changes nothing they compute. transformers' `get_gguf_hf_weights_map` rebuilds the same
`gguf.TensorNameMap(arch, n_blocks)` for each of the model's ~400 submodules (~12 s); the map
is a pure function of its two arguments, so one is built.
"""
from __future__ import annotations

import functools


def parse_once(monkeypatch) -> None:
  """For the rest of the test: one `gguf.GGUFReader` per (path, args)."""
  import gguf  # pylint: disable=import-outside-toplevel

  from synthbandit_jax.weights import llama_import  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(gguf, "GGUFReader", llama_import.memoised_gguf_reader(gguf.GGUFReader))
  monkeypatch.setattr(gguf, "get_tensor_name_map",
                      functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
