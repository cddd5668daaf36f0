"""Pure rules of the promise log: which calls and records may follow the ones before them, and
how each record changes the index.

One set of rules serves both sides: the writer checks a call with `check_*` before it writes
its record, and `apply` checks every record it folds with the same functions, so a file whose
checksums are valid but whose history is impossible (resolved twice with different values, an
attempt after a settle, a count that is not a number) is refused on open, never replayed.

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

# Module globals: reading State.X costs an enum lookup, ten times a global's cost.
_PENDING, _RESOLVED, _REJECTED = State.PENDING, State.RESOLVED, State.REJECTED
_MISSING = object()
_OPS = frozenset({"create", "attempt", "resolve", "reject", "reopen", "promise"})
_NUMBER = (float, int)  # as JSON decodes numbers; not bool


class InvalidRecordError(ValueError):
    """A well-formed line whose content cannot follow the records before it."""


# -- the rules, for a call and for a record alike ----------------------------------------------


def check_id(promise_id: Any) -> None:
    """A promise id is a non-empty str that every backend can keep: valid UTF-8 (no lone
    surrogate) without a NUL character (no PostgreSQL text holds one)."""
    if (type(promise_id) is not str or not promise_id or "\x00" in promise_id
            or (not promise_id.isascii() and not _is_utf8(promise_id))):
        raise TypeError(f"a promise id is a non-empty str (no NUL, no lone surrogate), not {promise_id!r}")


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_create(entry: Entry, promise_id: str, param: Any) -> None:
    """Creating an existing id is idempotent only with the same (normalised) param."""
    if not same_json(entry[PARAM], param):
        raise PromiseConflictError(
            promise_id, f"exists with param {entry[PARAM]!r}, not {param!r}"
        )


def check_attempt(entry: Entry | None, promise_id: str) -> int:
    """The number the next attempt of a pending promise gets (1, 2, …)."""
    if entry is None:
        raise PromiseNotFoundError(promise_id)
    if entry[STATE] is not _PENDING:
        raise PromiseConflictError(promise_id, f"is {entry[STATE].value}; no attempt can start")
    return entry[ATTEMPTS] + 1


def check_settle(entry: Entry | None, promise_id: str, state: State, outcome: Any) -> bool:
    """Whether a settle must be written: False for the same outcome again, an error otherwise."""
    if state is _REJECTED:
        check_error(promise_id, outcome)
    if entry is None:
        raise PromiseNotFoundError(promise_id)
    current = entry[STATE]
    if current is _PENDING:
        return True
    stored = entry[VALUE] if current is _RESOLVED else entry[ERROR]
    if current is state and same_json(stored, outcome):
        return False
    raise PromiseConflictError(
        promise_id, f"already {current.value} with {stored!r}; cannot settle it again"
    )


def check_error(promise_id: str, error: Any) -> None:
    """A rejection's error is a JSON object (type, message, …); a value may be any JSON value."""
    if type(error) is not dict:
        raise TypeError(f"promise {promise_id}: an error is a JSON object, not {error!r}")


def check_reopen(entry: Entry | None, promise_id: str, reason: Any) -> None:
    """Only a rejected promise can be reopened, for a reason; a resolved one is final forever."""
    if type(reason) is not str:
        raise TypeError(f"promise {promise_id}: a reason to reopen is a str, not {reason!r}")
    if entry is None:
        raise PromiseNotFoundError(promise_id)
    if entry[STATE] is not _REJECTED:
        raise PromiseConflictError(
            promise_id, f"is {entry[STATE].value}; only a rejected promise can be retried"
        )


# -- folding records ---------------------------------------------------------------------------


def apply(index: dict[str, Entry], record: dict[str, Any]) -> None:
    """Fold one record into `index` (promise id -> entry).

    Raises InvalidRecordError, leaving `index` as it was, if the record is not one the writer
    could have written after the records before it. This is the hot loop of opening a store,
    so fields are checked inline and only the rules are calls.
    """
    pid = record.get("id")
    if type(pid) is not str or not pid:
        raise InvalidRecordError("record has no promise id")
    op = record.get("op")
    if op not in _OPS:
        raise InvalidRecordError(f"unknown record type {op!r}")
    try:
        if op == "promise":
            if pid in index:
                raise InvalidRecordError(f"promise {pid} created twice")
            index[pid] = _from_snapshot(pid, record)
            return
        t = record.get("t")
        if type(t) not in _NUMBER:
            raise _bad_field(record, "t", "a number")
        if op == "create":
            if pid in index:
                raise InvalidRecordError(f"promise {pid} created twice")
            param = record.get("param", _MISSING)
            if param is _MISSING:
                raise _bad_field(record, "param")
            entry = [param, _PENDING, None, None, 0, 0, t, None]
            if "n" in record:  # an exclusive store writes a creation and its first attempt as one
                entry[ATTEMPTS] = _attempt_number(entry, pid, record)
            index[pid] = entry
            return
        entry = index.get(pid)
        if entry is None:
            raise InvalidRecordError(f"{op!r} for promise {pid}, which was never created")
        if op == "resolve":
            value = record.get("value", _MISSING)
            if value is _MISSING:
                raise _bad_field(record, "value")
            if check_settle(entry, pid, _RESOLVED, value):
                entry[STATE], entry[VALUE], entry[SETTLED] = _RESOLVED, value, t
        elif op == "attempt":
            entry[ATTEMPTS] = _attempt_number(entry, pid, record)
        elif op == "reject":
            error = record.get("error", _MISSING)
            if error is _MISSING:
                raise _bad_field(record, "error")
            if check_settle(entry, pid, _REJECTED, error):
                entry[STATE], entry[ERROR], entry[SETTLED] = _REJECTED, error, t
        else:  # reopen
            check_reopen(entry, pid, record.get("reason"))
            entry[STATE], entry[ERROR], entry[SETTLED] = _PENDING, None, None
            entry[REOPENED] = entry[ATTEMPTS]
    except (PromiseConflictError, TypeError) as exc:  # a rule the writer checks, broken
        raise InvalidRecordError(f"{op} record: {exc}") from None


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


def _attempt_number(entry: Entry, pid: str, record: dict[str, Any]) -> int:
    n = record.get("n")
    expected = check_attempt(entry, pid)
    if type(n) is not int or n != expected:
        raise InvalidRecordError(f"{_where(record)}: attempt number {n!r}, where {expected} comes next")
    return n


def _from_snapshot(pid: str, record: dict[str, Any]) -> Entry:
    """The entry a compaction's "promise" record describes, if its fields fit together."""
    try:
        state = State(record.get("state"))
    except ValueError:
        raise _bad_field(record, "state", "a state") from None
    entry = [
        _field(record, "param"), state, _field(record, "value"), _field(record, "error"),
        _count(record, "attempts"), _count(record, "reopened"), _number(record, "created"),
        None if state is _PENDING else _number(record, "settled"),
    ]
    if state is _REJECTED:
        check_error(pid, entry[ERROR])
    why = _contradiction(entry, record)
    if why is not None:
        raise InvalidRecordError(f"{_where(record)}: impossible snapshot: {why}")
    return entry


def _contradiction(entry: Entry, record: dict[str, Any]) -> str | None:
    """What in a snapshot no history of records could have led to, if anything."""
    state = entry[STATE]
    if entry[REOPENED] > entry[ATTEMPTS]:
        return "reopened after more attempts than it had"
    if state is _PENDING and record.get("settled") is not None:
        return "a pending promise has a settle time"
    if state is not _RESOLVED and entry[VALUE] is not None:
        return f"a {state.value} promise has a value"
    if state is not _REJECTED and entry[ERROR] is not None:
        return f"a {state.value} promise has an error"
    return None


def _field(record: dict[str, Any], key: str) -> Any:
    value = record.get(key, _MISSING)
    if value is _MISSING:
        raise _bad_field(record, key)
    return value


def _number(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    if type(value) not in _NUMBER:
        raise _bad_field(record, key, "a number")
    return value


def _count(record: dict[str, Any], key: str) -> int:
    value = record.get(key)
    if type(value) is not int or value < 0:
        raise _bad_field(record, key, "a count")
    return value


def _bad_field(record: dict[str, Any], key: str, kind: str = "") -> InvalidRecordError:
    """The error for a field that is missing, or is not the `kind` of value it must be."""
    if key not in record:
        return InvalidRecordError(f"{_where(record)}: no {key!r}")
    return InvalidRecordError(f"{_where(record)}: {key!r} is not {kind}: {record[key]!r}")


def _where(record: dict[str, Any]) -> str:
    return f"{record.get('op')} record: promise {record.get('id')}"
