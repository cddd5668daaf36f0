"""What a batch writes into the sink, whatever database holds it: its `records` and `skipped`
rows, why a record the insert ignored was not imported, and the batch's summary. Pure, and
shared by the SQLite and the PostgreSQL sink, so that both classify and count alike."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from . import records
from .sources import Row

# Why a row was not imported: (the row, its reason).
Skip = tuple[Row, str]


def split(rows: list[Row]) -> tuple[list[Row], list[Skip]]:
    """The importable rows, and the others with the reason they are skipped."""
    good = [r for r in rows if r.problem is None]
    skipped = [(r, r.problem) for r in rows if r.problem is not None]
    return good, skipped


def record_row(import_id: str, batch: int, row: Row) -> tuple[Any, ...]:
    """The `records` row of an importable input row; fields beyond the required ones go to `extra`."""
    record = row.record
    extra = None
    if len(record) > len(records.REQUIRED_FIELDS):  # it has all of them: it is importable
        extra = orjson.dumps(records.extra_fields(record)).decode()
    return (row.record_id, import_id, row.position, batch, record["name"], record["email"], extra)


def skipped_row(import_id: str, batch: int, row: Row, reason: str) -> tuple[Any, ...]:
    return (import_id, row.position, batch, row.line, row.record_id, reason)


def ignored(
    import_id: str, good: list[Row], holders: Mapping[str, tuple[str, int]], kin: Iterable[str] = ()
) -> list[Skip]:
    """The rows an insert that keeps the first of each id ignored, given who holds each id now
    ({id: (import_id, position)}): another position of this input (`duplicate_id`; the input
    of a fork is its ancestors' too, `kin`), or another import into this database
    (`already_imported`)."""
    ours = {import_id, *kin}
    return [
        (r, records.DUPLICATE_ID if holder[0] in ours else records.ALREADY_IMPORTED)
        for r in good
        if (holder := holders[r.record_id]) != (import_id, r.position)
    ]


def summary(batch: int, records_read: int, processed: int, skipped: list[Skip]) -> dict[str, Any]:
    """A committed batch's counts, as its commit row stores them and its step returns them."""
    return {
        "batch": batch,
        "records": records_read,
        "processed": processed,
        "skipped": len(skipped),
        "reasons": dict(sorted(Counter(why for _, why in skipped).items())),
    }
