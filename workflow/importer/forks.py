"""Forks of an import, as its sink keeps them: which import was forked from which, at which batch.

A fork (`python -m supervisor fork --id ID --from-batch K`) reuses its parent's stored results
for the batches before K and runs K onward again, under its own id (after a bug fix, say). What
its parent (or any ancestor) wrote for a batch the fork runs is taken over by the fork: in that
batch's transaction, the ancestors' `records` and `skipped` rows of the batch are deleted and the
fork writes its own, with its import_id. So `records` keeps every valid record once, written by
the import that ran its batch last; the rows of the batches before K keep their writer's id; and
an id an ancestor holds in another batch is a `duplicate_id`, as it would be in one import,
never `already_imported`. Both sinks (SQLite, PostgreSQL) use these statements; `{p}` is the
database's parameter marker.
"""

from __future__ import annotations

TABLE = """CREATE TABLE IF NOT EXISTS forks (
    import_id TEXT PRIMARY KEY,
    parent_id TEXT NOT NULL,
    from_batch INTEGER NOT NULL
)"""

# The ancestors of an import, nearest first (UNION, not UNION ALL: a cycle ends).
_ANCESTORS = """WITH RECURSIVE lineage(id) AS (
    SELECT parent_id FROM forks WHERE import_id = {p}
    UNION SELECT f.parent_id FROM forks f JOIN lineage l ON f.import_id = l.id
) SELECT id FROM lineage"""

_RECORD = "INSERT INTO forks VALUES ({p}, {p}, {p}) ON CONFLICT (import_id) DO NOTHING"
_PARENT = "SELECT parent_id, from_batch FROM forks WHERE import_id = {p}"


def ancestors_sql(p: str) -> str:
    return _ANCESTORS.format(p=p)


def record_sql(p: str) -> str:
    return _RECORD.format(p=p)


def parent_sql(p: str) -> str:
    return _PARENT.format(p=p)


def take_over_sql(p: str, ancestors: int) -> list[str]:
    """The statements that delete what `ancestors` import ids wrote for one batch (parameters:
    the batch, then the ancestors' ids)."""
    marks = ", ".join([p] * ancestors)
    return [f"DELETE FROM {table} WHERE batch = {p} AND import_id IN ({marks})"
            for table in ("records", "skipped")]


def refused(import_id: str, parent: tuple[str, int] | None, wanted: tuple[str, int]) -> str | None:
    """Why recording `import_id` as a fork of `wanted` (parent id, from batch) is refused, given
    what the sink holds for it; None if it may be recorded (or already is, the same)."""
    if parent is None or tuple(parent) == wanted:
        return None
    return (f"import {import_id} is recorded in the sink as a fork of {parent[0]} from batch "
            f"{parent[1]}, not of {wanted[0]} from batch {wanted[1]}")
