"""A PostgreSQL store made before cancel requests existed (schema version 1) is brought up to
date when opened: its `cancels` table is made, its promises kept."""

from __future__ import annotations

from pgproc import query

from store import State, open_store


def test_a_version_1_store_gets_its_cancels_table_and_keeps_its_promises(pg_url: str) -> None:
    with open_store(pg_url) as store:
        store.create("old", 1)
        store.resolve("old", "kept")
    query(pg_url, "DROP TABLE cancels")  # as release 1 made it
    query(pg_url, "UPDATE durable_schema SET version = 1 WHERE component = 'store'")
    with open_store(pg_url) as store:
        assert store.get("old").state is State.RESOLVED
        store.request_cancel("old")
        assert store.cancel_requested("old")
    assert query(pg_url, "SELECT version FROM durable_schema WHERE component = 'store'") == [(2,)]
