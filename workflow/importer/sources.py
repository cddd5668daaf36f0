"""Input sources, streamed: a deterministic synthetic generator, CSV files and JSON-lines files.

A source is a small JSON descriptor; a batch is the source plus a range (record positions for
the synthetic source, byte offsets for files). Workflows pass descriptors, never records, so
the promise store grows with the number of batches, not with the number of records.

File-level problems (missing, unreadable, empty, unknown extension, bad or too wide header,
broken CSV quoting, invalid UTF-8) raise SourceError naming file and line; planning reads the
whole file first, so they stop an import before any batch runs. Row-level problems become
skipped rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import reprlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..errors import PermanentError
from . import records

CSV_FIELD_LIMIT = 64 * 1024 * 1024
MAX_BATCH_SIZE = 10_000_000  # records a batch holds, at most: one transaction, in memory
MAX_BATCHES = 10_000_000  # the plan is held in memory, and the store keeps a promise per batch
MAX_CSV_COLUMNS = 10_000  # a wider header is refused: no real import has that many columns
_REPEATS_NAMED = 5  # a header's repeated columns named in its error, at most
SYNTHETIC_INVALID_EVERY = 20  # record i has a malformed email when i % 20 == 13: exactly 5%
SYNTHETIC_INVALID_AT = 13
csv.field_size_limit(CSV_FIELD_LIMIT)  # larger fields are a row-level problem, not a parse error


class SourceError(PermanentError):
    """A problem with the input as a whole; names the file (and line when known). No retry
    can fix it."""

    def __init__(
        self, path: str | os.PathLike[str], message: str, line: int | None = None
    ) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


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


def file_source(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe an input file by absolute path, kind, size and SHA-256 of its content."""
    path = Path(path)
    kind = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(path.suffix.lower())
    if kind is None:
        raise SourceError(path, f"unknown extension {path.suffix!r} (use .csv or .jsonl)")
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
    return {"kind": kind, "path": resolved, "size": st.st_size, "sha256": digest}


def source_label(source: dict[str, Any]) -> str:
    """A short human name used in default workflow ids."""
    if source["kind"] == "synthetic":
        return f"synthetic-{source['records']}"
    stem = Path(source["path"]).stem.replace(".", "_")  # a dot separates the ids of calls
    return f"{stem}-{source['sha256'][:12]}"


# -- planning ---------------------------------------------------------------------------------

_plans: dict[bytes, tuple[dict[str, Any], ...]] = {}


def plan_batches(source: dict[str, Any], batch_size: int) -> tuple[dict[str, Any], ...]:
    """The batch descriptors of `source`; reads a whole file once per process (then cached)."""
    if type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(
            f"batch size must be a whole number from 1 to {MAX_BATCH_SIZE:,}, not {batch_size!r}"
        )
    _check_descriptor(source)
    if source["kind"] == "synthetic" and -(-source["records"] // batch_size) > MAX_BATCHES:
        raise SourceError("source", (
            f"{source['records']:,} records in batches of {batch_size:,} would be more than "
            f"{MAX_BATCHES:,} batches: use a larger batch size"))
    key = orjson.dumps([source, batch_size], option=orjson.OPT_SORT_KEYS)
    if key not in _plans:
        if source["kind"] == "synthetic":
            plan = _plan_synthetic(source, batch_size)
        else:
            plan = _plan_file(source, batch_size)
        _plans[key] = tuple(plan)
    return _plans[key]


def _check_descriptor(source: Any) -> None:
    ok = isinstance(source, dict) and (
        (source.get("kind") == "synthetic" and type(source.get("records")) is int
         and source["records"] >= 0)
        or (source.get("kind") in _FILE_READERS and isinstance(source.get("path"), str)
            and type(source.get("size")) is int and isinstance(source.get("sha256"), str))
    )
    if not ok:
        raise SourceError("source", f"not a valid source descriptor: {source!r}")


def _plan_synthetic(source: dict[str, Any], batch_size: int) -> Iterator[dict[str, Any]]:
    count = source["records"]
    for start in range(0, count, batch_size):
        yield {"source": source, "start": start, "stop": min(count, start + batch_size)}


def _plan_file(source: dict[str, Any], batch_size: int) -> Iterator[dict[str, Any]]:
    _check_unchanged(source)
    batch: dict[str, Any] | None = None
    for row, start, end in _FILE_READERS[source["kind"]](source, 0, source["size"], 1, 0):
        if batch is None:
            batch = {"source": source, "offset": start, "line": row.line,
                     "position": row.position, "records": 0}
        batch["end"] = end
        batch["records"] += 1
        if batch["records"] == batch_size:
            yield batch
            batch = None
    if batch is not None:
        yield batch


# -- reading ----------------------------------------------------------------------------------


def read_batch(descriptor: dict[str, Any]) -> Iterator[Row]:
    """The rows of one batch, streamed."""
    source = descriptor["source"]
    if source["kind"] == "synthetic":
        for i in range(descriptor["start"], descriptor["stop"]):
            record = synthetic_record(i)
            yield Row(i, i + 1, record, records.problem_with(record))
        return
    _check_unchanged(source)
    read = _FILE_READERS[source["kind"]]
    for row, _start, _end in read(
        source, descriptor["offset"], descriptor["end"], descriptor["line"], descriptor["position"]
    ):
        yield row


def synthetic_record(i: int) -> dict[str, Any]:
    """Record i of the synthetic source; every 20th (i % 20 == 13) has a malformed email."""
    at = "." if i % SYNTHETIC_INVALID_EVERY == SYNTHETIC_INVALID_AT else "@"
    return {"id": f"r{i:09d}", "name": f"Person {i}", "email": f"user{i}{at}example.com"}


# (path, sha256) -> the file's identity (inode, size, mtime, ctime) when its digest last matched
_verified: dict[tuple[str, str], tuple[int, int, int, int]] = {}


def _check_unchanged(source: dict[str, Any]) -> None:
    """Refuse an input whose content is not what the import was planned on.

    The SHA-256 is checked once per process (and again if the file's inode, size, mtime or
    ctime move: a replaced file always changes its ctime), so a resumed import never mixes two
    versions of a file.
    """
    path = source["path"]
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SourceError(path, f"cannot read ({exc.strerror})") from None
    identity = _identity(st)
    if _verified.get((path, source["sha256"])) == identity:
        return
    if st.st_size != source["size"] or _sha256(path) != source["sha256"]:
        raise SourceError(
            path, f"input changed since the import started (it was {source['size']} bytes, "
            f"sha256 {source['sha256'][:12]}; it is {st.st_size} bytes now)"
        )
    _verified[(path, source["sha256"])] = identity


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Lines:
    """Decoded lines of the byte range [offset, end), remembering where the last one ended."""

    def __init__(self, f: BinaryIO, path: str, offset: int, end: int, line: int) -> None:
        f.seek(offset)
        self._f = f
        self._path = path
        self._end = end
        self.pos = offset
        self.line = line - 1  # number of the last line read

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pos >= self._end or not (raw := self._f.readline()):
            raise StopIteration
        at_start = self.pos == 0
        self.pos += len(raw)
        self.line += 1
        try:
            text = raw.decode("utf-8")
            return text.removeprefix("\ufeff") if at_start else text
        except UnicodeDecodeError as exc:
            raise SourceError(
                self._path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", self.line
            ) from None


# A file reader yields (row, start offset, end offset) for each record in a byte range.


def _jsonl_rows(
    source: dict[str, Any], offset: int, end: int, line: int, position: int
) -> Iterator[tuple[Row, int, int]]:
    with _open(source) as f:
        lines = _Lines(f, source["path"], offset, end, line)
        start = offset
        for text in lines:
            if text.strip():  # blank lines are not records
                yield _jsonl_row(text, position, lines.line), start, lines.pos
                position += 1
            start = lines.pos


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
    return Row(position, line, value, records.problem_with(value))


_LONG_DIGITS = re.compile(r"\d{19}")  # 2**63 has 19 digits


def _csv_rows(
    source: dict[str, Any], offset: int, end: int, line: int, position: int
) -> Iterator[tuple[Row, int, int]]:
    path = source["path"]
    with _open(source) as f:
        header_lines = _Lines(f, path, 0, source["size"], 1)
        header_reader = csv.reader(header_lines, strict=True)
        header: list[str] | None = []
        while header == []:  # blank lines before the header are not the header
            header = _next_csv_record(header_reader, header_lines, path)
        if header is None:
            raise SourceError(path, "has no header line (expected the columns id,name,email)")
        _check_header(path, header, header_lines.line)
        if offset < header_lines.pos:
            offset, line = header_lines.pos, header_lines.line + 1
        lines = _Lines(f, path, offset, end, line)
        reader = csv.reader(lines, strict=True)
        while True:
            start, first_line = lines.pos, lines.line + 1
            cells = _next_csv_record(reader, lines, path)
            if cells is None:
                return
            if cells:  # a blank line is not a record
                yield _csv_row(header, cells, position, first_line), start, lines.pos
                position += 1


def _next_csv_record(reader: Any, lines: _Lines, path: str) -> list[str] | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        raise SourceError(path, f"malformed CSV ({exc})", lines.line) from None


def _check_header(path: str, header: list[str], line: int) -> None:
    if len(header) > MAX_CSV_COLUMNS:
        raise SourceError(
            path, f"header has {len(header)} columns, more than the {MAX_CSV_COLUMNS} allowed", line
        )
    counts = Counter(header)
    missing = [name for name in records.REQUIRED_FIELDS if name not in counts]
    if missing:
        raise SourceError(path, f"header lacks the column(s) {', '.join(missing)}", line)
    repeated = [name for name, n in counts.items() if n > 1]
    if repeated:
        named = ", ".join(repeated[:_REPEATS_NAMED])
        more = len(repeated) - _REPEATS_NAMED
        raise SourceError(
            path, f"header repeats the column(s) {named}" + (f" and {more} more" if more > 0 else ""),
            line,
        )


def _csv_row(header: list[str], cells: list[str], position: int, line: int) -> Row:
    record = dict(zip(header, cells, strict=False))
    if len(cells) != len(header):
        return Row(position, line, record, records.WRONG_FIELD_COUNT)
    return Row(position, line, record, records.problem_with(record))


def _open(source: dict[str, Any]) -> BinaryIO:
    try:
        return open(source["path"], "rb")
    except OSError as exc:
        raise SourceError(source["path"], f"cannot read ({exc.strerror})") from None


_FILE_READERS = {"csv": _csv_rows, "jsonl": _jsonl_rows}
