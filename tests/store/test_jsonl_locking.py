"""Shared, exclusive and read-only stores: who holds the lock when, and who may write."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import filelock
import pytest
from store_helpers import lock_is_free, run_python

from store import JsonlStore, State, StoreError, StoreLockedError


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "promises.jsonl"


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- shared ------------------------------------------------------------------------------------


def test_shared_store_does_not_hold_the_lock_between_appends(path: Path) -> None:
    with JsonlStore(path) as store:
        assert lock_is_free(path)
        store.create("a", None)
        assert lock_is_free(path)


def test_shared_store_holds_the_lock_while_it_appends(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real_write = os.write

    def spying_write(fd: int, data: bytes) -> int:
        if os.fstat(fd).st_ino == path.stat().st_ino:
            seen.append(lock_is_free(path))
        return real_write(fd, data)

    with JsonlStore(path) as store:
        monkeypatch.setattr(os, "write", spying_write)
        store.create("a", None)
        store.start_attempt("a")
        store.resolve("a", 1)
    assert seen == [False, False, False]


def test_two_shared_stores_see_each_others_appends(path: Path) -> None:
    with JsonlStore(path) as first, JsonlStore(path) as second:
        first.create("a", 1)
        second.create("b", 2)
        second.resolve("a", "by second")
        assert first.get("a").value == "by second"
        assert [p.id for p in first.list()] == ["a", "b"]
        assert first.create("b", 2).param == 2


def test_shared_append_while_another_holds_the_lock_times_out(path: Path) -> None:
    with JsonlStore(path, lock_timeout=0.2) as store:
        size = path.stat().st_size
        holder = filelock.FileLock(f"{path}.lock")
        with holder:
            started = time.monotonic()
            with pytest.raises(StoreLockedError):
                store.create("a", None)
            assert time.monotonic() - started < 5
        assert path.stat().st_size == size
        store.create("a", None)  # and it works again once the lock is free


# -- exclusive ---------------------------------------------------------------------------------


def test_exclusive_store_holds_the_lock_from_open_to_close(path: Path) -> None:
    store = JsonlStore(path, exclusive=True)
    assert not lock_is_free(path)
    store.create("a", None)
    assert not lock_is_free(path)
    store.close()
    assert lock_is_free(path)


def test_second_exclusive_open_times_out_with_store_locked_error(path: Path) -> None:
    with JsonlStore(path, exclusive=True):
        started = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            JsonlStore(path, exclusive=True, lock_timeout=0.2)
        assert 0.15 < time.monotonic() - started < 5
    assert info.value.path == path
    assert f"pid {os.getpid()}" in str(info.value)  # names the holder


def test_exclusive_open_works_again_after_close(path: Path) -> None:
    with JsonlStore(path, exclusive=True) as store:
        store.create("a", None)
    with JsonlStore(path, exclusive=True, lock_timeout=0.2) as store:
        assert store.get("a") is not None


def test_shared_writer_cannot_append_beside_an_exclusive_one(path: Path) -> None:
    with JsonlStore(path, exclusive=True) as owner:
        owner.create("a", None)
        with pytest.raises(StoreLockedError):
            JsonlStore(path, lock_timeout=0.2)  # its open takes the lock to repair a tail


def test_store_locked_error_is_a_store_error() -> None:
    assert issubclass(StoreLockedError, StoreError)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_refused_exclusive_open_leaks_no_file_descriptor(path: Path) -> None:
    with JsonlStore(path, exclusive=True):
        before = open_fds()
        for _ in range(3):
            with pytest.raises(StoreLockedError):
                JsonlStore(path, exclusive=True, lock_timeout=0.01)
        assert open_fds() == before


OWNER_NOTE_CHILD = """
import json, resource, sys
import filelock
from store import JsonlStore, StoreError
try:
    JsonlStore(sys.argv[1], exclusive=True)
except StoreError as exc:
    lock = filelock.FileLock(sys.argv[1] + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        free = False
    else:
        free = True
        lock.release()
    print(json.dumps({"error": str(exc), "lock_free": free}))
"""


def test_an_owner_note_that_cannot_be_written_fails_the_open_and_frees_the_lock(
    path: Path,
) -> None:
    JsonlStore(path).close()
    child = run_python(OWNER_NOTE_CHILD, path, file_size_limit=10)  # the note is ~40 bytes
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert f"{path}.lock.owner" in report["error"]
    assert "File too large" in report["error"]
    assert report["lock_free"], "a failed exclusive open kept the lock"


def test_exclusive_and_readonly_together_are_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="both exclusive and readonly"):
        JsonlStore(path, exclusive=True, readonly=True)


# -- readonly ----------------------------------------------------------------------------------


def written_store(path: Path) -> None:
    with JsonlStore(path) as store:
        store.create("a", None)
        store.start_attempt("a")
        store.resolve("a", 1)
        store.create("b", None)
        store.reject("b", ValueError("x"))


def test_readonly_store_reads_every_promise(path: Path) -> None:
    written_store(path)
    with JsonlStore(path, readonly=True) as store:
        assert store.get("a").state is State.RESOLVED
        assert store.get("b").state is State.REJECTED


@pytest.mark.parametrize(("method", "args"), [
    ("create", ("c", None)),
    ("start_attempt", ("a",)),
    ("resolve", ("c", 1)),
    ("reject", ("c", {"type": "E"})),
    ("reopen", ("b", "retry")),
    ("compact", ()),
])
def test_readonly_store_refuses_every_write(path: Path, method: str, args: tuple) -> None:
    written_store(path)
    before = path.read_bytes()
    with JsonlStore(path, readonly=True) as store, pytest.raises(StoreError, match="read-only"):
        getattr(store, method)(*args)
    assert path.read_bytes() == before


def test_readonly_store_creates_no_file_at_all(tmp_path: Path) -> None:
    path = tmp_path / "written" / "promises.jsonl"
    path.parent.mkdir()
    written_store(path)
    copy = tmp_path / "copy" / "promises.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    with JsonlStore(copy, readonly=True) as store:
        store.list()
    assert os.listdir(copy.parent) == ["promises.jsonl"]


def test_readonly_open_of_a_missing_store_fails_without_creating_it(path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open store"):
        JsonlStore(path, readonly=True)
    assert not path.exists()


def test_readonly_store_does_not_wait_for_an_exclusive_writer(path: Path) -> None:
    with JsonlStore(path, exclusive=True) as writer:
        writer.create("a", None)
        writer.resolve("a", 1)  # an exclusive store writes a create with the next record
        with JsonlStore(path, readonly=True, lock_timeout=0.01) as reader:
            assert reader.get("a").value == 1


def test_readonly_store_sees_what_a_writer_appends_later(path: Path) -> None:
    written_store(path)
    with JsonlStore(path, readonly=True) as reader:
        with JsonlStore(path) as writer:
            writer.create("c", None)
            writer.resolve("c", "late")
        assert reader.get("c").value == "late"
