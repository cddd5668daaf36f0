"""A small application whose steps each fork a child process, as a worker's pool would: the
tests of pool kills copy it into their tmp_path as `forking.py` and run it under `supervisor exec`.

Each step's forked child sleeps, then exits 0; the step waits for it and returns how it ended,
so a test can tell which step's process a SIGKILL hit, and that the worker itself lived on.
Every fork is logged to `forks.log` beside this file: (step, child pid, worker pid).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from workflow import Context, register

LOG = Path(__file__).with_name("forks.log")


@register(name="nap")
def nap(i: int, seconds: float) -> int | None:
    """Sleep `seconds` in a forked child; the signal that ended it (None: it exited)."""
    pid = os.fork()
    if pid == 0:  # the child: no Python cleanup of the parent's state, just sleep and leave
        time.sleep(seconds)
        os._exit(0)
    with LOG.open("a") as log:
        log.write(json.dumps({"step": i, "pid": pid, "worker": os.getpid()}) + "\n")
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


@register(name="naps")
def naps(ctx: Context, n: int, seconds: float) -> Generator[Any, Any, list[int | None]]:
    """`n` naps of `seconds`, one durable step each."""
    ends = []
    for i in range(n):
        ends.append((yield ctx.run(nap, i, seconds)))
    return ends
