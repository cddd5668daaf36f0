"""Issue 6, through the real CLI: hostile input files and damaged state dirs, one test per case.

Each test runs `python -m supervisor run ... --json` as a subprocess on files in its own
tmp_path and checks that the run ends either with the right result, or with a one-line error
naming what is wrong and where (file and line, promise id) and a non-zero exit code; and, from
the store and the sink, that no settled promise was lost or changed, no completed batch ran
again and no row was duplicated (scripts/audit.py, and the store's bytes before and after).

Cases of issue 6 tested elsewhere with real processes: usage errors (tests/supervisor/
test_sup_cli.py), a torn tail and kills during a store write (test_sup_random_kills.py), the
supervisor SIGKILLed and two supervisors at once (test_sup_supervisor_death.py), SIGTERM and
SIGINT (test_sup_signals.py), crash loops and a batch that always fails (test_sup_failures.py).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from plain_user import as_plain_user
from supervisor_helpers import Finished
from supervisor_helpers import child_env as _env

from store import Durability, JsonlStore
from store.codec import decode, encode
from workflow.importer.sink import open_read_only
from workflow.importer.sources import SEGMENT_BATCHES

STORE = "store.jsonl"
SINK = "import.db"
HEADER = "id,name,email\n"
TIMEOUT_S = 60.0
FAST = ("--max-restarts", "1", "--restart-backoff", "0", "--max-attempts", "2", "--retry-initial", "0")


# -- running the CLI ---------------------------------------------------------------------------


def cli(command: str, state_dir: Path, *args: str, env: dict[str, str] | None = None,
        preexec_fn: Any = None) -> Finished:
    """`python -m supervisor COMMAND --state-dir D ARGS`, run to its end from D's parent."""
    argv = [sys.executable, "-m", "supervisor", command, "--state-dir", str(state_dir), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(env), cwd=state_dir.parent,
                          timeout=TIMEOUT_S, check=False, preexec_fn=preexec_fn)
    report = None
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if len(lines) == 1:
        try:
            report = json.loads(lines[0])
        except json.JSONDecodeError:
            report = None
    return Finished(proc.returncode, report, proc.stdout, proc.stderr)


def run(state_dir: Path, *args: str, **kwargs: Any) -> Finished:
    return cli("run", state_dir, *args, "--json", **kwargs)


def limit_file_size(limit: int) -> Any:
    """preexec_fn: a full disk, as RLIMIT_FSIZE; the supervisor's workers inherit it."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_as_plain_user(state_dir: Path, *args: str) -> Finished:
    if os.geteuid() != 0:
        return run(state_dir, *args)
    try:
        return run(state_dir, *args, preexec_fn=as_plain_user)
    except subprocess.SubprocessError:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (no CAP_SETPCAP)")


def failpoints(*points: tuple[str, str, str]) -> dict[str, str]:
    entries = [{"name": name, "key": key, "action": action} for name, key, action in points]
    return {"DURABLE_FAILPOINTS": json.dumps(entries)}


# -- checks ------------------------------------------------------------------------------------


def assert_one_line_error(done: Finished, *names: str) -> str:
    """Exit 1, no traceback, stderr ending in one `error: ...` line naming every one of `names`,
    and (with --json) a one-object report on stdout carrying the same error."""
    assert "Traceback" not in done.stderr, done.describe()
    return assert_error_line(done, *names)


def assert_error_line(done: Finished, *names: str) -> str:
    """Exit 1 and stderr ending in one `error: ...` line naming every one of `names`, the only
    one (the worker that hit the error does not print it too), the same error in the --json
    report."""
    assert done.returncode == 1, done.describe()
    line = done.last_error_line
    assert line.startswith("error: "), done.describe()
    assert sum(x.startswith("error: ") for x in done.stderr.splitlines()) == 1, done.describe()
    for name in names:
        assert name in line, f"{name!r} not in the error line: {line}"
    assert done.report is not None, done.describe()
    assert done.report["ok"] is False
    assert all(name in done.report["error"] for name in names), done.report["error"]
    return line


def assert_finished(done: Finished, total: int) -> dict[str, Any]:
    assert done.returncode == 0, done.describe()
    assert done.report is not None and done.report["ok"] is True, done.describe()
    assert done.report["total_records"] == total
    assert done.report["total_processed"] + done.report["total_skipped"] == total
    return done.report


def assert_audit_ok(audit: ModuleType, state_dir: Path, root: str, total: int) -> dict[str, Any]:
    verdict = audit.audit(state_dir, root, total)
    assert verdict["ok"], verdict["violations"]
    assert (verdict["lost"], verdict["duplicate_rows"], verdict["reruns_of_completed_batches"]) == (0, 0, 0)
    assert verdict["imported"] + verdict["skipped"] == total
    return verdict


def settled(audit: ModuleType, state_dir: Path) -> dict[str, dict[str, Any]]:
    """The resolved promises of the store, folded by audit.py (independent of the engine)."""
    promises = audit.load_store(state_dir / STORE)
    return {pid: p for pid, p in promises.items() if p["state"] == "resolved"}


def assert_settled_kept(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> None:
    """Every promise resolved before is still there, resolved with the same value at the same time."""
    changed = [pid for pid, p in before.items() if after.get(pid) != p]
    assert not changed, f"settled promises lost or changed: {changed[:5]}"


def sink_tables(state_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the sink's four tables (to prove a refused run wrote nothing)."""
    path = state_dir / SINK
    if not path.exists():
        return {}
    db = open_read_only(path)
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in ("records", "skipped", "batch_commits", "executions")}
    finally:
        db.close()


def query(state_dir: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    db = open_read_only(state_dir / SINK)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def batch_runs(state_dir: Path, root: str) -> dict[int, list[str | None]]:
    """{batch: [outcome of each execution, in order]} from the sink's executions table."""
    runs: dict[int, list[str | None]] = {}
    for batch, outcome in query(state_dir, "SELECT batch, outcome FROM executions "
                                "WHERE promise_id LIKE ? ORDER BY id", root + ".%"):
        runs.setdefault(batch, []).append(outcome)
    return runs


def torn_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob(f"{STORE}.torn-*"))


def rewrite_store_line(path: Path, select: Any, change: Any) -> int:
    """Re-encode (with a valid checksum) the first record for which `select(record)` holds,
    after `change(record)`; return its line number."""
    lines = path.read_bytes().splitlines(keepends=True)
    for n, line in enumerate(lines, 1):
        record = decode(line.rstrip(b"\n"))
        if select(record):
            change(record)
            lines[n - 1] = encode(record)
            path.write_bytes(b"".join(lines))
            return n
    raise AssertionError("no such record in the store")


def flip_byte_in_line(path: Path, lineno: int, column: int = 12) -> None:
    data = bytearray(path.read_bytes())
    offset = 0
    for _ in range(lineno - 1):
        offset = data.index(b"\n", offset) + 1
    data[offset + column] ^= 0x01
    path.write_bytes(bytes(data))


def synthetic(records: int, batch_size: int) -> tuple[tuple[str, ...], str]:
    """CLI arguments of a synthetic import, and its default id."""
    return ("--records", str(records), "--batch-size", str(batch_size)), \
        f"import/synthetic-{records}"


# == 1. Input files: file-level problems stop the run before anything is written ===============

DIR, LOOP = object(), object()
GOOD_ROW = "1,Ann,ann@example.com\n"

FILE_PROBLEMS: list[tuple[str, str, Any, str, int | None]] = [
    # (case, file name, content (None: no file), what the error says, line it names)
    ("missing", "absent.csv", None, "no such file", None),
    ("a-directory", "folder.csv", DIR, "is a directory", None),
    ("unreadable-symlink-loop", "loop.csv", LOOP, "cannot read (Too many levels of symbolic links)", None),
    ("empty-csv", "empty.csv", b"", "file is empty", None),
    ("empty-jsonl", "empty.jsonl", b"", "file is empty", None),
    ("unknown-extension", "people.txt", (HEADER + GOOD_ROW).encode(), "unknown extension '.txt'", None),
    ("no-extension", "people", (HEADER + GOOD_ROW).encode(), "unknown extension ''", None),
    ("csv-missing-column", "in.csv", b"id,name\n1,Ann\n", "header lacks the column(s) email", 1),
    ("csv-missing-columns", "in.csv", b"name\nAnn\n", "header lacks the column(s) id, email", 1),
    ("csv-repeated-column", "in.csv", b"id,name,email,name\n1,a,a@b.io,b\n",
     "header repeats the column(s) name", 1),
    ("csv-only-blank-lines", "in.csv", b"\n\n\n", "has no header line", None),
    ("csv-malformed-quote", "in.csv", (HEADER + GOOD_ROW + '2,"Bo"x,bo@example.com\n').encode(),
     "malformed CSV", 3),
    ("csv-unclosed-quote", "in.csv", (HEADER + GOOD_ROW + '2,"Bo,bo@example.com\n3,Cy,cy@x.io\n').encode(),
     "malformed CSV (a quoted field that starts on this line is never closed)", 3),
    ("csv-invalid-utf8", "in.csv", (HEADER + GOOD_ROW).encode() + b"2,\xff\xfe,bo@example.com\n",
     "not valid UTF-8", 3),
    ("csv-latin-1", "in.csv", (HEADER + GOOD_ROW + "2,Jos\xe9,jose@example.com\n").encode("latin-1"),
     "not valid UTF-8", 3),
    ("csv-utf-16", "in.csv", (HEADER + GOOD_ROW).encode("utf-16"),
     "UTF-16 files are not supported", 1),
    ("jsonl-invalid-utf8", "in.jsonl",
     b'{"id": 1, "name": "Ann", "email": "ann@example.com"}\n\n{"id": "\xc3\x28"}\n', "not valid UTF-8", 3),
]


def _make_input(base: Path, name: str, content: Any) -> Path:
    path = base / name
    if content is DIR:
        path.mkdir()
    elif content is LOOP:
        path.symlink_to(path.name)
    elif content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case, name, content, message, line", FILE_PROBLEMS,
                         ids=[case[0] for case in FILE_PROBLEMS])
def test_bad_input_file_is_a_one_line_error_naming_file_and_line(
    tmp_path: Path, case: str, name: str, content: Any, message: str, line: int | None
) -> None:
    base = tmp_path.resolve()
    path = _make_input(base, name, content)
    state_dir = base / "state"

    done = run(state_dir, "--input", str(path), "--batch-size", "1")

    where = f"{path}:{line}: " if line is not None else f"{path}: "
    error = assert_one_line_error(done, where, message)
    assert error.startswith(f"error: {where}"), error
    assert not state_dir.exists()  # stopped before a store, a sink or a batch was made


def test_unreadable_input_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path.resolve() / "locked.csv"
    path.write_text(HEADER + GOOD_ROW)
    path.chmod(0o000)
    state_dir = tmp_path.resolve() / "state"

    done = run_as_plain_user(state_dir, "--input", str(path))

    assert_one_line_error(done, f"{path}: cannot read (Permission denied)")
    assert not state_dir.exists()


def test_bad_line_deep_in_the_file_stops_the_run_before_any_batch(
    tmp_path: Path, audit: ModuleType
) -> None:
    """The error is at line 452 of 600, in batch 45 of 60: no batch of it may commit, and an
    import that already lives in the state dir is left exactly as it was."""
    state_dir = tmp_path / "state"
    sizes, other_root = synthetic(200, 50)
    assert_finished(run(state_dir, *sizes), 200)
    store_before, sink_before = (state_dir / STORE).read_bytes(), sink_tables(state_dir)
    rows = [f"{i},Name {i},user{i}@example.com\n".encode() for i in range(600)]
    rows[450] = b"450,Jos\xe9,jose@example.com\n"  # line 452: the header is line 1
    path = tmp_path.resolve() / "people.csv"
    path.write_bytes(HEADER.encode() + b"".join(rows))

    done = run(state_dir, "--input", str(path), "--batch-size", "10")

    assert_one_line_error(done, f"{path}:452: not valid UTF-8")
    assert (state_dir / STORE).read_bytes() == store_before
    assert sink_tables(state_dir) == sink_before
    assert_audit_ok(audit, state_dir, other_root, 200)


def test_bad_line_beyond_the_first_plan_segment_rejects_the_import_keeping_its_batches(
    tmp_path: Path, audit: ModuleType
) -> None:
    """Planning goes a segment at a time: a broken line beyond the first segment is found when
    the worker plans that far. The import is rejected naming the file and line; the batches
    before it stay committed, and nothing of a batch after it is."""
    state_dir = tmp_path / "state"
    rows = [f"{i},Name {i},user{i}@example.com\n".encode() for i in range(SEGMENT_BATCHES + 20)]
    rows[SEGMENT_BATCHES + 10] = b'1,"Ann"x,ann@example.com\n'
    path = tmp_path.resolve() / "people.csv"
    path.write_bytes(HEADER.encode() + b"".join(rows))

    done = run(state_dir, "--input", str(path), "--batch-size", "1")

    line = assert_one_line_error(done, f"{path}:{SEGMENT_BATCHES + 12}: malformed CSV",
                                 "fix the file and import it under a new id (add --id NEW")
    assert line.startswith(f"error: {path}:") and "Error:" not in line and "retry" not in line
    assert query(state_dir, "SELECT COUNT(*) FROM batch_commits") == [(SEGMENT_BATCHES,)]
    assert query(state_dir, "SELECT MAX(position) FROM records") == [(SEGMENT_BATCHES - 1,)]
    root = next(pid for pid in audit.load_store(state_dir / STORE) if "." not in pid)
    assert audit.audit(state_dir, root, SEGMENT_BATCHES, finished=False)["ok"]


def test_bad_byte_beyond_the_first_plan_segment_says_how_to_import_the_file_again(
    tmp_path: Path, audit: ModuleType
) -> None:
    """A latin-1 byte found after batches committed: the import cannot change its encoding, so
    the error names the byte and the command that works, which then imports the rest."""
    state_dir = tmp_path / "state"
    count = SEGMENT_BATCHES + 20
    rows = [f"{i},Name {i},user{i}@example.com\n".encode() for i in range(count)]
    rows[SEGMENT_BATCHES + 10] = f"{SEGMENT_BATCHES + 10},Jos\xe9,jose@example.com\n".encode("latin-1")
    path = tmp_path.resolve() / "people.csv"
    path.write_bytes(HEADER.encode() + b"".join(rows))

    done = run(state_dir, "--input", str(path), "--batch-size", "1")

    line = assert_one_line_error(
        done, f"{path}:{SEGMENT_BATCHES + 12}: not valid UTF-8 (byte 0xe9 at byte ",
        "import it again under a new id with --encoding latin-1 --id NEW")
    assert line.startswith(f"error: {path}:") and "Error:" not in line and "retry" not in line
    status = cli("status", state_dir)  # no retry offered: none gets past that line
    assert status.returncode == 0 and "retry" not in status.stdout, status.stdout
    retried = cli("retry", state_dir)
    assert retried.returncode == 1 and "cannot be resumed by a retry" in retried.stderr, retried.stderr
    assert "--encoding latin-1 --id NEW" in retried.stderr
    again = run(state_dir, "--input", str(path), "--batch-size", "1", "--encoding", "latin-1",
                "--id", "import/again")
    assert again.returncode == 0, again.describe()
    assert query(state_dir, "SELECT COUNT(*) FROM records") == [(count,)]
    assert query(state_dir, "SELECT name FROM records WHERE position = ? AND import_id = ?",
                 SEGMENT_BATCHES + 10, "import/again") == [("Jos\xe9",)]


def test_csv_field_beyond_the_parsers_limit_is_a_one_line_error(tmp_path: Path) -> None:
    """A field over 64 KiB is a skipped row (below); one over the CSV reader's own 64 MiB limit
    stops the import with the file and line."""
    path = tmp_path.resolve() / "huge.csv"
    with path.open("w") as f:
        f.write(HEADER + GOOD_ROW)
        f.write("2," + "x" * (64 * 1024 * 1024 + 1) + ",bo@example.com\n")
        f.write("3,Cy,cy@example.com\n")
    state_dir = tmp_path / "state"

    done = run(state_dir, "--input", str(path))

    assert_one_line_error(done, f"{path}:3: malformed CSV (field larger than field limit")
    assert not state_dir.exists()


def test_bad_header_after_blank_lines_names_the_header_line(tmp_path: Path) -> None:
    path = tmp_path.resolve() / "in.csv"
    path.write_text("\n\nid,name\n1,Ann\n")
    done = run(tmp_path / "state", "--input", str(path))
    assert_one_line_error(done, f"{path}:3: header lacks the column(s) email")


# == 1. Input files: row-level problems are skipped, counted by reason, and named by line ======

BIG = "x" * 70_000  # over the 64 KiB field limit
EDGE = "y" * 65_536  # exactly at the limit: still imported


def _jsonl(*values: Any) -> str:
    return "".join((v if isinstance(v, str) else json.dumps(v)) + "\n" for v in values)


def _person(i: int, **fields: Any) -> dict[str, Any]:
    return {"id": i, "name": f"P{i}", "email": f"p{i}@example.com", **fields}


@dataclass(frozen=True)
class RowCase:
    name: str
    file: str
    content: str
    total: int
    skipped: list[tuple[int, str | None, str]]  # (line, record id, reason), in input order
    batch_size: int = 2
    args: tuple[str, ...] = ()
    imported: list[tuple[str, str]] | None = None  # (id, name) of the imported records, if checked


ROW_CASES = [
    RowCase("csv-extra-header-column-is-kept", "in.csv",
            "id,name,email,city\n1,Ann,ann@example.com,Oslo\n2,Bo,bo@example.com,Rome\n", 2, []),
    RowCase("csv-row-missing-a-cell", "in.csv",
            HEADER + GOOD_ROW + "2,Bo\n3,Cy,cy@example.com\n", 3, [(3, "2", "wrong_field_count")]),
    RowCase("csv-row-with-an-extra-cell", "in.csv",
            HEADER + GOOD_ROW + "2,Bo,bo@example.com,surplus\n3,Cy,cy@example.com\n", 3,
            [(3, "2", "wrong_field_count")]),
    RowCase("csv-header-only", "in.csv", HEADER, 0, []),
    RowCase("csv-header-only-crlf-bom", "in.csv", "\ufeffid,name,email\r\n", 0, []),
    RowCase("csv-blank-lines-are-not-records", "in.csv",
            "\n" + HEADER + "\n" + GOOD_ROW + "\n\n" + '2,"Bo\n\nEk",bo@example.com\n\n' + "3,Cy,cy-at-x\n",
            3, [(11, "3", "invalid_email")]),
    RowCase("csv-missing-id-and-name", "in.csv",
            HEADER + GOOD_ROW + ",Bo,bo@example.com\n3,,cy@example.com\n3, ,cy@example.com\n", 4,
            [(3, "", "missing_id"), (4, "3", "missing_name"), (5, "3", "missing_name")]),
    RowCase("jsonl-malformed-line", "in.jsonl",
            _jsonl(_person(1), '{"id": 2, "name": "Bo"', "{'id': 3}", _person(4)), 4,
            [(2, None, "malformed_json"), (3, None, "malformed_json")]),
    RowCase("jsonl-non-object-lines", "in.jsonl",
            _jsonl(_person(1), [1, 2], '"a string"', 42, None, _person(6)), 6,
            [(2, None, "not_an_object"), (3, None, "not_an_object"), (4, None, "not_an_object"),
             (5, None, "not_an_object")]),
    RowCase("jsonl-blank-lines-are-not-records", "in.jsonl",
            "\n" + _jsonl(_person(1)) + "\n   \n\t\n" + _jsonl(_person(2)) + "\n\n", 2, []),
    RowCase("csv-duplicate-ids-first-wins", "in.csv",
            HEADER + "1,First,a@example.com\n2,Bo,b@example.com\n1,Second,c@example.com\n"
            "3,Cy,d@example.com\n2,Bo again,e@example.com\n1,Third,f@example.com\n", 6,
            [(4, "1", "duplicate_id"), (6, "2", "duplicate_id"), (7, "1", "duplicate_id")],
            args=("--kill-at-batch", "1"),
            imported=[("1", "First"), ("2", "Bo"), ("3", "Cy")]),
    RowCase("jsonl-duplicate-ids-first-wins", "in.jsonl",
            _jsonl(_person(1, name="First"), _person(2), _person(1, name="Second"), _person(2)), 4,
            [(3, "1", "duplicate_id"), (4, "2", "duplicate_id")], batch_size=1,
            imported=[("1", "First"), ("2", "P2")]),
    RowCase("csv-very-large-field", "in.csv",
            HEADER + GOOD_ROW + f"2,{BIG},bo@example.com\n3,{EDGE},cy@example.com\n", 3,
            [(3, "2", "field_too_large")]),
    RowCase("jsonl-very-large-field", "in.jsonl",
            _jsonl(_person(1), _person(2, bio=BIG), _person(3, name=EDGE), {"id": BIG}), 4,
            [(2, "2", "field_too_large"), (4, BIG, "field_too_large")]),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=[c.name for c in ROW_CASES])
def test_bad_rows_are_skipped_and_counted_by_reason_with_their_line(
    tmp_path: Path, audit: ModuleType, case: RowCase
) -> None:
    path = tmp_path.resolve() / case.file
    path.write_text(case.content, encoding="utf-8")
    state_dir = tmp_path / "state"

    done = run(state_dir, "--input", str(path), "--batch-size", str(case.batch_size), *case.args)

    report = assert_finished(done, case.total)
    root = report["id"]
    reasons: dict[str, int] = {}
    for _, _, reason in case.skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    assert report["skipped_reasons"] == dict(sorted(reasons.items()))
    assert report["total_skipped"] == len(case.skipped)
    assert report["batch_count"] == -(-case.total // case.batch_size)
    assert len(report["kills"]) == case.args.count("--kill-at-batch")
    skipped = query(state_dir, "SELECT line, record_id, reason FROM skipped WHERE import_id = ? "
                    "ORDER BY position", root)
    assert skipped == case.skipped
    if case.imported is not None:
        assert query(state_dir, "SELECT id, name FROM records WHERE import_id = ? ORDER BY position",
                     root) == case.imported
    assert all(outcomes[-1] in ("committed", "found_commit")
               for outcomes in batch_runs(state_dir, root).values())
    assert_audit_ok(audit, state_dir, root, case.total)


# == 3. The store: damage, another workflow or input under the id, unusable paths, a full disk ==


def _finished_import(state_dir: Path, records: int = 300,
                     batch_size: int = 50) -> tuple[tuple[str, ...], str]:
    sizes, root = synthetic(records, batch_size)
    assert_finished(run(state_dir, *sizes), records)
    return sizes, root


@pytest.mark.parametrize("which", ["same-import", "another-import"])
def test_store_damaged_before_its_last_line_is_refused_and_left_untouched(
    tmp_path: Path, audit: ModuleType, which: str
) -> None:
    state_dir = tmp_path / "state"
    sizes, _ = _finished_import(state_dir)
    store = (state_dir / STORE).resolve()
    flip_byte_in_line(store, 3)
    before, sink_before = store.read_bytes(), sink_tables(state_dir)
    if which == "another-import":
        sizes, _ = synthetic(100, 10)

    done = run(state_dir, *sizes)

    assert done.returncode != 0, done.describe()
    assert f"{store}:3: store is damaged" in done.last_error_line, done.describe()
    assert store.read_bytes() == before
    assert torn_files(state_dir) == []
    assert sink_tables(state_dir) == sink_before  # no batch ran


def test_store_damaged_before_its_last_line_is_a_one_line_error(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    sizes, _ = _finished_import(state_dir)
    store = (state_dir / STORE).resolve()
    flip_byte_in_line(store, 3)
    assert_one_line_error(run(state_dir, *sizes), f"{store}:3: store is damaged")


def _store_path_is_a_directory(state_dir: Path) -> tuple[str, str]:
    (state_dir / STORE).mkdir(parents=True)
    return str((state_dir / STORE).resolve()), "is a directory"


def _state_dir_is_a_file(state_dir: Path) -> tuple[str, str]:
    state_dir.write_text("not a directory\n")
    return str(state_dir), "not a directory"


def _state_dir_is_read_only(state_dir: Path) -> tuple[str, str]:
    _finished_import(state_dir)
    for lock in state_dir.glob("*.lock*"):  # as if copied here: no lock files yet
        lock.unlink()
    state_dir.chmod(0o555)
    return str(state_dir.resolve()), "Permission denied"


def _sink_is_a_directory(state_dir: Path) -> tuple[str, str]:
    (state_dir / SINK).mkdir(parents=True)
    return str((state_dir / SINK).resolve()), "cannot open the import database"


def _sink_is_not_a_database(state_dir: Path) -> tuple[str, str]:
    state_dir.mkdir(parents=True)
    (state_dir / SINK).write_bytes(b"these bytes are not a SQLite database\n" * 200)
    return str((state_dir / SINK).resolve()), "file is not a database"


UNUSABLE = {  # case: (make the state dir unusable, run as a user that obeys file modes)
    "store-path-is-a-directory": (_store_path_is_a_directory, False),
    "sink-is-a-directory": (_sink_is_a_directory, False),
    "sink-is-not-a-database": (_sink_is_not_a_database, False),
    "state-dir-is-a-file": (_state_dir_is_a_file, False),
    "state-dir-is-read-only": (_state_dir_is_read_only, True),
}


def _run_on_unusable(tmp_path: Path, case: str) -> tuple[Finished, Path, str, str, bytes | None]:
    state_dir = tmp_path.resolve() / "state"
    make_unusable, plain_user = UNUSABLE[case]
    where, what = make_unusable(state_dir)
    store = state_dir / STORE
    before = store.read_bytes() if store.is_file() else None
    sizes, _ = synthetic(300, 50)
    try:
        done = run_as_plain_user(state_dir, *sizes) if plain_user else run(state_dir, *sizes)
    finally:
        if state_dir.is_dir():
            state_dir.chmod(0o755)
    return done, state_dir, where, what, before


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_unusable_state_dir_fails_and_changes_nothing(tmp_path: Path, case: str) -> None:
    done, state_dir, where, what, before = _run_on_unusable(tmp_path, case)

    if case == "state-dir-is-read-only" and done.returncode == 0:  # the stored result will do too
        assert done.report is not None and done.report["total_records"] == 300, done.describe()
    else:
        assert done.returncode != 0, done.describe()
        assert where in done.stderr and what in done.stderr, done.describe()
    if case == "store-path-is-a-directory":
        assert list((state_dir / STORE).iterdir()) == []
        assert not (state_dir / SINK).exists()
    elif case == "state-dir-is-a-file":
        assert state_dir.read_text() == "not a directory\n"
    elif case.startswith("sink-"):  # refused at once: one worker, no restart loop, nothing settled
        assert len(done.report["children"]) == 1 and "Traceback" not in done.stderr, done.describe()
        assert all(not line.endswith('"resolve"}') for line in (state_dir / STORE).read_text().splitlines())
    else:
        assert (state_dir / STORE).read_bytes() == before


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_unusable_state_dir_is_a_one_line_error(tmp_path: Path, case: str) -> None:
    done, _, where, _, _ = _run_on_unusable(tmp_path, case)
    if case == "state-dir-is-read-only" and done.returncode == 0:  # the stored result will do too
        assert done.report is not None and done.report["total_records"] == 300, done.describe()
        return
    assert_one_line_error(done, where)


@pytest.mark.parametrize("state", ["finished", "failed"])
def test_same_id_with_another_input_file_is_refused_naming_both(
    tmp_path: Path, audit: ModuleType, state: str
) -> None:
    first, second = tmp_path.resolve() / "first.csv", tmp_path.resolve() / "second.csv"
    first.write_text(HEADER + "".join(f"{i},N{i},u{i}@example.com\n" for i in range(20)))
    second.write_text(HEADER + "".join(f"{i},M{i},v{i}@example.com\n" for i in range(30)))
    state_dir, root = tmp_path / "state", "import/people"
    if state == "finished":
        assert_finished(run(state_dir, "--input", str(first), "--id", root, "--batch-size", "5"), 20)
    else:  # batch 2 fails for good: batches 0 and 1 stay resolved, the import rejected
        failed = run(state_dir, "--input", str(first), "--id", root, "--batch-size", "5",
                     "--max-attempts", "1", env=failpoints(("batch.fail", "2/1", "raise")))
        assert failed.returncode == 1, failed.describe()
    store_before, sink_before = (state_dir / STORE).read_bytes(), sink_tables(state_dir)

    done = run(state_dir, "--input", str(second), "--id", root, "--batch-size", "5")

    assert_one_line_error(done, root, "already exists", str(first), str(second))
    assert (state_dir / STORE).read_bytes() == store_before
    assert sink_tables(state_dir) == sink_before
    if state == "finished":
        assert_audit_ok(audit, state_dir, root, 20)


def test_store_of_another_workflow_version_is_refused_naming_both(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    sizes, root = _finished_import(state_dir)
    store = state_dir / STORE
    rewrite_store_line(store, lambda r: r["op"] == "create" and r["id"] == root,
                       lambda r: r["param"].update(v=3))
    before, sink_before = store.read_bytes(), sink_tables(state_dir)

    done = run(state_dir, *sizes)

    assert_one_line_error(done, root, "recorded with import_records v3", "(it has v1, v2)",
                          "keep v3 registered")
    assert store.read_bytes() == before
    assert sink_tables(state_dir) == sink_before
    assert_audit_ok(audit, state_dir, root, 300)


def test_step_recorded_by_another_version_is_non_determinism_naming_the_promise(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    sizes, root = synthetic(300, 50)
    failed = run(state_dir, *sizes, "--max-attempts", "1", env=failpoints(("batch.fail", "3/1", "raise")))
    assert failed.returncode == 1, failed.describe()
    assert cli("retry", state_dir, "--id", root).returncode == 0  # pending again, batches 0-2 resolved
    store = state_dir / STORE
    batch_1 = audit.batch_promises(audit.load_store(store), root)[1]["id"]
    rewrite_store_line(store, lambda r: r["op"] == "create" and r["id"] == batch_1,
                       lambda r: r["param"].update(v=2))
    before, sink_before = store.read_bytes(), sink_tables(state_dir)

    done = run(state_dir, *sizes)

    assert_one_line_error(done, batch_1, "process_batch v2", "process_batch v1")
    assert "non-deterministic" in done.last_error_line
    assert store.read_bytes() == before
    assert sink_tables(state_dir) == sink_before
    assert audit.audit(state_dir, root, 300, finished=False)["ok"]


def test_disk_full_while_writing_the_store_then_a_later_run_finishes(
    tmp_path: Path, audit: ModuleType
) -> None:
    """The store is the file that hits the limit: a state dir with a long history (padded with
    another workflow's promises) is larger than anything the sink writes in this run."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    store = (state_dir / STORE).resolve()
    with JsonlStore(store, durability=Durability.NONE) as padding:
        for i in range(600):
            padding.create(f"earlier/{i}", i)
            padding.resolve(f"earlier/{i}", "v" * 1000)
    sizes, root = synthetic(400, 20)
    before = settled(audit, state_dir)

    full = run(state_dir, *sizes, *FAST, preexec_fn=limit_file_size(store.stat().st_size + 3000))

    assert_one_line_error(full, str(store))
    assert full.report["children"][-1]["executed"], "the limit should hit mid-run, after a batch"
    # The store opens: every line whole and checksummed (audit.py raises on a damaged one).
    assert store.read_bytes().endswith(b"\n")
    assert torn_files(state_dir) == []
    middle = settled(audit, state_dir)
    assert_settled_kept(before, middle)
    done_before = set(audit.batch_promises(middle, root))
    assert done_before == set(range(len(done_before)))

    rerun = run(state_dir, *sizes)

    assert_finished(rerun, 400)
    assert_settled_kept(middle, settled(audit, state_dir))
    assert rerun.report["children"][0]["replayed"] == len(done_before)
    runs = batch_runs(state_dir, root)
    assert all(runs[b] == ["committed"] for b in done_before)
    assert_audit_ok(audit, state_dir, root, 400)


SINK_LIMIT = 200_000  # the sink's WAL reaches this during the third batch of 100 records


def _sink_fills_up(state_dir: Path) -> tuple[Finished, tuple[str, ...], str]:
    sizes, root = synthetic(2000, 100)
    return run(state_dir, *sizes, *FAST, preexec_fn=limit_file_size(SINK_LIMIT)), sizes, root


def test_disk_full_while_writing_the_sink_then_retry_and_a_later_run_finish(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    full, sizes, root = _sink_fills_up(state_dir)

    assert full.returncode == 1, full.describe()
    assert "Traceback" not in full.stderr
    batches = audit.batch_promises(audit.load_store(state_dir / STORE), root)
    [k] = [b for b, p in batches.items() if p["state"] == "rejected"]
    assert f"({batches[k]['id']}) failed after 1 attempt:" in full.last_error_line, full.describe()
    assert f"retry --id {root}" in full.last_error_line
    assert k >= 1, "the limit should hit after some batches committed"
    before = settled(audit, state_dir)
    assert set(audit.batch_promises(before, root)) == set(range(k))
    assert query(state_dir, "SELECT COUNT(*) FROM batch_commits") == [(k,)]

    assert cli("retry", state_dir, "--id", root).returncode == 0
    rerun = run(state_dir, *sizes)

    assert_finished(rerun, 2000)
    assert rerun.report["children"][0]["replayed"] == k
    assert_settled_kept(before, settled(audit, state_dir))
    runs = batch_runs(state_dir, root)
    assert all(runs[b] == ["committed"] for b in range(k))
    assert runs[k][-1] == "committed" and runs[k].count("committed") == 1
    assert_audit_ok(audit, state_dir, root, 2000)


def test_disk_full_while_writing_the_sink_names_the_real_cause(tmp_path: Path) -> None:
    full, _, _ = _sink_fills_up(tmp_path / "state")
    assert full.returncode == 1, full.describe()
    assert "cannot rollback" not in full.stderr, full.last_error_line
    assert "disk I/O error" in full.last_error_line or "full" in full.last_error_line


def test_disk_full_before_the_sink_opens_is_one_fatal_line_then_a_later_run_finishes(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    sizes, root = synthetic(500, 100)

    full = run(state_dir, *sizes, *FAST, preexec_fn=limit_file_size(8192))

    # A sink that cannot be opened is fatal at once: one line naming import.db, no restart loop.
    assert_error_line(full, "import.db", "cannot open the import database")
    assert "Traceback" not in full.stderr and "restarting" not in full.stderr
    assert len(full.report["children"]) == 1
    assert audit.load_store(state_dir / STORE) == {} or all(
        p["state"] == "pending" for p in audit.load_store(state_dir / STORE).values())

    rerun = run(state_dir, *sizes)

    assert_finished(rerun, 500)
    assert_audit_ok(audit, state_dir, root, 500)
