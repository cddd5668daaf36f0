"""The supervisor itself dies, or two run at once: no orphan worker, no batch run twice."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import ModuleType

from supervisor_helpers import (
    BATCH_SIZE,
    BATCHES,
    RECORDS,
    SIZES,
    assert_audit_ok,
    assert_finished,
    assert_report_matches_sink,
    batch_attempts,
    executions,
    is_gone,
    resolved_batches,
    root_id,
    run_import,
    start_import,
    wait_until,
    worker_of,
)

ORPHAN_DEADLINE_S = 5.0


def test_supervisor_sigkill_takes_its_worker_down_and_rerun_resumes(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    # Batch 3 fails once and its retry waits 30 s: the worker is alive mid-run for a long time.
    args = (*SIZES, "--fail-at-batch", "3", "--retry-initial", "30")
    sup = start_import(state_dir, *args)
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, root, 3) >= 1, "batch 3 starts")
        worker = worker_of(sup.process.pid)
        sup.process.send_signal(signal.SIGKILL)
        sup.process.wait(10)
    finally:
        sup.close()
    assert sup.process.returncode == -signal.SIGKILL

    # PR_SET_PDEATHSIG: the worker dies with its supervisor; it never runs on unsupervised.
    wait_until(lambda: is_gone(worker), f"the orphaned worker {worker.pid} dies", ORPHAN_DEADLINE_S)
    assert resolved_batches(audit, state_dir, root) == {0, 1, 2}
    assert {e.pid for e in executions(state_dir, root)} == {worker.pid}

    rerun = run_import(state_dir, *args)
    report = assert_finished(rerun, RECORDS, BATCH_SIZE)
    [child] = report["children"]
    assert child["replayed"] == 3
    assert child["executed"] == list(range(3, BATCHES))
    assert batch_attempts(audit, state_dir, root, 3) == 2
    assert_report_matches_sink(report, state_dir, root, frozenset({worker.pid}))
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_second_supervisor_on_a_busy_state_dir_exits_3(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    args = (*SIZES, "--fail-at-batch", "2", "--retry-initial", "1")
    first = start_import(state_dir, *args, name="first")
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, root, 2) >= 1, "batch 2 starts")
        second = run_import(state_dir, *args)
        first_run = first.finish()
    finally:
        first.close()

    assert second.returncode == 3, second.describe()
    assert "another supervisor" in second.stderr
    assert f"pid {first.process.pid}" in second.stderr
    refusal = json.loads(second.stdout)  # --json: the refusal is a JSON report too
    assert refusal["ok"] is False and "another supervisor" in refusal["error"]
    report = assert_finished(first_run, RECORDS, BATCH_SIZE)
    # Only the first supervisor's workers ever executed a batch.
    workers = {c["pid"] for c in report["children"]}
    assert {e.pid for e in executions(state_dir, root)} <= workers
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_two_supervisors_started_at_once_one_runs_one_refuses(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    # A 1 s retry at batch 1 keeps the winner busy long enough for the loser to find the lock.
    args = (*SIZES, "--fail-at-batch", "1", "--retry-initial", "1")
    a = start_import(state_dir, *args, name="a")
    b = start_import(state_dir, *args, name="b")
    try:
        runs = [a.finish(), b.finish()]
    finally:
        a.close()
        b.close()

    assert sorted(r.returncode for r in runs) == [0, 3], [r.describe() for r in runs]
    winner = next(r for r in runs if r.returncode == 0)
    loser = next(r for r in runs if r.returncode == 3)
    assert "another supervisor" in loser.stderr
    report = assert_finished(winner, RECORDS, BATCH_SIZE)
    assert {e.pid for e in executions(state_dir, root)} <= {c["pid"] for c in report["children"]}
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)
