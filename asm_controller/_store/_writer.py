"""StoreWriter: write-behind for a run's hot path (events and status go to the store in batches).

A run hands its events and record updates to the writer and goes on; one background task writes
what was queued, in submission order, in one transaction per batch (every ``flush_interval_s``, or
at once when a flush is asked for or the queue passes its byte bound). The hot path waits only
for back-pressure: ``submit_events`` blocks while more than ``max_pending_bytes`` are unwritten,
so a slow or failed database slows the runs down instead of dropping their events or growing
memory without bound. A database error never reaches a run: it is logged (first, then at most
every ``_LOG_EVERY_S`` with a count), counted in ``errors`` and the same batch is retried with
exponential backoff (``retry_min_s`` .. ``retry_max_s``) until it is written; appends are
idempotent in the store, so a batch whose commit landed before its error is not doubled.

An op the store refuses for its own reason (unknown run, overlapping seqs, a fence whose lease
another replica took over: LeaseLost) is dropped, the rest of its batch written; it is logged,
counted in ``rejected`` and handed to ``on_skipped(run_id, error)``, so the owner of the run
learns that it lost the run and stops acting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from asm_controller._store._base import (
    BatchOp,
    EventsOp,
    Lease,
    LeaseLost,
    RunStore,
    StatusFilter,
    UpdateOp,
    check_chunk,
    check_expect,
    check_update,
)
from asm_wire import AsmError

log = logging.getLogger("asm_controller.store")

_LOG_EVERY_S = 30.0


#: A coalesced chunk of one run's events stays below this (the store trims and replays whole chunks).
CHUNK_MAX_BYTES = 1 << 20
#: The fields of the update each relayed batch queues (asm_controller._registry.events): appending a
#: run's next events before such an update changes nothing (appends check only the lease).
_LIVE_FIELDS = frozenset({"node_seq", "provider_session_id", "status"})


def _live_update(op: BatchOp) -> bool:
    return (isinstance(op, UpdateOp) and op.expect_status is None and op.fields.keys() <= _LIVE_FIELDS
            and op.fields.get("status", "running") == "running")


def coalesce(ops: list[BatchOp], max_bytes: int = CHUNK_MAX_BYTES) -> list[BatchOp]:
    """The same writes in fewer ops: a run's consecutive event chunks as one of at most ``max_bytes``
    (EventBatch bytes concatenate into one EventBatch: only for such data), its live-progress updates
    in between merged into one after them. A busy stream queues a chunk and an update per node batch;
    written one by one they cost the store a SELECT, an INSERT and two UPDATEs each."""
    out: list[BatchOp | list[EventsOp]] = []  # a list: one run's chunks to join into one EventsOp
    last_events: dict[str, int] = {}  # run -> index in out of its last chunk(s), while only live updates follow
    sizes: dict[int, int] = {}  # index in out of chunks -> their bytes
    last_update: dict[str, UpdateOp] = {}  # run -> its live update after its last chunk(s)
    for op in ops:
        run = op.run_id
        if isinstance(op, EventsOp):
            i = last_events.get(run)
            chunks = out[i] if i is not None else None
            if (i is not None and isinstance(chunks, list) and chunks[-1].fence == op.fence
                    and op.first_seq == chunks[-1].last_seq + 1 and sizes[i] + len(op.data) <= max_bytes):
                chunks.append(op)
                sizes[i] += len(op.data)
                continue
            last_events[run] = len(out)
            sizes[len(out)] = len(op.data)
            last_update.pop(run, None)
            out.append([op])
            continue
        if _live_update(op) and run in last_events:
            queued = last_update.get(run)
            if queued is not None and queued.fence == op.fence:
                queued.fields.update(op.fields)  # later values win, as when written in order
                continue
            last_update[run] = UpdateOp(op.run_id, dict(op.fields), op.fence, op.expect_status)
            out.append(last_update[run])
            continue
        last_events.pop(run, None)  # anything else of the run: its later chunks start anew after it
        last_update.pop(run, None)
        out.append(op)
    merged: list[BatchOp] = []
    for item in out:
        if not isinstance(item, list):
            merged.append(item)
        elif len(item) == 1:
            merged.append(item[0])
        else:
            first, last = item[0], item[-1]
            merged.append(EventsOp(first.run_id, first.first_seq, last.last_seq, b"".join(c.data for c in item),
                                   first.fence))
    return merged


class StoreWriter:
    """Queues a store's writes and writes them from one background task (start it by using it)."""

    def __init__(self, store: RunStore, *, flush_interval_s: float = 0.05, max_pending_bytes: int = 8 * 2**20,
                 retry_min_s: float = 0.05, retry_max_s: float = 2.0,
                 on_skipped: Callable[[str, AsmError], None] | None = None, coalesce_events: bool = False) -> None:
        self.store = store
        #: Event data is EventBatch bytes: a run's consecutive chunks are written as one (:func:`coalesce`),
        #: each at most 1/16 of the store's history bound (it trims whole chunks) and CHUNK_MAX_BYTES.
        self.coalesce_events = coalesce_events
        history = getattr(store, "history_max_bytes", None)
        self._chunk_max = min(CHUNK_MAX_BYTES, max(1, history // 16)) if isinstance(history, int) and history > 0 \
            else CHUNK_MAX_BYTES
        #: Called (from the writing task) with the run id and the error of every op the store refused.
        self.on_skipped = on_skipped
        self.flush_interval_s = flush_interval_s
        self.max_pending_bytes = max_pending_bytes
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        #: Bytes of event data submitted and not yet written (a gauge for metrics).
        self.pending_bytes = 0
        #: Failed batch writes so far (each is retried; a counter for metrics).
        self.errors = 0
        #: Ops the store refused for their own reason (unknown run, overlapping seqs, LeaseLost): logged, dropped.
        self.rejected = 0
        self._queue: list[BatchOp] = []
        self._last_update: dict[str, UpdateOp] = {}  # run -> its queued update, while it is the run's last op
        self._submitted = 0  # submit calls so far
        self._written = 0  # submit calls whose ops are durable
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._urgent = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_log = 0.0
        self._unlogged = 0
        self._failures = 0  # consecutive failed attempts of the batch being written

    # --- submitting -------------------------------------------------------------------------------

    async def submit_events(self, run_id: str, first_seq: int, last_seq: int, data: bytes, *,
                            fence: Lease | None = None) -> None:
        """Queue one chunk; returns at once unless more than max_pending_bytes are unwritten.
        ``fence``: written only while the run's lease is still it (else skipped: LeaseLost)."""
        check_chunk(run_id, first_seq, last_seq, data)
        check_expect(fence, None)
        self._check_open()
        self._enqueue(EventsOp(run_id, first_seq, last_seq, bytes(data), fence))
        self._last_update.pop(run_id, None)  # a later update must come after these events
        self.pending_bytes += len(data)
        if self.pending_bytes > self.max_pending_bytes:
            self._urgent = True
            self._wake.set()
            async with self._progress:
                await self._progress.wait_for(lambda: self.pending_bytes <= self.max_pending_bytes or self._closed)

    def submit_events_nowait(self, run_id: str, first_seq: int, last_seq: int, data: bytes, *,
                             fence: Lease | None = None) -> None:
        """Queue one chunk without waiting (a few events made on the controller, e.g. a run's end)."""
        check_chunk(run_id, first_seq, last_seq, data)
        check_expect(fence, None)
        self._check_open()
        self._enqueue(EventsOp(run_id, first_seq, last_seq, bytes(data), fence))
        self._last_update.pop(run_id, None)
        self.pending_bytes += len(data)

    def submit_update(self, run_id: str, *, fence: Lease | None = None,
                      expect_status: StatusFilter | None = None, **fields: Any) -> None:
        """Queue an update; merged into the run's queued update when nothing of the run came after it
        and both have the same fence and no expect_status (a compare-and-set is applied on its own:
        merged, a failed one would take the other's fields down with it)."""
        check_update(dict(fields))  # an unknown field is the caller's TypeError now, not a log line later
        check_expect(fence, expect_status)
        self._check_open()
        queued = self._last_update.get(run_id)
        if queued is not None and queued.fence == fence and queued.expect_status is None and expect_status is None:
            queued.fields.update(fields)
            self._submitted += 1
            self._ensure_task()
            return
        op = UpdateOp(run_id, dict(fields), fence, expect_status)
        self._enqueue(op)
        self._last_update[run_id] = op

    def _enqueue(self, op: BatchOp) -> None:
        self._queue.append(op)
        self._submitted += 1
        self._ensure_task()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("StoreWriter is closed")

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="asm-store-writer")

    # --- waiting ----------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Returns when everything submitted before the call is written (waits out database errors)."""
        target = self._submitted
        if self._written >= target:
            return
        self._ensure_task()
        self._urgent = True
        self._wake.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._written >= target)

    async def close(self, timeout: float | None = 10.0) -> None:
        """Flush, then stop the task. After ``timeout`` s of a failing database the unwritten ops are
        given up (logged with their count) so shutting down never hangs."""
        if self._closed:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.flush()
        except TimeoutError:
            log.error("run store %s: gave up %d unwritten update(s)/chunk(s) (%d bytes of events) at close",
                      self.store.url, self._submitted - self._written, self.pending_bytes)
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._progress:
            self._progress.notify_all()  # a submitter blocked on back-pressure is released

    # --- the writing task -------------------------------------------------------------------------

    async def _run(self) -> None:
        batch: list[BatchOp] = []
        batch_upto = self._written
        delay = self.retry_min_s
        while True:
            if not batch:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                if not self._urgent and self.flush_interval_s > 0:
                    # Let a burst gather into one transaction (flush() and back-pressure skip this).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.flush_interval_s):
                            while not self._urgent:
                                self._wake.clear()
                                await self._wake.wait()
            # Whatever was queued meanwhile joins the batch (a retried one too): still in order. Only
            # the new ops are coalesced: a retried batch keeps its chunks (a landed one is skipped whole).
            batch.extend(coalesce(self._queue, self._chunk_max) if self.coalesce_events else self._queue)
            self._queue = []
            self._last_update.clear()
            batch_upto = self._submitted
            self._urgent = False
            try:
                rejected = await self.store.write_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a run must never see the database's failure
                self.errors += 1
                self._failures += 1
                self._log_failure(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            if self._failures:
                log.warning("run store %s: writing again after %d failed attempt(s)", self.store.url,
                            self._failures)
                self._failures = self._unlogged = 0
                self._last_log = 0.0
            delay = self.retry_min_s
            for err in rejected:
                self._skipped(err)
            written = sum(len(op.data) for op in batch if isinstance(op, EventsOp))
            batch = []
            async with self._progress:
                self.pending_bytes -= written
                self._written = batch_upto
                self._progress.notify_all()

    def _skipped(self, err: AsmError) -> None:
        self.rejected += 1
        run_id = str(err.details.get("run_id", ""))
        if isinstance(err, LeaseLost):  # expected with replicas: another one took the run over
            log.warning("run store %s: dropped a fenced write of run %s: %s", self.store.url, run_id, err)
        else:
            log.error("run store %s: dropped a write the store refused: %s", self.store.url, err)
        if self.on_skipped is not None:
            try:
                self.on_skipped(run_id, err)
            except Exception:  # the hook's bug must not stop the writing task
                log.exception("run store %s: the on_skipped hook failed", self.store.url)

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            suppressed = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
            log.error("run store %s: writing failed, retrying with backoff%s: %s", self.store.url, suppressed, exc)
            self._last_log = now
            self._unlogged = 0
        else:
            self._unlogged += 1
