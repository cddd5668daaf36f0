"""The supervisor's commands against a PostgreSQL store (a fresh database per test): an import
with kills whose invariants hold from the database alone, `list`, `status`, `retry`, and the
refusals of `join` and `run` a user meets first."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from types import ModuleType

import psycopg
from supervisor_helpers import Finished
from test_sup_exec import ROOT, install_squares, supervisor

IMPORT = "import/synthetic-2000"


def run_import(tmp_path: Path, url: str, *flags: str) -> Finished:
    return supervisor(tmp_path, "run", "--records", "2000", "--store", url, "--state-dir", "state", *flags)


def exec_squares(tmp_path: Path, url: str, *flags: str) -> Finished:
    return supervisor(tmp_path, "exec", "squares:squares", "--id", ROOT, "--arg", "4", "--store", url, *flags)


def test_an_import_killed_in_batch_3_and_at_random_commits_every_batch_once_in_one_transaction(
    tmp_path: Path, pg_url: str, audit: ModuleType
) -> None:
    done = run_import(tmp_path, pg_url, "--workers", "2", "--kill-at-batch", "3",
                      "--kill-random", "2", "--seed", "5", "--json")
    assert done.returncode == 0, done.describe()
    assert done.report["ok"] and done.report["total_records"] == 2000
    assert done.report["store"] == pg_url and any(k["kind"] == "kill-at-batch" for k in done.report["kills"])
    verdict = audit.audit_pg(pg_url, IMPORT, 2000)
    assert verdict["ok"], verdict
    with psycopg.connect(pg_url) as db:
        outcomes = dict(db.execute("SELECT coalesce(outcome, 'died'), count(*) FROM executions GROUP BY 1"))
    assert outcomes["committed"] == 20 and "found_commit" not in outcomes, outcomes
    assert outcomes.get("died", 0) >= 1  # the kill in batch 3 left its execution unfinished


def test_list_and_status_read_the_database(tmp_path: Path, pg_url: str) -> None:
    assert run_import(tmp_path, pg_url).returncode == 0
    listing = supervisor(tmp_path, "list", "--store", pg_url, "--json")
    assert listing.returncode == 0, listing.describe()
    [row] = json.loads(listing.stdout)
    progress = (row["id"], row["state"], row["batches_done"], row["batches_total"], row["records"])
    assert progress == (IMPORT, "resolved", 20, 20, 2000)
    assert 0 <= time.time() - datetime.datetime.fromisoformat(row["last_activity"]).timestamp() < 120
    text = supervisor(tmp_path, "list", "--store", pg_url)
    assert IMPORT in text.stdout and "20/20 batches" in text.stdout and "2,000" in text.stdout
    status = supervisor(tmp_path, "status", "--id", IMPORT, "--store", pg_url)
    assert status.returncode == 0, status.describe()
    assert f"{IMPORT}: resolved, 20/20 batches done" in status.stdout


def test_status_shows_the_executions_of_a_killed_batch_from_the_database(tmp_path: Path, pg_url: str) -> None:
    done = run_import(tmp_path, pg_url, "--kill-at-batch", "3", "--json")
    assert done.returncode == 0, done.describe()
    s = json.loads(supervisor(tmp_path, "status", "--store", pg_url, "--json").stdout)  # the only one
    assert s["id"] == IMPORT and len(s["batches"]) == 20
    with psycopg.connect(pg_url) as db:
        in_sink = db.execute("SELECT count(*) FROM executions").fetchone()[0]
    assert sum(len(b["executions"]) for b in s["batches"]) == in_sink
    outcomes = [[(e["pid"], e["outcome"]) for e in b["executions"]] for b in s["batches"]]
    killed = outcomes[3][0][0]  # the executor process that ran batch 3 when its worker was killed
    assert outcomes[3][0][1] is None and outcomes[3][-1][1] == "committed"
    assert all([o for _, o in runs] == ["committed"] for n, runs in enumerate(outcomes) if n != 3)
    text = supervisor(tmp_path, "status", "--store", pg_url).stdout
    assert f"attempt 1  pid {killed}  killed/failed" in text and "    0-2: resolved (1 attempt each)" in text


def test_compact_and_gc_say_in_one_line_that_they_do_not_apply(tmp_path: Path, pg_url: str) -> None:
    assert run_import(tmp_path, pg_url).returncode == 0
    compact = supervisor(tmp_path, "compact", "--id", IMPORT, "--store", pg_url)
    assert compact.returncode == 0, compact.describe()
    assert compact.stdout.count("\n") == 1 and "compaction does not apply" in compact.stdout
    gc = supervisor(tmp_path, "gc", "--store", pg_url)
    assert gc.returncode == 0 and gc.stdout.count("\n") == 1 and "nothing to collect" in gc.stdout


def test_join_refuses_a_workflow_never_started_there_and_a_store_that_is_not_postgresql(
    tmp_path: Path, pg_url: str
) -> None:
    unknown = supervisor(tmp_path, "join", "--store", pg_url, "--id", "import/nothing")
    assert unknown.returncode == 1, unknown.describe()
    assert "no workflow import/nothing was started there; start it with `run --store" in unknown.stderr
    a_file = supervisor(tmp_path, "join", "--store", str(tmp_path / "store.jsonl"), "--id", "x")
    assert a_file.returncode == 2 and "machines share a workflow only in PostgreSQL" in a_file.stderr


def test_run_refuses_an_id_started_there_with_other_arguments(tmp_path: Path, pg_url: str) -> None:
    assert run_import(tmp_path, pg_url, "--id", "import/mine").returncode == 0
    other = supervisor(tmp_path, "run", "--records", "300", "--store", pg_url, "--state-dir", "state",
                       "--id", "import/mine")
    assert other.returncode == 1, other.describe()
    assert other.stderr == ("error: import import/mine already exists (done) for another input (2000 "
                            "synthetic records, not 300 synthetic records); give this one another --id\n")
    assert "Traceback" not in other.stderr


def test_fail_fix_retry_resume_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    app = install_squares(tmp_path)
    app.write_text(app.read_text().replace("BROKEN: tuple[int, ...] = ()", "BROKEN = (2,)"))
    failed = exec_squares(tmp_path, pg_url, "--max-attempts", "2", "--retry-initial", "0")
    assert failed.returncode == 1, failed.describe()
    assert f"retry --id {ROOT} --store {pg_url}" in failed.last_error_line
    app.write_text(app.read_text().replace("BROKEN = (2,)", "BROKEN: tuple[int, ...] = ()"))
    retry = supervisor(tmp_path, "retry", "--id", ROOT, "--store", pg_url)
    assert retry.returncode == 0 and f"reopened {ROOT}.2" in retry.stdout, retry.describe()
    again = exec_squares(tmp_path, pg_url, "--json")
    assert again.returncode == 0 and again.report["result"] == [0, 1, 4, 9], again.describe()


def test_a_machine_that_cannot_read_the_input_is_refused_with_one_line(tmp_path: Path, pg_url: str) -> None:
    people = tmp_path / "people.csv"
    people.write_text("id,name,email\n" + "".join(f"{i},n{i},u{i}@example.com\n" for i in range(300)))
    started = supervisor(tmp_path, "run", "--input", str(people), "--store", pg_url, "--state-dir", "a",
                         "--json")
    assert started.returncode == 0, started.describe()
    people.rename(tmp_path / "elsewhere.csv")  # the joining machine has no file at that path
    joined = supervisor(tmp_path, "join", "--id", started.report["id"], "--store", pg_url, "--state-dir", "b")
    assert joined.returncode == 1, joined.describe()
    assert joined.last_error_line == (
        f"error: this machine cannot take part in workflow {started.report['id']}: {people}: cannot read "
        "(No such file or directory) (every participant needs the same code, and the input at the same path)"
    )


def test_executors_that_cannot_start_end_the_run_with_their_error_instead_of_looping(
    tmp_path: Path, pg_url: str
) -> None:
    app = install_squares(tmp_path)  # its executor processes cannot import it; its driver can
    app.write_text(app.read_text() + "\nif 'execute' in __import__('sys').argv:\n"
                   "    raise RuntimeError('no executor here')\n")
    done = exec_squares(tmp_path, pg_url, "--max-restarts", "0")
    assert done.returncode == 1, done.describe()
    assert "RuntimeError: no executor here" in done.stderr
    assert "ended with an error no restart can help" in done.last_error_line


def test_a_url_that_cannot_work_is_refused_at_once_with_the_servers_reason(
    tmp_path: Path, pg_url: str
) -> None:
    nowhere = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    started = time.monotonic()
    done = supervisor(tmp_path, "run", "--records", "100", "--store", nowhere, "--state-dir", "state")
    assert done.returncode == 1, done.describe()
    assert 'database "no_such_database" does not exist' in done.last_error_line
    assert time.monotonic() - started < 10  # not retried until a pool gives up


def test_a_root_id_too_long_for_an_index_is_a_usage_error(tmp_path: Path, pg_url: str) -> None:
    done = supervisor(tmp_path, "run", "--records", "100", "--store", pg_url, "--id", "x" * 600)
    assert done.returncode == 2 and "a root id is at most 512 bytes" in done.stderr, done.describe()


def test_a_joining_machine_with_another_file_of_the_same_size_is_refused_and_harms_nothing(
    tmp_path: Path, pg_url: str, audit: ModuleType
) -> None:
    people = tmp_path / "people.csv"
    rows = "".join(f"{i},n{i},u{i}@example.com\n" for i in range(300))
    people.write_text("id,name,email\n" + rows)
    started = supervisor(tmp_path, "run", "--input", str(people), "--store", pg_url, "--state-dir", "a",
                         "--json")
    assert started.returncode == 0, started.describe()
    people.write_text("id,name,email\n" + rows.replace("n7,", "m7,"))  # same size, another content
    joined = supervisor(tmp_path, "join", "--id", started.report["id"], "--store", pg_url, "--state-dir", "b")
    assert joined.returncode == 1, joined.describe()
    assert "this machine cannot take part" in joined.last_error_line
    assert "input changed since the import started" in joined.last_error_line
    assert audit.audit_pg(pg_url, started.report["id"], 300)["ok"]
