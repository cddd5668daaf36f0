"""The one place a promise store backend is chosen, from a URL."""

from __future__ import annotations

import os
from typing import Any

from .base import PromiseStore
from .jsonl import JsonlStore
from .memory import MemoryStore


def open_store(url: str | os.PathLike[str], **options: Any) -> PromiseStore:
    """The store a URL names; the one place a backend is chosen.

    - a path, or `jsonl:PATH`: the JSON-lines file (options: exclusive, readonly, durability,
      lock_timeout; see JsonlStore);
    - `memory:`: a new in-memory store (option: lock_timeout);
    - `postgresql://...`: PostgreSQL, for many machines (not built yet: refused clearly).
    """
    text = os.fspath(url)
    scheme, colon, rest = text.partition(":")
    if not colon or len(scheme) == 1 or "/" in scheme or "." in scheme:
        scheme, rest = "jsonl", text  # a plain path (C:... is a drive, a/b:c a path)
    if scheme == "jsonl":
        if not rest:
            raise ValueError("jsonl: needs a path, e.g. jsonl:state/store.jsonl")
        return JsonlStore(rest, **options)
    if scheme == "memory":
        if rest:
            raise ValueError(f"memory: takes no path, not {rest!r}")
        return MemoryStore(**options)
    if scheme in ("postgresql", "postgres"):
        raise ValueError(f"{text}: the PostgreSQL store is not built yet; use a path or memory:")
    raise ValueError(f"{text}: unknown store URL scheme {scheme!r} (use a path, jsonl:PATH or memory:)")
