"""Several real processes appending to one shared store at the same time."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

from store_helpers import child_env, python_argv, records

from store import JsonlStore, State

WORKERS = 4
IDS_PER_WORKER = 40

# Each worker settles its own ids and races the others over the same "common/<i>" ids, which
# every worker creates and resolves with the same param and value (both must be idempotent).
WORKER = """
import sys, time
from pathlib import Path
from store import JsonlStore
path, worker, count, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
store = JsonlStore(path)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
for i in range(count):
    own = f"w{worker}/{i}"
    store.create(own, {"worker": worker, "i": i})
    store.start_attempt(own)
    store.resolve(own, [worker, i])
    store.create(f"common/{i}", {"i": i})
    store.resolve(f"common/{i}", i)
    if worker == 0 and sys.argv[5] == "compact" and i % 10 == 9:
        store.compact()
print("done", flush=True)
"""


def run_workers(path: Path, tmp_path: Path, *, compact: bool) -> None:
    """Start the workers, let them go at the same instant, and wait for all of them."""
    go = tmp_path / "go"
    mode = "compact" if compact else "append"
    workers = [
        subprocess.Popen(python_argv(WORKER, path, str(n), str(IDS_PER_WORKER), go, mode),
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for n in range(WORKERS)
    ]
    try:
        for worker in workers:
            assert worker.stdout.readline() == "ready\n"
        go.touch()
        results = [worker.communicate(timeout=60) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    for worker, (out, err) in zip(workers, results, strict=True):
        assert (worker.returncode, out) == (0, "done\n"), err


def expected_promises() -> dict[str, tuple[object, object]]:
    """id -> (param, value) for every promise the workers settle."""
    expected: dict[str, tuple[object, object]] = {
        f"common/{i}": ({"i": i}, i) for i in range(IDS_PER_WORKER)
    }
    for n in range(WORKERS):
        for i in range(IDS_PER_WORKER):
            expected[f"w{n}/{i}"] = ({"worker": n, "i": i}, [n, i])
    return expected


def assert_store_holds_every_promise_once(path: Path) -> None:
    expected = expected_promises()
    with JsonlStore(path, readonly=True) as store:
        promises = store.list()
    assert sorted(p.id for p in promises) == sorted(expected)
    for promise in promises:
        assert promise.state is State.RESOLVED
        assert (promise.param, promise.value) == expected[promise.id]
        assert promise.attempts == (0 if promise.id.startswith("common/") else 1)


def test_concurrent_appenders_write_every_record_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "promises.jsonl"
    run_workers(path, tmp_path, compact=False)
    lines = Counter((r["op"], r["id"]) for r in records(path))  # each line is valid JSON + crc
    expected: Counter[tuple[str, str]] = Counter()
    for pid in expected_promises():
        ops = ["create", "resolve"] if pid.startswith("common/") else ["create", "attempt", "resolve"]
        expected.update((op, pid) for op in ops)
    assert lines == expected
    assert_store_holds_every_promise_once(path)


def test_concurrent_appenders_lose_nothing_while_one_of_them_compacts(tmp_path: Path) -> None:
    path = tmp_path / "promises.jsonl"
    run_workers(path, tmp_path, compact=True)
    introduced = Counter(r["id"] for r in records(path) if r["op"] in ("create", "promise"))
    assert set(introduced.values()) == {1}
    assert_store_holds_every_promise_once(path)
