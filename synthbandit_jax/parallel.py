"""Meshes and shardings for data-parallel work over all local devices.

Everything goes through `jax.sharding`: a 1-D mesh with the axis name `data`; batches are
sharded along their leading axis, parameters and datasets kept on device are replicated.
The mesh is built with `jax.sharding.Mesh` directly (axis types Auto), so `jit` inserts the
collectives itself (the gradient all-reduce of data parallelism falls out of the SPMD
partitioner).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` local devices (0 = all of them)."""
  if devices is None:
    devices = jax.local_devices()
  devices = list(devices)
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(
        f"config parallel.num_devices={num_devices} but {len(devices)} local devices exist "
        f"({devices[0].platform}); use 0 for all of them.")
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the mesh's data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def mesh_size(mesh: Mesh) -> int:
  return int(mesh.devices.size)


def check_divisible(batch_size: int, mesh: Mesh, key: str) -> None:
  """Raises a clear error when a batch size does not split over the mesh."""
  n = mesh_size(mesh)
  if batch_size % n:
    raise ValueError(
        f"config {key}={batch_size} must be a multiple of the number of devices ({n}); "
        f"set {key} to {max(n, batch_size // n * n)} or parallel.num_devices to a divisor.")
