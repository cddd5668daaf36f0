"""The PostgreSQL rows of scripts/bench.py: a durable step of ours and of DBOS 3.4, each on a fresh
database of one server, next to that server's floor (a bare INSERT, committed).

Every database is made for one measurement and dropped after (its sessions ended), through the
admin URL given (`--pg`): a run leaves nothing behind on the server.
"""

from __future__ import annotations

import os
import statistics
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import bench_dbos
import psycopg

from store import open_store
from workflow import Runner

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
FLOOR_RUNS = 5
WARM_UP_STEPS = 10  # as the DBOS peer: schemas made and code paths warm before the clock starts


def database_prefix() -> str:
    """The names of this process's databases begin so: whoever finds one left knows its maker."""
    return f"durable_bench_{os.getpid()}_"


def server_version(url: str) -> str:
    """The server's version; psycopg.OperationalError when it does not answer."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """The URL of a new, empty database on the server of `url` (an admin URL), dropped on exit."""
    name = database_prefix() + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urllib.parse.urlsplit(url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pg_floor_ms(url: str, n: int) -> float:
    """ms per commit of a bare INSERT of a 200-byte row into a scratch table, in autocommit: one
    round trip and one WAL flush each. The median of a few runs of n/runs commits."""
    per_run = max(1, n // FLOOR_RUNS)
    row = "x" * 200
    samples = []
    with fresh_database(url) as db, psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE scratch (body text NOT NULL)")
        for _ in range(FLOOR_RUNS):
            start = time.perf_counter()
            for _ in range(per_run):
                conn.execute("INSERT INTO scratch (body) VALUES (%s)", (row,))
            samples.append((time.perf_counter() - start) / per_run * 1e3)
    return statistics.median(samples)


def ours_pg_step_ms(url: str, n: int, workflow: Callable[[Any, int], Any]) -> float:
    """ms per step of `workflow` (n trivial steps: bench.py's `steps`) run by our engine with a
    PostgreSQL store on a fresh database."""
    with fresh_database(url) as db, open_store(db) as store:
        runner = Runner(store)
        runner.run("warmup", workflow, WARM_UP_STEPS)
        start = time.perf_counter()
        runner.run("bench", workflow, n)
        return (time.perf_counter() - start) / n * 1e3


def dbos_step_ms(url: str, n: int) -> float | None:
    """ms per step of the same workflow on DBOS with a fresh database as its system database;
    None without DBOS."""
    if not bench_dbos.installed():
        return None
    with fresh_database(url) as db:
        return bench_dbos.us_per_step(db, n) / 1e3
