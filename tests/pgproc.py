"""Helpers of the PostgreSQL attack tests: child processes that announce where they stand, and
raw looks at the database that no store object filters.

A child writes JSON lines on stdout; the test waits for one (bounded only so that a broken child
fails the test instead of hanging it), then SIGSTOPs, SIGCONTs or SIGKILLs it. Whatever happens,
a child is continued and killed when its test ends.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 20.0  # a child that says nothing for this long is broken

Event = dict[str, Any]


def child_env() -> dict[str, str]:
    """A child's environment: the repository's packages first, no failpoints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Child:
    """A Python child process whose stdout is a stream of JSON events."""

    def __init__(self, script: Path, *args: str | float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *map(str, args)], env=child_env(), cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self.events: list[Event] = []
        self._pending = b""
        self._fd = self.proc.stdout.fileno()
        self._eof = False

    def wait_for(self, wanted: Callable[[Event], bool] | str, timeout: float = WAIT_S) -> Event:
        """The first event from now on that is `wanted` (or has that "event" name)."""
        if isinstance(wanted, str):
            name = wanted
            wanted = lambda e: e.get("event") == name  # noqa: E731
        seen = len(self.events)
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[seen:]:
                if wanted(event):
                    return event
            seen = len(self.events)
            if self._eof or time.monotonic() >= deadline:
                raise AssertionError(f"child {self.pid} never announced it: {self.describe()}")
            self._read(deadline - time.monotonic())

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return
        chunk = os.read(self._fd, 1 << 16)
        if not chunk:
            self._eof = True
            return
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        self.events.extend(json.loads(line) for line in lines if line.strip())

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def finish(self, timeout: float = WAIT_S) -> int:
        """Its exit status, once it has ended by itself (its remaining events read)."""
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def stderr(self) -> str:
        """What it wrote on stderr (only once it has ended)."""
        return self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""

    def describe(self) -> str:
        return f"events {self.events}, status {self.proc.poll()}, stderr {self.stderr()[-2000:]!r}"

    def end(self) -> None:
        """Killed (continued first, so that a stopped child dies at once) and reaped."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@contextmanager
def children() -> Iterator[Callable[..., Child]]:
    """`start(script, *args)` starts a child; every child started is ended on exit."""
    started: list[Child] = []

    def start(script: Path, *args: str | float) -> Child:
        started.append(Child(script, *args))
        return started[-1]

    try:
        yield start
    finally:
        for child in started:
            child.end()


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """What another session sees now (the rows of `sql`, none for a statement without any)."""
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(sql, params or None)
        return cursor.fetchall() if cursor.description is not None else []


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table in the database, every column, in a stable order."""
    tables = [t for (t,) in query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    return {t: sorted(query(url, f'SELECT * FROM "{t}"'), key=repr) for t in sorted(tables)}


def lease(url: str, root: str) -> tuple[str, int, float] | None:
    """(owner, epoch, seconds until it expires) of the lease of `root`, as the database has it."""
    rows = query(url, "SELECT owner, epoch, extract(epoch FROM expires_at - now())::float8 "
                      "FROM leases WHERE root = %s", root)
    return rows[0] if rows else None


def wait_until(condition: Callable[[], Any], timeout: float = WAIT_S, every: float = 0.02) -> Any:
    """The first true value of `condition()`, polled; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true after {timeout} s: {condition}")
        time.sleep(every)
