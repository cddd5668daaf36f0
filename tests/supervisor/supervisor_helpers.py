"""Run the real `python -m supervisor` CLI as a subprocess and read what it left on disk.

Every helper works on one state dir under the test's own tmp_path; nothing is shared, so the
tests run in parallel under `pytest -n auto`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import psutil

from workflow.importer.sink import open_read_only

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 60.0
STORE_FILE = "store.jsonl"
SINK_FILE = "import.db"

# The small import most crash tests run: 10 batches of 50 records.
RECORDS = 500
BATCH_SIZE = 50
BATCHES = RECORDS // BATCH_SIZE
SIZES = ("--records", str(RECORDS), "--batch-size", str(BATCH_SIZE))


@dataclass
class Finished:
    """One finished CLI invocation: exit code, parsed JSON report (if any), raw output."""

    returncode: int
    report: dict[str, Any] | None
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr[-4000:]}"

    @property
    def last_error_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def root_id(records: int, batch_size: int) -> str:
    """The default workflow id of a synthetic import (derived from the input: its record count)."""
    return f"import/synthetic-{records}"


def batch_count(records: int, batch_size: int) -> int:
    return math.ceil(records / batch_size)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: the repository importable, no inherited failpoints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


CRASH_HOOK = """
import os
flag = os.environ.get("CRASH_WORKER_WHILE")
if "DURABLE_FAILPOINT_FD" in os.environ and flag and os.path.exists(flag):  # only in a worker
    raise SystemExit("worker crashed at start-up (a planned crash of the test)")
"""


def crashing_workers(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An env under which every worker the supervisor spawns crashes at start-up (exit 1) for as
    long as the returned flag file exists; delete it and workers run normally again."""
    hook = tmp_path / "crash-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    flag = tmp_path / "crash-while-this-exists"
    flag.touch()
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), "CRASH_WORKER_WHILE": str(flag)}
    return env, flag


def command(subcommand: str, state_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor", subcommand, "--state-dir", str(state_dir), *args]


def run_cli(
    subcommand: str,
    state_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = RUN_TIMEOUT_S,
) -> Finished:
    """Run `python -m supervisor <subcommand> --state-dir D ARGS` to its end."""
    proc = subprocess.run(
        command(subcommand, state_dir, *args),
        capture_output=True, text=True, env=child_env(env), cwd=state_dir.parent, timeout=timeout,
        check=False,
    )
    return Finished(proc.returncode, parse_report(proc.stdout), proc.stdout, proc.stderr)


def run_import(state_dir: Path, *args: str, env: dict[str, str] | None = None) -> Finished:
    """`python -m supervisor run --state-dir D ARGS --json`."""
    return run_cli("run", state_dir, *args, "--json", env=env)


def parse_report(stdout: str) -> dict[str, Any] | None:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if len(lines) != 1:
        return None
    try:
        report = json.loads(lines[0])
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) else None


@dataclass
class Background:
    """A supervisor running in the background; its output goes to files in tmp_path."""

    process: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    _files: tuple[TextIO, TextIO]

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> Finished:
        try:
            self.process.wait(timeout)
        finally:
            self.close()
        stdout, stderr = self.out_path.read_text(), self.err_path.read_text()
        return Finished(self.process.returncode, parse_report(stdout), stdout, stderr)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for f in self._files:
            f.close()


def start_import(
    state_dir: Path, *args: str, env: dict[str, str] | None = None, name: str = "supervisor",
    json_report: bool = True,
) -> Background:
    """Start `python -m supervisor run --state-dir D ARGS [--json]` without waiting for it."""
    out_path = state_dir.parent / f"{name}.stdout"
    err_path = state_dir.parent / f"{name}.stderr"
    out, err = out_path.open("w"), err_path.open("w")
    process = subprocess.Popen(
        command("run", state_dir, *args, *(["--json"] if json_report else [])),
        stdout=out, stderr=err, env=child_env(env), cwd=state_dir.parent,
    )
    return Background(process, out_path, err_path, (out, err))


def sigterm_while_batch_lingers(
    audit: ModuleType, state_dir: Path, batch: int, seconds: float, *args: str
) -> Finished:
    """Run an import whose worker lingers `seconds` halfway through `batch`, SIGTERM the
    supervisor once that batch has started, and wait for the end."""
    root = root_id(*(int(args[i + 1]) for i in (args.index("--records"), args.index("--batch-size"))))
    linger = {"DURABLE_FAILPOINTS": json.dumps(
        [{"name": "batch.mid", "key": str(batch), "action": "delay", "seconds": seconds}])}
    sup = start_import(state_dir, *args, env=linger)
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, root, batch) >= 1, f"batch {batch} starts")
        sup.process.send_signal(signal.SIGTERM)
        return sup.finish()
    finally:
        sup.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


# -- the store and the sink, read directly ---------------------------------------------------


def store_promises(audit: ModuleType, state_dir: Path) -> dict[str, dict[str, Any]]:
    """{promise id: {state, attempts, settled_at, value}} folded from the store file by audit.py."""
    path = state_dir / STORE_FILE
    return audit.load_store(path) if path.exists() else {}


def batch_promises(audit: ModuleType, state_dir: Path, root: str) -> dict[int, dict[str, Any]]:
    """{batch number: its promise (with its `id`)}: the import's process_batch steps."""
    return audit.batch_promises(store_promises(audit, state_dir), root)


def batch_attempts(audit: ModuleType, state_dir: Path, root: str, batch: int) -> int:
    return batch_promises(audit, state_dir, root).get(batch, {}).get("attempts", 0)


def resolved_batches(audit: ModuleType, state_dir: Path, root: str) -> set[int]:
    return {b for b, p in batch_promises(audit, state_dir, root).items() if p["state"] == "resolved"}


@dataclass(frozen=True)
class Execution:
    batch: int
    attempt: int
    pid: int
    outcome: str | None  # "committed", "found_commit", or None (cut short)


def executions(state_dir: Path, root: str) -> list[Execution]:
    """The sink's `executions` rows of this import, in the order they started."""
    db = open_read_only(state_dir / SINK_FILE)
    try:
        rows = db.execute(
            "SELECT batch, attempt, pid, outcome FROM executions WHERE promise_id LIKE ? "
            "ORDER BY started_at, id", (root + ".%",),
        ).fetchall()
    finally:
        db.close()
    return [Execution(*row) for row in rows]


def finished_batches_by_pid(state_dir: Path, root: str) -> dict[int, set[int]]:
    """Batches each worker pid carried to the end (committed, or found committed) in the sink."""
    done: dict[int, set[int]] = {}
    for e in executions(state_dir, root):
        if e.outcome is not None:
            done.setdefault(e.pid, set()).add(e.batch)
    return done


def snapshot(state_dir: Path) -> dict[str, bytes]:
    """The bytes of every file in the state dir (to prove that a command changed nothing)."""
    return {p.name: p.read_bytes() for p in sorted(state_dir.iterdir()) if p.is_file()}


# -- processes -------------------------------------------------------------------------------


def worker_of(supervisor_pid: int) -> psutil.Process:
    """The supervisor's worker child (`python -m workflow run ...`)."""
    for child in psutil.Process(supervisor_pid).children():
        try:
            if child.cmdline()[1:4] == ["-m", "workflow", "run"]:
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"supervisor {supervisor_pid} has no worker child")


def is_gone(process: psutil.Process) -> bool:
    """Dead: no longer running, or a zombie nobody has reaped yet (it runs no code)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pid_is_gone(pid: int) -> bool:
    try:
        return is_gone(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


# -- checks ----------------------------------------------------------------------------------


def assert_audit_ok(audit: ModuleType, state_dir: Path, root: str, records: int) -> dict[str, Any]:
    """The invariants of DESIGN.md, checked by scripts/audit.py from the store and the sink."""
    verdict = audit.audit(state_dir, root, records)
    assert verdict["ok"], f"audit violations: {verdict['violations']}"
    assert verdict["lost"] == 0
    assert verdict["duplicate_rows"] == 0
    assert verdict["reruns_of_completed_batches"] == 0
    assert verdict["imported"] + verdict["skipped"] == records
    return verdict


def assert_finished(run: Finished, records: int, batch_size: int) -> dict[str, Any]:
    """Exit 0 and a report whose totals cover the whole input."""
    assert run.returncode == 0, run.describe()
    report = run.report
    assert report is not None, run.describe()
    assert report["ok"] is True
    assert report["error"] is None
    assert report["id"] == root_id(records, batch_size)
    assert report["total_records"] == records
    assert report["total_processed"] + report["total_skipped"] == records
    assert report["batch_count"] == batch_count(records, batch_size)
    return report


def assert_report_matches_sink(
    report: dict[str, Any], state_dir: Path, root: str, earlier_pids: frozenset[int] = frozenset()
) -> None:
    """Each child's `executed` batches are what the sink says that pid finished, and no worker
    but this run's children (and `earlier_pids`, of earlier runs) finished a batch.

    A child killed between its sink commit and its promise's resolve finished one batch in the
    sink that it never reported (the next child finds the commit), hence the allowance of one.
    """
    finished = finished_batches_by_pid(state_dir, root)
    child_pids = {c["pid"] for c in report["children"]} | earlier_pids
    assert set(finished) <= child_pids, f"unknown workers in the sink: {set(finished) - child_pids}"
    for child in report["children"]:
        in_sink = finished.get(child["pid"], set())
        executed = set(child["executed"])
        assert len(executed) == len(child["executed"]), f"a batch reported twice: {child}"
        assert executed <= in_sink, f"worker {child['pid']} reports {executed - in_sink} not in the sink"
        unreported = in_sink - executed
        assert len(unreported) <= 1, f"worker {child['pid']} finished {unreported} unreported"
        if unreported:
            assert child["exit"] == "killed by SIGKILL", child


def kill_counts(report: dict[str, Any]) -> tuple[int, int]:
    """(kills delivered, kills not delivered because the import finished first)."""
    return len(report["kills"]), len(report["undelivered_kills"])
