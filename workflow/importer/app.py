"""The bulk import workflow: a plain loop, one durable step per plan segment and per batch.

Version 2 plans the input as it goes (`plan_segment`, a few dozen batches at a time), so the
first batch starts at once and a restarted worker replays the stored plan without reading the
file. Version 1, which planned the whole input up front, stays registered: imports recorded
with it replay with it to their end.

Run it with the runtime's child, which a supervisor spawns:

    python -m workflow run workflow.importer.app:import_records --id ID --arg SOURCE --arg B \
        --setup workflow.importer.app:setup --state-dir DIR
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from store import Durability, failpoints, parse_store_url

from ..child import RunInfo
from ..context import Context, Handle, current_step
from ..errors import PermanentError
from ..registry import register
from .sink import Sink
from .sources import check_source, plan_batches, plan_segment, read_batch, verify_source

if TYPE_CHECKING:
    from .pg_sink import PgSink

SINK_FILE = "import.db"  # the SQLite sink's file in a state dir


class ImportArgumentsError(PermanentError):
    """The import was not given its two arguments: a source descriptor and a batch size."""


@contextmanager
def setup(run: RunInfo) -> Iterator[dict[str, Any]]:
    """The child's setup hook: check the arguments and the input cheaply (a file's presence,
    size and header; nothing is planned here), so that a bad input stops the run before anything
    is written, then open the sink (the steps' `sink`): SQLite in the state dir, or, when the
    store is in PostgreSQL, the same database, where a batch's rows and its resolve are one
    transaction."""
    if len(run.args) != 2:
        raise ImportArgumentsError(
            f"the import takes 2 arguments (a source descriptor and a batch size), not {len(run.args)}"
        )
    try:
        check_source(*run.args)
        if run.joining:  # another machine planned it: this machine's copy must be the same
            verify_source(run.args[0])
    except ValueError as exc:
        raise ImportArgumentsError(str(exc)) from exc
    sink = open_sink(run.state_dir, run.store_url, durable=run.durability is Durability.FULL)
    try:
        yield {"sink": sink}
    finally:
        sink.close()


def open_sink(state_dir: Path, store_url: str | None, *, durable: bool = True) -> Sink | PgSink:
    """The import's sink: SQLite in the state dir, or, when the store is in PostgreSQL, the
    same database."""
    if store_url is not None and parse_store_url(store_url)[0] == "postgresql":
        from .pg_sink import PgSink  # psycopg is loaded only on PostgreSQL

        return PgSink(store_url)
    return Sink(state_dir / SINK_FILE, durable=durable)


@register(name="import_records", version=2)
def import_records(
    ctx: Context, source: dict[str, Any], batch_size: int
) -> Generator[Any, Any, dict[str, Any]]:
    """Import `source` in batches of `batch_size`, planned a segment at a time; resumable at the
    first unfinished batch without reading the input again. With a pool of N step processes
    (`--workers N`), 2N batches are begun before the oldest is waited for, so N run at once;
    without one, each batch is waited for before the next begins, as in a plain loop."""
    window = 1 if ctx.parallelism == 1 else 2 * ctx.parallelism
    results: list[dict[str, Any]] = []
    in_flight: deque[Handle] = deque()
    begun = 0
    cursor = None
    while True:
        segment = yield ctx.run(plan_segment, source, batch_size, cursor)
        for batch in segment["batches"]:
            if len(in_flight) == window:
                results.append((yield in_flight.popleft()))
            in_flight.append((yield ctx.begin(process_batch, begun, batch)))
            begun += 1
        cursor = segment["next"]
        if cursor is None:
            results.extend((yield ctx.gather(*in_flight)))
            return summarize(results)


@register(name="import_records")
def import_records_v1(
    ctx: Context, source: dict[str, Any], batch_size: int
) -> Generator[Any, Any, dict[str, Any]]:
    """Version 1, kept for the imports recorded with it: plans the whole input (reading all of a
    file) on every replay, then one step per batch."""
    results = []
    for i, batch in enumerate(plan_batches(source, batch_size)):
        results.append((yield ctx.run(process_batch, i, batch)))
    return summarize(results)


def find_batch_commit(i: int, batch: dict[str, Any]) -> dict[str, Any] | None:
    """`process_batch`'s recover function: the summary of batch `i` if an earlier invocation
    committed it and died before its promise was resolved (recorded as `found_commit`)."""
    step = current_step()
    sink = step.dependency("sink")
    committed = sink.find_commit(step.promise_id)
    if committed is not None:
        execution = sink.start_execution(step.promise_id, i, step.attempt, os.getpid(), step.code)
        sink.finish_execution(execution, "found_commit")
    return committed


@register(name="process_batch", recover=find_batch_commit)
def process_batch(i: int, batch: dict[str, Any]) -> dict[str, Any]:
    """Import batch `i` into the sink: its rows and its commit row in one transaction.

    The runtime asks `find_batch_commit` first whenever an earlier attempt never settled, so a
    committed batch is found, never written again, and costs no attempt.
    """
    step = current_step()
    sink = step.dependency("sink")
    execution = sink.start_execution(step.promise_id, i, step.attempt, os.getpid(), step.code)
    failpoints.hit(failpoints.BATCH_FAIL, failpoints.batch_fail_key(i, step.attempt))
    return sink.commit_batch(
        step.promise_id,
        step.parent_id,
        i,
        read_batch(batch),
        execution,
        halfway=lambda: failpoints.hit(failpoints.BATCH_MID, failpoints.batch_mid_key(i)),
    )


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the batch summaries; `reasons` counts skipped records by reason."""
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r["reasons"])
    return {
        "total_records": sum(r["records"] for r in results),
        "total_processed": sum(r["processed"] for r in results),
        "total_skipped": sum(r["skipped"] for r in results),
        "skipped_reasons": dict(sorted(reasons.items())),
        "batch_count": len(results),
        "batches": results,
    }
