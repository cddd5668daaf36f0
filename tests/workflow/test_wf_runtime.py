"""The durable runtime in-process: replay, determinism, conflicts, retries, sub-workflows, stops."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from wf_helpers import open_store

from store import JsonlStore, State
from workflow import (
    AttemptsExhaustedError,
    Context,
    EngineError,
    NonDeterminismError,
    RetryPolicy,
    Runner,
    StepError,
    StepEvent,
    WorkflowConflictError,
    WorkflowInterrupted,
    current_step,
    describe,
    lookup,
    register,
)

ROOT = "wf/test"
FAST = RetryPolicy(max_attempts=3, initial=0)
Workflow = Callable[..., Generator[Any, Any, Any]]


class Crash(BaseException):
    """Stands in for a process dying in the middle of a step: the runner must not catch it."""


# -- steps: each records its promise id and attempt in the `calls` dependency ------------------


def record_call() -> int:
    step = current_step()
    step.dependency("calls").append((step.promise_id, step.attempt))
    return step.attempt


@register(name="t.add")
def add(a: int, b: int) -> int:
    record_call()
    return a + b


@register(name="t.other_add")
def other_add(a: int, b: int) -> int:
    record_call()
    return a + b


@register(name="t.pair")
def pair(a: int) -> tuple[int, int]:
    record_call()
    return (a, a)


@register(name="t.scripted")
def scripted(label: str) -> str:
    """Acts as the `script` dependency says for this attempt: "fail", "crash", "key" or "ok"."""
    attempt = record_call()
    action = current_step().dependency("script").get(attempt, "ok")
    if action == "fail":
        raise ValueError(f"{label} failed in attempt {attempt}")
    if action == "key":
        raise KeyError(label)
    if action == "crash":
        raise Crash
    return f"{label} ok in attempt {attempt}"


@register(name="t.unstorable")
def unstorable() -> object:
    record_call()
    return object()


@register(name="t.versioned_step", version=1)
def versioned_step_v1() -> int:
    return 1


@register(name="t.versioned_step", version=2)
def versioned_step_v2() -> int:
    return 2


# -- workflows --------------------------------------------------------------------------------


@register(name="t.sum_chain")
def sum_chain(ctx: Context, n: int) -> Generator[Any, Any, list[int]]:
    """Three dependent steps: n+1, then +2, then +3."""
    a = yield ctx.run(add, n, 1)
    b = yield ctx.run(add, a, 2)
    c = yield ctx.run(add, b, 3)
    return [a, b, c]


@register(name="t.one_scripted")
def one_scripted(ctx: Context) -> Generator[Any, Any, str]:
    return (yield ctx.run(scripted, "only"))


@register(name="t.catching")
def catching(ctx: Context) -> Generator[Any, Any, dict[str, Any]]:
    """Catches the StepError of a failing step at its yield, then goes on with another step."""
    try:
        yield ctx.run(scripted, "first")
    except StepError as exc:
        caught = {"id": exc.promise_id, "type": exc.error["type"], "message": str(exc)}
    else:
        caught = None
    after = yield ctx.run(add, 1, 1)
    return {"caught": caught, "after": after}


@register(name="t.sub_adder")
def sub_adder(ctx: Context, n: int) -> Generator[Any, Any, int]:
    a = yield ctx.run(add, n, 10)
    return (yield ctx.run(add, a, 100))


@register(name="t.with_sub")
def with_sub(ctx: Context, n: int) -> Generator[Any, Any, list[int]]:
    inner = yield ctx.run(sub_adder, n)
    last = yield ctx.run(add, inner, 1000)
    return [inner, last]


@register(name="t.failing_sub")
def failing_sub(ctx: Context) -> Generator[Any, Any, None]:
    yield ctx.run(add, 1, 1)
    raise ValueError("the sub-workflow gives up")


@register(name="t.calls_failing_sub")
def calls_failing_sub(ctx: Context) -> Generator[Any, Any, dict[str, Any]]:
    try:
        yield ctx.run(failing_sub)
    except StepError as exc:
        return {"id": exc.promise_id, "type": exc.error["type"]}
    return {}


@register(name="t.raising_workflow")
def raising_workflow(ctx: Context) -> Generator[Any, Any, None]:
    yield ctx.run(add, 1, 2)
    raise RuntimeError("the body itself fails")


@register(name="t.versioned_workflow", version=1)
def versioned_workflow_v1(ctx: Context) -> Generator[Any, Any, int]:
    return (yield ctx.run(add, 1, 1))


@register(name="t.versioned_workflow", version=2)
def versioned_workflow_v2(ctx: Context) -> Generator[Any, Any, int]:
    return (yield ctx.run(add, 2, 2))


@register(name="t.swallowing")
def swallowing(ctx: Context) -> Generator[Any, Any, Any]:
    try:
        return (yield ctx.run(add, 1, 1))
    except Exception:
        return "swallowed"


def calling(fn: Callable[..., Any], *args: Any) -> Workflow:
    """A workflow whose one step is `fn(*args)`. Every workflow made here has the same name, as a
    workflow whose code changed between two runs would."""

    def changed_between_runs(ctx: Context) -> Generator[Any, Any, Any]:
        first = yield ctx.run(fn, *args)
        second = yield ctx.run(add, 0, 0)
        return [first, second]

    return changed_between_runs


def calling_sub(fn: Callable[..., Any]) -> Workflow:
    """A workflow whose sub-workflow calls `fn(1, 2)` and then `add(0, 0)`; the same names
    whatever `fn` is."""

    def inner(ctx: Context) -> Generator[Any, Any, Any]:
        first = yield ctx.run(fn, 1, 2)
        second = yield ctx.run(add, 0, 0)
        return [first, second]

    def outer(ctx: Context) -> Generator[Any, Any, Any]:
        return (yield ctx.run(inner))

    return outer


# -- helpers ----------------------------------------------------------------------------------


def make_runner(
    store: JsonlStore,
    calls: list[tuple[str, int]],
    script: dict[int, str] | None = None,
    **options: Any,
) -> Runner:
    options.setdefault("retry", FAST)
    return Runner(store, dependencies={"calls": calls, "script": script or {}}, **options)


def stop_after_resolved(n: int) -> tuple[Callable[[StepEvent], None], Callable[[], bool]]:
    """on_event and should_stop callbacks that stop the run before the next step once `n`
    promises (steps or sub-workflows) have resolved."""
    resolved: list[str] = []

    def on_event(event: StepEvent) -> None:
        if event.kind == "resolved":
            resolved.append(event.promise_id)

    return on_event, lambda: len(resolved) >= n


def interrupted_run(
    store: JsonlStore, workflow: Workflow, *args: Any, steps: int, calls: list[tuple[str, int]]
) -> None:
    on_event, should_stop = stop_after_resolved(steps)
    runner = make_runner(store, calls, on_event=on_event, should_stop=should_stop)
    with pytest.raises(WorkflowInterrupted):
        runner.run(ROOT, workflow, *args)


def ids(calls: list[tuple[str, int]]) -> list[str]:
    return [promise_id for promise_id, _ in calls]


# -- replay -----------------------------------------------------------------------------------


def test_steps_get_ids_parent_dot_n_in_call_order(store: JsonlStore) -> None:
    make_runner(store, []).run(ROOT, sum_chain, 0)
    assert [p.id for p in store.list(ROOT)] == [ROOT, f"{ROOT}.0", f"{ROOT}.1", f"{ROOT}.2"]


def test_replay_returns_stored_results_without_running_steps_again(store_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    with open_store(store_path) as store:
        first = make_runner(store, calls).run(ROOT, sum_chain, 1)
    with open_store(store_path) as store:
        again = make_runner(store, calls).run(ROOT, sum_chain, 1)
    assert first == again == [2, 4, 7]
    assert len(calls) == 3


def test_interrupted_run_resumes_after_the_last_resolved_step(store_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    with open_store(store_path) as store:
        interrupted_run(store, sum_chain, 1, steps=2, calls=calls)
        assert store.get(ROOT).state is State.PENDING
    assert ids(calls) == [f"{ROOT}.0", f"{ROOT}.1"]
    with open_store(store_path) as store:
        result = make_runner(store, calls).run(ROOT, sum_chain, 1)
    assert result == [2, 4, 7]
    assert ids(calls) == [f"{ROOT}.0", f"{ROOT}.1", f"{ROOT}.2"]


def test_should_stop_settles_nothing_and_names_where_it_stopped(store: JsonlStore) -> None:
    on_event, should_stop = stop_after_resolved(1)
    runner = make_runner(store, [], on_event=on_event, should_stop=should_stop)
    with pytest.raises(WorkflowInterrupted, match=re.escape(f"{ROOT}.1")):
        runner.run(ROOT, sum_chain, 0)
    states = {p.id: p.state for p in store.list(ROOT)}
    assert states == {ROOT: State.PENDING, f"{ROOT}.0": State.RESOLVED, f"{ROOT}.1": State.PENDING}
    assert store.get(f"{ROOT}.1").attempts == 0


def test_first_run_and_replay_send_the_same_stored_value(store: JsonlStore) -> None:
    seen: list[Any] = []

    def keeps_what_it_gets(ctx: Context) -> Generator[Any, Any, None]:
        seen.append((yield ctx.run(pair, 5)))
        yield ctx.run(add, 0, 0)

    interrupted_run(store, keeps_what_it_gets, steps=1, calls=[])
    make_runner(store, []).run(ROOT, keeps_what_it_gets)
    assert seen == [[5, 5], [5, 5]]  # a list both times, as the store reads it back


def test_events_report_each_step_transition(store: JsonlStore) -> None:
    events: list[StepEvent] = []
    make_runner(store, [], {1: "fail"}, on_event=events.append).run(ROOT, one_scripted)
    kinds = [(e.kind, e.promise_id, e.attempt) for e in events]
    assert kinds == [
        ("started", f"{ROOT}.0", 1),
        ("retrying", f"{ROOT}.0", 1),
        ("started", f"{ROOT}.0", 2),
        ("resolved", f"{ROOT}.0", None),
        ("resolved", ROOT, None),
    ]
    events.clear()
    make_runner(store, [], on_event=events.append).run(ROOT, one_scripted)
    assert [(e.kind, e.promise_id) for e in events] == [("replayed", ROOT)]


# -- determinism and conflicts ----------------------------------------------------------------


def test_other_function_at_a_recorded_position_is_non_determinism(store_path: Path) -> None:
    with open_store(store_path) as store:
        interrupted_run(store, calling(add, 1, 2), steps=1, calls=[])
    before = store_path.read_bytes()
    with open_store(store_path) as store, pytest.raises(NonDeterminismError) as raised:
        make_runner(store, []).run(ROOT, calling(other_add, 1, 2))
    err = raised.value
    assert (err.promise_id, err.expected, err.actual) == (f"{ROOT}.0", "t.add v1", "t.other_add v1")
    for part in (f"{ROOT}.0", "t.add v1", "t.other_add v1"):
        assert part in str(err)
    assert store_path.read_bytes() == before


def test_same_function_with_other_args_is_non_determinism(store: JsonlStore) -> None:
    interrupted_run(store, calling(add, 1, 2), steps=1, calls=[])
    with pytest.raises(NonDeterminismError) as raised:
        make_runner(store, []).run(ROOT, calling(add, 1, 3))
    assert raised.value.promise_id == f"{ROOT}.0"
    assert "[1, 2]" in raised.value.expected
    assert "[1, 3]" in raised.value.actual


@pytest.mark.parametrize("other", [True, 1.0])
def test_true_or_float_where_1_was_recorded_is_non_determinism(store: JsonlStore, other: Any) -> None:
    """Arguments compare as JSON, not with Python's == (where 1 == 1.0 == True)."""
    interrupted_run(store, calling(add, 1, 2), steps=1, calls=[])
    with pytest.raises(NonDeterminismError):
        make_runner(store, []).run(ROOT, calling(add, other, 2))


def test_true_where_1_was_recorded_at_the_root_is_a_conflict(store: JsonlStore) -> None:
    make_runner(store, []).run(ROOT, sum_chain, 1)
    with pytest.raises(WorkflowConflictError):
        make_runner(store, []).run(ROOT, sum_chain, True)


def test_tuple_args_replay_as_the_lists_they_were_stored_as(store: JsonlStore) -> None:
    calls: list[tuple[str, int]] = []
    interrupted_run(store, calling(pair, (1, 2)), steps=1, calls=calls)
    assert make_runner(store, calls).run(ROOT, calling(pair, (1, 2))) == [[[1, 2], [1, 2]], 0]
    assert ids(calls) == [f"{ROOT}.0", f"{ROOT}.1"]


def test_step_version_bump_is_non_determinism(store: JsonlStore) -> None:
    interrupted_run(store, calling(versioned_step_v1), steps=1, calls=[])
    with pytest.raises(NonDeterminismError) as raised:
        make_runner(store, []).run(ROOT, calling(versioned_step_v2))
    assert raised.value.expected.startswith("t.versioned_step v1")
    assert raised.value.actual.startswith("t.versioned_step v2")


def test_non_determinism_inside_a_sub_workflow_names_the_nested_id(store: JsonlStore) -> None:
    interrupted_run(store, calling_sub(add), steps=1, calls=[])
    assert store.get(f"{ROOT}.0").state is State.PENDING
    with pytest.raises(NonDeterminismError) as raised:
        make_runner(store, []).run(ROOT, calling_sub(other_add))
    assert raised.value.promise_id == f"{ROOT}.0.0"


def test_same_root_id_with_other_args_conflicts_and_keeps_the_stored_result(
    store_path: Path,
) -> None:
    with open_store(store_path) as store:
        make_runner(store, []).run(ROOT, sum_chain, 1)
    before = store_path.read_bytes()
    with open_store(store_path) as store:
        with pytest.raises(WorkflowConflictError) as raised:
            make_runner(store, []).run(ROOT, sum_chain, 2)
        assert raised.value.root_id == ROOT
        assert "use another id" in str(raised.value)
        assert store.get(ROOT).value == [2, 4, 7]
    assert store_path.read_bytes() == before
    with open_store(store_path) as store:
        assert make_runner(store, []).run(ROOT, sum_chain, 1) == [2, 4, 7]


def test_pending_root_with_other_args_conflicts_too(store: JsonlStore) -> None:
    interrupted_run(store, sum_chain, 1, steps=1, calls=[])
    with pytest.raises(WorkflowConflictError):
        make_runner(store, []).run(ROOT, sum_chain, 2)


def test_a_run_recorded_with_v1_keeps_v1_while_v2_is_registered_beside_it(store: JsonlStore) -> None:
    assert make_runner(store, []).run(ROOT, versioned_workflow_v1) == 2
    assert make_runner(store, []).run(ROOT, versioned_workflow_v2) == 2  # the stored v1 result
    assert make_runner(store, []).run("wf/new", versioned_workflow_v2) == 4  # a new run: v2


# -- retries ----------------------------------------------------------------------------------


def test_failing_step_is_retried_until_it_succeeds(store: JsonlStore) -> None:
    calls: list[tuple[str, int]] = []
    result = make_runner(store, calls, {1: "fail", 2: "fail"}).run(ROOT, one_scripted)
    assert result == "only ok in attempt 3"
    assert calls == [(f"{ROOT}.0", 1), (f"{ROOT}.0", 2), (f"{ROOT}.0", 3)]
    assert store.get(f"{ROOT}.0").attempts == 3


def test_exhausted_retries_reject_the_step_with_its_attempts(store: JsonlStore) -> None:
    calls: list[tuple[str, int]] = []
    script = dict.fromkeys(range(1, 10), "fail")
    with pytest.raises(StepError) as raised:
        make_runner(store, calls, script).run(ROOT, one_scripted)
    assert len(calls) == 3
    step = store.get(f"{ROOT}.0")
    assert step.state is State.REJECTED
    assert step.error == {"type": "ValueError", "message": "only failed in attempt 3", "attempts": 3}
    assert raised.value.promise_id == ROOT  # the uncaught StepError rejected the workflow too
    assert store.get(ROOT).state is State.REJECTED
    assert "after 3 attempts: ValueError: only failed in attempt 3" in str(raised.value)


def test_step_error_is_thrown_into_the_workflow_at_its_yield(store: JsonlStore) -> None:
    script = dict.fromkeys(range(1, 10), "fail")
    result = make_runner(store, [], script).run(ROOT, catching)
    assert result["caught"]["id"] == f"{ROOT}.0"
    assert result["caught"]["type"] == "ValueError"
    assert result["after"] == 2
    assert store.get(ROOT).state is State.RESOLVED


def test_replay_raises_the_same_step_error_without_running_the_step(store_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    script = dict.fromkeys(range(1, 10), "fail")
    with open_store(store_path) as store, pytest.raises(StepError) as first:
        make_runner(store, calls, script).run(ROOT, one_scripted)
    with open_store(store_path) as store, pytest.raises(StepError) as again:
        make_runner(store, calls, {}).run(ROOT, one_scripted)
    assert str(again.value) == str(first.value)
    assert again.value.error == first.value.error
    assert len(calls) == 3


def test_replay_throws_a_rejected_step_into_a_resumed_workflow_again(store_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    script = dict.fromkeys(range(1, 10), "fail")
    with open_store(store_path) as store:
        stopping = make_runner(store, calls, script,
                               should_stop=lambda: store.get(f"{ROOT}.0").settled)
        with pytest.raises(WorkflowInterrupted):
            stopping.run(ROOT, catching)
        assert store.get(f"{ROOT}.0").state is State.REJECTED
    with open_store(store_path) as store:
        result = make_runner(store, calls, {}).run(ROOT, catching)
    assert result["caught"]["type"] == "ValueError"
    assert ids(calls) == [f"{ROOT}.0"] * 3 + [f"{ROOT}.1"]


def test_non_retryable_exceptions_are_not_retried(store: JsonlStore) -> None:
    calls: list[tuple[str, int]] = []
    policy = RetryPolicy(max_attempts=5, initial=0, non_retryable=(KeyError,))
    with pytest.raises(StepError):
        make_runner(store, calls, {1: "key"}, retry=policy).run(ROOT, one_scripted)
    assert len(calls) == 1
    assert store.get(f"{ROOT}.0").error["type"] == "KeyError"


def test_non_retryable_after_retryable_failures_stops_the_retries(store: JsonlStore) -> None:
    calls: list[tuple[str, int]] = []
    policy = RetryPolicy(max_attempts=5, initial=0, non_retryable=(KeyError,))
    with pytest.raises(StepError):
        make_runner(store, calls, {1: "fail", 2: "key"}, retry=policy).run(ROOT, one_scripted)
    assert len(calls) == 2
    assert store.get(f"{ROOT}.0").error == {"type": "KeyError", "message": "'only'", "attempts": 2}


def test_a_call_retry_policy_overrides_the_runner_default(store: JsonlStore) -> None:
    calls: list[tuple[str, int]] = []

    def two_tries(ctx: Context) -> Generator[Any, Any, Any]:
        return (yield ctx.run(scripted, "x", retry=RetryPolicy(max_attempts=2, initial=0)))

    script = dict.fromkeys(range(1, 10), "fail")
    runner = make_runner(store, calls, script, retry=RetryPolicy(max_attempts=9, initial=0))
    with pytest.raises(StepError):
        runner.run(ROOT, two_tries)
    assert len(calls) == 2


def test_backoff_grows_by_factor_up_to_max_interval(store: JsonlStore) -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=5, initial=1, factor=3, max_interval=5)
    script = dict.fromkeys(range(1, 5), "fail")
    result = make_runner(store, [], script, retry=policy, sleep=sleeps.append).run(ROOT, one_scripted)
    assert result == "only ok in attempt 5"
    assert sleeps == [1, 3, 5, 5]


@pytest.mark.parametrize("initial, delays", [(0, ["0", "0"]), (0.25, ["0.25", "0.5"])])
def test_retry_log_line_names_step_id_error_attempt_and_delay(
    store: JsonlStore, caplog: pytest.LogCaptureFixture, initial: float, delays: list[str]
) -> None:
    caplog.set_level(logging.WARNING, logger="workflow.runner")
    policy = RetryPolicy(max_attempts=3, initial=initial)
    runner = make_runner(store, [], {1: "fail", 2: "fail"}, retry=policy, sleep=lambda _: None)
    runner.run(ROOT, one_scripted)
    lines = [r.getMessage() for r in caplog.records if r.name == "workflow.runner"]
    assert lines == [
        f"step 't.scripted' ({ROOT}.0) failed with 'ValueError: only failed in attempt {n}' "
        f"(attempt {n}; retrying in {delay} s)"
        for n, delay in enumerate(delays, 1)
    ]


def test_attempts_started_before_a_crash_count_and_backoff_continues(store_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    sleeps: list[float] = []
    script = {1: "fail", 2: "crash", 3: "fail"}
    policy = RetryPolicy(max_attempts=5, initial=1, factor=2, max_interval=60)
    with open_store(store_path) as store, pytest.raises(Crash):
        make_runner(store, calls, script, retry=policy, sleep=sleeps.append).run(ROOT, one_scripted)
    with open_store(store_path) as store:
        assert store.get(f"{ROOT}.0").attempts == 2
        result = make_runner(store, calls, script, retry=policy, sleep=sleeps.append).run(
            ROOT, one_scripted
        )
    assert result == "only ok in attempt 4"
    assert [attempt for _, attempt in calls] == [1, 2, 3, 4]
    assert sleeps == [1, 4]  # after attempt 1, then after attempt 3: the backoff goes on


def test_backoff_resumed_after_more_than_1024_attempts_is_capped_not_an_overflow(
    store_path: Path,
) -> None:
    calls: list[tuple[str, int]] = []
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=5000)  # the default backoff: 1.0 s, x2.0, at most 30 s
    with open_store(store_path) as store, pytest.raises(Crash):
        make_runner(store, calls, {1: "crash"}, retry=policy).run(ROOT, one_scripted)
    with open_store(store_path) as store:
        for _ in range(1100):  # a step that has failed for hours, then its worker restarted
            store.start_attempt(f"{ROOT}.0")
        runner = make_runner(store, calls, {1102: "fail"}, retry=policy, sleep=sleeps.append)
        result = runner.run(ROOT, one_scripted)
    assert result == "only ok in attempt 1103"
    assert sleeps == [30.0]


def test_attempts_spent_by_crashes_reject_with_attempts_exhausted(store_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    policy = RetryPolicy(max_attempts=2, initial=0)
    for _ in range(2):
        with open_store(store_path) as store, pytest.raises(Crash):
            make_runner(store, calls, {1: "crash", 2: "crash"}, retry=policy).run(ROOT, one_scripted)
    with open_store(store_path) as store:
        with pytest.raises(StepError):
            make_runner(store, calls, {}, retry=policy).run(ROOT, one_scripted)
        step = store.get(f"{ROOT}.0")
    assert len(calls) == 2
    assert step.error["type"] == AttemptsExhaustedError.__name__
    assert step.error["attempts"] == 2


def test_reopened_step_gets_a_fresh_budget_and_keeps_counting_attempts(store: JsonlStore) -> None:
    calls: list[tuple[str, int]] = []
    with pytest.raises(StepError):
        make_runner(store, calls, dict.fromkeys(range(1, 4), "fail")).run(ROOT, one_scripted)
    store.reopen(f"{ROOT}.0", "fixed the cause")
    store.reopen(ROOT, "fixed the cause")
    result = make_runner(store, calls, dict.fromkeys(range(1, 6), "fail")).run(ROOT, one_scripted)
    assert result == "only ok in attempt 6"
    assert [attempt for _, attempt in calls] == [1, 2, 3, 4, 5, 6]


def test_non_serializable_step_result_is_rejected_with_a_clear_type_error(store: JsonlStore) -> None:
    calls: list[tuple[str, int]] = []

    def stores_an_object(ctx: Context) -> Generator[Any, Any, Any]:
        return (yield ctx.run(unstorable))

    with pytest.raises(StepError):
        make_runner(store, calls).run(ROOT, stores_an_object)
    error = store.get(f"{ROOT}.0").error
    assert error["type"] == "UnstorableValueError"  # a TypeError
    assert f"promise {ROOT}.0: value cannot be stored as JSON: $" in error["message"]
    assert len(calls) == 1  # a bug in the step, not retried


# -- workflows as a whole ---------------------------------------------------------------------


def test_sub_workflow_steps_get_nested_ids_and_replay(store_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    with open_store(store_path) as store:
        interrupted_run(store, with_sub, 1, steps=1, calls=calls)
    with open_store(store_path) as store:
        result = make_runner(store, calls).run(ROOT, with_sub, 1)
        all_ids = [p.id for p in store.list(ROOT)]
    assert result == [111, 1111]
    assert ids(calls) == [f"{ROOT}.0.0", f"{ROOT}.0.1", f"{ROOT}.1"]
    assert all_ids == [ROOT, f"{ROOT}.0", f"{ROOT}.0.0", f"{ROOT}.0.1", f"{ROOT}.1"]
    with open_store(store_path) as store:
        assert make_runner(store, calls).run(ROOT, with_sub, 1) == result
    assert len(calls) == 3


def test_rejected_sub_workflow_is_a_step_error_in_its_parent(store_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    with open_store(store_path) as store:
        first = make_runner(store, calls).run(ROOT, calls_failing_sub)
        assert store.get(f"{ROOT}.0").error["type"] == "ValueError"
    assert first == {"id": f"{ROOT}.0", "type": "ValueError"}
    with open_store(store_path) as store:
        assert make_runner(store, calls).run(ROOT, calls_failing_sub) == first
    assert len(calls) == 1


def test_workflow_body_exception_rejects_the_workflow_and_replays(store: JsonlStore) -> None:
    calls: list[tuple[str, int]] = []
    with pytest.raises(StepError) as first:
        make_runner(store, calls).run(ROOT, raising_workflow)
    with pytest.raises(StepError) as again:
        make_runner(store, calls).run(ROOT, raising_workflow)
    assert first.value.error["type"] == "RuntimeError"
    assert str(again.value) == str(first.value)
    assert len(calls) == 1


def test_a_broad_except_in_the_workflow_cannot_swallow_an_interrupt(store: JsonlStore) -> None:
    with pytest.raises(WorkflowInterrupted):
        make_runner(store, [], should_stop=lambda: True).run(ROOT, swallowing)
    assert store.get(ROOT).state is State.PENDING
    assert make_runner(store, []).run(ROOT, swallowing) == 2


def test_yielding_something_other_than_a_call_is_a_type_error(store: JsonlStore) -> None:
    def yields_a_number(ctx: Context) -> Generator[Any, Any, None]:
        yield 42

    with pytest.raises(TypeError, match=r"yielded 42; yield ctx\.run"):
        make_runner(store, []).run(ROOT, yields_a_number)


# -- the small surface around the runner ------------------------------------------------------


def test_current_step_outside_a_step_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="outside a durable step"):
        current_step()


def test_missing_dependency_names_the_step_and_what_there_is(store: JsonlStore) -> None:
    with pytest.raises(StepError) as raised:
        Runner(store, retry=FAST, dependencies={"sink": None}).run(ROOT, one_scripted)
    message = store.get(f"{ROOT}.0").error["message"]
    assert "t.scripted" in message
    assert "'calls'" in message
    assert "['sink']" in message
    assert raised.value.promise_id == ROOT


def test_register_refuses_another_function_under_a_taken_name_and_version() -> None:
    def impostor() -> int:
        return 0

    with pytest.raises(ValueError, match=r"t\.add v1 is already registered"):
        register(impostor, name="t.add")


def test_lookup_finds_by_name_and_version_and_names_known_versions() -> None:
    assert lookup("t.versioned_step", 2) is versioned_step_v2
    with pytest.raises(KeyError, match=r"\['v1', 'v2'\]"):
        lookup("t.versioned_step", 3)


def test_unregistered_function_is_described_as_module_qualname_v1() -> None:
    def helper() -> None:
        return None

    entry = describe(helper)
    assert (entry.name, entry.version, entry.is_workflow) == (
        f"{__name__}.{helper.__qualname__}", 1, False
    )
    assert describe(sum_chain).is_workflow


@pytest.mark.parametrize(
    "options", [{"max_attempts": 0}, {"initial": -1}, {"factor": 0.5}, {"max_interval": -1},
                {"timeout": 0}, {"timeout": -1}, {"timeout": 1e300}, {"timeout": float("nan")}]
)
def test_retry_policy_refuses_nonsense(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**options)


# -- review fixes ---------------------------------------------------------------------------------


def test_an_observer_that_raises_stops_the_run_without_settling_the_step(store: JsonlStore) -> None:
    def broken_observer(event: StepEvent) -> None:
        if event.kind == "started":
            raise BrokenPipeError("the progress pipe is gone")

    calls: list[tuple[str, int]] = []
    with pytest.raises(EngineError, match=r"on_event observer failed at wf/observer\.0"):
        make_runner(store, calls, on_event=broken_observer).run("wf/observer", sum_chain, 2)
    assert calls == []  # the step never ran
    assert store.get("wf/observer.0").state is State.PENDING  # and is not rejected
    assert make_runner(store, calls).run("wf/observer", sum_chain, 2) == [3, 5, 8]  # a later run goes on


def test_a_stop_request_ends_a_retry_backoff_at_once(store: JsonlStore) -> None:
    slept: list[float] = []
    stops = iter([False, False, True])  # before the first attempt, first backoff slice, then stop
    runner = make_runner(store, [], {1: "fail"}, retry=RetryPolicy(initial=30), sleep=slept.append,
                         should_stop=lambda: next(stops))
    with pytest.raises(WorkflowInterrupted, match="retry backoff"):
        runner.run("wf/stop-in-backoff", one_scripted)
    assert sum(slept) < 1  # it did not sit out the 30 s
    assert store.get("wf/stop-in-backoff.0").state is State.PENDING


def test_a_root_id_with_a_dot_is_refused(store: JsonlStore) -> None:
    with pytest.raises(ValueError, match=r"no '\.'"):
        Runner(store).run("wf/a.b", sum_chain, 1)
