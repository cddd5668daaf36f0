"""Input sources, streamed: a deterministic synthetic generator, CSV files and JSON-lines files.

A source is a small JSON descriptor; a batch is the source plus a range (record positions for
the synthetic source, byte offsets for files). Workflows pass descriptors, never records, so
the promise store grows with the number of batches, not with the number of records.

Planning is streamed: `plan_segment` plans the next few batches from a cursor, as a durable step
of its own, so an import starts its first batch at once and a restarted worker replays the stored
plan instead of reading the file again. A file's descriptor is pinned by its SHA-256; each batch
and cursor also carries the file's identity (inode, size, mtime, ctime) verified when it was
planned, so a later process trusts an unchanged file by a stat and hashes it only if that moved.

How the file's bytes are read (gzip, encoding, delimiter) is recorded in the descriptor too,
and how its header names the fields (file_format.py, header.py).

File-level problems (missing, unreadable, empty, unknown extension, bad or too wide header,
broken CSV quoting, bytes invalid in the file's encoding, a damaged gzip stream) raise
SourceError naming file and line. The cheap ones
(`check_source`: the file is there, its size, its header) stop an import before anything is
written; one found by planning further on (broken quoting at line 1,900,000) rejects the import
there, keeping the batches committed before it. Row-level problems become skipped rows.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import re
import reprlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..registry import register
from . import records
from .file_format import (
    ContentError,
    Format,
    FormatError,
    SourceError,
    format_fields,
    format_of,
    kind_of,
    open_path,
    positioned,
    read_gzip_safely,
    sniff_delimiter,
    undecodable,
    valid_format_fields,
)
from .header import HeaderError, field_names

CSV_FIELD_LIMIT = 64 * 1024 * 1024
MAX_BATCH_SIZE = 10_000_000  # records a batch holds, at most: one transaction, in memory
MAX_BATCHES = 10_000_000  # the store keeps a promise per batch (and v1 a plan in memory)
SYNTHETIC_INVALID_EVERY = 20  # record i has a malformed email when i % 20 == 13: exactly 5%
SYNTHETIC_INVALID_AT = 13
csv.field_size_limit(CSV_FIELD_LIMIT)  # larger fields are a row-level problem, not a parse error


@dataclass(frozen=True, slots=True)
class Row:
    """One input record: its position among the records, the file line it starts on, and either
    the record or the reason it is skipped."""

    position: int
    line: int
    record: dict[str, Any] | None
    problem: str | None = None

    @property
    def record_id(self) -> str | None:
        """The id as text; an id of another type (skipped as invalid) is shown shortened."""
        value = None if self.record is None else self.record.get("id")
        if value is None or type(value) is str:
            return value
        if type(value) is int:
            return str(value)
        return reprlib.repr(value)  # bounded, however deep or long it is


# -- descriptors ------------------------------------------------------------------------------


def synthetic_source(count: int) -> dict[str, Any]:
    return {"kind": "synthetic", "records": count}


def file_source(
    path: str | os.PathLike[str],
    *,
    delimiter: str | None = None,
    encoding: str = "utf-8",
    columns: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Describe an input file by absolute path, kind, size and SHA-256 of its content, and how
    to read it: gzipped (by its name), its encoding, a CSV's delimiter (given, a tab for .tsv,
    else sniffed from its first lines) and the columns that hold the fields (`columns`, as
    `--map` gives them). Options that cannot apply raise FormatError."""
    path = Path(path)
    kind, gzipped, implied = kind_of(path)
    if kind is None:
        raise SourceError(path, f"unknown extension {''.join(path.suffixes[-2:])!r} "
                          "(use .csv, .tsv, .jsonl or .ndjson, optionally with .gz)")
    if kind == "jsonl" and (delimiter is not None or columns):
        raise FormatError("--delimiter and --map apply to CSV and TSV files; a JSON-lines record "
                          "names its fields itself")
    try:
        st = os.stat(path)
        digest = _sha256(path)
    except FileNotFoundError:
        raise SourceError(path, "no such file") from None
    except IsADirectoryError:
        raise SourceError(path, "is a directory, not an input file") from None
    except OSError as exc:
        raise SourceError(path, f"cannot read ({exc.strerror})") from None
    if st.st_size == 0:
        raise SourceError(path, "file is empty: nothing to import")
    resolved = str(path.resolve())
    _verified[(resolved, digest)] = _identity(st)  # planning it in this process need not hash it again
    if kind == "csv" and delimiter is None:
        delimiter = implied or sniff_delimiter(path, gzipped, encoding)
    fmt = Format(encoding=encoding, delimiter=delimiter or ",", columns=columns or {}, gzip=gzipped)
    return {"kind": kind, "path": resolved, "size": st.st_size, "sha256": digest, **format_fields(fmt)}


def reading_options(source: dict[str, Any]) -> dict[str, Any]:
    """What, besides its content, makes an import of `source` read it its own way: a file's
    encoding, and a CSV's delimiter and column map (defaults filled in)."""
    if source["kind"] == "synthetic":
        return {}
    fmt = format_of(source)
    options: dict[str, Any] = {"encoding": fmt.encoding}
    if source["kind"] == "csv":
        options.update(delimiter=fmt.delimiter, columns=fmt.columns)
    return options


def same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two descriptors name the same input: the same synthetic count, or a file of the
    same kind, compression and SHA-256 (wherever it is)."""
    if a["kind"] == "synthetic" or b["kind"] == "synthetic":
        return a == b
    return (a["kind"], a["sha256"], format_of(a).gzip) == (b["kind"], b["sha256"], format_of(b).gzip)


# -- planning ---------------------------------------------------------------------------------

SEGMENT_BATCHES = 64  # batches a plan segment holds, at most
SEGMENT_BYTES = 4 << 20  # a file's segment also ends once it spans this much input (~50 ms of scan)


def check_source(source: Any, batch_size: Any) -> None:
    """Check an import's arguments without reading its input: the batch size (ValueError), the
    descriptor, a synthetic source's batch count, a file's presence and size, a CSV's header
    (SourceError). Cheap, so a bad input stops before anything is written."""
    check_arguments(source, batch_size)
    if source["kind"] == "synthetic":
        _check_batch_count(source, batch_size)
        return
    size = _stat(source["path"]).st_size
    if size != source["size"]:
        raise _changed(source, size)
    if source["kind"] == "csv":
        _csv_header(source)


def check_arguments(source: Any, batch_size: Any) -> None:
    """An import's arguments checked for form only, reading nothing (its file may be gone):
    the batch size (ValueError) and the descriptor (SourceError)."""
    _check_batch_size(batch_size)
    _check_descriptor(source)


def verify_source(source: dict[str, Any]) -> None:
    """What a machine joining an import checks before it runs any batch: that its copy of the
    input is the content the import was planned on (the whole file hashed, unless this process
    verified it already). One machine with another file would otherwise reject batches for all."""
    if source["kind"] != "synthetic":
        _check_unchanged(source)


def batch_count(source: dict[str, Any], batch_size: int) -> int | None:
    """How many batches `source` makes, if known without reading it (a synthetic source)."""
    return -(-source["records"] // batch_size) if source["kind"] == "synthetic" else None


@register(name="plan_segment")
def plan_segment(
    source: dict[str, Any], batch_size: int, cursor: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The import's planning step: `{"batches": [...], "next": cursor}`, the batches of `source`
    from `cursor` (None: from the start) up to SEGMENT_BATCHES of them (in a file, also about
    SEGMENT_BYTES of it), and where the next segment starts (None after the last batch)."""
    _check_batch_size(batch_size)
    _check_descriptor(source)
    if source["kind"] == "synthetic":
        _check_batch_count(source, batch_size)
        return _plan_synthetic(source, batch_size, 0 if cursor is None else cursor["start"])
    identity = _check_unchanged(source, None if cursor is None else cursor["identity"])
    try:
        batches, after = _plan_file(source, batch_size, cursor, SEGMENT_BATCHES)
    except ContentError as exc:
        if cursor is None:  # `run` finds it before anything is written
            raise
        raise exc.found_late() from None
    for batch in batches:
        batch["identity"] = identity
    if after is not None:
        after["identity"] = identity
    return {"batches": batches, "next": after}


def plan_batches(source: dict[str, Any], batch_size: int) -> tuple[dict[str, Any], ...]:
    """Every batch descriptor of `source` at once, reading a whole file: the plan that
    import_records v1 replays (its descriptors carry no file identity)."""
    _check_batch_size(batch_size)
    _check_descriptor(source)
    if source["kind"] == "synthetic":
        _check_batch_count(source, batch_size)
        return tuple(_synthetic_batch(source, start, batch_size)
                     for start in range(0, source["records"], batch_size))
    _check_unchanged(source)
    return tuple(_plan_file(source, batch_size, None, None)[0])


def _check_batch_size(batch_size: Any) -> None:
    if type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(
            f"batch size must be a whole number from 1 to {MAX_BATCH_SIZE:,}, not {batch_size!r}"
        )


def _check_descriptor(source: Any) -> None:
    ok = isinstance(source, dict) and (
        (source.get("kind") == "synthetic" and type(source.get("records")) is int
         and source["records"] >= 0)
        or (source.get("kind") in _FILE_RECORDS and isinstance(source.get("path"), str)
            and type(source.get("size")) is int and isinstance(source.get("sha256"), str)
            and valid_format_fields(source))
    )
    if not ok:
        raise SourceError("source", f"not a valid source descriptor: {source!r}")


def _check_batch_count(source: dict[str, Any], batch_size: int) -> None:
    if batch_count(source, batch_size) > MAX_BATCHES:
        raise SourceError("source", (
            f"{source['records']:,} records in batches of {batch_size:,} would be more than "
            f"{MAX_BATCHES:,} batches: use a larger batch size"))


def _plan_synthetic(source: dict[str, Any], batch_size: int, start: int) -> dict[str, Any]:
    count = source["records"]
    stop = min(count, start + SEGMENT_BATCHES * batch_size)
    batches = [_synthetic_batch(source, first, batch_size) for first in range(start, stop, batch_size)]
    return {"batches": batches, "next": {"start": stop} if stop < count else None}


def _synthetic_batch(source: dict[str, Any], start: int, batch_size: int) -> dict[str, Any]:
    return {"source": source, "start": start, "stop": min(source["records"], start + batch_size)}


def _plan_file(
    source: dict[str, Any], batch_size: int, cursor: dict[str, Any] | None, max_batches: int | None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The batches from `cursor` (None: the first record) to the end of the file, or only up to
    `max_batches` and about SEGMENT_BYTES; and the cursor of the record after them (None at the
    end). Scans record boundaries only: rows are built and checked when a batch is read.
    Offsets count decompressed bytes in a gzip file."""
    if cursor is not None:
        offset, line, position = cursor["offset"], cursor["line"], cursor["position"]
    elif source["kind"] == "csv":
        _names, offset, line = _csv_header(source)
        position = 0
    else:
        offset, line, position = 0, 1, 0
    limit = sys.maxsize if format_of(source).gzip else source["size"]  # a gzip file: to its end
    with positioned(source, offset) as f:
        batches: list[dict[str, Any]] = []
        batch: dict[str, Any] | None = None
        scan = _FILE_RECORDS[source["kind"]]
        for start, stop, first_line, _content in scan(f, source, offset, limit, line):
            if batch is None:
                if max_batches is not None and (
                    len(batches) == max_batches or start - offset >= SEGMENT_BYTES
                ):
                    return batches, {"offset": start, "line": first_line, "position": position}
                batch = {"source": source, "offset": start, "line": first_line,
                         "position": position, "records": 0}
                batches.append(batch)
            batch["end"] = stop
            batch["records"] += 1
            position += 1
            if batch["records"] == batch_size:
                batch = None
    return batches, None


# -- reading ----------------------------------------------------------------------------------


def read_batch(descriptor: dict[str, Any]) -> Iterator[Row]:
    """The rows of one batch, streamed."""
    source = descriptor["source"]
    if source["kind"] == "synthetic":
        for i in range(descriptor["start"], descriptor["stop"]):
            record = synthetic_record(i)
            yield Row(i, i + 1, record, records.problem_with(record))
        return
    _check_unchanged(source, descriptor.get("identity"))
    read = _FILE_ROWS[source["kind"]]
    yield from read(
        source, descriptor["offset"], descriptor["end"], descriptor["line"], descriptor["position"]
    )


def synthetic_record(i: int) -> dict[str, Any]:
    """Record i of the synthetic source; every 20th (i % 20 == 13) has a malformed email."""
    at = "." if i % SYNTHETIC_INVALID_EVERY == SYNTHETIC_INVALID_AT else "@"
    return {"id": f"r{i:09d}", "name": f"Person {i}", "email": f"user{i}{at}example.com"}


# (path, sha256) -> the file's identity (inode, size, mtime, ctime) when its digest last matched
_verified: dict[tuple[str, str], list[int]] = {}


def _check_unchanged(source: dict[str, Any], trusted: list[int] | None = None) -> list[int]:
    """Refuse an input whose content is not what the import was planned on; return the file's
    identity, now verified.

    The SHA-256 is read only when the identity is neither `trusted` (what planning verified and
    stored, in any process) nor verified in this process already. A rewritten or replaced file
    always moves its ctime, so a resumed import never mixes two versions of a file.
    """
    path = source["path"]
    identity = _identity(_stat(path))
    key = (path, source["sha256"])
    if identity == trusted or _verified.get(key) == identity:
        return identity
    if identity[1] != source["size"] or _sha256(path) != source["sha256"]:
        raise _changed(source, identity[1])
    _verified[key] = identity
    return identity


def _changed(source: dict[str, Any], size: int) -> SourceError:
    return SourceError(
        source["path"], f"input changed since the import started (it was {source['size']} bytes, "
        f"sha256 {source['sha256'][:12]}; it is {size} bytes now)"
    )


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise SourceError(path, f"cannot read ({exc.strerror})") from None


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Lines:
    """Decoded lines of the byte range [offset, end) of a file positioned at `offset`,
    remembering where the last one ended."""

    def __init__(self, f: BinaryIO, source: dict[str, Any], offset: int, end: int, line: int) -> None:
        self._f = f
        self._path = source["path"]
        self._encoding = format_of(source).encoding
        self._end = end
        self.pos = offset
        self.line = line - 1  # number of the last line read

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pos >= self._end:
            raise StopIteration
        raw = read_gzip_safely(self._path, self._f.readline, self.line + 1)
        if not raw:
            raise StopIteration
        at_start = self.pos == 0
        self.pos += len(raw)
        self.line += 1
        if at_start:
            self._check_byte_order_mark(raw)
        try:
            text = raw.decode(self._encoding)
            return text.removeprefix("\ufeff") if at_start else text
        except UnicodeDecodeError as exc:
            raise undecodable(self._path, self.line, self._encoding, exc) from None

    def _check_byte_order_mark(self, raw: bytes) -> None:
        """Refuse a file whose first bytes say it is in another encoding than it is read in."""
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise SourceError(self._path, "starts with a UTF-16 byte-order mark: UTF-16 files are not "
                              "supported; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)", 1)
        if raw.startswith(codecs.BOM_UTF8) and self._encoding != "utf-8":
            raise SourceError(self._path, "starts with a UTF-8 byte-order mark but is read with "
                              f"--encoding {self._encoding}: drop --encoding if the file is UTF-8, "
                              "or remove the mark", 1)



# A record scanner yields (start offset, end offset, first line, content) for each record that
# starts in the byte range [offset, end) of an open file: content is a JSON line's text or a CSV
# record's cells. Planning needs only the offsets; a batch's reader builds rows from the content.


def _jsonl_records(
    f: BinaryIO, source: dict[str, Any], offset: int, end: int, line: int
) -> Iterator[tuple[int, int, int, str]]:
    lines = _Lines(f, source, offset, end, line)
    start = offset
    for text in lines:
        if text.strip():  # blank lines are not records
            yield start, lines.pos, lines.line, text
        start = lines.pos


def _jsonl_rows(
    source: dict[str, Any], offset: int, end: int, line: int, position: int
) -> Iterator[Row]:
    with positioned(source, offset) as f:
        for _start, _end, first_line, text in _jsonl_records(f, source, offset, end, line):
            yield _jsonl_row(text, position, first_line)
            position += 1


def _jsonl_row(text: str, position: int, line: int) -> Row:
    try:
        # orjson reads a whole number beyond 64 bits as a float, or refuses one beyond a double:
        # a line with such a long run of digits is read by the stdlib, which keeps ints exact.
        value = json.loads(text) if _LONG_DIGITS.search(text) else orjson.loads(text)
    except json.JSONDecodeError:  # orjson's is one too
        return Row(position, line, None, records.MALFORMED_JSON)
    except (RecursionError, ValueError):  # deeper than the stdlib reads, more digits than Python
        return Row(position, line, None, records.UNSTORABLE_VALUE)  # converts: far too big to store
    if not isinstance(value, dict):
        return Row(position, line, None, records.NOT_AN_OBJECT)
    return Row(position, line, value, records.problem_with(records.tidy(value)))


_LONG_DIGITS = re.compile(r"\d{19}")  # 2**63 has 19 digits


def _csv_header(source: dict[str, Any]) -> tuple[list[str], int, int]:
    """The field names a CSV's header gives its columns, checked; the offset just after the
    header and the number of the next line."""
    path = source["path"]
    fmt = format_of(source)
    with open_path(path, fmt.gzip) as f:
        lines = _Lines(f, source, 0, sys.maxsize, 1)
        reader = _csv_reader(lines, fmt)
        header: list[str] | None = []
        while header == []:  # blank lines before the header are not the header
            header = _next_csv_record(reader, lines, path, lines.line + 1)
    if header is None:
        raise SourceError(path, "has no header line (expected the columns id,name,email)")
    try:
        return field_names(header, fmt), lines.pos, lines.line + 1
    except HeaderError as exc:
        raise SourceError(path, str(exc), lines.line) from None


def _csv_reader(lines: _Lines, fmt: Format) -> Any:
    return csv.reader(lines, strict=True, delimiter=fmt.delimiter)


def _csv_records(
    f: BinaryIO, source: dict[str, Any], offset: int, end: int, line: int
) -> Iterator[tuple[int, int, int, list[str]]]:
    lines = _Lines(f, source, offset, end, line)
    reader = _csv_reader(lines, format_of(source))
    path = source["path"]
    while True:
        start, first_line = lines.pos, lines.line + 1
        cells = _next_csv_record(reader, lines, path, first_line)
        if cells is None:
            return
        if cells:  # a blank line is not a record
            yield start, lines.pos, first_line, cells


def _csv_rows(
    source: dict[str, Any], offset: int, end: int, line: int, position: int
) -> Iterator[Row]:
    names = _csv_header(source)[0]
    with positioned(source, offset) as f:
        for _start, _end, first_line, cells in _csv_records(f, source, offset, end, line):
            yield _csv_row(names, cells, position, first_line)
            position += 1


def _next_csv_record(reader: Any, lines: _Lines, path: str, first_line: int) -> list[str] | None:
    """The next record's cells (None at the end); a parse error names the line it is on, or for
    a quoted field never closed, the line where the record (and the quote) starts."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        if str(exc) == _UNCLOSED_QUOTE:
            raise ContentError(path, "malformed CSV (a quoted field that starts on this line is "
                               "never closed)", first_line) from None
        raise ContentError(path, f"malformed CSV ({exc})", lines.line) from None


_UNCLOSED_QUOTE = "unexpected end of data"  # the csv module's error at the end inside a quote


def _csv_row(names: list[str], cells: list[str], position: int, line: int) -> Row:
    record = records.tidy(dict(zip(names, cells, strict=False)))
    if len(cells) != len(names):
        return Row(position, line, record, records.WRONG_FIELD_COUNT)
    return Row(position, line, record, records.problem_with(record))


_FILE_RECORDS = {"csv": _csv_records, "jsonl": _jsonl_records}
_FILE_ROWS = {"csv": _csv_rows, "jsonl": _jsonl_rows}
