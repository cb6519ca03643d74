"""Tests for synthbandit_jax.data.images and synthbandit_jax.data.real."""
from __future__ import annotations

import csv
import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthbandit_jax import assets
from synthbandit_jax.data import images as im
from synthbandit_jax.data import real

# ----------------------------------------------------------------------------- images.py


def test_convert_channels_gray_rgb():
  gray = np.array([[0, 7], [128, 255]], np.uint8)
  rgb = im.convert_channels(gray, 3)
  assert rgb.shape == (2, 2, 3)
  for ch in range(3):
    np.testing.assert_array_equal(rgb[..., ch], gray)
  px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
  # 601 luma by hand: 76.245, 149.685, 29.07, 2.99 + 11.74 + 3.42 = 18.15.
  assert im.convert_channels(px, 1)[0, :, 0].tolist() == [76, 150, 29, 18]
  np.testing.assert_array_equal(im.convert_channels(px, 3), px)


def test_convert_channels_alpha_policies():
  rgba = np.array([[[200, 100, 0, 128], [9, 9, 9, 255], [9, 9, 9, 0]]], np.uint8)
  # over white: (c*128 + 255*127)/255 -> 227.39, 177.20, 127.0
  white = im.convert_channels(rgba, 3, alpha="white")
  assert white[0].tolist() == [[227, 177, 127], [9, 9, 9], [255, 255, 255]]
  black = im.convert_channels(rgba, 3, alpha="black")
  assert black[0].tolist() == [[100, 50, 0], [9, 9, 9], [0, 0, 0]]
  drop = im.convert_channels(rgba, 3, alpha="drop")
  assert drop[0].tolist() == [[200, 100, 0], [9, 9, 9], [9, 9, 9]]
  la = np.array([[[100, 51]]], np.uint8)  # (100*51 + 255*204)/255 = 224.0
  assert im.convert_channels(la, 1, alpha="white")[0, 0, 0] == 224
  assert im.convert_channels(la, 3, alpha="black")[0, 0].tolist() == [20, 20, 20]
  with pytest.raises(ValueError, match="alpha"):
    im.convert_channels(rgba, 3, alpha="grey")
  with pytest.raises(ValueError, match="channels"):
    im.convert_channels(rgba, 4)


def test_resize_nearest_stretch_and_center_crop():
  # H=4, W=8: left quarter 0, middle half 100, right quarter 200.
  img = np.zeros((4, 8, 1), np.uint8)
  img[:, 2:6] = 100
  img[:, 6:] = 200
  stretch = im.resize(img, (4, 4), method="nearest", fit="stretch")
  assert stretch.shape == (4, 4, 1)
  assert stretch[0, :, 0].tolist() == [0, 100, 100, 200]  # samples x = 1, 3, 5, 7
  crop = im.resize(img, (4, 4), method="nearest", fit="center_crop")
  assert np.all(crop == 100)  # only the central 4x4 box remains
  up = im.resize(np.array([[1, 2], [3, 4]], np.uint8), (4, 4), method="nearest")
  assert up[..., 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
  # area == block mean when shrinking by an integer factor.
  blocks = np.array([[0, 4, 10, 10], [8, 4, 10, 30], [1, 1, 0, 0], [1, 1, 0, 200]], np.uint8)
  area = im.resize(blocks, (2, 2), method="area")
  assert area[..., 0].tolist() == [[4, 15], [1, 50]]
  same = im.resize(img, (4, 8), method="bicubic")
  np.testing.assert_array_equal(same, img)
  rgb = im.resize(np.zeros((10, 20, 3), np.uint8), (5, 5), method="lanczos", fit="center_crop")
  assert rgb.shape == (5, 5, 3) and rgb.dtype == np.uint8
  with pytest.raises(ValueError, match="resize_method"):
    im.resize(img, (2, 2), method="cubic")
  with pytest.raises(ValueError, match="fit"):
    im.resize(img, (2, 2), fit="pad")


def test_prepare_images_shapes_and_dtypes():
  batch = np.random.default_rng(0).integers(0, 256, (3, 6, 6), dtype=np.int64)
  out = im.prepare_images(batch)
  assert out.dtype == np.uint8 and out.shape == (3, 6, 6, 1)
  np.testing.assert_array_equal(out[..., 0], batch)
  rgb = im.prepare_images(batch, channels=3, size=(3, 3), resize_method="area")
  assert rgb.shape == (3, 3, 3, 3)
  ref = im.resize(batch[1].astype(np.uint8), (3, 3), method="area")
  np.testing.assert_array_equal(rgb[1], np.repeat(ref, 3, axis=-1))
  rgba = np.zeros((2, 4, 4, 4), np.uint8)
  assert im.prepare_images(rgba).shape == (2, 4, 4, 3)  # alpha removed, over white
  assert np.all(im.prepare_images(rgba) == 255)
  assert im.prepare_images(np.zeros((0, 5, 5, 3), np.uint8), size=(2, 2)).shape == (0, 2, 2, 3)
  with pytest.raises(ValueError, match="float"):
    im.prepare_images(np.zeros((1, 2, 2), np.float32))
  with pytest.raises(ValueError, match=r"0\.\.255"):
    im.prepare_images(np.full((1, 2, 2), 300))
  with pytest.raises(ValueError, match="NHW"):
    im.prepare_images(np.zeros((2, 2), np.uint8))


def test_png_roundtrip_and_load_image_file(tmp_path):
  rng = np.random.default_rng(1)
  rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
  p = tmp_path / "a.png"
  p.write_bytes(im.encode_png(rgba))
  np.testing.assert_array_equal(np.asarray(Image.open(p)), rgba)
  np.testing.assert_array_equal(im.read_image_native(p), rgba)
  np.testing.assert_array_equal(im.load_image_file(p, channels=3, alpha="drop"), rgba[..., :3])
  gray = im.load_image_file(p, channels=1, alpha="black", size=(10, 14), resize_method="nearest")
  assert gray.shape == (10, 14, 1)
  g = tmp_path / "g.png"
  g.write_bytes(im.encode_png(rgba[..., 0]))
  assert im.load_image_file(g, channels=None).shape == (5, 7, 1)
  assert im.load_image_file(g).shape == (5, 7, 3)
  # 16-bit gray is scaled to 8 bits.
  g16 = tmp_path / "g16.png"
  Image.fromarray(np.array([[0, 257, 65535]], np.uint16)).save(g16)
  assert im.load_image_file(g16, channels=1)[0, :, 0].tolist() == [0, 1, 255]
  # Palette image with transparency -> RGBA -> over white.
  pal = Image.new("P", (2, 1))
  pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
  pal.putpixel((0, 0), 0)
  pal.putpixel((1, 0), 1)
  pal.info["transparency"] = 1
  pp = tmp_path / "pal.png"
  pal.save(pp, transparency=1)
  assert im.load_image_file(pp)[0].tolist() == [[10, 20, 30], [255, 255, 255]]


def test_load_image_file_errors(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"this is not an image")
  with pytest.raises(im.ImageReadError) as ei:
    im.load_image_file(bad)
  assert ei.value.path == str(bad) and str(bad) in str(ei.value)
  full = im.encode_png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
  trunc = tmp_path / "trunc.png"
  trunc.write_bytes(full[: len(full) // 2])
  with pytest.raises(im.ImageReadError, match="trunc.png"):
    im.load_image_file(trunc)
  with pytest.raises(im.ImageReadError, match="not found"):
    im.load_image_file(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- ImageDataset


def _ds(labels, names=("a", "b", "c")):
  labels = np.asarray(labels)
  imgs = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1),
                                                                              np.uint8)
  return real.ImageDataset(imgs, labels, list(names), [f"id{i}" for i in range(len(labels))],
                           skipped=[{"path": "p", "reason": "r"}])


def test_image_dataset_basics():
  ds = _ds([0, 2, 2, 1, 2])
  assert len(ds) == 5 and ds.labels.dtype == np.int32
  assert ds.counts() == {"a": 1, "b": 1, "c": 3}
  sub = ds.subset([4, 0])
  assert sub.ids == ["id4", "id0"] and sub.labels.tolist() == [2, 0]
  assert sub.images[:, 0, 0, 0].tolist() == [4, 0] and sub.skipped == ds.skipped
  masked = ds.subset(ds.labels == 2)
  assert masked.ids == ["id1", "id2", "id4"]
  assert masked.counts() == {"a": 0, "b": 0, "c": 3}
  empty = ds.subset([])
  assert len(empty) == 0 and empty.images.shape == (0, 2, 2, 1)
  with pytest.raises(ValueError, match="labels must lie"):
    _ds([0, 3])
  with pytest.raises(ValueError, match="uint8"):
    real.ImageDataset(np.zeros((1, 2, 2, 1), np.float32), [0], ["a"], ["x"])


# ----------------------------------------------------------------------------- loaders


def test_load_mnist5k_matches_independent_parse():
  ds = real.load_mnist5k()
  assert ds.images.shape == (5000, 28, 28, 1) and ds.images.dtype == np.uint8
  assert ds.class_names == [str(d) for d in range(10)]
  assert set(ds.counts().values()) == {500}
  assert ds.ids[123] == "mnist5k/00123" and len(set(ds.ids)) == 5000
  with gzip.open(assets.fetch("mnist5k"), "rt") as f:
    rows = list(csv.reader(f))
  for i in (0, 2500, 4999):
    vals = [int(float(v)) for v in rows[i]]
    assert ds.labels[i] == vals[-1]
    np.testing.assert_array_equal(ds.images[i, :, :, 0].ravel(), vals[:784])
  # Digits are dark-background strokes: the border is empty, the centre is not.
  assert ds.images[:, 0, :, :].max() == 0 or ds.images[:, 0].mean() < 1
  assert ds.images[:, 10:18, 10:18].mean() > 50
  small = real.load_mnist5k(channels=3, image_size=(14, 14), max_per_class=3, seed=1)
  assert small.images.shape == (30, 14, 14, 3)


def test_load_digits_scaling():
  from sklearn.datasets import load_digits
  sk = load_digits()
  ds = real.load_digits()
  assert ds.images.shape == (1797, 8, 8, 1) and len(ds) == len(sk.target)
  np.testing.assert_array_equal(ds.labels, sk.target)
  v = sk.images.astype(int)
  lut = {0: 0, 1: 16, 8: 128, 15: 239, 16: 255}  # round(v * 255 / 16) by hand
  for k, want in lut.items():
    assert np.all(ds.images[..., 0][v == k] == want)
  np.testing.assert_array_equal(ds.images[..., 0], np.rint(sk.images * 255 / 16))
  assert ds.class_names == [str(t) for t in sk.target_names]


def test_load_digits_falls_back_to_sklearn_when_its_csv_moved(monkeypatch):
  import importlib.util
  import types
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name: types.SimpleNamespace(submodule_search_locations=[]))
  a, b = real._digits_arrays()  # pylint: disable=protected-access
  monkeypatch.undo()
  c, d = real._digits_arrays()  # pylint: disable=protected-access
  np.testing.assert_array_equal(a, c)
  np.testing.assert_array_equal(b, d)


def _write_png(path: Path, arr: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(im.encode_png(arr))


def _make_folder(root: Path, per_class=3, size=(6, 5), classes=("dog", "cat")):
  rng = np.random.default_rng(0)
  truth = {}
  for c in classes:
    for i in range(per_class):
      arr = rng.integers(0, 256, size + (3,), dtype=np.uint8)
      rel = f"{c}/img{i}.png"
      _write_png(root / rel, arr)
      truth[rel] = arr
  return truth


def test_load_imagefolder(tmp_path, caplog):
  truth = _make_folder(tmp_path)
  (tmp_path / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  (tmp_path / "cat" / "notes.txt").write_text("ignored")
  (tmp_path / ".hidden").mkdir()
  (tmp_path / "dog" / ".DS_Store.png").write_bytes(b"junk")
  with caplog.at_level(logging.WARNING):
    ds = real.load_imagefolder(tmp_path)
  assert ds.class_names == ["cat", "dog"]
  assert ds.ids == sorted(truth)
  assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
  for img, i in zip(ds.images, ds.ids):
    np.testing.assert_array_equal(img, truth[i])
  assert len(ds.skipped) == 1 and ds.skipped[0]["path"].endswith("broken.jpg")
  assert ds.skipped[0]["reason"]
  assert any("broken.jpg" in r.getMessage() for r in caplog.records)
  gray = real.load_imagefolder(tmp_path, channels=1, image_size=(3, 3))
  assert gray.images.shape == (6, 3, 3, 1)


def test_load_imagefolder_errors(tmp_path):
  _make_folder(tmp_path / "a")
  (tmp_path / "a" / "empty_class").mkdir()
  with pytest.raises(ValueError, match="empty_class"):
    real.load_imagefolder(tmp_path / "a")
  _make_folder(tmp_path / "b", per_class=1)
  _write_png(tmp_path / "b" / "cat" / "big.png", np.zeros((9, 9, 3), np.uint8))
  with pytest.raises(ValueError, match="image_size"):
    real.load_imagefolder(tmp_path / "b")
  ok = real.load_imagefolder(tmp_path / "b", image_size=(4, 4), fit="center_crop")
  assert ok.images.shape == (3, 4, 4, 3)
  (tmp_path / "c").mkdir()
  with pytest.raises(ValueError, match="no class subdirectories"):
    real.load_imagefolder(tmp_path / "c")
  with pytest.raises(FileNotFoundError):
    real.load_imagefolder(tmp_path / "nope")


def test_imagefolder_mixed_channels_become_rgb(tmp_path):
  _write_png(tmp_path / "x" / "g.png", np.full((4, 4), 50, np.uint8))
  _write_png(tmp_path / "y" / "c.png", np.zeros((4, 4, 3), np.uint8))
  assert real.load_imagefolder(tmp_path, channels=None).images.shape == (2, 4, 4, 3)
  _write_png(tmp_path / "x" / "g.png", np.full((4, 4), 50, np.uint8))
  only_gray = tmp_path / "g"
  _write_png(only_gray / "x" / "g.png", np.full((4, 4), 50, np.uint8))
  assert real.load_imagefolder(only_gray, channels=None).images.shape == (1, 4, 4, 1)


def test_load_npz(tmp_path):
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (6, 5, 5), dtype=np.uint8)
  p = tmp_path / "d.npz"
  np.savez(p, images=imgs, labels=np.array([0, 1, 2, 0, 1, 2]),
           class_names=np.array(["x", "y", "z"]))
  ds = real.load_npz(p)
  assert ds.class_names == ["x", "y", "z"] and ds.images.shape == (6, 5, 5, 1)
  np.testing.assert_array_equal(ds.images[..., 0], imgs)
  assert ds.ids[0] == "d/00000"
  np.savez(tmp_path / "bad.npz", pictures=imgs, labels=np.zeros(6, int))
  with pytest.raises(KeyError, match=r"missing key\(s\) \['images'\].*found keys \['labels', "
                                     r"'pictures'\]"):
    real.load_npz(tmp_path / "bad.npz")
  np.savez(tmp_path / "f.npz", images=imgs / 255.0, labels=np.zeros(6, int))
  with pytest.raises(ValueError, match="f.npz.*float"):
    real.load_npz(tmp_path / "f.npz")


def test_load_real_specs(tmp_path):
  digits = real.load_real("digits")
  assert set(digits) == {"all"} and digits["all"].images.shape[-1] == 1
  assert real.load_real("digits", channels=3)["all"].images.shape[-1] == 3

  folder = tmp_path / "f"
  tr = _make_folder(folder / "train", per_class=4)
  _make_folder(folder / "test", per_class=2)
  got = real.load_real(f"folder:{folder}")
  assert set(got) == {"train", "test"}
  assert got["train"].ids[0] == "train/cat/img0.png" and len(got["test"]) == 4
  np.testing.assert_array_equal(got["train"].images[0], tr["cat/img0.png"])
  sub = real.load_real(f"folder:{folder}", max_per_class=2, seed=3)
  sub2 = real.load_real(f"folder:{folder}", max_per_class=2, seed=3)
  assert sub["train"].counts() == {"cat": 2, "dog": 2} and sub["train"].ids == sub2["train"].ids
  assert set(real.load_real(f"folder:{folder / 'train'}")) == {"all"}

  npzdir = tmp_path / "n"
  npzdir.mkdir()
  np.savez(npzdir / "train.npz", images=np.zeros((4, 3, 3, 3), np.uint8),
           labels=np.array([0, 1, 2, 3]))
  np.savez(npzdir / "test.npz", images=np.zeros((2, 3, 3, 3), np.uint8), labels=np.array([0, 1]))
  pair = real.load_real(f"npz:{npzdir}")
  assert pair["train"].class_names == pair["test"].class_names == ["0", "1", "2", "3"]
  assert set(real.load_real(f"npz:{npzdir / 'train.npz'}")) == {"all"}
  with pytest.raises(ValueError, match="valid forms: mnist5k, digits, folder:"):
    real.load_real("imagenet")


def test_max_per_class_is_deterministic_and_seeded():
  a = real.load_real("digits", max_per_class=5, seed=0)["all"]
  b = real.load_real("digits", max_per_class=5, seed=0)["all"]
  c = real.load_real("digits", max_per_class=5, seed=1)["all"]
  assert set(a.counts().values()) == {5} and a.ids == b.ids and a.ids != c.ids
  full = real.load_digits()
  pos = [full.ids.index(i) for i in a.ids]
  np.testing.assert_array_equal(a.images, full.images[pos])


def test_load_tfds_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    got = real.load_real("tfds:mnist", image_size=(8, 8))
    assert set(got) == {"train", "test"}
    tr = got["train"]
    assert tr.images.shape == (12, 8, 8, 1) and tr.class_names == [str(d) for d in range(10)]
    assert tr.ids[0] == "mnist/train/000000"
    src = tfds.data_source("mnist", split="train")
    want = [int(src[i]["label"]) for i in range(12)]
    assert tr.labels.tolist() == want
    full = real.load_tfds("mnist", split_map={"all": "train"}, channels=3)
    assert set(full) == {"all"} and full["all"].images.shape == (12, 28, 28, 3)
    np.testing.assert_array_equal(full["all"].images[3, ..., 0],
                                  np.asarray(src[3]["image"])[..., 0])
    with pytest.raises(KeyError, match="no feature 'img'"):
      real.load_tfds("mnist", image_key="img")
