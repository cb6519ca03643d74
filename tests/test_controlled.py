"""Tests for synthbandit_jax.data.controlled."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from synthbandit_jax.data import controlled
from synthbandit_jax.data import pool as pool_lib

CLASSES = ["zero", "one", "two"]


def _data(n_per_class=14, size=12, seed=0):
  rng = np.random.default_rng(seed)
  n = n_per_class * len(CLASSES)
  images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
  labels = labels[rng.permutation(n)]
  return images, labels


def _mse(a, b):
  return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def test_corrupt_kinds():
  rng = np.random.default_rng(0)
  img = rng.integers(40, 216, size=(28, 28, 3), dtype=np.uint8)
  r = lambda s=0: np.random.default_rng(s)
  np.testing.assert_array_equal(controlled.corrupt(img, "clean", 0, r()), img)
  np.testing.assert_array_equal(controlled.corrupt(img, "wrong_label", 0, r()), img)
  np.testing.assert_array_equal(controlled.corrupt(img, "invert", 1, r()),
                                255 - img.astype(np.int64))
  # Noise: MSE grows with severity and is near sigma^2 at the lowest (no clipping there).
  mses = [_mse(controlled.corrupt(img, "noise", s, r(s)), img) for s in (1, 2, 3)]
  assert mses[0] < mses[1] < mses[2]
  assert abs(mses[0] / (0.08 * 255) ** 2 - 1) < 0.15
  # Blur: the variance of a random image falls with severity; visible at 28 and at 224.
  for size in (28, 224):
    x = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    var = [controlled.corrupt(x, "blur", s, r()).astype(float).var() for s in (1, 2, 3)]
    assert x.var() * 0.8 > var[0] > var[1] > var[2]
  # Blur keeps a constant image constant (normalised kernel, reflecting borders).
  const = np.full((20, 30, 3), 77, np.uint8)
  np.testing.assert_array_equal(controlled.corrupt(const, "blur", 3, r()), const)
  # Occlusion: one rectangle of about the nominal area, filled with black or the image mean.
  big = rng.integers(1, 256, size=(64, 64, 3), dtype=np.uint8)
  for s, frac in ((1, 0.15), (2, 0.30), (3, 0.50)):
    for seed in range(6):
      out = controlled.corrupt(big, "occlusion", s, r(seed))
      changed = np.any(out != big, axis=-1)
      rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
      box = out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
      assert abs(box.shape[0] * box.shape[1] / 64 ** 2 - frac) < 0.05
      fill = box.reshape(-1, 3)
      assert (fill == fill[0]).all()
      mean = np.rint(big.reshape(-1, 3).mean(0))
      assert (fill[0] == 0).all() or np.array_equal(fill[0], mean)
  # Edges: a vertical step gives a maximum (255) at the step and zero in flat regions.
  step = np.zeros((10, 10, 3), np.uint8)
  step[:, 5:] = 200
  e = controlled.corrupt(step, "edges", 1, r())
  assert e.shape == step.shape and e.max() == 255
  assert (e[:, :3] == 0).all() and (e[:, 7:] == 0).all() and (e[:, 4:6] == 255).all()
  # Deterministic by rng; alpha kept.
  a = controlled.corrupt(img, "noise", 2, r(5))
  np.testing.assert_array_equal(a, controlled.corrupt(img, "noise", 2, r(5)))
  rgba = np.concatenate([img, np.full((28, 28, 1), 99, np.uint8)], -1)
  assert (controlled.corrupt(rgba, "invert", 1, r())[..., 3] == 99).all()
  with pytest.raises(ValueError, match="severity"):
    controlled.corrupt(img, "invert", 2, r())
  with pytest.raises(ValueError, match="unknown corruption kind"):
    controlled.corrupt(img, "sepia", 1, r())


def test_build_ground_truth_and_balance(tmp_path):
  images, labels = _data()
  copies = 2
  controlled.build_controlled_pool(images, labels, CLASSES, tmp_path, seed=3,
                                   copies_per_image=copies, shard_size=10, progress=False)
  p = pool_lib.read_pool(tmp_path, class_names=CLASSES)
  n = len(images)
  assert len(p) == n * copies and p.skipped == []
  assert p.ids[:3] == ["ctrl-000000", "ctrl-000001", "ctrl-000002"]
  variants = controlled.variant_list()
  assert len(variants) == 13
  seen = collections.defaultdict(collections.Counter)
  per_image = collections.defaultdict(list)
  for j, row in enumerate(p.rows):
    i, copy = divmod(j, copies)
    ex = row["extras"]
    assert row["source"] == "controlled" and row["prompt"] is None
    assert ex["source_id"] == f"src-{i:06d}" and ex["copy"] == copy
    assert ex["true_class"] == CLASSES[labels[i]]
    if ex["kind"] == "wrong_label":
      assert row["class"] != ex["true_class"]
    else:
      assert row["class"] == ex["true_class"]
    if ex["kind"] in ("clean", "wrong_label"):
      np.testing.assert_array_equal(p.images[j], images[i])
    else:
      assert not np.array_equal(p.images[j], images[i])
    seen[labels[i]][(ex["kind"], ex["severity"])] += 1
    per_image[i].append((ex["kind"], ex["severity"]))
  # Balanced: each class has 28 slots over 13 variants -> every variant 2 or 3 times.
  for c in range(len(CLASSES)):
    counts = [seen[c][v] for v in variants]
    assert sum(counts) == 28 and min(counts) == 2 and max(counts) == 3
  assert all(len(set(v)) == copies for v in per_image.values())
  # wrong_label rows point to both other classes somewhere.
  wrong = [r["class"] for r in p.rows if r["extras"]["kind"] == "wrong_label"]
  assert set(wrong) == set(CLASSES)
  groups = controlled.controlled_groups(p)
  assert set(groups) == set(controlled.ALL_KINDS)
  assert sum(len(g) for g in groups.values()) == len(p)
  for k, idx in groups.items():
    assert all(p.rows[j]["extras"]["kind"] == k for j in idx)
  assert len(controlled.controlled_groups(p.rows, by_severity=True)) == 13


def test_noise_severity_monotone_in_pool(tmp_path):
  images, labels = _data(n_per_class=12)
  controlled.build_controlled_pool(images, labels, CLASSES, tmp_path, seed=1,
                                   kinds=("noise",), copies_per_image=3, progress=False)
  p = pool_lib.read_pool(tmp_path)
  by_sev = collections.defaultdict(list)
  for j, row in enumerate(p.rows):
    by_sev[row["extras"]["severity"]].append(_mse(p.images[j], images[j // 3]))
  means = [np.mean(by_sev[s]) for s in (1, 2, 3)]
  assert len(by_sev[1]) == len(by_sev[2]) == len(by_sev[3]) == 36
  assert means[0] < means[1] < means[2]


def _file_bytes(root):
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_gives_identical_files(tmp_path, monkeypatch):
  images, labels = _data(n_per_class=9, size=10, seed=7)
  kw = dict(seed=11, copies_per_image=2, shard_size=8, progress=False)
  full = tmp_path / "full"
  controlled.build_controlled_pool(images, labels, CLASSES, full, **kw)

  part = tmp_path / "part"
  real_write = pool_lib.PoolWriter.write_shard
  calls = []

  def flaky(self, shard, imgs, rows):
    calls.append(shard)
    if shard == 3:
      raise KeyboardInterrupt("simulated kill")
    return real_write(self, shard, imgs, rows)

  monkeypatch.setattr(pool_lib.PoolWriter, "write_shard", flaky)
  with pytest.raises(KeyboardInterrupt):
    controlled.build_controlled_pool(images, labels, CLASSES, part, **kw)
  assert not (part / "metadata.jsonl").exists()
  assert pool_lib.PoolWriter(part).finished_shards() == [0, 1, 2]
  calls.clear()
  monkeypatch.setattr(pool_lib.PoolWriter, "write_shard", real_write)
  counting = lambda self, shard, imgs, rows: (calls.append(shard),
                                               real_write(self, shard, imgs, rows))[1]
  monkeypatch.setattr(pool_lib.PoolWriter, "write_shard", counting)
  controlled.build_controlled_pool(images, labels, CLASSES, part, **kw)
  assert calls == [3, 4, 5, 6]  # 54 outputs / 8 per shard = 7 shards; 0-2 skipped.
  a, b = _file_bytes(full), _file_bytes(part)
  assert a.keys() == b.keys()
  assert a["metadata.jsonl"] == b["metadata.jsonl"]
  assert all(a[k] == b[k] for k in a)
  # Other arguments on the same root are refused.
  with pytest.raises(ValueError, match="other arguments.*seed"):
    controlled.build_controlled_pool(images, labels, CLASSES, part, **dict(kw, seed=12))


def test_build_validates_inputs(tmp_path):
  images, labels = _data(n_per_class=2)
  with pytest.raises(ValueError, match="labels must lie"):
    controlled.build_controlled_pool(images, labels + 1, CLASSES, tmp_path, seed=0,
                                     progress=False)
  with pytest.raises(ValueError, match="wrong_label"):
    controlled.build_controlled_pool(images, labels * 0, ["only"], tmp_path, seed=0,
                                     progress=False)
  with pytest.raises(ValueError, match="severities"):
    controlled.build_controlled_pool(images, labels, CLASSES, tmp_path, seed=0,
                                     severities=(4,), progress=False)
