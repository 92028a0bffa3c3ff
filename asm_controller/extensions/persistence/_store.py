"""The store contract (:class:`EventStore`), the shared dedup index, and :class:`MemoryStore`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from asm_controller._events import Event
from asm_wire import AsmError, pb

__all__ = ["EventStore", "MemoryStore"]

def _key(m: pb.Event) -> str:
    return m.id or f"{m.run_id}:{m.seq}"


def _copy(ev: Event) -> Event:
    msg = pb.Event()
    msg.CopyFrom(ev.pb)
    return Event(msg)


def _runtime_error(message: str, reason: str = "", cause: BaseException | None = None) -> AsmError:
    # "runtime": the store failed (unknown means unclassified, and maps to gRPC UNKNOWN).
    err = AsmError(message, kind="runtime", domain="runtime", reason=reason)
    if cause is not None:
        err.__cause__ = cause
    return err


# -- the store contract -----------------------------------------------------------------


@runtime_checkable
class EventStore(Protocol):
    """An append-only event log, idempotent by event id per session."""

    async def append(self, events: Iterable[Event]) -> int:
        """Store the events not stored yet (by id, per session); the number newly stored."""
        ...

    async def list_events(self, session_id: str | None = None, run_id: str | None = None) -> list[Event]:
        """Events in first-write order, optionally of one session and/or one run."""
        ...

    async def sessions(self) -> list[str]:
        """Session ids in first-write order."""
        ...

    async def runs(self, session_id: str | None = None) -> list[str]:
        """Run ids (of one session, or of all) in first-write order."""
        ...

    async def reset_session(self, session_id: str) -> int:
        """Forget a session's events (and their ids, which may be appended again); how many."""
        ...

    async def sync(self) -> None:
        """Make everything appended so far durable."""
        ...

    async def close(self) -> None: ...


class _Index:
    """Events in store order plus the per-session dedup sets (shared by both stores)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.seen: dict[str, set[str]] = {}
        self.runs: dict[str, dict[str, None]] = {}
        self.run_order: dict[tuple[str, str], None] = {}

    def fresh(self, events: Iterable[Event]) -> list[Event]:
        """The events not stored yet, without duplicates inside the batch either."""
        out: list[Event] = []
        batch: set[tuple[str, str]] = set()
        seen = self.seen
        for ev in events:
            m = ev.pb
            key = _key(m)
            ids = seen.get(m.session_id)
            if (ids is not None and key in ids) or (m.session_id, key) in batch:
                continue
            batch.add((m.session_id, key))
            out.append(ev)
        return out

    def add(self, ev: Event) -> bool:
        m = ev.pb
        ids = self.seen.setdefault(m.session_id, set())
        key = _key(m)
        if key in ids:
            return False
        ids.add(key)
        self.events.append(ev)
        self.runs.setdefault(m.session_id, {})[m.run_id] = None
        self.run_order.setdefault((m.session_id, m.run_id), None)
        return True

    def select(self, session_id: str | None, run_id: str | None) -> list[Event]:
        if session_id is None and run_id is None:
            return list(self.events)
        return [e for e in self.events
                if (session_id is None or e.pb.session_id == session_id) and (run_id is None or e.pb.run_id == run_id)]

    def run_ids(self, session_id: str | None) -> list[str]:
        if session_id is not None:
            return list(self.runs.get(session_id, {}))
        return list(dict.fromkeys(rid for _, rid in self.run_order))

    def drop(self, session_id: str) -> int:
        if session_id not in self.seen:
            return 0
        before = len(self.events)
        self.events = [e for e in self.events if e.pb.session_id != session_id]
        del self.seen[session_id]
        self.runs.pop(session_id, None)
        self.run_order = {k: None for k in self.run_order if k[0] != session_id}
        return before - len(self.events)


class MemoryStore:
    """An in-memory :class:`EventStore` (events are copied on append)."""

    def __init__(self) -> None:
        self._ix = _Index()

    async def append(self, events: Iterable[Event]) -> int:
        return sum(self._ix.add(_copy(ev)) for ev in self._ix.fresh(events))

    async def list_events(self, session_id: str | None = None, run_id: str | None = None) -> list[Event]:
        return self._ix.select(session_id, run_id)

    async def sessions(self) -> list[str]:
        return list(self._ix.seen)

    async def runs(self, session_id: str | None = None) -> list[str]:
        return self._ix.run_ids(session_id)

    async def reset_session(self, session_id: str) -> int:
        return self._ix.drop(session_id)

    async def sync(self) -> None:
        return None

    async def close(self) -> None:
        return None
