"""Runs a script as N local JAX processes (CPU collectives over gloo), as on N hosts.

Each process gets `--xla_force_host_platform_device_count=D` devices, a shared coordinator
on a free local port, and its process id. The script reads `PID` and `NPROC` from its
globals (prepended here), calls `parallel.initialize_distributed(...)` itself and prints one
line `RESULT <json>`; `run_processes` returns those per process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from tests import xla_flags

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    PID, NPROC, ADDRESS = {pid}, {nproc}, {address!r}
    def init():
      from synthbandit_jax import parallel
      if NPROC > 1:
        assert parallel.initialize_distributed(ADDRESS, NPROC, PID)
      import jax
      assert jax.process_count() == NPROC, jax.process_count()
    def emit(obj):
      print("RESULT " + json.dumps(obj), flush=True)
""")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def spawn(script: str, nproc: int, devices_per_process: int, *, timeout: int = 600,
          env: dict | None = None) -> list[tuple[int, str, str]]:
  """Starts `nproc` processes of `script` and waits: [(returncode, stdout, stderr)]."""
  address = f"localhost:{free_port()}"
  base = dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(
                  f"--xla_force_host_platform_device_count={devices_per_process}"))
  base.pop("JAX_COORDINATOR_ADDRESS", None)
  base.update(env or {})
  codes = [PRELUDE.format(root=str(ROOT), pid=pid, nproc=nproc, address=address) +
           textwrap.dedent(script) for pid in range(nproc)]
  # Files, not pipes: nobody reads while we wait, and a full pipe would block a process.
  logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in codes]
  procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=base, stdout=o,
                            stderr=e, text=True) for code, (o, e) in zip(codes, logs)]
  outs = []
  try:
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        failed_at = now  # one process died: the others would wait for it forever
      if now > deadline or (failed_at is not None and now - failed_at > 20):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  for p, (o, e) in zip(procs, logs):
    o.seek(0)
    e.seek(0)
    outs.append((p.returncode, o.read(), e.read()))
  return outs


def run_processes(script: str, nproc: int, devices_per_process: int, *, timeout: int = 600,
                  env: dict | None = None) -> list[dict | None]:
  """`spawn`, then every process must exit 0 (else AssertionError with its stderr); returns
  each one's RESULT (None if it printed none)."""
  results = []
  for pid, (rc, out, err) in enumerate(spawn(script, nproc, devices_per_process,
                                             timeout=timeout, env=env)):
    if rc != 0:
      raise AssertionError(f"process {pid} of {nproc} exited {rc}:\n{err[-4000:]}")
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    results.append(json.loads(lines[-1][len("RESULT "):]) if lines else None)
  return results
