"""A controlled pool: known-bad variants of held-out REAL TRAINING images.

Each output image is one source image passed through a corruption of known kind and
severity, so a scoring method can be checked against ground truth (clean images should rank
above noisy, blurred, occluded, style-shifted and mislabelled ones). Pass a held-out part of
the real training data only, never validation or test images.

Kinds (severities): clean (0), noise (1-3), blur (1-3), occlusion (1-3), invert (1),
edges (1), wrong_label (0; a clean copy whose row carries a different class).
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from synthbandit_jax import io as sio
from synthbandit_jax.data.pool import PoolWriter

ALL_KINDS = ("clean", "noise", "blur", "occlusion", "invert", "edges", "wrong_label")
GRADED_KINDS = ("noise", "blur", "occlusion")
FIXED_SEVERITY = {"clean": 0, "invert": 1, "edges": 1, "wrong_label": 0}
NOISE_SIGMA = {1: 0.08, 2: 0.2, 3: 0.4}  # Fraction of 255.
BLUR_SIGMA = {1: 0.025, 2: 0.05, 3: 0.1}  # Fraction of min(H, W); at least 0.5 px.
OCCLUSION_AREA = {1: 0.15, 2: 0.30, 3: 0.50}  # Fraction of the image area.
_KIND_CODE = {k: n for n, k in enumerate(ALL_KINDS)}
MANIFEST_NAME = "controlled_build.json"


def _split_alpha(img: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  """Returns (colour channels, alpha or None) of a 2-D or HWC image."""
  if img.ndim == 3 and img.shape[-1] in (2, 4):
    return img[..., :-1], img[..., -1:]
  return img, None


def _join_alpha(color: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
  return color if alpha is None else np.concatenate([color, alpha], axis=-1)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gaussian_kernel(sigma: float) -> np.ndarray:
  radius = max(1, int(math.ceil(3.0 * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return k / k.sum()


def _filter_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
  """Correlates `x` with a 1-D kernel along `axis`, reflecting at the borders."""
  r = len(kernel) // 2
  pad = [(0, 0)] * x.ndim
  pad[axis] = (r, r)
  xp = np.pad(x, pad, mode="symmetric")
  n = x.shape[axis]
  out = np.zeros_like(x, dtype=np.float64)
  for t, w in enumerate(kernel):
    out += w * np.take(xp, np.arange(t, t + n), axis=axis)
  return out


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
  """Separable gaussian blur (sigma in pixels) of a 2-D or HWC uint8 image."""
  k = _gaussian_kernel(sigma)
  x = img.astype(np.float64)
  return _to_uint8(_filter_axis(_filter_axis(x, k, 0), k, 1))


def sobel_edges(img: np.ndarray) -> np.ndarray:
  """Sobel gradient magnitude of the image's luminance, scaled so its maximum is 255."""
  x = img.astype(np.float64)
  if x.ndim == 3:
    if x.shape[-1] == 3:
      x = x @ np.array([0.299, 0.587, 0.114])
    else:
      x = x.mean(axis=-1)
  smooth, diff = np.array([1.0, 2.0, 1.0]), np.array([1.0, 0.0, -1.0])
  gx = _filter_axis(_filter_axis(x, smooth, 0), diff, 1)
  gy = _filter_axis(_filter_axis(x, diff, 0), smooth, 1)
  mag = np.hypot(gx, gy)
  top = mag.max()
  return _to_uint8(mag * (255.0 / top)) if top > 0 else np.zeros(mag.shape, np.uint8)


def _check_severity(kind: str, severity: int) -> None:
  if kind not in _KIND_CODE:
    raise ValueError(f"unknown corruption kind {kind!r}; use one of {ALL_KINDS}")
  allowed = (1, 2, 3) if kind in GRADED_KINDS else (FIXED_SEVERITY[kind],)
  if severity not in allowed:
    raise ValueError(f"kind {kind!r} takes severity {allowed}, got {severity!r}")


def corrupt(img: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Returns a corrupted copy (uint8, same shape) of a 2-D or HWC uint8 image.

  An alpha channel (2 or 4 channels) is kept unchanged. `rng` supplies all randomness.
  """
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim not in (2, 3):
    raise ValueError(f"corrupt: expected a uint8 HW or HWC image, got {img.dtype} {img.shape}")
  _check_severity(kind, severity)
  if kind in ("clean", "wrong_label"):
    return img.copy()
  color, alpha = _split_alpha(img)
  h, w = color.shape[:2]
  if kind == "noise":
    sigma = NOISE_SIGMA[severity] * 255.0
    out = _to_uint8(color.astype(np.float64) + rng.normal(0.0, sigma, size=color.shape))
  elif kind == "blur":
    out = gaussian_blur(color, max(0.5, BLUR_SIGMA[severity] * min(h, w)))
  elif kind == "occlusion":
    area = OCCLUSION_AREA[severity] * h * w
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    rh = int(round(min(h, math.sqrt(area * aspect))))
    rw = int(round(min(w, area / max(rh, 1))))
    rh = int(round(min(h, area / max(rw, 1))))
    rh, rw = max(rh, 1), max(rw, 1)
    top = int(rng.integers(0, h - rh + 1))
    left = int(rng.integers(0, w - rw + 1))
    out = color.copy()
    if rng.random() < 0.5:
      fill = _to_uint8(color.reshape(h, w, -1).mean(axis=(0, 1)))
      out[top:top + rh, left:left + rw] = fill if color.ndim == 3 else fill[0]
    else:
      out[top:top + rh, left:left + rw] = 0
  elif kind == "invert":
    out = 255 - color
  else:  # edges
    edges = sobel_edges(color)
    out = edges if color.ndim == 2 else np.repeat(edges[..., None], color.shape[-1], axis=-1)
  return _join_alpha(out, alpha)


def variant_list(kinds: Sequence[str] = ALL_KINDS,
                 severities: Sequence[int] = (1, 2, 3)) -> list[tuple[str, int]]:
  """The (kind, severity) variants: graded kinds at each of `severities`, others once."""
  kinds = list(kinds)
  if not kinds:
    raise ValueError("kinds is empty; pick some of " + str(ALL_KINDS))
  for k in kinds:
    if k not in _KIND_CODE:
      raise ValueError(f"unknown corruption kind {k!r}; use some of {ALL_KINDS}")
  if len(set(kinds)) != len(kinds):
    raise ValueError(f"kinds has duplicates: {kinds}")
  sev = sorted(set(int(s) for s in severities))
  if any(kind in GRADED_KINDS for kind in kinds) and (not sev or sev[0] < 1 or sev[-1] > 3):
    raise ValueError(f"severities must be a non-empty subset of (1, 2, 3), got {severities}")
  out = []
  for k in kinds:
    if k in GRADED_KINDS:
      out.extend((k, s) for s in sev)
    else:
      out.append((k, FIXED_SEVERITY[k]))
  return out


def assign_variants(labels: np.ndarray, num_classes: int, num_variants: int, *, seed: int,
                    copies_per_image: int = 1) -> np.ndarray:
  """Variant index of every (image, copy): int [N, copies], balanced per class.

  Within each class the images are put in a seeded random order and walked round-robin over
  a seeded permutation of the variants, so every class gets each variant
  floor or ceil(n_c * copies / num_variants) times, and the copies of one image get distinct
  variants (when copies_per_image <= num_variants). Depends only on (seed, labels).
  """
  labels = np.asarray(labels)
  out = np.empty((len(labels), copies_per_image), np.int64)
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if members.size == 0:
      continue
    rng = np.random.default_rng([seed, 0x5EED, c])
    order = rng.permutation(members)
    perm = rng.permutation(num_variants)
    slots = np.arange(len(order) * copies_per_image).reshape(len(order), copies_per_image)
    out[order] = perm[slots % num_variants]
  return out


def _fingerprint(images: np.ndarray, labels: np.ndarray, source_ids: Sequence[str]) -> str:
  h = hashlib.sha256()
  h.update(repr((images.shape, str(images.dtype))).encode())
  h.update(np.ascontiguousarray(images).tobytes())
  h.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
  h.update("\n".join(source_ids).encode())
  return h.hexdigest()


def build_controlled_pool(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                          root: str | os.PathLike, *, seed: int,
                          kinds: Sequence[str] = ALL_KINDS, severities: Sequence[int] = (1, 2, 3),
                          copies_per_image: int = 1, source_ids: Sequence[str] | None = None,
                          shard_size: int = 512, progress: bool = True) -> Path:
  """Writes a controlled pool of corrupted copies of `images` under `root`; returns root.

  Output image j = i * copies_per_image + copy is a variant of source image i with id
  f"ctrl-{j:06d}"; its variant comes from `assign_variants` and its randomness from
  (seed, i, copy) only, so an interrupted build resumes (finished shards are skipped) and
  produces the same files. Calling again with different arguments on the same root raises.
  Rows: class = label (another, uniformly random class for wrong_label), source
  "controlled", extras {"kind", "severity", "true_class", "source_id", "copy"}.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  names = [str(n) for n in class_names]
  n = len(images)
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    raise ValueError(f"images must be uint8 [N,H,W] or [N,H,W,C], got {images.dtype} "
                     f"{images.shape}")
  if labels.shape != (n,) or labels.dtype.kind not in "iu":
    raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
  if n and (labels.min() < 0 or labels.max() >= len(names)):
    raise ValueError(f"labels must lie in [0, {len(names)}) (len(class_names)), got "
                     f"[{labels.min()}, {labels.max()}]")
  if len(set(names)) != len(names):
    raise ValueError(f"class_names has duplicates: {names}")
  if copies_per_image < 1 or shard_size < 1:
    raise ValueError(f"copies_per_image ({copies_per_image}) and shard_size ({shard_size}) "
                     "must be >= 1")
  variants = variant_list(kinds, severities)
  if any(k == "wrong_label" for k, _ in variants) and len(names) < 2:
    raise ValueError("kind 'wrong_label' needs at least 2 classes; drop it from kinds")
  if source_ids is None:
    source_ids = [f"src-{i:06d}" for i in range(n)]
  source_ids = [str(s) for s in source_ids]
  if len(source_ids) != n:
    raise ValueError(f"source_ids has {len(source_ids)} entries, expected {n} (one per image)")

  root = Path(root)
  manifest = {
      "seed": int(seed), "variants": [list(v) for v in variants],
      "copies_per_image": int(copies_per_image), "shard_size": int(shard_size),
      "class_names": names, "num_images": n,
      "data_sha256": _fingerprint(images, labels, source_ids),
  }
  manifest_path = root / MANIFEST_NAME
  if manifest_path.is_file():
    old = sio.read_json(manifest_path)
    if old != manifest:
      diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
      raise ValueError(f"{root} holds a controlled pool built with other arguments (differing: "
                       f"{diff}); use a new root or delete {root}")
  else:
    sio.atomic_write_json(manifest_path, manifest)

  assignment = assign_variants(labels, len(names), len(variants), seed=seed,
                               copies_per_image=copies_per_image)
  total = n * copies_per_image
  num_shards = max(1, -(-total // shard_size))
  writer = PoolWriter(root)
  todo = [s for s in range(num_shards) if not writer.shard_done(s)]
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_shards, initial=num_shards - len(todo), desc="controlled pool",
               unit="shard")
  try:
    for s in todo:
      shard_images, rows = [], []
      for j in range(s * shard_size, min(total, (s + 1) * shard_size)):
        i, copy = divmod(j, copies_per_image)
        kind, severity = variants[assignment[i, copy]]
        rng = np.random.default_rng([seed, i, copy, _KIND_CODE[kind], severity])
        true_class = names[int(labels[i])]
        cls = true_class
        if kind == "wrong_label":
          others = [c for c in range(len(names)) if c != int(labels[i])]
          cls = names[others[int(rng.integers(len(others)))]]
        shard_images.append(corrupt(images[i], kind, severity, rng))
        rows.append({
            "id": f"ctrl-{j:06d}", "class": cls, "source": "controlled", "prompt": None,
            "attributes": {}, "seed": int(seed),
            "extras": {"kind": kind, "severity": int(severity), "true_class": true_class,
                       "source_id": source_ids[i], "copy": int(copy)},
        })
      writer.write_shard(s, shard_images, rows)
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  writer.finalize(num_shards)
  return root


def controlled_groups(pool: Any, *, by_severity: bool = False) -> dict[str, np.ndarray]:
  """Row indices (int64, ascending) per kind, from each row's extras["kind"].

  `pool` is a Pool or a list of rows. With by_severity the keys are "kind:severity".
  """
  rows = pool.rows if hasattr(pool, "rows") else pool
  groups: dict[str, list[int]] = {}
  for k, r in enumerate(rows):
    extras = r.get("extras") or {}
    if "kind" not in extras:
      raise ValueError(f"row {k} (id {r.get('id')!r}) has no extras['kind']; not a controlled "
                       "pool row (build it with build_controlled_pool)")
    key = f"{extras['kind']}:{extras.get('severity')}" if by_severity else str(extras["kind"])
    groups.setdefault(key, []).append(k)
  return {key: np.asarray(v, np.int64) for key, v in groups.items()}
