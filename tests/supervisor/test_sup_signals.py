"""SIGTERM and SIGINT to the supervisor: the worker stops, a clear message, the next run resumes."""

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
    crashing_workers,
    executions,
    pid_is_gone,
    resolved_batches,
    root_id,
    run_import,
    sigterm_while_batch_lingers,
    start_import,
    store_promises,
    wait_until,
)


def _pause_in_batch(batch: int) -> dict[str, str]:
    """Arm the worker's `batch.mid` failpoint without the supervisor's kill: the worker stalls
    mid-batch (its transaction open) until something kills it."""
    points = [{"name": "batch.mid", "key": str(batch), "action": "pause"}]
    return {"DURABLE_FAILPOINTS": json.dumps(points)}


def test_sigterm_lets_the_batch_in_flight_finish_then_exits_143(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    # The worker lingers 2 s halfway through batch 3: SIGTERM lands while it is in flight.
    stopped = sigterm_while_batch_lingers(audit, state_dir, 3, 2, *SIZES)

    assert stopped.returncode == 143, stopped.describe()
    assert "SIGTERM" in stopped.stderr
    assert "interrupted by SIGTERM" in stopped.stderr
    assert "run the same command again to resume" in stopped.stderr
    assert stopped.report is not None and stopped.report["ok"] is False
    [child] = stopped.report["children"]
    assert pid_is_gone(child["pid"])
    # The batch in flight finished; nothing after it started; the import is not settled.
    assert resolved_batches(audit, state_dir, root) == {0, 1, 2, 3}
    assert batch_attempts(audit, state_dir, root, 4) == 0
    assert max(e.batch for e in executions(state_dir, root)) == 3
    assert store_promises(audit, state_dir)[root]["state"] == "pending"
    assert audit.audit(state_dir, root, RECORDS, finished=False)["ok"]

    rerun = run_import(state_dir, *SIZES)
    report = assert_finished(rerun, RECORDS, BATCH_SIZE)
    [child2] = report["children"]
    assert child2["replayed"] == 4
    assert child2["executed"] == list(range(4, BATCHES))
    assert_report_matches_sink(report, state_dir, root, frozenset({child["pid"]}))
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_sigint_kills_a_stuck_worker_after_the_grace_then_exits_130(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    sup = start_import(state_dir, *SIZES, "--grace", "0.5", env=_pause_in_batch(3))
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, root, 3) >= 1, "batch 3 starts")
        sup.process.send_signal(signal.SIGINT)
        stopped = sup.finish()
    finally:
        sup.close()

    assert stopped.returncode == 130, stopped.describe()
    assert "interrupted by SIGINT" in stopped.stderr
    assert "did not stop within 0.5 s; SIGKILL" in stopped.stderr
    assert stopped.report is not None and stopped.report["ok"] is False
    [child] = stopped.report["children"]
    assert child["exit"] == "killed by SIGKILL"
    assert pid_is_gone(child["pid"])
    # The abandoned batch left nothing: its transaction was never committed.
    assert resolved_batches(audit, state_dir, root) == {0, 1, 2}
    assert [e.outcome for e in executions(state_dir, root) if e.batch == 3] == [None]
    assert audit.audit(state_dir, root, RECORDS, finished=False)["ok"]

    rerun = run_import(state_dir, *SIZES)
    report = assert_finished(rerun, RECORDS, BATCH_SIZE)
    [child2] = report["children"]
    assert child2["replayed"] == 3
    assert child2["executed"] == list(range(3, BATCHES))
    assert_report_matches_sink(report, state_dir, root, frozenset({child["pid"]}))
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_sigterm_while_waiting_to_restart_exits_143_at_once(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    env, _ = crashing_workers(tmp_path)  # every worker crashes: the supervisor backs off
    sup = start_import(state_dir, *SIZES, "--restart-backoff", "30", env=env)
    try:
        wait_until(lambda: "restarting the worker in 30 s" in sup.err_path.read_text(), "it backs off")
        sup.process.send_signal(signal.SIGTERM)
        stopped = sup.finish(timeout=5)
    finally:
        sup.close()

    assert stopped.returncode == 143, stopped.describe()
    assert "error: interrupted by SIGTERM: while waiting to restart the worker" in stopped.stderr
    assert stopped.report is not None and len(stopped.report["children"]) == 1
    assert stopped.report["elapsed_s"] < 10


def test_sigterm_during_the_last_batch_reports_the_finished_import(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    last = BATCHES - 1
    # The worker lingers 2 s halfway through the last batch: SIGTERM lands while it is in flight.
    linger = {"DURABLE_FAILPOINTS": json.dumps(
        [{"name": "batch.mid", "key": str(last), "action": "delay", "seconds": 2}])}
    sup = start_import(state_dir, *SIZES, env=linger)
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, root, last) >= 1, "the last batch starts")
        sup.process.send_signal(signal.SIGTERM)
        stopped = sup.finish()
    finally:
        sup.close()

    assert store_promises(audit, state_dir)[root]["state"] == "resolved"  # the import did finish
    assert_audit_ok(audit, state_dir, root, RECORDS)
    assert stopped.returncode == 0, stopped.describe()
    assert_finished(stopped, RECORDS, BATCH_SIZE)
