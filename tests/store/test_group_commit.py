"""Group commit and deferred settles (store/base.py "Durability", "Threads"), attacked.

For every backend: a deferred settle follows the same rules as any settle, `sync()` and
`close()` make it durable, and threads settling together lose nothing. For the JSON-lines file,
counted at os.fdatasync (a spy that still syncs): a deferred settle costs no sync, `sync()` and
`close()` cost one, threads waiting together share syncs, no thread is told its settle succeeded
before a sync covered its line, a failed shared sync fails every waiter, and a deferred settle
survives a SIGKILL of its process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_helpers import raw_lines, run_python
from test_contract import BACKENDS

import store.jsonl
from store import (
    JsonlStore,
    PromiseConflictError,
    PromiseNotFoundError,
    PromiseStore,
    State,
    StoreError,
    StoreWriteError,
    UnstorableValueError,
)

SAFETY_TIMEOUT_S = 60.0  # only so that a broken store fails a test instead of hanging it


@pytest.fixture
def any_store(backend: str, place: Path | str) -> Iterator[PromiseStore]:
    """The contract suite's store (named apart from the `store` package this module imports)."""
    with BACKENDS[backend](place) as s:
        yield s


# -- the contract, for every backend -----------------------------------------------------------------


def test_a_deferred_settle_is_visible_at_once(any_store: PromiseStore) -> None:
    any_store.create("a", None)
    any_store.create("b", None)
    assert any_store.resolve("a", [1], defer_sync=True).value == [1]
    assert any_store.reject("b", ValueError("no"), defer_sync=True).error == {"type": "ValueError",
                                                                               "message": "no"}
    assert (any_store.get("a").state, any_store.get("b").state) == (State.RESOLVED, State.REJECTED)
    any_store.sync()
    assert any_store.get("a").value == [1]


@pytest.mark.parametrize("defer_again", [False, True])
def test_a_deferred_settle_follows_the_rules_of_every_settle(
    any_store: PromiseStore, defer_again: bool
) -> None:
    any_store.create("a", None)
    any_store.resolve("a", 1, defer_sync=True)
    assert any_store.resolve("a", 1, defer_sync=defer_again).value == 1  # the same: a no-op
    with pytest.raises(PromiseConflictError):
        any_store.resolve("a", 2, defer_sync=defer_again)
    with pytest.raises(PromiseConflictError):
        any_store.reject("a", {"type": "E"}, defer_sync=defer_again)
    with pytest.raises(PromiseNotFoundError):
        any_store.resolve("unknown", 1, defer_sync=True)
    any_store.create("b", None)
    with pytest.raises(UnstorableValueError):
        any_store.resolve("b", {1, 2}, defer_sync=True)
    assert any_store.get("b").state is State.PENDING


def test_sync_with_nothing_to_sync_is_harmless_and_a_closed_store_refuses_it(
    backend: str, place: Path | str
) -> None:
    s = BACKENDS[backend](place)
    s.sync()
    s.close()
    with pytest.raises(StoreError, match="is closed"):
        s.sync()
    with pytest.raises(StoreError, match="is closed"):
        s.resolve("a", 1, defer_sync=True)


def settle_from_threads(s: PromiseStore, threads: int, each: int) -> dict[str, Any]:
    """`threads` threads, each creating, starting and settling `each` promises of its own
    (every other one deferred, every third one rejected) while another thread keeps reading;
    returns the outcome every promise should have."""
    start = threading.Barrier(threads + 1, timeout=SAFETY_TIMEOUT_S)
    writing = threading.Event()
    failures: list[BaseException] = []

    def settle(t: int) -> None:
        try:
            start.wait()
            for i in range(each):
                pid = f"t{t}.{i}"
                s.create(pid, {"t": t, "i": i})
                s.start_attempt(pid)
                if i % 3 == 2:
                    s.reject(pid, {"type": "E", "message": pid}, defer_sync=bool(i % 2))
                else:
                    s.resolve(pid, [t, i], defer_sync=bool(i % 2))
        except BaseException as exc:  # judged below
            failures.append(exc)

    def read() -> None:
        try:
            start.wait()
            while writing.is_set():
                for p in s.list("t"):
                    assert p.state is State.PENDING or p.attempts == 1, p
        except BaseException as exc:  # judged below
            failures.append(exc)

    writing.set()
    workers = [threading.Thread(target=settle, args=(t,)) for t in range(threads)]
    reader = threading.Thread(target=read)
    for thread in [*workers, reader]:
        thread.start()
    for thread in workers:
        thread.join(SAFETY_TIMEOUT_S)
    writing.clear()
    reader.join(SAFETY_TIMEOUT_S)
    assert failures == []
    s.sync()
    return {f"t{t}.{i}": ({"type": "E", "message": f"t{t}.{i}"} if i % 3 == 2 else [t, i])
            for t in range(threads) for i in range(each)}


def outcomes(s: PromiseStore) -> dict[str, Any]:
    return {p.id: p.value if p.state is State.RESOLVED else p.error for p in s.list("t")}


def test_threads_settling_together_lose_nothing(any_store: PromiseStore) -> None:
    expected = settle_from_threads(any_store, threads=8, each=30)
    assert outcomes(any_store) == expected
    assert {p.attempts for p in any_store.list("t")} == {1}


@pytest.mark.parametrize("exclusive", [True, False], ids=["exclusive", "shared"])
def test_what_threads_settled_together_is_all_in_the_file(tmp_path: Path, exclusive: bool) -> None:
    path = tmp_path / "promises.jsonl"
    with JsonlStore(path, exclusive=exclusive) as s:
        expected = settle_from_threads(s, threads=8, each=30)
    with JsonlStore(path, readonly=True) as reopened:
        assert outcomes(reopened) == expected


# -- the JSON-lines file: syncs counted --------------------------------------------------------------


class Syncs:
    """os.fdatasync, spied: the file size at each call; the first call may be held at a gate."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate: threading.Event | None = None
        self.fail_first = False
        self._real = os.fdatasync

    def __call__(self, fd: int) -> None:
        first = not self.sizes
        self.sizes.append(os.fstat(fd).st_size)
        if first and self.gate is not None:
            assert self.gate.wait(SAFETY_TIMEOUT_S), "the other settles were never written"
        if first and self.fail_first:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._real(fd)

    @property
    def covered(self) -> int:
        """How far the file is known synced (it is cached up to the last size synced)."""
        return max(self.sizes, default=0)


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Syncs:
    spy = Syncs()
    monkeypatch.setattr(os, "fdatasync", spy)
    return spy


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "promises.jsonl"


def test_a_deferred_settle_costs_no_sync_and_the_next_sync_covers_it(path: Path, syncs: Syncs) -> None:
    with JsonlStore(path, exclusive=True) as s:
        for pid in "abc":
            s.create(pid, None)
        s.resolve("a", 1, defer_sync=True)
        s.reject("b", {"type": "E"}, defer_sync=True)
        assert syncs.sizes == []
        s.resolve("c", 3)  # not deferred: one sync for all three
        assert syncs.sizes == [path.stat().st_size]
        s.sync()  # nothing new
        assert len(syncs.sizes) == 1


def test_sync_makes_deferred_settles_durable_once(path: Path, syncs: Syncs) -> None:
    with JsonlStore(path, exclusive=True) as s:
        s.create("a", None)
        s.resolve("a", 1, defer_sync=True)
        s.sync()
        s.sync()
        assert syncs.sizes == [path.stat().st_size]


@pytest.mark.parametrize("leaving_on_an_error", [False, True])
def test_close_syncs_a_deferred_settle(path: Path, syncs: Syncs, leaving_on_an_error: bool) -> None:
    failing = pytest.raises(KeyError) if leaving_on_an_error else contextlib.nullcontext()
    with failing, JsonlStore(path, exclusive=True) as s:
        s.create("a", None)
        s.resolve("a", 1, defer_sync=True)
        assert syncs.sizes == []
        if leaving_on_an_error:
            raise KeyError("the caller failed after a deferred settle")
    assert syncs.sizes == [path.stat().st_size]


def test_close_without_a_deferred_settle_costs_no_sync(path: Path, syncs: Syncs) -> None:
    with JsonlStore(path, exclusive=True) as s:
        s.create("a", None)
        s.resolve("a", 1)
    assert len(syncs.sizes) == 1


def test_a_deferred_settle_survives_a_sigkill_of_its_process(path: Path) -> None:
    code = """
import os, signal, sys
from store import JsonlStore
s = JsonlStore(sys.argv[1], exclusive=True)
s.create("a", None)
s.start_attempt("a")
s.resolve("a", {"done": True}, defer_sync=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = run_python(code, path)
    assert result.returncode == -9, result.stderr
    with JsonlStore(path, exclusive=True) as s:
        assert (s.get("a").state, s.get("a").value) == (State.RESOLVED, {"done": True})


def settle_together(path: Path, syncs: Syncs, threads: int, exclusive: bool) -> list[Any]:
    """`threads` threads resolve one promise each at once; the first fdatasync is held until
    every settle line is in the file. Returns per thread: the size known synced when its
    resolve returned, or the exception it raised."""
    written = threading.Event()
    real_write_all = store.jsonl.write_all
    settles = []

    def write_all(fd: int, data: bytes) -> None:
        real_write_all(fd, data)
        if b'"op":"resolve"' in data:
            settles.append(data)
            if len(settles) == threads:
                written.set()

    syncs.gate = written
    results: list[Any] = [None] * threads
    with JsonlStore(path, exclusive=exclusive) as s, pytest.MonkeyPatch.context() as mp:
        mp.setattr(store.jsonl, "write_all", write_all)
        for t in range(threads):
            s.create(f"p{t}", None)
            s.start_attempt(f"p{t}")
        start = threading.Barrier(threads, timeout=SAFETY_TIMEOUT_S)

        def settle(t: int) -> None:
            start.wait()
            try:
                s.resolve(f"p{t}", t)
                results[t] = syncs.covered
            except StoreError as exc:
                results[t] = exc

        workers = [threading.Thread(target=settle, args=(t,)) for t in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(SAFETY_TIMEOUT_S)
    return results


def line_ends(path: Path) -> dict[str, int]:
    """Where each promise's resolve line ends in the file."""
    ends, offset = {}, 0
    for line in raw_lines(path):
        offset += len(line) + 1
        record = json.loads(line)
        if record["op"] == "resolve":
            ends[record["id"]] = offset
    return ends


@pytest.mark.parametrize("exclusive", [True, False], ids=["exclusive", "shared"])
def test_threads_settling_together_share_fdatasyncs_and_each_waits_for_its_own(
    path: Path, syncs: Syncs, exclusive: bool
) -> None:
    covered = settle_together(path, syncs, threads=8, exclusive=exclusive)
    # The first sync is held until all 8 lines are written: the 7 others share the next one
    # (or two, if a writer had not counted its bytes yet when that one began), never 8 syncs.
    assert 1 <= len(syncs.sizes) <= 3
    ends = line_ends(path)
    assert {f"p{t}": covered[t] >= ends[f"p{t}"] for t in range(8)} == {f"p{t}": True for t in range(8)}


def test_a_failed_shared_fdatasync_fails_every_settle_waiting_for_it(path: Path, syncs: Syncs) -> None:
    syncs.fail_first = True
    outcome = settle_together(path, syncs, threads=8, exclusive=True)
    assert [type(o) for o in outcome] == [StoreWriteError] * 8
    assert len(syncs.sizes) == 1  # nobody retried the sync (it could report a false success)
