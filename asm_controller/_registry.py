"""The run registry: what a controller records of its runs, so nothing runs twice and nothing is forgotten.

A run is recorded *before* StartRun leaves for a node (``placing``: created
with the node's address, id and epoch in one commit, durable when it
returns; a resume elsewhere updates it the same way), its events go to the store's event log behind the run (write-behind,
never a drop: a slow database slows the run), and its end is recorded with the
result summary. After a restart the controller reloads the runs still in flight
(:func:`restore_reducer` rebuilds what was reduced) and re-attaches each on the
node that owns it.

:class:`NullRegistry` is the no-op collaborator: a library :class:`Session`
without a store keeps its runs in memory only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from asm_controller._events import Event
from asm_controller._reducer import EventReducer
from asm_controller._wire import encode as encode_batch
from asm_wire import TERMINAL_STATUSES, RunStatus, pb

if TYPE_CHECKING:  # the store is imported by a StoreRegistry only: a client's NullRegistry needs none
    from asm_controller._connector import NodeHandle
    from asm_controller._run import Run
    from asm_controller._store import RunRecord, RunStore, StoreWriter

log = logging.getLogger("asm_controller.registry")

#: The result summary's text is cut to this many characters in the registry (the event log has it all).
SUMMARY_TEXT_MAX = 64 * 1024


def prompt_digest(prompt: str) -> str:
    return "sha256:" + hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


def run_spec(run: Run) -> dict[str, Any]:
    """What re-attaching (or resuming) the run needs, as JSON. Never its env: values there may be secrets
    (only their names: a queued run another replica takes over cannot start without them)."""
    o = run.opts
    spec = {"cwd": o.cwd, "permission_mode": o.permission_mode, "options": dict(o.options),
            "approval_timeout_ms": o.approval_timeout_ms, "on_node_lost": o.on_node_lost,
            "selector": dict(o.selector), "resume_prompt": o.resume_prompt}
    if o.env:
        spec["env_keys"] = sorted(o.env)
    asked = run.requested
    if asked.providers:  # provider failover: a replica taking over a queued run keeps its candidates
        spec["providers"] = list(asked.candidates)
        spec["options"] = dict(asked.options)
        if asked.provider_options:
            spec["provider_options"] = {k: dict(v) for k, v in asked.provider_options.items()}
    if asked.lane != "auto":
        spec["lane"] = asked.lane
    return spec


class NullRegistry:
    """Records nothing (a library session without a store)."""

    durable = False

    async def placing(self, run: Run, handle: NodeHandle) -> None:
        return None

    async def queued(self, run: Run) -> None:
        return None

    async def events(self, run: Run, events: Sequence[Event]) -> None:
        return None

    def progress(self, run: Run, **fields: Any) -> None:
        return None

    def log(self, run: Run, events: Sequence[Event]) -> None:
        return None

    def ended(self, run: Run) -> None:
        return None

    async def flush(self) -> None:
        return None


class StoreRegistry:
    """Records runs in a :class:`RunStore` (memory, SQLite, PostgreSQL)."""

    durable = True

    def __init__(self, store: RunStore, writer: StoreWriter | None = None, *, owner: str = "",
                 lease_ttl_s: float = 10.0) -> None:
        from asm_controller._store import StoreWriter

        self.store = store
        self.writer = writer if writer is not None else StoreWriter(store)
        #: This replica's id: every run it records is leased to it (fencing token 1), and every write of
        #: a run carries its lease, so a replica whose lease was taken over can no longer write it.
        self.owner = owner
        self.lease_ttl_s = lease_ttl_s

    def _new(self, run: Run, **fields: Any) -> RunRecord:
        from asm_controller._store import RunRecord

        now = time.time()
        lease: dict[str, Any] = {}
        if self.owner:
            lease = {"lease_owner": self.owner, "lease_token": 1, "lease_expires": now + self.lease_ttl_s}
        return RunRecord(run_id=run.run_id, session_id=run.session_id, provider=run.opts.provider,
                         owner=run.owner, prompt_digest=prompt_digest(run.prompt), spec=run_spec(run),
                         priority=run.priority, created_at=now, updated_at=now, **lease, **fields)

    def _created(self, run: Run) -> None:
        run.recorded = True
        if self.owner:
            from asm_controller._store import Lease

            run.lease = Lease(self.owner, 1)
            run.lease_at = time.monotonic()

    async def placing(self, run: Run, handle: NodeHandle) -> None:
        """Durable before StartRun is sent: a controller killed right after knows where the run may be.

        A queued run moves to its node by a compare-and-set on its lease and its ``queued`` status: two
        replicas can never both place it.
        """
        node: dict[str, Any] = {"node_address": handle.target.address, "node_id": handle.node_id, "node_epoch": handle.epoch,
                "node_run_id": run.node_run_id, "node_seq": run.node_seq}
        if not run.recorded:
            # "pending" is the registry's own status (recorded, not started: the wire's "starting"), not a RunStatus.
            await self.store.create(self._new(run, status="pending", **node))
            self._created(run)
            return
        await self.writer.flush()  # earlier queued writes of this run (a resume's events) come first
        if run.fleet_queued:
            # The prompt was kept only for the queue (another replica could have started it).
            await self.store.update(run.run_id, fence=run.lease, expect_status="queued", status="pending",
                                    prompt="", **node)
            run.fleet_queued = False
            return
        await self.store.update(run.run_id, fence=run.lease, **node)

    async def queued(self, run: Run) -> None:
        """Durable before the run waits: status queued, its priority and times, and its prompt (a replica
        taking it over starts it from the store).

        Never for a run that already started on a node (it has events: a resume elsewhere waiting for
        a slot): a replica taking it over would start its original prompt again from seq 0, without
        the resume. It waits in this replica's queue only; the store keeps it in flight on the node it
        left, so a replica taking it over re-attaches it there like any run in flight (it ends
        node_lost when that node no longer has it), never starting it again.
        """
        if run.reducer.last_seq > 0 or run.reducer.metadata.get("resumed"):
            return
        fields: dict[str, Any] = {"status": "queued", "queued_at": run.queued_at,
                                  "queue_deadline": run.queue_deadline, "prompt": run.prompt}
        if not run.recorded:
            await self.store.create(self._new(run, **fields))
            self._created(run)
        else:
            await self.writer.flush()
            # A compare-and-set: from "pending" (its try was placed, then refused: placing blanked the
            # prompt, stored again here) or "queued"; never over an end another request recorded.
            await self.store.update(run.run_id, fence=run.lease, expect_status=("pending", "queued"),
                                    node_address="", node_id="", node_epoch="", priority=run.priority, **fields)
        run.fleet_queued = True

    async def events(self, run: Run, events: Sequence[Event]) -> None:
        if not events or not run.recorded:
            return
        data = encode_batch(events)  # the node's own bytes when the events came unchanged
        await self.writer.submit_events(run.run_id, events[0].pb.seq, events[-1].pb.seq, data, fence=run.lease)
        self.writer.submit_update(run.run_id, fence=run.lease, node_seq=run.node_seq, **_live_fields(run))

    def progress(self, run: Run, **fields: Any) -> None:
        self.writer.submit_update(run.run_id, fence=run.lease, **fields)

    def log(self, run: Run, events: Sequence[Event]) -> None:
        """Events made on the controller (its own end of a run, a policy's answer): queued, no back-pressure."""
        if events and run.recorded:
            data = pb.EventBatch(events=[e.pb for e in events]).SerializeToString()
            self.writer.submit_events_nowait(run.run_id, events[0].pb.seq, events[-1].pb.seq, data,
                                             fence=run.lease)

    def ended(self, run: Run) -> None:
        """The run's end is queued; ``flush`` makes it durable."""
        if not run.recorded:
            return
        result = run.result()
        summary = result.to_summary()
        if len(summary.get("text") or "") > SUMMARY_TEXT_MAX:
            summary["text"] = summary["text"][:SUMMARY_TEXT_MAX]
            summary["text_truncated"] = True
        status = result.status if result.status in TERMINAL_STATUSES else RunStatus.FAILED.value
        fields = _storable(run, {"result": _jsonable(summary), **_live_fields(run)})
        if "result" not in fields:  # refused as a whole (too large as JSON): the end keeps its outcome
            fields["result"] = {"kind": "result_summary", "run_id": run.run_id, "session_id": run.session_id,
                                "provider": run.opts.provider, "status": status, "result_dropped": True}
        self.writer.submit_update(run.run_id, fence=run.lease, status=status, ended_at=time.time(),
                                  node_seq=run.node_seq, prompt="", **fields)

    async def flush(self) -> None:
        await self.writer.flush()


Registry = NullRegistry | StoreRegistry


def _live_fields(run: Run) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    psid = run.reducer.provider_session_id
    if psid:
        fields["provider_session_id"] = psid
    if run.reducer.status == RunStatus.RUNNING:
        fields["status"] = RunStatus.RUNNING.value
    return _storable(run, fields)


#: The fields already warned about per run (dropped again on every later write, silently).
_refused: weakref.WeakKeyDictionary[Run, set[str]] = weakref.WeakKeyDictionary()


def _storable(run: Run, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without the values the store would refuse (InvalidRecord), each dropped with a warning.

    They come from the node (a provider session id of any length, a NUL in it): refused, the whole
    write would be, and a refused end leaves the run live in the store and its follower waiting."""
    from asm_controller._store._base import InvalidRecord, check_fields

    out: dict[str, Any] = {}
    for name, value in fields.items():
        try:
            check_fields({name: value})
        except InvalidRecord as err:
            warned = _refused.setdefault(run, set())
            if name not in warned:  # once per run and field: a live field is checked on every batch
                warned.add(name)
                log.warning("run %s: its %s is not recorded (the store refuses it: %s)", run.run_id, name,
                            err.message)
            continue
        out[name] = value
    return out


def _jsonable(value: Any) -> Any:
    """The summary as plain JSON (metadata may hold tuples or other non-JSON values)."""
    return json.loads(json.dumps(value, default=str))


def decode_chunks(chunks: Sequence[tuple[int, int, bytes]], after_seq: int = 0) -> list[pb.Event]:
    """The stored events after ``after_seq``, in order."""
    out: list[pb.Event] = []
    for _first, _last, data in chunks:
        out.extend(m for m in pb.EventBatch.FromString(data).events if m.seq > after_seq)
    return out


def restore_reducer(reducer: EventReducer, events: Sequence[pb.Event]) -> list[Event]:
    """Fold stored events into a fresh reducer (a recovered run goes on from where it was)."""
    applied = []
    for m in events:
        ev = Event(m)
        if reducer.apply(ev):
            applied.append(ev)
    reducer.bookkeeping.clear()
    return applied
