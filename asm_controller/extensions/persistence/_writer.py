"""AsyncWriter: events off the run path, through a bounded queue, appended to a store in batches."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Final, cast

from asm_controller._events import Event
from asm_controller._queue import BoundedQueue, Overflow
from asm_controller.extensions.persistence._store import EventStore, _runtime_error
from asm_wire import AsmError, ConfigError

__all__ = ["OVERFLOW_POLICIES", "AsyncWriter"]

log = logging.getLogger("asm_controller.persistence")


OVERFLOW_POLICIES: Final = ("drop_newest", "drop_oldest", "block")


class AsyncWriter:
    """Persists events off the run path: a bounded queue drained in batches into a store.

    Use it as a session observer (``Session(..., observers=[writer])``: it is called
    with each batch of events) or call :meth:`enqueue`. Both are synchronous, O(1)
    per event and never wait for the store. When the queue (``queue_size`` events;
    the batch being written is not counted) is full:

    * ``"drop_newest"`` (default): the incoming event is dropped;
    * ``"drop_oldest"``: the oldest queued event is dropped to make room;
    * ``"block"``: ``await writer.put(ev)`` waits for room — the only mode that can
      slow the run path, by design (back-pressure instead of loss). The
      synchronous forms cannot wait and drop the incoming event (logged once).

    Dropped events are counted in :attr:`dropped`. A failed append is retried
    (``retries`` times, exponential backoff; stores are idempotent, so a retry
    never duplicates); then the batch is given up: counted in :attr:`failed`, the
    error kept in :attr:`errors` (the last 100), logged, passed to ``on_error``,
    and raised by the next :meth:`flush` whose window it falls in. The run never
    sees it. :meth:`flush` waits until every event enqueued before it was handed
    to the store and the store synced; :meth:`close` drains the queue and stops
    (and closes the store when ``close_store=True``).
    """

    def __init__(self, store: EventStore, *, queue_size: int = 10_000, overflow: str = "drop_newest",
                 batch_size: int = 512, retries: int = 3, retry_backoff: float = 0.05,
                 on_error: Callable[[AsmError, list[Event]], None] | None = None, close_store: bool = False) -> None:
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError("queue_size must be an integer >= 1")
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size must be an integer >= 1")
        if retries < 0 or retry_backoff < 0:
            raise ConfigError("retries and retry_backoff must be >= 0")
        self.store = store
        self.queue_size = queue_size
        self.overflow = overflow
        self.batch_size = batch_size
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.on_error = on_error
        self.close_store = close_store
        #: Counters: accepted into the queue, handed to the store, dropped (overflow, or after close), given up.
        self.enqueued = 0
        self.written = 0
        self.failed = 0
        self.errors: deque[AsmError] = deque(maxlen=100)
        #: Set by close() when the final sync failed: the written events may not be durable.
        self.sync_error: AsmError | None = None
        # (ticket, event); the queue counts what it drops (overflow, or after close).
        self._q: BoundedQueue[tuple[int, Event]] = BoundedQueue(queue_size, cast(Overflow, overflow))
        self._ticket = 0  # last ticket issued (tickets number accepted events 1, 2, ...)
        self._inflight_first = 0  # first ticket of the batch being written, 0 when none
        self._unreported: list[tuple[int, int, AsmError]] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._warned_sync_block = False

    async def __aenter__(self) -> AsyncWriter:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __call__(self, events: Sequence[Event]) -> None:
        """The observer form: enqueue a batch of events."""
        for ev in events:
            self.enqueue(ev)

    @property
    def dropped(self) -> int:
        """Events not accepted: overflow, or given after :meth:`close` began."""
        return self._q.dropped

    @property
    def queued(self) -> int:
        return len(self._q)

    def stats(self) -> dict[str, int]:
        return {"enqueued": self.enqueued, "written": self.written, "dropped": self.dropped, "failed": self.failed,
                "queued": len(self._q)}

    def _start(self) -> None:
        if self._task is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop yet: the queue holds the events until one runs
            self._task = loop.create_task(self._drain(), name="asm-persistence-writer")

    def enqueue(self, ev: Event) -> bool:
        """Queue one event without waiting; False when it was dropped."""
        q = self._q
        evicting = q.full() and not self._closing
        if not q.offer((self._ticket + 1, ev)):
            if self.overflow == "block" and not self._closing and not self._warned_sync_block:
                self._warned_sync_block = True
                log.warning("persistence writer: queue full and overflow='block' needs `await put()`; "
                            "dropping events given to the synchronous enqueue")
            return False
        self._ticket += 1
        self.enqueued += 1
        if evicting and self._waiters:  # drop_oldest evicted an event: a flush may be satisfied now
            self._notify()
        if self._task is None:
            self._start()
        return True

    async def put(self, ev: Event) -> bool:
        """Queue one event; with ``overflow="block"`` wait for room first."""
        if self.overflow == "block":
            await self._q.wait_room()  # room, or closing (then enqueue counts it as dropped)
        return self.enqueue(ev)

    async def put_many(self, events: Iterable[Event]) -> int:
        n = 0
        for ev in events:
            n += await self.put(ev)
        return n

    def _processed(self) -> int:
        """Every ticket up to this one was written, given up or dropped."""
        if self._inflight_first:
            return self._inflight_first - 1
        if self._q:
            return self._q.peek()[0] - 1
        return self._ticket

    def _notify(self) -> None:
        done = self._processed()
        keep = []
        for target, fut in self._waiters:
            if target <= done:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def _drain(self) -> None:
        q = self._q
        while True:
            if not await q.wait():  # closing, and everything queued was written
                return
            batch = q.get_batch(self.batch_size)  # wakes a put() waiting for room
            self._inflight_first = batch[0][0]
            try:
                await self._write(batch)
            finally:
                self._inflight_first = 0
                self._notify()

    async def _write(self, batch: list[tuple[int, Event]]) -> None:
        events = [ev for _, ev in batch]
        for attempt in range(self.retries + 1):
            try:
                await self.store.append(events)
                self.written += len(events)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt < self.retries:
                    await asyncio.sleep(self.retry_backoff * (2 ** attempt))
                    continue
                err = exc if isinstance(exc, AsmError) else _runtime_error(
                    f"persistence append failed: {type(exc).__name__}: {exc}", "store_write_failed", exc)
                self.failed += len(events)
                self.errors.append(err)
                self._unreported.append((batch[0][0], batch[-1][0], err))
                del self._unreported[:-100]
                log.warning("persistence writer: %d event(s) not stored after %d attempt(s): %s",
                            len(events), attempt + 1, err)
                if self.on_error is not None:
                    try:
                        self.on_error(err, events)
                    except Exception:
                        log.exception("persistence writer: on_error callback failed")

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything enqueued before this call is stored and synced.

        Raises AsmError (reason ``persistence_write_failed``) if some of those events
        could not be stored, and TimeoutError after ``timeout`` seconds.
        """
        target = self._ticket
        if self._processed() < target:
            self._start()
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((target, fut))
            await asyncio.wait_for(fut, timeout)
        await self.store.sync()
        failed = [u for u in self._unreported if u[0] <= target]
        if failed:
            self._unreported = [u for u in self._unreported if u[0] > target]
            n = sum(hi - lo + 1 for lo, hi, _ in failed)
            first = failed[0][2]
            raise _runtime_error(f"{n} event(s) could not be stored: {first.message}", "persistence_write_failed",
                                 first)

    async def close(self) -> None:
        """Drain the queue (no new events are accepted), stop, and close the store if owned."""
        if self._closed:
            return
        self._closing = True
        self._q.close()  # refuses new events, releases blocked put()s, lets the drain finish
        if self._q and self._task is None:
            self._start()
        try:
            if self._task is not None:
                await self._task
            try:
                await self.store.sync()
            except Exception as exc:
                err = exc if isinstance(exc, AsmError) else _runtime_error(
                    f"persistence sync failed: {type(exc).__name__}: {exc}", "store_sync_failed", exc)
                self.errors.append(err)
                self.sync_error = err
                log.warning("persistence writer: final sync failed: %s", err)
        finally:
            self._closed = True
            self._notify()
            if self.close_store:
                try:
                    await self.store.close()
                except Exception as exc:
                    err = exc if isinstance(exc, AsmError) else _runtime_error(
                        f"persistence close failed: {type(exc).__name__}: {exc}", "store_sync_failed", exc)
                    self.errors.append(err)
                    self.sync_error = self.sync_error or err
                    log.warning("persistence writer: closing the store failed: %s", err)
