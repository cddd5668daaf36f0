"""The import's words for the supervisor: its batches are its process_batch steps, and their
number comes from its arguments or its stored plan, never from reading the input again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from store import MemoryStore
from supervisor.import_command import IMPORT_TERMS
from supervisor.inspect import status_of
from workflow import Runner, StepEvent, WorkflowInterrupted
from workflow.history import read_history
from workflow.importer import Sink, file_source, import_records, synthetic_source
from workflow.importer.app import import_records_v1
from workflow.importer.sources import SEGMENT_BATCHES

ROOT = "import/terms"


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path / "import.db", durable=False)
    yield s
    s.close()


def run_until(store: MemoryStore, sink: Sink, stop_after: int | None, *call: object) -> None:
    """Run an import, stopping once `stop_after` more batches resolved (None: to its end)."""
    done: list[str] = []

    def on_event(e: StepEvent) -> None:
        if e.kind == "resolved" and e.fn == "process_batch":
            done.append(e.promise_id)

    runner = Runner(store, dependencies={"sink": sink}, on_event=on_event,
                    should_stop=lambda: stop_after is not None and len(done) >= stop_after)
    try:
        runner.run(ROOT, *call)
    except WorkflowInterrupted:
        assert stop_after is not None


def csv_file(tmp_path: Path, rows: int) -> Path:
    path = tmp_path / "people.csv"
    path.write_text("id,name,email\n" + "".join(f"{i},N{i},u{i}@x.io\n" for i in range(rows)))
    return path


def test_a_file_import_is_counted_once_its_plan_is_stored_to_its_end(tmp_path: Path, sink: Sink) -> None:
    path = csv_file(tmp_path, SEGMENT_BATCHES + 6)  # batches of 1: two plan segments
    with MemoryStore() as store:
        run_until(store, sink, 3, import_records, file_source(path), 1)
        early = read_history(store, ROOT)
        assert IMPORT_TERMS.step_count(early) is None  # only the first segment is planned
        status = status_of(early, IMPORT_TERMS)
        assert (status["batches_done"], status["batch_count"]) == (3, None)
        assert status["pending_batch"]["id"] == f"{ROOT}.4"  # batch 3, after the plan step

        run_until(store, sink, SEGMENT_BATCHES - 2, import_records, file_source(path), 1)
        planned = read_history(store, ROOT)
        assert planned.root.state.value == "pending"
        assert IMPORT_TERMS.step_count(planned) == SEGMENT_BATCHES + 6
        assert status_of(planned, IMPORT_TERMS)["batches_done"] == SEGMENT_BATCHES + 1


def test_a_synthetic_import_is_counted_from_its_arguments(sink: Sink) -> None:
    with MemoryStore() as store:
        run_until(store, sink, 1, import_records, synthetic_source(1000), 7)
        assert IMPORT_TERMS.step_count(read_history(store, ROOT)) == 143


def test_a_file_import_recorded_by_v1_is_not_counted_until_it_is_done(tmp_path: Path, sink: Sink) -> None:
    """Counting a v1 import's batches would mean planning its whole file: status does not."""
    path = csv_file(tmp_path, 10)
    with MemoryStore() as store:
        run_until(store, sink, 2, import_records_v1, file_source(path), 3)
        history = read_history(store, ROOT)
        assert (history.root.param["fn"], history.root.param["v"]) == ("import_records", 1)
        assert IMPORT_TERMS.step_count(history) is None
        assert status_of(history, IMPORT_TERMS)["batches_done"] == 2

        run_until(store, sink, None, import_records, file_source(path), 3)  # resumed on v1
        assert IMPORT_TERMS.step_count(read_history(store, ROOT)) == 4
