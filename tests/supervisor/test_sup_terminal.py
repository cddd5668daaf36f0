"""What a person sees: the README's first command in a real 80x24 pseudo-terminal (rendered by a
VT emulator, pyte), and plain lines off a terminal; every error printed once."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte
from supervisor_helpers import REPO, RUN_TIMEOUT_S, child_env, run_cli

COLUMNS, ROWS = 80, 24
PROGRESS = re.compile(r"rec/s|━")  # the live display's line: its rate, its bar
MESSAGE = re.compile(r"supervisor:|worker \d+")  # a log line, a line of the worker's
ESCAPE = re.compile(r"\x1b|\r")


def _readme_first_command() -> list[str]:
    readme = (REPO / "README.md").read_text()
    [line] = [line for line in readme.splitlines() if line.startswith("python3 -m venv")][:1]
    command = line.split("&&")[-1].split()
    assert command[:3] == ["python", "-m", "supervisor"], command
    return [sys.executable, *command[1:]]


def _run_in_terminal(cwd: Path, command: list[str]) -> tuple[int, list[list[str]]]:
    """Run `command` with a pseudo-terminal of 80x24 as stdin, stdout and stderr; the screens
    the terminal showed (one after each read of its output) and the exit status."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = child_env({"TERM": "xterm-256color"})
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    proc = subprocess.Popen(command, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    screens = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal is gone
                break
            if not data:
                break
            stream.feed(data)
            screens.append(list(screen.display))
    finally:
        os.close(master)
    return proc.wait(timeout=RUN_TIMEOUT_S), screens


def test_readme_first_command_in_an_80x24_terminal_never_mixes_progress_and_messages(
    tmp_path: Path,
) -> None:
    code, screens = _run_in_terminal(tmp_path, _readme_first_command())

    assert code == 0, "\n".join(screens[-1] if screens else [])
    for shown in screens:
        mixed = [line for line in shown if PROGRESS.search(line) and MESSAGE.search(line)]
        assert not mixed, "\n".join(shown)
    final = [line.rstrip() for line in screens[-1]]
    text = "\n".join(final)
    # The live display ended on its last state, the kill and restart above it, the report below.
    [bar] = [line for line in final if PROGRESS.search(line)]
    assert "10/10 batches" in bar and "restarts 1" in bar and "kills 1" in bar, text
    assert any("kill-at-batch kill of ours" in line for line in final), text
    assert "SIGKILL (kill-at-batch) to worker" in text
    assert "replayed 3 (finished before this worker started; not run again)" in "".join(final)
    assert re.search(r"^done: 1000 records in 10 batches", text, re.M), text
    assert (tmp_path / ".durable" / "store.jsonl").exists()  # the run's state went to its cwd


def _error_lines(stderr: str, stdout: str, message: str) -> int:
    """How many lines of both streams carry `message`."""
    return sum(message in line for line in (stdout + stderr).splitlines())


def _failpoints(*keys: str) -> dict[str, str]:
    return {"DURABLE_FAILPOINTS": json.dumps(
        [{"name": "batch.fail", "key": key, "action": "raise"} for key in keys])}


def test_off_a_terminal_plain_lines_and_a_failed_batch_printed_once(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    args = ("--records", "300", "--batch-size", "100", "--max-attempts", "3", "--retry-initial", "0")
    run = run_cli("run", state_dir, *args, env=_failpoints("1/1", "1/2", "1/3"))

    assert run.returncode == 1, run.describe()
    assert not ESCAPE.search(run.stderr) and not ESCAPE.search(run.stdout), repr(run.stderr)
    assert "supervisor: worker" in run.stderr  # one plain line per event
    final = "failed after 3 attempts: InjectedFault: injected fault at batch.fail 1/3"
    assert _error_lines(run.stderr, run.stdout, final) == 1, run.describe()
    assert run.last_error_line.startswith("error: ") and final in run.last_error_line
    assert "not done:" in run.stdout, run.describe()
    # The earlier attempts' failures are events of their own, each once.
    assert _error_lines(run.stderr, run.stdout, "batch.fail 1/1") == 1, run.describe()

    as_json = run_cli("run", tmp_path / "again", *args, "--json", env=_failpoints("1/1", "1/2", "1/3"))
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and final in report["error"]  # the JSON carries it
    assert _error_lines(as_json.stderr, "", final) == 1, as_json.describe()


def test_refused_runs_and_store_errors_print_their_error_once(tmp_path: Path) -> None:
    bad = tmp_path / "people.csv"
    bad.write_text("id,name\n1,ann\n")
    refused = run_cli("run", tmp_path / "state", "--input", str(bad))
    assert refused.returncode == 1, refused.describe()
    assert refused.stdout == ""
    assert refused.stderr.count("people.csv") == 1 and refused.last_error_line.startswith("error: ")

    state_dir = tmp_path / "damaged"
    state_dir.mkdir()
    (state_dir / "store.jsonl").write_text("not a store line\n{}\n")
    damaged = run_cli("run", state_dir, "--records", "100")
    assert damaged.returncode == 1, damaged.describe()
    assert damaged.stderr.count("store.jsonl") == 1, damaged.describe()
    assert damaged.last_error_line.startswith("error: "), damaged.describe()
