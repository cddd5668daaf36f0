"""The import worker: the child process the supervisor spawns, restarts and kills.

It opens the store exclusively (one worker per store), checks the input, and runs or replays
`import_records`. It knows nothing of kills; it reports what it does as JSON lines on the
progress fd, with a heartbeat line every second or so from a thread of its own (a worker that
stops heartbeating is hung: stopped, or stuck in C code holding the GIL), and ends with an exit
status from `exitcodes`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from store import Durability, JsonlStore, StoreError
from workflow import EngineError, RetryPolicy, Runner, StepError, StepEvent, WorkflowInterrupted

from . import exitcodes
from .app import batch_index, import_records
from .sink import Sink, SinkError, SinkStorageError
from .sources import SourceError, plan_batches

log = logging.getLogger("workflow.importer")
STORE_FILE = "store.jsonl"
SINK_FILE = "import.db"
HEARTBEAT_S = 1.0
STEP_TIMEOUT_S = 600.0  # a batch takes milliseconds to seconds; ten minutes means it hangs


class Progress:
    """JSON-lines events for the supervisor on an inherited fd (or nowhere).

    Each line is written whole under one lock: the heartbeat thread shares the fd, and a line
    longer than PIPE_BUF (a step event with a long error) could otherwise interleave with another.
    """

    def __init__(self, fd: int | None, root_id: str) -> None:
        self._fd = fd
        self._root_id = root_id
        self._lock = threading.Lock()

    def send(self, event: str, **fields: Any) -> None:
        if self._fd is None:
            return
        line = memoryview(orjson.dumps({"event": event, **fields}) + b"\n")
        with self._lock:
            while line:  # a write cut short by a signal returns what it wrote
                line = line[os.write(self._fd, line):]

    def start_heartbeat(self, interval: float) -> None:
        """A `heartbeat` line every `interval` seconds from a daemon thread, while the process
        runs Python code at all: its silence is how the supervisor tells a hung worker."""
        if self._fd is not None:
            threading.Thread(target=self._beat, args=(interval,), name="heartbeat", daemon=True).start()

    def _beat(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            try:
                self.send("heartbeat")
            except OSError as exc:  # the supervisor is gone (and this worker dies with it)
                log.warning("heartbeat stopped: progress fd %d: %s", self._fd, exc.strerror)
                return

    def step(self, e: StepEvent) -> None:
        self.send("step", kind=e.kind, id=e.promise_id, batch=batch_index(self._root_id, e.promise_id),
                  attempt=e.attempt, error=e.error, delay=e.delay)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workflow.importer", description=__doc__)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--id", required=True, help="root promise id of the import")
    p.add_argument("--source", type=orjson.loads, required=True, help="source descriptor (JSON)")
    p.add_argument("--batch-size", type=positive_int, required=True)
    p.add_argument("--progress-fd", type=int, default=None)
    p.add_argument("--heartbeat", type=positive_float, default=HEARTBEAT_S, metavar="S",
                   help="seconds between heartbeat lines on the progress fd")
    p.add_argument("--max-attempts", type=int, default=RetryPolicy.max_attempts)
    p.add_argument("--retry-initial", type=float, default=RetryPolicy.initial)
    p.add_argument("--step-timeout", type=positive_float, default=STEP_TIMEOUT_S, metavar="S",
                   help="fail (and retry) a batch attempt that has not returned after S seconds")
    p.add_argument("--lock-timeout", type=float, default=10.0)
    p.add_argument("--durability", choices=[d.value for d in Durability], default="full")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="worker %(process)d: %(message)s")
    stop = _stop_on_signals()
    progress = Progress(args.progress_fd, args.id)
    progress.send("started", pid=os.getpid())
    progress.start_heartbeat(args.heartbeat)
    try:
        plan_batches(args.source, args.batch_size)  # file-level problems stop us before any batch
        with JsonlStore(args.state_dir / STORE_FILE, exclusive=True,
                        lock_timeout=args.lock_timeout, durability=args.durability) as store:
            sink = Sink(args.state_dir / SINK_FILE, durable=args.durability == Durability.FULL)
            try:
                runner = Runner(
                    store,
                    retry=RetryPolicy(max_attempts=args.max_attempts, initial=args.retry_initial,
                                      non_retryable=(SourceError, SinkStorageError),
                                      timeout=args.step_timeout),
                    dependencies={"sink": sink},
                    on_event=progress.step,
                    should_stop=lambda: stop["requested"],
                )
                runner.run(args.id, import_records, args.source, args.batch_size)
            finally:
                sink.close()
    except WorkflowInterrupted as exc:
        return _end(progress, exitcodes.INTERRUPTED, str(exc))
    except StepError as exc:
        return _end(progress, exitcodes.FAILED, str(exc))
    except (SourceError, SinkError, EngineError, StoreError) as exc:
        return _end(progress, exitcodes.FATAL, str(exc))
    progress.send("finished", pid=os.getpid())
    return exitcodes.OK


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    value = float(text)
    if not 0 < value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return value


def _end(progress: Progress, code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    progress.send("ended", pid=os.getpid(), code=code, error=message)
    return code


def _stop_on_signals() -> dict[str, bool]:
    """SIGTERM/SIGINT ask for a stop between batches: the batch in flight finishes first."""
    stop = {"requested": False}

    def request(_signum: int, _frame: object) -> None:
        stop["requested"] = True  # only a flag: no I/O in a signal handler

    signal.signal(signal.SIGTERM, request)
    signal.signal(signal.SIGINT, request)
    return stop
