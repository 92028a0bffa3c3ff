"""The gRPC implementation of :class:`asm_wire.NodeApi`, the controller's own API client, and their typed config.

One channel per node, reused by every run. Failures come out as
:class:`AsmError` (rebuilt from the node's ``asm-error-*`` trailers, or mapped
from the status code when gRPC itself failed).

A target may name one service at several addresses (``RemoteNode("a:7070,b:7070")``: the
replicas of a controller). The client then uses one address at a time and moves to the next
when one cannot be used -- it does not connect (refused, nothing within the connect timeout)
or its transport fails (UNAVAILABLE without the server's typed trailers) -- never on a typed
answer of a server. One address behaves exactly as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from asm_controller._wire import parse_batch
from asm_wire import MAX_MESSAGE_BYTES, AsmError, ConfigError, error_from_rpc, grpc_target, pb
from asm_wire.v1 import node_pb2_grpc

#: AsmError.details key: the error was the server's typed answer, not a transport failure.
ANSWERED = "rpc_answered"


@dataclass(frozen=True)
class TLSConfig:
    """Client TLS: the CA that signed the node's cert; a client cert/key for mutual TLS."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)  # a private key: never in a repr/log
    server_name: str | None = None

    @classmethod
    def from_files(
        cls, ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLSConfig:
        if (cert is None) != (key is None):
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
        try:
            return cls(
                ca=Path(ca).read_bytes() if ca else None,
                cert=Path(cert).read_bytes() if cert else None,
                key=Path(key).read_bytes() if key else None,
                server_name=server_name,
            )
        except OSError as exc:
            raise ConfigError(f"cannot read TLS material: {exc}") from None


@dataclass(frozen=True)
class KeepaliveConfig:
    """HTTP/2 keepalive; the node server permits pings this frequent (min interval 4 s, no strikes).

    It lets the channel notice a dead TCP connection (a silent partition) and reconnect.
    """

    time_ms: int = 5_000
    timeout_ms: int = 3_000


@dataclass(frozen=True)
class LivenessConfig:
    """How the controller watches a node it runs on.

    A heartbeat (a handshake) every ``heartbeat_interval_s``, each timing out
    within ``min(heartbeat_timeout_s, heartbeat_interval_s)``; a node with no
    good heartbeat for ``node_lost_timeout_s`` is declared lost and its runs end
    with ``node_lost``. A broken run stream is re-attached (jittered exponential
    backoff) for at most that long as well, however often it breaks.
    """

    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 1.0
    node_lost_timeout_s: float = 8.0


@dataclass(frozen=True)
class RemoteNode:
    """A node agent (or a controller) reachable over gRPC.

    ``address`` is ``HOST:PORT``, or several comma-separated (``"a:7070,b:7070"``) for one service
    reachable at each of them -- the replicas of a controller: calls go to one at a time and move
    to the next when it is unreachable. A DNS name with several records needs no list: gRPC's
    resolver connects to the first record that answers and re-resolves when the connection is lost.
    """

    address: str
    token: str | None = field(default=None, repr=False)  # never in a repr/log
    tls: TLSConfig | None = None
    connect_timeout_s: float = 5.0
    rpc_timeout_s: float = 15.0
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    #: Routing attributes (strategy "priority": lower first; "weighted": share of picks).
    priority: int = 100
    weight: int = 1

    def __post_init__(self) -> None:
        if "," not in self.address:
            grpc_target(self.address)  # validates HOST:PORT early, with a clear error
            return
        for part in self.address.split(","):
            if not part.strip():
                raise ConfigError(f"invalid address list {self.address[:500]!r}: an empty element "
                                  "(expected HOST:PORT[,HOST:PORT...])")
            grpc_target(part)

    @property
    def key(self) -> str:
        return f"grpc://{self.address}"

    @property
    def addresses(self) -> tuple[str, ...]:
        """Each ``HOST:PORT`` of ``address``, in the order they are tried (one for a single address)."""
        if "," not in self.address:
            return (self.address,)
        return tuple(part.strip() for part in self.address.split(","))


def _open_channel(node: RemoteNode, address: str | None = None) -> grpc.aio.Channel:
    """One channel to ``node`` (at ``address``, one of its addresses; default its only one) with its
    TLS and keepalive settings (nodes and controllers alike)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", node.keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", node.keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Fail fast on a dead address instead of backing off for minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]
    target = grpc_target(node.address if address is None else address)
    if node.tls is not None:
        if node.tls.server_name:
            options.append(("grpc.ssl_target_name_override", node.tls.server_name))
        creds = grpc.ssl_channel_credentials(node.tls.ca, node.tls.key, node.tls.cert)
        return grpc.aio.secure_channel(target, creds, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def _auth_metadata(node: RemoteNode) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {node.token}"),) if node.token else ()


#: Calls that may be sent again to another address when the transport broke under them (the first
#: may or may not have been processed: these do no harm twice). Others move on only if not yet sent.
_REPEATABLE = frozenset({
    "Handshake", "Preflight", "GetRun", "ListRuns", "InterruptRun", "Drain", "Undrain", "Diff",
    "ListNodes", "DrainNode", "UndrainNode", "ListSessions", "ListProviderSessions",
})


def _transport_failed(exc: grpc.aio.AioRpcError) -> bool:
    """The transport failed (UNAVAILABLE without the server's typed answer): try another address."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    if any(k == "asm-error-kind" for k, _ in (exc.trailing_metadata() or ())):
        return False  # the server answered, typed (e.g. a controller whose node is gone)
    return "RST_STREAM with error code 7" not in (exc.details() or "")  # REFUSED_STREAM: a full server


class _Endpoints:
    """The addresses of one service, a channel (and a stub) to each, opened when first used, and
    which one is in use: calls stay on it until it fails, then move to the next."""

    def __init__(self, node: RemoteNode, stub_class: Any) -> None:
        self.node = node
        self.addresses = node.addresses
        self._stub_class = stub_class
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[int, Any] = {}
        self.current = 0
        self.stub(0)  # the first channel is opened at once (as for a single address)

    @property
    def multi(self) -> bool:
        return len(self.addresses) > 1

    def channel(self, i: int | None = None) -> grpc.aio.Channel:
        i = self.current if i is None else i
        if i not in self._channels:
            self._channels[i] = _open_channel(self.node, None if not self.multi else self.addresses[i])
        return self._channels[i]

    def stub(self, i: int | None = None) -> Any:
        i = self.current if i is None else i
        if i not in self._stubs:
            self._stubs[i] = self._stub_class(self.channel(i))
        return self._stubs[i]

    def skip(self, i: int) -> None:
        """Address ``i`` failed: if it is the one in use, the next calls start at the next address."""
        if self.current == i:
            self.current = (i + 1) % len(self.addresses)

    async def _reachable(self, i: int, budget: float) -> bool:
        """Whether the channel to address ``i`` is (or becomes, within ``budget`` seconds) connected;
        a refused or failing connection says no at once."""
        channel = self.channel(i)
        loop = asyncio.get_running_loop()
        end = loop.time() + budget
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            left = end - loop.time()
            if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN) or left <= 0:
                return False
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), left)
            except TimeoutError:
                return False
            state = channel.get_state(try_to_connect=True)
        return True

    async def pick(self, deadline: float, tried: Collection[int] = ()) -> int | None:
        """The first address, from the one in use on, that connects (each within the connect timeout
        and ``deadline``); None when none does. Those that do not are skipped for the next calls."""
        loop = asyncio.get_running_loop()
        n = len(self.addresses)
        for i in [(self.current + k) % n for k in range(n)]:
            if i in tried:
                continue
            left = deadline - loop.time()
            if left <= 0:
                return None
            if await self._reachable(i, min(self.node.connect_timeout_s, left)):
                self.current = i
                return i
            self.skip(i)
        return None

    async def unary(self, method: Any, request: Any, md: Any, timeout: float) -> Any:
        """One unary call, moving to the next address when one cannot be used (see the module doc)."""
        if not self.multi or not isinstance(method, _Method):
            try:
                return await method(request, metadata=md, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata()) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        start, tried = self.current, set[int]()
        last: grpc.aio.AioRpcError | None = None
        while True:
            i = await self.pick(deadline, tried)
            if i is None:
                if last is not None:
                    raise error_from_rpc(last.code(), last.details(), last.trailing_metadata())
                i = start  # none connects: the call as to a single address, with its error
            tried.add(i)
            try:
                return await getattr(self.stub(i), method.name)(
                    request, metadata=md, timeout=max(0.001, deadline - loop.time()))
            except grpc.aio.AioRpcError as exc:
                failed = _transport_failed(exc)
                if failed or (exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method.name == "Handshake"):
                    self.skip(i)  # an unanswered health probe: the next calls try another address
                if not (failed and method.name in _REPEATABLE and len(tried) < len(self.addresses)):
                    raise error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata()) from None
                last = exc

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class _Method:
    """``stub.Name`` of a :class:`_RoutedStub`: called, it is the method of the address in use."""

    def __init__(self, endpoints: _Endpoints, name: str) -> None:
        self.endpoints = endpoints
        self.name = name

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        return getattr(self.endpoints.stub(), self.name)(request, **kwargs)


class _RoutedStub:
    """A stub whose methods go to the address in use (``_unary`` moves them on a failure)."""

    def __init__(self, endpoints: _Endpoints) -> None:
        self._endpoints = endpoints

    def __getattr__(self, name: str) -> _Method:
        return _Method(self._endpoints, name)


def _node_stub(channel: grpc.aio.Channel) -> Any:
    """NodeService's stub whose event streams remember each batch's bytes (asm_controller._wire): a
    controller relays and records a node's batches as they came instead of encoding them again."""
    stub = node_pb2_grpc.NodeServiceStub(channel)
    for name, request_cls in (("StartRun", pb.StartRunRequest), ("AttachRun", pb.AttachRunRequest)):
        setattr(stub, name, channel.unary_stream(
            f"/asm.v1.NodeService/{name}", request_serializer=request_cls.SerializeToString,
            response_deserializer=parse_batch))
    return stub


class GrpcNodeClient:
    """NodeApi over a gRPC channel."""

    def __init__(self, node: RemoteNode) -> None:
        self.node = node
        self._endpoints = _Endpoints(node, _node_stub)
        self._stub = _RoutedStub(self._endpoints)
        self._md = _auth_metadata(node)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the address in use."""
        return self._endpoints.channel()

    async def close(self) -> None:
        await self._endpoints.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        return await self._endpoints.unary(method, request, self._md, timeout or self.node.rpc_timeout_s)

    async def handshake(self, request: pb.HandshakeRequest, timeout: float | None = None) -> pb.HandshakeResponse:
        resp: pb.HandshakeResponse = await self._unary(self._stub.Handshake, request, timeout)
        return resp

    async def preflight(self, request: pb.PreflightRequest) -> pb.PreflightResponse:
        resp: pb.PreflightResponse = await self._unary(self._stub.Preflight, request)
        return resp

    async def _stream(self, call: Any) -> AsyncGenerator[pb.EventBatch, None]:
        try:
            async for batch in call:
                yield batch
        except grpc.aio.AioRpcError as exc:
            trailers = exc.trailing_metadata()
            err = error_from_rpc(exc.code(), exc.details(), trailers)
            if any(k == "asm-error-kind" for k, _ in (trailers or ())):
                # The server itself answered (e.g. a controller whose node is gone), as opposed to
                # a broken transport: the session bounds re-attaching on such answers by time.
                err.details[ANSWERED] = True
            raise err from None
        finally:
            call.cancel()

    async def _routed(self, name: str, request: Any) -> AsyncIterator[pb.EventBatch]:
        """A stream on the first address that connects; a broken transport moves the next calls on
        (the caller re-attaches after its last seq: every event comes once, wherever from)."""
        endpoints = self._endpoints
        i = await endpoints.pick(asyncio.get_running_loop().time() + self.node.connect_timeout_s)
        i = endpoints.current if i is None else i
        stream = self._stream(getattr(endpoints.stub(i), name)(request, metadata=self._md))
        try:
            async for batch in stream:
                yield batch
        except AsmError as err:
            if err.kind == "connection_failed" and not err.details.get(ANSWERED):
                endpoints.skip(i)
            raise
        finally:
            await stream.aclose()

    def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        if self._endpoints.multi:
            return self._routed("StartRun", request)
        return self._stream(self._stub.StartRun(request, metadata=self._md))

    def attach_run(self, request: pb.AttachRunRequest) -> AsyncIterator[pb.EventBatch]:
        if self._endpoints.multi:
            return self._routed("AttachRun", request)
        return self._stream(self._stub.AttachRun(request, metadata=self._md))

    async def interrupt_run(self, request: pb.InterruptRunRequest) -> pb.InterruptRunResponse:
        resp: pb.InterruptRunResponse = await self._unary(self._stub.InterruptRun, request)
        return resp

    async def resolve_approval(self, request: pb.ResolveApprovalRequest) -> pb.ResolveApprovalResponse:
        resp: pb.ResolveApprovalResponse = await self._unary(self._stub.ResolveApproval, request)
        return resp

    async def send_input(self, request: pb.SendInputRequest) -> pb.SendInputResponse:
        resp: pb.SendInputResponse = await self._unary(self._stub.SendInput, request)
        return resp

    async def get_run(self, request: pb.GetRunRequest) -> pb.RunInfo:
        resp: pb.RunInfo = await self._unary(self._stub.GetRun, request)
        return resp

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        resp: pb.ListRunsResponse = await self._unary(self._stub.ListRuns, request)
        return resp

    async def drain(self, request: pb.DrainRequest) -> pb.DrainResponse:
        resp: pb.DrainResponse = await self._unary(self._stub.Drain, request)
        return resp

    async def undrain(self, request: pb.UndrainRequest) -> pb.DrainResponse:
        resp: pb.DrainResponse = await self._unary(self._stub.Undrain, request)
        return resp

    async def snapshot(self, request: pb.SnapshotRequest) -> pb.SnapshotInfo:
        resp: pb.SnapshotInfo = await self._unary(self._stub.Snapshot, request, timeout=120.0)
        return resp

    async def diff(self, request: pb.DiffRequest) -> pb.DiffResponse:
        resp: pb.DiffResponse = await self._unary(self._stub.Diff, request, timeout=120.0)
        return resp

    async def rollback(self, request: pb.RollbackRequest) -> pb.RollbackResponse:
        resp: pb.RollbackResponse = await self._unary(self._stub.Rollback, request, timeout=120.0)
        return resp

    async def list_provider_sessions(self, request: pb.ListProviderSessionsRequest
                                     ) -> pb.ListProviderSessionsResponse:
        """The resumable sessions a provider CLI keeps on the node (a controller: on its node ``request.node``)."""
        resp: pb.ListProviderSessionsResponse = await self._unary(self._stub.ListProviderSessions, request)
        return resp


class ControllerClient:
    """The controller's own API (``ControllerService``: ListNodes, DrainNode, UndrainNode) over gRPC.

    ``target`` names the controller and carries the credentials (token, TLS) as
    for a node. Failures come out as :class:`AsmError`, exactly as from
    :class:`GrpcNodeClient` (the server's typed answer, or the mapped gRPC status).
    """

    def __init__(self, target: RemoteNode) -> None:
        self.target = target
        self._endpoints = _Endpoints(target, node_pb2_grpc.ControllerServiceStub)
        self._stub = _RoutedStub(self._endpoints)
        self._md = _auth_metadata(target)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the address in use."""
        return self._endpoints.channel()

    async def close(self) -> None:
        await self._endpoints.close()

    async def __aenter__(self) -> ControllerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        return await self._endpoints.unary(method, request, self._md, self.target.rpc_timeout_s)

    async def list_nodes(self) -> pb.ListNodesResponse:
        """The fleet as the controller sees it (one NodeStatus per node, an error for one it cannot reach)."""
        resp: pb.ListNodesResponse = await self._unary(self._stub.ListNodes, pb.ListNodesRequest())
        return resp

    async def drain_node(self, address: str, deadline_ms: int) -> pb.DrainResponse:
        """Drain the fleet's node ``address``: no new runs; its runs are interrupted after ``deadline_ms``."""
        resp: pb.DrainResponse = await self._unary(
            self._stub.DrainNode, pb.DrainNodeRequest(address=address, deadline_ms=deadline_ms))
        return resp

    async def undrain_node(self, address: str) -> pb.DrainResponse:
        """Cancel a drain of the fleet's node ``address``: it takes runs again, nothing is interrupted."""
        resp: pb.DrainResponse = await self._unary(self._stub.UndrainNode, pb.UndrainNodeRequest(address=address))
        return resp

    async def list_sessions(self, provider: str = "", node: str = "", limit: int = 0,
                            page_token: str = "") -> pb.ListSessionsResponse:
        """The registry's sessions, latest activity first; ``next_page_token`` continues (empty: the last page)."""
        resp: pb.ListSessionsResponse = await self._unary(self._stub.ListSessions, pb.ListSessionsRequest(
            provider=provider, node=node, limit=limit, page_token=page_token))
        return resp
