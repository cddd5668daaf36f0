"""`--kill-random N --seed S`: N SIGKILLs at random moments, some mid-batch, some mid-store-write."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from supervisor_helpers import (
    STORE_FILE,
    assert_audit_ok,
    assert_finished,
    assert_report_matches_sink,
    batch_promises,
    executions,
    kill_counts,
    root_id,
    run_import,
)

from supervisor.faults import latest_kill_unit, random_kills

RECORDS = 1000
BATCH_SIZE = 50
KILLS = 5


def _first_seed_whose_first_kill_tears_a_batch() -> int:
    """A store-write kill at least one step ahead: a fresh import's step 0 is its plan segment."""
    return next(seed for seed in range(1000)
                if (k := random_kills(1, seed)[0]).kind == "store-write" and k.batch_offset >= 1)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_random_kills_finish_with_invariants_intact(tmp_path: Path, audit: ModuleType, seed: int) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run = run_import(state_dir, "--records", str(RECORDS), "--batch-size", str(BATCH_SIZE),
                     "--kill-random", str(KILLS), "--seed", str(seed))
    report = assert_finished(run, RECORDS, BATCH_SIZE)

    delivered, undelivered = kill_counts(report)
    assert (delivered, undelivered) == (KILLS, 0)  # each one, spread over the run
    assert report["restarts"] == delivered
    assert len(report["children"]) == delivered + 1
    # A kill is reported exactly when it is what ended the child.
    killed = {c["pid"] for c in report["children"] if c["exit"] == "killed by SIGKILL"}
    assert killed == {k["pid"] for k in report["kills"]}, run.describe()
    assert {k["kind"] for k in report["kills"]} <= {"timed", "store-write", "mid-batch"}
    assert report["children"][-1]["exit"] == "exit code 0"
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_kill_during_store_write_moves_torn_line_aside(tmp_path: Path, audit: ModuleType) -> None:
    seed = _first_seed_whose_first_kill_tears_a_batch()
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run = run_import(state_dir, "--records", str(RECORDS), "--batch-size", str(BATCH_SIZE),
                     "--kill-random", "1", "--seed", str(seed))
    report = assert_finished(run, RECORDS, BATCH_SIZE)

    [kill] = report["kills"]
    assert kill["kind"] == "store-write"
    batch = kill["batch"]
    assert batch is not None
    # The torn half line of the resolve is kept aside, not dropped, and the store is whole again.
    torn = (state_dir / f"{STORE_FILE}.torn-1").read_bytes()
    assert torn.startswith(b'{"op":"resolve"'), torn[:80]
    assert f'"id":"{batch_promises(audit, state_dir, root)[batch]["id"]}"'.encode() in torn
    assert not torn.endswith(b"\n")
    assert not (state_dir / f"{STORE_FILE}.torn-2").exists()
    assert (state_dir / STORE_FILE).read_bytes().endswith(b"\n")
    # The batch committed in the sink before its resolve was torn: the restart found the commit.
    first, second = report["children"]
    runs = [(e.pid, e.outcome) for e in executions(state_dir, root) if e.batch == batch]
    assert runs == [(first["pid"], "committed"), (second["pid"], "found_commit")]
    assert batch_promises(audit, state_dir, root)[batch]["attempts"] == 1  # finding it costs none
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_random_kills_with_the_same_seed_draw_the_same_kinds(tmp_path: Path) -> None:
    kinds = []
    for name in ("a", "b"):
        run = run_import(tmp_path / name, "--records", "400", "--batch-size", "20",
                         "--kill-random", "3", "--seed", "8")
        report = assert_finished(run, 400, 20)
        delivered = [k["kind"] for k in report["kills"]]
        assert delivered, report
        # A kill that could not land is reported undelivered as "random <kind> kill: ...".
        kinds.append(delivered + [u.split()[1] for u in report["undelivered_kills"]])
    expected = [k.kind for k in random_kills(3, 8)]
    assert kinds == [expected, expected]


def test_many_random_kills_on_few_batches_never_fail_a_batch(tmp_path: Path, audit: ModuleType) -> None:
    # 3 batches, 3 attempts each, 30 kills: our kills must never use up a batch's last attempt.
    state_dir = tmp_path / "state"
    root = root_id(300, 100)
    run = run_import(state_dir, "--records", "300", "--batch-size", "100", "--kill-random", "30",
                     "--seed", "21", "--max-attempts", "3")
    assert_finished(run, 300, 100)
    assert all(p["attempts"] <= 3 for p in batch_promises(audit, state_dir, root).values())
    assert_audit_ok(audit, state_dir, root, 300)


def test_a_store_write_kill_never_uses_up_the_last_attempt_left_by_a_retry(
    tmp_path: Path, audit: ModuleType
) -> None:
    # Batch 0 (step 1, after the plan segment) fails its first attempt; with 2 attempts, a kill
    # of its second would fail it.
    seed = next(s for s in range(1000)
                if (k := random_kills(1, s)[0]).kind == "store-write" and k.batch_offset == 1)
    state_dir = tmp_path / "state"
    root = root_id(300, 100)
    run = run_import(state_dir, "--records", "300", "--batch-size", "100", "--fail-at-batch", "0",
                     "--max-attempts", "2", "--retry-initial", "0.05", "--kill-random", "1",
                     "--seed", str(seed))
    assert_finished(run, 300, 100)
    assert_audit_ok(audit, state_dir, root, 300)


def test_more_kills_than_batches_are_all_delivered_spread_over_the_run(
    tmp_path: Path, audit: ModuleType
) -> None:
    # The run: the default import (10 batches), 20 kills. Each is delivered, the batches
    # sharing them, none spending a batch's last attempt.
    state_dir = tmp_path / "state"
    root = root_id(1000, 100)
    run = run_import(state_dir, "--kill-random", "20", "--seed", "4")
    report = assert_finished(run, 1000, 100)

    assert (len(report["kills"]), report["undelivered_kills"]) == (20, []), run.describe()
    assert "not delivered" not in run.stderr
    assert len({k["batch"] for k in report["kills"]} - {None}) >= 5, report["kills"]  # spread
    attempts = [p["attempts"] for p in batch_promises(audit, state_dir, root).values()]
    assert max(attempts) < 10, attempts  # no batch's last attempt spent by a kill
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, 1000)


def test_a_late_kill_waits_at_the_last_unit_that_leaves_one_to_each_kill_after_it() -> None:
    never = lambda _n: False  # noqa: E731
    assert latest_kill_unit(3, 10, 0, {}, never) == 7  # room for kills 2 and 3 in units 8, 9
    assert latest_kill_unit(3, 10, 8, {}, never) == 8  # late: at once, the units share them
    assert latest_kill_unit(4, 2, 0, {0: 2}, never) == 1  # unit 0 had its share, 2 of 4
    assert latest_kill_unit(4, 2, 0, {}, lambda n: n == 0) == 1  # its last attempt: not there
    assert latest_kill_unit(1, 2, 0, {}, lambda _n: True) is None  # nowhere: undelivered
    assert latest_kill_unit(3, None, 0, {}, never) is None  # units not known: a drawn moment only
