"""What `status` shows of one workflow: its progress, each unit (an import's batch) with its
attempts, executions and error, what is in flight, and when it should be done.

Pure: it works on a History read from the store, the executions the application recorded (the
import's sink), and the time now, so it is tested without processes. The JSON report has every
unit; the text keeps a 10,000-batch import readable by folding runs of units that went plainly
(resolved at the first attempt) into one line and showing the others in full.
"""

from __future__ import annotations

import datetime
import time
from collections import defaultdict
from collections.abc import Sequence
from itertools import groupby
from typing import Any

from store import Promise, State
from workflow.history import History, recorded_call, state_of

from .report import Terms

RATE_WINDOW = 20  # the last units resolved, whose pace the ETA assumes
DETAILED_RESOLVED = 20  # resolved units shown in full (retried, killed); the rest are counted
# How the text names an execution without an outcome, by its unit's state when it is the unit's
# last: a pending unit's may still run (or its worker was killed and nothing runs it yet); a
# rejected unit's failed. Any other one was killed, or raised (the store keeps the last error).
UNFINISHED_LAST = {State.PENDING.value: "no outcome yet (running, or killed)",
                   State.REJECTED.value: "failed"}
UNFINISHED = "killed/failed"
CANCELLED, CANCELLING = "cancelled", "cancelling"


def timestamp(t: float) -> str:
    """An epoch time as people and tools read it: ISO 8601, UTC, to the second."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def last_activity(history: History) -> float:
    """When the store last changed for this workflow: the latest creation or settle of its
    promises (records keep their times; an attempt's start is counted in the line of its
    creation, not for the later attempts of a step)."""
    return max(max(p.created_at, p.settled_at or 0.0) for p in [history.root, *history.calls])


def state_in_words(root: Promise, cancel_requested: bool) -> str:
    """The workflow's state as `list` and `status` show it: its state (workflow/history.py's
    words), or CANCELLING while it is pending with a cancel request stored that no worker has
    acted on yet (it is running, or nothing runs it and the next run marks it cancelled)."""
    if cancel_requested and root.state is State.PENDING:
        return CANCELLING
    return state_of(root)


def status_of(history: History, terms: Terms, executions: Sequence[dict[str, Any]] = (),
              now: float | None = None, cancel_requested: bool = False) -> dict[str, Any]:
    """The status report; its keys name the units in the workflow's own words (`batches_done`),
    and count only them (an import's batches, not its plan steps). The last error is any step's,
    or the root's unless it is a cancellation (asked for, not an error: `cancelled_at` says when)."""
    root, unit, units = history.root, terms.unit, terms.units
    counted = terms.units_of(history)
    state = state_in_words(root, cancel_requested)
    cancelled = state == CANCELLED
    error = _last_step_error(history) if cancelled else history.last_error
    pending, call = counted.first_pending, recorded_call(root)
    total = terms.step_count(history)
    done = len(counted.in_state(State.RESOLVED))
    rows = unit_rows(counted, unit, executions)
    rate = _rate(counted, time.time() if now is None else now)
    final = is_final(root)
    remaining = None if total is None else total - done
    return {
        "id": root.id,
        "state": state,
        "cancelled_at": timestamp(root.settled_at) if cancelled and root.settled_at else None,
        "code": None if call is None else f"{call.fn} v{call.version}",  # which code it runs
        f"{units}_done": done,
        f"{unit}_count": total,
        f"{units}_failed": len(counted.in_state(State.REJECTED)),
        f"pending_{unit}": None if pending is None else {"id": pending.id, "attempts": pending.attempts},
        "attempts": counted.attempts,
        "last_error": None if error is None else error_text(error),
        "last_activity": timestamp(last_activity(history)),
        "in_flight": [r[unit] for r in rows if r["state"] == State.PENDING.value],
        "rate_per_s": None if final or rate is None else round(rate, 3),
        "eta_s": None if final or rate is None or remaining is None else round(remaining / rate, 1),
        "result": None if root.state is not State.RESOLVED else terms.summary(root.value),
        units: rows,
    }


def _last_step_error(history: History) -> dict[str, Any] | None:
    return next((p.error for p in reversed(history.steps.values()) if p.error), None)


def unit_rows(counted: History, unit: str, executions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per unit begun, numbered among the units: its state, attempts, executions, error."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in executions:
        runs[e["promise_id"]].append(e)
    return [
        {
            unit: number,
            "id": p.id,
            "state": p.state.value,
            "attempts": p.attempts,
            "executions": [_execution(e) for e in runs.get(p.id, [])],
            "error": None if p.error is None else error_text(p.error),
        }
        for number, p in enumerate(p for _, p in sorted(counted.steps.items()))
    ]


def _execution(e: dict[str, Any]) -> dict[str, Any]:
    finished = e["finished_at"]
    return {
        "pid": e["pid"],
        "attempt": e["attempt"],
        "outcome": e["outcome"],
        "started_at": e["started_at"],
        "duration_s": None if finished is None else round(finished - e["started_at"], 4),
    }


def _rate(counted: History, now: float) -> float | None:
    """Units resolved per second since the first of the last RATE_WINDOW resolved, until now
    (so a run that stalls slows it down); None before two."""
    times = sorted(p.settled_at for p in counted.in_state(State.RESOLVED) if p.settled_at)[-RATE_WINDOW:]
    if len(times) < 2 or now <= times[0]:
        return None
    return (len(times) - 1) / (now - times[0])


def error_text(error: dict[str, Any]) -> str:
    return f"{error.get('type')}: {error.get('message')}"


# -- text ----------------------------------------------------------------------------------------


def status_text(s: dict[str, Any], terms: Terms, now: float, retry_hint: str | None = None) -> str:
    """The report for people: the totals, then the units (plain runs folded)."""
    unit, units = terms.unit, terms.units
    done, count = s[f"{units}_done"], s[f"{unit}_count"]
    progress = f"{done}/{count}" if count is not None else f"{done}"
    lines = [f"{s['id']}: {s['state']}, {progress} {units} done, {s['attempts']} {unit} attempts in all"]
    if s["code"]:
        lines.append(f"  code: {s['code']}")
    lines.append(f"  last activity: {s['last_activity']}")
    if s[f"pending_{unit}"]:
        p = s[f"pending_{unit}"]
        lines.append(f"  pending: {p['id']} ({p['attempts']} attempt(s) started)")
    if s["eta_s"] is not None:
        lines.append(f"  eta: {_duration(s['eta_s'])} at {s['rate_per_s']:g} {units}/s (the pace of "
                     f"the last {units} done; it assumes the run goes on)")
    if s[f"{units}_failed"]:
        lines.append(f"  failed {units}: {s[f'{units}_failed']}")
    if s["state"] == CANCELLING:
        lines.append(f"  cancelling: a cancel request is stored; the worker running it stops at its next "
                     f"{unit} boundary, or, if nothing runs it, the next run marks it cancelled at once")
    if s["cancelled_at"]:
        lines.append(f"  cancelled on request at {s['cancelled_at']} (not an error)")
    if s["last_error"]:
        lines.append(f"  last error: {s['last_error']}")
    if retry_hint:
        verb = "resume it" if s["state"] == CANCELLED else "retry it"
        lines.append(f"  {verb}: {retry_hint}")
    if s["state"] == State.RESOLVED.value:
        lines.append(f"  result: {terms.result_text(s['result'])}")
    if s[units]:
        lines.append(f"  {units}:")
        lines.extend(_unit_lines(s[units], count, terms, now))
    return "\n".join(lines)


def _unit_lines(rows: list[dict[str, Any]], count: int | None, terms: Terms, now: float) -> list[str]:
    """Runs of plain units as one line each; every other unit in full, with its executions."""
    unit = terms.unit
    detailed = _detailed(rows, unit)
    lines: list[str] = []
    for shown, group in groupby(rows, key=lambda r: r[unit] in detailed):
        group = list(group)
        if shown:
            for r in group:
                lines.extend(_unit_in_full(r, unit, now))
        else:
            lines.append(_folded(group, unit))
    if count is not None and count > len(rows):
        lines.append(f"    {_span(len(rows), count - 1)}: not begun")
    return lines


def _detailed(rows: list[dict[str, Any]], unit: str) -> set[int]:
    """The units shown in full: every one not resolved, and the first DETAILED_RESOLVED resolved
    ones with a history (more than one attempt or execution, or one that did not commit)."""
    resolved = [r for r in rows if r["state"] == State.RESOLVED.value and not _plain(r)]
    return ({r[unit] for r in rows if r["state"] != State.RESOLVED.value}
            | {r[unit] for r in resolved[:DETAILED_RESOLVED]})


def _plain(row: dict[str, Any]) -> bool:
    return row["attempts"] <= 1 and all(e["outcome"] == "committed" for e in row["executions"])


def _folded(group: list[dict[str, Any]], unit: str) -> str:
    attempts = sum(r["attempts"] for r in group)
    if attempts == len(group):
        how = "1 attempt" if len(group) == 1 else "1 attempt each"
    else:
        how = f"{attempts} attempts in all; --json has each"
    return f"    {_span(group[0][unit], group[-1][unit])}: {group[0]['state']} ({how})"


def _unit_in_full(row: dict[str, Any], unit: str, now: float) -> list[str]:
    lines = [f"    {row[unit]} ({row['id']}): {row['state']}, {row['attempts']} attempt(s)"]
    last = len(row["executions"]) - 1
    for i, e in enumerate(row["executions"]):
        if e["outcome"] is not None:
            outcome, took = e["outcome"], f"{e['duration_s']:.3f} s"
        elif i == last and row["state"] in UNFINISHED_LAST:
            outcome, took = UNFINISHED_LAST[row["state"]], ""
            if row["state"] == State.PENDING.value:
                took = f"started {now - e['started_at']:.1f} s ago"
        else:
            outcome, took = UNFINISHED, ""
        lines.append(f"        attempt {e['attempt']}  pid {e['pid']}  {outcome}  {took}".rstrip())
    if row["error"]:
        lines.append(f"        error: {row['error']}")
    return lines


def _span(first: int, last: int) -> str:
    return f"{first}" if first == last else f"{first}-{last}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"~{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"~{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"~{minutes}m{secs:02d}s"


def is_final(promise: Promise) -> bool:
    """Whether the workflow has ended (any state but pending): nothing more will change it."""
    return promise.state is not State.PENDING
