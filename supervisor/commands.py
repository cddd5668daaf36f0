"""What `exec` and `run` share: a state dir made ready, a supervision run to its end, its report
printed, and its exit status (supervisor/exits.py). `exec` itself is here: any workflow, by name.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from store import Promise, StoreError, parse_store_url
from store.backends import redact
from store.fsutil import make_dirs

from . import exits, live
from .faults import RandomKill, in_a_database, kill_budget_error, random_kills
from .location import StoreLocation
from .report import Terms
from .supervise import Settings, StateDirBusyError, Supervisor

log = logging.getLogger("supervisor")


def exec_command(args: argparse.Namespace) -> int:
    """`python -m supervisor exec MODULE:FUNCTION --id ID ...`: supervise any workflow."""
    budget_error = kill_budget_error(args.kill_at_step, None, args.max_attempts, "step")
    if budget_error is not None:
        return refuse(budget_error, exits.USAGE, args.json)
    if args.store is not None:
        location = StoreLocation.at_url(args.store)
    else:
        refused = prepare_state_dir(args.state_dir, args.json)
        if refused is not None:
            return refused
        location = StoreLocation.in_state_dir(args.state_dir.resolve())
    settings = Settings(
        root_id=args.id,
        target=args.target,
        location=location,
        args=[orjson.dumps(a).decode() for a in args.arg],
        setup=args.setup,
        kill_at_steps=set(args.kill_at_step),
        random_kills=_for_store(location, random_kills(args.kill_random, args.seed, args.workers)),
        **common_settings(args),
    )
    return supervise(settings, as_json=args.json)


def _for_store(location: StoreLocation, kills: list[RandomKill]) -> list[RandomKill]:
    return in_a_database(kills) if parse_store_url(location.url)[0] == "postgresql" else kills


def join_command(args: argparse.Namespace, terms_for: Callable[[Promise], Terms]) -> int:
    """`python -m supervisor join --store postgresql://... --id ID`: this machine takes part in
    a workflow another started there (its executors run steps; it drives if the driver dies)."""
    refused = prepare_state_dir(args.state_dir, args.json)
    if refused is not None:
        return refused
    location = StoreLocation.in_database(args.store, args.state_dir.resolve())
    try:
        store = location.open_readonly()
        with store:
            root = store.get(args.id)
    except StoreError as exc:
        return refuse(str(exc), exits.FAILED, args.json)
    if root is None:
        return refuse(f"{redact(args.store)}: no workflow {args.id} was started there; start it with "
                      "`run --store ...` first", exits.FAILED, args.json)
    settings = Settings(
        root_id=args.id,
        target=None,
        location=location,
        random_kills=in_a_database(random_kills(args.kill_random, args.seed, args.workers)),
        terms=terms_for(root),
        **common_settings(args),
    )
    return supervise(settings, as_json=args.json)


def common_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The Settings every supervised run takes from its flags alike."""
    return {
        "max_restarts": args.max_restarts,
        "restart_backoff": args.restart_backoff,
        "max_attempts": args.max_attempts,
        "retry_initial": args.retry_initial,
        "grace": args.grace,
        "stall_timeout": args.stall_timeout,
        "step_timeout": args.step_timeout,
        "durability": args.durability,
        "workers": args.workers,
        "lease": args.lease,
    }


def prepare_state_dir(state_dir: Path, as_json: bool) -> int | None:
    """Make the state dir (each new level synced); an exit status if it cannot be used."""
    if state_dir.exists() and not state_dir.is_dir():
        return refuse(f"{state_dir}: the state dir is not a directory", exits.FAILED, as_json)
    try:
        make_dirs(state_dir)  # each new directory's entry synced: it survives a power loss
    except OSError as exc:
        return refuse(f"{state_dir}: cannot create the state dir ({exc.strerror})", exits.FAILED, as_json)
    return None


def supervise(settings: Settings, *, as_json: bool) -> int:
    """Run the supervision to its end, print its report (stdout) and, if it did not finish, its
    error once (stderr, last), and return the exit status."""
    try:
        with live.display(settings.terms.units, settings.unit_records) as display:
            _say_if_beyond_cores(settings)
            report = Supervisor(settings, display).run()
    except StateDirBusyError as exc:
        return refuse(str(exc), exits.BUSY, as_json)
    except StoreError as exc:  # a damaged or unusable store: refused before any worker ran
        return refuse(str(exc), exits.FAILED, as_json)
    except OSError as exc:
        return refuse(f"{exc.filename}: {exc.strerror}", exits.FAILED, as_json)
    _print(report.as_json() if as_json else report.as_text(), as_json)
    if report.ok:
        return exits.OK
    if report.cancelled:
        return exits.CANCELLED
    print(f"error: {report.error}", file=sys.stderr)
    if report.interrupted_by:
        return 128 + signal.Signals[report.interrupted_by].value
    return exits.BUSY if report.busy else exits.FAILED


def _say_if_beyond_cores(settings: Settings) -> None:
    """More step processes than cores is allowed (steps that wait on I/O gain from it), but
    CPU-bound steps then share the cores: say so once."""
    cores = os.cpu_count() or 1
    if settings.workers > cores:
        log.warning("--workers %d is more than the %d core(s) of this machine: CPU-bound %s "
                    "will share them", settings.workers, cores, settings.terms.units)


def refuse(error: str, code: int, as_json: bool) -> int:
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
