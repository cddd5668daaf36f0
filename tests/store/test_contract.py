"""The PromiseStore contract (store/base.py), run against every backend.

A new backend is "pass this suite": add it to BACKENDS (the fixtures `backend` and `place`
are in conftest.py). File specifics (lines, reopening the
file, torn tails) are in the test_jsonl*.py files.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from store import (
    PromiseConflictError,
    PromiseNotFoundError,
    PromiseStore,
    State,
    StoreError,
    UnstorableValueError,
    WorkflowBusyError,
    open_store,
)

BACKENDS = {
    "jsonl-shared": lambda tmp: open_store(tmp / "promises.jsonl", durability="none", lock_timeout=0.2),
    "jsonl-exclusive": lambda tmp: open_store(
        f"jsonl:{tmp / 'promises.jsonl'}", durability="none", exclusive=True, lock_timeout=0.2
    ),
    "memory": lambda tmp: open_store("memory:", lock_timeout=0.2),
    # `tmp` is a database URL here (see the `place` fixture): a fresh database per test
    "postgresql": lambda url: open_store(url, lock_timeout=0.2),
}


@pytest.fixture
def store(backend: str, place: Path | str) -> Iterator[PromiseStore]:
    with BACKENDS[backend](place) as store:
        yield store


def test_create_returns_a_pending_promise(store: PromiseStore) -> None:
    promise = store.create("import/a", {"fn": "batch", "args": [1]})
    assert promise.id == "import/a"
    assert promise.param == {"fn": "batch", "args": [1]}
    assert promise.state is State.PENDING
    assert (promise.value, promise.error, promise.attempts) == (None, None, 0)
    assert promise.created_at > 0


def test_create_with_the_same_param_returns_the_existing_promise(store: PromiseStore) -> None:
    first = store.create("a", {"x": 1})
    store.start_attempt("a")
    again = store.create("a", {"x": 1})
    assert again == store.get("a")
    assert again.created_at == first.created_at
    assert again.attempts == 1


def test_create_with_another_param_conflicts(store: PromiseStore) -> None:
    store.create("a", {"x": 1})
    with pytest.raises(PromiseConflictError, match="promise a") as info:
        store.create("a", {"x": 2})
    assert info.value.promise_id == "a"
    assert store.get("a").param == {"x": 1}


def test_create_compares_params_after_normalising_them(store: PromiseStore) -> None:
    store.create("a", {"args": (1, 2)})
    assert store.create("a", {"args": [1, 2]}).param == {"args": [1, 2]}


def test_create_with_true_where_the_param_was_1_conflicts(store: PromiseStore) -> None:
    store.create("a", {"flag": 1})
    with pytest.raises(PromiseConflictError):
        store.create("a", {"flag": True})


def test_start_attempt_counts_1_2_3(store: PromiseStore) -> None:
    store.create("a", None)
    assert [store.start_attempt("a") for _ in range(3)] == [1, 2, 3]
    assert store.get("a").attempts == 3


@pytest.mark.parametrize("settle", ["resolve", "reject"])
def test_start_attempt_of_a_settled_promise_conflicts(store: PromiseStore, settle: str) -> None:
    store.create("a", None)
    getattr(store, settle)("a", {"type": "E"})
    with pytest.raises(PromiseConflictError, match="no attempt can start"):
        store.start_attempt("a")


def test_start_attempt_of_an_unknown_promise_is_not_found(store: PromiseStore) -> None:
    with pytest.raises(PromiseNotFoundError) as info:
        store.start_attempt("ghost")
    assert info.value.promise_id == "ghost"


def test_resolve_settles_with_the_value(store: PromiseStore) -> None:
    store.create("a", None)
    promise = store.resolve("a", {"rows": 10})
    assert (promise.state, promise.value, promise.error) == (State.RESOLVED, {"rows": 10}, None)
    assert promise.settled_at >= promise.created_at
    assert store.get("a") == promise


def test_a_held_resolve_is_settled_at_once_for_its_owner_and_for_all_after_the_next_write(
    backend: str, place: Path | str
) -> None:
    with BACKENDS[backend](place) as store, store.own("w"):
        store.create("w.0", None)
        store.start_attempt("w.0")
        held = store.resolve("w.0", [1, 2], hold=True)
        assert (held.state, held.value) == (State.RESOLVED, [1, 2]) and store.get("w.0") == held
        assert store.resolve("w.0", [1, 2], hold=True) == held  # the same value again: a no-op
        with pytest.raises(PromiseConflictError):
            store.resolve("w.0", [3])
        store.create("w.1", None)
        store.start_attempt("w.1")
    if backend != "memory":  # a new memory store is empty: no second look
        with BACKENDS[backend](place) as store:
            assert store.get("w.0").value == [1, 2]


@pytest.mark.parametrize(("settle", "outcome"), [
    ("resolve", {"rows": 11}),
    ("reject", {"type": "ValueError", "message": "late"}),
])
def test_settling_a_resolved_promise_differently_conflicts(
    store: PromiseStore, settle: str, outcome: dict
) -> None:
    store.create("a", None)
    store.resolve("a", {"rows": 10})
    with pytest.raises(PromiseConflictError, match="already resolved"):
        getattr(store, settle)("a", outcome)
    assert store.get("a").value == {"rows": 10}


def test_resolving_with_true_after_1_conflicts(store: PromiseStore) -> None:
    store.create("a", None)
    store.resolve("a", 1)
    with pytest.raises(PromiseConflictError):
        store.resolve("a", True)


def test_reject_settles_with_the_error(store: PromiseStore) -> None:
    store.create("a", None)
    promise = store.reject("a", {"type": "IOError", "message": "disk"})
    assert promise.state is State.REJECTED
    assert promise.error == {"type": "IOError", "message": "disk"}
    assert promise.value is None


def test_reject_with_an_exception_stores_its_type_and_message(store: PromiseStore) -> None:
    store.create("a", None)
    promise = store.reject("a", ValueError("bad row 7"))
    assert promise.error == {"type": "ValueError", "message": "bad row 7"}


@pytest.mark.parametrize(("settle", "outcome"), [
    ("reject", {"type": "ValueError", "message": "other"}),
    ("resolve", 1),
])
def test_settling_a_rejected_promise_differently_conflicts(
    store: PromiseStore, settle: str, outcome: object
) -> None:
    store.create("a", None)
    store.reject("a", ValueError("x"))
    with pytest.raises(PromiseConflictError, match="already rejected"):
        getattr(store, settle)("a", outcome)


@pytest.mark.parametrize("settle", ["resolve", "reject"])
def test_settling_an_unknown_promise_is_not_found(store: PromiseStore, settle: str) -> None:
    with pytest.raises(PromiseNotFoundError):
        getattr(store, settle)("ghost", {"type": "E"})


def test_reopen_makes_a_rejected_promise_pending(store: PromiseStore) -> None:
    store.create("a", None)
    store.start_attempt("a")
    store.start_attempt("a")
    store.reject("a", RuntimeError("flaky"))
    promise = store.reopen("a", "operator retry")
    assert promise.state is State.PENDING
    assert (promise.error, promise.settled_at) == (None, None)
    assert (promise.attempts, promise.attempts_since_reopen) == (2, 0)


def test_reopened_promise_can_run_and_settle_again(store: PromiseStore) -> None:
    store.create("a", None)
    store.start_attempt("a")
    store.reject("a", RuntimeError("flaky"))
    store.reopen("a", "retry")
    assert store.start_attempt("a") == 2
    assert store.resolve("a", "done").value == "done"
    assert store.get("a").attempts_since_reopen == 1


@pytest.mark.parametrize("settle", [None, "resolve"])
def test_reopen_of_a_promise_that_is_not_rejected_conflicts(
    store: PromiseStore, settle: str | None
) -> None:
    store.create("a", None)
    if settle:
        store.resolve("a", 1)
    with pytest.raises(PromiseConflictError, match="only a rejected promise"):
        store.reopen("a", "retry")


def test_reopen_of_an_unknown_promise_is_not_found(store: PromiseStore) -> None:
    with pytest.raises(PromiseNotFoundError):
        store.reopen("ghost", "retry")


def test_get_of_an_unknown_id_is_none(store: PromiseStore) -> None:
    assert store.get("ghost") is None


def test_list_filters_by_prefix_in_creation_order(store: PromiseStore) -> None:
    for pid in ["import/b", "import/a", "other/c", "import/a.1", "import/a.2"]:
        store.create(pid, None)
    store.resolve("import/b", 1)  # settling does not move a promise in the order
    assert [p.id for p in store.list("import/a")] == ["import/a", "import/a.1", "import/a.2"]
    assert [p.id for p in store.list()] == [
        "import/b", "import/a", "other/c", "import/a.1", "import/a.2",
    ]
    assert store.list("nothing/") == []


# -- values, ids, ownership, lifetime -----------------------------------------------------------


def test_values_come_back_as_json(store: PromiseStore) -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    store.create("a", {"args": (1, 2)})
    assert store.get("a").param == {"args": [1, 2]}
    assert store.resolve("a", {"t": (1,), "when": when}).value == {"t": [1], "when": "2026-01-02T03:04:05"}


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"a": [1, {2, 3}]}, r'\$\["a"\]\[1\]: a set'),
        ({1: "a"}, r"\$: a key that is not a str \(int 1\)"),
        ([2**64], r"\$\[0\]: an int \(Integer exceeds 64-bit range\)"),
        ({"x": object()}, r'\$\["x"\]: an object'),
    ],
)
def test_a_value_json_cannot_hold_names_the_promise_and_where_and_writes_nothing(
    store: PromiseStore, value: object, where: str
) -> None:
    store.create("a", None)
    with pytest.raises(UnstorableValueError, match=rf"promise a: value cannot be stored as JSON: {where}"):
        store.resolve("a", value)
    with pytest.raises(TypeError, match="promise b: param"):
        store.create("b", value)
    assert store.get("a").state is State.PENDING and store.get("b") is None


def test_numbers_come_back_exactly(store: PromiseStore) -> None:
    numbers = [1e20, -1.5e-7, 0.1, 1.0, 5e-324, 1.7976931348623157e308, 2**63 - 1, -(2**63), 0]
    store.create("a", None)
    store.resolve("a", {"n": numbers, "text": "1e5 \\u0000"})
    value = store.list()[0].value  # read back from where it is kept
    assert value == {"n": numbers, "text": "1e5 \\u0000"}
    assert [type(n) for n in value["n"]] == [type(n) for n in numbers]


@pytest.mark.parametrize("value", ["a\x00b", {"k\x00": 1}])
def test_a_nul_character_is_refused_by_every_backend(store: PromiseStore, value: object) -> None:
    store.create("a", None)
    with pytest.raises(UnstorableValueError, match="NUL character"):
        store.resolve("a", value)
    assert store.get("a").state is State.PENDING


def test_negative_zero_comes_back_zero_in_every_backend(store: PromiseStore) -> None:
    store.create("a", {"x": -0.0})
    assert store.create("a", {"x": 0.0}).param == {"x": 0.0}  # the same param
    store.resolve("a", [-0.0, -0.05])
    assert store.list()[0].value == [0.0, -0.05]


@pytest.mark.parametrize("bad", [None, 7, b"a", "", "a\x00b", "a\ud800"])
def test_an_id_that_is_not_a_non_empty_str_is_refused(store: PromiseStore, bad: object) -> None:
    with pytest.raises(TypeError, match="non-empty str"):
        store.create(bad, None)  # type: ignore[arg-type]
    assert store.list() == []


def test_an_error_must_be_a_json_object(store: PromiseStore) -> None:
    store.create("a", None)
    with pytest.raises(TypeError, match="an error is a JSON object"):
        store.reject("a", "just text")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["jsonl-shared", "memory", "postgresql"])  # an exclusive one owns all
def test_own_is_exclusive_per_root_and_released_on_exit(
    store: PromiseStore, backend: str, place: Path | str
) -> None:
    other = store if backend == "memory" else BACKENDS[backend](place)
    outcome: list[BaseException | None] = []

    def contend(root: str) -> None:
        try:
            with other.own(root):
                outcome.append(None)
        except WorkflowBusyError as exc:
            outcome.append(exc)

    with store.own("root"):
        for root in ("root", "another"):  # run in another thread: a second driver
            contender = threading.Thread(target=contend, args=(root,))
            contender.start()
            contender.join()
    busy, free = outcome
    assert isinstance(busy, WorkflowBusyError) and "workflow root is being run by another" in str(busy)
    assert free is None
    with other.own("root"):  # released
        pass


def test_close_is_idempotent_and_the_store_is_a_context_manager(backend: str, place: Path | str) -> None:
    with BACKENDS[backend](place) as store:
        store.create("a", 1)
    store.close()
    store.close()


def test_compact_keeps_every_promise_as_it_was(store: PromiseStore) -> None:
    store.create("a", 1)
    store.start_attempt("a")
    store.resolve("a", "done")
    store.create("b", 2)
    store.reject("b", {"type": "E"})
    before = store.list()
    store.compact()
    assert store.list() == before


@pytest.mark.parametrize("call", ["create", "start_attempt", "resolve", "reject", "reopen", "get"])
def test_every_call_refuses_an_id_that_is_not_a_str(store: PromiseStore, call: str) -> None:
    args = {"create": (None,), "resolve": (1,), "reject": ({"type": "E"},), "reopen": ("r",)}
    with pytest.raises(TypeError, match="non-empty str"):
        getattr(store, call)(123, *args.get(call, ()))


def test_a_closed_store_refuses_every_call(backend: str, place: Path | str) -> None:
    store = BACKENDS[backend](place)
    store.create("a", 1)
    store.close()
    for call in (lambda: store.create("b", 1), lambda: store.get("a"), lambda: store.list(),
                 lambda: store.start_attempt("a"), lambda: store.resolve("a", 2)):
        with pytest.raises(StoreError, match="is closed"):
            call()


def test_a_cancel_request_is_recorded_seen_and_withdrawn(store: PromiseStore) -> None:
    store.create("root", 1)
    assert not store.cancel_requested("root")
    store.request_cancel("root")
    store.request_cancel("root")  # idempotent
    assert store.cancel_requested("root")
    assert not store.cancel_requested("another")
    assert store.get("root").state is State.PENDING  # a request settles nothing
    store.withdraw_cancel("root")
    store.withdraw_cancel("root")  # idempotent
    assert not store.cancel_requested("root")


@pytest.mark.parametrize("backend", ["jsonl-exclusive", "postgresql"])
def test_a_cancel_request_reaches_the_driver_from_another_opener(
    store: PromiseStore, backend: str, place: Path | str
) -> None:
    """Made from another process's store (read-only for a file) while this one holds the store
    and drives the workflow; it outlives the store objects."""
    url = place if backend == "postgresql" else place / "promises.jsonl"
    with store.own("root"):
        store.create("root", 1)
        with open_store(url, readonly=True) as operator:
            operator.request_cancel("root")
        assert store.cancel_requested("root")
    store.close()
    with open_store(url, readonly=True) as later:
        assert later.cancel_requested("root")
        later.withdraw_cancel("root")
    with open_store(url, readonly=True) as again:
        assert not again.cancel_requested("root")


@pytest.mark.parametrize("call", ["request_cancel", "cancel_requested", "withdraw_cancel"])
def test_cancel_requests_refuse_an_id_that_is_not_a_str(store: PromiseStore, call: str) -> None:
    with pytest.raises(TypeError, match="non-empty str"):
        getattr(store, call)(123)
