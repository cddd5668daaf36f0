"""Several real processes writing one sink at once, a writer SIGKILLed inside its transaction,
an old database switched to WAL, and read-only readers of a WAL database."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import orjson
import pytest
from plain_user import as_plain_user
from wf_helpers import SAFETY_TIMEOUT_S, SINK_FILE, SPAWN, run_together

from workflow.importer import synthetic_source
from workflow.importer.sink import Sink, SinkError, open_read_only
from workflow.importer.sources import plan_batches, read_batch

ROOT = "import/w"
WRITERS = 4
BATCHES = 40
BATCH_SIZE = 100


def batch_id(batch: int) -> str:
    return f"{ROOT}.{batch}"


def run_batch(sink: Sink, batch: int, descriptor: dict[str, Any]) -> dict[str, Any]:
    """What a batch step does: record its execution, then commit (or find) the batch."""
    execution = sink.start_execution(batch_id(batch), batch, 1, os.getpid(), "process_batch v1")
    return sink.commit_batch(batch_id(batch), ROOT, batch, read_batch(descriptor), execution)


def writer(path: Path, number: int, start: Barrier, results: Any) -> None:
    """Open the sink when every writer is ready, commit this writer's own batches, then commit
    every batch again in an order of its own; report the summaries (or the error)."""
    try:
        plan = plan_batches(synthetic_source(BATCHES * BATCH_SIZE), BATCH_SIZE)
        start.wait(SAFETY_TIMEOUT_S)
        sink = Sink(path)
        own = list(range(number, BATCHES, WRITERS))
        again = random.Random(number).sample(range(BATCHES), BATCHES)
        summaries = [(b, run_batch(sink, b, plan[b])) for b in own + again]
        sink.close()
        results.put((number, summaries))
    except BaseException as exc:
        results.put((number, repr(exc)))
        raise


def run_writers(path: Path) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    """Start the writers together on `path`; {writer: its summaries}; fails on any error."""
    reported, exits = run_together(writer, path, WRITERS)
    errors = {n: r for n, r in reported.items() if isinstance(r, str)}
    assert not errors, errors
    assert exits == [0] * WRITERS
    return reported


def test_writers_at_once_commit_every_batch_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / SINK_FILE  # a new database: the writers also race to create it

    reported = run_writers(path)

    db = open_read_only(path)
    try:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT promise_id) FROM batch_commits").fetchone() \
            == (BATCHES, BATCHES)
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT id), COUNT(DISTINCT position) FROM records")\
            .fetchone() == (3800, 3800, 3800)  # every 20th synthetic record is skipped
        assert db.execute("SELECT COUNT(*) FROM skipped").fetchone() == (200,)
        outcomes = db.execute("SELECT batch, outcome FROM executions").fetchall()
        stored = {b: s for b, s in db.execute("SELECT batch, summary FROM batch_commits")}
    finally:
        db.close()
    committed = Counter(b for b, outcome in outcomes if outcome == "committed")
    assert committed == Counter(range(BATCHES))  # once each, by whichever writer came first
    runs = WRITERS * (BATCHES // WRITERS + BATCHES)
    assert Counter(o for _, o in outcomes) == {"committed": BATCHES, "found_commit": runs - BATCHES}
    for summaries in reported.values():  # a writer that found a commit got the stored summary
        for batch, summary in summaries:
            assert summary["batch"] == batch and summary["processed"] + summary["skipped"] == 100
            assert orjson.loads(stored[batch]) == summary


def test_old_rollback_journal_database_is_switched_to_wal_by_writers_opening_it_at_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / SINK_FILE
    with sqlite3.connect(path) as db:  # as an older version left it: no WAL, no `code` column
        db.execute("CREATE TABLE executions (id INTEGER PRIMARY KEY AUTOINCREMENT, promise_id TEXT "
                   "NOT NULL, batch INTEGER NOT NULL, attempt INTEGER NOT NULL, pid INTEGER NOT NULL, "
                   "started_at REAL NOT NULL, finished_at REAL, outcome TEXT)")
        db.execute("INSERT INTO executions (promise_id, batch, attempt, pid, started_at) "
                   "VALUES ('import/old.0', 0, 1, 7, 1.0)")
    db.close()
    assert journal_mode(path) == "delete"

    run_writers(path)

    assert journal_mode(path) == "wal"
    db = open_read_only(path)
    try:
        rows = db.execute("SELECT promise_id, code FROM executions ORDER BY id").fetchall()
        assert rows[0] == ("import/old.0", None)
        assert {code for _, code in rows[1:]} == {"process_batch v1"}
        assert db.execute("SELECT COUNT(*) FROM batch_commits").fetchone() == (BATCHES,)
    finally:
        db.close()


def journal_mode(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        db.close()


# -- a writer SIGKILLed inside its transaction ------------------------------------------------


def commit_and_linger(sink: Sink, descriptor: dict[str, Any], halfway: Event) -> None:
    """Commit batch 0, but stop halfway through its rows, the transaction open, until killed."""

    def linger() -> None:
        halfway.set()
        time.sleep(SAFETY_TIMEOUT_S)

    execution = sink.start_execution(batch_id(0), 0, 1, os.getpid(), "process_batch v1")
    sink.commit_batch(batch_id(0), ROOT, 0, read_batch(descriptor), execution, halfway=linger)


def commit_when_free(sink: Sink, descriptor: dict[str, Any], trying: Event) -> None:
    trying.set()
    run_batch(sink, 1, descriptor)


def test_a_writer_killed_inside_its_transaction_leaves_nothing_and_frees_the_lock(tmp_path: Path) -> None:
    path = tmp_path / SINK_FILE
    big, small = plan_batches(synthetic_source(80_100), 80_000)  # half of `big` spills into the WAL
    sink = Sink(path)  # sent to each process, which opens its own connection
    wal = path.with_name(SINK_FILE + "-wal")
    before = wal.stat().st_size
    halfway, trying = SPAWN.Event(), SPAWN.Event()
    killed = SPAWN.Process(target=commit_and_linger, args=(sink, big, halfway))
    waiting = SPAWN.Process(target=commit_when_free, args=(sink, small, trying))
    try:
        killed.start()
        assert halfway.wait(SAFETY_TIMEOUT_S)
        waiting.start()
        assert trying.wait(SAFETY_TIMEOUT_S)
        assert wal.stat().st_size > before + 100_000  # uncommitted pages of batch 0 on disk
        os.kill(killed.pid, signal.SIGKILL)
        killed.join(SAFETY_TIMEOUT_S)
        waiting.join(SAFETY_TIMEOUT_S)  # it waited for the write lock, which the kill freed
    finally:
        for p in (killed, waiting):
            p.kill()
            p.join()
    assert (killed.exitcode, waiting.exitcode) == (-signal.SIGKILL, 0)

    assert sink.find_commit(batch_id(0)) is None
    assert sink.find_commit(batch_id(1))["processed"] == 95
    db = open_read_only(path)
    try:
        assert db.execute("SELECT batch, COUNT(*) FROM records GROUP BY batch").fetchall() == [(1, 95)]
        assert db.execute("SELECT batch, outcome FROM executions ORDER BY id").fetchall() == [
            (0, None), (1, "committed")]  # batch 0's start is kept: the invocation happened
    finally:
        db.close()
    assert run_batch(sink, 0, big)["processed"] == 76_000
    sink.close()


# -- readers -------------------------------------------------------------------------------------


COUNT_RECORDS = """
import sys
import time
from workflow.importer.sink import open_read_only
db = open_read_only(sys.argv[1])
print(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
"""


def count_as_plain_user(path: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-c", COUNT_RECORDS, str(path)], capture_output=True,
                              text=True, timeout=SAFETY_TIMEOUT_S,
                              preexec_fn=as_plain_user if os.geteuid() == 0 else None)
    except subprocess.SubprocessError:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (no CAP_SETPCAP)")


@pytest.mark.parametrize("writer_open", [False, True], ids=["closed", "writer-open"])
def test_a_reader_that_cannot_write_the_directory_reads_the_sink(tmp_path: Path, writer_open: bool) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    path = state_dir / SINK_FILE
    sink = Sink(path)
    run_batch(sink, 0, plan_batches(synthetic_source(100), 100)[0])
    if not writer_open:
        sink.close()  # the last writer checkpoints and deletes the -wal and -shm files
    assert path.with_name(SINK_FILE + "-wal").exists() == writer_open
    state_dir.chmod(0o555)
    try:
        counted = count_as_plain_user(path)
        left = sorted(p.name for p in state_dir.iterdir())
    finally:
        state_dir.chmod(0o755)
        sink.close()
    assert (counted.returncode, counted.stdout) == (0, "95\n"), counted.stderr
    wal = [SINK_FILE + "-shm", SINK_FILE + "-wal"] if writer_open else []
    assert left == sorted([SINK_FILE, *wal, SINK_FILE + ".writers"])


def test_a_reader_sees_what_the_wal_holds_and_never_creates_a_database(tmp_path: Path) -> None:
    path = tmp_path / SINK_FILE
    with pytest.raises(SinkError, match="no import database there"):
        open_read_only(path)
    assert not path.exists()
    sink = Sink(path)
    try:
        run_batch(sink, 0, plan_batches(synthetic_source(100), 100)[0])
        db = open_read_only(path)
        assert db.execute("SELECT COUNT(*) FROM records").fetchone() == (95,)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db.execute("DELETE FROM records")
        db.close()
    finally:
        sink.close()
