"""Cancelling a workflow in-process: seen between steps, the root rejected as cancelled, resumed
by a retry; on the JSON-lines file (a request made while the worker holds the store) and in
memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from store import (
    JsonlStore,
    MemoryStore,
    PromiseConflictError,
    PromiseNotFoundError,
    PromiseStore,
    State,
    open_store,
)
from workflow import Context, Runner, WorkflowCancelled, current_step, register
from workflow.history import state_of

ROOT = "wf/cancel"
CANCEL_AT = 3


@register(name="tc.step")
def step(i: int) -> int:
    """Step CANCEL_AT asks for a cancel of its own workflow (an operator would, from elsewhere),
    then outlasts the runner's look-up interval, so the next step boundary sees it."""
    deps = current_step()
    deps.dependency("ran").append(i)
    if i == CANCEL_AT and deps.dependency("cancel_at_3"):
        with open_store(deps.dependency("url"), readonly=True) as operator:
            operator.request_cancel(ROOT)
        time.sleep(0.3)
    return i * 10


@register(name="tc.steps")
def steps(ctx: Context, n: int) -> Generator[Any, Any, list[int]]:
    values = []
    for i in range(n):
        values.append((yield ctx.run(step, i)))
    return values


def runner(store: PromiseStore, ran: list[int], url: str, cancel_at_3: bool = True) -> Runner:
    return Runner(store, dependencies={"ran": ran, "url": url, "cancel_at_3": cancel_at_3})


def test_a_cancel_stops_the_workflow_at_the_next_step_and_retry_resumes_it(tmp_path: Path) -> None:
    url = str(tmp_path / "store.jsonl")
    ran: list[int] = []
    with JsonlStore(url, exclusive=True) as store:
        with pytest.raises(WorkflowCancelled, match=f"workflow {ROOT} is cancelled"):
            runner(store, ran, url).run(ROOT, steps, 8)
        assert ran == [0, 1, 2, 3]  # step 3 finished; step 4 never started
        root = store.get(ROOT)
        assert root.state is State.REJECTED and state_of(root) == "cancelled"
        calls = store.list(f"{ROOT}.")
        assert [p.state for p in calls] == [State.RESOLVED] * 4 + [State.PENDING]
        assert calls[4].attempts == 0  # its call was made, its step never started
    with JsonlStore(url, exclusive=True) as store:  # cancelled for good: a run runs nothing
        with pytest.raises(WorkflowCancelled):
            runner(store, ran, url).run(ROOT, steps, 8)
        assert ran == [0, 1, 2, 3]
        assert Runner(store).retry(ROOT) == [ROOT]
        assert not store.cancel_requested(ROOT)  # withdrawn by the retry
        assert runner(store, ran, url, cancel_at_3=False).run(ROOT, steps, 8) == [i * 10 for i in range(8)]
    assert ran == [0, 1, 2, 3, 4, 5, 6, 7]  # nothing done twice


def test_cancel_settles_a_workflow_nobody_drives_at_once(store: PromiseStore) -> None:
    ran: list[int] = []
    with pytest.raises(WorkflowCancelled):  # drive it to its first step, cancelled there
        store.request_cancel(ROOT)
        runner(store, ran, "memory:", cancel_at_3=False).run(ROOT, steps, 2)
    assert ran == []
    Runner(store).retry(ROOT)
    assert Runner(store).cancel(ROOT) is True  # nobody drives it: cancelled now
    assert state_of(store.get(ROOT)) == "cancelled"
    assert Runner(store).cancel(ROOT) is True  # again: no word


def test_cancel_of_a_driven_workflow_leaves_it_to_its_driver() -> None:
    store = MemoryStore(lock_timeout=0.05)  # another's ownership is waited for a moment only
    store.create(ROOT, {"fn": "tc.steps", "v": 1, "args": [2]})
    held, release = threading.Event(), threading.Event()

    def drive() -> None:
        with store.own(ROOT):
            held.set()
            release.wait(5)

    driver = threading.Thread(target=drive)
    driver.start()
    held.wait(5)
    try:
        assert Runner(store).cancel(ROOT) is False
        assert store.cancel_requested(ROOT) and store.get(ROOT).state is State.PENDING
    finally:
        release.set()
        driver.join()


def test_cancel_refuses_a_finished_failed_or_unknown_workflow(store: PromiseStore) -> None:
    ran: list[int] = []
    runner(store, ran, "memory:", cancel_at_3=False).run(ROOT, steps, 1)
    with pytest.raises(PromiseConflictError, match="is resolved: it finished"):
        Runner(store).cancel(ROOT)
    store.create("wf/failed", 1)
    store.reject("wf/failed", {"type": "E", "message": "m"})
    with pytest.raises(PromiseConflictError, match="failed \\(retry it instead\\)"):
        Runner(store).cancel("wf/failed")
    with pytest.raises(PromiseNotFoundError):
        Runner(store).cancel("wf/none")
    assert not store.cancel_requested(ROOT)


def test_a_request_the_workflow_finished_before_seeing_is_withdrawn(store: PromiseStore) -> None:
    ran: list[int] = []
    runner(store, ran, "memory:", cancel_at_3=False).run(ROOT, steps, 1)
    store.request_cancel(ROOT)  # too late: it is done
    assert runner(store, ran, "memory:").run(ROOT, steps, 1) == [0]
    assert not store.cancel_requested(ROOT) and store.get(ROOT).state is State.RESOLVED


@register(name="tc.asks_cancel")
def asks_cancel(url: str) -> str:
    """The last step asks for a cancel of its own workflow and ends at once: no boundary is
    left but the workflow's end, which the runner's look-up interval has not come round to."""
    with open_store(url, readonly=True) as operator:
        operator.request_cancel(ROOT)
    return "asked"


@register(name="tc.ends_with_a_cancel")
def ends_with_a_cancel(ctx: Context, url: str) -> Generator[Any, Any, list[Any]]:
    first = yield ctx.run(step, 0)
    last = yield ctx.begin(asks_cancel, url)
    return [first, (yield last)]


def test_a_cancel_during_the_last_step_cancels_at_the_workflow_end(tmp_path: Path) -> None:
    url = str(tmp_path / "store.jsonl")
    ran: list[int] = []
    with JsonlStore(url, exclusive=True) as store:
        with pytest.raises(WorkflowCancelled):
            runner(store, ran, url).run(ROOT, ends_with_a_cancel, url)
        root = store.get(ROOT)
        assert root.state is State.REJECTED and state_of(root) == "cancelled"
        assert [p.state for p in store.list(f"{ROOT}.")] == [State.RESOLVED] * 2  # both done
        Runner(store).retry(ROOT)
        assert runner(store, ran, url).run(ROOT, ends_with_a_cancel, url) == [0, "asked"]
    assert ran == [0]  # nothing ran again
