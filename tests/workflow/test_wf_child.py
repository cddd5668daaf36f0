"""`python -m workflow run MODULE:FUNCTION`: the runtime's own child, as a real process running a
user's module from its current directory (SIGKILLed at a step and resumed, SIGTERMed between
steps, and every way it ends mapped to its exit status)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from wf_helpers import ChildEnded, Event, install_app, run_workflow_child, steps_logged

from store import failpoints
from workflow import exitcodes

ROOT = "wf/squares"
KILLED = -signal.SIGKILL


def squares(tmp_path: Path, n: int, *flags: str, **options: object) -> ChildEnded:
    return run_workflow_child(tmp_path, "squares:squares", "--id", ROOT, "--arg", str(n),
                              "--durability", "none", *flags, **options)


def kill_at_failpoint(proc: subprocess.Popen[bytes], event: Event) -> None:
    if event["event"] == failpoints.ANNOUNCED:
        os.kill(proc.pid, signal.SIGKILL)


def test_runs_the_workflow_prints_its_result_and_replays_it(tmp_path: Path) -> None:
    install_app(tmp_path)
    first = squares(tmp_path, 3)
    assert first.returncode == exitcodes.OK, first.stderr
    assert json.loads(first.stdout) == [0, 1, 4]
    assert (tmp_path / ".durable" / "store.jsonl").exists()  # the default state dir

    again = squares(tmp_path, 3)
    assert again.returncode == exitcodes.OK, again.stderr
    assert json.loads(again.stdout) == [0, 1, 4]
    assert steps_logged(tmp_path) == [(f"{ROOT}.{i}", 1) for i in range(3)]  # none ran again


def test_sigkilled_at_a_step_it_resumes_there(tmp_path: Path) -> None:
    install_app(tmp_path)
    pause = failpoints.entry(failpoints.STEP_STARTED, failpoints.step_started_key(f"{ROOT}.2"), "pause")

    killed = squares(tmp_path, 5, failpoints=[pause], act=kill_at_failpoint)
    assert killed.returncode == KILLED, killed.stderr
    assert killed.steps("resolved") == [0, 1]
    assert killed.steps("started") == [0, 1, 2]  # step 2's attempt was recorded, then the kill

    resumed = squares(tmp_path, 5)
    assert resumed.returncode == exitcodes.OK, resumed.stderr
    assert json.loads(resumed.stdout) == [0, 1, 4, 9, 16]
    assert resumed.steps("replayed") == [0, 1]
    assert [(e["step"], e["attempt"]) for e in resumed.events if e.get("kind") == "started"] == [
        (2, 2), (3, 1), (4, 1)]  # the killed attempt counts
    assert steps_logged(tmp_path) == [(f"{ROOT}.{i}", 1) for i in (0, 1)] + [
        (f"{ROOT}.2", 2), (f"{ROOT}.3", 1), (f"{ROOT}.4", 1)]  # step 2's function never ran twice


def test_sigterm_lets_the_step_in_flight_finish_then_exits_interrupted(tmp_path: Path) -> None:
    install_app(tmp_path)

    def term_at_step_1(proc: subprocess.Popen[bytes], event: Event) -> None:
        if event.get("kind") == "started" and event.get("step") == 1:
            os.kill(proc.pid, signal.SIGTERM)

    stopped = squares(tmp_path, 4, "--arg", "0.2", act=term_at_step_1)
    assert stopped.returncode == exitcodes.INTERRUPTED, stopped.stderr
    assert stopped.steps("resolved") == [0, 1]
    assert stopped.events[-1]["event"] == "ended" and stopped.events[-1]["code"] == exitcodes.INTERRUPTED
    assert "Traceback" not in stopped.stderr

    resumed = squares(tmp_path, 4, "--arg", "0.2")
    assert resumed.returncode == exitcodes.OK, resumed.stderr
    assert resumed.steps("started") == [2, 3]


def test_a_step_failing_for_good_exits_failed_naming_the_step(tmp_path: Path) -> None:
    app = install_app(tmp_path)
    app.write_text(app.read_text().replace("BROKEN: tuple[int, ...] = ()", "BROKEN = (1,)"))

    failed = squares(tmp_path, 3, "--max-attempts", "2", "--retry-initial", "0")

    assert failed.returncode == exitcodes.FAILED, failed.stderr
    last = failed.error_line
    assert f"step 'square' ({ROOT}.1) failed after 2 attempts: ValueError: square 1 is broken" in last
    assert "Traceback" not in failed.stderr
    assert failed.stdout == ""


def test_a_permanent_error_is_not_retried(tmp_path: Path) -> None:
    install_app(tmp_path)
    failed = run_workflow_child(tmp_path, "squares:refusing", "--id", "wf/refusing",
                                "--max-attempts", "5", "--retry-initial", "0")
    assert failed.returncode == exitcodes.FAILED, failed.stderr
    assert "(wf/refusing.0) failed after 1 attempt: NoSuchSquare: not today" in failed.error_line
    assert [e["kind"] for e in failed.events if e["event"] == "step"] == ["started", "rejected", "rejected"]


def test_a_setup_hook_refusing_is_fatal_before_the_store_is_opened(tmp_path: Path) -> None:
    install_app(tmp_path)
    refused = squares(tmp_path, -1, "--setup", "squares:setup", "--state-dir", "state")
    assert refused.returncode == exitcodes.FATAL, refused.stderr
    assert refused.error_line == "error: cannot make -1 squares"
    assert refused.stderr.strip() == ""
    assert list((tmp_path / "state").iterdir()) == []  # no store was created


BAD_TARGETS = {  # target, exit status, what the error says
    "no-such-module": ("nosuch:squares", exitcodes.FATAL, "error: cannot import nosuch: ModuleNotFoundError"),
    "no-such-function": ("squares:cubes", exitcodes.FATAL, "has no cubes"),
    "not-a-function": ("squares:BROKEN", exitcodes.FATAL, "BROKEN is a tuple, not a function"),
    "no-colon": ("squares", exitcodes.USAGE, "expected MODULE:FUNCTION"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_a_bad_target_is_one_error_line_and_no_restart_helps(tmp_path: Path, case: str) -> None:
    install_app(tmp_path)
    target, code, says = BAD_TARGETS[case]
    ended = run_workflow_child(tmp_path, target, "--id", ROOT, "--arg", "3")
    assert ended.returncode == code, ended.stderr
    assert says in (ended.stderr if code == exitcodes.USAGE else ended.error_line)
    assert "Traceback" not in ended.stderr
    assert code not in exitcodes.RESTARTABLE


def test_a_module_that_raises_on_import_is_named_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "typo.py").write_text("import os\n\nvalue = undefined_name\n")
    ended = run_workflow_child(tmp_path, "typo:main", "--id", ROOT)
    assert ended.returncode == exitcodes.FATAL
    assert ended.stderr.strip() == ""
    assert ended.error_line == (f"error: cannot import typo ({tmp_path / 'typo.py'}:3): "
                                    "NameError: name 'undefined_name' is not defined")


@pytest.mark.parametrize("flags, says", [
    (("--id", "wf/a.b"), "without '.'"),
    (("--id", ROOT, "--store", "memory:"), "memory: dies with the process"),
    (("--id", ROOT, "--arg", "{not json"), "not JSON"),
    (("--id", ROOT, "--workers", "0"), "--workers: must be at least 1, not 0"),
    (("--id", ROOT, "--workers", "65"), "--workers: at most 64, not 65"),
])
def test_usage_errors_exit_2(tmp_path: Path, flags: tuple[str, ...], says: str) -> None:
    install_app(tmp_path)
    ended = run_workflow_child(tmp_path, "squares:squares", *flags)
    assert ended.returncode == exitcodes.USAGE
    assert says in ended.stderr
