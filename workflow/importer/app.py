"""The bulk import workflow: the seed's plain loop, one durable step per batch."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Generator
from typing import Any

from store import failpoints

from ..context import Context, current_step
from ..registry import register
from .sources import plan_batches, read_batch


@register(name="import_records")
def import_records(
    ctx: Context, source: dict[str, Any], batch_size: int
) -> Generator[Any, Any, dict[str, Any]]:
    """Import `source` in batches of `batch_size`; resumable at the first unfinished batch."""
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
    failpoints.hit("batch.fail", f"{i}/{step.attempt}")
    return sink.commit_batch(
        step.promise_id,
        step.parent_id,
        i,
        read_batch(batch),
        execution,
        halfway=lambda: failpoints.hit("batch.mid", str(i)),
    )


def batch_index(root_id: str, promise_id: str) -> int | None:
    """The batch number of `promise_id` if it is a batch step of the import `root_id`."""
    prefix = root_id + "."
    if promise_id.startswith(prefix) and promise_id[len(prefix):].isdigit():
        return int(promise_id[len(prefix):])
    return None


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
