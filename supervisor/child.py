"""One worker process, `python -m workflow ...`: spawned in its own process group, watched
through pipes, reaped.

The worker writes JSON-lines events on a progress pipe; its stdout and stderr (one pipe) are
read line by line (the supervisor shows them), and their last lines kept for error reports. It dies with
the supervisor (PR_SET_PDEATHSIG), so an orphan never runs on beside a new supervisor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

from store.failpoints import ENV_FD
from workflow.pool import die_with_parent

log = logging.getLogger("supervisor")
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def _wait_for_group_to_die(pgid: int, timeout: float = 5.0) -> None:
    """Wait until no process of the worker's group runs code any more (none, nearly always: a
    fast check). A zombie counts as dead: the processes of a worker's pool, killed with it, wait
    as zombies for init to reap them, which may take it a second or two."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    members = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
    deadline = time.monotonic() + timeout
    while alive := [p for p in members if _runs_code(p)]:
        if time.monotonic() >= deadline:
            log.error("processes %s of worker group %d survived SIGKILL", [p.pid for p in alive], pgid)
            return
        time.sleep(0.005)


def _runs_code(proc: psutil.Process) -> bool:
    """Whether `proc` still exists and is no zombie."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class ChildEnd:
    pid: int
    returncode: int  # negative: killed by that signal

    @property
    def signal(self) -> signal.Signals | None:
        return signal.Signals(-self.returncode) if self.returncode < 0 else None

    def describe(self) -> str:
        sig = self.signal
        return f"killed by {sig.name}" if sig else f"exit code {self.returncode}"


@dataclass
class Child:
    process: subprocess.Popen[bytes]
    progress_fd: int
    output_fd: int  # the worker's stdout and stderr
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    _buffers: dict[int, bytes] = field(default_factory=dict)
    _pool: dict[int, psutil.Process] = field(default_factory=dict)  # as `pool()` last found it

    @classmethod
    def spawn(cls, args: list[str], env: dict[str, str]) -> Child:
        """Start `python -m workflow ARGS --progress-fd N`; `env` adds to ours (failpoints)."""
        progress_r, progress_w = os.pipe()
        output_r, output_w = os.pipe()
        env = {**os.environ, **env, ENV_FD: str(progress_w), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        parent = os.getpid()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "workflow", *args, "--progress-fd", str(progress_w)],
                env=env,
                pass_fds=(progress_w,),
                stdin=subprocess.DEVNULL,
                stdout=output_w,
                stderr=output_w,
                process_group=0,
                preexec_fn=lambda: die_with_parent(parent),  # never outlives us
            )
        except BaseException:
            os.close(progress_r)
            os.close(output_r)
            raise
        finally:
            os.close(progress_w)
            os.close(output_w)
        return cls(process, progress_r, output_r)

    @property
    def pid(self) -> int:
        return self.process.pid

    def register(self, selector: selectors.BaseSelector) -> None:
        selector.register(self.progress_fd, selectors.EVENT_READ, "progress")
        selector.register(self.output_fd, selectors.EVENT_READ, "stderr")

    def read(self, fd: int) -> tuple[list[bytes], bool]:
        """Whole lines now readable on `fd`, and whether it reached end of file."""
        data = os.read(fd, 65536)
        buf = self._buffers.get(fd, b"") + data
        *lines, rest = buf.split(b"\n")
        self._buffers[fd] = rest
        if not data and rest:
            lines.append(rest)
        return lines, not data

    def events(self, lines: list[bytes]) -> Iterator[dict[str, Any]]:
        for line in lines:
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("worker %d wrote a garbled progress line: %r", self.pid, line[:200])

    def output(self, lines: list[bytes]) -> list[str]:
        """The worker's output lines as text, the last ones kept for error reports."""
        texts = [line.decode("utf-8", "replace") for line in lines]
        self.stderr_tail.extend(texts)
        return texts

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def pool(self) -> list[int]:
        """The pids of the worker's pool: its live child processes in its process group (the
        step processes it forked). Empty when it has none, or is gone."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        self._pool = {}
        for proc in children:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if proc.status() != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == self.pid:
                    self._pool[proc.pid] = proc
        return list(self._pool)

    def kill_one(self, pid: int) -> bool:
        """SIGKILL one process of the pool last listed by `pool()`, not the rest of the group.
        False if it is gone (psutil checks that the pid was not reused meanwhile)."""
        try:
            self._pool[pid].kill()
        except (KeyError, psutil.NoSuchProcess):
            return False
        return True

    def reap(self) -> ChildEnd:
        """Clear the worker's process group of anything left, then reap the worker.

        Called once its pipes are closed. Until it is reaped, the worker's pid (the group id)
        cannot be reused, so the group kill cannot hit a stranger.
        """
        self.signal_group(signal.SIGKILL)
        returncode = self.process.wait()
        _wait_for_group_to_die(self.pid)
        os.close(self.progress_fd)
        os.close(self.output_fd)
        return ChildEnd(self.pid, returncode)

    def last_error(self) -> str:
        errors = [line for line in self.stderr_tail if line.strip()]
        return errors[-1] if errors else ""
