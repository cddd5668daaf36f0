"""`python -m supervisor exec MODULE:FUNCTION`: any workflow, supervised, SIGKILLed on purpose and
restarted, from a user's module in the current directory; and the new user's whole loop: a step
that fails for good, a fix, `retry`, and the same command again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from supervisor_helpers import REPO, RUN_TIMEOUT_S, Finished, child_env, parse_report

ROOT = "wf/squares"
STATE = "state"


def install_squares(directory: Path) -> Path:
    """The test application tests/apps/squares.py, as the user's own module `squares`."""
    app = directory / "squares.py"
    app.write_text((REPO / "tests" / "apps" / "squares.py").read_text())
    return app


def supervisor(directory: Path, *args: str) -> Finished:
    """`python -m supervisor ARGS`, run in `directory` (where the user's module is)."""
    proc = subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True,
                          env=child_env({"PYTHONDONTWRITEBYTECODE": "1"}), cwd=directory,
                          timeout=RUN_TIMEOUT_S, check=False)
    return Finished(proc.returncode, parse_report(proc.stdout), proc.stdout, proc.stderr)


def exec_squares(directory: Path, n: int, *flags: str, root: str = ROOT) -> Finished:
    return supervisor(directory, "exec", "squares:squares", "--id", root, "--arg", str(n),
                      "--state-dir", STATE, "--durability", "none", *flags)


def steps_logged(directory: Path) -> list[tuple[str, int]]:
    """(id, attempt) of every step attempt the application logged, in order."""
    lines = (directory / "steps.log").read_text().splitlines()
    return [(e["id"], e["attempt"]) for e in map(json.loads, lines)]


def test_kill_at_step_1_lands_in_step_1_and_the_rerun_resumes_there(tmp_path: Path) -> None:
    install_squares(tmp_path)
    run = exec_squares(tmp_path, 5, "--kill-at-step", "1", "--json")

    assert run.returncode == 0, run.describe()
    report = run.report
    assert report["ok"] is True and report["result"] == [0, 1, 4, 9, 16]
    first, second = report["children"]
    assert report["kills"] == [{"pid": first["pid"], "kind": "kill-at-step", "step": 1}]
    assert first["exit"] == "killed by SIGKILL" and second["exit"] == "exit code 0"
    assert (first["executed"], second["executed"], second["replayed"]) == ([0], [1, 2, 3, 4], 1)
    assert report["restarts"] == 1
    # Killed once step 1's attempt was recorded, before its function ran: it ran once, attempt 2.
    assert steps_logged(tmp_path) == [(f"{ROOT}.0", 1), (f"{ROOT}.1", 2)] + [
        (f"{ROOT}.{i}", 1) for i in (2, 3, 4)]


def test_random_kills_return_the_same_result_as_a_run_without_kills(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "killed").mkdir()
    install_squares(tmp_path / "plain")
    install_squares(tmp_path / "killed")
    plain = exec_squares(tmp_path / "plain", 12, "--arg", "0.02", "--json")
    killed = exec_squares(tmp_path / "killed", 12, "--arg", "0.02", "--kill-random", "3",
                          "--seed", "7", "--json")

    assert plain.returncode == 0, plain.describe()
    assert killed.returncode == 0, killed.describe()
    assert killed.report["result"] == plain.report["result"] == [i * i for i in range(12)]
    kills, undelivered = killed.report["kills"], killed.report["undelivered_kills"]
    assert len(kills) + len(undelivered) == 3 and kills, killed.describe()
    assert killed.report["restarts"] == len(kills)
    executed = [s for c in killed.report["children"] for s in c["executed"]]
    assert sorted(executed) == list(range(12))  # every step resolved once, none ran after it resolved


def test_the_json_report_has_the_documented_keys(tmp_path: Path) -> None:
    install_squares(tmp_path)
    run = exec_squares(tmp_path, 2, "--json")
    assert run.returncode == 0, run.describe()
    assert {"id", "ok", "result", "restarts", "kills", "children"} <= set(run.report)
    assert (run.report["id"], run.report["ok"], run.report["result"]) == (ROOT, True, [0, 1])
    assert run.report["state_dir"] == str((tmp_path / STATE).resolve())


def test_a_new_users_loop_fail_fix_retry_resume(tmp_path: Path) -> None:
    app = install_squares(tmp_path)
    app.write_text(app.read_text().replace("BROKEN: tuple[int, ...] = ()", "BROKEN = (2,)"))

    failed = exec_squares(tmp_path, 4, "--max-attempts", "2", "--retry-initial", "0")
    assert failed.returncode == 1, failed.describe()
    last = failed.last_error_line
    assert last.startswith("error: ") and f"({ROOT}.2) failed after 2 attempts" in last, last
    assert "ValueError: square 2 is broken" in last
    assert f"`python -m supervisor retry --id {ROOT} --state-dir {(tmp_path / STATE).resolve()}`" in last

    status = supervisor(tmp_path, "status", "--id", ROOT, "--state-dir", STATE)
    assert status.returncode == 0, status.describe()
    assert f"{ROOT}: rejected, 2 steps done, 4 step attempts in all" in status.stdout
    assert "failed steps: 1" in status.stdout

    app.write_text(app.read_text().replace("BROKEN = (2,)", "BROKEN: tuple[int, ...] = ()"))
    retry = supervisor(tmp_path, "retry", "--id", ROOT, "--state-dir", STATE)
    assert retry.returncode == 0, retry.describe()
    assert f"reopened {ROOT}.2 (was: ValueError: square 2 is broken)" in retry.stdout
    assert f"reopened {ROOT}; run the same `python -m supervisor exec` command" in retry.stdout

    again = exec_squares(tmp_path, 4, "--json")
    assert again.returncode == 0, again.describe()
    assert again.report["result"] == [0, 1, 4, 9]
    [child] = again.report["children"]
    assert (child["replayed"], child["executed"]) == (2, [2, 3])
    logged = steps_logged(tmp_path)
    assert [s for s, _ in logged].count(f"{ROOT}.0") == 1  # resolved steps never ran again
    assert [s for s, _ in logged].count(f"{ROOT}.1") == 1
    assert logged[-2:] == [(f"{ROOT}.2", 3), (f"{ROOT}.3", 1)]  # a fresh budget for step 2

    status = supervisor(tmp_path, "status", "--id", ROOT, "--state-dir", STATE, "--json")
    s = json.loads(status.stdout)
    steps = s.pop("steps")
    assert s.pop("last_activity").endswith("+00:00")
    assert s == {
        "id": ROOT, "state": "resolved", "cancelled_at": None, "code": "squares v1", "steps_done": 4,
        "step_count": None,
        "steps_failed": 0, "pending_step": None, "attempts": 6, "last_error": None,
        "in_flight": [], "rate_per_s": None, "eta_s": None, "result": [0, 1, 4, 9],
    }
    assert [(r["step"], r["id"], r["state"], r["attempts"], r["executions"], r["error"]) for r in steps] == [
        (n, f"{ROOT}.{n}", "resolved", 3 if n == 2 else 1, [], None) for n in range(4)]


def test_a_store_given_by_url_serves_exec_status_and_retry(tmp_path: Path) -> None:
    app = install_squares(tmp_path)
    app.write_text(app.read_text().replace("BROKEN: tuple[int, ...] = ()", "BROKEN = (0,)"))
    common = ("squares:squares", "--id", ROOT, "--arg", "2", "--store", "jsonl:mine.jsonl")

    failed = supervisor(tmp_path, "exec", *common, "--max-attempts", "1")
    assert failed.returncode == 1, failed.describe()
    assert f"retry --id {ROOT} --store jsonl:mine.jsonl`" in failed.last_error_line
    app.write_text(app.read_text().replace("BROKEN = (0,)", "BROKEN: tuple[int, ...] = ()"))
    assert supervisor(tmp_path, "retry", "--id", ROOT, "--store", "jsonl:mine.jsonl").returncode == 0
    done = supervisor(tmp_path, "exec", *common, "--json")

    assert done.returncode == 0, done.describe()
    assert done.report["result"] == [0, 1] and done.report["store"] == "jsonl:mine.jsonl"
    assert (tmp_path / "mine.jsonl").exists() and not (tmp_path / ".durable").exists()
    status = supervisor(tmp_path, "status", "--id", ROOT, "--store", "jsonl:mine.jsonl", "--json")
    assert json.loads(status.stdout)["steps_done"] == 2


def test_a_kill_at_step_that_would_spend_the_last_attempt_is_refused(tmp_path: Path) -> None:
    install_squares(tmp_path)
    refused = exec_squares(tmp_path, 3, "--kill-at-step", "1", "--max-attempts", "1")
    assert refused.returncode == 2, refused.describe()
    assert refused.last_error_line.startswith("error: --kill-at-step 1 needs --max-attempts 2 or more")
    assert not (tmp_path / STATE).exists()


def test_a_kill_at_a_step_the_workflow_does_not_have_is_reported_undelivered(tmp_path: Path) -> None:
    install_squares(tmp_path)
    run = exec_squares(tmp_path, 2, "--kill-at-step", "5", "--json")
    assert run.returncode == 0, run.describe()
    assert run.report["undelivered_kills"] == ["kill at step 5: the workflow has no step 5"]


def test_exec_imports_no_application_module(tmp_path: Path) -> None:
    install_squares(tmp_path)
    check = (
        "import sys\n"
        "from supervisor.cli import main\n"
        f"code = main(['exec', 'squares:squares', '--id', '{ROOT}', '--arg', '2'])\n"
        "assert code == 0, code\n"
        "loaded = sorted(m for m in sys.modules if m == 'squares' or m.startswith('workflow.importer'))\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                          env=child_env(), timeout=RUN_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_store_url_that_names_no_backend_is_a_usage_line_not_a_traceback(tmp_path: Path) -> None:
    for url, says in [("foo:bar", "unknown store URL scheme 'foo'"),
                      ("postgresql:h/db", "a PostgreSQL URL reads postgresql://"),
                      ("jsonl:", "jsonl: needs a path")]:
        done = supervisor(tmp_path, "status", "--id", ROOT, "--store", url)
        assert done.returncode == 2, done.describe()
        assert says in done.stderr and "Traceback" not in done.stderr, done.describe()


def test_kill_at_a_step_that_is_a_sub_workflow_is_reported_undelivered_and_why(tmp_path: Path) -> None:
    (tmp_path / "nested.py").write_text(
        "def sq(i):\n    return i * i\n\n"
        "def sub(ctx, i):\n    return (yield ctx.run(sq, i))\n\n"
        "def outer(ctx):\n    return [(yield ctx.run(sq, 0)), (yield ctx.run(sub, 1))]\n"
    )
    run = supervisor(tmp_path, "exec", "nested:outer", "--id", "nested", "--kill-at-step", "1", "--json")
    assert run.returncode == 0, run.describe()
    assert run.report["result"] == [0, 1] and run.report["kills"] == []
    assert run.report["undelivered_kills"] == [
        "kill at step 1: step 1 is a sub-workflow, which has no attempt to be killed in"]


def test_a_second_supervisor_reaching_the_store_through_store_exits_3_naming_the_first(
    tmp_path: Path,
) -> None:
    install_squares(tmp_path)
    first = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "exec", "squares:squares", "--id", ROOT, "--arg", "40",
         "--arg", "0.6", "--state-dir", STATE], cwd=tmp_path, env=child_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        store = tmp_path / STATE / "store.jsonl"
        deadline = time.monotonic() + 30
        while not (store.exists() and b'"op":"create"' in store.read_bytes()):
            assert time.monotonic() < deadline, "the first supervisor did not start its workflow"
            time.sleep(0.05)
        second = supervisor(tmp_path, "exec", "squares:squares", "--id", ROOT, "--arg", "40",
                            "--arg", "0.6", "--store", str(store), "--max-restarts", "0")
    finally:
        first.kill()
        first.wait(30)
    assert second.returncode == 3, second.describe()
    assert "is held by another worker (pid" in second.last_error_line, second.describe()
