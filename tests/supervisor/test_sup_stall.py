"""A hung worker (stopped, or stuck in C code holding the GIL) stops heartbeating: the supervisor
kills it after `--stall-timeout` seconds of silence and restarts it, like an unplanned death.

Without the liveness check these runs would wait forever; every wait here has a timeout, so a
regression fails fast instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import psutil
from supervisor_helpers import (
    BATCH_SIZE,
    BATCHES,
    RECORDS,
    REPO,
    SIZES,
    Background,
    Finished,
    assert_audit_ok,
    assert_finished,
    assert_report_matches_sink,
    batch_attempts,
    pid_is_gone,
    root_id,
    start_import,
    wait_until,
    worker_of,
)

STALL_TIMEOUT_S = 1.5
FINISH_TIMEOUT_S = 30.0
# Batch 3 fails once and waits 30 s to retry: the worker is alive, mid-import, heartbeating.
WAITING_AT_BATCH_3 = (*SIZES, "--fail-at-batch", "3", "--retry-initial", "30",
                      "--stall-timeout", str(STALL_TIMEOUT_S), "--restart-backoff", "0")

# Imported by every Python process started with this directory on PYTHONPATH; only a worker (it
# has a progress fd) hangs, the first one to find the trigger file, in libc's sleep() called
# through ctypes.PyDLL, which holds the GIL: no Python thread of the worker runs again.
HANG_IN_C_HOOK = '''
import ctypes, os, threading, time

def _hang_in_c_when_triggered(trigger):
    while True:
        try:
            os.unlink(trigger)
            break
        except FileNotFoundError:
            time.sleep(0.02)
    ctypes.PyDLL(None).sleep(3600)

if "DURABLE_FAILPOINT_FD" in os.environ and os.environ.get("HANG_TRIGGER"):
    threading.Thread(target=_hang_in_c_when_triggered, args=(os.environ["HANG_TRIGGER"],),
                     daemon=True).start()
'''


def _wait_for_batch_3(audit: ModuleType, sup: Background, state_dir: Path, root: str) -> None:
    """Until batch 3 has started; fails at once if the supervisor ends first."""
    def started() -> bool:
        if sup.process.poll() is not None:
            raise AssertionError(f"the supervisor ended early: {sup.finish().describe()}")
        return batch_attempts(audit, state_dir, root, 3) >= 1

    wait_until(started, "batch 3 starts")


def _stop_in_batch_3(
    audit: ModuleType, state_dir: Path, root: str, pick: Callable[[psutil.Process], psutil.Process],
    *flags: str,
) -> tuple[Finished, psutil.Process, psutil.Process]:
    """Run the import to batch 3, SIGSTOP the process `pick` chooses given the worker, and let
    the supervisor deal with it: (its run, the worker, the stopped process)."""
    sup = start_import(state_dir, *WAITING_AT_BATCH_3, *flags)
    try:
        _wait_for_batch_3(audit, sup, state_dir, root)
        worker = worker_of(sup.process.pid)
        stopped = pick(worker)
        stopped.send_signal(signal.SIGSTOP)
        return sup.finish(FINISH_TIMEOUT_S), worker, stopped
    finally:
        sup.close()


def test_a_stopped_worker_is_killed_and_restarted_and_the_import_finishes(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run, worker, _ = _stop_in_batch_3(audit, state_dir, root, lambda worker: worker)

    report = assert_finished(run, RECORDS, BATCH_SIZE)
    [stall] = report["stalls"]
    assert stall["pid"] == worker.pid and stall["kind"] == "stall" and stall["batch"] == 3
    assert stall["silent_s"] >= STALL_TIMEOUT_S
    assert report["kills"] == []  # not one of our planned kills
    assert report["restarts"] == 1
    first, second = report["children"]
    assert first["pid"] == worker.pid and first["exit"] == "killed by SIGKILL"
    assert second["executed"] == list(range(3, BATCHES))
    assert f"worker {worker.pid} sent nothing for" in run.stderr  # the one log line
    assert pid_is_gone(worker.pid)
    assert batch_attempts(audit, state_dir, root, 3) == 2  # the stalled attempt counts
    assert_report_matches_sink(report, state_dir, root)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_a_worker_stuck_in_c_code_holding_the_gil_is_caught_the_same_way(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_IN_C_HOOK)
    trigger = tmp_path / "hang-now"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), "HANG_TRIGGER": str(trigger)}
    sup = start_import(state_dir, *WAITING_AT_BATCH_3, env=env, json_report=False)
    try:
        _wait_for_batch_3(audit, sup, state_dir, root)
        worker = worker_of(sup.process.pid)
        trigger.touch()
        run = sup.finish(FINISH_TIMEOUT_S)
    finally:
        sup.close()

    assert run.returncode == 0, run.describe()
    assert not trigger.exists()  # the worker took the trigger, and hung
    assert f"worker {worker.pid} stalled during batch 3" in run.stdout  # the text report
    assert "; 1 restart(s), 0 kill(s), 1 stall(s)," in run.stdout
    assert pid_is_gone(worker.pid)
    assert_audit_ok(audit, state_dir, root, RECORDS)


def test_a_stopped_step_process_makes_its_worker_look_hung_and_it_is_restarted(
    tmp_path: Path, audit: ModuleType
) -> None:
    """A pool process that stops cannot answer, and its driver cannot tell that from a long
    step: the step process stops beating, so the driver withholds its heartbeat and the
    supervisor restarts the whole worker, as it would a stopped driver."""
    state_dir = tmp_path / "state"
    root = root_id(RECORDS, BATCH_SIZE)
    run, worker, step_process = _stop_in_batch_3(
        audit, state_dir, root, lambda worker: worker.children()[0], "--workers", "2")

    report = assert_finished(run, RECORDS, BATCH_SIZE)
    [stall] = report["stalls"]
    assert stall["pid"] == worker.pid and stall["kind"] == "stall"
    assert report["kills"] == [] and report["restarts"] == 1
    assert "heartbeat withheld" in run.stderr and str(step_process.pid) in run.stderr
    assert pid_is_gone(worker.pid) and pid_is_gone(step_process.pid)
    verdict = audit.audit(state_dir, root, RECORDS, workers=2)
    assert verdict["ok"] and verdict["lost"] == verdict["duplicate_rows"] == 0, verdict
