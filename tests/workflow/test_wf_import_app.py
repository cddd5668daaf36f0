"""The import application in-process: totals, the sink's exactly-once commits, file inputs."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from wf_helpers import SINK_FILE, batch_id, drop_store_records, open_store, read_store

from store import JsonlStore, State
from workflow import RetryPolicy, Runner, StepError, StepEvent, WorkflowInterrupted
from workflow.importer import Sink, file_source, import_records, plan_batches, synthetic_source
from workflow.importer.sources import SEGMENT_BATCHES, read_batch

ROOT = "import/test"
FAST = RetryPolicy(max_attempts=3, initial=0)


@pytest.fixture
def store(store_path: Path) -> Iterator[JsonlStore]:
    """The JSON-lines store, not the in-memory one: the audit reads the store file."""
    with open_store(store_path) as s:
        yield s


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path / SINK_FILE)
    yield s
    s.close()


def runner(store: JsonlStore, sink: Sink, **options: Any) -> Runner:
    return Runner(store, retry=FAST, dependencies={"sink": sink}, **options)


def query(db_path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as db:
        return db.execute(sql, params).fetchall()


def executions(db_path: Path, promise_id: str) -> list[tuple[int, str | None]]:
    """(attempt, outcome) of every execution of one batch step, in order."""
    return query(db_path, "SELECT attempt, outcome FROM executions WHERE promise_id = ? ORDER BY id",
                 promise_id)


def stop_once_resolved(promise_id: str) -> dict[str, Any]:
    """Runner options that stop the run as soon as `promise_id` has resolved."""
    done: list[bool] = []

    def on_event(event: StepEvent) -> None:
        if event.kind == "resolved" and event.promise_id == promise_id:
            done.append(True)

    return {"on_event": on_event, "should_stop": lambda: bool(done)}


# -- synthetic input --------------------------------------------------------------------------


def test_ten_thousand_synthetic_records_import_with_the_right_totals(
    tmp_path: Path, store: JsonlStore, sink: Sink, audit: ModuleType
) -> None:
    summary = runner(store, sink).run(ROOT, import_records, synthetic_source(10_000), 1000)

    assert summary["total_records"] == 10_000
    assert summary["total_processed"] == 9_500
    assert summary["total_skipped"] == 500
    assert summary["skipped_reasons"] == {"invalid_email": 500}
    assert summary["batch_count"] == 10
    db = tmp_path / SINK_FILE
    assert query(db, "SELECT COUNT(*), COUNT(DISTINCT id) FROM records") == [(9_500, 9_500)]
    skipped = query(db, "SELECT position, reason FROM skipped ORDER BY position")
    assert skipped == [(i, "invalid_email") for i in range(13, 10_000, 20)]
    assert audit.audit(tmp_path, ROOT, 10_000)["ok"]


def test_batches_are_steps_with_descriptors_not_records(store: JsonlStore, sink: Sink) -> None:
    runner(store, sink).run(ROOT, import_records, synthetic_source(250), 100)
    plan, *batches = store.list(ROOT + ".")
    assert [p.id for p in [plan, *batches]] == [f"{ROOT}.0", f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3"]
    assert (plan.param["fn"], plan.param["args"]) == ("plan_segment", [synthetic_source(250), 100, None])
    assert plan.value["next"] is None
    assert plan.value["batches"] == [batch.param["args"][1] for batch in batches]
    assert batches[2].param["args"] == [2, {"source": synthetic_source(250), "start": 200, "stop": 250}]
    assert batches[2].value == {"batch": 2, "records": 50, "processed": 48, "skipped": 2,
                                "reasons": {"invalid_email": 2}}  # 213 and 233


def test_the_plan_is_stored_in_segments_between_their_batches(store: JsonlStore, sink: Sink) -> None:
    source, segment = synthetic_source(SEGMENT_BATCHES * 10 + 5), SEGMENT_BATCHES
    summary = runner(store, sink).run(ROOT, import_records, source, 10)
    calls = store.list(ROOT + ".")
    plans = [p for p in calls if p.param["fn"] == "plan_segment"]
    assert [calls.index(p) for p in plans] == [0, segment + 1]
    assert [p.param["args"][2] for p in plans] == [None, {"start": segment * 10}]
    assert [len(p.value["batches"]) for p in plans] == [segment, 1]
    assert [p.param["args"][0] for p in calls if p.param["fn"] == "process_batch"] == list(range(segment + 1))
    assert summary["batch_count"] == segment + 1 and summary["total_records"] == segment * 10 + 5


def test_replay_of_a_finished_import_executes_no_batch(
    tmp_path: Path, store_path: Path, sink: Sink
) -> None:
    with open_store(store_path) as store:
        first = runner(store, sink).run(ROOT, import_records, synthetic_source(500), 100)
    with open_store(store_path) as store:
        again = runner(store, sink).run(ROOT, import_records, synthetic_source(500), 100)
    assert again == first
    assert query(tmp_path / SINK_FILE, "SELECT COUNT(*) FROM executions") == [(5,)]


def test_interrupted_import_resumes_at_the_first_unfinished_batch(
    tmp_path: Path, store_path: Path, sink: Sink, audit: ModuleType
) -> None:
    source = synthetic_source(1000)
    with open_store(store_path) as store, pytest.raises(WorkflowInterrupted):
        runner(store, sink, **stop_once_resolved(batch_id(ROOT, 3))).run(ROOT, import_records, source, 100)
    with open_store(store_path) as store:
        summary = runner(store, sink).run(ROOT, import_records, source, 100)
    assert summary["total_processed"] == 950
    batches = [b for (b,) in query(tmp_path / SINK_FILE, "SELECT batch FROM executions ORDER BY id")]
    assert batches == list(range(10))
    assert audit.audit(tmp_path, ROOT, 1000)["ok"]


def test_audit_notices_a_lost_record(tmp_path: Path, store: JsonlStore, sink: Sink,
                                     audit: ModuleType) -> None:
    runner(store, sink).run(ROOT, import_records, synthetic_source(100), 10)
    with sqlite3.connect(tmp_path / SINK_FILE) as db:
        db.execute("DELETE FROM records WHERE position = 42")
    verdict = audit.audit(tmp_path, ROOT, 100)
    assert not verdict["ok"]
    assert any("neither imported nor skipped" in v for v in verdict["violations"])


# -- the sink ---------------------------------------------------------------------------------


def test_rerun_of_a_committed_batch_whose_resolve_was_lost_finds_its_commit(
    tmp_path: Path, store_path: Path, sink: Sink, audit: ModuleType
) -> None:
    source = synthetic_source(1000)
    with open_store(store_path) as store, pytest.raises(WorkflowInterrupted):
        runner(store, sink, **stop_once_resolved(batch_id(ROOT, 3))).run(ROOT, import_records, source, 100)
    with read_store(store_path) as view:
        stored_counts = view.get(batch_id(ROOT, 3)).value
    assert drop_store_records(store_path, "resolve", batch_id(ROOT, 3)) == 1  # as if killed before it

    with open_store(store_path) as store:
        assert store.get(batch_id(ROOT, 3)).state is State.PENDING
        summary = runner(store, sink).run(ROOT, import_records, source, 100)
        assert store.get(batch_id(ROOT, 3)).value == stored_counts

    db = tmp_path / SINK_FILE
    # Found by the recover function, as attempt 1's effect: no second attempt was spent.
    assert executions(db, batch_id(ROOT, 3)) == [(1, "committed"), (1, "found_commit")]
    assert query(db, "SELECT COUNT(*), COUNT(DISTINCT id) FROM records") == [(950, 950)]
    assert query(db, "SELECT COUNT(*) FROM batch_commits") == [(10,)]
    assert summary["total_processed"] == 950
    assert audit.audit(tmp_path, ROOT, 1000)["ok"]


def test_batch_cut_short_before_its_commit_leaves_nothing_behind(tmp_path: Path, sink: Sink) -> None:
    batch = plan_batches(synthetic_source(100), 100)[0]

    class Killed(BaseException):
        pass

    def die() -> None:
        raise Killed

    execution = sink.start_execution(f"{ROOT}.0", 0, 1, 1, "process_batch v1")
    with pytest.raises(Killed):
        sink.commit_batch(f"{ROOT}.0", ROOT, 0, read_batch(batch), execution, halfway=die)
    db = tmp_path / SINK_FILE
    assert query(db, "SELECT COUNT(*) FROM records") == [(0,)]
    assert sink.find_commit(f"{ROOT}.0") is None
    assert executions(db, f"{ROOT}.0") == [(1, None)]

    execution = sink.start_execution(f"{ROOT}.0", 0, 2, 1, "process_batch v1")
    summary = sink.commit_batch(f"{ROOT}.0", ROOT, 0, read_batch(batch), execution)
    assert sink.find_commit(f"{ROOT}.0") == summary
    assert summary["processed"] == 95
    assert query(db, "SELECT COUNT(*), COUNT(DISTINCT id) FROM records") == [(95, 95)]
    assert executions(db, f"{ROOT}.0") == [(1, None), (2, "committed")]


# -- file input -------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[str], header: str = "id,name,email,city") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_import_keeps_extra_columns_and_skips_bad_rows_by_reason(
    tmp_path: Path, store: JsonlStore, sink: Sink, audit: ModuleType
) -> None:
    path = write_csv(tmp_path / "people.csv", [
        '1,"Ann\nLee",ann@example.com,Oslo',
        "",
        "2,Bo,bo@example.com,Rome",
        "3,Cy,cy-at-example.com,Bern",
        "1,Ann twice,ann2@example.com,Oslo",
        "4,Di,di@example.com",
        ",Ed,ed@example.com,Nice",
        "5,,fay@example.com,Graz",
        "6,Gus,gus@example.com,Linz",
    ])
    summary = runner(store, sink).run(ROOT, import_records, file_source(path), 3)

    assert summary["total_records"] == 8
    assert summary["total_processed"] == 3
    assert summary["skipped_reasons"] == {"duplicate_id": 1, "invalid_email": 1, "missing_id": 1,
                                          "missing_name": 1, "wrong_field_count": 1}
    db = tmp_path / SINK_FILE
    assert query(db, "SELECT id, name, extra FROM records ORDER BY position") == [
        ("1", "Ann\nLee", '{"city":"Oslo"}'),
        ("2", "Bo", '{"city":"Rome"}'),
        ("6", "Gus", '{"city":"Linz"}'),
    ]
    assert query(db, "SELECT record_id, line FROM skipped WHERE reason = 'duplicate_id'") == [("1", 7)]
    assert audit.audit(tmp_path, ROOT, 8)["ok"]


def test_jsonl_import_counts_every_reason(tmp_path: Path, store: JsonlStore, sink: Sink) -> None:
    path = tmp_path / "people.jsonl"
    path.write_text("\n".join([
        '{"id": 1, "name": "Ann", "email": "ann@example.com", "tags": ["a"]}',
        "",
        '{"id": 1, "name": "Ann", "email": "ann@example.com"}',
        "{not json",
        "[1]",
        '{"id": 2, "name": "Bo", "email": "bo@example.com", "bio": "' + "x" * 70_000 + '"}',
        '{"id": 3, "name": "Cy", "email": "cy@example.com"}',
    ]) + "\n")
    summary = runner(store, sink).run(ROOT, import_records, file_source(path), 2)
    assert summary["total_records"] == 6
    assert summary["total_processed"] == 2
    assert summary["skipped_reasons"] == {"duplicate_id": 1, "field_too_large": 1,
                                          "malformed_json": 1, "not_an_object": 1}
    assert query(tmp_path / SINK_FILE, "SELECT id, extra FROM records ORDER BY position") == [
        ("1", '{"tags":["a"]}'), ("3", None)
    ]


def test_file_level_error_rejects_the_import_before_the_batches_of_its_segment(
    tmp_path: Path, store: JsonlStore, sink: Sink
) -> None:
    rows = [f"{i},n{i},u{i}@example.com,X" for i in range(20)] + ['21,"a"b,c@d.io,X']
    path = write_csv(tmp_path / "broken.csv", rows)
    with pytest.raises(StepError) as raised:
        runner(store, sink).run(ROOT, import_records, file_source(path), 2)
    assert f"ContentError: {path}:22: malformed CSV" in raised.value.error["message"]
    [plan] = store.list(ROOT + ".")
    assert plan.param["fn"] == "plan_segment" and plan.error["type"] == "ContentError"
    assert plan.attempts == 1  # no retry can fix the file
    assert query(tmp_path / SINK_FILE, "SELECT COUNT(*) FROM batch_commits") == [(0,)]
    assert query(tmp_path / SINK_FILE, "SELECT COUNT(*) FROM records") == [(0,)]


def test_ids_taken_by_another_import_and_ids_of_no_usable_type_are_skipped_with_their_reason(
    tmp_path: Path,
) -> None:
    first = tmp_path / "first.jsonl"
    first.write_text('{"id": 1, "name": "A", "email": "a@x.io"}\n')
    second = tmp_path / "second.jsonl"
    second.write_text(
        '{"id": "1", "name": "B", "email": "b@x.io"}\n'  # ids are text: "1" is the id 1
        '{"id": true, "name": "C", "email": "c@x.io"}\n'
        '{"id": 2.5, "name": "D", "email": "d@x.io"}\n'
        '{"id": 3, "name": "E", "email": "e@x.io"}\n'
    )
    sink = Sink(tmp_path / "import.db")
    with JsonlStore(tmp_path / "store.jsonl", exclusive=True) as store:
        runner = Runner(store, dependencies={"sink": sink})
        runner.run("imp/first", import_records, file_source(first), 10)
        result = runner.run("imp/second", import_records, file_source(second), 10)
    sink.close()
    assert result["skipped_reasons"] == {"already_imported": 1, "invalid_id": 2}
    assert result["total_processed"] == 1


def test_a_whole_batch_of_ids_taken_by_another_import_is_counted_not_a_query_error(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "import.db")
    with JsonlStore(tmp_path / "store.jsonl", exclusive=True) as store:
        runner = Runner(store, dependencies={"sink": sink})
        runner.run("imp/a", import_records, synthetic_source(1200), 1200)
        again = runner.run("imp/b", import_records, synthetic_source(1200), 1200)
    sink.close()
    assert again["skipped_reasons"] == {"already_imported": 1140, "invalid_email": 60}


def test_executions_name_the_code_that_ran_each_batch(tmp_path: Path, store: JsonlStore, sink: Sink) -> None:
    runner(store, sink).run(ROOT, import_records, synthetic_source(300), 100)
    assert query(tmp_path / SINK_FILE, "SELECT DISTINCT code FROM executions") == [("process_batch v1",)]


def test_a_database_from_before_the_code_column_is_brought_up_to_date(tmp_path: Path) -> None:
    db_path = tmp_path / "old.db"
    with sqlite3.connect(db_path) as db:  # the executions table as an older version made it
        db.execute("CREATE TABLE executions (id INTEGER PRIMARY KEY AUTOINCREMENT, promise_id TEXT "
                   "NOT NULL, batch INTEGER NOT NULL, attempt INTEGER NOT NULL, pid INTEGER NOT NULL, "
                   "started_at REAL NOT NULL, finished_at REAL, outcome TEXT)")
        db.execute("INSERT INTO executions (promise_id, batch, attempt, pid, started_at) "
                   "VALUES ('import/old.0', 0, 1, 7, 1.0)")
    sink = Sink(db_path)
    sink.start_execution("import/old.1", 1, 1, 8, "process_batch v2")
    sink.close()
    assert query(db_path, "SELECT promise_id, code FROM executions ORDER BY id") == [
        ("import/old.0", None), ("import/old.1", "process_batch v2")]
