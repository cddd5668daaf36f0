"""The import's real database: SQLite, written so that anyone can check the invariants from it.

Tables: `records` (one row per imported record, keyed by its id), `skipped` (one row per input
record that was not imported, with the reason), `batch_commits` (one row per committed batch,
keyed by its promise id, written in the same transaction as its rows) and `executions` (one row
per invocation of the batch step, committed when it starts, finished when its batch commits).

Several processes may write at once (a pool of step processes, a Sink each): the database is in
WAL mode, every writing transaction takes the write lock first (BEGIN IMMEDIATE) and waits for it
up to BUSY_TIMEOUT_S, and only a batch's commit syncs the disk. Writers also queue for their turn
on a lock file (`import.db.writers`, flock) before they ask SQLite: the kernel wakes the next
writer the moment one is done, where SQLite's busy handler would poll, sleeping milliseconds.
A batch commits into the WAL without a sync (synchronous=NORMAL), lets the write lock go, then
fdatasyncs the WAL itself before it returns: the lock is held for the inserts only, and the syncs
of several writers overlap (one can cover another's commit) instead of queueing behind the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from ..errors import PermanentError
from . import batch_rows, forks
from .batch_rows import record_row, skipped_row
from .sources import Row

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    import_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    name TEXT,
    email TEXT,
    extra TEXT
) WITHOUT ROWID;
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
""" + forks.TABLE
TABLES = ("records", "skipped", "batch_commits", "executions", "forks")
# Columns added since a table was first created: (table, column, declaration).
ADDED_COLUMNS = [("executions", "code", "TEXT")]


_IDS_PER_QUERY = 500
# How long a writer waits for another's write lock before `database is locked`: far longer than
# any batch transaction holds it (they prepare their rows before taking it).
BUSY_TIMEOUT_S = 30.0
# WAL pages (4 KiB) before a batch's commit checkpoints them into the database file. A checkpoint
# costs syncs (the WAL, the database); at ~25 pages per batch of 100 records, 2,000 pages (~8 MiB
# of WAL) make that one checkpoint per ~80 batches, and keep what a restarted worker reads to
# rebuild the WAL's index (all of the WAL) small.
CHECKPOINT_PAGES = 2_000
# The WAL-index header (in `<db>-shm`, SQLite's documented WAL-index format) keeps mxFrame, the
# WAL's valid frames since it last restarted, as a native unsigned 32-bit int at this offset.
_SHM_MAX_FRAME = struct.Struct("=I")
_SHM_MAX_FRAME_OFFSET = 16
_SWITCH_RETRY_S = 0.01


class SinkError(PermanentError):
    """The sink database cannot be used; names the file (or the PostgreSQL database). No retry
    can fix it."""


class SinkStorageError(SinkError):
    """The disk refused a write to the sink (full, over quota, over the file size limit, or a
    failed write or fsync). Retrying at once cannot help, so it is not retried; the transaction
    in flight was rolled back, so nothing of it is in the database."""

    def __init__(self, where: Path | str, fault: str, remedy: str, cause: BaseException, action: str) -> None:
        super().__init__(f"{where}: {fault} ({cause}) while {action}; {remedy}, then retry")


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
        self._durable = durable
        self._shm = -1  # the WAL-index, once read (see _wal_frames)
        try:
            self._turns = os.open(f"{self.path}.writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SinkError(f"{self.path}: cannot open the import database ({exc.strerror})") from exc
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        except sqlite3.Error as exc:
            os.close(self._turns)
            raise SinkError(f"{self.path}: cannot open the import database ({exc})") from exc
        try:
            self._configure()
        except sqlite3.Error as exc:
            self.close()
            raise SinkError(f"{self.path}: cannot open the import database ({exc})") from exc

    def __reduce__(self) -> tuple[Callable[..., Sink], tuple[Path, bool]]:
        """A Sink sent to another process (a spawned pool) opens its own connection there: an
        SQLite connection must not cross a process boundary."""
        return _reopen, (self.path, self._durable)

    def close(self) -> None:
        """Close the connection, then the files kept open beside it; idempotent."""
        self._db.close()
        for name in ("_turns", "_shm"):
            fd = getattr(self, name)
            setattr(self, name, -1)
            if fd >= 0:
                os.close(fd)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """This process's turn to write: writers queue in the kernel, woken one by one."""
        fcntl.flock(self._turns, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turns, fcntl.LOCK_UN)

    def _configure(self) -> None:
        """WAL mode (a database an older version made in rollback-journal mode is switched), the
        checkpoint interval, the commit's sync; then the schema, made or brought up to date in
        one write transaction, so that processes opening a new database at once never race."""
        self._switch_to_wal()
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # ours come after the writer's turn
        self._db.execute("PRAGMA synchronous=NORMAL")  # a batch's commit syncs the WAL itself
        if self._schema_is_current():  # no write lock to wait for while others commit
            return
        with self._write():
            for statement in SCHEMA.split(";"):
                self._db.execute(statement)
            for table, column, declaration in self._missing_columns():
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def _switch_to_wal(self) -> None:
        """Switching a database to WAL needs it to itself, and SQLite does not wait for that
        (no busy handler): when processes open an old database at once, retry up to the busy
        timeout. A database already in WAL mode stays there without any lock."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                    raise
                time.sleep(_SWITCH_RETRY_S)
        if mode != "wal":
            raise sqlite3.OperationalError(f"it stays in journal mode {mode}, WAL was refused")

    def _schema_is_current(self) -> bool:
        have = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return set(TABLES) <= have and not self._missing_columns()

    def _missing_columns(self) -> list[tuple[str, str, str]]:
        """The columns a database made by an older version lacks (imports in flight keep it)."""
        return [(table, column, declaration) for table, column, declaration in ADDED_COLUMNS
                if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}]

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction that takes the write lock before it reads: a transaction that read
        first and then found another writer's commit in its way would fail at once with
        SQLITE_BUSY (its snapshot is stale), which the busy timeout does not wait out."""
        with self._turn():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite rolls back by itself on some errors (disk full)
                    self._db.execute("ROLLBACK")
                raise

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
        # One statement in autocommit mode: its transaction writes before it reads anything.
        with self._storage_faults(f"starting batch {batch}"), self._turn():
            cursor = self._db.execute(
                "INSERT INTO executions (promise_id, batch, attempt, pid, started_at, code) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (promise_id, batch, attempt, pid, time.time(), code),
            )
        return cursor.lastrowid

    def find_commit(self, promise_id: str) -> dict[str, Any] | None:
        """The summary of the batch `promise_id` if it was committed, else None."""
        row = self._db.execute(
            "SELECT summary FROM batch_commits WHERE promise_id = ?", (promise_id,)
        ).fetchone()
        return None if row is None else orjson.loads(row[0])

    def finish_execution(self, execution: int, outcome: str) -> None:
        """Record an execution's outcome; like its start, durable with the next batch's commit."""
        with self._storage_faults(f"recording the outcome of execution {execution}"), self._turn():
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

        A batch another process committed meanwhile is not written again: its stored summary is
        returned and the execution recorded as `found_commit`. `halfway` runs after half the
        rows are inserted, before the commit (a failpoint). A write the disk refuses is a
        SinkStorageError, and nothing of the batch is kept.
        """
        rows = list(rows)
        with self._storage_faults(f"committing batch {batch}"):
            summary = self._commit(promise_id, import_id, batch, rows, execution, halfway)
            if self._durable:
                self._sync_wal()
            self._checkpoint_if_due()
        return summary

    def _checkpoint_if_due(self) -> None:
        """Copy the WAL into the database file once it holds CHECKPOINT_PAGES, after this
        writer's turn: a passive checkpoint lets the others commit meanwhile, where SQLite's own
        would run inside a commit and hold the next writer up for the whole copy and its syncs."""
        if self._wal_frames() >= CHECKPOINT_PAGES:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _wal_frames(self) -> int:
        """How many frames the WAL holds, read from the WAL-index without a lock (a value torn
        by a concurrent commit only moves a checkpoint by a batch). The -shm file stays open
        until the connection is closed: closing a descriptor of it would drop the POSIX locks
        SQLite holds on it in this process."""
        if self._shm < 0:
            try:
                self._shm = os.open(f"{self.path}-shm", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return 0
        header = os.pread(self._shm, _SHM_MAX_FRAME.size, _SHM_MAX_FRAME_OFFSET)
        return _SHM_MAX_FRAME.unpack(header)[0] if len(header) == _SHM_MAX_FRAME.size else 0

    def _sync_wal(self) -> None:
        """Make the commits in the WAL durable: what synchronous=FULL does at commit, done after
        the write lock is released. (Our connection is open, so the WAL file is the live one; SQLite
        locks the -shm and the database file, never the WAL, so opening and closing it here drops
        no lock of this process.)"""
        fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _commit(
        self,
        promise_id: str,
        import_id: str,
        batch: int,
        rows: list[Row],
        execution: int,
        halfway: Callable[[], None],
    ) -> dict[str, Any]:
        # Everything that needs no database is done before the write lock is taken.
        good, skipped = batch_rows.split(rows)
        inserts = [record_row(import_id, batch, r) for r in good]
        half = len(inserts) // 2
        with self._write():
            committed = self.find_commit(promise_id)
            if committed is not None:
                self._set_outcome(execution, "found_commit")
                return committed
            kin = self._take_over(import_id, batch)
            before = self._db.total_changes
            self._db.executemany(INSERT_RECORD, inserts[:half])
            halfway()
            self._db.executemany(INSERT_RECORD, inserts[half:])
            duplicates = []
            if self._db.total_changes - before != len(good):
                duplicates = batch_rows.ignored(import_id, good, self._holders(good), kin)
                skipped += duplicates
            self._db.executemany(
                INSERT_SKIPPED, [skipped_row(import_id, batch, r, why) for r, why in skipped]
            )
            summary = batch_rows.summary(batch, len(rows), len(good) - len(duplicates), skipped)
            self._db.execute(
                "INSERT INTO batch_commits VALUES (?, ?, ?, ?, ?)",
                (promise_id, import_id, batch, orjson.dumps(summary).decode(), time.time()),
            )
            self._set_outcome(execution, "committed")
        return summary

    def _take_over(self, import_id: str, batch: int) -> list[str]:
        """In a fork's batch transaction: delete what its ancestors wrote for the batch (see
        forks.py); return the ancestors (none for an import that is no fork)."""
        ancestors = [a for (a,) in self._db.execute(forks.ancestors_sql("?"), (import_id,))]
        for statement in forks.take_over_sql("?", len(ancestors)) if ancestors else []:
            self._db.execute(statement, (batch, *ancestors))
        return ancestors

    def record_fork(self, import_id: str, parent_id: str, from_batch: int) -> None:
        """Record that `import_id` is a fork of `parent_id` from batch `from_batch` (durably,
        before the fork's first batch can run); a SinkError if it was recorded otherwise."""
        with self._storage_faults(f"recording the fork {import_id}"), self._write():
            self._db.execute(forks.record_sql("?"), (import_id, parent_id, from_batch))
            why = forks.refused(import_id, self._db.execute(forks.parent_sql("?"), (import_id,)).fetchone(),
                                (parent_id, from_batch))
            if why is not None:
                raise SinkError(f"{self.path}: {why}")
        if self._durable:
            self._sync_wal()

    def _holders(self, good: list[Row]) -> dict[str, tuple[str, int]]:
        """Who holds the ids of `good` now: {id: (import_id, position)}."""
        holders: dict[str, tuple[str, int]] = {}
        ids = list(dict.fromkeys(r.record_id for r in good))
        for i in range(0, len(ids), _IDS_PER_QUERY):  # SQLite caps a query's parameters
            chunk = ids[i : i + _IDS_PER_QUERY]
            holders.update((rid, (imp, pos)) for rid, imp, pos in self._db.execute(
                f"SELECT id, import_id, position FROM records WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            ))
        return holders


def _reopen(path: Path, durable: bool) -> Sink:
    return Sink(path, durable=durable)


def open_read_only(path: str | Path) -> sqlite3.Connection:
    """A connection that reads the sink and cannot write it, for tools and tests.

    A reader of a WAL database needs its -wal and -shm files and creates them when they are
    missing (the last writer to close deletes them). One that may not create them (a directory
    it cannot write) reads the database file as immutable, which is right only because then no
    WAL holds commits the file lacks; a writer starting meanwhile is not seen.
    """
    path = Path(path)
    if not path.is_file():
        raise SinkError(f"{path}: no import database there")
    uri = path.absolute().as_uri()
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the WAL files, if any
        return db
    except sqlite3.OperationalError as exc:
        db.close()
        wal = path.with_name(path.name + "-wal")
        wal_is_empty = not wal.exists() or wal.stat().st_size == 0
        if exc.sqlite_errorname != "SQLITE_READONLY_DIRECTORY" or not wal_is_empty:
            raise SinkError(f"{path}: cannot read the import database ({exc})") from exc
    return sqlite3.connect(f"{uri}?immutable=1", uri=True)


# A record whose id is already taken is ignored (the first occurrence wins), then counted.
INSERT_RECORD = "INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)"
INSERT_SKIPPED = "INSERT INTO skipped VALUES (?, ?, ?, ?, ?, ?)"
