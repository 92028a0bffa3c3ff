"""The fleet queue: runs no node can take now wait for a slot instead of failing ``at_capacity``.

A run whose every eligible node is full (by its last load report, or by the node's own
``at_capacity`` refusal) is recorded as ``queued`` in the run store (priority, time, prompt:
another replica can start it after a failover) and waits here. Waiters are served FIFO within a
priority, higher priorities first; one grant is outstanding at a time: the head retries
admission, and on success the next head is woken at once (several slots may have freed).

Wake-ups come from what frees a slot, never from polling the nodes: a run of this replica
ending, and a heartbeat showing a node with room (checked in memory once a second while
anything waits: heartbeats carry the nodes' load, so slots freed by other replicas are seen
too). ``queue_timeout_ms`` ends a waiter with a typed ``queue_timeout``; an interrupt ends it
as ``user_cancelled``. :class:`NullFleetQueue` is the library default: no queue, a full fleet
refuses at once, as before.

A run that already started on a node (a resume elsewhere, ``on_node_lost="resume"``) waits here
too, but the registry never records it as ``queued`` (see ``StoreRegistry.queued``): its prompt
already ran, so no replica may start it again from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from asm_wire import AsmError, make_error

if TYPE_CHECKING:
    from asm_controller._metrics import ControllerMetrics
    from asm_controller._run import Run

log = logging.getLogger("asm_controller.queue")

#: How often, while runs wait, the queue looks at the nodes' last load reports (in memory).
TICK_S = 1.0


class NullFleetQueue:
    """No fleet queue (a library session): a run no node can take fails at once."""

    enabled = False

    def entitled(self, run: Run) -> bool:
        return True

    async def wait(self, run: Run, refusal: AsmError | None) -> None:
        if refusal is not None:
            raise refusal

    def leave(self, run: Run) -> None:
        return None

    def cancel(self, run: Run) -> bool:
        return False

    def wake(self) -> None:
        return None

    def waiting(self) -> int:
        return 0


def _raise_if_interrupted(run: Run) -> None:
    if run.cancel_requested:
        raise make_error("user_cancelled", "runtime", "Run interrupted while queued")


@dataclass(order=True)
class _Waiter:
    sort_key: tuple[int, float, int]
    run: Run = field(compare=False)
    granted: asyncio.Future[None] | None = field(default=None, compare=False)


class FleetQueue:
    """Waiting runs of one controller replica, durable in the registry (see the module docstring)."""

    enabled = True

    def __init__(self, *, max_queued: int, record: Callable[[Run], Awaitable[None]],
                 depth: Callable[[], Awaitable[int]], room: Callable[[], bool],
                 metrics: ControllerMetrics | None = None,
                 ended: Callable[[list[str]], Awaitable[set[str]]] | None = None) -> None:
        self.max_queued = max_queued
        self._record = record  # the registry: the run is durably queued (status, priority, prompt)
        self._depth = depth  # fleet-wide queue depth (the store)
        self._room = room  # does some node report room? (the pool's last heartbeats)
        # Which of these ids have ended in the store (terminal, whoever holds the lease, or gone). Not
        # "which are no longer queued by this replica": a run whose lease moved is the LeaseKeeper's
        # (it releases it: a detach, never an end), and a run's own refused try leaves it pending.
        self._ended = ended
        self._metrics = metrics
        self._waiters: dict[str, _Waiter] = {}
        self._order = itertools.count()
        self._granted: _Waiter | None = None
        self._wake_pending = False
        self._task: asyncio.Task[None] | None = None

    # -- the run's side (Run._admit) ---------------------------------------------------------

    def entitled(self, run: Run) -> bool:
        """May this run try the nodes now? Not while earlier runs of its priority or higher wait."""
        w = self._waiters.get(run.run_id)
        if w is not None:
            return self._granted is w
        return not any(o.run.priority >= run.priority for o in self._waiters.values())

    async def wait(self, run: Run, refusal: AsmError | None) -> None:
        """Wait for this run's turn (recording it as queued first); raises queue_timeout / queue_full /
        user_cancelled, or ``refusal`` when the queue is off."""
        w = self._waiters.get(run.run_id)
        if w is None:
            if self.max_queued <= 0:
                if refusal is not None:
                    raise refusal
                return
            if await self._depth() >= self.max_queued:
                raise make_error("queue_full", "runtime",
                                 f"every node is full and the fleet queue holds its limit of {self.max_queued} runs",
                                 reason="queue_full")
            if run.queued_at is None:
                run.queued_at = time.time()
            if run.queue_deadline is None and run.opts_queue_timeout_s:
                run.queue_deadline = run.queued_at + run.opts_queue_timeout_s
            _raise_if_interrupted(run)  # interrupted during the depth read (no waiter to cancel yet)
            await self._record(run)
            # An interrupt during the record found no waiter (Run.interrupt's cancel returned False): it
            # ends the run here, or the run would wait for a slot with the interrupt accepted. The
            # driver records its end (the store says queued now).
            _raise_if_interrupted(run)
            w = _Waiter((-run.priority, run.queued_at, next(self._order)), run)
            self._waiters[run.run_id] = w
            log.info("run %s queued (priority %d): %s", run.run_id, run.priority,
                     refusal.message if refusal is not None else "runs are waiting ahead of it")
            self._ensure_ticker()
        elif run.recorded and not run.fleet_queued:
            # Its try was placed (the registry's compare-and-set moved it to "pending" on a node, its
            # prompt blanked) and then refused: record it queued again, or the store would keep it
            # pending on a node that never had it (another replica's takeover would adopt it there
            # and find nothing: node_lost, its prompt gone). Still granted during the write: the
            # tick leaves it alone and no other head tries meanwhile.
            try:
                await self._record(run)
            except BaseException:
                self._remove(w)
                raise
            if run.cancel_requested:
                self._remove(w)
                _raise_if_interrupted(run)
        if self._granted is w:
            self._granted = None  # its try failed: it waits again, at its place
        w.granted = asyncio.get_running_loop().create_future()
        timeout = None if run.queue_deadline is None else max(0.0, run.queue_deadline - time.time())
        try:
            await asyncio.wait_for(asyncio.shield(w.granted), timeout)
        except asyncio.CancelledError:
            self._remove(w)  # the controller detaches (stops): the run stays queued in the store
            raise
        except TimeoutError:
            self._remove(w)
            if self._metrics is not None:
                self._metrics.queue_timeouts.inc()
            waited = time.time() - (run.queued_at or time.time())
            # ASM's kind for a queued run that never started (timeout, runtime), with its own reason.
            raise make_error("timeout", "runtime",
                             f"run {run.run_id} waited {waited:.1f}s in the fleet queue and no node had room "
                             "(queue_timeout_ms)", reason="queue_timeout") from None

    def leave(self, run: Run) -> None:
        """The run is placed (or ended): the next waiter's turn."""
        w = self._waiters.get(run.run_id)
        if w is None:
            return
        self._remove(w)
        if self._metrics is not None and run.queued_at is not None:
            self._metrics.queue_wait.observe(max(0.0, time.time() - run.queued_at))
        self.wake()

    def cancel(self, run: Run) -> bool:
        """Interrupt a waiting run: it ends user_cancelled. False when it is not waiting here."""
        w = self._waiters.get(run.run_id)
        if w is None:
            return False
        self._remove(w)
        if w.granted is not None and not w.granted.done():
            w.granted.set_exception(make_error("user_cancelled", "runtime", "Run interrupted while queued"))
        self.wake()
        return True

    # -- wake-ups --------------------------------------------------------------------------

    def wake(self) -> None:
        """Something may have freed a slot: grant the head its try (coalesced, on the next loop turn)."""
        if self._wake_pending or not self._waiters:
            return
        self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # no running loop: nothing waits either
            asyncio.get_running_loop().call_soon(self._grant)

    def _grant(self) -> None:
        self._wake_pending = False
        if self._granted is not None and self._granted.run.run_id in self._waiters:
            return  # the head is trying
        self._granted = None
        for w in sorted(self._waiters.values()):
            if w.granted is not None and not w.granted.done():
                self._granted = w
                w.granted.set_result(None)
                return

    def waiting(self) -> int:
        return len(self._waiters)

    def _remove(self, w: _Waiter) -> None:
        self._waiters.pop(w.run.run_id, None)
        if self._granted is w:
            self._granted = None

    def _ensure_ticker(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._tick(), name="asm-fleet-queue")

    async def _tick(self) -> None:
        while self._waiters:
            await asyncio.sleep(TICK_S)
            if self._ended is not None:
                await self._drop_ended_elsewhere()
            if self._room():
                self.wake()

    async def _drop_ended_elsewhere(self) -> None:
        """A queued run interrupted through another replica has ended in the store: end it here.

        Only an end counts. A run whose lease another replica took is still queued (there) or placed:
        the LeaseKeeper notices and releases it here (a detach: its client re-attaches), so a
        user_cancelled end is never given while another replica runs the prompt.
        """
        assert self._ended is not None
        ids = [rid for rid, w in self._waiters.items() if self._granted is not w]
        if not ids:
            return
        try:
            ended = await self._ended(ids)
        except AsmError as err:
            log.warning("fleet queue: cannot read the store: %s", err.message)
            return
        for rid in ids:
            w = self._waiters.get(rid)
            # Granted its try during the read: a compare-and-set on "queued" (its placement) decides
            # whether it was in fact ended elsewhere.
            if rid in ended and w is not None and self._granted is not w:
                w.run.cancel_requested = True
                self.cancel(w.run)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
