"""What `report` draws, gathered from the three records of an import's run.

- The sink's `executions` table: one row per invocation of the batch step (its pid, start,
  end, and outcome: `committed`, `found_commit`, or empty when the invocation died or raised).
- The supervisor's event log (events.py): its workers' lives, its kills, its restarts, and the
  failed attempts it saw retried, with their errors.
- The store: the import's state and result, and the error of a batch that failed for good.

An execution with an empty outcome is `failed` when something ended it (a kill of its process,
a retry of its attempt, its batch's rejection, its worker's end, or a later execution of its
batch), else `unfinished` (the import is still pending: in flight, or its end went unseen).
"Replayed" batches are no executions: a restarted worker found them resolved in the store and
did not run them; each worker's count is in its `exit` event. Nor are the batches a fork reused
(the sink's `forks` table says from which batch it runs): their results were copied from its
parent in the store, and their rows keep the id of the import that wrote them, so the totals
add them from the store, as the fork's result does.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

from store import State
from workflow.history import History

COMMITTED, FOUND_COMMIT, FAILED, UNFINISHED = "committed", "found_commit", "failed", "unfinished"


@dataclass
class Execution:
    batch: int
    attempt: int
    pid: int
    started: float
    finished: float | None
    outcome: str  # COMMITTED, FOUND_COMMIT, FAILED or UNFINISHED
    why: str = ""  # what ended a failed execution: a kill, an error, its worker's end


@dataclass
class Totals:
    records: int | None
    imported: int
    skipped: int
    batches_done: int  # those the import committed, and those a fork reused
    batch_count: int | None
    executions: int
    kills: int
    stalls: int
    restarts: int
    wall_s: float
    reused: int = 0  # batches a fork took from its parent's results (counted in the totals above)


@dataclass
class RunPicture:
    root_id: str
    state: str  # the import's state in the store
    totals: Totals
    executions: list[Execution]
    events: list[dict[str, Any]]  # the supervisor's events, oldest first
    error: str | None = None  # the import's error, when it failed
    start: float = 0.0
    end: float = 0.0
    notes: list[str] = field(default_factory=list)


def gather(batches: History, step_count: int | None, db: Any, events: list[dict[str, Any]]) -> RunPicture:
    """The picture of import `batches.root` from its history (its batch steps alone among its
    direct steps), the sink connection `db` (SQLite or PostgreSQL, read-only) and the
    supervisor's events."""
    root_id = batches.root.id
    rows = _query(db, "SELECT batch, attempt, pid, started_at, finished_at, outcome FROM executions "
                  "WHERE promise_id LIKE %s ESCAPE '!' ORDER BY started_at, id", (_children(root_id),))
    counts = {table: _query(db, f"SELECT count(*) FROM {table} WHERE import_id = %s", (root_id,))[0][0]
              for table in ("records", "skipped", "batch_commits")}
    from .import_command import fork_parent_sql  # the import application: loaded by `report` only

    parent = _query(db, fork_parent_sql("%s"), (root_id,))
    reused = _reused(batches, parent[0][1]) if parent else []
    rejected = {n: p.error for n, p in enumerate(batches.steps.values()) if p.state is State.REJECTED}
    executions = _classify(rows, events, batches.root.state is State.PENDING, rejected)
    times = [e["t"] for e in events] + [x.started for x in executions] + [
        x.finished for x in executions if x.finished is not None]
    start, end = (min(times), max(times)) if times else (0.0, 0.0)
    kinds = [e["event"] for e in events]
    root = batches.root
    value = root.value if root.state is State.RESOLVED and isinstance(root.value, dict) else {}
    totals = Totals(
        records=value.get("total_records"),
        imported=counts["records"] + sum(r["processed"] for r in reused),
        skipped=counts["skipped"] + sum(r["skipped"] for r in reused),
        batches_done=counts["batch_commits"] + len(reused),
        batch_count=step_count,
        executions=len(executions),
        kills=kinds.count("kill"),
        stalls=kinds.count("stall"),
        restarts=kinds.count("restart"),
        wall_s=end - start,
        reused=len(reused),
    )
    error = root.error if root.state is State.REJECTED else None
    picture = RunPicture(root_id, root.state.value, totals, executions, events,
                         None if error is None else f"{error.get('type')}: {error.get('message')}",
                         start, end)
    if parent:
        parent_id, from_batch = parent[0]
        picture.notes.append(
            f"a fork of import {parent_id} from batch {from_batch}: {len(reused)} batch(es) before it "
            "reused from its stored results, not run again (no executions; their rows keep the id of "
            "the import that wrote them); the totals count them")
    if not events:
        picture.notes.append("no supervisor events recorded for this import (run without a state "
                             "dir, or by a version that kept none): kills and restarts are not shown")
    return picture


def _reused(batches: History, from_batch: int) -> list[dict[str, Any]]:
    """The summaries of a fork's batches before `from_batch` that its store holds resolved:
    copied from its parent's, never run by it (so none of its sink's rows are theirs)."""
    return [p.value for n, p in enumerate(batches.steps.values())
            if n < from_batch and p.state is State.RESOLVED and isinstance(p.value, dict)]


def _children(root_id: str) -> str:
    """A LIKE pattern for the ids of the calls under `root_id` (`!` escapes)."""
    escaped = root_id.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return f"{escaped}.%"


def _query(db: Any, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Run `sql` (written with psycopg's %s) on either sink's connection."""
    if isinstance(db, sqlite3.Connection):
        sql = sql.replace("%s", "?")
    return list(db.execute(sql, args).fetchall())


def _classify(
    rows: list[tuple[Any, ...]], events: list[dict[str, Any]], pending: bool, rejected: dict[int, Any]
) -> list[Execution]:
    """Executions from the sink's rows, each open one ended and explained by what the events
    tell of it (see the module's doc). A kill of the worker, a stall and a worker's end end
    every execution in flight (its pool processes die with it: one worker runs at a time per
    state dir); a pool kill ends only its own process's."""
    ends = [e for e in events if e["event"] in ("kill", "stall", "exit")]
    retries = {(e.get("unit"), e.get("attempt")): e for e in events if e["event"] == "retry"}
    out = []
    for batch, attempt, pid, started, finished, outcome in rows:
        x = Execution(batch, attempt, pid, started, finished, outcome or FAILED)
        out.append(x)
        if outcome:
            continue
        retry = retries.get((batch, attempt))
        end = next((e for e in ends if e["t"] >= started and (e.get("kind") != "pool" or e["pid"] == pid)
                    and (retry is None or e["t"] < retry["t"])), None)
        if end is not None:
            x.finished, x.why = end["t"], _ended_by(end)
        elif retry is not None:
            error = retry.get("error")  # an executor of a PostgreSQL fleet does not pass it on
            x.finished, x.why = retry["t"], "retried" + (f": {error}" if error else "")
        elif batch in rejected and (error := rejected[batch]):
            x.why = f"failed for good: {error.get('type')}: {error.get('message')}"
    by_batch: dict[int, list[Execution]] = {}
    for x in out:  # in the order they started
        by_batch.setdefault(x.batch, []).append(x)
    for runs in by_batch.values():  # an open execution followed by another of its batch ended then
        for x, after in zip(runs, [*runs[1:], None], strict=True):
            if x.finished is None and after is not None:
                x.finished = after.started
                x.why = x.why or "its process died (a later execution ran the batch again)"
            elif x.finished is None and not x.why and pending:
                x.outcome = UNFINISHED
    return out


def _ended_by(event: dict[str, Any]) -> str:
    if event["event"] == "kill":
        whom = "pool process" if event.get("kind") == "pool" else "worker"
        return f"SIGKILL ({event.get('kind')}) to {whom} {event['pid']}"
    if event["event"] == "stall":
        return f"SIGKILL to stalled worker {event['pid']}"
    return f"worker {event['pid']} ended: {event.get('exit')}"
