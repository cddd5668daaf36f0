"""A workflow in PostgreSQL attacked with real processes: drivers stopped past their lease,
executors killed or stopped in the middle of a step, failing steps, all checked from the
database itself.

The driver's promises (workflow/fleet.py, store/pg_tasks.py): a driver paused past its lease
writes nothing when it resumes; a step claimed by an executor that died is claimed again (at
once if it died on this machine, else when its claim expires) with both attempts counted; a
step's transaction commits its writes, its task's end and its promise's resolve together, and
only while its claim is current; an executor stopped inside it commits nothing, and the rows it
locked do not hold up the next one; failures are retried after the policy's backoff, and a step
whose attempts all died is rejected with a clear error.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fleet_proc
import pytest
from pgproc import children, lease, query, snapshot, wait_until

from store import open_store
from store.pg import PgStore
from store.pg_tasks import ClaimLostError
from workflow import RetryPolicy, Runner, StepError
from workflow.fleet import Fleet, task_spec

FLEET_PROC = Path(fleet_proc.__file__)
ROOT = "fleet/attack"
STEP = f"{ROOT}.0"  # the one step of fleet_t.one


# -- a driver process stopped past its lease --------------------------------------------------


def drive(start: Any, url: str, sleep: float = 0.15) -> Any:
    return start(FLEET_PROC, "drive", url, ROOT, 1, 6, sleep)


def stopped_in_step_2(start: Any, url: str) -> Any:
    """A driver process with a lease of 1 s, SIGSTOPped in the middle of its third step."""
    first = drive(start, url)
    first.wait_for(lambda e: e.get("id") == f"{ROOT}.2")
    first.signal(signal.SIGSTOP)
    return first


def test_a_driver_stopped_past_its_lease_writes_nothing_after_another_finished(pg_url: str) -> None:
    with children() as start:
        first = stopped_in_step_2(start, pg_url)
        second = drive(start, pg_url)
        assert second.finish() == 0, second.describe()
        assert second.events[-1] == {"event": "result", "value": sum(i * i for i in range(6))}
        assert lease(pg_url, ROOT)[1] == 2  # the second took it over
        ran = [(e["id"], e["attempt"]) for e in second.events if e["event"] == "in_step"]
        assert ran[0] == (f"{ROOT}.2", 2)  # resumed at the step in flight, its attempt counted
        before = snapshot(pg_url)
        first.signal(signal.SIGCONT)
        assert first.finish() == 3, first.describe()
        assert first.events[-1]["type"] == "FencedError", first.describe()
        assert snapshot(pg_url) == before  # not one row changed by the resumed driver


def test_a_driver_stopped_past_its_lease_with_no_one_else_writes_nothing_and_fails(pg_url: str) -> None:
    with children() as start:
        first = stopped_in_step_2(start, pg_url)
        wait_until(lambda: lease(pg_url, ROOT)[2] < -0.2)
        before = snapshot(pg_url)
        first.signal(signal.SIGCONT)
        assert first.finish() == 3, first.describe()
        assert first.events[-1]["type"] == "FencedError", first.describe()
        assert snapshot(pg_url) == before
        second = drive(start, pg_url)
        assert second.finish() == 0, second.describe()
    assert [row[2] for row in query(pg_url, "SELECT id, state, attempts FROM promise_states "
                                             f"WHERE id = '{ROOT}.2'")] == [2]


def test_a_driver_whose_sessions_the_server_ended_fails_with_a_store_error_and_another_finishes(
    pg_url: str,
) -> None:
    with children() as start:
        first = drive(start, pg_url, sleep=0.3)
        first.wait_for(lambda e: e.get("id") == f"{ROOT}.2")
        ended = query(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert len(ended) >= 2
        assert first.finish() == 3, first.describe()  # a StoreError, not a psycopg traceback
        assert first.events[-1]["type"] == "StoreUnavailableError", first.describe()
        second = drive(start, pg_url, sleep=0.3)
        assert second.finish() == 0, second.describe()
        assert second.events[-1] == {"event": "result", "value": sum(i * i for i in range(6))}


# -- executors, killed, stopped, failing -------------------------------------------------------


@dataclass
class Driver:
    """The workflow `fleet_t.one` driven in a thread of the test on a fleet of executor processes."""

    store: PgStore
    fleet: Fleet
    thread: threading.Thread | None = None
    outcome: dict[str, Any] = field(default_factory=dict)

    def result(self, timeout: float = 20) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the driver did not finish in {timeout} s")
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["value"]


@contextlib.contextmanager
def driving(url: str, step: str, args: list[Any], policy: dict[str, Any]) -> Iterator[Driver]:
    """The driver's thread runs until the workflow is settled (or the fleet is closed on exit)."""
    with open_store(url, lease_s=2, lock_timeout=5) as store:
        driver = Driver(store, Fleet(store, 2, poll_s=0.02))

        def run() -> None:
            try:
                driver.outcome["value"] = Runner(store, fleet=driver.fleet).run(
                    ROOT, fleet_proc.one, step, args, policy)
            except BaseException as exc:
                driver.outcome["error"] = exc

        driver.thread = threading.Thread(target=run, name="driver")
        driver.thread.start()
        try:
            yield driver
        finally:
            driver.fleet.close()
            driver.thread.join(10)


def execute(start: Any, url: str, tmp_path: Path, claim_s: float) -> Any:
    return start(FLEET_PROC, "execute", url, ROOT, claim_s, tmp_path / "attempts.jsonl")


def logged(tmp_path: Path) -> list[dict[str, Any]]:
    """Every attempt that began, as the steps logged them outside their transactions."""
    path = tmp_path / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def scratch_table(url: str, unique: bool = False) -> None:
    query(url, f"CREATE TABLE scratch (promise_id text {'PRIMARY KEY' if unique else ''}, "
               "attempt int, pid int)")


def step_row(url: str) -> tuple[Any, ...]:
    return query(url, "SELECT p.state, p.value, p.attempts, t.state, t.claim FROM promise_states p "
                      "JOIN tasks t ON t.promise_id = p.id WHERE p.id = %s", STEP)[0]


def test_a_step_whose_executor_was_killed_is_claimed_again_at_once_and_resolved_once(
    pg_url: str, tmp_path: Path
) -> None:
    scratch_table(pg_url)
    policy = {"max_attempts": 3, "initial": 0.05}
    with children() as start, driving(pg_url, "scratch", [[1], 60], policy) as driver:
        first = execute(start, pg_url, tmp_path, claim_s=10)
        first.wait_for("in_step")  # its scratch row written, in its transaction
        first.signal(signal.SIGKILL)
        killed = time.monotonic()
        second = execute(start, pg_url, tmp_path, claim_s=10)
        again = second.wait_for("in_step")
        assert time.monotonic() - killed < 5, "the dead executor's claim of 10 s was waited for"
        assert again["attempt"] == 2
        assert driver.result() == {"pid": second.pid, "attempt": 2}
        assert second.finish() == 0, second.describe()
    assert [(a["pid"], a["attempt"]) for a in logged(tmp_path)] == [(first.pid, 1), (second.pid, 2)]
    assert query(pg_url, "SELECT promise_id, attempt, pid FROM scratch") == [(STEP, 2, second.pid)]
    assert step_row(pg_url) == ("resolved", {"pid": second.pid, "attempt": 2}, 2, "done", 2)


def test_a_claim_held_elsewhere_is_claimed_again_only_once_it_expired_and_its_late_finish_commits_nothing(
    pg_url: str, tmp_path: Path
) -> None:
    scratch_table(pg_url)
    with children() as start, open_store(pg_url, lease_s=5) as store, store.own(ROOT):
        store.create(ROOT, {"fn": "by hand"})
        store.create(STEP, {"fn": "fleet_t.scratch", "v": 1, "args": [[], 0]})
        store.enqueue(STEP, task_spec(RetryPolicy(max_attempts=3)))
        elsewhere = "another-host pid 1 (elsewhere:1) 0123abcd"  # not a process of this machine
        stale = store.claim([ROOT], elsewhere, 1.5)
        claimed = time.monotonic()
        assert (stale.promise_id, stale.attempt) == (STEP, 1)
        executor = execute(start, pg_url, tmp_path, claim_s=5)
        ran = executor.wait_for("in_step")
        assert time.monotonic() - claimed >= 1.5 - 0.05, "claimed before the claim elsewhere expired"
        assert ran["attempt"] == 2
        wait_until(lambda: store.refresh([STEP])[0].settled)
        with pytest.raises(ClaimLostError), store.step_transaction(stale) as conn:  # the one elsewhere, late
            conn.execute("INSERT INTO scratch VALUES (%s, 1, 1)", (STEP,))
            store.finish_claim(conn, stale, {"pid": 1, "attempt": 1})
        store.resolve(ROOT, "done")
        assert executor.finish() == 0, executor.describe()
    assert query(pg_url, "SELECT attempt, pid FROM scratch") == [(2, executor.pid)]
    assert step_row(pg_url) == ("resolved", {"pid": executor.pid, "attempt": 2}, 2, "done", 2)


@pytest.mark.parametrize("unique", [False, True], ids=["resumed-before-the-server-ends-it", "row-locked"])
def test_an_executor_stopped_in_its_step_transaction_commits_nothing_of_it(
    pg_url: str, tmp_path: Path, unique: bool
) -> None:
    """With a unique key, the next executor's row would wait for the stopped one's lock: the next
    claimer ends the stopped one's transaction; without, the stopped one resumes while its
    transaction is open (or was ended) and finds its claim lost."""
    scratch_table(pg_url, unique)
    claim_s = 1.0 if unique else 2.0
    with children() as start, driving(pg_url, "scratch", [[1], 1.0], {"max_attempts": 3}) as driver:
        first = execute(start, pg_url, tmp_path, claim_s=claim_s)
        first.wait_for("in_step")
        first.signal(signal.SIGSTOP)  # in its step, its transaction open with a row in it
        second = execute(start, pg_url, tmp_path, claim_s=claim_s)
        assert driver.result() == {"pid": second.pid, "attempt": 2}
        first.signal(signal.SIGCONT)
        assert first.finish() == 0, first.describe()
        assert second.finish() == 0, second.describe()
    assert query(pg_url, "SELECT attempt, pid FROM scratch") == [(2, second.pid)]
    assert step_row(pg_url) == ("resolved", {"pid": second.pid, "attempt": 2}, 2, "done", 2)


def test_a_step_whose_transaction_the_server_ended_is_retried_and_commits_once(
    pg_url: str, tmp_path: Path
) -> None:
    scratch_table(pg_url)
    policy = {"max_attempts": 3, "initial": 0.05}
    with children() as start, driving(pg_url, "scratch", [[1], 1.0], policy) as driver:
        executor = execute(start, pg_url, tmp_path, claim_s=5)
        executor.wait_for("in_step")
        ended = query(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND state = 'idle in transaction'")
        assert len(ended) == 1  # the step's transaction, its row in it
        assert driver.result() == {"pid": executor.pid, "attempt": 2}
        assert executor.finish() == 0, executor.describe()
    assert query(pg_url, "SELECT attempt FROM scratch") == [(2,)]
    assert step_row(pg_url) == ("resolved", {"pid": executor.pid, "attempt": 2}, 2, "done", 2)
    (error,), = query(pg_url, "SELECT last_error FROM tasks")
    assert error["attempts"] == 1 and "terminat" in error["message"], error


def test_a_failing_step_is_retried_after_its_backoff_by_any_executor(pg_url: str, tmp_path: Path) -> None:
    policy = {"max_attempts": 5, "initial": 0.3, "factor": 2.0}
    with children() as start, driving(pg_url, "flaky", [3], policy) as driver:
        executors = [execute(start, pg_url, tmp_path, claim_s=5) for _ in range(2)]
        assert driver.result() == 3
        for executor in executors:
            assert executor.finish() == 0, executor.describe()
    began = [a["t"] for a in logged(tmp_path)]
    assert [a["attempt"] for a in logged(tmp_path)] == [1, 2, 3]
    assert began[1] - began[0] >= 0.3 and began[2] - began[1] >= 0.6, began
    assert step_row(pg_url) == ("resolved", 3, 3, "done", 3)
    assert query(pg_url, "SELECT last_error FROM tasks") == [
        ({"type": "RuntimeError", "message": "attempt 2 fails", "attempts": 2},)]


def test_a_step_failing_every_time_is_rejected_with_its_own_error(pg_url: str, tmp_path: Path) -> None:
    policy = {"max_attempts": 2, "initial": 0.05}
    with children() as start, driving(pg_url, "flaky", [0], policy) as driver:
        execute(start, pg_url, tmp_path, claim_s=5)
        with pytest.raises(StepError, match="attempt 2 fails"):
            driver.result()
    assert [a["attempt"] for a in logged(tmp_path)] == [1, 2]
    state, error, attempts = query(pg_url, "SELECT state, error, attempts FROM promise_states WHERE id = %s",
                                   STEP)[0]
    assert (state, error["type"], attempts) == ("rejected", "RuntimeError", 2)


def test_a_step_whose_attempts_all_died_with_their_executors_is_rejected_clearly(
    pg_url: str, tmp_path: Path
) -> None:
    scratch_table(pg_url)
    policy = {"max_attempts": 2, "initial": 0.05}
    with children() as start, driving(pg_url, "scratch", [[1, 2, 3], 60], policy) as driver:
        for attempt in (1, 2):
            executor = execute(start, pg_url, tmp_path, claim_s=10)
            assert executor.wait_for("in_step")["attempt"] == attempt
            executor.signal(signal.SIGKILL)
        last = execute(start, pg_url, tmp_path, claim_s=10)
        with pytest.raises(StepError, match=r"AttemptsExhaustedError.*all 2 attempts were used"):
            driver.result()
        assert last.finish() == 0, last.describe()
        assert not any(e["event"] == "in_step" for e in last.events)  # a third attempt never ran
    assert query(pg_url, "SELECT count(*) FROM scratch") == [(0,)]
    state, error = query(pg_url, "SELECT state, error FROM promise_states WHERE id = %s", STEP)[0]
    assert (state, error["type"]) == ("rejected", "AttemptsExhaustedError")


def test_a_live_executor_keeps_its_transaction_through_a_slow_step(pg_url: str, tmp_path: Path) -> None:
    scratch_table(pg_url)
    # Claims of 0.5 s, renewed all along; the step holds its open transaction 1.5 s after its row.
    with children() as start, driving(pg_url, "scratch", [[1], 1.5], {"max_attempts": 1}) as driver:
        executor = execute(start, pg_url, tmp_path, claim_s=0.5)
        assert driver.result() == {"pid": executor.pid, "attempt": 1}
    assert query(pg_url, "SELECT attempt FROM scratch") == [(1,)]


def test_a_step_rejected_on_the_fleet_runs_again_after_a_retry(pg_url: str, tmp_path: Path) -> None:
    policy = {"max_attempts": 1}
    with children() as start:
        with driving(pg_url, "flaky", [2], policy) as driver:
            execute(start, pg_url, tmp_path, claim_s=5)
            with pytest.raises(StepError, match="attempt 1 fails"):
                driver.result()
        with open_store(pg_url) as store:
            assert Runner(store).retry(ROOT) == [STEP, ROOT]
        with driving(pg_url, "flaky", [2], policy) as driver:
            execute(start, pg_url, tmp_path, claim_s=5)
            assert driver.result() == 2
    assert query(pg_url, "SELECT state FROM promise_states WHERE id = %s", STEP) == [("resolved",)]
