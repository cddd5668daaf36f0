"""Named failpoints: places where a test or the supervisor can stop a process deterministically.

A failpoint is armed through the environment, so the code that hits it knows nothing of who
listens or what happens next:

    DURABLE_FAILPOINTS='[{"name": "batch.mid", "key": "3", "action": "pause"}]'

`pause` announces `{"event": "failpoint", ...}` as one line on the fd named by
DURABLE_FAILPOINT_FD (stderr if unset) and waits there to be killed; `delay` announces the same
and goes on after `"seconds"` (default 1); `raise` raises InjectedFault. Unarmed, a hit costs one
truth test.

This module owns the failpoints' names and the format of their keys: whoever hits or arms one
uses the constants and key builders below.
"""

from __future__ import annotations

import json
import os
import time

from .fsutil import write_all

ENV_POINTS = "DURABLE_FAILPOINTS"
ENV_FD = "DURABLE_FAILPOINT_FD"
PAUSE_LIMIT_S = 60.0
ACTIONS = ("pause", "delay", "raise")
ANNOUNCED = "failpoint"  # the `event` of the line a paused or delayed process announces itself with

# -- the failpoints, and their keys -------------------------------------------------------------

STORE_APPEND = "store.append"  # a JSON-lines store writing one record (torn in mid-write)
STEP_STARTED = "step.started"  # the runner: a step's attempt is recorded, its function not yet run
BATCH_MID = "batch.mid"  # the import: half a batch's rows written, its transaction not committed
BATCH_FAIL = "batch.fail"  # the import: a batch's attempt begins


def store_append_key(op: str, promise_id: str) -> str:
    """`store.append` of the record `op` (create, attempt, resolve, reject, reopen) of a promise."""
    return f"{op}:{promise_id}"


def step_started_key(promise_id: str) -> str:
    """`step.started` of the step `promise_id` (any attempt)."""
    return promise_id


def batch_mid_key(batch: int) -> str:
    """`batch.mid` of batch number `batch` (any attempt)."""
    return str(batch)


def batch_fail_key(batch: int, attempt: int) -> str:
    """`batch.fail` of one attempt of batch number `batch`."""
    return f"{batch}/{attempt}"


def entry(name: str, key: str, action: str) -> dict[str, str]:
    """One armed failpoint, as the DURABLE_FAILPOINTS list holds it."""
    if action not in ACTIONS:
        raise ValueError(f"unknown failpoint action {action!r} (one of {', '.join(ACTIONS)})")
    return {"name": name, "key": key, "action": action}


def environment(entries: list[dict[str, str]]) -> dict[str, str]:
    """The environment variables that arm `entries` in a child process (none for no entries)."""
    return {ENV_POINTS: json.dumps(entries)} if entries else {}



class InjectedFault(RuntimeError):
    """Raised by a failpoint armed with action `raise`."""


class FailpointTimeout(BaseException):
    """A paused process was not killed in time: whoever armed the failpoint is gone.

    A BaseException, so that no step retries it as one of its own failures."""


def _load() -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], float]]:
    """(name, key) -> action, and (name, key) -> seconds for the `delay` ones."""
    points: dict[tuple[str, str], str] = {}
    delays: dict[tuple[str, str], float] = {}
    for entry in json.loads(os.environ.get(ENV_POINTS) or "[]"):
        if entry["action"] not in ACTIONS:
            raise ValueError(f"{ENV_POINTS}: unknown action {entry['action']!r}")
        where = (entry["name"], str(entry["key"]))
        points[where] = entry["action"]
        if entry["action"] == "delay":
            delays[where] = float(entry.get("seconds", 1.0))
    return points, delays


_points, _delays = _load()
armed = bool(_points)


def action(name: str, key: str) -> str | None:
    """The action armed for this failpoint, or None."""
    return _points.get((name, key)) if armed else None


def hit(name: str, key: str) -> None:
    """Act on the failpoint `name` for `key` if it is armed."""
    if not armed:
        return
    what = _points.get((name, key))
    if what is None:
        return
    if what == "raise":
        raise InjectedFault(f"injected fault at {name} {key}")
    _announce(name, key)
    if what == "delay":
        time.sleep(_delays.get((name, key), 1.0))
        return
    time.sleep(PAUSE_LIMIT_S)
    raise FailpointTimeout(f"paused at {name} {key} for {PAUSE_LIMIT_S:.0f} s and nobody killed us")


def _announce(name: str, key: str) -> None:
    fd = int(os.environ.get(ENV_FD, "2"))
    line = json.dumps({"event": ANNOUNCED, "name": name, "key": key, "pid": os.getpid()})
    write_all(fd, line.encode() + b"\n")
