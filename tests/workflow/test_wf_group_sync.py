"""How many fdatasyncs the fan-out runtime makes, counted at the syscall wrapper (a spy that
still calls the real os.fdatasync) on a real JSON-lines store with full durability.

With one worker, the calls a workflow begins run when it waits and settle as a group with one
fdatasync; sequential `ctx.run` keeps one per settle; a step with a recover function settles
with the next sync. In every mode a value reaches the workflow only once what the store wrote
before it is on disk. An exclusive store writes a call's creation with its first attempt, so a
call costs two lines.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fanout_helpers import refuse_odd, square

from store import JsonlStore, State
from workflow import Context, Runner, StepError, register

ROOT = "sync"
Gen = Generator[Any, Any, Any]
SYNCED: list[int] = []  # the store file's size at each fdatasync, in order


@pytest.fixture(autouse=True)
def count_fdatasyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        SYNCED.append(os.fstat(fd).st_size)
        real(fd)

    SYNCED.clear()
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    yield
    SYNCED.clear()


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    return tmp_path / "store.jsonl"


def run(store_file: Path, workflow: Any, *args: Any, workers: int = 1) -> tuple[Any, int]:
    """Run `workflow` on a fresh exclusive store; its value and the fdatasyncs the run made."""
    with JsonlStore(store_file, exclusive=True) as store:
        runner = Runner(store, dependencies={"log": str(store_file.with_name("executions.jsonl"))},
                        workers=workers)
        value = runner.run(ROOT, workflow, *args)
        return value, len(SYNCED)


# -- workflows -------------------------------------------------------------------------------------


@register(name="sync.begin_then_gather")
def begin_then_gather(ctx: Context, n: int, store_file: str) -> Gen:
    """Begins n squares, gathers them; notes what was synced when the values came back."""
    before = len(SYNCED)
    handles = []
    for i in range(n):
        handles.append((yield ctx.begin(square, i)))
    begun = len(SYNCED) - before
    values = yield ctx.gather(*handles)
    return {"values": values, "syncs_while_beginning": begun, "syncs_for_the_group": len(SYNCED) - before,
            "unsynced_bytes": os.path.getsize(store_file) - SYNCED[-1]}


@register(name="sync.one_by_one")
def one_by_one(ctx: Context, n: int) -> Gen:
    values = []
    for i in range(n):
        values.append((yield ctx.run(square, i)))
    return values


@register(name="sync.mapped")
def mapped(ctx: Context, n: int, concurrency: int) -> Gen:
    return (yield ctx.map(square, range(n), concurrency=concurrency))


@register(name="sync.fire_and_forget")
def fire_and_forget(ctx: Context, n: int) -> Gen:
    for i in range(n):
        yield ctx.begin(square, i)
    return n


def nothing_found(i: int) -> None:
    return None


@register(name="sync.recoverable", recover=nothing_found)
def recoverable(i: int) -> int:
    return i


@register(name="sync.recoverable_one_by_one")
def recoverable_one_by_one(ctx: Context, n: int) -> Gen:
    values = []
    for i in range(n):
        values.append((yield ctx.run(recoverable, i)))
    return values


@register(name="sync.gather_a_failure")
def gather_a_failure(ctx: Context) -> Gen:
    handles = []
    for i in range(4):
        handles.append((yield ctx.begin(refuse_odd, i)))
    return (yield ctx.gather(*handles))


# -- one worker: one sync per group ----------------------------------------------------------------


def test_begun_calls_settle_as_a_group_with_one_fdatasync_before_their_values_come_back(
    store_file: Path
) -> None:
    got, total = run(store_file, begin_then_gather, 5, str(store_file))
    assert got == {"values": [0, 1, 4, 9, 16], "syncs_while_beginning": 0, "syncs_for_the_group": 1,
                   "unsynced_bytes": 0}
    assert total == 2  # the group's and the root's


def test_sequential_calls_keep_one_fdatasync_per_settle(store_file: Path) -> None:
    assert run(store_file, one_by_one, 5) == ([0, 1, 4, 9, 16], 6)


def test_map_syncs_once_per_k_calls(store_file: Path) -> None:
    assert run(store_file, mapped, 20, 4) == ([i * i for i in range(20)], 20 // 4 + 1)


def test_a_thousand_begun_calls_never_awaited_share_one_fdatasync(store_file: Path) -> None:
    assert run(store_file, fire_and_forget, 1000) == (1000, 2)
    with JsonlStore(store_file, readonly=True) as store:
        assert sum(p.state is State.RESOLVED for p in store.list(f"{ROOT}.")) == 1000


def test_a_rejected_call_in_a_group_shares_its_sync(store_file: Path) -> None:
    with pytest.raises(StepError, match=r"\(sync\.1\) failed"):
        run(store_file, gather_a_failure)
    assert len(SYNCED) == 2  # the group's (two resolved, two rejected) and the root's rejection
    with JsonlStore(store_file, readonly=True) as store:
        assert [p.state for p in store.list(f"{ROOT}.")] == [State.RESOLVED, State.REJECTED] * 2


def test_steps_with_a_recover_function_settle_with_the_next_sync(store_file: Path) -> None:
    assert run(store_file, recoverable_one_by_one, 3) == ([0, 1, 2], 1)  # the root's covers them
    assert SYNCED[-1] == os.path.getsize(store_file)


# -- a pool: each value is durable before the workflow sees it -----------------------------------------


def test_with_a_pool_everything_written_is_synced_before_the_values_come_back(store_file: Path) -> None:
    got, _ = run(store_file, begin_then_gather, 5, str(store_file), workers=2)
    assert got["values"] == [0, 1, 4, 9, 16] and got["unsynced_bytes"] == 0
    assert 1 <= got["syncs_for_the_group"] <= 5
    assert SYNCED[-1] == os.path.getsize(store_file)


def test_a_runner_driven_from_another_thread_still_syncs_once_per_group(store_file: Path) -> None:
    out: list[Any] = []

    def drive() -> None:
        out.append(run(store_file, begin_then_gather, 5, str(store_file)))

    driver = threading.Thread(target=drive)
    driver.start()
    driver.join()
    assert out[0][1] == 2


# -- what reaches the file ---------------------------------------------------------------------------


def lines_per_call(store_file: Path, workflow: Any, *args: Any, workers: int = 1) -> float:
    run(store_file, workflow, *args, workers=workers)
    with JsonlStore(store_file, readonly=True) as store:
        calls = len(store.list(f"{ROOT}."))
    return (store_file.read_bytes().count(b"\n") - 2) / calls  # less the root's create and resolve


def test_a_sequential_call_is_two_lines(store_file: Path) -> None:
    assert lines_per_call(store_file, one_by_one, 10) == 2  # creation with first attempt, resolve


@pytest.mark.parametrize("workers", [1, 2])
def test_a_begun_call_is_two_lines_too(store_file: Path, workers: int) -> None:
    lines = lines_per_call(store_file, mapped, 32, 16, workers=workers)
    if workers == 1:
        assert lines == 2
    else:  # a pool's threads may start a later call first: the earlier creation is then written
        assert 2 <= lines <= 2.25  # alone, before it, so the file keeps the order of creation
