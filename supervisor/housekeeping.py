"""`compact` and `gc`: the JSON-lines store's upkeep, from the command line.

Both take the store's lock for as long as they work, as a worker does, so they never run beside
one: a store a worker holds is refused in one line (exit 3, as every busy refusal), and one of
them is run again once the import has stopped. A PostgreSQL store has nothing of either kind:
a promise is a row there, and no file is set aside.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

from store import JsonlStore, StoreError, StoreLockedError, parse_store_url
from store.backends import redact
from store.jsonl import collect_set_aside, set_aside_files
from workflow.history import root_ids

from . import exits
from .commands import refuse
from .location import StoreLocation
from .status import TermsFor, one_root

LOCK_TIMEOUT_S = 1.0  # how long to wait for a store another process holds before refusing


def compact_store(location: StoreLocation, root_id: str | None, *, as_json: bool,
                  terms_for: TermsFor) -> int:
    """Rewrite the store file of the location with one line per promise: every workflow in it
    is compacted (with `root_id`, only once the file is found to hold that one). Say how many
    lines and bytes it took before and after; a file that is not smaller is said to be so (it
    is valid all the same: see NOT_SMALLER)."""
    path = _store_file(location, "compaction does not apply: a promise is one row there (and one "
                       "more once settled), and PostgreSQL's autovacuum reclaims what is deleted", as_json)
    if not isinstance(path, Path):
        return path
    try:
        store = JsonlStore(path, exclusive=True, lock_timeout=LOCK_TIMEOUT_S)
    except StoreLockedError as exc:
        return refuse(f"{exc}; compact it once its supervisor (or worker) has stopped", exits.BUSY, as_json)
    except StoreError as exc:
        return refuse(str(exc), exits.FAILED, as_json)
    with store:
        if root_id is not None:
            _, refused = one_root(store, location, root_id, terms_for)
            if refused is not None:
                return refused
        workflows = root_ids(store)
        before, lines_before = path.stat().st_size, _line_count(path)
        try:
            store.compact()
        except StoreError as exc:
            return refuse(str(exc), exits.FAILED, as_json)
        after, lines_after = path.stat().st_size, len(store.list())  # one line per promise now
    if as_json:
        _json({"store": str(path), "workflows": workflows, "lines_before": lines_before,
               "lines_after": lines_after, "bytes_before": before, "bytes_after": after})
        return exits.OK
    held = f"{len(workflows)} workflow{'' if len(workflows) == 1 else 's'}"
    print(f"compacted {path}, the store of {held}: {lines_before:,} -> {lines_after:,} lines (one per "
          f"promise), {before:,} -> {after:,} bytes" + ("" if after < before else f" ({NOT_SMALLER})"))
    return exits.OK


NOT_SMALLER = ("not smaller: a promise's creation and settlement become one line that carries both, "
               "so compaction saves only the lines of retried, killed or reopened steps; the file is "
               "valid all the same")


def _line_count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def collect_garbage(location: StoreLocation, *, keep: bool, as_json: bool) -> int:
    """Delete the files the store set aside when it recovered (torn tails, a compaction cut
    short) that predate an open of it made now; with `keep`, only list them."""
    path = _store_file(location, "nothing to collect: PostgreSQL sets no file aside", as_json)
    if not isinstance(path, Path):
        return path
    if keep:
        files = set_aside_files(path)
    else:
        try:
            files = collect_set_aside(path, lock_timeout=LOCK_TIMEOUT_S)
        except StoreLockedError as exc:
            return refuse(f"{exc}; run gc once its supervisor (or worker) has stopped", exits.BUSY, as_json)
        except StoreError as exc:
            return refuse(str(exc), exits.FAILED, as_json)
    if as_json:
        _json({"store": str(path), "kept" if keep else "deleted": [str(f) for f in files]})
        return exits.OK
    for f in files:
        print(f"{'kept' if keep else 'deleted'} {f}")
    if keep:
        print(f"{len(files)} file(s) set aside; `gc` without --keep deletes them")
    else:
        print(f"{len(files)} file(s) deleted")
    return exits.OK


def _store_file(location: StoreLocation, not_a_file: str, as_json: bool) -> Path | int:
    """The JSON-lines file of the location; else the exit status, after saying why there is none."""
    backend, where = parse_store_url(location.url)
    if backend != "jsonl":
        if as_json:
            _json({"store": redact(location.url), "skipped": not_a_file})
        else:
            print(f"{redact(location.url)}: {not_a_file}")
        return exits.OK
    path = Path(where)
    if not path.is_file():
        return refuse(f"{path}: no store there (nothing has run in this state dir)", exits.FAILED, as_json)
    return path


def _json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value).decode() + "\n")
