"""scripts/chaos.sh: a short reproducible chaos run ends with a clean verdict line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from pgdb import ADMIN_URL
from supervisor_helpers import REPO, child_env

VERDICT = re.compile(
    r"^chaos: runs=(\d+) kills=(\d+) \(store-write=\d+ supervisor=\d+ pool=(\d+) stall=(\d+) "
    r"disk-full=(\d+)\) lost=0 "
    r"reruns_of_completed_batches=0 duplicate_rows=0 "
    r"violations=0 -> PASS$"
)
# With --store: the same fields, the whole machines and drivers killed in the parentheses too.
STORE_VERDICT = re.compile(
    r"^chaos: runs=(\d+) kills=(\d+) \(store-write=0 supervisor=(\d+) pool=(\d+) stall=0 disk-full=0 "
    r"machine=(\d+) driver=(\d+)\) lost=0 reruns_of_completed_batches=0 duplicate_rows=0 "
    r"violations=0 -> PASS$"
)
# Its two runs: 2 then 3 machines, our kills (a whole machine, supervisors, executors) and the
# supervisors' own random kills.
STORE_SEED = "6"
STALL_SEED = "13"  # its one run draws a stall: the first worker is SIGSTOPped in its start-up
# Its one run (1029 records in 19 batches, no kills) draws a file size limit that SQLite's log
# reaches after 14 batches.
DISK_FULL_SEED = "896"


def _chaos(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = child_env({"PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
    return subprocess.run(["bash", "scripts/chaos.sh", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_chaos_two_runs_pass_and_clean_up(tmp_path: Path) -> None:
    result = _chaos(tmp_path, "2", "7")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and (verdict := VERDICT.match(lines[0])), result.stdout
    assert verdict.group(1) == "2"
    assert list(tmp_path.iterdir()) == []  # every run's state dir was removed


def test_chaos_run_with_a_stopped_worker_passes_and_counts_the_stall(tmp_path: Path) -> None:
    result = _chaos(tmp_path, "1", STALL_SEED)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert re.search(r"stall-after=\S+ \(stopped worker\(s\) (\d+)\)", result.stderr), result.stderr
    verdict = VERDICT.match(result.stdout.strip())
    assert verdict and verdict.group(4) == "1", result.stdout + result.stderr[-4000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [("zero",), ("1", "2", "3"), ("--workers", "0"), ("--workers", "65"),
                                  ("--workers",), ("--bogus", "1"), ("--store", "import.db"), ("--store",),
                                  ("--store", ADMIN_URL, "--workers", "2")])
def test_chaos_rejects_bad_arguments(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = _chaos(tmp_path, *args)
    assert result.returncode == 2
    assert "usage: scripts/chaos.sh [--workers N] [RUNS] [SEED]" in result.stderr


def test_chaos_run_into_a_full_disk_passes_and_counts_it(tmp_path: Path) -> None:
    result = _chaos(tmp_path, "1", DISK_FULL_SEED)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    filled = re.search(r"disk-full-limit=\d+ \(import\.db full after (\d+) batch\(es\), retried\)",
                       result.stderr)
    assert filled and int(filled.group(1)) >= 3, result.stderr  # a full disk mid-import
    verdict = VERDICT.match(result.stdout.strip())
    assert verdict and verdict.group(5) == "1", result.stdout + result.stderr[-4000:]
    assert list(tmp_path.iterdir()) == []


def _chaos_databases() -> set[str]:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        rows = admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'chaos_%'").fetchall()
    return {name for (name,) in rows}


def test_chaos_on_machines_sharing_postgresql_passes_and_drops_its_databases(tmp_path: Path) -> None:
    before = _chaos_databases()
    result = _chaos(tmp_path, "--store", ADMIN_URL, "2", STORE_SEED)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    verdict = STORE_VERDICT.match(result.stdout.strip())
    assert verdict, result.stdout + result.stderr[-4000:]
    runs, kills, supervisor, pool, machine, _driver = map(int, verdict.groups())
    assert runs == 2 and kills >= 3 and supervisor + pool + machine >= 2, result.stdout
    assert re.search(r"machines=2 .* machines=3 ", result.stderr.replace("\n", " ")), result.stderr
    assert list(tmp_path.iterdir()) == []
    assert _chaos_databases() <= before  # each run's database was dropped
