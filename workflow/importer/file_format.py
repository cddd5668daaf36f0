"""How an input file's bytes become lines of text: its kind and compression (from its name), its
encoding and its CSV delimiter (given, or sniffed once when the import starts and then recorded
in the source descriptor, so that every process reads the file alike).

A descriptor records only what differs from the defaults (`encoding` utf-8, `delimiter` ",", no
`compression`, no `columns`): a plain UTF-8 CSV's descriptor is the one earlier versions wrote,
and an import they started reads the same here.

A gzip file (`.csv.gz`, `.tsv.gz`, `.jsonl.gz`) has no random access, so its batches are ranges
of decompressed offsets, read through a few decompressors kept open per process: a process reads
its batches in order, so each decompressor only moves forward, and a restarted worker pays one
decompression up to its first batch (about a third of a second per 100 MB).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from ..errors import PermanentError
from . import records

DEFAULT_ENCODING = "utf-8"
DEFAULT_DELIMITER = ","
SNIFFED_DELIMITERS = ",;\t|"
SNIFF_BYTES = 64 * 1024
_KINDS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_ASCII_PROBE = "\n\r,;\t|\"'=abcXYZ019 "  # an encoding must write these as ASCII does
_GZIP_READERS_KEPT = 4  # decompressors kept open per process (planning and reading interleave)


class SourceError(PermanentError):
    """A problem with the input as a whole; names the file (and line when known). No retry
    can fix it."""

    def __init__(
        self, path: str | os.PathLike[str], message: str, line: int | None = None
    ) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class ContentError(SourceError):
    """A problem in the file's content (bytes invalid in its encoding, broken CSV quoting, a
    damaged gzip stream). Found before anything is written, `remedy` says how to run the import
    instead; found by a later plan segment, after batches before it committed, it becomes a
    LateInputError (`found_late`), which says how to import the file again."""

    def __init__(
        self, path: str | os.PathLike[str], problem: str, line: int | None, *,
        remedy: str | None = None, late_remedy: str = "fix the file and import it under a new id "
        "(add --id NEW; without --id, the fixed file gets an id of its own)",
    ) -> None:
        super().__init__(path, f"{problem}; {remedy}" if remedy else problem, line)
        self.path, self.problem, self.line, self.late_remedy = path, problem, line, late_remedy

    def found_late(self) -> LateInputError:
        where = "it" if self.line is None else f"line {self.line}"
        return LateInputError(self.path, f"{self.problem}; the batches before {where} are committed "
                              f"and this import cannot go past it: {self.late_remedy}", self.line)


class LateInputError(SourceError):
    """A ContentError found after batches before it committed: no retry of the import can get
    past it, so its message says how to import the file again (supervisor: shown alone)."""


class FormatError(ValueError):
    """A reading option (encoding, delimiter, column map) that cannot apply: a usage error."""


@dataclass(frozen=True, slots=True)
class Format:
    """How to read one input file; the defaults are what a descriptor leaves out."""

    encoding: str = DEFAULT_ENCODING
    delimiter: str = DEFAULT_DELIMITER
    columns: dict[str, str] = field(default_factory=dict)  # field -> the column holding it
    gzip: bool = False


def kind_of(path: Path) -> tuple[str | None, bool, str | None]:
    """The kind a file name says (csv, jsonl or None), whether it is gzipped, and the delimiter
    its extension implies (a tab for .tsv)."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    suffix = Path(name.removesuffix(".gz")).suffix
    return _KINDS.get(suffix), gzipped, "\t" if suffix == ".tsv" else None


def format_of(source: dict[str, Any]) -> Format:
    """The reading options of a file descriptor, defaults filled in."""
    return Format(
        encoding=source.get("encoding", DEFAULT_ENCODING),
        delimiter=source.get("delimiter", DEFAULT_DELIMITER),
        columns=source.get("columns", {}),
        gzip=source.get("compression") == "gzip",
    )


def format_fields(fmt: Format) -> dict[str, Any]:
    """What a descriptor records of `fmt`: only what differs from the defaults."""
    fields: dict[str, Any] = {}
    if fmt.encoding != DEFAULT_ENCODING:
        fields["encoding"] = fmt.encoding
    if fmt.delimiter != DEFAULT_DELIMITER:
        fields["delimiter"] = fmt.delimiter
    if fmt.columns:
        fields["columns"] = dict(fmt.columns)
    if fmt.gzip:
        fields["compression"] = "gzip"
    return fields


def valid_format_fields(source: dict[str, Any]) -> bool:
    """Whether a descriptor's reading options are well-formed (a store edited by hand is not)."""
    columns = source.get("columns", {})
    return (
        isinstance(source.get("encoding", DEFAULT_ENCODING), str)
        and _one_char(source.get("delimiter", DEFAULT_DELIMITER))
        and source.get("compression", "gzip") == "gzip"
        and isinstance(columns, dict)
        and all(k in records.REQUIRED_FIELDS and isinstance(v, str) for k, v in columns.items())
    )


def _one_char(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 1 and value not in "\"\r\n"


def encoding_name(text: str) -> str:
    """The canonical name of an encoding the importer can read (ASCII-compatible, so that lines
    and delimiters are found in its bytes); FormatError otherwise."""
    try:
        info = codecs.lookup(text)
    except LookupError:
        raise FormatError(f"unknown encoding {text!r} (e.g. utf-8, latin-1, cp1252)") from None
    try:
        ascii_compatible = _ASCII_PROBE.encode(info.name) == _ASCII_PROBE.encode("ascii")
    except (UnicodeError, LookupError):
        ascii_compatible = False
    if not ascii_compatible or info.name.startswith("utf-16") or info.name.startswith("utf-32"):
        raise FormatError(f"encoding {text!r} is not supported: its lines are not ASCII bytes "
                          "(convert the file to utf-8)")
    return "utf-8" if info.name == "utf-8" else info.name


def delimiter_char(text: str) -> str:
    """A delimiter as given on a command line: one character, or `tab` / `\\t`."""
    value = "\t" if text.lower() in ("tab", "\\t") else text
    if not _one_char(value):
        raise FormatError(f"a delimiter is one character (or 'tab'), not {text!r}")
    return value


def column_map(text: str) -> dict[str, str]:
    """`id=user_id,name=full_name,email=mail` as {field: column}; FormatError if malformed."""
    columns: dict[str, str] = {}
    for item in text.split(","):
        name, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not column or name not in records.REQUIRED_FIELDS:
            raise FormatError(f"expected FIELD=COLUMN pairs with FIELD one of "
                              f"{', '.join(records.REQUIRED_FIELDS)}, not {item.strip()!r}")
        if name in columns:
            raise FormatError(f"the field {name} is mapped twice")
        columns[name] = column
    if len({c.casefold() for c in columns.values()}) < len(columns):
        raise FormatError(f"two fields are mapped to one column in {text!r}")
    return columns


def sniff_delimiter(path: Path, gzipped: bool, encoding: str) -> str:
    """The delimiter of a CSV among `, ; tab |`, guessed from its first lines (a comma if the
    guess fails: the header check then names what it found)."""
    with open_path(path, gzipped) as f:
        sample = read_gzip_safely(path, lambda: f.read(SNIFF_BYTES), 1)
    if len(sample) == SNIFF_BYTES:
        sample = sample[: sample.rfind(b"\n") + 1] or sample  # whole lines only
    text = sample.decode(encoding, errors="replace").removeprefix("\ufeff")
    try:
        return csv.Sniffer().sniff(text, delimiters=SNIFFED_DELIMITERS).delimiter
    except csv.Error:
        return DEFAULT_DELIMITER


def open_path(path: str | Path, gzipped: bool) -> BinaryIO:
    """The file's bytes, decompressed if it is gzipped."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (handed to the caller, who closes it)
    except OSError as exc:
        raise SourceError(path, f"cannot read ({exc.strerror})") from None
    if not gzipped:
        return f
    return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]


# Errors a gzip stream raises when it is damaged or cut short.
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
T = TypeVar("T")


def read_gzip_safely(path: str | os.PathLike[str], read: Callable[[], T], line: int | None) -> T:
    """`read()`, with a damaged gzip stream turned into a SourceError naming file (and line)."""
    try:
        return read()
    except GZIP_ERRORS as exc:
        raise ContentError(path, f"not a valid gzip file ({exc})", line) from None


@contextmanager
def positioned(source: dict[str, Any], offset: int) -> Iterator[BinaryIO]:
    """The file's (decompressed) bytes from `offset` on."""
    if not format_of(source).gzip:
        with open_path(source["path"], False) as f:
            f.seek(offset)
            yield f
        return
    reader = _gzip_readers.take(source, offset)
    try:
        yield reader
    except BaseException:
        reader.close()  # where a failed read left it is unknown
        raise
    _gzip_readers.give_back(source, reader)


class _GzipReaders:
    """A few open decompressors per input; a read takes the one furthest along that has not
    passed its offset, so reading batches in order decompresses the file once."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str], list[BinaryIO]] = {}
        self._lock = threading.Lock()

    def take(self, source: dict[str, Any], offset: int) -> BinaryIO:
        with self._lock:
            idle = self._idle.setdefault((source["path"], source["sha256"]), [])
            behind = [r for r in idle if r.tell() <= offset]
            if behind:
                reader = max(behind, key=lambda r: r.tell())
                idle.remove(reader)
            else:
                reader = open_path(source["path"], True)
        read_gzip_safely(source["path"], lambda: reader.seek(offset), None)  # forward: decompresses the gap
        return reader

    def give_back(self, source: dict[str, Any], reader: BinaryIO) -> None:
        with self._lock:
            idle = self._idle.setdefault((source["path"], source["sha256"]), [])
            idle.append(reader)
            while len(idle) > _GZIP_READERS_KEPT:
                idle.pop(0).close()


_gzip_readers = _GzipReaders()


def undecodable(path: str, line: int, encoding: str, exc: UnicodeDecodeError) -> ContentError:
    """What a line that is not valid in the file's encoding is refused with: the byte, and the
    --encoding to give (with a new id, once batches of the import committed)."""
    flag = "--encoding latin-1" if encoding == DEFAULT_ENCODING else "--encoding ENCODING"
    shown = "UTF-8" if encoding == DEFAULT_ENCODING else encoding
    byte = exc.object[exc.start]
    return ContentError(
        path, f"not valid {shown} (byte 0x{byte:02x} at byte {exc.start} of the line: {exc.reason})",
        line, remedy=f"give the file's encoding with {flag}",
        late_remedy=f"import it again under a new id with {flag} --id NEW (an import keeps its "
        "encoding; the new one skips the rows this one imported, as already_imported)")
