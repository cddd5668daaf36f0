"""The CLI contract: usage errors, `status` that changes nothing, replaying a finished import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from supervisor_helpers import (
    assert_audit_ok,
    assert_finished,
    batch_attempts,
    batch_promises,
    child_env,
    command,
    executions,
    root_id,
    run_cli,
    run_import,
    snapshot,
    start_import,
    store_promises,
    wait_until,
)

from store.codec import decode, encode
from supervisor import exits

RECORDS = 200
BATCH_SIZE = 50
BATCHES = 4
SIZES = ("--records", str(RECORDS), "--batch-size", str(BATCH_SIZE))


@pytest.mark.parametrize("args, complaint", [
    (("--batch-size", "0"), "--batch-size: must be at least 1"),
    (("--batch-size", "-1"), "--batch-size: must be at least 1"),
    ((*SIZES, "--kill-at-batch", str(BATCHES)), f"batch {BATCHES} is beyond the last batch"),
    ((*SIZES, "--kill-at-batch", "1", "--kill-at-batch", "99"), "batch 99 is beyond the last batch"),
    ((*SIZES, "--fail-at-batch", str(BATCHES)), f"batch {BATCHES} is beyond the last batch"),
    (("--kill-at-batch", "-1"), "--kill-at-batch: must not be negative"),
    (("--bogus",), "unrecognized arguments: --bogus"),
    (("--input", "records.csv", "--records", "5"), "--records: not allowed with argument --input"),
    (("--records", "ten"), "argument --records: not a whole number: 'ten'"),
    (("--id", "import/a.b"), "without '.'"),
    (("--kill-random", "1000000000"), "--kill-random: at most 1,000 random kills"),
    (("--records", str(10**13)), "--records: at most 1,000,000,000,000 records"),
    (("--batch-size", str(10**21)), "--batch-size: batch size must be a whole number from 1 to 10,000,000"),
    (("--workers", "0"), "--workers: must be at least 1, not 0"),
    (("--workers", "65"), "--workers: at most 64, not 65"),
    (("--workers", "two"), "--workers: not a whole number: 'two'"),
], ids=["batch-size-0", "batch-size-negative", "kill-beyond-last", "one-kill-beyond-last",
        "fail-beyond-last", "kill-negative", "unknown-flag", "input-and-records", "records-not-a-number",
        "id-with-a-dot", "kill-random-beyond-the-cap", "records-beyond-the-cap",
        "batch-size-beyond-the-cap", "workers-0", "workers-beyond-the-cap", "workers-not-a-number"])
def test_usage_error_exits_2_and_touches_nothing(tmp_path: Path, args: tuple[str, ...],
                                                 complaint: str) -> None:
    state_dir = tmp_path / "state"
    run = run_import(state_dir, *args)
    assert run.returncode == 2, run.describe()
    assert "usage: python -m supervisor" in run.stderr
    assert complaint in run.stderr
    assert run.stdout == ""
    assert not state_dir.exists()


def test_kill_at_the_last_batch_is_not_a_usage_error(tmp_path: Path) -> None:
    run = run_import(tmp_path / "state", *SIZES, "--kill-at-batch", str(BATCHES - 1))
    assert_finished(run, RECORDS, BATCH_SIZE)


def test_status_prints_progress_without_changing_the_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    assert_finished(run_import(state_dir, *SIZES, "--kill-at-batch", "2"), RECORDS, BATCH_SIZE)
    before = snapshot(state_dir)

    text = run_cli("status", state_dir, "--id", root)
    as_json = run_cli("status", state_dir, "--id", root, "--json")

    assert snapshot(state_dir) == before
    assert text.returncode == 0, text.describe()
    assert f"{root}: resolved, {BATCHES}/{BATCHES} batches done" in text.stdout
    assert f"{BATCHES + 1} batch attempts in all" in text.stdout  # batch 2 ran twice
    assert as_json.returncode == 0, as_json.describe()
    status = json.loads(as_json.stdout)
    assert (status["batches_done"], status["batch_count"], status["state"]) == (BATCHES, BATCHES, "resolved")
    assert status["result"]["total_records"] == RECORDS


def test_status_of_a_partial_import_changes_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    broken = {"DURABLE_FAILPOINTS": json.dumps([{"name": "batch.fail", "key": "1/1", "action": "raise"}])}
    failed = run_import(state_dir, *SIZES, "--max-attempts", "1", env=broken)
    assert failed.returncode == 1, failed.describe()
    before = snapshot(state_dir)

    status = run_cli("status", state_dir, "--id", root, "--json")

    assert snapshot(state_dir) == before
    assert status.returncode == 0, status.describe()
    s = json.loads(status.stdout)
    progress = (s["state"], s["batches_done"], s["batch_count"], s["batches_failed"])
    assert progress == ("rejected", 1, BATCHES, 1)
    assert "InjectedFault" in s["last_error"]


def test_status_during_a_run_shows_the_pending_batch(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    sup = start_import(state_dir, *SIZES, "--fail-at-batch", "2", "--retry-initial", "30")
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, root, 2) >= 1, "batch 2 starts")
        status = run_cli("status", state_dir, "--id", root, "--json")
        text = run_cli("status", state_dir, "--id", root)
        assert sup.process.poll() is None  # still running: status did not get in its way
    finally:
        sup.close()

    assert status.returncode == 0, status.describe()
    s = json.loads(status.stdout)
    batch_2 = batch_promises(audit, state_dir, root)[2]["id"]
    assert (s["state"], s["batches_done"], s["batch_count"]) == ("pending", 2, BATCHES)
    assert s["pending_batch"] == {"id": batch_2, "attempts": 1}
    assert f"2/{BATCHES} batches done" in text.stdout
    assert f"pending: {batch_2} (1 attempt(s) started)" in text.stdout


def test_status_of_an_unknown_import_is_an_error(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    missing = run_cli("status", state_dir, "--id", "import/nothing")
    assert missing.returncode == 1
    assert "no import has run" in missing.stderr
    assert not state_dir.exists()
    assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    other = run_cli("status", state_dir, "--id", "import/nothing")
    assert other.returncode == 1
    assert root_id(RECORDS, BATCH_SIZE) in other.stderr  # the known imports are named


def test_same_command_twice_replays_and_runs_no_batch(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    first = assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    promises, runs = store_promises(audit, state_dir), executions(state_dir, root)

    second = assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)

    assert [c["executed"] for c in second["children"]] == [[]]
    assert second["restarts"] == 0
    totals = ("total_records", "total_processed", "total_skipped", "skipped_reasons", "batch_count")
    assert {k: second[k] for k in totals} == {k: first[k] for k in totals}
    assert store_promises(audit, state_dir) == promises
    assert executions(state_dir, root) == runs
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_same_id_with_other_records_is_refused(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    before, runs = snapshot(state_dir), executions(state_dir, root)

    other = run_import(state_dir, "--records", str(RECORDS + 100), "--batch-size", str(BATCH_SIZE),
                       "--id", root)

    assert other.returncode != 0, other.describe()
    assert other.report is not None and other.report["ok"] is False
    last_line = other.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and root in last_line, last_line
    assert "already exists" in last_line
    assert f"({RECORDS} synthetic records, not {RECORDS + 100} synthetic records)" in last_line
    assert snapshot(state_dir)["store.jsonl"] == before["store.jsonl"]
    assert executions(state_dir, root) == runs
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_an_import_of_more_batches_than_a_plan_can_hold_is_refused_in_one_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--records", str(10**12), "--batch-size", "1")
    assert run.returncode == 1, run.describe()
    assert run.stderr.strip() == ("error: source: 1,000,000,000,000 records in batches of 1 would be "
                                  "more than 10,000,000 batches: use a larger batch size")
    assert not state_dir.exists()


def test_an_import_whose_stored_result_is_not_a_summary_is_shown_not_a_traceback(tmp_path: Path) -> None:
    """A store edited by hand can hold any JSON as the import's result: run and status show it."""
    state_dir = tmp_path / "state"
    assert run_import(state_dir, *SIZES).returncode == 0
    store = state_dir / "store.jsonl"
    records = [decode(line) for line in store.read_bytes().splitlines()]
    for record in records:
        if record["op"] == "resolve" and record["id"] == root_id(RECORDS, BATCH_SIZE):
            record["value"] = "just text"
    store.write_bytes(b"".join(encode(r) for r in records))

    again = run_cli("run", state_dir, *SIZES)
    status = run_cli("status", state_dir, "--id", root_id(RECORDS, BATCH_SIZE))

    for done in (again, status):
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.describe()
        assert 'a result that is not an import summary: "just text"' in done.stdout


@pytest.mark.parametrize("invoked, usage", [
    (["durable-import"], "usage: durable-import run "),
    ([sys.executable, "-m", "supervisor"], "usage: python -m supervisor run "),
], ids=["console-script", "module"])
def test_usage_names_the_command_as_invoked(tmp_path: Path, invoked: list[str], usage: str) -> None:
    if invoked[0] == "durable-import":  # the console script installed beside this interpreter
        script = Path(sys.executable).parent / "durable-import"
        if not script.exists():
            pytest.skip("the package is not installed (pip install -e .)")
        invoked = [str(script)]
    helped = subprocess.run([*invoked, "run", "--help"], capture_output=True, text=True, cwd=tmp_path,
                            env=child_env(), check=False, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(usage), helped.stdout[:200]
    refused = subprocess.run([*invoked, "run", "--records", "abc"], capture_output=True, text=True,
                             cwd=tmp_path, env=child_env(), check=False, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].endswith("argument --records: not a whole number: 'abc'")


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("list",)])
def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """`status | head -1`: a real pipe whose read end is closed before the command writes. It
    exits 141 (128 + SIGPIPE, as a shell reports), with nothing on stderr (no traceback)."""
    state_dir = tmp_path / "state"
    assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(command(args[0], state_dir, *args[1:]), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=child_env(), timeout=60, check=False)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (exits.BROKEN_PIPE, "")
