"""The files a JSON-lines store sets aside (torn tails, a compaction cut short): which they are,
and their collection once the store has been opened again, under its lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from store import JsonlStore, StoreLockedError
from store.codec import encode
from store.jsonl import collect_set_aside, set_aside_files


def torn(path: Path) -> None:
    """Append half a line, as a write cut by SIGKILL leaves it."""
    line = encode({"op": "create", "id": "late", "param": None, "t": 1.0})
    with path.open("ab") as f:
        f.write(line[: len(line) // 2])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "odd [name].jsonl"  # glob's own characters in the name
    with JsonlStore(path) as store:
        store.create("a", 1)
    return path


def test_set_aside_files_are_the_stores_own_torn_tails_in_number_order(path: Path) -> None:
    for _ in range(11):
        torn(path)
        JsonlStore(path).close()  # recovers: moves the torn tail aside
    for other in ("odd [name].jsonl.torn-x", "odd [name].jsonl.torn-2.bak", "other.jsonl.torn-1"):
        (path.parent / other).write_bytes(b"not ours")
    assert [p.name for p in set_aside_files(path)] == [f"odd [name].jsonl.torn-{n}" for n in range(1, 12)]
    Path(f"{path}.compact").write_bytes(b"cut short")
    assert set_aside_files(path)[-1] == Path(f"{path}.compact")


def test_collect_keeps_what_its_own_open_sets_aside_and_refuses_a_held_store(path: Path) -> None:
    torn(path)
    JsonlStore(path).close()
    torn(path)  # a tail torn since: the collection's open sets it aside as torn-2, and keeps it
    assert collect_set_aside(path, lock_timeout=1.0) == [Path(f"{path}.torn-1")]
    assert [p.name for p in set_aside_files(path)] == ["odd [name].jsonl.torn-2"]
    with JsonlStore(path, exclusive=True), pytest.raises(StoreLockedError):
        collect_set_aside(path, lock_timeout=0.1)
    assert [p.name for p in set_aside_files(path)] == ["odd [name].jsonl.torn-2"]
    with JsonlStore(path, readonly=True) as store:
        assert store.get("a").param == 1 and store.get("late") is None
