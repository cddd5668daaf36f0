"""`python -m supervisor run` on real-world files, with real processes: a Faker-made, gzipped,
Latin-1, `;`-delimited CSV whose columns are mapped with --map, killed mid-import; one-line
errors for a header that cannot be mapped and a file in another encoding; and the default-id
rule (the content names the import: another batch size or path is refused in one line, an id
earlier versions derived is continued)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import signal
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import psycopg
from faker import Faker
from supervisor_helpers import (
    Finished,
    assert_report_matches_sink,
    batch_attempts,
    run_cli,
    run_import,
    start_import,
    store_promises,
    wait_until,
)
from test_sup_exec import supervisor

BROKEN_EMAILS = ["x@example.net.", "hsmith,@example.com", "ann@", "bo@@example.com", "cy example.com"]
MAP = "id=user_id,name=full name,email=MAIL"


@dataclass
class People:
    path: Path
    rows: int
    duplicates: int  # rows whose id is an earlier row's, padded with spaces
    broken: int  # rows with a malformed email
    names: dict[str, str]  # id -> name, of the rows that import


def write_people(path: Path, rows: int, *, seed: int, encoding: str = "latin-1") -> People:
    """A realistic export: accented names, `;` delimiter, a header in its own words and case,
    every 40th id repeating an earlier one with spaces around it, every 25th email broken."""
    fake = Faker(["de_DE", "fr_FR", "es_ES"])
    fake.seed_instance(seed)
    lines, names, duplicates, broken = ["User_ID;Full Name;Mail;City"], {}, 0, 0
    for i in range(rows):
        name = fake.name().encode(encoding, "replace").decode(encoding)
        record_id = f"u{i}"
        if i % 40 == 39:
            record_id, duplicates = f"  u{i - 7} ", duplicates + 1
        if i % 25 == 24 and i % 40 != 39:
            email, broken = BROKEN_EMAILS[i % len(BROKEN_EMAILS)], broken + 1
        else:
            email = f"user{i}@{fake.free_email_domain()}"
            if i % 40 != 39:
                names[record_id] = name
        lines.append(f'{record_id};"{name}";{email};"{fake.city()}"')
    data = ("\n".join(lines) + "\n").encode(encoding)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return People(path, rows, duplicates, broken, names)


def default_id(path: Path) -> str:
    return f"import/{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


def one_error_line(run: Finished) -> str:
    """The run's error, printed exactly once, on one line."""
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, run.describe()
    return errors[0]


def sink_names(state_dir: Path, root: str) -> dict[str, str]:
    with sqlite3.connect(state_dir / "import.db") as db:
        return dict(db.execute("SELECT id, name FROM records WHERE import_id = ?", (root,)))


def test_a_faker_made_gzipped_latin1_semicolon_csv_with_mapped_columns_imports_under_kills(
    tmp_path: Path, audit: ModuleType
) -> None:
    people = write_people(tmp_path / "export.csv.gz", 2000, seed=13)
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--input", str(people.path), "--map", MAP, "--encoding", "latin-1",
                     "--batch-size", "150", "--kill-at-batch", "4", "--kill-random", "2", "--seed", "7")

    assert run.returncode == 0, run.describe()
    report = run.report
    root = default_id(people.path)
    assert report["id"] == root
    assert report["total_records"] == people.rows
    assert report["skipped_reasons"] == {"duplicate_id": people.duplicates, "invalid_email": people.broken}
    assert report["total_processed"] == len(people.names)
    assert sink_names(state_dir, root) == people.names  # accents decoded, ids trimmed
    assert_report_matches_sink(report, state_dir, root)
    verdict = audit.audit(state_dir, root, people.rows)
    assert verdict["ok"], verdict["violations"]


def test_a_header_that_cannot_be_mapped_is_one_line_showing_it_and_suggesting_map(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("user_id,full_name,mail\n1,Ann,ann@example.com\n")
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--input", str(path))
    assert run.returncode == 1
    assert one_error_line(run) == (
        f"error: {path}:1: header lacks the column(s) id, name, email (found: user_id,full_name,mail); "
        "name the columns with --map id=COLUMN,name=COLUMN,email=COLUMN")
    assert not state_dir.exists()  # refused before anything was written


def test_a_file_in_another_encoding_is_one_line_naming_file_line_and_the_flag(tmp_path: Path) -> None:
    people = write_people(tmp_path / "export.csv", 50, seed=3)
    run = run_import(tmp_path / "state", "--input", str(people.path), "--map", MAP)
    assert run.returncode == 1
    line = one_error_line(run)
    assert line.startswith(f"error: {people.path}:") and "not valid UTF-8" in line
    assert line.endswith("give the file's encoding with --encoding latin-1")


def test_bad_reading_flags_are_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,name,email\n1,Ann,ann@example.com\n")
    for flags, message in [(("--map", "id"), "expected FIELD=COLUMN pairs"),
                           (("--delimiter", "ab"), "a delimiter is one character"),
                           (("--encoding", "utf-16"), "encoding 'utf-16' is not supported")]:
        run = run_import(tmp_path / "state", "--input", str(path), *flags)
        assert run.returncode == 2 and message in run.stderr, run.describe()
    synthetic = run_import(tmp_path / "state", "--records", "10", "--encoding", "latin-1")
    assert synthetic.returncode == 2 and "say how to read an --input file" in synthetic.stderr


def _interrupted_import(state_dir: Path, audit: ModuleType, root: str, *args: str) -> None:
    """Run an import and SIGTERM its supervisor while batch 2 lingers: it stays pending."""
    linger = {"DURABLE_FAILPOINTS": json.dumps(
        [{"name": "batch.mid", "key": "2", "action": "delay", "seconds": 1.5}])}
    sup = start_import(state_dir, *args, env=linger)
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, root, 2) >= 1, "batch 2 starts")
        sup.process.send_signal(signal.SIGTERM)
        assert sup.finish().returncode == 143
    finally:
        sup.close()
    assert store_promises(audit, state_dir)[root]["state"] == "pending"


def test_the_content_names_the_import_another_batch_size_or_path_is_refused_in_one_line(
    tmp_path: Path, audit: ModuleType
) -> None:
    people = write_people(tmp_path / "people.csv", 400, seed=5, encoding="utf-8")
    state_dir = tmp_path / "state"
    root = default_id(people.path)
    flags = ("--input", str(people.path), "--map", MAP)
    _interrupted_import(state_dir, audit, root, *flags, "--batch-size", "40")
    before = store_promises(audit, state_dir)

    other_size = run_import(state_dir, *flags, "--batch-size", "50")
    assert other_size.returncode == 1
    assert one_error_line(other_size) == (
        f"error: import {root} already exists (pending), started with --batch-size 40: give the same "
        "to continue it (or to see its result), or add --id NEW to start a new import")
    other_map = run_import(state_dir, "--input", str(people.path), "--map", "id=user_id,name=city,email=mail",
                           "--batch-size", "40")
    assert "started with --map 'id=user_id,name=full name,email=MAIL'" in one_error_line(other_map)
    copy = tmp_path / "elsewhere" / "copy.csv"
    copy.parent.mkdir()
    shutil.copy(people.path, copy)
    moved = run_import(state_dir, "--input", str(copy), "--map", MAP, "--batch-size", "40")
    assert one_error_line(moved) == (
        f"error: import {root} already exists (pending), reading this content from {people.path}: "
        f"run with --input {people.path} to continue it, or add --id NEW to start a new import")
    assert store_promises(audit, state_dir) == before  # the refusals wrote nothing

    resumed = run_import(state_dir, *flags, "--batch-size", "40")
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.report["id"] == root and "already_imported" not in resumed.report["skipped_reasons"]
    assert resumed.report["children"][0]["replayed"] >= 2
    assert audit.audit(state_dir, root, people.rows)["ok"]

    again = run_import(state_dir, "--input", str(copy), "--map", MAP, "--id", "import/again")
    assert again.returncode == 0, again.describe()
    assert again.report["skipped_reasons"] == {  # every id is held by the first import
        "already_imported": len(people.names) + people.duplicates, "invalid_email": people.broken}


def test_an_import_under_the_id_earlier_versions_derived_is_continued_not_stranded(
    tmp_path: Path, audit: ModuleType
) -> None:
    people = write_people(tmp_path / "people.csv", 400, seed=8, encoding="utf-8")
    state_dir = tmp_path / "state"
    digest = hashlib.sha256(people.path.read_bytes()).hexdigest()
    legacy = f"import/people-{digest[:12]}-b40"  # what `run` derived before content ids
    flags = ("--input", str(people.path), "--map", MAP)
    _interrupted_import(state_dir, audit, legacy, *flags, "--batch-size", "40", "--id", legacy)

    refused = run_import(state_dir, *flags, "--batch-size", "100")
    expected = f"import {legacy} already exists (pending), started with --batch-size 40"
    assert expected in one_error_line(refused)
    resumed = run_import(state_dir, *flags, "--batch-size", "40")
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.report["id"] == legacy
    assert resumed.report["total_records"] == people.rows
    assert "already_imported" not in resumed.report["skipped_reasons"]
    assert audit.audit(state_dir, legacy, people.rows)["ok"]
    listing = run_cli("list", state_dir, "--json")
    assert [row["id"] for row in json.loads(listing.stdout)] == [legacy]  # no second import


def test_on_postgresql_a_mapped_gzip_import_runs_and_the_default_id_rule_holds(
    tmp_path: Path, pg_url: str, audit: ModuleType
) -> None:
    people = write_people(tmp_path / "export.tsv.gz", 600, seed=21)
    tsv = gzip.decompress(people.path.read_bytes()).replace(b";", b"\t")
    people.path.write_bytes(gzip.compress(tsv))
    root = default_id(people.path)
    flags = ("run", "--input", str(people.path), "--map", MAP, "--encoding", "latin-1",
             "--store", pg_url, "--state-dir", "state")
    done = supervisor(tmp_path, *flags, "--batch-size", "100", "--kill-at-batch", "2", "--json")
    assert done.returncode == 0, done.describe()
    assert done.report["id"] == root
    assert done.report["skipped_reasons"] == {
        "duplicate_id": people.duplicates, "invalid_email": people.broken}
    assert audit.audit_pg(pg_url, root, people.rows)["ok"]
    with psycopg.connect(pg_url) as db:
        assert dict(db.execute("SELECT id, name FROM records")) == people.names

    refused = supervisor(tmp_path, *flags, "--batch-size", "60")
    assert refused.returncode == 1
    assert f"import {root} already exists (done), started with --batch-size 100" in one_error_line(refused)
