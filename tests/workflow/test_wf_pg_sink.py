"""The PostgreSQL sink on a real server: a batch exists only once the step's transaction commits,
a rollback or a SIGKILL in the middle leaves nothing of it, duplicates are told apart as the
SQLite sink tells them, processes opening a new database at once all succeed, and the audit's
PostgreSQL path catches a batch committed twice or a record lost."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from wf_helpers import SAFETY_TIMEOUT_S, run_together

from workflow import PermanentError
from workflow.context import StepInfo, _current_step
from workflow.importer import file_source, synthetic_source
from workflow.importer.pg_sink import SCHEMA_VERSION, PgSink, SinkConnectionError, open_read_only
from workflow.importer.sink import Sink, SinkError, SinkStorageError
from workflow.importer.sources import plan_batches, read_batch

ROOT = "import/pg"


@contextmanager
def step(db: psycopg.Connection, promise_id: str) -> Iterator[None]:
    """What a fleet executor does around a step: a transaction on `db`, which the step sees as
    its own, committed when the step returns and rolled back when it raises. Opened by a
    transaction block, or (a connection out of autocommit, as PgStore.step_transaction does)
    begun by the step's first statement."""
    token = _current_step.set(StepInfo(promise_id, 1, "process_batch", {}, transaction=db))
    try:
        if db.autocommit:
            with db.transaction():
                yield
        else:
            try:
                yield
                db.commit()
            except BaseException:
                if not db.broken:  # a lost connection's transaction died with it
                    db.rollback()
                raise
    finally:
        _current_step.reset(token)


def commit(
    sink: PgSink, db: psycopg.Connection, batch: int, descriptor: dict[str, Any], root: str = ROOT,
    halfway: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """A batch step on the fleet: its execution starts, then its batch commits in its transaction."""
    promise_id = f"{root}.{batch}"
    execution = sink.start_execution(promise_id, batch, 1, os.getpid(), "process_batch v1")
    with step(db, promise_id):
        return sink.commit_batch(promise_id, root, batch, read_batch(descriptor), execution, halfway)


def count(url: str, sql: str) -> list[tuple[Any, ...]]:
    """What another session sees now."""
    with psycopg.connect(url, autocommit=True) as db:
        return db.execute(sql).fetchall()


@pytest.fixture
def sink(pg_url: str) -> Iterator[PgSink]:
    s = PgSink(pg_url)
    yield s
    s.close()


@pytest.fixture(params=["block", "implicit"])
def db(pg_url: str, request: pytest.FixtureRequest) -> Iterator[psycopg.Connection]:
    """The fleet executor's connection, whose transactions the steps write in (see `step`)."""
    with psycopg.connect(pg_url, autocommit=request.param == "block") as conn:
        yield conn


def test_a_batch_is_seen_only_once_the_step_transaction_commits(
    pg_url: str, sink: PgSink, db: psycopg.Connection
) -> None:
    [descriptor] = plan_batches(synthetic_source(100), 100)
    seen_halfway = []

    def halfway() -> None:
        seen_halfway.append(count(pg_url, "SELECT COUNT(*) FROM records"))

    execution = sink.start_execution(f"{ROOT}.0", 0, 1, os.getpid(), "process_batch v1")
    with step(db, f"{ROOT}.0"):
        summary = sink.commit_batch(f"{ROOT}.0", ROOT, 0, read_batch(descriptor), execution, halfway)
        assert count(pg_url, "SELECT COUNT(*) FROM records") == [(0,)]
        assert count(pg_url, "SELECT COUNT(*) FROM batch_commits") == [(0,)]
        assert count(pg_url, "SELECT outcome FROM executions") == [(None,)]  # its start is committed
        assert db.execute("SELECT COUNT(*) FROM records").fetchone() == (95,)  # the step sees its own

    assert seen_halfway == [[(0,)]]
    assert summary == {"batch": 0, "records": 100, "processed": 95, "skipped": 5,
                       "reasons": {"invalid_email": 5}}
    assert count(pg_url, "SELECT COUNT(*) FROM records") == [(95,)]
    assert count(pg_url, "SELECT COUNT(*) FROM skipped") == [(5,)]
    assert count(pg_url, "SELECT outcome, finished_at >= started_at FROM executions") == [("committed", True)]
    assert sink.find_commit(f"{ROOT}.0") == summary


def test_an_exception_in_the_step_leaves_nothing_of_its_batch(
    pg_url: str, sink: PgSink, db: psycopg.Connection
) -> None:
    [descriptor] = plan_batches(synthetic_source(100), 100)
    with pytest.raises(RuntimeError, match="after its writes"), step(db, f"{ROOT}.0"):
        execution = sink.start_execution(f"{ROOT}.0", 0, 1, os.getpid(), "process_batch v1")
        sink.commit_batch(f"{ROOT}.0", ROOT, 0, read_batch(descriptor), execution)
        raise RuntimeError("the step failed after its writes")

    for table in ("records", "skipped", "batch_commits"):
        assert count(pg_url, f"SELECT COUNT(*) FROM {table}") == [(0,)], table
    assert count(pg_url, "SELECT outcome FROM executions") == [(None,)]
    assert sink.find_commit(f"{ROOT}.0") is None
    assert commit(sink, db, 0, descriptor)["processed"] == 95  # the retry commits it whole


def test_a_batch_committed_already_is_refused_and_two_racing_executors_commit_it_once(
    pg_url: str, sink: PgSink, db: psycopg.Connection
) -> None:
    """An executor whose claim was taken over may run a step another one committed, or is
    committing: its batch is refused whole, never written twice."""
    [descriptor] = plan_batches(synthetic_source(100), 100)
    with psycopg.connect(pg_url) as other_db:
        racer: dict[str, BaseException] = {}

        def other_executor() -> None:
            try:
                commit(sink_b, other_db, 0, descriptor)
            except BaseException as exc:
                racer["error"] = exc

        sink_b = pickle.loads(pickle.dumps(sink))  # as sent to another process: its own connection
        thread = threading.Thread(target=other_executor)
        with step(db, f"{ROOT}.0"):
            execution = sink.start_execution(f"{ROOT}.0", 0, 1, os.getpid(), "process_batch v1")
            sink.commit_batch(f"{ROOT}.0", ROOT, 0, read_batch(descriptor), execution)
            thread.start()
            deadline = time.monotonic() + SAFETY_TIMEOUT_S
            while count(pg_url, f"SELECT wait_event_type FROM pg_stat_activity "
                                f"WHERE pid = {other_db.info.backend_pid}") != [("Lock",)]:
                assert time.monotonic() < deadline and thread.is_alive(), racer
                time.sleep(0.01)  # it waits for our rows' ids, until we commit
        thread.join(SAFETY_TIMEOUT_S)
        sink_b.close()
        with pytest.raises(SinkError, match="was committed already"):
            commit(sink, db, 0, descriptor)

    assert isinstance(racer["error"], SinkError), racer
    assert "was committed already" in str(racer["error"])
    assert count(pg_url, "SELECT COUNT(*) FROM records") == [(95,)]
    assert count(pg_url, "SELECT COUNT(*) FROM skipped") == [(5,)]
    assert count(pg_url, "SELECT outcome FROM executions ORDER BY id") == [("committed",), (None,), (None,)]


KILLED_HALFWAY = """
import os, sys, time
import psycopg
from workflow.context import StepInfo, _current_step
from workflow.importer import synthetic_source
from workflow.importer.pg_sink import PgSink
from workflow.importer.sources import plan_batches, read_batch

url, root = sys.argv[1], sys.argv[2]
sink = PgSink(url)
db = psycopg.connect(url)
execution = sink.start_execution(root + ".0", 0, 1, os.getpid(), "process_batch v1")

def linger():
    print(db.info.backend_pid, flush=True)
    time.sleep(float(sys.argv[3]))

[descriptor] = plan_batches(synthetic_source(1000), 1000)
with db.transaction():
    _current_step.set(StepInfo(root + ".0", 1, "process_batch", {}, transaction=db))
    sink.commit_batch(root + ".0", root, 0, read_batch(descriptor), execution, halfway=linger)
"""


def test_a_step_process_killed_halfway_leaves_nothing_of_its_batch(
    pg_url: str, sink: PgSink, db: psycopg.Connection
) -> None:
    child = subprocess.Popen([sys.executable, "-c", KILLED_HALFWAY, pg_url, ROOT, str(SAFETY_TIMEOUT_S)],
                             stdout=subprocess.PIPE, text=True)
    try:
        backend = int(child.stdout.readline())
        [(state, wrote)] = count(pg_url, f"SELECT state, backend_xid IS NOT NULL FROM pg_stat_activity "
                                         f"WHERE pid = {backend}")
        assert (state, wrote) == ("idle in transaction", True)  # half the batch is written, uncommitted
        assert count(pg_url, "SELECT COUNT(*) FROM records") == [(0,)]
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        assert child.wait(SAFETY_TIMEOUT_S) == -signal.SIGKILL
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while count(pg_url, f"SELECT 1 FROM pg_stat_activity WHERE pid = {backend}"):
        assert time.monotonic() < deadline, "the server kept the killed step's session"
        time.sleep(0.05)

    for table in ("records", "skipped", "batch_commits"):
        assert count(pg_url, f"SELECT COUNT(*) FROM {table}") == [(0,)], table
    assert count(pg_url, "SELECT pid, outcome FROM executions") == [(child.pid, None)]
    [descriptor] = plan_batches(synthetic_source(1000), 1000)
    assert commit(sink, db, 0, descriptor)["processed"] == 950
    assert count(pg_url, "SELECT outcome FROM executions ORDER BY id") == [(None,), ("committed",)]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def person(record_id: Any, name: str = "Ann", **extra: Any) -> dict[str, Any]:
    return {"id": record_id, "name": name, "email": f"{name.lower() or 'x'}@example.com", **extra}


def test_duplicates_are_classified_as_the_sqlite_sink_classifies_them(
    tmp_path: Path, pg_url: str, sink: PgSink, db: psycopg.Connection
) -> None:
    first = write_jsonl(tmp_path / "first.jsonl", [
        person("b"), person("a"), person("b", "Later"),  # the first "b" wins, though "a" sorts first
        person("a", "Again"), person(7, "Int", city="Oslo"), person("c", ""),
        person("7", "Seven"), person("d"), person("e"),
    ])
    second = write_jsonl(tmp_path / "second.jsonl", [
        person("a"), person("z"), person("z", "Twice"), person("d"), person("y"),
    ])
    sqlite = Sink(tmp_path / "import.db")
    try:
        summaries: dict[str, list[list[dict[str, Any]]]] = {"sqlite": [], "pg": []}
        for root, path in (("imp/a", first), ("imp/b", second)):
            for batch, descriptor in enumerate(plan_batches(file_source(path), 3)):
                promise_id = f"{root}.{batch}"
                execution = sqlite.start_execution(promise_id, batch, 1, os.getpid(), "process_batch v1")
                summaries["sqlite"].append(
                    sqlite.commit_batch(promise_id, root, batch, read_batch(descriptor), execution))
                summaries["pg"].append(commit(sink, db, batch, descriptor, root=root))
        tables = {}
        for name, reader in (("sqlite", sqlite._db), ("pg", open_read_only(pg_url))):
            tables[name] = {table: sorted(tuple(row) for row in reader.execute(f"SELECT * FROM {table}"))
                            for table in ("records", "skipped")}
    finally:
        sqlite.close()

    assert summaries["pg"] == summaries["sqlite"]
    assert tables["pg"] == tables["sqlite"]
    reasons = {(r[0], r[4]): r[5] for r in tables["pg"]["skipped"]}
    assert reasons == {("imp/a", "b"): "duplicate_id", ("imp/a", "a"): "duplicate_id",
                       ("imp/a", "c"): "missing_name", ("imp/a", "7"): "duplicate_id",
                       ("imp/b", "a"): "already_imported", ("imp/b", "z"): "duplicate_id",
                       ("imp/b", "d"): "already_imported"}
    assert ("b", "Ann") in {(r[0], r[4]) for r in tables["pg"]["records"]}


def test_records_postgresql_cannot_store_are_skipped_as_unstorable(
    tmp_path: Path, pg_url: str, sink: PgSink, db: psycopg.Connection
) -> None:
    """SQLite takes them; PostgreSQL's text holds no NUL and its index no id over 2,704 bytes."""
    token = "".join(random.Random(12).choices(string.ascii_letters + string.digits, k=3000))
    path = write_jsonl(tmp_path / "odd.jsonl", [
        person("nul\x00id"), {**person("n1"), "name": "A\x00nn"}, person(token), person(token[:2600]),
        person("fine", city="Z\x00rich"),
    ])
    [descriptor] = plan_batches(file_source(path), 10)

    summary = commit(sink, db, 0, descriptor)

    assert summary["reasons"] == {"unstorable_value": 3}
    assert summary["processed"] == 2
    assert count(pg_url, "SELECT length(id), extra FROM records ORDER BY position") == [
        (2600, None), (4, '{"city":"Z\\u0000rich"}')]
    assert count(pg_url, "SELECT position, record_id FROM skipped ORDER BY position")[:2] == [
        (0, "nul\ufffdid"), (1, "n1")]


def test_commit_batch_outside_a_step_transaction_is_a_permanent_sink_error(
    sink: PgSink, pg_url: str
) -> None:
    [descriptor] = plan_batches(synthetic_source(10), 10)
    execution = sink.start_execution(f"{ROOT}.0", 0, 1, os.getpid(), "process_batch v1")
    with pytest.raises(SinkError, match="only in a fleet executor's step transaction"):
        sink.commit_batch(f"{ROOT}.0", ROOT, 0, read_batch(descriptor), execution)
    token = _current_step.set(StepInfo(f"{ROOT}.0", 1, "process_batch", {}))  # a local executor's step
    try:
        with pytest.raises(SinkError, match="only in a fleet executor's step transaction") as raised:
            sink.commit_batch(f"{ROOT}.0", ROOT, 0, read_batch(descriptor), execution)
        with psycopg.connect(pg_url, autocommit=True) as idle:
            _current_step.set(StepInfo(f"{ROOT}.0", 1, "process_batch", {}, transaction=idle))
            with pytest.raises(SinkError, match=r"transaction is not open .* IDLE, in autocommit"):
                sink.commit_batch(f"{ROOT}.0", ROOT, 0, read_batch(descriptor), execution)
    finally:
        _current_step.reset(token)
    assert isinstance(raised.value, PermanentError)
    assert count(pg_url, "SELECT COUNT(*) FROM records") == [(0,)]


def terminate_others(url: str) -> None:
    """End every other session of the database, as a server restart or a network cut would."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")


def test_a_lost_connection_is_retried_not_permanent_and_the_sink_connects_again(
    pg_url: str, sink: PgSink, db: psycopg.Connection
) -> None:
    sink.start_execution(f"{ROOT}.0", 0, 1, os.getpid(), "process_batch v1")
    terminate_others(pg_url)

    with pytest.raises(SinkConnectionError, match=r"connection lost .* while starting batch 0") as raised:
        sink.start_execution(f"{ROOT}.0", 0, 2, os.getpid(), "process_batch v1")
    assert not isinstance(raised.value, PermanentError)
    [descriptor] = plan_batches(synthetic_source(100), 100)
    with psycopg.connect(pg_url) as fresh:  # the executor's own connection was ended too
        assert commit(sink, fresh, 0, descriptor)["processed"] == 95  # the sink connected again
    assert count(pg_url, "SELECT attempt, outcome FROM executions ORDER BY id") == [
        (1, None), (1, "committed")]


def test_a_step_transaction_lost_halfway_is_retried_and_leaves_nothing(pg_url: str, sink: PgSink) -> None:
    [descriptor] = plan_batches(synthetic_source(100), 100)
    executor = psycopg.connect(pg_url)
    try:
        with pytest.raises(SinkConnectionError, match="while committing batch 0") as raised:
            commit(sink, executor, 0, descriptor, halfway=lambda: terminate_others(pg_url))
    finally:
        executor.close()
    assert not isinstance(raised.value, PermanentError)
    assert count(pg_url, "SELECT COUNT(*) FROM records") == [(0,)]


def test_a_full_disk_on_the_server_is_a_permanent_storage_error_naming_the_database(
    pg_url: str, sink: PgSink, db: psycopg.Connection
) -> None:
    """The server reports a full disk as SQLSTATE 53100 (disk_full); a trigger raises it here."""
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                      "RAISE EXCEPTION 'could not extend file: No space left on device' "
                      "USING ERRCODE = 'disk_full'; END $$")
        admin.execute("CREATE TRIGGER disk_full BEFORE INSERT ON skipped "
                      "FOR EACH ROW EXECUTE FUNCTION refuse()")
    [descriptor] = plan_batches(synthetic_source(100), 100)

    with pytest.raises(SinkStorageError) as raised:
        commit(sink, db, 0, descriptor)

    assert isinstance(raised.value, PermanentError)
    assert str(raised.value).startswith(f"{sink.where}: disk full on the database server (could not extend")
    assert str(raised.value).endswith("while committing batch 0; free space there, then retry")
    assert count(pg_url, "SELECT COUNT(*) FROM records") == [(0,)]


# -- the schema --------------------------------------------------------------------------------


def open_and_start(url: str, number: int, start: Barrier, results: Any) -> None:
    """Open the sink when every process is ready; record one execution; report (or the error)."""
    try:
        start.wait(SAFETY_TIMEOUT_S)
        sink = PgSink(url)
        sink.start_execution(f"{ROOT}.{number}", number, 1, os.getpid(), "process_batch v1")
        sink.close()
        results.put((number, None))
    except BaseException as exc:
        results.put((number, repr(exc)))
        raise


def test_processes_opening_a_new_database_at_once_all_succeed(pg_url: str) -> None:
    openers = 6
    reported, exits = run_together(open_and_start, pg_url, openers)
    assert reported == dict.fromkeys(range(openers))
    assert exits == [0] * openers
    assert count(pg_url, "SELECT version FROM sink_schema") == [(SCHEMA_VERSION,)]
    assert count(pg_url, "SELECT COUNT(*) FROM executions") == [(openers,)]


def test_tables_of_a_newer_version_are_refused(pg_url: str, sink: PgSink) -> None:
    PgSink(pg_url).close()  # opening again changes nothing
    assert count(pg_url, "SELECT version FROM sink_schema") == [(SCHEMA_VERSION,)]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("UPDATE sink_schema SET version = version + 1")
    with pytest.raises(SinkError, match=f"of version {SCHEMA_VERSION + 1}, made by a newer version"):
        PgSink(pg_url)


def test_the_read_side_cannot_write_and_needs_the_tables(pg_url: str) -> None:
    with pytest.raises(SinkError, match="no import tables there"):
        open_read_only(pg_url)
    PgSink(pg_url).close()
    reader = open_read_only(pg_url)
    try:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            reader.execute("DELETE FROM records")
    finally:
        reader.close()


# -- the audit's PostgreSQL path ----------------------------------------------------------------


def import_all(sink: PgSink, db: psycopg.Connection, records: int, batch_size: int) -> None:
    for batch, descriptor in enumerate(plan_batches(synthetic_source(records), batch_size)):
        commit(sink, db, batch, descriptor)


def test_the_audit_passes_a_whole_import_and_one_still_running(
    pg_url: str, sink: PgSink, db: psycopg.Connection, audit: ModuleType
) -> None:
    plan = plan_batches(synthetic_source(500), 100)
    for batch in range(3):
        commit(sink, db, batch, plan[batch])
    sink.start_execution(f"{ROOT}.3", 3, 1, os.getpid(), "process_batch v1")  # an invocation that died

    assert audit.audit_pg(pg_url, ROOT, 500, finished=False)["ok"]
    unfinished = audit.audit_pg(pg_url, ROOT, 500)
    assert "200 of 500 input records are neither imported nor skipped" in unfinished["violations"]
    assert "the batches' records add up to 300, not 500" in unfinished["violations"]

    for batch in (4, 3):  # out of order, as a fleet may commit them
        commit(sink, db, batch, plan[batch])
    verdict = audit.audit_pg(pg_url, ROOT, 500, workers=1)
    assert verdict["ok"], verdict["violations"]
    assert (verdict["batches"], verdict["executions"], verdict["imported"], verdict["skipped"]) \
        == (5, 6, 475, 25)


def run_audit(repo: Path, url: str, records: int) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([sys.executable, str(repo / "scripts" / "audit.py"), "--store", url, "--id", ROOT,
                           "--records", str(records)], capture_output=True, text=True, check=False,
                          timeout=SAFETY_TIMEOUT_S)
    return done.returncode, json.loads(done.stdout)


def test_the_audit_catches_a_batch_committed_twice(
    pg_url: str, sink: PgSink, db: psycopg.Connection, repo: Path
) -> None:
    import_all(sink, db, 300, 100)
    assert run_audit(repo, pg_url, 300)[0] == 0
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("INSERT INTO executions (promise_id, batch, attempt, pid, started_at, finished_at, "
                      "outcome) SELECT promise_id, batch, 2, pid, started_at, finished_at, outcome "
                      "FROM executions WHERE batch = 1")
        admin.execute("INSERT INTO executions (promise_id, batch, attempt, pid, started_at, outcome) "
                      f"VALUES ('{ROOT}.2', 2, 2, 1, 0, 'found_commit')")

    code, verdict = run_audit(repo, pg_url, 300)

    assert code == 1
    assert f"{ROOT}.1 has 2 committed executions" in verdict["violations"]
    assert any("1 executions ended 'found_commit'" in v for v in verdict["violations"])
    assert verdict["reruns_of_completed_batches"] == 1


def test_the_audit_catches_a_missing_record(
    pg_url: str, sink: PgSink, db: psycopg.Connection, repo: Path
) -> None:
    import_all(sink, db, 300, 100)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"DELETE FROM records WHERE import_id = '{ROOT}' AND position = 150")

    code, verdict = run_audit(repo, pg_url, 300)

    assert code == 1
    assert "1 of 300 input records are neither imported nor skipped" in verdict["violations"]
    assert "batch 1 has 94 records rows, its commit says 95" in verdict["violations"]
    assert verdict["lost"] == 1
