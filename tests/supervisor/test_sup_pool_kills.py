"""Crash tests of imports whose worker has a pool (`--workers 2`): chosen and random kills of
the whole worker (the driver, and its pool with it) and random kills of one pool process; the
invariants of DESIGN.md are checked from the store and the sink by scripts/audit.py.

Most run the import's own steps, sink and setup hook through tests/apps/pooled.py
(`import_mapped`, eight batches in flight) under `supervisor exec`; the last runs the import
itself with `supervisor run --workers 2`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import orjson
import pytest
from supervisor_helpers import (
    assert_finished,
    batch_promises,
    executions,
    pid_is_gone,
    root_id,
    run_import,
)
from test_sup_exec import supervisor
from test_sup_workers import _install_pooled

from supervisor.faults import random_kills
from workflow.importer import synthetic_source

RECORDS = 1000
BATCH_SIZE = 50
BATCHES = RECORDS // BATCH_SIZE
WORKERS = 2
ROOT = "import/mapped"


def _import(directory: Path, *flags: str) -> dict:
    """`supervisor exec pooled:import_mapped` of RECORDS synthetic records with a pool; its report."""
    _install_pooled(directory)
    run = supervisor(directory, "exec", "pooled:import_mapped", "--id", ROOT,
                     "--arg", orjson.dumps(synthetic_source(RECORDS)).decode(), "--arg", str(BATCH_SIZE),
                     "--setup", "workflow.importer.app:setup", "--state-dir", "state",
                     "--workers", str(WORKERS), "--retry-initial", "0.05", *flags, "--json")
    assert run.returncode == 0, run.describe()
    report = run.report
    assert report["ok"] is True and report["result"]["total_records"] == RECORDS, run.describe()
    return report


def _audit_ok(audit: ModuleType, state_dir: Path, root: str = ROOT) -> dict[int, int]:
    """The audit's verdict is clean; the attempts of each batch, from the store."""
    verdict = audit.audit(state_dir, root, RECORDS, workers=WORKERS)
    assert verdict["ok"], f"audit violations: {verdict['violations']}"
    assert (verdict["lost"], verdict["duplicate_rows"], verdict["reruns_of_completed_batches"]) == (0, 0, 0)
    assert verdict["imported"] + verdict["skipped"] == RECORDS
    assert verdict["batches"] == BATCHES
    return {b: p["attempts"] for b, p in batch_promises(audit, state_dir, root).items()}


@pytest.mark.parametrize("batch", [0, BATCHES - 1])
def test_kill_at_step_with_a_pool_kills_the_driver_and_its_pool(
    tmp_path: Path, audit: ModuleType, batch: int
) -> None:
    report = _import(tmp_path, "--kill-at-step", str(batch))

    first, second = report["children"]
    assert report["kills"] == [{"pid": first["pid"], "kind": "kill-at-step", "step": batch}]
    assert first["exit"] == "killed by SIGKILL" and second["exit"] == "exit code 0"
    assert batch not in first["executed"] and batch in second["executed"]
    runs = executions(tmp_path / "state", ROOT)
    assert all(pid_is_gone(e.pid) for e in runs)  # the first worker's pool died with it
    assert {e.pid for e in runs}.isdisjoint({first["pid"], second["pid"]})  # batches ran in pools
    # Killed once its attempt was recorded, before it was sent to the pool: batch K ran once.
    assert [(e.attempt, e.outcome) for e in runs if e.batch == batch] == [(2, "committed")]
    attempts = _audit_ok(audit, tmp_path / "state")
    assert attempts[batch] == 2 and max(attempts.values()) == 2  # the others in flight lost one at most


def _early_pool_kill_seed() -> int:
    """A seed whose one kill, for a pool, is a pool kill due early (a late one may find the
    import finished)."""
    return next(s for s in range(10_000)
                if (k := random_kills(1, s, WORKERS)[0]).kind == "pool" and k.share < 0.5)


def test_a_pool_kill_costs_one_batch_attempt_and_the_worker_runs_on(
    tmp_path: Path, audit: ModuleType
) -> None:
    report = _import(tmp_path, "--kill-random", "1", "--seed", str(_early_pool_kill_seed()))

    [worker] = report["children"]
    assert worker["exit"] == "exit code 0" and report["restarts"] == 0
    [kill] = report["kills"]
    assert (kill["kind"], kill["worker"]) == ("pool", worker["pid"]) and pid_is_gone(kill["pid"])
    attempts = _audit_ok(audit, tmp_path / "state")
    # The batch the process ran took one more attempt, unless it had committed already (its
    # recover function found it) or the process was idle; no other batch did.
    extra = {b: n - 1 for b, n in attempts.items() if n > 1}
    assert extra in ({}, {kill["step"]: 1}), (kill, extra)


@pytest.mark.parametrize("seed", [2, 5, 7])
def test_random_kills_of_the_worker_and_of_pool_processes_keep_the_invariants(
    tmp_path: Path, audit: ModuleType, seed: int
) -> None:
    kinds = {k.kind for k in random_kills(6, seed, WORKERS)}
    assert "pool" in kinds and kinds & {"timed", "store-write"}  # both kinds are drawn
    report = _import(tmp_path, "--kill-random", "6", "--seed", str(seed), "--max-attempts", "3")

    kills = report["kills"]
    pool = [k for k in kills if k["kind"] == "pool"]
    of_worker = [k for k in kills if k["kind"] != "pool"]
    assert pool and of_worker, kills
    children = {c["pid"]: c for c in report["children"]}
    # Every kill of the worker restarted it. (So may a crash: a pool kill landing while a batch's
    # recover function runs in the pool ends the worker with StepProcessLost, for now.)
    assert len(children) == report["restarts"] + 1 and report["restarts"] >= len(of_worker)
    killed = {pid for pid, c in children.items() if c["exit"] == "killed by SIGKILL"}
    assert {k["pid"] for k in of_worker} == killed
    assert all(k["worker"] in children and k["pid"] not in children for k in pool)
    assert len(kills) + len(report["undelivered_kills"]) == 6
    attempts = _audit_ok(audit, tmp_path / "state")
    assert max(attempts.values()) <= 3  # no kill of ours spent a batch's last attempt


def test_run_with_workers_keeps_kill_at_batch_in_that_batch(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run = run_import(state_dir, "--records", str(RECORDS), "--batch-size", str(BATCH_SIZE),
                     "--workers", str(WORKERS), "--kill-at-batch", "7")
    report = assert_finished(run, RECORDS, BATCH_SIZE)

    first, second = report["children"]
    assert report["kills"] == [{"pid": first["pid"], "kind": "kill-at-batch", "batch": 7}]
    assert 7 not in first["executed"] and 7 in second["executed"]
    # Killed halfway through its rows in a process of the worker's pool, which announced itself
    # from there: the worker's group kill took it, its rows never committed, the restart redid them.
    killed, redone = [e for e in executions(state_dir, root) if e.batch == 7]
    assert (killed.attempt, killed.outcome, redone.attempt, redone.outcome) == (1, None, 2, "committed")
    assert killed.pid not in {first["pid"], second["pid"]} and pid_is_gone(killed.pid)
    _audit_ok(audit, state_dir, root)


def test_run_with_workers_survives_random_kills_of_the_worker_and_its_pool(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run = run_import(state_dir, "--records", str(RECORDS), "--batch-size", str(BATCH_SIZE),
                     "--workers", str(WORKERS), "--kill-random", "6", "--seed", "5",
                     "--max-attempts", "3", "--retry-initial", "0.05")
    report = assert_finished(run, RECORDS, BATCH_SIZE)

    kinds = [k["kind"] for k in report["kills"]]
    assert "pool" in kinds and len(kinds) + len(report["undelivered_kills"]) == 6, report
    executed = [b for c in report["children"] for b in c["executed"]]
    assert sorted(executed) == list(range(BATCHES))  # each batch reported done once, by number
    assert max(_audit_ok(audit, state_dir, root).values()) <= 3
