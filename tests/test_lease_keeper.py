"""The lease keeper's decisions, on a memory store and a recording host (no processes): what it
renews, when it fences, what it takes over and what it leaves alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest

from asm_controller._lease import FENCE_AT, LeaseKeeper
from asm_controller._store import Lease, MemoryStore, RunRecord
from asm_wire import StoreError


class FakeRun:
    def __init__(self, run_id: str, lease: Lease | None, state: str = "active") -> None:
        self.run_id, self.lease, self.state = run_id, lease, state
        self.lease_at = 0.0


class Host:
    """Records what the keeper asks of the service."""

    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.released: list[str] = []
        self.taken: list[tuple[str, Lease]] = []

    def leased_runs(self) -> Sequence[Any]:
        return [r for r in self.runs.values() if r.lease is not None and r.state != "done"]

    def follows(self, run_id: str) -> bool:
        return run_id in self.runs

    def release(self, run: Any, why: str) -> None:
        self.released.append(run.run_id)
        self.runs.pop(run.run_id, None)

    async def take_over(self, rec: RunRecord, lease: Lease) -> None:
        self.taken.append((rec.run_id, lease))
        self.runs[rec.run_id] = FakeRun(rec.run_id, lease)


class FlakyStore(MemoryStore):
    """A memory store whose lease renewals can be made to fail (the database unreachable)."""

    down = False

    async def renew_leases(self, owner: str, *, until: float) -> dict[str, int]:
        if self.down:
            raise StoreError("the run store memory: failed (renew_leases): connection refused")
        return await super().renew_leases(owner, until=until)


async def _record(store: MemoryStore, run_id: str, owner: str, *, expires: float, status: str = "running") -> None:
    await store.create(RunRecord(run_id=run_id, session_id="s", provider="shell", status=status, node_address="n:1",
                                 lease_owner=owner, lease_token=1, lease_expires=expires))


async def test_an_expired_lease_of_another_replica_is_taken_over_once_with_a_new_token() -> None:
    store = MemoryStore()
    now = time.time()
    await _record(store, "dead-ones", "replica-x", expires=now - 1)
    await _record(store, "live-ones", "replica-y", expires=now + 60)
    host_a, host_b = Host(), Host()
    a = LeaseKeeper(store, host_a, replica_id="a", address="a:1", ttl_s=3)
    b = LeaseKeeper(store, host_b, replica_id="b", address="b:1", ttl_s=3)
    assert await a.start() == 1 and await b.start() == 0
    try:
        assert host_a.taken == [("dead-ones", Lease("a", 2))] and host_b.taken == []
        rec = await store.get("dead-ones")
        assert rec is not None and (rec.lease_owner, rec.lease_token) == ("a", 2) and rec.lease_expires > now
        await b.tick()  # the other replica's lease is live: b leaves it alone
        assert host_b.taken == []
    finally:
        await a.stop()
        await b.stop()


async def test_a_run_that_ended_here_but_is_not_recorded_yet_is_not_taken_again() -> None:
    """Its end is on its way to the store (write-behind) with the current token: taking the lease again
    would bump the token and the end would be refused (lease_lost)."""
    store = MemoryStore()
    host = Host()
    keeper = LeaseKeeper(store, host, replica_id="a", address="a:1", ttl_s=3)
    await keeper.start()
    try:
        await _record(store, "just-ended", "a", expires=time.time() - 1)
        host.runs["just-ended"] = FakeRun("just-ended", Lease("a", 1), state="done")
        await keeper.tick()
        rec = await store.get("just-ended")
        assert rec is not None and rec.lease_token == 1 and host.taken == []
    finally:
        await keeper.stop()


async def test_a_lease_taken_by_another_replica_releases_the_run_here() -> None:
    store = MemoryStore()
    host = Host()
    keeper = LeaseKeeper(store, host, replica_id="a", address="a:1", ttl_s=3)
    await keeper.start()
    try:
        await _record(store, "stolen", "a", expires=time.time() + 60)
        run = FakeRun("stolen", Lease("a", 1))
        host.runs["stolen"] = run
        run.lease_at = time.monotonic() - 1
        other = await store.take_lease("stolen", "b", seen_token=1, until=time.time() + 60, now=time.time() + 120)
        assert other == Lease("b", 2)
        await keeper.tick()
        assert host.released == ["stolen"]
    finally:
        await keeper.stop()


async def test_a_replica_that_cannot_renew_fences_itself_before_its_leases_can_expire() -> None:
    ttl = 0.6
    store = FlakyStore()
    host = Host()
    keeper = LeaseKeeper(store, host, replica_id="a", address="a:1", ttl_s=ttl)
    await keeper.start()
    try:
        await _record(store, "mine", "a", expires=time.time() + ttl)
        host.runs["mine"] = FakeRun("mine", Lease("a", 1))
        store.down = True
        deadline = time.monotonic() + 5
        while keeper.healthy and time.monotonic() < deadline:
            await keeper.tick()
            await asyncio.sleep(0.05)
        fenced_after = time.monotonic() - keeper.last_ok
        assert not keeper.healthy and host.released == ["mine"]
        assert FENCE_AT * ttl <= fenced_after < ttl, fenced_after  # before any other replica may take it
        store.down = False
        await keeper.tick()
        assert keeper.healthy
        # Its lease was never taken by anyone: it is ours again, the run followed again.
        assert [r for r, _ in host.taken] == ["mine"]
    finally:
        await keeper.stop()


async def test_a_replica_id_live_elsewhere_is_refused() -> None:
    store = MemoryStore()
    first = LeaseKeeper(store, Host(), replica_id="same", address="a:1", ttl_s=3)
    await first.start()
    try:
        with pytest.raises(Exception) as refused:
            await LeaseKeeper(store, Host(), replica_id="same", address="b:1", ttl_s=3).start()
        assert getattr(refused.value, "reason", "") == "replica_id_in_use"
    finally:
        await first.stop()


def test_the_ttl_is_bounded() -> None:
    with pytest.raises(Exception, match="lease TTL"):
        LeaseKeeper(MemoryStore(), Host(), replica_id="a", address="a:1", ttl_s=0.1)
