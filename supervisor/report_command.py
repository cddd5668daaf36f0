"""The `report` command: read an import's store, sink and supervisor events, write its picture.

Reads only: the store is opened read-only, the sink through its read-only connection (SQLite's
`import.db` in the state dir, or the PostgreSQL sink's tables), the events from the state dir
(with `--store`, the state dir the supervisor of `run --store` used, if it is here).
"""

from __future__ import annotations

import sys
from pathlib import Path

from store import StoreError
from store.backends import redact
from workflow.history import read_history, root_ids

from . import exits
from .events import read_events
from .html_report import render
from .import_command import IMPORT_TERMS, SinkError, open_sink_readonly, terms_for
from .location import StoreLocation
from .run_picture import gather


def report_command(root_id: str, page: Path, state_dir: Path, store_url: str | None) -> int:
    """Write the picture of import `root_id` to `page`; one line on stdout or stderr."""
    location = (StoreLocation.in_state_dir(state_dir) if store_url is None
                else StoreLocation.in_database(store_url, state_dir))
    where = redact(location.url)
    try:
        store = location.open_readonly()
    except StoreError as exc:
        return _error(str(exc))
    if store is None:
        return _error(f"{state_dir}: no import has run in this state dir (no store there)")
    with store:
        history = read_history(store, root_id)
        if history is None:
            known = ", ".join(root_ids(store)) or "none"
            return _error(f"{where}: no import {root_id!r} (known: {known})")
        if terms_for(history.root) is not IMPORT_TERMS:
            return _error(f"{where}: {root_id!r} is a workflow run by `exec`, not an import; "
                          "report draws an import's batches")
    try:
        db = open_sink_readonly(state_dir, store_url)
    except SinkError as exc:
        return _error(str(exc))
    try:
        picture = gather(IMPORT_TERMS.units_of(history), IMPORT_TERMS.step_count(history), db,
                         read_events(state_dir, root_id))
    finally:
        db.close()
    try:
        page.write_text(render(picture, where), encoding="utf-8")
    except OSError as exc:
        return _error(f"{page}: cannot write the report ({exc.strerror})")
    t = picture.totals
    print(f"wrote {page}: {t.executions} executions, {t.kills} kills, {t.restarts} restarts")
    return exits.OK


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return exits.FAILED
