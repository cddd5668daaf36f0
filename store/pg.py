"""The PostgreSQL promise store: many machines share one import through one database.

A promise is a row of `promises` (its creation and attempts) and, once settled, a row of
`settles` (its outcome; the view `promise_states` joins them); values are jsonb. A lease per root
workflow (`leases`), the steps a fleet claims (`tasks`, see pg_tasks.py); the tables are made on
first use (pg_schema.py). Every call is one statement, in autocommit mode:

- **Fencing.** `own(root)` takes the root's lease (owner, epoch, expires_at) and a heartbeat
  thread renews it. Every write under an owned root joins the lease row `FOR SHARE` in the same
  statement, so it happens only while this owner's epoch is current and unexpired: a takeover
  (which bumps the epoch) waits for writes in flight and refuses the rest, and a driver that
  was paused past its lease and resumes writes nothing (FencedError). A lease once lost stays
  lost for this store object.
- **Durability.** Settles commit synchronously (the commit waits for the server's WAL flush;
  the server flushes commits that arrive together once: group commit), a held settle with the
  creation it goes with. Other creations, attempts and
  deferred settles commit asynchronously (`synchronous_commit = off`): they survive a kill of
  the client at once, and a crash of the server once a later synchronous commit (or `sync()`)
  flushed the WAL past them, as the contract allows.
- **The owner's view.** Only the owner of a root creates promises under it, so the owner reads
  them from memory (loaded when it takes the lease) and holds a new creation back until its
  next write under the root. A step's creation and first attempt go through a pipelined
  connection of the thread (pg_pipe.py), with the settle of the step before it when the runner
  let that one be held (`resolve(hold=True)`): one transaction, one round trip per step. A
  held settle no creation took along within _HOLD_S is written on its own (a thread of the
  store), and every other write under the root writes the held settles first.
  Settles made by others (a fleet's executors) are read again when waited for (`refresh`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import orjson
import psycopg
import psycopg.types.json
import psycopg_pool

from .backends import redact
from .base import PromiseStore
from .errors import StoreError, StoreUnavailableError, StoreWriteError, WorkflowBusyError
from .indexed import storable, storable_error
from .jsonl import Durability
from .log import check_attempt, check_create, check_reopen, check_settle
from .owners import DEFAULT_LEASE_S, is_dead_here, this_owner
from .pg_json import to_jsonb
from .pg_pipe import Pipe, RefusedCreation
from .pg_schema import ensure_schema
from .pg_tasks import TaskQueue
from .promise import Promise, State

log = logging.getLogger("store.pg")

_RENEWALS_PER_LEASE = 3
_SURELY_OURS_SHARE = 0.5  # of a lease period since its last renewal: sending without waiting is safe
_HOLD_S = 0.002  # a settle held back longer than this is written on its own (the flusher thread)
_FLUSHER_IDLE_S = 0.1  # after this long without a settle held, the flusher waits to be woken
_TAKE_POLL_S = 0.1
_COLUMNS = "id, param, state, value, error, attempts, attempts_at_reopen, created_at, settled_at"
_READ = f"SELECT {_COLUMNS} FROM promise_states"
_FENCE = ("fence AS (SELECT 1 FROM leases WHERE root = %(root)s AND epoch = %(epoch)s "
          "AND expires_at > now() FOR SHARE)")
_NO_FENCE = "fence AS (SELECT 1)"


class FencedError(StoreUnavailableError):
    """This process no longer holds the lease of a root workflow (it expired, or another driver
    took it over): it must not write anything under it. Run again to take the lease anew."""

    def __init__(self, where: str, root: str, why: str) -> None:
        super().__init__(f"{where}: lost the lease of workflow {root} ({why}); nothing more was written")
        self.root = root


class _Settle(NamedTuple):
    """A settle held back, as it is written (its outcome as jsonb text), and since when."""

    id: str
    state: str
    value: str | None
    error: str | None
    settled_at: float
    held_at: float  # time.monotonic()


@dataclass
class _Lease:
    root: str
    owner: str
    epoch: int
    renewed_at: float  # time.monotonic() when its last renewal (or its taking) was sent
    lost: str | None = None  # why, once the lease is lost
    released: bool = False  # given up by own()'s end: no longer renewed
    held: dict[str, Promise] = field(default_factory=dict)  # creations not written yet, in order
    held_settles: list[_Settle] = field(default_factory=list)  # settles not written yet, in order
    flusher_failed: bool = False  # the flusher could not write them: left to the owner's next write

    def surely_ours(self, lease_s: float) -> bool:
        """Whether the lease cannot have expired yet, by this process's own clock: renewed less
        than half a lease period ago (the server set its expiry at least that long after)."""
        return time.monotonic() - self.renewed_at < lease_s * _SURELY_OURS_SHARE


class PgStore(TaskQueue, PromiseStore):
    """Durable promises in PostgreSQL; threads of a process may share one (a pool of connections)."""

    holds_settles = True  # a step's settle goes with the next step's creation: one commit per step

    def __init__(
        self,
        url: str,
        *,
        durability: Durability | str = Durability.FULL,
        lock_timeout: float = 30.0,
        lease_s: float = DEFAULT_LEASE_S,
        pool_size: int = 16,
        connect_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.lease_s = lease_s
        self._lock_timeout = lock_timeout
        durable = Durability(durability) is Durability.FULL
        self._durable = durable
        self._pipes = threading.local()  # `.pipe`: the thread's Pipe, for the owner's hot path
        self._open_pipes: list[Pipe] = []
        self._mutex = threading.RLock()
        self._leases: dict[str, _Lease] = {}
        self._cache: dict[str, Promise] = {}  # the promises under owned roots
        self._renewing = threading.Event()  # set: stop the heartbeat
        self._heartbeat: threading.Thread | None = None
        self._held_settles = threading.Condition(self._mutex)  # a settle was held: the flusher looks
        self._flusher: threading.Thread | None = None
        self._flusher_idle = False  # it waits to be woken (else it looks every _HOLD_S)
        self._last_hold = 0.0  # time.monotonic() of the last settle held
        self._check_connection(connect_timeout)
        self._safe = self._pool(pool_size, connect_timeout, synchronous=durable)
        try:
            self._fast = self._pool(pool_size, connect_timeout, synchronous=False)
            with self._errors("making the store's tables", write=True), self._safe.connection() as conn:
                ensure_schema(conn, self.where)
        except BaseException:
            self._safe.close()
            if hasattr(self, "_fast"):
                self._fast.close()
            raise

    def _check_connection(self, timeout: float) -> None:
        """One connection first, so that a URL that cannot work (no such database, role or
        host, a bad option) is refused at once with the server's reason, and a server that does
        not answer (now) is told apart: StoreUnavailableError, worth another try."""
        try:
            psycopg.connect(self.url, connect_timeout=max(1, int(timeout))).close()
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())
            refused = exc.sqlstate is not None or any(w in reason for w in _URL_FAULTS)
            kind = StoreError if refused else StoreUnavailableError
            raise kind(f"{self.where}: cannot connect to PostgreSQL ({reason})") from None

    def _pool(self, size: int, timeout: float, *, synchronous: bool) -> psycopg_pool.ConnectionPool:
        def configure(conn: psycopg.Connection) -> None:
            psycopg.types.json.set_json_loads(orjson.loads, conn)
            if not synchronous:
                conn.execute("SET synchronous_commit = off")

        pool = psycopg_pool.ConnectionPool(
            self.url, min_size=1, max_size=size, open=False, configure=configure, timeout=timeout,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout))},
        )
        try:
            pool.open(wait=True, timeout=timeout)
        except (psycopg_pool.PoolTimeout, psycopg.Error) as exc:
            pool.close()
            raise StoreUnavailableError(f"{self.where}: cannot connect to PostgreSQL ({exc})") from None
        return pool

    def __repr__(self) -> str:
        return f"PgStore({self.where})"

    # -- the contract ----------------------------------------------------------------------

    def create(self, promise_id: str, param: Any) -> Promise:
        self._check(promise_id)
        param = storable(promise_id, "param", param)
        lease = self._lease_of(promise_id)
        if lease is not None:
            with self._mutex:
                known = lease.held.get(promise_id) or self._cache.get(promise_id)
                if known is not None:
                    check_create(_entry(known), promise_id, param)
                    return known
                self._check_held(lease)
                promise = Promise(promise_id, param, created_at=time.time())
                lease.held[promise_id] = promise  # written with its first attempt, or sooner
                return promise
        created = Promise(promise_id, param, created_at=time.time())
        if self._fenced(self._fast, f"creating promise {promise_id}", None,
                        "INSERT INTO promises (id, param, created_at) SELECT %(id)s, %(param)s::jsonb, "
                        "%(t)s FROM fence ON CONFLICT (id) DO NOTHING RETURNING 1",
                        {"id": promise_id, "param": to_jsonb(param), "t": created.created_at}):
            return created
        existing = self._select(promise_id)
        check_create(_entry(existing), promise_id, param)
        return existing

    def start_attempt(self, promise_id: str) -> int:
        self._check(promise_id)
        lease = self._lease_of(promise_id)
        if lease is not None:
            with self._mutex:
                if len(lease.held) == 1 and promise_id in lease.held:  # the common case: a step's
                    return self._send_creation(lease, lease.held.pop(promise_id))
                if promise_id in lease.held:
                    return self._write_held(lease, first_attempt=promise_id).attempts
                known = self._cache.get(promise_id)
                check_attempt(None if known is None else _entry(known), promise_id)
                self._write_held(lease)  # the settles held back before this attempt runs
        row = self._fenced(self._fast, f"starting an attempt of promise {promise_id}", lease,
                           "UPDATE promises SET attempts = attempts + 1 FROM fence WHERE id = %(id)s AND "
                           "NOT EXISTS (SELECT 1 FROM settles WHERE settles.id = %(id)s) RETURNING attempts",
                           {"id": promise_id})
        if row is None:
            check_attempt(_entry(self._explain(promise_id, lease)), promise_id)
            raise AssertionError("unreachable: a pending promise's attempt was not written")
        if lease is not None:
            with self._mutex:
                self._cache[promise_id] = self._cache[promise_id]._replace(attempts=row[0])
        return row[0]

    def resolve(
        self, promise_id: str, value: Any, *, defer_sync: bool = False, hold: bool = False
    ) -> Promise:
        self._check(promise_id)
        value = storable(promise_id, "value", value)
        if hold and self._hold(promise_id, value):
            return self._cache[promise_id]
        return self._settle(promise_id, State.RESOLVED, value, defer_sync)

    def reject(
        self, promise_id: str, error: dict[str, Any] | BaseException, *, defer_sync: bool = False
    ) -> Promise:
        self._check(promise_id)
        return self._settle(promise_id, State.REJECTED, storable_error(promise_id, error), defer_sync)

    def reopen(self, promise_id: str, reason: str) -> Promise:
        self._check(promise_id)
        lease = self._write_held_of(promise_id)
        row = self._one(self._safe, "reopening", promise_id, lease, _REOPEN,
                        id=promise_id, reason=reason, t=time.time()) if type(reason) is str else None
        if row is None:
            check_reopen(_entry(self._explain(promise_id, lease)), promise_id, reason)
            raise AssertionError("unreachable: a rejected promise was not reopened")
        return row

    def sync(self) -> None:
        """A transaction that takes a transaction id commits synchronously: it waits for the WAL
        to be flushed past itself, and so past every asynchronous commit before it."""
        self._check_open()
        written = [self._write_held_settles(lease) for lease in list(self._leases.values())
                   if lease.lost is None]
        if any(written) and self._durable:
            return  # their synchronous commit flushed the WAL past every commit before it
        with self._errors("syncing", write=True), self._safe.connection() as conn:
            conn.execute("SELECT pg_current_xact_id()")

    def get(self, promise_id: str) -> Promise | None:
        self._check(promise_id)
        lease = self._lease_of(promise_id)
        if lease is not None:
            with self._mutex:
                return lease.held.get(promise_id) or self._cache.get(promise_id)
        return self._select(promise_id)

    def list(self, prefix: str = "") -> list[Promise]:
        self._check_open()
        for lease in list(self._leases.values()):
            self._wait_for_pipe(lease)
            self._write_held(lease)
        with self._errors("listing promises"), self._fast.connection() as conn:
            end = after(prefix)
            below = "" if end is None else " AND id < %s"
            rows = conn.execute(f"{_READ} WHERE id >= %s{below} ORDER BY seq",
                                (prefix,) if end is None else (prefix, end)).fetchall()
        return [_promise(row) for row in rows]

    def refresh(self, promise_ids: list[str]) -> list[Promise]:
        """The promises as the database has them now (settled by others meanwhile, perhaps);
        the owner's view of them is brought up to date."""
        self._check_open()
        with self._errors("reading promises"), self._fast.connection() as conn:
            rows = conn.execute(f"{_READ} WHERE id = ANY(%s)",
                                (promise_ids,)).fetchall()
        promises = [_promise(row) for row in rows]
        for promise in promises:
            self._remember(promise)
        return promises

    def connections_left(self) -> int:
        """How many more sessions the server takes now (of max_connections, less those open)."""
        with self._errors("counting connections"), self._fast.connection() as conn:
            return conn.execute("SELECT current_setting('max_connections')::int - count(*) "
                                "FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()[0]

    def own(self, root_id: str) -> contextlib.AbstractContextManager[None]:
        return self._owning(root_id)

    def request_cancel(self, root_id: str) -> None:
        self._check(root_id)
        with self._errors(f"recording the cancel request of {root_id}", write=True), \
                self._safe.connection() as conn:
            conn.execute("INSERT INTO cancels (root) VALUES (%s) ON CONFLICT (root) DO NOTHING", (root_id,))

    def cancel_requested(self, root_id: str) -> bool:
        self._check(root_id)
        with self._errors(f"reading the cancel request of {root_id}"), self._fast.connection() as conn:
            return conn.execute("SELECT 1 FROM cancels WHERE root = %s", (root_id,)).fetchone() is not None

    def withdraw_cancel(self, root_id: str) -> None:
        self._check(root_id)
        with self._errors(f"withdrawing the cancel request of {root_id}", write=True), \
                self._safe.connection() as conn:
            conn.execute("DELETE FROM cancels WHERE root = %s", (root_id,))

    def close(self) -> None:
        if self._closed:
            return
        try:
            for lease in list(self._leases.values()):
                if lease.lost is None:
                    self._write_held(lease)
        finally:
            with self._mutex:
                self._closed = True
                self._held_settles.notify()  # the flusher ends
            if self._flusher is not None:
                self._flusher.join()
            self._renewing.set()
            if self._heartbeat is not None:
                self._heartbeat.join()
            for pipe in self._open_pipes:
                pipe.close()
            self._fast.close()
            self._safe.close()

    # -- ownership -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _owning(self, root: str) -> Iterator[None]:
        self._check_open()
        if root in self._leases:
            raise WorkflowBusyError(root, f"this process ({self._leases[root].owner})")
        lease = self._take(root)
        with self._mutex:
            self._leases[root] = lease
        try:
            with self._errors("reading the workflow"), self._fast.connection() as conn:
                rows = conn.execute(
                    f"{_READ} WHERE id = %s OR (id >= %s AND id < %s)",
                    (root, f"{root}.", after(f"{root}.")),
                ).fetchall()
            for row in rows:
                self._cache[row[0]] = _promise(row)
            self._start_heartbeat()
            yield
        finally:
            try:
                if lease.lost is None and not self._closed:
                    self._wait_for_pipe(lease)
                    self._write_held(lease)
                    lease.released = True
                    self._release(lease)
            finally:
                with self._mutex:
                    del self._leases[root]
                    for pid in [p for p in self._cache if _root_of(p) == root]:
                        del self._cache[pid]

    def _take(self, root: str) -> _Lease:
        """The root's lease, once it is free or expired (the epoch bumped); WorkflowBusyError
        naming the holder after the lock timeout."""
        owner = this_owner()
        deadline = time.monotonic() + self._lock_timeout
        params = {"root": root, "owner": owner, "s": self.lease_s, "dead": None}
        while True:
            with self._errors("taking the workflow's lease", write=True), self._safe.connection() as conn:
                asked_at = time.monotonic()
                taken = conn.execute(
                    "INSERT INTO leases AS l "
                    "VALUES (%(root)s, %(owner)s, 1, now() + %(s)s * interval '1 second') "
                    "ON CONFLICT (root) DO UPDATE SET owner = excluded.owner, epoch = l.epoch + 1, "
                    "expires_at = excluded.expires_at "
                    "WHERE l.expires_at <= now() OR l.owner = %(dead)s RETURNING epoch",
                    params,
                ).fetchone()
                if taken is not None:
                    return _Lease(root, owner, taken[0], renewed_at=asked_at)
                holder = conn.execute(
                    "SELECT owner, extract(epoch FROM expires_at - now()) FROM leases WHERE root = %s",
                    (root,),
                ).fetchone()
            if holder is not None and is_dead_here(holder[0]):
                params["dead"] = holder[0]  # its process is gone: no need to wait for its lease
                continue
            if time.monotonic() >= deadline:
                left = f"; its lease ends in {holder[1]:.1f} s unless renewed" if holder else ""
                raise WorkflowBusyError(root, f"{holder[0] if holder else 'unknown'}{left}")
            time.sleep(_TAKE_POLL_S)

    def _release(self, lease: _Lease) -> None:
        """Let the next owner take over at once instead of waiting for the lease to expire."""
        with self._errors("releasing the workflow's lease", write=True), self._safe.connection() as conn:
            conn.execute("UPDATE leases SET expires_at = now() WHERE root = %s AND epoch = %s",
                         (lease.root, lease.epoch))

    def _start_heartbeat(self) -> None:
        with self._mutex:
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._renew_leases, name="lease", daemon=True)
                self._heartbeat.start()

    def _renew_leases(self) -> None:
        """Renew every owned lease a few times per lease period. One that cannot be renewed
        (expired while this process was stopped, or taken over) is lost for good."""
        while not self._renewing.wait(self.lease_s / _RENEWALS_PER_LEASE):
            for lease in list(self._leases.values()):
                if lease.lost is not None or lease.released:
                    continue
                asked_at = time.monotonic()
                try:
                    with self._safe.connection() as conn:
                        renewed = conn.execute(
                            "UPDATE leases SET expires_at = now() + %s * interval '1 second' "
                            "WHERE root = %s AND epoch = %s AND expires_at > now() RETURNING 1",
                            (self.lease_s, lease.root, lease.epoch),
                        ).fetchone()
                    if renewed is None:
                        self._lose(lease)
                    else:
                        lease.renewed_at = asked_at
                except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:  # the next may get through
                    log.warning("%s: could not renew the lease of %s (%s)", self.where, lease.root, exc)

    def _lose(self, lease: _Lease) -> str:
        """Why the lease is no longer ours, as the database tells; it is lost from now on."""
        with self._safe.connection() as conn:
            row = conn.execute("SELECT owner, epoch, expires_at > now() FROM leases WHERE root = %s",
                               (lease.root,)).fetchone()
        if row is None or (row[1] == lease.epoch and not row[2]):
            why = f"it expired (epoch {lease.epoch})"
        else:
            why = f"{row[0]} took it over (epoch {row[1]})"
        lease.lost = lease.lost or why
        log.warning("%s", FencedError(self.where, lease.root, lease.lost))
        return lease.lost

    def _lease_of(self, promise_id: str) -> _Lease | None:
        """The owned lease `promise_id` falls under, if any (refused at once if lost)."""
        lease = self._leases.get(_root_of(promise_id)) if self._leases else None
        if lease is not None and lease.lost is not None:
            raise FencedError(self.where, lease.root, lease.lost)
        return lease

    # -- writing ---------------------------------------------------------------------------

    def _settle(self, promise_id: str, state: State, outcome: Any, defer_sync: bool) -> Promise:
        """Insert the promise's outcome (a promise is settled once: a second insert conflicts
        and writes nothing, and the rules say whether that was the same outcome again)."""
        lease = self._write_held_of(promise_id)
        value, error = (outcome, None) if state is State.RESOLVED else (None, outcome)
        params = {"id": promise_id, "state": state.value, "t": time.time(),
                  "value": None if value is None else to_jsonb(value),
                  "error": None if error is None else to_jsonb(error)}
        pool = self._fast if defer_sync else self._safe
        action = f"settling promise {promise_id}"
        if lease is not None:
            known = self._cache.get(promise_id)
            if known is None or known.settled:  # the owner's view says what the rules say
                if check_settle(None if known is None else _entry(known), promise_id, state, outcome):
                    raise AssertionError("unreachable: a settled promise may be settled again")
                return known
        if lease is None:
            row = self._fenced(pool, action, None, _SETTLE_RETURNING_ALL, params)
            if row is not None:
                return _promise(row)
        elif self._settle_in_pipe(lease, params, durable=self._durable and not defer_sync):
            with self._mutex:
                p = self._cache[promise_id]
                settled = Promise(promise_id, p.param, state, value, error, p.attempts,
                                  p.attempts_at_reopen, p.created_at, params["t"])
                self._cache[promise_id] = settled
            return settled
        existing = self._explain(promise_id, lease)
        if check_settle(None if existing is None else _entry(existing), promise_id, state, outcome):
            raise AssertionError("unreachable: a pending promise was not settled")
        return existing

    def _send_creation(self, lease: _Lease, promise: Promise) -> int:
        """A step's creation and first attempt (see pg_pipe.py): with the settle held back before
        it, in one transaction waited for; alone, sent without waiting while the lease is surely
        ours, else waited for, so that a driver that lost its lease learns it (FencedError)
        before it runs the step."""
        promise = Promise(promise.id, promise.param, State.PENDING, None, None, 1, 0, promise.created_at)
        if len(lease.held_settles) > 1:
            self._write_held_settles(lease)
        held = lease.held_settles[0] if lease.held_settles else None
        pipe = self._pipe()
        try:
            if held is None:
                pipe.send_creation(lease.root, lease.epoch, promise.id, to_jsonb(promise.param),
                                   promise.created_at, 1)
                if not lease.surely_ours(self.lease_s):
                    pipe.wait()
            else:
                written = pipe.settle_and_create(lease.root, lease.epoch, held[:5], promise.id,
                                                 to_jsonb(promise.param), promise.created_at,
                                                 durable=self._durable)
        except _PIPE_FAILURES as exc:
            self._pipe_failed(pipe, lease, exc)
        if held is not None:
            if not written:
                self._explain(promise.id, lease)  # FencedError if that is why
                raise StoreWriteError(f"{self.where}: creating {promise.id} (with the settle of "
                                      f"{held.id}) wrote nothing")
            lease.held_settles, lease.flusher_failed = [], False
        self._cache[promise.id] = promise
        return 1

    def _settle_in_pipe(self, lease: _Lease, params: dict[str, Any], *, durable: bool) -> bool:
        pipe = self._pipe()
        try:
            return pipe.settle(lease.root, lease.epoch, params["id"], params["state"], params["value"],
                               params["error"], params["t"], durable=durable)
        except _PIPE_FAILURES as exc:
            self._pipe_failed(pipe, lease, exc)

    def _wait_for_pipe(self, lease: _Lease) -> None:
        """Before a write on another connection: what this thread sent in its pipe is answered."""
        pipe = getattr(self._pipes, "pipe", None)
        if pipe is not None and not pipe.broken:
            try:
                pipe.wait()
            except _PIPE_FAILURES as exc:
                self._pipe_failed(pipe, lease, exc)

    def _pipe(self) -> Pipe:
        """This thread's pipe (a new one if it has none, or a broken one)."""
        pipe = getattr(self._pipes, "pipe", None)
        if pipe is None or pipe.broken:
            pipe = self._pipes.pipe = Pipe(self.url, self.where)
            with self._mutex:
                self._open_pipes.append(pipe)
        return pipe

    def _pipe_failed(self, pipe: Pipe, lease: _Lease, exc: Exception) -> NoReturn:
        """A creation refused by the fence is a FencedError; a failed pipe is dropped."""
        if isinstance(exc, RefusedCreation):
            self._explain(exc.promise_id, lease)  # FencedError if the lease is why
            raise StoreWriteError(f"{self.where}: the creation of {exc.promise_id} was refused") from None
        self._pipes.pipe = None
        with self._mutex:
            self._open_pipes.remove(pipe)
        pipe.close()
        raise exc

    def _write_held_of(self, promise_id: str) -> _Lease | None:
        """Before a write under an owned root, the creations held back there."""
        lease = self._lease_of(promise_id)
        if lease is not None:
            self._write_held(lease)
        return lease

    def _hold(self, promise_id: str, value: Any) -> bool:
        """Hold back the owner's settle of a pending step it created, to be written with the next
        write under its root (see the contract's `hold`); whether it was held."""
        lease = self._lease_of(promise_id)
        if lease is None:
            return False
        with self._mutex:
            known = self._cache.get(promise_id)
            if known is None or known.settled or lease.held:
                return False  # the rules to check, or creations to write first: settled at once
            settle = _Settle(promise_id, State.RESOLVED.value, to_jsonb(value), None, time.time(),
                             time.monotonic())
            lease.held_settles.append(settle)
            self._cache[promise_id] = known._replace(state=State.RESOLVED, value=value,
                                                     settled_at=settle.settled_at)
            self._last_hold = settle.held_at
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_late_settles, name="held settles",
                                                 daemon=True)
                self._flusher.start()
            elif self._flusher_idle:
                self._held_settles.notify()
            return True

    def _flush_late_settles(self) -> None:
        """The flusher thread: a settle still held after _HOLD_S (the workflow's own code ran on,
        or it waits) is written on its own, so that a kill loses no more than that. While
        settles are being held it looks every _HOLD_S (a wake-up per step would cost the
        steps more); after _FLUSHER_IDLE_S without one, it waits to be woken."""
        with self._mutex:
            while not self._closed:
                now = time.monotonic()
                for lease in list(self._leases.values()):
                    due = lease.held_settles and lease.held_settles[0].held_at + _HOLD_S <= now
                    if due and lease.lost is None and not lease.flusher_failed:
                        try:
                            self._write_held_settles(lease)
                        except StoreError as exc:  # the owner's next write meets it (no retry here)
                            log.debug("%s: writing held settles failed (%s)", self.where, exc)
                            lease.flusher_failed = True
                self._flusher_idle = now - self._last_hold > _FLUSHER_IDLE_S
                self._held_settles.wait(None if self._flusher_idle else _HOLD_S)
                self._flusher_idle = False

    def _write_held_settles(self, lease: _Lease) -> bool:
        """Write the settles held back under `lease`, in one statement (durably, as every
        settle); whether there were any."""
        with self._mutex:
            if not lease.held_settles:
                return False
            held = lease.held_settles
            params = {"ids": [h.id for h in held], "states": [h.state for h in held],
                      "values": [h.value for h in held], "errors": [h.error for h in held],
                      "ts": [h.settled_at for h in held]}
            written = self._fenced(self._safe, f"settling promise {held[0].id}", lease, _SETTLE_MANY, params)
            if written is None or written[0] != len(held):
                self._check_written_before(lease, held)
            lease.held_settles, lease.flusher_failed = [], False
            return True

    def _check_written_before(self, lease: _Lease, held: list[_Settle]) -> None:
        """After held settles that did not all write: each must be there already, the same (a
        write whose answer was lost, sent again); else FencedError if the lease is why, or a
        StoreWriteError."""
        for settle in held:
            mine = self._cache[settle.id]
            there = self._explain(settle.id, lease)  # FencedError if the lease is why
            if check_settle(None if there is None else _entry(there), settle.id, mine.state, mine.value):
                raise StoreWriteError(f"{self.where}: settling {settle.id} wrote nothing")

    def _write_held(self, lease: _Lease, first_attempt: str | None = None) -> Promise | None:
        """Write the settles, then the creations held back under `lease`, each kind in order in
        one statement (a creation never reaches the disk before the settle whose value made it);
        the creation `first_attempt` names is written with its first attempt, and returned."""
        with self._mutex:  # settles and creations at once: no settle is held between them
            self._write_held_settles(lease)
            if not lease.held:
                return None
            held = [p._replace(attempts=int(p.id == first_attempt)) for p in lease.held.values()]
            params = {"ids": [p.id for p in held], "params": [to_jsonb(p.param) for p in held],
                      "ts": [p.created_at for p in held], "ns": [p.attempts for p in held]}
            written = self._fenced(self._fast, f"creating promise {held[0].id}", lease,
                                   _CREATE_ONE if len(held) == 1 else _CREATE_MANY,
                                   params)
            if written is None or written[0] != len(held):
                self._explain(held[0].id, lease)  # FencedError if that is why
                raise StoreWriteError(f"{self.where}: creating {held[0].id} wrote nothing")
            lease.held.clear()
            for promise in held:
                self._cache[promise.id] = promise
            return next((p for p in held if p.id == first_attempt), None)

    def _one(self, pool: psycopg_pool.ConnectionPool, action: str, promise_id: str,
             lease: _Lease | None, sql: str, **params: Any) -> Promise | None:
        """Run one fenced statement that returns the promise it wrote (None if it wrote nothing)."""
        row = self._fenced(pool, f"{action} promise {promise_id}", lease, sql, params)
        if row is None:
            return None
        promise = _promise(row)
        self._remember(promise)
        return promise

    def _fenced(self, pool: psycopg_pool.ConnectionPool, action: str, lease: _Lease | None,
                sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """Run `sql` after `WITH fence AS (...)`: the lease row, shared-locked, if `lease` is
        given (join `fence` to write only while it is current); its first row, if any."""
        fence = _FENCE if lease is not None else _NO_FENCE
        if lease is not None:
            self._wait_for_pipe(lease)
            params.update(root=lease.root, epoch=lease.epoch)
        with self._errors(action, write=True), pool.connection() as conn:
            return conn.execute(f"WITH {fence} {sql}", params).fetchone()

    def _explain(self, promise_id: str, lease: _Lease | None) -> Promise | None:
        """After a write that wrote nothing: FencedError if the lease is why, else the promise
        as it stands (for the contract's checks to say what is wrong)."""
        if lease is not None:
            with self._errors("checking the workflow's lease"):
                why = self._lose(lease) if not self._lease_is_current(lease) else None
            if why is not None:
                raise FencedError(self.where, lease.root, why)
        promise = self._select(promise_id)
        if promise is not None:
            self._remember(promise)
        return promise

    def _lease_is_current(self, lease: _Lease) -> bool:
        with self._safe.connection() as conn:
            row = conn.execute("SELECT 1 FROM leases WHERE root = %s AND epoch = %s AND expires_at > now()",
                               (lease.root, lease.epoch)).fetchone()
        return row is not None

    def _check_held(self, lease: _Lease) -> None:
        if lease.lost is not None:
            raise FencedError(self.where, lease.root, lease.lost)

    def _remember(self, promise: Promise) -> None:
        """Keep the owner's view of its own roots up to date."""
        if _root_of(promise.id) in self._leases:
            self._cache[promise.id] = promise

    def _select(self, promise_id: str) -> Promise | None:
        with self._errors(f"reading promise {promise_id}"), self._fast.connection() as conn:
            row = conn.execute(f"{_READ} WHERE id = %s", (promise_id,)).fetchone()
        return None if row is None else _promise(row)

    @contextlib.contextmanager
    def _errors(self, action: str, *, write: bool = False) -> Iterator[None]:
        """A database failure as the store's own error, naming the database and the action."""
        try:
            yield
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            kind = StoreWriteError if write else StoreError
            if isinstance(exc, _UNAVAILABLE):
                kind = StoreUnavailableError
            raise kind(f"{self.where}: {action} failed ({type(exc).__name__}: {exc})") from exc


def after(prefix: str) -> str | None:
    """The least id above every id that starts with `prefix`, in the ids' byte order (COLLATE
    "C": code point order), so that `prefix <= id < after(prefix)` is a range of the index;
    None when no string is above them all (nothing but U+10FFFF, or no prefix)."""
    while prefix:
        last = ord(prefix[-1]) + 1
        if last == 0xD800:  # surrogates are not characters
            last = 0xE000
        if last <= 0x10FFFF:
            return prefix[:-1] + chr(last)
        prefix = prefix[:-1]
    return None


# The server could not be reached, or the connection was lost: nothing wrong with the store.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)


_PIPE_FAILURES = (RefusedCreation, StoreWriteError, StoreUnavailableError)
# What libpq says of a URL no retry can make work (the server's own refusals carry a SQLSTATE).
_URL_FAULTS = ("does not exist", "authentication failed", "no pg_hba.conf entry", "invalid URI",
               "invalid connection option", "failed to resolve host", "could not translate host name",
               "SSL", "missing")


def _root_of(promise_id: str) -> str:
    """The root workflow of a promise: a root id has no dot, and a call's id is `<parent>.<n>`."""
    return promise_id.partition(".")[0]


def _promise(row: tuple[Any, ...]) -> Promise:
    pid, param, state, value, error, attempts, reopened, created, settled = row
    return Promise(pid, param, State(state), value, error, attempts, reopened, created, settled)


def _entry(promise: Promise | None) -> list[Any] | None:
    """A promise as log.py's rules take it."""
    return None if promise is None else list(promise[1:])


# A creation held back, written alone or with the ones before it (in order), each with its
# first attempt or none; they return how many rows were written.
_CREATE_ONE = """
INSERT INTO promises (id, param, created_at, attempts)
SELECT (%(ids)s::text[])[1], (%(params)s::jsonb[])[1], (%(ts)s::float8[])[1], (%(ns)s::int[])[1] FROM fence
RETURNING 1
"""
_CREATE_MANY = """
, v AS (
    INSERT INTO promises (id, param, created_at, attempts)
    SELECT v.id, v.param, v.t, v.n
    FROM unnest(%(ids)s::text[], %(params)s::jsonb[], %(ts)s::float8[], %(ns)s::int[])
         WITH ORDINALITY AS v(id, param, t, n, o), fence
    ORDER BY v.o RETURNING 1)
SELECT count(*) FROM v
"""
_SETTLE_MANY = """
, v AS (
    INSERT INTO settles (id, state, value, error, settled_at)
    SELECT v.id, v.state, v.value, v.error, v.t
    FROM unnest(%(ids)s::text[], %(states)s::text[], %(values)s::jsonb[], %(errors)s::jsonb[],
                %(ts)s::float8[]) WITH ORDINALITY AS v(id, state, value, error, t, o), fence
    ORDER BY v.o ON CONFLICT (id) DO NOTHING RETURNING 1)
SELECT count(*) FROM v
"""
_SETTLE_RETURNING_ALL = """
, s AS (
    INSERT INTO settles (id, state, value, error, settled_at)
    SELECT %(id)s, %(state)s, %(value)s::jsonb, %(error)s::jsonb, %(t)s FROM fence
    WHERE EXISTS (SELECT 1 FROM promises WHERE id = %(id)s)
    ON CONFLICT (id) DO NOTHING RETURNING *)
SELECT p.id, p.param, s.state, s.value, s.error, p.attempts, p.attempts_at_reopen, p.created_at, s.settled_at
FROM s JOIN promises p ON p.id = s.id
"""
_REOPEN = """
, s AS (DELETE FROM settles WHERE id = %(id)s AND state = 'rejected' AND EXISTS (SELECT 1 FROM fence)
        RETURNING error)
UPDATE promises p SET attempts_at_reopen = attempts, reopened = reopened || jsonb_build_array(
    jsonb_build_object('error', s.error, 'reason', %(reason)s::text, 't', %(t)s::float8))
FROM s WHERE p.id = %(id)s
RETURNING p.id, p.param, 'pending', NULL::jsonb, NULL::jsonb, p.attempts, p.attempts_at_reopen,
          p.created_at, NULL::float8
"""
