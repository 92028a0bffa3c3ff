"""The controller relays a node's event batches as the bytes they came in (issue 15, deliverable 6).

What a client gets through ``asm controller serve`` is the node's events, byte for byte (seq, ids,
payloads), except where the controller adds its own: the stamp on run_started. Its registry records
the same bytes. The table of received batches' bytes (asm_controller._wire) stays bounded.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from asm_controller import RemoteNode, Session
from asm_controller import _wire as wire
from asm_controller._events import Event
from asm_controller._run import CONTROLLER_METADATA_KEY
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
    node, ctl = fleet
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
