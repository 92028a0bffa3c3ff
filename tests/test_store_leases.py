"""The run store's replica primitives (schema v2): leases and fenced writes, replicas, the fleet queue.

One contract over memory, SQLite and a real PostgreSQL (the fixtures of tests/test_store.py); the
compare-and-set race runs two stores with engines of their own, as two replicas would.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

import pytest

from asm_controller._store import (
    LIVE,
    QUEUED,
    STORE_OPS,
    InvalidRecord,
    Lease,
    LeaseLost,
    MemoryStore,
    ReplicaRecord,
    RunNotFound,
    RunStore,
    StoreLocked,
    StoreWriter,
    open_store,
)
from asm_controller._store._base import EventsOp, UpdateOp
from asm_wire import AsmError, StoreError, make_error
from tests import test_store as contract
from tests.support.pg_server import PostgresServer
from tests.test_store import ALL, DURABLE, StoreFactory, record

# The contract suite's fixtures (one store per backend per test), shared by assignment.
backend_url, make_store, store = contract.backend_url, contract.make_store, contract.store

T0 = 1_000_000.0  # the tests' clock: leases and replicas take the time from the caller


async def leased(on: RunStore, run_id: str, owner: str, *, until: float = T0 + 10, **fields: Any) -> Lease:
    await on.create(record(run_id, **fields))
    lease = await on.take_lease(run_id, owner, seen_token=0, until=until, now=T0)
    assert lease == Lease(owner, 1)
    return lease


# --- the lease's compare-and-set -----------------------------------------------------------------


@ALL
async def test_take_lease_is_a_compare_and_set(store: RunStore) -> None:
    a = await leased(store, "R1", "replica-a")
    got = await store.get("R1")
    assert got is not None and (got.lease_owner, got.lease_token, got.lease_expires) == ("replica-a", 1, T0 + 10)
    # Held and unexpired: another replica cannot take it, whatever token it saw.
    assert await store.take_lease("R1", "replica-b", seen_token=1, until=T0 + 20, now=T0 + 5) is None
    assert await store.take_lease("R1", "replica-b", seen_token=0, until=T0 + 20, now=T0 + 5) is None
    # Its holder may (a re-take raises the token: the old Lease is fenced out too).
    a2 = await store.take_lease("R1", "replica-a", seen_token=1, until=T0 + 20, now=T0 + 5)
    assert a2 == Lease("replica-a", 2) and a2 != a
    # Expired: anyone who saw the current token, once.
    assert await store.take_lease("R1", "replica-b", seen_token=1, until=T0 + 40, now=T0 + 30) is None  # stale
    b = await store.take_lease("R1", "replica-b", seen_token=2, until=T0 + 40, now=T0 + 30)
    assert b == Lease("replica-b", 3)
    assert await store.take_lease("R1", "replica-c", seen_token=2, until=T0 + 40, now=T0 + 30) is None
    got = await store.get("R1")
    assert got is not None and (got.lease_owner, got.lease_token, got.lease_expires) == ("replica-b", 3, T0 + 40)
    # lease_expires == now is not expired yet (expired means lease_expires < now).
    assert await store.take_lease("R1", "replica-c", seen_token=3, until=T0 + 50, now=T0 + 40) is None
    # A free lease (no owner) may be taken before its time; an ended run or an unknown one never.
    await store.create(record("FREE", lease_expires=T0 + 99))
    assert await store.take_lease("FREE", "replica-c", seen_token=0, until=T0 + 5, now=T0) == Lease("replica-c", 1)
    await store.create(record("DONE", status="completed", ended_at=T0))
    assert await store.take_lease("DONE", "replica-c", seen_token=0, until=T0 + 5, now=T0) is None
    assert await store.take_lease("NOPE", "replica-c", seen_token=0, until=T0 + 5, now=T0) is None
    for status in LIVE:  # queued runs are owned too (a replica's queue drives them)
        await store.create(record(f"L-{status}", status=status))
        assert await store.take_lease(f"L-{status}", "replica-c", seen_token=0, until=T0 + 5, now=T0) is not None


@ALL
async def test_a_fenced_update_is_applied_only_under_its_lease(store: RunStore) -> None:
    a = await leased(store, "R1", "replica-a")
    await store.update("R1", fence=a, node_seq=5, status="running")
    assert (await store.get("R1")).node_seq == 5  # type: ignore[union-attr]
    b = await store.take_lease("R1", "replica-b", seen_token=1, until=T0 + 30, now=T0 + 20)
    assert b is not None
    with pytest.raises(LeaseLost) as info:
        await store.update("R1", fence=a, node_seq=6, status="failed")
    err = info.value
    assert (err.kind, err.reason, type(err).__mro__[1]) == ("runtime", "lease_lost", AsmError)
    assert "replica-b" in err.message and "replica-a" in err.message and "R1" in err.message
    assert type(make_error(err.kind, err.domain, err.message, err.reason)) is LeaseLost  # round trip
    got = await store.get("R1")
    assert got is not None and (got.node_seq, got.status) == (5, "running")  # nothing written
    await store.update("R1", fence=b, node_seq=6)
    # An unknown run is RunNotFound, fenced or not.
    with pytest.raises(RunNotFound):
        await store.update("NOPE", fence=b, node_seq=1)
    # Unfenced writes are not fenced (the single controller, a recovery's terminal write).
    await store.update("R1", node_seq=7)
    assert (await store.get("R1")).node_seq == 7  # type: ignore[union-attr]


@ALL
async def test_expect_status_is_a_status_compare_and_set(store: RunStore) -> None:
    await store.create(record("R1", status=QUEUED))
    await store.update("R1", expect_status=QUEUED, status="pending", node_address="n1")
    with pytest.raises(LeaseLost, match="R1 is pending, not queued"):
        await store.update("R1", expect_status="queued", status="pending", node_address="n2")
    assert (await store.get("R1")).node_address == "n1"  # type: ignore[union-attr]
    await store.update("R1", expect_status=("pending", "running"), status="running")
    with pytest.raises(LeaseLost, match="not queued or pending"):
        await store.update("R1", expect_status=["queued", "pending"], status="interrupted")  # type: ignore[arg-type]
    # Both at once: both must hold.
    a = await store.take_lease("R1", "replica-a", seen_token=0, until=T0 + 10, now=T0)
    assert a is not None
    with pytest.raises(LeaseLost, match="is running"):
        await store.update("R1", fence=a, expect_status="pending", status="failed")
    with pytest.raises(LeaseLost, match="lease"):
        await store.update("R1", fence=Lease("replica-a", 99), expect_status="running", status="failed")
    await store.update("R1", fence=a, expect_status="running", status="completed", ended_at=T0)
    assert (await store.get("R1")).status == "completed"  # type: ignore[union-attr]


@ALL
async def test_end_run_is_one_compare_and_set_with_its_final_events(store: RunStore) -> None:
    """end_run() writes the ended fields and the end's chunk together, or nothing (audit 7a)."""
    a = await leased(store, "R1", "replica-a", status=QUEUED)
    await store.append_events("R1", 1, 2, b"ab", fence=a)
    # A failed compare-and-set (status, lease) writes neither the fields nor the chunk.
    with pytest.raises(LeaseLost, match="R1 is queued, not pending"):
        await store.end_run("R1", 3, 4, b"end", fence=a, expect_status="pending", status="interrupted")
    with pytest.raises(LeaseLost, match="lease"):
        await store.end_run("R1", 3, 4, b"end", fence=Lease("replica-a", 9), expect_status=QUEUED,
                            status="interrupted")
    # An overlapping chunk is refused before the fields are written.
    with pytest.raises(InvalidRecord, match="overlaps"):
        await store.end_run("R1", 2, 4, b"end", fence=a, expect_status=QUEUED, status="interrupted")
    with pytest.raises(RunNotFound):
        await store.end_run("NOPE", 1, 1, b"x", status="failed")
    with pytest.raises(InvalidRecord):
        await store.end_run("R1", 3, 4, b"end", fence=a, status="bogus")
    got = await store.get("R1")
    assert got is not None and (got.status, got.last_seq, got.ended_at) == (QUEUED, 2, None)
    assert [c[:2] for c in await store.events_after("R1", 0)] == [(1, 2)]
    await store.end_run("R1", 3, 4, b"end", fence=a, expect_status=QUEUED, status="interrupted", ended_at=T0,
                        prompt="", result={"status": "interrupted"})
    got = await store.get("R1")
    assert got is not None and (got.status, got.last_seq, got.ended_at, got.result) == (
        "interrupted", 4, T0, {"status": "interrupted"})
    assert [c[:2] for c in await store.events_after("R1", 2)] == [(3, 4)]
    # Unfenced, no compare-and-set (a recovery's end); a chunk already held is not appended twice.
    await store.create(record("R2"))
    await store.append_events("R2", 1, 1, b"x")
    await store.end_run("R2", 1, 1, b"x", status="failed", ended_at=T0)
    got = await store.get("R2")
    assert got is not None and (got.status, got.last_seq) == ("failed", 1)
    assert len(await store.events_after("R2", 0)) == 1


@ALL
async def test_fenced_appends_and_batches(store: RunStore) -> None:
    a = await leased(store, "R1", "replica-a")
    await store.create(record("R2"))
    await store.append_events("R1", 1, 2, b"a", fence=a)
    b = await store.take_lease("R1", "replica-b", seen_token=1, until=T0 + 30, now=T0 + 20)
    assert b is not None
    with pytest.raises(LeaseLost):
        await store.append_events("R1", 3, 3, b"stale", fence=a)
    with pytest.raises(LeaseLost):
        await store.append_events("R1", 1, 2, b"a", fence=a)  # even an idempotent retry: fenced first
    with pytest.raises(RunNotFound):
        await store.append_events("NOPE", 1, 1, b"x", fence=a)
    await store.append_events("R1", 3, 3, b"b", fence=b)
    # A batch: the fenced-out ops are skipped and returned (with their run id), the others written.
    skipped = await store.write_batch([
        EventsOp("R1", 4, 4, b"lost", fence=a),
        EventsOp("R2", 1, 1, b"r2"),
        UpdateOp("R1", {"node_seq": 99}, fence=a),
        UpdateOp("R1", {"node_seq": 4}, fence=b),
        UpdateOp("R2", {"status": "running"}, expect_status="queued"),
        UpdateOp("R2", {"node_seq": 1}, expect_status=("pending",)),
        EventsOp("R1", 4, 4, b"c", fence=b),
        UpdateOp("R1", {"status": "running"}, fence="not a lease"),  # type: ignore[arg-type]
    ])
    assert [(type(e), e.details["run_id"]) for e in skipped] == [
        (LeaseLost, "R1"), (LeaseLost, "R1"), (LeaseLost, "R2"), (InvalidRecord, "R1")]
    assert [c[2] for c in await store.events_after("R1", 0)] == [b"a", b"b", b"c"]
    r1, r2 = await store.get("R1"), await store.get("R2")
    assert r1 is not None and r2 is not None
    assert (r1.node_seq, r1.last_seq, r1.status) == (4, 4, "pending")
    assert (r2.node_seq, r2.status, r2.last_seq) == (1, "pending", 1)


@ALL
async def test_a_chunk_and_the_update_after_it_are_written_as_the_ops_one_by_one(store: RunStore) -> None:
    """A run's chunk followed by its plain update (what the writer queues for a relayed batch; the SQL
    store writes the two with one UPDATE of the row): the same outcome as written one by one, when
    the chunk lands, when it is a retry already held, and when it is refused (the update is then
    written, or refused, on its own)."""
    a = await leased(store, "R1", "replica-a")
    await store.create(record("R2"))
    await store.create(record("R3"))
    assert await store.write_batch([
        EventsOp("R1", 1, 3, b"one", fence=a), UpdateOp("R1", {"node_seq": 3, "status": "running"}, fence=a),
        EventsOp("R2", 1, 2, b"two"), UpdateOp("R2", {"node_seq": 2, "provider_session_id": "ps-2"}),
    ]) == []
    r1, r2 = await store.get("R1"), await store.get("R2")
    assert r1 is not None and r2 is not None
    assert (r1.last_seq, r1.node_seq, r1.status) == (3, 3, "running")
    assert (r2.last_seq, r2.node_seq, r2.provider_session_id) == (2, 2, "ps-2")
    # A retried chunk (its commit had landed): appending is a no-op, the update is still applied.
    assert await store.write_batch([EventsOp("R2", 1, 2, b"two"), UpdateOp("R2", {"node_seq": 7})]) == []
    r2 = await store.get("R2")
    assert r2 is not None and (r2.last_seq, r2.node_seq) == (2, 7)
    # An overlapping chunk is refused; the update after it is written all the same.
    skipped = await store.write_batch([EventsOp("R2", 2, 4, b"overlap"), UpdateOp("R2", {"node_seq": 8})])
    assert [(type(e), e.details["run_id"]) for e in skipped] == [(InvalidRecord, "R2")]
    r2 = await store.get("R2")
    assert r2 is not None and (r2.last_seq, r2.node_seq) == (2, 8)
    # A lost lease: both refused, each reported; an unknown run: both RunNotFound; a bad update field:
    # the chunk is written, the update refused.
    b = await store.take_lease("R1", "replica-b", seen_token=1, until=T0 + 30, now=T0 + 20)
    assert b is not None
    skipped = await store.write_batch([
        EventsOp("R1", 4, 4, b"lost", fence=a), UpdateOp("R1", {"node_seq": 99}, fence=a),
        EventsOp("NOPE", 1, 1, b"x"), UpdateOp("NOPE", {"node_seq": 1}),
        EventsOp("R3", 1, 1, b"r3"), UpdateOp("R3", {"node_seq": -1}),
    ])
    assert [(type(e), e.details["run_id"]) for e in skipped] == [
        (LeaseLost, "R1"), (LeaseLost, "R1"), (RunNotFound, "NOPE"), (RunNotFound, "NOPE"), (InvalidRecord, "R3")]
    r1, r3 = await store.get("R1"), await store.get("R3")
    assert r1 is not None and r3 is not None
    assert (r1.last_seq, r1.node_seq) == (3, 3)
    assert r3.last_seq == 1
    assert [c[2] for c in await store.events_after("R1", 0)] == [b"one"]
    assert [c[2] for c in await store.events_after("R3", 0)] == [b"r3"]


@ALL
async def test_renew_release_and_expired_leases(store: RunStore) -> None:
    await leased(store, "A1", "replica-a", created_at=T0 - 30)
    await leased(store, "A2", "replica-a", created_at=T0 - 20, status=QUEUED, prompt="do the thing")
    await leased(store, "A-DONE", "replica-a", created_at=T0 - 10)
    await store.update("A-DONE", status="completed", ended_at=T0)
    b1 = await leased(store, "B1", "replica-b", created_at=T0 - 40, until=T0 + 5)
    await store.create(record("NONE", created_at=T0 - 50))  # never leased: lease_expires 0
    held = await store.renew_leases("replica-a", until=T0 + 60)
    assert held == {"A1": 1, "A2": 1}  # the ended run is not held any more
    assert (await store.get("A1")).lease_expires == T0 + 60  # type: ignore[union-attr]
    assert (await store.get("A-DONE")).lease_expires == T0 + 10  # type: ignore[union-attr]
    assert (await store.get("B1")).lease_expires == T0 + 5  # type: ignore[union-attr]
    assert await store.renew_leases("replica-z", until=T0 + 60) == {}
    # Expired at T0+30: B1 and the never-leased run, oldest first; with the prompt of a queued one.
    assert [r.run_id for r in await store.expired_leases(now=T0 + 30)] == ["NONE", "B1"]
    assert [r.run_id for r in await store.expired_leases(now=T0 + 30, limit=1)] == ["NONE"]
    assert await store.expired_leases(now=T0 + 30, limit=0) == []
    late = await store.expired_leases(now=T0 + 61)
    assert [r.run_id for r in late] == ["NONE", "B1", "A1", "A2"]
    assert late[3].prompt == "do the thing" and late[3].lease_owner == "replica-a"
    # A graceful handover: released, another replica takes it at once (before its until).
    assert await store.release_lease("B1", Lease("replica-b", 7)) is False  # not the held token
    assert await store.release_lease("B1", Lease("replica-a", 1)) is False
    assert await store.release_lease("B1", b1) is True
    assert (await store.get("B1")).lease_expires == 0.0  # type: ignore[union-attr]
    assert await store.take_lease("B1", "replica-a", seen_token=1, until=T0 + 9, now=T0 + 1) == Lease("replica-a", 2)
    assert await store.release_lease("B1", b1) is False
    assert await store.release_lease("NOPE", b1) is False


# --- replicas ------------------------------------------------------------------------------------


@ALL
async def test_replicas_heartbeat_expire_and_count_their_leases(store: RunStore) -> None:
    await store.heartbeat_replica("replica-b", "10.0.0.2:7000", now=T0, until=T0 + 10)
    await store.heartbeat_replica("replica-a", "10.0.0.1:7000", now=T0, until=T0 + 10)
    await leased(store, "R1", "replica-a")
    await leased(store, "R2", "replica-a", until=T0 + 3)
    await leased(store, "R3", "replica-a")
    await store.update("R3", status="completed", ended_at=T0)
    assert await store.replicas(now=T0 + 1) == [
        ReplicaRecord("replica-a", "10.0.0.1:7000", T0, T0, T0 + 10, 2),
        ReplicaRecord("replica-b", "10.0.0.2:7000", T0, T0, T0 + 10, 0),
    ]
    assert [r.leases for r in await store.replicas(now=T0 + 5)] == [1, 0]  # R2's lease expired
    await store.heartbeat_replica("replica-a", "10.0.0.9:7000", now=T0 + 8, until=T0 + 18)
    assert [(r.replica_id, r.address, r.started_at, r.heartbeat_at) for r in await store.replicas(now=T0 + 12)] == [
        ("replica-a", "10.0.0.9:7000", T0, T0 + 8)]  # b missed its heartbeat: not live
    # Back after it was dead (same id): a new start.
    await store.heartbeat_replica("replica-b", "10.0.0.2:7000", now=T0 + 20, until=T0 + 30)
    assert [(r.replica_id, r.started_at) for r in await store.replicas(now=T0 + 20)] == [("replica-b", T0 + 20)]
    await store.remove_replica("replica-b")
    await store.remove_replica("never-was")
    assert await store.replicas(now=T0 + 20) == []


# --- the fleet queue -----------------------------------------------------------------------------


@ALL
async def test_queue_orders_by_priority_then_fifo(store: RunStore) -> None:
    plan = [("Q1", 0, 10.0), ("Q2", 5, 30.0), ("Q3", 0, 5.0), ("Q4", 5, 20.0), ("Q5", -3, 1.0), ("Q6", 0, 10.0)]
    for run_id, priority, at in plan:
        await store.create(record(run_id, status=QUEUED, priority=priority, queued_at=at, owner=f"o{at:.0f}",
                                  prompt=f"prompt {run_id}"))
    await store.create(record("RUNNING", status="running", priority=1000))
    await store.create(record("DEFAULT", status=QUEUED, created_at=15.0))  # queued_at defaults to created_at
    order = ["Q4", "Q2", "Q3", "Q1", "Q6", "DEFAULT", "Q5"]  # priority desc, queued_at asc, run_id asc
    got = await store.queued()
    assert [r.run_id for r in got] == order
    assert got[0].prompt == "prompt Q4" and got[0].priority == 5  # a queued run is startable from its record
    assert (await store.get("DEFAULT")).queued_at == 15.0  # type: ignore[union-attr]
    assert [r.run_id for r in await store.queued(limit=3)] == order[:3]
    assert [r.run_id for r in await store.queued(owner="o10")] == ["Q1", "Q6"]
    assert await store.queued(lease_owner="replica-a") == []
    assert await store.take_lease("Q6", "replica-a", seen_token=0, until=T0 + 1, now=T0) is not None
    assert await store.take_lease("Q2", "replica-a", seen_token=0, until=T0 + 1, now=T0) is not None
    assert [r.run_id for r in await store.queued(lease_owner="replica-a")] == ["Q2", "Q6"]
    assert [r.run_id for r in await store.queued(lease_owner="replica-a", owner="o10")] == ["Q6"]
    assert await store.queued(limit=0) == []
    assert [await store.queue_position(run_id) for run_id in order] == list(range(1, 8))
    assert await store.queue_position("RUNNING") is None and await store.queue_position("NOPE") is None
    assert await store.queue_stats() == (7, 1.0)
    await store.update("Q4", expect_status=QUEUED, status="pending", prompt="")  # placed
    assert await store.queue_position("Q2") == 1 and await store.queue_position("Q4") is None
    assert await store.queue_stats() == (6, 1.0)


@ALL
async def test_queue_position_agrees_with_the_order_on_random_queues(store: RunStore) -> None:
    rng = random.Random(12)
    for i in range(60):
        run_id = f"R{rng.randrange(10**6):06d}-{i}"
        await store.create(record(run_id, priority=rng.choice([-1, 0, 0, 2]), status=QUEUED,
                                  queued_at=float(rng.choice([1, 2, 3, 4]))))  # many ties
        if i % 17 == 0:
            await store.update(run_id, queued_at=None)  # and a few NULLs: last within their priority
    ordered = await store.queued()
    assert len(ordered) == 60
    expected = sorted(ordered, key=lambda r: (-r.priority, r.queued_at is None, r.queued_at or 0.0, r.run_id))
    assert [r.run_id for r in ordered] == [r.run_id for r in expected]
    assert [await store.queue_position(r.run_id) for r in ordered] == list(range(1, 61))
    assert await store.queue_stats() == (60, 1.0)


@ALL
async def test_an_empty_queue(store: RunStore) -> None:
    assert await store.queued() == [] and await store.queue_stats() == (0, None)
    await store.create(record("R1", status=QUEUED, queued_at=None, created_at=7.0))
    await store.update("R1", queued_at=None)  # a caller's explicit None: still counted, no oldest
    assert await store.queue_stats() == (1, None) and await store.queue_position("R1") == 1


# --- hostile input -------------------------------------------------------------------------------


@ALL
async def test_bad_input_to_the_replica_methods_is_invalid_record(store: RunStore) -> None:
    await store.create(record("R1"))
    hostile: Any = store  # the calls a typed caller cannot make
    calls: list[Any] = [
        lambda: hostile.take_lease("R1", "", seen_token=0, until=T0, now=T0),
        lambda: hostile.take_lease("R1", "r" * 65, seen_token=0, until=T0, now=T0),
        lambda: hostile.take_lease("R1", "a\x00b", seen_token=0, until=T0, now=T0),
        lambda: hostile.take_lease("R1", 7, seen_token=0, until=T0, now=T0),
        lambda: hostile.take_lease("R1", "a", seen_token=-1, until=T0, now=T0),
        lambda: hostile.take_lease("R1", "a", seen_token=2**63 - 1, until=T0, now=T0),
        lambda: hostile.take_lease("R1", "a", seen_token=2**64, until=T0, now=T0),
        lambda: hostile.take_lease("R1", "a", seen_token="0", until=T0, now=T0),
        lambda: hostile.take_lease("R1", "a", seen_token=True, until=T0, now=T0),
        lambda: hostile.take_lease("R1", "a", seen_token=0, until=float("inf"), now=T0),
        lambda: hostile.take_lease("R1", "a", seen_token=0, until=T0, now=float("nan")),
        lambda: hostile.take_lease("R1", "a", seen_token=0, until=-1.0, now=T0),
        lambda: hostile.take_lease("R" * 200, "a", seen_token=0, until=T0, now=T0),
        lambda: hostile.take_lease(None, "a", seen_token=0, until=T0, now=T0),
        lambda: hostile.renew_leases("", until=T0),
        lambda: hostile.renew_leases("a", until="soon"),
        lambda: hostile.release_lease("R1", ("a", 1)),
        lambda: hostile.release_lease("R1", None),
        lambda: hostile.release_lease("R1", Lease("a", -1)),
        lambda: hostile.release_lease("R1", Lease("", 1)),
        lambda: hostile.expired_leases(now=T0, limit=-1),
        lambda: hostile.expired_leases(now=T0, limit=2**64),
        lambda: hostile.expired_leases(now=T0, limit=1.5),
        lambda: hostile.expired_leases(now=None),
        lambda: hostile.heartbeat_replica("", "x", now=T0, until=T0),
        lambda: hostile.heartbeat_replica("r", "x" * 513, now=T0, until=T0),
        lambda: hostile.heartbeat_replica("r", None, now=T0, until=T0),
        lambda: hostile.heartbeat_replica("r", "x", now=T0, until=float("inf")),
        lambda: hostile.remove_replica("r" * 65),
        lambda: hostile.replicas(now=-5),
        lambda: hostile.queued(limit=-1),
        lambda: hostile.queued(owner="o" * 257),
        lambda: hostile.queued(owner=3),
        lambda: hostile.queued(lease_owner="r" * 65),
        lambda: hostile.queue_position(["R1"]),
        lambda: hostile.update("R1", fence=("a", 1), node_seq=1),
        lambda: hostile.update("R1", fence=Lease("a", 2**63), node_seq=1),
        lambda: hostile.update("R1", expect_status="exploded", node_seq=1),
        lambda: hostile.update("R1", expect_status=(), node_seq=1),
        lambda: hostile.update("R1", expect_status=5, node_seq=1),
        lambda: hostile.append_events("R1", 1, 1, b"x", fence="a"),
        lambda: hostile.events_after("R1", -1),
        lambda: hostile.events_after("R1", 2**64),
    ]
    for make in calls:
        with pytest.raises(InvalidRecord):
            await make()
    for bad in ({"priority": 1001}, {"priority": -1001}, {"priority": 1.5}, {"priority": True},
                {"queued_at": -1.0}, {"queue_deadline": float("nan")}, {"prompt": "p" * (2**20 + 1)},
                {"prompt": "a\x00b"}, {"prompt": None}, {"lease_owner": "o" * 65}, {"lease_token": -1},
                {"lease_expires": None}, {"status": "waiting"}):
        with pytest.raises(InvalidRecord):
            await store.create(record("BAD", **bad))
        with pytest.raises(InvalidRecord):
            await store.update("R1", **bad)
    assert await store.get("BAD") is None
    got = await store.get("R1")
    assert got is not None and (got.lease_owner, got.lease_token, got.priority, got.prompt) == ("", 0, 0, "")
    await store.create(record("BIG", status=QUEUED, prompt="p" * 2**20, priority=1000))  # the bounds are accepted
    assert (await store.get("BIG")).prompt == "p" * 2**20  # type: ignore[union-attr]


# --- the writer ----------------------------------------------------------------------------------


@ALL
async def test_writer_passes_fences_and_reports_lost_leases(store: RunStore, caplog: pytest.LogCaptureFixture) -> None:
    a = await leased(store, "R1", "replica-a")
    await store.create(record("R2"))
    lost: list[tuple[str, AsmError]] = []
    writer = StoreWriter(store, flush_interval_s=10.0, on_skipped=lambda run_id, err: lost.append((run_id, err)))
    await writer.submit_events("R1", 1, 1, b"mine", fence=a)
    writer.submit_update("R1", fence=a, node_seq=1)
    await writer.flush()
    assert lost == [] and (await store.get("R1")).node_seq == 1  # type: ignore[union-attr]
    assert await store.take_lease("R1", "replica-b", seen_token=1, until=T0 + 30, now=T0 + 20) is not None
    await writer.submit_events("R1", 2, 2, b"after the takeover", fence=a)
    writer.submit_events_nowait("R1", 3, 3, b"also", fence=a)
    writer.submit_update("R1", fence=a, status="failed")
    writer.submit_update("R2", status="running")  # the rest of the batch is written
    await writer.flush()
    assert [(run_id, type(err)) for run_id, err in lost] == [("R1", LeaseLost)] * 3
    assert writer.rejected == 3 and writer.errors == 0
    assert [c[2] for c in await store.events_after("R1", 0)] == [b"mine"]
    assert (await store.get("R1")).status == "pending"  # type: ignore[union-attr]
    assert (await store.get("R2")).status == "running"  # type: ignore[union-attr]
    assert any("dropped a fenced write of run R1" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    writer.submit_update("R404", status="failed")  # RunNotFound reaches the hook too
    await writer.flush()
    assert lost[-1][0] == "R404" and isinstance(lost[-1][1], RunNotFound)
    with pytest.raises(InvalidRecord):
        writer.submit_update("R1", fence=("a", 1), status="failed")  # type: ignore[arg-type]
    with pytest.raises(InvalidRecord):
        await writer.submit_events("R1", 4, 4, b"x", fence="a")  # type: ignore[arg-type]
    await writer.close()


class _Recorder:
    def __init__(self, inner: RunStore) -> None:
        self.inner = inner
        self.batches: list[list[Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def write_batch(self, ops: Any) -> list[AsmError]:
        self.batches.append(list(ops))
        return await self.inner.write_batch(ops)


async def test_writer_merges_updates_only_with_the_same_fence_and_no_status_check() -> None:
    mem = MemoryStore()
    a, b = Lease("replica-a", 1), Lease("replica-b", 2)
    await mem.create(record("R1", status=QUEUED))
    await mem.update("R1", lease_owner="replica-a", lease_token=1)
    recorder = _Recorder(mem)
    hook_calls: list[str] = []

    def broken_hook(run_id: str, err: AsmError) -> None:
        hook_calls.append(run_id)
        raise RuntimeError("a bug in the hook")

    writer = StoreWriter(recorder, flush_interval_s=10.0, on_skipped=broken_hook)
    writer.submit_update("R1", fence=a, node_seq=1)
    writer.submit_update("R1", fence=a, node_seq=2)  # merged
    writer.submit_update("R1", fence=b, node_seq=3)  # another fence: its own op (it fails; a's do not)
    writer.submit_update("R1", fence=a, expect_status=QUEUED, status="pending")  # a CAS: its own op
    writer.submit_update("R1", fence=a, node_seq=4)  # not merged into the CAS
    writer.submit_update("R1", fence=a, expect_status=QUEUED, status="running")  # fails: it is pending now
    writer.submit_update("R1", fence=a, provider_session_id="p")
    await writer.flush()
    ops = recorder.batches[0]
    assert [(op.fields, op.fence, op.expect_status) for op in ops] == [
        ({"node_seq": 2}, a, None), ({"node_seq": 3}, b, None), ({"status": "pending"}, a, QUEUED),
        ({"node_seq": 4}, a, None), ({"status": "running"}, a, QUEUED), ({"provider_session_id": "p"}, a, None)]
    got = await mem.get("R1")
    assert got is not None and (got.node_seq, got.status, got.provider_session_id) == (4, "pending", "p")
    assert hook_calls == ["R1", "R1"] and writer.rejected == 2  # the hook's exception did not stop the writer
    writer.submit_update("R1", fence=a, node_seq=5)
    await writer.flush()
    assert (await mem.get("R1")).node_seq == 5  # type: ignore[union-attr]
    await writer.close()


# --- two replicas racing -------------------------------------------------------------------------


@pytest.mark.slow
@DURABLE
async def test_two_stores_racing_take_lease_one_wins_each_round(make_store: StoreFactory) -> None:
    """Two stores with engines of their own (two replicas) race for the same runs: each round, every
    run is won by exactly one, and the loser's fenced write then fails."""
    first, second = await make_store(), await make_store()
    runs = [f"R{i:02d}" for i in range(8)]
    for run_id in runs:
        await first.create(record(run_id, status="running"))
    tokens = dict.fromkeys(runs, 0)
    owners = {first: "replica-a", second: "replica-b"}
    wins = {"replica-a": 0, "replica-b": 0}
    for rnd in range(25):
        now = T0 + 10 * rnd + 5  # every lease of the previous round (until now - 5 + 4) has expired
        attempts = [(run_id, s) for run_id in runs for s in (first, second)]
        random.Random(rnd).shuffle(attempts)
        results = await asyncio.gather(*(
            s.take_lease(run_id, owners[s], seen_token=tokens[run_id], until=now + 4, now=now)
            for run_id, s in attempts))
        for run_id in runs:
            won = [lease for (rid, _), lease in zip(attempts, results, strict=True) if rid == run_id and lease]
            assert len(won) == 1, (rnd, run_id, won)
            assert won[0].token == tokens[run_id] + 1
            tokens[run_id] = won[0].token
            wins[won[0].owner] += 1
            got = await second.get(run_id)
            assert got is not None and (got.lease_owner, got.lease_token) == (won[0].owner, won[0].token)
            loser = Lease("replica-b" if won[0].owner == "replica-a" else "replica-a", won[0].token)
            with pytest.raises(LeaseLost):
                await first.update(run_id, fence=loser, node_seq=rnd)
    assert sum(wins.values()) == 25 * len(runs)


@pytest.mark.slow
async def test_postgresql_fenced_writes_racing_a_takeover(pg: PostgresServer) -> None:
    """Replica A appends fenced events while replica B takes the run over: every chunk A got in is
    before B's lease (A's writes stop at the takeover, none lands after B's first write)."""
    url = pg.create_database()
    a_store, b_store = open_store(url), open_store(url)
    await a_store.open()
    await b_store.open()
    try:
        for rnd in range(10):
            run_id = f"RACE{rnd}"
            await a_store.create(record(run_id, status="running"))
            a = await a_store.take_lease(run_id, "replica-a", seen_token=0, until=T0 + 1, now=T0)
            assert a is not None

            async def a_writes(run_id: str = run_id, a: Lease = a) -> int:
                seq = 0
                while True:
                    try:
                        await a_store.append_events(run_id, seq + 1, seq + 1, b"A", fence=a)
                    except LeaseLost:
                        return seq
                    seq += 1

            writer = asyncio.create_task(a_writes())
            await asyncio.sleep(0.01 * (rnd % 4))
            b = await b_store.take_lease(run_id, "replica-b", seen_token=1, until=T0 + 9, now=T0 + 2)
            assert b == Lease("replica-b", 2)
            a_last = await asyncio.wait_for(writer, 10)
            await b_store.append_events(run_id, a_last + 1, a_last + 1, b"B", fence=b)
            chunks = await b_store.events_after(run_id, 0)
            assert [c[2] for c in chunks] == [b"A"] * a_last + [b"B"]
    finally:
        await a_store.close()
        await b_store.close()


@pytest.mark.slow
async def test_postgresql_renewals_and_write_batches_of_one_replica_never_deadlock(pg: PostgresServer) -> None:
    """A replica renews all its leases while its write-behind batch updates many of its runs: both lock
    the runs' rows in run_id order, so PostgreSQL never has to fail one of them as a deadlock (two failed
    renewals in a row would fence the replica). The batch lists its runs in reverse order on purpose."""
    url = pg.create_database()
    store = open_store(url)
    await store.open()
    try:
        lease = Lease("replica-a", 1)
        ids = [f"DL{i:03d}" for i in range(60)]
        for run_id in ids:
            await store.create(record(run_id, status="running", lease_owner="replica-a", lease_token=1,
                                      lease_expires=T0 + 5))
        failures: list[BaseException] = []

        async def renew() -> None:
            for _ in range(40):
                try:
                    await store.renew_leases("replica-a", until=T0 + 10)
                except StoreError as err:
                    failures.append(err)

        async def write() -> None:
            for n in range(40):
                ops = [UpdateOp(run_id, {"node_seq": n}, fence=lease) for run_id in reversed(ids)]
                try:
                    assert await store.write_batch(ops) == []
                except StoreError as err:
                    failures.append(err)

        await asyncio.wait_for(asyncio.gather(renew(), write(), renew(), write()), 120)
        assert failures == [], failures[:3]
    finally:
        await store.close()


# --- claim and observe ---------------------------------------------------------------------------


async def test_postgresql_replicas_share_the_store_and_sqlite_says_it_is_single_controller(
        pg: PostgresServer, tmp_path: Path) -> None:
    url = pg.create_database()
    first, second = open_store(url), open_store(url)
    await first.open()
    await second.open()
    try:
        await first.claim()
        await second.claim()  # replicas: no store-wide lock
        await second.create(record("R1"))
        assert await first.get("R1") is not None
    finally:
        await first.close()
        await second.close()
    lite = f"sqlite:///{tmp_path}/state.db"
    one, two = open_store(lite), open_store(lite)
    await one.open()
    await two.open()
    try:
        await one.claim()
        with pytest.raises(StoreLocked, match="use PostgreSQL for replicas"):
            await two.claim()
    finally:
        await one.close()
        await two.close()


@DURABLE
async def test_every_sql_operation_reports_its_latency(backend_url: str) -> None:
    seen: list[tuple[str, float]] = []
    sql = open_store(backend_url, observe=lambda op, s: seen.append((op, s)))
    await sql.open()
    try:
        await sql.claim()
        await sql.meta_set("k", "v")
        await sql.meta_get("k")
        await sql.create(record("R1"))
        await sql.get("R1")
        lease = await sql.take_lease("R1", "a", seen_token=0, until=T0 + 1, now=T0)
        assert lease is not None
        await sql.update("R1", fence=lease, node_seq=1)
        await sql.append_events("R1", 1, 1, b"x", fence=lease)
        await sql.end_run("R1", 1, 1, b"x", fence=lease, node_seq=1)
        await sql.events_after("R1", 0)
        await sql.write_batch([UpdateOp("R1", {"node_seq": 2})])
        await sql.renew_leases("a", until=T0 + 2)
        await sql.release_lease("R1", lease)
        await sql.expired_leases(now=T0)
        await sql.heartbeat_replica("a", "h:1", now=T0, until=T0 + 1)
        await sql.replicas(now=T0)
        await sql.remove_replica("a")
        await sql.queued()
        await sql.queue_position("R1")
        await sql.queue_stats()
        await sql.list_runs()
        await sql.in_flight()
        await sql.sessions()
        await sql.prune(0.0, max_log_bytes=10)
        await sql.log_bytes()
        from asm_controller._store import EndpointLeaseRecord  # schema v3: the inference endpoint's leases
        await sql.put_endpoint_lease(EndpointLeaseRecord("L1", "alice", "shell", "", "sha256:" + "0" * 64, T0, T0 + 1))
        await sql.get_endpoint_lease("L1")
        await sql.expired_endpoint_leases(now=T0)
        await sql.delete_endpoint_lease("L1")
        with pytest.raises(LeaseLost):
            await sql.update("R1", fence=Lease("b", 1), node_seq=3)  # a failed op is timed too
    finally:
        await sql.close()
    ops = [op for op, _ in seen]
    assert set(ops) == set(STORE_OPS) and all(s >= 0 for _, s in seen)
    assert ops.count("update") == 2 and ops[0] == "open"
    def broken_hook(op: str, seconds: float) -> None:
        raise ZeroDivisionError(op)

    broken = open_store(backend_url, observe=broken_hook)  # a broken hook never fails the store
    await broken.open()
    try:
        assert await broken.get("R1") is not None
    finally:
        await broken.close()
    MemoryStore(observe=lambda op, s: None)  # accepted (and ignored)
    assert open_store("memory:", observe=lambda op, s: None).url == "memory:"
