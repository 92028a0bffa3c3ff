"""The fleet queue against the run store, in-process: a FleetApi (MemoryStore) in front of embedded node
agents, with one collaborator faked where a race needs a precise interleaving.

- a queued run whose placed try is refused again is recorded queued again (with its prompt), not left
  pending on a node that never had it and then cancelled as "ended elsewhere";
- a waiting run whose lease another replica took is not ended here (the LeaseKeeper releases it), while
  one ended in the store by any replica is;
- an interrupt that lands while the run is being recorded as queued ends it;
- a run resumed elsewhere (``on_node_lost="resume"``) that waits for a slot is never recorded as queued
  with its original prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import asm_controller._fleetqueue as fleetqueue
from asm_controller import EmbeddedNode, Event
from asm_controller._metrics import ControllerMetrics
from asm_controller._store import Lease, MemoryStore
from asm_controller.service import ControllerConfig, FleetApi
from asm_node import NodeAgent
from asm_node.testing import running_agent, test_config
from asm_wire import NodeAtCapacity, pb


@contextlib.asynccontextmanager
async def _fleet(store: MemoryStore, nodes: Sequence[EmbeddedNode], replica_id: str = "B") -> AsyncIterator[FleetApi]:
    api = FleetApi(ControllerConfig(replica_id=replica_id, lease_ttl_s=30), ControllerMetrics(CollectorRegistry()),
                   store=store)
    api.session.defaults = replace(api.session.defaults, node=list(nodes))
    await api.recover(exclusive=False)
    try:
        yield api
    finally:
        await api.session.stop(timeout=5.0)
        await api.queue.close()
        await api.keeper.stop(release=())


def _refuse(agent: NodeAgent, times: int | None) -> dict[str, int]:
    """The agent's StartRun refuses ``times`` times (None: always) with at_capacity, as if another
    replica's run took the slot after this one's preflight."""
    refused = {"n": 0}
    real = agent.start_run

    def start_run(req: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        if times is None or refused["n"] < times:
            refused["n"] += 1

            async def refusal() -> AsyncIterator[pb.EventBatch]:
                raise NodeAtCapacity("node is at capacity (1 runs)")
                yield pb.EventBatch()  # pragma: no cover (an async generator)
            return refusal()
        return real(req)

    agent.start_run = start_run  # type: ignore[method-assign]
    return refused


async def _until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_placed_try_refused_again_is_recorded_queued_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit finding 1: placing moved the queued run to "pending" on the node (prompt blanked); StartRun
    was refused at_capacity; the run waited again with the store still saying pending, so the queue's
    next look at the store cancelled it (user_cancelled) although nobody interrupted it."""
    monkeypatch.setattr(fleetqueue, "TICK_S", 0.05)
    async with running_agent(test_config(max_runs=1)) as agent:
        refused = _refuse(agent, 2)
        async with _fleet(MemoryStore(), [EmbeddedNode(agent)]) as api:
            recorded: list[tuple[str, str]] = []
            real_record = api.queue._record

            async def record(run: Any) -> None:
                await real_record(run)
                rec = await api.store.get(run.run_id)
                assert rec is not None
                recorded.append((rec.status, rec.prompt))

            api.queue._record = record
            stream = api.session.stream("echo hi", provider="shell", run_id="R1")
            async for _ in stream:
                pass
            result = stream.result
            assert result is not None
            assert result.status == "completed", result.error
            assert refused["n"] == 2
            # Queued after each refused try, with its prompt (another replica could start it from there).
            assert recorded == [("queued", "echo hi"), ("queued", "echo hi")]
            await api.registry.flush()
            rec = await api.store.get("R1")
            assert rec is not None and rec.status == "completed"


async def _queued_on_b_taken_by_a(b: Any, store: MemoryStore) -> tuple[asyncio.Task[Any], Lease]:
    """R1 waits in B's queue (no room anywhere), then A takes its lease: B's reader, and A's lease."""
    b.queue._room = lambda: False
    stream = b.session.stream("echo hi", provider="shell", run_id="R1")
    reader = asyncio.create_task(stream.next_batch())
    await _until(lambda: b.queue.waiting() == 1, "R1 to wait in B's queue")
    rec = await store.get("R1")
    assert rec is not None and rec.status == "queued"
    taken = await store.take_lease("R1", "A", seen_token=rec.lease_token, until=time.time() + 30, now=1e15)
    assert taken is not None
    return reader, taken


async def test_a_waiting_run_whose_lease_moved_is_not_ended_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit finding 3: B (paused past its lease) had its queued run taken over by A; B's queue did not
    find it among *its* queued runs and ended it user_cancelled for B's client while A ran the prompt.
    A moved lease is the LeaseKeeper's (a release: the client re-attaches); only an end in the store
    (whoever recorded it) ends the waiter."""
    monkeypatch.setattr(fleetqueue, "TICK_S", 3600.0)  # the test looks at the store itself
    async with running_agent(test_config(max_runs=1)) as agent:
        _refuse(agent, None)
        store = MemoryStore()
        async with _fleet(store, [EmbeddedNode(agent)]) as b:
            reader, _ = await _queued_on_b_taken_by_a(b, store)
            await b.queue._drop_ended_elsewhere()
            run = b.session.get_run("R1")
            assert run is not None and not run.cancel_requested, "a run whose lease moved was ended as interrupted"
            assert b.queue.waiting() == 1 and not reader.done()
            # The LeaseKeeper's turn: it releases the run (a detach, no end of B's making).
            await b.keeper.tick()
            await asyncio.wait_for(run.done.wait(), 10)
            assert run.detaching and not run.cancel_requested and b.queue.waiting() == 0
            assert run.reducer.error is None, run.reducer.error
            rec = await store.get("R1")
            assert rec is not None and (rec.status, rec.lease_owner, rec.prompt) == ("queued", "A", "echo hi")
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader


async def test_a_waiting_run_ended_in_the_store_by_another_replica_is_ended_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of finding 3: an end in the store, whoever recorded it, ends the waiter here."""
    monkeypatch.setattr(fleetqueue, "TICK_S", 3600.0)
    async with running_agent(test_config(max_runs=1)) as agent:
        _refuse(agent, None)
        store = MemoryStore()
        async with _fleet(store, [EmbeddedNode(agent)]) as b:
            reader, taken = await _queued_on_b_taken_by_a(b, store)
            # A ends it (an interrupt through A, which holds its lease now).
            await store.update("R1", fence=taken, expect_status="queued", status="interrupted", ended_at=time.time())
            await b.queue._drop_ended_elsewhere()
            run = b.session.get_run("R1")
            assert run is not None and run.cancel_requested and b.queue.waiting() == 0
            await asyncio.wait_for(run.done.wait(), 10)
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader


async def test_an_interrupt_while_the_run_is_recorded_queued_ends_it() -> None:
    """Audit finding 4: InterruptRun arrived while the queue wrote the run's "queued" record (no waiter
    yet, so the queue's cancel found nothing) and was answered accepted; the run then waited for a slot."""
    async with running_agent(test_config(max_runs=1)) as agent:
        _refuse(agent, None)
        store = MemoryStore()
        async with _fleet(store, [EmbeddedNode(agent)]) as api:
            api.queue._room = lambda: False
            real_record = api.queue._record
            entered, go_on = asyncio.Event(), asyncio.Event()

            async def slow_record(run: Any) -> None:
                entered.set()
                await go_on.wait()  # the store write of "queued", slow
                await real_record(run)

            api.queue._record = slow_record
            stream = api.session.stream("echo hi", provider="shell", run_id="R1")
            reader = asyncio.create_task(stream.next_batch())
            await asyncio.wait_for(entered.wait(), 10)
            await api.session.interrupt("R1")
            go_on.set()
            batch = await asyncio.wait_for(reader, 10)  # today: it waits for a slot (forever here)
            assert batch and batch[-1].kind == "run_completed"
            result = stream.result
            assert result is not None and result.error is not None and result.error.kind == "user_cancelled"
            assert api.queue.waiting() == 0
            await api.registry.flush()
            rec = await store.get("R1")
            assert rec is not None and rec.status == "interrupted"


def _batch(*events: Event) -> pb.EventBatch:
    return pb.EventBatch(events=[e.pb for e in events])


class _Resume:
    """Two embedded nodes: ``first`` starts R1 (a provider session id) and then stops it (node_shutdown),
    ``second`` is full until ``full`` is cleared and then completes whatever it is asked to start."""

    def __init__(self, first: NodeAgent, second: NodeAgent) -> None:
        self.full = True
        self.starts: list[pb.StartRunRequest] = []  # every StartRun that reached a node
        self.common = {"run_id": "R1", "session_id": "s", "provider": "shell"}
        first.start_run = self._stopped  # type: ignore[method-assign]
        self._real_preflight = second.preflight
        second.preflight = self._preflight  # type: ignore[method-assign]
        second.start_run = self._completed  # type: ignore[method-assign]
        self.nodes = [EmbeddedNode(first, name="first", priority=200), EmbeddedNode(second, name="second")]

    def _stopped(self, req: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        self.starts.append(req)

        async def stream() -> AsyncIterator[pb.EventBatch]:
            yield _batch(Event.synthetic("run_started", **self.common, seq=1, provider_session_id="ps-1"))
            yield _batch(Event.synthetic("error", **self.common, seq=2, message="node shutting down",
                                         code="node_shutdown", domain="runtime", severity=pb.SEVERITY_ERROR))
        return stream()

    async def _preflight(self, req: pb.PreflightRequest) -> pb.PreflightResponse:
        if self.full:
            raise NodeAtCapacity("node is at capacity (1 runs)")
        return await self._real_preflight(req)

    def _completed(self, req: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        self.starts.append(req)

        async def stream() -> AsyncIterator[pb.EventBatch]:
            mine = {**self.common, "run_id": req.run_id}
            yield _batch(Event.synthetic("run_started", **mine, seq=1, provider_session_id="ps-1"),
                         Event.synthetic("run_completed", **mine, seq=2, status="completed"))
        return stream()

    async def waiting(self, api: FleetApi) -> asyncio.Task[Any]:
        """R1 started on ``first``, stopped there, and its resume waits for a slot (``second`` is full)."""
        api.queue._room = lambda: False
        self.stream = api.session.stream("the original prompt", provider="shell", run_id="R1",
                                         on_node_lost="resume", resume_prompt="go on")
        reader = asyncio.create_task(self.stream.next_batch())
        await _until(lambda: api.queue.waiting() == 1, "the resume to wait for a slot")
        await api.registry.flush()
        rec = await api.store.get("R1")
        assert rec is not None
        assert rec.status != "queued" and rec.prompt == "", (rec.status, rec.prompt)
        assert rec.node_address == "first"  # in flight where it was: a takeover re-attaches it there
        assert await api.store.queue_stats() == (0, None)
        assert [r.prompt for r in self.starts] == ["the original prompt"]
        return reader


async def test_a_resume_waiting_for_a_slot_is_not_recorded_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit finding 5: a run resumed elsewhere (on_node_lost="resume") whose resume had to wait was
    recorded queued with its original prompt: a replica taking it over would start that prompt again
    from seq 0. It waits in the replica's queue only; the store keeps it in flight on the node it left."""
    monkeypatch.setattr(fleetqueue, "TICK_S", 0.05)
    async with running_agent(test_config(max_runs=1)) as first, running_agent(test_config(max_runs=1)) as second:
        nodes = _Resume(first, second)
        async with _fleet(MemoryStore(), nodes.nodes) as api:
            reader = await nodes.waiting(api)
            nodes.full = False
            api.queue._room = lambda: True
            api.queue.wake()
            with contextlib.suppress(StopAsyncIteration):
                await asyncio.wait_for(reader, 10)
                async for _ in nodes.stream:
                    pass
            result = nodes.stream.result
            assert result is not None and result.status == "completed", result.error
            assert [r.prompt for r in nodes.starts] == ["the original prompt", "go on"]
            assert '"resume": "ps-1"' in nodes.starts[1].options_json


async def test_a_waiting_resume_taken_over_is_never_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 5 after a failover: the replica taking the waiting resume over treats it as in flight on
    the node it left (re-attached there, here ended as it cannot be), never queues it or starts its
    original prompt again."""
    monkeypatch.setattr(fleetqueue, "TICK_S", 3600.0)
    async with running_agent(test_config(max_runs=1)) as first, running_agent(test_config(max_runs=1)) as second:
        nodes = _Resume(first, second)
        store = MemoryStore()
        async with _fleet(store, nodes.nodes, "B") as b, _fleet(store, nodes.nodes, "X") as x:
            reader = await nodes.waiting(b)
            rec = await store.get("R1")
            assert rec is not None
            lease = await store.take_lease("R1", "X", seen_token=rec.lease_token, until=time.time() + 30, now=1e15)
            assert lease is not None
            await b.keeper.tick()  # B's keeper sees the lease moved: it releases its waiting run
            run = b.session.get_run("R1")
            assert run is not None
            await asyncio.wait_for(run.done.wait(), 10)
            assert run.detaching and b.queue.waiting() == 0
            nodes.full = False
            rec = await store.get("R1")
            assert rec is not None
            await x.take_over(rec, lease)
            taken = x.session.get_run("R1")
            if taken is not None:
                await asyncio.wait_for(taken.done.wait(), 10)
            await x.registry.flush()
            rec = await store.get("R1")
            assert rec is not None and rec.status not in ("queued", "pending", "running"), rec.status
            assert x.queue.waiting() == 0
            assert [r.prompt for r in nodes.starts] == ["the original prompt"], "the prompt was started again"
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader


async def test_recording_queued_again_never_overwrites_an_end() -> None:
    """The "queued again" write is a compare-and-set on pending/queued: a run ended meanwhile (an
    interrupt through another replica) stays ended, and the run's driver is told (LeaseLost)."""
    from types import SimpleNamespace

    from asm_controller._options import RunOptions
    from asm_controller._registry import StoreRegistry
    from asm_controller._store import LeaseLost

    store = MemoryStore()
    registry = StoreRegistry(store, owner="B")
    run: Any = SimpleNamespace(
        run_id="R1", session_id="s", owner="", prompt="the prompt", priority=0, queued_at=time.time(),
        queue_deadline=None, recorded=False, fleet_queued=False, lease=None, lease_at=0.0,
        reducer=SimpleNamespace(last_seq=0, metadata={}))
    run.opts = run.requested = RunOptions(provider="shell", node=[])  # run_spec reads the run's options
    await registry.queued(run)
    rec = await store.get("R1")
    assert rec is not None and (rec.status, rec.prompt) == ("queued", "the prompt") and run.fleet_queued
    # Placed (its try): pending, prompt blanked; then recorded queued again with its prompt.
    await store.update("R1", fence=run.lease, expect_status="queued", status="pending", prompt="", node_address="n")
    run.fleet_queued = False
    await registry.queued(run)
    rec = await store.get("R1")
    assert rec is not None and (rec.status, rec.prompt, rec.node_address) == ("queued", "the prompt", "")
    await store.update("R1", expect_status="queued", status="interrupted", ended_at=time.time(), prompt="")
    run.fleet_queued = False
    with pytest.raises(LeaseLost):
        await registry.queued(run)
    rec = await store.get("R1")
    assert rec is not None and rec.status == "interrupted" and rec.prompt == ""
