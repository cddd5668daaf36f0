"""The progress pipe: what a workflow child tells its supervisor, one JSON object per line.

The schema, owned here (every line has `event`; a supervisor reads these names and fields):

- `started` {pid}: the child is up (before it imports the workflow or opens the store).
- `heartbeat`: every `--heartbeat` seconds from a thread of its own, while the process runs
  Python code at all and none of its step processes is silent: its silence is how a supervisor
  tells a hung child (stopped, or stuck in C code holding the GIL, or a step process so).
- `step` {id, fn, kind, attempt, error, delay, step}: a StepEvent of the runner. `fn` is the
  registered name of the function called; `kind` is replayed, started, recovered, retrying,
  resolved or rejected; `step` is n when `id` is `<root>.<n>`, a direct call of the root (see
  ids.step_index), else null. (n counts every call of the root, whatever its function: an
  application whose calls are of several kinds counts its own units by `fn`.)
- `ended` {pid, code, error}: the child stops with exit status `code` (workflow/exitcodes.py)
  for the one-line reason `error`.
- `finished` {pid}: the workflow's result is stored; the child exits 0.

A failpoint's announcement (store/failpoints.py) may come on the same fd.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from .ids import step_index
from .runner import StepEvent

log = logging.getLogger("workflow.progress")

STARTED = "started"
HEARTBEAT = "heartbeat"
STEP = "step"
ENDED = "ended"
FINISHED = "finished"

# The `kind` of a `step` event a supervisor follows (the runner's StepEvent.kind).
KIND_REPLAYED = "replayed"
KIND_STARTED = "started"
KIND_RETRYING = "retrying"
KIND_RESOLVED = "resolved"
KIND_REJECTED = "rejected"

STEP_PROCESS_SILENCE = 5  # heartbeat intervals a step process may miss before we look hung


class Progress:
    """Writes the events above on an inherited fd (or nowhere, without one).

    Each line is written whole under one lock: the heartbeat thread shares the fd, and a line
    longer than PIPE_BUF (a step event with a long error) could otherwise interleave with another.
    """

    def __init__(self, fd: int | None, root_id: str) -> None:
        self._fd = fd
        self._root_id = root_id
        self._lock = threading.Lock()
        self.stalled: Callable[[float], list[int]] = lambda _limit: []  # silent step processes

    @property
    def listened(self) -> bool:
        """Whether a supervisor reads these events (it then reports the child's end itself)."""
        return self._fd is not None

    def send(self, event: str, **fields: Any) -> None:
        if self._fd is None:
            return
        line = memoryview(orjson.dumps({"event": event, **fields}) + b"\n")
        with self._lock:
            while line:  # a write cut short by a signal returns what it wrote
                line = line[os.write(self._fd, line):]

    def start_heartbeat(self, interval: float) -> None:
        """A `heartbeat` line every `interval` seconds from a daemon thread."""
        if self._fd is not None:
            threading.Thread(target=self._beat, args=(interval,), name="heartbeat", daemon=True).start()

    def _beat(self, interval: float) -> None:
        withheld = False
        while True:
            time.sleep(interval)
            stalled = self.stalled(STEP_PROCESS_SILENCE * interval)
            if stalled:  # the worker is hung in part: look hung as a whole, to be restarted
                if not withheld:
                    log.warning("step process(es) %s silent for %g s: heartbeat withheld",
                                stalled, STEP_PROCESS_SILENCE * interval)
                withheld = True
                continue
            withheld = False
            try:
                self.send(HEARTBEAT)
            except OSError as exc:  # the supervisor is gone (and this child dies with it)
                log.warning("heartbeat stopped: progress fd %d: %s", self._fd, exc.strerror)
                return

    def step(self, e: StepEvent) -> None:
        """The runner's `on_event`: one `step` line."""
        if self._fd is None:
            return
        self.send(STEP, kind=e.kind, id=e.promise_id, fn=e.fn,
                  step=step_index(self._root_id, e.promise_id),
                  attempt=e.attempt, error=e.error, delay=e.delay)
