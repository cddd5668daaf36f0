"""Hostile input files through the real import path (file sources, the SQLite sink, the worker):
values the sink cannot write back, huge CSV headers, whole-number ids beyond 64 bits."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wf_helpers import SINK_FILE, run_worker_plain

from store import JsonlStore
from workflow import RetryPolicy, Runner, exitcodes
from workflow.importer import Sink, file_source, import_records
from workflow.importer.header import MAX_CSV_COLUMNS

ROOT = "import/bad-inputs"
FAST = RetryPolicy(max_attempts=3, initial=0)
REFUSED_WITHIN_S = 5.0  # the old quadratic header check took minutes for 100,000 columns


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path / SINK_FILE)
    yield s
    s.close()


def import_file(store: JsonlStore, sink: Sink, path: Path, batch_size: int = 10) -> dict[str, Any]:
    return Runner(store, retry=FAST, dependencies={"sink": sink}).run(
        ROOT, import_records, file_source(path), batch_size)


def query(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as db:
        return db.execute(sql).fetchall()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


# -- values the sink cannot write back (orjson: 254 levels, 64-bit integers) -------------------


def test_a_value_the_sink_cannot_write_back_is_skipped_as_unstorable_without_retries(
    tmp_path: Path, store: JsonlStore, sink: Sink
) -> None:
    path = write_lines(tmp_path / "people.jsonl", [
        '{"id": 1, "name": "Ann", "email": "ann@example.com", "deep": ' + nested(300) + "}",
        '{"id": 18446744073709551616, "name": "Bo", "email": "bo@example.com", '
        '"big": 18446744073709551617}',
        '{"id": 3, "name": "Cy", "email": "cy@example.com", "tags": {"a": ' + nested(200) + "}}",
        '{"id": 4, "name": "Di", "email": "di@example.com"}',
        # deeper than the stdlib parser goes, which reads the exact id
        '{"id": 18446744073709551618, "name": "Ed", "email": "ed@example.com", "deep": '
        + nested(1010) + "}",
    ])

    path.write_text(path.read_text() + "\n".join([
        # a big whole number in an extra field, with an ordinary id: never rounded to a float
        '{"id": 6, "name": "Fa", "email": "fa@example.com", "big": 18446744073709551617}',
        # an id nested deeper than str() of it could go
        '{"id": ' + nested(990) + ', "name": "Gu", "email": "gu@example.com"}',
        # more digits than Python converts to an int
        '{"id": ' + "7" * 5000 + ', "name": "Ha", "email": "ha@example.com"}',
    ]) + "\n")

    summary = import_file(store, sink, path)

    assert summary["skipped_reasons"] == {"invalid_id": 1, "unstorable_value": 5}
    db = tmp_path / SINK_FILE
    assert query(db, "SELECT record_id, line, reason FROM skipped ORDER BY line") == [
        ("1", 1, "unstorable_value"), ("18446744073709551616", 2, "unstorable_value"),
        (None, 5, "unstorable_value"), ("6", 6, "unstorable_value"),
        ("[[[[[[[...]]]]]]]", 7, "invalid_id"), (None, 8, "unstorable_value")]
    assert [row[0] for row in query(db, "SELECT id FROM records ORDER BY position")] == ["3", "4"]
    assert query(db, "SELECT attempt, outcome FROM executions") == [(1, "committed")]


# -- whole-number ids beyond 64 bits stay exact ----------------------------------------------


def test_whole_number_ids_beyond_64_bits_are_stored_exactly_and_float_ids_stay_invalid(
    tmp_path: Path, store: JsonlStore, sink: Sink
) -> None:
    ids = ["18446744073709551616", "-9223372036854775809", "123456789012345678901234567890",
           "18446744073709551615", "1" * 300, "1" * 400, "1.5", "1e20", "2.0"]
    path = write_lines(tmp_path / "people.jsonl", [
        f'{{"id": {record_id}, "name": "N{i}", "email": "n{i}@example.com"}}'
        for i, record_id in enumerate(ids)
    ])

    summary = import_file(store, sink, path)

    assert summary["skipped_reasons"] == {"invalid_id": 3}
    assert query(tmp_path / SINK_FILE, "SELECT id FROM records ORDER BY position") == [
        (record_id,) for record_id in ids[:6]]


# -- CSV headers: a column cap, and a linear duplicate check -----------------------------------


def csv_with_header(path: Path, columns: list[str]) -> Path:
    return write_lines(path, [",".join(columns), ",".join(["1", "Ann", "ann@example.com"]
                                                          + ["x"] * (len(columns) - 3))])


def test_a_csv_header_with_100000_columns_is_refused_quickly_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text("\n\nid,name,email," + ",".join(f"c{i}" for i in range(99_997)) + "\n1,A,a@x.io\n")
    began = time.monotonic()

    done = run_worker_plain(tmp_path, ROOT, file_source(path), 10, timeout=4 * REFUSED_WITHIN_S)

    assert time.monotonic() - began < REFUSED_WITHIN_S
    assert done.returncode == exitcodes.FATAL, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {path}:3: header has 100000 columns, more than the {MAX_CSV_COLUMNS} allowed")


def test_a_csv_header_at_the_column_cap_imports_and_its_repeats_are_named_briefly(
    tmp_path: Path, store: JsonlStore, sink: Sink
) -> None:
    widest = ["id", "name", "email", *[f"c{i}" for i in range(MAX_CSV_COLUMNS - 3)]]
    summary = import_file(store, sink, csv_with_header(tmp_path / "widest.csv", widest))
    assert summary["total_processed"] == 1

    repeated = ["id", "name", "email", *[f"c{i // 2}" for i in range(MAX_CSV_COLUMNS - 3)]]
    done = run_worker_plain(tmp_path, "import/repeats", file_source(
        csv_with_header(tmp_path / "repeats.csv", repeated)), 10, timeout=4 * REFUSED_WITHIN_S)
    assert done.returncode == exitcodes.FATAL, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'repeats.csv'}:1: header repeats the column(s) c0, c1, c2, c3, c4 "
        f"and {(MAX_CSV_COLUMNS - 3) // 2 - 5} more")
