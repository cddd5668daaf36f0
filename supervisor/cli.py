"""Command line: `python -m supervisor run|status|retry` (argument parsing and dispatch only)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from store import StoreError
from store.fsutil import make_dirs
from workflow.importer import SourceError, file_source, plan_batches, synthetic_source
from workflow.importer.sources import source_label
from workflow.importer.worker import positive_float, positive_int
from workflow.retry import RetryPolicy

from . import exits
from .faults import MAX_RANDOM_KILLS, attempts_before_kill, kill_would_fail, random_kills
from .live import LiveLine
from .status import retry_failed, show_status
from .supervise import Settings, StateDirBusyError, Supervisor

DEFAULT_RECORDS = 1000
DEFAULT_BATCH_SIZE = 100
DEFAULT_STATE_DIR = Path(".durable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor",
        description="Run a bulk import as a supervised, crash-resumable worker process.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or resume) an import under supervision")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--records", type=_non_negative,
                        help=f"synthetic records to import (default {DEFAULT_RECORDS})")
    source.add_argument("--input", type=Path, help="a .csv or .jsonl file to import")
    run.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE)
    run.add_argument("--kill-at-batch", type=_non_negative, action="append", default=[],
                     metavar="K", help="SIGKILL the worker while batch K is in flight (repeatable)")
    run.add_argument("--kill-random", type=_kill_count, default=0, metavar="N",
                     help=f"N SIGKILLs at random moments (at most {MAX_RANDOM_KILLS})")
    run.add_argument("--seed", type=int, default=None, help="seed for --kill-random")
    run.add_argument("--fail-at-batch", type=_non_negative, default=None, metavar="K",
                     help="make the first attempt of batch K fail (shows retry with backoff)")
    _common(run)
    run.add_argument("--max-restarts", type=_non_negative, default=10,
                     help="give up after this many unplanned restarts in a row (default 10)")
    run.add_argument("--restart-backoff", type=_non_negative_float, default=0.5, metavar="S",
                     help="first delay before an unplanned restart, doubled each time (default 0.5)")
    run.add_argument("--max-attempts", type=positive_int, default=RetryPolicy.max_attempts,
                     help="attempts of a batch before it fails for good")
    run.add_argument("--retry-initial", type=_non_negative_float, default=RetryPolicy.initial,
                     metavar="S", help="first retry delay of a failing batch (default 1 s)")
    run.add_argument("--grace", type=_non_negative_float, default=10.0, metavar="S",
                     help="how long a stopping worker may finish its batch before SIGKILL")
    run.add_argument("--stall-timeout", type=positive_float, default=Settings.stall_timeout,
                     metavar="S", help="SIGKILL and restart a worker whose progress pipe (a "
                     "heartbeat every second) stays silent this long: hung, stopped, or stuck "
                     f"in C code (default {Settings.stall_timeout:g})")
    run.add_argument("--step-timeout", type=positive_float, default=Settings.step_timeout,
                     metavar="S", help="fail and retry a batch attempt still running after S seconds "
                     f"(a step that never returns; default {Settings.step_timeout:g})")
    run.add_argument("--durability", choices=["full", "none"], default="full",
                     help="'none' skips fdatasync: survives kills, not power loss (benchmarks)")

    status = commands.add_parser("status", help="show an import's progress; changes nothing")
    _common(status)
    retry = commands.add_parser("retry", help="reopen the failed batch of an import so `run` resumes it")
    _common(retry)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="holds store.jsonl and import.db (default ./.durable)")
    p.add_argument("--id", type=_root_id, help="workflow id (default: derived from the input and batch size)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="supervisor: %(message)s")
    if args.command == "run":
        return _run(parser, args)
    if args.id is None:
        parser.error(f"{args.command} needs --id (see `status` of a run, or its report)")
    if args.command == "status":
        return show_status(args.state_dir, args.id, as_json=args.json)
    return retry_failed(args.state_dir, args.id, as_json=args.json)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    budget_error = _kill_budget_error(args)
    if budget_error is not None:
        return _refuse(budget_error, exits.USAGE, args.json)
    try:
        source = file_source(args.input) if args.input else synthetic_source(
            DEFAULT_RECORDS if args.records is None else args.records
        )
        batch_count = len(plan_batches(source, args.batch_size))
    except SourceError as exc:
        return _refuse(str(exc), exits.FAILED, args.json)
    beyond = [k for k in [*args.kill_at_batch, args.fail_at_batch] if k is not None and k >= batch_count]
    if beyond:
        parser.error(f"batch {beyond[0]} is beyond the last batch ({batch_count - 1}); "
                     f"the import has {batch_count} batch(es)")
    if args.state_dir.exists() and not args.state_dir.is_dir():
        return _refuse(f"{args.state_dir}: the state dir is not a directory", exits.FAILED, args.json)
    try:
        make_dirs(args.state_dir)  # each new directory's entry synced: it survives a power loss
    except OSError as exc:
        return _refuse(f"{args.state_dir}: cannot create the state dir ({exc.strerror})",
                       exits.FAILED, args.json)
    settings = Settings(
        state_dir=args.state_dir.resolve(),
        root_id=args.id or f"import/{source_label(source)}-b{args.batch_size}",
        source=source,
        batch_size=args.batch_size,
        batch_count=batch_count,
        kill_at_batches=set(args.kill_at_batch),
        random_kills=random_kills(args.kill_random, args.seed),
        fail_at_batch=args.fail_at_batch,
        max_restarts=args.max_restarts,
        restart_backoff=args.restart_backoff,
        max_attempts=args.max_attempts,
        retry_initial=args.retry_initial,
        grace=args.grace,
        stall_timeout=args.stall_timeout,
        step_timeout=args.step_timeout,
        durability=args.durability,
    )
    live = LiveLine.for_stderr()
    try:
        report = Supervisor(settings, live).run()
    except StateDirBusyError as exc:
        return _refuse(str(exc), exits.BUSY, args.json)
    except StoreError as exc:  # a damaged or unusable store: refused before any worker ran
        return _refuse(str(exc), exits.FAILED, args.json)
    except OSError as exc:
        return _refuse(f"{exc.filename}: {exc.strerror}", exits.FAILED, args.json)
    finally:
        if live is not None:
            live.close()
    _print(report.as_json() if args.json else report.as_text(), args.json)
    if report.result is not None:
        return exits.OK
    print(f"error: {report.error}", file=sys.stderr)
    if report.interrupted_by:
        return 128 + signal.Signals[report.interrupted_by].value
    return exits.FAILED


def _kill_budget_error(args: argparse.Namespace) -> str | None:
    """Why a `--kill-at-batch` would spend its batch's last attempt (and fail the import), if so."""
    for batch in sorted(args.kill_at_batch):
        spent = attempts_before_kill(batch, None, args.fail_at_batch)
        if kill_would_fail(spent, args.max_attempts):
            failure = ", the injected --fail-at-batch failure one more," if spent else ""
            return (f"--kill-at-batch {batch} needs --max-attempts {spent + 2} or more, not "
                    f"{args.max_attempts}: the planned kill spends one attempt of batch {batch}"
                    f"{failure} and the batch needs one more to finish")
    return None


def _refuse(error: str, code: int, as_json: bool) -> int:
    """A run that could not start: one line on stderr (and a JSON report with --json)."""
    print(f"error: {error}", file=sys.stderr)
    if as_json:
        _print({"ok": False, "error": error}, as_json)
    return code


def _print(report: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
    else:
        print(report)


def _root_id(text: str) -> str:
    if not text or "." in text:
        raise argparse.ArgumentTypeError(f"an id is non-empty, without '.' (it ends batch ids): {text!r}")
    return text


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _kill_count(text: str) -> int:
    value = _non_negative(text)
    if value > MAX_RANDOM_KILLS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_RANDOM_KILLS} random kills (each costs a worker restart), not {value}"
        )
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value
