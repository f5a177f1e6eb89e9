"""The README walkthrough tool finds every command the way a user would type it, and judges how each one ended."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "readme_walkthrough.py"
spec = importlib.util.spec_from_file_location("readme_walkthrough", TOOL)
walkthrough = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
sys.modules[spec.name] = walkthrough  # type: ignore[union-attr]  # dataclasses look their module up there
spec.loader.exec_module(walkthrough)  # type: ignore[union-attr]

README = """Intro
<!-- main-command -->
```
python3 -m venv .venv && .venv/bin/pip install x && .venv/bin/anomalib-fcdd demo
```
<!-- /main-command -->

```bash
# a comment
anomalib-fcdd train --model fcdd_hsc \\
  --data.root tiles   # trailing comment
```

```python
print("hi")
```

```bash
for setting in a b; do
  echo $setting
done
```
"""


def test_commands_are_joined_stripped_and_in_readme_order() -> None:
    assert walkthrough.readme_commands(README) == [
        ".venv/bin/anomalib-fcdd demo",
        "anomalib-fcdd train --model fcdd_hsc --data.root tiles",
        "python - <<'EOF'\nprint(\"hi\")\nEOF",
        walkthrough.LOOP_STAND_IN,
    ]


def test_outcomes_are_judged_by_exit_code_and_output(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    ok = walkthrough.run_one("echo fine", tmp_path, env, 10)
    one_line = walkthrough.run_one("echo 'anomalib-fcdd: error: no data' >&2; exit 2", tmp_path, env, 10)
    traceback = walkthrough.run_one(
        "echo 'Traceback (most recent call last):'; echo 'error: x'; exit 1", tmp_path, env, 10
    )
    slow = walkthrough.run_one("sleep 5", tmp_path, env, 0.5)
    assert (ok.verdict, ok.last_line) == ("ok", "fine")
    assert (one_line.verdict, one_line.last_line) == ("one-line error", "anomalib-fcdd: error: no data")
    assert traceback.verdict == "DEFECT"
    assert slow.verdict == "still running" and slow.seconds < 5
