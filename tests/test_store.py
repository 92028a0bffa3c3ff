"""The controller's run store: one contract suite over memory, SQLite and a real PostgreSQL cluster.

PostgreSQL runs as a throwaway cluster (tests/support/pg_server.py), each test in a database of its own;
its tests skip only when the binaries are missing (scripts/install_postgres.sh installs them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from asm_controller import (
    IN_FLIGHT,
    ConfigError,
    InvalidRecord,
    RunExists,
    RunNotFound,
    RunRecord,
    RunStore,
    StoreError,
    StoreWriter,
    open_store,
)
from asm_controller._store import LIVE, QUEUED, STATUSES
from asm_controller._store._migrations import MIGRATIONS, SCHEMA_VERSION, Migration
from asm_controller._store._sql import SqlStore
from asm_wire import AsmError
from tests.support.pg_server import PASSWORD, PostgresServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "memory":
        return "memory:"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'controller.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("pg")
    return server.create_database()


PG = pytest.param("postgresql", marks=pytest.mark.postgres)
ALL = pytest.mark.parametrize("backend_url", ["memory", "sqlite", PG], indirect=True)
DURABLE = pytest.mark.parametrize("backend_url", ["sqlite", PG], indirect=True)

StoreFactory = Callable[..., Awaitable[RunStore]]


@pytest.fixture
async def make_store(backend_url: str) -> AsyncIterator[StoreFactory]:
    """Opened stores on this test's database (each a separate pool), all closed at the end."""
    opened: list[RunStore] = []

    async def make(**kwargs: Any) -> RunStore:
        store = open_store(backend_url, **kwargs)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> RunStore:
    return await make_store()


async def raw_sql(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """SQL on the store's database through an engine of the test's own (not the store's)."""
    if url.startswith("sqlite:///"):
        sa_url = "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    else:
        sa_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(sa_url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(sa.text(sql), params)
            return [tuple(row) for row in result.all()] if result.returns_rows else []
    finally:
        await engine.dispose()


def digest(prompt: str) -> str:
    return "sha256:" + hashlib.sha256(prompt.encode()).hexdigest()


def record(run_id: str, **fields: Any) -> RunRecord:
    return RunRecord(run_id=run_id, session_id=fields.pop("session_id", "sess-1"),
                     provider=fields.pop("provider", "shell"), **fields)


# --- records -------------------------------------------------------------------------------------


@ALL
async def test_create_and_get_round_trip_every_field(store: RunStore) -> None:
    full = RunRecord(
        run_id="01RUNFULL", session_id="sess-9", provider="claude", owner="alice@example",
        prompt_digest=digest("fix the bug"), spec={"cwd": "/w", "permission_mode": "plan", "options": {"n": [1, 2]}},
        node_address="127.0.0.1:7070", node_id="node-a", node_epoch="E1", node_run_id="01NODE",
        status="running", last_seq=0, node_seq=7, first_held_seq=1, provider_session_id="prov-1",
        created_at=1000.5, updated_at=1001.25, ended_at=None, result=None,
        priority=-7, queued_at=999.5, queue_deadline=2000.0, prompt="fix the bug\n\u00e9\U0001f600",
        lease_owner="replica-a", lease_token=41, lease_expires=1010.75,
    )
    await store.create(full)
    assert await store.get("01RUNFULL") == full
    assert {f.name for f in dataclasses.fields(RunRecord)} >= {"priority", "queued_at", "queue_deadline", "prompt",
                                                                "lease_owner", "lease_token", "lease_expires"}
    before = time.time()
    await store.create(record("01RUNNOW"))
    got = await store.get("01RUNNOW")
    assert got is not None and before <= got.created_at <= time.time() and got.updated_at == got.created_at
    assert got.status == "pending" and got.spec == {} and got.result is None and got.first_held_seq == 1
    assert await store.get("NOPE") is None
    got.spec["mutated"] = True  # a read is a copy
    assert (await store.get("01RUNNOW")).spec == {}  # type: ignore[union-attr]


@ALL
async def test_create_twice_is_run_exists_and_keeps_the_first(store: RunStore) -> None:
    await store.create(record("R1", owner="alice"))
    with pytest.raises(RunExists) as info:
        await store.create(record("R1", owner="mallory", session_id="other"))
    assert info.value.kind == "config_invalid" and info.value.reason == "run_exists" and "R1" in info.value.message
    kept = await store.get("R1")
    assert kept is not None and kept.owner == "alice" and kept.session_id == "sess-1"


@ALL
async def test_update_sets_fields_and_updated_at(store: RunStore) -> None:
    await store.create(record("R1", created_at=100.0))
    await store.update("R1", status="completed", ended_at=200.0, result={"exit": 0, "text": "ok"},
                       node_seq=42, provider_session_id="p-9")
    got = await store.get("R1")
    assert got is not None
    assert (got.status, got.ended_at, got.result, got.node_seq, got.provider_session_id) == (
        "completed", 200.0, {"exit": 0, "text": "ok"}, 42, "p-9")
    assert got.updated_at > 1e9 and got.created_at == 100.0
    with pytest.raises(TypeError, match="no_such_field"):
        await store.update("R1", no_such_field=1)
    with pytest.raises(TypeError):
        fields: dict[str, Any] = {"run_id": "R2"}
        await store.update("R1", **fields)
    with pytest.raises(RunNotFound) as info:
        await store.update("R404", status="failed")
    assert (info.value.kind, info.value.reason) == ("not_found", "run_not_found")
    with pytest.raises(InvalidRecord, match="status"):
        await store.update("R1", status="exploded")
    assert (await store.get("R1")).status == "completed"  # type: ignore[union-attr]


@ALL
async def test_list_runs_filters_orders_newest_first_and_limits(store: RunStore) -> None:
    specs = [("A", 10.0, "alice", "completed"), ("B", 20.0, "bob", "running"), ("C", 30.0, "alice", "running"),
             ("D", 40.0, "alice", "failed"), ("E", 40.0, "bob", "pending")]
    for run_id, created, owner, status in specs:
        await store.create(record(run_id, created_at=created, owner=owner, status=status))
    assert [r.run_id for r in await store.list_runs()] == ["E", "D", "C", "B", "A"]  # ties: run_id desc
    assert [r.run_id for r in await store.list_runs(owner="alice")] == ["D", "C", "A"]
    assert [r.run_id for r in await store.list_runs(status="running")] == ["C", "B"]
    assert [r.run_id for r in await store.list_runs(status="running", owner="bob")] == ["B"]
    assert [r.run_id for r in await store.list_runs(limit=2)] == ["E", "D"]
    assert await store.list_runs(limit=0) == []
    assert await store.list_runs(owner="nobody") == []
    with pytest.raises(InvalidRecord):
        await store.list_runs(limit=-1)
    assert [r.run_id for r in await store.in_flight()] == ["B", "C", "E"]  # oldest first
    assert set(IN_FLIGHT) == {"pending", "running"}
    await store.create(record("Q", created_at=50.0, status="queued"))
    assert [r.run_id for r in await store.in_flight()] == ["B", "C", "E"]  # a queued run is on no node
    assert [r.run_id for r in await store.list_runs(status="queued")] == ["Q"]
    assert set(LIVE) == {QUEUED, *IN_FLIGHT} and set(STATUSES) == {*LIVE, "completed", "failed", "interrupted"}


@ALL
async def test_meta_key_values(store: RunStore) -> None:
    assert await store.meta_get("epoch") is None
    await store.meta_set("epoch", "E1")
    await store.meta_set("other", "x")
    await store.meta_set("epoch", "E2")
    assert (await store.meta_get("epoch"), await store.meta_get("other")) == ("E2", "x")
    with pytest.raises(InvalidRecord):
        await store.meta_set("", "x")
    with pytest.raises(InvalidRecord):
        await store.meta_set("k" * 129, "x")


@ALL
async def test_bad_input_is_typed_and_writes_nothing(store: RunStore) -> None:
    bad: list[RunRecord] = [
        record("R" * 129),
        record(""),
        record("R1", session_id="s" * 200),
        record("R1", spec={"when": {1, 2}}),  # a set is not JSON
        record("R1", spec={"x": float("nan")}),
        record("R1", spec={"env": {"TOKEN": "secret"}}),
        record("R1", result={"b": b"bytes"}),
        record("R1", prompt_digest="fix the bug"),  # the prompt itself, not its digest
        record("R1", owner="a\x00b"),
        record("R1", status="weird"),
        record("R1", last_seq=-1),
        record("R1", node_seq=True),
        record("R1", created_at=float("inf")),
    ]
    for rec in bad:
        with pytest.raises(InvalidRecord) as info:
            await store.create(rec)
        assert isinstance(info.value, ConfigError) and info.value.reason == "invalid_record", rec
    assert await store.list_runs() == []
    await store.create(record("R1"))
    with pytest.raises(InvalidRecord):
        await store.update("R1", spec={"f": object()})
    with pytest.raises(InvalidRecord):
        await store.append_events("R1", 5, 4, b"x")
    with pytest.raises(InvalidRecord):
        await store.append_events("R1", 1, 2, "not bytes")  # type: ignore[arg-type]
    assert await store.get("R1") == (await store.list_runs())[0]


# --- events --------------------------------------------------------------------------------------


@ALL
async def test_events_append_and_read_after_a_cursor(store: RunStore) -> None:
    await store.create(record("R1"))
    await store.create(record("R2"))
    chunks = [(1, 3, b"a" * 10), (4, 4, b"b"), (5, 9, b"\x00c" * 7)]
    for first, last, data in chunks:
        await store.append_events("R1", first, last, data)
    await store.append_events("R2", 1, 1, b"other run")
    assert await store.events_after("R1", 0) == chunks
    assert await store.events_after("R1", 3) == chunks[1:]
    assert await store.events_after("R1", 2) == chunks  # a chunk holding seqs after the cursor is included
    assert await store.events_after("R1", 9) == []
    assert await store.events_after("NOPE", 0) == []
    assert (await store.get("R1")).last_seq == 9  # type: ignore[union-attr]
    await store.append_events("R1", 4, 4, b"b")  # a retried write of held seqs: idempotent
    await store.append_events("R1", 12, 15, b"gap ok")  # the node's seqs may skip
    with pytest.raises(InvalidRecord, match="overlaps"):
        await store.append_events("R1", 14, 20, b"overlap")
    with pytest.raises(RunNotFound):
        await store.append_events("NOPE", 1, 1, b"x")
    assert [c[:2] for c in await store.events_after("R1", 0)] == [(1, 3), (4, 4), (5, 9), (12, 15)]
    assert (await store.get("R1")).last_seq == 15  # type: ignore[union-attr]


@ALL
async def test_history_bound_drops_oldest_chunks_and_advances_first_held_seq(make_store: StoreFactory) -> None:
    store = await make_store(history_max_bytes=1000)
    await store.create(record("R1"))
    for i in range(50):  # 50 chunks of 100 bytes, seqs 10*i+1 .. 10*i+10
        await store.append_events("R1", 10 * i + 1, 10 * i + 10, bytes([i]) * 100)
    held = await store.events_after("R1", 0)
    assert sum(len(data) for *_, data in held) == 1000
    assert [c[0] for c in held] == [10 * i + 1 for i in range(40, 50)]
    assert held[0][2] == bytes([40]) * 100
    got = await store.get("R1")
    assert got is not None and got.first_held_seq == 401 and got.last_seq == 500
    await store.append_events("R1", 501, 600, b"z" * 1001)  # bigger than the bound on its own
    got = await store.get("R1")
    assert got is not None and got.first_held_seq == 601 and got.last_seq == 600
    assert await store.events_after("R1", 0) == []
    await store.append_events("R1", 601, 601, b"y" * 10)
    assert await store.events_after("R1", 0) == [(601, 601, b"y" * 10)]


@ALL
async def test_prune_deletes_old_ended_runs_and_their_events(store: RunStore) -> None:
    now = time.time()
    await store.create(record("OLD", status="completed", ended_at=now - 1000))
    await store.create(record("OLD2", status="failed", ended_at=now - 500))
    await store.create(record("NEW", status="completed", ended_at=now - 1))
    await store.create(record("LIVE", status="running", created_at=now - 5000))
    for run_id in ("OLD", "NEW", "LIVE"):
        await store.append_events(run_id, 1, 1, b"x")
    assert await store.prune(now - 100) == 2
    assert {r.run_id for r in await store.list_runs()} == {"NEW", "LIVE"}
    assert await store.events_after("OLD", 0) == []
    assert await store.events_after("NEW", 0) == [(1, 1, b"x")]
    assert await store.prune(now - 100) == 0
    await store.create(record("OLD"))  # the id is free again only because its record is gone
    assert (await store.get("OLD")).status == "pending"  # type: ignore[union-attr]


# --- migrations ----------------------------------------------------------------------------------


@DURABLE
async def test_fresh_database_is_at_current_version_and_reopen_is_a_no_op(
        backend_url: str, make_store: StoreFactory) -> None:
    store = await make_store()
    versions = await raw_sql(backend_url, "SELECT version, applied_at FROM asm_schema_version ORDER BY version")
    assert [v for v, _ in versions] == [m.version for m in MIGRATIONS] and versions[-1][0] == SCHEMA_VERSION
    await store.create(record("R1"))
    await store.close()
    again = await make_store()
    assert await raw_sql(backend_url, "SELECT version, applied_at FROM asm_schema_version ORDER BY version") == versions
    assert (await again.get("R1")) is not None


async def test_a_new_sqlite_file_gets_the_stores_page_size_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """A relayed stream's blobs are written with fewer, larger pages (SQLITE_PAGE_SIZE) in a new file; a
    file made before (SQLite's default 4 KiB pages, WAL) opens, keeps its pages and takes writes."""
    from asm_controller._store._sql import SQLITE_PAGE_SIZE

    new = tmp_path / "new.sqlite3"
    store = open_store(f"sqlite:///{new}")
    await store.open()
    await store.create(record("R1"))
    await store.append_events("R1", 1, 1, b"x" * 100_000)
    await store.close()
    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")  # the file is no longer empty: its page size is fixed
    store = open_store(f"sqlite:///{old}")
    await store.open()
    await store.create(record("R2"))
    await store.append_events("R2", 1, 1, b"y" * 100_000)
    assert [c[2] for c in await store.events_after("R2", 0)] == [b"y" * 100_000]
    await store.close()
    pages = {}
    for path in (new, old):
        with sqlite3.connect(path) as conn:
            pages[path.name] = conn.execute("PRAGMA page_size").fetchone()[0]
    assert SQLITE_PAGE_SIZE != 4096
    assert pages == {"new.sqlite3": SQLITE_PAGE_SIZE, "old.sqlite3": 4096}


async def test_a_read_does_not_wait_behind_a_write_that_waits_for_the_sqlite_lock(tmp_path: Path) -> None:
    """SQLite's hot path reads and writes on threads of their own: while another connection holds the
    write lock (a write of the store waits for it, up to its busy timeout), a get still answers at once
    (WAL readers are not blocked), and the write lands once the lock is free."""
    path = tmp_path / "s.sqlite3"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        await store.create(record("R1"))
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as a long transaction elsewhere would hold it
        try:
            write = asyncio.ensure_future(store.update("R1", node_seq=5))
            await asyncio.sleep(0.2)
            assert not write.done()  # waiting for the lock
            rec = await asyncio.wait_for(store.get("R1"), 2.0)
            assert rec is not None and rec.node_seq == 0
        finally:
            holder.execute("COMMIT")
            holder.close()
        await asyncio.wait_for(write, 5.0)
        rec = await store.get("R1")
        assert rec is not None and rec.node_seq == 5
    finally:
        await store.close()


@DURABLE
async def test_database_newer_than_the_code_is_refused(backend_url: str, make_store: StoreFactory) -> None:
    store = await make_store()
    await store.create(record("R1"))
    await store.close()
    await raw_sql(backend_url, "INSERT INTO asm_schema_version (version, description, applied_at) "
                               "VALUES (:v, 'from the future', 0)", v=SCHEMA_VERSION + 1)
    with pytest.raises(StoreError) as info:
        await make_store()
    assert info.value.reason == "schema_too_new"
    assert f"version {SCHEMA_VERSION + 1}" in info.value.message and "upgrade" in info.value.message
    assert await raw_sql(backend_url, "SELECT run_id FROM asm_runs") == [("R1",)]


_MIGRATE_SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    import sqlalchemy as sa
    from asm_controller import open_store
    from asm_controller._store._migrations import MIGRATIONS, SCHEMA_VERSION, Migration

    def v2(conn):
        # Not idempotent: applied twice, the second CREATE fails.
        conn.execute(sa.text("CREATE TABLE asm_test_once (x INTEGER)"))
        conn.execute(sa.text("INSERT INTO asm_test_once VALUES (1)"))
        time.sleep(0.4)  # hold the migration lock while the other process tries to migrate

    async def main():
        store = open_store(sys.argv[1])
        store._migrations = (*MIGRATIONS, Migration(MIGRATIONS[-1].version + 1, "test", v2))
        await store.open()
        await store.close()
        print("migrated", flush=True)

    asyncio.run(main())
""")


@pytest.mark.slow
@DURABLE
async def test_two_processes_opening_at_once_migrate_once(backend_url: str, make_store: StoreFactory) -> None:
    await (await make_store()).close()  # at version 1: both processes will want to apply version 2
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", _MIGRATE_SCRIPT, backend_url, cwd=ROOT,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0 and b"migrated" in out, err.decode()[-2000:]
    assert await raw_sql(backend_url, "SELECT x FROM asm_test_once") == [(1,)]
    rows = await raw_sql(backend_url, "SELECT version FROM asm_schema_version ORDER BY version")
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 2)]


@DURABLE
async def test_a_missing_migration_is_applied_once_in_order(backend_url: str, make_store: StoreFactory) -> None:
    await (await make_store()).close()
    applied: list[int] = []

    def step(version: int) -> Callable[[sa.Connection], None]:
        def op(conn: sa.Connection) -> None:
            applied.append(version)
            conn.execute(sa.text(f"CREATE TABLE asm_test_v{version} (x INTEGER)"))
        return op

    base = SCHEMA_VERSION
    later: Sequence[Migration] = (*MIGRATIONS, Migration(base + 1, "a", step(base + 1)),
                                  Migration(base + 2, "b", step(base + 2)))
    for _ in range(2):
        store = open_store(backend_url)
        assert isinstance(store, SqlStore)
        store._migrations = tuple(later)
        await store.open()
        await store.close()
    assert applied == [base + 1, base + 2]


# --- the writer ----------------------------------------------------------------------------------


class CountingStore:
    """The real store, with the batches the writer hands it counted."""

    def __init__(self, inner: RunStore) -> None:
        self.inner = inner
        self.batches: list[list[Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def write_batch(self, ops: Sequence[Any]) -> list[AsmError]:
        self.batches.append(list(ops))
        return await self.inner.write_batch(ops)


@ALL
async def test_writer_keeps_order_and_coalesces_updates(store: RunStore) -> None:
    await store.create(record("R1"))
    await store.create(record("R2"))
    counting = CountingStore(store)
    writer = StoreWriter(counting, flush_interval_s=0.2)
    # An update that moves the cursor, then events after it: written the other way round, the
    # update would set last_seq back to 100 and lose 101..110.
    writer.submit_update("R1", last_seq=100, first_held_seq=101)
    await writer.submit_events("R1", 101, 110, b"e1")
    for n in range(200):  # coalesced into one update: later fields win
        writer.submit_update("R1", node_seq=n, status="running")
    await writer.submit_events("R2", 1, 5, b"r2")
    await writer.submit_events("R1", 111, 120, b"e2")
    writer.submit_update("R1", status="completed", ended_at=5.0)
    await writer.flush()
    got = await store.get("R1")
    assert got is not None
    assert (got.last_seq, got.first_held_seq, got.node_seq, got.status, got.ended_at) == (120, 101, 199, "completed", 5.0)
    assert await store.events_after("R1", 0) == [(101, 110, b"e1"), (111, 120, b"e2")]
    assert await store.events_after("R2", 0) == [(1, 5, b"r2")]
    ops = [op for batch in counting.batches for op in batch]
    assert len(counting.batches) == 1 and len(ops) == 6, ops  # one transaction; 200 updates became one
    assert writer.pending_bytes == 0 and writer.errors == 0
    with pytest.raises(TypeError):
        writer.submit_update("R1", nope=1)
    writer.submit_update("R404", status="failed")  # the store refuses it: logged, counted, not raised
    await writer.flush()
    assert writer.rejected == 1
    await writer.close()


@DURABLE
async def test_writer_flush_is_durable_for_a_fresh_store(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.create(record("R1"))
    writer = StoreWriter(store, flush_interval_s=10.0)  # only flush() writes before the interval
    for i in range(1, 21):
        await writer.submit_events("R1", i, i, f"event {i}".encode())
    writer.submit_update("R1", status="running", node_seq=20)
    await writer.flush()
    other = await make_store()  # its own pool: sees only what was committed
    got = await other.get("R1")
    assert got is not None and (got.status, got.node_seq, got.last_seq) == ("running", 20, 20)
    assert [c[2] for c in await other.events_after("R1", 0)] == [f"event {i}".encode() for i in range(1, 21)]
    await writer.close()


class WriteLock:
    """Holds the database's write lock from another connection: the store's writes wait (and, with
    a short SQLite busy timeout, fail) until release()."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite: sqlite3.Connection | None = None
        self._pg: Any = None

    async def acquire(self) -> None:
        if self.url.startswith("sqlite:///"):
            self._sqlite = sqlite3.connect(self.url[len("sqlite:///"):], isolation_level=None)
            self._sqlite.execute("BEGIN IMMEDIATE")
        else:
            import asyncpg  # type: ignore[import-untyped]
            self._pg = await asyncpg.connect(self.url)
            await self._pg.execute("BEGIN; LOCK TABLE asm_runs IN EXCLUSIVE MODE")

    async def release(self) -> None:
        if self._sqlite is not None:
            self._sqlite.execute("ROLLBACK")
            self._sqlite.close()
        if self._pg is not None:
            await self._pg.execute("ROLLBACK")
            await self._pg.close()


@pytest.mark.slow
@DURABLE
async def test_writer_back_pressure_waits_and_loses_nothing(backend_url: str, make_store: StoreFactory) -> None:
    store = await make_store(connect_timeout_s=0.2)
    await store.create(record("R1"))
    writer = StoreWriter(store, flush_interval_s=0.01, max_pending_bytes=1000, retry_max_s=0.2)
    lock = WriteLock(backend_url)
    await lock.acquire()
    try:
        await asyncio.wait_for(writer.submit_events("R1", 1, 1, b"a" * 600), 1)  # under the bound: at once
        blocked = asyncio.create_task(writer.submit_events("R1", 2, 2, b"b" * 600))  # 1200 > 1000
        await asyncio.sleep(0.8)
        assert not blocked.done(), "submit_events returned while more than max_pending_bytes were unwritten"
        assert writer.pending_bytes == 1200
        if backend_url.startswith("sqlite"):  # busy timeout 0.2 s: "database is locked", retried
            assert writer.errors >= 2
    finally:
        await lock.release()
    await asyncio.wait_for(blocked, 10)
    await writer.submit_events("R1", 3, 3, b"c")
    await writer.flush()
    assert [c[2] for c in await store.events_after("R1", 0)] == [b"a" * 600, b"b" * 600, b"c"]
    assert writer.pending_bytes == 0
    await writer.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_writer_database_errors_are_retried_never_raised(
        backend_url: str, make_store: StoreFactory, caplog: pytest.LogCaptureFixture) -> None:
    store = await make_store(connect_timeout_s=0.01)  # SQLite waits 10 ms for the lock, then fails
    await store.create(record("R1"))
    # Backoff 20, 40, 80, 100, 100 ... ms: about 10 attempts a second; without it about 100.
    writer = StoreWriter(store, flush_interval_s=0.01, retry_min_s=0.02, retry_max_s=0.1)
    lock = WriteLock(backend_url)
    await lock.acquire()
    try:
        for i in range(1, 6):
            await writer.submit_events("R1", i, i, b"x")  # never raises although every write fails
        writer.submit_update("R1", status="running")
        flushed = asyncio.create_task(writer.flush())
        await asyncio.sleep(1.0)
        assert not flushed.done()
        errors = writer.errors
        assert 3 <= errors <= 20, f"{errors} attempts in 1 s: no backoff (busy loop) or no retry"
    finally:
        await lock.release()
    await asyncio.wait_for(flushed, 5)
    assert [c[0] for c in await store.events_after("R1", 0)] == [1, 2, 3, 4, 5]
    assert (await store.get("R1")).status == "running"  # type: ignore[union-attr]
    failures = [r for r in caplog.records if "writing failed" in r.getMessage()]
    assert 1 <= len(failures) <= 2, "errors are logged rate-limited"
    assert any("writing again" in r.getMessage() for r in caplog.records)
    # close() while the database fails gives up after its timeout instead of hanging.
    await lock.acquire()
    try:
        await writer.submit_events("R1", 6, 6, b"lost at close")
        started = time.monotonic()
        await writer.close(timeout=0.5)
        assert time.monotonic() - started < 2.0
    finally:
        await lock.release()


# --- durability across kill -9 -------------------------------------------------------------------

_KILLED_SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    from asm_controller import RunRecord, StoreWriter, open_store

    async def main():
        store = open_store(sys.argv[1])
        await store.open()
        await store.meta_set("controller_epoch", "E-killed")
        await store.create(RunRecord("R1", "S1", "shell", spec={"cwd": "/w"}))
        await store.create(RunRecord("R2", "S1", "shell", status="running"))
        writer = StoreWriter(store, flush_interval_s=60)
        for i in range(1, 101):
            await writer.submit_events("R1", i, i, b"event %d" % i)
        writer.submit_update("R1", status="running", node_seq=100)
        await writer.flush()
        print("durable", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


@pytest.mark.slow
async def test_records_survive_kill_9_of_the_writing_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ctl' / 'state.sqlite3'}"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _KILLED_SCRIPT, url, cwd=ROOT,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line != b"durable\n":
            os.kill(proc.pid, signal.SIGKILL)
            pytest.fail(f"the writer did not report durable: {(await proc.stderr.read()).decode()[-2000:]}")
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)  # right after flush() returned: no clean shutdown
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "ctl" / "state.sqlite3-wal").exists()  # the commits are in the WAL, not yet checkpointed
    store = open_store(url)
    await store.open()
    try:
        assert await store.meta_get("controller_epoch") == "E-killed"
        r1, r2 = await store.get("R1"), await store.get("R2")
        assert r1 is not None and (r1.status, r1.node_seq, r1.last_seq, r1.spec) == ("running", 100, 100, {"cwd": "/w"})
        assert r2 is not None and r2.status == "running"
        assert {r.run_id for r in await store.in_flight()} == {"R1", "R2"}
        assert [c[2] for c in await store.events_after("R1", 0)] == [b"event %d" % i for i in range(1, 101)]
    finally:
        await store.close()
    mode = stat.S_IMODE((tmp_path / "ctl").stat().st_mode), stat.S_IMODE((tmp_path / "ctl" / "state.sqlite3").stat().st_mode)
    assert mode == (0o700, 0o600)


# --- URLs and driver errors ----------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "", "mysql://u:pw@h/db", "sqlite:", "sqlite:x.db", "sqlite://host/x.db", "sqlite:///", "sqlite:///:memory:",
    "sqlite:///x.db?mode=ro", "sqlite:///dir/", "postgresql://u:topsecret@h/", "postgresql:///db",
    "postgresql://u:topsecret@h/db?sslcert=/x", "postgresql://u:topsecret@h:notaport/db", "file:///tmp/x",
])
def test_bad_urls_are_config_errors_naming_the_forms(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_store(url)
    assert info.value.reason == "bad_state_url" and "memory:" in info.value.message
    assert "postgresql://USER" in info.value.message and "topsecret" not in info.value.message


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert open_store("memory:").url == "memory:"
    assert open_store("sqlite:///rel/state.db").url == f"sqlite:///{tmp_path}/rel/state.db"
    assert open_store(f"sqlite:///{tmp_path}/abs.db").url == f"sqlite:///{tmp_path}/abs.db"
    pg_url = open_store("postgresql://asm:hunter2@db.example:5433/asm").url
    assert pg_url == "postgresql://asm:***@db.example:5433/asm"
    assert open_store("postgresql:///asm?host=/run/postgresql").url == "postgresql:///asm?host=/run/postgresql"
    with pytest.raises(ConfigError):
        open_store("memory:", history_max_bytes=0)


async def test_relative_sqlite_path_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///deep/er/state.db")
    monkeypatch.chdir("/")  # resolved when the URL was read, not when it is opened
    await store.open()
    await store.create(record("R1"))
    await store.close()
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "deep" / "er" / "state.db").stat().st_mode) == 0o600


async def test_sqlite_driver_errors_are_store_errors(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for url in (f"sqlite:///{tmp_path}/afile/state.db", f"sqlite:///{tmp_path}"):
        with pytest.raises(StoreError) as info:
            await open_store(url).open()
        assert info.value.reason == "store_unavailable" and str(tmp_path) in info.value.message
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a database"):
        await open_store(f"sqlite:///{tmp_path}/garbage.db").open()
    with pytest.raises(StoreError, match="not open"):
        await open_store(f"sqlite:///{tmp_path}/never.db").get("R1")


async def test_postgresql_driver_errors_are_store_errors(pg: PostgresServer) -> None:
    url = pg.create_database()
    wrong = url.replace(PASSWORD, "wrong-password")
    with pytest.raises(StoreError) as info:
        await open_store(wrong).open()
    assert "password authentication failed" in info.value.message and "wrong-password" not in info.value.message
    assert info.value.reason == "store_unavailable"
    with pytest.raises(StoreError, match="does not exist"):
        await open_store(pg.url("no_such_db")).open()
    with socket_closed_port() as port:  # nothing listens there: refused at once
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"refused|Connect call failed"):
            await open_store(f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/db").open()
        assert time.monotonic() - started < 5


async def test_postgresql_server_down_is_a_store_error_and_the_writer_waits_it_out(pg: PostgresServer) -> None:
    del pg  # only for its skip: this test stops a cluster of its own
    with PostgresServer.start() as server:
        store = open_store(server.create_database(), connect_timeout_s=1.0)
        await store.open()
        try:
            await store.create(record("R1"))
            writer = StoreWriter(store, flush_interval_s=0.01, retry_min_s=0.05, retry_max_s=0.2)
            server.stop(remove=False)
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                await store.get("R1")
            assert info.value.reason == "store_unavailable" and time.monotonic() - started < 5
            assert PASSWORD not in info.value.message
            await writer.submit_events("R1", 1, 3, b"while down")
            writer.submit_update("R1", status="running")
            flushed = asyncio.create_task(writer.flush())
            await asyncio.sleep(0.5)
            assert not flushed.done() and writer.errors >= 1
            server.restart()
            await asyncio.wait_for(flushed, 15)
            got = await store.get("R1")  # the pool reconnected
            assert got is not None and (got.status, got.last_seq) == ("running", 3)
            assert await store.events_after("R1", 0) == [(1, 3, b"while down")]
            await writer.close()
        finally:
            await store.close()


async def test_postgresql_unix_socket_url(pg: PostgresServer) -> None:
    name = pg.create_database().rsplit("/", 1)[1]
    store = open_store(pg.url(name, socket=True))
    await store.open()
    try:
        await store.create(record("R1"))
        assert (await store.get("R1")) is not None
    finally:
        await store.close()
    assert pg.psql(name, "SELECT run_id FROM asm_runs").strip() == "R1"


class socket_closed_port:
    """A port of 127.0.0.1 that was free a moment ago (nothing listens on it)."""

    def __enter__(self) -> int:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


def test_record_json_shape_matches_fields() -> None:
    # The record is what the coordinator stores and lists: every field has a JSON-able default.
    json.dumps(RunRecord("R", "S", "shell").__dict__)


def test_importing_the_library_does_not_load_sqlalchemy() -> None:
    # The CLI imports asm_controller on every invocation; the SQL stack loads when a SQL store is used.
    code = ("import sys, asm_controller, asm_controller._store as s\n"
            "assert 'sqlalchemy' not in sys.modules, 'eager'\n"
            "asm_controller.open_store('memory:')\n"
            "assert 'sqlalchemy' not in sys.modules, 'memory'\n"
            "asm_controller.open_store('sqlite:///x.db')\n"
            "assert 'sqlalchemy' in sys.modules and s.SCHEMA_VERSION >= 1\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()


async def test_a_second_claim_of_one_sqlite_store_is_store_locked(tmp_path: Path) -> None:
    """Two controllers on one registry: the second one's claim() is StoreLocked, a StoreError a caller can catch."""
    from asm_wire import StoreLocked

    url = f"sqlite:///{tmp_path}/state.db"
    first, second = open_store(url), open_store(url)
    await first.open()
    await second.open()
    try:
        await first.claim()
        with pytest.raises(StoreLocked) as info:
            await second.claim()
        assert isinstance(info.value, StoreError)
        assert (info.value.kind, info.value.reason) == ("runtime", "store_in_use")
        assert "another controller uses the run store" in info.value.message
    finally:
        await second.close()
        await first.close()
