"""One bounded queue with a named overflow policy, for every producer -> consumer hand-off.

The run driver's subscriber channel, the persistence writer, pubsub subscriptions and the
broadcaster/bridge pumps all need the same thing: a FIFO that is O(1) to feed from the run
path, bounded, with a choice of what happens when it is full:

* ``"block"``: :meth:`BoundedQueue.put` waits for room (back-pressure). :meth:`offer` cannot
  wait, so a full queue refuses the item (counted in ``dropped``).
* ``"drop_newest"``: the incoming item is refused (a slow consumer sees a prefix).
* ``"drop_oldest"``: the oldest queued item is evicted to make room (it sees the latest).
* ``"disconnect"``: the consumer is cut off: queued items are discarded, the queue is
  closed, and :meth:`get` raises :class:`QueueDisconnected` at once.

Ending it: :meth:`close` is the producer saying "no more" (the consumer drains what is
queued, then :meth:`get` raises :class:`QueueClosed`); :meth:`abandon` is the consumer
saying "I am gone" (queued items are discarded and every later put is a silent no-op, so
a producer blocked on back-pressure never waits for a reader that will not come).

Single event loop, not thread-safe (like :class:`asyncio.Queue`). Waiter futures are made
at wait time, so a queue can be built before any loop runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Final, Generic, Literal, TypeVar, get_args

from asm_wire import ConfigError

__all__ = ["OVERFLOW_POLICIES", "BoundedQueue", "Overflow", "QueueClosed", "QueueDisconnected", "QueueEmpty"]

T = TypeVar("T")

Overflow = Literal["block", "drop_newest", "drop_oldest", "disconnect"]
OVERFLOW_POLICIES: Final[tuple[Overflow, ...]] = get_args(Overflow)


class QueueEmpty(Exception):
    """:meth:`BoundedQueue.get_nowait` / :meth:`BoundedQueue.peek` on an empty queue."""


class QueueClosed(Exception):
    """:meth:`BoundedQueue.get` on a queue that is closed and drained (or abandoned)."""


class QueueDisconnected(QueueClosed):
    """The ``"disconnect"`` policy cut the consumer off: it fell ``maxsize`` items behind."""


class BoundedQueue(Generic[T]):
    """A FIFO of at most ``maxsize`` items with an overflow ``policy`` (see the module docstring).

    Counters: ``accepted`` (items queued), ``dropped`` (items refused, evicted, discarded by
    ``disconnect``, or offered after close/abandon).
    """

    __slots__ = ("_getters", "_items", "_putters", "abandoned", "accepted", "closed", "disconnected", "dropped",
                 "maxsize", "policy")

    def __init__(self, maxsize: int, policy: Overflow = "block") -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
            raise ConfigError(f"queue maxsize must be a positive integer, got: {maxsize!r}")
        if policy not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow policy must be one of {', '.join(OVERFLOW_POLICIES)}, got: {policy!r}")
        self.maxsize = maxsize
        self.policy: Overflow = policy
        self.accepted = 0
        self.dropped = 0
        self.closed = False
        self.abandoned = False
        self.disconnected = False
        self._items: deque[T] = deque()
        self._getters: list[asyncio.Future[None]] = []
        self._putters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    def __repr__(self) -> str:
        state = "abandoned" if self.abandoned else "disconnected" if self.disconnected else \
            "closed" if self.closed else "open"
        return (f"BoundedQueue(maxsize={self.maxsize}, policy={self.policy!r}, queued={len(self._items)}, "
                f"dropped={self.dropped}, {state})")

    # -- waking ------------------------------------------------------------------------------

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]], *, quiet: bool = False) -> None:
        """Wake every waiter (each re-checks its condition). ``quiet``: a waiter whose loop is
        gone is skipped instead of raising (for close/abandon, which must always succeed)."""
        if not waiters:
            return
        pending = waiters[:]
        waiters.clear()
        for fut in pending:
            if not fut.done():
                if quiet:
                    with contextlib.suppress(RuntimeError):
                        fut.set_result(None)
                else:
                    fut.set_result(None)

    @staticmethod
    async def _wait(waiters: list[asyncio.Future[None]]) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            await fut
        finally:
            if fut in waiters:
                waiters.remove(fut)

    # -- the producer's side -----------------------------------------------------------------

    def offer(self, item: T) -> bool:
        """Queue ``item`` without waiting, under the policy; True when it was queued.

        A full ``block`` queue refuses it (only :meth:`put` can wait). ``drop_oldest`` evicts
        the oldest item and returns True. ``disconnect`` refuses it and cuts the consumer off.
        """
        if self.closed or self.abandoned:
            self.dropped += 1
            return False
        items = self._items
        if len(items) >= self.maxsize:
            policy = self.policy
            if policy == "drop_oldest":
                items.popleft()
                self.dropped += 1
            elif policy == "disconnect":
                self.dropped += 1 + len(items)
                items.clear()
                self.disconnected = True
                self.closed = True
                self._wake(self._getters, quiet=True)
                self._wake(self._putters, quiet=True)
                return False
            else:  # drop_newest, or block without waiting
                self.dropped += 1
                return False
        items.append(item)
        self.accepted += 1
        self._wake(self._getters)
        return True

    async def wait_room(self) -> bool:
        """Wait until the queue has room, or is closed or abandoned; True when there is room.

        For a producer that must build the item only once it fits (say, numbered in queue order)."""
        while len(self._items) >= self.maxsize:
            if self.closed:
                return False
            await self._wait(self._putters)
        return not self.closed

    async def put(self, item: T) -> bool:
        """Queue ``item``; under ``block`` first wait for room (until the queue has room, is
        closed or abandoned). Other policies never wait: this is :meth:`offer`."""
        if self.policy == "block":
            await self.wait_room()
        return self.offer(item)

    def force(self, item: T) -> bool:
        """Queue ``item`` past the bound and past :meth:`close`: for an end-of-stream item that
        must never be lost behind a slow reader. Refused (False) only once the consumer is gone
        (abandoned or disconnected)."""
        if self.abandoned or self.disconnected:
            self.dropped += 1
            return False
        self._items.append(item)
        self.accepted += 1
        self._wake(self._getters)
        return True

    def close(self) -> None:
        """No more offers or puts; the consumer drains what is queued. Idempotent."""
        self.closed = True
        self._wake(self._getters, quiet=True)
        self._wake(self._putters, quiet=True)

    def abandon(self) -> None:
        """The consumer is gone: discard what is queued (counted), refuse every later put
        silently, and release blocked putters. Idempotent."""
        self.abandoned = True
        self.closed = True
        self.dropped += len(self._items)
        self._items.clear()
        self._wake(self._putters, quiet=True)
        self._wake(self._getters, quiet=True)

    # -- the consumer's side -----------------------------------------------------------------

    def peek(self) -> T:
        """The oldest queued item, left in place."""
        if not self._items:
            raise QueueEmpty
        return self._items[0]

    def get_nowait(self) -> T:
        """The oldest queued item; :class:`QueueEmpty` when there is none."""
        if not self._items:
            raise QueueEmpty
        item = self._items.popleft()
        self._wake(self._putters)
        return item

    def get_batch(self, limit: int) -> list[T]:
        """Up to ``limit`` of the oldest items, without waiting (possibly none)."""
        items = self._items
        n = min(limit, len(items))
        if not n:
            return []
        batch = [items.popleft() for _ in range(n)]
        self._wake(self._putters)
        return batch

    async def wait(self) -> bool:
        """Wait until an item is queued or the queue is closed; True when an item is there."""
        while not self._items:
            if self.closed:
                return False
            await self._wait(self._getters)
        return True

    async def get(self) -> T:
        """The oldest item, waiting for one; :class:`QueueClosed` once closed and drained
        (:class:`QueueDisconnected` when the ``disconnect`` policy cut this consumer off)."""
        if not await self.wait():
            raise QueueDisconnected if self.disconnected else QueueClosed
        return self.get_nowait()
