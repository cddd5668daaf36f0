"""The import's real database on PostgreSQL, for imports that run on many machines.

The SQLite sink's tables and columns (`records`, `skipped`, `batch_commits`, `executions`), so
the invariants are checked from it the same way. A batch's rows, its commit row and its
execution's outcome are written in the fleet executor's step transaction, the one that also
resolves the batch's promise: the batch is committed and resolved at once, or not at all, so a
`found_commit` never happens here. An execution's start is committed at once on the sink's own
connection, so an invocation that dies leaves its row with an empty outcome.

Types: timestamps are epoch seconds (double precision, as SQLite's REAL) read from the server's
clock, one clock for every machine of the fleet; a batch's summary is jsonb; a record's `extra`
stays the JSON text SQLite keeps (jsonb would refuse `\\u0000` and reorder its keys).
PostgreSQL's text cannot hold NUL, nor its index an id over MAX_ID_BYTES: a record that needs
either, which SQLite would take, is skipped here as `unstorable_value`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from ..context import current_step
from . import batch_rows, forks, records
from .batch_rows import Skip, record_row, skipped_row
from .sink import SinkError, SinkStorageError
from .sources import Row

# Each entry brings the schema from the version of its index to the next; the version a
# database has is the one row of `sink_schema`. Append to change the schema; never edit one.
MIGRATIONS = (
    """
    CREATE TABLE IF NOT EXISTS sink_schema (version integer NOT NULL);
    INSERT INTO sink_schema SELECT 0 WHERE NOT EXISTS (SELECT FROM sink_schema);
    CREATE TABLE IF NOT EXISTS records (
        id text PRIMARY KEY,
        import_id text NOT NULL,
        position bigint NOT NULL,
        batch bigint NOT NULL,
        name text,
        email text,
        extra text
    );
    CREATE TABLE IF NOT EXISTS skipped (
        import_id text NOT NULL,
        position bigint NOT NULL,
        batch bigint NOT NULL,
        line bigint NOT NULL,
        record_id text,
        reason text NOT NULL,
        PRIMARY KEY (import_id, position)
    );
    CREATE TABLE IF NOT EXISTS batch_commits (
        promise_id text PRIMARY KEY,
        import_id text NOT NULL,
        batch bigint NOT NULL,
        summary jsonb NOT NULL,
        committed_at double precision NOT NULL
    );
    CREATE TABLE IF NOT EXISTS executions (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        promise_id text NOT NULL,
        batch bigint NOT NULL,
        attempt integer NOT NULL,
        pid integer NOT NULL,
        started_at double precision NOT NULL,
        finished_at double precision,
        outcome text,
        code text
    )
    """,
    forks.TABLE,
)
SCHEMA_VERSION = len(MIGRATIONS)
# The advisory lock that processes opening one database at once make its schema under, in turn.
SCHEMA_LOCK = int.from_bytes(b"dur.sink", "big")
# An index entry holds at most 2,704 bytes (a third of a page); an id a bit under that always fits.
MAX_ID_BYTES = 2_600
_NUL = "\x00"

_NOW = "extract(epoch FROM clock_timestamp())::double precision"
_SET_OUTCOME = f"UPDATE executions SET finished_at = {_NOW}, outcome = %s WHERE id = %s"
# A batch's records are copied into a temporary table, then inserted from it: a record whose id
# is taken is ignored (the first occurrence wins), then counted. A batch of 1,000 commits a fifth
# faster than with one INSERT per row (executemany, pipelined); one of 100 as fast, within 0.2
# ms. The table is declared in every step's transaction: a session that lacks it (a new one, or
# one whose creating transaction rolled back) gets it there.
_INCOMING = """
    CREATE TEMPORARY TABLE IF NOT EXISTS sink_incoming (
        ord integer, id text, import_id text, position bigint, batch bigint,
        name text, email text, extra text
    ) ON COMMIT DELETE ROWS
"""
_INSERT_RECORDS = (
    "INSERT INTO records SELECT id, import_id, position, batch, name, email, extra "
    "FROM sink_incoming WHERE ord >= %s AND ord < %s ORDER BY ord ON CONFLICT (id) DO NOTHING"
)


class SinkConnectionError(Exception):
    """The connection to the sink's server failed or was lost. Not permanent: the step is
    retried, and the sink connects again when next used."""

    def __init__(self, where: str, cause: BaseException, action: str) -> None:
        super().__init__(f"{where}: connection lost ({cause}) while {action}; a retry connects again")


# (fault, remedy) of what the server's disk refused, by the error's SQLSTATE.
_STORAGE_FAULTS: tuple[tuple[type[psycopg.Error], tuple[str, str]], ...] = (
    (pg_errors.DiskFull, ("disk full on the database server", "free space there")),
    (pg_errors.IoError, ("I/O error on the database server", "check its disk")),
)


def _location(url: str) -> str:
    """The database a URL names, without its user or password: `postgresql://host:port/dbname`."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise SinkError(f"not a PostgreSQL URL or connection string ({exc})") from exc
    port = params.get("port")
    host = f"{params.get('host') or 'localhost'}{f':{port}' if port else ''}"
    return f"postgresql://{host}/{params.get('dbname') or ''}"


class PgSink:
    """The PostgreSQL sink; a batch's rows, its commit row and its promise's resolve are one
    transaction (the fleet executor's)."""

    def __init__(self, url: str) -> None:
        """Connect (autocommit, for executions and reads) and make or update the schema."""
        self.url = url
        self.where = _location(url)
        self._db = self._connect()
        try:
            self._make_schema()
        except BaseException:
            self._db.close()
            raise

    def __reduce__(self) -> tuple[Callable[..., PgSink], tuple[str]]:
        """A PgSink sent to another process (a spawned pool) connects again there."""
        return PgSink, (self.url,)

    def close(self) -> None:
        """Close the sink's own connection; idempotent."""
        self._db.close()

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise SinkConnectionError(self.where, exc, "connecting") from exc

    def _own(self) -> psycopg.Connection:
        """The sink's own connection, made again if the last one was lost (a retried step then
        finds it working)."""
        if self._db.broken:
            self._db = self._connect()
        return self._db

    def _make_schema(self) -> None:
        """Create or migrate the tables under an advisory lock, so processes opening a new
        database at once take turns (CREATE TABLE IF NOT EXISTS alone races in the catalog)."""
        db = self._db
        with self._faults(db, "creating its tables"), db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            version = 0
            if db.execute("SELECT to_regclass('sink_schema') IS NOT NULL").fetchone()[0]:
                version = db.execute("SELECT version FROM sink_schema").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SinkError(f"{self.where}: the import tables are of version {version}, made by "
                                f"a newer version of this program (this one knows {SCHEMA_VERSION})")
            for migration in MIGRATIONS[version:]:
                db.execute(migration)
            if version < SCHEMA_VERSION:
                db.execute("UPDATE sink_schema SET version = %s", (SCHEMA_VERSION,))

    @contextmanager
    def _faults(self, db: psycopg.Connection, action: str) -> Iterator[None]:
        """A write the server's disk refused becomes a SinkStorageError (permanent, as in the
        SQLite sink); a lost connection a SinkConnectionError (retried)."""
        try:
            yield
        except psycopg.Error as exc:
            for kind, fault in _STORAGE_FAULTS:
                if isinstance(exc, kind):
                    raise SinkStorageError(self.where, *fault, exc, action) from exc
            if db.broken:
                raise SinkConnectionError(self.where, exc, action) from exc
            raise

    def start_execution(self, promise_id: str, batch: int, attempt: int, pid: int, code: str) -> int:
        """Record that a batch step starts, and which code runs it; committed at once."""
        db = self._own()
        with self._faults(db, f"starting batch {batch}"):
            return db.execute(
                "INSERT INTO executions (promise_id, batch, attempt, pid, started_at, code) "
                f"VALUES (%s, %s, %s, %s, {_NOW}, %s) RETURNING id",
                (promise_id, batch, attempt, pid, code),
            ).fetchone()[0]

    def finish_execution(self, execution: int, outcome: str) -> None:
        """Record an execution's outcome; committed at once."""
        db = self._own()
        with self._faults(db, f"recording the outcome of execution {execution}"):
            db.execute(_SET_OUTCOME, (outcome, execution))

    def find_commit(self, promise_id: str) -> dict[str, Any] | None:
        """The summary of the batch `promise_id` if it was committed, else None."""
        db = self._own()
        with self._faults(db, f"looking for the commit of {promise_id}"):
            row = db.execute("SELECT summary FROM batch_commits WHERE promise_id = %s",
                             (promise_id,)).fetchone()
        return None if row is None else row[0]

    def commit_batch(
        self,
        promise_id: str,
        import_id: str,
        batch: int,
        rows: Iterable[Row],
        execution: int,
        halfway: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        """Write a batch's rows, skipped rows, commit row and the execution's outcome in the
        step's transaction, which the caller commits with the promise's resolve (never here);
        return the batch's summary.

        `halfway` runs after half the rows are inserted (a failpoint). A batch committed
        already (by an executor that took this step's claim over) is a SinkError: its promise
        was resolved with it, so this execution should not have run. One committing at this
        moment is waited for, then is that error, or was rolled back and leaves the batch to us.
        """
        db = _step_transaction()
        rows = list(rows)
        importable, skipped = batch_rows.split(rows)
        good = []
        for row in importable:
            if _storable(row):
                good.append(row)
            else:
                skipped.append((row, records.UNSTORABLE_VALUE))
        with self._faults(db, f"committing batch {batch}"):
            kin = self._take_over(db, import_id, batch)
            duplicates = self._insert_records(db, import_id, batch, good, halfway, kin)
            skipped += duplicates
            summary = batch_rows.summary(batch, len(rows), len(good) - len(duplicates), skipped)
            try:
                db.execute(f"INSERT INTO batch_commits VALUES (%s, %s, %s, %s::jsonb, {_NOW})",
                           (promise_id, import_id, batch, orjson.dumps(summary).decode()))
            except pg_errors.UniqueViolation as exc:
                raise SinkError(f"{self.where}: batch {batch} ({promise_id}) was committed already, "
                                "with its promise's resolve: this execution should not have run "
                                "(was its claim taken over?)") from exc
            with db.cursor() as cursor, cursor.copy("COPY skipped FROM STDIN") as copy:
                for row in _skipped_rows(import_id, batch, skipped):
                    copy.write_row(row)
            db.execute(_SET_OUTCOME, ("committed", execution))
        return summary

    def _take_over(self, db: psycopg.Connection, import_id: str, batch: int) -> list[str]:
        """In a fork's batch transaction: delete what its ancestors wrote for the batch (see
        forks.py); return the ancestors (none for an import that is no fork)."""
        ancestors = [a for (a,) in db.execute(forks.ancestors_sql("%s"), (import_id,))]
        for statement in forks.take_over_sql("%s", len(ancestors)) if ancestors else []:
            db.execute(statement, (batch, *ancestors))
        return ancestors

    def record_fork(self, import_id: str, parent_id: str, from_batch: int) -> None:
        """Record that `import_id` is a fork of `parent_id` from batch `from_batch` (committed
        before the fork's first batch can run); a SinkError if it was recorded otherwise."""
        db = self._own()
        with self._faults(db, f"recording the fork {import_id}"):
            db.execute(forks.record_sql("%s"), (import_id, parent_id, from_batch))
            why = forks.refused(import_id, db.execute(forks.parent_sql("%s"), (import_id,)).fetchone(),
                                (parent_id, from_batch))
        if why is not None:
            raise SinkError(f"{self.where}: {why}")

    def _insert_records(
        self, db: psycopg.Connection, import_id: str, batch: int, good: list[Row],
        halfway: Callable[[], None], kin: list[str],
    ) -> list[Skip]:
        """Insert the importable rows, half, `halfway()`, then the rest; return the ignored ones
        with their reason. Rows go in by id: batches in flight at once that share ids then wait
        for each other in one order, never in a deadlock (the first occurrence still wins)."""
        ordered = sorted(good, key=lambda r: (r.record_id, r.position))
        db.execute(_INCOMING)
        with db.cursor() as cursor, cursor.copy("COPY sink_incoming FROM STDIN") as copy:
            for n, row in enumerate(ordered):
                copy.write_row((n, *record_row(import_id, batch, row)))
        half = len(ordered) // 2
        inserted = db.execute(_INSERT_RECORDS, (0, half)).rowcount
        halfway()
        inserted += db.execute(_INSERT_RECORDS, (half, len(ordered))).rowcount
        if inserted == len(good):
            return []
        ids = list(dict.fromkeys(r.record_id for r in good))
        holders = {rid: (imp, pos) for rid, imp, pos in db.execute(
            "SELECT id, import_id, position FROM records WHERE id = ANY(%s)", (ids,))}
        return batch_rows.ignored(import_id, good, holders, kin)


def _step_transaction() -> psycopg.Connection:
    """The fleet executor's transaction of the step running now: open, or about to begin with
    the first statement (a connection out of autocommit); a SinkError if there is none."""
    try:
        db = current_step().transaction
    except RuntimeError:  # not inside a step at all
        db = None
    if db is None:
        raise SinkError("the PostgreSQL sink commits a batch only in a fleet executor's step "
                        "transaction (current_step().transaction), and this step has none")
    status = db.info.transaction_status
    if status != TransactionStatus.INTRANS and (status != TransactionStatus.IDLE or db.autocommit):
        raise SinkError(f"the step's transaction is not open (its connection is {status.name}"
                        f"{', in autocommit' if db.autocommit else ''}): the PostgreSQL sink "
                        "writes a batch only inside one")
    return db


def _storable(row: Row) -> bool:
    """Whether PostgreSQL can keep the record: no NUL in its text columns (`extra` is JSON,
    where NUL is escaped), an id its index can hold."""
    rid, record = row.record_id, row.record
    if _NUL in rid or _NUL in record["name"] or _NUL in record["email"]:
        return False
    return len(rid) <= MAX_ID_BYTES // 4 or len(rid.encode()) <= MAX_ID_BYTES


def _skipped_rows(import_id: str, batch: int, skipped: list[Skip]) -> Iterator[tuple[Any, ...]]:
    """The `skipped` rows; a NUL in a record id (text cannot hold it) is shown as U+FFFD."""
    for row, why in skipped:
        imp, position, b, line, record_id, reason = skipped_row(import_id, batch, row, why)
        if record_id is not None and _NUL in record_id:
            record_id = record_id.replace(_NUL, "\ufffd")
        yield imp, position, b, line, record_id, reason


def open_read_only(url: str) -> psycopg.Connection:
    """A connection that reads the sink's tables and cannot write them, for tools and audits:
    its queries share one snapshot (a repeatable-read, read-only transaction) until it commits."""
    where = _location(url)
    try:
        db = psycopg.connect(url)
    except psycopg.OperationalError as exc:
        raise SinkConnectionError(where, exc, "connecting to read") from exc
    db.read_only = True
    db.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        if not db.execute("SELECT to_regclass('sink_schema') IS NOT NULL").fetchone()[0]:
            raise SinkError(f"{where}: no import tables there")
    except BaseException:
        db.close()
        raise
    return db
