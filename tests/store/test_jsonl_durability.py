"""What reaches the disk when: fdatasync per settle, directory sync, sync failures, a full disk
and store paths that cannot hold a store."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from store_helpers import NO_DAC_OVERRIDE, raw_lines, records, run_python, torn_files

from store import Durability, JsonlStore, State, StoreError, StoreWriteError


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "promises.jsonl"


@dataclass
class SyncSpy:
    """Counts fdatasync and fsync calls, telling directory syncs apart."""

    datasyncs: list[int] = field(default_factory=list)  # file size at each fdatasync
    file_fsyncs: int = 0
    dir_fsyncs: int = 0

    @property
    def total(self) -> int:
        return len(self.datasyncs) + self.file_fsyncs + self.dir_fsyncs


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> SyncSpy:
    spy = SyncSpy()
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def fdatasync(fd: int) -> None:
        spy.datasyncs.append(os.fstat(fd).st_size)
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            spy.dir_fsyncs += 1
        else:
            spy.file_fsyncs += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    return spy


@pytest.fixture
def store(path: Path) -> Iterator[JsonlStore]:
    with JsonlStore(path) as store:
        store.create("a", None)
        store.create("b", None)
        yield store


# -- syncing -----------------------------------------------------------------------------------


def test_full_durability_is_the_default(path: Path) -> None:
    with JsonlStore(path) as store:
        assert store.durability is Durability.FULL


@pytest.mark.parametrize("settle", [
    lambda s: s.resolve("a", 1),
    lambda s: s.reject("a", ValueError("x")),
], ids=["resolve", "reject"])
def test_a_settle_is_fdatasynced_after_its_line_is_written(
    store: JsonlStore, path: Path, syncs: SyncSpy, settle: Callable[[JsonlStore], object]
) -> None:
    settle(store)
    assert syncs.datasyncs == [path.stat().st_size]  # once, with the line already written
    assert syncs.total == 1


def test_reopen_is_fdatasynced(store: JsonlStore, syncs: SyncSpy) -> None:
    store.reject("a", ValueError("x"))
    store.reopen("a", "retry")
    assert len(syncs.datasyncs) == 2


def test_create_and_start_attempt_do_not_sync(store: JsonlStore, syncs: SyncSpy) -> None:
    store.create("c", None)
    store.start_attempt("c")
    assert syncs.total == 0


def test_a_settle_that_is_a_no_op_does_not_sync(store: JsonlStore, syncs: SyncSpy) -> None:
    store.resolve("a", 1)
    store.resolve("a", 1)
    assert len(syncs.datasyncs) == 1


@pytest.mark.parametrize("exclusive", [False, True])
def test_no_durability_never_syncs(path: Path, syncs: SyncSpy, exclusive: bool) -> None:
    path.touch()
    with JsonlStore(path, durability=Durability.NONE, exclusive=exclusive) as store:
        store.create("a", None)
        store.resolve("a", 1)
        store.create("b", None)
        store.reject("b", ValueError("x"))
        store.reopen("b", "retry")
    assert syncs.total == 0


@pytest.mark.parametrize("exclusive", [False, True])
def test_first_creation_of_the_file_syncs_its_directory(
    path: Path, syncs: SyncSpy, exclusive: bool
) -> None:
    JsonlStore(path, exclusive=exclusive).close()
    assert syncs.dir_fsyncs == 1


def test_opening_an_existing_store_syncs_nothing(path: Path, syncs: SyncSpy) -> None:
    path.touch()
    JsonlStore(path).close()
    assert syncs.total == 0


# -- a failed fdatasync ------------------------------------------------------------------------


def failing_fdatasync(calls: list[int]) -> Callable[[int], None]:
    def fdatasync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    return fdatasync


def test_failed_fdatasync_raises_store_write_error(
    store: JsonlStore, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fdatasync", failing_fdatasync([]))
    with pytest.raises(StoreWriteError, match="fdatasync failed") as info:
        store.resolve("a", 1)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


WRITES: list[tuple[str, Callable[[JsonlStore], object]]] = [
    ("create", lambda s: s.create("c", None)),
    ("start_attempt", lambda s: s.start_attempt("b")),
    ("resolve", lambda s: s.resolve("b", 2)),
    ("reject", lambda s: s.reject("b", ValueError("x"))),
    ("reopen", lambda s: s.reopen("a", "retry")),
    ("compact", lambda s: s.compact()),
]


@pytest.mark.parametrize("write", [w for _, w in WRITES], ids=[name for name, _ in WRITES])
def test_after_a_failed_fdatasync_every_write_raises_without_syncing_again(
    store: JsonlStore,
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    write: Callable[[JsonlStore], object],
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", failing_fdatasync(calls))
    with pytest.raises(StoreWriteError):
        store.reject("a", ValueError("x"))
    size = path.stat().st_size
    with pytest.raises(StoreWriteError, match="earlier sync failed"):
        write(store)
    assert len(calls) == 1  # never retried
    assert path.stat().st_size == size


def test_a_failed_fdatasync_is_not_forgotten_when_syncing_works_again(
    store: JsonlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fdatasync", failing_fdatasync([]))
    with pytest.raises(StoreWriteError):
        store.resolve("a", 1)
    monkeypatch.undo()
    with pytest.raises(StoreWriteError):
        store.resolve("b", 2)
    assert store.get("b").state is State.PENDING  # reading still works


def test_store_opens_again_after_a_failed_fdatasync(
    store: JsonlStore, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.resolve("b", 2)
    monkeypatch.setattr(os, "fdatasync", failing_fdatasync([]))
    with pytest.raises(StoreWriteError):
        store.resolve("a", 1)
    monkeypatch.undo()
    with JsonlStore(path) as again:
        assert again.get("b").value == 2
        again.create("c", None)


# -- a full disk -------------------------------------------------------------------------------

# The child settles promises with RLIMIT_FSIZE a little above the file's size, so a write fails
# part-way (short write) or entirely (EFBIG) as on a full disk.
DISK_FULL_CHILD = """
import json, os, resource, sys
from store import JsonlStore, StoreWriteError
path, headroom = sys.argv[1], int(sys.argv[2])
store = JsonlStore(path)
limit = os.path.getsize(path) + headroom
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
settled, errors = [], []
for i in range(1000):
    pid = f"late/{i}"
    try:
        store.create(pid, i)
        store.start_attempt(pid)
        store.resolve(pid, i * 10)
    except StoreWriteError as exc:
        errors.append(str(exc))
        break
    settled.append(pid)
try:
    store.create("after-the-error", "x" * 200)
except StoreWriteError as exc:
    errors.append(str(exc))
print(json.dumps({"settled": settled, "errors": errors, "size": os.path.getsize(path)}))
"""


def settle_early_promises(path: Path, count: int) -> None:
    with JsonlStore(path) as store:
        for i in range(count):
            store.create(f"early/{i}", i)
            store.start_attempt(f"early/{i}")
            store.resolve(f"early/{i}", i * 10)


@pytest.mark.parametrize("headroom", [0, 1000])
def test_disk_full_raises_store_write_error_and_keeps_every_earlier_settle(
    path: Path, headroom: int
) -> None:
    settle_early_promises(path, 5)
    child = run_python(DISK_FULL_CHILD, path, str(headroom))
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert len(report["errors"]) == 2, "the write that hit the limit and the one after it"
    assert all(str(path) in error for error in report["errors"])
    assert report["size"] <= path.stat().st_size  # no partial line was left behind
    assert raw_lines(path)  # the file still ends with a newline
    with JsonlStore(path) as store:
        resolved = {p.id: p.value for p in store.list() if p.state is State.RESOLVED}
    expected = {f"early/{i}": i * 10 for i in range(5)}
    expected |= {pid: int(pid.split("/")[1]) * 10 for pid in report["settled"]}
    assert resolved == expected
    assert torn_files(path) == []
    assert all(r["op"] != "resolve" or r["id"] in expected for r in records(path))


# -- paths that cannot hold a store ------------------------------------------------------------


def test_a_directory_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        JsonlStore(tmp_path)


def test_a_store_under_a_regular_file_is_a_store_error(tmp_path: Path) -> None:
    parent = tmp_path / "plain-file"
    parent.write_text("not a directory")
    with pytest.raises(StoreError, match=r"the directory .*plain-file is not a directory"):
        JsonlStore(parent / "promises.jsonl")


READONLY_DIR_CHILD = """
import json, sys
from store import JsonlStore
results = {}
for name, path, kwargs in [
    ("new", sys.argv[1] + "/new.jsonl", {}),
    ("shared", sys.argv[1] + "/promises.jsonl", {"lock_timeout": 1}),
    ("exclusive", sys.argv[1] + "/promises.jsonl", {"exclusive": True, "lock_timeout": 1}),
    ("readonly", sys.argv[1] + "/promises.jsonl", {"readonly": True}),
]:
    try:
        with JsonlStore(path, **kwargs) as store:
            results[name] = ["opened", [p.id for p in store.list()]]
    except Exception as exc:
        results[name] = [type(exc).__name__, str(exc), [c.__name__ for c in type(exc).__mro__]]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def readonly_dir_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """Open stores in a read-only directory holding one store, as a user that obeys chmod."""
    directory = tmp_path_factory.mktemp("readonly-dir")
    settle_early_promises(directory / "promises.jsonl", 1)
    for extra in directory.glob("promises.jsonl.*"):  # as if copied here without its lock file
        extra.unlink()
    directory.chmod(0o555)
    try:
        child = run_python(READONLY_DIR_CHILD, directory, as_plain_user=True)
    finally:
        directory.chmod(0o755)
    if child.returncode == NO_DAC_OVERRIDE:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE")
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


def test_a_new_store_in_a_read_only_directory_is_a_store_error(
    readonly_dir_results: dict[str, list],
) -> None:
    _, message, mro = readonly_dir_results["new"]
    assert "StoreError" in mro
    assert "Permission denied" in message


def test_an_exclusive_open_in_a_read_only_directory_is_a_store_error(
    readonly_dir_results: dict[str, list],
) -> None:
    _, message, mro = readonly_dir_results["exclusive"]
    assert "StoreError" in mro
    assert "Permission denied" in message


def test_a_shared_open_in_a_read_only_directory_is_a_store_error(
    readonly_dir_results: dict[str, list],
) -> None:
    assert "StoreError" in readonly_dir_results["shared"][-1]


def test_a_readonly_store_opens_in_a_read_only_directory(
    readonly_dir_results: dict[str, list],
) -> None:
    assert readonly_dir_results["readonly"] == ["opened", ["early/0"]]


def test_a_failed_write_keeps_a_held_creation_for_the_next_write(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    failures = iter([OSError(errno.ENOSPC, "No space left on device")])

    def write_once_failing(fd: int, data: bytes) -> int:
        error = next(failures, None)
        if error is not None:
            raise error
        return real_write(fd, data)

    with JsonlStore(path, exclusive=True) as store:
        store.create("a", None)  # held back in an exclusive store
        monkeypatch.setattr(os, "write", write_once_failing)
        with pytest.raises(StoreWriteError, match="No space left"):
            store.start_attempt("a")
        assert store.start_attempt("a") == 1  # the disk has room again: the creation goes too
        store.resolve("a", "done")
    with JsonlStore(path, readonly=True) as reopened:
        assert reopened.get("a").value == "done"
        assert reopened.get("a").attempts == 1
