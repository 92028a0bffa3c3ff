"""The bytes a node's EventBatch arrived in, kept so a relay forwards (and records) them as they are.

A controller relays a node's batches to its client and writes them to its registry. Re-encoding each
event for that (``EventBatch(events=[...]).SerializeToString()``, twice) cost about as much as the
relay's own bookkeeping; where nothing changed the events, the node's bytes are the same message.

gRPC's deserializer (:func:`parse_batch`) remembers each received batch's bytes; the run driver takes
them (:func:`take`) for a batch whose events it passes on unchanged and hands them along with the
events as :class:`Frames`. Whoever changes a batch's events in place must :func:`take` (drop) its
bytes first. Batches nobody takes (a consumer that rebuilds them) are forgotten, oldest first, past
a bound: the table only ever costs a few recent batches.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from asm_controller._events import Event
from asm_wire import pb

#: The most received batches (and bytes) whose wire form is kept for a consumer that has not taken it.
#: gRPC parses a message when its reader asks for it, and the run driver takes the bytes right after:
#: only batches of consumers that never take them (a CLI printing a log) stay, up to these bounds.
MAX_KEPT = 64
MAX_KEPT_BYTES = 8 * 2**20


class Frames(list[Event]):
    """A run's events as one batch, with the wire bytes of exactly these events when they are known."""

    __slots__ = ("wire",)

    def __init__(self, events: Iterable[Event], wire: bytes | None = None) -> None:
        super().__init__(events)
        self.wire = wire


_lock = threading.Lock()
_kept: dict[int, tuple[pb.EventBatch, bytes]] = {}  # id(batch) -> (batch: keeps the id unique, its bytes)
_kept_bytes = 0


def parse_batch(data: bytes) -> pb.EventBatch:
    """gRPC's response deserializer for EventBatch streams: the message, its bytes remembered."""
    global _kept_bytes
    batch = pb.EventBatch.FromString(data)
    with _lock:
        _kept[id(batch)] = (batch, data)
        _kept_bytes += len(data)
        while len(_kept) > MAX_KEPT or _kept_bytes > MAX_KEPT_BYTES:
            _, old = _kept.pop(next(iter(_kept)))  # the oldest first (dicts keep insertion order)
            _kept_bytes -= len(old)
    return batch


def take(batch: pb.EventBatch) -> bytes | None:
    """The bytes ``batch`` arrived in (once: the entry is dropped), None when unknown or forgotten."""
    global _kept_bytes
    with _lock:
        entry = _kept.pop(id(batch), None)
        if entry is None:
            return None
        if entry[0] is not batch:  # another batch at a reused id: never the case while it is kept
            _kept[id(batch)] = entry
            return None
        _kept_bytes -= len(entry[1])
    return entry[1]


def encode(events: Sequence[Event]) -> bytes:
    """``events`` as EventBatch bytes: the node's own when the events are a :class:`Frames` with them."""
    wire = getattr(events, "wire", None)
    if wire is not None:
        return bytes(wire)
    return bytes(pb.EventBatch(events=[e.pb for e in events]).SerializeToString())


def kept() -> int:
    """How many received batches' bytes are held (for tests: the table stays bounded)."""
    return len(_kept)
