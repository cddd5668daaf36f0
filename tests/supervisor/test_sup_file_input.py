"""Kills during an import of a real CSV file with bad and duplicate rows: skipped rows count too."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from types import ModuleType

from supervisor_helpers import assert_audit_ok, assert_report_matches_sink, run_import

ROWS = 300
BATCH_SIZE = 40
BAD_EMAILS = {7, 45, 46, 199}
DUPLICATE_OF = {120: 3, 250: 100}  # row -> the earlier row whose id it repeats


def _write_csv(path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "email"])
        for i in range(ROWS):
            record_id = f"r{DUPLICATE_OF.get(i, i)}"
            email = "not-an-email" if i in BAD_EMAILS else f"user{i}@example.org"
            writer.writerow([record_id, f"Name {i}", email])


def test_csv_import_under_kills_imports_or_skips_every_row_once(tmp_path: Path, audit: ModuleType) -> None:
    source = tmp_path / "people.csv"
    _write_csv(source)
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--input", str(source), "--batch-size", str(BATCH_SIZE),
                     "--kill-at-batch", "1", "--kill-at-batch", "3", "--kill-random", "3", "--seed", "3")

    assert run.returncode == 0, run.describe()
    report = run.report
    assert report is not None and report["ok"] is True
    root = report["id"]
    assert root == f"import/{hashlib.sha256(source.read_bytes()).hexdigest()[:16]}"  # from the content
    assert report["total_records"] == ROWS
    assert report["skipped_reasons"] == {"duplicate_id": len(DUPLICATE_OF), "invalid_email": len(BAD_EMAILS)}
    assert report["total_skipped"] == len(DUPLICATE_OF) + len(BAD_EMAILS)
    assert report["total_processed"] == ROWS - report["total_skipped"]
    assert {("kill-at-batch", 1), ("kill-at-batch", 3)} <= {(k["kind"], k["batch"]) for k in report["kills"]}
    assert_report_matches_sink(report, state_dir, root)
    verdict = assert_audit_ok(audit, state_dir, root, audit.count_input(None, source))
    assert verdict["skipped"] == len(DUPLICATE_OF) + len(BAD_EMAILS)
