"""One thread's pipelined connection for the owner's hot path: a step costs one round trip.

A step's creation and first attempt go with the settle of the step before it, when the owner
held that one back (pg.py): one statement, one synchronous commit, waited for before the step
runs. A creation with no settle to carry is sent (with the lease's fence) and committed by the
server asynchronously, without the owner waiting for the answer; the step's settle is sent
after it on the same connection and waits for both answers. The server runs them in order, so
the creation is committed before the settle, and it is committed even if this process dies
right after sending it: like a write of the JSON-lines store, it survives a kill of the process
at once, and reaches the disk with the next synchronous commit. What the server answered to
the creation is checked with the settle's answer (a creation refused by the fence makes the
settle refused too).

Statements are prepared once per connection (libpq's pipeline mode, through psycopg's `pq`).
"""

from __future__ import annotations

import psycopg
from psycopg import pq

from .errors import StoreUnavailableError, StoreWriteError

_FENCE = ("fence AS (SELECT 1 FROM leases WHERE root = $1 AND epoch = $2 "
          "AND expires_at > now() FOR SHARE)")
# The pipe's session commits synchronously (the statement the owner sends most, a settle with
# the next creation, then carries nothing but its fence: a `set_config` in a statement costs
# it ~0.04 ms); a statement that need not wait for the disk says so for its own commit.
_LATER = "later AS (SELECT set_config('synchronous_commit', 'off', true)), "
_CREATE = ("INSERT INTO promises (id, param, created_at, attempts) "
           "SELECT $3, $4::jsonb, $5::float8, $6::int FROM fence, later")
# The owner settles only what it created and saw pending (its creation answered before this
# answer is read): a plain insert, and a second one is a unique violation that writes nothing.
_SETTLE = ("INSERT INTO settles (id, state, value, error, settled_at) "
           "SELECT $3, $4, $5::jsonb, $6::jsonb, $7::float8 FROM fence{}")
# A settle the owner held back (see pg.py), written in one transaction with the next step's
# creation and first attempt: one commit per step. The creation is made from the settle's row,
# so that neither is written without the other.
_SETTLE_AND_CREATE = ("s AS (INSERT INTO settles (id, state, value, error, settled_at) "
                      "SELECT $7, $8, $9::jsonb, $10::jsonb, $11::float8 FROM fence{} RETURNING 1) "
                      "INSERT INTO promises (id, param, created_at, attempts) "
                      "SELECT $3, $4::jsonb, $5::float8, $6::int FROM s")
_UNIQUE_VIOLATION = "23505"
_STATEMENTS = {
    b"create": f"WITH {_LATER}{_FENCE} {_CREATE}",
    b"settle": f"WITH {_FENCE} {_SETTLE.format('')}",
    b"settle_later": f"WITH {_LATER}{_FENCE} {_SETTLE.format(', later')}",
    b"settle_create": f"WITH {_FENCE}, {_SETTLE_AND_CREATE.format('')}",
    b"settle_create_later": f"WITH {_LATER}{_FENCE}, {_SETTLE_AND_CREATE.format(', later')}",
}


class RefusedCreation(Exception):
    """The server wrote no row for a creation sent earlier (its fence refused it)."""

    def __init__(self, promise_id: str) -> None:
        super().__init__(promise_id)
        self.promise_id = promise_id


class Pipe:
    """A connection in pipeline mode, for one thread (libpq connections are not shared)."""

    def __init__(self, url: str, where: str) -> None:
        self._where = where
        self._unanswered: list[tuple[str, str]] = []  # (what, promise id) per sync sent
        self._conn = pq.PGconn.connect(url.encode())
        if self._conn.status != pq.ConnStatus.OK:
            message = self._conn.get_error_message()
            self._conn.finish()
            raise StoreUnavailableError(f"{where}: cannot connect to PostgreSQL ({message})")
        self._conn.enter_pipeline_mode()
        self._conn.send_query_params(b"SET synchronous_commit = on", None)  # whatever the server's default
        for name, sql in _STATEMENTS.items():
            self._conn.send_prepare(name, sql.encode())
        self._sync("prepare", "")
        self.wait()

    @property
    def broken(self) -> bool:
        return self._conn.status != pq.ConnStatus.OK

    def send_creation(self, root: str, epoch: int, promise_id: str, param: str, created_at: float,
                      attempts: int) -> None:
        """Send a creation (asynchronous commit) without waiting for its answer."""
        self._conn.send_query_prepared(b"create", [
            root.encode(), b"%d" % epoch, promise_id.encode(), param.encode(), repr(created_at).encode(),
            b"%d" % attempts])
        self._sync("create", promise_id)

    def settle_and_create(self, root: str, epoch: int, held: tuple[str, str, str | None, str | None, float],
                          promise_id: str, param: str, created_at: float, *, durable: bool) -> bool:
        """Write a held settle (id, state, value, error, settled_at) and a step's creation with
        its first attempt in one transaction, and wait for it; whether it was written."""
        held_id, state, value, error, settled_at = held
        self._conn.send_query_prepared(b"settle_create" if durable else b"settle_create_later", [
            root.encode(), b"%d" % epoch, promise_id.encode(), param.encode(), repr(created_at).encode(),
            b"1", held_id.encode(), state.encode(), None if value is None else value.encode(),
            None if error is None else error.encode(), repr(settled_at).encode()])
        self._sync("creation with a held settle", promise_id)
        return self.wait()

    def settle(self, root: str, epoch: int, promise_id: str, state: str, value: str | None,
               error: str | None, settled_at: float, *, durable: bool) -> bool:
        """Send a settle and wait for it (and what was sent before it); whether it was written."""
        self._conn.send_query_prepared(b"settle" if durable else b"settle_later", [
            root.encode(), b"%d" % epoch, promise_id.encode(), state.encode(),
            None if value is None else value.encode(), None if error is None else error.encode(),
            repr(settled_at).encode()])
        self._sync("settle", promise_id)
        return self.wait()

    def wait(self) -> bool:
        """Wait for every answer owed; whether the last statement wrote a row. RefusedCreation
        for a creation the fence refused; StoreWriteError for a failure of the server."""
        wrote = True
        refused = None
        while self._unanswered:
            what, promise_id = self._unanswered.pop(0)
            wrote = self._answer_to(what, promise_id)
            if what == "create" and not wrote and refused is None:
                refused = promise_id
        if refused is not None:
            raise RefusedCreation(refused)
        return wrote

    def close(self) -> None:
        """Wait for what was sent (so it is committed), then end the connection."""
        try:
            if not self.broken:
                self.wait()
        except RefusedCreation:
            pass  # fenced out: a replay by the lease's holder creates that promise again
        finally:
            self._conn.finish()

    def _sync(self, what: str, promise_id: str) -> None:
        self._conn.pipeline_sync()
        self._unanswered.append((what, promise_id))
        if self._conn.flush():  # blocking mode: everything is sent when it returns
            raise StoreUnavailableError(f"{self._where}: could not send {what} of {promise_id}")

    def _answer_to(self, what: str, promise_id: str) -> bool:
        """Read one sync group's results: whether its last statement wrote (or returned) a row."""
        wrote = False
        failure = None
        while True:
            result = self._conn.get_result()
            if result is None:
                if self.broken:
                    raise StoreUnavailableError(f"{self._where}: the connection was lost while {what} of "
                                          f"{promise_id} was in flight ({self._conn.get_error_message()})")
                continue
            status = result.status
            if status == pq.ExecStatus.PIPELINE_SYNC:
                break
            if status == pq.ExecStatus.FATAL_ERROR and failure is None:
                code = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"XX000").decode()
                if code == _UNIQUE_VIOLATION:  # written before: the caller asks what is there
                    wrote = False
                    continue
                failure = f"{psycopg.errors.lookup(code).__name__}: {_message(result)}"
            elif status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                wrote = result.ntuples > 0 or (result.command_tuples or 0) > 0
        if failure is not None:
            raise StoreWriteError(f"{self._where}: {what} of promise {promise_id} failed ({failure})")
        return wrote


def _message(result: pq.abc.PGresult) -> str:
    raw = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"unknown error"
    return raw.decode(errors="replace")
