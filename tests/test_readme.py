"""The README's research-extension snippet runs verbatim and does what it says."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_extension_snippet_runs(tmp_path, monkeypatch):
  text = (ROOT / "README.md").read_text()
  section = text.split("## Extending it", 1)[1]
  snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(ROOT))
  namespace: dict = {}
  exec(compile(snippet, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  summary = namespace["summary"]
  result = json.loads((tmp_path / "runs/boltzmann/bandit/results.json").read_text())
  assert summary["modes"] == ["bandit"]
  assert len(result["epochs"]) == 4
  # The custom bandit ran inside the jitted epoch: unplayed arms have infinite logits, so
  # the first epochs play distinct arms, and the pulls add up to the epochs.
  arms = [e["arm"] for e in result["epochs"]]
  assert len(set(arms)) == 4
  assert sum(a["pulls"] for a in result["arms"]) == 4
  # The custom reward: acc + 2 * min(acc - prev, 0).
  eps = result["epochs"]
  for before, now in zip(eps, eps[1:]):
    want = now["val_accuracy"] + 2.0 * min(now["val_accuracy"] - before["val_accuracy"], 0.0)
    assert abs(now["reward"] - want) < 1e-5
