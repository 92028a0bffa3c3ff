"""The controller's run registry as the runtime uses it: recorded before StartRun, logged, ended, bounded.

In-process node agents (the embedded seam) and a real in-process controller on 127.0.0.1 with a
SQLite registry; the end-to-end kill -9 scenario is in tests/test_controller_recovery.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from asm_controller import EmbeddedNode, RemoteNode, RunRecord, Session, StoreError, StoreRegistry, open_store
from asm_controller._registry import decode_chunks, prompt_digest
from asm_controller.service import ControllerConfig, start_controller
from asm_node import NodeAgent
from asm_wire import pb
from asm_wire.v1 import node_pb2_grpc


class RecordingNode:
    """A node agent that notes what the registry held at the moment each StartRun arrived."""

    def __init__(self, agent: NodeAgent, store: Any) -> None:
        self._agent = agent
        self._store = store
        self.seen_at_start: list[RunRecord | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)

    async def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        self.seen_at_start.append(await self._store.get(request.run_id))
        async for batch in self._agent.start_run(request):
            yield batch


async def test_a_run_is_recorded_before_start_run_and_its_end_and_events_after(
    agent: NodeAgent, tmp_path: Path
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'reg.sqlite3'}")
    await store.open()
    node = RecordingNode(agent, store)
    target = EmbeddedNode(node, name="rec")  # type: ignore[arg-type]
    async with Session("shell", node=target, registry=StoreRegistry(store)) as s:
        result = await s.query("echo recorded", run_id="reg-1")
        assert result.ok
    (before,) = node.seen_at_start
    assert before is not None, "StartRun reached the node before the run was recorded"
    assert before.status == "pending" and before.node_address == "rec" and before.node_id == result.metadata["node_id"]
    assert before.prompt_digest == prompt_digest("echo recorded")
    rec = await store.get("reg-1")
    assert rec is not None and rec.status == "completed" and rec.ended_at is not None
    assert rec.result is not None and rec.result["text"] == "recorded\n"
    events = decode_chunks(await store.events_after("reg-1", 0))
    assert [m.seq for m in events] == list(range(1, result.events + 1))
    assert rec.last_seq == result.events
    await store.close()


async def test_an_unusable_registry_refuses_the_run_before_anything_is_sent(agent: NodeAgent, tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'reg.sqlite3'}")  # never opened: every write fails, typed
    node = RecordingNode(agent, store)
    async with Session("shell", node=EmbeddedNode(node), registry=StoreRegistry(store)) as s:  # type: ignore[arg-type]
        result = await s.query("echo never")
    assert isinstance(result.error, StoreError) and result.status == "failed"
    assert node.seen_at_start == []  # nothing reached the node
    assert (await agent.list_runs(pb.ListRunsRequest())).runs == []


async def _controller(tmp_path: Path, node: str, **config: Any) -> Any:
    return await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[node],
                                                   state=f"sqlite:///{tmp_path / 'ctl.sqlite3'}", **config))


async def test_the_controllers_history_is_bounded_and_a_replay_before_it_is_a_typed_gap(
    grpc_node: Any, tmp_path: Path
) -> None:
    ctl = await _controller(tmp_path, f"127.0.0.1:{grpc_node.port}", history_max_bytes=4096)
    try:
        lines = tmp_path / "many.txt"
        lines.write_text("".join(f"line {i} {'x' * 40}\n" for i in range(600)))
        async with Session("shell", node=RemoteNode(f"127.0.0.1:{ctl.port}")) as s:
            result = await s.query(f"cat {lines}", cwd=str(tmp_path), run_id="bounded-1")
            assert result.ok and result.text.count("\n") == 600
        await ctl.api.registry.flush()
        rec = await ctl.api.store.get("bounded-1")
        assert rec is not None and rec.first_held_seq > 1  # the oldest events were dropped
        held = sum(len(d) for _, _, d in await ctl.api.store.events_after("bounded-1", 0))
        assert held <= 4096
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ctl.port}") as ch:
            stub = node_pb2_grpc.NodeServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.AttachRun(pb.AttachRunRequest(run_id="bounded-1", after_seq=0)):
                    pass
            assert "no longer held by the controller" in str(info.value.details())
            assert ("asm-error-reason", "replay_gap") in tuple(info.value.trailing_metadata() or ()) or \
                "replay_gap" in repr(info.value.trailing_metadata())
            # From a cursor the log still holds: the rest, every event once, ending with run_completed.
            tail = [m async for b in stub.AttachRun(pb.AttachRunRequest(run_id="bounded-1",
                                                                          after_seq=rec.first_held_seq))
                    for m in b.events]
            assert [m.seq for m in tail] == list(range(rec.first_held_seq + 1, rec.last_seq + 1))
            assert tail[-1].kind == pb.EVENT_KIND_RUN_COMPLETED
    finally:
        await ctl.stop()


async def test_a_run_recorded_but_never_sent_ends_as_run_lost_and_is_never_started(
    grpc_node: Any, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ctl.sqlite3'}"
    store = open_store(url)
    await store.open()
    now = time.time()
    await store.create(RunRecord(run_id="orphan-1", session_id="s1", provider="shell", owner="anonymous",
                                 prompt_digest=prompt_digest("echo x"), created_at=now, updated_at=now))
    await store.close()
    ctl = await _controller(tmp_path, f"127.0.0.1:{grpc_node.port}")
    try:
        rec = await ctl.api.store.get("orphan-1")
        assert rec is not None and rec.status == "failed" and rec.result["error"]["kind"] == "run_lost"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ctl.port}") as ch:
            stub = node_pb2_grpc.NodeServiceStub(ch)
            # StartRun with its id attaches to the recorded end: it is not executed now.
            events = [m async for b in stub.StartRun(pb.StartRunRequest(run_id="orphan-1", provider="shell",
                                                                        prompt="echo x"))
                      for m in b.events]
            assert [m.kind for m in events] == [pb.EVENT_KIND_ERROR, pb.EVENT_KIND_RUN_COMPLETED]
            assert events[0].error.code == "run_lost"
        assert (await grpc_node.agent.list_runs(pb.ListRunsRequest())).runs == []
    finally:
        await ctl.stop()
