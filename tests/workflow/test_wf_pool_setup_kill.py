"""A step process SIGKILLed while it sets up (a supervisor's pool kill may come at any time) is
replaced by another, not taken for a setup that failed: the run goes on."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from workflow.context import StepInfo
from workflow.executor import StepProcessLost
from workflow.pool import ProcessPool


def nap_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"not within 10 s: {what}"
        time.sleep(0.01)


def test_a_step_process_killed_while_setting_up_is_replaced(tmp_path: Path) -> None:
    slow = tmp_path / "slow-setup"  # while it exists, a setup says who it is, then takes 1 s

    @contextmanager
    def setup() -> Iterator[dict[str, int]]:
        if slow.exists():
            (tmp_path / f"setting-up-{os.getpid()}").touch()
            time.sleep(1)
        yield {}

    def run(seconds: float) -> int:
        return pool.run(StepInfo("r.0", 1, "nap_then_pid", {}), nap_then_pid, (seconds,), {}, None)

    pool = ProcessPool(1, setup=setup)
    try:
        [first] = pool.pids
        killed: list[int] = []

        def kill_first_in_its_task_then_its_successor_in_its_setup() -> None:
            time.sleep(0.2)
            os.kill(first, signal.SIGKILL)  # its task is lost; a successor sets up
            _wait_until(lambda: any(tmp_path.glob("setting-up-*")), "a successor sets up")
            [second] = [int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("setting-up-*")]
            slow.unlink()
            os.kill(second, signal.SIGKILL)  # in its setup: a third process takes its place
            killed.append(second)

        slow.touch()
        killer = threading.Thread(target=kill_first_in_its_task_then_its_successor_in_its_setup)
        killer.start()
        # This thread forks the successors (a step process dies with the thread that forked it).
        with pytest.raises(StepProcessLost, match=f"step process {first} died"):
            run(5)
        killer.join(10)
        [third] = pool.pids
        assert killed and third not in (first, killed[0])
        assert run(0) == third  # the pool runs on
    finally:
        pool.close()
