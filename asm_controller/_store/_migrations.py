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
SQLAlchemy Connection); never edit an applied migration. Migration 1 creates the tables as
they were at version 1 with ``create_all``, so once a later migration alters a table, migration 1
must be given a frozen copy of the version-1 definition.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from asm_controller._store._base import MAX_CHARS, MAX_META_KEY, StoreError

metadata = sa.MetaData()


def _s(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(MAX_CHARS[name]), nullable=False, server_default="")


schema_version = sa.Table(
    "asm_schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied_at", sa.Double, nullable=False),
)

meta = sa.Table(
    "asm_meta", metadata,
    sa.Column("key", sa.String(MAX_META_KEY), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

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
    sa.Index("asm_runs_status", "status", "created_at"),
    sa.Index("asm_runs_created", "created_at"),
    sa.Index("asm_runs_ended", "ended_at"),
)

run_events = sa.Table(
    "asm_run_events", metadata,
    # No foreign key: rows are deleted with their run explicitly (prune), the same on both backends.
    sa.Column("run_id", sa.String(MAX_CHARS["run_id"]), primary_key=True),
    sa.Column("last_seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("first_seq", sa.BigInteger, nullable=False),
    sa.Column("nbytes", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),  # one serialized pb.EventBatch
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    op: Callable[[sa.Connection], None]


def _v1(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[meta, runs, run_events])


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, run events, meta", _v1),
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
