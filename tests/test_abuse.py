"""A node stays bounded under abuse (issue 9, item 7), on real gRPC servers bound to 127.0.0.1.

* idle TCP connections that never handshake are closed after the handshake timeout, while an
  authenticated run still works;
* connections, streams per connection and concurrent RPCs are capped;
* gRPC's own overload answers reach the client typed: RESOURCE_EXHAUSTED is ``at_capacity``, and a
  CANCELLED the client did not cause is a ``transport_error``, never ``user_cancelled``;
* the metrics HTTP server serves a bounded number of connections, cuts slow clients off, and a
  non-loopback bind needs ``--metrics-insecure``;
* a bearer token on a non-loopback address is at least 16 bytes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

import asm_wire._server as wire_server
from asm_controller import GrpcNodeClient, RemoteNode, Session
from asm_controller.service import ControllerConfig, start_controller
from asm_node import NodeConfig, NodeServer, start_server
from asm_node.server import check_exposure
from asm_wire import PROTOCOL_VERSION, AsmError, ConfigError, NodeAtCapacity, __version__, pb
from asm_wire._server import ServerLimits, start_metrics_http
from tests.support.processes import ROOT, NodeProcess
from tests.support.processes import node_config as make_config

TOKEN = "abuse-test-token-0123456789"


def _hello() -> pb.HandshakeRequest:
    return pb.HandshakeRequest(controller_version=__version__, protocol_version=PROTOCOL_VERSION)


async def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the socket (b'' from recv), and when that was."""
    loop = asyncio.get_running_loop()
    t0, data = time.monotonic(), b""
    while True:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), max(0.01, limit_s - (time.monotonic() - t0)))
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk


def _raw_sockets(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        socks.append(sock)
    return socks


# -- (a) handshake timeout ----------------------------------------------------------------------


@pytest.fixture
async def guarded_node() -> AsyncIterator[NodeServer]:
    server = await start_server(make_config(token=TOKEN, handshake_timeout_s=1.0))
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.slow
async def test_silent_connections_are_closed_after_the_handshake_timeout(guarded_node: NodeServer) -> None:
    socks = _raw_sockets(guarded_node.port, 40)
    try:
        t0 = time.monotonic()
        # While 40 silent connections are open, an authenticated run works.
        async with Session("shell", node=RemoteNode(f"127.0.0.1:{guarded_node.port}", token=TOKEN)) as s:
            result = await s.query("echo still-serving")
        assert result.ok, result.error
        assert result.text == "still-serving\n"
        closed = await asyncio.gather(*(_read_until_closed(sock, 8.0) for sock in socks))
        elapsed = time.monotonic() - t0
    finally:
        for sock in socks:
            sock.close()
    assert len(closed) == 40
    assert all(b"handshake timeout" in data for data, _ in closed), closed[0]
    assert elapsed < 5.0, f"silent connections lived {elapsed:.1f}s with a 1s handshake timeout"


def test_default_handshake_timeout_is_a_few_seconds() -> None:
    options = dict(wire_server.server_options(ServerLimits()))
    assert 1_000 <= options["grpc.server_handshake_timeout_ms"] <= 10_000
    assert options["grpc.max_connection_idle_ms"] <= 300_000
    assert options["grpc.max_allowed_incoming_connections"] >= 16


# -- (b) connection, stream and RPC caps ---------------------------------------------------------


async def test_connections_past_the_cap_are_closed_at_once() -> None:
    server = await start_server(make_config(token=TOKEN, max_connections=3, handshake_timeout_s=30.0))
    try:
        held = _raw_sockets(server.port, 3)
        try:
            for sock in held:  # admitted: the server greets each with its HTTP/2 SETTINGS
                first = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 5.0)
                assert first != b""
            (extra,) = _raw_sockets(server.port, 1)
            try:
                data, after = await _read_until_closed(extra, 5.0)
            finally:
                extra.close()
            assert data == b"", "a connection past the cap was served"
            assert after < 2.0
        finally:
            for sock in held:
                sock.close()
        # The cap counts open connections: once they are gone, a client gets in.
        client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{server.port}", token=TOKEN))
        try:
            for _ in range(50):
                try:
                    info = await client.handshake(_hello(), timeout=2.0)
                    break
                except AsmError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("no connection admitted after the others closed")
            assert info.node_id == server.agent.node_id
        finally:
            await client.close()
    finally:
        await server.stop()


@pytest.mark.slow
async def test_streams_per_connection_are_capped() -> None:
    server = await start_server(make_config(token=TOKEN, max_concurrent_streams=2))
    client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{server.port}", token=TOKEN, rpc_timeout_s=1.0))
    streams = [client.start_run(pb.StartRunRequest(run_id=f"hold-{i}", provider="shell", prompt="sleep 30"))
               for i in range(2)]
    try:
        for st in streams:
            await anext(st)  # both streams are open on the one connection
        # A third call on that connection waits for a free stream: it is not served in time.
        with pytest.raises(AsmError) as info:
            await client.get_run(pb.GetRunRequest(run_id="hold-0"))
        assert info.value.kind == "timeout"
        for st in streams:
            await st.aclose()  # type: ignore[attr-defined]
        got = await client.get_run(pb.GetRunRequest(run_id="hold-0"))
        assert got.run_id == "hold-0"
    finally:
        await client.close()
        await server.stop()


async def test_rpcs_past_the_server_cap_are_refused_at_capacity() -> None:
    server = await start_server(make_config(token=TOKEN, max_concurrent_rpcs=2))
    client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{server.port}", token=TOKEN, rpc_timeout_s=5.0))
    streams = [client.start_run(pb.StartRunRequest(run_id=f"cap-{i}", provider="shell", prompt="sleep 30"))
               for i in range(2)]
    try:
        for st in streams:
            await anext(st)  # two RPCs in flight: the server's cap
        t0 = time.monotonic()
        with pytest.raises(NodeAtCapacity) as info:
            await client.get_run(pb.GetRunRequest(run_id="cap-0"))
        assert time.monotonic() - t0 < 2.0, "refused late: queued rather than refused"
        assert info.value.kind == "at_capacity" and info.value.reason == "at_capacity"
        for st in streams:
            await st.aclose()  # type: ignore[attr-defined]
        for _ in range(50):  # the slots free up as the server sees the streams go
            try:
                got = await client.get_run(pb.GetRunRequest(run_id="cap-0"))
                break
            except NodeAtCapacity:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the RPC cap never freed up")
        assert got.run_id == "cap-0"
    finally:
        await client.close()
        await server.stop()


# -- (c) overload answers are typed ----------------------------------------------------------------


@pytest.mark.slow
async def test_burst_past_the_rpc_cap_fails_typed_at_capacity_never_cancelled() -> None:
    server = await start_server(make_config(token=TOKEN, max_concurrent_rpcs=4))
    client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{server.port}", token=TOKEN))
    try:
        results = await asyncio.gather(*(client.handshake(_hello(), timeout=60.0) for _ in range(2000)),
                                       return_exceptions=True)
    finally:
        await client.close()
        await server.stop()
    failures = [r for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if isinstance(r, pb.HandshakeResponse)]
    assert len(ok) + len(failures) == 2000
    assert ok, "nothing got through"
    assert failures, "a 2,000-call burst against a 4-RPC cap refused nothing"
    kinds = {(type(f).__name__, getattr(f, "kind", None), getattr(f, "reason", None)) for f in failures}
    assert kinds == {("NodeAtCapacity", "at_capacity", "at_capacity")}, kinds
    assert all(isinstance(f, NodeAtCapacity) for f in failures)


@pytest.mark.slow
async def test_a_node_at_its_rpc_cap_is_not_declared_lost() -> None:
    """Heartbeats refused as at_capacity prove the node is alive: its runs must not end as node_lost."""
    from asm_controller import LivenessConfig, connect

    server = await start_server(make_config(token=TOKEN, max_concurrent_rpcs=2))
    hog = GrpcNodeClient(RemoteNode(f"127.0.0.1:{server.port}", token=TOKEN))
    live = LivenessConfig(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5, node_lost_timeout_s=0.6)
    handle = await connect(RemoteNode(f"127.0.0.1:{server.port}", token=TOKEN, liveness=live))
    streams = [hog.start_run(pb.StartRunRequest(run_id=f"hog-{i}", provider="shell", prompt="sleep 30"))
               for i in range(2)]
    try:
        for st in streams:
            await anext(st)
        with pytest.raises(NodeAtCapacity):  # the cap is really full
            await handle.heartbeat(1.0)
        await asyncio.sleep(2.0)
        assert handle.state == "up", handle.lost_reason
    finally:
        for st in streams:
            await st.aclose()  # type: ignore[attr-defined]
        await handle.close()
        await hog.close()
        await server.stop()


@pytest.fixture
async def bare_server() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A NodeService whose GetRun ends CANCELLED without asm trailers, and whose ListRuns never answers."""
    never = asyncio.Event()

    async def cancelled(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.abort(grpc.StatusCode.CANCELLED, "dropped by the server")
        return b""

    async def hang(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await never.wait()
        return b""

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire_server.NODE_SERVICE, {
        "GetRun": grpc.unary_unary_rpc_method_handler(cancelled),
        "ListRuns": grpc.unary_unary_rpc_method_handler(hang),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, never
    finally:
        never.set()
        await server.stop(None)


async def test_cancelled_by_the_server_is_a_transport_error(bare_server: tuple[int, asyncio.Event]) -> None:
    port, _ = bare_server
    client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{port}"))
    try:
        with pytest.raises(AsmError) as info:
            await client.get_run(pb.GetRunRequest(run_id="r1"))
    finally:
        await client.close()
    assert info.value.kind == "transport_error", info.value
    assert info.value.kind != "user_cancelled"
    assert info.value.reason == "cancelled_by_peer"
    assert "not by this client" in info.value.message


async def test_cancelling_our_own_call_is_a_cancellation_not_an_error(bare_server: tuple[int, asyncio.Event]) -> None:
    port, _ = bare_server
    client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{port}"))
    try:
        task = asyncio.create_task(client.list_runs(pb.ListRunsRequest()))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await client.close()


# -- (d) metrics HTTP server -------------------------------------------------------------------------


def _threads_named(prefix: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(prefix))


@pytest.mark.slow
def test_metrics_server_has_a_bounded_pool_and_cuts_slow_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry, Counter

    monkeypatch.setattr(wire_server, "METRICS_IO_TIMEOUT_S", 0.5)
    monkeypatch.setattr(wire_server, "METRICS_REQUEST_DEADLINE_S", 1.5)
    registry = CollectorRegistry()
    Counter("abuse_probe", "a probe", registry=registry).inc()
    (httpd, _thread), port = start_metrics_http("127.0.0.1:0", registry, workers=2)
    socks: list[socket.socket] = []
    try:
        before = _threads_named("asm-metrics-http")
        for _ in range(60):  # slow clients: connect, send half a request line, stall
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /metr")
            socks.append(sock)
        time.sleep(0.3)
        workers = _threads_named("asm-metrics-http") - before
        assert workers <= 2, f"{workers} worker threads for 60 connections (pool of 2)"
        # Past the pool, a connection is closed at once rather than queued.
        sock = socks[-1]
        sock.settimeout(2.0)
        assert sock.recv(100) == b""
        # The stalled ones are cut off by the read timeout and the pool is free again.
        t0 = time.monotonic()
        body = b""
        while time.monotonic() - t0 < 5.0:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2.0) as resp:
                    body = resp.read()
                break
            except OSError:
                time.sleep(0.1)
        assert b"abuse_probe_total 1.0" in body
    finally:
        for sock in socks:
            sock.close()
        httpd.shutdown()


@pytest.mark.slow
def test_metrics_client_trickling_bytes_is_cut_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    monkeypatch.setattr(wire_server, "METRICS_IO_TIMEOUT_S", 1.0)
    monkeypatch.setattr(wire_server, "METRICS_REQUEST_DEADLINE_S", 1.0)
    (httpd, _thread), port = start_metrics_http("127.0.0.1:0", CollectorRegistry(), workers=1)
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        cut = None
        try:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 10:
                sock.sendall(bytes([byte]))  # one byte each 0.2 s: never idle for the read timeout
                time.sleep(0.2)
                if time.monotonic() - t0 > 6:
                    break
        except OSError:
            cut = time.monotonic() - t0
        finally:
            sock.close()
        assert cut is not None and cut < 4.0, f"a trickling client held its worker for {time.monotonic() - t0:.1f}s"
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("metrics_listen", ["0.0.0.0:9470", "[::]:9470", "10.1.2.3:9470"])
def test_non_loopback_metrics_needs_metrics_insecure(metrics_listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_exposure(NodeConfig(metrics_listen=metrics_listen))
    assert info.value.kind == "config_invalid"
    assert "--metrics-insecure" in info.value.message
    check_exposure(NodeConfig(metrics_listen=metrics_listen, metrics_insecure=True))
    check_exposure(NodeConfig(metrics_listen="127.0.0.1:9470"))


async def test_controller_refuses_non_loopback_metrics() -> None:
    with pytest.raises(ConfigError) as info:
        await start_controller(ControllerConfig(nodes=["127.0.0.1:1"], metrics_listen="0.0.0.0:0"))
    assert "--metrics-insecure" in info.value.message


def _asm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ASM_TOKEN" and not k.startswith("ASM_NODE_")}
    return subprocess.run([sys.executable, "-m", "asm_cli", *args], capture_output=True, text=True, timeout=30,
                          env=env, cwd=str(ROOT))


@pytest.mark.slow
def test_cli_refuses_non_loopback_metrics_in_one_line() -> None:
    proc = _asm("node", "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0.0.0.0:0")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("asm: error:") and "--metrics-insecure" in line
    help_text = _asm("controller", "serve", "--help").stdout
    for flag in ("--metrics-insecure", "--max-connections", "--max-streams-per-connection", "--max-concurrent-rpcs",
                 "--handshake-timeout"):
        assert flag in help_text


@pytest.mark.slow
def test_cli_limit_flags_reach_the_server(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process("--handshake-timeout", "1", "--max-connections", "64", "--max-streams-per-connection", "8",
                        "--max-concurrent-rpcs", "16")
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.settimeout(6.0)
    t0, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    finally:
        sock.close()
    assert b"handshake timeout" in data
    assert time.monotonic() - t0 < 4.0


@pytest.mark.parametrize("component", ["node", "controller"])
def test_cli_invalid_limit_is_a_one_line_usage_error(component: str) -> None:
    extra = ["--node", "127.0.0.1:1"] if component == "controller" else []
    proc = _asm(component, "serve", "--listen", "127.0.0.1:0", *extra, "--max-concurrent-rpcs", "0")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("asm: error:") and "max_concurrent_rpcs" in line


# -- (e) token length ----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["s3cret", "x" * 15, "é" * 7])  # "é" is 2 bytes: 14 bytes
def test_short_token_refused_on_non_loopback(token: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_exposure(NodeConfig(listen="0.0.0.0:0", token=token))
    assert "at least 16 bytes" in info.value.message
    check_exposure(NodeConfig(listen="127.0.0.1:0", token=token))  # loopback: any token


def test_token_of_16_bytes_is_enough() -> None:
    check_exposure(NodeConfig(listen="0.0.0.0:0", token="x" * 16))
    check_exposure(NodeConfig(listen="0.0.0.0:0", token="é" * 8))


async def test_controller_refuses_short_token_on_non_loopback() -> None:
    with pytest.raises(ConfigError) as info:
        await start_controller(ControllerConfig(listen="0.0.0.0:0", nodes=["127.0.0.1:1"], token="short"))
    assert "at least 16 bytes" in info.value.message


def test_invalid_limits_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        ServerLimits(max_concurrent_rpcs=0)
    with pytest.raises(ConfigError):
        ServerLimits(handshake_timeout_s=0)
    with pytest.raises(ValueError):
        NodeConfig(max_connections=0)
