"""`list` (every workflow of a store), `status` (a read-only view of a workflow) and `retry`
(reopen a failed workflow so that the next run resumes it), for any workflow in a state dir or
store.

All read the workflow through the runtime (workflow/history.py) and retry through
`Runner.retry`; the words, the step count and the executions come from `terms_for(root)`, which
knows the import's batches and its sink. What `status` shows is made in inspect.py.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from store import Promise, PromiseStore, State, StoreError, StoreLockedError, open_store
from store.backends import redact
from workflow import Runner
from workflow.history import History, read_history, root_ids

from . import exits
from .inspect import error_text, is_final, last_activity, state_in_words, status_of, status_text, timestamp
from .location import StoreLocation
from .redraw import Redraw
from .report import Terms

TermsFor = Callable[[Promise], Terms]  # the words (and step count) of the workflow at a root
RETRY_LOCK_TIMEOUT_S = 1.0


def show_status(location: StoreLocation, root_id: str | None, *, as_json: bool, terms_for: TermsFor,
                watch: float | None = None) -> int:
    """Print the workflow's status; with `watch` (seconds), again every `watch` seconds until
    it ends (or Ctrl-C). Without `root_id`, the one workflow there is."""
    try:
        store = location.open_readonly()
    except StoreError as exc:
        return _error(str(exc), exits.FAILED)
    if store is None:
        return _error(f"{location.url}: no import has run in this state dir, and no other workflow "
                      "either", exits.FAILED)
    with store:
        root_id, refused = one_root(store, location, root_id, terms_for)
        if refused is not None:
            return refused
        terms = terms_for(store.get(root_id))
        screen = Redraw() if watch is not None and not as_json else None
        try:
            while True:
                history = read_history(store, root_id)
                now = time.time()
                status = status_of(history, terms, terms.executions(location, root_id), now,
                                   store.cancel_requested(root_id))
                if as_json:
                    sys.stdout.write(orjson.dumps(status).decode() + "\n")
                    sys.stdout.flush()
                else:
                    text = status_text(status, terms, now, _retry_hint(history, terms, location))
                    if screen is None:
                        print(text)
                    else:
                        screen.show(text)
                if watch is None or is_final(history.root):
                    return exits.OK
                time.sleep(watch)
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        except StoreError as exc:
            return _error(str(exc), exits.FAILED)


def one_root(store: PromiseStore, location: StoreLocation, root_id: str | None,
             terms_for: TermsFor) -> tuple[str, int | None]:
    """The workflow a command is about: `root_id`, or else the only one there is; else the
    refusal's exit status, after saying which there are."""
    ids = root_ids(store)
    if root_id is not None:
        if root_id in ids:
            return root_id, None
        known = ", ".join(ids) or "none"
        return root_id, _error(f"{redact(location.url)}: no workflow {root_id!r} (known: {known})",
                               exits.FAILED)
    if len(ids) == 1:
        return ids[0], None
    if not ids:
        return "", _error(f"no workflow has run in {redact(location.url)}", exits.FAILED)
    where = location.cli_flags()
    _error(f"{len(ids)} workflows in {redact(location.url)}; pass --id ID with one of them "
           f"(e.g. --id {shlex.quote(ids[-1])}{where})", exits.USAGE)
    print(_table(_rows(store, terms_for)), file=sys.stderr)
    return "", exits.USAGE


def _retry_hint(history: History, terms: Terms, location: StoreLocation) -> str | None:
    """The command that reopens a failed (or cancelled) workflow, flags for its location
    included; none for a failure no retry can resume (its error says what to do)."""
    root = history.root
    if root.state is not State.REJECTED or any(
            terms.unretryable(error_text(p.error)) for p in history.in_state(State.REJECTED)):
        return None
    return f"python -m supervisor retry --id {shlex.quote(root.id)}{location.cli_flags()}"


def retry_failed(location: StoreLocation, root_id: str | None, *, as_json: bool,
                 terms_for: TermsFor) -> int:
    """Reopen a rejected workflow and its rejected steps; resolved steps stay final. Without
    `root_id`, the one workflow there is."""
    try:
        store = open_store(location.url, exclusive=True, lock_timeout=RETRY_LOCK_TIMEOUT_S)
    except StoreLockedError as exc:
        return _error(f"{exc}; stop its supervisor (or worker) first", exits.BUSY)
    except StoreError as exc:
        return _error(str(exc), exits.FAILED)
    with store:
        root_id, refused = one_root(store, location, root_id, terms_for)
        if refused is not None:
            return refused
        root = store.get(root_id)
        terms = terms_for(root)
        if root.state is not State.REJECTED:
            return _error(f"{terms.noun} {root_id} is {root.state.value}; only a failed {terms.noun} "
                          "can be retried", exits.FAILED)
        errors = {p.id: p.error for p in read_history(store, root_id).in_state(State.REJECTED)}
        why = next(filter(None, (terms.unretryable(error_text(e)) for e in errors.values())), None)
        if why is not None:
            return _error(f"{terms.noun} {root_id} cannot be resumed by a retry: {why}", exits.FAILED)
        reopened = Runner(store).retry(root_id)
    if as_json:
        sys.stdout.write(orjson.dumps({"id": root_id, "reopened": reopened}).decode() + "\n")
        return exits.OK
    for promise_id in reopened[:-1]:
        error = errors.get(promise_id) or {}
        print(f"reopened {promise_id} (was: {error.get('type')}: {error.get('message')})")
    print(f"reopened {root_id}; run the same `python -m supervisor {terms.command}` command to resume it")
    return exits.OK


def list_workflows(location: StoreLocation, *, as_json: bool, terms_for: TermsFor) -> int:
    """Every workflow in the store (or database): its id, state, units done of all, records
    and last activity, in the order they began."""
    try:
        store = location.open_readonly()
    except StoreError as exc:
        return _error(str(exc), exits.FAILED)
    rows: list[Listing] = []
    if store is not None:
        with store:
            rows = _rows(store, terms_for)
    if as_json:
        sys.stdout.write(orjson.dumps([r.as_json() for r in rows]).decode() + "\n")
    elif not rows:
        print(f"no workflow has run in {redact(location.url)}")
    else:
        print(_table(rows))
    return exits.OK


@dataclass(frozen=True)
class Listing:
    """One line of `list`: a workflow and its progress, in its own words."""

    id: str
    state: str
    units: str  # what its units are called: "batches", "steps"
    done: int
    total: int | None  # None while only its run can tell
    records: int | None  # None for a workflow that does not count records
    last_activity: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, f"{self.units}_done": self.done,
                f"{self.units}_total": self.total, "records": self.records,
                "last_activity": self.last_activity}


def _rows(store: PromiseStore, terms_for: TermsFor) -> list[Listing]:
    rows = []
    for root_id in root_ids(store):
        history = read_history(store, root_id)
        terms = terms_for(history.root)
        rows.append(Listing(
            id=root_id,
            state=state_in_words(history.root, store.cancel_requested(root_id)),
            units=terms.units,
            done=len(terms.units_of(history).in_state(State.RESOLVED)),
            total=terms.step_count(history),
            records=terms.records_done(history),
            last_activity=timestamp(last_activity(history)),
        ))
    return rows


def _table(rows: list[Listing]) -> str:
    cells = [["ID", "STATE", "DONE", "RECORDS", "LAST ACTIVITY (UTC)"]]
    for r in rows:
        total = "?" if r.total is None else r.total
        cells.append([r.id, r.state, f"{r.done}/{total} {r.units}",
                      "" if r.records is None else f"{r.records:,}", r.last_activity])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)
    return "\n".join(lines)


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
