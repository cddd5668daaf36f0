#!/usr/bin/env python3
"""Check the invariants of DESIGN.md for one import, from its store file and its database alone.

Independent of the engine's code on purpose (stdlib only, and psycopg for PostgreSQL): it parses
the JSON lines itself, verifies their checksums, and queries the SQLite sink directly. Prints a
JSON verdict and exits 1 on any violation.

    python scripts/audit.py --state-dir .durable --id import/synthetic-1000 --records 1000
    python scripts/audit.py --store postgresql://host/db --id import/synthetic-1000 --records 1000

With `--store postgresql://...` the store and the sink are one database, where a batch's rows, its
commit row and its promise's resolve are one transaction: every batch has one commit row and one
`committed` execution, and no execution ever finds a commit (`found_commit`); the store's
promises are checked against them too, when the store's tables are there (`_promise_checks`): a
batch's promise is resolved exactly when it has a commit row, with its summary, no batch runs
after its resolve, and the root's result is the sink's totals.

A fork (`supervisor fork`) is audited along its lineage, the sink's `forks` table: its batches
before its first are its parent's (rows and commit rows under the parent's id), and the rows a
fork took over from an import are counted for that import too. `--input` is read as the import's
source descriptor in the store says (gzip, encoding, delimiter), by this script's own reader.

`--workers N` is the import's own: with N above 1 each worker ran its batches in a pool of
processes, which the sink's executions name (not the worker), so the checks that follow one
process through its batches in order give way to one that holds for any pool: no more than N
batch executions ever ran at the same time.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import gzip
import itertools
import json
import sqlite3
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any


def load_store(path: Path) -> dict[str, dict[str, Any]]:
    """Fold the store's lines into {id: {state, settled_at, value, attempts, param}}; a bad line
    before the last is a violation of its own (raised)."""
    promises: dict[str, dict[str, Any]] = {}
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for n, line in enumerate(lines, 1):
        body, _, crc = line.rpartition(b',"crc":"')
        if not crc.endswith(b'"}') or b"%08x" % zlib.crc32(body + b"}") != crc[:-2]:
            if n == len(lines):
                break  # a torn tail: the next writer moves it aside
            raise ValueError(f"{path}:{n}: damaged line before the last")
        rec = json.loads(body + b"}")
        pid, op = rec["id"], rec["op"]
        if op == "create":
            promises[pid] = {"state": "pending", "attempts": rec.get("n", 0), "settled_at": None,
                             "value": None, "param": rec["param"]}
        elif op == "promise":
            promises[pid] = {"state": rec["state"], "attempts": rec["attempts"],
                             "settled_at": rec["settled"], "value": rec["value"], "param": rec["param"]}
        elif op == "attempt":
            promises[pid]["attempts"] = rec["n"]
        elif op in ("resolve", "reject"):
            promises[pid].update(state=op + "d" if op == "resolve" else "rejected",
                                 settled_at=rec["t"], value=rec.get("value"))
        elif op == "reopen":
            promises[pid].update(state="pending", settled_at=None)
    return promises


def read_sink(path: Path) -> sqlite3.Connection:
    """Open the WAL-mode sink without writing to it (the engine's own reader is not used, on
    purpose). A reader that cannot create the -wal and -shm files (a directory it may not
    write) reads the file as immutable, which holds every commit once no -wal is left."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no import database there")
    uri = path.absolute().as_uri()
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError as exc:
        db.close()
        wal = path.with_name(path.name + "-wal")
        if exc.sqlite_errorname != "SQLITE_READONLY_DIRECTORY" or (wal.exists() and wal.stat().st_size):
            raise
    return sqlite3.connect(f"{uri}?immutable=1", uri=True)


def batch_promises(promises: dict[str, dict[str, Any]], root: str) -> dict[int, dict[str, Any]]:
    """The import's batches, {batch number: its promise with its `id`}: the root's direct calls
    of `process_batch` (its first argument is the batch number; plan segments are calls too)."""
    prefix = root + "."
    return {p["param"]["args"][0]: {**p, "id": pid} for pid, p in promises.items()
            if pid.startswith(prefix) and pid[len(prefix):].isdigit()
            and p["param"].get("fn") == "process_batch"}


class Lineage:
    """An import and the imports it was forked from (the sink's `forks`), nearest first, each
    with the first batch it ran itself: a fork's batches before that are its parent's, whose
    rows, commit rows and executions keep the parent's import id (and promise ids). The audit
    of a fork reads each batch from the import that wrote it, under the fork's promise ids.
    Forks of the import (`taken_over`: {fork: its first batch}) take over its rows of the
    batches they run again: those rows are counted where they are now."""

    def __init__(self, db: Any, root: str, mark: str, has_forks: bool) -> None:
        self.root = root
        self.chain: list[tuple[str, int]] = []
        current = root
        while True:
            row = db.execute(f"SELECT parent_id, from_batch FROM forks WHERE import_id = {mark}",
                             (current,)).fetchone() if has_forks else None
            if row is None or row[0] == current or any(row[0] == a for a, _ in self.chain):
                self.chain.append((current, 0))
                break
            self.chain.append((current, row[1]))
            current = row[0]
        self.taken_over: dict[str, int] = {}
        found = {root}
        while has_forks:
            more = [(f, k) for f, parent, k in db.execute(
                "SELECT import_id, parent_id, from_batch FROM forks").fetchall()
                if parent in found and f not in found]
            if not more:
                break
            self.taken_over.update(more)
            found.update(f for f, _ in more)
        self.ids = [a for a, _ in self.chain]
        self.marks = ", ".join([mark] * len(self.ids))
        self.row_ids = self.ids + list(self.taken_over)
        self.row_marks = ", ".join([mark] * len(self.row_ids))

    def wrote(self, import_id: str, batch: int) -> bool:
        """Whether `import_id` is the one of the lineage whose rows batch `batch` has."""
        return next(a for a, first in self.chain if batch >= first) == import_id

    def as_root(self, promise_id: str, import_id: str) -> str:
        """An ancestor's batch promise id as the fork's (a fork copies them by number)."""
        return self.root + promise_id[len(import_id):]

    def rows(self, db: Any, table: str) -> list[tuple[int, int]]:
        """(position, batch) of the `records` or `skipped` rows of the import's batches, those
        its forks took over included."""
        return [(position, batch) for position, batch, import_id in db.execute(
            f"SELECT position, batch, import_id FROM {table} WHERE import_id IN ({self.row_marks})",
            self.row_ids).fetchall()
            if batch >= self.taken_over.get(import_id, batch + 1) or self.wrote(import_id, batch)]

    def commits(self, db: Any) -> list[tuple[str, int, Any]]:
        """(promise id, batch, summary) of the commit rows of the import's batches."""
        return [(self.as_root(pid, import_id), batch, summary)
                for pid, batch, summary, import_id in db.execute(
                    "SELECT promise_id, batch, summary, import_id FROM batch_commits "
                    f"WHERE import_id IN ({self.marks})", self.ids).fetchall()
                if self.wrote(import_id, batch)]

    def executions(self, db: Any, prefix_sql: str) -> list[tuple[Any, ...]]:
        """The executions of the import's batches, in the order they started: `prefix_sql`
        selects those of one import's batch promises (its parameter: `ID.`)."""
        execs = []
        for import_id in self.ids:
            execs += [(self.as_root(r[0], import_id), *r[1:]) for r in db.execute(
                "SELECT promise_id, batch, attempt, pid, started_at, finished_at, outcome "
                f"FROM executions WHERE {prefix_sql} ORDER BY started_at, id",
                (import_id + ".",)).fetchall() if self.wrote(import_id, r[1])]
        return sorted(execs, key=lambda r: r[4])


CSV_FIELD_LIMIT = 64 * 1024 * 1024  # the importer's (workflow/importer/sources.py): a longer
# field is a skipped row there, not an unreadable file


class InputError(Exception):
    """The input file cannot be counted (the import refuses it too): names file and line."""


def count_input(records: int | None, input_path: Path | None,
                source: dict[str, Any] | None = None) -> int:
    """The records the input holds (for a CSV or TSV, its non-blank rows after the header),
    streamed, read as the import's source descriptor says (`source`: gzip, encoding, delimiter;
    without it, as the file's name says, in UTF-8)."""
    if input_path is None:
        return records or 0
    csv.field_size_limit(CSV_FIELD_LIMIT)
    name = Path(input_path.name.lower().removesuffix(".gz"))
    if source is None:
        source = {"kind": "csv" if name.suffix in (".csv", ".tsv") else "jsonl",
                  "delimiter": "\t" if name.suffix == ".tsv" else ","}
        if input_path.name.lower().endswith(".gz"):
            source["compression"] = "gzip"
    encoding = source.get("encoding", "utf-8")
    opener = gzip.open if source.get("compression") == "gzip" else open
    is_csv = source["kind"] == "csv"
    with opener(input_path, "rt", newline="",
                encoding="utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding) as f:
        rows = (csv.reader(f, delimiter=source.get("delimiter", ",")) if is_csv
                else (line for line in f if line.strip()))
        count = 0
        try:
            for row in rows:
                count += bool(row)
        except (csv.Error, UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
            where = f":{rows.line_num}" if getattr(rows, "line_num", 0) else ""
            raise InputError(f"{input_path}{where}: cannot count its records ({exc})") from None
    return max(0, count - 1) if is_csv else count


def recorded_source(store: Path | str, root: str) -> dict[str, Any] | None:
    """The source descriptor the import was started with (its first argument), read from its
    store file or its PostgreSQL database; None if the store does not hold the import."""
    if isinstance(store, Path):
        path = store / "store.jsonl"
        param = load_store(path).get(root, {}).get("param") if path.is_file() else None
    else:
        import psycopg

        with psycopg.connect(store) as db:
            row = db.execute("SELECT param FROM promise_states WHERE id = %s", (root,)).fetchone()
        param = None if row is None else row[0]
    args = (param or {}).get("args") or [None]
    return args[0] if isinstance(args[0], dict) and args[0].get("kind") in ("csv", "jsonl") else None


def audit(state_dir: Path, root: str, expected_records: int, finished: bool = True,
          workers: int = 1) -> dict[str, Any]:
    violations: list[str] = []
    promises = load_store(state_dir / "store.jsonl")
    batches = batch_promises(promises, root)
    db = read_sink(state_dir / "import.db")
    has_forks = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'forks'").fetchone() is not None
    lineage = Lineage(db, root, "?", has_forks)
    execs = lineage.executions(db, "instr(promise_id, ?) = 1")  # not LIKE: `_` is a wildcard
    commits = Counter(pid for pid, _, _ in lineage.commits(db))

    # 1. Nothing done twice: no execution of a batch starts after its promise was resolved,
    #    and each batch commits once.
    violations += _ran_after_resolve(execs, batches)
    for promise_id, n in commits.items():
        if n != 1:
            violations.append(f"{promise_id} committed {n} times")
    committed_runs = Counter(r[0] for r in execs if r[6] == "committed")
    for promise_id, n in committed_runs.items():
        if n > 1:
            violations.append(f"{promise_id} has {n} committed executions")

    # 2 and 5. Nothing lost, nothing duplicated: every input position is imported or skipped once.
    imported = lineage.rows(db, "records")
    skipped = lineage.rows(db, "skipped")
    seen = Counter(p for p, _ in imported + skipped)
    dupes = [p for p, n in seen.items() if n > 1]
    violations += _position_violations(seen, expected_records, finished)
    if finished:
        root_promise = promises.get(root)
        if root_promise is None or root_promise["state"] != "resolved":
            violations.append(f"root {root} is not resolved")
        else:
            result = root_promise["value"]
            expect = {"total_records": expected_records, "total_processed": len(imported),
                      "total_skipped": len(skipped), "batch_count": len(batches)}
            for key, want in expect.items():
                if result.get(key) != want:
                    violations.append(f"summary {key} is {result.get(key)}, the sink says {want}")
        unresolved = [b for b, p in batches.items() if p["state"] != "resolved"]
        if unresolved:
            violations.append(f"batches not resolved: {sorted(unresolved)[:5]}")
        if set(commits) != {p["id"] for p in batches.values()}:
            violations.append("batch_commits do not match the resolved batches")

    # 4. One worker at a time, running at most `workers` batches at once: the executions that
    #    ran to their commit never overlap more than that (a cut-short one has no end to count).
    at_once = _most_at_once([(r[4], r[5]) for r in execs if r[6] == "committed"])
    if at_once > workers:
        violations.append(f"{at_once} batch executions ran at the same time, more than {workers}")
    if workers == 1:
        violations += _one_process_at_a_time(execs, batches)

    return {
        "ok": not violations,
        "violations": violations,
        "batches": len(batches),
        "workers": len({r[3] for r in execs}),  # the processes that ran batches (a pool's, with one)
        "executions": len(execs),
        "reruns_of_completed_batches": sum(1 for v in violations if "ran again" in v),
        "imported": len(imported),
        "skipped": len(skipped),
        "duplicate_rows": len(dupes),
        "forks_taking_over": lineage.taken_over,  # {fork: first batch}: its rows count here too
        "lost": max(0, expected_records - len(seen)) if finished else None,
    }


def audit_pg(url: str, root: str, expected_records: int, finished: bool = True,
             workers: int | None = None) -> dict[str, Any]:
    """The invariants of an import whose store and sink are one PostgreSQL database, read in one
    snapshot. `workers` (the fleet's executors, if known) bounds the batches that ran at once."""
    import psycopg  # only this path needs it: the SQLite audit stays stdlib only

    with psycopg.connect(url) as db:
        db.read_only = True
        db.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        if not db.execute("SELECT to_regclass('batch_commits') IS NOT NULL").fetchone()[0]:
            raise FileNotFoundError(f"{url}: no import tables there")
        has_forks = db.execute("SELECT to_regclass('forks') IS NOT NULL").fetchone()[0]
        lineage = Lineage(db, root, "%s", has_forks)
        execs = lineage.executions(db, "starts_with(promise_id, %s)")
        commits = lineage.commits(db)
        imported = lineage.rows(db, "records")
        skipped = lineage.rows(db, "skipped")
        violations = _commit_violations(execs, commits)
        violations += _rows_match_commits(commits, imported, skipped)
        seen = Counter(position for position, _ in imported + skipped)
        violations += _position_violations(seen, expected_records, finished)
        if finished:
            violations += _totals_violations(commits, expected_records, len(imported), len(skipped))
        promises = _read_promises(db, root)
        ran_again = [] if promises is None else _ran_after_resolve(execs, batch_promises(promises, root))
        violations += ran_again
        if promises is not None:
            violations += _promise_checks(promises, root, commits, finished)

    at_once = _most_at_once([(r[4], r[5]) for r in execs if r[6] == "committed"])
    if workers is not None and at_once > workers:
        violations.append(f"{at_once} batch executions ran at the same time, more than {workers}")
    return {
        "ok": not violations,
        "violations": violations,
        "batches": len(commits),
        "workers": len({r[3] for r in execs}),
        "executions": len(execs),
        "most_at_once": at_once,
        "promises_checked": promises is not None,
        "reruns_of_completed_batches": len(ran_again) + sum(1 for r in execs if r[6] == "found_commit"),
        "imported": len(imported),
        "skipped": len(skipped),
        "duplicate_rows": sum(1 for n in seen.values() if n > 1),
        "forks_taking_over": lineage.taken_over,
        "lost": max(0, expected_records - len(seen)) if finished else None,
    }


def _commit_violations(execs: list[tuple[Any, ...]], commits: list[tuple[Any, ...]]) -> list[str]:
    """Each batch committed exactly once (1 and 5): one commit row per batch number, one
    `committed` execution per commit row, and no execution that found a commit (with the store
    in the same database, a commit and its resolve are one transaction: there is none to find)."""
    violations = []
    for batch, n in Counter(batch for _, batch, _ in commits).items():
        if n > 1:
            violations.append(f"batch {batch} committed {n} times")
    committed_runs = Counter(r[0] for r in execs if r[6] == "committed")
    for promise_id, _, _ in commits:
        if committed_runs[promise_id] != 1:
            violations.append(f"{promise_id} has {committed_runs[promise_id]} committed executions")
    uncommitted = set(committed_runs) - {promise_id for promise_id, _, _ in commits}
    if uncommitted:
        violations.append(f"executions committed with no commit row: {sorted(uncommitted)[:5]}")
    for outcome, n in Counter(r[6] for r in execs if r[6] not in (None, "committed")).items():
        violations.append(f"{n} executions ended {outcome!r}: on PostgreSQL every batch execution "
                          "either commits or leaves no outcome")
    return violations


def _rows_match_commits(commits: list[tuple[Any, ...]], imported: list[tuple[int, int]],
                        skipped: list[tuple[int, int]]) -> list[str]:
    """Every row belongs to a committed batch, and each batch holds the rows its summary counts."""
    violations = []
    summaries = {batch: summary for _, batch, summary in commits}
    for table, rows, key in (("records", imported, "processed"), ("skipped", skipped, "skipped")):
        per_batch = Counter(batch for _, batch in rows)
        orphans = sorted(set(per_batch) - set(summaries))
        if orphans:
            violations.append(f"{table} rows of batches with no commit row: {orphans[:5]}")
        for batch, summary in sorted(summaries.items()):
            if per_batch[batch] != summary[key]:
                violations.append(f"batch {batch} has {per_batch[batch]} {table} rows, "
                                  f"its commit says {summary[key]}")
    return violations


def _totals_violations(commits: list[tuple[Any, ...]], expected_records: int, imported: int,
                       skipped: int) -> list[str]:
    """The finished import's totals (from its batches' commit rows) equal the input and the sink,
    and its batches are numbered 0..n-1 with none missing."""
    violations = []
    totals = {"records": expected_records, "processed": imported, "skipped": skipped}
    for key, want in totals.items():
        got = sum(summary[key] for _, _, summary in commits)
        if got != want:
            violations.append(f"the batches' {key} add up to {got}, not {want}")
    numbers = {batch for _, batch, _ in commits}
    missing = sorted(set(range(max(numbers, default=-1) + 1)) - numbers)
    if missing:
        violations.append(f"batches not committed: {missing[:5]}")
    return violations


def _read_promises(db: Any, root: str) -> dict[str, dict[str, Any]] | None:
    """The store's promises of the import, {id: {state, param, value, settled_at}}; None when
    the database holds the sink's tables alone (no store there to check)."""
    if not db.execute("SELECT to_regclass('promises') IS NOT NULL").fetchone()[0]:
        return None
    rows = db.execute("SELECT id, param, state, value, settled_at FROM promise_states "
                      "WHERE id = %s OR starts_with(id, %s)", (root, root + ".")).fetchall()
    return {pid: {"state": state, "param": param, "value": value, "settled_at": settled}
            for pid, param, state, value, settled in rows}


def _ran_after_resolve(execs: list[tuple[Any, ...]], batches: dict[int, dict[str, Any]]) -> list[str]:
    """Nothing done twice (1): no execution of a batch starts after its promise was resolved."""
    violations = []
    for _id, batch, _a, pid, started, _f, _o in execs:
        settled = batches.get(batch, {}).get("settled_at")
        if settled is not None and started > settled:
            violations.append(f"batch {batch} ran again (pid {pid}) after it was resolved")
    return violations


def _promise_checks(promises: dict[str, dict[str, Any]], root: str, commits: list[tuple[Any, ...]],
                    finished: bool) -> list[str]:
    """The store's promises against the sink. A batch's resolve commits with its commit row, so
    at any moment a batch's promise is resolved, with the commit's summary, exactly when the batch
    has a commit row; once finished, the root is resolved with the sink's totals."""
    violations = []
    batches = batch_promises(promises, root)
    summaries = {promise_id: summary for promise_id, _, summary in commits}
    resolved = {p["id"]: p["value"] for p in batches.values() if p["state"] == "resolved"}
    for promise_id in sorted(set(summaries) - set(resolved))[:5]:
        violations.append(f"{promise_id} has a commit row but its promise is not resolved")
    for promise_id in sorted(set(resolved) - set(summaries))[:5]:
        violations.append(f"{promise_id} is resolved but has no commit row")
    for promise_id in sorted(set(resolved) & set(summaries)):
        if resolved[promise_id] != summaries[promise_id]:
            violations.append(f"{promise_id} is resolved with {resolved[promise_id]}, "
                              f"its commit row says {summaries[promise_id]}")
    if not finished:
        return violations
    unresolved = sorted(b for b, p in batches.items() if p["state"] != "resolved")
    if unresolved:
        violations.append(f"batches not resolved: {unresolved[:5]}")
    root_promise = promises.get(root)
    if root_promise is None or root_promise["state"] != "resolved":
        violations.append(f"root {root} is not resolved")
        return violations
    result = root_promise["value"] if isinstance(root_promise["value"], dict) else {}
    expect = {"total_records": sum(s["records"] for s in summaries.values()),
              "total_processed": sum(s["processed"] for s in summaries.values()),
              "total_skipped": sum(s["skipped"] for s in summaries.values()),
              "batch_count": len(batches)}
    for key, want in expect.items():
        if result.get(key) != want:
            violations.append(f"summary {key} is {result.get(key)}, the sink says {want}")
    return violations


def _position_violations(seen: Counter[int], expected_records: int, finished: bool) -> list[str]:
    """Every input position imported or skipped exactly once (`seen` counts them); while the
    import is unfinished, only that none is there twice."""
    violations = []
    dupes = [p for p, n in seen.items() if n > 1]
    if dupes:
        violations.append(f"{len(dupes)} input records are in the sink more than once (e.g. {dupes[0]})")
    if finished:
        missing = expected_records - len(set(seen) & set(range(expected_records)))
        if missing:
            violations.append(
                f"{missing} of {expected_records} input records are neither imported nor skipped"
            )
        extra = set(seen) - set(range(expected_records))
        if extra:
            violations.append(f"{len(extra)} sink rows have positions outside the input")
    return violations


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most (start, end) spans that overlap at one moment (one ending as another starts
    does not overlap it)."""
    edges = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _one_process_at_a_time(execs: list[tuple[Any, ...]], batches: dict[int, dict[str, Any]]) -> list[str]:
    """Without a pool, each execution's pid is its worker's: forward progress (3) and one worker
    at a time (4) can be followed worker by worker."""
    violations = []
    # 3. Forward progress: each worker starts at the first batch that was unresolved when it
    #    started, and then moves forward one batch at a time.
    by_pid: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
    for row in execs:
        by_pid[row[3]].append(row)
    for pid, rows in by_pid.items():
        first_start = rows[0][4]
        resolved_before = sum(1 for p in batches.values()
                              if p["settled_at"] is not None and p["settled_at"] < first_start)
        if rows[0][1] != resolved_before:
            violations.append(f"worker {pid} started at batch {rows[0][1]}, "
                              f"not at the first unfinished batch {resolved_before}")
        for prev, cur in itertools.pairwise(rows):
            if cur[1] not in (prev[1], prev[1] + 1):
                violations.append(f"worker {pid} jumped from batch {prev[1]} to {cur[1]}")

    # 4. One worker at a time: once executions move on to another pid, the earlier pid never
    #    executes again.
    pids = [row[3] for row in execs]
    runs = [p for i, p in enumerate(pids) if i == 0 or p != pids[i - 1]]
    if len(runs) != len(set(runs)):
        violations.append("executions of two workers interleave")
    return violations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", type=Path, help="the import's state dir (store file, SQLite sink)")
    where.add_argument("--store", help="the PostgreSQL database of the store and the sink (postgresql://...)")
    p.add_argument("--id", required=True)
    p.add_argument("--records", type=int)
    p.add_argument("--input", type=Path)
    p.add_argument("--unfinished", action="store_true", help="the import may still be in progress")
    p.add_argument("--workers", type=int, help="the import's --workers (default 1; on PostgreSQL, "
                   "the fleet's executors, unchecked unless given)")
    args = p.parse_args(argv)
    if args.store is not None and not args.store.startswith(("postgresql://", "postgres://")):
        p.error(f"--store takes a postgresql:// URL, not {args.store!r}")
    try:
        source = None if args.input is None else recorded_source(
            args.state_dir if args.store is None else args.store, args.id)
        expected = count_input(args.records, args.input, source)
    except InputError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return 2
    if args.store is not None:
        verdict = audit_pg(args.store, args.id, expected, finished=not args.unfinished,
                           workers=args.workers)
    else:
        verdict = audit(args.state_dir, args.id, expected, finished=not args.unfinished,
                        workers=1 if args.workers is None else args.workers)
    print(json.dumps(verdict))
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
