"""The README stays true: its commands are the ones CI runs, and its example code runs."""

from __future__ import annotations

import argparse
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
    script = tmp_path / "example.py"
    script.write_text(_engine_example())
    runs = [
        subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       check=True, env={"PYTHONPATH": str(REPO)})
        for _ in range(2)
    ]
    assert [r.stdout for r in runs] == ["['hello ann', 'hello bob']\n"] * 2
    assert (tmp_path / "hello.jsonl").read_text().count('"op":"resolve"') == 3  # 2 steps + the root


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def _engine_example(uses: str = "hello_all") -> str:
    [example] = [b for b in re.findall(r"```python\n(.*?)\n```", README, re.S)
                 if "JsonlStore" in b and uses in b]
    return example


def test_the_fan_out_example_runs_in_a_pool_and_replays(tmp_path: Path) -> None:
    (tmp_path / "fanout.py").write_text(_engine_example("measure_all"))
    runs = [
        subprocess.run([sys.executable, "fanout.py"], cwd=tmp_path, capture_output=True, text=True,
                       check=True, env={"PYTHONPATH": str(REPO)})
        for _ in range(2)
    ]
    assert [r.stdout for r in runs] == ["[1, 2, 3, 4]\n"] * 2
    store = (tmp_path / "fanout.jsonl").read_text()
    assert store.count('"op":"resolve"') == 5  # 4 calls + the root, each once: the rerun replayed


def _run_commands(block: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A README shell block, run line by line as typed (with this interpreter as `python`)."""
    script = "\n".join(line.strip().replace("python -m", f"{sys.executable} -m", 1)
                       for line in block.splitlines())
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
                          timeout=60, check=False)


def test_the_engine_example_runs_under_the_supervisor_with_random_kills(tmp_path: Path) -> None:
    (tmp_path / "hello.py").write_text(_engine_example())
    plain = subprocess.run([sys.executable, "hello.py"], cwd=tmp_path, capture_output=True, text=True,
                           check=True, env={"PYTHONPATH": str(REPO)})
    [under_kills] = re.findall(r"```sh\n(.*?)\n```", _section("Supervising your own workflow"), re.S)[:1]
    assert "--kill-random 3" in under_kills

    supervised = _run_commands(under_kills + " --seed 3", tmp_path)

    assert supervised.returncode == 0, supervised.stderr[-3000:]
    assert plain.stdout == "['hello ann', 'hello bob']\n"
    assert 'done: ["hello ann","hello bob"];' in supervised.stdout  # the same result


def test_the_readme_loop_of_a_new_user_break_fix_retry_resume(tmp_path: Path) -> None:
    hello = tmp_path / "hello.py"
    section = _section("Supervising your own workflow")
    _first, break_it, fix_it = re.findall(r"```sh\n(.*?)\n *```", section, re.S)
    broken_line = re.search(r'`(if name == "bob": raise ValueError\("no\s+bob"\))`', section).group(1)
    greet = '    return f"hello {name}"'
    hello.write_text(_engine_example().replace(greet, f"    {' '.join(broken_line.split())}\n{greet}"))

    failed = _run_commands(break_it, tmp_path)

    assert failed.returncode == 1, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert "(hello/2.1) failed after 2 attempts: ValueError: no bob" in last
    assert "`python -m supervisor retry --id hello/2`" in last

    hello.write_text(_engine_example())
    fixed = _run_commands(fix_it, tmp_path)

    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "hello/2: rejected, 1 steps done" in fixed.stdout  # status, before the retry
    assert "reopened hello/2.1 (was: ValueError: no bob)" in fixed.stdout
    assert "ran 1 step(s) 1, replayed 1" in fixed.stdout  # ann's step was not run again
    assert 'done: ["hello ann","hello bob"];' in fixed.stdout


def test_the_usage_summary_lists_every_option_of_each_command() -> None:
    """The block under "The supervised import" names each option `--help` shows (e.g. `run
    --retry-initial`, which the report example uses), and no option a command lacks."""
    from supervisor.cli import build_parser

    section = _section("The supervised import")
    [summary] = re.findall(r"```\n(python -m supervisor run .*?)\n```", section, re.S)
    listed: dict[str, set[str]] = {}
    for line in summary.splitlines():
        if line.startswith("python -m supervisor "):
            command = line.split()[3]
        listed.setdefault(command, set()).update(re.findall(r"--[a-z-]+", line))
    [commands] = [a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command, flags in listed.items():
        options = {o for a in commands[command]._actions for o in a.option_strings
                   if o.startswith("--") and o != "--help" and a.help != "==SUPPRESS=="}
        assert flags == options - {"--dry-run"}, command  # gc's --dry-run is --keep's other name
