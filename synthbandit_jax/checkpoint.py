"""Orbax checkpoints of a whole training run: train state + bandit state + rng + epoch, and
the per-epoch history as JSON beside it.

Orbax writes every step into a temporary directory and renames it when complete, so a run
killed mid-save resumes from the previous complete epoch. Saves are synchronous: when
`save` returns, the epoch is on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from synthbandit_jax import parallel


class Checkpointer:
  """Saves/restores `(state, history)` per epoch under `directory`, keeping the last `keep`."""

  def __init__(self, directory: str | Path, keep: int = 2):
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True))

  def latest_epoch(self) -> int | None:
    """The last completely written epoch, or None when there is no checkpoint."""
    return self._manager.latest_step()

  def save(self, epoch: int, state: Any, history: dict) -> None:
    # Whole numpy values on every process (shards held by other hosts are gathered); orbax
    # then writes them once, from the primary process.
    state_dict = serialization.to_state_dict(parallel.to_host(state))
    self._manager.save(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state_dict),
                                history=ocp.args.JsonSave(history)))
    self._manager.wait_until_finished()

  def restore(self, template: Any, epoch: int | None = None) -> tuple[Any, dict]:
    """Restores into the structure of `template` (e.g. a freshly initialised state)."""
    epoch = self.latest_epoch() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = serialization.to_state_dict(parallel.to_host(template))
    restored = self._manager.restore(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                history=ocp.args.JsonRestore()))
    state = serialization.from_state_dict(template, restored["state"])
    state = jax.tree.map(lambda t, r: np.asarray(r, dtype=np.asarray(t).dtype), template,
                         state)
    return state, restored["history"]

  def close(self) -> None:
    self._manager.close()
