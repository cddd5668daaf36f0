"""Pure rules of the promise log: how each record changes the index, and which calls conflict.

Kept free of I/O so any backend (this JSON-lines file, a future PostgreSQL table) shares them.
"""

from __future__ import annotations

from typing import Any

from .errors import PromiseConflictError, PromiseNotFoundError
from .promise import Promise, State


class InvalidRecordError(ValueError):
    """A well-formed line whose content cannot follow the records before it."""


def apply(index: dict[str, Promise], record: dict[str, Any]) -> None:
    """Fold one record into `index` (promise id -> latest snapshot)."""
    op = record.get("op")
    pid = record.get("id")
    if not isinstance(pid, str):
        raise InvalidRecordError("record has no promise id")
    if op == "promise":
        index[pid] = _snapshot_from_record(pid, record)
        return
    if op == "create":
        if pid in index:
            raise InvalidRecordError(f"promise {pid} created twice")
        index[pid] = Promise(pid, record.get("param"), created_at=record["t"])
        return
    old = index.get(pid)
    if old is None:
        raise InvalidRecordError(f"{op!r} for promise {pid}, which was never created")
    if op == "attempt":
        index[pid] = Promise(
            pid, old.param, old.state, old.value, old.error, record["n"],
            old.attempts_at_reopen, old.created_at, old.settled_at,
        )
    elif op == "resolve":
        index[pid] = Promise(
            pid, old.param, State.RESOLVED, record.get("value"), None, old.attempts,
            old.attempts_at_reopen, old.created_at, record["t"],
        )
    elif op == "reject":
        index[pid] = Promise(
            pid, old.param, State.REJECTED, None, record.get("error"), old.attempts,
            old.attempts_at_reopen, old.created_at, record["t"],
        )
    elif op == "reopen":
        if old.state is not State.REJECTED:
            raise InvalidRecordError(f"reopen of promise {pid}, which is {old.state.value}")
        index[pid] = Promise(pid, old.param, attempts=old.attempts,
                             attempts_at_reopen=old.attempts, created_at=old.created_at)
    else:
        raise InvalidRecordError(f"unknown record type {op!r}")


def snapshot_record(promise: Promise) -> dict[str, Any]:
    """The single record that compaction writes for a promise."""
    return {
        "op": "promise", "id": promise.id, "param": promise.param,
        "state": promise.state.value, "value": promise.value, "error": promise.error,
        "attempts": promise.attempts, "reopened": promise.attempts_at_reopen,
        "created": promise.created_at, "settled": promise.settled_at,
    }


def _snapshot_from_record(pid: str, record: dict[str, Any]) -> Promise:
    try:
        state = State(record["state"])
    except (KeyError, ValueError):
        raise InvalidRecordError(f"snapshot of {pid} has no valid state") from None
    return Promise(
        pid, record.get("param"), state, record.get("value"), record.get("error"),
        record.get("attempts", 0), record.get("reopened", 0),
        record.get("created", 0.0), record.get("settled"),
    )


def check_create(existing: Promise, param: Any) -> None:
    """Creating an existing id is idempotent only with the same (normalised) param."""
    if existing.param != param:
        raise PromiseConflictError(
            existing.id, f"exists with param {existing.param!r}, not {param!r}"
        )


def check_settle(existing: Promise | None, promise_id: str, state: State, outcome: Any) -> bool:
    """Whether a settle must be written: False for the same outcome again, an error otherwise."""
    if existing is None:
        raise PromiseNotFoundError(promise_id)
    if existing.state is State.PENDING:
        return True
    stored = existing.value if existing.state is State.RESOLVED else existing.error
    if existing.state is state and stored == outcome:
        return False
    raise PromiseConflictError(
        promise_id, f"already {existing.state.value} with {stored!r}; cannot settle it again"
    )


def check_attempt(existing: Promise | None, promise_id: str) -> Promise:
    if existing is None:
        raise PromiseNotFoundError(promise_id)
    if existing.settled:
        raise PromiseConflictError(promise_id, f"is {existing.state.value}; no attempt can start")
    return existing


def check_reopen(existing: Promise | None, promise_id: str) -> Promise:
    """Only a rejected promise can be reopened; a resolved one is final forever."""
    if existing is None:
        raise PromiseNotFoundError(promise_id)
    if existing.state is not State.REJECTED:
        raise PromiseConflictError(
            promise_id, f"is {existing.state.value}; only a rejected promise can be retried"
        )
    return existing
