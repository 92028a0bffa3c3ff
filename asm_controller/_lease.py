"""Run leases: which controller replica follows which run, in the shared store.

Every run a replica records is leased to it (owner = its replica id, a fencing token, an
expiry). The :class:`LeaseKeeper` renews all of them in one statement every third of the TTL,
together with the replica's own heartbeat row. A replica that cannot renew for most of the TTL
(the store is unreachable: a partition, a dead database) *fences itself*: it stops following
its runs (they go on on their nodes) and refuses new ones, before any other replica can take
a lease over; so two replicas never act on one run. A run whose lease another replica took
over (its write with the old token failed, or the renewal no longer returns it) is released
the same way.

Each tick also looks for expired leases (a replica died) and takes them over with a
compare-and-set on the token: exactly one replica wins each run, re-attaches it on its node
from the last persisted seq, and goes on reducing it; a queued run waits again in the winner's
queue. At boot a replica with a stable ``--replica-id`` takes its own earlier leases back at
once; one with a fresh id waits for them to expire (at most the TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from asm_controller._store import Lease, RunRecord, RunStore
from asm_wire import AsmError, ConfigError

if TYPE_CHECKING:
    from asm_controller._metrics import ControllerMetrics
    from asm_controller._run import Run

log = logging.getLogger("asm_controller.lease")

#: A replica stops acting on its runs when it could not renew for this share of the TTL.
FENCE_AT = 0.7
#: A "now" past every lease's expiry (the store takes finite times only): an exclusive controller takes all.
_EVERY_LEASE = 1e15


class LeaseHost(Protocol):
    """What the keeper needs from the service (FleetApi)."""

    def leased_runs(self) -> Sequence[Run]: ...

    def follows(self, run_id: str) -> bool:
        """Does this process know the run (following it, or just ended and not yet recorded as such)?"""
        ...

    def release(self, run: Run, why: str) -> None: ...

    async def take_over(self, rec: RunRecord, lease: Lease) -> None: ...


class LeaseKeeper:
    """Renews this replica's leases, fences it when it cannot, and takes expired leases over."""

    def __init__(self, store: RunStore, host: LeaseHost, *, replica_id: str, address: str, ttl_s: float,
                 metrics: ControllerMetrics | None = None, clock: Callable[[], float] = time.time) -> None:
        if not 0.5 <= ttl_s <= 3600:
            raise ConfigError(f"the lease TTL must be between 0.5 and 3600 seconds, not {ttl_s}")
        self.store = store
        self.host = host
        self.replica_id = replica_id
        self.address = address
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.clock = clock
        #: True while this replica may act on its runs (it renewed recently enough).
        self.healthy = True
        self.last_ok = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._ticking = asyncio.Lock()

    async def start(self, *, exclusive: bool = False) -> int:
        """Join the store (refusing a replica id that is live elsewhere) and take over what is ours to take.

        ``exclusive``: this process is the store's only controller (SQLite, memory): every run still in
        flight or queued is taken over now, whoever leased it. Returns how many runs were taken over.
        """
        now = self.clock()
        if not exclusive:
            for rep in await self.store.replicas(now=now):
                if rep.replica_id == self.replica_id:
                    raise ConfigError(
                        f"replica id {self.replica_id} is live in {self.store.url} (heartbeat "
                        f"{now - rep.heartbeat_at:.1f}s ago, at {rep.address}): give each replica its own "
                        "--replica-id", reason="replica_id_in_use")
        await self.store.heartbeat_replica(self.replica_id, self.address, now=now, until=now + self.ttl_s)
        taken = 0
        if exclusive:
            for rec in await self.store.expired_leases(now=_EVERY_LEASE, limit=1_000_000):
                taken += await self._take(rec, now=_EVERY_LEASE)
        else:
            # Our own earlier leases (a restart with the same --replica-id): back at once.
            held = await self.store.renew_leases(self.replica_id, until=now + self.ttl_s)
            for run_id in held:
                own = await self.store.get(run_id)
                if own is not None:
                    taken += await self._take(own, now=now)
            taken += await self._take_expired(now)
        self.last_ok = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="asm-lease-keeper")
        return taken

    async def _loop(self) -> None:
        interval = self.ttl_s / 3
        while True:
            await asyncio.sleep(interval * random.uniform(0.85, 1.0))
            try:
                await self.tick()
            except Exception:  # the keeper must outlive any single failure
                log.exception("lease keeper tick failed")

    async def tick(self) -> None:
        async with self._ticking:
            await self._tick()

    async def _tick(self) -> None:
        now, started = self.clock(), time.monotonic()
        until = now + self.ttl_s
        try:
            held = await self._renew(now, until)
        except AsmError as err:
            if self.metrics is not None:
                self.metrics.lease_renew_failures.inc()
            since = time.monotonic() - self.last_ok
            log.warning("cannot renew the leases of replica %s (%.1fs since the last renewal): %s",
                        self.replica_id, since, err.message)
            if since >= FENCE_AT * self.ttl_s and self.healthy:
                self._fence(f"its store has been unreachable for {since:.1f}s")
            return
        self.last_ok = started
        if not self.healthy:
            log.warning("replica %s reaches its store again: taking runs again", self.replica_id)
            self.healthy = True
        for run in list(self.host.leased_runs()):
            lease = run.lease
            # A lease granted after this renewal started may not be in its answer yet.
            if lease is None or run.lease_at >= started:
                continue
            if held.get(run.run_id) != lease.token:
                self.lost(run, "its lease was taken over by another replica")
        if self.metrics is not None:
            self.metrics.leases_held.set(len(held))
            with contextlib.suppress(AsmError):
                self.metrics.replicas.set(len(await self.store.replicas(now=now)))
        # Our own leases this process does not know (released while the store was unreachable). A run
        # that just ended here is still known: its end is on its way to the store (write-behind).
        for run_id in [r for r in held if not self.host.follows(r)]:
            rec = await self.store.get(run_id)
            if rec is not None:
                await self._take(rec, now=now)
        await self._take_expired(now)

    async def _renew(self, now: float, until: float) -> dict[str, int]:
        """The heartbeat and the renewal, tried twice (a transient failure -- a dropped connection -- must
        not count toward fencing when the store answers a moment later)."""
        for attempt in (1, 2):
            try:
                await self.store.heartbeat_replica(self.replica_id, self.address, now=now, until=until)
                return await self.store.renew_leases(self.replica_id, until=until)
            except AsmError:
                if attempt == 2:
                    raise
                await asyncio.sleep(min(0.2, self.ttl_s / 20))
        raise AssertionError("unreachable")

    async def _take_expired(self, now: float) -> int:
        taken = 0
        for rec in await self.store.expired_leases(now=now):
            taken += await self._take(rec, now=now)
        return taken

    async def _take(self, rec: RunRecord, *, now: float) -> int:
        if rec.lease_owner == self.replica_id and self.host.follows(rec.run_id):
            return 0  # ours and followed here (expired in a pause): the next renewal extends it, same token
        lease = await self.store.take_lease(rec.run_id, self.replica_id, seen_token=rec.lease_token,
                                            until=self.clock() + self.ttl_s, now=now)
        if lease is None:
            return 0  # another replica won it
        # Act on the record as it is now, not as it was read before the compare-and-set: its old owner
        # may have written it in between (placed a queued run on a node, ended it). From here on no
        # fenced write of another replica lands, so this read is the state the takeover starts from.
        fresh = await self.store.get(rec.run_id)
        if fresh is None:
            return 0
        if rec.lease_owner and rec.lease_owner != self.replica_id:
            log.warning("took over run %s from replica %s (its lease expired)", rec.run_id, rec.lease_owner)
            if self.metrics is not None:
                self.metrics.lease_takeovers.inc()
        try:
            await self.host.take_over(fresh, lease)
        except AsmError as err:
            log.warning("run %s cannot be taken over: %s", rec.run_id, err.message)
            return 0
        return 1

    def lost(self, run: Run, why: str) -> None:
        """This replica must no longer act on ``run`` (fencing)."""
        if self.metrics is not None:
            self.metrics.leases_lost.inc()
        log.warning("replica %s stops following run %s: %s", self.replica_id, run.run_id, why)
        self.host.release(run, why)

    def _fence(self, why: str) -> None:
        self.healthy = False
        runs = list(self.host.leased_runs())
        log.error("replica %s fences itself (%s): it stops following its %d run(s) and takes no new ones "
                  "until it renews; another replica takes them over", self.replica_id, why, len(runs))
        for run in runs:
            self.lost(run, why)

    async def stop(self, *, release: Sequence[tuple[str, Lease]] = ()) -> None:
        """Stop renewing; hand ``release``d leases over at once (a graceful stop), and leave the replica table."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(AsmError):
            for run_id, lease in release:
                await self.store.release_lease(run_id, lease)
            await self.store.remove_replica(self.replica_id)
