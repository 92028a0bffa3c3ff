"""The in-memory run store: the library's default (nothing survives the process), same rules as SQL."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from asm_controller._store._base import (
    DEFAULT_HISTORY_MAX_BYTES,
    IN_FLIGHT,
    BatchOp,
    EventsOp,
    RunExists,
    RunRecord,
    SessionRecord,
    check_chunk,
    check_limit,
    check_meta,
    check_record,
    check_text,
    check_update,
    overlap_error,
    record_from_columns,
)
from asm_wire import AsmError, RunNotFound


class MemoryStore:
    """A RunStore in this process's memory. Values are kept as the SQL stores keep them (JSON text),
    so a record read back is a fresh copy with the same types whatever the backend."""

    def __init__(self, *, history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES) -> None:
        self.url = "memory:"
        self.history_max_bytes = history_max_bytes
        self._meta: dict[str, str] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._events: dict[str, deque[tuple[int, int, bytes]]] = {}
        self._held: dict[str, int] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def claim(self) -> None:
        """Nothing to share: a memory store lives in one process."""
        return None

    async def meta_get(self, key: str) -> str | None:
        check_meta(key)
        return self._meta.get(key)

    async def meta_set(self, key: str, value: str) -> None:
        check_meta(key, value, with_value=True)
        self._meta[key] = value

    async def create(self, rec: RunRecord) -> None:
        cols = check_record(rec)
        if rec.run_id in self._runs:
            raise RunExists(f"run {rec.run_id} is already recorded")
        now = time.time()
        cols["created_at"] = cols["created_at"] or now
        cols["updated_at"] = cols["updated_at"] or cols["created_at"]
        self._runs[rec.run_id] = cols
        self._events[rec.run_id] = deque()
        self._held[rec.run_id] = 0

    async def get(self, run_id: str) -> RunRecord | None:
        check_text("run_id", run_id)
        cols = self._runs.get(run_id)
        return record_from_columns(cols) if cols is not None else None

    async def update(self, run_id: str, **fields: Any) -> None:
        cols = check_update(fields)
        check_text("run_id", run_id)
        self._update(run_id, cols)

    def _update(self, run_id: str, cols: dict[str, Any]) -> None:
        row = self._runs.get(run_id)
        if row is None:
            raise RunNotFound(f"run {run_id} is not recorded")
        cols.setdefault("updated_at", time.time())
        row.update(cols)

    async def list_runs(self, *, status: str | None = None, owner: str | None = None,
                        session_id: str | None = None, provider: str | None = None, node: str | None = None,
                        since: float | None = None, until: float | None = None,
                        before: tuple[float, str] | None = None, limit: int = 1000) -> list[RunRecord]:
        check_limit(limit)
        want = {"status": status, "owner": owner, "session_id": session_id, "provider": provider,
                "node_address": node}
        rows = [r for r in self._runs.values()
                if all(v is None or r[k] == v for k, v in want.items())
                and (since is None or r["created_at"] >= since) and (until is None or r["created_at"] < until)
                and (before is None or (r["created_at"], r["run_id"]) < before)]
        rows.sort(key=lambda r: (r["created_at"], r["run_id"]), reverse=True)
        return [record_from_columns(r) for r in rows[:limit]]

    async def sessions(self, *, owner: str | None = None, provider: str | None = None, node: str | None = None,
                       before: tuple[float, str] | None = None, limit: int = 100) -> list[SessionRecord]:
        check_limit(limit)
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in self._runs.values():
            if (owner is None or r["owner"] == owner) and (provider is None or r["provider"] == provider):
                groups.setdefault(r["session_id"], []).append(r)
        out = []
        for sid, rows in groups.items():
            if node is not None and not any(r["node_address"] == node for r in rows):
                continue
            rows.sort(key=lambda r: (r["created_at"], r["run_id"]))
            last = rows[-1]
            psid = next((r["provider_session_id"] for r in reversed(rows) if r["provider_session_id"]), "")
            out.append(SessionRecord(sid, last["provider"], last["owner"], len(rows), last["run_id"], last["status"],
                                     float(rows[0]["created_at"]), float(last["created_at"]), psid,
                                     last["node_address"]))
        out = [s for s in out if before is None or (s.last_at, s.session_id) < before]
        out.sort(key=lambda s: (s.last_at, s.session_id), reverse=True)
        return out[:limit]

    async def in_flight(self) -> list[RunRecord]:
        rows = sorted((r for r in self._runs.values() if r["status"] in IN_FLIGHT),
                      key=lambda r: (r["created_at"], r["run_id"]))
        return [record_from_columns(r) for r in rows]

    async def append_events(self, run_id: str, first_seq: int, last_seq: int, data: bytes) -> None:
        check_chunk(run_id, first_seq, last_seq, data)
        self._append(run_id, first_seq, last_seq, bytes(data))

    def _append(self, run_id: str, first_seq: int, last_seq: int, data: bytes) -> None:
        row = self._runs.get(run_id)
        if row is None:
            raise RunNotFound(f"run {run_id} is not recorded")
        if last_seq <= row["last_seq"]:
            return  # already held (a retried write): appending is idempotent
        if first_seq <= row["last_seq"]:
            raise overlap_error(run_id, first_seq, row["last_seq"])
        chunks = self._events[run_id]
        chunks.append((first_seq, last_seq, data))
        held = self._held[run_id] + len(data)
        # The history bound: drop the oldest chunks until the log fits (the newest too if it alone is
        # bigger); first_held_seq says where the log now starts, for a typed replay_gap.
        first_held = row["first_held_seq"]
        while held > self.history_max_bytes and chunks:
            _, dropped_last, dropped = chunks.popleft()
            held -= len(dropped)
            first_held = dropped_last + 1
        self._held[run_id] = held
        row.update(last_seq=last_seq, first_held_seq=first_held, updated_at=time.time())

    async def events_after(self, run_id: str, after_seq: int) -> list[tuple[int, int, bytes]]:
        check_text("run_id", run_id)
        return [c for c in self._events.get(run_id, ()) if c[1] > after_seq]

    async def prune(self, ended_before: float) -> int:
        gone = [k for k, r in self._runs.items() if r["ended_at"] is not None and r["ended_at"] < ended_before]
        for run_id in gone:
            del self._runs[run_id], self._events[run_id], self._held[run_id]
        return len(gone)

    async def write_batch(self, ops: Sequence[BatchOp]) -> list[AsmError]:
        skipped: list[AsmError] = []
        for op in ops:
            try:
                if isinstance(op, EventsOp):
                    self._append(op.run_id, op.first_seq, op.last_seq, op.data)
                else:
                    self._update(op.run_id, check_update(dict(op.fields)))
            except AsmError as exc:
                skipped.append(exc)
        return skipped

