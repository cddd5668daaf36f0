"""store.log and store.promise: the pure rules, without any file."""

from __future__ import annotations

from typing import Any

import pytest

from store.errors import PromiseConflictError, PromiseNotFoundError, StoreError
from store.log import (
    Entry,
    InvalidRecordError,
    apply,
    check_attempt,
    check_create,
    check_reopen,
    check_settle,
    snapshot,
    snapshot_record,
)
from store.promise import Promise, State


def replay(*records: dict[str, Any]) -> dict[str, Promise]:
    """Fold `records` into a fresh index; return a snapshot of each promise."""
    index: dict[str, Entry] = {}
    for record in records:
        apply(index, record)
    return {pid: snapshot(pid, entry) for pid, entry in index.items()}


CREATE = {"op": "create", "id": "p", "param": {"fn": "f"}, "t": 1.0}


def test_create_adds_a_pending_promise() -> None:
    promise = replay(CREATE)["p"]
    assert promise == Promise("p", {"fn": "f"}, created_at=1.0)
    assert promise.state is State.PENDING
    assert not promise.settled


def test_attempt_records_its_number() -> None:
    index = replay(CREATE, {"op": "attempt", "id": "p", "n": 1, "t": 2.0},
                   {"op": "attempt", "id": "p", "n": 2, "t": 3.0})
    assert index["p"].attempts == 2


def test_resolve_settles_with_a_value() -> None:
    promise = replay(CREATE, {"op": "resolve", "id": "p", "value": [1], "t": 2.0})["p"]
    assert (promise.state, promise.value, promise.error) == (State.RESOLVED, [1], None)
    assert promise.settled_at == 2.0
    assert promise.settled


def test_reject_settles_with_an_error() -> None:
    error = {"type": "ValueError", "message": "bad"}
    promise = replay(CREATE, {"op": "reject", "id": "p", "error": error, "t": 2.0})["p"]
    assert (promise.state, promise.value, promise.error) == (State.REJECTED, None, error)


def test_reopen_makes_a_rejected_promise_pending_and_keeps_its_attempts() -> None:
    index = replay(
        CREATE,
        {"op": "attempt", "id": "p", "n": 1, "t": 2.0},
        {"op": "reject", "id": "p", "error": {"type": "E"}, "t": 3.0},
        {"op": "reopen", "id": "p", "reason": "fixed", "t": 4.0},
    )
    promise = index["p"]
    assert promise.state is State.PENDING
    assert (promise.error, promise.settled_at) == (None, None)
    assert (promise.attempts, promise.attempts_at_reopen, promise.attempts_since_reopen) == (1, 1, 0)
    assert promise.created_at == 1.0


@pytest.mark.parametrize("state", ["pending", "resolved"])
def test_reopen_of_a_promise_that_is_not_rejected_is_invalid(state: str) -> None:
    records = [CREATE]
    if state == "resolved":
        records.append({"op": "resolve", "id": "p", "value": 1, "t": 2.0})
    with pytest.raises(InvalidRecordError, match=r"reopen record: promise p: is .*only a rejected"):
        replay(*records, {"op": "reopen", "id": "p", "reason": "", "t": 3.0})


def test_creating_a_promise_twice_is_invalid() -> None:
    with pytest.raises(InvalidRecordError, match="created twice"):
        replay(CREATE, CREATE)


@pytest.mark.parametrize("op", ["attempt", "resolve", "reject", "reopen"])
def test_record_for_a_promise_never_created_is_invalid(op: str) -> None:
    with pytest.raises(InvalidRecordError, match="never created"):
        replay({"op": op, "id": "ghost", "n": 1, "t": 1.0})


def test_unknown_record_type_is_invalid() -> None:
    with pytest.raises(InvalidRecordError, match="unknown record type"):
        replay(CREATE, {"op": "explode", "id": "p", "t": 2.0})


@pytest.mark.parametrize("record", [{"op": "create", "t": 1.0}, {"op": "create", "id": 7, "t": 1}])
def test_record_without_a_string_id_is_invalid(record: dict[str, Any]) -> None:
    with pytest.raises(InvalidRecordError, match="no promise id"):
        replay(record)


def test_snapshot_record_replays_to_the_same_promise() -> None:
    promise = Promise("p", {"fn": "f"}, State.REJECTED, None, {"type": "E"}, 3, 1, 1.0, 2.0)
    assert replay(snapshot_record(promise))["p"] == promise


def test_a_snapshot_of_a_promise_already_indexed_is_invalid() -> None:
    promise = Promise("p", 1, State.RESOLVED, "v", None, 1, 0, 1.0, 2.0)
    with pytest.raises(InvalidRecordError, match="created twice"):
        replay(CREATE, snapshot_record(promise))


@pytest.mark.parametrize("state", [None, "done"])
def test_snapshot_without_a_valid_state_is_invalid(state: str | None) -> None:
    with pytest.raises(InvalidRecordError, match="'state' is not a state"):
        replay({"op": "promise", "id": "p", "state": state})


def test_invalid_record_error_is_a_value_error() -> None:
    assert issubclass(InvalidRecordError, ValueError)


def entry(promise: Promise) -> Entry:
    """The index entry of a promise, as the rules see it."""
    return list(promise[1:])


def test_check_create_accepts_the_same_param() -> None:
    check_create(entry(Promise("p", {"a": [1]})), "p", {"a": [1]})


def test_check_create_refuses_another_param() -> None:
    with pytest.raises(PromiseConflictError, match="promise p") as info:
        check_create(entry(Promise("p", {"a": 1})), "p", {"a": 2})
    assert info.value.promise_id == "p"


PENDING = entry(Promise("p", None, attempts=2))
RESOLVED = entry(Promise("p", None, State.RESOLVED, value=1))
REJECTED = entry(Promise("p", None, State.REJECTED, error={"type": "E"}))


def test_check_settle_of_a_pending_promise_must_write() -> None:
    assert check_settle(PENDING, "p", State.RESOLVED, 1) is True


@pytest.mark.parametrize(("existing", "state", "outcome"), [
    (RESOLVED, State.RESOLVED, 1),
    (REJECTED, State.REJECTED, {"type": "E"}),
])
def test_check_settle_with_the_same_outcome_is_a_no_op(
    existing: Entry, state: State, outcome: Any
) -> None:
    assert check_settle(existing, "p", state, outcome) is False


@pytest.mark.parametrize(("existing", "state", "outcome"), [
    (RESOLVED, State.RESOLVED, 2),
    (RESOLVED, State.REJECTED, {"type": "E"}),
    (REJECTED, State.REJECTED, {"type": "F"}),
    (REJECTED, State.RESOLVED, 1),
])
def test_check_settle_with_another_outcome_conflicts(
    existing: Entry, state: State, outcome: Any
) -> None:
    with pytest.raises(PromiseConflictError, match="cannot settle it again"):
        check_settle(existing, "p", state, outcome)


def test_check_settle_of_an_unknown_promise_is_not_found() -> None:
    with pytest.raises(PromiseNotFoundError):
        check_settle(None, "p", State.RESOLVED, 1)


def test_check_attempt_of_a_pending_promise_returns_the_next_number() -> None:
    assert check_attempt(PENDING, "p") == 3


@pytest.mark.parametrize("settled", [RESOLVED, REJECTED])
def test_check_attempt_of_a_settled_promise_conflicts(settled: Entry) -> None:
    with pytest.raises(PromiseConflictError, match="no attempt can start"):
        check_attempt(settled, "p")


def test_check_attempt_of_an_unknown_promise_is_not_found() -> None:
    with pytest.raises(PromiseNotFoundError):
        check_attempt(None, "p")


def test_check_reopen_accepts_only_a_rejected_promise() -> None:
    check_reopen(REJECTED, "p", "fixed")
    for existing in (PENDING, RESOLVED):
        with pytest.raises(PromiseConflictError, match="only a rejected promise"):
            check_reopen(existing, "p", "fixed")
    with pytest.raises(PromiseNotFoundError):
        check_reopen(None, "p", "fixed")


def test_check_reopen_needs_a_str_reason() -> None:
    with pytest.raises(TypeError, match="a reason to reopen is a str"):
        check_reopen(REJECTED, "p", 7)


@pytest.mark.parametrize("error", ["boom", None, ["E"]])
def test_check_settle_refuses_an_error_that_is_not_a_json_object(error: Any) -> None:
    with pytest.raises(TypeError, match="an error is a JSON object"):
        check_settle(PENDING, "p", State.REJECTED, error)


def test_not_found_error_is_a_store_error_and_a_key_error_naming_the_id() -> None:
    error = PromiseNotFoundError("import/x.1")
    assert isinstance(error, StoreError)
    assert isinstance(error, KeyError)
    assert str(error) == "no promise with id 'import/x.1'"


def test_promise_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Promise("p", None).state = State.RESOLVED  # type: ignore[misc]
