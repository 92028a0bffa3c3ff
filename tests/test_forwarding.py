"""The controller relays a node's event batches as the bytes they came in (issue 15, deliverable 6).

What a client gets through ``asm controller serve`` is the node's events, byte for byte (seq, ids,
payloads), except where the controller adds its own: the stamp on run_started. Its registry records
the same bytes. The table of received batches' bytes (asm_controller._wire) stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from asm_controller import RemoteNode, Session
from asm_controller import _wire as wire
from asm_controller._events import Event
from asm_controller._registry import decode_chunks
from asm_controller._run import CONTROLLER_METADATA_KEY
from asm_controller._store import Lease, RunRecord, StoreWriter, open_store
from asm_controller._store._base import BatchOp, EventsOp, UpdateOp
from asm_controller._store._writer import coalesce
from asm_controller.service import ControllerConfig, ControllerServer, start_controller
from asm_node.server import NodeServer, start_server
from asm_node.testing import test_config
from asm_wire import pb, ulid

LINES = 3000


def _delta(seq: int, text: str = "x") -> pb.Event:
    m = pb.Event(seq=seq, run_id="r", id=f"r:{seq}", kind=pb.EVENT_KIND_ASSISTANT_DELTA)
    m.assistant_delta.content = text
    return m


# -- the table of received bytes -------------------------------------------------------------------------


def test_parse_batch_keeps_the_bytes_once() -> None:
    data = pb.EventBatch(events=[_delta(1), _delta(2)]).SerializeToString()
    batch = wire.parse_batch(data)
    assert [m.seq for m in batch.events] == [1, 2]
    assert wire.take(batch) == data
    assert wire.take(batch) is None  # taken once
    assert wire.take(pb.EventBatch.FromString(data)) is None  # a batch it did not receive


def test_the_table_is_bounded_by_count_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_KEPT", 8)
    first = [wire.parse_batch(pb.EventBatch(events=[_delta(i)]).SerializeToString()) for i in range(1, 21)]
    assert wire.kept() <= 8
    assert wire.take(first[0]) is None  # the oldest were forgotten
    assert wire.take(first[-1]) is not None  # the newest are still there
    monkeypatch.setattr(wire, "MAX_KEPT_BYTES", 1000)
    big = [wire.parse_batch(pb.EventBatch(events=[_delta(i, "y" * 400)]).SerializeToString()) for i in range(5)]
    assert wire.take(big[0]) is None and wire.take(big[-1]) is not None
    for b in first + big:
        wire.take(b)


def test_encode_uses_the_wire_bytes_of_frames_only() -> None:
    events = [Event(_delta(1)), Event(_delta(2))]
    plain = wire.encode(events)
    assert pb.EventBatch.FromString(plain).events[1].seq == 2
    marker = pb.EventBatch(events=[_delta(7)]).SerializeToString()
    assert wire.encode(wire.Frames(events, marker)) == marker  # the bytes given, not encoded again
    assert wire.encode(wire.Frames(events)) == plain


# -- through a controller -------------------------------------------------------------------------------


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[NodeServer, ControllerServer]]:
    node = await start_server(test_config())
    ctl = await start_controller(ControllerConfig(
        listen="127.0.0.1:0", nodes=[f"127.0.0.1:{node.port}"], state=f"sqlite:///{tmp_path / 'ctl.sqlite3'}"))
    try:
        yield node, ctl
    finally:
        await ctl.stop()
        await node.stop()


async def _raw_stream(address: str, method: str, request: bytes) -> list[bytes]:
    """A stream's frames as the server sent them (no parsing on the way)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream(f"/asm.v1.NodeService/{method}", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        return [frame async for frame in call(request, timeout=60)]


def _events(frames: list[bytes]) -> list[pb.Event]:
    return [m for f in frames for m in pb.EventBatch.FromString(f).events]


def _script(tmp_path: Path) -> str:
    script = tmp_path / "lines.py"
    script.write_text(f"for i in range({LINES}):\n    print('line', i, 'é' * (i % 7), flush=(i % 500 == 0))\n")
    return f"{Path(sys.executable).name} {script}"


@pytest.mark.slow
async def test_a_client_gets_the_nodes_bytes_through_the_controller(
        fleet: tuple[NodeServer, ControllerServer], tmp_path: Path) -> None:
    node, ctl = fleet
    run_id = ulid()
    start = pb.StartRunRequest(run_id=run_id, provider="shell", prompt=_script(tmp_path), cwd=str(tmp_path))
    via = await _raw_stream(f"127.0.0.1:{ctl.port}", "StartRun", start.SerializeToString())
    theirs = _events(via)
    assert len(theirs) == LINES + 3 and theirs[-1].kind == pb.EVENT_KIND_RUN_COMPLETED
    # The node's own events of the run (its replay from the start), byte for byte the same ...
    ours = _events(await _raw_stream(f"127.0.0.1:{node.port}", "AttachRun",
                               pb.AttachRunRequest(run_id=run_id, after_seq=0).SerializeToString()))
    assert [m.seq for m in theirs] == [m.seq for m in ours] == list(range(1, LINES + 4))
    for a, b in zip(theirs[1:], ours[1:], strict=True):
        assert a.SerializeToString() == b.SerializeToString()
    # ... but run_started, which carries the controller's stamp (the node it ran on) besides the node's fields.
    started = pb.Event.FromString(theirs[0].SerializeToString())
    stamp = json.loads(started.metadata.pop(CONTROLLER_METADATA_KEY))
    assert stamp["node_address"] == f"127.0.0.1:{node.port}"
    assert CONTROLLER_METADATA_KEY not in ours[0].metadata
    assert started.SerializeToString() == ours[0].SerializeToString()
    # The relay sent most batches as they came from the node: frames it did not re-encode parse and
    # encode back to the same bytes, the events' order and grouping kept (several per frame).
    assert len(via) > 1 and max(len(pb.EventBatch.FromString(f).events) for f in via) > 1
    # Attached afterwards through the controller (from its registry's log): the same events again.
    again = _events(await _raw_stream(f"127.0.0.1:{ctl.port}", "AttachRun",
                                pb.AttachRunRequest(run_id=run_id, after_seq=0).SerializeToString()))
    assert [m.SerializeToString() for m in again] == [m.SerializeToString() for m in theirs]


@pytest.mark.slow
async def test_the_relay_passes_the_nodes_batches_on_as_frames(tmp_path: Path) -> None:
    """A session on a node hands its observers and subscribers the node's batches with their bytes."""
    node = await start_server(test_config())
    seen: list[list[Event]] = []
    try:
        async with Session("shell", node=RemoteNode(f"127.0.0.1:{node.port}"), cwd=str(tmp_path),
                           observers=[seen.append]) as s:
            batches = [b async for b in s.stream(_script(tmp_path)).batches()]
    finally:
        await node.stop()
    assert sum(len(b) for b in batches) == LINES + 3
    framed = [b for b in seen if isinstance(b, wire.Frames) and b.wire is not None]
    assert framed, "no batch kept the node's bytes"
    for b in framed:
        assert b.wire is not None
        assert [m.SerializeToString() for m in pb.EventBatch.FromString(b.wire).events] == \
            [e.pb.SerializeToString() for e in b]
    assert seen[0][0].kind == "run_started" and not isinstance(seen[0], wire.Frames)  # stamped: encoded anew
    assert wire.kept() < wire.MAX_KEPT


@pytest.mark.slow
async def test_the_controller_service_relays_frames_as_bytes(
        fleet: tuple[NodeServer, ControllerServer], tmp_path: Path) -> None:
    """FleetApi's gRPC side yields the node's bytes for the batches it passes on unchanged (its HTTP side,
    start_run, still gets messages); both carry the same events."""
    _node, ctl = fleet
    request = pb.StartRunRequest(run_id=ulid(), provider="shell", prompt=_script(tmp_path), cwd=str(tmp_path))
    items = [item async for item in ctl.api.start_run_frames(request)]
    raw = [i for i in items if isinstance(i, bytes)]
    assert raw, "every batch was encoded again"
    events = [m for i in items for m in (pb.EventBatch.FromString(i) if isinstance(i, bytes) else i).events]
    assert [m.seq for m in events] == list(range(1, LINES + 4))
    again = pb.StartRunRequest(run_id=ulid(), provider="shell", prompt=_script(tmp_path), cwd=str(tmp_path))
    messages = [b async for b in ctl.api.start_run(again)]
    assert all(isinstance(b, pb.EventBatch) for b in messages)
    assert sum(len(b.events) for b in messages) == LINES + 3


# -- the registry's writes of relayed batches -------------------------------------------------------------


def _chunk(run: str, first: int, last: int, fence: Lease | None = None) -> EventsOp:
    data = pb.EventBatch(events=[_delta(s, f"{run}{s}") for s in range(first, last + 1)]).SerializeToString()
    return EventsOp(run, first, last, data, fence)


def _live(run: str, seq: int) -> UpdateOp:
    return UpdateOp(run, {"node_seq": seq, "status": "running"})


def test_coalesce_joins_a_runs_chunks_and_its_live_updates() -> None:
    ops: list[BatchOp] = []
    for first in range(1, 40, 3):
        ops += [_chunk("a", first, first + 2), _live("a", first + 2), _chunk("b", first, first + 2)]
    out = coalesce(ops)
    chunks = [op for op in out if isinstance(op, EventsOp)]
    assert [(c.run_id, c.first_seq, c.last_seq) for c in chunks] == [("a", 1, 39), ("b", 1, 39)]
    for c in chunks:  # the joined bytes are one EventBatch of every event, in order
        assert [(m.seq, m.assistant_delta.content) for m in pb.EventBatch.FromString(c.data).events] == \
            [(s, f"{c.run_id}{s}") for s in range(1, 40)]
    updates = [op for op in out if isinstance(op, UpdateOp)]
    assert len(updates) == 1 and updates[0].fields == {"node_seq": 39, "status": "running"}
    assert out.index(updates[0]) > out.index(chunks[0])  # after the events it counts
    assert sum(len(c.data) for c in chunks) == sum(len(op.data) for op in ops if isinstance(op, EventsOp))


def test_coalesce_keeps_apart_what_must_stay_apart() -> None:
    lease, other = Lease("r1", 1), Lease("r1", 2)
    ended = UpdateOp("a", {"status": "completed", "node_seq": 6})
    cas = UpdateOp("a", {"status": "pending"}, expect_status="queued")
    cases: list[list[BatchOp]] = [
        [_chunk("a", 1, 3), ended, _chunk("a", 4, 6)],  # not past the run's end
        [_chunk("a", 1, 3), cas, _chunk("a", 4, 6)],  # not past a compare-and-set
        [_chunk("a", 1, 3, lease), _chunk("a", 4, 6, other)],  # another fence
        [_chunk("a", 1, 3), _chunk("a", 5, 6)],  # a gap (the store reports it as it would)
    ]
    for ops in cases:
        assert coalesce(ops) == ops
    big = [_chunk("a", s, s) for s in range(1, 40)]
    out = coalesce(list(big), 200)
    assert 1 < len(out) < len(big) and all(len(op.data) <= 200 for op in out if isinstance(op, EventsOp))
    assert [m.seq for op in out if isinstance(op, EventsOp) for m in pb.EventBatch.FromString(op.data).events] == \
        list(range(1, 40))


async def test_a_writer_stores_a_burst_of_chunks_as_few(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'w.sqlite3'}")
    await store.open()
    try:
        await store.create(RunRecord(run_id="a", session_id="s", provider="shell", spec={}, status="running"))
        writer = StoreWriter(store, flush_interval_s=0.05, coalesce_events=True)
        for first in range(1, 300, 3):
            op = _chunk("a", first, first + 2)
            await writer.submit_events("a", op.first_seq, op.last_seq, op.data)
            writer.submit_update("a", node_seq=first + 2, status="running")
        await writer.flush()
        chunks = await store.events_after("a", 0)
        assert [m.seq for m in decode_chunks(chunks)] == list(range(1, 301))
        assert len(chunks) < 10  # 100 submitted chunks, written in a few transactions
        rec = await store.get("a")
        assert rec is not None and rec.last_seq == 300 and rec.node_seq == 300
        await writer.close()
    finally:
        await store.close()


@pytest.mark.slow
async def test_attaching_through_the_controller_relays_the_live_nodes_bytes(
        fleet: tuple[NodeServer, ControllerServer], tmp_path: Path) -> None:
    """AttachRun through a controller while the run goes on: its node's stream relayed as it came."""
    node, ctl = fleet
    script = tmp_path / "slow.py"
    script.write_text("import time\nfor i in range(40):\n    print('tick', i, flush=True)\n    time.sleep(0.02)\n")
    run_id = ulid()
    start = pb.StartRunRequest(run_id=run_id, provider="shell", prompt=f"{Path(sys.executable).name} {script}",
                               cwd=str(tmp_path))
    starter = asyncio.ensure_future(_raw_stream(f"127.0.0.1:{ctl.port}", "StartRun", start.SerializeToString()))
    await asyncio.sleep(0.3)  # the run is on its node and printing
    attached = _events(await _raw_stream(f"127.0.0.1:{ctl.port}", "AttachRun",
                                         pb.AttachRunRequest(run_id=run_id, after_seq=2).SerializeToString()))
    await starter
    ours = {m.seq: m for m in _events(await _raw_stream(
        f"127.0.0.1:{node.port}", "AttachRun", pb.AttachRunRequest(run_id=run_id, after_seq=0).SerializeToString()))}
    assert [m.seq for m in attached] == list(range(3, 44))
    assert attached[-1].kind == pb.EVENT_KIND_RUN_COMPLETED
    for m in attached:
        assert m.SerializeToString() == ours[m.seq].SerializeToString()


def test_a_serving_controller_collects_less_often_and_freezes_its_start_up_heap() -> None:
    """``asm controller serve`` (serve_controller) tunes the collector once started: a first-generation
    threshold a relayed batch's events mostly die before, and the start-up heap frozen out of it."""
    import gc

    from asm_controller.service import SERVING_GC_THRESHOLD, tune_gc_for_serving

    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_threshold() == (SERVING_GC_THRESHOLD, *before[1:])
        assert SERVING_GC_THRESHOLD > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_serve_controller_tunes_the_collector_after_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuning happens in the serving process only, after start_controller (its objects are frozen)."""
    from asm_controller import service

    calls: list[str] = []

    async def fake_start(config: ControllerConfig) -> object:
        calls.append("start")
        return object()

    async def fake_run(server: object, on_ready: object) -> None:
        calls.append("serve")

    monkeypatch.setattr(service, "start_controller", fake_start)
    monkeypatch.setattr(service, "tune_gc_for_serving", lambda: calls.append("gc"))
    monkeypatch.setattr(service, "run_until_signal", fake_run)
    asyncio.run(service.serve_controller(ControllerConfig(nodes=["127.0.0.1:1"])))
    assert calls == ["start", "gc", "serve"]


def test_serve_node_settles_its_heap_after_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """``asm node serve`` (asm_node.server.serve) settles the collector like a serving controller, once
    started: its streamed events' objects die young, the start-up heap is frozen out of collections."""
    from asm_node import server
    from asm_node.config import NodeConfig
    from asm_wire._gc import SERVING_YOUNG

    calls: list[object] = []

    async def fake_start(config: NodeConfig) -> object:
        calls.append("start")
        return object()

    async def fake_run(srv: object, on_ready: object) -> None:
        calls.append("serve")

    monkeypatch.setattr(server, "start_server", fake_start)
    monkeypatch.setattr(server, "settle_heap", lambda young: calls.append(("gc", young)))
    monkeypatch.setattr(server, "run_until_signal", fake_run)
    asyncio.run(server.serve(NodeConfig()))
    assert calls == ["start", ("gc", SERVING_YOUNG), "serve"]
