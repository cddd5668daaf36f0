"""The README stays true: its commands are the ones CI runs, and its example code runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", README, re.S)


def test_the_readme_starts_with_the_two_commands() -> None:
    run_main, run_tests = _shell_blocks()[:2]
    assert run_main.endswith("python -m supervisor run --kill-at-batch 3")
    assert run_tests.endswith("pytest -n auto")
    assert README.index(run_main) < README.index("## What you get")


def test_ci_runs_the_readme_test_command_exactly() -> None:
    run_tests = _shell_blocks()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert run_tests in ci


def test_the_engine_example_runs_and_replays(tmp_path: Path) -> None:
    [example] = [b for b in re.findall(r"```python\n(.*?)\n```", README, re.S) if "JsonlStore" in b]
    script = tmp_path / "example.py"
    script.write_text(example)
    runs = [
        subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       check=True, env={"PYTHONPATH": str(REPO)})
        for _ in range(2)
    ]
    assert [r.stdout for r in runs] == ["['hello ann', 'hello bob']\n"] * 2
    assert (tmp_path / "hello.jsonl").read_text().count('"op":"resolve"') == 3  # 2 steps + the root
