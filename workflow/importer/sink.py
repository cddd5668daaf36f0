"""The import's real database: SQLite, written so that anyone can check the invariants from it.

Tables: `records` (one row per imported record, keyed by its id), `skipped` (one row per input
record that was not imported, with the reason), `batch_commits` (one row per committed batch,
keyed by its promise id, written in the same transaction as its rows) and `executions` (one row
per invocation of the batch step, committed when it starts, finished when its batch commits).
"""

from __future__ import annotations

import errno
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from ..errors import PermanentError
from . import records
from .sources import Row

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    import_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    name TEXT,
    email TEXT,
    extra TEXT,
    UNIQUE (import_id, position)
);
CREATE TABLE IF NOT EXISTS skipped (
    import_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    line INTEGER NOT NULL,
    record_id TEXT,
    reason TEXT NOT NULL,
    PRIMARY KEY (import_id, position)
);
CREATE TABLE IF NOT EXISTS batch_commits (
    promise_id TEXT PRIMARY KEY,
    import_id TEXT NOT NULL,
    batch INTEGER NOT NULL,
    summary TEXT NOT NULL,
    committed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    promise_id TEXT NOT NULL,
    batch INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    outcome TEXT,
    code TEXT
);
"""
# Columns added since a table was first created: (table, column, declaration).
ADDED_COLUMNS = [("executions", "code", "TEXT")]


_IDS_PER_QUERY = 500


class SinkError(PermanentError):
    """The sink database cannot be used; names the file. No retry can fix it."""


class SinkStorageError(SinkError):
    """The disk refused a write to the sink (full, over quota, over the file size limit, or a
    failed write or fsync). Retrying at once cannot help, so it is not retried; the transaction
    in flight was rolled back, so nothing of it is in the database."""

    def __init__(self, path: Path, fault: str, remedy: str, cause: BaseException, action: str) -> None:
        super().__init__(f"{path}: {fault} ({cause}) while {action}; {remedy}, then retry")


_FREE_SPACE = "free space"
_FSYNC_FAILED = ("fsync failed", "check the disk")

# (fault, remedy) of what the disk refused, by SQLite's extended result code or the errno of an
# OSError. A full disk (ENOSPC) is SQLITE_FULL; a write past RLIMIT_FSIZE (EFBIG) is
# SQLITE_IOERR_WRITE, as is any other failed write (SQLite does not tell which).
_SQLITE_FAULTS = {
    "SQLITE_FULL": ("disk full", _FREE_SPACE),
    "SQLITE_IOERR_WRITE": ("disk full or write failed", _FREE_SPACE),
    "SQLITE_IOERR_FSYNC": _FSYNC_FAILED,
    "SQLITE_IOERR_DIR_FSYNC": _FSYNC_FAILED,
}
_ERRNO_FAULTS = {
    errno.ENOSPC: ("disk full", _FREE_SPACE),
    errno.EDQUOT: ("disk full (quota exceeded)", _FREE_SPACE),
    errno.EFBIG: ("disk full (file size limit)", _FREE_SPACE),
}


def _storage_fault(exc: BaseException) -> tuple[str, str] | None:
    """(fault, remedy) if `exc` is a write or fsync the disk refused; None for any other error."""
    if isinstance(exc, sqlite3.Error):
        return _SQLITE_FAULTS.get(getattr(exc, "sqlite_errorname", None))
    if isinstance(exc, OSError):
        return _ERRNO_FAULTS.get(exc.errno)
    return None


class Sink:
    """The SQLite sink; a batch's rows and its commit row are one durable transaction."""

    def __init__(self, path: str | Path, *, durable: bool = True) -> None:
        """`durable=False` commits without syncing (survives kills, not power loss), like
        the store's `Durability.NONE`."""
        self.path = Path(path)
        self._commit_sync = "FULL" if durable else "NORMAL"
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        except sqlite3.Error as exc:
            raise SinkError(f"{self.path}: cannot open the import database ({exc})") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={self._commit_sync}")
            self._db.executescript(SCHEMA)
            self._add_missing_columns()
        except sqlite3.Error as exc:
            self._db.close()
            raise SinkError(f"{self.path}: cannot open the import database ({exc})") from exc

    def close(self) -> None:
        self._db.close()

    def _add_missing_columns(self) -> None:
        """Bring a database made by an older version up to the schema (imports in flight keep it)."""
        for table, column, declaration in ADDED_COLUMNS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    @contextmanager
    def _storage_faults(self, action: str) -> Iterator[None]:
        """Turn a write or fsync the disk refused into a SinkStorageError naming this file."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            fault = _storage_fault(exc)
            if fault is None:
                raise
            raise SinkStorageError(self.path, *fault, exc, action) from exc

    def start_execution(self, promise_id: str, batch: int, attempt: int, pid: int, code: str) -> int:
        """Record that a batch step starts, and which code runs it (`process_batch v2`).
        Survives a process kill at once; becomes durable against power loss with the next
        synchronous commit (the batch's own)."""
        with self._storage_faults(f"starting batch {batch}"):
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                cursor = self._db.execute(
                    "INSERT INTO executions (promise_id, batch, attempt, pid, started_at, code) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (promise_id, batch, attempt, pid, time.time(), code),
                )
            finally:
                self._db.execute(f"PRAGMA synchronous={self._commit_sync}")
        return cursor.lastrowid

    def find_commit(self, promise_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT summary FROM batch_commits WHERE promise_id = ?", (promise_id,)
        ).fetchone()
        return None if row is None else orjson.loads(row[0])

    def finish_execution(self, execution: int, outcome: str) -> None:
        with self._storage_faults(f"recording the outcome of execution {execution}"):
            self._set_outcome(execution, outcome)

    def _set_outcome(self, execution: int, outcome: str) -> None:
        self._db.execute(
            "UPDATE executions SET finished_at = ?, outcome = ? WHERE id = ?",
            (time.time(), outcome, execution),
        )

    def commit_batch(
        self,
        promise_id: str,
        import_id: str,
        batch: int,
        rows: Iterable[Row],
        execution: int,
        halfway: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        """Write a batch's rows, skipped rows and commit row in one transaction; return its summary.

        `halfway` runs after half the rows are inserted, before the commit (a failpoint). A
        write the disk refuses is a SinkStorageError, and nothing of the batch is kept.
        """
        rows = list(rows)
        with self._storage_faults(f"committing batch {batch}"):
            return self._commit(promise_id, import_id, batch, rows, execution, halfway)

    def _commit(
        self,
        promise_id: str,
        import_id: str,
        batch: int,
        rows: list[Row],
        execution: int,
        halfway: Callable[[], None],
    ) -> dict[str, Any]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            good = [r for r in rows if r.problem is None]
            skipped = [(r, r.problem) for r in rows if r.problem is not None]
            before = self._db.total_changes
            half = len(good) // 2
            self._insert_records(import_id, batch, good[:half])
            halfway()
            self._insert_records(import_id, batch, good[half:])
            duplicates = []
            if self._db.total_changes - before != len(good):
                duplicates = self._duplicates(import_id, good)
                skipped += duplicates
            self._db.executemany(
                INSERT_SKIPPED, [skipped_row(import_id, batch, r, why) for r, why in skipped]
            )
            summary = {
                "batch": batch,
                "records": len(rows),
                "processed": len(good) - len(duplicates),
                "skipped": len(skipped),
                "reasons": dict(sorted(Counter(why for _, why in skipped).items())),
            }
            self._db.execute(
                "INSERT INTO batch_commits VALUES (?, ?, ?, ?, ?)",
                (promise_id, import_id, batch, orjson.dumps(summary).decode(), time.time()),
            )
            self._set_outcome(execution, "committed")
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite rolls back by itself on some errors (disk full)
                self._db.execute("ROLLBACK")
            raise
        return summary

    def _duplicates(self, import_id: str, good: list[Row]) -> list[tuple[Row, str]]:
        """The rows the insert ignored: their id was taken by an earlier record of this input
        (`duplicate_id`) or by another import into this database (`already_imported`)."""
        lo, hi = good[0].position, good[-1].position
        inserted = {p for (p,) in self._db.execute(
            "SELECT position FROM records WHERE import_id = ? AND position BETWEEN ? AND ?",
            (import_id, lo, hi),
        )}
        ignored = [r for r in good if r.position not in inserted]
        owners: dict[str, str] = {}
        for i in range(0, len(ignored), _IDS_PER_QUERY):  # SQLite caps a query's parameters
            chunk = [r.record_id for r in ignored[i : i + _IDS_PER_QUERY]]
            owners.update(self._db.execute(
                f"SELECT id, import_id FROM records WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ))
        return [
            (r, records.DUPLICATE_ID if owners.get(r.record_id) == import_id else records.ALREADY_IMPORTED)
            for r in ignored
        ]

    def _insert_records(self, import_id: str, batch: int, rows: list[Row]) -> None:
        """Insert rows; one whose id is already taken is ignored (first occurrence wins)."""
        self._db.executemany(INSERT_RECORD, [record_row(import_id, batch, r) for r in rows])


INSERT_RECORD = "INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)"
INSERT_SKIPPED = "INSERT INTO skipped VALUES (?, ?, ?, ?, ?, ?)"


def record_row(import_id: str, batch: int, row: Row) -> tuple[Any, ...]:
    """The `records` row of an importable input row; fields beyond the required ones go to `extra`."""
    record = row.record
    extra = None
    if len(record) > len(records.REQUIRED_FIELDS):  # it has all of them: it is importable
        extra = orjson.dumps(records.extra_fields(record)).decode()
    return (row.record_id, import_id, row.position, batch, record["name"], record["email"], extra)


def skipped_row(import_id: str, batch: int, row: Row, reason: str) -> tuple[Any, ...]:
    return (import_id, row.position, batch, row.line, row.record_id, reason)
