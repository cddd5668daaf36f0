"""scripts/audit.py on a state dir shared by imports whose ids differ only where LIKE has wildcards."""

from __future__ import annotations

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
