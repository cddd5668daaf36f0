"""JsonlStore: the promise rules through the real file, and what the file looks like."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import records

from store import (
    Durability,
    JsonlStore,
    PromiseConflictError,
    PromiseNotFoundError,
    State,
    StoreError,
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "promises.jsonl"


@pytest.fixture
def store(path: Path) -> Iterator[JsonlStore]:
    with JsonlStore(path, durability=Durability.NONE) as store:
        yield store


def reopened(path: Path) -> JsonlStore:
    """A fresh store object that reads the file from the start."""
    return JsonlStore(path, readonly=True)


# -- create ------------------------------------------------------------------------------------


def test_create_returns_a_pending_promise(store: JsonlStore) -> None:
    promise = store.create("import/a", {"fn": "batch", "args": [1]})
    assert promise.id == "import/a"
    assert promise.param == {"fn": "batch", "args": [1]}
    assert promise.state is State.PENDING
    assert (promise.value, promise.error, promise.attempts) == (None, None, 0)
    assert promise.created_at > 0


def test_create_with_the_same_param_returns_the_existing_promise(store: JsonlStore) -> None:
    first = store.create("a", {"x": 1})
    store.start_attempt("a")
    again = store.create("a", {"x": 1})
    assert again == store.get("a")
    assert again.created_at == first.created_at
    assert again.attempts == 1


def test_create_again_writes_nothing(store: JsonlStore, path: Path) -> None:
    store.create("a", 1)
    size = path.stat().st_size
    store.create("a", 1)
    assert path.stat().st_size == size


def test_create_with_another_param_conflicts(store: JsonlStore) -> None:
    store.create("a", {"x": 1})
    with pytest.raises(PromiseConflictError, match="promise a") as info:
        store.create("a", {"x": 2})
    assert info.value.promise_id == "a"
    assert store.get("a").param == {"x": 1}


def test_create_compares_params_after_normalising_them(store: JsonlStore) -> None:
    store.create("a", {"args": (1, 2)})
    assert store.create("a", {"args": [1, 2]}).param == {"args": [1, 2]}


def test_create_conflict_is_detected_after_a_reopen(path: Path) -> None:
    with JsonlStore(path) as store:
        store.create("a", 1)
    with JsonlStore(path) as store, pytest.raises(PromiseConflictError):
        store.create("a", 2)


def test_create_with_true_where_the_param_was_1_conflicts(store: JsonlStore) -> None:
    store.create("a", {"flag": 1})
    with pytest.raises(PromiseConflictError):
        store.create("a", {"flag": True})


# -- start_attempt -----------------------------------------------------------------------------


def test_start_attempt_counts_1_2_3(store: JsonlStore) -> None:
    store.create("a", None)
    assert [store.start_attempt("a") for _ in range(3)] == [1, 2, 3]
    assert store.get("a").attempts == 3


def test_attempt_count_survives_a_reopen(path: Path) -> None:
    with JsonlStore(path) as store:
        store.create("a", None)
        store.start_attempt("a")
        store.start_attempt("a")
    with JsonlStore(path) as store:
        assert store.start_attempt("a") == 3


@pytest.mark.parametrize("settle", ["resolve", "reject"])
def test_start_attempt_of_a_settled_promise_conflicts(store: JsonlStore, settle: str) -> None:
    store.create("a", None)
    getattr(store, settle)("a", {"type": "E"})
    with pytest.raises(PromiseConflictError, match="no attempt can start"):
        store.start_attempt("a")


def test_start_attempt_of_an_unknown_promise_is_not_found(store: JsonlStore) -> None:
    with pytest.raises(PromiseNotFoundError) as info:
        store.start_attempt("ghost")
    assert info.value.promise_id == "ghost"


# -- resolve and reject ------------------------------------------------------------------------


def test_resolve_settles_with_the_value(store: JsonlStore) -> None:
    store.create("a", None)
    promise = store.resolve("a", {"rows": 10})
    assert (promise.state, promise.value, promise.error) == (State.RESOLVED, {"rows": 10}, None)
    assert promise.settled_at >= promise.created_at
    assert store.get("a") == promise


def test_resolve_with_the_same_value_again_is_a_no_op(store: JsonlStore, path: Path) -> None:
    store.create("a", None)
    first = store.resolve("a", [1, 2])
    size = path.stat().st_size
    assert store.resolve("a", (1, 2)) == first
    assert path.stat().st_size == size


@pytest.mark.parametrize(("settle", "outcome"), [
    ("resolve", {"rows": 11}),
    ("reject", {"type": "ValueError", "message": "late"}),
])
def test_settling_a_resolved_promise_differently_conflicts(
    store: JsonlStore, settle: str, outcome: dict
) -> None:
    store.create("a", None)
    store.resolve("a", {"rows": 10})
    with pytest.raises(PromiseConflictError, match="already resolved"):
        getattr(store, settle)("a", outcome)
    assert store.get("a").value == {"rows": 10}


def test_resolving_with_true_after_1_conflicts(store: JsonlStore) -> None:
    store.create("a", None)
    store.resolve("a", 1)
    with pytest.raises(PromiseConflictError):
        store.resolve("a", True)


def test_reject_settles_with_the_error(store: JsonlStore) -> None:
    store.create("a", None)
    promise = store.reject("a", {"type": "IOError", "message": "disk"})
    assert promise.state is State.REJECTED
    assert promise.error == {"type": "IOError", "message": "disk"}
    assert promise.value is None


def test_reject_with_an_exception_stores_its_type_and_message(store: JsonlStore) -> None:
    store.create("a", None)
    promise = store.reject("a", ValueError("bad row 7"))
    assert promise.error == {"type": "ValueError", "message": "bad row 7"}


def test_reject_with_the_same_error_again_is_a_no_op(store: JsonlStore, path: Path) -> None:
    store.create("a", None)
    store.reject("a", ValueError("x"))
    size = path.stat().st_size
    store.reject("a", ValueError("x"))
    assert path.stat().st_size == size


@pytest.mark.parametrize(("settle", "outcome"), [
    ("reject", {"type": "ValueError", "message": "other"}),
    ("resolve", 1),
])
def test_settling_a_rejected_promise_differently_conflicts(
    store: JsonlStore, settle: str, outcome: object
) -> None:
    store.create("a", None)
    store.reject("a", ValueError("x"))
    with pytest.raises(PromiseConflictError, match="already rejected"):
        getattr(store, settle)("a", outcome)


@pytest.mark.parametrize("settle", ["resolve", "reject"])
def test_settling_an_unknown_promise_is_not_found(store: JsonlStore, settle: str) -> None:
    with pytest.raises(PromiseNotFoundError):
        getattr(store, settle)("ghost", {"type": "E"})


def test_settled_promises_survive_a_reopen(path: Path) -> None:
    with JsonlStore(path) as store:
        for pid in "abc":
            store.create(pid, pid)
        store.resolve("a", {"ok": True})
        store.reject("b", KeyError("k"))
        before = store.list()
    assert reopened(path).list() == before


# -- reopen ------------------------------------------------------------------------------------


def test_reopen_makes_a_rejected_promise_pending(store: JsonlStore) -> None:
    store.create("a", None)
    store.start_attempt("a")
    store.start_attempt("a")
    store.reject("a", RuntimeError("flaky"))
    promise = store.reopen("a", "operator retry")
    assert promise.state is State.PENDING
    assert (promise.error, promise.settled_at) == (None, None)
    assert (promise.attempts, promise.attempts_since_reopen) == (2, 0)


def test_reopened_promise_can_run_and_settle_again(store: JsonlStore) -> None:
    store.create("a", None)
    store.start_attempt("a")
    store.reject("a", RuntimeError("flaky"))
    store.reopen("a", "retry")
    assert store.start_attempt("a") == 2
    assert store.resolve("a", "done").value == "done"
    assert store.get("a").attempts_since_reopen == 1


def test_reopen_survives_a_reopen_of_the_store_and_the_log_keeps_the_rejection(
    path: Path,
) -> None:
    with JsonlStore(path) as store:
        store.create("a", None)
        store.reject("a", RuntimeError("flaky"))
        store.reopen("a", "retry")
    assert reopened(path).get("a").state is State.PENDING
    ops = [(r["op"], r.get("reason")) for r in records(path)]
    assert ops == [("create", None), ("reject", None), ("reopen", "retry")]


@pytest.mark.parametrize("settle", [None, "resolve"])
def test_reopen_of_a_promise_that_is_not_rejected_conflicts(
    store: JsonlStore, settle: str | None
) -> None:
    store.create("a", None)
    if settle:
        store.resolve("a", 1)
    with pytest.raises(PromiseConflictError, match="only a rejected promise"):
        store.reopen("a", "retry")


def test_reopen_of_an_unknown_promise_is_not_found(store: JsonlStore) -> None:
    with pytest.raises(PromiseNotFoundError):
        store.reopen("ghost", "retry")


# -- get and list ------------------------------------------------------------------------------


def test_get_of_an_unknown_id_is_none(store: JsonlStore) -> None:
    assert store.get("ghost") is None


def test_list_filters_by_prefix_in_creation_order(store: JsonlStore) -> None:
    for pid in ["import/b", "import/a", "other/c", "import/a.1", "import/a.2"]:
        store.create(pid, None)
    store.resolve("import/b", 1)  # settling does not move a promise in the order
    assert [p.id for p in store.list("import/a")] == ["import/a", "import/a.1", "import/a.2"]
    assert [p.id for p in store.list()] == [
        "import/b", "import/a", "other/c", "import/a.1", "import/a.2",
    ]
    assert store.list("nothing/") == []


# -- values ------------------------------------------------------------------------------------


def test_values_come_back_normalised(path: Path) -> None:
    with JsonlStore(path) as store:
        store.create("a", ("fn", (1, 2)))
        promise = store.resolve("a", {"pair": (3, 4)})
    assert promise.param == ["fn", [1, 2]]
    assert promise.value == {"pair": [3, 4]}
    assert reopened(path).get("a") == promise


@pytest.mark.parametrize("call", ["create", "resolve", "reject"])
def test_a_value_that_is_not_json_is_a_type_error_naming_the_promise(
    store: JsonlStore, path: Path, call: str
) -> None:
    if call != "create":
        store.create("import/a.1", None)
    size = path.stat().st_size
    with pytest.raises(TypeError, match=re.escape("promise import/a.1")):
        getattr(store, call)("import/a.1", {"bad": object()})
    assert path.stat().st_size == size


def test_a_set_is_not_json(store: JsonlStore) -> None:
    store.create("a", None)
    with pytest.raises(TypeError, match="promise a: value"):
        store.resolve("a", {1, 2})


def test_a_non_string_id_is_refused_before_anything_is_written(path: Path) -> None:
    with JsonlStore(path) as store:
        store.create("ok", 1)
        with pytest.raises((TypeError, StoreError)):
            store.create(5, "x")  # type: ignore[arg-type]
    with JsonlStore(path) as store:
        assert [p.id for p in store.list()] == ["ok"]


def test_unicode_and_big_values_round_trip(path: Path) -> None:
    big = "x" * (3 << 19)  # 1.5 MiB: lines cross the reader's 1 MiB chunks
    with JsonlStore(path) as store:
        store.create("ünï/ç☃de", {"s": "naïve ☃"})
        for pid in ("big1", "big2", "big3"):
            store.create(pid, None)
            store.resolve(pid, big)
        store.create("after", 1)
        before = store.list()
    assert reopened(path).list() == before


# -- the file ----------------------------------------------------------------------------------


def test_each_operation_appends_one_checksummed_json_line(path: Path) -> None:
    with JsonlStore(path) as store:
        store.create("a", {"fn": "f"})
        store.start_attempt("a")
        store.resolve("a", [1])
        store.create("b", None)
        store.reject("b", {"type": "E"})
    got = [(r["op"], r["id"]) for r in records(path)]
    assert got == [("create", "a"), ("attempt", "a"), ("resolve", "a"), ("create", "b"),
                   ("reject", "b")]


def test_records_carry_what_the_op_needs(path: Path) -> None:
    with JsonlStore(path) as store:
        store.create("a", {"fn": "f"})
        store.start_attempt("a")
        store.resolve("a", [1])
    create, attempt, resolve = records(path)
    assert create["param"] == {"fn": "f"}
    assert attempt["n"] == 1
    assert resolve["value"] == [1]
    assert all(isinstance(r["t"], float) for r in (create, attempt, resolve))


def test_an_empty_file_is_an_empty_store(path: Path) -> None:
    path.touch()
    with JsonlStore(path) as store:
        assert store.list() == []


def test_the_file_is_created_on_first_open(path: Path) -> None:
    JsonlStore(path).close()
    assert path.read_bytes() == b""


def test_close_is_idempotent(path: Path) -> None:
    store = JsonlStore(path)
    store.close()
    store.close()


def test_durability_accepts_its_string_values(path: Path) -> None:
    with JsonlStore(path, durability="none") as store:  # type: ignore[arg-type]
        assert store.durability is Durability.NONE
    with pytest.raises(ValueError):
        JsonlStore(path, durability="sometimes")  # type: ignore[arg-type]
