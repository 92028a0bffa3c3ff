"""The store's schema (one SQLAlchemy Core definition for SQLite and PostgreSQL) and its migrations.

``MIGRATIONS`` is an ordered list; the database records each applied version in
``asm_schema_version``. :func:`migrate` applies the missing ones in order, each in its own
transaction together with its version row, under a lock so two processes opening the same
database at once never both migrate (PostgreSQL: a transaction-scoped advisory lock; SQLite:
``BEGIN IMMEDIATE``, the database's write lock). A database at a version newer than the code
knows is refused (``StoreError`` reason ``schema_too_new``): an older asm must not write into a
schema it does not understand.

To change the schema: edit the tables below to the new shape and append a migration that takes
an existing database from the previous version to it (``op(conn)`` gets a synchronous
SQLAlchemy Connection); never edit an applied migration. Migration 1 creates the tables from a
frozen copy of their version-1 definition (``_v1_*``); migration 2 alters them to the current
shape in place (ADD COLUMN, CREATE INDEX, a new table), so a fresh database and an upgraded one
end up the same. Migration 3 creates ``asm_endpoint_leases`` (the inference endpoint's leases).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from asm_controller._store._base import MAX_CHARS, MAX_LEASE_CHARS, MAX_META_KEY, StoreError

metadata = sa.MetaData()


def _s(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(MAX_CHARS[name]), nullable=False, server_default="")


schema_version = sa.Table(
    "asm_schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied_at", sa.Double, nullable=False),
)

# --- the current schema (version 2) ---------------------------------------------------------------

meta = sa.Table(
    "asm_meta", metadata,
    sa.Column("key", sa.String(MAX_META_KEY), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

#: The columns migration 2 adds to asm_runs (each NOT NULL with a default, or nullable, so ALTER TABLE
#: ADD COLUMN works on a table with rows, on SQLite too).
_V2_RUN_COLUMNS = ("priority", "queued_at", "queue_deadline", "prompt", "lease_owner", "lease_token", "lease_expires")

runs = sa.Table(
    "asm_runs", metadata,
    sa.Column("run_id", sa.String(MAX_CHARS["run_id"]), primary_key=True),
    _s("session_id"), _s("provider"), _s("owner"), _s("prompt_digest"),
    sa.Column("spec", sa.Text, nullable=False),  # JSON text (portable; queried by key, never inside)
    _s("node_address"), _s("node_id"), _s("node_epoch"), _s("node_run_id"),
    sa.Column("status", sa.String(MAX_CHARS["status"]), nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("node_seq", sa.BigInteger, nullable=False),
    sa.Column("first_held_seq", sa.BigInteger, nullable=False),
    # Bytes of this run's chunks in asm_run_events: the history bound is checked without a SUM.
    sa.Column("held_bytes", sa.BigInteger, nullable=False, server_default="0"),
    _s("provider_session_id"),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    # Version 2: the fleet queue and the lease.
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("queued_at", sa.Double, nullable=True),
    sa.Column("queue_deadline", sa.Double, nullable=True),
    sa.Column("prompt", sa.Text, nullable=False, server_default=""),  # only while queued
    _s("lease_owner"),
    sa.Column("lease_token", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lease_expires", sa.Double, nullable=False, server_default="0"),
    sa.Index("asm_runs_status", "status", "created_at"),
    sa.Index("asm_runs_created", "created_at"),
    sa.Index("asm_runs_ended", "ended_at"),
    # Version 2.
    sa.Index("asm_runs_queue", "status", "priority", "queued_at"),
    sa.Index("asm_runs_session", "session_id", "created_at"),
    sa.Index("asm_runs_lease", "lease_owner"),
)
_V2_RUN_INDEXES = ("asm_runs_queue", "asm_runs_session", "asm_runs_lease")

run_events = sa.Table(
    "asm_run_events", metadata,
    # No foreign key: rows are deleted with their run explicitly (prune), the same on both backends.
    sa.Column("run_id", sa.String(MAX_CHARS["run_id"]), primary_key=True),
    sa.Column("last_seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("first_seq", sa.BigInteger, nullable=False),
    sa.Column("nbytes", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),  # one serialized pb.EventBatch
)

#: Controller replicas sharing the store (version 2): each heartbeats its row; a row past expires_at is dead.
replicas = sa.Table(
    "asm_replicas", metadata,
    sa.Column("replica_id", sa.String(MAX_CHARS["replica_id"]), primary_key=True),
    sa.Column("address", sa.String(MAX_CHARS["address"]), nullable=False, server_default=""),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("heartbeat_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
)

#: Published inference endpoints (version 3): one row per lease, its token only as a sha256 digest.
endpoint_leases = sa.Table(
    "asm_endpoint_leases", metadata,
    sa.Column("ref", sa.String(MAX_LEASE_CHARS["ref"]), primary_key=True),
    sa.Column("owner", sa.String(MAX_LEASE_CHARS["owner"]), nullable=False),
    sa.Column("provider", sa.String(MAX_LEASE_CHARS["provider"]), nullable=False),
    sa.Column("model", sa.String(MAX_LEASE_CHARS["model"]), nullable=False, server_default=""),
    sa.Column("token_digest", sa.String(MAX_LEASE_CHARS["token_digest"]), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("data", sa.Text, nullable=False),  # JSON text: the rest of the lease
    sa.Index("asm_endpoint_leases_expires", "expires_at"),
)

# --- version 1, frozen: what migration 1 creates (never edit: databases were made from it) ---------

_v1_metadata = sa.MetaData()
_V1_MAX = {"run_id": 128, "session_id": 128, "provider": 64, "owner": 256, "prompt_digest": 71,
           "node_address": 512, "node_id": 128, "node_epoch": 64, "node_run_id": 128, "status": 16,
           "provider_session_id": 256}


def _s1(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(_V1_MAX[name]), nullable=False, server_default="")


_v1_meta = sa.Table(
    "asm_meta", _v1_metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
_v1_runs = sa.Table(
    "asm_runs", _v1_metadata,
    sa.Column("run_id", sa.String(128), primary_key=True),
    _s1("session_id"), _s1("provider"), _s1("owner"), _s1("prompt_digest"),
    sa.Column("spec", sa.Text, nullable=False),
    _s1("node_address"), _s1("node_id"), _s1("node_epoch"), _s1("node_run_id"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("node_seq", sa.BigInteger, nullable=False),
    sa.Column("first_held_seq", sa.BigInteger, nullable=False),
    sa.Column("held_bytes", sa.BigInteger, nullable=False, server_default="0"),
    _s1("provider_session_id"),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.Index("asm_runs_status", "status", "created_at"),
    sa.Index("asm_runs_created", "created_at"),
    sa.Index("asm_runs_ended", "ended_at"),
)
_v1_run_events = sa.Table(
    "asm_run_events", _v1_metadata,
    sa.Column("run_id", sa.String(128), primary_key=True),
    sa.Column("last_seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("first_seq", sa.BigInteger, nullable=False),
    sa.Column("nbytes", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    op: Callable[[sa.Connection], None]


def _v1(conn: sa.Connection) -> None:
    _v1_metadata.create_all(conn, tables=[_v1_meta, _v1_runs, _v1_run_events])


def _v2(conn: sa.Connection) -> None:
    """asm_runs gains the queue and lease columns and their indexes; asm_replicas is new. In place: the
    existing rows keep their values and get the new columns' defaults (no lease, priority 0)."""
    for name in _V2_RUN_COLUMNS:
        column = sa.schema.CreateColumn(runs.c[name]).compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE asm_runs ADD COLUMN {column}"))
    for index in runs.indexes:
        if index.name in _V2_RUN_INDEXES:
            index.create(conn)
    replicas.create(conn)


def _v3(conn: sa.Connection) -> None:
    """asm_endpoint_leases is new (the table and its expiry index)."""
    endpoint_leases.create(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, run events, meta", _v1),
    Migration(2, "fleet queue and lease columns, replicas, history indexes", _v2),
    Migration(3, "inference endpoint leases", _v3),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

#: pg_advisory_xact_lock key of the migration lock (any constant shared by every asm).
PG_MIGRATION_LOCK = 0x61736D5F73746F72  # "asm_stor"


def current_version(conn: sa.Connection) -> int:
    value = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(value or 0)


def migrate_step(conn: sa.Connection, migrations: Sequence[Migration], url: str) -> bool:
    """Inside a locked transaction: apply the next missing migration; False when none is missing."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
    metadata.create_all(conn, tables=[schema_version])  # CREATE TABLE IF NOT EXISTS, under the lock
    have = current_version(conn)
    known = migrations[-1].version if migrations else 0
    if have > known:
        raise StoreError(
            f"the run store {url} is at schema version {have}, newer than this asm knows ({known}): "
            "it was migrated by a newer asm; upgrade this one (or point --state at another database)",
            reason="schema_too_new")
    pending = [m for m in migrations if m.version > have]
    if not pending:
        return False
    step = pending[0]
    step.op(conn)
    conn.execute(sa.insert(schema_version).values(
        version=step.version, description=step.description, applied_at=time.time()))
    return True
