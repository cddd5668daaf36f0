"""A pool of step processes under the driver: concurrent steps on every core of one machine.

Each step process is forked from the driver (it inherits the registered functions), dies with
it (PR_SET_PDEATHSIG; it is in the driver's process group too, so a supervisor's group kill takes
it as well), ignores SIGTERM/SIGINT (the driver decides when to stop: a step in flight finishes),
enters the run's setup hook for dependencies of its own (a database connection is never shared
across a fork), then runs one task at a time from a pipe and answers with its value or its
exception. It never touches the store: the driver records the attempt before sending the task,
and settles the promise from the answer.

A step process that dies mid-task (SIGKILL, a crash) costs that attempt only: the caller gets
StepProcessLost (retried like any failure) and the next task gets a newly forked process.

A step process that stops (SIGSTOP) or hangs in C code holding its GIL cannot answer, and the
driver cannot tell that from a long step; so each step process beats into a shared slot from a
thread of its own, and `stalled()` names those silent for too long: the driver then withholds
its own heartbeat, and its supervisor restarts the whole worker as it would a hung driver.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from multiprocessing.connection import Connection, Pipe
from multiprocessing.sharedctypes import RawArray
from typing import Any

from store import UnstorableValueError, storable

from .context import StepInfo
from .errors import EngineError, PermanentError
from .executor import StepExecutor, StepProcessLost, call_as_step
from .registry import registered

log = logging.getLogger("workflow.pool")

Setup = Callable[[], AbstractContextManager[Mapping[str, Any]]]

BEAT_S = 0.5  # how often a step process beats
_SETUP_KILLS = 5  # step processes SIGKILLed while setting up, in a row, before the run gives up
_PR_SET_PDEATHSIG = 1
# The driver's ends of all step processes' pipes, of every pool in this process: a forked step
# process closes them all (a pipe end held by another process would never report its close).
_driver_ends: set[Connection] = set()
_driver_ends_lock = threading.Lock()
_libc = ctypes.CDLL(None, use_errno=True)


class StepSetupError(EngineError):
    """A step process's setup hook failed: no step can run there, so the run stops (no step is
    retried or rejected for it)."""


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (and exit now if it has)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class ProcessPool(StepExecutor):
    """`size` step processes; a calling thread takes an idle one for the length of one call.

    `setup` gives each process its dependencies (entered once per process); without it a
    process uses the `dependencies` it inherited from the driver.
    """

    def __init__(
        self, size: int, *, setup: Setup | None = None, dependencies: Mapping[str, Any] | None = None
    ) -> None:
        if type(size) is not int or size < 1:
            raise ValueError(f"a pool has at least 1 process, not {size!r}")
        self.capacity = size
        self._setup = setup
        self._dependencies = dict(dependencies or {})
        self._idle: queue.SimpleQueue[_StepProcess | None] = queue.SimpleQueue()
        self._all: set[_StepProcess] = set()
        self._mutex = threading.Lock()
        self._closed = False
        self._beats = RawArray("d", size)  # per slot: time.monotonic() of its process's last beat
        forked = [self._fork(slot) for slot in range(size)]  # now: the driver has no threads yet
        try:
            for process in forked:
                process.wait_until_set_up()
        except BaseException:
            self.close()
            raise
        for process in forked:
            self._idle.put(process)

    def run(
        self,
        info: StepInfo,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        task = _task(info, fn, args, kwargs, timeout)
        process = self._idle.get()
        if process is None or self._closed:
            raise RuntimeError("the step process pool is closed")
        try:
            while not process.send(task):  # it died while idle: the task goes to its successor
                process = self._replace(process)
            return process.answer()
        except StepProcessLost:
            process = self._replace(process)
            raise
        finally:
            self._idle.put(process)

    def _replace(self, process: _StepProcess) -> _StepProcess:
        """A new step process in the place of one that died; another if that one is SIGKILLed
        while it sets up (a kill may take any step process at any time; a few in a row mean
        that setting up itself gets it killed, the memory it takes say)."""
        self._forget(process)
        for _ in range(_SETUP_KILLS):
            successor = self._fork(process.slot)
            try:
                successor.wait_until_set_up()
                return successor
            except BaseException:
                self._forget(successor)
                if successor.killed_by is not signal.SIGKILL:
                    raise
        raise StepSetupError(f"{_SETUP_KILLS} step processes in a row were SIGKILLed while setting up")

    def stalled(self, limit_s: float) -> list[int]:
        """The step processes that have not beaten for `limit_s` seconds (stopped, or stuck)."""
        now = time.monotonic()
        with self._mutex:
            return sorted(p.pid for p in self._all if now - self._beats[p.slot] > limit_s)

    @property
    def pids(self) -> list[int]:
        """The step processes' pids (a supervisor may kill one of them on purpose)."""
        with self._mutex:
            return sorted(p.pid for p in self._all)

    def close(self) -> None:
        """End every step process: its pipe closes, it exits after its task; then reap it."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            processes = list(self._all)
        for process in processes:
            process.reap()
        for _ in range(self.capacity):  # wake any thread still waiting for a process
            self._idle.put(None)

    def _fork(self, slot: int) -> _StepProcess:
        with self._mutex:
            self._beats[slot] = time.monotonic()  # a newborn has not stalled yet
            process = _StepProcess.fork(slot, self._beats, self._setup, self._dependencies)
            self._all.add(process)
        return process

    def _forget(self, process: _StepProcess) -> None:
        with self._mutex:
            self._all.discard(process)
        process.reap()


def _task(
    info: StepInfo, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
    timeout: float | None,
) -> tuple[Any, ...]:
    """What the pipe carries: the function by registered name (a forked process has the same
    registry), or pickled by reference when it is not registered under that name."""
    entry = registered(info.fn, info.version)
    if entry is not None and fn is entry.fn:
        target: Any = ("fn", info.fn, info.version)
    elif entry is not None and fn is entry.recover:
        target = ("recover", info.fn, info.version)
    else:
        target = ("pickled", fn)
    task = (target, info.promise_id, info.attempt, info.fn, info.version, args, kwargs, timeout)
    try:
        pickle.dumps(task)
    except Exception as exc:  # a closure or a lambda: no step process can be sent it
        raise _described_error(
            "StepNotSendable", f"step {info.fn} ({info.promise_id}) cannot be sent to a step "
            f"process ({exc}); define and register it at module level", True,
        ) from None
    return task


class _StepProcess:
    """One forked step process and the driver's end of its pipe."""

    def __init__(self, pid: int, slot: int, conn: Connection) -> None:
        self.pid = pid
        self.slot = slot
        self.conn = conn
        self.killed_by: signal.Signals | None = None  # once it is reaped, if a signal ended it
        self._reaped = False

    @classmethod
    def fork(
        cls, slot: int, beats: Any, setup: Setup | None, dependencies: Mapping[str, Any]
    ) -> _StepProcess:
        """A new step process; it closes the driver's ends of every other step process's pipe
        (of any pool in this process), or those would never see their pipe close."""
        ours, theirs = Pipe()
        parent = os.getpid()
        with _driver_ends_lock:
            others = list(_driver_ends)
            pid = os.fork()
            if pid != 0:
                _driver_ends.add(ours)
        if pid == 0:  # the step process: never returns into the driver's code
            code = 1
            try:
                for conn in [ours, *others]:
                    conn.close()
                _start_beating(beats, slot)
                _serve(theirs, parent, setup, dependencies)
                code = 0
            except BaseException:  # a forked child ends here, whatever happens
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        theirs.close()
        return cls(pid, slot, ours)

    def wait_until_set_up(self) -> None:
        """Its setup hook has run (or StepSetupError says why it failed)."""
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            raise StepSetupError(f"step process {self.pid} died while setting up "
                                 f"{self._how_it_ended()}") from None
        if kind != "ready":
            raise StepSetupError(f"the setup of step process {self.pid} failed: {payload}")

    def send(self, task: tuple[Any, ...]) -> bool:
        """Hand it a task; False if it is gone (it never got the task: nothing was run)."""
        try:
            self.conn.send(task)
        except OSError:
            return False
        return True

    def answer(self) -> Any:
        """The value of the task sent, or its exception; StepProcessLost if it died meanwhile."""
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            raise StepProcessLost(f"step process {self.pid} died {self._how_it_ended()}") from None
        if kind == "ok":
            return payload
        if kind == "raised":
            raise payload
        raise _described_error(*payload)

    def reap(self) -> None:
        """Close its pipe and wait for it to exit (it does once its pipe is closed, or it was
        killed); idempotent."""
        self._close_pipe()
        if self._reaped:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._reaped = True

    def _close_pipe(self) -> None:
        with _driver_ends_lock:
            _driver_ends.discard(self.conn)
        self.conn.close()

    def _how_it_ended(self) -> str:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "(already reaped)"
        self._reaped = True
        if os.WIFSIGNALED(status):
            self.killed_by = signal.Signals(os.WTERMSIG(status))
            return f"(killed by {self.killed_by.name})"
        return f"(exit status {os.waitstatus_to_exitcode(status)})"


def _start_beating(beats: Any, slot: int) -> None:
    def beat() -> None:
        while True:
            beats[slot] = time.monotonic()
            time.sleep(BEAT_S)

    threading.Thread(target=beat, name="beat", daemon=True).start()


def _serve(conn: Connection, parent: int, setup: Setup | None, dependencies: Mapping[str, Any]) -> None:
    """The step process's life: set up, then answer tasks until the driver closes the pipe."""
    die_with_parent(parent)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the driver stops the run; we finish our task
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        context = setup() if setup is not None else contextlib.nullcontext(dependencies)
        deps = context.__enter__()
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    try:
        conn.send(("ready", None))
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return
            answer = _answer(task, deps)
            try:
                conn.send(answer)
            except Exception as exc:  # a value or an exception pickle cannot carry
                why = f"the step's result cannot be sent to the driver: {type(exc).__name__}: {exc}"
                conn.send(("described", ("TypeError", why, True)))
    finally:
        context.__exit__(None, None, None)


def _answer(task: tuple[Any, ...], dependencies: Mapping[str, Any]) -> tuple[str, Any]:
    target, promise_id, attempt, name, version, args, kwargs, timeout = task
    if target[0] == "pickled":
        fn = target[1]
    else:
        entry = registered(target[1], target[2])
        fn = entry.fn if target[0] == "fn" else entry.recover
    info = StepInfo(promise_id, attempt, name, dependencies, version)
    try:
        value = call_as_step(info, fn, args, kwargs, timeout)
    except Exception as exc:  # the step's failure, handed to the driver to retry or settle
        return _portable(exc)
    try:  # as the store will keep it: a value JSON holds always crosses the pipe
        return "ok", storable(promise_id, "value", value)
    except UnstorableValueError as exc:  # rejected at once, as the driver would reject it
        return "described", ("UnstorableValueError", str(exc), True)


def _portable(exc: Exception) -> tuple[str, Any]:
    """The exception itself if it survives pickling; else its type name, message and whether
    it is permanent, for the driver to rebuild (a custom exception may not unpickle)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # any failure to round-trip: describe it instead
        return "described", (type(exc).__name__, str(exc), isinstance(exc, PermanentError))
    return "raised", exc


_described: dict[tuple[str, bool], type[Exception]] = {}


def _described_error(type_name: str, message: str, permanent: bool) -> Exception:
    """An exception named like the step's own, permanent if it was (its class did not pickle)."""
    cls = _described.get((type_name, permanent))
    if cls is None:
        base = PermanentError if permanent else Exception
        cls = _described[(type_name, permanent)] = type(type_name, (base,), {"__module__": __name__})
    return cls(message)
