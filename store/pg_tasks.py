"""Steps as tasks a fleet claims: the PostgreSQL store's queue (a mixin of PgStore).

The driver enqueues a begun step (`enqueue`, fenced by its lease); executors on any machine
`claim` the oldest ready task with `FOR UPDATE SKIP LOCKED`, which counts the attempt in the
same statement, and hold it under a claim lease they renew (`renew_claim`). A claim that
expires (its executor died or was stopped) is claimed again and its attempt stays counted.

Each claim bumps the task's `claim` number, which fences the claimer: a step runs in a
transaction (`step_transaction`) that `finish_claim` closes by marking the task done and
resolving its promise only if the claim is still the current one, so a step's own writes, its
task and its promise commit together or not at all, and a claimer that lost its claim (paused
past it) commits nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool

from .errors import StoreError
from .indexed import storable
from .owners import is_dead_here
from .pg_json import to_jsonb
from .promise import Promise

# A step transaction whose claim expired is ended by its next claimer (its server process
# terminated), so the rows it locked do not hold up the step. In case no claimer comes (a row
# it locked holds up another step), the server also ends a step transaction left idle this long.
IDLE_IN_STEP_TRANSACTION_S = 60.0


class ClaimLostError(Exception):
    """The claim expired and another executor claimed the step (or it was settled meanwhile):
    this executor's transaction was rolled back and must not be retried by it."""


@dataclass(frozen=True)
class Claim:
    """A claimed step: its promise's id and param, the task's spec, this claim's number, and
    the attempt it is (counted in the promise; `since_reopen` against the retry budget)."""

    promise_id: str
    param: dict[str, Any]
    spec: dict[str, Any]
    token: int
    attempt: int | None  # None: no attempt was counted (its budget is used up, or it is settled)
    since_reopen: int
    settled: bool = False  # the promise was settled already: the task is stale
    attempts: int = 0  # the attempts the promise has counted in all, this one included


class TaskQueue:
    """The task queue over the store's connection pools (see PgStore)."""

    _safe: psycopg_pool.ConnectionPool
    _fast: psycopg_pool.ConnectionPool

    def enqueue(self, promise_id: str, spec: dict[str, Any]) -> None:
        """Make the step `promise_id` claimable: once, and again only after its promise was
        reopened (its task was done). Only the driver enqueues, under its lease; the step's
        creation, held back until now, is written first."""
        lease = self._write_held_of(promise_id)
        if lease is None:
            raise StoreError(f"{self.where}: enqueue {promise_id} under its workflow's lease (own())")
        written = self._fenced(self._fast, f"enqueueing {promise_id}", lease,
                               _ENQUEUE,
                               {"id": promise_id, "spec": _jsonb(promise_id, spec)})
        if written is None:
            self._explain(promise_id, lease)  # FencedError if the lease is why; else enqueued before

    def claim(self, roots: list[str], owner: str, claim_s: float) -> Claim | None:
        """The oldest ready step of these root workflows, claimed for `claim_s` seconds with
        its attempt counted (unless its budget, the spec's `max_attempts`, is used up); None
        when none is ready."""
        with self._errors("claiming a step", write=True), self._fast.connection() as conn:
            row = conn.execute(_CLAIM, {"roots": roots, "owner": owner, "s": claim_s}).fetchone()
        if row is None:
            return None
        promise_id, spec, token, param, attempts, reopened, settled, used, _ended = row
        return Claim(promise_id, param, spec, token, attempts, (attempts or 0) - (reopened or 0), settled,
                     attempts or used)

    def release_claims_of_the_dead(self, roots: list[str]) -> int:
        """Let the steps claimed by executors of this machine that died be claimed at once,
        instead of when their claims expire; how many were let go."""
        with self._errors("reading the claims", write=True), self._fast.connection() as conn:
            owners = [owner for (owner,) in conn.execute(
                "SELECT DISTINCT claimed_by FROM tasks WHERE root = ANY(%s) AND state = 'claimed' "
                "AND claim_expires_at > now()", (roots,))]
            dead = [owner for owner in owners if is_dead_here(owner)]
            if not dead:
                return 0
            return conn.execute(
                "UPDATE tasks SET claim_expires_at = now() WHERE root = ANY(%s) AND state = 'claimed' "
                "AND claimed_by = ANY(%s)", (roots, dead)).rowcount

    def renew_claim(self, claim: Claim, claim_s: float) -> bool:
        """Extend a claim; False if it is no longer this claimer's to extend."""
        with self._errors("renewing a claim", write=True), self._safe.connection() as conn:
            row = conn.execute(
                "UPDATE tasks SET claim_expires_at = now() + %s * interval '1 second' WHERE promise_id = %s "
                "AND claim = %s AND state = 'claimed' AND claim_expires_at > now() RETURNING 1",
                (claim_s, claim.promise_id, claim.token),
            ).fetchone()
        return row is not None

    @contextlib.contextmanager
    def step_transaction(self, claim: Claim) -> Iterator[psycopg.Connection]:
        """A connection whose transaction begins with the step's first statement and commits
        (durably) when the block ends, or rolls back if it raises; its server process is
        recorded with the claim, for a next claimer to end. A failure of the database inside
        the block is the step's failure (retried like any), not the store's."""
        with self._safe.connection() as conn:
            conn.execute(_STEP_SESSION, {"id": claim.promise_id, "claim": claim.token,
                                         "idle": str(int(IDLE_IN_STEP_TRANSACTION_S * 1000))})
            conn.autocommit = False
            try:
                yield conn
                conn.commit()
            except BaseException:
                if not conn.broken:  # a broken connection's transaction died with it
                    conn.rollback()
                raise
            finally:
                if not conn.broken:
                    conn.autocommit = True

    def finish_claim(self, conn: psycopg.Connection, claim: Claim, value: Any) -> None:
        """In the step's transaction: its task done and its promise resolved with `value`, if
        the claim is still current; ClaimLostError otherwise (the caller rolls back)."""
        value = storable(claim.promise_id, "value", value)
        done, resolved = conn.execute(_FINISH, {
            "id": claim.promise_id, "claim": claim.token, "value": to_jsonb(value),
            "t": time.time(),
        }).fetchone()
        if not (done and resolved):
            raise ClaimLostError(f"{claim.promise_id}: claim {claim.token} is no longer current")

    def drop_claim(self, claim: Claim) -> None:
        """A claimed task whose promise was settled already: done, with nothing to run."""
        with self._errors(f"dropping the task of {claim.promise_id}", write=True), \
                self._fast.connection() as conn:
            conn.execute("UPDATE tasks SET state = 'done', claim_expires_at = NULL "
                         "WHERE promise_id = %s AND claim = %s", (claim.promise_id, claim.token))

    def fail_claim(self, claim: Claim, error: dict[str, Any], retry_in: float | None) -> bool:
        """After a failed attempt: the task ready again in `retry_in` seconds, or (None) its
        promise rejected with `error`; False if the claim was no longer current."""
        error = storable(claim.promise_id, "error", error)
        params = {"id": claim.promise_id, "claim": claim.token, "error": to_jsonb(error),
                  "delay": retry_in, "t": time.time()}
        sql = _RETRY_LATER if retry_in is not None else _REJECT
        with self._errors(f"recording the failure of {claim.promise_id}", write=True), \
                self._safe.connection() as conn:
            return conn.execute(sql, params).fetchone()[0] > 0

    def settled(self, promise_ids: list[str]) -> list[Promise]:
        """Those of the promises that are settled now (by whichever executor)."""
        return [p for p in self.refresh(promise_ids) if p.settled]

    def describe_workflow(self, root: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Record what a participant needs to run `root` (its application, arguments); the
        first description stays. Returns the one recorded."""
        with self._errors(f"describing workflow {root}", write=True), self._safe.connection() as conn:
            conn.execute("INSERT INTO workflows (root, spec) VALUES (%s, %s::jsonb) ON CONFLICT DO NOTHING",
                         (root, _jsonb(root, spec)))
        return self.workflow(root)

    def workflow(self, root: str) -> dict[str, Any] | None:
        """The description of `root`, or None for a workflow never started here."""
        with self._errors(f"reading workflow {root}"), self._fast.connection() as conn:
            row = conn.execute("SELECT spec FROM workflows WHERE root = %s", (root,)).fetchone()
        return None if row is None else row[0]


def _jsonb(promise_id: str, value: Any) -> str:
    return to_jsonb(storable(promise_id, "task", value))

_ENQUEUE = """
INSERT INTO tasks (promise_id, root, spec) SELECT %(id)s, %(root)s, %(spec)s::jsonb FROM fence
ON CONFLICT (promise_id) DO UPDATE
    SET state = 'queued', not_before = now(), claim_expires_at = NULL, spec = excluded.spec
    WHERE tasks.state = 'done' AND NOT EXISTS (SELECT 1 FROM settles WHERE settles.id = excluded.promise_id)
RETURNING 1
"""

_STEP_SESSION = """
WITH mine AS (
    UPDATE tasks SET claim_backend = pg_backend_pid(), claim_backend_start = (
        SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())
    WHERE promise_id = %(id)s AND claim = %(claim)s RETURNING 1
)
SELECT set_config('idle_in_transaction_session_timeout', %(idle)s, false), (SELECT count(*) FROM mine)
"""

# The oldest ready task, claimed; a claim that expired has its step transaction ended (its
# server process, if it is still the one the claim recorded), and the attempt is counted.
_CLAIM = """
WITH c AS (
    SELECT promise_id, claim_backend, claim_backend_start, state = 'claimed' AS expired FROM tasks
    WHERE root = ANY(%(roots)s) AND state <> 'done'
      AND ((state = 'queued' AND not_before <= now()) OR (state = 'claimed' AND claim_expires_at <= now()))
    ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED
), ended AS (
    SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a, c
    WHERE c.expired AND a.pid = c.claim_backend AND a.backend_start = c.claim_backend_start
), t AS (
    UPDATE tasks SET state = 'claimed', claim = tasks.claim + 1, claimed_by = %(owner)s,
                     claim_expires_at = now() + %(s)s * interval '1 second',
                     claim_backend = NULL, claim_backend_start = NULL
    FROM c WHERE tasks.promise_id = c.promise_id
    RETURNING tasks.promise_id, tasks.spec, tasks.claim
), before AS (
    SELECT id, param, attempts, attempts - attempts_at_reopen AS used,
           EXISTS (SELECT 1 FROM settles WHERE settles.id = promises.id) AS settled
    FROM promises WHERE id = (SELECT promise_id FROM t)
), p AS (
    UPDATE promises SET attempts = promises.attempts + 1 FROM t, before
    WHERE promises.id = t.promise_id AND NOT before.settled
      AND before.used < (t.spec->>'max_attempts')::int
    RETURNING promises.attempts, promises.attempts_at_reopen
)
SELECT t.promise_id, t.spec, t.claim, before.param, p.attempts, p.attempts_at_reopen, before.settled,
       before.attempts, (SELECT count(*) FROM ended)
FROM t JOIN before ON before.id = t.promise_id LEFT JOIN p ON true
"""

_FINISH = """
WITH t AS (
    UPDATE tasks SET state = 'done', claim_expires_at = NULL
    WHERE promise_id = %(id)s AND claim = %(claim)s AND state = 'claimed' RETURNING promise_id
), p AS (
    INSERT INTO settles (id, state, value, settled_at)
    SELECT t.promise_id, 'resolved', %(value)s::jsonb, %(t)s FROM t ON CONFLICT (id) DO NOTHING RETURNING id
)
SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM p)
"""

_RETRY_LATER = """
WITH t AS (
    UPDATE tasks SET state = 'queued', not_before = now() + %(delay)s * interval '1 second',
                     last_error = %(error)s::jsonb, claim_expires_at = NULL
    WHERE promise_id = %(id)s AND claim = %(claim)s AND state = 'claimed' RETURNING 1
)
SELECT count(*) FROM t
"""

_REJECT = """
WITH t AS (
    UPDATE tasks SET state = 'done', last_error = %(error)s::jsonb, claim_expires_at = NULL
    WHERE promise_id = %(id)s AND claim = %(claim)s AND state = 'claimed' RETURNING promise_id
), p AS (
    INSERT INTO settles (id, state, error, settled_at)
    SELECT t.promise_id, 'rejected', %(error)s::jsonb, %(t)s FROM t ON CONFLICT (id) DO NOTHING RETURNING 1
)
SELECT count(*) FROM t
"""
