"""Crash tests of the fan-out runtime with real processes: a driver (fanout_child.py) running a
ctx.map in a pool of three step processes, SIGKILLed with steps in flight, and its step processes
SIGKILLed mid-step.

What must hold: no step process outlives its driver (nothing is left in its process group); a
lost step process costs the attempt it ran and is replaced; the rerun finishes with the same
result and the same ids as a run never killed; every step runs at most once per durable
attempt, and a step resolved before the kill never runs again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fanout_helpers import (
    SAFETY_TIMEOUT_S,
    executions,
    group_members,
    open_pidfds,
    wait_for_state,
    wait_until_gone,
)
from wf_helpers import JsonLines, read_store, worker_env

from store import State

CHILD = Path(__file__).resolve().parent / "fanout_child.py"
ROOT = "crash/fan"
ITEMS = 8
HELD = list(range(2, ITEMS))  # items 0 and 1 are resolved before the kill; the rest block


@dataclass
class Driver:
    proc: subprocess.Popen[bytes]
    announcements: JsonLines

    def in_step(
        self, count: int, seen: list[dict[str, Any]], held: Collection[int] = HELD
    ) -> list[dict[str, Any]]:
        """Wait for `count` more announcements of steps of the `held` items; return them."""
        got = []
        while len(got) < count:
            event = self.announcements.next()
            assert event is not None, f"the driver ended early: {seen}"
            seen.append(event)
            if event["item"] in held:
                got.append(event)
        return got


@contextmanager
def driver(tmp_path: Path, *flags: str) -> Iterator[Driver]:
    """fanout_child.py in a session of its own (its pool shares its process group)."""
    read_fd, write_fd = os.pipe()
    try:
        with open(tmp_path / "driver.log", "ab") as err:
            proc = subprocess.Popen(
                [sys.executable, str(CHILD), "--store", str(tmp_path / "store.jsonl"),
                 "--log", str(tmp_path / "executions.jsonl"), "--announce-fd", str(write_fd), *flags],
                pass_fds=(write_fd,), env=worker_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=err, cwd=tmp_path, start_new_session=True,
            )
    finally:
        os.close(write_fd)
    try:
        yield Driver(proc, JsonLines(read_fd))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(SAFETY_TIMEOUT_S)
        assert proc.stdout is not None
        proc.stdout.close()
        os.close(read_fd)


def run_to_end(tmp_path: Path, *flags: str) -> list[int]:
    with driver(tmp_path, *flags) as d:
        out, _ = d.proc.communicate(timeout=SAFETY_TIMEOUT_S)
        assert d.proc.returncode == 0, (tmp_path / "driver.log").read_text()
    return json.loads(out.splitlines()[-1])["value"]


def history(store_path: Path) -> list[tuple[str, State, Any, Any]]:
    with read_store(store_path) as store:
        return [(p.id, p.state, p.param, p.value) for p in store.list()]


def attempts(store_path: Path) -> dict[str, int]:
    with read_store(store_path) as store:
        return {p.id: p.attempts for p in store.list(f"{ROOT}.")}


@pytest.mark.parametrize("first", [None, "kill", "stop"], ids=["driver", "step-then-driver", "stopped"])
def test_a_driver_killed_with_steps_in_flight_takes_its_pool_and_a_rerun_ends_the_same(
    tmp_path: Path, first: str | None
) -> None:
    """`first`: before the driver, SIGKILL one step process (its replacement takes the retry
    and holds too), or SIGSTOP one (a stopped process dies all the same)."""
    hold = "--hold=" + ",".join(map(str, HELD))
    seen: list[dict[str, Any]] = []
    with driver(tmp_path, hold) as d:
        in_flight = d.in_step(3, seen)  # three step processes, each in a held step
        pool = {e["pid"] for e in in_flight}
        assert len(pool) == 3 and {e["ppid"] for e in in_flight} == {d.proc.pid}
        if first == "stop":
            os.kill(in_flight[0]["pid"], signal.SIGSTOP)
            wait_for_state(in_flight[0]["pid"], "T")
        if first == "kill":
            lost = in_flight[0]
            os.kill(lost["pid"], signal.SIGKILL)
            (retry,) = d.in_step(1, seen)
            assert (retry["id"], retry["attempt"]) == (lost["id"], 2)
            assert retry["pid"] not in pool and retry["ppid"] == d.proc.pid
            pool = pool - {lost["pid"]} | {retry["pid"]}
        pidfds = open_pidfds(sorted(pool))
        os.kill(d.proc.pid, signal.SIGKILL)
        assert d.proc.wait(SAFETY_TIMEOUT_S) == -signal.SIGKILL
        wait_until_gone(pidfds)  # PR_SET_PDEATHSIG: the pool dies with its driver
        assert group_members(d.proc.pid) == []  # no orphan left in the driver's group

    before = attempts(tmp_path / "store.jsonl")
    assert before[f"{ROOT}.0"] == before[f"{ROOT}.1"] == 1
    assert run_to_end(tmp_path) == [i * i for i in range(ITEMS)]

    clean = tmp_path / "clean"
    clean.mkdir()
    assert run_to_end(clean) == [i * i for i in range(ITEMS)]
    assert history(tmp_path / "store.jsonl") == history(clean / "store.jsonl")  # same ids, calls, values

    ran = Counter((e["id"], e["attempt"]) for e in executions(tmp_path / "executions.jsonl"))
    assert max(ran.values()) == 1  # at most once per durable attempt
    stored = attempts(tmp_path / "store.jsonl")
    for promise_id, n in stored.items():
        assert {a for (i, a) in ran if i == promise_id} == set(range(1, n + 1)), promise_id
    assert stored[f"{ROOT}.0"] == stored[f"{ROOT}.1"] == 1  # resolved before the kill: never rerun
    assert len(stored) == ITEMS


def test_a_step_process_killed_mid_step_is_replaced_and_the_run_ends_by_itself(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    with driver(tmp_path, "--hold=2", "--hold-attempt=1") as d:
        (held,) = d.in_step(1, seen, held={2})
        os.kill(held["pid"], signal.SIGKILL)
        out, _ = d.proc.communicate(timeout=SAFETY_TIMEOUT_S)
        assert d.proc.returncode == 0, (tmp_path / "driver.log").read_text()
        assert json.loads(out.splitlines()[-1])["value"] == [i * i for i in range(ITEMS)]
        while (event := d.announcements.next()) is not None:  # to the end: every writer is gone
            seen.append(event)
        assert group_members(d.proc.pid) == []
    (retry,) = [e for e in seen if e["item"] == 2 and e["attempt"] == 2]
    assert retry["pid"] != held["pid"] and retry["ppid"] == d.proc.pid
    assert attempts(tmp_path / "store.jsonl") == {f"{ROOT}.{i}": 1 + (i == 2) for i in range(ITEMS)}
