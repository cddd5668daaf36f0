"""The child on PostgreSQL: executors for the fleet, and a driver standing by for the lease.

Every participant of a workflow kept in PostgreSQL (the one that started it, and each that
joined) runs the same way: it starts `--workers` executor processes (`python -m workflow
execute`), which claim the workflow's steps from the database, and tries to take the
workflow's lease. Whoever holds
the lease drives (replays the workflow and enqueues its steps); the others stand by, their
executors working, and take over within a lease period if the driver's machine dies. Every
participant returns the workflow's result once it is settled, whoever settled it.

What a participant needs to join (the application, its setup hook and arguments) is recorded
in the database by the first one (`describe_workflow`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psutil

from store import Promise, State, WorkflowBusyError, open_store
from store.pg import FencedError, PgStore
from store.pg_tasks import Claim

from . import exitcodes
from .errors import PermanentError, StepError, WorkflowCancelled, WorkflowInterrupted, is_cancellation
from .fleet import Executor, Fleet
from .progress import Progress
from .retry import RetryPolicy
from .runner import Runner, StepEvent

log = logging.getLogger("workflow.fleet_child")

STANDBY_POLL_S = 0.25  # how often a standing-by participant asks for the lease
EXECUTOR_CHECK_S = 0.5  # how often a participant looks for executors that died
WINDOW_PER_EXECUTOR = 2  # steps in flight per executor of this participant: one runs, one waits
MIN_WINDOW = 8  # other machines' executors claim from the same window
CONNECTIONS_PER_EXECUTOR = 4  # its store's two pools, its sink, its step transaction


class JoinError(PermanentError):
    """There is nothing to join, or this participant cannot take part (another application)."""


def describe(target: str, setup: str | None, args: list[Any]) -> dict[str, Any]:
    """What a joining participant needs to run the workflow."""
    return {"target": target, "setup": setup, "args": args}


def record(store: PgStore, root_id: str, description: dict[str, Any]) -> None:
    """Record how to run `root_id`; refuse a second start of it with another application."""
    recorded = store.describe_workflow(root_id, description)
    if recorded != description:
        raise JoinError(
            f"workflow {root_id} was started with {recorded['target']} and arguments "
            f"{recorded['args']}, not {description['target']} with {description['args']}; "
            "give another --id, or join it as it is"
        )


def recorded(store: PgStore, root_id: str) -> dict[str, Any]:
    """How `root_id` is run, as its first participant recorded it; JoinError if never started."""
    description = store.workflow(root_id)
    if description is None:
        raise JoinError(f"{store.where}: no workflow {root_id} was started there; start it with run")
    return description


@contextlib.contextmanager
def taking_part(root_id: str) -> Iterator[None]:
    """A setup hook's refusal (an input this machine cannot read), said as what it means here."""
    try:
        yield
    except JoinError:
        raise
    except PermanentError as exc:
        raise JoinError(f"this machine cannot take part in workflow {root_id}: {exc} (every "
                        "participant needs the same code, and the input at the same path)") from exc


class Participant:
    """One machine's part in a workflow on PostgreSQL (see the module's doc)."""

    def __init__(
        self,
        url: str,
        root_id: str,
        *,
        workers: int,
        executor_command: list[str],
        progress: Progress,
        retry: RetryPolicy,
        should_stop: Callable[[], bool],
        lease_s: float,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.url = url
        self.root_id = root_id
        self._progress = progress
        self._retry = retry
        self._should_stop = should_stop
        self._lease_s = lease_s
        self._executors = _Executors(workers, executor_command, pass_fds, lease_s)

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Start the executors, then drive or stand by until the workflow is settled."""
        standby = open_store(self.url, lock_timeout=STANDBY_POLL_S, lease_s=self._lease_s)
        self._warn_if_too_few_connections(standby)
        with self._executors, standby as store:
            settled = self._drive_or_stand_by(store, fn, args)
        if settled.state is State.REJECTED and is_cancellation(settled.error):
            raise WorkflowCancelled(self.root_id)
        if settled.state is State.REJECTED:
            raise StepError(self.root_id, settled.param["fn"], settled.error)
        return settled.value

    def _warn_if_too_few_connections(self, store: PgStore) -> None:
        needed = CONNECTIONS_PER_EXECUTOR * self._executors.size
        left = store.connections_left()
        if needed > left:
            log.warning("--workers %d needs about %d connections, and the server takes %d more now: "
                        "lower --workers (on every machine) or raise the server's max_connections",
                        self._executors.size, needed, left)

    def _should_stop_or_fail(self) -> bool:
        return self._should_stop() or self._executors.fatal is not None

    def _drive_or_stand_by(self, store: PgStore, fn: Callable[..., Any], args: tuple[Any, ...]) -> Promise:
        window = max(MIN_WINDOW, WINDOW_PER_EXECUTOR * self._executors.size)
        while True:
            root = store.get(self.root_id)
            if root is not None and root.settled:
                return root
            stop = self._should_stop_or_fail
            runner = Runner(store, retry=self._retry, on_event=self._progress.step, should_stop=stop,
                            fleet=Fleet(store, window, should_stop=stop))
            try:
                runner.run(self.root_id, fn, *args)
            except WorkflowBusyError:  # another participant drives: its steps run here too
                self._executors.raise_if_failed()
                if stop():
                    raise WorkflowInterrupted("stopped while standing by; run again to rejoin") from None
                continue  # (taking the lease waited STANDBY_POLL_S)
            except WorkflowInterrupted:
                self._executors.raise_if_failed()
                raise
            except FencedError as exc:  # paused past its lease: another drives now; stand by
                log.warning("%s; standing by", exc)
                continue
            except StepError:
                pass  # settled as rejected: read back below like any outcome
            return store.get(self.root_id)


class _Executors:
    """This participant's executor processes, kept at `size`: one that dies is replaced."""

    def __init__(self, size: int, command: list[str], pass_fds: tuple[int, ...], lease_s: float) -> None:
        self.size = size
        self._lease_s = lease_s
        self._command = command
        self._pass_fds = pass_fds
        self._running: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._keep_up, name="executors", daemon=True)
        self.fatal: str | None = None  # why an executor ended for good (its error is on stderr)

    def __enter__(self) -> _Executors:
        self._running = [self._start() for _ in range(self.size)]
        self._watch.start()
        return self

    def __exit__(self, *_: object) -> None:
        """Executors end by themselves once the workflow is settled; on any other end of the
        participant they are asked to stop after the step they run."""
        self._stop.set()
        self._watch.join()
        for proc in self._running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._running:
            proc.wait()

    def _start(self) -> subprocess.Popen[bytes]:
        """An executor that dies with this process (it asks the kernel itself, first thing:
        a preexec_fn is not safe in a process with threads)."""
        return subprocess.Popen([*self._command, "--parent", str(os.getpid())], pass_fds=self._pass_fds)

    def _keep_up(self) -> None:
        """Replace an executor that died; SIGKILL one stopped (SIGSTOP) for a claim period,
        whose step another executor has claimed again by then, so that it is replaced too."""
        stopped_since: dict[int, float] = {}
        while not self._stop.wait(EXECUTOR_CHECK_S):
            for i, proc in enumerate(self._running):
                if proc.poll() == exitcodes.FATAL:  # no restart can help: this participant ends
                    self.fatal = f"executor {proc.pid} ended with an error no restart can help (above)"
                    return
                if proc.poll() not in (None, 0):
                    log.warning("executor %d ended (status %d); starting another", proc.pid, proc.returncode)
                    self._running[i] = self._start()
                elif _is_stopped(proc.pid):
                    since = stopped_since.setdefault(proc.pid, time.monotonic())
                    if time.monotonic() - since > self._lease_s:
                        log.warning("executor %d stopped for %g s: SIGKILL", proc.pid, self._lease_s)
                        proc.kill()
                else:
                    stopped_since.pop(proc.pid, None)


    def raise_if_failed(self) -> None:
        if self.fatal is not None:
            raise ExecutorError(self.fatal)


class ExecutorError(PermanentError):
    """An executor of this participant ended with an error that no restart can help."""


def _is_stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def serve(url: str, root_id: str, dependencies: Mapping[str, Any], progress: Progress,
          should_stop: Callable[[], bool], lease_s: float) -> int:
    """An executor process's life: claim the workflow's steps (each for `lease_s`) until it is
    settled (or a stop is asked for); the number of steps run."""
    with open_store(url, lease_s=lease_s) as store:
        def done() -> bool:
            root = store.get(root_id)
            return should_stop() or (root is not None and root.settled)

        def report(kind: str, claim: Claim) -> None:
            progress.step(StepEvent(kind, claim.promise_id, claim.param["fn"], attempt=claim.attempt))

        return Executor(store, [root_id], dependencies, on_step=report).run_until(done)
