"""The gRPC implementation of :class:`asm_wire.NodeApi`, the controller's own API client, and their typed config.

One channel per node, reused by every run. Failures come out as
:class:`AsmError` (rebuilt from the node's ``asm-error-*`` trailers, or mapped
from the status code when gRPC itself failed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from asm_wire import MAX_MESSAGE_BYTES, ConfigError, error_from_rpc, grpc_target, pb
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
    """A node agent reachable over gRPC."""

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
        grpc_target(self.address)  # validates HOST:PORT early, with a clear error

    @property
    def key(self) -> str:
        return f"grpc://{self.address}"


def _open_channel(node: RemoteNode) -> grpc.aio.Channel:
    """One channel to ``node`` with its TLS and keepalive settings (nodes and controllers alike)."""
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
    target = grpc_target(node.address)
    if node.tls is not None:
        if node.tls.server_name:
            options.append(("grpc.ssl_target_name_override", node.tls.server_name))
        creds = grpc.ssl_channel_credentials(node.tls.ca, node.tls.key, node.tls.cert)
        return grpc.aio.secure_channel(target, creds, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def _auth_metadata(node: RemoteNode) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {node.token}"),) if node.token else ()


class GrpcNodeClient:
    """NodeApi over a gRPC channel."""

    def __init__(self, node: RemoteNode) -> None:
        self.node = node
        self.channel = _open_channel(node)
        self._stub = node_pb2_grpc.NodeServiceStub(self.channel)
        self._md = _auth_metadata(node)

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, metadata=self._md, timeout=timeout or self.node.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata()) from None

    async def handshake(self, request: pb.HandshakeRequest, timeout: float | None = None) -> pb.HandshakeResponse:
        resp: pb.HandshakeResponse = await self._unary(self._stub.Handshake, request, timeout)
        return resp

    async def preflight(self, request: pb.PreflightRequest) -> pb.PreflightResponse:
        resp: pb.PreflightResponse = await self._unary(self._stub.Preflight, request)
        return resp

    async def _stream(self, call: Any) -> AsyncIterator[pb.EventBatch]:
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

    def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        return self._stream(self._stub.StartRun(request, metadata=self._md))

    def attach_run(self, request: pb.AttachRunRequest) -> AsyncIterator[pb.EventBatch]:
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
        self.channel = _open_channel(target)
        self._stub = node_pb2_grpc.ControllerServiceStub(self.channel)
        self._md = _auth_metadata(target)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> ControllerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._md, timeout=self.target.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata()) from None

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
