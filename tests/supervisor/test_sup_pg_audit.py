"""scripts/audit.py --store checks the store's promises against the sink, in the same database:
a batch's promise is resolved exactly when it has a commit row (they commit in one
transaction), with the commit's summary; no batch runs after its resolve; the root's result is
the sink's totals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
from supervisor_helpers import assert_finished, root_id, run_import

RECORDS, BATCH_SIZE = 300, 100
ROOT = root_id(RECORDS, BATCH_SIZE)


@pytest.fixture
def imported(pg_url: str, tmp_path: Path, audit: ModuleType) -> str:
    """An import done on one machine, which the audit passes; the database's URL."""
    run = run_import(tmp_path / "state", "--store", pg_url, "--records", str(RECORDS),
                     "--batch-size", str(BATCH_SIZE))
    assert_finished(run, RECORDS, BATCH_SIZE)
    verdict = audit.audit_pg(pg_url, ROOT, RECORDS)
    assert verdict["ok"] and verdict["promises_checked"], verdict
    return pg_url


def _tamper(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(sql)


def _set_in_value(url: str, promise_id: str, key: str, value: int) -> None:
    _tamper(url, f"UPDATE settles SET value = jsonb_set(value, '{{{key}}}', '{value}') "
                 f"WHERE id = '{promise_id}'")


def test_a_committed_batch_whose_promise_is_pending_is_a_violation(imported: str, audit: ModuleType) -> None:
    _tamper(imported, f"DELETE FROM settles WHERE id = '{ROOT}.2'")  # batch 1 (step 0 plans)
    verdict = audit.audit_pg(imported, ROOT, RECORDS)
    assert f"{ROOT}.2 has a commit row but its promise is not resolved" in verdict["violations"]
    assert "batches not resolved: [1]" in verdict["violations"]


def test_a_resolve_without_its_commit_row_is_a_violation(imported: str, audit: ModuleType) -> None:
    _tamper(imported, f"DELETE FROM batch_commits WHERE promise_id = '{ROOT}.3'")
    verdict = audit.audit_pg(imported, ROOT, RECORDS, finished=False)
    assert f"{ROOT}.3 is resolved but has no commit row" in verdict["violations"]


def test_a_batch_resolved_with_another_summary_is_a_violation(imported: str, audit: ModuleType) -> None:
    _set_in_value(imported, f"{ROOT}.1", "processed", 0)
    verdict = audit.audit_pg(imported, ROOT, RECORDS)
    assert any(v.startswith(f"{ROOT}.1 is resolved with ") for v in verdict["violations"]), verdict


def test_a_batch_run_after_its_resolve_is_a_rerun(imported: str, audit: ModuleType) -> None:
    _tamper(imported, "INSERT INTO executions (promise_id, batch, attempt, pid, started_at) "
                      f"SELECT id, 0, 2, 1, settled_at + 1 FROM settles WHERE id = '{ROOT}.1'")
    verdict = audit.audit_pg(imported, ROOT, RECORDS)
    assert "batch 0 ran again (pid 1) after it was resolved" in verdict["violations"]
    assert verdict["reruns_of_completed_batches"] == 1


def test_a_root_result_other_than_the_sinks_totals_is_a_violation(imported: str, audit: ModuleType) -> None:
    _set_in_value(imported, ROOT, "total_processed", 7)
    verdict = audit.audit_pg(imported, ROOT, RECORDS)
    assert "summary total_processed is 7, the sink says 285" in verdict["violations"]


def test_a_fork_and_its_original_audit_clean_along_the_lineage(imported: str, tmp_path: Path,
                                                              audit: ModuleType) -> None:
    """The fork's batch 0 keeps the original's rows, commit row and execution (under the
    original's ids); the fork takes over the rows of batches 1 onward: each import counts every
    record once."""
    fork = f"{ROOT}~fork-1"
    made = subprocess.run([sys.executable, "-m", "supervisor", "fork", "--id", ROOT, "--from-batch", "1",
                           "--store", imported], capture_output=True, text=True, check=False, timeout=60)
    assert made.returncode == 0, made.stderr
    ran = run_import(tmp_path / "state", "--store", imported, "--id", fork, "--records", str(RECORDS),
                     "--batch-size", str(BATCH_SIZE))
    assert ran.returncode == 0, ran.describe()

    for root in (fork, ROOT):
        verdict = audit.audit_pg(imported, root, RECORDS)
        assert verdict["ok"], (root, verdict["violations"])
        assert verdict["lost"] == 0 and verdict["imported"] + verdict["skipped"] == RECORDS
