"""The text of `status` and the terminal fitting of `--watch`, without processes: what is folded,
what is shown in full, and a snapshot that never wraps or scrolls."""

from __future__ import annotations

import io

from store import Promise, State
from supervisor.inspect import DETAILED_RESOLVED, status_of, status_text
from supervisor.redraw import Redraw, _fit
from supervisor.report import Terms
from workflow.history import History

ROOT = "wf/many"


def history(states: list[tuple[State, int]]) -> History:
    """A workflow whose step n has the state and attempt count states[n], settled a second apart."""
    steps = {
        n: Promise(f"{ROOT}.{n}", {"fn": "step"}, state, attempts=attempts, created_at=float(n),
                   settled_at=None if state is State.PENDING else float(n) + 1,
                   error={"type": "ValueError", "message": "bad"} if state is State.REJECTED else None)
        for n, (state, attempts) in enumerate(states)
    }
    root = Promise(ROOT, {"fn": "many", "v": 1, "args": []}, State.PENDING, created_at=0.0)
    return History(root, list(steps.values()), steps)


def test_plain_runs_fold_and_only_the_first_retried_ones_show_in_full() -> None:
    retried = DETAILED_RESOLVED + 5
    states = [(State.RESOLVED, 1)] * 100 + [(State.RESOLVED, 2)] * retried + [(State.REJECTED, 3),
                                                                            (State.PENDING, 1)]
    s = status_of(history(states), Terms(), now=200.0)
    lines = status_text(s, Terms(), now=200.0).splitlines()

    assert "    0-99: resolved (1 attempt each)" in lines
    shown = [line for line in lines if line.startswith("    1") and "): resolved, 2 attempt(s)" in line]
    assert len(shown) == DETAILED_RESOLVED
    first, last = 100 + DETAILED_RESOLVED, 100 + retried - 1
    folded = f"    {first}-{last}: resolved (10 attempts in all; --json has each)"
    assert folded in lines
    assert f"    {100 + retried} ({ROOT}.{100 + retried}): rejected, 3 attempt(s)" in lines
    assert "        error: ValueError: bad" in lines
    assert f"    {101 + retried} ({ROOT}.{101 + retried}): pending, 1 attempt(s)" in lines
    assert len(s["steps"]) == len(states) and s["in_flight"] == [101 + retried]


def test_a_snapshot_is_cut_to_the_window_and_plain_off_a_terminal() -> None:
    lines = [f"line {n} " + "x" * 200 for n in range(100)]
    fitted = _fit(lines, 80, 24)
    assert len(fitted) == 23 and all(len(line) <= 79 for line in fitted)
    assert fitted[-1].startswith("... 78 more lines")

    pipe = io.StringIO()
    screen = Redraw(pipe)
    screen.show("a\nb")
    screen.show("c")
    assert pipe.getvalue() == "a\nb\n\nc\n"
