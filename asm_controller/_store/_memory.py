"""The in-memory run store: the library's default (nothing survives the process), same rules as SQL."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from asm_controller._store._base import (
    DEFAULT_HISTORY_MAX_BYTES,
    IN_FLIGHT,
    LIVE,
    QUEUED,
    BatchOp,
    Cursor,
    EndpointLeaseRecord,
    EventsOp,
    InvalidRecord,
    Lease,
    LeaseLost,
    ReplicaRecord,
    RunExists,
    RunRecord,
    SessionRecord,
    StatusFilter,
    check_chunk,
    check_cursor,
    check_endpoint_lease,
    check_expect,
    check_fence,
    check_filter_text,
    check_lease_ref,
    check_limit,
    check_max_bytes,
    check_meta,
    check_owner,
    check_record,
    check_seq,
    check_statuses,
    check_take,
    check_text,
    check_time,
    check_update,
    endpoint_lease_from_columns,
    lease_lost,
    overlap_error,
    record_from_columns,
)
from asm_wire import AsmError, RunNotFound


def _queue_key(row: dict[str, Any]) -> tuple[int, bool, float, str]:
    """A row's place in the fleet queue's start order (queued_at None sorts last within its priority)."""
    queued_at = row["queued_at"]
    return (-row["priority"], queued_at is None, queued_at or 0.0, row["run_id"])


class MemoryStore:
    """A RunStore in this process's memory. Values are kept as the SQL stores keep them (JSON text),
    so a record read back is a fresh copy with the same types whatever the backend. Every method
    runs without an await in between, so each is atomic (the leases' compare-and-set too)."""

    def __init__(self, *, history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES,
                 observe: Callable[[str, float], None] | None = None) -> None:
        self.url = "memory:"
        self.history_max_bytes = history_max_bytes
        del observe  # accepted like the SQL store's; nothing here is worth timing
        self._meta: dict[str, str] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._events: dict[str, deque[tuple[int, int, bytes]]] = {}
        self._held: dict[str, int] = {}
        self._replicas: dict[str, dict[str, Any]] = {}
        self._endpoint_leases: dict[str, dict[str, Any]] = {}

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
        if cols["status"] == QUEUED and cols["queued_at"] is None:
            cols["queued_at"] = cols["created_at"]
        self._runs[rec.run_id] = cols
        self._events[rec.run_id] = deque()
        self._held[rec.run_id] = 0

    async def get(self, run_id: str) -> RunRecord | None:
        check_text("run_id", run_id)
        cols = self._runs.get(run_id)
        return record_from_columns(cols) if cols is not None else None

    async def update(self, run_id: str, *, fence: Lease | None = None,
                     expect_status: StatusFilter | None = None, **fields: Any) -> None:
        cols = check_update(fields)
        check_text("run_id", run_id)
        fenced, expect = check_expect(fence, expect_status)
        self._update(run_id, cols, fenced, expect)

    def _update(self, run_id: str, cols: dict[str, Any], fence: Lease | None = None,
                expect: tuple[str, ...] | None = None) -> None:
        row = self._row(run_id, fence, expect)
        cols.setdefault("updated_at", time.time())
        row.update(cols)

    def _row(self, run_id: str, fence: Lease | None, expect: tuple[str, ...] | None) -> dict[str, Any]:
        row = self._runs.get(run_id)
        if row is None:
            raise RunNotFound(f"run {run_id} is not recorded")
        lost = lease_lost(run_id, fence, expect, owner=row["lease_owner"], token=row["lease_token"],
                          status=row["status"])
        if lost is not None:
            raise lost
        return row

    async def list_runs(self, *, status: StatusFilter | None = None, owner: str | None = None,
                        session_id: str | None = None, provider: str | None = None, node: str | None = None,
                        since: float | None = None, until: float | None = None, before: Cursor | None = None,
                        limit: int = 1000) -> list[RunRecord]:
        match = _matcher(status=status, owner=owner, session_id=session_id, provider=provider, node=node,
                         since=since, until=until)
        cursor = check_cursor(before)
        check_limit(limit)
        rows = [r for r in self._runs.values()
                if match(r) and (cursor is None or (r["created_at"], r["run_id"]) < cursor)]
        rows.sort(key=lambda r: (r["created_at"], r["run_id"]), reverse=True)
        return [record_from_columns({**r, "prompt": ""}) for r in rows[:limit]]

    async def in_flight(self) -> list[RunRecord]:
        rows = sorted((r for r in self._runs.values() if r["status"] in IN_FLIGHT),
                      key=lambda r: (r["created_at"], r["run_id"]))
        return [record_from_columns(r) for r in rows]

    # --- leases -----------------------------------------------------------------------------------

    async def take_lease(self, run_id: str, owner: str, *, seen_token: int, until: float,
                         now: float) -> Lease | None:
        token, expires, at = check_take(run_id, owner, seen_token, until, now)
        row = self._runs.get(run_id)
        if (row is None or row["lease_token"] != seen_token or row["status"] not in LIVE
                or not (row["lease_expires"] < at or row["lease_owner"] in (owner, ""))):
            return None
        row.update(lease_owner=owner, lease_token=token, lease_expires=expires)
        return Lease(owner, token)

    async def renew_leases(self, owner: str, *, until: float) -> dict[str, int]:
        check_owner("owner", owner)
        expires = check_time("until", until)
        held: dict[str, int] = {}
        for run_id, row in self._runs.items():
            if row["lease_owner"] == owner and row["status"] in LIVE:
                row["lease_expires"] = expires
                held[run_id] = row["lease_token"]
        return held

    async def release_lease(self, run_id: str, lease: Lease) -> bool:
        check_text("run_id", run_id, empty_ok=False)
        if check_fence(lease) is None:
            raise InvalidRecord("release_lease() needs the Lease it releases")
        row = self._runs.get(run_id)
        if row is None or (row["lease_owner"], row["lease_token"]) != (lease.owner, lease.token):
            return False
        row["lease_expires"] = 0.0
        return True

    async def expired_leases(self, *, now: float, limit: int = 500) -> list[RunRecord]:
        at = check_time("now", now)
        assert at is not None
        check_limit(limit)
        rows = sorted((r for r in self._runs.values() if r["status"] in LIVE and r["lease_expires"] < at),
                      key=lambda r: (r["created_at"], r["run_id"]))
        return [record_from_columns(r) for r in rows[:limit]]

    # --- replicas ---------------------------------------------------------------------------------

    async def heartbeat_replica(self, replica_id: str, address: str, *, now: float, until: float) -> None:
        check_owner("replica_id", replica_id)
        check_text("address", address)
        at, expires = check_time("now", now), check_time("until", until)
        assert at is not None
        row = self._replicas.get(replica_id)
        started = at if row is None or row["expires_at"] < at else row["started_at"]
        self._replicas[replica_id] = {"address": address, "started_at": started, "heartbeat_at": at,
                                      "expires_at": expires}

    async def remove_replica(self, replica_id: str) -> None:
        check_owner("replica_id", replica_id)
        self._replicas.pop(replica_id, None)

    async def replicas(self, *, now: float) -> list[ReplicaRecord]:
        at = check_time("now", now)
        assert at is not None
        out = []
        for replica_id in sorted(self._replicas):
            row = self._replicas[replica_id]
            if row["expires_at"] < at:
                continue
            leases = sum(1 for r in self._runs.values()
                         if r["lease_owner"] == replica_id and r["status"] in LIVE and r["lease_expires"] >= at)
            out.append(ReplicaRecord(replica_id, row["address"], row["started_at"], row["heartbeat_at"],
                                     row["expires_at"], leases))
        return out

    # --- the fleet queue --------------------------------------------------------------------------

    async def queued(self, *, limit: int = 1000, owner: str | None = None,
                     lease_owner: str | None = None) -> list[RunRecord]:
        principal = check_filter_text("owner", owner, "owner")
        replica = check_filter_text("lease_owner", lease_owner, "lease_owner")
        check_limit(limit)
        rows = sorted((r for r in self._runs.values()
                       if r["status"] == QUEUED and (principal is None or r["owner"] == principal)
                       and (replica is None or r["lease_owner"] == replica)), key=_queue_key)
        return [record_from_columns(r) for r in rows[:limit]]

    async def queue_position(self, run_id: str) -> int | None:
        check_text("run_id", run_id)
        row = self._runs.get(run_id)
        if row is None or row["status"] != QUEUED:
            return None
        key = _queue_key(row)
        return 1 + sum(1 for r in self._runs.values() if r["status"] == QUEUED and _queue_key(r) < key)

    async def queue_stats(self) -> tuple[int, float | None]:
        rows = [r for r in self._runs.values() if r["status"] == QUEUED]
        times = [r["queued_at"] for r in rows if r["queued_at"] is not None]
        return len(rows), min(times) if times else None

    # --- history ----------------------------------------------------------------------------------

    async def sessions(self, *, owner: str | None = None, provider: str | None = None, node: str | None = None,
                       before: Cursor | None = None, limit: int = 100) -> list[SessionRecord]:
        match = _matcher(owner=owner, provider=provider, node=node)
        cursor = check_cursor(before)
        check_limit(limit)
        by_session: dict[str, list[dict[str, Any]]] = {}
        for row in self._runs.values():
            if match(row):
                by_session.setdefault(row["session_id"], []).append(row)
        out = []
        for session_id, rows in by_session.items():
            rows.sort(key=lambda r: (r["created_at"], r["run_id"]), reverse=True)
            latest = rows[0]
            if cursor is not None and (latest["created_at"], session_id) >= cursor:
                continue
            psid = next((r["provider_session_id"] for r in rows if r["provider_session_id"]), "")
            out.append(SessionRecord(session_id=session_id, provider=latest["provider"], owner=latest["owner"],
                                     runs=len(rows), last_run_id=latest["run_id"], last_status=latest["status"],
                                     first_at=min(r["created_at"] for r in rows), last_at=latest["created_at"],
                                     provider_session_id=psid, node=latest["node_address"]))
        out.sort(key=lambda s: (s.last_at, s.session_id), reverse=True)
        return out[:limit]

    # --- inference endpoint leases ---------------------------------------------------------------

    async def put_endpoint_lease(self, rec: EndpointLeaseRecord) -> None:
        cols = check_endpoint_lease(rec)
        self._endpoint_leases[cols["ref"]] = cols

    async def get_endpoint_lease(self, ref: str) -> EndpointLeaseRecord | None:
        cols = self._endpoint_leases.get(check_lease_ref(ref))
        return endpoint_lease_from_columns(cols) if cols is not None else None

    async def delete_endpoint_lease(self, ref: str) -> bool:
        return self._endpoint_leases.pop(check_lease_ref(ref), None) is not None

    async def expired_endpoint_leases(self, *, now: float, limit: int = 500) -> list[str]:
        at = check_time("now", now)
        assert at is not None
        check_limit(limit)
        rows = sorted((r for r in self._endpoint_leases.values() if r["expires_at"] <= at),
                      key=lambda r: (r["expires_at"], r["ref"]))
        return [r["ref"] for r in rows[:limit]]

    # --- events -----------------------------------------------------------------------------------

    async def append_events(self, run_id: str, first_seq: int, last_seq: int, data: bytes, *,
                            fence: Lease | None = None) -> None:
        check_chunk(run_id, first_seq, last_seq, data)
        self._append(run_id, first_seq, last_seq, bytes(data), check_fence(fence))

    def _append(self, run_id: str, first_seq: int, last_seq: int, data: bytes, fence: Lease | None = None) -> None:
        row = self._row(run_id, fence, None)
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

    async def end_run(self, run_id: str, first_seq: int, last_seq: int, data: bytes, *,
                      fence: Lease | None = None, expect_status: StatusFilter | None = None,
                      **fields: Any) -> None:
        cols = check_update(fields)
        check_chunk(run_id, first_seq, last_seq, data)
        fenced, expect = check_expect(fence, expect_status)
        # Every check before anything is written (no await in between: atomic).
        row = self._row(run_id, fenced, expect)
        if first_seq <= row["last_seq"] < last_seq:
            raise overlap_error(run_id, first_seq, row["last_seq"])
        self._append(run_id, first_seq, last_seq, bytes(data), fenced)
        self._update(run_id, cols, fenced, expect)

    async def events_after(self, run_id: str, after_seq: int) -> list[tuple[int, int, bytes]]:
        check_text("run_id", run_id)
        check_seq("after_seq", after_seq)
        return [c for c in self._events.get(run_id, ()) if c[1] > after_seq]

    async def prune(self, ended_before: float, *, max_log_bytes: int | None = None) -> int:
        cutoff = check_time("ended_before", ended_before)
        assert cutoff is not None
        budget = check_max_bytes(max_log_bytes)
        gone = [k for k, r in self._runs.items() if r["ended_at"] is not None and r["ended_at"] < cutoff]
        for run_id in gone:
            del self._runs[run_id], self._events[run_id], self._held[run_id]
        if budget is not None:
            ended = sorted((r for k, r in self._runs.items() if r["ended_at"] is not None and self._held[k] > 0),
                           key=lambda r: (r["ended_at"], r["run_id"]))
            excess = sum(self._held[r["run_id"]] for r in ended) - budget
            for row in ended:
                if excess <= 0:
                    break
                run_id = row["run_id"]
                excess -= self._held[run_id]
                self._events[run_id].clear()
                self._held[run_id] = 0
                row["first_held_seq"] = row["last_seq"] + 1
        return len(gone)

    async def log_bytes(self) -> int:
        return sum(self._held.values())

    async def write_batch(self, ops: Sequence[BatchOp]) -> list[AsmError]:
        skipped: list[AsmError] = []
        for op in ops:
            try:
                if isinstance(op, EventsOp):
                    self._append(op.run_id, op.first_seq, op.last_seq, op.data, check_fence(op.fence))
                else:
                    fence, expect = check_expect(op.fence, op.expect_status)
                    self._update(op.run_id, check_update(dict(op.fields)), fence, expect)
            except (RunNotFound, RunExists, LeaseLost, InvalidRecord) as exc:
                exc.details.setdefault("run_id", op.run_id)
                skipped.append(exc)
        return skipped


def _matcher(*, status: StatusFilter | None = None, owner: str | None = None, session_id: str | None = None,
             provider: str | None = None, node: str | None = None, since: float | None = None,
             until: float | None = None) -> Callable[[dict[str, Any]], bool]:
    """A history query's filter as a predicate on a row (the values checked as the SQL store checks them)."""
    statuses = None if status is None else check_statuses("status", status)
    equal = {column: text for column, value in (("owner", owner), ("session_id", session_id),
                                                 ("provider", provider), ("node_address", node))
             if (text := check_filter_text("node" if column == "node_address" else column, value, column)) is not None}
    low = check_time("since", since, none_ok=True)
    high = check_time("until", until, none_ok=True)

    def match(row: dict[str, Any]) -> bool:
        return ((statuses is None or row["status"] in statuses)
                and all(row[column] == text for column, text in equal.items())
                and (low is None or row["created_at"] >= low) and (high is None or row["created_at"] < high))

    return match
