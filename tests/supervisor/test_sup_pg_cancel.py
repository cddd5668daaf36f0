"""`cancel` on PostgreSQL: an import run by two participants (`run` and `join`, each with its
executors) stops at a batch boundary, both supervisors exit 4, the database alone shows every
batch done committed once; `retry` and `run` finish it with totals equal to the input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import psycopg
from supervisor_helpers import RUN_TIMEOUT_S, child_env, parse_report, wait_until
from test_sup_cancel import BATCHES, CANCELLED, RECORDS, ROOT, SIZES, _slow_batches
from test_sup_exec import supervisor


def _participant(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[str]:
    out = (tmp_path / f"{name}.out").open("w")
    return subprocess.Popen([sys.executable, "-m", "supervisor", *args, "--state-dir", name, "--json"],
                            stdout=out, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=child_env(_slow_batches(0.05)))


def _resolved_batches(url: str) -> int:
    with psycopg.connect(url) as db:
        if not db.execute("SELECT to_regclass('batch_commits') IS NOT NULL").fetchone()[0]:
            return 0  # not made yet
        return db.execute("SELECT count(*) FROM batch_commits WHERE import_id = %s", (ROOT,)).fetchone()[0]


def test_cancel_stops_every_participant_of_an_import_on_postgresql(
    tmp_path: Path, pg_url: str, audit: ModuleType
) -> None:
    first = _participant(tmp_path, "a", "run", *SIZES, "--store", pg_url, "--workers", "2")
    try:
        wait_until(lambda: _resolved_batches(pg_url) >= 3, "3 batches are done", timeout=30)
        second = _participant(tmp_path, "b", "join", "--store", pg_url, "--id", ROOT)
        try:
            wait_until(lambda: _resolved_batches(pg_url) >= 8, "8 batches are done", timeout=30)
            asked = supervisor(tmp_path, "cancel", "--id", ROOT, "--store", pg_url, "--json")
            assert asked.returncode == 0, asked.describe()
            assert json.loads(asked.stdout)["state"] == "cancelling"
            assert first.wait(RUN_TIMEOUT_S) == CANCELLED, (tmp_path / "a.out").read_text()
            assert second.wait(RUN_TIMEOUT_S) == CANCELLED, (tmp_path / "b.out").read_text()
        finally:
            second.kill()
            second.wait()
    finally:
        first.kill()
        first.wait()
    report = parse_report((tmp_path / "a.out").read_text().splitlines()[-1])
    assert report is not None and report["cancelled"] is True and report["error"] is None

    verdict = audit.audit_pg(pg_url, ROOT, RECORDS, finished=False)
    assert verdict["ok"], verdict["violations"]
    assert 8 <= verdict["batches"] < BATCHES
    status = supervisor(tmp_path, "status", "--id", ROOT, "--store", pg_url, "--json")
    assert json.loads(status.stdout)["state"] == "cancelled"

    assert supervisor(tmp_path, "retry", "--id", ROOT, "--store", pg_url).returncode == 0
    done = supervisor(tmp_path, "run", *SIZES, "--store", pg_url, "--state-dir", "a", "--json")
    assert done.returncode == 0, done.describe()
    assert done.report["total_processed"] + done.report["total_skipped"] == RECORDS
    final = audit.audit_pg(pg_url, ROOT, RECORDS)
    assert final["ok"], final["violations"]
    assert final["imported"] + final["skipped"] == RECORDS


def test_cancel_of_an_import_nobody_runs_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The cancel command takes the workflow's lease itself and settles it."""
    started = _participant(tmp_path, "a", "run", *SIZES, "--store", pg_url)
    try:
        wait_until(lambda: _resolved_batches(pg_url) >= 2, "2 batches are done", timeout=30)
        started.send_signal(2)  # SIGINT: stops between batches, pending
        assert started.wait(RUN_TIMEOUT_S) == 130
    finally:
        started.kill()
        started.wait()
    asked = supervisor(tmp_path, "cancel", "--id", ROOT, "--store", pg_url, "--json")
    assert asked.returncode == 0, asked.describe()
    assert json.loads(asked.stdout)["state"] == "cancelled"
    again = supervisor(tmp_path, "run", *SIZES, "--store", pg_url, "--state-dir", "a", "--json")
    assert again.returncode == CANCELLED, again.describe()
