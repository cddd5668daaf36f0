"""The pool of step processes (Runner(workers=N)) attacked with real signals and odd steps.

The driver is this test process; its step processes are real forks that the steps themselves
SIGKILL, SIGSTOP, os._exit or time out. What must hold: a lost process costs only the attempt it
ran and is replaced; the processes are the driver's children, in its process group, die with it
and ignore SIGTERM/SIGINT; each has its own dependencies from `setup()`; failures, timeouts,
odd exceptions and odd values end as they do in the sequential runner.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fanout_helpers import (
    FAST,
    SAFETY_TIMEOUT_S,
    Refused,
    executions,
    note_execution,
    open_pidfds,
    read_exactly,
    sibling_step_processes,
    square,
    wait_until_gone,
)

from store import MemoryStore, PromiseStore, State
from workflow import (
    Context,
    RetryPolicy,
    Runner,
    StepError,
    StepEvent,
    current_step,
    register,
)

ROOT = "pool"
Gen = Generator[Any, Any, Any]
_PR_GET_PDEATHSIG = 2


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "executions.jsonl"


def pool_runner(store: PromiseStore, log: Path, workers: int = 2, **options: Any) -> Runner:
    options.setdefault("retry", FAST)
    return Runner(store, dependencies={"log": str(log)}, workers=workers, **options)


# -- steps -------------------------------------------------------------------------------------


@register(name="pool.die_in_attempt_1")
def die_in_attempt_1(how: str) -> dict[str, Any]:
    """Ends its own process in attempt 1 (SIGKILL, or os._exit(3)), once every party of the
    `together` barrier (if any) is in its attempt 1; later attempts succeed."""
    note_execution()
    if current_step().attempt == 1:
        together = current_step().dependencies.get("together")
        if together is not None:
            together.wait()
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    return {**standing(), "siblings": sibling_step_processes()}


def standing() -> dict[str, int]:
    """Where a step process stands: its parent, its group, its parent-death signal."""
    sig = ctypes.c_int()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_PDEATHSIG, ctypes.byref(sig))
    return {"pid": os.getpid(), "ppid": os.getppid(), "pgrp": os.getpgrp(), "pdeathsig": sig.value}


@register(name="pool.where")
def where() -> dict[str, int]:
    note_execution()
    return standing()


@register(name="pool.shrug_off_signals")
def shrug_off_signals() -> str:
    note_execution()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    return "still here"


@register(name="pool.who")
def who() -> str:
    note_execution()
    return current_step().dependency("who")


@register(name="pool.sleep_past_timeout")
def sleep_past_timeout() -> None:
    note_execution()
    time.sleep(SAFETY_TIMEOUT_S)


@register(name="pool.describe_step", version=2)
def describe_step() -> dict[str, Any]:
    step = current_step()
    return {"id": step.promise_id, "attempt": step.attempt, "fn": step.fn, "version": step.version,
            "code": step.code, "parent": step.parent_id, "log": bool(step.dependency("log"))}


class Odd(Exception):
    """Cannot be unpickled (its __init__ takes two arguments, its args hold one)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"odd {a}-{b}")


class OddRefusal(Refused):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"odd refusal {a}-{b}")


@register(name="pool.fail")
def fail(kind: str) -> None:
    note_execution()
    raise {"retryable": ValueError("flaky"), "permanent": Refused("no"),
           "odd": Odd(1, 2), "odd_permanent": OddRefusal(3, 4)}[kind]


def _local_point() -> type:
    @dataclasses.dataclass
    class Point:  # a class pickle cannot find by name, but JSON stores instances of it fine
        x: int
        y: int

    return Point


Point = _local_point()


@register(name="pool.odd_value")
def odd_value(kind: str) -> Any:
    note_execution()
    if kind == "lock":
        return threading.Lock()  # neither JSON nor pickle
    if kind == "point":
        return Point(1, 2)  # JSON, not pickle
    nested: list[Any] = []
    for _ in range(3000):  # deeper than JSON allows, and than pickle's recursion limit
        nested = [nested]
    return nested


@register(name="pool.one")
def one(ctx: Context, step: str, *args: Any) -> Gen:
    """Begins the step named `step` and waits for it."""
    fn = {"fail": fail, "odd_value": odd_value, "die_in_attempt_1": die_in_attempt_1, "where": where,
          "shrug_off_signals": shrug_off_signals, "who": who, "describe_step": describe_step,
          "sleep_past_timeout": sleep_past_timeout, "square": square}[step]
    return (yield (yield ctx.begin(fn, *args)))


@register(name="pool.two")
def two(ctx: Context, first: str, second: str) -> Gen:
    """Begins two steps, then waits for both."""
    a = yield ctx.begin(*_step(first))
    b = yield ctx.begin(*_step(second))
    return (yield ctx.gather(a, b))


def _step(spec: str) -> tuple[Any, ...]:
    name, _, arg = spec.partition(":")
    fn = {"die_in_attempt_1": die_in_attempt_1, "where": where, "square": square}[name]
    return (fn, int(arg)) if name == "square" else (fn, arg) if arg else (fn,)


def history(store: PromiseStore) -> list[tuple[str, State, int, str | None]]:
    """What a run left: id, state, attempts and error type of every promise."""
    return [(p.id, p.state, p.attempts, (p.error or {}).get("type")) for p in store.list()]


# -- lost step processes ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_a_step_process_that_dies_mid_step_costs_that_attempt_and_is_replaced(
    log: Path, how: str
) -> None:
    events: list[StepEvent] = []
    with MemoryStore() as store:
        got = pool_runner(store, log, on_event=events.append).run(
            ROOT, two, f"die_in_attempt_1:{how}", "square:3")
        assert history(store) == [(ROOT, State.RESOLVED, 0, None), ("pool.0", State.RESOLVED, 2, None),
                                  ("pool.1", State.RESOLVED, 1, None)]
    value, square_of_3 = got
    assert square_of_3 == 9
    first, second = [e for e in executions(log) if e["id"] == "pool.0"]
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert second["pid"] != first["pid"]
    assert len(value["siblings"]) == 2 and first["pid"] not in value["siblings"]  # replaced
    died = "killed by SIGKILL" if how == "sigkill" else "exit status 3"
    retried = [e for e in events if e.kind == "retrying"]
    assert [(e.promise_id, e.attempt) for e in retried] == [("pool.0", 1)]
    assert retried[0].error == f"step process {first['pid']} died ({died})"


def test_a_step_whose_process_dies_in_its_last_attempt_is_rejected_as_lost(log: Path) -> None:
    with MemoryStore() as store:
        with pytest.raises(StepError, match=r"StepProcessLost: step process \d+ died \(exit status 3\)"):
            pool_runner(store, log, retry=RetryPolicy(max_attempts=1)).run(ROOT, one, "die_in_attempt_1",
                                                                            "os_exit")
        assert history(store)[1] == ("pool.0", State.REJECTED, 1, "StepProcessLost")


@register(name="pool.kill_the_idle_sibling")
def kill_the_idle_sibling() -> int:
    """SIGKILLs the other (idle) step process and waits until it is gone."""
    note_execution()
    others = [pid for pid in sibling_step_processes() if pid != os.getpid()]
    pidfds = open_pidfds(others)
    for pid in others:
        os.kill(pid, signal.SIGKILL)
    wait_until_gone(pidfds)
    return len(others)


@register(name="pool.kill_idle_then_step")
def kill_idle_then_step(ctx: Context) -> Gen:
    killed = yield (yield ctx.begin(kill_the_idle_sibling))
    value = yield (yield ctx.begin(square, 5))  # goes to the killed process: it is next in line
    return killed, value


def test_a_step_process_killed_while_idle_costs_no_attempt(log: Path) -> None:
    with MemoryStore() as store:
        got = pool_runner(store, log, retry=RetryPolicy(max_attempts=1)).run(ROOT, kill_idle_then_step)
        assert got == [1, 25]
        assert store.get("pool.1").attempts == 1


# -- where step processes stand ------------------------------------------------------------------


def test_step_processes_are_the_drivers_children_in_its_group_and_die_with_it(log: Path) -> None:
    with MemoryStore() as store:
        process = pool_runner(store, log).run(ROOT, one, "where")
    assert (process["ppid"], process["pgrp"], process["pdeathsig"]) == (
        os.getpid(), os.getpgrp(), signal.SIGKILL)


def test_replacement_step_processes_are_the_drivers_children_and_die_with_it_too(log: Path) -> None:
    """Both processes die in attempt 1, together, so both attempts 2 run in replacements."""
    together = multiprocessing.get_context("fork").Barrier(2, timeout=SAFETY_TIMEOUT_S)
    with MemoryStore() as store:
        runner = Runner(store, retry=FAST, dependencies={"log": str(log), "together": together}, workers=2)
        got = runner.run(ROOT, two, "die_in_attempt_1:sigkill", "die_in_attempt_1:sigkill")
    originals = {e["pid"] for e in executions(log) if e["attempt"] == 1}
    assert len(originals) == 2 and originals.isdisjoint(p["pid"] for p in got)
    for process in got:
        assert (process["ppid"], process["pgrp"], process["pdeathsig"]) == (
            os.getpid(), os.getpgrp(), signal.SIGKILL)


def test_step_processes_ignore_sigterm_and_sigint(log: Path) -> None:
    with MemoryStore() as store:
        assert pool_runner(store, log).run(ROOT, one, "shrug_off_signals") == "still here"
        assert store.get("pool.0").attempts == 1


def test_no_step_process_outlives_its_run(log: Path) -> None:
    with MemoryStore() as store:
        replacement, original = pool_runner(store, log).run(ROOT, two, "die_in_attempt_1:sigkill", "where")
    pids = {original["pid"], *replacement["siblings"]}
    assert len(pids) == 2
    assert pids.isdisjoint(p.pid for p in psutil.Process().children())  # ended and reaped


# -- SIGSTOP ----------------------------------------------------------------------------------------


@register(name="pool.stop_myself")
def stop_myself(pid_fd: int) -> str:
    """Tells the driver its pid, then SIGSTOPs itself; returns once continued."""
    note_execution()
    os.write(pid_fd, struct.pack("i", os.getpid()))
    os.kill(os.getpid(), signal.SIGSTOP)
    return "continued"


@register(name="pool.wait_for_go")
def wait_for_go(go_fd: int) -> str:
    note_execution()
    return read_exactly(go_fd, 1).decode()


@register(name="pool.stopped_and_busy")
def stopped_and_busy(ctx: Context, pid_fd: int, go_fd: int) -> Gen:
    stopped = yield ctx.begin(stop_myself, pid_fd)
    busy = yield ctx.begin(wait_for_go, go_fd)
    return [(yield busy), (yield stopped)]


def test_a_stopped_step_process_holds_up_only_its_own_step(log: Path) -> None:
    """The other step runs and settles while one process is stopped; once continued, its step
    settles too, in the same attempt."""
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    stopped: list[int] = []

    def watch() -> None:  # waits for the stop itself (the driver is the parent), then lets go
        pid = struct.unpack("i", read_exactly(pid_r, 4))[0]
        os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)
        stopped.append(pid)
        os.write(go_w, b"!")

    busy_ended_while_stopped: list[bool] = []

    def on_event(e: StepEvent) -> None:
        if e.kind == "resolved" and e.promise_id == "pool.1":
            busy_ended_while_stopped.append(bool(stopped))
            os.kill(stopped[0], signal.SIGCONT)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with MemoryStore() as store:
            got = pool_runner(store, log, on_event=on_event).run(ROOT, stopped_and_busy, pid_w, go_r)
            assert got == ["!", "continued"]
            assert busy_ended_while_stopped == [True]
            assert [p.attempts for p in store.list("pool.")] == [1, 1]
    finally:
        watcher.join(SAFETY_TIMEOUT_S)
        for fd in (pid_r, pid_w, go_r, go_w):
            os.close(fd)


# -- dependencies from setup ---------------------------------------------------------------------


def logging_setup(
    path: Path, fail: bool = False, replacements_linger: float = 0.0
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A setup hook that logs when each step process enters and leaves it. A replacement (a
    process that enters after the first two) takes `replacements_linger` seconds to leave, as
    a connection that takes its time to close."""

    @contextlib.contextmanager
    def setup() -> Iterator[dict[str, str]]:
        with path.open("a") as f:
            f.write(json.dumps({"enter": os.getpid()}) + "\n")
        replacement = len(setup_log(path)[0]) > 2
        if fail:
            raise ConnectionRefusedError("the database is down")
        try:
            yield {"who": f"setup in {os.getpid()}", "log": str(path.with_name("executions.jsonl"))}
        finally:
            if replacement:
                time.sleep(replacements_linger)
            with path.open("a") as f:
                f.write(json.dumps({"exit": os.getpid()}) + "\n")

    return setup


def setup_log(path: Path) -> tuple[list[int], list[int]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [e["enter"] for e in lines if "enter" in e], [e["exit"] for e in lines if "exit" in e]


@register(name="pool.who_in_many")
def who_in_many(ctx: Context, n: int) -> Gen:
    handles = []
    for _ in range(n):
        handles.append((yield ctx.begin(who)))
    return (yield ctx.gather(*handles))


def test_each_step_process_enters_setup_once_and_steps_see_its_dependencies(
    tmp_path: Path, log: Path
) -> None:
    setup_path = tmp_path / "setup.jsonl"
    with MemoryStore() as store:
        got = Runner(store, workers=2, setup=logging_setup(setup_path)).run(ROOT, who_in_many, 6)
    ran_in = {e["id"]: e["pid"] for e in executions(log)}
    assert got == [f"setup in {ran_in[f'pool.{i}']}" for i in range(6)]
    entered, exited = setup_log(setup_path)
    assert len(entered) == 2 and os.getpid() not in entered
    assert sorted(exited) == sorted(entered)  # left cleanly when the pool closed


def test_a_replacement_step_process_leaves_setup_cleanly_too(tmp_path: Path, log: Path) -> None:
    setup_path = tmp_path / "setup.jsonl"
    with MemoryStore() as store:
        Runner(store, workers=2, retry=FAST, setup=logging_setup(setup_path, replacements_linger=1.0)).run(
            ROOT, one, "die_in_attempt_1", "sigkill")
    killed = executions(log)[0]["pid"]
    entered, exited = setup_log(setup_path)
    assert len(entered) == 3  # two, and one in place of the killed one
    assert sorted(exited) == sorted(set(entered) - {killed})


def test_a_failing_setup_stops_the_run_without_spending_attempts(tmp_path: Path, log: Path) -> None:
    with MemoryStore() as store:
        with pytest.raises(Exception, match="the database is down") as raised:
            Runner(store, workers=2, retry=FAST, setup=logging_setup(tmp_path / "s.jsonl", fail=True)).run(
                ROOT, who_in_many, 2)
        assert not isinstance(raised.value, StepError)
        assert [(p.state, p.attempts) for p in store.list("pool.")] in ([], [(State.PENDING, 0)] * 2)


@register(name="pool.who_run_and_begun")
def who_run_and_begun(ctx: Context) -> Gen:
    begun = yield (yield ctx.begin(who))
    run = yield ctx.run(who)
    return begun.split(" in ")[0], run.split(" in ")[0]


def test_a_step_sees_the_same_dependencies_run_or_begun(tmp_path: Path) -> None:
    with MemoryStore() as store:
        got = Runner(store, workers=2, retry=FAST, setup=logging_setup(tmp_path / "s.jsonl")).run(
            ROOT, who_run_and_begun)
    assert got == ["setup", "setup"]


# -- as in the sequential runner -------------------------------------------------------------------


def run_both(log: Path, *args: Any) -> list[list[tuple[str, State, int, str | None]]]:
    """The history `one(*args)` leaves with one worker and with a pool of two."""
    histories = []
    for workers in (1, 2):
        with MemoryStore() as store:
            with contextlib.suppress(StepError):
                pool_runner(store, log, workers=workers).run(ROOT, one, *args)
            histories.append(history(store))
    return histories


@pytest.mark.parametrize(("kind", "attempts", "error"), [
    ("retryable", 3, "ValueError"),
    ("permanent", 1, "Refused"),
    ("odd", 3, "Odd"),  # rebuilt in the driver by its type name, still retried
    ("odd_permanent", 1, "OddRefusal"),  # rebuilt, still permanent
])
def test_a_failing_step_ends_as_in_the_sequential_runner(
    log: Path, kind: str, attempts: int, error: str
) -> None:
    driver, pool = run_both(log, "fail", kind)
    assert pool == driver
    assert pool[1] == ("pool.0", State.REJECTED, attempts, error)


def test_an_unpicklable_exception_keeps_its_message(log: Path) -> None:
    with MemoryStore() as store, pytest.raises(StepError, match=r"Odd: odd 1-2"):
        pool_runner(store, log).run(ROOT, one, "fail", "odd")


def test_a_value_neither_json_nor_pickle_can_hold_is_rejected_at_once(log: Path) -> None:
    driver, pool = run_both(log, "odd_value", "lock")
    assert [h[1][:3] for h in (driver, pool)] == [("pool.0", State.REJECTED, 1)] * 2


def test_a_value_nested_too_deep_is_rejected_after_one_attempt(log: Path) -> None:
    driver, pool = run_both(log, "odd_value", "deep")
    assert driver[1] == ("pool.0", State.REJECTED, 1, "UnstorableValueError")
    assert pool[1][:3] == ("pool.0", State.REJECTED, 1)


def test_a_value_json_can_hold_is_resolved_in_a_pool_too(log: Path) -> None:
    driver, pool = run_both(log, "odd_value", "point")
    assert driver[1] == ("pool.0", State.RESOLVED, 1, None)
    assert pool == driver


def test_a_timeout_interrupts_the_step_in_its_step_process(log: Path) -> None:
    timeout = r"StepTimeoutError: step 'pool.sleep_past_timeout' \(pool.0\) did not return within 0.2 s"
    with MemoryStore() as store, pytest.raises(StepError, match=timeout):
        runner = pool_runner(store, log, retry=RetryPolicy(max_attempts=1, timeout=0.2))
        runner.run(ROOT, one, "sleep_past_timeout")
    (ran,) = executions(log)
    assert ran["pid"] != os.getpid()


def test_current_step_describes_the_step_in_its_step_process(log: Path) -> None:
    described = []
    for workers in (1, 2):
        with MemoryStore() as store:
            described.append(pool_runner(store, log, workers=workers).run(ROOT, one, "describe_step"))
    assert described[0] == described[1] == {
        "id": "pool.0", "attempt": 1, "fn": "pool.describe_step", "version": 2,
        "code": "pool.describe_step v2", "parent": ROOT, "log": True,
    }


# -- recover functions run in the step processes too ----------------------------------------------


def find_commit(marker: str) -> str | None:
    note_execution(recover=True)
    return Path(marker).read_text() if Path(marker).exists() else None


@register(name="pool.commit_then_die", recover=find_commit)
def commit_then_die(marker: str) -> str:
    """Makes its effect durable (the marker file), then its process dies before it answers."""
    note_execution()
    Path(marker).write_text(f"committed in attempt {current_step().attempt}")
    os.kill(os.getpid(), signal.SIGKILL)
    return "never"


@register(name="pool.one_commit")
def one_commit(ctx: Context, marker: str) -> Gen:
    return (yield (yield ctx.begin(commit_then_die, marker)))


def test_a_lost_step_whose_effect_is_durable_is_recovered_without_a_new_attempt(
    tmp_path: Path, log: Path
) -> None:
    with MemoryStore() as store:
        got = pool_runner(store, log).run(ROOT, one_commit, str(tmp_path / "commit"))
        assert got == "committed in attempt 1"
        assert store.get("pool.0").attempts == 1
    ran = executions(log)
    assert [e.get("recover", False) for e in ran] == [False, True]
    assert all(e["pid"] != os.getpid() for e in ran)


# -- what the pool cannot send -------------------------------------------------------------------


def make_local_step() -> Callable[[int], int]:
    def local_step(i: int) -> int:  # a closure: pickle cannot send it by name
        note_execution()
        return i + 1

    return local_step


LOCAL_STEP = make_local_step()


@register(name="pool.begin_local")
def begin_local(ctx: Context) -> Gen:
    return (yield (yield ctx.begin(LOCAL_STEP, 1)))


def test_a_call_the_pool_cannot_send_is_not_retried(log: Path) -> None:
    with MemoryStore() as store:
        with contextlib.suppress(StepError):
            pool_runner(store, log).run(ROOT, begin_local)
        assert store.get("pool.0").attempts <= 1
