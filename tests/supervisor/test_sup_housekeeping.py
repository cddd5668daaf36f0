"""`compact` and `gc` from the command line, on real state dirs: the store rewritten with one line
per promise while nothing else holds it, a busy store refused in one line, and the torn tails
that crash/recover cycles set aside deleted once the store has been opened since."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from supervisor_helpers import (
    BATCH_SIZE,
    RECORDS,
    SIZES,
    STORE_FILE,
    assert_finished,
    batch_attempts,
    root_id,
    run_cli,
    run_import,
    start_import,
    wait_until,
)

from supervisor.housekeeping import NOT_SMALLER

ROOT = root_id(RECORDS, BATCH_SIZE)
TORN = b'{"op":"attempt","id":"import/x.3","n":2,"t":17'  # a line a SIGKILL cut short


def status_without_time(state_dir: Path) -> dict:
    s = json.loads(run_cli("status", state_dir, "--id", ROOT, "--json").stdout)
    return {k: v for k, v in s.items() if k != "last_activity"}


def test_compact_rewrites_the_store_one_line_per_promise_and_resumes_the_same(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    assert_finished(run_import(state_dir, *SIZES, "--kill-at-batch", "3", "--fail-at-batch", "6"),
                    RECORDS, BATCH_SIZE)
    store = state_dir / STORE_FILE
    size, lines = store.stat().st_size, store.read_bytes().count(b"\n")
    before = status_without_time(state_dir)

    compacted = run_cli("compact", state_dir, "--id", ROOT, "--json")

    assert compacted.returncode == 0, compacted.describe()
    report = json.loads(compacted.stdout)
    assert (report["workflows"], report["store"]) == ([ROOT], str(store.resolve()))
    assert report["bytes_before"] == size
    assert report["bytes_after"] == store.stat().st_size < size
    assert (report["lines_before"], report["lines_after"]) == (lines, store.read_bytes().count(b"\n"))
    records = [json.loads(line[: line.rindex(',"crc"')] + "}") for line in store.read_text().splitlines()]
    assert {r["op"] for r in records} == {"promise"} and len(records) < lines
    assert len({r["id"] for r in records}) == len(records)  # one line per promise
    assert status_without_time(state_dir) == before  # the same history, attempts and executions
    again = run_import(state_dir, *SIZES)
    assert_finished(again, RECORDS, BATCH_SIZE)
    assert [c["executed"] for c in again.report["children"]] == [[]]  # replayed, nothing ran again


def test_compact_compacts_the_whole_file_and_says_so_even_when_it_is_not_smaller(tmp_path: Path) -> None:
    """Two imports in one state dir: `compact` needs no --id, counts both, and a file of plain
    runs (a creation and a settlement per promise: nothing superseded) is said not to shrink."""
    state_dir = tmp_path / "state"
    assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    assert_finished(run_import(state_dir, "--records", "100", "--batch-size", "50"), 100, 50)
    store = state_dir / STORE_FILE
    lines, size = store.read_bytes().count(b"\n"), store.stat().st_size

    text = run_cli("compact", state_dir)

    assert text.returncode == 0, text.describe()
    promises = store.read_bytes().count(b"\n")
    assert promises == lines // 2  # each promise's two lines became one
    grew = store.stat().st_size >= size
    assert text.stdout == (f"compacted {store.resolve()}, the store of 2 workflows: {lines:,} -> "
                           f"{promises:,} lines (one per promise), {size:,} -> {store.stat().st_size:,} "
                           f"bytes{f' ({NOT_SMALLER})' if grew else ''}\n")
    assert grew  # as it is today: the one line carries all that the two did
    unknown = run_cli("compact", state_dir, "--id", "import/none")
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr.startswith(f"error: {store.resolve()}: no workflow 'import/none' (known: {ROOT}, ")


def test_compact_and_gc_refuse_a_store_a_worker_holds_in_one_line(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    linger = {"DURABLE_FAILPOINTS": json.dumps(
        [{"name": "batch.mid", "key": "2", "action": "delay", "seconds": 60}])}
    sup = start_import(state_dir, *SIZES, env=linger)
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, ROOT, 2) >= 1, "batch 2 starts")
        store = (state_dir / STORE_FILE).read_bytes()
        (state_dir / f"{STORE_FILE}.torn-1").write_bytes(TORN)
        refusals = [run_cli("compact", state_dir, "--id", ROOT), run_cli("gc", state_dir)]
        assert (state_dir / STORE_FILE).read_bytes() == store
        assert (state_dir / f"{STORE_FILE}.torn-1").exists()
        assert sup.process.poll() is None
    finally:
        sup.close()
    for refused in refusals:
        assert refused.returncode == 3, refused.describe()
        assert refused.stdout == "" and len(refused.stderr.splitlines()) == 1
        assert "store is held by another worker (pid" in refused.stderr
    assert "compact it once its supervisor (or worker) has stopped" in refusals[0].stderr


def test_gc_deletes_torn_tails_older_than_the_last_open_and_keep_lists_them(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    store = state_dir / STORE_FILE
    assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    for _ in range(3):  # crash (a write cut short), then recover (the next run sets it aside)
        with store.open("ab") as f:
            f.write(TORN)
        assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    torn = [state_dir / f"{STORE_FILE}.torn-{n}" for n in (1, 2, 3)]
    assert all(t.read_bytes() == TORN for t in torn)
    (state_dir / f"{STORE_FILE}.compact").write_bytes(b"a compaction killed before its rename")

    kept = run_cli("gc", state_dir, "--keep")
    assert kept.returncode == 0, kept.describe()
    aside = [*torn, state_dir / f"{STORE_FILE}.compact"]
    assert kept.stdout.splitlines() == [
        *(f"kept {p.resolve()}" for p in aside), "4 file(s) set aside; `gc` without --keep deletes them"]
    assert all(p.exists() for p in aside)

    # A torn tail now: gc's own open sets it aside, and keeps it (it is younger than that open).
    with store.open("ab") as f:
        f.write(TORN)
    collected = run_cli("gc", state_dir, "--json")
    assert collected.returncode == 0, collected.describe()
    assert json.loads(collected.stdout) == {"store": str(store.resolve()),
                                            "deleted": [str(p.resolve()) for p in aside]}
    newest = state_dir / f"{STORE_FILE}.torn-4"  # numbered while 1-3 were still there
    assert sorted(p for p in state_dir.glob(f"{STORE_FILE}.*") if "lock" not in p.name) == [newest]
    assert newest.read_bytes() == TORN and not store.read_bytes().endswith(TORN)

    last = run_cli("gc", state_dir)
    assert last.stdout.splitlines() == [f"deleted {newest.resolve()}", "1 file(s) deleted"]
    assert not list(state_dir.glob(f"{STORE_FILE}.torn-*"))
    assert status_without_time(state_dir)["state"] == "resolved"


def test_gc_and_compact_of_a_state_dir_where_nothing_ran(tmp_path: Path) -> None:
    for cmd in ("gc", "compact"):
        nothing = run_cli(cmd, tmp_path / "state")
        assert nothing.returncode == 1, nothing.describe()
        assert nothing.stderr == f"error: {(tmp_path / 'state').resolve() / STORE_FILE}: no store there " \
                                 "(nothing has run in this state dir)\n"
        assert not (tmp_path / "state").exists()
