"""Workflows whose steps run in the worker's pool (`ctx.map`), for the tests of `--workers` and
of pool kills under `supervisor exec`: a test copies this file into its tmp_path as `pooled.py`.

`naps` logs every step attempt to `naps.log` beside this file (id, attempt, pid), so a test can
tell which process ran which attempt. `import_mapped` is the import's own steps (the real sink,
through the import's setup hook) run `concurrency` at a time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from workflow import Context, current_step, register
from workflow.importer.app import process_batch, summarize
from workflow.importer.sources import plan_batches

LOG = Path(__file__).with_name("naps.log")


@register(name="nap")
def nap(i: int, seconds: float) -> int:
    """Sleep `seconds` in whichever process runs the step; that process's pid."""
    step = current_step()
    with LOG.open("a") as log:
        log.write(json.dumps({"id": step.promise_id, "attempt": step.attempt, "pid": os.getpid()}) + "\n")
    time.sleep(seconds)
    return os.getpid()


@register(name="naps")
def naps(ctx: Context, seconds: list[float]) -> Generator[Any, Any, list[int]]:
    """A nap of each of `seconds`, four at a time (as many as the pool has processes)."""
    return (yield ctx.map(nap, range(len(seconds)), seconds, concurrency=4))


@register(name="import_mapped")
def import_mapped(
    ctx: Context, source: dict[str, Any], batch_size: int
) -> Generator[Any, Any, dict[str, Any]]:
    """The import's batches (`<id>.<i>` is batch i), eight at a time."""
    batches = plan_batches(source, batch_size)
    return summarize((yield ctx.map(process_batch, range(len(batches)), batches, concurrency=8)))
