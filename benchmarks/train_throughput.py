"""Training throughput (images/s): our jitted bandit epoch vs. an equivalent PyTorch loop.

  python benchmarks/train_throughput.py                       # batch 32, CPU or GPU (auto)
  python benchmarks/train_throughput.py --batch_size=32,128 --out=/tmp/throughput.json
  python benchmarks/train_throughput.py --device=gpu --images=65536 --batch_size=128,512

Both sides train the same SmallCNN (3x3 conv32-relu-pool2-conv64-relu-pool2-dense128-relu-
dense10, float32) with SGD(lr, momentum 0.9) and softmax cross-entropy on the same number of
random uint8 images, which sit on the device before timing starts. Per step both sides gather
the batch from the on-device uint8 bank with a freshly shuffled index order, convert it to
float / 255, normalise it to [-1, 1] and take one optimizer step.

- Ours: one `make_epoch_fn` call per epoch (bandit `fixed(0)` over a single arm holding all
  images: plan, `lax.scan` over the batches, val, bandit update). The val set is one batch,
  so its forward pass is 1 / (images / batch_size) of the epoch's forward passes; it is
  included in our time (this slightly favours PyTorch).
- PyTorch: the usual Python loop (`zero_grad`, forward, `backward`, `step`) over a per-epoch
  `randperm`; the bank is stored NCHW once at setup (not timed); loss / accuracy sums stay on
  the device (no per-step host sync), as in ours. Threads: `torch.set_num_threads(
  os.cpu_count())` unless `--torch_threads` says otherwise. Optional `--torch_compile`.

Each batch size runs `--warmup` untimed epochs per side (ours: the first compiles), then
`--epochs` timed epochs, interleaved ours / torch so that load from other processes hits both
alike. Throughput = timed images / timed seconds (block_until_ready / cuda.synchronize).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags

try:
  import synthbandit_jax  # noqa: F401  (installed, or run from the repo root)
except ImportError:  # run as `python benchmarks/train_throughput.py` without installing
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import optax

from synthbandit_jax import arms as arms_lib
from synthbandit_jax import bandits
from synthbandit_jax import io as sio
from synthbandit_jax.models import classifiers
from synthbandit_jax.training import epoch as epoch_lib

_IMAGES = flags.DEFINE_integer("images", 4096, "Training images per epoch (both sides).")
_BATCH_SIZE = flags.DEFINE_list("batch_size", ["32"],
                                "Batch size, or a comma list to sweep (e.g. 32,128).")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Timed epochs per side and batch size.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed warm-up epochs per side (>= 1).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 28, "Image height and width.")
_CHANNELS = flags.DEFINE_integer("channels", 1, "Image channels.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes (logits).")
_LR = flags.DEFINE_float("lr", 1e-3, "SGD learning rate (momentum 0.9 on both sides).")
_DEVICE = flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"],
                            "Where both sides run; auto = gpu if JAX has one, else cpu.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False,
                                   "Also time torch.compile(model) (skipped if it fails).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads value; 0 = os.cpu_count() (the default).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for data, init and shuffling.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the results.")


def _resolve_device(name: str) -> str:
  """'auto' -> 'gpu' when JAX's default backend is a GPU, else 'cpu'."""
  if name == "auto":
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
  return name


def _jax_device(kind: str) -> jax.Device:
  """The first JAX device of `kind` ('cpu' or 'gpu')."""
  try:
    return jax.devices(kind)[0]
  except RuntimeError as e:
    raise SystemExit(f"--device={kind}: JAX has no {kind} backend ({e}); "
                     "pass --device=cpu or install a jax build for that device.") from e


def _import_torch():
  """Returns the torch module, or exits with a message naming how to install it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit(
        "train_throughput: PyTorch is not installed, so there is no peer to compare with. "
        "Install the optional extra: `pip install -e .[torch]` "
        "(on the project's CPU machines: `.venv/bin/pip install torch==2.13.0`).") from None
  return torch


def _make_data(n: int, size: int, channels: int, num_classes: int, seed: int):
  """Random uint8 NHWC images and int32 labels (throughput does not depend on content)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (n,), dtype=np.int32)
  return images, labels


# ---------------------------------------------------------------- ours (JAX)


class _OursRunner:
  """Our jitted epoch on one batch size; `run_epoch()` trains one epoch and returns secs."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
               device: jax.Device):
    n = len(labels)
    model = classifiers.build_classifier("small_cnn", _NUM_CLASSES.value)
    tx = optax.sgd(_LR.value, momentum=0.9)
    bandit = bandits.fixed(0)
    spec = epoch_lib.EpochSpec(model=model, tx=tx, bandit=bandit,
                               reward_fn=bandits.reward_fn("accuracy"),
                               batch_size=batch_size)
    padded = arms_lib.pad_arms([("all", np.arange(n))])
    val = epoch_lib.make_eval_set(images[:batch_size], labels[:batch_size], batch_size)
    put = lambda x: jax.device_put(x, device)
    self.bank = epoch_lib.Bank(put(images), put(labels))
    self.arms = epoch_lib.ArmArrays(put(padded.indices), put(padded.mask))
    self.val = jax.tree.map(put, val)
    # Committed to `device` like the bank: a mix of committed inputs and uncommitted state
    # would compile the epoch a second time on the first call after warm-up.
    self.state = jax.device_put(epoch_lib.create_train_state(
        model, tx, bandit, padded.num_arms, jax.random.PRNGKey(_SEED.value),
        (1,) + images.shape[1:]), device)
    self.epoch = epoch_lib.make_epoch_fn(spec)
    self.images_per_epoch = n

  def run_epoch(self) -> float:
    """Trains one epoch (keeps the returned state: the epoch donates its input)."""
    t0 = time.perf_counter()
    self.state, metrics = self.epoch(self.state, self.bank, self.arms, self.val)
    jax.block_until_ready((self.state, metrics))
    secs = time.perf_counter() - t0
    if int(metrics["images"]) != self.images_per_epoch:
      raise RuntimeError(f"our epoch trained on {int(metrics['images'])} images, "
                         f"expected {self.images_per_epoch}")
    return secs

  @property
  def traces(self) -> int:
    return self.epoch.trace_counter.count


# ---------------------------------------------------------------- PyTorch peer


def _torch_small_cnn(torch, channels: int, size: int, num_classes: int):
  """The SmallCNN in torch.nn (NCHW, padding=1 == SAME for 3x3 stride 1)."""
  nn = torch.nn
  side = size
  layers: list[Any] = []
  in_ch = channels
  for out_ch in (32, 64):
    layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
    if side >= 2:  # ours skips the pool on maps smaller than 2x2
      layers.append(nn.MaxPool2d(2))
      side //= 2
    in_ch = out_ch
  layers += [nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(),
             nn.Linear(128, num_classes)]
  return nn.Sequential(*layers)


class _TorchRunner:
  """The PyTorch loop on one batch size; `run_epoch()` trains one epoch and returns secs."""

  def __init__(self, torch, images: np.ndarray, labels: np.ndarray, batch_size: int,
               device: str, compile_model: bool):
    self.torch = torch
    self.device = torch.device(device)
    torch.manual_seed(_SEED.value)
    model = _torch_small_cnn(torch, images.shape[3], images.shape[1],
                             _NUM_CLASSES.value).to(self.device)
    self.model = model
    self.fwd = torch.compile(model) if compile_model else model
    self.opt = torch.optim.SGD(model.parameters(), lr=_LR.value, momentum=0.9)
    # Stored NCHW once (a torch user keeps the bank in torch's layout); not timed.
    self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(
        self.device)
    self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
    self.batch_size = batch_size
    self.gen = torch.Generator(device=self.device).manual_seed(_SEED.value + 1)

  def _sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def run_epoch(self) -> float:
    """Trains one epoch over all images in a fresh random order."""
    torch = self.torch
    f = torch.nn.functional
    n = self.labels.shape[0]
    self.model.train()
    self._sync()
    t0 = time.perf_counter()
    perm = torch.randperm(n, device=self.device, generator=self.gen)
    loss_sum = torch.zeros((), device=self.device)
    correct = torch.zeros((), device=self.device)
    for start in range(0, n, self.batch_size):
      idx = perm[start:start + self.batch_size]
      x = (self.images[idx].float() / 255.0 - 0.5) / 0.5
      y = self.labels[idx]
      self.opt.zero_grad(set_to_none=True)
      logits = self.fwd(x)
      loss = f.cross_entropy(logits, y)
      loss.backward()
      self.opt.step()
      with torch.no_grad():
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.argmax(-1) == y).sum()
    _ = (loss_sum.item(), correct.item())  # host sync, as ours returns its metrics
    self._sync()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- driver


def _bench_one(torch, batch_size: int, kind: str, images: np.ndarray, labels: np.ndarray,
               ) -> dict[str, Any]:
  """Warm-up and timed epochs for one batch size; returns a results row."""
  n = len(labels)
  jdev = _jax_device(kind)
  tdev = "cuda" if kind == "gpu" else "cpu"
  ours = _OursRunner(images, labels, batch_size, jdev)
  peers: dict[str, _TorchRunner] = {"torch": _TorchRunner(torch, images, labels, batch_size,
                                                           tdev, compile_model=False)}
  notes: dict[str, str] = {}
  if _TORCH_COMPILE.value:
    try:
      peers["torch_compile"] = _TorchRunner(torch, images, labels, batch_size, tdev,
                                            compile_model=True)
    except Exception as e:  # pylint: disable=broad-except
      notes["torch_compile"] = f"skipped: {type(e).__name__}: {e}"

  warm = {"ours": [ours.run_epoch() for _ in range(_WARMUP.value)]}
  for name in list(peers):
    try:
      warm[name] = [peers[name].run_epoch() for _ in range(_WARMUP.value)]
    except Exception as e:  # pylint: disable=broad-except  (torch.compile failures)
      if name != "torch_compile":
        raise
      notes[name] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      del peers[name]

  times: dict[str, list[float]] = {"ours": []}
  times.update({name: [] for name in peers})
  for _ in range(_EPOCHS.value):  # interleaved, so background load hits every side alike
    times["ours"].append(ours.run_epoch())
    for name, peer in peers.items():
      times[name].append(peer.run_epoch())

  row: dict[str, Any] = {"batch_size": batch_size, "images_per_epoch": n,
                         "warmup_seconds": warm, "epoch_seconds": times,
                         "our_traces": ours.traces, "notes": notes}
  for name, ts in times.items():
    row[f"{name}_img_per_s"] = n * len(ts) / sum(ts)
    row[f"{name}_median_epoch_s"] = statistics.median(ts)
    row[f"{name}_best_img_per_s"] = n / min(ts)
  for name in peers:
    row[f"ratio_vs_{name}"] = row["ours_img_per_s"] / row[f"{name}_img_per_s"]
    row[f"best_ratio_vs_{name}"] = row["ours_best_img_per_s"] / row[f"{name}_best_img_per_s"]
  return row


def _load_average() -> list[float] | None:
  """1/5/15-minute load averages (None where the OS has none)."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def _machine(torch, kind: str) -> dict[str, Any]:
  info = {"jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
          "device": kind, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
          "platform": platform.platform(), "python": platform.python_version()}
  if kind == "gpu" and torch.cuda.is_available():
    info["torch_cuda_device"] = torch.cuda.get_device_name(0)
  return info


def main(argv):
  del argv
  torch = _import_torch()
  try:
    batch_sizes = [int(b) for b in _BATCH_SIZE.value]
  except ValueError:
    raise SystemExit(f"--batch_size must be ints separated by commas; got "
                     f"{','.join(_BATCH_SIZE.value)!r}") from None
  if not batch_sizes or min(batch_sizes) < 1:
    raise SystemExit(f"--batch_size needs positive values; got {batch_sizes}")
  if _WARMUP.value < 1 or _EPOCHS.value < 1:
    raise SystemExit("--warmup and --epochs must be >= 1 (the first epoch compiles)")
  if _IMAGES.value < max(batch_sizes):
    raise SystemExit(f"--images={_IMAGES.value} is smaller than the largest --batch_size "
                     f"{max(batch_sizes)}")
  kind = _resolve_device(_DEVICE.value)
  if kind == "gpu" and not torch.cuda.is_available():
    raise SystemExit(f"--device=gpu but torch {torch.__version__} sees no CUDA device; "
                     "install a CUDA build of torch or pass --device=cpu.")
  torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count() or 1)

  machine = _machine(torch, kind)
  print(f"jax {machine['jax']} devices={machine['jax_devices']} | torch {machine['torch']} "
        f"threads={machine['torch_threads']} (os.cpu_count()={machine['cpu_count']}) | "
        f"device={kind}" + (f" ({machine['torch_cuda_device']})"
                            if "torch_cuda_device" in machine else ""))
  print(f"SmallCNN {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}x{_CHANNELS.value}, "
        f"{_IMAGES.value} images/epoch, warmup {_WARMUP.value}, timed {_EPOCHS.value} "
        "epochs (ours includes a 1-batch val pass per epoch)")

  machine["load_average_before"] = _load_average()
  print(f"load average (1, 5, 15 min) before: {machine['load_average_before']} -- other "
        "processes on the machine distort both sides' numbers")
  images, labels = _make_data(_IMAGES.value, _IMAGE_SIZE.value, _CHANNELS.value,
                              _NUM_CLASSES.value, _SEED.value)
  rows = []
  for bs in batch_sizes:
    row = _bench_one(torch, bs, kind, images, labels)
    row["load_average_after"] = _load_average()
    rows.append(row)
    for name, note in row["notes"].items():
      print(f"  [batch {bs}] {name}: {note}")

  peers = [p for p in ("torch", "torch_compile") if any(f"{p}_img_per_s" in r for r in rows)]
  print("img/s = all timed epochs; ratio = ours / peer; ratio(best) = fastest epoch of each "
        "side (less sensitive to other load)")
  header = f"{'batch':>6} {'ours img/s':>12}" + "".join(
      f" {p + ' img/s':>19} {'ratio':>7} {'ratio(best)':>11}" for p in peers) + (
          f" {'ours compile s':>15}")
  print(header)
  for r in rows:
    line = f"{r['batch_size']:>6} {r['ours_img_per_s']:>12.0f}"
    for p in peers:
      if f"{p}_img_per_s" in r:
        line += (f" {r[f'{p}_img_per_s']:>19.0f} {r[f'ratio_vs_{p}']:>6.2f}x"
                 f" {r[f'best_ratio_vs_{p}']:>10.2f}x")
      else:
        line += f" {'-':>19} {'-':>7} {'-':>11}"
    line += f" {r['warmup_seconds']['ours'][0]:>15.1f}   load after {r['load_average_after']}"
    print(line)

  if _OUT.value:
    config = {"images": _IMAGES.value, "batch_sizes": batch_sizes, "epochs": _EPOCHS.value,
              "warmup": _WARMUP.value, "image_size": _IMAGE_SIZE.value,
              "channels": _CHANNELS.value, "num_classes": _NUM_CLASSES.value,
              "lr": _LR.value, "torch_compile": _TORCH_COMPILE.value, "seed": _SEED.value,
              "torch_threads": machine["torch_threads"], "model": "small_cnn",
              "val": "one batch, inside our timed epoch"}
    path = sio.atomic_write_json(_OUT.value, {"machine": machine, "config": config,
                                              "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
