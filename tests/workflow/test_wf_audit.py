"""scripts/audit.py on a state dir shared by imports whose ids differ only where LIKE has wildcards."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from wf_helpers import run_worker_plain

from workflow import exitcodes
from workflow.importer import synthetic_source


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
