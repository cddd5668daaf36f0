"""Input sources: CSV and JSON-lines files, streamed in batches; row- and file-level problems."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from workflow.importer import SourceError, file_source, plan_batches, synthetic_source
from workflow.importer.records import MAX_FIELD_CHARS
from workflow.importer.sources import Row, read_batch

GOOD = "id,name,email\n"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def read_rows(path: Path, batch_size: int = 1000) -> list[Row]:
    """Every row of the file, planned in batches of `batch_size` and read batch by batch."""
    return [row for batch in plan_batches(file_source(path), batch_size) for row in read_batch(batch)]


def problems(rows: list[Row]) -> list[str | None]:
    return [row.problem for row in rows]


# -- CSV --------------------------------------------------------------------------------------

CSV_MIXED = (
    "id,name,email,city\n"
    '1,"Ann\nLee",ann@example.com,"Oslo, Norway"\n'  # a quoted field over two lines, a comma
    "\n"
    '2,"Bo ""B"" Ek",bo@example.com,Rome\n'  # doubled quotes
    "\n\n"
    "3,Cy,cy@example.com\n"  # a cell short
    "4,Di,di@example.com,Nice,extra\n"  # a cell too many
    "5,Ed,not-an-email,Bern\n"
    ",Fay,fay@example.com,Graz\n"
    "7,,gus@example.com,Linz\n"
    "1,Ann again,ann2@example.com,Oslo\n"
)


def test_csv_reads_quoted_multiline_fields_and_ignores_blank_lines(tmp_path: Path) -> None:
    rows = read_rows(write(tmp_path / "in.csv", CSV_MIXED))
    assert [row.position for row in rows] == list(range(8))
    assert rows[0].record == {"id": "1", "name": "Ann\nLee", "email": "ann@example.com",
                              "city": "Oslo, Norway"}
    assert rows[0].line == 2
    assert rows[1].record["name"] == 'Bo "B" Ek'
    assert rows[1].line == 5
    assert rows[2].line == 8


def test_csv_row_level_problems_have_reasons(tmp_path: Path) -> None:
    rows = read_rows(write(tmp_path / "in.csv", CSV_MIXED))
    # duplicate ids are found by the sink (see test_wf_import_app), not by the reader
    assert problems(rows) == [None, None, "wrong_field_count", "wrong_field_count",
                              "invalid_email", "missing_id", "missing_name", None]


def test_csv_field_over_the_limit_is_field_too_large(tmp_path: Path) -> None:
    huge = "x" * (MAX_FIELD_CHARS + 1)
    rows = read_rows(write(tmp_path / "in.csv", f"{GOOD}1,{huge},a@b.io\n2,ok,b@c.io\n"))
    assert problems(rows) == ["field_too_large", None]


def test_csv_header_may_start_with_a_bom_and_have_crlf_lines(tmp_path: Path) -> None:
    content = "\ufeffid,name,email\r\n1,\"two\r\nlines\",a@b.io\r\n2,b,b@c.io"
    rows = read_rows(write(tmp_path / "in.csv", content))
    assert [r.record for r in rows] == [
        {"id": "1", "name": "two\r\nlines", "email": "a@b.io"},
        {"id": "2", "name": "b", "email": "b@c.io"},
    ]


def test_csv_file_with_only_a_header_has_no_batches(tmp_path: Path) -> None:
    assert plan_batches(file_source(write(tmp_path / "in.csv", GOOD)), 10) == ()


def test_csv_blank_line_before_the_header_is_ignored_or_a_source_error(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", "\n" + GOOD + "1,a,a@b.io\n")
    try:
        rows = read_rows(path)
    except SourceError:
        return  # naming the file and the line would do as well
    assert [r.record for r in rows] == [{"id": "1", "name": "a", "email": "a@b.io"}]


# -- JSON lines -------------------------------------------------------------------------------

JSONL_MIXED = "\n".join([
    '{"id": 1, "name": "Ann", "email": "ann@example.com", "city": "Oslo"}',
    "",
    "   ",
    '{"id": 2, "name": "Bo", "email": "bo@example.com"',
    "[1, 2, 3]",
    '"just a string"',
    '{"name": "Cy", "email": "cy@example.com"}',
    '{"id": "", "name": "Cy", "email": "cy@example.com"}',
    '{"id": 5, "name": 42, "email": "ed@example.com"}',
    '{"id": 6, "name": "Fay", "email": "fay at example.com"}',
    '{"id": 7, "name": "Gus", "email": "gus@example.com"}',
]) + "\n"


def test_jsonl_row_level_problems_have_reasons_and_blank_lines_are_ignored(tmp_path: Path) -> None:
    rows = read_rows(write(tmp_path / "in.jsonl", JSONL_MIXED))
    assert problems(rows) == [None, "malformed_json", "not_an_object", "not_an_object",
                              "missing_id", "missing_id", "missing_name", "invalid_email", None]
    assert [row.line for row in rows] == [1, 4, 5, 6, 7, 8, 9, 10, 11]
    assert rows[0].record["city"] == "Oslo"


def test_jsonl_field_over_the_limit_is_field_too_large(tmp_path: Path) -> None:
    huge = "x" * (MAX_FIELD_CHARS + 1)
    content = orjson.dumps({"id": 1, "name": "a", "email": "a@b.io", "note": huge}) + b"\n"
    assert problems(read_rows(write(tmp_path / "in.jsonl", content))) == ["field_too_large"]


def test_jsonl_first_line_may_start_with_a_bom(tmp_path: Path) -> None:
    content = b'\xef\xbb\xbf{"id": 1, "name": "a", "email": "a@b.io"}\n'
    assert problems(read_rows(write(tmp_path / "in.jsonl", content))) == [None]


# -- batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content", [("in.csv", CSV_MIXED), ("in.jsonl", JSONL_MIXED)])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 100])
def test_batches_read_the_same_rows_whatever_their_size(
    tmp_path: Path, name: str, content: str, batch_size: int
) -> None:
    path = write(tmp_path / name, content)
    assert read_rows(path, batch_size) == read_rows(path, 1000)


def test_batch_descriptors_are_ranges_not_records(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", CSV_MIXED)
    plan = plan_batches(file_source(path), 3)
    assert [b["records"] for b in plan] == [3, 3, 2]
    for batch in plan:
        assert set(batch) == {"source", "offset", "end", "line", "position", "records"}
    synthetic = plan_batches(synthetic_source(25), 10)
    assert [(b["start"], b["stop"]) for b in synthetic] == [(0, 10), (10, 20), (20, 25)]


def test_synthetic_source_has_exactly_one_invalid_email_in_twenty() -> None:
    rows = [row for batch in plan_batches(synthetic_source(100), 30) for row in read_batch(batch)]
    assert [row.position for row in rows if row.problem == "invalid_email"] == [13, 33, 53, 73, 93]
    assert sum(row.problem is None for row in rows) == 95


@pytest.mark.parametrize("size", [0, -1, 10_000_001, 10**21])
def test_batch_size_out_of_range_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="a whole number from 1 to 10,000,000"):
        plan_batches(synthetic_source(10), size)


def test_input_that_grew_since_planning_is_a_source_error(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", GOOD + "1,a,a@b.io\n")
    batch = plan_batches(file_source(path), 10)[0]
    with path.open("a") as f:
        f.write("2,b,b@c.io\n")
    with pytest.raises(SourceError, match="input changed since the import started"):
        list(read_batch(batch))


# -- file-level problems ----------------------------------------------------------------------

FILE_PROBLEMS: dict[str, tuple[str, str | bytes | None, str, int | None]] = {
    # case: (file name, content (None: nothing, "<dir>": a directory), message, line)
    "missing file": ("absent.csv", None, "no such file", None),
    "directory": ("folder.csv", "<dir>", "is a directory", None),
    "empty file": ("empty.csv", "", "file is empty", None),
    "unknown extension": ("data.xml", "<a/>", "unknown extension '.xml'", None),
    "missing header column": ("in.csv", "id,name\n1,a\n", "header lacks the column(s) email", 1),
    "repeated header column": ("in.csv", "id,name,email,id\n", "header repeats the column(s) id", 1),
    "malformed quote": ("in.csv", GOOD + "0,a,a@b.io\n" + '1,"a"b,c@d.io\n', "malformed CSV", 3),
    "unclosed quote": ("in.csv", GOOD + '1,"abc,c@d.io\n2,b,b@c.io\n', "never closed", 2),
    "invalid UTF-8 in CSV": ("in.csv", GOOD.encode() + b"1,\xff\xfe,a@b.io\n", "not valid UTF-8", 2),
    "invalid UTF-8 in JSON lines": (
        "in.jsonl", b'{"id": 1}\n\n{"id": "\xc3\x28"}\n', "not valid UTF-8", 3
    ),
}


def describe_and_plan(path: Path) -> tuple[dict[str, Any], ...]:
    return plan_batches(file_source(path), 1)


@pytest.mark.parametrize("case", list(FILE_PROBLEMS))
def test_file_level_problem_is_a_source_error_naming_file_and_line(tmp_path: Path, case: str) -> None:
    name, content, message, line = FILE_PROBLEMS[case]
    path = tmp_path / name
    if content == "<dir>":
        path.mkdir()
    elif content is not None:
        write(path, content)
    where = f"{path}:{line}" if line is not None else str(path)
    with pytest.raises(SourceError, match=re.escape(where) + ": .*" + re.escape(message)):
        describe_and_plan(path)


def test_a_file_replaced_with_the_same_size_and_mtime_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,name,email\n1,a,a@b.io\n2,b,b@c.io\n")
    source = file_source(path)
    [batch] = plan_batches(source, 10)
    before = path.stat()
    replacement = tmp_path / "other.csv"
    replacement.write_text("id,name,email\n1,A,a@b.io\n2,B,b@c.io\n")
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))  # like cp -p or rsync -t
    replacement.replace(path)
    with pytest.raises(SourceError, match="input changed"):
        list(read_batch(batch))


def test_a_bom_before_blank_lines_and_the_csv_header(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff\n\nid,name,email\n1,a,a@b.io\n".encode())
    [batch] = plan_batches(file_source(path), 10)
    assert [r.record_id for r in read_batch(batch)] == ["1"]
