"""compact(): one "promise" record per promise, written to a temp file and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from store_helpers import child_env, python_argv, records, run_python

from store import Durability, JsonlStore, PromiseConflictError, State, StoreWriteError


def fill(store: JsonlStore) -> None:
    """Promises in every state: pending, attempted, resolved, rejected, reopened."""
    store.create("pending", {"fn": "f"})
    store.create("attempted", None)
    store.start_attempt("attempted")
    store.start_attempt("attempted")
    store.create("resolved", (1, 2))
    store.start_attempt("resolved")
    store.resolve("resolved", {"rows": [1, 2]})
    store.create("rejected", None)
    store.reject("rejected", ValueError("bad"))
    store.create("reopened", None)
    store.start_attempt("reopened")
    store.reject("reopened", RuntimeError("flaky"))
    store.reopen("reopened", "retry")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "promises.jsonl"
    with JsonlStore(path) as store:
        fill(store)
    return path


@pytest.mark.parametrize("exclusive", [False, True])
def test_compact_writes_one_promise_record_per_promise(path: Path, exclusive: bool) -> None:
    with JsonlStore(path, exclusive=exclusive) as store:
        store.compact()
    got = records(path)
    assert [r["op"] for r in got] == ["promise"] * 5
    assert [r["id"] for r in got] == ["pending", "attempted", "resolved", "rejected", "reopened"]


def test_a_reopened_store_sees_the_same_promises_after_compaction(path: Path) -> None:
    with JsonlStore(path) as store:
        before = store.list()
        store.compact()
        assert store.list() == before
    with JsonlStore(path) as store:
        assert store.list() == before


def test_compaction_swaps_in_a_new_file_and_leaves_no_temp_file(path: Path) -> None:
    inode = path.stat().st_ino
    with JsonlStore(path) as store:
        store.compact()
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}.lock"]


def test_the_rules_still_hold_after_compaction(path: Path) -> None:
    with JsonlStore(path) as store:
        store.compact()
        assert store.create("pending", {"fn": "f"}).state is State.PENDING
        with pytest.raises(PromiseConflictError):
            store.resolve("resolved", "other")
        assert store.resolve("resolved", {"rows": [1, 2]}).value == {"rows": [1, 2]}
        assert store.start_attempt("attempted") == 3
        assert store.start_attempt("reopened") == 2
        assert store.reopen("rejected", "again").state is State.PENDING
        store.create("new", None)
    with JsonlStore(path) as store:
        assert store.get("attempted").attempts == 3
        assert store.get("new") is not None


def test_another_store_object_notices_the_compaction(path: Path) -> None:
    with JsonlStore(path) as other, JsonlStore(path) as compactor:
        compactor.compact()
        compactor.create("after", 1)
        assert other.get("after").param == 1
        other.create("from-other", 2)  # must land in the new file, not the unlinked one
        assert compactor.get("from-other").param == 2
    with JsonlStore(path) as store:
        assert [p.id for p in store.list()][-2:] == ["after", "from-other"]


OTHER_PROCESS = """
import sys
from store import JsonlStore
store = JsonlStore(sys.argv[1])
store.list()
print("ready", flush=True)
sys.stdin.readline()  # the parent compacts meanwhile
store.create("from-child", [p.id for p in store.list()])
print("done", flush=True)
"""


def test_a_store_in_another_process_notices_the_compaction(path: Path) -> None:
    child = subprocess.Popen(
        python_argv(OTHER_PROCESS, path), env=child_env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline() == "ready\n"
        with JsonlStore(path) as store:
            store.compact()
            store.create("after-compaction", None)
        out, _ = child.communicate("go\n", timeout=30)
    finally:
        child.kill()
        child.wait()
    assert out == "done\n"
    with JsonlStore(path) as store:
        assert store.get("from-child").param[-1] == "after-compaction"


def test_a_failed_compaction_leaves_the_store_as_it_was(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = path.read_bytes()

    def failing_replace(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with JsonlStore(path) as store:
        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(StoreWriteError, match="No space left"):
            store.compact()
        monkeypatch.undo()
        assert path.read_bytes() == before
        assert not Path(f"{path}.compact").exists()
        store.create("still-writable", None)
    with JsonlStore(path) as store:
        assert store.get("still-writable") is not None


# -- a full disk -------------------------------------------------------------------------------

RESOLVED = 800
COMPACT_CHILD = """
import json, sys
from store import JsonlStore, StoreWriteError
with JsonlStore(sys.argv[1]) as store:
    try:
        store.compact()
    except StoreWriteError as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        print(json.dumps({"error": None}))
"""


@pytest.fixture
def resolved_store(tmp_path: Path) -> Path:
    path = tmp_path / "resolved.jsonl"
    with JsonlStore(path, exclusive=True, durability=Durability.NONE) as store:
        for i in range(RESOLVED):
            store.create(f"step/{i}", {"fn": "f", "args": [i]})
            store.start_attempt(f"step/{i}")
            store.resolve(f"step/{i}", {"rows": i})
    return path


def compacted_size(path: Path, scratch: Path) -> int:
    copy = scratch / "copy.jsonl"
    shutil.copyfile(path, copy)
    with JsonlStore(copy) as store:
        store.compact()
    return copy.stat().st_size


@pytest.mark.parametrize("short_by", [1, 10_000])
def test_compaction_on_a_full_disk_fails_and_leaves_the_store_untouched(
    resolved_store: Path, tmp_path: Path, short_by: int
) -> None:
    limit = compacted_size(resolved_store, tmp_path) - short_by
    before = resolved_store.read_bytes()

    child = run_python(COMPACT_CHILD, resolved_store, file_size_limit=limit)

    assert child.returncode == 0, child.stderr
    error = json.loads(child.stdout)["error"]
    assert error is not None, "compaction reported success on a full disk"
    assert str(resolved_store) in error
    assert resolved_store.read_bytes() == before
    assert not Path(f"{resolved_store}.compact").exists()
    with JsonlStore(resolved_store) as store:
        resolved = [p for p in store.list() if p.state is State.RESOLVED]
    assert len(resolved) == RESOLVED
