"""Meshes, shardings and multi-host helpers.

Everything goes through `jax.sharding`: a 1-D mesh with the axis name `data`; batches are
sharded along their leading axis, parameters and datasets kept on device are replicated.
The mesh is built with `jax.sharding.Mesh` directly (axis types Auto), so `jit` inserts the
collectives itself (the gradient all-reduce of data parallelism falls out of the SPMD
partitioner).

Two kinds of mesh:

* `make_mesh`: the local devices of this process. The embarrassingly parallel stages
  (generation, feature extraction) run on it; with several processes each one takes its own
  slice of the work (`process_slice`, shards `s % process_count == process_index`) and
  the hosts never wait on each other inside a batch.
* `make_global_mesh`: every device of every process (the training mesh). Arrays on it are
  global: replicated ones come from `replicate` (every host holds the same host value) and
  batches from `global_batch` (each host supplies only the rows of its own devices, via
  `jax.make_array_from_process_local_data`). With `model_axis > 1` it is 2-D,
  (`data`, `model`): batches split over `data`, and `state_shardings` splits each large
  parameter / optimizer leaf along its largest divisible dimension over `model` (the SPMD
  partitioner inserts the gathers), so a model `model_axis` times larger than one device's
  memory trains; the devices of one `model` row are consecutive, i.e. on one host.

Multi-process runs start with `initialize_distributed` (JAX's own runtime: explicit flags,
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment, or JAX's
cluster auto-detection on TPU pods, SLURM and Open MPI). With one process every helper here
is a no-op or the obvious single-host operation.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
# Leaves smaller than this stay replicated on a model axis (sharding them saves nothing).
MIN_SHARDED_SIZE = 2 ** 14
T = TypeVar("T")
log = logging.getLogger(__name__)


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


def make_global_mesh(num_devices: int = 0, model_axis: int = 1) -> Mesh:
  """The training mesh over every device of every process: 1-D (`data`), or with
  `model_axis` > 1 2-D (`data`, `model`) with `model_axis` devices on the model axis.

  `num_devices` = 0 takes them all. With one process a subset of the local devices may be
  chosen; with several, a subset would leave some hosts without devices, so only 0 (or the
  total) is accepted.
  """
  if jax.process_count() == 1:
    devices = make_mesh(num_devices).devices.ravel()
  else:
    total = jax.device_count()
    if num_devices not in (0, total):
      raise ValueError(
          f"config parallel.num_devices={num_devices}: with {jax.process_count()} processes "
          f"the training mesh spans all {total} devices; set it to 0 (or limit the devices "
          f"of each process with --local_device_ids / JAX_LOCAL_DEVICE_IDS)")
    # jax.devices() lists the devices grouped by process, so each process owns one
    # contiguous block of the data axis (what `global_batch` relies on; checked there).
    devices = np.asarray(jax.devices())
  if model_axis < 1 or len(devices) % model_axis:
    raise ValueError(f"config parallel.model_axis={model_axis} must be >= 1 and divide the "
                     f"number of devices ({len(devices)})")
  if model_axis == 1:
    return Mesh(np.asarray(devices), (DATA_AXIS,))
  local = jax.local_device_count()
  if jax.process_count() > 1 and local % model_axis:
    raise ValueError(f"config parallel.model_axis={model_axis} must divide the devices of "
                     f"each process ({local}): a model row stays on one host")
  return Mesh(np.asarray(devices).reshape(-1, model_axis), (DATA_AXIS, MODEL_AXIS))


def data_size(mesh: Mesh) -> int:
  """How many ways a batch is split (the size of the `data` axis)."""
  return int(mesh.shape[DATA_AXIS])


def leaf_spec(shape: Sequence[int], mesh: Mesh) -> P:
  """The partition of one state leaf: its largest dimension divisible by the model axis
  goes over `model` (when the leaf has >= 2 dims and >= MIN_SHARDED_SIZE elements);
  everything else, and everything on a mesh without a model axis, is replicated."""
  if MODEL_AXIS not in mesh.axis_names or len(shape) < 2:
    return P()
  m = int(mesh.shape[MODEL_AXIS])
  if int(np.prod(shape)) < MIN_SHARDED_SIZE:
    return P()
  dims = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % m == 0]
  if not dims:
    return P()
  spec = [None] * len(shape)
  spec[int(dims[0])] = MODEL_AXIS
  return P(*spec)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays (params, optimizer state, a whole TrainState):
  `leaf_spec` per leaf, decided by shape alone, so a parameter and its optimizer moments
  are split the same way."""
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), mesh)), tree)


def place_state(tree: Any, mesh: Mesh) -> Any:
  """Host values (the same on every process) -> global arrays with `state_shardings`."""
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if _addressable(x)
                      else to_host(x), tree)
  return jax.device_put(host, state_shardings(host, mesh))


def _addressable(x: Any) -> bool:
  return not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated


def to_host(tree: Any) -> Any:
  """Numpy copies of a pytree of (possibly global, sharded) arrays, whole on every process
  (shards on other hosts are gathered)."""
  def one(x):
    if _addressable(x):
      return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def mesh_size(mesh: Mesh) -> int:
  return int(mesh.devices.size)


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def microbatched(fn: Any, x: jax.Array, *, microbatch: int, shards: int = 1) -> Any:
  """``fn(x)`` computed `microbatch` rows at a time (a `jax.lax.map`); jittable.

  For a row-independent `fn` (row i of each output depends on row i of `x` only, e.g. a
  network in inference) whose outputs, an array or a pytree of arrays, have `x`'s leading
  axis. The values are ``fn(x)``'s up to float rounding (XLA may order a smaller batch's
  sums differently). On CPU this is faster for convolution stacks whose whole-batch
  activations leave the caches (benchmarks/README.md, score_throughput); on GPUs it only
  costs parallelism.

  Args:
    microbatch: rows per step per shard; 0 (or >= the rows) calls ``fn(x)`` once. A value
      that does not divide each shard's rows is lowered to the largest one that does.
    shards: the number of equal contiguous blocks the batch axis is split into over devices
      (the mesh's device count): each step takes `microbatch` rows from every block, so the
      loop runs over an unsharded axis and no device waits on another's rows. Rows that do
      not split into `shards` blocks are taken as one block.
  """
  n = x.shape[0]
  shards = int(shards) if int(shards) >= 1 and n % int(shards) == 0 else 1
  local = n // shards
  m = _largest_divisor(local, int(microbatch)) if int(microbatch) > 0 else local
  steps = local // m
  if steps <= 1:
    return fn(x)
  tail = x.shape[1:]
  xs = x.reshape(shards, steps, m, *tail).swapaxes(0, 1).reshape(steps, shards * m, *tail)
  ys = jax.lax.map(fn, xs)

  def back(y):
    return y.reshape(steps, shards, m, *y.shape[2:]).swapaxes(0, 1).reshape(n, *y.shape[2:])

  return jax.tree.map(back, ys)


def check_divisible(batch_size: int, mesh: Mesh, key: str) -> None:
  """Raises a clear error when a batch size does not split over the mesh's data axis."""
  n = data_size(mesh)
  if batch_size % n:
    raise ValueError(
        f"config {key}={batch_size} must be a multiple of the data-parallel device count "
        f"({n}); set {key} to {max(n, batch_size // n * n)} or parallel.num_devices to a "
        f"divisor.")


# --------------------------------------------------------------------------- multi-host


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _cluster_detected() -> str | None:
  """The multi-process launcher JAX can auto-detect here, or None (a plain single run)."""
  if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return "slurm"
  if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "ompi"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "tpu pod"
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None,
                           mode: str = "auto") -> bool:
  """Starts JAX's multi-process runtime when this run is one process of several.

  Call it first, before anything touches a device. Values come from the arguments, else
  from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
  JAX_LOCAL_DEVICE_IDS). `mode`:

    "auto"  initialise when a coordinator address and a process count > 1 are known, or when
            a TPU pod, SLURM job (> 1 task) or Open MPI launch is detected (JAX then finds
            the coordinator itself); otherwise stay a single process.
    "on"    always initialise (JAX's cluster auto-detection fills what is not given).
    "off"   never (a single process, whatever the environment says).

  Returns True when the runtime is (now) initialised. Calling it twice is harmless.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed must be auto, on or off, got {mode!r}")
  if mode == "off":
    return False
  if jax.distributed.is_initialized():
    return True
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if local_device_ids is None and os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    local_device_ids = [int(x) for x in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
  cluster = _cluster_detected()
  explicit = address is not None and n is not None and n > 1
  if mode == "auto" and not explicit and cluster is None:
    if address is not None or (n or 1) > 1 or pid is not None:
      missing = [name for name, v in (("--coordinator_address", address),
                                      ("--num_processes", n), ("--process_id", pid))
                 if v is None]
      raise ValueError(
          "a multi-process run needs a coordinator address, the number of processes and "
          f"this process's id; missing: {', '.join(missing)} (flags, or the environment "
          "variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    return False
  if explicit and pid is None:
    raise ValueError(f"--num_processes={n} with --coordinator_address={address} needs "
                     "--process_id (0 .. num_processes-1) on every process")
  log.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s%s)",
           address, n, pid, f", detected {cluster}" if cluster and not explicit else "")
  jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid,
                             local_device_ids=local_device_ids)
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes reports and summaries."""
  return jax.process_index() == 0


def process_slice(n: int, process_index: int | None = None,
                  process_count: int | None = None) -> np.ndarray:
  """The items of `range(n)` this process handles: `i % process_count == process_index`.

  Strided, so every process gets an even share of every class when items are grouped.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return np.arange(pi, n, pc)


def gather_process_slices(part: np.ndarray, n: int, *, process_count: int | None = None,
                          gather: Any = None) -> np.ndarray:
  """The inverse of `process_slice`: every process's `part` (its rows of `range(n)`, in
  order) put back into one [n, ...] array, the same on every process. `gather` defaults to
  `gather_rows` (tests pass a stand-in)."""
  part = np.asarray(part)
  pc = jax.process_count() if process_count is None else process_count
  if pc == 1:
    return part
  pieces = (gather_rows if gather is None else gather)(part)
  out = np.empty((n,) + part.shape[1:], part.dtype)
  for p, piece in enumerate(pieces):
    out[process_slice(n, p, pc)] = piece
  return out


def sync(name: str) -> None:
  """A barrier across all processes (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def gather_rows(rows: np.ndarray) -> list[np.ndarray]:
  """Every process's `rows` (arrays of one dtype and trailing shape; lengths may differ),
  as a list indexed by process. With one process: `[rows]`."""
  rows = np.asarray(rows)
  if jax.process_count() == 1:
    return [rows]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  n = np.asarray([len(rows)], np.int64)
  counts = np.asarray(multihost_utils.process_allgather(n)).reshape(-1)
  width = int(counts.max())
  padded = np.zeros((width,) + rows.shape[1:], rows.dtype)
  padded[:len(rows)] = rows
  everything = np.asarray(multihost_utils.process_allgather(padded))
  everything = everything.reshape((len(counts), width) + rows.shape[1:])
  return [everything[p, :int(c)] for p, c in enumerate(counts)]


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, as a list indexed by process (`[obj]` with one)."""
  import json  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return [obj]
  blob = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  return [json.loads(bytes(b).decode("utf-8")) for b in gather_rows(blob)]


def assert_same_on_all_processes(tree: Any, what: str) -> None:
  """Fails, naming `what`, unless every process holds the same values of `tree`."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  leaves = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]
  for k, leaf in enumerate(leaves):
    everyone = np.asarray(multihost_utils.process_allgather(leaf))
    same = all(np.array_equal(everyone[0], everyone[p], equal_nan=True)
               for p in range(1, everyone.shape[0]))
    if not same:
      raise AssertionError(
          f"{what} differs between processes (leaf {k}: process 0 has "
          f"{everyone[0].ravel()[:8]}, process {jax.process_index()} has "
          f"{leaf.ravel()[:8]}); the processes no longer run the same program")


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (the same on every process) -> arrays replicated over `mesh`."""
  return jax.device_put(jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree),
                        replicated(mesh))


def local_rows(global_size: int, mesh: Mesh) -> slice:
  """The rows of a batch-sharded array of `global_size` rows whose shards live on this
  process's devices (one contiguous block: `global_batch` needs it)."""
  sharding = batch_sharded(mesh)
  index_map = sharding.addressable_devices_indices_map((global_size,))
  starts = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_size)
                   for idx in index_map.values()})
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != hi - lo:
    raise ValueError("this process's devices do not hold one contiguous block of the data "
                     "axis; build the mesh with parallel.make_global_mesh")
  return slice(lo, hi)


def global_batch(make_local: Any, global_size: int, mesh: Mesh) -> Any:
  """A batch-sharded global array of `global_size` rows, of which this process builds only
  its own rows: `make_local(rows: slice)` returns a pytree of host arrays for them."""
  if jax.process_count() == 1:
    return jax.device_put(make_local(slice(0, global_size)), batch_sharded(mesh))
  rows = local_rows(global_size, mesh)
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(
          sharding, np.asarray(a), (global_size,) + np.shape(a)[1:]),
      make_local(rows))


def check_shared_directory(directory: str | os.PathLike, what: str = "--workdir") -> None:
  """With several processes: fails unless every process sees `directory` as one shared
  directory (process 0 writes a token that every other process must read back)."""
  if jax.process_count() == 1:
    return
  directory = Path(directory)
  token = directory / ".synthbandit_shared_check"
  stamp = f"{os.getpid()}-{jax.process_index()}"
  if is_main_process():
    directory.mkdir(parents=True, exist_ok=True)
    from synthbandit_jax import io as sio  # pylint: disable=import-outside-toplevel
    sio.atomic_write_text(token, stamp)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  # Everyone learns process 0's stamp through the runtime, then looks for it on disk.
  code = np.frombuffer(stamp.encode().ljust(64, b" "), np.uint8)
  code = np.asarray(multihost_utils.broadcast_one_to_all(code))
  expected = bytes(code.astype(np.uint8)).decode().strip()
  try:
    seen = token.read_text().strip()
  except OSError:
    seen = None
  ok = np.asarray([seen == expected], np.int32)
  all_ok = np.asarray(multihost_utils.process_allgather(ok)).reshape(-1)
  if not all_ok.all():
    bad = [int(p) for p in np.flatnonzero(all_ok == 0)]
    raise RuntimeError(
        f"{what}={directory} is not one shared directory: process(es) {bad} do not see what "
        "process 0 wrote there. Multi-process runs need a workdir on a filesystem every host "
        "mounts (NFS, a mounted bucket); see README 'Multi-host runs'")


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
