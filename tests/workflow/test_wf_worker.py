"""The import worker as a real child process: SIGKILLed mid-batch and re-run, and its exit codes."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import ModuleType
from typing import Any

from wf_helpers import (
    SINK_FILE,
    STORE_FILE,
    batch_id,
    read_store,
    run_worker,
    run_worker_plain,
    worker_paused_at,
)

from store import State
from workflow import exitcodes
from workflow.importer import file_source, synthetic_source
from workflow.importer.sources import SEGMENT_BATCHES

ROOT = "import/worker-test"
KILLED = -9
FAST_RETRY = ("--max-attempts", "3", "--retry-initial", "0")


def batch_executions(state_dir: Path, batch: int) -> list[tuple[int, str | None]]:
    with sqlite3.connect(state_dir / SINK_FILE) as db:
        return db.execute(
            "SELECT attempt, outcome FROM executions WHERE promise_id = ? ORDER BY id",
            (batch_id(ROOT, batch),),
        ).fetchall()


def root_result(state_dir: Path) -> Any:
    with read_store(state_dir / STORE_FILE) as store:
        root = store.get(ROOT)
    assert root is not None and root.state is State.RESOLVED
    return root.value


def raise_at(batch: int, attempt: int) -> list[dict[str, Any]]:
    return [{"name": "batch.fail", "key": f"{batch}/{attempt}", "action": "raise"}]


def assert_audit_ok(audit: ModuleType, state_dir: Path, records: int) -> dict[str, Any]:
    verdict = audit.audit(state_dir, ROOT, records)
    assert verdict["ok"], verdict["violations"]
    return verdict


# -- SIGKILL and re-run -----------------------------------------------------------------------


def test_worker_killed_mid_batch_resumes_at_that_batch_and_audits_clean(
    tmp_path: Path, audit: ModuleType
) -> None:
    source = synthetic_source(1000)
    killed = run_worker(tmp_path, ROOT, source, 100, kill_at_batch=4)

    assert killed.returncode == KILLED
    assert killed.killed_at is not None
    assert (killed.killed_at["name"], killed.killed_at["key"]) == ("batch.mid", "4")
    assert killed.killed_at["pid"] == killed.events[0]["pid"]
    assert killed.batches("resolved") == [0, 1, 2, 3]

    finished = run_worker(tmp_path, ROOT, source, 100)

    assert finished.returncode == exitcodes.OK
    assert finished.batches("replayed") == [0, 1, 2, 3]
    assert finished.batches("started") == [4, 5, 6, 7, 8, 9]
    assert batch_executions(tmp_path, 4) == [(1, None), (2, "committed")]
    verdict = assert_audit_ok(audit, tmp_path, 1000)
    assert (verdict["imported"], verdict["skipped"], verdict["workers"]) == (950, 50, 2)
    totals = root_result(tmp_path)
    assert (totals["total_processed"], totals["total_skipped"]) == (950, 50)


def test_worker_killed_in_the_first_batch_then_in_the_last_finishes_exactly_once(
    tmp_path: Path, audit: ModuleType
) -> None:
    source = synthetic_source(300)
    assert run_worker(tmp_path, ROOT, source, 100, kill_at_batch=0).returncode == KILLED
    assert run_worker(tmp_path, ROOT, source, 100, kill_at_batch=2).returncode == KILLED
    assert run_worker(tmp_path, ROOT, source, 100).returncode == exitcodes.OK
    assert_audit_ok(audit, tmp_path, 300)
    assert [len(batch_executions(tmp_path, b)) for b in range(3)] == [2, 1, 2]


def test_worker_killed_between_commit_and_resolve_finds_its_commit(
    tmp_path: Path, audit: ModuleType
) -> None:
    source = synthetic_source(500)
    torn_resolve = {"name": "store.append", "key": f"resolve:{batch_id(ROOT, 2)}", "action": "pause"}
    killed = run_worker(tmp_path, ROOT, source, 100, failpoints=[torn_resolve])
    assert killed.returncode == KILLED
    assert killed.killed_at is not None and killed.killed_at["name"] == "store.append"

    finished = run_worker(tmp_path, ROOT, source, 100)

    assert finished.returncode == exitcodes.OK
    assert (tmp_path / f"{STORE_FILE}.torn-1").exists()  # the half-written resolve, moved aside
    assert batch_executions(tmp_path, 2) == [(1, "committed"), (1, "found_commit")]
    assert_audit_ok(audit, tmp_path, 500)


def test_finished_import_run_again_replays_and_executes_nothing(
    tmp_path: Path, audit: ModuleType
) -> None:
    source = synthetic_source(200)
    assert run_worker(tmp_path, ROOT, source, 100).returncode == exitcodes.OK
    again = run_worker(tmp_path, ROOT, source, 100)
    assert again.returncode == exitcodes.OK
    assert again.batches("started") == []
    assert [e["kind"] for e in again.events if e["event"] == "step"] == ["replayed"]
    assert_audit_ok(audit, tmp_path, 200)


# -- failing batches --------------------------------------------------------------------------


def test_injected_batch_failure_is_retried_and_the_import_finishes(
    tmp_path: Path, audit: ModuleType
) -> None:
    run = run_worker(tmp_path, ROOT, synthetic_source(500), 100, *FAST_RETRY,
                     failpoints=raise_at(2, 1))
    assert run.returncode == exitcodes.OK
    assert run.batches("retrying") == [2]
    assert batch_executions(tmp_path, 2) == [(1, None), (2, "committed")]
    assert_audit_ok(audit, tmp_path, 500)


def test_batch_failing_for_good_exits_failed_and_stays_rejected(tmp_path: Path) -> None:
    source = synthetic_source(500)
    once = ("--max-attempts", "1")
    failed = run_worker(tmp_path, ROOT, source, 100, *once, failpoints=raise_at(2, 1))
    assert failed.returncode == exitcodes.FAILED
    assert failed.events[-1]["event"] == "ended"
    assert batch_id(ROOT, 2) in failed.events[-1]["error"]
    with read_store(tmp_path / STORE_FILE) as store:
        assert store.get(batch_id(ROOT, 2)).error["type"] == "InjectedFault"
        assert [store.get(batch_id(ROOT, b)).state for b in (0, 1)] == [State.RESOLVED] * 2

    again = run_worker(tmp_path, ROOT, source, 100, *once)
    assert again.returncode == exitcodes.FAILED
    assert again.batches("started") == []
    assert batch_executions(tmp_path, 2) == [(1, None)]


# -- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_before_the_first_batch_interrupts_and_the_next_run_does_it_all(
    tmp_path: Path, audit: ModuleType
) -> None:
    source = synthetic_source(300)
    stopped = run_worker(tmp_path, ROOT, source, 100, term_when=lambda e: e["event"] == "started")
    assert stopped.returncode == exitcodes.INTERRUPTED
    assert stopped.batches("started") == []
    assert run_worker(tmp_path, ROOT, source, 100).returncode == exitcodes.OK
    assert_audit_ok(audit, tmp_path, 300)


def test_sigterm_lets_the_batch_in_flight_finish_and_the_next_run_resumes(
    tmp_path: Path, audit: ModuleType
) -> None:
    source = synthetic_source(1000)
    retry_soon = ("--max-attempts", "3", "--retry-initial", "1")  # the time SIGTERM has to land
    stopped = run_worker(tmp_path, ROOT, source, 100, *retry_soon, failpoints=raise_at(1, 1),
                         term_when=lambda e: e.get("kind") == "retrying")
    assert stopped.returncode == exitcodes.INTERRUPTED
    resolved = stopped.batches("resolved")
    assert resolved == [0]  # batch 1 was in its retry backoff: the stop ends the backoff at once

    resumed = run_worker(tmp_path, ROOT, source, 100)
    assert resumed.returncode == exitcodes.OK
    assert resumed.batches("started") == list(range(len(resolved), 10))
    assert_audit_ok(audit, tmp_path, 1000)


# -- refusals ---------------------------------------------------------------------------------


def test_bad_header_is_fatal_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv"
    path.write_text("id,name\n1,a\n")
    state = tmp_path / "state"
    state.mkdir()
    done = run_worker_plain(state, ROOT, file_source(path), 1)
    assert done.returncode == exitcodes.FATAL
    assert f"{path}:1: header lacks the column(s) email" in done.stderr
    assert not (state / SINK_FILE).exists()
    assert not (state / STORE_FILE).exists() or (state / STORE_FILE).read_bytes() == b""


def test_broken_quoting_found_by_planning_rejects_the_import_naming_file_and_line(
    tmp_path: Path,
) -> None:
    """Planning goes a segment at a time: a broken line further on is found when its segment is
    planned, after the batches before it committed; those stay committed."""
    rows = [f"{i},n{i},u{i}@example.com" for i in range(SEGMENT_BATCHES + 5)]
    path = tmp_path / "broken.csv"
    path.write_text("\n".join(["id,name,email", *rows, '99,"a"b,c@d.io', "100,z,z@d.io"]) + "\n")
    state = tmp_path / "state"
    state.mkdir()
    done = run_worker_plain(state, ROOT, file_source(path), 1)
    assert done.returncode == exitcodes.FAILED
    broken_line = len(rows) + 2
    assert f"LateInputError: {path}:{broken_line}: malformed CSV" in done.stderr.splitlines()[-1]
    with sqlite3.connect(state / SINK_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM batch_commits").fetchone() == (SEGMENT_BATCHES,)
    with read_store(state / STORE_FILE) as store:
        assert store.get(ROOT).state is State.REJECTED
        assert store.get(batch_id(ROOT, SEGMENT_BATCHES - 1)).state is State.RESOLVED


def test_same_id_with_another_batch_size_is_fatal_and_keeps_the_result(tmp_path: Path) -> None:
    source = synthetic_source(200)
    assert run_worker_plain(tmp_path, ROOT, source, 100).returncode == exitcodes.OK
    before = root_result(tmp_path)
    other = run_worker_plain(tmp_path, ROOT, source, 50)
    assert other.returncode == exitcodes.FATAL
    assert "already exists" in other.stderr
    assert root_result(tmp_path) == before


def test_second_worker_is_refused_while_the_first_holds_the_store(
    tmp_path: Path, audit: ModuleType
) -> None:
    source = synthetic_source(500)
    with worker_paused_at(tmp_path, ROOT, source, 100, batch=2) as first:
        second = run_worker_plain(tmp_path, ROOT, source, 100, "--lock-timeout", "0.2")
        assert second.returncode == exitcodes.BUSY
        assert f"held by another worker (pid {first['pid']}" in second.stderr
    assert run_worker(tmp_path, ROOT, source, 100).returncode == exitcodes.OK
    assert_audit_ok(audit, tmp_path, 500)


def test_batch_size_zero_is_not_a_restartable_crash(tmp_path: Path) -> None:
    done = run_worker_plain(tmp_path, ROOT, synthetic_source(10), 0)
    assert done.returncode in (exitcodes.USAGE, exitcodes.FATAL)


def killed_file_import(tmp_path: Path) -> tuple[Path, dict[str, Any], Path]:
    """A CSV import in batches of 2, SIGKILLed in batch 1: (the file, its source, the state dir)."""
    path = tmp_path / "people.csv"
    rows = [f"{i},name{i},user{i}@example.com" for i in range(6)]
    path.write_text("\n".join(["id,name,email", *rows]) + "\n")
    source = file_source(path)
    state = tmp_path / "state"
    state.mkdir()
    assert run_worker(state, ROOT, source, 2, kill_at_batch=1).returncode == KILLED
    return path, source, state


def test_input_rewritten_with_the_same_size_is_refused_on_restart(tmp_path: Path) -> None:
    """The restarted worker trusts the file by its stat identity; a rewrite moves it, so the
    batch it reads hashes the file again and refuses it (the import is rejected; batch 0 stays)."""
    path, source, state = killed_file_import(tmp_path)
    path.write_text(path.read_text().replace("user", "USER"))  # same size, other content
    assert path.stat().st_size == source["size"]

    restarted = run_worker_plain(state, ROOT, source, 2)
    assert restarted.returncode == exitcodes.FAILED
    assert f"{path}: input changed since the import started" in restarted.stderr
    with read_store(state / STORE_FILE) as store:
        assert store.get(batch_id(ROOT, 0)).state is State.RESOLVED
        assert store.get(batch_id(ROOT, 1)).state is State.REJECTED


def test_input_of_another_size_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path, source, state = killed_file_import(tmp_path)
    with path.open("a") as f:
        f.write("6,name6,user6@example.com\n")
    before = (state / STORE_FILE).read_bytes()

    restarted = run_worker_plain(state, ROOT, source, 2)
    assert restarted.returncode == exitcodes.FATAL
    assert f"{path}: input changed since the import started" in restarted.stderr
    assert (state / STORE_FILE).read_bytes() == before


# -- resuming a file's import -------------------------------------------------------------------


def write_csv(path: Path, rows: int, name_chars: int = 10) -> Path:
    path.write_text("id,name,email\n" + "".join(
        f"{i},{'n' * name_chars}{i},user{i}@example.com\n" for i in range(rows)))
    return path


def bytes_read(pid: int) -> int:
    """What a live process has read through read() calls so far (its code's files included)."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(io["rchar"])


def test_a_restarted_worker_replays_the_stored_plan_and_reads_only_the_batch_it_runs(
    tmp_path: Path,
) -> None:
    """A worker killed deep into a 25 MB file: the next one replays the plan segments stored
    before (plans none again), trusts the file by its stat identity (hashes nothing), and reads
    little beyond its own code, the store and the batch it runs again."""
    path = write_csv(tmp_path / "people.csv", 24_000, name_chars=1000)
    source = file_source(path)
    state = tmp_path / "state"
    state.mkdir()
    killed = run_worker(state, ROOT, source, 100, kill_at_batch=150)
    assert killed.returncode == KILLED
    planned = [e["id"] for e in killed.events
               if e["event"] == "step" and e["fn"] == "plan_segment" and e["kind"] == "resolved"]
    assert len(planned) >= 3, "the kill should land a few plan segments in"

    events: list[dict[str, Any]] = []
    with worker_paused_at(state, ROOT, source, 100, batch=150, events=events) as paused:
        read = bytes_read(paused["pid"])

    plan_events = [(e["id"], e["kind"]) for e in events if e["event"] == "step" and e["fn"] == "plan_segment"]
    assert plan_events == [(promise_id, "replayed") for promise_id in planned]
    # About 5 MB (mostly its code); hashing the file would read 25 MB more, planning again 15.
    assert read < source["size"] / 2, (read, source["size"])


def test_an_import_recorded_with_v1_resumes_on_v1(tmp_path: Path, audit: ModuleType) -> None:
    """Code with import_records v2 resumes an import that v1 recorded (it planned its file whole,
    in the workflow): with v1, kept registered for it, to the same totals."""
    path = write_csv(tmp_path / "people.csv", 300)
    source = file_source(path)
    state = tmp_path / "state"
    state.mkdir()
    v1 = "workflow.importer.app:import_records_v1"
    assert run_worker(state, ROOT, source, 20, kill_at_batch=4, target=v1).returncode == KILLED

    resumed = run_worker(state, ROOT, source, 20)

    assert resumed.returncode == exitcodes.OK
    assert resumed.batches("replayed") == [0, 1, 2, 3]
    assert resumed.batches("started") == list(range(4, 15))
    with read_store(state / STORE_FILE) as store:
        assert (store.get(ROOT).param["fn"], store.get(ROOT).param["v"]) == ("import_records", 1)
        calls = store.list(ROOT + ".")
    assert {p.param["fn"] for p in calls} == {"process_batch"}  # no plan steps
    assert all("identity" not in p.param["args"][1] for p in calls)  # v1's descriptors, as recorded
    verdict = assert_audit_ok(audit, state, 300)
    assert (verdict["imported"], verdict["batches"]) == (300, 15)
