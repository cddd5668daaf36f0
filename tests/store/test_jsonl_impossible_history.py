"""A store whose lines all have valid checksums but whose history is impossible is refused on
open: StoreCorruptedError naming the file and the line, and the file left as it was.

Every line here is built with store.codec.encode, so only the rules of store/log.py (the same
ones the writer checks) can tell these files apart from good ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from store_helpers import torn_files

from store import JsonlStore, Promise, State, StoreCorruptedError
from store.codec import encode
from store.log import snapshot_record

ERROR = {"type": "ValueError", "message": "bad"}


def create(pid: str = "p", **fields: Any) -> dict[str, Any]:
    return {"op": "create", "id": pid, "param": {"fn": "f"}, "t": 1.0, **fields}


def attempt(n: Any, **fields: Any) -> dict[str, Any]:
    return {"op": "attempt", "id": "p", "n": n, "t": 2.0, **fields}


def resolve(value: Any, **fields: Any) -> dict[str, Any]:
    return {"op": "resolve", "id": "p", "value": value, "t": 3.0, **fields}


def reject(error: Any, **fields: Any) -> dict[str, Any]:
    return {"op": "reject", "id": "p", "error": error, "t": 3.0, **fields}


def reopen(**fields: Any) -> dict[str, Any]:
    return {"op": "reopen", "id": "p", "reason": "retry", "t": 4.0, **fields}


def without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


RESOLVED_SNAPSHOT = snapshot_record(Promise("p", {"fn": "f"}, State.RESOLVED, 7, None, 2, 0, 1.0, 3.0))


def snapshot(**fields: Any) -> dict[str, Any]:
    return {**RESOLVED_SNAPSHOT, **fields}


# name: (records, the 1-based number of the impossible line, words its error must contain)
IMPOSSIBLE = {
    "resolved twice with different values": ([create(), resolve(1), resolve(2)], 3, "already resolved"),
    "resolved with 1 then with true": ([create(), resolve(1), resolve(True)], 3, "already resolved"),
    "rejected then resolved": ([create(), reject(ERROR), resolve(1)], 3, "already rejected"),
    "resolved then rejected": ([create(), resolve(1), reject(ERROR)], 3, "already resolved"),
    "rejected twice with different errors": (
        [create(), reject(ERROR), reject({"type": "E"})], 3, "already rejected"),
    "attempted after it resolved": ([create(n=1), resolve(1), attempt(2)], 3, "no attempt can start"),
    "attempted after it was rejected": ([create(), reject(ERROR), attempt(1)], 3, "no attempt"),
    "attempt number not a number": ([create(), attempt("abc")], 2, "attempt number 'abc'"),
    "attempt number true": ([create(), attempt(True)], 2, "attempt number True"),
    "attempt number skips one": ([create(n=1), attempt(3)], 2, "where 2 comes next"),
    "attempt number repeats": ([create(), attempt(1), attempt(1)], 3, "where 2 comes next"),
    "creation with an attempt number not a number": ([create(n="abc")], 1, "attempt number"),
    "creation with a second attempt": ([create(n=2)], 1, "where 1 comes next"),
    "creation time not a number": ([create(t="now")], 1, "'t' is not a number"),
    "creation time true": ([create(t=True)], 1, "'t' is not a number"),
    "attempt time missing": ([create(), without(attempt(1), "t")], 2, "no 't'"),
    "settle time null": ([create(), resolve(1, t=None)], 2, "'t' is not a number"),
    "creation without a param": ([without(create(), "param")], 1, "no 'param'"),
    "resolve without a value": ([create(), without(resolve(1), "value")], 2, "no 'value'"),
    "reject without an error": ([create(), without(reject(ERROR), "error")], 2, "no 'error'"),
    "error not an object": ([create(), reject("boom")], 2, "an error is a JSON object"),
    "reopen of a resolved promise": ([create(), resolve(1), reopen()], 3, "only a rejected"),
    "reopen of a pending promise": ([create(), reopen()], 2, "only a rejected"),
    "reopen without a reason": ([create(), reject(ERROR), without(reopen(), "reason")], 3, "reason"),
    "created twice": ([create(), create()], 2, "created twice"),
    "empty promise id": ([create(pid="")], 1, "no promise id"),
    "unknown record type": ([create(), {"op": "explode", "id": "p", "t": 2.0}], 2, "unknown record"),
    "settle of a promise never created": ([create(pid="q"), resolve(1)], 2, "never created"),
    "snapshot with attempts not a number": ([snapshot(attempts="3")], 1, "'attempts' is not a count"),
    "snapshot with negative attempts": ([snapshot(attempts=-1)], 1, "'attempts' is not a count"),
    "snapshot reopened after more attempts": ([snapshot(reopened=3)], 1, "reopened after more"),
    "snapshot with an unknown state": ([snapshot(state="done")], 1, "'state' is not a state"),
    "snapshot resolved with an error": ([snapshot(error=ERROR)], 1, "has an error"),
    "snapshot pending with a value": ([snapshot(state="pending", settled=None)], 1, "has a value"),
    "snapshot pending with a settle time": (
        [snapshot(state="pending", value=None)], 1, "pending promise has a settle time"),
    "snapshot rejected with a text error": (
        [snapshot(state="rejected", value=None, error="boom")], 1, "an error is a JSON object"),
    "snapshot resolved without a settle time": ([snapshot(settled=None)], 1, "'settled' is not a number"),
    "snapshot without a creation time": ([without(snapshot(), "created")], 1, "no 'created'"),
    "snapshot without a param": ([without(snapshot(), "param")], 1, "no 'param'"),
    "snapshot of a promise already created": ([create(), snapshot()], 2, "created twice"),
}


def write_store(path: Path, records: list[dict[str, Any]]) -> bytes:
    data = b"".join(encode(record) for record in records)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("last", [True, False], ids=["last-line", "followed-by-a-good-line"])
@pytest.mark.parametrize("case", IMPOSSIBLE)
def test_impossible_history_is_refused_naming_the_line_and_changes_nothing(
    tmp_path: Path, case: str, last: bool
) -> None:
    records, line, words = IMPOSSIBLE[case]
    if not last:
        records = [*records, create(pid="other")]
    path = tmp_path / "promises.jsonl"
    before = write_store(path, records)

    with pytest.raises(StoreCorruptedError) as info:
        JsonlStore(path)

    assert (info.value.path, info.value.line) == (path, line)
    assert words in info.value.reason
    assert str(info.value).startswith(f"{path}:{line}: store is damaged")
    assert path.read_bytes() == before
    assert torn_files(path) == []


@pytest.mark.parametrize("mode", [{}, {"exclusive": True}, {"readonly": True}])
def test_every_mode_refuses_an_impossible_history(tmp_path: Path, mode: dict[str, bool]) -> None:
    path = tmp_path / "promises.jsonl"
    before = write_store(path, [create(), resolve(1), resolve(2)])
    with pytest.raises(StoreCorruptedError, match=":3: store is damaged"):
        JsonlStore(path, **mode)
    assert path.read_bytes() == before


def test_a_reader_refuses_an_impossible_line_another_process_appends(tmp_path: Path) -> None:
    path = tmp_path / "promises.jsonl"
    write_store(path, [create(), resolve(1)])
    with JsonlStore(path, readonly=True) as reader:
        with path.open("ab") as f:
            f.write(encode(resolve(2)))
        with pytest.raises(StoreCorruptedError, match=":3: store is damaged"):
            reader.get("p")


def test_the_same_settle_again_is_a_no_op_as_for_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "promises.jsonl"
    write_store(path, [create(), resolve({"a": 1}), resolve({"a": 1}, t=9.0)])
    with JsonlStore(path) as store:
        promise = store.get("p")
    assert (promise.value, promise.settled_at) == ({"a": 1}, 3.0)


def test_every_possible_record_opens(tmp_path: Path) -> None:
    path = tmp_path / "promises.jsonl"
    write_store(path, [
        create(n=1), attempt(2), reject(ERROR), reopen(), attempt(3), resolve(None),
        {**snapshot(), "id": "s"}, create(pid="t", t=5),
    ])
    with JsonlStore(path) as store:
        assert store.get("p") == Promise("p", {"fn": "f"}, State.RESOLVED, None, None, 3, 2, 1.0, 3.0)
        assert store.get("s").value == 7


# -- the writer refuses what opening would refuse ----------------------------------------------


def test_rejecting_with_an_error_that_is_not_an_object_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "promises.jsonl"
    with JsonlStore(path) as store:
        store.create("p", None)
        size = path.stat().st_size
        with pytest.raises(TypeError, match="an error is a JSON object"):
            store.reject("p", "boom")  # type: ignore[arg-type]
        assert path.stat().st_size == size
        assert store.get("p").state is State.PENDING


def test_reopening_without_a_text_reason_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "promises.jsonl"
    with JsonlStore(path) as store:
        store.create("p", None)
        store.reject("p", ERROR)
        size = path.stat().st_size
        with pytest.raises(TypeError, match="a reason to reopen is a str"):
            store.reopen("p", 7)  # type: ignore[arg-type]
        assert path.stat().st_size == size
