"""The `run` command: the import application's wiring, the one module of the supervisor that
imports workflow.importer (the CLI loads it only for `run`, `report`, and for `list`, `status`,
`retry` and `compact` to recognize imports).

`run` checks the import's input here (a missing file, a bad header, a broken line within its
first plan segment are refused before anything runs; one further on rejects the import when the
worker plans that far), chooses the import it drives (workflow/importer/identity.py: the default id, and an
existing import continued only as it was started), and supervises `python -m workflow run
workflow.importer.app:import_records` with the import's setup hook, on the generic machinery of
supervise.py. The import's units are its batches, its `process_batch` steps (its `plan_segment`
steps come between them); their number is known up front for a synthetic source, and for a
file only once its plan is stored to its end. `--kill-at-batch K` waits at the import's own
`batch.mid` failpoint (halfway through batch K's rows, before its transaction commits);
`--fail-at-batch K` arms `batch.fail` on batch K's first attempt. `status` gets the import's
words, batch totals and the sink's executions from `terms_for`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from store import Promise, State, StoreError, failpoints, parse_store_url
from workflow.history import History, recorded_call, records_call_of
from workflow.importer import (
    SINK_FILE,
    SourceError,
    batch_count,
    check_source,
    file_source,
    import_records,
    plan_segment,
    process_batch,
    synthetic_source,
)
from workflow.importer import setup as import_setup
from workflow.importer.app import open_sink
from workflow.importer.executions import read_executions
from workflow.importer.file_format import (
    FormatError,
    LateInputError,
    column_map,
    delimiter_char,
    encoding_name,
)
from workflow.importer.forks import parent_sql as fork_parent_sql  # noqa: F401 (report's, through here)
from workflow.importer.identity import ImportMismatchError, ImportToRun, import_to_run
from workflow.importer.sink import SinkError, open_read_only
from workflow.registry import describe

from . import exits
from .commands import common_settings, prepare_state_dir, refuse, supervise
from .faults import Point, in_a_database, kill_budget_error, random_kills
from .location import StoreLocation
from .report import Terms
from .supervise import Settings


def function_name(fn: Callable[..., Any]) -> str:
    """MODULE:FUNCTION of `fn`, as the worker's command line names it."""
    return f"{fn.__module__}:{fn.__qualname__}"


@dataclass(frozen=True)
class ImportTerms(Terms):
    """An import's units are its batch steps; its result is a summary of record counts."""

    noun: str = "import"
    unit: str = "batch"
    units: str = "batches"
    units_maybe: str = "batch(es)"
    command: str = "run"
    unit_fn: str | None = describe(process_batch).name

    def result_fields(self, result: Any) -> dict[str, Any]:
        if result is None:
            return {}
        return self.summary(result) if _is_summary(result) else super().result_fields(result)

    def summary(self, result: Any) -> Any:
        if not _is_summary(result):  # a store edited by hand: shown as it is, never a traceback
            return result
        return {k: v for k, v in result.items() if k != "batches"}  # one entry per batch: too long

    def result_text(self, result: Any) -> str:
        if not _is_summary(result):
            return f"a result that is not an import summary: {super().result_text(result)}"
        reasons = ", ".join(f"{k} {v}" for k, v in result["skipped_reasons"].items()) or "none"
        return (f"{result['total_records']} records in {result['batch_count']} batches: "
                f"{result['total_processed']} imported, {result['total_skipped']} skipped ({reasons})")

    def failure_text(self, error: str, retry: str) -> str:
        """An input error alone, without the steps it failed through; one found after batches
        committed (LateInputError) says itself how to import the file again, as no retry can."""
        late = self.unretryable(error)
        if late is not None:
            return late
        _, found, cause = error.rpartition(f"{SourceError.__name__}: ")
        return super().failure_text(cause if found else error, retry)

    def unretryable(self, error: str) -> str | None:
        """An input error found after batches committed: the same import cannot get past it."""
        _, late, cause = error.rpartition(f"{LateInputError.__name__}: ")
        return cause if late else None

    def step_count(self, history: History) -> int | None:
        """The import's batch count: in its summary once it is done, from its arguments for a
        synthetic source, else from its stored plan segments once the last one is (never by
        reading the input)."""
        root = history.root
        if root.state is State.RESOLVED and _is_summary(root.value):
            return root.value["batch_count"]
        call = recorded_call(root)
        if call is None or len(call.args) != 2:
            return None
        source, batch_size = call.args
        if isinstance(source, dict) and source.get("kind") == "synthetic":
            try:
                check_source(source, batch_size)  # reads nothing for a synthetic source
            except (SourceError, ValueError):  # a store edited by hand: no count
                return None
            return batch_count(source, batch_size)
        return _planned_batches(history)

    def records_done(self, history: History) -> int | None:
        """The records of the batches done (in the summary, once the import is)."""
        root = history.root
        if root.state is State.RESOLVED and _is_summary(root.value):
            return root.value["total_records"]
        done = self.units_of(history).in_state(State.RESOLVED)
        return sum(p.value["records"] for p in done if isinstance(p.value, dict)
                   and isinstance(p.value.get("records"), int))

    def executions(self, location: StoreLocation, root_id: str) -> list[dict[str, Any]]:
        """The sink's `executions` of the import's batches: in the store's PostgreSQL database,
        or the state dir's SQLite file (none for a store given by path, without a state dir)."""
        if parse_store_url(location.url)[0] == "postgresql":
            return read_executions(location.url, root_id)
        if location.state_dir is None:
            return []
        return read_executions(location.state_dir / SINK_FILE, root_id)


IMPORT_TERMS = ImportTerms()
_SUMMARY_KEYS = frozenset({"total_records", "total_processed", "total_skipped", "skipped_reasons",
                           "batch_count"})


def _planned_batches(history: History) -> int | None:
    """How many batches the stored plan segments hold, once the last one is planned."""
    segments = list(history.of(describe(plan_segment).name).steps.values())
    if not segments or any(p.state is not State.RESOLVED or not _is_segment(p.value) for p in segments):
        return None
    if segments[-1].value["next"] is not None:
        return None
    return sum(len(p.value["batches"]) for p in segments)


def _is_segment(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("batches"), list) and "next" in value


def _is_summary(result: Any) -> bool:
    return (isinstance(result, dict) and result.keys() >= _SUMMARY_KEYS
            and isinstance(result["skipped_reasons"], dict))


def terms_for(root: Promise) -> Terms:
    """The import's words for an import's root; the generic ones for any other workflow."""
    return IMPORT_TERMS if records_call_of(root, import_records) else Terms()


def at_mid_batch(_root_id: str, batch: int) -> Point:
    """Where `--kill-at-batch` waits: halfway through the batch's rows, before its commit."""
    return failpoints.BATCH_MID, failpoints.batch_mid_key(batch)


def fail_once_at(batch: int | None) -> list[dict[str, str]]:
    """`--fail-at-batch K`: the first attempt of batch K raises (and is retried with backoff)."""
    if batch is None:
        return []
    return [failpoints.entry(failpoints.BATCH_FAIL, failpoints.batch_fail_key(batch, 1), "raise")]


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`python -m supervisor run`: check the input, then supervise the import."""
    budget_error = kill_budget_error(args.kill_at_batch, args.fail_at_batch, args.max_attempts, "batch")
    if budget_error is not None:
        return refuse(budget_error, exits.USAGE, args.json)
    try:
        source = _source(args)
        check_source(source, args.batch_size)
        plan_segment(source, args.batch_size)  # a broken line near the top: refused here too
    except SourceError as exc:
        return refuse(str(exc), exits.FAILED, args.json)
    except FormatError as exc:
        parser.error(str(exc))
    except ValueError as exc:  # a batch size out of range
        parser.error(f"argument --batch-size: {exc}")
    count = batch_count(source, args.batch_size)  # a file's is known once it is planned
    beyond = [k for k in [*args.kill_at_batch, args.fail_at_batch]
              if k is not None and count is not None and k >= count]
    if beyond:
        parser.error(f"batch {beyond[0]} is beyond the last batch ({count - 1}); "
                     f"the import has {count} batch(es)")
    refused = prepare_state_dir(args.state_dir, args.json)
    if refused is not None:
        return refused
    kills = random_kills(args.kill_random, args.seed, args.workers)
    location = StoreLocation.in_state_dir(args.state_dir.resolve())
    if args.store is not None:  # PostgreSQL: the store and the sink in the database
        location = StoreLocation.in_database(args.store, args.state_dir.resolve())
        kills = in_a_database(kills)
    try:
        chosen = _import_to_run(location, source, args)
    except (ImportMismatchError, StoreError) as exc:
        return refuse(str(exc), exits.FAILED, args.json)
    settings = Settings(
        root_id=chosen.root_id,
        target=function_name(import_records),
        location=location,
        args=[orjson.dumps(chosen.source).decode(), str(chosen.batch_size)],
        setup=function_name(import_setup),
        step_count=count,
        unit_records=args.batch_size,
        kill_at_steps=set(args.kill_at_batch),
        kill_point=at_mid_batch,
        random_kills=kills,
        planned_failure=args.fail_at_batch,
        extra_failpoints=fail_once_at(args.fail_at_batch),
        terms=IMPORT_TERMS,
        **common_settings(args),
    )
    return supervise(settings, as_json=args.json)


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """The descriptor of the input `run` was given, read as its flags say (FormatError if they
    cannot apply)."""
    if args.input is None:
        if args.map is not None or args.delimiter is not None or args.encoding != "utf-8":
            raise FormatError("--map, --delimiter and --encoding say how to read an --input file")
        return synthetic_source(args.records)
    return file_source(
        args.input,
        delimiter=None if args.delimiter is None else delimiter_char(args.delimiter),
        encoding=encoding_name(args.encoding),
        columns=None if args.map is None else column_map(args.map),
    )


def _import_to_run(location: StoreLocation, source: dict[str, Any], args: argparse.Namespace) -> ImportToRun:
    """The import this run drives, as the store has it (read only; nothing is written here)."""
    store = location.open_readonly()
    if store is None:
        return import_to_run(None, source, args.batch_size, args.id)
    with store:
        return import_to_run(store, source, args.batch_size, args.id)


def open_sink_readonly(state_dir: Path, store_url: str | None) -> Any:
    """A read-only connection to the import's sink, for `report`: `import.db` in the state dir
    (sqlite3's), or with a PostgreSQL store its tables there (psycopg's, loaded only then); a
    SinkError names what cannot be read."""
    if store_url is None:
        return open_read_only(state_dir / SINK_FILE)
    from workflow.importer.pg_sink import SinkConnectionError
    from workflow.importer.pg_sink import open_read_only as open_pg_read_only

    try:
        return open_pg_read_only(store_url)
    except SinkConnectionError as exc:
        raise SinkError(str(exc)) from exc


def record_fork(location: StoreLocation, new_id: str, root_id: str, from_batch: int) -> None:
    """Record in the import's sink that `new_id` is a fork of `root_id` from `from_batch`, so
    that its batches take over the rows `root_id` wrote for them (workflow/importer/forks.py);
    a SinkError if the sink holds another fork under `new_id`."""
    in_database = parse_store_url(location.url)[0] == "postgresql"
    sink = open_sink(location.state_dir, location.url if in_database else None)
    try:
        sink.record_fork(new_id, root_id, from_batch)
    finally:
        sink.close()


def is_import(root: Promise) -> bool:
    return records_call_of(root, import_records)
