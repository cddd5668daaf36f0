"""Command line: `python -m supervisor exec|run|join|list|status|retry|cancel|fork|compact|gc|report`
(argument parsing and dispatch only).

`exec` supervises any workflow by name and imports nothing of it. `run` is the import's
command; its wiring (import_command.py) is the one module that imports the import application,
and it is loaded only by the commands that need it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from store import Promise, parse_store_url
from store.owners import DEFAULT_LEASE_S
from workflow.child import (
    DEFAULT_STATE_DIR,
    MAX_WORKERS,
    durable_store_url,
    json_value,
    non_negative_float,
    pg_store_url,
    positive_float,
    positive_int,
    root_id,
    target,
    whole_number,
    worker_count,
)
from workflow.retry import RetryPolicy

from . import exits
from .cancel_command import cancel_workflow
from .commands import exec_command, join_command
from .faults import MAX_RANDOM_KILLS
from .housekeeping import collect_garbage, compact_store
from .location import StoreLocation
from .report import Terms
from .status import list_workflows, retry_failed, show_status
from .supervise import Settings

MAX_SYNTHETIC_RECORDS = 10**12
DEFAULT_RECORDS = 1000  # the import's defaults, as its `run` command shows them
DEFAULT_BATCH_SIZE = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Run a workflow (or the bulk import) as a supervised, crash-resumable worker process.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    exec_ = commands.add_parser("exec", help="run (or resume) any workflow under supervision")
    exec_.add_argument("target", type=target, metavar="MODULE:FUNCTION",
                       help="the workflow function (MODULE is imported by the worker only, from the "
                       "current directory first)")
    exec_.add_argument("--id", type=root_id, required=True, help="the workflow's id (no '.')")
    exec_.add_argument("--arg", type=json_value, action="append", default=[], metavar="JSON",
                       help="the workflow's next positional argument, as JSON (repeatable)")
    exec_.add_argument("--setup", type=target, default=None, metavar="MODULE:FUNCTION",
                       help="the application's setup hook, giving the steps' dependencies")
    exec_.add_argument("--kill-at-step", type=_non_negative, action="append", default=[], metavar="N",
                       help="SIGKILL the worker once step N's attempt has started (repeatable)")
    _kills(exec_)
    _location(exec_, store=True)
    _supervision(exec_, unit="step")

    run = commands.add_parser("run", help="run (or resume) an import under supervision")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--records", type=_count_up_to(MAX_SYNTHETIC_RECORDS, "records"),
                        default=DEFAULT_RECORDS,
                        help=f"synthetic records to import (default {DEFAULT_RECORDS})")
    source.add_argument("--input", type=Path, help="a .csv, .tsv or .jsonl file to import (or "
                        "one of them gzipped: .csv.gz, ...)")
    run.add_argument("--map", metavar="id=COL,name=COL,email=COL",
                     help="the CSV columns that hold the fields (default: the columns named id, name, "
                     "email, in any case)")
    run.add_argument("--delimiter", metavar="CHAR",
                     help="the CSV delimiter, e.g. ';' or tab (default: sniffed among , ; tab |; "
                     "tab for .tsv)")
    run.add_argument("--encoding", default="utf-8", help="the input's encoding (default utf-8; e.g. latin-1)")
    run.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE)
    run.add_argument("--kill-at-batch", type=_non_negative, action="append", default=[],
                     metavar="K", help="SIGKILL the worker while batch K is in flight (repeatable)")
    _kills(run)
    run.add_argument("--fail-at-batch", type=_non_negative, default=None, metavar="K",
                     help="make the first attempt of batch K fail (shows retry with backoff)")
    _location(run, store=False)
    run.add_argument("--store", type=pg_store_url, default=None, metavar="URL",
                     help="run the import in PostgreSQL (postgresql://...): its promises and its "
                     "rows in that database, its batches claimable by machines that `join` it")
    run.add_argument("--id", type=root_id,
                     help="the import's id (default: import/ and the start of the input's SHA-256, "
                     "or import/synthetic-N); give a new one to import the same input again")
    _supervision(run, unit="batch")

    join = commands.add_parser("join", help="add this machine to a workflow running in PostgreSQL: "
                               "its executors run batches, and it takes over if the driver's machine dies")
    join.add_argument("--store", type=pg_store_url, required=True, metavar="URL",
                      help="the PostgreSQL database the workflow was started in")
    join.add_argument("--id", type=root_id, required=True, help="the workflow's id (see its report)")
    join.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                      help=f"this machine's state dir, for its supervisor's lock "
                      f"(default ./{DEFAULT_STATE_DIR})")
    _kills(join)
    _supervision(join, unit="step")

    listing = commands.add_parser("list", help="list every workflow (import) of a state dir or store")
    _location(listing, store=True)
    listing.add_argument("--json", action="store_true", help="print the list as one JSON array")
    status = commands.add_parser("status", help="show a workflow's progress, batch by batch; changes nothing")
    _inspection(status)
    status.add_argument("--watch", action="store_true",
                        help="show it again every --interval seconds until the workflow ends (or Ctrl-C)")
    status.add_argument("--interval", type=positive_float, default=1.0, metavar="S",
                        help="seconds between two --watch snapshots (default 1)")
    retry = commands.add_parser("retry", help="reopen a failed (or cancelled) workflow so that the same "
                                "`exec` or `run` resumes it")
    _inspection(retry)
    compact = commands.add_parser("compact", help="rewrite the JSON-lines store of a state dir with one "
                                  "line per promise, every workflow in it (no worker may hold it)")
    _location(compact, store=True)
    compact.add_argument("--id", type=root_id, help="compact only if the store holds this workflow "
                         "(the whole file is compacted all the same)")
    compact.add_argument("--json", action="store_true", help="print the report as one JSON object")
    gc = commands.add_parser("gc", help="delete the files a store set aside when it recovered (torn tails, "
                             "a compaction cut short), once it has been opened again since")
    _location(gc, store=True)
    gc.add_argument("--keep", "--dry-run", action="store_true", dest="keep",
                    help="list what would be deleted, delete nothing")
    gc.add_argument("--json", action="store_true", help="print the result as one JSON object")
    report = commands.add_parser("report", help="write a picture of an import's run (a timeline of its "
                                 "batches, kills and restarts) as one self-contained HTML file")
    report.add_argument("--id", type=root_id, required=True, help="the import's id (see `list`)")
    report.add_argument("--html", type=Path, required=True, metavar="FILE", help="the page to write")
    report.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"holds store.jsonl, import.db and supervisor-events.jsonl (default "
                        f"./{DEFAULT_STATE_DIR}); with --store, the supervisor's events only")
    report.add_argument("--store", type=_sink_database, default=None, metavar="URL",
                        help="the PostgreSQL database of an import run with `run --store URL`")
    cancel = commands.add_parser("cancel", help="stop a running (or pending) workflow for good at its "
                                 "next step boundary; `retry` resumes it")
    _location(cancel, store=True)
    cancel.add_argument("--id", type=root_id, required=True, help="the workflow's id (see `list`)")
    cancel.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    fork = commands.add_parser("fork", help="a new import that reuses the stored results of an import's "
                               "batches before K and runs K onward again (then `run --id NEW`)")
    _location(fork, store=True)
    fork.add_argument("--id", type=root_id, required=True, help="the import to fork")
    fork.add_argument("--from-batch", type=_non_negative, required=True, metavar="K",
                      help="the first batch the fork runs again (batches before it are reused)")
    fork.add_argument("--new-id", type=root_id, default=None, metavar="NEW",
                      help="the fork's id (default: ID~fork-K)")
    fork.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    return parser


def _kills(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kill-random", default=0, metavar="N",
                   type=_count_up_to(MAX_RANDOM_KILLS, "random kills (each costs a worker restart)"),
                   help=f"N SIGKILLs at random moments (at most {MAX_RANDOM_KILLS})")
    p.add_argument("--seed", type=whole_number, default=None, help="seed for --kill-random")


def _location(p: argparse.ArgumentParser, *, store: bool) -> None:
    where = p.add_mutually_exclusive_group() if store else p
    where.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                       help=f"holds store.jsonl (and the import's import.db; default ./{DEFAULT_STATE_DIR})")
    if store:
        where.add_argument("--store", type=durable_store_url, default=None, metavar="URL",
                           help="the promise store instead of a state dir: a path, jsonl:PATH, or "
                           "postgresql://... (many machines)")


def _supervision(p: argparse.ArgumentParser, *, unit: str) -> None:
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--max-restarts", type=_non_negative, default=10,
                   help="give up after this many unplanned restarts in a row (default 10)")
    p.add_argument("--restart-backoff", type=non_negative_float, default=0.5, metavar="S",
                   help="first delay before an unplanned restart, doubled each time (default 0.5)")
    p.add_argument("--max-attempts", type=positive_int, default=RetryPolicy.max_attempts,
                   help=f"attempts of a {unit} before it fails for good")
    p.add_argument("--retry-initial", type=non_negative_float, default=RetryPolicy.initial,
                   metavar="S", help=f"first retry delay of a failing {unit} (default 1 s)")
    p.add_argument("--grace", type=non_negative_float, default=10.0, metavar="S",
                   help=f"how long a stopping worker may finish its {unit} before SIGKILL")
    p.add_argument("--stall-timeout", type=positive_float, default=Settings.stall_timeout,
                   metavar="S", help="SIGKILL and restart a worker whose progress pipe (a "
                   "heartbeat every second) stays silent this long: hung, stopped, or stuck "
                   f"in C code (default {Settings.stall_timeout:g})")
    p.add_argument("--step-timeout", type=positive_float, default=Settings.step_timeout,
                   metavar="S", help=f"fail and retry a {unit} attempt still running after S seconds "
                   f"(a step that never returns; default {Settings.step_timeout:g})")
    p.add_argument("--durability", choices=["full", "none"], default="full",
                   help="'none' skips fdatasync: survives kills, not power loss (benchmarks)")
    p.add_argument("--lease", type=positive_float, default=DEFAULT_LEASE_S, metavar="S",
                   help="on PostgreSQL: the driver's lease and each executor's claim, in seconds; "
                   f"a dead machine's work is taken over after it (default {DEFAULT_LEASE_S:g})")
    p.add_argument("--workers", type=worker_count, default=1, metavar="N",
                   help=f"run up to N {unit} attempts at once, each in a process of the worker's "
                   f"pool (default 1; beyond the cores rarely helps; at most {MAX_WORKERS})")


def _inspection(p: argparse.ArgumentParser) -> None:
    _location(p, store=True)
    p.add_argument("--id", type=root_id, help="the workflow's id (see `list`, or the report of its run); "
                   "may be left out when the state dir or store holds one workflow only")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def main(argv: list[str] | None = None) -> int:
    """Run one command; a reader that closes stdout early (`status | head`) ends it quietly,
    with the status a shell gives a process SIGPIPE killed (141)."""
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # inside the try: a closed pipe is found here, not at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush writes there
        return exits.BROKEN_PIPE
    return code


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="supervisor: %(message)s")
    if args.command == "exec":
        return exec_command(args)
    if args.command == "run":
        from .import_command import run_command  # the import application: loaded for `run` only

        return run_command(parser, args)
    if args.command == "join":
        return join_command(args, _terms_for)
    if args.command == "fork":
        from .fork_command import fork_import  # the import application: loaded for `fork` only

        return fork_import(_where(args), args.id, args.from_batch, args.new_id, as_json=args.json)
    if args.command == "list":
        return list_workflows(_where(args), as_json=args.json, terms_for=_terms_for)
    if args.command == "report":
        from .report_command import report_command  # the import application: loaded for `report` only

        return report_command(args.id, args.html, args.state_dir, args.store)
    if args.command == "cancel":
        return cancel_workflow(_where(args), args.id, as_json=args.json, terms_for=_terms_for)
    if args.command == "status":
        return show_status(_where(args), args.id, as_json=args.json, terms_for=_terms_for,
                           watch=args.interval if args.watch else None)
    if args.command == "compact":
        return compact_store(_where(args), args.id, as_json=args.json, terms_for=_terms_for)
    if args.command == "gc":
        return collect_garbage(_where(args), keep=args.keep, as_json=args.json)
    return retry_failed(_where(args), args.id, as_json=args.json, terms_for=_terms_for)


def _where(args: argparse.Namespace) -> StoreLocation:
    if args.store is not None:
        return StoreLocation.at_url(args.store)
    return StoreLocation.in_state_dir(args.state_dir.resolve())


def _terms_for(root: Promise) -> Terms:
    """The words `status` and `retry` use for a workflow: an import's batches, or steps."""
    from .import_command import terms_for  # the import application: loaded to recognize imports

    return terms_for(root)


def _prog() -> str:
    """The command as it was invoked: `durable-import` (the console script), else `python -m
    supervisor`."""
    invoked = os.path.basename(sys.argv[0])
    return "python -m supervisor" if invoked in ("__main__.py", "-c", "") else invoked


def _sink_database(text: str) -> str:
    """An argparse type: a PostgreSQL URL, the one place besides a state dir an import's sink is."""
    if parse_store_url(durable_store_url(text))[0] != "postgresql":
        raise argparse.ArgumentTypeError(f"{text}: an import's sink is in its state dir (--state-dir) "
                                         "or in PostgreSQL; give a postgresql://... URL")
    return text


def _non_negative(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _count_up_to(limit: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from 0 to `limit` (of `what`, for the message)."""

    def count(text: str) -> int:
        value = _non_negative(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"at most {limit:,} {what}, not {value:,}")
        return value

    return count

