"""A run's event log: serialized frames, followers with cursors, back-pressure and the replay bounds.

Pure bookkeeping, no process and no protobuf parsing: the :class:`~asm_node.run.Run` stamps each
event (seq, ids, timestamp) and appends its serialization; followers read batches after a seq.

Events are stored already serialized, framed as ``EventBatch.events`` entries: a batch on the
wire is the concatenation of a slice of frames, so replaying or fanning out to several followers
costs no re-encoding.

Nothing an attached follower has yet to receive is ever evicted. Each follower has a cursor; when
the frames after the slowest cursor pass ``backlog_max_bytes``, :meth:`EventLog.gate` hands the
writer a future to wait on until the followers have taken half of it. What every attached follower
has received (everything, when nobody is attached) is kept for re-attach up to ``max_bytes`` /
``max_events`` per log and a :class:`ReplayBudget` for the node's live logs together, oldest first
out; a follower behind that gets :class:`~asm_wire.ReplayGap` naming the seqs that are gone. Sizes
count the frame bytes plus :data:`FRAME_OVERHEAD` per event, which is roughly what the node's RSS pays.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncGenerator, Sequence

from asm_wire import ReplayGap

__all__ = ["FRAME_OVERHEAD", "MAX_BATCH_BYTES", "MAX_BATCH_EVENTS", "EventLog", "ReplayBudget", "frame"]

MAX_BATCH_EVENTS = 4096
MAX_BATCH_BYTES = 1024 * 1024
#: Memory per held event beyond its frame bytes: the bytes object's header, its list slot and
#: its running-total int with its slot (CPython 3.11, 64-bit; rounded up to pymalloc sizes).
FRAME_OVERHEAD = 88


#: The frame heads (tag, one-byte length) of the events shorter than 128 bytes: most of a command's output lines.
_SHORT_HEADS = [b"\n" + bytes((n,)) for n in range(0x80)]


def frame(data: bytes) -> bytes:
    """Encode one serialized Event as field 1 of EventBatch (tag, varint length, bytes)."""
    n = len(data)
    if n < 0x80:
        return _SHORT_HEADS[n] + data
    out = bytearray(b"\n")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


class ReplayBudget:
    """Frame bytes (with :data:`FRAME_OVERHEAD`) held by a node's live logs, against one bound.

    Logs add to ``held`` as they append and take off what they evict or, when they close, all
    of theirs (a finished run's frames count against ``retention_max_bytes`` instead).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        #: The event logs of the node's running runs (one each).
        self.runs: set[EventLog] = set()

    def trim(self) -> None:
        """Over the bound: the largest logs evict their evictable frames first, down to 3/4 of it."""
        target = self.limit * 3 // 4
        for log in sorted(self.runs, key=lambda lg: lg.held_cost, reverse=True):
            if self.held <= target:
                return
            log._compact(self.held - target)


class EventLog:
    """The frames of one run, ``frames[i]`` holding seq ``first_held_seq + i``; seqs start at 1.

    ``name`` only labels the :class:`ReplayGap` message (the run id).
    """

    def __init__(self, name: str, *, max_events: int, max_bytes: int, backlog_max_bytes: int,
                 budget: ReplayBudget | None = None) -> None:
        self.name = name
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.backlog_max_bytes = backlog_max_bytes
        self._budget = budget
        if budget is not None:
            budget.runs.add(self)
        self._frames: list[bytes] = []
        self._cum: list[int] = []  # running byte total through each frame (for batch sizing)
        self._base_seq = 1
        self.last_seq = 0
        self.closed = False
        # Next seq each attached follower will send (the slowest one bounds eviction and the backlog).
        self._cursors: dict[object, int] = {}
        # Set while the writer waits for followers to catch up.
        self._paused: asyncio.Future[None] | None = None
        #: How many times the writer was paused for a slow follower (tests, metrics).
        self.pauses = 0
        # Set once the writer must not be paced any more (the CLI is being stopped).
        self._unpaced = False
        self._waiter: asyncio.Future[None] | None = None

    # -- sizes -----------------------------------------------------------------

    @property
    def first_held_seq(self) -> int:
        """The oldest seq still held (``last_seq + 1`` when nothing is)."""
        return self._base_seq

    @property
    def held_bytes(self) -> int:
        """Bytes of serialized event frames held for replay (O(1): from the running totals)."""
        if not self._cum:
            return 0
        return self._cum[-1] - self._cum[0] + len(self._frames[0])

    @property
    def held_cost(self) -> int:
        """What the held frames cost in memory: their bytes plus FRAME_OVERHEAD each."""
        return self.held_bytes + len(self._frames) * FRAME_OVERHEAD

    def _cost_from(self, seq: int) -> int:
        """Cost of the held frames from ``seq`` on (all of them when ``seq`` is before the first)."""
        frames, cum = self._frames, self._cum
        i = seq - self._base_seq
        if i <= 0:
            return self.held_cost
        if i >= len(frames):
            return 0
        return cum[-1] - cum[i - 1] + (len(frames) - i) * FRAME_OVERHEAD

    @property
    def backlog_bytes(self) -> int:
        """Cost of the frames the slowest attached follower has yet to send (0 with nobody attached)."""
        cursors = self._cursors
        if not cursors:
            return 0
        return self._cost_from(min(cursors.values()))

    @property
    def followers(self) -> int:
        """Followers attached now."""
        return len(self._cursors)

    @property
    def paused(self) -> bool:
        """Whether the writer is being held back for a slow follower."""
        return self._paused is not None

    # -- writing ---------------------------------------------------------------

    def append(self, events: Sequence[bytes]) -> None:
        """Append serialized Events; they take seqs ``last_seq + 1`` on, in order."""
        if not events:
            return
        frames, cum = self._frames, self._cum
        total = total0 = cum[-1] if cum else 0
        heads, add_frame, add_total = _SHORT_HEADS, frames.append, cum.append
        for data in events:
            n = len(data)
            f = heads[n] + data if n < 0x80 else frame(data)  # frame() inlined for the short ones
            add_frame(f)
            total += len(f)
            add_total(total)
        budget = self._budget
        if budget is not None:
            budget.held += total - total0 + len(events) * FRAME_OVERHEAD
        self.last_seq += len(events)
        if len(frames) > 2 * self.max_events or self.held_cost > self.max_bytes:
            self._compact()
        if budget is not None and budget.held > budget.limit:
            budget.trim()
        self._wake()

    def close(self) -> None:
        """No more events: followers end once they have the last one; the frames leave the budget."""
        self.closed = True
        budget, self._budget = self._budget, None
        if budget is not None:  # from now on its frames count against the finished runs' retention
            budget.held -= self.held_cost
            budget.runs.discard(self)
        self._wake()

    def _compact(self, node_excess: int = 0) -> None:
        """Evict the oldest frames every attached follower has sent, past this log's bounds.

        Over a bound, eviction goes down to 3/4 of the byte bound / to ``max_events`` events (so the
        O(n) list shift is amortized), and at least ``node_excess`` bytes when the node's budget
        asks; never past the slowest attached follower's cursor.
        """
        frames, cum = self._frames, self._cum
        n = len(frames)
        if not n:
            return
        floor = min(self._cursors.values()) if self._cursors else self.last_seq + 1
        evictable = min(floor - self._base_seq, n)
        if evictable <= 0:
            return
        cost = self.held_cost
        need = node_excess
        if cost > self.max_bytes:
            need = max(need, cost - self.max_bytes * 3 // 4)
        drop = n - self.max_events if n > 2 * self.max_events else 0
        if need > 0:
            start = cum[0] - len(frames[0])
            # The fewest oldest frames whose cost reaches ``need``.
            k = bisect.bisect_left(range(n), need, key=lambda j: cum[j] - start + (j + 1) * FRAME_OVERHEAD) + 1
            drop = max(drop, k)
        drop = min(drop, evictable)
        if drop <= 0:
            return
        freed = cum[drop - 1] - (cum[0] - len(frames[0])) + drop * FRAME_OVERHEAD
        del frames[:drop]
        del cum[:drop]
        self._base_seq += drop
        if self._budget is not None:
            self._budget.held -= freed

    # -- back-pressure ---------------------------------------------------------

    def gate(self) -> asyncio.Future[None] | None:
        """For the writer after each chunk: a future to wait on while the backlog is too big."""
        if not self._cursors or self._unpaced or self.backlog_bytes <= self.backlog_max_bytes:
            return None
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()
            self.pauses += 1
        return self._paused

    def stop_pacing(self) -> None:
        """Never hold the writer back again (the CLI is being stopped: read its output to the end)."""
        self._unpaced = True
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        paused = self._paused
        if paused is not None and (not self._cursors or self._unpaced
                                   or self.backlog_bytes <= self.backlog_max_bytes // 2):
            self._paused = None
            if not paused.done():
                paused.set_result(None)

    # -- reading ---------------------------------------------------------------

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _changed(self) -> asyncio.Future[None]:
        # Shared by every follower, so each awaits it through shield(): a follower
        # that is cancelled (its client went away) must not cancel it for the rest.
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        return asyncio.shield(self._waiter)

    async def follow(self, after_seq: int) -> AsyncGenerator[bytes, None]:
        """Serialized EventBatch frames with every event after ``after_seq``, live until :meth:`close`.

        Raises :class:`ReplayGap` when events after ``after_seq`` were already evicted.
        """
        token = object()
        cursors = self._cursors
        try:
            nxt = after_seq + 1
            cursors[token] = nxt
            while True:
                if nxt <= self.last_seq:
                    if nxt < self._base_seq:
                        raise ReplayGap(
                            f"events {nxt}..{self._base_seq - 1} of run {self.name} are no longer held "
                            f"(evicted for re-attach; held now: {self._base_seq}..{self.last_seq}; the node keeps "
                            f"{self.max_bytes} bytes / {self.max_events} events per run)"
                        )
                    i = nxt - self._base_seq
                    end = min(len(self._frames), i + MAX_BATCH_EVENTS)
                    start_bytes = self._cum[i - 1] if i else 0
                    j = bisect.bisect_right(self._cum, start_bytes + MAX_BATCH_BYTES, i, end)
                    j = max(j, i + 1)  # always make progress, even with one huge event
                    data = b"".join(self._frames[i:j])
                    nxt += j - i
                    cursors[token] = nxt
                    if self._paused is not None:
                        self._maybe_resume()
                    yield data
                    continue
                if self.closed:
                    return
                await self._changed()
        finally:
            del cursors[token]
            self._maybe_resume()
