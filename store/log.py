"""Pure rules of the promise log: how each record changes the index, and which calls conflict.

Kept free of I/O so any backend (this JSON-lines file, a future PostgreSQL table) shares them.
The index keeps one mutable `Entry` per promise, so folding a record allocates nothing; callers
get immutable `Promise` snapshots from `snapshot()`.
"""

from __future__ import annotations

from typing import Any

from .codec import same_json
from .errors import PromiseConflictError, PromiseNotFoundError
from .promise import Promise, State

# Entry fields, by position: a list is the cheapest mutable record to fold 100k lines into.
PARAM, STATE, VALUE, ERROR, ATTEMPTS, REOPENED, CREATED, SETTLED = range(8)
Entry = list


class InvalidRecordError(ValueError):
    """A well-formed line whose content cannot follow the records before it."""


def apply(index: dict[str, Entry], record: dict[str, Any]) -> None:
    """Fold one record into `index` (promise id -> entry)."""
    op = record.get("op")
    pid = record.get("id")
    if type(pid) is not str:
        raise InvalidRecordError("record has no promise id")
    if op == "create":
        if pid in index:
            raise InvalidRecordError(f"promise {pid} created twice")
        # An exclusive store writes a step's creation and first attempt as one line ("n": 1).
        index[pid] = [record["param"], State.PENDING, None, None, record.get("n", 0), 0, record["t"], None]
        return
    if op == "promise":
        index[pid] = _entry_from_snapshot(pid, record)
        return
    entry = index.get(pid)
    if entry is None:
        raise InvalidRecordError(f"{op!r} for promise {pid}, which was never created")
    if op == "attempt":
        entry[ATTEMPTS] = record["n"]
    elif op == "resolve":
        entry[STATE], entry[VALUE], entry[SETTLED] = State.RESOLVED, record["value"], record["t"]
    elif op == "reject":
        entry[STATE], entry[ERROR], entry[SETTLED] = State.REJECTED, record["error"], record["t"]
    elif op == "reopen":
        if entry[STATE] is not State.REJECTED:
            raise InvalidRecordError(f"reopen of promise {pid}, which is {entry[STATE].value}")
        entry[STATE], entry[ERROR], entry[SETTLED] = State.PENDING, None, None
        entry[REOPENED] = entry[ATTEMPTS]
    else:
        raise InvalidRecordError(f"unknown record type {op!r}")


def snapshot(pid: str, entry: Entry) -> Promise:
    return Promise(pid, *entry)


def snapshot_record(promise: Promise) -> dict[str, Any]:
    """The single record that compaction writes for a promise."""
    return {
        "op": "promise", "id": promise.id, "param": promise.param,
        "state": promise.state.value, "value": promise.value, "error": promise.error,
        "attempts": promise.attempts, "reopened": promise.attempts_at_reopen,
        "created": promise.created_at, "settled": promise.settled_at,
    }


def _entry_from_snapshot(pid: str, record: dict[str, Any]) -> Entry:
    try:
        state = State(record["state"])
    except (KeyError, ValueError):
        raise InvalidRecordError(f"snapshot of {pid} has no valid state") from None
    return [
        record.get("param"), state, record.get("value"), record.get("error"),
        record.get("attempts", 0), record.get("reopened", 0),
        record.get("created", 0.0), record.get("settled"),
    ]


def check_create(existing: Promise, param: Any) -> None:
    """Creating an existing id is idempotent only with the same (normalised) param."""
    if not same_json(existing.param, param):
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
    if existing.state is state and same_json(stored, outcome):
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
