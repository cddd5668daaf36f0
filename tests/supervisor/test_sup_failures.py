"""Failing batches and crashing workers: retry with backoff, give up clearly, resume after a fix."""

from __future__ import annotations

import json
import re
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
    batch_promises,
    crashing_workers,
    executions,
    root_id,
    run_cli,
    run_import,
    start_import,
    store_promises,
    wait_until,
    worker_of,
)


def _failpoints(*points: tuple[str, str, str]) -> dict[str, str]:
    entries = [{"name": name, "key": key, "action": action} for name, key, action in points]
    return {"DURABLE_FAILPOINTS": json.dumps(entries)}


def test_fail_at_batch_is_retried_with_backoff(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run = run_import(state_dir, *SIZES, "--fail-at-batch", "4", "--retry-initial", "0.2")
    report = assert_finished(run, RECORDS, BATCH_SIZE)

    batch_4 = batch_promises(audit, state_dir, root)[4]["id"]
    retry_lines = [line for line in run.stderr.splitlines() if "attempt 1; retrying in" in line]
    assert len(retry_lines) == 1, run.stderr
    assert f"({batch_4})" in retry_lines[0]
    assert re.search(r"retrying in 0\.2\d* s", retry_lines[0]), retry_lines[0]
    assert report["elapsed_s"] >= 0.2  # the backoff was waited, not skipped
    assert report["restarts"] == 0
    [child] = report["children"]
    assert child["executed"] == list(range(BATCHES))
    attempts = {b: p["attempts"] for b, p in batch_promises(audit, state_dir, root).items()}
    assert attempts == {b: 2 if b == 4 else 1 for b in range(BATCHES)}
    assert [(e.attempt, e.outcome) for e in executions(state_dir, root) if e.batch == 4] == [
        (1, None), (2, "committed"),
    ]
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_crash_looping_worker_gives_up_after_max_restarts(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    env, crashing = crashing_workers(tmp_path)
    run = run_import(state_dir, *SIZES, "--max-restarts", "2", "--restart-backoff", "0", env=env)

    assert run.returncode == 1, run.describe()
    assert run.report is not None and run.report["ok"] is False
    assert run.report["restarts"] == 2
    assert len(run.report["children"]) == 3
    assert all(c["exit"] == "exit code 1" for c in run.report["children"])
    error = run.report["error"]
    assert "gave up after 2 restarts" in error
    assert "planned crash of the test" in error  # the worker's last error is shown
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: gave up after 2 restarts"), last_line
    assert "planned crash of the test" in last_line

    # The store is left intact: once the cause is removed, the same command finishes.
    crashing.unlink()
    assert all(p["state"] == "pending" for p in store_promises(audit, state_dir).values())
    rerun = run_import(state_dir, *SIZES, env=env)
    report = assert_finished(rerun, RECORDS, BATCH_SIZE)
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_batch_that_always_fails_is_named_then_retry_resumes_there(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    broken = _failpoints(("batch.fail", "2/1", "raise"), ("batch.fail", "2/2", "raise"))
    failed = run_import(state_dir, *SIZES, "--max-attempts", "2", "--retry-initial", "0", env=broken)

    assert failed.returncode == 1, failed.describe()
    assert failed.report is not None and failed.report["ok"] is False
    batches = batch_promises(audit, state_dir, root)
    batch_2 = batches[2]["id"]
    assert f"({batch_2})" in failed.report["error"]
    assert "InjectedFault" in failed.report["error"]
    assert "after 2 attempts" in failed.report["error"]
    last_line = failed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and f"({batch_2})" in last_line, last_line
    assert batches[2]["state"] == "rejected"
    assert batches[2]["attempts"] == 2
    assert {b for b, p in batches.items() if p["state"] == "resolved"} == {0, 1}
    assert store_promises(audit, state_dir)[root]["state"] == "rejected"

    status = run_cli("status", state_dir, "--id", root)
    assert status.returncode == 0, status.describe()
    assert f"2/{BATCHES} batches done" in status.stdout
    assert "InjectedFault" in status.stdout

    retry = run_cli("retry", state_dir, "--id", root)
    assert retry.returncode == 0, retry.describe()
    assert f"reopened {batch_2}" in retry.stdout
    assert batch_promises(audit, state_dir, root)[2]["state"] == "pending"

    rerun = run_import(state_dir, *SIZES)
    report = assert_finished(rerun, RECORDS, BATCH_SIZE)
    [child] = report["children"]
    assert child["replayed"] == 2
    assert child["executed"] == list(range(2, BATCHES))
    runs = executions(state_dir, root)
    assert [e.batch for e in runs].count(0) == 1
    assert [e.batch for e in runs].count(1) == 1
    assert [(e.attempt, e.outcome) for e in runs if e.batch == 2] == [(1, None), (2, None), (3, "committed")]
    first_pid = failed.report["children"][0]["pid"]
    assert_report_matches_sink(report, state_dir, root, frozenset({first_pid}))
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_retry_refuses_an_import_that_did_not_fail(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    retry = run_cli("retry", state_dir, "--id", root_id(RECORDS, BATCH_SIZE))
    assert retry.returncode != 0
    assert "only a failed import can be retried" in retry.stderr


def test_max_restarts_counts_only_restarts_in_a_row(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    # Workers stall at the first attempts of batches 2 and 6; we SIGKILL each from outside
    # (an unplanned death). The restarted worker gets past the stall and makes progress.
    stalls = _failpoints(("batch.fail", "2/1", "pause"), ("batch.fail", "6/1", "pause"))
    sup = start_import(state_dir, *SIZES, "--max-restarts", "1", "--restart-backoff", "0", env=stalls)
    try:
        for batch in (2, 6):
            wait_until(lambda b=batch: batch_attempts(audit, state_dir, root, b) >= 1,
                       f"batch {batch} starts")
            worker_of(sup.process.pid).kill()
        run = sup.finish()
    finally:
        sup.close()

    report = assert_finished(run, RECORDS, BATCH_SIZE)
    assert report["restarts"] == 2
    assert_audit_ok(audit, state_dir, root, RECORDS)
