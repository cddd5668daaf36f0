"""JsonlStore: what the file looks like, and the rules across a reopen of the file (the rules
themselves are the contract suite's, test_contract.py)."""

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


def test_create_again_writes_nothing(store: JsonlStore, path: Path) -> None:
    store.create("a", 1)
    size = path.stat().st_size
    store.create("a", 1)
    assert path.stat().st_size == size


def test_create_conflict_is_detected_after_a_reopen(path: Path) -> None:
    with JsonlStore(path) as store:
        store.create("a", 1)
    with JsonlStore(path) as store, pytest.raises(PromiseConflictError):
        store.create("a", 2)


# -- start_attempt -----------------------------------------------------------------------------


def test_attempt_count_survives_a_reopen(path: Path) -> None:
    with JsonlStore(path) as store:
        store.create("a", None)
        store.start_attempt("a")
        store.start_attempt("a")
    with JsonlStore(path) as store:
        assert store.start_attempt("a") == 3


# -- resolve and reject ------------------------------------------------------------------------


def test_resolve_with_the_same_value_again_is_a_no_op(store: JsonlStore, path: Path) -> None:
    store.create("a", None)
    first = store.resolve("a", [1, 2])
    size = path.stat().st_size
    assert store.resolve("a", (1, 2)) == first
    assert path.stat().st_size == size


def test_reject_with_the_same_error_again_is_a_no_op(store: JsonlStore, path: Path) -> None:
    store.create("a", None)
    store.reject("a", ValueError("x"))
    size = path.stat().st_size
    store.reject("a", ValueError("x"))
    assert path.stat().st_size == size


def test_settled_promises_survive_a_reopen(path: Path) -> None:
    with JsonlStore(path) as store:
        for pid in "abc":
            store.create(pid, pid)
        store.resolve("a", {"ok": True})
        store.reject("b", KeyError("k"))
        before = store.list()
    assert reopened(path).list() == before


# -- reopen ------------------------------------------------------------------------------------


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


# -- get and list ------------------------------------------------------------------------------


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
