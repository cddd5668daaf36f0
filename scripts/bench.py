#!/usr/bin/env python3
"""Benchmarks of the engine, measured side by side in one run: prints a table, writes bench.json.

    python scripts/bench.py --quick        # < 60 s
    python scripts/bench.py                # the full run, about three minutes here
    python scripts/bench.py --only pg      # the PostgreSQL rows alone (the server: --pg URL)
    pip install -e '.[bench]' && python scripts/bench.py   # adds the DBOS peer

Every figure is measured on this machine in this run, next to the physical floor (one line
appended and fdatasync'ed on the same disk; for the PostgreSQL rows, one bare INSERT committed
on the same server), so ratios stay meaningful on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import orjson  # noqa: E402
import psycopg  # noqa: E402

from store import Durability, JsonlStore, failpoints  # noqa: E402
from workflow import Runner, WorkflowInterrupted, register  # noqa: E402
from workflow.importer import Sink, import_records, plan_batches, synthetic_source  # noqa: E402
from workflow.importer.sources import read_batch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dbos  # noqa: E402  (beside this file)
import bench_fleet  # noqa: E402
import bench_parallel  # noqa: E402
import bench_pg  # noqa: E402

TARGETS = {
    "durable_step_over_floor": ("<=", 1.3),
    "cpu_per_step_us": ("<=", 30.0),
    "replay_us_per_step": ("<=", 5.0),
    "resume_100k_s": ("<=", 1.5),
    "growth_spread": ("<=", 0.2),
    "restart_latency_s": ("<=", 0.3),
    "restart_latency_csv_100mb_s": ("<=", 0.5),
    "import_durable_over_plain": (">=", 0.9),
    "rss_1m_over_100k": ("<=", 1.1),
    "dbos_over_ours": (">=", 8.0),
    "group_commit_speedup": (">=", 5.0),
    "import_speedup_workers2": (">=", 1.5),
    "batch_syncs": ("<=", 1.1),
    "pg_step_over_floor": ("<=", 1.5),
    "dbos_pg_over_ours": (">=", 4.0),
    "pg_takeover_s": ("<=", 6.0),
    "pg_import_speedup_3_executors": (">=", 1.0),  # reported; on 2 cores ~1.5-2 is expected
}


@register(name="bench.noop")
def noop(i: int) -> int:
    return i


@register(name="bench.steps")
def steps(ctx: Any, n: int) -> Any:
    for i in range(n):
        yield ctx.run(noop, i)
    return n


@contextmanager
def scratch(base: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# -- 1. the floor -------------------------------------------------------------------------------


def floor_us(base: Path, n: int) -> float:
    line = b"x" * 199 + b"\n"
    with scratch(base) as d:
        fd = os.open(d / "floor", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            start = time.perf_counter()
            for _ in range(n):
                os.write(fd, line)
                os.fdatasync(fd)
            return (time.perf_counter() - start) / n * 1e6
        finally:
            os.close(fd)


# -- 2, 3, 5. steps -----------------------------------------------------------------------------


def run_steps(base: Path, n: int, durability: Durability) -> tuple[float, float]:
    """Wall and CPU µs per step of a workflow of n trivial durable steps."""
    with scratch(base) as d, JsonlStore(d / "s.jsonl", exclusive=True, durability=durability) as st:
        wall, cpu = timed(lambda: Runner(st).run("bench", steps, n))
    return wall / n * 1e6, cpu / n * 1e6


# -- 4. replay ----------------------------------------------------------------------------------


def replay(base: Path, n: int) -> dict[str, float]:
    """Resume a workflow whose n steps are all completed: store open time and replay speed."""
    with scratch(base) as d:
        path = d / "s.jsonl"
        done = iter(range(n + 1))
        # Complete n steps, then stop before step n+1: the root stays pending.
        with JsonlStore(path, exclusive=True, durability="none") as st, suppress(WorkflowInterrupted):
            Runner(st, should_stop=lambda: next(done) >= n).run("bench", steps, n + 1)
        start = time.perf_counter()
        with JsonlStore(path, exclusive=True, durability=Durability.NONE) as st:
            opened = time.perf_counter()
            with suppress(WorkflowInterrupted):
                Runner(st, should_stop=lambda: True).run("bench", steps, n + 1)
            end = time.perf_counter()
    return {"open_s": opened - start, "replay_s": end - opened, "resume_s": end - start,
            "replay_us_per_step": (end - opened) / n * 1e6}


# -- 6. restart latency -------------------------------------------------------------------------


def restart_latency(base: Path, reps: int) -> float:
    """Median seconds from the supervisor's SIGKILL to the next worker's first new batch starting."""
    from supervisor.child import Child
    from supervisor.import_command import function_name
    from supervisor.location import StoreLocation
    from supervisor.supervise import Settings, worker_args
    from workflow.importer import setup as import_setup

    samples = []
    for _ in range(reps):
        with scratch(base) as d:
            args = worker_args(Settings(
                root_id="import/bench", target=function_name(import_records),
                location=StoreLocation.in_state_dir(d),
                args=[orjson.dumps(synthetic_source(2000)).decode(), "100"],
                setup=function_name(import_setup),
            ))
            pause = [failpoints.entry(failpoints.BATCH_MID, failpoints.batch_mid_key(5), "pause")]
            first = Child.spawn(args, failpoints.environment(pause))
            _wait_event(first, lambda e: e.get("event") == failpoints.ANNOUNCED)
            killed_at = time.perf_counter()
            first.signal_group(signal.SIGKILL)
            first.reap()
            second = Child.spawn(args, {})
            _wait_event(second, lambda e: e.get("kind") == "started" and e.get("fn") == "process_batch")
            samples.append(time.perf_counter() - killed_at)
            second.signal_group(signal.SIGKILL)
            second.reap()
    return statistics.median(samples)


def _wait_event(child: Any, match: Callable[[dict[str, Any]], bool]) -> None:
    while True:
        lines, eof = child.read(child.progress_fd)
        if any(match(e) for e in child.events(lines)):
            return
        if eof:
            raise RuntimeError(f"worker {child.pid} ended before the expected event")


# -- 6b. restart latency of a file's import --------------------------------------------------------

CSV_BATCH_SIZE = 1000
CSV_KILL_AT = 0.6  # the kill lands in the batch 60% of the way through the file


def write_people_csv(path: Path, rows: int) -> None:
    """id,name,email rows of about 50 bytes: 2,000,000 of them make a file of about 100 MB."""
    with path.open("w") as f:
        f.write("id,name,email\n")
        for start in range(0, rows, 100_000):
            f.write("".join(f"{i},Person {i},person.{i}@example.com\n"
                            for i in range(start, min(rows, start + 100_000))))


def csv_import(base: Path, rows: int) -> dict[str, Any]:
    """A supervised import of a CSV file (`python -m supervisor run --input`), run twice: without
    a kill, and with one SIGKILL while a batch 60% of the way through the file is in flight.

    Measured from real events, not from the code's word: the first worker's death through a
    pidfd (the supervisor's SIGKILL ends it at once), and each batch's start as the worker
    wrote it in the sink's `executions` table. The restart latency runs from the death of the
    killed worker to the first batch the next worker starts.
    """
    with scratch(base) as d:
        csv_path = d / "people.csv"
        write_people_csv(csv_path, rows)
        batches = -(-rows // CSV_BATCH_SIZE)
        out: dict[str, Any] = {"rows": rows, "mb": csv_path.stat().st_size / 1e6, "batches": batches}
        plain = _supervised_csv_import(csv_path, d / "plain", None)
        killed = _supervised_csv_import(csv_path, d / "killed", int(batches * CSV_KILL_AT))
    out.update(import_s=plain["seconds"], import_one_kill_s=killed["seconds"],
               first_batch_s=plain["first_batch_s"], restart_s=killed["restart_s"])
    return out


def _supervised_csv_import(csv_path: Path, state_dir: Path, kill_at: int | None) -> dict[str, float]:
    import psutil

    argv = [sys.executable, "-m", "supervisor", "run", "--input", str(csv_path),
            "--batch-size", str(CSV_BATCH_SIZE), "--state-dir", str(state_dir), "--json"]
    if kill_at is not None:
        argv += ["--kill-at-batch", str(kill_at)]
    started = time.time()
    sup = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    killed_pid, killed_at = None, None
    if kill_at is not None:
        killed_pid = _first_worker(psutil.Process(sup.pid))
        pidfd = os.pidfd_open(killed_pid)
        try:
            select.select([pidfd], [], [])  # readable once the worker is dead
            killed_at = time.time()
        finally:
            os.close(pidfd)
    report = json.loads(sup.communicate()[0])
    seconds = time.time() - started
    if not report["ok"] or len(report["kills"]) != (kill_at is not None):
        raise RuntimeError(f"the CSV import did not go as planned: {report}")
    db = sqlite3.connect(state_dir / "import.db")
    try:
        runs = db.execute("SELECT pid, started_at FROM executions ORDER BY id").fetchall()
    finally:
        db.close()
    figures = {"seconds": seconds, "first_batch_s": runs[0][1] - started}
    if killed_at is not None:
        figures["restart_s"] = min(t for pid, t in runs if pid != killed_pid) - killed_at
    return figures


def _first_worker(supervisor: Any) -> int:
    """The pid of the supervisor's first worker, as soon as it is spawned."""
    while True:
        for child in supervisor.children():
            with suppress(Exception):  # it may be gone, or not yet exec'ed
                if child.cmdline()[1:4] == ["-m", "workflow", "run"]:
                    return child.pid
        time.sleep(0.005)


# -- 7. the import, durable versus a plain loop -------------------------------------------------


def import_in_child(base: Path, records: int, mode: str) -> dict[str, Any]:
    """Run one import in a fresh process, so its peak RSS is its own."""
    out = subprocess.run(
        [sys.executable, __file__, "--child-import", mode, "--records", str(records), "--dir", str(base)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


def child_import(base: Path, records: int, mode: str) -> dict[str, Any]:
    source, batch_size = synthetic_source(records), 1000
    with scratch(base) as d:
        start = time.perf_counter()
        if mode == "durable":
            sink = Sink(d / "import.db")
            with JsonlStore(d / "store.jsonl", exclusive=True) as st:
                result = Runner(st, dependencies={"sink": sink}).run(
                    "import/bench", import_records, source, batch_size)
            sink.close()
            imported = result["total_processed"]
        else:
            imported = plain_import(d / "plain.db", source, batch_size)
        seconds = time.perf_counter() - start
        store_bytes = (d / "store.jsonl").stat().st_size if mode == "durable" else 0
    batches = len(plan_batches(source, batch_size))
    return {"seconds": seconds, "records_per_s": records / seconds, "imported": imported,
            "max_rss_mb": peak_rss_mb(),
            "store_bytes_per_batch": store_bytes / batches}


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over an exec from the
    parent, which here is the benchmark itself."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def plain_import(db_path: Path, source: dict[str, Any], batch_size: int) -> int:
    """The same reads, validation and inserts, with no engine: one transaction per batch."""
    from workflow.importer.batch_rows import record_row, skipped_row
    from workflow.importer.sink import CHECKPOINT_PAGES, INSERT_RECORD, INSERT_SKIPPED, SCHEMA

    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")  # as the sink: a fair comparison
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    imported = 0
    for i, batch in enumerate(plan_batches(source, batch_size)):
        rows = list(read_batch(batch))
        good = [r for r in rows if r.problem is None]
        db.execute("BEGIN")
        db.executemany(INSERT_RECORD, [record_row("plain", i, r) for r in good])
        db.executemany(INSERT_SKIPPED, [skipped_row("plain", i, r, r.problem)
                                        for r in rows if r.problem is not None])
        db.execute("COMMIT")
        imported += len(good)
    db.close()
    return imported


# -- 8. the DBOS peer ---------------------------------------------------------------------------


def dbos_in_child(base: Path, n: int) -> float | None:
    """µs per step of the same workflow on DBOS with a SQLite system database; None without DBOS."""
    if not bench_dbos.installed():
        return None
    with scratch(base) as d:
        return bench_dbos.us_per_step(f"sqlite:///{d / 'dbos.sqlite'}", n)


# -- 9. syncs per batch --------------------------------------------------------------------------


SYNC_CALLS = "fsync,fdatasync,sync_file_range"
_SYNC_LINE = re.compile(rb"^\d+ +(?:fsync|fdatasync|sync_file_range)\(\d+<([^>]*)>", re.MULTILINE)


def batch_syncs(base: Path, batches: int) -> dict[str, Any]:
    """fsync/fdatasync calls per committed batch of the default import (`python -m supervisor
    run`, default batch size), counted by strace in every process, and split by the file synced:
    the sink (import.db*), the store (store.jsonl*), the rest (directories). Without a working
    strace: {"batch_syncs_skipped": why}."""
    from supervisor.cli import DEFAULT_BATCH_SIZE
    from workflow.importer.sink import open_read_only

    strace = shutil.which("strace")
    if strace is None:
        return {"batch_syncs_skipped": "strace is not installed"}
    with scratch(base) as d:
        trace, state = d / "syncs.trace", d / "state"
        run = subprocess.run(
            [strace, "-f", "-qq", "-y", "--seccomp-bpf", "-e", f"trace={SYNC_CALLS}", "-o", str(trace),
             sys.executable, "-m", "supervisor", "run", "--records", str(batches * DEFAULT_BATCH_SIZE),
             "--state-dir", str(state), "--json"],
            capture_output=True, text=True, cwd=REPO,
        )
        if run.returncode != 0:
            return {"batch_syncs_skipped": f"the import under strace failed: {run.stderr.strip()[-200:]}"}
        db = open_read_only(state / "import.db")
        (committed,) = db.execute("SELECT COUNT(*) FROM batch_commits").fetchone()
        db.close()
        by_file = {"sink": 0, "store": 0, "other": 0}
        for path in _SYNC_LINE.findall(trace.read_bytes()):
            name = os.path.basename(path)
            by_file["sink" if name.startswith(b"import.db") else
                    "store" if name.startswith(b"store.jsonl") else "other"] += 1
    return {"batch_syncs": sum(by_file.values()) / committed, "batch_syncs_batches": committed,
            "batch_syncs_by_file": {k: v / committed for k, v in by_file.items()}}


def batch_syncs_row(r: dict[str, Any]) -> tuple[str, str, str]:
    if "batch_syncs" not in r:
        return ("syncs per batch", f"skipped: {r['batch_syncs_skipped']}"[:42], "")
    per = r["batch_syncs_by_file"]
    return (f"syncs per batch (strace, {r['batch_syncs_batches']:,} batches)",
            f"sink {per['sink']:.3f} + store {per['store']:.3f} + other {per['other']:.3f}",
            "batch_syncs")


# -- the run ------------------------------------------------------------------------------------


FULL = {"floor": 3000, "durable": 3000, "cpu": 20_000, "replay": [10_000, 100_000],
        "growth": [100, 1000, 10_000, 100_000], "growth_total": 20_000, "restarts": 7,
        "csv_rows": 2_000_000, "import": [100_000, 1_000_000], "dbos": 500, "group_commit": 10_000,
        "workers_import": 1_000_000, "sync_batches": 1000, "pg_floor": 1000, "pg_steps": 500,
        "pg_rounds": 3, "pg_fleet_import": 1_000_000, "pg_takeover_import": 200_000}
QUICK = {"floor": 500, "durable": 500, "cpu": 5000, "replay": [10_000], "growth": [100, 1000, 10_000],
         "growth_total": 5000,
         "restarts": 3, "csv_rows": 200_000, "import": [20_000, 100_000], "dbos": 200,
         "group_commit": 1000, "workers_import": 100_000, "sync_batches": 200, "pg_floor": 300,
         "pg_steps": 100, "pg_rounds": 3, "pg_fleet_import": 50_000, "pg_takeover_import": 50_000}
FLEET_BATCH_SIZE = 1000
GROUPS = ("engine", "pg")  # the engine on this disk; the PostgreSQL rows


def measure(base: Path, sizes: dict[str, Any], *, only: str | None = None,
            pg_url: str = bench_pg.ADMIN_URL) -> dict[str, Any]:
    """Every figure of both groups, or of the one `only` names (scratch files under base, the
    PostgreSQL databases on the server of the admin URL pg_url)."""
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    groups = [g for g in GROUPS if only in (None, g)]
    r: dict[str, Any] = {"sizes": sizes, "machine": machine, "groups": groups}
    if "engine" in groups:
        r.update(measure_engine(base, sizes))
    if "pg" in groups:
        r.update(measure_pg(pg_url, sizes))
    return r


def measure_engine(base: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = {}
    log("floor (append + fdatasync of one 200-byte line) and durable step, alternating")
    floors, steps_ = [], []  # the disk's speed drifts on a shared machine: alternate, keep the best
    for _ in range(5):
        floors.append(floor_us(base, sizes["floor"] // 5))
        steps_.append(run_steps(base, sizes["durable"] // 5, Durability.FULL)[0])
    r["floor_us"], r["durable_step_us"] = min(floors), min(steps_)
    r["durable_step_over_floor"] = r["durable_step_us"] / r["floor_us"]
    r["floor_us_range"] = [min(floors), max(floors)]
    log("CPU per step, no sync")
    r["nosync_wall_us_per_step"], r["cpu_per_step_us"] = run_steps(base, sizes["cpu"], Durability.NONE)
    log("replay")
    r["replay"] = {str(n): replay(base, n) for n in sizes["replay"]}
    largest = r["replay"][str(sizes["replay"][-1])]
    r["replay_us_per_step"] = largest["replay_us_per_step"]
    r["replay_steps_per_s"] = 1e6 / largest["replay_us_per_step"]
    if "100000" in r["replay"]:
        r["resume_100k_s"] = r["replay"]["100000"]["resume_s"]
    log("growth")
    # Small workflows take a millisecond: the best of enough runs to total growth_total steps.
    r["growth_us_per_step"] = {
        str(n): min(run_steps(base, n, Durability.NONE)[0]
                    for _ in range(max(1, sizes["growth_total"] // n)))
        for n in sizes["growth"]
    }
    costs = list(r["growth_us_per_step"].values())
    r["growth_spread"] = (max(costs) - min(costs)) / min(costs)
    log("restart latency")
    r["restart_latency_s"] = restart_latency(base, sizes["restarts"])
    log(f"CSV import of {sizes['csv_rows']:,} rows, without and with a kill")
    r["csv_import"] = csv_import(base, sizes["csv_rows"])
    r["restart_latency_csv_100mb_s"] = r["csv_import"]["restart_s"]
    log("import, durable and plain")
    small, large = sizes["import"]
    r["import"] = {mode: {str(small): import_in_child(base, small, mode)} for mode in ("durable", "plain")}
    for mode in ["durable", "plain"] * 2:  # alternate, keep the faster of two: the machine is shared
        run = import_in_child(base, large, mode)
        best = r["import"][mode].get(str(large))
        if best is None or run["records_per_s"] > best["records_per_s"]:
            r["import"][mode][str(large)] = run
    r["import_durable_over_plain"] = (r["import"]["durable"][str(large)]["records_per_s"]
                                      / r["import"]["plain"][str(large)]["records_per_s"])
    r["rss_1m_over_100k"] = (r["import"]["durable"][str(large)]["max_rss_mb"]
                             / r["import"]["durable"][str(small)]["max_rss_mb"])
    r["store_bytes_per_batch"] = r["import"]["durable"][str(large)]["store_bytes_per_batch"]
    log("group commit: ctx.map(concurrency=16) vs ctx.run")
    with scratch(base) as d:
        r["group_commit"] = bench_parallel.group_commit(d, sizes["group_commit"])
    r["group_commit_speedup"] = r["group_commit"]["group_commit_speedup"]
    log("import with --workers 2 vs --workers 1")
    with scratch(base) as d:
        r["workers"] = bench_parallel.import_speedup(d, sizes["workers_import"])
    r["import_speedup_workers2"] = r["workers"]["import_speedup_workers2"]
    log("DBOS peer (if installed)")
    dbos_us = dbos_in_child(base, sizes["dbos"])
    if dbos_us is not None:  # ours: the best of three runs, as the disk's speed drifts
        ours_us = min(run_steps(base, sizes["dbos"], Durability.FULL)[0] for _ in range(3))
        r["dbos_us_per_step"], r["ours_us_per_step_same_workload"] = dbos_us, ours_us
        r["dbos_over_ours"] = dbos_us / ours_us
    log("syncs per batch of the default import (strace -f)")
    r.update(batch_syncs(base, sizes["sync_batches"]))
    if "batch_syncs_skipped" in r:
        log(f"syncs per batch: skipped, {r['batch_syncs_skipped']}")
    return r


def measure_pg(url: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """The PostgreSQL rows, each on a fresh database; {"pg_skipped": why} without a server."""
    try:
        version = bench_pg.server_version(url)
    except psycopg.OperationalError as exc:
        log(f"PostgreSQL rows: skipped, {' '.join(str(exc).split())}")
        return {"pg_skipped": "PostgreSQL does not answer (--pg URL)"}
    log(f"PostgreSQL {version}: floor (INSERT + COMMIT), our step, DBOS's step (if installed), alternating")
    samples: dict[str, list[float]] = {"pg_floor_ms": [], "pg_step_ms": [], "dbos_pg_step_ms": []}
    for _ in range(sizes["pg_rounds"]):  # the server is shared and its speed drifts: keep the best
        samples["pg_floor_ms"].append(bench_pg.pg_floor_ms(url, sizes["pg_floor"]))
        samples["pg_step_ms"].append(bench_pg.ours_pg_step_ms(url, sizes["pg_steps"], steps))
        dbos_ms = bench_pg.dbos_step_ms(url, sizes["pg_steps"])
        if dbos_ms is not None:
            samples["dbos_pg_step_ms"].append(dbos_ms)
    r: dict[str, Any] = {"pg_server_version": version}
    for key, values in samples.items():
        if values:
            r[key], r[f"{key}_range"] = min(values), [min(values), max(values)]
    r["pg_step_over_floor"] = r["pg_step_ms"] / r["pg_floor_ms"]
    if "dbos_pg_step_ms" in r:
        r["dbos_pg_over_ours"] = r["dbos_pg_step_ms"] / r["pg_step_ms"]
    r.update(measure_fleet(url, sizes))
    return r


def measure_fleet(url: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """The many-machine rows (machines as pid namespaces: root and `unshare` needed)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return {"pg_fleet_skipped": "needs root and unshare (machines are pid namespaces)"}
    with tempfile.TemporaryDirectory() as base:
        log("PostgreSQL: SIGKILL of the machine holding the lease, to the next driver's first batch")
        with bench_pg.fresh_database(url) as db:
            takeover = bench_fleet.takeover_s(db, Path(base) / "takeover", sizes["pg_takeover_import"])
        log(f"PostgreSQL: {sizes['pg_fleet_import']:,} records with 1, then 3, executor processes")
        fleet = bench_fleet.fleet_speedup(lambda: bench_pg.fresh_database(url), Path(base) / "fleet",
                                          sizes["pg_fleet_import"], FLEET_BATCH_SIZE)
    return {"pg_takeover_s": takeover, "pg_fleet": fleet,
            "pg_import_speedup_3_executors": fleet["speedup"]}


def table(r: dict[str, Any]) -> str:
    rows = ((engine_rows(r) if "engine" in r["groups"] else [])
            + (pg_rows(r) if "pg" in r["groups"] else []))
    out = [f"{'metric':44} {'measured':42} {'ratio/value':>12} {'target':>8}  ok", "-" * 116]
    for name, shown, key in rows:
        if key:
            op, target = TARGETS[key]
            value = r[key]
            ok = value <= target if op == "<=" else value >= target
            out.append(f"{name:44} {shown:42} {value:12.3g} {op}{target:<7g}  {'yes' if ok else 'NO'}")
        else:
            out.append(f"{name:44} {shown:42}")
    return "\n".join(out)


def engine_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    imp = r["import"]
    small, large = list(imp["durable"])
    rows = [
        ("floor: append + fdatasync", f"{r['floor_us']:.0f} µs (range {r['floor_us_range'][0]:.0f}-"
         f"{r['floor_us_range'][1]:.0f} over 5 rounds)", ""),
        ("durable step", f"{r['durable_step_us']:.0f} µs", "durable_step_over_floor"),
        ("CPU per step, no sync", f"{r['cpu_per_step_us']:.1f} µs", "cpu_per_step_us"),
        ("replay", f"{r['replay_us_per_step']:.2f} µs/step ({r['replay_steps_per_s']:,.0f} steps/s)",
         "replay_us_per_step"),
    ]
    if "resume_100k_s" in r:
        rr = r["replay"]["100000"]
        rows.append(("resume 100k steps (open + replay)",
                     f"{rr['resume_s']:.2f} s (open {rr['open_s']:.2f} s)", "resume_100k_s"))
    rows.append(("growth, µs/step at " + "/".join(r["growth_us_per_step"]),
                 " / ".join(f"{v:.1f}" for v in r["growth_us_per_step"].values()), "growth_spread"))
    rows.append(("restart latency (SIGKILL -> next batch)", f"{r['restart_latency_s'] * 1000:.0f} ms",
                 "restart_latency_s"))
    csv = r["csv_import"]
    rows.append((f"restart latency, {csv['mb']:.0f} MB CSV", f"{csv['restart_s'] * 1000:.0f} ms "
                 f"(first batch at {csv['first_batch_s']:.2f} s)", "restart_latency_csv_100mb_s"))
    rows.append(("  its import, no kill / one kill",
                 f"{csv['import_s']:.1f} s / {csv['import_one_kill_s']:.1f} s ({csv['rows']:,} rows)", ""))
    rows.append((f"import {int(large):,} records, durable",
                 f"{imp['durable'][large]['records_per_s']:,.0f} rec/s", ""))
    rows.append((f"import {int(large):,} records, plain loop",
                 f"{imp['plain'][large]['records_per_s']:,.0f} rec/s", "import_durable_over_plain"))
    rows.append((f"peak RSS at {int(small):,} / {int(large):,}",
                 f"{imp['durable'][small]['max_rss_mb']:.0f} / {imp['durable'][large]['max_rss_mb']:.0f} MB",
                 "rss_1m_over_100k"))
    rows.append(("store bytes per batch", f"{r['store_bytes_per_batch']:.0f} B", ""))
    gc = r["group_commit"]
    rows.append((f"{gc['steps']:,} steps: ctx.map(concurrency={gc['concurrency']}) vs ctx.run",
                 f"{gc['map_s']:.2f} s vs {gc['sequential_s']:.2f} s", "group_commit_speedup"))
    wk = r["workers"]
    rows.append((f"import {wk['records']:,} records: --workers 2 vs 1",
                 f"{wk['workers2_s']:.1f} s vs {wk['workers1_s']:.1f} s", "import_speedup_workers2"))
    if "dbos_over_ours" in r:
        rows.append(("DBOS 500-step workflow (SQLite)",
                     f"{r['dbos_us_per_step']:.0f} µs/step vs ours {r['ours_us_per_step_same_workload']:.0f}",
                     "dbos_over_ours"))
    else:
        rows.append(("DBOS peer", "not installed (pip install -e '.[bench]')", ""))
    rows.append(batch_syncs_row(r))
    return rows


def pg_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "pg_skipped" in r:
        return [("PostgreSQL rows", f"skipped: {r['pg_skipped']}"[:42], "")]
    def best(key: str) -> str:
        low, high = r[f"{key}_range"]
        return f"{low:.2f} ms (range {low:.2f}-{high:.2f} over {r['sizes']['pg_rounds']} rounds)"

    rows = [
        (f"PostgreSQL {r['pg_server_version'].split()[0]} floor: INSERT + COMMIT", best("pg_floor_ms"), ""),
        ("durable step, PostgreSQL store", best("pg_step_ms"), "pg_step_over_floor"),
    ]
    if "dbos_pg_over_ours" in r:
        rows.append((f"DBOS {r['sizes']['pg_steps']}-step workflow (PostgreSQL)",
                     f"{r['dbos_pg_step_ms']:.2f} ms/step vs ours {r['pg_step_ms']:.2f}",
                     "dbos_pg_over_ours"))
    else:
        rows.append(("DBOS peer on PostgreSQL", "not installed (pip install -e '.[bench]')", ""))
    if "pg_fleet_skipped" in r:
        return [*rows, ("many machines", f"skipped: {r['pg_fleet_skipped']}"[:42], "")]
    fleet = r["pg_fleet"]
    return [
        *rows,
        ("lease holder SIGKILLed -> next driver's batch", f"{r['pg_takeover_s']:.2f} s (lease 5 s)",
         "pg_takeover_s"),
        (f"import {r['sizes']['pg_fleet_import']:,} records: 3 executors vs 1",
         f"{fleet['executors_3_s']:.1f} s vs {fleet['executors_1_s']:.1f} s",
         "pg_import_speedup_3_executors"),
    ]


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    p.add_argument("--dir", type=Path, default=Path("."), help="where scratch files go (the disk measured)")
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    p.add_argument("--only", choices=GROUPS,
                   help="one group of rows: the engine's on this disk, or PostgreSQL's")
    p.add_argument("--pg", default=bench_pg.ADMIN_URL, metavar="URL",
                   help="admin URL of the PostgreSQL server: its rows create and drop databases there "
                        "(default: %(default)s)")
    p.add_argument("--child-import", choices=["durable", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--records", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_import:
        print(json.dumps(child_import(args.dir, args.records, args.child_import)))
        return 0
    results = measure(args.dir, QUICK if args.quick else FULL, only=args.only, pg_url=args.pg)
    print(table(results))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
