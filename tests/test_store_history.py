"""The run store's history (schema v2): list_runs filters and keyset paging, sessions, size retention,
and migration 2 upgrading a version-1 database in place (an SQLite file an older asm wrote)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from asm_controller._store import (
    EndpointLeaseRecord,
    InvalidRecord,
    Lease,
    RunRecord,
    RunStore,
    SessionRecord,
    open_store,
)
from asm_controller._store._migrations import MIGRATIONS, SCHEMA_VERSION
from asm_controller._store._sql import SqlStore
from tests import test_store as contract
from tests.test_store import ALL, DURABLE, StoreFactory, raw_sql, record

backend_url, make_store, store = contract.backend_url, contract.make_store, contract.store

V1_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "store" / "controller-v1.sqlite3"


# --- list_runs -----------------------------------------------------------------------------------


async def _history(on: RunStore) -> None:
    plan: list[tuple[str, float, dict[str, Any]]] = [
        ("A", 10.0, {"session_id": "s1", "provider": "claude", "node_address": "n1", "status": "completed",
                     "owner": "alice"}),
        ("B", 20.0, {"session_id": "s1", "provider": "claude", "node_address": "n2", "status": "failed",
                     "owner": "alice", "provider_session_id": "p-b"}),
        ("C", 30.0, {"session_id": "s2", "provider": "codex", "node_address": "n1", "status": "running",
                     "owner": "bob"}),
        ("D", 30.0, {"session_id": "s1", "provider": "claude", "node_address": "", "status": "queued",
                     "owner": "alice", "prompt": "secret plan"}),
        ("E", 40.0, {"session_id": "s3", "provider": "codex", "node_address": "n2", "status": "interrupted",
                     "owner": "bob", "provider_session_id": "p-e"}),
    ]
    for run_id, created, fields in plan:
        await on.create(record(run_id, created_at=created, **fields))


@ALL
async def test_list_runs_filters(store: RunStore) -> None:
    await _history(store)

    async def ids(**kw: Any) -> list[str]:
        return [r.run_id for r in await store.list_runs(**kw)]

    assert await ids() == ["E", "D", "C", "B", "A"]
    assert await ids(session_id="s1") == ["D", "B", "A"]
    assert await ids(provider="codex") == ["E", "C"]
    assert await ids(node="n1") == ["C", "A"]
    assert await ids(node="") == ["D"]  # not placed yet
    assert await ids(status="queued") == ["D"]
    assert await ids(status=("running", "queued")) == ["D", "C"]
    assert await ids(since=20.0) == ["E", "D", "C", "B"]  # inclusive
    assert await ids(until=30.0) == ["B", "A"]  # exclusive
    assert await ids(since=20.0, until=40.0, owner="alice") == ["D", "B"]
    assert await ids(session_id="s1", provider="codex") == []
    assert await ids(session_id="nope") == []
    listed = {r.run_id: r for r in await store.list_runs()}
    assert listed["D"].prompt == ""  # a history listing never ships prompts
    assert (await store.get("D")).prompt == "secret plan"  # type: ignore[union-attr]
    full = await store.get("B")
    assert full is not None and listed["B"] == full


@ALL
async def test_list_runs_keyset_paging_visits_every_run_once(store: RunStore) -> None:
    for i in range(47):  # created_at ties in threes: the run id breaks them
        await store.create(record(f"R{i:03d}", created_at=100.0 + i // 3, session_id="s1" if i % 2 else "s2"))
    everything = [r.run_id for r in await store.list_runs()]
    kws: list[dict[str, Any]] = [{}, {"session_id": "s1"}]
    for kw in kws:
        pages: list[list[str]] = []
        cursor: tuple[float, str] | None = None
        while True:
            page = await store.list_runs(limit=7, before=cursor, **kw)
            if not page:
                break
            pages.append([r.run_id for r in page])
            cursor = (page[-1].created_at, page[-1].run_id)
        flat = [run_id for page in pages for run_id in page]
        assert flat == [r.run_id for r in await store.list_runs(**kw)] and len(set(flat)) == len(flat)
        assert all(len(page) == 7 for page in pages[:-1])
    assert len(everything) == 47
    # A cursor is exclusive and need not be a row's (the newest of a second, from a clock).
    assert [r.run_id for r in await store.list_runs(before=(101.0, "R004"), limit=3)] == ["R003", "R002", "R001"]
    assert [r.run_id for r in await store.list_runs(before=(101.0, ""), limit=2)] == ["R002", "R001"]
    assert [r.run_id for r in await store.list_runs(before=[100.0, "R002"])] == ["R001", "R000"]  # type: ignore[arg-type]
    # A new run during paging lands on the first page, never in the middle of the next ones.
    await store.create(record("R999", created_at=500.0))
    assert [r.run_id for r in await store.list_runs(before=(101.0, "R004"), limit=3)] == ["R003", "R002", "R001"]


# --- sessions ------------------------------------------------------------------------------------


@ALL
async def test_sessions_aggregate_their_runs(store: RunStore) -> None:
    await _history(store)
    assert await store.sessions() == [
        SessionRecord("s3", "codex", "bob", 1, "E", "interrupted", 40.0, 40.0, "p-e", "n2"),
        SessionRecord("s2", "codex", "bob", 1, "C", "running", 30.0, 30.0, "", "n1"),
        # Latest run D (queued, no node yet); the latest non-empty provider session is B's.
        SessionRecord("s1", "claude", "alice", 3, "D", "queued", 10.0, 30.0, "p-b", ""),
    ]
    assert [s.session_id for s in await store.sessions(owner="bob")] == ["s3", "s2"]
    assert [s.session_id for s in await store.sessions(provider="claude")] == ["s1"]
    # The filters apply to runs: on node n1, session s1 is its run A alone.
    by_node = await store.sessions(node="n1")
    assert [(s.session_id, s.runs, s.last_run_id, s.first_at, s.last_at) for s in by_node] == [
        ("s2", 1, "C", 30.0, 30.0), ("s1", 1, "A", 10.0, 10.0)]
    assert await store.sessions(owner="carol") == []
    assert await store.sessions(limit=0) == []
    # Paging: the cursor is the last row's (last_at, session_id).
    first = await store.sessions(limit=2)
    assert [s.session_id for s in first] == ["s3", "s2"]
    rest = await store.sessions(limit=2, before=(first[-1].last_at, first[-1].session_id))
    assert [s.session_id for s in rest] == ["s1"]
    assert await store.sessions(before=(rest[-1].last_at, rest[-1].session_id)) == []


@ALL
async def test_sessions_with_ties_page_by_session_id(store: RunStore) -> None:
    for i in range(23):
        await store.create(record(f"R{i}", session_id=f"S{i % 11:02d}", created_at=100.0 + (i % 11) // 4))
    everything = await store.sessions(limit=1000)
    assert len(everything) == 11
    pages, cursor = [], None
    while page := await store.sessions(limit=4, before=cursor):
        pages.extend(page)
        cursor = (page[-1].last_at, page[-1].session_id)
    assert pages == everything
    assert sum(s.runs for s in everything) == 23


# --- retention by size ---------------------------------------------------------------------------


@ALL
async def test_prune_by_size_drops_the_oldest_ended_logs_and_keeps_the_records(store: RunStore) -> None:
    # Four ended runs of 100 bytes each (ended at 10, 20, 30, 40) and a live run of 500.
    for i, ended in enumerate((30.0, 10.0, 40.0, 20.0)):
        run_id = f"E{i}"
        await store.create(record(run_id, status="completed"))
        await store.append_events(run_id, 1, 5, b"x" * 60)
        await store.append_events(run_id, 6, 9, b"y" * 40)
        await store.update(run_id, ended_at=ended)
    await store.create(record("LIVE", status="running"))
    await store.append_events("LIVE", 1, 1, b"z" * 500)
    assert await store.log_bytes() == 900
    assert await store.prune(0.0, max_log_bytes=1000) == 0  # within the budget: nothing
    assert await store.log_bytes() == 900
    # 400 bytes of ended logs, budget 250: the two oldest-ended (E1 at 10, E3 at 20) go.
    assert await store.prune(0.0, max_log_bytes=250) == 0
    assert await store.log_bytes() == 700
    for run_id, kept in (("E0", True), ("E1", False), ("E2", True), ("E3", False)):
        got = await store.get(run_id)
        assert got is not None and got.last_seq == 9 and got.status == "completed"  # the record stays
        if kept:
            assert got.first_held_seq == 1 and len(await store.events_after(run_id, 0)) == 2
        else:
            assert got.first_held_seq == 10 and await store.events_after(run_id, 0) == []
    assert len(await store.events_after("LIVE", 0)) == 1  # a live run's log is never dropped for size
    # Budget 0: every ended log goes; age retention still deletes records as before.
    assert await store.prune(35.0, max_log_bytes=0) == 3  # E0 (30), E1 (10), E3 (20) ended before 35
    assert await store.log_bytes() == 500
    got = await store.get("E2")
    assert got is not None and got.first_held_seq == 10
    assert await store.get("E0") is None
    await store.prune(0.0)  # no size budget: unchanged
    assert await store.log_bytes() == 500


@pytest.mark.slow
@ALL
async def test_prune_by_size_scales_past_one_batch(make_store: StoreFactory) -> None:
    store = await make_store()
    for i in range(600):  # more than one SQL trimming batch (256 runs)
        await store.create(record(f"R{i:04d}", status="completed", ended_at=float(i + 1)))
        await store.append_events(f"R{i:04d}", 1, 1, b"e" * 10)
    assert await store.log_bytes() == 6000
    await store.prune(0.0, max_log_bytes=1005)
    assert await store.log_bytes() == 1000
    assert (await store.get("R0499")).first_held_seq == 2  # type: ignore[union-attr]
    assert (await store.get("R0500")).first_held_seq == 1  # type: ignore[union-attr]


# --- hostile input -------------------------------------------------------------------------------


@ALL
async def test_bad_history_queries_are_invalid_record(store: RunStore) -> None:
    await _history(store)
    hostile: Any = store
    calls: list[Any] = [
        lambda: hostile.list_runs(limit=-1),
        lambda: hostile.list_runs(limit=2**63),
        lambda: hostile.list_runs(limit="10"),
        lambda: hostile.list_runs(status="exploded"),
        lambda: hostile.list_runs(status=()),
        lambda: hostile.list_runs(status=["running", 3]),
        lambda: hostile.list_runs(owner="o" * 257),
        lambda: hostile.list_runs(session_id="s\x00"),
        lambda: hostile.list_runs(provider=7),
        lambda: hostile.list_runs(node="n" * 513),
        lambda: hostile.list_runs(since=-1.0),
        lambda: hostile.list_runs(since=float("nan")),
        lambda: hostile.list_runs(until="tomorrow"),
        lambda: hostile.list_runs(until=True),
        lambda: hostile.list_runs(before="R1"),
        lambda: hostile.list_runs(before=(1.0,)),
        lambda: hostile.list_runs(before=(1.0, "R", 3)),
        lambda: hostile.list_runs(before=("1.0", "R")),
        lambda: hostile.list_runs(before=(1.0, 5)),
        lambda: hostile.list_runs(before=(float("inf"), "R")),
        lambda: hostile.list_runs(before=(1.0, "R" * 129)),
        lambda: hostile.list_runs(before={"at": 1.0}),
        lambda: hostile.sessions(limit=-1),
        lambda: hostile.sessions(owner=b"alice"),
        lambda: hostile.sessions(node="n" * 513),
        lambda: hostile.sessions(before=(1.0, None)),
        lambda: hostile.sessions(before=(-1.0, "s1")),
        lambda: hostile.prune(-5.0),
        lambda: hostile.prune("yesterday"),
        lambda: hostile.prune(10.0, max_log_bytes=-1),
        lambda: hostile.prune(10.0, max_log_bytes=1.5),
        lambda: hostile.prune(10.0, max_log_bytes=2**64),
    ]
    for make in calls:
        with pytest.raises(InvalidRecord):
            await make()
    assert len(await store.list_runs()) == 5 and await store.log_bytes() == 0


# --- migration 2 ---------------------------------------------------------------------------------


def _schema(path: Path) -> dict[str, Any]:
    inspector = sa.inspect(sa.create_engine(f"sqlite:///{path}"))
    return {table: ({c["name"]: (str(c["type"]), c["nullable"], c["default"]) for c in inspector.get_columns(table)},
                    sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)))
            for table in inspector.get_table_names() if table != "asm_schema_version"}


async def test_an_sqlite_file_written_at_v1_is_migrated_in_place_and_keeps_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "controller.sqlite3"
    shutil.copyfile(V1_FIXTURE, path)
    # Migration 1's frozen tables are exactly what the v1 code made.
    fresh_v1 = tmp_path / "fresh-v1.sqlite3"
    v1_only = open_store(f"sqlite:///{fresh_v1}")
    assert isinstance(v1_only, SqlStore)
    v1_only._migrations = MIGRATIONS[:1]
    await v1_only.open()
    await v1_only.close()
    assert _schema(fresh_v1) == _schema(path)

    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        versions = await raw_sql(f"sqlite:///{path}", "SELECT version FROM asm_schema_version ORDER BY version")
        assert versions == [(1,), (2,), (3,)] and SCHEMA_VERSION == 3
        assert await store.meta_get("controller_epoch") == "E-v1"
        done = await store.get("R-DONE")
        assert done == RunRecord(
            "R-DONE", "sess-a", "claude", owner="alice", prompt_digest=done.prompt_digest if done else "",
            spec={"cwd": "/w", "permission_mode": "plan"}, node_address="127.0.0.1:7070", node_id="node-a",
            node_epoch="E1", node_run_id="N1", status="completed", last_seq=3, node_seq=3, first_held_seq=1,
            provider_session_id="prov-a", created_at=1000.0, updated_at=done.updated_at if done else 0.0,
            ended_at=1010.0, result={"exit": 0, "text": "ok"})  # the v2 fields at their defaults
        assert done is not None and done.prompt_digest.startswith("sha256:")
        assert [c[2] for c in await store.events_after("R-DONE", 0)] == [b"one", b"two", b"three"]
        assert [r.run_id for r in await store.in_flight()] == ["R-RUN", "R-PEND"]
        assert [r.run_id for r in await store.list_runs()] == ["R-PEND", "R-RUN", "R-DONE"]
        assert await store.log_bytes() == 11 + 14
        # The new operations work on the upgraded rows.
        lease = await store.take_lease("R-RUN", "replica-a", seen_token=0, until=2e9, now=1e9)
        assert lease == Lease("replica-a", 1)
        await store.append_events("R-RUN", 3, 3, b"more", fence=lease)
        assert [s.session_id for s in await store.sessions()] == ["sess-b", "sess-a"]
        assert await store.queue_stats() == (0, None)
        await store.heartbeat_replica("replica-a", "h:1", now=1e9, until=2e9)
        assert [r.leases for r in await store.replicas(now=1e9)] == [1]
        leased = EndpointLeaseRecord("L1", "alice", "shell", "", "sha256:" + "0" * 64, 1e9, 2e9)  # schema v3
        await store.put_endpoint_lease(leased)
        assert await store.get_endpoint_lease("L1") == leased
    finally:
        await store.close()
    # Upgraded and fresh databases have one schema.
    fresh = tmp_path / "fresh.sqlite3"
    current = open_store(f"sqlite:///{fresh}")
    await current.open()
    await current.close()
    assert _schema(fresh) == _schema(path)
    with sqlite3.connect(V1_FIXTURE) as con:  # the fixture itself is untouched (a copy was migrated)
        assert con.execute("SELECT max(version) FROM asm_schema_version").fetchone() == (1,)


@DURABLE
async def test_a_v1_database_with_rows_is_upgraded_in_place(backend_url: str) -> None:
    v1 = open_store(backend_url)
    assert isinstance(v1, SqlStore)
    v1._migrations = MIGRATIONS[:1]
    await v1.open()
    await v1.close()
    # Rows as the v1 code wrote them (its columns only).
    for run_id, status, created in (("OLD1", "running", 1.0), ("OLD2", "completed", 2.0)):
        await raw_sql(backend_url, "INSERT INTO asm_runs (run_id, session_id, provider, spec, status, last_seq, "
                                   "node_seq, first_held_seq, held_bytes, created_at, updated_at) VALUES "
                                   "(:r, 'S', 'shell', '{}', :s, 1, 1, 1, 3, :c, :c)", r=run_id, s=status, c=created)
        await raw_sql(backend_url, "INSERT INTO asm_run_events (run_id, last_seq, first_seq, nbytes, data) "
                                   "VALUES (:r, 1, 1, 3, :d)", r=run_id, d=b"abc")
    store = open_store(backend_url)
    await store.open()
    try:
        old1 = await store.get("OLD1")
        assert old1 is not None and (old1.status, old1.priority, old1.lease_owner, old1.lease_token, old1.prompt,
                                     old1.queued_at, old1.lease_expires) == ("running", 0, "", 0, "", None, 0.0)
        assert await store.events_after("OLD2", 0) == [(1, 1, b"abc")]
        assert [r.run_id for r in await store.expired_leases(now=10.0)] == ["OLD1"]  # live, never leased
        assert await store.take_lease("OLD1", "replica-a", seen_token=0, until=20.0, now=10.0) == Lease("replica-a", 1)
    finally:
        await store.close()
    rows = await raw_sql(backend_url, "SELECT version FROM asm_schema_version ORDER BY version")
    assert rows == [(1,), (2,), (3,)]
