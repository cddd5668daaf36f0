"""Named failpoints: places where a test or the supervisor can stop a process deterministically.

A failpoint is armed through the environment, so the code that hits it knows nothing of who
listens or what happens next:

    DURABLE_FAILPOINTS='[{"name": "batch.mid", "key": "3", "action": "pause"}]'

`pause` announces `{"event": "failpoint", ...}` as one line on the fd named by
DURABLE_FAILPOINT_FD (stderr if unset) and waits there to be killed; `raise` raises InjectedFault.
Unarmed, a hit costs one truth test.
"""

from __future__ import annotations

import json
import os
import time

ENV_POINTS = "DURABLE_FAILPOINTS"
ENV_FD = "DURABLE_FAILPOINT_FD"
PAUSE_LIMIT_S = 60.0
ACTIONS = ("pause", "raise")


class InjectedFault(RuntimeError):
    """Raised by a failpoint armed with action `raise`."""


class FailpointTimeout(RuntimeError):
    """A paused process was not killed in time: whoever armed the failpoint is gone."""


def _load() -> dict[tuple[str, str], str]:
    raw = os.environ.get(ENV_POINTS)
    if not raw:
        return {}
    points = {}
    for entry in json.loads(raw):
        if entry["action"] not in ACTIONS:
            raise ValueError(f"{ENV_POINTS}: unknown action {entry['action']!r}")
        points[(entry["name"], str(entry["key"]))] = entry["action"]
    return points


_points = _load()
armed = bool(_points)


def action(name: str, key: str) -> str | None:
    """The action armed for this failpoint, or None."""
    return _points.get((name, key)) if armed else None


def hit(name: str, key: str) -> None:
    """Act on the failpoint `name` for `key` if it is armed."""
    if not armed:
        return
    what = _points.get((name, key))
    if what == "raise":
        raise InjectedFault(f"injected fault at {name} {key}")
    if what == "pause":
        _announce_and_wait(name, key)


def _announce_and_wait(name: str, key: str) -> None:
    fd = int(os.environ.get(ENV_FD, "2"))
    line = json.dumps({"event": "failpoint", "name": name, "key": key, "pid": os.getpid()})
    os.write(fd, line.encode() + b"\n")
    time.sleep(PAUSE_LIMIT_S)
    raise FailpointTimeout(f"paused at {name} {key} for {PAUSE_LIMIT_S:.0f} s and nobody killed us")
