"""Server-side gRPC plumbing shared by the node agent and the controller service.

* the NodeService method table over any :class:`NodeApi` (stream methods may
  yield pre-serialized batches);
* error mapping: an :class:`AsmError` becomes a status code plus
  ``asm-error-*`` trailers; anything else is logged and sent as INTERNAL
  without internals;
* authentication (bearer tokens compared in constant time, or the client
  certificate under mutual TLS) that makes each call's principal current
  (:mod:`asm_wire._principal`), audit lines for refused calls, TLS
  credentials, the rule that a non-loopback address needs authentication;
* standard gRPC health checking and server reflection.
"""

from __future__ import annotations

import asyncio
import hmac  # noqa: F401  (the comparison lives in _principal; tests patch hmac through here)
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from asm_wire._address import is_loopback_host, parse_address
from asm_wire._errors import AsmError, ConfigError
from asm_wire._principal import (
    ANONYMOUS,
    AUDIT,
    Principal,
    TokenTable,
    acting_as,
    cert_principal,
    current_method,
    current_principal,
)
from asm_wire.v1 import node_pb2 as pb

log = logging.getLogger("asm.server")

NODE_SERVICE = "asm.v1.NodeService"
CONTROLLER_SERVICE = "asm.v1.ControllerService"
#: Event batches can carry lines up to a node's line cap (8 MiB by default).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Matched with the controller's client keepalive (5 s) so neither side rejects the other's pings.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.http2.max_pings_without_data", 0),
]

Context = grpc.aio.ServicerContext[Any, Any]


async def abort(context: Context, err: AsmError) -> None:
    context.set_trailing_metadata(err.grpc_trailers())
    await context.abort(err.grpc_status(), err.message)


def _audit_denied(err: AsmError, context: Context, name: str) -> None:
    if err.reason == "permission_denied":
        AUDIT.record(current_principal().name, context.peer(), current_method() or name, "permission_denied")


def unary(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handler(request: Any, context: Context) -> Any:
        try:
            return await fn(request)
        except AsmError as err:
            _audit_denied(err, context, getattr(fn, "__name__", "rpc"))
            await abort(context, err)
        except Exception:
            log.exception("unexpected error in %s", getattr(fn, "__name__", "rpc"))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server's log)")

    return handler


def stream(fn: Callable[[Any], AsyncIterator[Any]]) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for item in fn(request):
                yield item
        except AsmError as err:
            _audit_denied(err, context, getattr(fn, "__name__", "rpc"))
            await abort(context, err)
        except asyncio.CancelledError:
            raise  # the client went away; a run itself keeps going (detach, don't kill)
        except Exception:
            log.exception("unexpected error in stream %s", getattr(fn, "__name__", "rpc"))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server's log)")

    return handler


def _identity(data: bytes) -> bytes:
    return data


def _serialize(item: Any) -> bytes:
    """An EventBatch, or one already serialized (the node keeps its events serialized)."""
    return item if isinstance(item, bytes) else bytes(item.SerializeToString())


def node_service_handler(api: Any) -> grpc.GenericRpcHandler:
    """NodeService over ``api`` (a NodeApi; ``start_run_frames``/``attach_run_frames`` are used when present)."""
    u, s = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    start = getattr(api, "start_run_frames", api.start_run)
    attach = getattr(api, "attach_run_frames", api.attach_run)
    return grpc.method_handlers_generic_handler(NODE_SERVICE, {
        "Handshake": u(unary(api.handshake), pb.HandshakeRequest.FromString, pb.HandshakeResponse.SerializeToString),
        "Preflight": u(unary(api.preflight), pb.PreflightRequest.FromString, pb.PreflightResponse.SerializeToString),
        "StartRun": s(stream(start), pb.StartRunRequest.FromString, _serialize),
        "AttachRun": s(stream(attach), pb.AttachRunRequest.FromString, _serialize),
        "InterruptRun": u(unary(api.interrupt_run), pb.InterruptRunRequest.FromString,
                          pb.InterruptRunResponse.SerializeToString),
        "ResolveApproval": u(unary(api.resolve_approval), pb.ResolveApprovalRequest.FromString,
                             pb.ResolveApprovalResponse.SerializeToString),
        "SendInput": u(unary(api.send_input), pb.SendInputRequest.FromString, pb.SendInputResponse.SerializeToString),
        "GetRun": u(unary(api.get_run), pb.GetRunRequest.FromString, pb.RunInfo.SerializeToString),
        "ListRuns": u(unary(api.list_runs), pb.ListRunsRequest.FromString, pb.ListRunsResponse.SerializeToString),
        "Drain": u(unary(api.drain), pb.DrainRequest.FromString, pb.DrainResponse.SerializeToString),
        "Snapshot": u(unary(api.snapshot), pb.SnapshotRequest.FromString, pb.SnapshotInfo.SerializeToString),
        "Diff": u(unary(api.diff), pb.DiffRequest.FromString, pb.DiffResponse.SerializeToString),
        "Rollback": u(unary(api.rollback), pb.RollbackRequest.FromString, pb.RollbackResponse.SerializeToString),
    })


_AUTH_ERR = AsmError("missing or invalid bearer token", kind="auth_error", domain="transport", reason="unauthenticated")
_CERT_ERR = AsmError("no verified client certificate subject", kind="auth_error", domain="transport",
                     reason="unauthenticated")


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call and makes its principal current; health and reflection stay open.

    ``tokens`` (one token, or named ones): the call must present
    ``authorization: Bearer <token>``, compared in constant time against every
    token; the matching name is the principal. Without tokens, under mutual TLS
    (``client_certs``) the principal is the client certificate's subject
    (``cn:<CN>``). ``admins`` names certificate principals with the admin role.
    A refused call gets UNAUTHENTICATED and a rate-limited ``asm.audit`` line.
    """

    def __init__(self, tokens: str | TokenTable | None, on_reject: Callable[[], None] | None = None, *,
                 client_certs: bool = False, admins: Sequence[str] = ()) -> None:
        self._tokens = TokenTable.single(tokens) if isinstance(tokens, str) else tokens
        self._client_certs = client_certs
        self._admins = frozenset(admins)
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method or ""
        if method.startswith(("/grpc.health.v1.", "/grpc.reflection.")):
            return await continuation(handler_call_details)
        principal: Principal | None = None
        if self._tokens is not None:
            presented = b""
            for key, value in handler_call_details.invocation_metadata or ():
                if key == "authorization":
                    presented = value.encode() if isinstance(value, str) else value
                    break
            principal = self._tokens.match(presented)
            if principal is None:
                return self._deny(method, _AUTH_ERR)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        wrapped: grpc.RpcMethodHandler[Any, Any] = self._as_principal(handler, method, principal)
        return wrapped

    def _deny(self, method: str, err: AsmError) -> grpc.RpcMethodHandler[Any, Any]:
        if self._on_reject is not None:
            self._on_reject()
        return _deny_handler(method, err)

    def _resolve(self, context: Context, principal: Principal | None) -> Principal | None:
        if principal is not None:
            return principal
        if self._client_certs:
            return cert_principal(context.auth_context(), self._admins)
        return ANONYMOUS

    def _as_principal(self, handler: Any, method: str, principal: Principal | None) -> Any:
        """``handler`` with its behaviour run as the call's principal (one per call: a ContextVar)."""
        if handler.unary_unary is not None:
            inner_u = handler.unary_unary

            async def unary_as(request: Any, context: Context) -> Any:
                who = self._resolve(context, principal)
                if who is None:
                    return await self._refuse(context, method)
                with acting_as(who, method):
                    return await inner_u(request, context)

            return handler._replace(unary_unary=unary_as)
        if handler.unary_stream is not None:
            inner_s = handler.unary_stream

            async def stream_as(request: Any, context: Context) -> AsyncIterator[Any]:
                who = self._resolve(context, principal)
                if who is None:
                    await self._refuse(context, method)
                    return
                with acting_as(who, method):
                    async for item in inner_s(request, context):
                        yield item

            return handler._replace(unary_stream=stream_as)
        return handler  # no client-streaming methods are served

    async def _refuse(self, context: Context, method: str) -> None:
        if self._on_reject is not None:
            self._on_reject()
        AUDIT.record("-", context.peer(), method, "unauthenticated")
        await abort(context, _CERT_ERR)


def _deny_handler(method: str, err: AsmError = _AUTH_ERR) -> grpc.RpcMethodHandler[Any, Any]:
    async def deny_unary(request: Any, context: Context) -> Any:
        AUDIT.record("-", context.peer(), method, "unauthenticated")
        await abort(context, err)

    async def deny_stream(request: Any, context: Context) -> AsyncIterator[bytes]:
        AUDIT.record("-", context.peer(), method, "unauthenticated")
        await abort(context, err)
        yield b""  # pragma: no cover - abort raises

    if method.endswith(("/StartRun", "/AttachRun")):
        return grpc.unary_stream_rpc_method_handler(deny_stream, request_deserializer=_identity,
                                                    response_serializer=_identity)
    return grpc.unary_unary_rpc_method_handler(deny_unary, request_deserializer=_identity,
                                               response_serializer=_identity)


def server_credentials(cert: Path | None, key: Path | None, ca: Path | None) -> grpc.ServerCredentials | None:
    if not (cert or key or ca):
        return None
    if not (cert and key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    try:
        cert_b, key_b = cert.read_bytes(), key.read_bytes()
        ca_b = ca.read_bytes() if ca else None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS material: {exc}") from None
    return grpc.ssl_server_credentials([(key_b, cert_b)], root_certificates=ca_b, require_client_auth=ca_b is not None)


def check_exposure(listen: str, *, token: bool, tls_cert: bool, tls_ca: bool, insecure: bool) -> None:
    """Refuse to serve a non-loopback address with no authentication at all."""
    host, _ = parse_address(listen)
    if is_loopback_host(host):
        return
    if not (token or tls_ca) and not insecure:
        raise ConfigError(
            f"refusing to listen on non-loopback address {listen} without authentication: "
            "give --token-file (or ASM_TOKEN) and/or --tls-ca for mutual TLS, or pass --insecure"
        )
    if token and not tls_cert:
        log.warning("bearer token on %s without TLS: the token travels in clear text", listen)


def bind(server: grpc.aio.Server, listen: str, creds: grpc.ServerCredentials | None) -> int:
    host, port = parse_address(listen)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(target, creds) if creds else server.add_insecure_port(target)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc}") from None
    if not bound:
        raise ConfigError(f"cannot listen on {listen} (address in use or not available)")
    return bound


def add_health_and_reflection(server: grpc.aio.Server, services: Sequence[str]) -> health.aio.HealthServicer:
    """Standard health checking ("" and each service SERVING) and reflection, for grpcurl and k8s probes."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, services: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *services):
        await servicer.set(name, status)


def start_metrics_http(listen: str, registry: Any) -> tuple[Any, int]:
    """Serve ``registry`` at http://listen/metrics on its own thread; (server, bound port)."""
    from prometheus_client import start_http_server

    host, port = parse_address(listen)
    try:
        http = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {listen}: {exc.strerror}") from None
    return http, int(http[0].server_port)


async def run_until_signal(server: Any, on_ready: Callable[[Any], None] | None = None) -> None:
    """Wait for SIGINT/SIGTERM, then ``await server.stop()`` (which stops runs and closes cleanly)."""
    import contextlib
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(server)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await server.stop()
