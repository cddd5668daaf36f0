"""Steps and looks shared by the fan-out tests (ctx.begin, ctx.gather, ctx.map, the step pool).

Every step execution appends one JSON line `{"id", "attempt", "pid"}` to the file its `log`
dependency names, so a test sees what ran, how often and in which process, whether the step ran
in the driver or in a forked step process. Registered names start with `fan.`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from store import Promise, PromiseStore
from workflow import PermanentError, RetryPolicy, current_step, register

FAST = RetryPolicy(max_attempts=3, initial=0)
SAFETY_TIMEOUT_S = 60.0  # only so that a broken runtime fails a test instead of hanging it


# -- the execution log -----------------------------------------------------------------------


def note_execution(**extra: Any) -> None:
    """Log this execution of the running step (one short O_APPEND write: atomic across processes)."""
    step = current_step()
    line = json.dumps({"id": step.promise_id, "attempt": step.attempt, "pid": os.getpid(), **extra})
    with open(step.dependency("log"), "a") as log:
        log.write(line + "\n")


def executions(log: Path) -> list[dict[str, Any]]:
    """Every logged step execution, in the order they were logged."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def executed_ids(log: Path) -> Counter[str]:
    """How often each promise id was executed."""
    return Counter(e["id"] for e in executions(log))


def children(store: PromiseStore, root: str) -> dict[str, Promise]:
    """The promises under `root` (not the root itself), by id."""
    return {p.id: p for p in store.list(f"{root}.")}


def ids(root: str, n: int) -> list[str]:
    return [f"{root}.{i}" for i in range(n)]


# -- steps -----------------------------------------------------------------------------------


class Refused(PermanentError):
    """A step's failure that no retry fixes."""


@register(name="fan.square")
def square(i: int) -> int:
    note_execution()
    return i * i


@register(name="fan.add")
def add(a: int, b: int) -> int:
    note_execution()
    return a + b


@register(name="fan.refuse_odd")
def refuse_odd(i: int) -> int:
    """Fails (permanently) for odd i."""
    note_execution()
    if i % 2:
        raise Refused(f"{i} is odd")
    return i


@register(name="fan.refuse_odd_while")
def refuse_odd_while(i: int, marker: str) -> int:
    """Fails (permanently) for odd i while the file `marker` exists: an operator can fix it."""
    note_execution()
    if i % 2 and os.path.exists(marker):
        raise Refused(f"{i} is odd")
    return i


@register(name="fan.pid")
def pid() -> int:
    note_execution()
    return os.getpid()


# -- waiting on a pipe -----------------------------------------------------------------------


def read_exactly(fd: int, size: int) -> bytes:
    """Read `size` bytes from a pipe, waiting at most SAFETY_TIMEOUT_S for them."""
    data = b""
    while len(data) < size:
        ready, _, _ = select.select([fd], [], [], SAFETY_TIMEOUT_S)
        if not ready:
            raise TimeoutError(f"waited {SAFETY_TIMEOUT_S} s for {size} bytes on fd {fd}")
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError(f"fd {fd} closed after {len(data)} of {size} bytes")
        data += chunk
    return data


# -- processes -------------------------------------------------------------------------------


def open_pidfds(pids: list[int]) -> list[int]:
    """A pidfd per process still running (one that is gone already needs no waiting)."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    return fds


def wait_until_gone(pidfds: list[int]) -> None:
    """Wait until every process ended (a pidfd turns readable then; a zombie has ended), then
    close the pidfds. Opened before the processes could end, they cannot name a reused pid."""
    try:
        left = list(pidfds)
        while left:
            ready, _, _ = select.select(left, [], [], SAFETY_TIMEOUT_S)
            if not ready:
                raise TimeoutError(f"{len(left)} process(es) still running after {SAFETY_TIMEOUT_S} s")
            left = [fd for fd in left if fd not in ready]
    finally:
        for fd in pidfds:
            os.close(fd)


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has ended)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def wait_for_state(pid: int, state: str) -> None:
    """Wait until the process is in `state` (T: stopped). Only its parent could await that as
    an event (waitid), so this looks at /proc every millisecond."""
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while (fields := _stat(pid)) is None or fields[0] != state:
        if fields is None or time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} never reached state {state}")
        time.sleep(0.001)


def sibling_step_processes() -> list[int]:
    """From inside a step process: the pool's live processes (the driver's children that are
    forked copies of it, like this one), this one included."""
    me = psutil.Process()
    return sorted(p.pid for p in psutil.Process(os.getppid()).children()
                  if running(p.pid) and p.cmdline() == me.cmdline())


def group_members(pgid: int) -> list[int]:
    """The processes of the process group `pgid` that have not ended."""
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(entry)
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members
