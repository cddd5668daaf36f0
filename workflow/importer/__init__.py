"""The bulk import application: sources, batches, the SQLite sink, and the workflow."""

from .app import batch_index, import_records, process_batch, summarize
from .sink import Sink
from .sources import SourceError, file_source, plan_batches, synthetic_source

__all__ = [
    "Sink",
    "SourceError",
    "batch_index",
    "file_source",
    "import_records",
    "plan_batches",
    "process_batch",
    "summarize",
    "synthetic_source",
]
