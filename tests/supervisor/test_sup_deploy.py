"""Deploying new code under an import in flight, with real processes: an import is SIGKILLed
halfway (its supervisor and worker), a changed copy of the code is "deployed", and the same
command resumes it. Patched and versioned changes finish; an unpatched one is refused with a
message saying how to patch, and nothing is left pending without one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from supervisor_helpers import REPO, root_id

RECORDS, BATCH_SIZE, BATCHES = 1000, 100, 10
STOP_AT = 5  # the old code is killed while batch 5 is in flight
ROOT = root_id(RECORDS, BATCH_SIZE)
OLD_LOOP = "            in_flight.append((yield ctx.begin(process_batch, begun, batch)))\n"

STRICT_STEP = '''

@register(name="process_batch", version=2, recover=find_batch_commit)
def process_batch_strict(i: int, batch: dict[str, Any]) -> dict[str, Any]:
    """Deployed: an email whose user part ends in 7 is now invalid too."""
    import dataclasses

    from . import records

    step = current_step()
    sink = step.dependency("sink")
    execution = sink.start_execution(step.promise_id, i, step.attempt, os.getpid(), step.code)
    rows = [
        dataclasses.replace(r, problem=records.INVALID_EMAIL)
        if r.problem is None and r.record["email"].split("@")[0].endswith("7") else r
        for r in read_batch(batch)
    ]
    return sink.commit_batch(step.promise_id, step.parent_id, i, rows, execution)
'''

DEPLOYS = {
    "patched": [(OLD_LOOP, (
            "            if (yield ctx.patched('strict-email')):\n"
            "                in_flight.append((yield ctx.begin(process_batch_strict, begun, batch)))\n"
            "            else:\n"
            "                in_flight.append((yield ctx.begin(process_batch, begun, batch)))\n"))],
    "versioned": [
        ('@register(name="import_records", version=2)\ndef import_records(',
         '@register(name="import_records", version=2)\ndef import_records_v2('),
        ("\n\ndef find_batch_commit(", (
            '\n\n@register(name="import_records", version=3)\n'
            "def import_records(ctx, source, batch_size):\n"
            "    results = []\n"
            "    for i, batch in enumerate(plan_batches(source, batch_size)):\n"
            "        results.append((yield ctx.run(process_batch_strict, i, batch)))\n"
            "    return summarize(results)\n\n\ndef find_batch_commit(")),
    ],
    "unpatched": [(OLD_LOOP, OLD_LOOP.replace("process_batch,", "process_batch_strict,"))],
    "old-version-dropped": [
        ('@register(name="import_records", version=2)\n', '@register(name="import_records", version=3)\n')],
}
REFUSALS = {  # deploy -> what the one error line must say
    "unpatched": ("error: non-deterministic workflow: call", "ctx.patched(", "new version"),
    "old-version-dropped": ("recorded with import_records v2, which this code does not register "
                            "(it has v1, v3)", "keep v2 registered beside the new version"),
}


def copy_of_the_code(where: Path) -> Path:
    where.mkdir()
    for package in ("store", "workflow", "supervisor"):
        shutil.copytree(REPO / package, where / package, ignore=shutil.ignore_patterns("__pycache__"))
    return where


def deploy(code: Path, change: str) -> None:
    app = code / "workflow" / "importer" / "app.py"
    text = app.read_text() + STRICT_STEP
    for old, new in DEPLOYS[change]:
        assert text.count(old) == 1, f"the deploy {change!r} no longer fits app.py: {old!r}"
        text = text.replace(old, new)
    app.write_text(text)


def supervisor(code: Path, state_dir: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    environ.update(PYTHONPATH=str(code), **(env or {}))
    argv = [sys.executable, "-m", "supervisor", "run", "--records", str(RECORDS), "--batch-size",
            str(BATCH_SIZE), "--state-dir", str(state_dir), "--json"]
    return subprocess.Popen(argv, cwd=code, env=environ, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def resolved_batches(audit: ModuleType, state_dir: Path) -> dict[int, object]:
    if not (state_dir / "store.jsonl").exists():
        return {}
    batches = audit.batch_promises(audit.load_store(state_dir / "store.jsonl"), ROOT)
    return {b: p["value"] for b, p in batches.items() if p["state"] == "resolved"}


def half_done_import(tmp_path: Path, audit: ModuleType) -> tuple[Path, Path, dict[int, object]]:
    """The old code, SIGKILLed (supervisor and worker) while batch STOP_AT is in flight."""
    code, state_dir = copy_of_the_code(tmp_path / "code"), tmp_path / "state"
    pause = json.dumps([{"name": "batch.mid", "key": str(STOP_AT), "action": "pause"}])
    old = supervisor(code, state_dir, env={"DURABLE_FAILPOINTS": pause})
    try:
        deadline = time.monotonic() + 60
        while len(resolved_batches(audit, state_dir)) < STOP_AT or not _in_flight(state_dir):
            assert old.poll() is None and time.monotonic() < deadline, "the old code did not reach batch 5"
            time.sleep(0.05)
    finally:
        old.send_signal(signal.SIGKILL)  # its worker dies with it (PR_SET_PDEATHSIG)
        old.communicate(timeout=30)
    time.sleep(0.2)
    done_before = resolved_batches(audit, state_dir)
    assert sorted(done_before) == list(range(STOP_AT))
    return code, state_dir, done_before


def _in_flight(state_dir: Path) -> bool:
    if not (state_dir / "import.db").exists():
        return False
    with sqlite3.connect(state_dir / "import.db") as db:
        return db.execute("SELECT COUNT(*) FROM executions WHERE batch = ?", (STOP_AT,)).fetchone()[0] > 0


def code_by_batch(state_dir: Path) -> dict[int, set[str]]:
    with sqlite3.connect(state_dir / "import.db") as db:
        rows = db.execute("SELECT batch, code FROM executions WHERE outcome = 'committed'").fetchall()
    by_batch: dict[int, set[str]] = {}
    for batch, code in rows:
        by_batch.setdefault(batch, set()).add(code)
    return by_batch


def resume(code: Path, state_dir: Path) -> tuple[int, dict | None, str]:
    proc = supervisor(code, state_dir)
    out, err = proc.communicate(timeout=120)
    report = json.loads(out) if out.strip() else None
    return proc.returncode, report, err


@pytest.mark.parametrize("change", ["patched", "versioned"])
def test_a_patched_or_versioned_deploy_finishes_the_import_in_flight(
    tmp_path: Path, audit: ModuleType, change: str
) -> None:
    code, state_dir, done_before = half_done_import(tmp_path, audit)
    deploy(code, change)

    returncode, report, err = resume(code, state_dir)

    assert returncode == 0, err
    assert {b: v for b, v in resolved_batches(audit, state_dir).items() if b < STOP_AT} == done_before
    by_batch = code_by_batch(state_dir)
    assert sorted(by_batch) == list(range(BATCHES)) and all(len(c) == 1 for c in by_batch.values())
    old = {"process_batch v1"}
    if change == "patched":  # done batches kept, the one in flight stays old, later ones use v2
        assert all(by_batch[b] == old for b in range(STOP_AT + 1))
        assert all(by_batch[b] == {"process_batch v2"} for b in range(STOP_AT + 1, BATCHES))
        strict = sum(1 for i in range((STOP_AT + 1) * BATCH_SIZE, RECORDS)
                     if i % 20 != 13 and str(i).endswith("7"))
        assert report["total_skipped"] == RECORDS // 20 + strict
    else:  # the run recorded with import_records v2 finishes on v2, and status says so
        assert all(by_batch[b] == old for b in range(BATCHES))
        assert report["total_skipped"] == RECORDS // 20
        status = subprocess.run(
            [sys.executable, "-m", "supervisor", "status", "--id", ROOT, "--state-dir", str(state_dir),
             "--json"], cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True,
            text=True, timeout=60, check=True)
        assert json.loads(status.stdout)["code"] == "import_records v2"
    verdict = audit.audit(state_dir, ROOT, RECORDS)
    assert verdict["ok"], verdict["violations"]


@pytest.mark.parametrize("change", sorted(REFUSALS))
def test_a_deploy_that_cannot_replay_is_refused_saying_what_to_do_and_changes_nothing(
    tmp_path: Path, audit: ModuleType, change: str
) -> None:
    code, state_dir, done_before = half_done_import(tmp_path, audit)
    deploy(code, change)
    store_before = (state_dir / "store.jsonl").read_bytes()

    returncode, report, err = resume(code, state_dir)

    assert returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and ROOT in last, last
    assert all(words in last for words in REFUSALS[change]), last
    assert "Traceback" not in err and report is not None and len(report["children"]) == 1
    assert (state_dir / "store.jsonl").read_bytes() == store_before  # nothing settled or failed
    assert resolved_batches(audit, state_dir) == done_before
