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

from supervisor.faults import random_kills

RECORDS = 1000
BATCH_SIZE = 50
KILLS = 5


def _first_seed_whose_first_kill_is(kind: str) -> int:
    return next(seed for seed in range(1000) if random_kills(1, seed)[0].kind == kind)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_random_kills_finish_with_invariants_intact(tmp_path: Path, audit: ModuleType, seed: int) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run = run_import(state_dir, "--records", str(RECORDS), "--batch-size", str(BATCH_SIZE),
                     "--kill-random", str(KILLS), "--seed", str(seed))
    report = assert_finished(run, RECORDS, BATCH_SIZE)

    delivered, undelivered = kill_counts(report)
    assert delivered + undelivered == KILLS
    assert delivered >= 1, "a 20-batch import should take at least one random kill"
    assert report["restarts"] == delivered
    assert len(report["children"]) == delivered + 1
    # Every SIGKILLed child was killed by us. Not the converse: a timed kill whose deadline
    # falls as the child exits on its own is still reported as delivered (a known report bug).
    killed = {c["pid"] for c in report["children"] if c["exit"] == "killed by SIGKILL"}
    kill_pids = {k["pid"] for k in report["kills"]}
    assert killed <= kill_pids <= {c["pid"] for c in report["children"]}, run.describe()
    assert {k["kind"] for k in report["kills"]} <= {"timed", "store-write"}
    assert report["children"][-1]["exit"] == "exit code 0"
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_kill_during_store_write_moves_torn_line_aside(tmp_path: Path, audit: ModuleType) -> None:
    seed = _first_seed_whose_first_kill_is("store-write")
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
    assert f"{root}.{batch}".encode() in torn
    assert not torn.endswith(b"\n")
    assert not (state_dir / f"{STORE_FILE}.torn-2").exists()
    assert (state_dir / STORE_FILE).read_bytes().endswith(b"\n")
    # The batch committed in the sink before its resolve was torn: the restart found the commit.
    first, second = report["children"]
    runs = [(e.pid, e.outcome) for e in executions(state_dir, root) if e.batch == batch]
    assert runs == [(first["pid"], "committed"), (second["pid"], "found_commit")]
    assert batch_promises(audit, state_dir, root)[batch]["attempts"] == 2
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_random_kills_with_the_same_seed_draw_the_same_kinds(tmp_path: Path) -> None:
    kinds = []
    for name in ("a", "b"):
        run = run_import(tmp_path / name, "--records", "400", "--batch-size", "20",
                         "--kill-random", "3", "--seed", "8")
        report = assert_finished(run, 400, 20)
        kinds.append([k["kind"] for k in report["kills"] if k["kind"] == "store-write"])
    expected = [k.kind for k in random_kills(3, 8) if k.kind == "store-write"]
    assert kinds == [expected, expected]
