"""`list` (every workflow of a store), `status` (a read-only view of a workflow) and `retry`
(reopen a failed workflow so that the next run resumes it), for any workflow in a state dir or
store.

All read the workflow through the runtime (workflow/history.py) and retry through
`Runner.retry`; the words and the step count come from `terms_for(root)`, which knows the
import's batches.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from typing import Any

import orjson

from store import Promise, State, StoreError, StoreLockedError, open_store
from store.backends import redact
from workflow import Runner
from workflow.history import History, read_history, recorded_call, root_ids, state_of

from . import exits
from .location import StoreLocation
from .report import Terms

TermsFor = Callable[[Promise], Terms]  # the words (and step count) of the workflow at a root
RETRY_LOCK_TIMEOUT_S = 1.0


def show_status(location: StoreLocation, root_id: str, *, as_json: bool, terms_for: TermsFor) -> int:
    try:
        store = location.open_readonly()
    except StoreError as exc:
        return _error(str(exc), exits.FAILED)
    if store is None:
        return _error(f"{location.url}: no import has run in this state dir, and no other workflow "
                      "either", exits.FAILED)
    with store:
        history = read_history(store, root_id)
        if history is None:
            known = ", ".join(root_ids(store)) or "none"
            return _error(f"{location.url}: no workflow {root_id!r} (known: {known})", exits.FAILED)
        terms = terms_for(history.root)
        status = status_of(history, terms)
    if as_json:
        sys.stdout.write(orjson.dumps(status).decode() + "\n")
    else:
        print(status_text(status, terms))
    return exits.OK


def retry_failed(location: StoreLocation, root_id: str, *, as_json: bool, terms_for: TermsFor) -> int:
    """Reopen a rejected workflow and its rejected steps; resolved steps stay final."""
    try:
        store = open_store(location.url, exclusive=True, lock_timeout=RETRY_LOCK_TIMEOUT_S)
    except StoreLockedError as exc:
        return _error(f"{exc}; stop its supervisor (or worker) first", exits.BUSY)
    except StoreError as exc:
        return _error(str(exc), exits.FAILED)
    with store:
        root = store.get(root_id)
        terms = Terms() if root is None else terms_for(root)
        if root is None or root.state is not State.REJECTED:
            state = "missing" if root is None else root.state.value
            return _error(f"{terms.noun} {root_id} is {state}; only a failed {terms.noun} can be retried",
                          exits.FAILED)
        errors = {p.id: p.error for p in read_history(store, root_id).in_state(State.REJECTED)}
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
    and last activity, the newest last."""
    try:
        store = location.open_readonly()
    except StoreError as exc:
        return _error(str(exc), exits.FAILED)
    rows = []
    if store is not None:
        with store:
            for root_id in root_ids(store):
                history = read_history(store, root_id)
                rows.append(_listing(history, terms_for(history.root)))
    if as_json:
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
    elif not rows:
        print(f"no workflow has run in {redact(location.url)}")
    else:
        print(_table(rows))
    return exits.OK


def _listing(history: History, terms: Terms) -> dict[str, Any]:
    counted = terms.units_of(history)
    promises = [history.root, *history.calls]
    last = max(max(p.created_at, p.settled_at or 0.0) for p in promises)
    return {
        "id": history.root.id,
        "state": state_of(history.root),
        "units": terms.units,
        "done": len(counted.in_state(State.RESOLVED)),
        "total": terms.step_count(history),
        "records": terms.records_done(history),
        "last_activity": datetime.datetime.fromtimestamp(last, datetime.UTC).isoformat(timespec="seconds"),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [["ID", "STATE", "DONE", "RECORDS", "LAST ACTIVITY (UTC)"]]
    for r in rows:
        total = "?" if r["total"] is None else r["total"]
        cells.append([r["id"], r["state"], f"{r['done']}/{total} {r['units']}",
                      "" if r["records"] is None else f"{r['records']:,}", r["last_activity"]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)
    return "\n".join(lines)


def status_of(history: History, terms: Terms) -> dict[str, Any]:
    """The status report; its keys name the units in the workflow's own words (`batches_done`),
    and count only them (an import's batches, not its plan steps). The last error is any step's."""
    root, unit, units = history.root, terms.unit, terms.units
    counted = terms.units_of(history)
    pending, error, call = counted.first_pending, history.last_error, recorded_call(root)
    return {
        "id": root.id,
        "state": state_of(root),
        "code": None if call is None else f"{call.fn} v{call.version}",  # which code it runs
        f"{units}_done": len(counted.in_state(State.RESOLVED)),
        f"{unit}_count": terms.step_count(history),
        f"{units}_failed": len(counted.in_state(State.REJECTED)),
        f"pending_{unit}": None if pending is None else {"id": pending.id, "attempts": pending.attempts},
        "attempts": counted.attempts,
        "last_error": None if error is None else f"{error.get('type')}: {error.get('message')}",
        "result": None if root.state is not State.RESOLVED else terms.summary(root.value),
    }


def status_text(s: dict[str, Any], terms: Terms) -> str:
    unit, units = terms.unit, terms.units
    done, count = s[f"{units}_done"], s[f"{unit}_count"]
    progress = f"{done}/{count}" if count is not None else f"{done}"
    lines = [f"{s['id']}: {s['state']}, {progress} {units} done, {s['attempts']} {unit} attempts in all"]
    if s["code"]:
        lines.append(f"  code: {s['code']}")
    if s[f"pending_{unit}"]:
        p = s[f"pending_{unit}"]
        lines.append(f"  pending: {p['id']} ({p['attempts']} attempt(s) started)")
    if s[f"{units}_failed"]:
        lines.append(f"  failed {units}: {s[f'{units}_failed']}")
    if s["last_error"]:
        lines.append(f"  last error: {s['last_error']}")
    if s["state"] == State.RESOLVED.value:
        lines.append(f"  result: {terms.result_text(s['result'])}")
    return "\n".join(lines)


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
