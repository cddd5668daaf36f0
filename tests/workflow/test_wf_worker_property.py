"""Property: however often and wherever batches are SIGKILLed, the import ends audit-clean."""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wf_helpers import run_worker

from workflow import exitcodes
from workflow.importer import synthetic_source

ROOT = "import/property"
KILLED = -9


@st.composite
def kill_plans(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """A record count, a batch size, and the batches to SIGKILL the worker in, one per run."""
    records = draw(st.integers(min_value=1, max_value=60))
    batch_size = draw(st.integers(min_value=1, max_value=25))
    batches = -(-records // batch_size)
    kills = draw(st.lists(st.integers(min_value=0, max_value=batches - 1), min_size=1, max_size=3))
    return records, batch_size, kills


@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(plan=kill_plans())
def test_kills_at_any_batches_then_a_clean_run_leave_an_audit_clean_import(
    tmp_path_factory: pytest.TempPathFactory, audit: ModuleType, plan: tuple[int, int, list[int]]
) -> None:
    records, batch_size, kills = plan
    state_dir = tmp_path_factory.mktemp("kills")
    source = synthetic_source(records)
    done: set[int] = set()
    for batch in kills:
        run = run_worker(state_dir, ROOT, source, batch_size, kill_at_batch=batch)
        if batch in done:  # finished before: the failpoint is never reached again
            assert run.killed_at is None
            assert run.returncode == exitcodes.OK
        else:
            assert run.returncode == KILLED
            assert run.killed_at is not None and run.killed_at["key"] == str(batch)
        done.update(range(batch) if run.killed_at is not None else range(-(-records // batch_size)))

    final = run_worker(state_dir, ROOT, source, batch_size)

    assert final.returncode == exitcodes.OK
    verdict = audit.audit(state_dir, ROOT, records)
    assert verdict["ok"], verdict["violations"]
    assert verdict["imported"] + verdict["skipped"] == records
