"""The runtime's own entry point: `python -m workflow run MODULE:FUNCTION --id ID [--arg JSON]...`.

It runs, resumes, or returns the stored result of one workflow: MODULE is imported with the
current directory first on sys.path, FUNCTION (a generator workflow, or a plain function run as
one step) is run by a Runner over a JSON-lines store opened exclusively (one driver per store),
and the result is printed as JSON on stdout. It knows nothing of kills. For a supervisor it writes
step events on `--progress-fd` (workflow/progress.py), stops between steps on SIGTERM/SIGINT, and
ends with an exit status from workflow/exitcodes.py and, for every end a restart cannot change,
a one-line reason and no traceback: on the progress pipe (the `ended` event: the supervisor
prints it), or, run alone, as an `error:` line on stderr.

`--setup MODULE:FUNCTION` names the application's hook `setup(run: RunInfo)`, a context manager
giving the Runner's dependencies (entered again in each step process of a `--workers` pool, so
that a database connection is never shared across a fork). It runs before the store is opened,
so it can refuse a run (with a PermanentError) before anything is written.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from store import (
    Durability,
    StoreError,
    StoreLockedError,
    StoreUnavailableError,
    WorkflowBusyError,
    open_store,
    parse_store_url,
)
from store.fsutil import make_dirs
from store.owners import DEFAULT_LEASE_S

from . import exitcodes
from .errors import EngineError, PermanentError, StepError, WorkflowCancelled, WorkflowInterrupted
from .ids import check_root_id
from .pool import die_with_parent
from .progress import ENDED, FINISHED, STARTED, Progress
from .retry import RetryPolicy
from .runner import Runner

log = logging.getLogger("workflow.child")

DEFAULT_STATE_DIR = Path(".durable")
STORE_FILE = "store.jsonl"  # the promise store's file in a state dir
HEARTBEAT_S = 1.0
STEP_TIMEOUT_S = 600.0  # steps take milliseconds to seconds; ten minutes means one hangs
LOCK_TIMEOUT_S = 10.0
MAX_WORKERS = 64  # step processes at once; more than any one machine here has cores for


@dataclass(frozen=True)
class RunInfo:
    """What a setup hook learns about the run it prepares."""

    root_id: str
    args: tuple[Any, ...]  # the workflow's arguments, decoded from --arg
    state_dir: Path
    durability: Durability
    store_url: str | None = None  # a PostgreSQL store's URL (its database may hold the sink too)
    joining: bool = False  # another process started it (join, or an executor): check all it needs


Setup = Callable[[RunInfo], AbstractContextManager[Mapping[str, Any]]]


class TargetError(Exception):
    """A MODULE:FUNCTION that cannot be imported or is not a function; names which and why."""


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflow", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run or resume a workflow; print its result as JSON")
    run.add_argument("target", type=target, metavar="MODULE:FUNCTION", help="the workflow function")
    run.add_argument("--id", type=root_id, required=True, help="the workflow's id (no '.')")
    run.add_argument("--arg", type=json_value, action="append", default=[], metavar="JSON",
                     help="the workflow's next positional argument, as JSON (repeatable)")
    run.add_argument("--state-dir", type=Path, default=None,
                     help=f"holds {STORE_FILE} unless --store is given (default {DEFAULT_STATE_DIR})")
    run.add_argument("--store", type=durable_store_url, default=None, metavar="URL",
                     help="the promise store: a path or jsonl:PATH")
    run.add_argument("--setup", type=target, default=None, metavar="MODULE:FUNCTION",
                     help="the application's setup hook, giving the steps' dependencies")
    run.add_argument("--progress-fd", type=int, default=None, help="write step events on this fd")
    run.add_argument("--heartbeat", type=positive_float, default=HEARTBEAT_S, metavar="S",
                     help="seconds between heartbeat lines on the progress fd")
    run.add_argument("--max-attempts", type=positive_int, default=RetryPolicy.max_attempts,
                     help="attempts of a step before it fails for good")
    run.add_argument("--retry-initial", type=non_negative_float, default=RetryPolicy.initial,
                     metavar="S", help="first retry delay of a failing step")
    run.add_argument("--step-timeout", type=positive_float, default=STEP_TIMEOUT_S, metavar="S",
                     help="fail (and retry) a step attempt that has not returned after S seconds")
    run.add_argument("--lock-timeout", type=non_negative_float, default=LOCK_TIMEOUT_S, metavar="S",
                     help="how long to wait for another process's hold on the store")
    run.add_argument("--durability", choices=[d.value for d in Durability], default="full")
    run.add_argument("--workers", type=worker_count, default=1, metavar="N",
                     help="run up to N steps at once, each in a process of the worker's pool")
    run.add_argument("--quiet", action="store_true", help="do not print the result")
    join = commands.add_parser("join", help="take part in a workflow another machine started in "
                               "PostgreSQL: run its steps, and drive it if its driver dies")
    join.add_argument("--store", type=pg_store_url, required=True, metavar="URL",
                      help="the PostgreSQL store the workflow was started in")
    join.add_argument("--id", type=root_id, required=True, help="the workflow's id")
    execute = commands.add_parser("execute", help="(a participant's executor process) claim and "
                                  "run the workflow's steps until it is settled")
    execute.add_argument("--store", type=pg_store_url, required=True, metavar="URL")
    execute.add_argument("--id", type=root_id, required=True)
    execute.add_argument("--parent", type=int, default=None, help="die with this process (its participant)")
    for p in (run, join, execute):
        p.add_argument("--lease", type=positive_float, default=DEFAULT_LEASE_S, metavar="S",
                       help="on PostgreSQL: the driver's lease and each executor's claim, in seconds "
                       "(renewed 3 times per period; a dead machine's work is taken over after it)")
    for p in (join, execute):
        p.add_argument("--state-dir", type=Path, default=None,
                       help=f"for the application's local files (default {DEFAULT_STATE_DIR})")
        p.add_argument("--progress-fd", type=int, default=None, help="write step events on this fd")
        p.add_argument("--durability", choices=[d.value for d in Durability], default="full")
    join.add_argument("--heartbeat", type=positive_float, default=HEARTBEAT_S, metavar="S",
                      help="seconds between heartbeat lines on the progress fd")
    join.add_argument("--max-attempts", type=positive_int, default=RetryPolicy.max_attempts,
                      help="attempts of a step before it fails for good (for the steps it drives)")
    join.add_argument("--retry-initial", type=non_negative_float, default=RetryPolicy.initial, metavar="S")
    join.add_argument("--step-timeout", type=positive_float, default=STEP_TIMEOUT_S, metavar="S")
    join.add_argument("--workers", type=worker_count, default=1, metavar="N",
                      help="executor processes this machine adds")
    join.add_argument("--quiet", action="store_true", help="do not print the result")
    return parser.parse_args(argv)


def target(text: str) -> str:
    """An argparse type: MODULE:FUNCTION, checked for its form only (nothing is imported)."""
    module, colon, name = text.partition(":")
    if not colon or not _dotted_name(module) or not _dotted_name(name):
        raise argparse.ArgumentTypeError(f"expected MODULE:FUNCTION (like hello:hello_all), not {text!r}")
    return text


def _dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def root_id(text: str) -> str:
    """An argparse type: an id a root workflow can have."""
    try:
        return check_root_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def json_value(text: str) -> Any:
    """An argparse type: one JSON value."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None


def durable_store_url(text: str) -> str:
    """An argparse type: a store that outlives the process (a path or jsonl:PATH)."""
    try:
        backend, _ = parse_store_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if backend == "memory":
        raise argparse.ArgumentTypeError(
            "memory: dies with the process that holds it; give a path or jsonl:PATH"
        )
    return text


def pg_store_url(text: str) -> str:
    """An argparse type: a PostgreSQL store's URL (only there can machines share a workflow)."""
    if durable_store_url(text) and parse_store_url(text)[0] != "postgresql":
        raise argparse.ArgumentTypeError(f"{text}: machines share a workflow only in PostgreSQL; "
                                         "give a postgresql://... URL")
    return text


def whole_number(text: str) -> int:
    """An argparse type: any whole number, with a message a person understands when it is not."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def worker_count(text: str) -> int:
    """An argparse type: how many step processes run at once, 1 to MAX_WORKERS."""
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"at most {MAX_WORKERS}, not {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def positive_float(text: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    value = _number(text)
    if not 0 < value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, not {text}")
    return value


# -- the run ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    who = "executor" if args.command == "execute" else "worker"
    logging.basicConfig(level=logging.INFO, format=f"{who} %(process)d: %(message)s")
    stop = _stop_on_signals()
    progress = Progress(args.progress_fd, args.id)
    if args.command == "execute":
        if args.parent is not None:
            die_with_parent(args.parent)
        return _execute(args, progress, stop)
    progress.send(STARTED, pid=os.getpid())
    progress.start_heartbeat(args.heartbeat)
    try:
        result = run(args, progress, stop)
    except WorkflowInterrupted as exc:
        return _end(progress, exitcodes.INTERRUPTED, str(exc))
    except WorkflowCancelled as exc:  # an outcome asked for, not an error
        return _end(progress, exitcodes.CANCELLED, str(exc), said="cancelled")
    except StepError as exc:
        return _end(progress, exitcodes.FAILED, str(exc))
    except (StoreLockedError, WorkflowBusyError) as exc:
        return _end(progress, exitcodes.BUSY, str(exc))
    except StoreUnavailableError as exc:  # a database away, a lease lost: a restart may go on
        return _end(progress, exitcodes.CRASHED, str(exc))
    except (TargetError, PermanentError, EngineError, StoreError) as exc:
        return _end(progress, exitcodes.FATAL, str(exc))
    if not args.quiet:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    progress.send(FINISHED, pid=os.getpid())
    return exitcodes.OK


def _execute(args: argparse.Namespace, progress: Progress, should_stop: Callable[[], bool]) -> int:
    """An executor process: only its steps' events on the progress fd (the participant that
    started it speaks for the machine), and an error line if it cannot go on."""
    try:
        run(args, progress, should_stop)
    except (TargetError, PermanentError, EngineError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.CRASHED if isinstance(exc, StoreUnavailableError) else exitcodes.FATAL
    return exitcodes.OK


def run(args: argparse.Namespace, progress: Progress, should_stop: Callable[[], bool]) -> Any:
    """Import the target, enter the setup hook, open the store and run the workflow to its end
    (step events on `progress`, whose heartbeat stops while a step process is silent). On
    PostgreSQL, the run is this machine's part in it (fleet_child.py)."""
    _import_from_current_directory()
    if args.command != "run":
        return _take_part(args, progress, should_stop)
    fn = load(args.target)
    setup = load(args.setup) if args.setup else None
    state_dir = args.state_dir or DEFAULT_STATE_DIR
    if args.store is None or args.state_dir is not None:  # the state dir holds what it was given for
        _make_state_dir(state_dir)
    info = RunInfo(args.id, tuple(args.arg), state_dir, Durability(args.durability), args.store)
    if args.store is not None and parse_store_url(args.store)[0] == "postgresql":
        with _dependencies(setup, info):  # checks the arguments and the input before anything is written
            pass
        from . import fleet_child  # psycopg is loaded only on PostgreSQL

        with _open_store(args, state_dir) as store:
            fleet_child.record(store, args.id, fleet_child.describe(args.target, args.setup, args.arg))
        return _participant(args, progress, should_stop).run(fn, info.args)
    with _dependencies(setup, info) as dependencies, _open_store(args, state_dir) as store:
        runner = Runner(
            store,
            retry=RetryPolicy(max_attempts=args.max_attempts, initial=args.retry_initial,
                              timeout=args.step_timeout),
            dependencies=dependencies,
            on_event=progress.step,
            should_stop=should_stop,
            workers=args.workers,
            setup=None if setup is None else functools.partial(setup, info),  # each step process's own
        )
        progress.stalled = runner.stalled_step_processes
        return runner.run(args.id, fn, *info.args)


def _take_part(args: argparse.Namespace, progress: Progress, should_stop: Callable[[], bool]) -> Any:
    """`join` (this machine's part in a workflow another started) or `execute` (one executor
    process of a participant): both run the workflow as its first participant recorded it."""
    from . import fleet_child  # psycopg is loaded only on PostgreSQL

    with open_store(args.store, lease_s=args.lease) as store:
        description = fleet_child.recorded(store, args.id)
    fn = load(description["target"])
    state_dir = args.state_dir or DEFAULT_STATE_DIR
    if args.state_dir is not None:
        _make_state_dir(state_dir)
    info = RunInfo(args.id, tuple(description["args"]), state_dir, Durability(args.durability), args.store,
                   joining=True)
    setup = load(description["setup"]) if description["setup"] else None
    with fleet_child.taking_part(args.id), _dependencies(setup, info) as dependencies:
        if args.command == "execute":
            return fleet_child.serve(args.store, args.id, dependencies, progress, should_stop, args.lease)
    return _participant(args, progress, should_stop).run(fn, info.args)


def _participant(args: argparse.Namespace, progress: Progress, should_stop: Callable[[], bool]) -> Any:
    """This machine's part in a workflow on PostgreSQL: `--workers` executor processes (each
    `python -m workflow execute`), and a driver standing by for the lease."""
    command = [sys.executable, "-m", "workflow", "execute", "--store", args.store, "--id", args.id,
               "--durability", args.durability, "--lease", str(args.lease)]
    if args.state_dir is not None:
        command += ["--state-dir", str(args.state_dir)]
    fds: tuple[int, ...] = ()
    if args.progress_fd is not None:
        command += ["--progress-fd", str(args.progress_fd)]
        fds = (args.progress_fd,)
    retry = RetryPolicy(max_attempts=args.max_attempts, initial=args.retry_initial, timeout=args.step_timeout)
    from . import fleet_child

    return fleet_child.Participant(args.store, args.id, workers=args.workers, executor_command=command,
                                   progress=progress, retry=retry, should_stop=should_stop,
                                   lease_s=args.lease, pass_fds=fds)


def load(name: str) -> Callable[..., Any]:
    """The function MODULE:FUNCTION names (FUNCTION may be dotted: Class.method)."""
    module_name, _, qualname = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the application's own module is broken: say where, once
        raise TargetError(f"cannot import {module_name}{_where(exc)}: {type(exc).__name__}: {exc}") from exc
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise TargetError(f"{name}: module {module_name} ({module.__file__}) has no {qualname}")
    if not callable(found):
        raise TargetError(f"{name}: {qualname} is a {type(found).__name__}, not a function")
    return found


_NOT_THE_APPLICATION = ("<", os.path.dirname(importlib.__file__), __file__)  # frozen, importlib, us


def _where(exc: BaseException) -> str:
    """` (file:line)` of the innermost frame of the application's code an exception came from."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_NOT_THE_APPLICATION)]
    if isinstance(exc, SyntaxError) or not frames:
        return ""  # a SyntaxError's message names the file and line already
    return f" ({frames[-1].filename}:{frames[-1].lineno})"


def _import_from_current_directory() -> None:
    """MODULE is found in the current directory first, as `python -m` would."""
    cwd = os.getcwd()
    if sys.path[:1] != [cwd]:
        sys.path.insert(0, cwd)


def _make_state_dir(state_dir: Path) -> None:
    try:
        make_dirs(state_dir)  # each new directory's entry synced: it survives a power loss
    except OSError as exc:
        raise StoreError(f"{state_dir}: cannot create the state dir ({exc.strerror})") from exc


def _dependencies(setup: Setup | None, info: RunInfo) -> AbstractContextManager[Mapping[str, Any]]:
    return nullcontext({}) if setup is None else setup(info)


def _open_store(args: argparse.Namespace, state_dir: Path) -> AbstractContextManager[Any]:
    url = args.store or state_dir / STORE_FILE
    options = {"lease_s": args.lease} if parse_store_url(url)[0] == "postgresql" else {}
    try:
        return open_store(url, exclusive=True, lock_timeout=args.lock_timeout,
                          durability=args.durability, **options)
    except ValueError as exc:  # open_store's word for a URL it cannot use
        raise StoreError(str(exc)) from exc


def _end(progress: Progress, code: int, message: str, said: str = "error") -> int:
    """End with `code`, saying why once: to the supervisor that reads the progress pipe (it
    prints the error, or restarts), or, run alone, as a `said:` line on stderr."""
    if not progress.listened:
        print(f"{said}: {message}", file=sys.stderr)
    progress.send(ENDED, pid=os.getpid(), code=code, error=message)
    return code


class _StopRequest:
    """Set by SIGTERM/SIGINT; the runner asks it before each step and during a retry backoff."""

    requested = False

    def __call__(self) -> bool:
        return self.requested


def _stop_on_signals() -> _StopRequest:
    """SIGTERM/SIGINT ask for a stop between steps: the step in flight finishes first."""
    stop = _StopRequest()

    def request(_signum: int, _frame: object) -> None:
        stop.requested = True  # only a flag: no I/O in a signal handler

    signal.signal(signal.SIGTERM, request)
    signal.signal(signal.SIGINT, request)
    return stop
