"""The one place a promise store backend is chosen, from a URL."""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from .base import PromiseStore
from .jsonl import JsonlStore
from .memory import MemoryStore


def parse_store_url(url: str | os.PathLike[str]) -> tuple[str, str]:
    """`(backend, rest)` of a store URL: ("jsonl", path), ("memory", "") or ("postgresql", url);
    ValueError saying what is wrong with anything else."""
    text = os.fspath(url)
    scheme, colon, rest = text.partition(":")
    if not colon or scheme not in _SCHEMES:
        if colon and scheme.isalpha() and len(scheme) > 1 and "/" not in text.split(":", 1)[0]:
            raise ValueError(f"{text}: unknown store URL scheme {scheme!r} (use a path, jsonl:PATH, "
                             "postgresql://... or memory:; a file name with a ':' can be given as "
                             "jsonl:NAME)")
        return "jsonl", text  # a plain path
    if scheme in ("postgresql", "postgres"):
        if not rest.startswith("//"):
            raise ValueError(f"{text}: a PostgreSQL URL reads postgresql://[user@]host[:port]/database")
        return "postgresql", text
    if scheme == "jsonl" and not rest:
        raise ValueError("jsonl: needs a path, e.g. jsonl:state/store.jsonl")
    if scheme == "memory" and rest:
        raise ValueError(f"memory: takes no path, not {rest!r}")
    return scheme, rest


_SCHEMES = ("jsonl", "memory", "postgresql", "postgres")


def redact(url: str) -> str:
    """A store URL without its password, for messages and reports."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def open_store(url: str | os.PathLike[str], **options: Any) -> PromiseStore:
    """The store a URL names; the one place a backend is chosen.

    - a path, or `jsonl:PATH`: the JSON-lines file (options: exclusive, readonly, durability,
      lock_timeout; see JsonlStore);
    - `memory:`: a new in-memory store (option: lock_timeout);
    - `postgresql://...`: PostgreSQL, for many machines (options: durability, lock_timeout,
      lease_s; `exclusive` and `readonly` mean nothing there: a lease per root workflow
      excludes other drivers, and reading takes no lock).
    """
    backend, rest = parse_store_url(url)
    if backend == "memory":
        return MemoryStore(**options)
    if backend == "postgresql":
        from .pg import PgStore  # psycopg is loaded only by those who use it

        options.pop("exclusive", None)
        options.pop("readonly", None)
        return PgStore(rest, **options)
    return JsonlStore(rest, **options)
