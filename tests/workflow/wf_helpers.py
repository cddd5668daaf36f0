"""Helpers of the workflow tests: raw looks at a store file, and child processes to SIGKILL.

The child processes announce where they stand as JSON lines on a pipe; the tests wait for an
announcement, then SIGKILL. Waiting is bounded by SAFETY_TIMEOUT_S only so that a broken child
fails the test instead of hanging it: no test asserts anything about time.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store import Durability, JsonlStore
from workflow.importer.sources import SEGMENT_BATCHES

HERE = Path(__file__).resolve().parent
FLAKY_CHILD = HERE / "flaky_child.py"
SAFETY_TIMEOUT_S = 60.0
STORE_FILE = "store.jsonl"
SINK_FILE = "import.db"

Event = dict[str, Any]


# -- the store file ---------------------------------------------------------------------------


def open_store(path: Path) -> JsonlStore:
    return JsonlStore(path, exclusive=True, durability=Durability.NONE)


def read_store(path: Path) -> JsonlStore:
    """A read-only view of a store another process may have written (or died writing)."""
    return JsonlStore(path, readonly=True)


def drop_store_records(path: Path, op: str, promise_id: str) -> int:
    """Delete the `op` records of `promise_id` from a store file; return how many went."""
    kept, dropped = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        record = json.loads(line)
        if record["op"] == op and record["id"] == promise_id:
            dropped += 1
        else:
            kept.append(line)
    path.write_bytes(b"".join(kept))
    return dropped


# -- reading announcements from a child -------------------------------------------------------


class JsonLines:
    """The JSON lines a child writes on a pipe, one at a time, as they come."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = b""
        self._ready: deque[Event] = deque()

    def next(self) -> Event | None:
        """The next line, or None once the writer is gone."""
        deadline = time.monotonic() + SAFETY_TIMEOUT_S
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("child neither wrote a line nor exited")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                return None
            *lines, self._pending = (self._pending + chunk).split(b"\n")
            self._ready.extend(json.loads(line) for line in lines if line.strip())
        return self._ready.popleft()

    def until(self, wanted: Callable[[Event], bool], seen: list[Event]) -> Event | None:
        """Read into `seen` up to the first line that is `wanted` (returned), or to the end."""
        while (event := self.next()) is not None:
            seen.append(event)
            if wanted(event):
                return event
        return None


def _reap(proc: subprocess.Popen[bytes], kill: bool) -> int:
    if kill:
        os.kill(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(timeout=SAFETY_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the import worker ------------------------------------------------------------------------


@dataclass
class WorkerRun:
    """How one worker process ended, what it reported, and the failpoint the kill answered."""

    returncode: int
    events: list[Event] = field(default_factory=list)
    killed_at: Event | None = None

    def batches(self, kind: str) -> list[int]:
        """The batches of the step events of `kind` (started, resolved, replayed, retrying...).

        A batch's number is its rank among the batch steps the worker reported, which it meets
        in order (replayed first); plan segments are steps too, but not batches.
        """
        number: dict[str, int] = {}
        batch_events = [e for e in self.events if e["event"] == "step" and e["fn"] == "process_batch"]
        for e in batch_events:
            number.setdefault(e["id"], len(number))
        return [number[e["id"]] for e in batch_events if e["kind"] == kind]


def batch_id(root_id: str, batch: int) -> str:
    """The promise id of batch `batch` of an import planned in full segments (a synthetic source,
    or a small file): a plan segment comes before every SEGMENT_BATCHES batches."""
    return f"{root_id}.{batch + batch // SEGMENT_BATCHES + 1}"


IMPORT_TARGET = "workflow.importer.app:import_records"


def worker_argv(
    state_dir: Path, root_id: str, source: dict[str, Any], batch_size: int, *extra: str,
    target: str = IMPORT_TARGET,
) -> list[str]:
    """The import's worker: the runtime's child running the import workflow with its setup hook."""
    return [
        sys.executable, "-m", "workflow", "run", target, "--id", root_id,
        "--arg", json.dumps(source), "--arg", str(batch_size), "--setup", "workflow.importer.app:setup",
        "--state-dir", str(state_dir), "--durability", "none", *extra,
    ]


def worker_env(failpoints: list[dict[str, Any]] | None = None, fd: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    if failpoints:
        env["DURABLE_FAILPOINTS"] = json.dumps(failpoints)
    if fd is not None:
        env["DURABLE_FAILPOINT_FD"] = str(fd)
    return env


def pause_at(batch: int) -> dict[str, Any]:
    """The failpoint halfway through batch `batch`'s rows, before its transaction commits."""
    return {"name": "batch.mid", "key": str(batch), "action": "pause"}


def _spawn_worker(
    state_dir: Path,
    root_id: str,
    source: dict[str, Any],
    batch_size: int,
    extra: tuple[str, ...],
    failpoints: list[dict[str, Any]],
    target: str = IMPORT_TARGET,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a worker whose progress (and failpoint announcements) come on the returned fd."""
    read_fd, write_fd = os.pipe()
    try:
        argv = worker_argv(state_dir, root_id, source, batch_size, "--progress-fd", str(write_fd),
                           *extra, target=target)
        with open(state_dir / "worker.log", "ab") as log:
            proc = subprocess.Popen(argv, pass_fds=(write_fd,), env=worker_env(failpoints, write_fd),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    cwd=state_dir)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return proc, read_fd


def run_worker(
    state_dir: Path,
    root_id: str,
    source: dict[str, Any],
    batch_size: int,
    *extra: str,
    kill_at_batch: int | None = None,
    failpoints: list[dict[str, Any]] | None = None,
    term_when: Callable[[Event], bool] | None = None,
    target: str = IMPORT_TARGET,
) -> WorkerRun:
    """Run the import's worker (`python -m workflow run`) to its end, or SIGKILL it mid-batch.

    With `kill_at_batch`, the batch.mid failpoint of that batch is armed; the worker announces
    it on the progress pipe and waits there, and this SIGKILLs it. A worker that never reaches
    it (the batch was done before) just runs to its end. `term_when` picks a progress event
    after which the worker gets a SIGTERM. `target` is the workflow the worker runs.
    """
    points = list(failpoints or [])
    if kill_at_batch is not None:
        points.append(pause_at(kill_at_batch))
    proc, read_fd = _spawn_worker(state_dir, root_id, source, batch_size, extra, points, target)
    try:
        try:
            events, announcement = _watch(JsonLines(read_fd), proc, term_when)
        except BaseException:
            _reap(proc, kill=True)
            raise
        returncode = _reap(proc, kill=announcement is not None)
    finally:
        os.close(read_fd)
    return WorkerRun(returncode, events, announcement)


@contextmanager
def worker_paused_at(
    state_dir: Path, root_id: str, source: dict[str, Any], batch_size: int, batch: int,
    events: list[Event] | None = None,
) -> Iterator[Event]:
    """A worker paused halfway through batch `batch` (its announcement), SIGKILLed on exit;
    `events` receives the events it sent before."""
    proc, read_fd = _spawn_worker(state_dir, root_id, source, batch_size, (), [pause_at(batch)])
    events = [] if events is None else events
    try:
        announcement = JsonLines(read_fd).until(lambda e: e["event"] == "failpoint", events)
        assert announcement is not None, f"the worker ended without pausing: {events}"
        yield announcement
    finally:
        _reap(proc, kill=proc.poll() is None)
        os.close(read_fd)


def _watch(
    lines: JsonLines, proc: subprocess.Popen[bytes], term_when: Callable[[Event], bool] | None
) -> tuple[list[Event], Event | None]:
    """Read a worker's events to its end or to a failpoint announcement (returned); send it a
    SIGTERM after the first event `term_when` picks."""
    events: list[Event] = []
    termed = term_when is None

    def wanted(event: Event) -> bool:
        return event["event"] == "failpoint" or (not termed and term_when(event))

    while (event := lines.until(wanted, events)) is not None and event["event"] != "failpoint":
        os.kill(proc.pid, signal.SIGTERM)
        termed = True
    return events, event


def run_worker_plain(
    state_dir: Path,
    root_id: str,
    source: dict[str, Any],
    batch_size: int,
    *extra: str,
    file_size_limit: int | None = None,
    timeout: float = SAFETY_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run the worker to its end without a progress pipe; capture its output.

    `file_size_limit` is a full disk: the worker runs under that RLIMIT_FSIZE (bytes per file).
    """
    return subprocess.run(
        worker_argv(state_dir, root_id, source, batch_size, *extra), env=worker_env(),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=state_dir,
        timeout=timeout, check=False,
        preexec_fn=None if file_size_limit is None else _limit_file_size(file_size_limit),
    )


def _limit_file_size(limit: int) -> Callable[[], None]:
    """preexec_fn: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def supervisor_retry(state_dir: Path, root_id: str) -> subprocess.CompletedProcess[str]:
    """`python -m supervisor retry`: reopen a rejected import so the next run resumes it."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "retry", "--state-dir", str(state_dir), "--id", root_id],
        env=worker_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        cwd=state_dir, timeout=SAFETY_TIMEOUT_S, check=False,
    )


# -- the flaky-step child ---------------------------------------------------------------------


@dataclass
class ChildRun:
    returncode: int
    output: Event | None  # the child's last stdout line, when it ran to its end


def run_flaky_child(store_path: Path, log_path: Path, *flags: str) -> ChildRun:
    """Run flaky_child.py; SIGKILL it if it announces that it blocks (see its docstring)."""
    argv = [sys.executable, str(FLAKY_CHILD), "--store", str(store_path), "--log", str(log_path),
            *flags]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            cwd=store_path.parent, env=worker_env())
    assert proc.stdout is not None
    events: list[Event] = []
    try:
        blocked = JsonLines(proc.stdout.fileno()).until(lambda e: e["event"] == "blocked", events)
    except BaseException:
        _reap(proc, kill=True)
        raise
    finally:
        proc.stdout.close()
    returncode = _reap(proc, kill=blocked is not None)
    return ChildRun(returncode, None if blocked is not None or not events else events[-1])


def attempts_logged(log_path: Path) -> list[int]:
    """The attempt numbers flaky_child.py's step saw through current_step(), in order."""
    if not log_path.exists():
        return []
    return [json.loads(line)["attempt"] for line in log_path.read_text().splitlines()]


# -- the runtime's child: `python -m workflow run` ---------------------------------------------


@dataclass
class ChildEnded:
    """How a `python -m workflow run` process ended, its progress events and its output."""

    returncode: int
    events: list[Event]
    stdout: str
    stderr: str

    def steps(self, kind: str) -> list[int]:
        """The direct steps of the step events of `kind` (started, resolved, replayed...)."""
        return [e["step"] for e in self.events
                if e["event"] == "step" and e["kind"] == kind and e["step"] is not None]

    @property
    def error_line(self) -> str:
        """Why the child ended, as its `ended` event says (and a supervisor prints it): with a
        progress pipe, a child does not print its `error:` line on stderr too."""
        ended = [e for e in self.events if e["event"] == "ended"]
        assert len(ended) == 1, self.events
        assert "error: " not in self.stderr, self.stderr  # said once: to the pipe only
        return f"error: {ended[0]['error']}"


def run_workflow_child(
    cwd: Path,
    *args: str,
    failpoints: list[dict[str, Any]] | None = None,
    act: Callable[[subprocess.Popen[bytes], Event], None] | None = None,
) -> ChildEnded:
    """Run `python -m workflow run ARGS` in `cwd` with a progress pipe (failpoint announcements
    come on it too); `act(process, event)` sees every event as it comes, to signal the child."""
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workflow", "run", *args, "--progress-fd", str(write_fd)],
                pass_fds=(write_fd,), env=worker_env(failpoints, write_fd), stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, cwd=cwd,
            )
        finally:
            os.close(write_fd)
        try:
            events = _follow(JsonLines(read_fd), proc, act)
        except BaseException:
            _reap(proc, kill=True)
            raise
        finally:
            os.close(read_fd)
        returncode = _reap(proc, kill=False)
        out.seek(0)
        err.seek(0)
        return ChildEnded(returncode, events, out.read().decode(), err.read().decode())


def _follow(
    lines: JsonLines,
    proc: subprocess.Popen[bytes],
    act: Callable[[subprocess.Popen[bytes], Event], None] | None,
) -> list[Event]:
    events: list[Event] = []
    while (event := lines.next()) is not None:
        events.append(event)
        if act is not None:
            act(proc, event)
    return events


APPS = HERE.parent / "apps"


def install_app(directory: Path, name: str = "squares") -> Path:
    """Copy the test application tests/apps/NAME.py into `directory`, as a user's own module."""
    target = directory / f"{name}.py"
    target.write_text((APPS / f"{name}.py").read_text())
    return target


def steps_logged(directory: Path) -> list[tuple[str, int]]:
    """(id, attempt) of every step attempt the squares app logged in `directory`, in order."""
    log = directory / "steps.log"
    if not log.exists():
        return []
    return [(e["id"], e["attempt"]) for e in map(json.loads, log.read_text().splitlines())]


# -- processes started together -----------------------------------------------------------------

SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited from pytest


def run_together(
    target: Callable[..., None], place: Any, count: int
) -> tuple[dict[int, Any], list[int | None]]:
    """`count` spawned processes of `target(place, number, start, results)`, let go at once (a
    barrier): {number: what each put on `results`}, and their exit codes. Every process is
    reaped, or killed."""
    start, results = SPAWN.Barrier(count), SPAWN.Queue()
    procs = [SPAWN.Process(target=target, args=(place, n, start, results)) for n in range(count)]
    for p in procs:
        p.start()
    try:
        reported = dict(results.get(timeout=SAFETY_TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(SAFETY_TIMEOUT_S)
            p.kill()
    return reported, [p.exitcode for p in procs]
