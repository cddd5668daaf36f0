"""`python -m supervisor fork --id ID --from-batch K [--new-id NEW]`: a new import that reuses the
stored results of ID's batches before K and runs K onward again (DBOS's `fork_workflow`), after
a bug fix say. It knows the import through import_command.py (its words, its sink).

The fork is made, not run: its sink records it as a fork of ID from K (so that its batches take
over the rows ID wrote for them: workflow/importer/forks.py), then workflow/fork.py copies ID's
results under NEW, its root last. `run --id NEW` with ID's input runs it (the command is printed).
The default NEW is `ID~fork-K` (a root id has no '.').
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import orjson

from store import (
    PromiseConflictError,
    PromiseNotFoundError,
    State,
    StoreError,
    StoreLockedError,
    WorkflowBusyError,
    open_store,
    parse_store_url,
)
from workflow import PermanentError
from workflow.fork import fork
from workflow.history import History, read_history, recorded_call, root_ids
from workflow.ids import InvalidRootIdError, check_root_id

from . import exits
from .commands import refuse
from .import_command import IMPORT_TERMS, is_import, record_fork
from .location import StoreLocation
from .report import ranges

LOCK_TIMEOUT_S = 1.0  # the store of a running import is not waited for: it is refused


def default_fork_id(root_id: str, from_batch: int) -> str:
    return f"{root_id}~fork-{from_batch}"


def fork_import(
    location: StoreLocation, root_id: str, from_batch: int, new_id: str | None, *, as_json: bool
) -> int:
    """Make the fork (see the module's doc) and say how to run it."""
    new_id = new_id or default_fork_id(root_id, from_batch)
    try:
        check_root_id(new_id)
    except InvalidRootIdError as exc:
        return refuse(f"the fork's id: {exc}", exits.USAGE, as_json)
    try:
        store = open_store(location.url, exclusive=True, lock_timeout=LOCK_TIMEOUT_S)
    except StoreLockedError as exc:
        return refuse(f"{exc}; wait for the import to end, or cancel it, then fork it", exits.BUSY, as_json)
    except StoreError as exc:
        return refuse(str(exc), exits.FAILED, as_json)
    with store:
        history = read_history(store, root_id)
        refused = _refusal(store, location, history, root_id, new_id, from_batch)
        if refused is not None:
            return refuse(refused, exits.FAILED, as_json)
        try:
            record_fork(location, new_id, root_id, from_batch)
            copied = fork(store, root_id, new_id, _first_step_to_run(history, from_batch))
        except (PermanentError, PromiseConflictError, PromiseNotFoundError, StoreError) as exc:
            return refuse(str(exc), exits.FAILED, as_json)
        except WorkflowBusyError as exc:
            return refuse(f"{exc}; wait for it to end, or cancel it, then fork it", exits.BUSY, as_json)
    return _say(location, history, new_id, from_batch, len(copied), as_json)


def _refusal(store: Any, location: StoreLocation, history: History | None, root_id: str, new_id: str,
             from_batch: int) -> str | None:
    """Why the fork cannot be made, in one line; None if it can."""
    if history is None:
        known = ", ".join(root_ids(store)) or "none"
        return f"{location.url}: no import {root_id!r} (known: {known})"
    if not is_import(history.root):
        return f"{root_id} is not an import: only an import's batches can be forked"
    if store.get(new_id) is not None:
        return f"{new_id} exists already: give the fork another --new-id"
    if location.state_dir is None and parse_store_url(location.url)[0] != "postgresql":
        return "an import's sink is in its state dir: give --state-dir instead of --store"
    count = IMPORT_TERMS.step_count(history)
    batches = count if count is not None else len(IMPORT_TERMS.units_of(history).steps)
    if from_batch >= batches:
        known = "" if count is not None else " planned so far"
        return (f"batch {from_batch} is beyond the last batch{known} of import {root_id} "
                f"({batches - 1}; it has {batches} batch(es))")
    return None


def _first_step_to_run(history: History, from_batch: int) -> int | None:
    """The step number of batch `from_batch` (None if it was never begun: all is reused)."""
    units = sorted(IMPORT_TERMS.units_of(history).steps)
    return units[from_batch] if from_batch < len(units) else None


def _say(location: StoreLocation, history: History, new_id: str, from_batch: int, copied: int,
         as_json: bool) -> int:
    run = f"python -m supervisor run --id {shlex.quote(new_id)} {_source_flags(history)}{_where(location)}"
    if as_json:
        sys.stdout.write(orjson.dumps({"id": new_id, "forked_from": history.root.id,
                                       "from_batch": from_batch, "copied": copied,
                                       "run": run}).decode() + "\n")
        return exits.OK
    reused = _reused_batches(history, from_batch)
    after = reused[-1] + 1 if reused else 0  # the first batch after the last one reused
    again = sorted(set(range(after)) - set(reused))  # not done by the original: run again too
    what = f"batches {ranges(reused)} and their plan" if reused else "no batch, only the plan"
    runs = f"batches {ranges(again)} and {after} onward" if again else f"batches {after} onward"
    print(f"forked import {history.root.id} from batch {from_batch} as {new_id}: {copied} stored "
          f"result(s) reused ({what}); {runs} run again and take over the rows the original "
          f"wrote for them; run it with:\n  {run}")
    return exits.OK


def _reused_batches(history: History, from_batch: int) -> list[int]:
    """The batches before `from_batch` that the fork reuses: those the original had done."""
    steps = IMPORT_TERMS.units_of(history).steps
    return [b for b, n in enumerate(sorted(steps)) if b < from_batch and steps[n].state is State.RESOLVED]


def _source_flags(history: History) -> str:
    """`--records N` or `--input PATH`, and `--batch-size B`: the original's input, as `run` takes it."""
    call = recorded_call(history.root)
    source, batch_size = call.args
    given = (f"--records {source['records']}" if source.get("kind") == "synthetic"
             else f"--input {shlex.quote(str(source['path']))}")
    return f"{given} --batch-size {batch_size}"


def _where(location: StoreLocation) -> str:
    """The location flags of `run` (whose --store is a PostgreSQL URL only)."""
    if parse_store_url(location.url)[0] == "postgresql":
        return f" --store {shlex.quote(location.url)}"
    return location.cli_flags()
