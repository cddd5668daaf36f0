"""scripts/audit.py: imports whose ids differ only where LIKE has wildcards, a pool's executions,
inputs it cannot count or must read as the import did (gzip), and forks."""

from __future__ import annotations

import gzip
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from wf_helpers import run_worker_plain

from workflow import exitcodes
from workflow.importer import file_source, synthetic_source


def test_audit_keeps_imports_apart_whose_ids_match_as_like_patterns(
    tmp_path: Path, audit: ModuleType
) -> None:
    """`_` is a LIKE wildcard: the batches of `impX1` (impX1.0, ...) match the pattern `imp_1.%`."""
    imports = {"imp_1": 300, "impX1": 200}
    for root, records in imports.items():
        assert run_worker_plain(tmp_path, root, synthetic_source(records), 100).returncode == exitcodes.OK

    for root, records in imports.items():
        verdict = audit.audit(tmp_path, root, records)
        assert verdict["ok"], (root, verdict["violations"])
        assert (verdict["batches"], verdict["executions"]) == (records // 100, records // 100)


def test_audit_counts_the_batch_executions_that_ran_at_once(tmp_path: Path, audit: ModuleType) -> None:
    root = "imp"
    assert run_worker_plain(tmp_path, root, synthetic_source(300), 100).returncode == exitcodes.OK
    assert audit.audit(tmp_path, root, 300)["ok"]
    # As if batch 1 had started before batch 0 committed: two at once, as a pool of 2 runs them.
    db = sqlite3.connect(tmp_path / "import.db")
    with db:
        db.execute("UPDATE executions SET started_at = "
                   "(SELECT started_at FROM executions WHERE batch = 0) WHERE batch = 1")
    db.close()

    alone = audit.audit(tmp_path, root, 300)
    assert "2 batch executions ran at the same time, more than 1" in alone["violations"]
    assert audit.audit(tmp_path, root, 300, workers=2)["ok"]
    # One ending as the next starts is one at a time.
    assert audit._most_at_once([(0.0, 1.0), (1.0, 2.0), (1.5, 3.0)]) == 2


def test_an_input_the_audit_cannot_count_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The files the import refuses (invalid UTF-8) are refused by the audit too, with no traceback."""
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"id,name,email\nr1,a\xff,b@c.d\n")
    audit_py = Path(__file__).resolve().parents[2] / "scripts" / "audit.py"
    done = subprocess.run([sys.executable, str(audit_py), "--state-dir", str(tmp_path),
                           "--id", "x", "--input", str(bad)], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith(f"audit: {bad}: cannot count its records")
    assert "Traceback" not in done.stderr


AUDIT_PY = Path(__file__).resolve().parents[2] / "scripts" / "audit.py"


def supervisor(command: str, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", command, "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, check=False, timeout=120)


def test_audit_counts_a_gzip_input_read_as_the_import_recorded_it(tmp_path: Path) -> None:
    """A `.csv.gz` whose delimiter the import sniffed (`;`): the audit reads the file as the
    source descriptor in the store says."""
    path = tmp_path / "people.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("id;name;email\n" + "".join(f"{i};N{i};u{i}@example.com\n" for i in range(250)))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    assert run_worker_plain(state_dir, "imp", file_source(path), 100).returncode == exitcodes.OK

    done = subprocess.run([sys.executable, str(AUDIT_PY), "--state-dir", str(state_dir), "--id", "imp",
                           "--input", str(path)], capture_output=True, text=True, check=False)

    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["ok"] and verdict["imported"] == 250, verdict


def test_audit_follows_a_forks_lineage(tmp_path: Path, audit: ModuleType) -> None:
    """A fork's batches before its first keep the original's rows and commit rows (its
    import_id), and the fork takes over the original's rows of the batches it runs again: both
    imports audit clean, each counting every record once."""
    state_dir = tmp_path / "state"
    original, fork = "import/synthetic-2000", "import/synthetic-2000~fork-5"
    ran = supervisor("run", state_dir, "--records", "2000", "--batch-size", "100")
    assert ran.returncode == 0, ran.stderr
    forked = supervisor("fork", state_dir, "--id", original, "--from-batch", "5")
    assert forked.returncode == 0, forked.stderr
    ran = supervisor("run", state_dir, "--id", fork, "--records", "2000", "--batch-size", "100")
    assert ran.returncode == 0, ran.stderr

    for root in (fork, original):
        verdict = audit.audit(state_dir, root, 2000)
        assert verdict["ok"], (root, verdict["violations"])
        assert (verdict["imported"], verdict["skipped"], verdict["lost"]) == (1900, 100, 0), verdict
    assert audit.audit(state_dir, original, 2000)["forks_taking_over"] == {fork: 5}
