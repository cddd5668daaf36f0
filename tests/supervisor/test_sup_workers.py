"""`--workers N`: its checks, its way to the worker's command line, and random kills of one pool
process (a child of the worker, SIGKILLed alone) instead of the whole worker."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import pytest
from supervisor_helpers import REPO, Finished, assert_finished, pid_is_gone, root_id, run_import
from test_sup_exec import supervisor

from supervisor.faults import pool_victim, random_kills, steps_in_reach
from supervisor.location import StoreLocation
from supervisor.report import ChildReport, KillReport, RunReport
from supervisor.supervise import Settings, worker_args
from supervisor.watch import Watch
from workflow.child import parse_args

ROOT = "wf/naps"


def test_the_workers_reach_the_worker_command_line_and_its_runner_options(tmp_path: Path) -> None:
    settings = Settings(ROOT, "forking:naps", StoreLocation.in_state_dir(tmp_path), workers=3)
    args = worker_args(settings)
    assert args[args.index("--workers") + 1] == "3"
    assert parse_args(args).workers == 3
    assert parse_args(worker_args(Settings(ROOT, "forking:naps", settings.location))).workers == 1


def test_more_workers_than_cores_is_said_once_and_the_import_runs(tmp_path: Path, audit: ModuleType) -> None:
    cores = os.cpu_count() or 1
    run = run_import(tmp_path / "state", "--records", "200", "--batch-size", "50",
                     "--workers", str(cores + 1))
    assert_finished(run, 200, 50)
    assert run.stderr.count(f"--workers {cores + 1} is more than the {cores} core(s)") == 1
    assert audit.audit(tmp_path / "state", root_id(200, 50), 200, workers=cores + 1)["ok"]


def test_without_a_pool_random_kills_draw_as_before_and_with_one_only_timed_kills_change() -> None:
    for seed in range(20):
        alone, pooled = random_kills(8, seed), random_kills(8, seed, 2)
        assert random_kills(8, seed, 1) == alone
        assert {k.kind for k in alone} <= {"timed", "store-write"}
        assert [k.kind == "store-write" for k in pooled] == [k.kind == "store-write" for k in alone]
        assert [(k.share, k.delay, k.batch_offset) for k in pooled] == [
            (k.share, k.delay, k.batch_offset) for k in alone]
    kinds = [k.kind for seed in range(50) for k in random_kills(8, seed, 2)]
    assert 0.2 < kinds.count("pool") / len(kinds) < 0.5  # about half of the timed 70 %


def test_a_kill_of_the_worker_reaches_every_step_its_pool_may_run() -> None:
    assert steps_in_reach(5, [2, 7], 1) == {5}
    assert steps_in_reach(5, [2, 7], 2) == {2, 5, 7}  # begun, unresolved: in any order
    assert steps_in_reach(5, [], 4) == {5}


def test_the_pool_victim_is_drawn_among_the_pool_whatever_its_order() -> None:
    kill = random_kills(1, 2, 2)[0]
    assert kill.kind == "pool"
    assert pool_victim(kill, []) is None
    assert pool_victim(kill, [30, 10, 20]) == pool_victim(kill, [10, 20, 30]) in {10, 20, 30}


def test_a_pool_kill_is_reported_apart_from_kills_of_the_worker(tmp_path: Path) -> None:
    report = RunReport(ROOT, ("state_dir", str(tmp_path)))
    report.kills = [KillReport(11, "pool", 4, worker=10), KillReport(10, "timed", 5)]
    assert report.as_json()["kills"] == [
        {"pid": 11, "kind": "pool", "step": 4, "worker": 10},
        {"pid": 10, "kind": "timed", "step": 5},
    ]
    text = report.as_text()
    assert "SIGKILL (pool) to pool process 11 of worker 10 during step 4" in text
    assert "SIGKILL (timed) to worker 10 during step 5" in text


def _install_pooled(directory: Path) -> None:
    (directory / "pooled.py").write_text((REPO / "tests" / "apps" / "pooled.py").read_text())


def _naps(directory: Path, seconds: list[float], *flags: str) -> Finished:
    """`supervisor exec pooled:naps` with a pool of 2 (installed in `directory` on first use)."""
    if not (directory / "pooled.py").exists():
        _install_pooled(directory)
    return supervisor(directory, "exec", "pooled:naps", "--id", ROOT, "--arg", json.dumps(seconds),
                      "--state-dir", "state", "--durability", "none", "--workers", "2", *flags, "--json")


@pytest.mark.parametrize("kills", [1, 2])
def test_a_pool_kill_sigkills_one_step_process_and_the_worker_runs_on(tmp_path: Path, kills: int) -> None:
    seed = next(s for s in range(1000) if {k.kind for k in random_kills(kills, s, 2)} == {"pool"})
    run = _naps(tmp_path, [0.2] * 8, "--retry-initial", "0.05", "--kill-random", str(kills),
                "--seed", str(seed))

    assert run.returncode == 0, run.describe()
    report = run.report
    [worker] = report["children"]  # never killed, never restarted
    assert worker["exit"] == "exit code 0" and sorted(worker["executed"]) == list(range(8))
    assert report["restarts"] == 0 and report["undelivered_kills"] == []
    assert [(k["kind"], k["worker"]) for k in report["kills"]] == [("pool", worker["pid"])] * kills
    attempts = [json.loads(line) for line in (tmp_path / "naps.log").read_text().splitlines()]
    pool = {a["pid"] for a in attempts}
    killed = {k["pid"] for k in report["kills"]}
    assert worker["pid"] not in pool | killed and len(killed) == kills
    assert all(pid_is_gone(pid) for pid in killed)
    # A kill cost the attempt of the step its process ran (none if it was idle), which the
    # worker ran again in another process; the naps it finished are the result.
    last = {}
    for a in attempts:
        last[a["id"]] = max(a["attempt"], last.get(a["id"], 0))
    again = {promise_id for promise_id, n in last.items() if n > 1}
    placed = [k for k in report["kills"] if k["step"] is not None]
    assert {f"{ROOT}.{k['step']}" for k in placed} == again, (report["kills"], last)
    assert sum(n - 1 for n in last.values()) == len(placed)
    assert not killed & set(report["result"])


def test_a_kill_at_step_waits_while_another_step_in_flight_runs_its_last_attempt(
    tmp_path: Path, audit: ModuleType
) -> None:
    # Nap 0 takes 1 s, the others 0.1 s; each step has 2 attempts. The kill at step 2 (which
    # starts once nap 1 is done) costs nap 0, in flight beside it, its first attempt. After the
    # restart nap 0 runs its last attempt when step 3 starts: the kill at step 3 waits for it.
    run = _naps(tmp_path, [1.0] + [0.1] * 5, "--max-attempts", "2", "--kill-at-step", "2",
                "--kill-at-step", "3")

    assert run.returncode == 0, run.describe()
    assert [(k["kind"], k["step"]) for k in run.report["kills"]] == [("kill-at-step", 2), ("kill-at-step", 3)]
    assert "step 3 waits to be killed until no other step in flight runs its last attempt" in run.stderr
    stored = audit.load_store(tmp_path / "state" / "store.jsonl")
    attempts = [stored[f"{ROOT}.{n}"]["attempts"] for n in range(6)]
    # Nap 0 finished on its last attempt; the kills cost steps 2 and 3 one each (and a step
    # that started as nap 0 ended, when the kill came, may have lost its first).
    assert attempts[:4] == [2, 1, 2, 2] and max(attempts) == 2, attempts
    assert all(stored[f"{ROOT}.{n}"]["state"] == "resolved" for n in range(6))


def test_units_are_numbered_by_their_place_among_the_steps_whatever_order_they_start_in() -> None:
    # Steps 0 and 3 are plan steps (no units); units 4 and 5 start before unit 2 does.
    watch = Watch(ChildReport(1, "running"))
    assert watch.unit("r.0", 0, is_unit=False) is None
    assert watch.unit("r.1", 1, is_unit=True) == 0
    assert watch.unit("r.3", 3, is_unit=False) is None
    assert [watch.unit(f"r.{n}", n, is_unit=True) for n in (5, 4, 2)] == [3, 2, 1]
    assert watch.id_of(2) == "r.4" and watch.id_of(9) is None
