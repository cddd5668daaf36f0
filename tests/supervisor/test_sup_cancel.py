"""`cancel`: a running import (one worker or a pool) stops at its next batch boundary from
another process, is marked cancelled, its supervisor exits 4; `retry` then `run` completes it.
A cancel of an import nobody runs marks it at once; a SIGKILL of the worker after the request
leaves it cancelled by the next worker, with nothing lost or committed twice."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from supervisor_helpers import (
    assert_finished,
    batch_attempts,
    executions,
    resolved_batches,
    root_id,
    run_cli,
    run_import,
    sigterm_while_batch_lingers,
    start_import,
    store_promises,
    wait_until,
    worker_of,
)

RECORDS, BATCH_SIZE = 2000, 10  # 200 batches
BATCHES = RECORDS // BATCH_SIZE
SIZES = ("--records", str(RECORDS), "--batch-size", str(BATCH_SIZE))
ROOT = root_id(RECORDS, BATCH_SIZE)
CANCELLED = 4  # supervisor/exits.py


def _slow_batches(seconds: float) -> dict[str, str]:
    """Every batch lingers `seconds` halfway through its rows: a run long enough to cancel."""
    points = [{"name": "batch.mid", "key": str(b), "action": "delay", "seconds": seconds}
              for b in range(BATCHES)]
    return {"DURABLE_FAILPOINTS": json.dumps(points)}


def _assert_committed_once_each(state_dir: Path, done: set[int]) -> None:
    committed = [e.batch for e in executions(state_dir, ROOT) if e.outcome == "committed"]
    assert sorted(committed) == sorted(done), "each batch done committed exactly once"


def _resume_and_finish(audit: ModuleType, state_dir: Path, done_before: set[int], workers: int = 1) -> None:
    retried = run_cli("retry", state_dir, "--id", ROOT)
    assert retried.returncode == 0, retried.describe()
    finished = run_import(state_dir, *SIZES)
    report = assert_finished(finished, RECORDS, BATCH_SIZE)
    [child] = report["children"]
    assert child["replayed"] >= len(done_before)
    assert not set(child["executed"]) & done_before  # nothing done twice
    verdict = audit.audit(state_dir, ROOT, RECORDS, workers=workers)
    assert verdict["ok"], verdict["violations"]
    assert verdict["imported"] + verdict["skipped"] == RECORDS


def _cancel_once(state_dir: Path, workers: int, env: dict[str, str], ready: Callable[[], bool],
                 what: str) -> tuple[Any, Any]:
    """Start the import, `cancel` it once `ready()`, and let its supervisor end: both answers."""
    sup = start_import(state_dir, *SIZES, "--workers", str(workers), env=env)
    try:
        wait_until(ready, what)
        asked = run_cli("cancel", state_dir, "--id", ROOT)
        return asked, sup.finish()
    finally:
        sup.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_cancel_stops_a_running_import_at_a_batch_boundary(
    tmp_path: Path, audit: ModuleType, workers: int
) -> None:
    state_dir = tmp_path / "state"
    asked, ended = _cancel_once(state_dir, workers, _slow_batches(0.05),
                                lambda: len(resolved_batches(audit, state_dir, ROOT)) >= 5,
                                "5 batches are done")

    assert asked.returncode == 0, asked.describe()
    assert "stops at its next batch boundary" in asked.stdout
    assert ended.returncode == CANCELLED, ended.describe()
    assert ended.report is not None and ended.report["cancelled"] is True and ended.report["ok"] is False
    assert ended.report["error"] is None  # an outcome asked for, not an error
    assert "error:" not in ended.stderr
    done = resolved_batches(audit, state_dir, ROOT)
    assert 5 <= len(done) < BATCHES
    assert done == set(range(len(done)))  # a prefix: every batch begun before the cancel ended
    assert store_promises(audit, state_dir)[ROOT]["state"] == "rejected"
    _assert_committed_once_each(state_dir, done)
    assert audit.audit(state_dir, ROOT, RECORDS, finished=False, workers=workers)["ok"]

    status = run_cli("status", state_dir, "--id", ROOT, "--json")
    assert json.loads(status.stdout)["state"] == "cancelled"
    listed = run_cli("list", state_dir, "--json")
    assert [r["state"] for r in json.loads(listed.stdout)] == ["cancelled"]

    again = run_import(state_dir, *SIZES)  # cancelled for good: runs nothing, says how to resume
    assert again.returncode == CANCELLED, again.describe()
    assert f"python -m supervisor retry --id {ROOT}" in again.report["resume"]
    assert again.report["children"][0]["executed"] == []
    _resume_and_finish(audit, state_dir, done, workers)


def test_cancel_of_an_import_nobody_runs_marks_it_at_once(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    stopped = sigterm_while_batch_lingers(audit, state_dir, 3, 1, *SIZES)
    assert stopped.returncode == 143, stopped.describe()
    done = resolved_batches(audit, state_dir, ROOT)

    asked = run_cli("cancel", state_dir, "--id", ROOT)
    assert asked.returncode == 0, asked.describe()
    assert asked.stdout.startswith(f"cancelled import {ROOT} ({len(done)} of {BATCHES} batches done)")
    assert store_promises(audit, state_dir)[ROOT]["state"] == "rejected"
    again = run_cli("cancel", state_dir, "--id", ROOT, "--json")
    assert json.loads(again.stdout)["state"] == "cancelled"

    refused = run_import(state_dir, *SIZES)
    assert refused.returncode == CANCELLED, refused.describe()
    assert "is cancelled" in refused.stdout + refused.stderr
    assert resolved_batches(audit, state_dir, ROOT) == done
    _resume_and_finish(audit, state_dir, done)


def test_a_sigkill_of_the_worker_after_the_request_still_cancels(tmp_path: Path, audit: ModuleType) -> None:
    """The worker is killed in the middle of batch 3, after the request: its batch's transaction
    was never committed; the next worker finds the request before it runs anything."""
    state_dir = tmp_path / "state"
    pause = [{"name": "batch.mid", "key": "3", "action": "pause"}]
    sup = start_import(state_dir, *SIZES, "--restart-backoff", "0",
                       env={"DURABLE_FAILPOINTS": json.dumps(pause)})
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, ROOT, 3) >= 1, "batch 3 starts")
        asked = run_cli("cancel", state_dir, "--id", ROOT, "--json")
        assert json.loads(asked.stdout)["state"] == "cancelling"
        worker = worker_of(sup.process.pid)
        os.killpg(worker.pid, signal.SIGKILL)
        ended = sup.finish()
    finally:
        sup.close()

    assert ended.returncode == CANCELLED, ended.describe()
    first, second = ended.report["children"]
    assert first["exit"] == "killed by SIGKILL"
    assert second["executed"] == [] and second["replayed"] == 3
    assert resolved_batches(audit, state_dir, ROOT) == {0, 1, 2}
    assert [e.outcome for e in executions(state_dir, ROOT) if e.batch == 3] == [None]  # died uncommitted
    _assert_committed_once_each(state_dir, {0, 1, 2})
    _resume_and_finish(audit, state_dir, {0, 1, 2})


def test_cancel_refuses_a_finished_or_unknown_import(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    assert_finished(run_import(state_dir, "--records", "20", "--batch-size", "10"), 20, 10)
    done = run_cli("cancel", state_dir, "--id", root_id(20, 10))
    assert done.returncode == 1 and done.stderr.strip().endswith("is done; there is nothing to cancel")
    unknown = run_cli("cancel", state_dir, "--id", "import/none")
    assert unknown.returncode == 1 and "no workflow 'import/none'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


# With --workers 2 the harness misses the lingering last batch in about one loaded run of three
# (the import is found resolved, the delay unseen): one worker only until that is understood.
@pytest.mark.parametrize("workers", [1])
def test_a_cancel_while_the_last_batch_runs_cancels_at_the_end(
    tmp_path: Path, audit: ModuleType, workers: int
) -> None:
    """The request lands while only the last batch runs (it lingers 6 s, long enough for a
    loaded machine's polling to see it), after the last batch boundary: the import's end is a
    boundary too, so it ends cancelled with every batch done, and `retry` then `run` resolves
    it without running any batch again."""
    state_dir = tmp_path / "state"
    last = BATCHES - 1
    slow_last = [{"name": "batch.mid", "key": str(last), "action": "delay", "seconds": 6}]
    asked, ended = _cancel_once(state_dir, workers, {"DURABLE_FAILPOINTS": json.dumps(slow_last)},
                                lambda: batch_attempts(audit, state_dir, ROOT, last) >= 1
                                and len(resolved_batches(audit, state_dir, ROOT)) == last,
                                "only the last batch runs")

    assert asked.returncode == 0, asked.describe()
    assert "stops at its next batch boundary" in asked.stdout
    assert ended.returncode == CANCELLED, ended.describe()
    assert ended.report["cancelled"] is True
    done = resolved_batches(audit, state_dir, ROOT)
    assert done == set(range(BATCHES))  # the batch in flight ended, and stays done
    assert store_promises(audit, state_dir)[ROOT]["state"] == "rejected"
    _assert_committed_once_each(state_dir, done)
    _resume_and_finish(audit, state_dir, done, workers)
