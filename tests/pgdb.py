"""A fresh PostgreSQL database per test, made from a template and dropped after.

The server is the one `DURABLE_TEST_PG` names (default: the machine's own, trust auth, as
user postgres). Each test gets `CREATE DATABASE ... TEMPLATE durable_test_template`, which is
a file copy on the server (milliseconds), so `pytest -n auto` runs PostgreSQL tests in parallel
without them seeing each other's rows. The template is an empty database made once per server;
the schemas are made by the code under test on first use, as they would be in production.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

ADMIN_URL = os.environ.get("DURABLE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TEMPLATE = "durable_test_template"
_TEMPLATE_LOCK = 7_240_001  # an advisory lock key: xdist workers make the template once


def _connect() -> psycopg.Connection:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


def _missing(exc: psycopg.OperationalError) -> str:
    why = " ".join(str(exc).split())  # psycopg's message spans lines
    return (f"PostgreSQL does not answer at {ADMIN_URL} ({why}): the tests need a PostgreSQL 15 server "
            "on 127.0.0.1:5432 with trust auth for user postgres, or DURABLE_TEST_PG set to the URL of one")


def _admin() -> psycopg.Connection:
    try:
        return _connect()
    except psycopg.OperationalError as exc:
        pytest.fail(_missing(exc), pytrace=False)


def url_of(database: str) -> str:
    """The admin URL with another database name (a `postgresql://` URL, as the store takes)."""
    return urllib.parse.urlsplit(ADMIN_URL)._replace(path=f"/{database}").geturl()


def _ensure_template(admin: psycopg.Connection) -> None:
    admin.execute("SELECT pg_advisory_lock(%s)", (_TEMPLATE_LOCK,))
    try:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEMPLATE,)).fetchone() is None:
            admin.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        admin.execute("SELECT pg_advisory_unlock(%s)", (_TEMPLATE_LOCK,))


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped (its sessions ended) on exit."""
    name = f"durable_t_{uuid.uuid4().hex[:16]}"
    with _admin() as admin:
        _ensure_template(admin)
        admin.execute("SELECT pg_advisory_lock(%s)", (_TEMPLATE_LOCK,))  # no copy while it is made
        try:
            admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        finally:
            admin.execute("SELECT pg_advisory_unlock(%s)", (_TEMPLATE_LOCK,))
    try:
        yield url_of(name)
    finally:
        with _admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database for this test alone."""
    with fresh_database() as url:
        yield url


if __name__ == "__main__":  # `python tests/pgdb.py`, as .ci/run does: one message, not one per test
    try:
        _connect().close()
    except psycopg.OperationalError as exc:
        sys.exit(f"{sys.argv[0]}: {_missing(exc)}")
