"""`report --id ID --html FILE`: the picture of a real supervised import with kills and a retry,
loaded in a real headless Chromium (Debian's `chromium`, driven by playwright).

The page must load with no console error and no request beyond its own file, draw one bar per
row of the sink's `executions` (counted here with sqlite3 itself) and one kill marker per kill
the run reported; a screenshot is saved under the test's tmp dir. Without chromium the test
fails and says how to install it (`.ci/run` does): a browser test that skips proves nothing.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from supervisor_helpers import REPO, SINK_FILE, child_env, run_cli, run_import
from test_sup_exec import ROOT, exec_squares, install_squares

from supervisor.events import EVENTS_FILE, EventLog, read_events

CHROMIUM_NAMES = ("chromium", "chromium-browser")
IMPORT_ID = "pictured"


def report_cli(
    page_file: Path, state_dir: Path, root: str = IMPORT_ID, *flags: str
) -> subprocess.CompletedProcess[str]:
    """`python -m supervisor report --id ROOT --html PAGE --state-dir DIR [FLAGS]`, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "report", "--id", root, "--html", str(page_file),
         "--state-dir", str(state_dir), *flags],
        capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=60, check=False)


def sink_executions(state_dir: Path, root: str) -> list[tuple[int, int, str | None]]:
    """(batch, attempt, outcome) of every execution of the import, read with sqlite3 alone."""
    db = sqlite3.connect(f"file:{state_dir / SINK_FILE}?mode=ro", uri=True)
    try:
        return db.execute("SELECT batch, attempt, outcome FROM executions WHERE promise_id LIKE ?",
                          (f"{root}.%",)).fetchall()
    finally:
        db.close()


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail("no chromium on PATH: the report's browser test needs Debian's `chromium` "
                "(`apt-get install -y chromium`; .ci/run installs it)")


def load_in_browser(page_file: Path, screenshot: Path) -> dict[str, Any]:
    """Open the page in headless Chromium; what it logged, what it requested, what it drew."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the python package `playwright` is missing: pip install -e '.[test]'")
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1240, "height": 800})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            drawn = {
                "bars": page.locator("svg rect.bar").count(),
                "retry_bars": page.locator("svg rect.bar.retry").count(),
                "failed_bars": page.locator("svg rect.bar.failed").count(),
                "kills": page.locator("svg path.kill").count(),
                "restarts": page.locator("svg .restart-mark").count(),
                "totals": {el.get_attribute("data-total"): el.locator("b").inner_text()
                           for el in page.locator(".total").all()},
            }
            retry = page.locator("svg rect.bar.retry").first
            retry.dispatch_event("mouseover")
            drawn["detail"] = page.locator("#detail").inner_text()
            drawn["retry_tip"] = retry.get_attribute("data-tip")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    drawn["problems"] = problems
    drawn["requests"] = requests
    return drawn


@pytest.mark.parametrize("workers", [1, 2])
def test_report_of_a_run_with_kills_and_a_retry_in_chromium(tmp_path: Path, workers: int) -> None:
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--records", "1000", "--batch-size", "100", "--id", IMPORT_ID,
                     "--kill-at-batch", "2", "--kill-at-batch", "6", "--fail-at-batch", "4",
                     "--retry-initial", "0.05", "--workers", str(workers))
    assert run.returncode == 0, run.describe()
    page_file = tmp_path / "report.html"
    made = report_cli(page_file, state_dir)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"wrote {page_file}: ")

    rows = sink_executions(state_dir, IMPORT_ID)
    screenshot = tmp_path / "report.png"
    drawn = load_in_browser(page_file, screenshot)

    assert drawn["problems"] == []
    assert drawn["requests"] == [page_file.as_uri()]  # nothing fetched beyond the file itself
    assert drawn["bars"] == len(rows)
    assert drawn["retry_bars"] == sum(attempt > 1 for _, attempt, _ in rows)
    assert drawn["failed_bars"] == sum(outcome is None for _, _, outcome in rows) >= 3  # 2 kills, 1 fault
    assert drawn["kills"] == len(run.report["kills"]) == 2
    assert drawn["restarts"] == run.report["restarts"] == 2
    assert drawn["totals"]["executions"] == str(len(rows))
    assert drawn["totals"]["kills"] == "2"
    assert drawn["totals"]["imported"] == f"{run.report['total_processed']:,}"
    assert drawn["totals"]["batches"] == "10/10"
    assert drawn["detail"] == drawn["retry_tip"]
    assert "attempt 2" in drawn["detail"]
    assert screenshot.stat().st_size > 10_000


def test_report_names_the_retry_error_and_the_kills(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--records", "300", "--batch-size", "100", "--id", IMPORT_ID,
                     "--kill-at-batch", "1", "--fail-at-batch", "2", "--retry-initial", "0.05")
    assert run.returncode == 0, run.describe()
    page_file = tmp_path / "report.html"
    assert report_cli(page_file, state_dir).returncode == 0
    page = page_file.read_text()
    assert "batch 2 · attempt 1" in page
    assert "retried: injected fault at batch.fail 2/1" in page
    assert f"SIGKILL (kill-at-batch) to worker {run.report['kills'][0]['pid']} during batch 1" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page


@pytest.fixture
def finished_import(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--records", "100", "--batch-size", "50", "--id", IMPORT_ID)
    assert run.returncode == 0, run.describe()
    return state_dir


def test_an_unknown_id_is_one_line_and_exit_1(finished_import: Path, tmp_path: Path) -> None:
    page_file = tmp_path / "report.html"
    made = report_cli(page_file, finished_import, "nope")
    assert made.returncode == 1
    assert made.stderr.strip().splitlines() == [
        f"error: {finished_import / 'store.jsonl'}: no import 'nope' (known: {IMPORT_ID})"]
    assert not page_file.exists()


def test_a_store_without_its_sink_is_one_line_and_exit_1(finished_import: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(finished_import / "store.jsonl", bare / "store.jsonl")
    made = report_cli(tmp_path / "r.html", bare)
    assert made.returncode == 1
    assert made.stderr.strip().splitlines() == [f"error: {bare / SINK_FILE}: no import database there"]


def test_an_unwritable_file_is_one_line_and_exit_1(finished_import: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("")
    target = not_a_dir / "report.html"
    made = report_cli(target, finished_import)
    assert made.returncode == 1
    assert made.stderr.strip().splitlines() == [f"error: {target}: cannot write the report (Not a directory)"]


def test_a_workflow_run_by_exec_is_no_import_to_draw(tmp_path: Path) -> None:
    install_squares(tmp_path)
    assert exec_squares(tmp_path, 3).returncode == 0
    made = report_cli(tmp_path / "r.html", tmp_path / "state", ROOT)
    assert made.returncode == 1
    assert made.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'state' / 'store.jsonl'}: {ROOT!r} is a workflow run by `exec`, not an "
        "import; report draws an import's batches"]
    assert not (tmp_path / "r.html").exists()


def test_a_state_dir_with_nothing_in_it_is_one_line_and_exit_1(tmp_path: Path) -> None:
    made = report_cli(tmp_path / "r.html", tmp_path / "none")
    assert made.returncode == 1
    assert made.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'}: no import has run in this state dir (no store there)"]


def test_report_of_an_import_in_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The sink's tables in the database, the supervisor's events in the state dir `run` used."""
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--records", "500", "--batch-size", "100", "--id", IMPORT_ID,
                     "--store", pg_url, "--kill-at-batch", "2", "--fail-at-batch", "3",
                     "--retry-initial", "0.05")
    assert run.returncode == 0, run.describe()
    page_file = tmp_path / "report.html"
    made = report_cli(page_file, state_dir, IMPORT_ID, "--store", pg_url)
    assert made.returncode == 0, made.stderr
    with psycopg.connect(pg_url) as db:
        (count,) = db.execute("SELECT count(*) FROM executions WHERE promise_id LIKE %s",
                              (f"{IMPORT_ID}.%",)).fetchone()
    page = page_file.read_text()
    assert page.count('<rect class="bar ') == count >= 7  # 5 batches, a kill, a retry
    assert page.count('<path class="kill"') == len(run.report["kills"]) == 1
    assert "batch 3 · attempt 1 · pid " in page and " · failed · retried" in page


def test_a_database_without_the_import_is_one_line_and_exit_1(tmp_path: Path, pg_url: str) -> None:
    made = report_cli(tmp_path / "r.html", tmp_path / "state", IMPORT_ID, "--store", pg_url)
    assert made.returncode == 1
    assert len(made.stderr.strip().splitlines()) == 1
    assert f"no import '{IMPORT_ID}'" in made.stderr


def test_the_event_log_keeps_each_import_apart_and_leaves_a_torn_last_line_out(tmp_path: Path) -> None:
    EventLog(tmp_path, "a").add("spawn", pid=1)
    EventLog(tmp_path, "b").add("spawn", pid=2)
    EventLog(tmp_path, "a").add("kill", pid=1, kind="timed", unit=3, worker=None)
    with (tmp_path / EVENTS_FILE).open("ab") as f:
        f.write(b'{"t": 1.0, "id": "a", "event": "ex')  # a supervisor killed mid-write
    events = read_events(tmp_path, "a")
    assert [(e["event"], e["pid"]) for e in events] == [("spawn", 1), ("kill", 1)]
    assert events[1]["unit"] == 3 and events[0]["t"] <= events[1]["t"]
    assert read_events(tmp_path / "elsewhere", "a") == []


def test_a_store_that_is_not_postgresql_is_a_usage_error(tmp_path: Path) -> None:
    jsonl = str(tmp_path / "s.jsonl")
    made = report_cli(tmp_path / "r.html", tmp_path / "state", IMPORT_ID, "--store", jsonl)
    assert made.returncode == 2
    assert made.stderr.strip().splitlines()[-1].endswith(
        "an import's sink is in its state dir (--state-dir) or in PostgreSQL; give a postgresql://... URL")


def page_totals(page_file: Path) -> dict[str, str]:
    """The cards of the page, {data-total: shown value}, read without a browser."""
    return dict(re.findall(r'<div class="total" data-total="([^"]+)"><b>([^<]*)</b>',
                           page_file.read_text()))


def test_the_totals_of_a_fork_count_its_reused_batches_as_its_result_does(tmp_path: Path) -> None:
    """A fork runs batches K onward; those before K are its parent's results, reused (their rows
    keep the parent's id). Its page counts them, so its totals are its result's, and says so;
    the same for a fork of that fork."""
    state_dir = tmp_path / "state"
    sizes = ("--records", "1000", "--batch-size", "100")
    assert run_import(state_dir, *sizes, "--id", IMPORT_ID).returncode == 0
    for parent, k in ((IMPORT_ID, 4), (f"{IMPORT_ID}~fork-4", 2)):
        fork_id = f"{parent}~fork-{k}"
        made = run_cli("fork", state_dir, "--id", parent, "--from-batch", str(k))
        assert made.returncode == 0, made.describe()
        run = run_import(state_dir, *sizes, "--id", fork_id)
        assert run.returncode == 0, run.describe()
        page_file = tmp_path / f"{k}.html"
        assert report_cli(page_file, state_dir, fork_id).returncode == 0

        totals = page_totals(page_file)
        assert (totals["imported"], totals["skipped"]) == (f"{run.report['total_processed']:,}",
                                                           f"{run.report['total_skipped']:,}")
        assert (totals["batches"], totals["reused batches"]) == ("10/10", str(k))
        assert totals["executions"] == str(len(sink_executions(state_dir, fork_id))) == str(10 - k)
        assert (f"a fork of import {parent} from batch {k}: {k} batch(es) before it reused from its "
                "stored results") in page_file.read_text()
    original = tmp_path / "original.html"
    assert report_cli(original, state_dir).returncode == 0
    assert "reused batches" not in page_totals(original) and "a fork of" not in original.read_text()
