"""Meshes and shardings for data-parallel work over all local devices.

Everything goes through `jax.sharding`: a 1-D mesh with the axis name `data`; batches are
sharded along their leading axis, parameters and datasets kept on device are replicated.
The mesh is built with `jax.sharding.Mesh` directly (axis types Auto), so `jit` inserts the
collectives itself (the gradient all-reduce of data parallelism falls out of the SPMD
partitioner).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
T = TypeVar("T")


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


class _Failed:
  def __init__(self, exc: BaseException):
    self.exc = exc


_END = object()


def prefetch(iterable: Iterable[T], buffer_size: int = 2) -> Iterator[T]:
  """Iterates `iterable` on a daemon thread, at most `buffer_size` items ahead.

  Order is kept; an exception in the producer is raised in the consumer; closing the
  returned generator early (break, garbage collection) stops the producer at its next item.
  """
  if buffer_size < 1:
    raise ValueError(f"prefetch buffer_size must be >= 1, got {buffer_size}")
  q: queue.Queue = queue.Queue(maxsize=buffer_size)
  stop = threading.Event()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def worker() -> None:
    try:
      for item in iterable:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # surfaced in the consumer
      put(_Failed(e))

  thread = threading.Thread(target=worker, name="synthbandit-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, _Failed):
        raise item.exc
      yield item
  finally:
    stop.set()
    thread.join()
