"""The torn-tail torture of scripts/torture_store.py: real writers SIGKILLed at random moments.

The writer child and every check live in the script; this test runs it with 100 kills.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from store_helpers import REPO, child_env, flip_byte, line_offset

from store import JsonlStore

SCRIPT = REPO / "scripts" / "torture_store.py"
KILLS = 100
SEED = 20261125


@pytest.fixture(scope="module")
def torture_store() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torture_store", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_no_settle_is_lost_and_no_line_is_damaged_across_100_sigkills(
    torture_store: ModuleType, tmp_path: Path
) -> None:
    verdict = torture_store.torture(tmp_path / "promises.jsonl", KILLS, SEED, compact_every=40)
    assert verdict.violations == [], verdict
    assert verdict.lost == [], verdict
    assert verdict.kills == KILLS, verdict
    # Every writer settled at least its first id before it was killed, except one paused in
    # mid-write of that very first resolve (its first line is then the pause's announcement).
    assert verdict.confirmed >= KILLS - verdict.mid_write_kills, verdict
    assert verdict.mid_write_kills > 0, verdict
    assert verdict.torn_repaired >= verdict.mid_write_kills, verdict
    assert verdict.compactions == KILLS // 40, verdict


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=child_env(),
                          capture_output=True, text=True, timeout=120, check=False)


def test_script_prints_a_one_line_verdict_and_exits_zero(tmp_path: Path) -> None:
    done = run_script("--kills", "3", "--seed", "1", "--store", str(tmp_path / "s.jsonl"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: kills=3 ")
    assert "lost=0" in done.stdout
    assert done.stdout.count("\n") == 1


def test_script_exits_non_zero_on_a_damaged_store(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with JsonlStore(path) as store:
        for pid in "abc":
            store.create(pid, None)
    flip_byte(path, line_offset(path, 2) + 5)
    done = run_script("--kills", "1", "--store", str(path))
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL:")
    assert f"{path}:2:" in done.stderr
