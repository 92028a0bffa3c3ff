"""Lease takeover and release against what the store says now, in-process (embedded node, memory store):
a takeover acts on the record as it is after its compare-and-set, a run that ended while it was released
still has its end recorded, a value the store refuses never hangs the run's follower."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from asm_controller import EmbeddedNode
from asm_controller._metrics import ControllerMetrics
from asm_controller._registry import decode_chunks
from asm_controller._run import Run
from asm_controller._store import Lease, MemoryStore, RunRecord
from asm_controller.service import ControllerConfig, FleetApi
from asm_node.testing import running_agent, test_config
from asm_wire import NodeAtCapacity, RunNotFound, StoreError, pb

RUN_COMPLETED = pb.EVENT_KIND_RUN_COMPLETED


def _api(store: MemoryStore, replica: str, agent: Any) -> FleetApi:
    api = FleetApi(ControllerConfig(replica_id=replica, lease_ttl_s=10), ControllerMetrics(CollectorRegistry()),
                   store=store)
    api.session.defaults = replace(api.session.defaults, node=[EmbeddedNode(agent)])
    return api


async def _until(what: Any, timeout: float = 10.0) -> None:
    """Wait for a condition (polled: the store has no change feed), bounded in time."""
    deadline = time.monotonic() + timeout
    while not await what():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _stop(*apis: FleetApi) -> None:
    for api in apis:
        await api.keeper.stop()
        await api.session.stop(timeout=2)
        await api.registry.writer.close(timeout=2)
        await api.queue.close()


async def _status(store: MemoryStore, run_id: str) -> str:
    rec = await store.get(run_id)
    return rec.status if rec is not None else ""


async def test_a_takeover_acts_on_the_record_as_it_is_after_the_lease_moved() -> None:
    """B's queued run is placed by B (paused past its TTL, then resumed) between A's read of the expired
    leases and A's compare-and-set: A re-attaches the placed run, it never queues the stale prompt again."""
    async with running_agent(test_config(max_runs=1)) as agent:
        async def full(_: Any) -> Any:
            raise NodeAtCapacity("node is at capacity (1 runs)")

        agent.preflight = full  # type: ignore[method-assign,assignment]
        store = MemoryStore()
        b, a = _api(store, "B", agent), _api(store, "A", agent)
        b.queue._room = lambda: False
        a.queue._room = lambda: False
        await b.recover(exclusive=False)
        try:
            stream = b.session.stream("echo once", provider="shell", run_id="R1")
            first = asyncio.ensure_future(stream.next_batch())

            async def queued() -> bool:
                return await _status(store, "R1") == "queued"

            await _until(queued)
            store._runs["R1"]["lease_expires"] = 0.0  # B paused past its TTL (no renewal, no fencing yet)
            real_take = store.take_lease

            async def take_lease(run_id: str, owner: str, **kw: Any) -> Lease | None:
                if owner == "A":  # B resumes first: its queue places R1 (fence B/1, expect queued)
                    await store.update("R1", fence=Lease("B", 1), expect_status="queued", status="pending",
                                       prompt="", node_address="127.0.0.1:9", node_id="n1", node_epoch="e1")
                return await real_take(run_id, owner, **kw)

            store.take_lease = take_lease  # type: ignore[method-assign]
            assert await a.keeper._take_expired(time.time()) == 1
            run = a.session.get_run("R1")
            assert run is not None
            assert run.attach and run.prompt == "", "the taken-over run was queued again with its stale prompt"
            rec = await store.get("R1")
            assert rec is not None and rec.status != "queued" and rec.lease_owner == "A"
            first.cancel()
        finally:
            await _stop(a, b)


async def test_a_run_that_ended_while_it_was_released_has_its_end_recorded() -> None:
    """Fenced while its last batch (run_completed) waits for the store: the end the reducer has is still
    recorded, and the keeper does not keep a live lease on a run this replica follows no more."""
    async with running_agent(test_config()) as agent:
        store = MemoryStore()
        api = _api(store, "A", agent)
        await api.recover(exclusive=False)
        gate, blocked = asyncio.Event(), asyncio.Event()
        real_events = api.registry.events

        async def events(run: Run, evs: Sequence[Any]) -> None:
            await real_events(run, evs)  # queued, then back-pressure: the store is unreachable
            if any(e.pb.kind == RUN_COMPLETED for e in evs):
                blocked.set()
                await gate.wait()

        api.registry.events = events  # type: ignore[method-assign,assignment]
        try:
            stream = api.session.stream("echo done", provider="shell", run_id="R6")

            async def drain() -> None:
                async for _ in stream.batches():
                    pass

            reader = asyncio.ensure_future(drain())
            await asyncio.wait_for(blocked.wait(), 10)
            run = api.session.get_run("R6")
            assert run is not None and run.reducer.finished
            api.keeper._fence("the store is unreachable (test)")
            await asyncio.wait_for(run.done.wait(), 10)
            await asyncio.wait_for(reader, 10)
            api.keeper.healthy = True
            await api.registry.flush()
            await api.keeper.tick()
            await api.registry.flush()

            async def ended() -> bool:
                return await _status(store, "R6") == "completed"

            await _until(ended)
            logged = decode_chunks(await store.events_after("R6", 0))
            assert logged and logged[-1].kind == RUN_COMPLETED
        finally:
            gate.set()
            await _stop(api)


async def test_a_done_run_taken_over_here_is_followed_again_from_its_record() -> None:
    """take_over of a run this process knows but has done with (its end not in the store) does not hold
    the lease while following nothing: the record is adopted and followed to its end."""
    async with running_agent(test_config()) as agent:
        store = MemoryStore()
        api = _api(store, "A", agent)
        await api.recover(exclusive=False)
        try:
            result = await api.session.query("echo again", provider="shell", run_id="R7")
            assert result.status == "completed"
            await api.registry.flush()
            # Its end was refused here (another replica had taken the lease in a pause), and that replica
            # died before it recorded one: live in the store, its lease expired.
            store._runs["R7"].update(status="running", ended_at=None, lease_owner="B", lease_token=5,
                                     lease_expires=0.0, node_address="127.0.0.1:9")
            api._targets["127.0.0.1:9"] = EmbeddedNode(agent)  # type: ignore[assignment]  # re-attached here
            await api.keeper.tick()
            run = api.session.get_run("R7")
            assert run is not None and run.attach, "the lease was taken but nobody follows the run"
            await asyncio.wait_for(run.done.wait(), 10)
            await api.registry.flush()
            rec = await store.get("R7")
            assert rec is not None and (rec.status, rec.lease_owner) == ("completed", "A")
        finally:
            await _stop(api)



@pytest.mark.parametrize("psid", ["p" * 300, "sess\x00ion"])
async def test_a_value_from_the_node_the_store_refuses_never_hangs_the_follower(
        psid: str, caplog: pytest.LogCaptureFixture) -> None:
    """A provider session id the store refuses (over 256 characters, a NUL) is dropped with a warning:
    the run's end is recorded and reaches its follower."""
    async with running_agent(test_config()) as agent:
        store = MemoryStore()
        api = _api(store, "A", agent)
        await api.recover(exclusive=False)
        try:
            real_placing = api.registry.placing

            async def placing(run: Run, handle: Any) -> None:
                run.reducer._psid = psid  # as the node will report it (the first one seen is kept)
                await real_placing(run, handle)

            api.registry.placing = placing  # type: ignore[method-assign]
            stream = api.session.stream("echo psid", provider="shell", run_id="R9")
            kinds: list[int] = []

            async def drain() -> None:
                async for batch in stream.batches():
                    kinds.extend(e.pb.kind for e in batch)

            await asyncio.wait_for(drain(), 10)
            assert kinds and kinds[-1] == RUN_COMPLETED
            assert stream.result is not None and stream.result.status == "completed"
            await asyncio.wait_for(api.registry.flush(), 10)
            rec = await store.get("R9")
            assert rec is not None and (rec.status, rec.provider_session_id) == ("completed", "")
            assert any("provider_session_id is not recorded" in r.getMessage() for r in caplog.records)
        finally:
            await _stop(api)


class _CrashingStore(MemoryStore):
    """The process dies (here: the store call fails) at the first append of a run's events."""

    async def append_events(self, run_id: str, first_seq: int, last_seq: int, data: bytes, *,
                            fence: Lease | None = None) -> None:
        raise StoreError("the run store memory: failed (append_events): the controller was killed")


async def test_an_interrupted_queued_run_is_never_ended_without_its_end_in_the_log() -> None:
    """_end_unplaced writes the ended status and the end's events in one transaction (audit 7a): a crash
    cannot leave a terminal record whose log has no run_completed for a re-attaching follower."""
    async with running_agent(test_config()) as agent:
        store = _CrashingStore()
        api = _api(store, "A", agent)
        await store.create(RunRecord(run_id="RQ", session_id="s", provider="shell", status="queued",
                                     prompt="echo q", lease_owner="B", lease_token=1,
                                     lease_expires=time.time() + 60))
        rec = await store.get("RQ")
        assert rec is not None
        try:
            with contextlib.suppress(StoreError):
                await api._interrupt_record(rec)
            rec = await store.get("RQ")
            assert rec is not None
            logged = decode_chunks(await store.events_after("RQ", 0))
            ended_in_log = bool(logged) and logged[-1].kind == RUN_COMPLETED
            assert rec.status == "queued" or ended_in_log, (
                f"the record says {rec.status} but its log has no end (a follower waits for it in vain)")
        finally:
            await _stop(api)


async def test_an_interrupt_of_a_run_not_on_its_node_yet_is_not_lost() -> None:
    """A pending run of another replica whose StartRun has not reached its node yet (not_found there):
    the interrupt is tried again until the node knows the run (audit 7b)."""
    async with running_agent(test_config()) as agent:
        store = MemoryStore()
        api = _api(store, "A", agent)
        await store.create(RunRecord(run_id="RP", session_id="s", provider="shell", status="pending",
                                     node_address="127.0.0.1:9", node_id="n1", node_epoch="e1",
                                     lease_owner="B", lease_token=1, lease_expires=time.time() + 60))
        asked: list[str] = []

        class NodeApi:
            async def interrupt_run(self, request: pb.InterruptRunRequest) -> pb.InterruptRunResponse:
                asked.append(request.run_id)
                if len(asked) < 3:  # the StartRun is still on its way
                    raise RunNotFound(f"Unknown run id: {request.run_id}")
                return pb.InterruptRunResponse(accepted=True)

        async def node_of(rec: RunRecord) -> Any:
            return SimpleNamespace(api=NodeApi())

        api._node_of = node_of  # type: ignore[method-assign]
        rec = await store.get("RP")
        assert rec is not None
        try:
            assert await asyncio.wait_for(api._interrupt_record(rec), 10) is True
            assert asked == ["RP", "RP", "RP"]
        finally:
            await _stop(api)


async def test_a_run_taken_over_as_placed_is_attached_once_its_start_reaches_the_node(
    node_process: Any,
) -> None:
    """B placed R (pending, no events) and was paused past its lease before its StartRun reached the node;
    A takes R over and re-attaches: the node does not know R yet. A asks again (bounded) instead of ending
    R node_lost while it then runs there; R's end is A's to record, once."""
    from asm_controller import RemoteNode
    from asm_controller._client import GrpcNodeClient

    node = node_process()
    info = node.info
    assert info is not None
    store = MemoryStore()
    await store.create(RunRecord(run_id="RL", session_id="s", provider="shell", status="pending",
                                 node_address=node.address, node_id=info.node_id, node_epoch=info.boot_epoch,
                                 node_run_id="RL", lease_owner="B", lease_token=1, lease_expires=0.0))
    async with running_agent(test_config()) as agent:  # (the session's default node: unused here)
        a = _api(store, "A", agent)
        client = GrpcNodeClient(RemoteNode(node.address))
        try:
            assert await a.keeper._take_expired(time.time()) == 1
            run = a.session.get_run("RL")
            assert run is not None and run.attach
            await asyncio.sleep(0.3)  # A's first attach has been answered not_found by now
            assert run.state != "done", run.result()
            # B's StartRun arrives at last: the node runs R (once).
            req = pb.StartRunRequest(run_id="RL", session_id="s", provider="shell", prompt="echo once")
            async for _ in client.start_run(req):
                pass
            await asyncio.wait_for(run.done.wait(), 15)
            result = run.result()
            assert result.status == "completed", result.error
            assert "once" in result.text
        finally:
            await client.close()
            await _stop(a)
