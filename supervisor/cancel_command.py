"""`python -m supervisor cancel --id ID`: stop a workflow for good at its next step boundary.

The request is recorded in the store (store.request_cancel: a file beside a JSON-lines store,
which its worker's exclusive lock does not stop; a row in PostgreSQL), where the workflow's
driver looks for it between steps: the steps in flight end, no new one starts, the root is
rejected as cancelled and the worker exits CANCELLED, its supervisor `exits.CANCELLED`. When no
process drives the workflow, this command settles it as cancelled itself. `retry` withdraws the
request and reopens the workflow.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable

import orjson

from store import (
    Promise,
    PromiseConflictError,
    PromiseStore,
    State,
    StoreError,
    StoreLockedError,
    WorkflowBusyError,
    open_store,
)
from workflow import Runner
from workflow.history import read_history, root_ids, state_of

from . import exits
from .commands import refuse
from .location import StoreLocation
from .report import Terms

TermsFor = Callable[[Promise], Terms]


def cancel_workflow(location: StoreLocation, root_id: str, *, as_json: bool, terms_for: TermsFor) -> int:
    """Record the cancel request, and settle the workflow as cancelled if no one drives it."""
    try:
        store = location.open_readonly()
    except StoreError as exc:
        return refuse(str(exc), exits.FAILED, as_json)
    if store is None:
        return refuse(f"{location.url}: no workflow has run here", exits.FAILED, as_json)
    with store:
        root = store.get(root_id)
        if root is None:
            known = ", ".join(root_ids(store)) or "none"
            return refuse(f"{location.url}: no workflow {root_id!r} (known: {known})", exits.FAILED, as_json)
        terms = terms_for(root)
        refused = _not_cancellable(root, terms, location)
        if refused is not None:
            return refuse(refused, exits.FAILED, as_json)
        store.request_cancel(root_id)  # made even while a worker holds the store
    try:
        settled = _settle_unless_driven(location, root_id)
        ended = not settled and _resolved_before_request(location, root_id)
    except PromiseConflictError:  # it ended meanwhile, before it looked for the request
        ended = True
    except StoreError as exc:
        return refuse(str(exc), exits.FAILED, as_json)
    if ended:
        return refuse(f"{terms.noun} {root_id} ended before the cancel took effect (see `status`)",
                      exits.FAILED, as_json)
    return _say(location, root_id, terms, settled, as_json)


def _not_cancellable(root: Promise, terms: Terms, location: StoreLocation) -> str | None:
    """Why `root` cannot be cancelled (finished, or failed), or None."""
    state = state_of(root)
    if state == "resolved":
        return f"{terms.noun} {root.id} is done; there is nothing to cancel"
    if state == "rejected":
        return (f"{terms.noun} {root.id} failed; there is nothing to cancel (`python -m supervisor "
                f"retry --id {shlex.quote(root.id)}{location.cli_flags()}` resumes it)")
    return None


def _settle_unless_driven(location: StoreLocation, root_id: str) -> bool:
    """Settle the workflow as cancelled now unless a process holds its store or drives it
    (True if it is cancelled now; False if its driver will be at its next step boundary)."""
    try:
        store: PromiseStore = open_store(location.url, exclusive=True, lock_timeout=0)
    except (StoreLockedError, WorkflowBusyError):  # a worker holds the file: it is running
        return False
    with store:
        return Runner(store).cancel(root_id)


def _resolved_before_request(location: StoreLocation, root_id: str) -> bool:
    """Whether a driven workflow was resolved by the time its cancel request was recorded (its
    driver looks for the request once more at its end, before it resolves the root; any later
    request is one it never sees): then the request is withdrawn, as that driver would have."""
    store = location.open_readonly()
    if store is None:
        return False
    with store:
        root = store.get(root_id)
        if root is None or root.state is not State.RESOLVED:
            return False
        store.withdraw_cancel(root_id)
    return True


def _say(location: StoreLocation, root_id: str, terms: Terms, settled: bool, as_json: bool) -> int:
    resume = f"python -m supervisor retry --id {shlex.quote(root_id)}{location.cli_flags()}"
    if as_json:
        state = "cancelled" if settled else "cancelling"
        sys.stdout.write(orjson.dumps({"id": root_id, "state": state, "resume": resume}).decode() + "\n")
        return exits.OK
    if settled:
        done = _units_done(location, root_id, terms)
        print(f"cancelled {terms.noun} {root_id}{done}; `{resume}` resumes it")
    else:
        print(f"cancel requested: the worker running {terms.noun} {root_id} stops at its next "
              f"{terms.unit} boundary and marks it cancelled (its supervisor exits "
              f"{exits.CANCELLED}); `{resume}` resumes it then")
    return exits.OK


def _units_done(location: StoreLocation, root_id: str, terms: Terms) -> str:
    """`, N of M batches done` as the store has it now (read-only)."""
    store = location.open_readonly()
    if store is None:
        return ""
    with store:
        history = read_history(store, root_id)
    if history is None:
        return ""
    done = len(terms.units_of(history).in_state(State.RESOLVED))
    total = terms.step_count(history)
    return f" ({done}{'' if total is None else f' of {total}'} {terms.units} done)"
