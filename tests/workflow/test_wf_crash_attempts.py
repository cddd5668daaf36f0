"""Durable attempt counts across a real SIGKILL of the process running a step."""

from __future__ import annotations

from pathlib import Path

import pytest
from wf_helpers import attempts_logged, read_store, run_flaky_child

from store import Promise, State

ROOT_ID = "crash/flaky"  # flaky_child.ROOT_ID
STEP_ID = ROOT_ID + ".0"
KILLED = -9


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "store.jsonl", tmp_path / "attempts.log"


def step_promise(store_path: Path) -> Promise:
    with read_store(store_path) as store:
        promise = store.get(STEP_ID)
    assert promise is not None
    return promise


def test_killed_in_backoff_after_two_failures_resumes_at_attempt_3(paths: tuple[Path, Path]) -> None:
    store_path, log = paths
    first = run_flaky_child(store_path, log, "--fail-before", "3", "--block-in-backoff", "2")
    assert first.returncode == KILLED
    promise = step_promise(store_path)
    assert (promise.state, promise.attempts) == (State.PENDING, 2)

    second = run_flaky_child(store_path, log, "--fail-before", "3")

    assert second.returncode == 0
    assert second.output == {"event": "resolved", "value": {"attempt": 3}}
    assert attempts_logged(log) == [1, 2, 3]
    promise = step_promise(store_path)
    assert (promise.state, promise.attempts, promise.value) == (State.RESOLVED, 3, {"attempt": 3})


def test_attempt_killed_while_running_counts_and_the_rerun_is_attempt_4(
    paths: tuple[Path, Path],
) -> None:
    store_path, log = paths
    first = run_flaky_child(store_path, log, "--fail-before", "3", "--block-at-attempt", "3")
    assert first.returncode == KILLED
    assert step_promise(store_path).attempts == 3

    second = run_flaky_child(store_path, log, "--fail-before", "3")

    assert second.output == {"event": "resolved", "value": {"attempt": 4}}
    assert attempts_logged(log) == [1, 2, 3, 4]
    assert step_promise(store_path).attempts == 4


def test_attempt_budget_spent_by_a_kill_rejects_on_rerun_without_running(
    paths: tuple[Path, Path],
) -> None:
    store_path, log = paths
    budget = ("--max-attempts", "3")
    first = run_flaky_child(store_path, log, *budget, "--fail-before", "3", "--block-at-attempt", "3")
    assert first.returncode == KILLED

    second = run_flaky_child(store_path, log, *budget, "--fail-before", "3")

    assert second.returncode == 4
    assert second.output["event"] == "rejected"
    assert "AttemptsExhaustedError" in second.output["error"]["message"]
    assert attempts_logged(log) == [1, 2, 3]  # the re-run did not run the step again
    promise = step_promise(store_path)
    assert promise.state is State.REJECTED
    assert promise.error["type"] == "AttemptsExhaustedError"
    assert promise.error["attempts"] == 3


def test_rejection_after_a_kill_is_replayed_by_the_next_run(paths: tuple[Path, Path]) -> None:
    store_path, log = paths
    budget = ("--max-attempts", "2")
    killed = run_flaky_child(store_path, log, *budget, "--fail-before", "9", "--block-in-backoff", "1")
    assert killed.returncode == KILLED  # in the backoff after attempt 1
    assert attempts_logged(log) == [1]
    rejected = run_flaky_child(store_path, log, *budget, "--fail-before", "9")
    again = run_flaky_child(store_path, log, *budget, "--fail-before", "9")

    assert rejected.output["event"] == "rejected"
    assert again.output == rejected.output
    error = step_promise(store_path).error
    assert (error["type"], error["attempts"]) == ("RuntimeError", 2)
    assert attempts_logged(log) == [1, 2]
