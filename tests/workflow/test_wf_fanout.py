"""Durable fan-out from the outside: ctx.begin, handles, ctx.gather and ctx.map, with the begun
calls run in the driver (workers=1) and in a pool of forked step processes (workers=2).

What is pinned: ids `<parent>.<n>` in call order, values in order, the first failure in order
raised once all have ended with the others durable, lazy iteration with at most K unfinished,
replay without running, the determinism check for begun calls, begun calls run to their end,
stops that leave nothing half-settled. Steps log every execution (fanout_helpers), so a test
sees what ran in any process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fanout_helpers import (
    FAST,
    add,
    children,
    executed_ids,
    executions,
    ids,
    read_exactly,
    refuse_odd,
    refuse_odd_while,
    square,
)
from wf_helpers import open_store

from store import MemoryStore, PromiseStore, State
from workflow import (
    Context,
    NonDeterminismError,
    Runner,
    StepError,
    StepEvent,
    WorkflowInterrupted,
    WorkflowUsageError,
    register,
)

ROOT = "fan"
WORKERS = [pytest.param(1, id="driver"), pytest.param(2, id="pool")]
Gen = Generator[Any, Any, Any]


@pytest.fixture(params=WORKERS)
def workers(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "executions.jsonl"


@pytest.fixture
def make_runner(log: Path, workers: int) -> Callable[..., Runner]:
    """A Runner with `workers` and the execution log as the `log` dependency."""

    def make(store: PromiseStore, **options: Any) -> Runner:
        return Runner(store, retry=FAST, dependencies={"log": str(log)}, workers=workers, **options)

    return make


# -- workflows ---------------------------------------------------------------------------------


@register(name="fan.begin_each")
def begin_each(ctx: Context, items: list[int]) -> Gen:
    """Begins one square per item, then waits for each handle in turn (one of them twice)."""
    handles = []
    for i in items:
        handles.append((yield ctx.begin(square, i)))
    values = []
    for h in handles:
        values.append((yield h))
    again = (yield handles[0]) if handles else None
    return {"ids": [h.promise_id for h in handles], "values": values, "again": again,
            "done": [h.done() for h in handles]}


@register(name="fan.gather_all")
def gather_all(ctx: Context, items: list[int]) -> Gen:
    handles = []
    for i in items:
        handles.append((yield ctx.begin(square, i)))
    return (yield ctx.gather(*handles))


@register(name="fan.gather_catching")
def gather_catching(ctx: Context, items: list[int]) -> Gen:
    """Gathers refuse_odd over the items; returns which failure it caught and what had ended."""
    handles = []
    for i in items:
        handles.append((yield ctx.begin(refuse_odd, i)))
    try:
        yield ctx.gather(*handles)
    except StepError as exc:
        return {"failed": exc.promise_id, "done": [h.done() for h in handles]}
    return {"failed": None}


@register(name="fan.gather_uncaught")
def gather_uncaught(ctx: Context, marker: str) -> Gen:
    handles = []
    for i in range(5):
        handles.append((yield ctx.begin(refuse_odd_while, i, marker)))
    return (yield ctx.gather(*handles))


@register(name="fan.map_squares")
def map_squares(ctx: Context, n: int, concurrency: int) -> Gen:
    return (yield ctx.map(square, range(n), concurrency=concurrency))


@register(name="fan.map_zip")
def map_zip(ctx: Context, a: list[int], b: list[int]) -> Gen:
    return (yield ctx.map(add, iter(a), iter(b), concurrency=2))


@register(name="fan.map_catching")
def map_catching(ctx: Context, n: int) -> Gen:
    try:
        yield ctx.map(refuse_odd, range(n), concurrency=2)
    except StepError as exc:
        return exc.promise_id
    return None


@register(name="fan.map_endless")
def map_endless(ctx: Context, n: int) -> Gen:
    """ctx.map over an endless iterable zipped with a short one: it must not be read to its end."""
    return (yield ctx.map(add, itertools.count(), range(n), concurrency=3))


PULLED: list[int] = []  # items a lazy iterable gave so far (the workflow runs in the driver)


def counted(n: int) -> Iterator[int]:
    for i in range(n):
        PULLED.append(i)
        yield i


@register(name="fan.map_counted")
def map_counted(ctx: Context, n: int, concurrency: int) -> Gen:
    return (yield ctx.map(square, counted(n), concurrency=concurrency))


@register(name="fan.map_concurrency")
def map_concurrency(ctx: Context, concurrency: Any) -> Gen:
    return (yield ctx.map(square, [1, 2], concurrency=concurrency))


@register(name="fan.sub")
def sub(ctx: Context, i: int) -> Gen:
    a = yield ctx.run(square, i)
    b = yield (yield ctx.begin(square, i + 1))
    return a + b


@register(name="fan.mixed")
def mixed(ctx: Context) -> Gen:
    """Every kind of durable call, interleaved: begun, run, mapped, a sub-workflow begun."""
    a = yield ctx.begin(square, 1)  # .0
    b = yield ctx.run(square, 2)  # .1
    c = yield ctx.begin(add, 3, 4)  # .2
    d = yield ctx.map(square, [5, 6], concurrency=2)  # .3 .4
    e = yield ctx.begin(sub, 7)  # .5 (.5.0 .5.1)
    f = yield ctx.run(square, 8)  # .6
    return [(yield a), b, (yield c), d, (yield e), f, e.done()]


@register(name="fan.fire_and_forget")
def fire_and_forget(ctx: Context, n: int) -> Gen:
    for i in range(n):
        yield ctx.begin(square, i)
    return n


@register(name="fan.sequential")
def sequential(ctx: Context, n: int) -> Gen:
    values = []
    for i in range(n):
        values.append((yield ctx.run(square, i)))
    return values


# -- begin and handles -------------------------------------------------------------------------


def test_begin_gives_a_handle_at_once_and_waiting_gives_the_value(
    store: PromiseStore, make_runner: Callable[..., Runner], log: Path
) -> None:
    got = make_runner(store).run(ROOT, begin_each, [3, 1, 2])
    assert got == {"ids": ids(ROOT, 3), "values": [9, 1, 4], "again": 9, "done": [True] * 3}
    assert executed_ids(log) == dict.fromkeys(ids(ROOT, 3), 1)  # waited twice, run once


def test_ids_follow_the_call_order_whatever_kind_of_call_and_whatever_ends_first(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    got = make_runner(store).run(ROOT, mixed)
    assert got == [1, 4, 7, [25, 36], 49 + 64, 64, True]
    params = {pid: (p.param["fn"], p.param["args"]) for pid, p in children(store, ROOT).items()}
    assert params == {
        "fan.0": ("fan.square", [1]), "fan.1": ("fan.square", [2]), "fan.2": ("fan.add", [3, 4]),
        "fan.3": ("fan.square", [5]), "fan.4": ("fan.square", [6]), "fan.5": ("fan.sub", [7]),
        "fan.5.0": ("fan.square", [7]), "fan.5.1": ("fan.square", [8]), "fan.6": ("fan.square", [8]),
    }


def test_a_finished_workflow_replays_without_running_anything(
    store_path: Path, workers: int, log: Path
) -> None:
    def run() -> Any:
        with open_store(store_path) as store:
            return Runner(store, dependencies={"log": str(log)}, workers=workers).run(ROOT, mixed)

    first = run()
    ran = executions(log)
    assert run() == first
    assert executions(log) == ran


def test_sequential_code_records_the_same_history_with_a_pool(log: Path) -> None:
    histories = []
    for workers in (1, 2):
        with MemoryStore() as store:
            got = Runner(store, dependencies={"log": str(log)}, workers=workers).run(ROOT, sequential, 4)
            assert got == [0, 1, 4, 9]
            histories.append([(p.id, p.state, p.param, p.value, p.attempts) for p in store.list()])
    assert histories[0] == histories[1]


# -- gather ------------------------------------------------------------------------------------


def test_gather_gives_the_values_in_handle_order(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    assert make_runner(store).run(ROOT, gather_all, [4, 0, 3]) == [16, 0, 9]


def test_gather_of_no_handles_gives_an_empty_list(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    assert make_runner(store).run(ROOT, gather_all, []) == []
    assert children(store, ROOT) == {}


def test_gather_raises_the_first_failure_in_handle_order_once_all_have_ended(
    store: PromiseStore, make_runner: Callable[..., Runner], log: Path
) -> None:
    # handles: fan.0 ok, fan.1 (3) fails, fan.2 ok, fan.3 (1) fails, fan.4 ok
    got = make_runner(store).run(ROOT, gather_catching, [0, 3, 2, 1, 4])
    assert got == {"failed": "fan.1", "done": [True] * 5}
    states = {pid: p.state for pid, p in children(store, ROOT).items()}
    assert states == {"fan.0": State.RESOLVED, "fan.1": State.REJECTED, "fan.2": State.RESOLVED,
                      "fan.3": State.REJECTED, "fan.4": State.RESOLVED}
    assert executed_ids(log) == dict.fromkeys(ids(ROOT, 5), 1)


def test_after_a_failed_gather_a_retry_runs_only_the_failed_calls(
    store: PromiseStore, make_runner: Callable[..., Runner], log: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "broken"
    marker.touch()
    runner = make_runner(store)
    with pytest.raises(StepError, match=r"\(fan\.1\) failed .*Refused: 1 is odd"):
        runner.run(ROOT, gather_uncaught, str(marker))
    marker.unlink()  # the operator fixes the cause, then retries
    assert runner.retry(ROOT) == ["fan.1", "fan.3", ROOT]
    assert runner.run(ROOT, gather_uncaught, str(marker)) == [0, 1, 2, 3, 4]
    assert executed_ids(log) == {"fan.0": 1, "fan.1": 2, "fan.2": 1, "fan.3": 2, "fan.4": 1}


# -- map ---------------------------------------------------------------------------------------


def test_map_gives_the_values_in_item_order_with_one_call_per_item(
    store: PromiseStore, make_runner: Callable[..., Runner], log: Path
) -> None:
    assert make_runner(store).run(ROOT, map_squares, 10, 3) == [i * i for i in range(10)]
    assert {pid: p.param["args"] for pid, p in children(store, ROOT).items()} == {
        f"fan.{i}": [i] for i in range(10)
    }
    assert executed_ids(log) == dict.fromkeys(ids(ROOT, 10), 1)


def test_map_over_nothing_gives_an_empty_list_and_makes_no_call(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    assert make_runner(store).run(ROOT, map_squares, 0, 4) == []
    assert children(store, ROOT) == {}


def test_map_over_iterables_of_different_lengths_stops_at_the_shortest(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    assert make_runner(store).run(ROOT, map_zip, [1, 2, 3], [10, 20]) == [11, 22]
    assert sorted(children(store, ROOT)) == ids(ROOT, 2)


def test_map_never_reads_an_endless_iterable_to_its_end(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    assert make_runner(store).run(ROOT, map_endless, 5) == [0, 2, 4, 6, 8]


def test_map_reads_its_items_lazily_with_at_most_k_unfinished(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    """When call i starts, at most i + K items were read: item i + K waits for one of the K."""
    k = 3
    pulled_at_start: dict[str, int] = {}

    def on_event(e: StepEvent) -> None:
        if e.kind == "started":
            pulled_at_start[e.promise_id] = len(PULLED)

    PULLED.clear()
    assert make_runner(store, on_event=on_event).run(ROOT, map_counted, 20, k) == [i * i for i in range(20)]
    assert len(pulled_at_start) == 20
    too_early = {pid: n for pid, n in pulled_at_start.items() if n > int(pid.split(".")[1]) + k}
    assert too_early == {}


@pytest.mark.parametrize("concurrency", [0, -1, "3", 2.0, True, None])
def test_map_refuses_a_concurrency_that_is_not_a_whole_number_above_0(
    store: PromiseStore, make_runner: Callable[..., Runner], concurrency: Any
) -> None:
    with pytest.raises(WorkflowUsageError, match=r"concurrency must be a whole number ≥ 1"):
        make_runner(store).run(ROOT, map_concurrency, concurrency)
    assert children(store, ROOT) == {}


def test_map_runs_every_item_to_its_end_then_raises_the_first_failure(
    store: PromiseStore, make_runner: Callable[..., Runner], log: Path
) -> None:
    assert make_runner(store).run(ROOT, map_catching, 6) == "fan.1"
    assert executed_ids(log) == dict.fromkeys(ids(ROOT, 6), 1)
    assert [p.state for p in children(store, ROOT).values()] == [State.RESOLVED, State.REJECTED] * 3


# -- begun calls that are never awaited ----------------------------------------------------------


def test_a_begun_call_never_awaited_ends_before_its_workflow_is_settled(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    resolved: list[str] = []
    lock = threading.Lock()

    def on_event(e: StepEvent) -> None:
        if e.kind == "resolved":
            with lock:
                resolved.append(e.promise_id)

    assert make_runner(store, on_event=on_event).run(ROOT, fire_and_forget, 5) == 5
    assert resolved[-1] == ROOT
    assert sorted(resolved[:-1]) == ids(ROOT, 5)
    assert {p.state for p in children(store, ROOT).values()} == {State.RESOLVED}


def test_a_thousand_begun_calls_never_awaited_all_run_once(
    store: PromiseStore, make_runner: Callable[..., Runner], log: Path
) -> None:
    assert make_runner(store).run(ROOT, fire_and_forget, 1000) == 1000
    promises = children(store, ROOT)
    assert len(promises) == 1000
    assert {(p.state, p.attempts) for p in promises.values()} == {(State.RESOLVED, 1)}
    assert sorted(executed_ids(log).values()) == [1] * 1000


@register(name="fan.fire_a_failure")
def fire_a_failure(ctx: Context) -> Gen:
    yield ctx.begin(refuse_odd, 1)
    return "ended"


def test_a_begun_call_never_awaited_that_fails_is_rejected_and_its_workflow_ends(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    """Nobody waits for it, so its failure reaches no yield; it is recorded all the same."""
    assert make_runner(store).run(ROOT, fire_a_failure) == "ended"
    assert store.get("fan.0").state is State.REJECTED


# -- the determinism check covers begun calls ----------------------------------------------------

SECOND_CALL = {"fn": square}  # what `begins_two` begins second: a test changes it between runs


@register(name="fan.cube")
def cube(i: int) -> int:
    return i**3


@register(name="fan.begins_two")
def begins_two(ctx: Context) -> Gen:
    yield ctx.begin(square, 1)
    yield ctx.begin(SECOND_CALL["fn"], 2)  # never awaited
    return (yield ctx.run(square, 3))


def test_a_changed_begun_call_that_was_never_awaited_is_a_non_determinism_error(
    store: PromiseStore, make_runner: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WorkflowInterrupted):
        make_runner(store, should_stop=lambda: True).run(ROOT, begins_two)
    assert store.get("fan.1").param["fn"] == "fan.square"
    monkeypatch.setitem(SECOND_CALL, "fn", cube)
    with pytest.raises(NonDeterminismError, match=r"call fan\.1 was recorded as fan\.square v1, but the "
                       r"code now calls fan\.cube v1"):
        make_runner(store).run(ROOT, begins_two)


# -- failures thrown into the workflow while others are in flight --------------------------------


@register(name="fan.gated")
def gated(fd: int) -> str:
    """Waits for one byte on the pipe `fd` (inherited by a forked step process)."""
    note = read_exactly(fd, 1)
    return note.decode()


@register(name="fan.catch_while_in_flight")
def catch_while_in_flight(ctx: Context, fd: int, rethrow: bool) -> Gen:
    slow = yield ctx.begin(gated, fd)
    failing = yield ctx.begin(refuse_odd, 1)
    try:
        yield failing
    except StepError as exc:
        if rethrow:
            raise
        return {"caught": exc.promise_id, "slow_done": slow.done()}
    return None


@pytest.mark.parametrize("rethrow", [False, True], ids=["caught", "uncaught"])
def test_a_failure_thrown_in_while_another_call_is_in_flight_waits_for_it(
    store: PromiseStore, make_runner: Callable[..., Runner], workers: int, rethrow: bool
) -> None:
    """With a pool, the slow call is still running when the failure reaches the workflow (it
    is released only once the failure is rejected); the workflow ends only after it."""
    r, w = os.pipe()
    try:
        def release(e: StepEvent) -> None:
            if e.kind == "rejected" and e.promise_id == "fan.1":
                os.write(w, b"x")

        if workers == 1:  # the driver runs begun calls in order: the slow one comes first
            os.write(w, b"x")
        runner = make_runner(store, on_event=None if workers == 1 else release)
        if rethrow:
            with pytest.raises(StepError, match=r"\(fan\.1\) failed"):
                runner.run(ROOT, catch_while_in_flight, r, rethrow)
            assert store.get(ROOT).state is State.REJECTED
        else:
            got = runner.run(ROOT, catch_while_in_flight, r, rethrow)
            assert got["caught"] == "fan.1"
        assert store.get("fan.0").state is State.RESOLVED
        assert store.get("fan.0").value == "x"
    finally:
        os.close(r)
        os.close(w)


# -- sub-workflows begun -------------------------------------------------------------------------


@register(name="fan.begin_subs")
def begin_subs(ctx: Context) -> Gen:
    handles = []
    for i in (1, 10):
        handles.append((yield ctx.begin(sub, i)))
    return (yield ctx.gather(*handles))


def test_a_begun_sub_workflow_runs_to_its_end_with_ids_under_its_own(
    store: PromiseStore, make_runner: Callable[..., Runner], log: Path
) -> None:
    assert make_runner(store).run(ROOT, begin_subs) == [1 + 4, 100 + 121]
    assert sorted(children(store, ROOT)) == ["fan.0", "fan.0.0", "fan.0.1", "fan.1", "fan.1.0", "fan.1.1"]
    ran = executions(log)
    assert make_runner(store).run(ROOT, begin_subs) == [5, 221]
    assert executions(log) == ran


# -- stops ---------------------------------------------------------------------------------------


def stop_after(resolved: int) -> tuple[Callable[[], bool], Callable[[StepEvent], None]]:
    """should_stop and on_event: stop once `resolved` steps have been resolved."""
    count = itertools.count(1)
    stop = threading.Event()

    def on_event(e: StepEvent) -> None:
        if e.kind == "resolved" and e.fn == "fan.square" and next(count) >= resolved:
            stop.set()

    return stop.is_set, on_event


def test_a_stop_during_a_map_leaves_nothing_half_settled_and_the_next_run_resumes(
    store: PromiseStore, make_runner: Callable[..., Runner], log: Path
) -> None:
    should_stop, on_event = stop_after(3)
    with pytest.raises(WorkflowInterrupted):
        make_runner(store, should_stop=should_stop, on_event=on_event).run(ROOT, map_squares, 12, 4)
    promises = children(store, ROOT).values()
    assert sum(p.state is State.RESOLVED for p in promises) >= 3
    half_done = [p.id for p in promises if p.state is State.PENDING and p.attempts]
    assert half_done == []  # what had started was run to its end; the rest never started
    assert store.get(ROOT).state is State.PENDING

    assert make_runner(store).run(ROOT, map_squares, 12, 4) == [i * i for i in range(12)]
    assert executed_ids(log) == dict.fromkeys(ids(ROOT, 12), 1)


@pytest.mark.parametrize("workers", [
    pytest.param(1, id="driver"),
    pytest.param(2, id="pool"),
])
def test_a_stop_before_a_begun_call_ran_keeps_its_workflow_pending(
    store: PromiseStore, make_runner: Callable[..., Runner], log: Path
) -> None:
    should_stop, on_event = stop_after(1)
    runner = make_runner(store, should_stop=should_stop, on_event=on_event)
    with contextlib.suppress(WorkflowInterrupted):
        runner.run(ROOT, fire_and_forget, 3)
    pending = [p.id for p in children(store, ROOT).values() if p.state is State.PENDING]
    if pending:  # a call that never ran: its workflow must not be settled without it
        assert store.get(ROOT).state is State.PENDING, f"{ROOT} resolved, {pending} never ran"
    assert make_runner(store).run(ROOT, fire_and_forget, 3) == 3
    assert {p.state for p in children(store, ROOT).values()} == {State.RESOLVED}


# -- misuse ----------------------------------------------------------------------------------------

LEAKED: list[Any] = []  # a handle smuggled out of one workflow into another


@register(name="fan.leaks_a_handle")
def leaks_a_handle(ctx: Context) -> Gen:
    LEAKED.append((yield ctx.begin(square, 1)))
    return (yield ctx.run(square, 2))  # a stop comes here: the begun call never runs


@register(name="fan.waits_for_a_foreign_handle")
def waits_for_a_foreign_handle(ctx: Context) -> Gen:
    return (yield LEAKED[-1])


def test_waiting_for_a_handle_of_another_run_is_a_usage_error(
    make_runner: Callable[..., Runner]
) -> None:
    with MemoryStore() as store, pytest.raises(WorkflowInterrupted):
        make_runner(store, should_stop=lambda: True).run("first", leaks_a_handle)
    outcome: list[BaseException | Any] = []

    def second() -> None:
        try:
            with MemoryStore() as store:
                outcome.append(make_runner(store).run("second", waits_for_a_foreign_handle))
        except BaseException as exc:  # the outcome is judged below
            outcome.append(exc)

    thread = threading.Thread(target=second, daemon=True)  # daemon: a hang must not block exit
    thread.start()
    thread.join(5)
    assert outcome, "the workflow waits forever for a handle no run will complete"
    assert isinstance(outcome[0], WorkflowUsageError), outcome[0]


def bad_items() -> Iterator[int]:
    yield 1
    yield 2
    raise ValueError("row 3 cannot be read")


@register(name="fan.map_over_bad_items")
def map_over_bad_items(ctx: Context) -> Gen:
    try:
        yield ctx.map(square, bad_items(), concurrency=2)
    except ValueError as exc:
        return f"caught: {exc}"
    return "not raised"


def test_an_iterable_that_raises_raises_at_the_workflows_yield(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    assert make_runner(store).run(ROOT, map_over_bad_items) == "caught: row 3 cannot be read"


@register(name="fan.map_over_a_number")
def map_over_a_number(ctx: Context) -> Gen:
    return (yield ctx.map(square, 5))


def test_map_over_something_that_is_not_iterable_is_a_usage_error(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    with pytest.raises(WorkflowUsageError, match=r"ctx\.map"):
        make_runner(store).run(ROOT, map_over_a_number)


@register(name="fan.gathers_a_call")
def gathers_a_call(ctx: Context) -> Gen:
    return (yield ctx.gather(ctx.run(square, 1)))


def test_gather_refuses_what_is_not_a_handle(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    with pytest.raises(WorkflowUsageError, match=r"ctx\.gather takes handles from ctx\.begin"):
        make_runner(store).run(ROOT, gathers_a_call)


# -- more shapes ---------------------------------------------------------------------------------


@register(name="fan.map_subs")
def map_subs(ctx: Context) -> Gen:
    return (yield ctx.map(sub, [1, 10], concurrency=2))


def test_map_of_a_sub_workflow_runs_each_to_its_end_with_ids_under_its_own(
    store: PromiseStore, make_runner: Callable[..., Runner]
) -> None:
    assert make_runner(store).run(ROOT, map_subs) == [5, 221]
    assert sorted(children(store, ROOT)) == ["fan.0", "fan.0.0", "fan.0.1", "fan.1", "fan.1.0", "fan.1.1"]


ITEMS = {"n": 6}  # how many items `map_some` maps: a test changes it between runs


@register(name="fan.map_some")
def map_some(ctx: Context) -> Gen:
    return (yield ctx.map(square, range(ITEMS["n"]), concurrency=2))


def test_a_map_over_fewer_items_than_recorded_is_a_non_determinism_error(
    store: PromiseStore, make_runner: Callable[..., Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    should_stop, on_event = stop_after(3)
    with pytest.raises(WorkflowInterrupted):
        make_runner(store, should_stop=should_stop, on_event=on_event).run(ROOT, map_some)
    monkeypatch.setitem(ITEMS, "n", 2)
    with pytest.raises(NonDeterminismError, match=r"call fan\.2 was recorded as fan\.square v1, but the "
                       r"code now calls no call there"):
        make_runner(store).run(ROOT, map_some)


SHARED_RUNNER = """
import multiprocessing, sys, threading
from store import MemoryStore
from workflow import RetryPolicy, Runner, current_step, register

both_started = threading.Barrier(2, timeout=10)
a_ended = threading.Event()

@register(name="shared.meet")
def meet(i):
    current_step().dependency("together").wait()  # the two workflows' calls run at once
    return i

@register(name="shared.plain")
def plain(i):
    return i

@register(name="shared.wf")
def wf(ctx, i):
    both_started.wait()  # both runs are under way before either begins a call
    value = yield (yield ctx.begin(meet, i))
    if i == 1:  # b goes on once a has ended
        a_ended.wait(10)
        value += yield (yield ctx.begin(plain, 10))
    return value

together = multiprocessing.get_context("fork").Barrier(2, timeout=20)
runner = Runner(MemoryStore(), workers=int(sys.argv[1]), retry=RetryPolicy(max_attempts=1),
                dependencies={"together": together})
out = {}

def drive(root, i):
    try:
        out[root] = runner.run(root, wf, i)
    except BaseException as exc:
        out[root] = repr(exc)
    finally:
        if root == "a":
            a_ended.set()

threads = [threading.Thread(target=drive, args=(root, i)) for i, root in enumerate("ab")]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(sorted(out.items()))
"""


def test_one_runner_drives_two_workflows_from_two_threads(workers: int, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SHARED_RUNNER, str(workers)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a run hung")
    assert out.strip() == "[('a', 0), ('b', 11)]", err
