"""The supervisor's own durable record of a run: what only it knows (its workers' lives, its
kills, its restarts, the retries it saw), for `report` to draw after the run.

An append-only JSON-lines file in the state dir, `supervisor-events.jsonl`, shared by every
workflow of the dir (each line names its `id`) and by every supervisor run of one workflow (a
resumed run appends). One line per event, written whole with one `write` on an O_APPEND file, so
it survives a kill of the supervisor at once (not a power loss: nothing here is synced). Every
line has `t` (epoch seconds, the sink's clock), `id` and `event`:

- `supervisor` {pid}: a supervisor starts (or resumes) the workflow.
- `spawn` {pid}: a worker starts.
- `exit` {pid, exit, ran, replayed}: a worker ended (`exit`: "exit code N" or "killed by
  SIGKILL"), having run `ran` units and found `replayed` done in the store.
- `kill` {pid, kind, unit, worker}: a SIGKILL of ours that ended that process: the worker, or
  for kind `pool` a process of the pool of `worker`; `unit` the unit in flight, if known.
- `stall` {pid, unit, silent_s}: a worker SIGKILLed for a silent progress pipe.
- `restart` {after}: a new worker is started after worker `after` ended.
- `retry` {unit, attempt, error}: an attempt of a unit failed and will be retried.

A store given by URL without a state dir (`exec --store FILE`) has no such file: nothing is kept.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

EVENTS_FILE = "supervisor-events.jsonl"
log = logging.getLogger("supervisor")


class EventLog:
    """Appends the events of one workflow to its state dir's file (or nowhere, without one)."""

    def __init__(self, state_dir: Path | None, root_id: str) -> None:
        self._path = None if state_dir is None else state_dir / EVENTS_FILE
        self._root_id = root_id
        self._warned = False

    def add(self, event: str, **fields: Any) -> None:
        """Append one event, now; a file that cannot be written loses the event, not the run."""
        if self._path is None:
            return
        line = orjson.dumps({"t": time.time(), "id": self._root_id, "event": event, **fields}) + b"\n"
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._warned:
                log.warning("%s: cannot record the run's events (%s); `report` will lack them",
                            self._path, exc.strerror)
                self._warned = True


def read_events(state_dir: Path, root_id: str) -> list[dict[str, Any]]:
    """The events of workflow `root_id` in the state dir, oldest first; [] without a file. A
    line torn by a kill mid-write (the last one) is left out."""
    path = state_dir / EVENTS_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("id") == root_id:
            events.append(event)
    return events
