"""A step's recover function runs in a step process too: one killed while it looks is asked
again, never taken for the run's failure."""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from store import MemoryStore, State
from workflow import Context, RetryPolicy, Runner, register


def _first_time(marker: Path) -> bool:
    """True the first time it is asked for `marker` (in any process)."""
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def dies_looking_once(directory: str) -> Any:
    if _first_time(Path(directory) / "recover-died"):
        os.kill(os.getpid(), signal.SIGKILL)
    return None  # the dead attempt made nothing durable


@register(name="pool_recover.step", recover=dies_looking_once)
def dies_once_then_works(directory: str) -> str:
    if _first_time(Path(directory) / "attempt-died"):
        os.kill(os.getpid(), signal.SIGKILL)
    return "done"


@register(name="pool_recover.wf")
def one_step(ctx: Context, directory: str) -> Generator[Any, Any, str]:
    return (yield (yield ctx.begin(dies_once_then_works, directory)))


@pytest.mark.parametrize("earlier_run", [False, True], ids=["same-run", "after-a-restart"])
def test_a_recover_function_killed_in_its_step_process_is_asked_again(
    tmp_path: Path, earlier_run: bool
) -> None:
    with MemoryStore() as store:
        if earlier_run:  # a worker died in attempt 1: the next run asks the recover function first
            (tmp_path / "attempt-died").touch()
            store.create("pool_recover.0", {"fn": "pool_recover.step", "v": 1, "args": [str(tmp_path)]})
            store.start_attempt("pool_recover.0")
        runner = Runner(store, workers=2, retry=RetryPolicy(initial=0.01))
        assert runner.run("pool_recover", one_step, str(tmp_path)) == "done"
        step = store.get("pool_recover.0")
    assert step.state is State.RESOLVED
    assert step.attempts == 2  # the attempt that died, and the one that worked
    assert (tmp_path / "recover-died").exists()  # the recover function was cut short once
