"""The many-machine rows of bench.py: an import on PostgreSQL run by several "machines".

A machine here is `python -m supervisor run|join --store URL` in a pid namespace of its own
(`unshare --pid --fork`, root only): its processes cannot see each other's, so nothing tells a
machine that another one died but the expiry of its lease and its claims, as between real
machines. Killing a machine is SIGKILL to the namespace's first process, which takes every
process of the namespace with it (the kernel's rule for a pid namespace).

- `takeover_s`: SIGKILL of the machine that holds the import's lease (the one that started it)
  to the first batch resolved that the new driver (another machine) enqueued: the lease's
  expiry, the standby's take-over, its replay, and one batch.
- `fleet_speedup`: one import of N records with 3 executor processes against 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from store import open_store

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.02
TIMEOUT_S = 300.0


def machine(url: str, command: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    """A supervisor in a pid namespace of its own (a machine), started in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "supervisor", *command,
         "--store", url, "--state-dir", str(workdir / "state"), "--json"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def _wait_for(what: str, check: Any, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(POLL_S)
    raise TimeoutError(f"no {what} within {timeout:g} s")


def takeover_s(url: str, base: Path, records: int = 200_000) -> float:
    """Seconds from the SIGKILL of the lease holder's machine to the first batch resolved that
    another machine's driver enqueued."""
    root = f"import/synthetic-{records}"
    lease = "SELECT epoch, owner FROM leases WHERE root = %s"
    open_store(url).close()  # the tables, so that they can be watched from the start
    machines = [machine(url, ["run", "--records", str(records)], base / "a")]
    try:
        with psycopg.connect(url, autocommit=True) as db:
            _wait_for("lease", lambda: db.execute(lease, (root,)).fetchone())
            machines.append(machine(url, ["join", "--id", root], base / "b"))
            _wait_for("batches", lambda: (_one(db, "SELECT count(*) FROM settles") or 0) >= 50)
            epoch, owner = db.execute(lease, (root,)).fetchone()
            holder = next(m for m in machines if f"({_namespace(m)})" in owner.replace(_boot(), ""))
            killed_at = time.time()
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
            last_task = _one(db, "SELECT max(seq) FROM tasks")  # the dead driver enqueued no more
            _wait_for("new driver", lambda: db.execute(lease, (root,)).fetchone()[0] > epoch)
            resolved_at = _wait_for("batch of the new driver", lambda: _one(
                db, "SELECT min(s.settled_at) FROM settles s JOIN tasks t ON t.promise_id = s.id "
                "WHERE t.seq > %s", last_task))
        return resolved_at - killed_at
    finally:
        for proc in machines:
            _stop(proc)


def _namespace(proc: subprocess.Popen[bytes]) -> str:
    """`:INODE` of the pid namespace of a machine (its `unshare`'s child), as owners name it."""
    child = psutil.Process(proc.pid).children()[0]
    return ":" + os.readlink(f"/proc/{child.pid}/ns/pid").split("[")[1].rstrip("]")


def _boot() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()[:8]


def fleet_speedup(url_of: Any, base: Path, records: int, batch_size: int) -> dict[str, Any]:
    """Wall time of one machine importing `records` with 1, then 3, executor processes, each on
    a fresh database (`url_of()` gives one, as a context manager)."""
    times = {}
    for workers in (1, 3):
        with url_of() as url:
            started = time.monotonic()
            proc = machine(url, ["run", "--records", str(records), "--batch-size", str(batch_size),
                                 "--workers", str(workers)], base / f"w{workers}")
            out, _ = proc.communicate(timeout=TIMEOUT_S * 4)
            if proc.returncode != 0:
                raise RuntimeError(f"the import with {workers} executor(s) failed: {out[-2000:]!r}")
            times[workers] = time.monotonic() - started
    return {"executors_1_s": times[1], "executors_3_s": times[3], "speedup": times[1] / times[3]}


def _one(db: psycopg.Connection, sql: str, *params: Any) -> Any:
    row = db.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
