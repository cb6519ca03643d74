"""Tests for synthbandit_jax.data.splits."""
from __future__ import annotations

import numpy as np
import pytest

from synthbandit_jax.data.real import ImageDataset
from synthbandit_jax.data.splits import make_splits, stratified_split


def _counts(labels, idx):
  return np.bincount(labels[idx], minlength=labels.max() + 1).tolist()


def _check_partition(parts, n):
  allidx = np.concatenate(list(parts.values()))
  assert sorted(allidx.tolist()) == list(range(n))  # disjoint and complete
  for v in parts.values():
    assert v.dtype == np.int64 and np.all(np.diff(v) > 0)  # sorted, no duplicates


def test_hand_computed_counts():
  # class 0: 10 images, class 1: 5, class 2: 3; interleaved in memory.
  labels = np.array([0] * 10 + [1] * 5 + [2] * 3)
  labels = labels[np.random.default_rng(123).permutation(len(labels))]
  parts = stratified_split(labels, {"val": 0.2, "test": 0.3}, seed=0)
  assert list(parts) == ["val", "test", "rest"]
  _check_partition(parts, len(labels))
  # class 0: quotas 2, 3, 5 (exact).
  # class 1: quotas 1.0, 1.5, 2.5 -> floors 1, 1, 2; one left; tie .5/.5 -> earlier (test).
  # class 2: quotas .6, .9, 1.5 -> floors 0, 0, 1; two left -> test (.9), val (.6).
  assert _counts(labels, parts["val"]) == [2, 1, 1]
  assert _counts(labels, parts["test"]) == [3, 2, 1]
  assert _counts(labels, parts["rest"]) == [5, 2, 1]


def test_minimum_one_per_positive_split():
  labels = np.zeros(4, np.int64)
  # quotas .4, .4, 3.2 -> floors 0, 0, 3; one left -> a; b still 0 -> takes one from rest.
  parts = stratified_split(labels, {"a": 0.1, "b": 0.1}, seed=3)
  assert [len(parts[k]) for k in ("a", "b", "rest")] == [1, 1, 2]


def test_zero_fraction_gets_nothing_and_exact_sum_has_no_rest():
  labels = np.repeat(np.arange(3), 7)
  parts = stratified_split(labels, {"x": 0.0, "y": 0.5, "z": 0.5}, seed=1)
  assert set(parts) == {"x", "y", "z"}
  assert len(parts["x"]) == 0
  _check_partition(parts, len(labels))
  # 7 * .5 = 3.5 each; the leftover goes to the earlier key (y).
  assert _counts(labels, parts["y"]) == [4, 4, 4]
  assert _counts(labels, parts["z"]) == [3, 3, 3]


def test_deterministic_and_seed_dependent():
  labels = np.repeat(np.arange(5), 40)
  a = stratified_split(labels, {"val": 0.25}, seed=7)
  b = stratified_split(labels, {"val": 0.25}, seed=7)
  c = stratified_split(labels, {"val": 0.25}, seed=8)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["val"], c["val"])


def _members_by_rank(labels, parts):
  """class -> sorted list of (rank of the image within its class, split name)."""
  out = {}
  for name, idx in parts.items():
    for i in idx:
      c = int(labels[i])
      rank = int(np.sum(labels[:i] == c))
      out.setdefault(c, []).append((rank, name))
  return {c: sorted(v) for c, v in out.items()}


def test_independent_of_class_interleaving_and_other_classes():
  sorted_labels = np.repeat(np.arange(4), [9, 12, 7, 10])
  shuffled = sorted_labels[np.random.default_rng(0).permutation(len(sorted_labels))]
  frac = {"val": 0.3, "holdout": 0.2}
  a = _members_by_rank(sorted_labels, stratified_split(sorted_labels, frac, seed=5))
  b = _members_by_rank(shuffled, stratified_split(shuffled, frac, seed=5))
  assert a == b
  # Dropping class 0 and 3 does not change how classes 1 and 2 are split.
  only12 = shuffled[(shuffled == 1) | (shuffled == 2)]
  c = _members_by_rank(only12, stratified_split(only12, frac, seed=5))
  assert c == {1: a[1], 2: a[2]}


def test_errors():
  labels = np.array([0, 0, 0, 1, 1])
  with pytest.raises(ValueError, match="sum to 1.2"):
    stratified_split(labels, {"a": 0.6, "b": 0.6}, seed=0)
  with pytest.raises(ValueError, match=r"class 1 has 2 image\(s\).*'a', 'b', 'rest'"):
    stratified_split(labels, {"a": 0.3, "b": 0.3}, seed=0)
  with pytest.raises(ValueError, match="reserved"):
    stratified_split(labels, {"rest": 0.3}, seed=0)
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    stratified_split(labels, {"a": -0.1}, seed=0)
  with pytest.raises(ValueError, match="integer"):
    stratified_split(labels.astype(float), {"a": 0.5}, seed=0)
  with pytest.raises(ValueError, match="seed"):
    stratified_split(labels, {"a": 0.5}, seed=-1)


def _dataset(counts, names=None, prefix="x", size=4):
  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  n = len(labels)
  images = (np.arange(n)[:, None, None, None] % 256 * np.ones((1, size, size, 1))).astype(
      np.uint8)
  names = names or [f"c{i}" for i in range(len(counts))]
  return ImageDataset(images=images, labels=labels, class_names=names,
                      ids=[f"{prefix}/{i:04d}" for i in range(n)],
                      skipped=[{"path": "bad.png", "reason": "corrupt"}])


def test_make_splits_from_all():
  ds = _dataset([20, 20, 10])
  s = make_splits({"all": ds}, val_fraction=0.2, test_fraction=0.2, holdout_fraction=0.1, seed=0)
  assert list(s) == ["train", "val", "test", "holdout"]
  # 20 per class: test 4, val 4, holdout 2, train 10; 10 per class: 2, 2, 1, 5.
  assert list(s["test"].counts().values()) == [4, 4, 2]
  assert list(s["val"].counts().values()) == [4, 4, 2]
  assert list(s["holdout"].counts().values()) == [2, 2, 1]
  assert list(s["train"].counts().values()) == [10, 10, 5]
  ids = [set(s[k].ids) for k in s]
  assert sum(len(x) for x in ids) == len(ds) and set().union(*ids) == set(ds.ids)
  for k in s:
    assert s[k].class_names == ds.class_names
    assert s[k].skipped == ds.skipped
    # Images still match their ids.
    for img, i in zip(s[k].images, s[k].ids):
      assert img[0, 0, 0] == int(i.split("/")[1]) % 256
  again = make_splits({"all": ds}, val_fraction=0.2, test_fraction=0.2, holdout_fraction=0.1,
                      seed=0)
  assert all(again[k].ids == s[k].ids for k in s)


def test_make_splits_keeps_given_test_and_empty_holdout():
  train, test = _dataset([10, 10], prefix="tr"), _dataset([3, 3], prefix="te")
  s = make_splits({"train": train, "test": test}, val_fraction=0.3, test_fraction=0.5, seed=2)
  assert s["test"].ids == test.ids
  np.testing.assert_array_equal(s["test"].images, test.images)
  assert list(s["val"].counts().values()) == [3, 3]
  assert list(s["train"].counts().values()) == [7, 7]
  assert len(s["holdout"]) == 0
  assert s["holdout"].images.shape == (0, 4, 4, 1)
  assert s["holdout"].class_names == ["c0", "c1"]
  assert set(s["train"].ids).isdisjoint(s["val"].ids)
  assert set(s["train"].ids) | set(s["val"].ids) == set(train.ids)


def test_make_splits_errors():
  a = _dataset([5, 5], names=["cat", "dog"])
  b = _dataset([5, 5], names=["cat", "bird"])
  with pytest.raises(ValueError, match=r"only in train: \['dog'\], only in test: \['bird'\]"):
    make_splits({"train": a, "test": b}, val_fraction=0.2, test_fraction=0.0, seed=0)
  c = _dataset([5, 5], names=["dog", "cat"])
  with pytest.raises(ValueError, match="different order"):
    make_splits({"train": a, "test": c}, val_fraction=0.2, test_fraction=0.0, seed=0)
  with pytest.raises(ValueError, match="leave nothing for train"):
    make_splits({"all": a}, val_fraction=0.5, test_fraction=0.5, seed=0)
  with pytest.raises(ValueError, match="val_fraction"):
    make_splits({"all": a}, val_fraction=0.0, test_fraction=0.5, seed=0)
  with pytest.raises(ValueError, match="test_fraction"):
    make_splits({"all": a}, val_fraction=0.2, test_fraction=0.0, seed=0)
  with pytest.raises(ValueError, match="not understood"):
    make_splits({"validation": a}, val_fraction=0.2, test_fraction=0.2, seed=0)
  tiny = _dataset([2, 5], names=["rare", "common"])
  with pytest.raises(ValueError, match=r"class 0 \('rare'\) has 2"):
    make_splits({"all": tiny}, val_fraction=0.2, test_fraction=0.2, seed=0)
