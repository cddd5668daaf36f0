"""`--kill-at-batch K`: a real SIGKILL while batch K is in flight; the restart redoes only batch K."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from supervisor_helpers import (
    BATCH_SIZE,
    BATCHES,
    RECORDS,
    assert_audit_ok,
    assert_finished,
    assert_report_matches_sink,
    batch_promises,
    executions,
    root_id,
    run_cli,
    run_import,
    store_promises,
)

from workflow.importer.sources import SEGMENT_BATCHES


def _check_one_kill_at(audit: ModuleType, state_dir: Path, kill_batch: int) -> None:
    root = root_id(RECORDS, BATCH_SIZE)
    run = run_import(state_dir, "--records", str(RECORDS), "--batch-size", str(BATCH_SIZE),
                     "--kill-at-batch", str(kill_batch))
    report = assert_finished(run, RECORDS, BATCH_SIZE)

    first, second = report["children"]
    assert report["kills"] == [{"pid": first["pid"], "kind": "kill-at-batch", "batch": kill_batch}]
    assert report["restarts"] == 1
    assert first["exit"] == "killed by SIGKILL"
    assert first["executed"] == list(range(kill_batch))
    assert second["exit"] == "exit code 0"
    assert second["executed"] == list(range(kill_batch, BATCHES))
    assert second["replayed"] == kill_batch

    # From the store: batch K was attempted twice, every other batch once, all resolved.
    batches = batch_promises(audit, state_dir, root)
    assert {b: p["attempts"] for b, p in batches.items()} == {
        b: 2 if b == kill_batch else 1 for b in range(BATCHES)
    }
    assert all(p["state"] == "resolved" for p in batches.values())
    # From the sink: the killed execution of batch K never committed; the restart's did.
    runs_of_k = [e for e in executions(state_dir, root) if e.batch == kill_batch]
    assert [(e.pid, e.attempt, e.outcome) for e in runs_of_k] == [
        (first["pid"], 1, None), (second["pid"], 2, "committed"),
    ]
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_kill_at_first_batch_reruns_only_batch_0(tmp_path: Path, audit: ModuleType) -> None:
    _check_one_kill_at(audit, tmp_path / "state", 0)


def test_kill_at_middle_batch_reruns_only_that_batch(tmp_path: Path, audit: ModuleType) -> None:
    _check_one_kill_at(audit, tmp_path / "state", BATCHES // 2)


def test_kill_at_last_batch_reruns_only_the_last_batch(tmp_path: Path, audit: ModuleType) -> None:
    _check_one_kill_at(audit, tmp_path / "state", BATCHES - 1)


def test_several_kill_at_batch_each_kill_once(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run = run_import(state_dir, "--records", str(RECORDS), "--batch-size", str(BATCH_SIZE),
                     "--kill-at-batch", "7", "--kill-at-batch", "1", "--kill-at-batch", "4")
    report = assert_finished(run, RECORDS, BATCH_SIZE)

    assert [(k["kind"], k["batch"]) for k in report["kills"]] == [
        ("kill-at-batch", 1), ("kill-at-batch", 4), ("kill-at-batch", 7),
    ]
    assert report["restarts"] == 3
    assert [c["executed"] for c in report["children"]] == [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [c["replayed"] for c in report["children"]] == [0, 1, 4, 7]
    assert report["undelivered_kills"] == []
    attempts = {b: p["attempts"] for b, p in batch_promises(audit, state_dir, root).items()}
    assert attempts == {b: 2 if b in (1, 4, 7) else 1 for b in range(BATCHES)}
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


@pytest.mark.parametrize("records, batch_size", [(200, 20), (2000, 100)])
def test_kill_at_batch_with_other_sizes(tmp_path: Path, audit: ModuleType, records: int,
                                        batch_size: int) -> None:
    state_dir = tmp_path / "state"
    root = root_id(records, batch_size)
    last = records // batch_size - 1
    run = run_import(state_dir, "--records", str(records), "--batch-size", str(batch_size),
                     "--kill-at-batch", "0", "--kill-at-batch", str(last))
    report = assert_finished(run, records, batch_size)
    assert [k["batch"] for k in report["kills"]] == [0, last]
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, records)


def test_planned_kills_do_not_count_against_max_restarts(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run = run_import(state_dir, "--records", str(RECORDS), "--batch-size", str(BATCH_SIZE),
                     "--kill-at-batch", "2", "--kill-at-batch", "5", "--max-restarts", "0")
    report = assert_finished(run, RECORDS, BATCH_SIZE)
    assert report["restarts"] == 2
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_kill_at_a_batch_already_done_is_reported_undelivered(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    sizes = ("--records", str(RECORDS), "--batch-size", str(BATCH_SIZE))
    assert_finished(run_import(state_dir, *sizes), RECORDS, BATCH_SIZE)

    again = assert_finished(run_import(state_dir, *sizes, "--kill-at-batch", "2"), RECORDS, BATCH_SIZE)

    assert again["kills"] == []
    assert again["undelivered_kills"] == ["kill at batch 2: the batch was already done"]
    assert [c["executed"] for c in again["children"]] == [[]]
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_kills_in_later_plan_segments_land_in_their_batch_and_are_reported_by_batch(
    tmp_path: Path, audit: ModuleType
) -> None:
    """Past the first plan segment a batch's step number is no longer its batch number (a plan
    step comes before every SEGMENT_BATCHES batches): kills, the report and the sink still
    agree batch by batch."""
    records, batch_size = 10 * (2 * SEGMENT_BATCHES + 30), 10  # 158 batches in 3 plan segments
    batches = records // batch_size
    kill_at = [SEGMENT_BATCHES + 6, 2 * SEGMENT_BATCHES + 2]
    state_dir = tmp_path / "state"
    root = root_id(records, batch_size)
    run = run_import(state_dir, "--records", str(records), "--batch-size", str(batch_size),
                     *[f"--kill-at-batch={k}" for k in kill_at])
    report = assert_finished(run, records, batch_size)

    assert [(k["kind"], k["batch"]) for k in report["kills"]] == [("kill-at-batch", k) for k in kill_at]
    assert [c["executed"] for c in report["children"]] == [
        list(range(kill_at[0])), list(range(*kill_at)), list(range(kill_at[1], batches))]
    assert [c["replayed"] for c in report["children"]] == [0, *kill_at]
    plan_steps = [pid for pid, p in store_promises(audit, state_dir).items()
                  if p["param"].get("fn") == "plan_segment"]
    assert plan_steps == [f"{root}.0", f"{root}.{SEGMENT_BATCHES + 1}", f"{root}.{2 * SEGMENT_BATCHES + 2}"]
    attempts = {b: p["attempts"] for b, p in batch_promises(audit, state_dir, root).items()}
    assert attempts == {b: 2 if b in kill_at else 1 for b in range(batches)}
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, records)


def _csv(path: Path, rows: int) -> Path:
    path.write_text("id,name,email\n" + "".join(f"{i},N{i},u{i}@example.com\n" for i in range(rows)))
    return path


def test_a_file_import_counts_its_batches_once_planned_and_a_kill_beyond_them_is_undelivered(
    tmp_path: Path, audit: ModuleType
) -> None:
    """A file's batch count is not known before it is planned: `--kill-at-batch` beyond it is not
    refused up front; the run reports it undelivered, and status counts the stored plan."""
    path = _csv(tmp_path / "people.csv", 95)
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--input", str(path), "--batch-size", "10",
                     "--kill-at-batch", "3", "--kill-at-batch", "12")
    assert run.returncode == 0, run.describe()
    report = run.report
    assert [k["batch"] for k in report["kills"]] == [3]
    assert report["undelivered_kills"] == ["kill at batch 12: the import has no batch 12"]
    assert report["batch_count"] == 10
    status = json.loads(run_cli("status", state_dir, "--id", report["id"], "--json").stdout)
    assert (status["batches_done"], status["batch_count"]) == (10, 10)
    assert_report_matches_sink(report, state_dir, report["id"])
    assert_audit_ok(audit, state_dir, report["id"], 95)


def test_a_synthetic_import_refuses_a_kill_beyond_its_last_batch_up_front(tmp_path: Path) -> None:
    run = run_import(tmp_path / "state", "--records", "95", "--batch-size", "10", "--kill-at-batch", "10")
    assert run.returncode == 2
    assert "batch 10 is beyond the last batch (9); the import has 10 batch(es)" in run.stderr
    assert not (tmp_path / "state").exists()
