"""Reading an import's `executions` back from its sink, for tools that show what ran (`status`).

One row per invocation of a batch step: which process ran it, which attempt it was, when it
started and finished, and its outcome (`committed`, `found_commit`, or None while it runs or
after it died). Read-only: the SQLite sink through `open_read_only`, PostgreSQL in a read-only
transaction; a sink that has no `executions` table yet holds none.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from .sink import SinkError, open_read_only

_COLUMNS = ("promise_id", "batch", "attempt", "pid", "started_at", "finished_at", "outcome")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM executions WHERE promise_id >= ? AND promise_id < ? ORDER BY id"
_SELECT_PG = (f"SELECT {', '.join(_COLUMNS)} FROM executions "
              'WHERE promise_id COLLATE "C" >= %s AND promise_id COLLATE "C" < %s ORDER BY id')


def read_executions(sink: Path | str, root_id: str) -> list[dict[str, Any]]:
    """The executions of the import `root_id`'s batches, in the order they started; `sink` is
    the SQLite file or a postgresql:// URL. SinkError if the sink cannot be read."""
    low, high = f"{root_id}.", f"{root_id}/"  # '/' follows '.': every `<root>.<n>` is between
    if isinstance(sink, str) and sink.startswith(("postgresql:", "postgres:")):
        rows = _from_postgresql(sink, low, high)
    else:
        rows = _from_sqlite(Path(sink), low, high)
    return [dict(zip(_COLUMNS, row, strict=True)) for row in rows]


def _from_sqlite(path: Path, low: str, high: str) -> list[tuple[Any, ...]]:
    if not path.is_file():
        return []
    db = _reader(path)
    try:
        return db.execute(_SELECT, (low, high)).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise SinkError(f"{path}: cannot read the executions ({exc})") from exc
    finally:
        db.close()


def _reader(path: Path) -> sqlite3.Connection:
    """A read-only connection that leaves the state dir as it found it. Without a WAL file (no
    writer has it open: the last one to close folded it into the database), the file alone holds
    every commit, and reading it as immutable creates no `-wal`/`-shm` beside it, which a plain
    read-only reader would."""
    if path.with_name(path.name + "-wal").exists():
        return open_read_only(path)
    return sqlite3.connect(f"{path.absolute().as_uri()}?immutable=1", uri=True)


def _from_postgresql(url: str, low: str, high: str) -> list[tuple[Any, ...]]:
    import psycopg  # loaded only for a sink in PostgreSQL

    try:
        with psycopg.connect(url) as db:
            db.read_only = True
            if db.execute("SELECT to_regclass('executions')").fetchone()[0] is None:
                return []
            return db.execute(_SELECT_PG, (low, high)).fetchall()
    except psycopg.Error as exc:
        raise SinkError(f"cannot read the executions from PostgreSQL ({exc})") from exc
