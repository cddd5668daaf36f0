"""A planned kill never uses up a batch's last attempt: impossible flags are refused up front, and
on a resumed import a kill that would fail its batch is reported undelivered instead."""

from __future__ import annotations

import signal
from pathlib import Path
from types import ModuleType

import pytest
from supervisor_helpers import (
    BATCH_SIZE,
    BATCHES,
    RECORDS,
    SIZES,
    assert_audit_ok,
    assert_finished,
    assert_report_matches_sink,
    batch_attempts,
    is_gone,
    root_id,
    run_import,
    sigterm_while_batch_lingers,
    start_import,
    wait_until,
    worker_of,
)


@pytest.mark.parametrize("flags, needed", [
    (("--kill-at-batch", "3", "--max-attempts", "1"), 2),
    (("--kill-at-batch", "3", "--fail-at-batch", "3", "--max-attempts", "2"), 3),
])
def test_a_kill_that_would_spend_the_last_attempt_is_refused_up_front(
    tmp_path: Path, flags: tuple[str, ...], needed: int
) -> None:
    state_dir = tmp_path / "state"
    run = run_import(state_dir, *SIZES, *flags)

    assert run.returncode == 2, run.describe()
    assert run.stderr.count("\n") == 1, run.describe()  # one line
    assert "--kill-at-batch 3" in run.stderr
    assert f"--max-attempts {needed} or more" in run.stderr
    assert run.report == {"ok": False, "error": run.stderr.removeprefix("error: ").strip()}
    assert not state_dir.exists()  # nothing ran, nothing was created


def test_resumed_kill_at_a_batch_on_its_last_attempt_is_undelivered_and_the_import_finishes(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    # A first run dies (with its supervisor) while batch 3 waits to retry its failed first attempt.
    first = start_import(state_dir, *SIZES, "--fail-at-batch", "3", "--retry-initial", "30")
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, root, 3) >= 1, "batch 3 starts")
        worker = worker_of(first.process.pid)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    finally:
        first.close()
    wait_until(lambda: is_gone(worker), f"the orphaned worker {worker.pid} dies", 5.0)
    assert batch_attempts(audit, state_dir, root, 3) == 1

    # Batch 3's next attempt is its last of 2: a kill there would fail it, so none is armed.
    rerun = run_import(state_dir, *SIZES, "--kill-at-batch", "3", "--max-attempts", "2")

    report = assert_finished(rerun, RECORDS, BATCH_SIZE)
    assert report["kills"] == []
    assert report["undelivered_kills"] == [
        "kill at batch 3: it has 1 of its 2 attempts left, and a kill of ours must not spend the last"
    ]
    [child] = report["children"]
    assert child["executed"] == list(range(3, BATCHES))
    assert batch_attempts(audit, state_dir, root, 3) == 2
    assert_report_matches_sink(report, state_dir, root, frozenset({worker.pid}))
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_fail_at_batch_with_a_single_attempt_is_refused_up_front(tmp_path: Path) -> None:
    run = run_import(tmp_path / "state", *SIZES, "--fail-at-batch", "3", "--max-attempts", "1")
    assert run.returncode == 2, run.describe()
    assert "--fail-at-batch 3 needs --max-attempts 2 or more, not 1" in run.stderr
    assert not (tmp_path / "state").exists()


def test_a_stop_past_its_grace_never_kills_a_batch_on_its_last_attempt(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    # Batch 3 lingers 3 s halfway: SIGTERM lands while it runs its only attempt, grace is 0.3 s.
    stopped = sigterm_while_batch_lingers(audit, state_dir, 3, 3, *SIZES, "--max-attempts", "1",
                                          "--grace", "0.3")

    assert stopped.returncode == 143, stopped.describe()
    assert "a kill would spend the last attempt" in stopped.stderr
    assert stopped.report["kills"] == [] and 3 in stopped.report["children"][0]["executed"]
    assert batch_attempts(audit, state_dir, root, 3) == 1
    rerun = run_import(state_dir, *SIZES, "--max-attempts", "1")  # resumes: nothing was spent
    assert_finished(rerun, RECORDS, BATCH_SIZE)
    assert_audit_ok(audit, state_dir, root, RECORDS)
