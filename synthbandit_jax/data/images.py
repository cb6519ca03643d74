"""Image decoding, channel conversion and resizing, with one documented policy.

All images in the project are uint8 arrays in HWC layout (NHWC for batches), values 0..255.

Channel policy (`convert_channels`):
  * input channels: 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA); a 2-D array is gray.
  * gray -> RGB repeats the gray value in R, G and B.
  * RGB -> gray uses ITU-R BT.601 luma, `Y = 0.299 R + 0.587 G + 0.114 B`, rounded half up.
  * alpha (2 or 4 channels) is removed first: `alpha="white"` or `"black"` composites the
    colour over that background, `out = round((c * a + bg * (255 - a)) / 255)`;
    `alpha="drop"` ignores the alpha channel.

Resize policy (`resize`), done with PIL:
  * methods: nearest, bilinear, bicubic, lanczos, area (PIL's box filter). PIL widens the filter
    when shrinking, so bilinear/bicubic/lanczos downsampling is antialiased.
  * `fit="stretch"` maps the whole image onto (H, W), changing the aspect ratio if needed.
  * `fit="center_crop"` keeps the aspect ratio: the image is scaled so that it covers (H, W)
    (its shorter side relative to the target matches) and the overflow is cut equally from both
    sides. It is done in one resampling step from the central source box of the target's
    aspect ratio, which equals "resize the shorter side, then crop" without a second
    interpolation.
  * a request for the image's own size with a matching aspect ratio returns the pixels as-is.

File decoding (`load_image_file`): the first frame of multi-frame files; EXIF orientation is
applied; palette images become RGB or RGBA (if they carry transparency); 16-bit gray is scaled
to 8 bits (`round(v / 257)`); CMYK / YCbCr / LAB / HSV become RGB. Unreadable, corrupt or
truncated files raise `ImageReadError`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")

ALPHA_MODES = ("white", "black", "drop")
FIT_MODES = ("stretch", "center_crop")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}
RESIZE_METHODS = tuple(_RESAMPLE)


class ImageReadError(ValueError):
  """An image file could not be read; carries `path` and `reason`."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"{self.path}: cannot read image ({reason})")


def _as_hwc(img: np.ndarray, what: str = "image") -> np.ndarray:
  img = np.asarray(img)
  if img.dtype != np.uint8:
    raise ValueError(f"{what}: expected uint8 values 0..255, got dtype {img.dtype}")
  if img.ndim == 2:
    img = img[:, :, None]
  if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f"{what}: expected shape HW or HWC with C in 1..4, got {img.shape}")
  return img


def _check_choice(value: str, choices: tuple[str, ...], arg: str) -> None:
  if value not in choices:
    raise ValueError(f"{arg}={value!r} is not one of {list(choices)}")


def _luma(rgb: np.ndarray) -> np.ndarray:
  y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
  return np.floor(y + 0.5).clip(0, 255).astype(np.uint8)[..., None]


def _remove_alpha(img: np.ndarray, alpha: str) -> np.ndarray:
  color, a = img[..., :-1], img[..., -1:]
  if alpha == "drop":
    return color
  bg = 255 if alpha == "white" else 0
  c = color.astype(np.uint32)
  a = a.astype(np.uint32)
  # round((c*a + bg*(255-a)) / 255), in integers, half up.
  out = (c * a + bg * (255 - a) + 127) // 255
  return out.astype(np.uint8)


def convert_channels(img: np.ndarray, channels: int, alpha: str = "white") -> np.ndarray:
  """Converts a uint8 HW/HWC image (C in 1..4) to HWC with `channels` (1 or 3) channels.

  See the module docstring for the policy (601 luma, alpha over white/black or dropped).
  """
  _check_choice(alpha, ALPHA_MODES, "alpha")
  if channels not in (1, 3):
    raise ValueError(f"channels={channels!r}: must be 1 (gray) or 3 (RGB)")
  img = _as_hwc(img)
  if img.shape[-1] in (2, 4):
    img = _remove_alpha(img, alpha)
  c = img.shape[-1]
  if c == channels:
    return img
  if c == 1:
    return np.repeat(img, 3, axis=-1)
  return _luma(img)


def _pil_from_hwc(img: np.ndarray) -> Image.Image:
  if img.shape[-1] == 1:
    return Image.fromarray(img[..., 0])
  return Image.fromarray(np.ascontiguousarray(img))  # L, LA, RGB or RGBA from the shape


def _crop_box(h: int, w: int, out_h: int, out_w: int) -> tuple[float, float, float, float]:
  """Central source box (left, top, right, bottom) with the target's aspect ratio."""
  if w * out_h > h * out_w:  # source is wider than the target
    cw = h * out_w / out_h
    left = (w - cw) / 2
    return (left, 0.0, left + cw, float(h))
  ch = w * out_h / out_w
  top = (h - ch) / 2
  return (0.0, top, float(w), top + ch)


def resize(img: np.ndarray, size: tuple[int, int], method: str = "bilinear",
           fit: str = "stretch") -> np.ndarray:
  """Resizes a uint8 HW/HWC image to `size` = (H, W); returns uint8 HWC.

  `fit` is "stretch" (ignore aspect ratio) or "center_crop" (keep aspect ratio, cover the
  target, cut the overflow equally from both sides). See the module docstring.
  """
  _check_choice(method, RESIZE_METHODS, "resize_method")
  _check_choice(fit, FIT_MODES, "fit")
  img = _as_hwc(img)
  out_h, out_w = (int(s) for s in size)
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f"size={size!r}: height and width must be positive")
  h, w = img.shape[:2]
  if fit == "stretch" or w * out_h == h * out_w:
    if (h, w) == (out_h, out_w):
      return img.copy()
    box = None
  else:
    box = _crop_box(h, w, out_h, out_w)
  pil = _pil_from_hwc(img)
  out = np.asarray(pil.resize((out_w, out_h), resample=_RESAMPLE[method], box=box))
  if out.ndim == 2:
    out = out[..., None]
  return np.ascontiguousarray(out, dtype=np.uint8)


def _to_uint8(images: np.ndarray, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if images.dtype == np.bool_ or not np.issubdtype(images.dtype, np.integer):
    hint = (" (for floats in [0, 1] use np.round(x * 255).astype(np.uint8))"
            if np.issubdtype(images.dtype, np.floating) else "")
    raise ValueError(f"{what}: expected uint8 or integer values 0..255, got dtype "
                     f"{images.dtype}{hint}")
  if images.size and (images.min() < 0 or images.max() > 255):
    raise ValueError(f"{what}: integer values must lie in 0..255, got range "
                     f"[{images.min()}, {images.max()}]")
  return images.astype(np.uint8)


def prepare_image(img: np.ndarray, *, channels: int | None = None,
                  size: tuple[int, int] | None = None, alpha: str = "white",
                  resize_method: str = "bilinear", fit: str = "stretch") -> np.ndarray:
  """Channel conversion and resize of one HW/HWC image; returns uint8 HWC.

  `channels=None` keeps 1 or 3 channels and removes alpha (2 -> 1, 4 -> 3).
  """
  img = _as_hwc(_to_uint8(img, "image"))
  c = img.shape[-1]
  target = channels if channels is not None else (1 if c <= 2 else 3)
  if size is not None and c == 1 and target == 3:
    # Resizing is per channel, so resizing the gray plane first gives identical pixels.
    return convert_channels(resize(img, size, resize_method, fit), 3, alpha)
  img = convert_channels(img, target, alpha)
  if size is not None:
    img = resize(img, size, resize_method, fit)
  return img


def prepare_images(images: np.ndarray, *, channels: int | None = None,
                   size: tuple[int, int] | None = None, alpha: str = "white",
                   resize_method: str = "bilinear", fit: str = "stretch") -> np.ndarray:
  """Converts a batch (NHW or NHWC, uint8 or integers 0..255) to uint8 NHWC.

  `channels`: 1, 3 or None (keep; alpha removed). `size`: (H, W) or None (keep).
  Floats are rejected: scale them to 0..255 and cast to uint8 first.
  """
  images = _to_uint8(images, "images")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f"images: expected shape NHW or NHWC with C in 1..4, got {images.shape}")
  _check_choice(alpha, ALPHA_MODES, "alpha")
  _check_choice(resize_method, RESIZE_METHODS, "resize_method")
  _check_choice(fit, FIT_MODES, "fit")
  if channels is not None and channels not in (1, 3):
    raise ValueError(f"channels={channels!r}: must be 1, 3 or None")
  n, h, w, c = images.shape
  target_c = channels if channels is not None else (1 if c <= 2 else 3)
  out_h, out_w = (int(size[0]), int(size[1])) if size is not None else (h, w)
  if size is None:
    if c == target_c:
      return images.copy()
    # Channel conversion is elementwise: do the whole batch at once.
    return convert_channels(images.reshape(n * h, w, c), target_c, alpha).reshape(
        n, h, w, target_c)
  out = np.empty((n, out_h, out_w, target_c), np.uint8)
  for i in range(n):
    out[i] = prepare_image(images[i], channels=target_c, size=(out_h, out_w), alpha=alpha,
                           resize_method=resize_method, fit=fit)
  return out


def _decode_native(img: Image.Image) -> np.ndarray:
  """PIL image -> uint8 HWC with 1, 2, 3 or 4 channels (see module docstring)."""
  mode = img.mode
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  elif mode == "PA":
    img = img.convert("RGBA")
  elif mode == "1":
    img = img.convert("L")
  elif mode == "La":
    img = img.convert("LA")
  elif mode == "RGBa":
    img = img.convert("RGBA")
  elif mode.startswith("I") or mode == "F":
    arr = np.asarray(img).astype(np.float64)
    if mode.startswith("I;16") or (arr.size and arr.max() > 255):
      arr = arr / 257.0
    return np.floor(arr + 0.5).clip(0, 255).astype(np.uint8)[..., None]
  elif mode not in ("L", "LA", "RGB", "RGBA"):
    img = img.convert("RGB")
  arr = np.asarray(img, dtype=np.uint8)
  if arr.ndim == 2:
    arr = arr[..., None]
  return arr


def read_image_native(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file to uint8 HWC in its own channels (1, 2, 3 or 4).

  Raises:
    ImageReadError: missing, unreadable, corrupt or truncated file.
  """
  path = Path(path)
  try:
    with Image.open(path) as im:
      im.seek(0)
      im.load()  # Forces a full decode, so truncated files fail here.
      try:
        im = ImageOps.exif_transpose(im)
      except Exception:  # pylint: disable=broad-except  # Bad EXIF: keep pixels as stored.
        pass
      return _decode_native(im)
  except FileNotFoundError as e:
    raise ImageReadError(path, "file not found") from e
  except Image.DecompressionBombError as e:
    raise ImageReadError(path, f"too large ({e})") from e
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types.
    raise ImageReadError(path, f"{type(e).__name__}: {e}") from e


def load_image_file(path: str | os.PathLike, *, channels: int | None = 3,
                    size: tuple[int, int] | None = None, alpha: str = "white",
                    resize_method: str = "bilinear", fit: str = "stretch") -> np.ndarray:
  """Reads one image file to uint8 HWC (`channels` 1, 3, or None = the file's own, alpha
  removed), optionally resized to `size` = (H, W).

  Raises:
    ImageReadError: missing, unreadable, corrupt or truncated file.
  """
  arr = read_image_native(path)
  return prepare_image(arr, channels=channels, size=size, alpha=alpha,
                       resize_method=resize_method, fit=fit)


def encode_png(img: np.ndarray) -> bytes:
  """Encodes a uint8 HW or HWC (C in 1..4) image as PNG bytes."""
  img = _as_hwc(img)
  buf = io.BytesIO()
  _pil_from_hwc(img).save(buf, format="PNG")
  return buf.getvalue()
