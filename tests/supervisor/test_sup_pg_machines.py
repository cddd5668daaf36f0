"""Three machines share one import in PostgreSQL, and are SIGKILLed: whole, their supervisor
alone, one executor, or the driver (the worker holding the workflow's lease). Each dead machine
is started again with the same command. Every participant must end 0, and the database alone
(scripts/audit.py --store) must show every record imported or skipped once, every batch
committed once in one transaction with its resolve, and the input's totals.

The machines are scripts/machines.py's: process trees in sessions of their own, each with its
own directory and state dir, sharing nothing but the database's URL; as root, each also has its
own pid namespace, so the store cannot see that another machine's processes died and waits for
their leases and claims to expire, as across real machines ("own-pid-namespaces"). On one
kernel ("one-kernel") it sees that at once and takes over without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from supervisor_helpers import wait_until

from store.pg import DEFAULT_LEASE_S as LEASE_S

RECORDS = 3000
BATCH_SIZE = 20
BATCHES = RECORDS // BATCH_SIZE
RUN_TIMEOUT_S = 90.0  # a hang fails the run after this; a healthy one takes 15-30 s


def _isolation(machines: ModuleType, isolated: bool) -> bool:
    if isolated and not machines.isolation_available():
        pytest.skip("a pid namespace per machine needs `unshare --pid` (root)")
    return isolated


def _assert_audit_ok(audit: ModuleType, url: str, root: str, executors: int) -> dict[str, Any]:
    verdict = audit.audit_pg(url, root, RECORDS, workers=executors)
    assert verdict["ok"], verdict["violations"]
    assert verdict["promises_checked"]
    assert (verdict["lost"], verdict["duplicate_rows"], verdict["reruns_of_completed_batches"]) == (0, 0, 0)
    assert verdict["imported"] + verdict["skipped"] == RECORDS
    assert verdict["batches"] == BATCHES
    return verdict


# Seeds whose five kills, together, take every kind: seed 8 kills the machine that ran `run`,
# then the driver twice and a supervisor; 5 a supervisor (of `run`'s machine too), an executor
# and whole machines; 10 executors, a whole machine twice and the driver.
@pytest.mark.parametrize(("seed", "isolated"), [(8, True), (5, True), (10, False)],
                         ids=["seed8-own-pid-namespaces", "seed5-own-pid-namespaces", "seed10-one-kernel"])
def test_three_machines_under_random_kills_import_every_record_once(
    pg_url: str, tmp_path: Path, audit: ModuleType, machines: ModuleType, seed: int, isolated: bool
) -> None:
    run = machines.ChaosRun(pg_url, tmp_path, RECORDS, BATCH_SIZE, seed, machines=3, kills=5,
                            isolated=_isolation(machines, isolated), timeout=RUN_TIMEOUT_S)
    result = run.run()

    assert result["ok"], result["problems"]
    delivered = sum(result["kills"].values())
    assert delivered >= 3, result  # kills land while the import runs, not after it
    assert delivered + len(result["undelivered"]) == 5
    for machine in result["machines"]:
        *killed, last = machine["starts"]
        assert last["exit"] == 0 and last["ok"] is True, machine
        assert all(start["killed"] for start in killed), machine  # only our kills ended a start
    _assert_audit_ok(audit, pg_url, result["id"], sum(run.workers()))


@pytest.mark.parametrize("isolated", [True, False], ids=["own-pid-namespaces", "one-kernel"])
def test_another_machine_takes_over_when_the_drivers_machine_dies(
    pg_url: str, tmp_path: Path, audit: ModuleType, machines: ModuleType, isolated: bool
) -> None:
    isolated = _isolation(machines, isolated)
    root = machines.synthetic_root(RECORDS)
    env = machines.machine_env(machines.slow_batches(BATCHES, 0.1))
    commands = [machines.run_command(pg_url, tmp_path / "m0" / "state", RECORDS, BATCH_SIZE, 1)]
    commands += [machines.join_command(pg_url, tmp_path / f"m{n}" / "state", root, 1) for n in (1, 2)]
    fleet = [machines.Machine(f"m{n}", c, tmp_path / f"m{n}", env, isolated) for n, c in enumerate(commands)]
    db = machines.Database(pg_url)
    try:
        with machines.machines_cleaned_up(fleet):
            fleet[0].start()
            wait_until(lambda: db.started(root), "the import is started")
            for m in fleet[1:]:
                m.start()
            wait_until(lambda: db.committed(root) >= BATCHES // 5, "a fifth of the batches are committed")
            found = machines.driver(db, root, fleet)
            assert found is not None, db.lease(root)
            dead, _ = found
            _, epoch = db.lease(root)
            dead_pids = {machines.identity(p.pid) for p in dead.processes()}
            killed_at = time.time()
            dead.kill()

            _wait_for_another_driver(db, root, epoch)
            took_over_s = time.time() - killed_at
            new_driver = machines.driver(db, root, fleet)
            assert new_driver is not None and new_driver[0] is not dead
            if isolated:  # its processes cannot be seen dead from here: the lease had to expire
                assert took_over_s <= LEASE_S + 1.5, took_over_s
            else:  # the dead holder's pid is seen dead: taken at once
                assert took_over_s < LEASE_S / 2, took_over_s

            # The new driver goes on: batches it creates are run and resolved by the living.
            wait_until(lambda: _claimers_of_new_batches(pg_url, killed_at), "a new batch resolves",
                       timeout=30)
            resolved_by = {machines.named_by(owner) for owner in _claimers_of_new_batches(pg_url, killed_at)}
            assert not resolved_by & dead_pids
            dead.start()  # as an operator would: it joins again, standing by (its ids may be reused now)
            for m in fleet:
                assert m.wait(RUN_TIMEOUT_S) == 0, m.describe()
            assert not [p for m in fleet for p in m.leftovers()]
    finally:
        db.close()

    assert all(life.report()["ok"] for m in fleet for life in m.lives if life.killed is None)
    _assert_audit_ok(audit, pg_url, root, executors=3)


def _wait_for_another_driver(db: Any, root: str, epoch: int) -> None:
    """Until a driver other than the one of lease `epoch` holds the workflow's lease."""
    wait_until(lambda: (db.lease(root) or ("", epoch))[1] > epoch, "another driver holds the lease",
               timeout=LEASE_S + 5)


def _claimers_of_new_batches(url: str, t: float) -> list[str]:
    """The claimers of the batches resolved whose promises were created after `t` (only the
    driver holding the lease creates them)."""
    with psycopg.connect(url, autocommit=True) as db:
        rows = db.execute(
            "SELECT t.claimed_by FROM promise_states p JOIN tasks t ON t.promise_id = p.id "
            "WHERE p.created_at > %s AND p.param->>'fn' = 'process_batch' AND p.state = 'resolved'",
            (t,)).fetchall()
    return [owner for (owner,) in rows]


def _two_machines(machines: ModuleType, url: str, tmp_path: Path) -> list[Any]:
    """One machine that runs the import (slowed to last ~5 s) and one that joins it."""
    root = machines.synthetic_root(RECORDS)
    env = machines.machine_env(machines.slow_batches(BATCHES, 0.06))
    commands = [machines.run_command(url, tmp_path / "m0" / "state", RECORDS, BATCH_SIZE, 1),
                machines.join_command(url, tmp_path / "m1" / "state", root, 1)]
    return [machines.Machine(f"m{n}", c, tmp_path / f"m{n}", env, False) for n, c in enumerate(commands)]


def _two_machines_through(
    fault: Callable[[Any, str, list[Any]], None], pg_url: str, tmp_path: Path, audit: ModuleType,
    machines: ModuleType,
) -> None:
    """Run the import on two machines, do `fault(db, root, fleet)` once a fifth of its batches
    are committed, and check that both machines then finish by themselves, the import intact."""
    root = machines.synthetic_root(RECORDS)
    fleet = _two_machines(machines, pg_url, tmp_path)
    db = machines.Database(pg_url)
    try:
        with machines.machines_cleaned_up(fleet):
            fleet[0].start()
            wait_until(lambda: db.started(root), "the import is started")
            fleet[1].start()
            wait_until(lambda: db.committed(root) >= BATCHES // 5, "a fifth of the batches are committed")
            fault(db, root, fleet)
            ends = {m.name: (m.wait(RUN_TIMEOUT_S), m.life.err.read_text()[-600:]) for m in fleet}
    finally:
        db.close()
    assert all(code == 0 for code, _ in ends.values()), ends
    _assert_audit_ok(audit, pg_url, root, executors=2)


def test_a_driver_paused_past_its_lease_stands_by_again_when_it_resumes(
    pg_url: str, tmp_path: Path, audit: ModuleType, machines: ModuleType
) -> None:
    def pause_the_driver(db: Any, root: str, fleet: list[Any]) -> None:
        _, paused = machines.driver(db, root, fleet)
        _, epoch = db.lease(root)
        paused.suspend()  # a long GC pause, a VM stall, a network partition: it lives on
        try:
            _wait_for_another_driver(db, root, epoch)
        finally:
            paused.resume()

    _two_machines_through(pause_the_driver, pg_url, tmp_path, audit, machines)


def test_every_participant_carries_on_when_the_server_drops_every_connection(
    pg_url: str, tmp_path: Path, audit: ModuleType, machines: ModuleType
) -> None:
    def drop_every_connection(_db: Any, _root: str, _fleet: list[Any]) -> None:
        with psycopg.connect(pg_url, autocommit=True) as admin:  # as a restart or failover would
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")

    _two_machines_through(drop_every_connection, pg_url, tmp_path, audit, machines)
