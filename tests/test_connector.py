"""Node connector: every handshake / preflight failure is its own typed error."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import grpc
import pytest

from asm_controller import (
    CwdNotAllowed,
    EmbeddedNode,
    NodeAtCapacity,
    NodeCapabilityMismatch,
    NodeConnectTimeout,
    NodeNotReady,
    NodeUnreachable,
    NodeVersionMismatch,
    ProviderMissing,
    RemoteNode,
    Session,
    connect,
    preflight,
)
from asm_controller.testing import FakeNodeApi
from asm_node import NodeAgent, NodeServer, start_server
from asm_wire import AsmError, ConfigError, error_from_rpc, make_error, pb
from tests.support.processes import node_config


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _server_with(handshake_edit: object = None, **cfg: object) -> NodeServer:
    agent = NodeAgent(node_config(**cfg))
    if handshake_edit is not None:
        original = agent.handshake

        async def edited(request: pb.HandshakeRequest) -> pb.HandshakeResponse:
            resp = await original(request)
            handshake_edit(resp)  # type: ignore[operator]
            return resp

        agent.handshake = edited  # type: ignore[method-assign]
    return await start_server(node_config(**cfg), agent=agent)


@pytest.fixture
async def silent_listener() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never speaks HTTP/2."""
    held: list[asyncio.StreamWriter] = []

    async def on_conn(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in held:
            w.close()
        server.close()


async def test_handshake_reports_identity_providers_limits_and_load(grpc_node: NodeServer) -> None:
    handle = await connect(RemoteNode(f"127.0.0.1:{grpc_node.port}"))
    try:
        info = handle.info
        assert info.node_id == grpc_node.agent.node_id
        assert info.boot_epoch == grpc_node.agent.boot_epoch
        assert info.protocol_version == 1
        assert "run.start.v1" in info.capabilities
        assert [p.name for p in info.providers] == ["shell", "claude", "codex", "gemini", "amp"]
        assert info.providers[0].available
        assert info.limits.max_runs == grpc_node.agent.config.max_runs
        assert info.load.active_runs == 0
        assert info.host.hostname
    finally:
        await handle.close()


async def test_unreachable_node() -> None:
    with pytest.raises(NodeUnreachable) as exc:
        await connect(RemoteNode(f"127.0.0.1:{_closed_port()}", connect_timeout_s=2))
    assert exc.value.kind == "connection_failed" and exc.value.reason == "unreachable"


@pytest.mark.slow
async def test_connect_timeout(silent_listener: int) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(NodeConnectTimeout) as exc:
        await connect(RemoteNode(f"127.0.0.1:{silent_listener}", connect_timeout_s=0.5))
    assert exc.value.reason == "connect_timeout"
    assert loop.time() - t0 < 3


async def test_version_mismatch() -> None:
    def edit(resp: pb.HandshakeResponse) -> None:
        resp.agent_version = "0.2.0"

    server = await _server_with(edit)
    try:
        with pytest.raises(NodeVersionMismatch) as exc:
            await connect(RemoteNode(f"127.0.0.1:{server.port}"))
        assert "0.2.0" in exc.value.message
    finally:
        await server.stop()


async def test_same_major_minor_with_other_patch_is_compatible() -> None:
    def edit(resp: pb.HandshakeResponse) -> None:
        resp.agent_version = "0-1-build7"

    server = await _server_with(edit)
    try:
        handle = await connect(RemoteNode(f"127.0.0.1:{server.port}"))
        await handle.close()
    finally:
        await server.stop()


async def test_protocol_version_mismatch() -> None:
    def edit(resp: pb.HandshakeResponse) -> None:
        resp.protocol_version = 2

    server = await _server_with(edit)
    try:
        with pytest.raises(NodeVersionMismatch) as exc:
            await connect(RemoteNode(f"127.0.0.1:{server.port}"))
        assert "protocol" in exc.value.message
    finally:
        await server.stop()


async def test_capability_mismatch() -> None:
    def edit(resp: pb.HandshakeResponse) -> None:
        del resp.capabilities[:]
        resp.capabilities.append("run.start.v1")

    server = await _server_with(edit)
    try:
        with pytest.raises(NodeCapabilityMismatch) as exc:
            await connect(RemoteNode(f"127.0.0.1:{server.port}"))
        assert "run.attach.v1" in exc.value.details["missing"]
    finally:
        await server.stop()


async def test_not_ready_node() -> None:
    agent = NodeAgent(node_config())
    agent.state = pb.NODE_STATE_DRAINING
    with pytest.raises(NodeNotReady):
        await connect(EmbeddedNode(agent))


async def test_preflight_typed_refusals(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    agent = NodeAgent(node_config(workspace_roots=[root], max_runs=1))
    await agent.start()
    try:
        handle = await connect(EmbeddedNode(agent))
        assert await preflight(handle, "shell", str(root)) == str(root)
        with pytest.raises(ProviderMissing) as missing:
            await preflight(handle, "nope", "")
        assert missing.value.kind == "cli_not_found"
        with pytest.raises(CwdNotAllowed):
            await preflight(handle, "shell", "/")
        async with Session("shell", node=EmbeddedNode(agent), max_concurrent_runs=2) as s:
            busy = s.stream("sleep 30")
            await busy.__anext__()
            with pytest.raises(NodeAtCapacity):
                await preflight(handle, "shell", "")
            await s.interrupt(busy.run_id)
            async for _ in busy:
                pass
    finally:
        await agent.stop()


async def test_failover_to_second_node_when_first_refuses(grpc_node: NodeServer) -> None:
    dead = f"127.0.0.1:{_closed_port()}"
    live = f"127.0.0.1:{grpc_node.port}"
    async with Session("shell", node=[RemoteNode(dead, connect_timeout_s=1), RemoteNode(live)]) as s:
        result = await s.query("echo routed")
    assert result.ok and result.text == "routed\n"
    attempts = result.metadata["attempts"]
    assert attempts[0]["node"] == dead and attempts[0]["error"]["reason"] == "unreachable"
    assert attempts[1] == {"node": live, "node_id": grpc_node.agent.node_id, "admitted": True}


@pytest.mark.parametrize(
    "err",
    [
        make_error("config_invalid", "config", "bad option"),
        make_error("config_invalid", "config", "outside", reason="cwd_not_allowed"),
        make_error("cli_not_found", "provider", "no claude", reason="provider_missing"),
        make_error("at_capacity", "runtime", "full", reason="at_capacity"),
        make_error("unknown", "approval", "Unknown approval id: x"),
        make_error("not_found", "approval", "Unknown approval id: x", reason="approval_not_found"),
        make_error("not_found", "runtime", "Unknown run id: x", reason="run_not_found"),
        make_error("buffer_overflow", "transport", "events 1..3 are gone", reason="replay_gap"),
        make_error("runtime", "runtime", "the run store failed", reason="store_in_use"),
        make_error("guardrail_blocked", "guardrail", "denied", reason="command_denied"),
        make_error("connection_failed", "transport", "draining", reason="not_ready"),
    ],
)
async def test_errors_round_trip_through_grpc_status(err: AsmError) -> None:
    """An AsmError raised in a servicer arrives as the same class, kind, domain and reason."""
    from asm_wire._server import abort as _abort

    async def handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await _abort(context, err)
        return b""

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await ch.unary_unary("/t.T/M")(b"")
            assert exc.value.code() == err.grpc_status()
            back = error_from_rpc(exc.value.code(), exc.value.details(), exc.value.trailing_metadata())
        assert type(back) is type(err)
        assert (back.kind, back.domain, back.reason, back.message) == (err.kind, err.domain, err.reason, err.message)
    finally:
        await server.stop(None)


def test_status_without_trailers_maps_from_code() -> None:
    err = error_from_rpc(grpc.StatusCode.UNAVAILABLE, "socket closed", ())
    assert (err.kind, err.domain) == ("connection_failed", "transport")
    err = error_from_rpc(grpc.StatusCode.DEADLINE_EXCEEDED, "slow", None)
    assert err.kind == "timeout"


@pytest.mark.parametrize("node", ["127.0.0.1:7070", ["127.0.0.1:7070"], [None], 7070])
def test_a_node_that_is_not_a_target_is_refused_at_once(node: object) -> None:
    # A plain address string used to be taken as a sequence of one-character "nodes" and fail
    # deep in the driver with an AttributeError.
    from asm_controller import Session

    with pytest.raises(ConfigError, match="RemoteNode"):
        Session("shell", node=node)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fake", "error", "text"), [
    (FakeNodeApi(version="0.2.0"), NodeVersionMismatch, "0.2.0"),
    (FakeNodeApi(capabilities=["run.start.v1"]), NodeCapabilityMismatch, "run.attach.v1"),
    (FakeNodeApi(state=pb.NODE_STATE_DRAINING), NodeNotReady, "draining"),
])
async def test_the_compatibility_rule_holds_for_embedded_nodes_too(fake: FakeNodeApi, error: type[AsmError],
                                                                   text: str) -> None:
    with pytest.raises(error) as exc:
        await connect(EmbeddedNode(fake, name="fake"))
    assert text in exc.value.message
    handle = await connect(EmbeddedNode(FakeNodeApi(version="0-1-build7")))  # same major.minor: compatible
    assert handle.info.node_id == "fake-node"
    await handle.close()
