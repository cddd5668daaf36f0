"""Regressions of the runtime under faults: one driver per workflow in every store mode, a
history the code no longer reaches, a committed step found without spending an attempt, and a
step that never returns."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Generator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from wf_helpers import (
    HERE,
    SAFETY_TIMEOUT_S,
    SINK_FILE,
    STORE_FILE,
    batch_id,
    open_store,
    run_worker,
    worker_argv,
    worker_env,
)

from store import JsonlStore, MemoryStore, State, StoreError, WorkflowBusyError
from workflow import (
    Context,
    NonDeterminismError,
    RetryPolicy,
    Runner,
    StepError,
    current_step,
    exitcodes,
    register,
)
from workflow.importer import synthetic_source

ROOT = "import/faults"
KILLED = -9


# -- one driver per workflow, also on a shared store ------------------------------------------


def _driver(store: Path, log: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "driver_child.py"), "--store", str(store), "--log", str(log),
         *flags],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=worker_env(),
        cwd=store.parent,
    )


def _last_event(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=SAFETY_TIMEOUT_S)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("second_opens", ["shared", "exclusive", "through-a-symlink"])
def test_second_driver_on_a_shared_store_is_refused_naming_the_first(
    tmp_path: Path, second_opens: str
) -> None:
    store, log = tmp_path / STORE_FILE, tmp_path / "steps.log"
    first = _driver(store, log, "--sleep", "2")
    try:
        assert json.loads(first.stdout.readline())["event"] == "in_step"
        flags = ["--exclusive"] if second_opens == "exclusive" else []
        if second_opens == "through-a-symlink":
            (tmp_path / "link.jsonl").symlink_to(store)
            store = tmp_path / "link.jsonl"
        second = _driver(store, log, "--lock-timeout", "0.3", *flags)
        refused = _last_event(second)
    finally:
        done = _last_event(first)
    assert second.returncode == 1
    assert refused["type"] == "WorkflowBusyError"
    assert f"pid {first.pid}" in refused["message"] and "own/slow" in refused["message"]
    assert done == {"event": "resolved", "value": first.pid}
    assert [json.loads(line)["pid"] for line in log.read_text().splitlines()] == [first.pid]


def test_second_driver_that_waits_replays_the_first_ones_result(tmp_path: Path) -> None:
    store, log = tmp_path / STORE_FILE, tmp_path / "steps.log"
    first = _driver(store, log, "--sleep", "1")
    try:
        assert json.loads(first.stdout.readline())["event"] == "in_step"
        second = _driver(store, log, "--lock-timeout", "30")
        waited = _last_event(second)
    finally:
        _last_event(first)
    assert waited == {"event": "resolved", "value": first.pid}
    assert len(log.read_text().splitlines()) == 1  # the step ran once, in the first process


def test_two_threads_on_one_exclusive_store_never_drive_one_workflow_together(tmp_path: Path) -> None:
    ran: list[str] = []
    outcomes: list[str] = []

    @register(name="faults.slow_once")
    def slow_once() -> str:
        ran.append(threading.current_thread().name)
        time.sleep(0.5)
        return "done"

    @register(name="faults.one_slow_step")
    def one_slow_step(ctx: Context) -> Generator[Any, Any, str]:
        return (yield ctx.run(slow_once))

    with JsonlStore(tmp_path / STORE_FILE, exclusive=True, lock_timeout=0.1) as store:
        def drive() -> None:
            try:
                outcomes.append(Runner(store).run("threads", one_slow_step))
            except WorkflowBusyError as exc:
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=drive, name=f"t{i}") for i in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join()
    assert sorted(outcomes) == ["WorkflowBusyError", "done"] and len(ran) == 1


def test_a_store_in_a_missing_directory_is_refused_and_nothing_is_made(tmp_path: Path) -> None:
    for exclusive in (False, True):
        with pytest.raises(StoreError, match="deeper does not exist"):
            JsonlStore(tmp_path / "typo" / "deeper" / STORE_FILE, exclusive=exclusive)
    assert list(tmp_path.iterdir()) == []


# -- a recorded history the new code does not reach -------------------------------------------


@register(name="faults.step")
def step(n: int) -> int:
    return n * 10


@register(name="faults.two_calls")
def two_calls(ctx: Context) -> Generator[Any, Any, list[int]]:
    return [(yield ctx.run(step, 0)), (yield ctx.run(step, 1))]


def _history_with_first_call_done(path: Path, workflow_name: str) -> None:
    """The store a killed run of a two-call workflow leaves: .0 resolved, .1 created and started."""
    with JsonlStore(path, exclusive=True) as store:
        store.create("fewer", {"fn": workflow_name, "v": 1, "args": []})
        store.create("fewer.0", {"fn": "faults.step", "v": 1, "args": [0]})
        store.start_attempt("fewer.0")
        store.resolve("fewer.0", 0)
        store.create("fewer.1", {"fn": "faults.step", "v": 1, "args": [1]})
        store.start_attempt("fewer.1")


@pytest.mark.parametrize("ending", ["returns", "raises"])
def test_workflow_that_ends_before_a_recorded_call_is_non_deterministic(
    tmp_path: Path, ending: str
) -> None:
    @register(name=f"faults.wf_{ending}")
    def now_one_call(ctx: Context) -> Generator[Any, Any, int]:
        first = yield ctx.run(step, 0)
        if ending == "raises":
            raise ValueError("the new code gives up here")
        return first

    path = tmp_path / STORE_FILE
    _history_with_first_call_done(path, f"faults.wf_{ending}")
    with JsonlStore(path, exclusive=True) as store:
        with pytest.raises(NonDeterminismError, match=r"fewer\.1 was recorded as faults\.step v1"):
            Runner(store).run("fewer", now_one_call)
        assert store.get("fewer").state is State.PENDING  # nothing was settled
        assert store.get("fewer.1").state is State.PENDING


def test_workflow_that_makes_every_recorded_call_still_finishes(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    with open_store(path) as store:
        assert Runner(store).run("all", two_calls) == [0, 10]
    with open_store(path) as store:
        assert Runner(store).run("all", two_calls) == [0, 10]


# -- a committed batch found on its last attempt -----------------------------------------------


def test_batch_committed_on_its_last_attempt_is_found_not_exhausted(
    tmp_path: Path, audit: ModuleType
) -> None:
    source = synthetic_source(500)
    torn_resolve = {"name": "store.append", "key": f"resolve:{batch_id(ROOT, 3)}", "action": "pause"}
    killed = run_worker(tmp_path, ROOT, source, 100, "--max-attempts", "1", failpoints=[torn_resolve])
    assert killed.returncode == KILLED

    finished = run_worker(tmp_path, ROOT, source, 100, "--max-attempts", "1")

    assert finished.returncode == exitcodes.OK
    with JsonlStore(tmp_path / STORE_FILE, readonly=True) as store:
        batch = store.get(batch_id(ROOT, 3))
    assert batch.state is State.RESOLVED and batch.attempts == 1
    with sqlite3.connect(tmp_path / SINK_FILE) as db:
        runs = db.execute("SELECT attempt, outcome FROM executions WHERE batch = 3 ORDER BY id").fetchall()
    assert runs == [(1, "committed"), (1, "found_commit")]
    verdict = audit.audit(tmp_path, ROOT, 500)
    assert verdict["ok"], verdict["violations"]


# -- a step that never returns -----------------------------------------------------------------


@register(name="faults.hangs_first")
def hangs_first() -> int:
    if current_step().attempt == 1:
        time.sleep(3600)
    return current_step().attempt


@register(name="faults.hangs")
def hangs() -> int:
    time.sleep(3600)
    return 0


@register(name="faults.one")
def one(ctx: Context, fn: str) -> Generator[Any, Any, int]:
    return (yield ctx.run({"hangs_first": hangs_first, "hangs": hangs}[fn]))


def test_step_that_never_returns_times_out_and_is_retried(tmp_path: Path) -> None:
    policy = RetryPolicy(timeout=0.2, initial=0, max_attempts=3)
    started = time.monotonic()
    with open_store(tmp_path / STORE_FILE) as store:
        assert Runner(store, retry=policy).run("hang", one, "hangs_first") == 2
    assert time.monotonic() - started < 30


def test_step_that_always_hangs_is_rejected_with_the_timeout(tmp_path: Path) -> None:
    policy = RetryPolicy(timeout=0.2, initial=0, max_attempts=2)
    with open_store(tmp_path / STORE_FILE) as store:
        with pytest.raises(StepError, match=r"StepTimeoutError: step 'faults.hangs' .* within 0.2 s"):
            Runner(store, retry=policy).run("hang", one, "hangs")
        assert store.get("hang.0").attempts == 2


def test_worker_batch_that_hangs_times_out_and_is_retried(tmp_path: Path, audit: ModuleType) -> None:
    hang = {"name": "batch.fail", "key": "2/1", "action": "delay", "seconds": 3600}
    argv = worker_argv(tmp_path, ROOT, synthetic_source(500), 100, "--step-timeout", "0.5",
                       "--retry-initial", "0")
    done = subprocess.run(argv, env=worker_env([hang]), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=SAFETY_TIMEOUT_S, check=False)

    assert done.returncode == exitcodes.OK, done.stderr
    assert "did not return within 0.5 s" in done.stderr  # the retry was logged
    with JsonlStore(tmp_path / STORE_FILE, readonly=True) as store:
        assert store.get(batch_id(ROOT, 2)).attempts == 2
    with sqlite3.connect(tmp_path / SINK_FILE) as db:
        runs = db.execute("SELECT attempt, outcome FROM executions WHERE batch = 2 ORDER BY id").fetchall()
    assert runs == [(1, None), (2, "committed")]
    verdict = audit.audit(tmp_path, ROOT, 500)
    assert verdict["ok"], verdict["violations"]


COMMITTED: dict[str, str] = {}


def _find_commit() -> str | None:
    return COMMITTED.get(current_step().promise_id)


@register(name="faults.commits_then_fails", recover=_find_commit)
def commits_then_fails() -> str:
    """Its effect becomes durable, then the attempt fails anyway (a timeout after the commit)."""
    COMMITTED[current_step().promise_id] = "the committed result"
    raise RuntimeError("the attempt failed after its commit")


@register(name="faults.one_commit")
def one_commit(ctx: Context) -> Generator[Any, Any, str]:
    return (yield ctx.run(commits_then_fails))


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_a_last_attempt_that_failed_after_its_commit_is_recovered_not_rejected(max_attempts: int) -> None:
    store = MemoryStore()
    policy = RetryPolicy(max_attempts=max_attempts, initial=0)
    assert Runner(store, retry=policy).run("commit-then-fail", one_commit) == "the committed result"
    assert store.get("commit-then-fail.0").attempts == 1  # found, not tried again


@register(name="faults.rows")
def rows() -> list[int]:
    return [1, 2]


@register(name="faults.changes_what_it_got")
def changes_what_it_got(ctx: Context) -> Generator[Any, Any, list[int]]:
    got = yield ctx.run(rows)
    got.append(99)  # the workflow's own list: the stored result must not change
    return got


@pytest.mark.parametrize("backend", ["memory", "jsonl"])
def test_a_workflow_that_changes_a_result_it_got_never_changes_the_stored_one(
    tmp_path: Path, backend: str
) -> None:
    store = MemoryStore() if backend == "memory" else open_store(tmp_path / STORE_FILE)
    with store:
        assert Runner(store).run("own", changes_what_it_got) == [1, 2, 99]
        assert store.get("own.0").value == [1, 2]
        assert Runner(store).run("own", changes_what_it_got) == [1, 2, 99]  # the root's result, replayed
        assert store.get("own").value == [1, 2, 99]
