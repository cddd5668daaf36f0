"""The bulk import application: sources, batches, the SQLite sink, and the workflow."""

from .app import SINK_FILE, ImportArgumentsError, import_records, process_batch, setup, summarize
from .sink import Sink
from .sources import (
    SourceError,
    batch_count,
    check_source,
    file_source,
    plan_batches,
    plan_segment,
    synthetic_source,
)

__all__ = [
    "SINK_FILE",
    "ImportArgumentsError",
    "Sink",
    "SourceError",
    "batch_count",
    "check_source",
    "file_source",
    "import_records",
    "plan_batches",
    "plan_segment",
    "process_batch",
    "setup",
    "summarize",
    "synthetic_source",
]
