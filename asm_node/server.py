"""The node agent's gRPC server: a thin adapter over :class:`NodeAgent`.

* Errors: an :class:`AsmError` becomes a status code plus ``asm-error-*``
  trailing metadata; anything else is logged and sent as INTERNAL without
  internals.
* Auth: a bearer token (constant-time comparison) and/or mutual TLS. The server
  refuses a non-loopback listen address without either, unless ``insecure``.
* Event streams are sent as pre-serialized bytes (see :mod:`asm_node.run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from asm_node.agent import NodeAgent
from asm_node.config import NodeConfig
from asm_wire import AsmError, ConfigError, is_loopback_host, parse_address, pb

log = logging.getLogger("asm_node.server")

SERVICE = "asm.v1.NodeService"
#: Event batches can carry lines up to the node's line cap (8 MiB by default).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Matched with the controller's client keepalive so neither side rejects the other's pings.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 4_000),  # below the client keepalive (5 s)
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.http2.max_pings_without_data", 0),
]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: AsmError) -> None:
    context.set_trailing_metadata(err.grpc_trailers())
    await context.abort(err.grpc_status(), err.message)


def _unary(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await fn(request)
        except AsmError as err:
            await _abort(context, err)
        except Exception:
            log.exception("unexpected error in %s", getattr(fn, "__name__", "rpc"))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error on the node agent (see its log)")

    return handler


def _stream(
    fn: Callable[[Any], AsyncIterator[bytes]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        try:
            async for frame in fn(request):
                yield frame
        except AsmError as err:
            await _abort(context, err)
        except asyncio.CancelledError:
            raise  # the client went away; the run itself keeps going (detach, don't kill)
        except Exception:
            log.exception("unexpected error in stream %s", getattr(fn, "__name__", "rpc"))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error on the node agent (see its log)")

    return handler


def _identity(data: bytes) -> bytes:
    return data


def node_handler(agent: NodeAgent) -> grpc.GenericRpcHandler:
    u, s = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Handshake": u(_unary(agent.handshake), pb.HandshakeRequest.FromString, pb.HandshakeResponse.SerializeToString),
            "Preflight": u(_unary(agent.preflight), pb.PreflightRequest.FromString, pb.PreflightResponse.SerializeToString),
            "StartRun": s(_stream(agent.start_run_frames), pb.StartRunRequest.FromString, _identity),
            "AttachRun": s(_stream(agent.attach_run_frames), pb.AttachRunRequest.FromString, _identity),
            "InterruptRun": u(_unary(agent.interrupt_run), pb.InterruptRunRequest.FromString,
                              pb.InterruptRunResponse.SerializeToString),
            "ResolveApproval": u(_unary(agent.resolve_approval), pb.ResolveApprovalRequest.FromString,
                                 pb.ResolveApprovalResponse.SerializeToString),
            "SendInput": u(_unary(agent.send_input), pb.SendInputRequest.FromString, pb.SendInputResponse.SerializeToString),
            "GetRun": u(_unary(agent.get_run), pb.GetRunRequest.FromString, pb.RunInfo.SerializeToString),
            "ListRuns": u(_unary(agent.list_runs), pb.ListRunsRequest.FromString, pb.ListRunsResponse.SerializeToString),
            "Drain": u(_unary(agent.drain), pb.DrainRequest.FromString, pb.DrainResponse.SerializeToString),
        },
    )


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>``; compares in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method or ""
        if method.startswith(("/grpc.health.v1.", "/grpc.reflection.")):
            return await continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        return _deny_handler(method)


_AUTH_ERR = AsmError("missing or invalid bearer token", kind="auth_error", domain="transport", reason="unauthenticated")


def _deny_handler(method: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def deny_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _abort(context, _AUTH_ERR)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        await _abort(context, _AUTH_ERR)
        yield b""  # pragma: no cover - abort raises

    if method.endswith(("/StartRun", "/AttachRun")):
        return grpc.unary_stream_rpc_method_handler(deny_stream, request_deserializer=_identity,
                                                    response_serializer=_identity)
    return grpc.unary_unary_rpc_method_handler(deny_unary, request_deserializer=_identity,
                                               response_serializer=_identity)


def server_credentials(config: NodeConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert or config.tls_key or config.tls_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    try:
        cert, key = config.tls_cert.read_bytes(), config.tls_key.read_bytes()
        ca = config.tls_ca.read_bytes() if config.tls_ca else None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS material: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def check_exposure(config: NodeConfig) -> None:
    """Refuse to serve a non-loopback address with no authentication at all."""
    host, _ = parse_address(config.listen)
    authenticated = config.token is not None or config.tls_ca is not None
    if not is_loopback_host(host) and not authenticated and not config.insecure:
        raise ConfigError(
            f"refusing to listen on non-loopback address {config.listen} without authentication: "
            "give --token-file (or ASM_TOKEN) and/or --tls-ca for mutual TLS, or pass --insecure"
        )
    if not is_loopback_host(host) and config.token is not None and config.tls_cert is None:
        log.warning("bearer token on %s without TLS: the token travels in clear text", config.listen)


class NodeServer:
    """A started gRPC server around a NodeAgent."""

    def __init__(self, agent: NodeAgent, server: grpc.aio.Server, port: int) -> None:
        self.agent = agent
        self.server = server
        self.port = port

    async def stop(self, grace: float = 5.0) -> None:
        self.agent.state = pb.NODE_STATE_STOPPING
        await self.agent.stop(timeout=grace)
        await self.server.stop(grace=1.0)


async def start_server(config: NodeConfig, agent: NodeAgent | None = None) -> NodeServer:
    check_exposure(config)
    creds = server_credentials(config)
    agent = agent or NodeAgent(config)
    interceptors = [TokenAuthInterceptor(config.token.get_secret_value())] if config.token else []
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((node_handler(agent),))
    host, port = parse_address(config.listen)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(target, creds) if creds else server.add_insecure_port(target)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {config.listen}: {exc}") from None
    if not bound:
        raise ConfigError(f"cannot listen on {config.listen} (address in use or not available)")
    await agent.start()
    await server.start()
    return NodeServer(agent, server, bound)


async def serve(config: NodeConfig, on_ready: Callable[[NodeServer], None] | None = None) -> None:
    """Run a node agent until SIGINT/SIGTERM, then stop its runs and exit cleanly."""
    node = await start_server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(node)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await node.stop()
