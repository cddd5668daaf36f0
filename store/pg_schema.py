"""The PostgreSQL store's tables, made on first use and versioned.

A promise is a `promises` row (its creation and attempts) and, once settled, a `settles` row
(its outcome); the view `promise_states` joins them for people and tools.

`durable_schema` keeps one version per component (this store's is "store"; the import's sink
keeps its own row). Opening a database made by a newer version is refused rather than guessed
at; an older one is brought up to date by the steps in MIGRATIONS, in one transaction.

Ids are `COLLATE "C"`: compared byte by byte, so the primary key's order is the order of id
prefixes and `list(prefix)` is a range scan of it.
"""

from __future__ import annotations

import psycopg

from .errors import StoreError

SCHEMA_VERSION = 2
_SCHEMA_LOCK = 7_240_100  # pg_advisory_xact_lock key: one process makes or migrates the schema

# An operator's request to cancel a root workflow; its driver looks for it between steps.
_CANCELS = """
CREATE TABLE IF NOT EXISTS cancels (
    root text COLLATE "C" PRIMARY KEY,
    requested_at timestamptz NOT NULL DEFAULT now()
);
"""

CREATE = """
CREATE TABLE IF NOT EXISTS durable_schema (
    component text PRIMARY KEY,
    version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS promises (
    seq bigint GENERATED ALWAYS AS IDENTITY,          -- creation order (sorted, not indexed)
    id text COLLATE "C" PRIMARY KEY,
    param jsonb NOT NULL,                              -- JSON null for a None param
    attempts integer NOT NULL DEFAULT 0,
    attempts_at_reopen integer NOT NULL DEFAULT 0,
    created_at double precision NOT NULL,
    reopened jsonb NOT NULL DEFAULT '[]'               -- each reopen: the error it cleared, why, when
);
-- A promise's outcome, once settled: a row inserted, never updated (an insert commits faster
-- than an update), deleted only by a reopen (which keeps its error in promises.reopened).
CREATE TABLE IF NOT EXISTS settles (
    id text COLLATE "C" PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('resolved', 'rejected')),
    value jsonb,
    error jsonb,
    settled_at double precision NOT NULL
);
CREATE OR REPLACE VIEW promise_states AS
    SELECT p.id, p.param, coalesce(s.state, 'pending') AS state, s.value, s.error, p.attempts,
           p.attempts_at_reopen, p.created_at, s.settled_at, p.seq
    FROM promises p LEFT JOIN settles s ON s.id = p.id;
-- The driver of each root workflow: whoever holds an unexpired lease; every takeover bumps epoch.
CREATE TABLE IF NOT EXISTS leases (
    root text COLLATE "C" PRIMARY KEY,
    owner text NOT NULL,
    epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
-- Steps a fleet of executors claims (FOR UPDATE SKIP LOCKED); `claim` fences the claimer.
CREATE TABLE IF NOT EXISTS tasks (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    promise_id text COLLATE "C" PRIMARY KEY REFERENCES promises (id),
    root text COLLATE "C" NOT NULL,
    spec jsonb NOT NULL,
    state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'claimed', 'done')),
    not_before timestamptz NOT NULL DEFAULT now(),
    claim bigint NOT NULL DEFAULT 0,
    claimed_by text,
    claim_expires_at timestamptz,
    claim_backend integer,                -- the server process of the claim's step transaction,
    claim_backend_start timestamptz,      -- ended by the next claimer if the claim expires
    last_error jsonb
);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks (root, seq) WHERE state <> 'done';
-- What a participant joining a root workflow needs to run it: its application and arguments.
CREATE TABLE IF NOT EXISTS workflows (
    root text COLLATE "C" PRIMARY KEY,
    spec jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
""" + _CANCELS

# version -> the statements that bring a database of version-1 to it.
MIGRATIONS: dict[int, str] = {2: _CANCELS}


def ensure_schema(conn: psycopg.Connection, where: str) -> None:
    """Make the tables, or bring them up to date, unless they already are (no lock then)."""
    if _version(conn) == SCHEMA_VERSION:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        version = _version(conn)
        if version is None:
            conn.execute(CREATE)
            conn.execute(
                "INSERT INTO durable_schema VALUES ('store', %s) ON CONFLICT (component) DO NOTHING",
                (SCHEMA_VERSION,),
            )
            return
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{where}: the store's tables are version {version}, made by a newer release "
                f"than this one (version {SCHEMA_VERSION}); upgrade durable-import"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[step])
        conn.execute("UPDATE durable_schema SET version = %s WHERE component = 'store'", (SCHEMA_VERSION,))


def _version(conn: psycopg.Connection) -> int | None:
    if conn.execute("SELECT to_regclass('durable_schema')").fetchone()[0] is None:
        return None
    row = conn.execute("SELECT version FROM durable_schema WHERE component = 'store'").fetchone()
    return None if row is None else row[0]
