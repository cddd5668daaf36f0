"""scripts/bench.py on tiny sizes, so the benchmark cannot rot. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
from pgdb import ADMIN_URL

REPO = Path(__file__).resolve().parent.parent
TINY = {"floor": 10, "durable": 10, "cpu": 50, "replay": [50], "growth": [10, 50], "growth_total": 50,
        "restarts": 1, "csv_rows": 3000, "import": [300, 600], "dbos": 5, "sync_batches": 5,
        "group_commit": 20, "workers_import": 2000, "pg_floor": 10, "pg_steps": 5, "pg_rounds": 1,
        "pg_fleet_import": 2000, "pg_takeover_import": 20_000}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_reports_every_metric_and_a_table(bench: ModuleType, tmp_path: Path) -> None:
    results = bench.measure(tmp_path, TINY, pg_url=ADMIN_URL)
    for key in ("floor_us", "durable_step_over_floor", "cpu_per_step_us", "replay_us_per_step",
                "growth_spread", "restart_latency_s", "restart_latency_csv_100mb_s",
                "import_durable_over_plain", "rss_1m_over_100k", "store_bytes_per_batch",
                "group_commit_speedup", "import_speedup_workers2"):
        assert results[key] > 0, key
    assert results["import"]["durable"]["600"]["imported"] == results["import"]["plain"]["600"]["imported"]
    table = bench.table(results)
    assert "durable step" in table and "restart latency" in table and "MB CSV" in table
    assert results["csv_import"]["import_one_kill_s"] > 0
    json.dumps(results)  # bench.json must be writable
    assert list(tmp_path.iterdir()) == []  # scratch directories are cleaned up


def test_the_postgresql_rows_alone_leave_no_database_behind(bench: ModuleType, tmp_path: Path) -> None:
    results = bench.measure(tmp_path, TINY, only="pg", pg_url=ADMIN_URL)
    assert results["groups"] == ["pg"] and "floor_us" not in results
    for key in ("pg_floor_ms", "pg_step_ms", "pg_step_over_floor", "pg_takeover_s",
                "pg_import_speedup_3_executors"):
        assert results[key] > 0, key
    assert ("dbos_pg_over_ours" in results) == bench.bench_dbos.installed()
    table = bench.table(results)
    assert "floor: INSERT + COMMIT" in table and "durable step, PostgreSQL store" in table
    assert "lease holder SIGKILLed" in table and "3 executors vs 1" in table
    assert "restart latency" not in table
    json.dumps(results)
    with psycopg.connect(ADMIN_URL) as admin:
        left = admin.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                             (bench.bench_pg.database_prefix(),)).fetchall()
    assert left == []
    assert list(tmp_path.iterdir()) == []


def test_the_postgresql_rows_are_skipped_without_a_server(bench: ModuleType, tmp_path: Path) -> None:
    results = bench.measure(tmp_path, TINY, only="pg", pg_url="postgresql://postgres@127.0.0.1:1/postgres")
    assert results["pg_skipped"] and "pg_floor_ms" not in results
    assert "skipped: PostgreSQL does not answer" in bench.table(results)


def test_cli_child_import_prints_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--child-import", "durable",
         "--records", "250", "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )
    figures = json.loads(out.stdout)
    assert figures["imported"] == sum(1 for i in range(250) if i % 20 != 13)
    assert figures["max_rss_mb"] > 0


def test_batch_syncs_are_counted_from_the_syscalls_by_file(bench: ModuleType, tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    figures = bench.batch_syncs(tmp_path, 20)
    assert figures["batch_syncs_batches"] == 20, figures
    per_batch = figures["batch_syncs_by_file"]
    assert per_batch["sink"] >= 1  # every batch's commit is durable before its promise settles
    assert per_batch["store"] > 0 and per_batch["other"] > 0  # the root's settle, the state dir
    assert figures["batch_syncs"] == pytest.approx(sum(per_batch.values()))
    assert "syncs per batch (strace, 20 batches)" in bench.batch_syncs_row(figures)[0]
    assert bench.batch_syncs_row({"batch_syncs_skipped": "strace is not installed"})[1] == \
        "skipped: strace is not installed"
    assert list(tmp_path.iterdir()) == []
