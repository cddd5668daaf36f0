"""The one place a promise store backend is chosen, from a URL."""

from __future__ import annotations

import os
from typing import Any

from .base import PromiseStore
from .jsonl import JsonlStore
from .memory import MemoryStore


def parse_store_url(url: str | os.PathLike[str]) -> tuple[str, str]:
    """`(backend, rest)` of a store URL: ("jsonl", path) or ("memory", ""); ValueError saying
    what is wrong with anything else."""
    text = os.fspath(url)
    scheme, colon, rest = text.partition(":")
    if not colon or scheme not in _SCHEMES:
        if colon and scheme.isalpha() and len(scheme) > 1 and "/" not in text.split(":", 1)[0]:
            raise ValueError(f"{text}: unknown store URL scheme {scheme!r} (use a path, jsonl:PATH "
                             "or memory:; a file name with a ':' can be given as jsonl:NAME)")
        return "jsonl", text  # a plain path
    if scheme in ("postgresql", "postgres"):
        raise ValueError(f"{text}: the PostgreSQL store is not built yet; use a path or jsonl:PATH")
    if scheme == "jsonl" and not rest:
        raise ValueError("jsonl: needs a path, e.g. jsonl:state/store.jsonl")
    if scheme == "memory" and rest:
        raise ValueError(f"memory: takes no path, not {rest!r}")
    return scheme, rest


_SCHEMES = ("jsonl", "memory", "postgresql", "postgres")


def open_store(url: str | os.PathLike[str], **options: Any) -> PromiseStore:
    """The store a URL names; the one place a backend is chosen.

    - a path, or `jsonl:PATH`: the JSON-lines file (options: exclusive, readonly, durability,
      lock_timeout; see JsonlStore);
    - `memory:`: a new in-memory store (option: lock_timeout);
    - `postgresql://...`: PostgreSQL, for many machines (not built yet: refused clearly).
    """
    backend, rest = parse_store_url(url)
    if backend == "memory":
        return MemoryStore(**options)
    return JsonlStore(rest, **options)
