"""A full disk under the sink: refused at once, naming the database, with nothing half-written.

The worker runs as a real process under RLIMIT_FSIZE (a write past the limit fails with EFBIG,
which SQLite reports as SQLITE_IOERR_WRITE); a real ENOSPC shows up as SQLITE_FULL, which
`PRAGMA max_page_count` produces on a real database file.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from types import ModuleType

import orjson
import pytest
from wf_helpers import SINK_FILE, STORE_FILE, batch_id, read_store, run_worker_plain, supervisor_retry

from store import State
from workflow import exitcodes
from workflow.importer import synthetic_source
from workflow.importer.sink import Sink, SinkStorageError
from workflow.importer.sources import plan_batches, read_batch

ROOT = "import/x"
RECORDS = 2000
BATCH_SIZE = 100
SINK_LIMIT = 300_000  # the sink's WAL reaches this after a few batches of 100 records
QUICKLY_S = 15.0  # the old code backed off for minutes (1 s, 2 s, ... 30 s, ten attempts)


def rejected_batches(state_dir: Path) -> list[tuple[str, int, dict]]:
    with read_store(state_dir / STORE_FILE) as store:
        return [(p.id, p.attempts, p.error) for p in store.list(ROOT + ".")
                if p.state is State.REJECTED]


def assert_no_partial_batch(db_path: Path) -> int:
    """Every committed batch has all its rows, and no row belongs to an uncommitted batch;
    returns the number of committed batches."""
    with sqlite3.connect(db_path) as db:
        commits = {batch: orjson.loads(summary) for batch, summary in db.execute(
            "SELECT batch, summary FROM batch_commits WHERE import_id = ?", (ROOT,))}
        for table, key in (("records", "processed"), ("skipped", "skipped")):
            rows = dict(db.execute(
                f"SELECT batch, COUNT(*) FROM {table} WHERE import_id = ? GROUP BY batch", (ROOT,)))
            assert set(rows) <= set(commits), f"{table} of uncommitted batches: {set(rows) - set(commits)}"
            assert {b: rows.get(b, 0) for b in commits} == {b: s[key] for b, s in commits.items()}
    return len(commits)


def test_disk_full_in_the_sink_fails_the_batch_at_once_naming_the_database_then_retry_finishes(
    tmp_path: Path, audit: ModuleType
) -> None:
    source = synthetic_source(RECORDS)
    began = time.monotonic()

    full = run_worker_plain(tmp_path, ROOT, source, BATCH_SIZE, "--retry-initial", "1",
                            file_size_limit=SINK_LIMIT, timeout=2 * QUICKLY_S)

    assert time.monotonic() - began < QUICKLY_S
    assert full.returncode == exitcodes.FAILED, full.stderr
    last_line = full.stderr.strip().splitlines()[-1]
    assert f"{tmp_path / SINK_FILE}: disk full" in last_line, last_line
    [(failed, attempts, error)] = rejected_batches(tmp_path)
    assert attempts == 1 and error["type"] == "SinkStorageError", error
    committed = assert_no_partial_batch(tmp_path / SINK_FILE)
    assert failed == batch_id(ROOT, committed) and committed >= 1, "the limit should hit after a few batches"

    assert supervisor_retry(tmp_path, ROOT).returncode == 0
    finished = run_worker_plain(tmp_path, ROOT, source, BATCH_SIZE)

    assert finished.returncode == exitcodes.OK, finished.stderr
    verdict = audit.audit(tmp_path, ROOT, RECORDS)
    assert verdict["ok"], verdict["violations"]
    assert (verdict["imported"], verdict["skipped"]) == (1900, 100)


def test_sqlite_full_rolls_the_batch_back_and_names_the_database(tmp_path: Path) -> None:
    sink = Sink(tmp_path / SINK_FILE)
    try:
        [first, second] = plan_batches(synthetic_source(2 * BATCH_SIZE), BATCH_SIZE)
        started = sink.start_execution(f"{ROOT}.0", 0, 1, 1, "process_batch v1")
        sink.commit_batch(f"{ROOT}.0", ROOT, 0, read_batch(first), started)
        execution = sink.start_execution(f"{ROOT}.1", 1, 1, 1, "process_batch v1")
        pages = sink._db.execute("PRAGMA page_count").fetchone()[0]
        sink._db.execute(f"PRAGMA max_page_count = {pages}")  # the database may not grow: SQLITE_FULL

        with pytest.raises(SinkStorageError) as raised:
            sink.commit_batch(f"{ROOT}.1", ROOT, 1, read_batch(second), execution)

        message = str(raised.value)
        assert message == (f"{tmp_path / SINK_FILE}: disk full (database or disk is full) "
                           "while committing batch 1; free space, then retry")
        assert not sink._db.in_transaction
    finally:
        sink.close()
    assert assert_no_partial_batch(tmp_path / SINK_FILE) == 1
