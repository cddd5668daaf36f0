"""Through the real CLI: a store whose history is impossible is refused at once, and a new state
dir's directories are synced into their parents, so a power loss cannot take them back.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from supervisor_helpers import (
    RUN_TIMEOUT_S,
    STORE_FILE,
    assert_finished,
    child_env,
    root_id,
    run_import,
)

from store.codec import decode, encode

RECORDS, BATCH_SIZE = 20, 5
SIZES = ("--records", str(RECORDS), "--batch-size", str(BATCH_SIZE))
FAST = ("--max-restarts", "2", "--restart-backoff", "0", "--max-attempts", "2")


# -- an impossible store -----------------------------------------------------------------------


# Each damage keeps the store's first lines (root created; batch 0 created, attempted and
# resolved; batch 1 created and attempted, then resolved on line 5), adds one impossible
# line, and returns the lines with the number of the impossible one.


def attempt_number_not_a_number(lines: list[bytes], batch_1: str) -> tuple[list[bytes], int]:
    return [*lines[:4], encode({"op": "attempt", "id": batch_1, "n": "abc", "t": 1.0})], 5


def resolved_twice_with_different_values(
    lines: list[bytes], batch_1: str
) -> tuple[list[bytes], int]:
    first = decode(lines[4].rstrip(b"\n"))
    assert (first["op"], first["id"]) == ("resolve", batch_1)
    other = {**first, "value": {**first["value"], "records": 0}}
    return [*lines[:5], encode(other), *lines[5:]], 6


@pytest.mark.parametrize("damage", [attempt_number_not_a_number, resolved_twice_with_different_values])
def test_impossible_store_is_a_one_line_error_without_a_worker_or_a_restart(
    tmp_path: Path, damage: Any
) -> None:
    state_dir = tmp_path / "state"
    assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    store = (state_dir / STORE_FILE).resolve()
    lines = store.read_bytes().splitlines(keepends=True)
    damaged, bad_line = damage(lines, f"{root_id(RECORDS, BATCH_SIZE)}.1")
    store.write_bytes(b"".join(damaged))
    before = store.read_bytes()

    done = run_import(state_dir, *SIZES, *FAST)

    assert done.returncode == 1, done.describe()
    assert "Traceback" not in done.stderr, done.describe()
    assert "supervisor: worker" not in done.stderr, "a worker ran: " + done.describe()
    assert done.last_error_line.startswith(f"error: {store}:{bad_line}: store is damaged"), done.describe()
    assert done.report == {"ok": False, "error": done.last_error_line.removeprefix("error: ")}
    assert store.read_bytes() == before


# -- a new state dir survives a power loss -----------------------------------------------------

SYSCALL = re.compile(r'^(mkdir|mkdirat|fsync|fdatasync)\((?:AT_FDCWD[^,]*, )?(.*?)[,)].*= (-?\d+)')


def traced_syscalls(trace_file: Path) -> list[tuple[str, Path]]:
    """(call, path) of each successful mkdir and (f|fdata)sync in one process, in order."""
    calls = []
    for line in trace_file.read_text().splitlines():
        match = SYSCALL.match(line)
        if match is None or match[3] != "0":
            continue
        call, arg = match[1], match[2]
        path = arg.strip('"') if call.startswith("mkdir") else arg[arg.index("<") + 1: -1]
        calls.append(("mkdir" if call.startswith("mkdir") else "sync", Path(path)))
    return calls


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_every_directory_of_a_new_state_dir_is_synced_into_its_parent(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "b" / "c"
    trace = tmp_path / "trace"
    argv = ["strace", "-ff", "-y", "-e", "trace=mkdir,mkdirat,fsync,fdatasync", "-o", str(trace),
            sys.executable, "-m", "supervisor", "run", "--records", "10", "--batch-size", "5",
            "--state-dir", str(state_dir), "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=child_env(), cwd=tmp_path,
                          timeout=RUN_TIMEOUT_S, check=False)
    if "ptrace" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip().splitlines()[0]}")
    assert proc.returncode == 0, proc.stderr

    created = []
    for trace_file in tmp_path.glob("trace.*"):
        calls = traced_syscalls(trace_file)
        for i, (call, directory) in enumerate(calls):
            if call == "mkdir" and directory.is_relative_to(tmp_path):
                created.append(directory)
                assert ("sync", directory.parent) in calls[i + 1:], (
                    f"{directory.parent} was not synced after {directory.name} was made in it"
                )
    assert sorted(created) == [tmp_path / "a", tmp_path / "a" / "b", state_dir]
