"""launch/common.py: the --compilation_cache setting."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from launch import common


@pytest.fixture
def restore_cache_config():
  keys = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size",
          "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  yield
  for k, v in old.items():
    jax.config.update(k, v)


def test_compilation_cache_settings(tmp_path, monkeypatch, restore_cache_config):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  monkeypatch.setenv("SYNTHBANDIT_CACHE", str(tmp_path / "assets"))
  before = jax.config.jax_compilation_cache_dir
  assert common.enable_compilation_cache("off") is None
  assert jax.config.jax_compilation_cache_dir == before  # off touches nothing

  # auto without the JAX variable: next to the assets, created, with the size bound.
  got = common.enable_compilation_cache("auto")
  assert got == str(tmp_path / "assets" / "xla") and (tmp_path / "assets" / "xla").is_dir()
  assert jax.config.jax_compilation_cache_dir == got
  assert jax.config.jax_compilation_cache_max_size == common.CACHE_MAX_BYTES
  assert jax.config.jax_persistent_cache_min_compile_time_secs == common.CACHE_MIN_COMPILE_SECS

  # auto with the JAX variable set: that directory; an explicit directory wins over both.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert common.enable_compilation_cache("auto") == str(tmp_path / "env")
  assert common.enable_compilation_cache(str(tmp_path / "mine")) == str(tmp_path / "mine")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")

  # A directory that cannot be created names the flag.
  (tmp_path / "file").write_text("x")
  with pytest.raises(SystemExit, match=r"--compilation_cache=.*file/sub.*off"):
    common.enable_compilation_cache(str(tmp_path / "file" / "sub"))


_FLAG_DEFAULT = """
from absl import flags
from launch import common
f = common.define_flags()
flags.FLAGS(["x", "--workdir=w", "--config=configs/demo.py"])
print(f.compilation_cache.value)
"""


@pytest.mark.parametrize("env,expect", [(None, "auto"), ("off", "off"), ("/some/dir", "/some/dir")])
def test_compilation_cache_flag_default_from_environment(env, expect):
  root = Path(__file__).resolve().parent.parent
  environ = {k: v for k, v in os.environ.items() if k != common.CACHE_ENV}
  if env is not None:
    environ[common.CACHE_ENV] = env
  out = subprocess.run([sys.executable, "-c", _FLAG_DEFAULT], cwd=root, env=environ,
                       capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip().splitlines()[-1] == expect
