

def xla_flags(flags: str) -> str:
  """`flags` plus the suite's own XLA flags (tests/conftest.py), for subprocess envs."""
  import os  # pylint: disable=import-outside-toplevel
  return (flags + " " + os.environ.get("SYNTHBANDIT_SUITE_XLA_FLAGS", "")).strip()
