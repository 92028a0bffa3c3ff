"""The controller's durable run store: the run registry and its event log (issue 10, item 2).

    store = open_store("sqlite:////var/lib/asm/controller.sqlite3")   # or memory:, postgresql://...
    await store.open()                                                # connects, migrates
    await store.create(RunRecord(run_id, session_id, "claude", prompt_digest=digest, ...))
    writer = StoreWriter(store)                                       # write-behind for the hot path
    await writer.submit_events(run_id, first_seq, last_seq, batch.SerializeToString())
    writer.submit_update(run_id, status="completed", ended_at=time.time(), result={...})
    await writer.close(); await store.close()

Replicas (schema version 2, PostgreSQL): each live run (``LIVE``: queued, pending, running) is
owned by one replica through a lease in its row (``take_lease`` is a compare-and-set; writes
fenced with the ``Lease`` fail ``LeaseLost`` once another replica took it over); replicas register
in ``asm_replicas`` (``heartbeat_replica``); queued runs wait in ``queued()`` order (priority, then
FIFO); ``list_runs`` / ``sessions`` answer the history with keyset paging.

Inference endpoint leases (schema version 3): ``put/get/delete_endpoint_lease`` and
``expired_endpoint_leases`` keep ASM's published endpoints (``EndpointLeaseRecord``; the token only
as its sha256 digest), so every replica serves every lease and a restart keeps them.

Layout: ``_base`` (RunRecord, Lease, errors, the RunStore protocol, input checks), ``_memory``
(MemoryStore), ``_sql`` (SqlStore: SQLite and PostgreSQL through SQLAlchemy Core async),
``_migrations`` (the schema and its versioned migrations), ``_writer`` (StoreWriter), ``_url``
(open_store).

SQLAlchemy and the drivers are imported when a SQL store is first opened (``open_store`` of a
sqlite/postgresql URL, or ``SqlStore`` / ``SCHEMA_VERSION`` read from here): ``import
asm_controller`` stays fast for the CLI and the library's in-memory default.
"""

from typing import TYPE_CHECKING, Any

from asm_controller._store._base import (
    DEFAULT_HISTORY_MAX_BYTES,
    IN_FLIGHT,
    LIVE,
    QUEUED,
    STATUSES,
    STORE_OPS,
    EndpointLeaseRecord,
    InvalidRecord,
    Lease,
    LeaseLost,
    ReplicaRecord,
    RunExists,
    RunRecord,
    RunStore,
    SessionRecord,
    StoreError,
    StoreLocked,
)
from asm_controller._store._memory import MemoryStore
from asm_controller._store._url import URL_FORMS, open_store
from asm_controller._store._writer import StoreWriter
from asm_wire import RunNotFound

if TYPE_CHECKING:
    from asm_controller._store._migrations import SCHEMA_VERSION
    from asm_controller._store._sql import SqlStore


def __getattr__(name: str) -> Any:
    if name == "SqlStore":
        from asm_controller._store._sql import SqlStore
        return SqlStore
    if name == "SCHEMA_VERSION":
        from asm_controller._store._migrations import SCHEMA_VERSION
        return SCHEMA_VERSION
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_HISTORY_MAX_BYTES", "IN_FLIGHT", "LIVE", "QUEUED", "SCHEMA_VERSION", "STATUSES", "STORE_OPS", "URL_FORMS",
    "EndpointLeaseRecord", "InvalidRecord", "Lease", "LeaseLost", "MemoryStore", "ReplicaRecord", "RunExists", "RunNotFound", "RunRecord",
    "RunStore", "SessionRecord", "SqlStore", "StoreError", "StoreLocked", "StoreWriter", "open_store",
]
