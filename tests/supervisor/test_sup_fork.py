"""`fork --id ID --from-batch K`: a new import that reuses ID's stored batches before K (never run
again) and runs K onward, taking over the rows ID wrote for them; on the JSON-lines store and on
PostgreSQL. Refusals: K beyond the last batch, an unknown id, an existing new id. A K past the
batches done reuses (and names) only those done."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
from supervisor_helpers import (
    executions,
    resolved_batches,
    root_id,
    run_cli,
    run_import,
    sigterm_while_batch_lingers,
)
from test_sup_exec import supervisor

from workflow.importer.sink import open_read_only

RECORDS, BATCH_SIZE, BATCHES, K = 200, 20, 10, 4
SIZES = ("--records", str(RECORDS), "--batch-size", str(BATCH_SIZE))
ORIGINAL = root_id(RECORDS, BATCH_SIZE)
FORK = f"{ORIGINAL}~fork-{K}"


def _check_rows(rows_by_import: dict[str, tuple[int, int, int]], skipped: dict[str, list[str]]) -> None:
    """Batches before K keep the original's rows; K onward are the fork's; each record once."""
    imported = RECORDS - RECORDS // 20  # 5% have a malformed email
    original, forked = rows_by_import[ORIGINAL], rows_by_import[FORK]
    assert (original[1], original[2]) == (0, K - 1)
    assert (forked[1], forked[2]) == (K, BATCHES - 1)
    assert original[0] + forked[0] == imported
    assert set(skipped[FORK]) == {"invalid_email"}  # never `already_imported`
    assert len(skipped[ORIGINAL]) + len(skipped[FORK]) == RECORDS - imported


def test_a_fork_reuses_the_batches_before_k_and_runs_k_onward(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    assert run_import(state_dir, *SIZES).returncode == 0

    made = run_cli("fork", state_dir, "--id", ORIGINAL, "--from-batch", str(K), "--json")
    assert made.returncode == 0, made.describe()
    outcome = json.loads(made.stdout)
    assert (outcome["id"], outcome["forked_from"], outcome["from_batch"]) == (FORK, ORIGINAL, K)
    promises = audit.load_store(state_dir / "store.jsonl")
    copies = sorted(p for p in promises if p.startswith(f"{FORK}."))
    assert copies == [f"{FORK}.{n}" for n in range(K + 1)]  # its plan segment, batches 0..K-1
    assert all(promises[c]["state"] == "resolved" for c in copies)
    assert promises[FORK]["state"] == "pending"
    assert f"run --id '{FORK}' --records {RECORDS} --batch-size {BATCH_SIZE}" in outcome["run"]

    ran = run_cli("run", state_dir, "--id", FORK, *SIZES, "--json")
    assert ran.returncode == 0, ran.describe()
    report = ran.report
    [child] = report["children"]
    assert (child["replayed"], child["executed"]) == (K, list(range(K, BATCHES)))
    assert report["total_records"] == RECORDS
    assert report["total_processed"] + report["total_skipped"] == RECORDS
    assert {e.batch for e in executions(state_dir, FORK)} == set(range(K, BATCHES))  # none before K

    db = open_read_only(state_dir / "import.db")
    try:
        rows = {i: (n, lo, hi) for i, n, lo, hi in db.execute(
            "SELECT import_id, count(*), min(batch), max(batch) FROM records GROUP BY 1")}
        skipped: dict[str, list[str]] = {ORIGINAL: [], FORK: []}
        for imp, reason in db.execute("SELECT import_id, reason FROM skipped"):
            skipped[imp].append(reason)
        assert db.execute("SELECT * FROM forks").fetchall() == [(FORK, ORIGINAL, K)]
    finally:
        db.close()
    _check_rows(rows, skipped)


def test_a_fork_from_past_the_batches_done_names_only_those_reused(
    tmp_path: Path, audit: ModuleType
) -> None:
    """ID was stopped in batch 3 (0-3 done, the batch in flight ends): a fork from batch 8
    reuses 0-3 and says so."""
    state_dir = tmp_path / "state"
    stopped = sigterm_while_batch_lingers(audit, state_dir, 3, 1, *SIZES)
    assert stopped.returncode == 143, stopped.describe()
    assert resolved_batches(audit, state_dir, ORIGINAL) == {0, 1, 2, 3}
    made = run_cli("fork", state_dir, "--id", ORIGINAL, "--from-batch", "8")
    assert made.returncode == 0, made.describe()
    assert ("reused (batches 0-3 and their plan); batches 4 onward run again and take over"
            in made.stdout), made.stdout
    forked = f"{ORIGINAL}~fork-8"
    ran = run_cli("run", state_dir, "--id", forked, *SIZES, "--json")
    assert ran.returncode == 0, ran.describe()
    [child] = ran.report["children"]
    assert (child["replayed"], child["executed"]) == (4, list(range(4, BATCHES)))


def test_fork_refuses_k_beyond_the_last_batch_an_unknown_id_and_an_existing_new_id(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    assert run_import(state_dir, *SIZES).returncode == 0
    cases = {
        ("--id", ORIGINAL, "--from-batch", str(BATCHES)):
            f"batch {BATCHES} is beyond the last batch of import {ORIGINAL} ({BATCHES - 1}",
        ("--id", "import/none", "--from-batch", "1"): "no import 'import/none'",
        ("--id", ORIGINAL, "--from-batch", "1", "--new-id", ORIGINAL): f"{ORIGINAL} exists already",
    }
    for args, message in cases.items():
        refused = run_cli("fork", state_dir, *args)
        assert refused.returncode == 1, refused.describe()
        assert refused.stderr.count("\n") == 1 and message in refused.stderr, refused.stderr
    named = run_cli("fork", state_dir, "--id", ORIGINAL, "--from-batch", "0", "--new-id", "import/again")
    assert named.returncode == 0, named.describe()
    again = run_cli("fork", state_dir, "--id", ORIGINAL, "--from-batch", "0", "--new-id", "import/again")
    assert again.returncode == 1 and "import/again exists already" in again.stderr
    bad = run_cli("fork", state_dir, "--id", ORIGINAL, "--from-batch", "1", "--new-id", "a.b")
    assert bad.returncode == 2 and "has no '.'" in bad.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_fork_on_postgresql(tmp_path: Path, pg_url: str, audit: ModuleType, workers: str) -> None:
    where = ("--store", pg_url, "--state-dir", "state")
    assert supervisor(tmp_path, "run", *SIZES, *where).returncode == 0
    made = supervisor(tmp_path, "fork", "--id", ORIGINAL, "--from-batch", str(K), "--store", pg_url)
    assert made.returncode == 0, made.describe()
    ran = supervisor(tmp_path, "run", "--id", FORK, *SIZES, *where, "--workers", workers, "--json")
    assert ran.returncode == 0, ran.describe()
    assert ran.report["total_processed"] + ran.report["total_skipped"] == RECORDS
    with psycopg.connect(pg_url) as db:
        rows = {i: (n, lo, hi) for i, n, lo, hi in db.execute(
            "SELECT import_id, count(*), min(batch), max(batch) FROM records GROUP BY 1")}
        skipped: dict[str, list[str]] = {ORIGINAL: [], FORK: []}
        for imp, reason in db.execute("SELECT import_id, reason FROM skipped"):
            skipped[imp].append(reason)
        ran_before_k = db.execute("SELECT count(*) FROM executions WHERE starts_with(promise_id, %s) "
                                  "AND batch < %s", (f"{FORK}.", K)).fetchone()[0]
    assert ran_before_k == 0
    _check_rows(rows, skipped)


def test_a_fork_of_a_fork_takes_over_from_every_ancestor(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    assert run_import(state_dir, *SIZES).returncode == 0
    assert run_cli("fork", state_dir, "--id", ORIGINAL, "--from-batch", str(K)).returncode == 0
    assert run_cli("run", state_dir, "--id", FORK, *SIZES).returncode == 0
    second = f"{FORK}~fork-2"  # from batch 2: before the first fork's own batches
    made = run_cli("fork", state_dir, "--id", FORK, "--from-batch", "2")
    assert made.returncode == 0, made.describe()
    ran = run_cli("run", state_dir, "--id", second, *SIZES, "--json")
    assert ran.returncode == 0, ran.describe()
    assert ran.report["children"][0]["executed"] == list(range(2, BATCHES))
    assert ran.report["total_processed"] + ran.report["total_skipped"] == RECORDS
    db = open_read_only(state_dir / "import.db")
    try:
        writers = dict(db.execute("SELECT batch, group_concat(DISTINCT import_id) FROM records GROUP BY 1"))
        reasons = {r for (r,) in db.execute("SELECT DISTINCT reason FROM skipped")}
        count = db.execute("SELECT count(*) FROM records").fetchone()[0]
    finally:
        db.close()
    assert writers == {b: ORIGINAL if b < 2 else second for b in range(BATCHES)}
    assert reasons == {"invalid_email"} and count == RECORDS - RECORDS // 20
