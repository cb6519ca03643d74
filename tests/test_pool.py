"""Tests for synthbandit_jax.data.pool."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthbandit_jax.data import pool as pool_lib


def _rows(ids, classes, source="sd-1.5"):
  return [{"id": i, "class": c, "source": source, "prompt": f"a photo of a {c}",
           "attributes": {"color": "red"}, "seed": k, "extras": {"k": k}}
          for k, (i, c) in enumerate(zip(ids, classes))]


def _write_two_shards(root, rng, size=8):
  images = rng.integers(0, 256, size=(7, size, size, 3), dtype=np.uint8)
  ids = [f"img{k}" for k in range(7)]
  classes = ["dog", "cat", "dog", "bird", "cat", "dog", "bird"]
  rows = _rows(ids, classes)
  rows[5]["source"] = "user"
  w = pool_lib.PoolWriter(root)
  w.write_shard(0, list(images[:4]), rows[:4])
  w.write_shard(1, list(images[4:]), rows[4:])
  w.finalize()
  return images, ids, classes, rows


def test_round_trip_in_order(tmp_path):
  rng = np.random.default_rng(0)
  images, ids, classes, rows = _write_two_shards(tmp_path, rng)
  assert (tmp_path / "images" / "shard_00001" / "img4.png").is_file()
  p = pool_lib.read_pool(tmp_path)
  assert p.class_names == ["bird", "cat", "dog"]
  assert p.ids == ids
  np.testing.assert_array_equal(p.images, images)
  assert p.labels.dtype == np.int32
  np.testing.assert_array_equal(p.labels, [2, 1, 2, 0, 1, 2, 0])
  assert p.rows[1]["path"] == "images/shard_00000/img1.png"
  assert p.rows[3]["prompt"] == "a photo of a bird" and p.rows[3]["extras"] == {"k": 3}
  assert p.skipped == [] and len(p) == 7
  # metadata.jsonl holds shard 0 rows then shard 1 rows.
  lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
  assert [json.loads(l)["id"] for l in lines] == ids


def test_corrupt_and_missing_files_are_skipped_not_relabelled(tmp_path, caplog):
  rng = np.random.default_rng(1)
  images, ids, classes, _ = _write_two_shards(tmp_path, rng)
  (tmp_path / "images/shard_00000/img1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  (tmp_path / "images/shard_00001/img5.png").unlink()
  with caplog.at_level(logging.WARNING):
    p = pool_lib.read_pool(tmp_path, class_names=["dog", "cat", "bird"])
  keep = [0, 2, 3, 4, 6]
  assert p.ids == [ids[k] for k in keep]
  np.testing.assert_array_equal(p.images, images[keep])
  order = {"dog": 0, "cat": 1, "bird": 2}
  np.testing.assert_array_equal(p.labels, [order[classes[k]] for k in keep])
  assert [s["id"] for s in p.skipped] == ["img1", "img5"]
  assert "unreadable" in p.skipped[0]["reason"]
  assert "missing" in p.skipped[1]["reason"]
  assert p.skipped[1]["path"] == "images/shard_00001/img5.png"
  assert "img1" in caplog.text and "img5" in caplog.text


def test_shard_done_and_unfinalized_pool(tmp_path):
  rng = np.random.default_rng(2)
  w = pool_lib.PoolWriter(tmp_path)
  assert not w.shard_done(0)
  imgs = rng.integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
  w.write_shard(0, list(imgs), _rows(["a", "b"], ["x", "y"]))
  assert w.shard_done(0) and not w.shard_done(1)
  with pytest.raises(ValueError, match=r"unfinished: \[1\]"):
    w.finalize(num_shards=2)
  # Images on disk without a metadata file do not count as a finished shard.
  (tmp_path / "images" / "shard_00001").mkdir(parents=True)
  (tmp_path / "images" / "shard_00001" / "c.png").write_bytes(b"x")
  assert not w.shard_done(1)
  p = pool_lib.read_pool(tmp_path)  # No metadata.jsonl yet: read from the shard files.
  np.testing.assert_array_equal(p.images, imgs)


def test_finalize_rejects_duplicate_ids(tmp_path):
  img = np.zeros((4, 4, 3), np.uint8)
  w = pool_lib.PoolWriter(tmp_path)
  w.write_shard(0, [img], [{"id": "a", "class": "x", "source": "s", "path": "images/0a.png"}])
  w.write_shard(1, [img], [{"id": "a", "class": "x", "source": "s", "path": "images/1a.png"}])
  with pytest.raises(ValueError, match=r"duplicate id.*'a'.*shard_00001\.jsonl:1"):
    w.finalize()
  with pytest.raises(ValueError, match="duplicate"):
    w.write_shard(2, [img, img], [{"id": "b", "class": "x", "source": "s"}] * 2)


def test_write_shard_validates(tmp_path):
  w = pool_lib.PoolWriter(tmp_path)
  img = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match="source"):
    w.write_shard(0, [img], [{"id": "a", "class": "x"}])
  with pytest.raises(ValueError, match="2 images but 1 rows"):
    w.write_shard(0, [img, img], [{"id": "a", "class": "x", "source": "s"}])
  with pytest.raises(ValueError, match="uint8"):
    w.write_shard(0, [img.astype(np.float32)], [{"id": "a", "class": "x", "source": "s"}])
  with pytest.raises(ValueError, match="file name"):
    w.write_shard(0, [img], [{"id": "../evil", "class": "x", "source": "s"}])
  assert not w.shard_done(0)


def _user_pool(root, rng):
  """A hand-made pool: metadata.jsonl plus files, no shards, mixed modes, minimal fields."""
  (root / "files").mkdir(parents=True)
  gray = rng.integers(0, 256, size=(6, 6), dtype=np.uint8)
  rgb = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
  Image.fromarray(gray).save(root / "files" / "g.png")
  Image.fromarray(rgb).save(root / "files" / "c.png")
  rows = [{"id": "g", "class": "cat", "path": "files/g.png"},
          {"id": "c", "class": "dog", "path": str(root / "files" / "c.png")}]
  (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return gray, rgb


def test_user_pool_with_only_metadata_jsonl(tmp_path):
  gray, rgb = _user_pool(tmp_path, np.random.default_rng(3))
  p = pool_lib.read_pool(tmp_path)
  assert p.images.shape == (2, 6, 6, 3)
  np.testing.assert_array_equal(p.images[0], np.repeat(gray[..., None], 3, axis=-1))
  np.testing.assert_array_equal(p.images[1], rgb)
  assert p.rows[0]["source"] == "user" and p.rows[0]["extras"] == {}
  # The metadata file itself may be passed.
  q = pool_lib.read_pool(tmp_path / "metadata.jsonl", channels=1)
  assert q.images.shape == (2, 6, 6, 1)
  np.testing.assert_array_equal(q.images[0, ..., 0], gray)


def test_metadata_errors_name_file_and_line(tmp_path):
  meta = tmp_path / "metadata.jsonl"
  meta.write_text('{"id": "a", "class": "x", "path": "a.png"}\n{"id": "b", "path": "b.png"}\n')
  with pytest.raises(ValueError, match=r"metadata\.jsonl:2.*missing.*class"):
    pool_lib.read_pool(tmp_path)
  meta.write_text('{"id": "a", "class": "x", "path": "a.png"}\n\n'
                  '{"id": "a", "class": "y", "path": "b.png"}\n')
  with pytest.raises(ValueError, match=r"duplicate id.*'a' at .*metadata\.jsonl:3 \(first at "
                     r".*metadata\.jsonl:1\)"):
    pool_lib.read_pool(tmp_path)
  meta.write_text('{"id": "a", "class": "x", "path": "a.png", "extras": 3}\n')
  with pytest.raises(ValueError, match="extras"):
    pool_lib.read_pool(tmp_path)
  meta.write_text('{"id": "a", "class": "x", "path": "a.png"\n')
  with pytest.raises(ValueError, match=r"metadata\.jsonl:1: not valid JSON"):
    pool_lib.read_pool(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a pool"):
    pool_lib.read_pool(tmp_path / "nothing")


def test_unknown_classes_error_and_skip(tmp_path):
  rng = np.random.default_rng(4)
  images, ids, classes, _ = _write_two_shards(tmp_path, rng)
  with pytest.raises(ValueError) as e:
    pool_lib.read_pool(tmp_path, class_names=["dog", "cat"])
  msg = str(e.value)
  assert "'bird' (2 rows)" in msg and "unknown_classes='skip'" in msg
  assert "'dog'" not in msg
  p = pool_lib.read_pool(tmp_path, class_names=["dog", "cat"], unknown_classes="skip")
  keep = [k for k, c in enumerate(classes) if c != "bird"]
  assert p.ids == [ids[k] for k in keep]
  np.testing.assert_array_equal(p.images, images[keep])
  assert sorted(s["id"] for s in p.skipped) == ["img3", "img6"]
  assert all("'bird'" in s["reason"] for s in p.skipped)


def test_mixed_sizes_need_image_size(tmp_path):
  w = pool_lib.PoolWriter(tmp_path)
  a = np.full((4, 4, 3), 10, np.uint8)
  b = np.full((6, 8, 3), 200, np.uint8)
  w.write_shard(0, [a, b], _rows(["a", "b"], ["x", "x"]))
  w.finalize()
  with pytest.raises(ValueError,
                     match=r"different sizes.*a\.png is 4x4x3.*b\.png is 6x8x3.*image_size"):
    pool_lib.read_pool(tmp_path)
  with pytest.raises(ValueError, match="different sizes"):
    list(pool_lib.iter_pool(tmp_path, batch_size=4))
  p = pool_lib.read_pool(tmp_path, image_size=(5, 5))
  assert p.images.shape == (2, 5, 5, 3)
  # Constant images stay constant under any resize.
  assert (p.images[0] == 10).all() and (p.images[1] == 200).all()


def test_iter_pool_batches_and_skips(tmp_path):
  rng = np.random.default_rng(5)
  images, ids, classes, _ = _write_two_shards(tmp_path, rng)
  (tmp_path / "images/shard_00000/img2.png").write_bytes(b"broken")
  reader = pool_lib.iter_pool(tmp_path, batch_size=3, class_names=["bird", "cat", "dog"])
  assert len(reader) == 7
  batches = list(reader)
  assert [b[0].shape[0] for b in batches] == [3, 3]
  got_imgs = np.concatenate([b[0] for b in batches])
  got_ids = [r["id"] for b in batches for r in b[1]]
  keep = [0, 1, 3, 4, 5, 6]
  assert got_ids == [ids[k] for k in keep]
  np.testing.assert_array_equal(got_imgs, images[keep])
  assert [s["id"] for s in reader.skipped] == ["img2"]
  np.testing.assert_array_equal(reader.labels(batches[0][1]), [2, 1, 0])  # dog, cat, bird
  # A second pass starts over with a fresh skipped list.
  assert sum(b[0].shape[0] for b in reader) == 6 and len(reader.skipped) == 1
  # Same result as read_pool.
  np.testing.assert_array_equal(pool_lib.read_pool(tmp_path).images, got_imgs)


def test_iter_pool_ids_reads_those_rows_in_that_order(tmp_path):
  rng = np.random.default_rng(7)
  images, ids, _, _ = _write_two_shards(tmp_path, rng)
  want = [ids[5], ids[0], ids[3]]
  reader = pool_lib.iter_pool(tmp_path, batch_size=2, ids=want)
  assert len(reader) == 3
  got = [(r["id"], img) for batch, rows in reader for r, img in zip(rows, batch)]
  assert [i for i, _ in got] == want
  np.testing.assert_array_equal(np.stack([img for _, img in got]), images[[5, 0, 3]])
  with pytest.raises(KeyError, match=r"1 of the 2 requested ids.*'nope'"):
    pool_lib.iter_pool(tmp_path, batch_size=2, ids=[ids[0], "nope"])
  with pytest.raises(ValueError, match="duplicate"):
    pool_lib.iter_pool(tmp_path, batch_size=2, ids=[ids[0], ids[0]])


def test_summary_and_subset(tmp_path):
  rng = np.random.default_rng(6)
  images, ids, classes, _ = _write_two_shards(tmp_path, rng)
  p = pool_lib.read_pool(tmp_path, class_names=["dog", "cat", "bird", "fish"])
  s = pool_lib.pool_summary(p)
  assert s["num_images"] == 7 and s["num_skipped"] == 0
  assert s["per_class"] == {"dog": 3, "cat": 2, "bird": 2, "fish": 0}
  assert s["per_source"] == {"sd-1.5": 6, "user": 1}
  assert s["per_class_source"]["dog"] == {"sd-1.5": 2, "user": 1}
  assert s["image_shape"] == [8, 8, 3]
  sub = p.subset([5, 0])
  assert sub.ids == ["img5", "img0"]
  np.testing.assert_array_equal(sub.images, images[[5, 0]])
  np.testing.assert_array_equal(sub.labels, [0, 0])
  mask = np.array([c == "cat" for c in classes])
  assert p.subset(mask).ids == ["img1", "img4"]
  json.dumps(s)  # JSON-serialisable.
