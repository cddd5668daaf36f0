"""`status` (read-only view of an import) and `retry` (reopen a failed import's rejected steps)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

from store import JsonlStore, Promise, State, StoreError, StoreLockedError
from workflow.importer import SourceError, batch_index, plan_batches
from workflow.importer.worker import STORE_FILE

from . import exits


def show_status(state_dir: Path, root_id: str, *, as_json: bool) -> int:
    store_path = state_dir / STORE_FILE
    if not store_path.exists():
        print(f"error: {store_path}: no import has run in this state dir", file=sys.stderr)
        return exits.FAILED
    try:
        store = JsonlStore(store_path, readonly=True)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exits.FAILED
    with store:
        root = store.get(root_id)
        if root is None:
            known = [p.id for p in store.list() if "." not in p.id]
            print(f"error: {store_path}: no import {root_id!r} (known: {', '.join(known) or 'none'})",
                  file=sys.stderr)
            return exits.FAILED
        status = _status(root, _batches(store, root_id))
    if as_json:
        sys.stdout.write(orjson.dumps(status).decode() + "\n")
    else:
        print(_as_text(status))
    return 0


def retry_failed(state_dir: Path, root_id: str, *, as_json: bool) -> int:
    """Reopen a rejected import and its rejected steps; resolved batches stay final."""
    try:
        store = JsonlStore(state_dir / STORE_FILE, exclusive=True, lock_timeout=1.0)
    except StoreLockedError as exc:
        print(f"error: {exc}; stop the running import first", file=sys.stderr)
        return exits.BUSY
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exits.FAILED
    with store:
        root = store.get(root_id)
        if root is None or root.state is not State.REJECTED:
            state = "missing" if root is None else root.state.value
            print(f"error: import {root_id} is {state}; only a failed import can be retried",
                  file=sys.stderr)
            return exits.FAILED
        rejected = [p for p in store.list(root_id + ".") if p.state is State.REJECTED]
        for promise in [*rejected, root]:
            store.reopen(promise.id, "operator retry")
    reopened = [p.id for p in rejected]
    if as_json:
        sys.stdout.write(orjson.dumps({"id": root_id, "reopened": [*reopened, root_id]}).decode() + "\n")
    else:
        for p in rejected:
            print(f"reopened {p.id} (was: {p.error.get('type')}: {p.error.get('message')})")
        print(f"reopened {root_id}; run the same `python -m supervisor run` command to resume it")
    return 0


def _batches(store: JsonlStore, root_id: str) -> list[Promise]:
    return [p for p in store.list(root_id + ".") if batch_index(root_id, p.id) is not None]


def _status(root: Promise, batches: list[Promise]) -> dict[str, Any]:
    source, batch_size = root.param["args"][:2]
    try:
        batch_count: int | None = len(plan_batches(source, batch_size))
    except (SourceError, KeyError, TypeError):
        batch_count = None
    pending = next((p for p in batches if p.state is State.PENDING), None)
    errors = [p.error for p in [*batches, root] if p.error]
    return {
        "id": root.id,
        "state": root.state.value,
        "batches_done": sum(p.state is State.RESOLVED for p in batches),
        "batch_count": batch_count,
        "batches_failed": sum(p.state is State.REJECTED for p in batches),
        "pending_batch": None if pending is None else {
            "id": pending.id, "attempts": pending.attempts,
        },
        "attempts": sum(p.attempts for p in batches),
        "last_error": None if not errors else f"{errors[-1].get('type')}: {errors[-1].get('message')}",
        "result": None if root.state is not State.RESOLVED else {
            k: v for k, v in root.value.items() if k != "batches"
        },
    }


def _as_text(s: dict[str, Any]) -> str:
    total = "?" if s["batch_count"] is None else s["batch_count"]
    lines = [f"{s['id']}: {s['state']}, {s['batches_done']}/{total} batches done, "
             f"{s['attempts']} batch attempts in all"]
    if s["pending_batch"]:
        p = s["pending_batch"]
        lines.append(f"  pending: {p['id']} ({p['attempts']} attempt(s) started)")
    if s["batches_failed"]:
        lines.append(f"  failed batches: {s['batches_failed']}")
    if s["last_error"]:
        lines.append(f"  last error: {s['last_error']}")
    if s["result"]:
        r = s["result"]
        lines.append(f"  result: {r['total_records']} records, {r['total_processed']} imported, "
                     f"{r['total_skipped']} skipped")
    return "\n".join(lines)
