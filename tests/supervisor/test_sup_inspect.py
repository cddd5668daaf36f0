"""What operators inspect: `list` (every import of a state dir), `status` batch by batch (attempts,
the sink's executions, errors, what is in flight, an ETA), `status --watch`, and `status`/`retry`
without `--id`. Real runs under tmp_path: imports SIGKILLed by `--kill-at-batch`, or left
pending by SIGKILLing their supervisor while a batch is in flight."""

from __future__ import annotations

import datetime
import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

from supervisor_helpers import (
    BATCH_SIZE,
    BATCHES,
    RECORDS,
    SIZES,
    assert_finished,
    batch_attempts,
    child_env,
    command,
    executions,
    is_gone,
    root_id,
    run_cli,
    run_import,
    snapshot,
    start_import,
    wait_until,
    worker_of,
)

LEFT = ("--records", "300", "--batch-size", str(BATCH_SIZE))  # the import left pending: 6 batches
LEFT_ROOT = root_id(300, BATCH_SIZE)


def linger_at(batch: int, seconds: float) -> dict[str, str]:
    """An env whose worker waits `seconds` halfway through `batch` (before its commit)."""
    return {"DURABLE_FAILPOINTS": json.dumps(
        [{"name": "batch.mid", "key": str(batch), "action": "delay", "seconds": seconds}])}


def leave_pending(audit: ModuleType, state_dir: Path, batch: int) -> int:
    """Start an import, SIGKILL its supervisor while `batch` is in flight (its worker dies with
    it), and return the worker's pid: the import stays pending, as after a machine's crash."""
    sup = start_import(state_dir, *LEFT, env=linger_at(batch, 60))
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, LEFT_ROOT, batch) >= 1, f"batch {batch} starts")
        worker = worker_of(sup.process.pid)
        sup.process.send_signal(signal.SIGKILL)
        wait_until(lambda: is_gone(worker), "the worker dies with its supervisor")
        return worker.pid
    finally:
        sup.close()


def without_wal_index(files: dict[str, bytes]) -> dict[str, bytes]:
    """The state dir's files but the sink's WAL index (`-shm`): shared memory, not data, which
    every SQLite reader writes into (its read mark; the index rebuilt after a writer died)."""
    return {name: data for name, data in files.items() if not name.endswith("-shm")}


def test_list_shows_every_import_and_an_empty_state_dir_in_one_line(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    empty = run_cli("list", state_dir)
    assert (empty.returncode, empty.stdout) == (0, f"no workflow has run in {state_dir / 'store.jsonl'}\n")
    assert json.loads(run_cli("list", state_dir, "--json").stdout) == []

    began = time.time()
    assert_finished(run_import(state_dir, *SIZES, "--kill-at-batch", "3"), RECORDS, BATCH_SIZE)
    leave_pending(audit, state_dir, batch=2)

    listing = run_cli("list", state_dir, "--json")
    assert listing.returncode == 0, listing.describe()
    rows = {r["id"]: r for r in json.loads(listing.stdout)}
    done, left = rows[root_id(RECORDS, BATCH_SIZE)], rows[LEFT_ROOT]
    assert list(done) == ["id", "state", "batches_done", "batches_total", "records", "last_activity"]
    assert (done["state"], done["batches_done"], done["batches_total"], done["records"]) == (
        "resolved", BATCHES, BATCHES, RECORDS)
    assert (left["state"], left["batches_done"], left["batches_total"], left["records"]) == (
        "pending", 2, 6, 2 * BATCH_SIZE)
    for row in (done, left):
        when = datetime.datetime.fromisoformat(row["last_activity"]).timestamp()
        assert began - 1 <= when <= time.time()
    assert done["last_activity"] <= left["last_activity"]

    text = run_cli("list", state_dir).stdout.splitlines()
    assert text[0].split() == ["ID", "STATE", "DONE", "RECORDS", "LAST", "ACTIVITY", "(UTC)"]
    assert f"{BATCHES}/{BATCHES} batches" in text[1] and "resolved" in text[1]
    assert LEFT_ROOT in text[2] and "pending" in text[2] and "2/6 batches" in text[2]


def test_status_shows_each_batch_its_executions_and_the_batch_in_flight(
    tmp_path: Path, audit: ModuleType
) -> None:
    state_dir = tmp_path / "state"
    dead_worker = leave_pending(audit, state_dir, batch=2)
    before = without_wal_index(snapshot(state_dir))

    as_json = run_cli("status", state_dir, "--id", LEFT_ROOT, "--json")
    text = run_cli("status", state_dir, "--id", LEFT_ROOT)

    assert without_wal_index(snapshot(state_dir)) == before  # status changes nothing
    s = json.loads(as_json.stdout)
    assert (s["state"], s["batches_done"], s["batch_count"], s["in_flight"]) == ("pending", 2, 6, [2])
    assert s["eta_s"] > 0 and s["rate_per_s"] > 0
    batches = s["batches"]
    assert [(b["batch"], b["state"], b["attempts"]) for b in batches] == [
        (0, "resolved", 1), (1, "resolved", 1), (2, "pending", 1)]
    sink = executions(state_dir, LEFT_ROOT)
    assert [(e["pid"], e["attempt"], e["outcome"]) for b in batches for e in b["executions"]] == [
        (e.pid, e.attempt, e.outcome) for e in sink]
    assert batches[2]["executions"][0]["pid"] == dead_worker
    assert batches[2]["executions"][0]["duration_s"] is None
    assert all(e["duration_s"] >= 0 for b in batches[:2] for e in b["executions"])

    assert text.returncode == 0, text.describe()
    assert f"{LEFT_ROOT}: pending, 2/6 batches done" in text.stdout
    assert "    0-1: resolved (1 attempt each)" in text.stdout
    assert f"    2 ({batches[2]['id']}): pending, 1 attempt(s)" in text.stdout
    unfinished = rf"attempt 1  pid {dead_worker}  no outcome yet \(running, or killed\)  started"
    assert re.search(unfinished, text.stdout)
    assert "    3-5: not begun" in text.stdout
    assert re.search(r"  eta: ~\S+ .* batches/s", text.stdout)


def test_status_of_a_killed_batch_shows_the_execution_the_kill_cut_short(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    report = assert_finished(run_import(state_dir, *SIZES, "--kill-at-batch", "3"), RECORDS, BATCH_SIZE)
    killed = next(c["pid"] for c in report["children"] if c["exit"] == "killed by SIGKILL")

    s = json.loads(run_cli("status", state_dir, "--id", report["id"], "--json").stdout)
    batch_3 = s["batches"][3]
    assert (batch_3["state"], batch_3["attempts"]) == ("resolved", 2)
    assert [(e["pid"], e["outcome"]) for e in batch_3["executions"]] == [
        (killed, None), (report["children"][1]["pid"], "committed")]
    assert (s["in_flight"], s["eta_s"]) == ([], None)  # a finished import has neither

    text = run_cli("status", state_dir, "--id", report["id"]).stdout
    assert "    0-2: resolved (1 attempt each)" in text
    assert f"attempt 1  pid {killed}  killed/failed" in text
    assert f"    4-{BATCHES - 1}: resolved (1 attempt each)" in text


def test_status_and_retry_without_id_take_the_only_workflow_or_list_them(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    broken = {"DURABLE_FAILPOINTS": json.dumps([{"name": "batch.fail", "key": "1/1", "action": "raise"}])}
    failed = run_import(state_dir, *SIZES, "--max-attempts", "1", env=broken)
    assert failed.returncode == 1, failed.describe()

    alone = run_cli("status", state_dir)
    assert alone.returncode == 0, alone.describe()
    assert alone.stdout.startswith(f"{root_id(RECORDS, BATCH_SIZE)}: rejected, 1/{BATCHES} batches done")
    assert "error: InjectedFault: injected fault at batch.fail 1/1" in alone.stdout
    [hint] = [line for line in alone.stdout.splitlines() if "retry it: " in line]
    retry = hint.split("retry it: ", 1)[1]
    assert f"--state-dir {state_dir.resolve()}" in retry

    # The hint, pasted from another directory, reopens the import (no ./.durable involved).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pasted = subprocess.run([sys.executable, *shlex.split(retry)[1:]], capture_output=True, text=True,
                            env=child_env(), cwd=elsewhere, check=False)
    assert pasted.returncode == 0, pasted.stderr
    assert f"reopened {root_id(RECORDS, BATCH_SIZE)}" in pasted.stdout
    assert not (elsewhere / ".durable").exists()

    assert_finished(run_import(state_dir, *SIZES), RECORDS, BATCH_SIZE)
    assert run_import(state_dir, *LEFT).returncode == 0
    for cmd in ("status", "retry"):
        ambiguous = run_cli(cmd, state_dir)
        assert ambiguous.returncode == 2, ambiguous.describe()
        lines = ambiguous.stderr.splitlines()
        where = state_dir.resolve() / "store.jsonl"
        assert lines[0].startswith(f"error: 2 workflows in {where}; pass --id ID")
        assert lines[1].startswith("ID ") and len(lines) == 4
        assert {lines[2].split()[0], lines[3].split()[0]} == {root_id(RECORDS, BATCH_SIZE), LEFT_ROOT}


def test_help_of_status_and_retry_does_not_promise_a_default_id(tmp_path: Path) -> None:
    for cmd in ("status", "retry"):
        shown = run_cli(cmd, tmp_path / "state", "--help")
        assert shown.returncode == 0
        assert "derived" not in shown.stdout and "holds one workflow only" in " ".join(shown.stdout.split())


def test_watch_prints_snapshots_until_the_import_ends(tmp_path: Path, audit: ModuleType) -> None:
    """On a pipe: plain snapshots, one per interval, and the watch ends with the import."""
    state_dir = tmp_path / "state"
    sup = start_import(state_dir, *SIZES, env=linger_at(4, 5.0))
    try:
        root = root_id(RECORDS, BATCH_SIZE)
        wait_until(lambda: batch_attempts(audit, state_dir, root, 4) >= 1, "batch 4 starts")
        watch = run_cli("status", state_dir, "--id", root, "--watch", "--interval", "0.3")
        as_json = run_cli("status", state_dir, "--id", root, "--watch", "--interval", "0.3", "--json")
        assert_finished(sup.finish(), RECORDS, BATCH_SIZE)
    finally:
        sup.close()

    assert watch.returncode == 0, watch.describe()
    assert "\x1b" not in watch.stdout
    snapshots = watch.stdout.split(f"\n\n{root}: ")
    assert len(snapshots) >= 3, watch.stdout  # seconds of lingering, at 0.3 s each
    assert ": pending, 4/10 batches done" in snapshots[0]
    assert snapshots[-1].startswith(f"resolved, {BATCHES}/{BATCHES} batches done")
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert lines[-1]["state"] == "resolved" and all(s["state"] == "pending" for s in lines[:-1])


def test_watch_on_a_terminal_redraws_in_place_within_80x24(tmp_path: Path, audit: ModuleType) -> None:
    """On a terminal of 80x24, a 60-batch import with many batches to show in full: every
    snapshot is redrawn over the last, no line wraps, none scrolls off; Ctrl-C ends it."""
    state_dir = tmp_path / "state"
    records, size = 600, 10
    root = root_id(records, size)
    kills = [a for k in range(5, 55, 4) for a in ("--kill-at-batch", str(k))]  # 13 batches in full
    sup = start_import(state_dir, "--records", str(records), "--batch-size", str(size), *kills,
                       "--durability", "none", env=linger_at(57, 60))
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, root, 57) >= 1, "batch 57 starts", 60)
        out = _run_on_a_terminal(command("status", state_dir, "--id", root, "--watch", "--interval", "0.3"),
                                 columns=80, rows=24, cwd=tmp_path, frames=3)
    finally:
        sup.close()

    frames = out.split("\x1b[J")[1:]
    assert len(frames) >= 3, out
    for frame in frames:
        text = re.sub(r"\x1b\[\d+F$", "", frame)
        lines = text.split("\r\n")
        assert lines[-1] == ""  # each snapshot ends at the start of a line
        assert len(lines) - 1 <= 23, frame
        assert all(len(line) <= 79 for line in lines), frame
        assert text.startswith(f"{root}: pending, 57/60 batches done")
        assert "more lines (a taller window shows them; --json has everything)" in text
    # Each redraw first goes back up over exactly the lines the snapshot before it drew.
    ups = [int(n) for n in re.findall(r"\x1b\[(\d+)F", out)]
    assert ups == [frame.count("\r\n") for frame in frames[:-1]]


def _run_on_a_terminal(argv: list[str], *, columns: int, rows: int, cwd: Path, frames: int) -> str:
    """Run `argv` with a pseudo-terminal of `columns` x `rows` as its stdout, Ctrl-C it once it
    has drawn `frames` snapshots, and return all it wrote (it must exit 130)."""
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = child_env({"COLUMNS": str(columns), "LINES": str(rows)})
    proc = subprocess.Popen(argv, stdout=follower, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if out.count(b"\x1b[J") == frames:
                    proc.send_signal(signal.SIGINT)
            elif proc.poll() is not None:
                break
        assert proc.wait(10) == 130
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    return out.decode()


def test_the_text_of_a_big_import_stays_short_and_json_has_every_batch(tmp_path: Path) -> None:
    """10,000 batches, two of them killed: the text folds the plain runs, JSON lists all."""
    state_dir = tmp_path / "state"
    run = run_import(state_dir, "--records", "30000", "--batch-size", "3", "--kill-at-batch", "5000",
                     "--durability", "none", "--workers", "2")
    assert run.returncode == 0, run.describe()
    text = run_cli("status", state_dir).stdout.splitlines()
    assert len(text) < 20, text
    assert "    0-4998: resolved (1 attempt each)" in text or "    0-4999: resolved (1 attempt each)" in text
    assert any(re.fullmatch(r"    5000 \(\S+\): resolved, 2 attempt\(s\)", line) for line in text)
    s = json.loads(run_cli("status", state_dir, "--json").stdout)
    assert [b["batch"] for b in s["batches"]] == list(range(10_000))
    assert sum(len(b["executions"]) for b in s["batches"]) == len(executions(state_dir, s["id"]))



def test_watch_of_an_import_nothing_runs_stops_on_ctrl_c(tmp_path: Path, audit: ModuleType) -> None:
    state_dir = tmp_path / "state"
    leave_pending(audit, state_dir, batch=1)
    shown = tmp_path / "watch.out"

    def snapshots() -> int:
        return shown.read_text().count(f"{LEFT_ROOT}: pending, 1/6 batches done")

    with shown.open("w") as out:
        watch = subprocess.Popen(command("status", state_dir, "--watch", "--interval", "0.2"),
                                 stdout=out, stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            wait_until(lambda: snapshots() >= 3, "three snapshots")
            assert watch.poll() is None  # a pending import: the watch goes on
            watch.send_signal(signal.SIGINT)
            _, err = watch.communicate(timeout=10)
        finally:
            if watch.poll() is None:
                watch.kill()
    assert (watch.returncode, err) == (130, "")


def test_a_cancel_nothing_acted_on_shows_cancelling_and_a_cancel_is_no_error(
    tmp_path: Path, audit: ModuleType
) -> None:
    """The cancel request is stored while batch 2 is in flight, then the supervisor is SIGKILLed
    (its worker dies with it) before a batch boundary: `list` and `status` show `cancelling`, not
    `pending`. The next run marks it cancelled (exit 4); `status` then shows when it was
    cancelled and how to resume it, and no `last error`."""
    state_dir = tmp_path / "state"
    sup = start_import(state_dir, *LEFT, env=linger_at(2, 60))
    try:
        wait_until(lambda: batch_attempts(audit, state_dir, LEFT_ROOT, 2) >= 1, "batch 2 starts")
        asked = run_cli("cancel", state_dir, "--id", LEFT_ROOT, "--json")
        assert json.loads(asked.stdout)["state"] == "cancelling", asked.describe()
        worker = worker_of(sup.process.pid)
        sup.process.send_signal(signal.SIGKILL)
        wait_until(lambda: is_gone(worker), "the worker dies with its supervisor")
    finally:
        sup.close()

    assert [r["state"] for r in json.loads(run_cli("list", state_dir, "--json").stdout)] == ["cancelling"]
    assert f"{LEFT_ROOT}  cancelling  2/6 batches" in run_cli("list", state_dir).stdout
    text = run_cli("status", state_dir).stdout
    assert text.startswith(f"{LEFT_ROOT}: cancelling, 2/6 batches done")
    assert "  cancelling: a cancel request is stored; the worker running it stops at its next batch " \
           "boundary, or, if nothing runs it, the next run marks it cancelled at once" in text

    again = run_import(state_dir, *LEFT)
    assert again.returncode == 4, again.describe()  # exits.CANCELLED
    status = json.loads(run_cli("status", state_dir, "--json").stdout)
    assert (status["state"], status["last_error"]) == ("cancelled", None)
    assert status["cancelled_at"] is not None
    text = run_cli("status", state_dir).stdout
    assert f"  cancelled on request at {status['cancelled_at']} (not an error)" in text
    resume = f"python -m supervisor retry --id {LEFT_ROOT} --state-dir {state_dir.resolve()}"
    assert f"  resume it: {resume}" in text
    assert "error" not in text.replace("(not an error)", "")
