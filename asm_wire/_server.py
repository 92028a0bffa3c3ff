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
* standard gRPC health checking and server reflection;
* limits that keep a node bounded under abuse (:class:`ServerLimits`): a
  handshake timeout, idle-connection reaping, caps on connections, streams per
  connection and concurrent RPCs; a request whose bytes do not parse is answered
  INVALID_ARGUMENT (one rate-limited log line, no traceback);
* the Prometheus /metrics HTTP server with a bounded worker pool.
"""

from __future__ import annotations

import asyncio
import hmac  # noqa: F401  (the comparison lives in _principal; tests patch hmac through here)
import logging
import resource
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from asm_wire._address import is_loopback_host, parse_address
from asm_wire._errors import AsmError, ConfigError, NodeUnauthenticated, PermissionDenied
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
from asm_wire._vocab import MAX_MESSAGE_BYTES
from asm_wire.v1 import node_pb2 as pb

log = logging.getLogger("asm.server")

NODE_SERVICE = "asm.v1.NodeService"
CONTROLLER_SERVICE = "asm.v1.ControllerService"

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
    # A connection with no RPC for this long is closed (GOAWAY; a real client reconnects by itself):
    # connections that authenticate nothing cannot be parked forever.
    ("grpc.max_connection_idle_ms", 60_000),
    # gRPC core's own backlog of calls the server has not picked up yet: by default it drops calls
    # past 1,000 at random with an untyped CANCELLED. Keep it far above the concurrent-RPC cap, which
    # answers a typed RESOURCE_EXHAUSTED first (the backlog stays bounded by connections x streams).
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 10_000),
]

#: A bearer token shorter than this is refused on a non-loopback address (unless --insecure).
MIN_TOKEN_BYTES = 16


def default_max_connections() -> int:
    """Half the process's open-file limit (at least 16): runs need descriptors too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 10_000
    return max(16, soft // 2)


@dataclass(frozen=True)
class ServerLimits:
    """How much one gRPC server (node or controller) accepts before it refuses, typed."""

    #: A connection must finish its TLS/HTTP2 handshake this fast, or it is closed.
    handshake_timeout_s: float = 5.0
    #: Open connections at once (a new one past the cap is closed at once); None = default_max_connections().
    max_connections: int | None = None
    #: HTTP/2 streams in flight on one connection; past it a stream gets REFUSED_STREAM (client: at_capacity).
    max_concurrent_streams: int = 1000
    #: RPCs in flight on the whole server; one more is answered RESOURCE_EXHAUSTED (client: at_capacity).
    max_concurrent_rpcs: int = 1000

    def __post_init__(self) -> None:
        if not self.handshake_timeout_s > 0:
            raise ConfigError(f"handshake timeout must be positive, not {self.handshake_timeout_s}")
        for name in ("max_connections", "max_concurrent_streams", "max_concurrent_rpcs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, not {value}")


def server_options(limits: ServerLimits) -> list[tuple[str, Any]]:
    """SERVER_OPTIONS plus the channel arguments for ``limits``."""
    int_max = 2**31 - 1  # channel arguments are C ints
    return [
        *SERVER_OPTIONS,
        ("grpc.server_handshake_timeout_ms", max(1, int(min(limits.handshake_timeout_s * 1000, int_max)))),
        ("grpc.max_allowed_incoming_connections", min(limits.max_connections or default_max_connections(), int_max)),
        ("grpc.max_concurrent_streams", min(limits.max_concurrent_streams, int_max)),
    ]


def new_server(interceptors: Sequence[grpc.aio.ServerInterceptor], limits: ServerLimits) -> grpc.aio.Server:
    """A grpc.aio server with asm's options and ``limits``."""
    return grpc.aio.server(interceptors=list(interceptors), options=server_options(limits),
                           maximum_concurrent_rpcs=min(limits.max_concurrent_rpcs, 2**31 - 1))

Context = grpc.aio.ServicerContext[Any, Any]


#: The status message travels in a (percent-encoded) trailer: past the peer's metadata limit (16 KiB)
#: the client gets "Stream removed" RESOURCE_EXHAUSTED instead of the typed error, so a message
#: that echoes a huge field (an id, a cwd) is cut.
MAX_STATUS_MESSAGE_CHARS = 1000


async def abort(context: Context, err: AsmError) -> None:
    context.set_trailing_metadata(err.grpc_trailers())
    message = err.message
    if len(message) > MAX_STATUS_MESSAGE_CHARS:
        message = f"{message[:MAX_STATUS_MESSAGE_CHARS]}... ({len(message)} characters)"
    await context.abort(err.grpc_status(), message)


def _audit_denied(err: AsmError, context: Context, name: str) -> None:
    if isinstance(err, PermissionDenied):
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


class _Malformed:
    """Stands in for a request whose bytes did not parse (the deserializer must not raise:
    grpc would answer UNKNOWN and log a traceback for every such request)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class _RateLimitedLog:
    """At most one log line per ``interval_s``; the lines it held back are counted in the next one."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._held = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self.interval_s
        log.warning(msg + (f" ({held} more since the last such line)" if held else ""), *args)


_malformed_log = _RateLimitedLog()


def _parser(cls: Any) -> Callable[[bytes], Any]:
    from_string = cls.FromString

    def parse(data: bytes) -> Any:
        try:
            return from_string(data)
        except Exception as exc:  # DecodeError (corrupt wire format, invalid UTF-8, nesting too deep)
            return _Malformed(f"{cls.DESCRIPTOR.full_name}: {exc}")

    return parse


async def _reject_malformed(context: Context, method: str, request: _Malformed) -> None:
    _malformed_log.warning("malformed %s request from %s refused: %s", method, context.peer(), request.error)
    await abort(context, ConfigError(f"malformed {method} request: {request.error}", reason="malformed_request"))


def unary_method(method: str, handler: Callable[[Any, Context], Awaitable[Any]], request_cls: Any,
                 serializer: Callable[[Any], bytes]) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary method whose undecodable requests get INVALID_ARGUMENT (reason malformed_request)."""
    async def checked(request: Any, context: Context) -> Any:
        if isinstance(request, _Malformed):
            await _reject_malformed(context, method, request)
        return await handler(request, context)

    return grpc.unary_unary_rpc_method_handler(checked, _parser(request_cls), serializer)


def stream_method(method: str, handler: Callable[[Any, Context], AsyncIterator[Any]], request_cls: Any,
                  serializer: Callable[[Any], bytes]) -> grpc.RpcMethodHandler[Any, Any]:
    """A server-streaming method whose undecodable requests get INVALID_ARGUMENT."""
    async def checked(request: Any, context: Context) -> AsyncIterator[Any]:
        if isinstance(request, _Malformed):
            await _reject_malformed(context, method, request)
            return
        async for item in handler(request, context):
            yield item

    return grpc.unary_stream_rpc_method_handler(checked, _parser(request_cls), serializer)


def node_service_handler(api: Any) -> grpc.GenericRpcHandler:
    """NodeService over ``api`` (a NodeApi; ``start_run_frames``/``attach_run_frames`` are used when present)."""
    u, s = unary_method, stream_method
    start = getattr(api, "start_run_frames", api.start_run)
    attach = getattr(api, "attach_run_frames", api.attach_run)
    return grpc.method_handlers_generic_handler(NODE_SERVICE, {
        "Handshake": u("Handshake", unary(api.handshake), pb.HandshakeRequest, pb.HandshakeResponse.SerializeToString),
        "Preflight": u("Preflight", unary(api.preflight), pb.PreflightRequest, pb.PreflightResponse.SerializeToString),
        "StartRun": s("StartRun", stream(start), pb.StartRunRequest, _serialize),
        "AttachRun": s("AttachRun", stream(attach), pb.AttachRunRequest, _serialize),
        "InterruptRun": u("InterruptRun", unary(api.interrupt_run), pb.InterruptRunRequest,
                          pb.InterruptRunResponse.SerializeToString),
        "ResolveApproval": u("ResolveApproval", unary(api.resolve_approval), pb.ResolveApprovalRequest,
                             pb.ResolveApprovalResponse.SerializeToString),
        "SendInput": u("SendInput", unary(api.send_input), pb.SendInputRequest,
                       pb.SendInputResponse.SerializeToString),
        "GetRun": u("GetRun", unary(api.get_run), pb.GetRunRequest, pb.RunInfo.SerializeToString),
        "ListRuns": u("ListRuns", unary(api.list_runs), pb.ListRunsRequest, pb.ListRunsResponse.SerializeToString),
        "Drain": u("Drain", unary(api.drain), pb.DrainRequest, pb.DrainResponse.SerializeToString),
        "Undrain": u("Undrain", unary(api.undrain), pb.UndrainRequest, pb.DrainResponse.SerializeToString),
        "Snapshot": u("Snapshot", unary(api.snapshot), pb.SnapshotRequest, pb.SnapshotInfo.SerializeToString),
        "Diff": u("Diff", unary(api.diff), pb.DiffRequest, pb.DiffResponse.SerializeToString),
        "Rollback": u("Rollback", unary(api.rollback), pb.RollbackRequest, pb.RollbackResponse.SerializeToString),
        "ListProviderSessions": u("ListProviderSessions", unary(api.list_provider_sessions),
                                  pb.ListProviderSessionsRequest, pb.ListProviderSessionsResponse.SerializeToString),
    })


_AUTH_ERR = NodeUnauthenticated("missing or invalid bearer token")
_CERT_ERR = NodeUnauthenticated("no verified client certificate subject")


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


def check_exposure(listen: str, *, token: bool | str | Sequence[str] | None, tls_cert: bool, tls_ca: bool,
                   insecure: bool, metrics_listen: str | None = None, metrics_insecure: bool = False) -> None:
    """Refuse to serve a non-loopback address with no (or a guessable) authentication.

    ``token`` is the token(s) clients must present (a bare bool skips the length rule). The metrics
    HTTP server has no authentication at all: a non-loopback ``metrics_listen`` needs
    ``metrics_insecure`` (--metrics-insecure).
    """
    if metrics_listen is not None:
        metrics_host, _ = parse_address(metrics_listen)
        if not is_loopback_host(metrics_host) and not metrics_insecure:
            raise ConfigError(
                f"refusing to serve metrics on non-loopback address {metrics_listen}: the metrics endpoint has "
                "no authentication; bind it to 127.0.0.1 (scrape through a sidecar or tunnel) or pass "
                "--metrics-insecure"
            )
    host, _ = parse_address(listen)
    if is_loopback_host(host):
        return
    if not (token or tls_ca) and not insecure:
        raise ConfigError(
            f"refusing to listen on non-loopback address {listen} without authentication: "
            "give --token-file (or ASM_TOKEN) and/or --tls-ca for mutual TLS, or pass --insecure"
        )
    tokens = [token] if isinstance(token, str) else [] if isinstance(token, bool) or token is None else list(token)
    short = min((len(t.encode()) for t in tokens), default=MIN_TOKEN_BYTES)
    if short < MIN_TOKEN_BYTES:
        if not insecure:
            raise ConfigError(
                f"refusing to listen on non-loopback address {listen} with a {short}-byte bearer token: "
                f"a token must be at least {MIN_TOKEN_BYTES} bytes (e.g. `openssl rand -hex 16`), or pass --insecure"
            )
        log.warning("bearer token of %d bytes on %s: shorter than %d bytes, guessable", short, listen,
                    MIN_TOKEN_BYTES)
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


#: Metrics HTTP connections served at once; one more is closed at once (a scraper retries next interval).
METRICS_WORKERS = 4
#: A metrics client must send each piece of its request this fast, and be done this fast overall.
METRICS_IO_TIMEOUT_S = 5.0
METRICS_REQUEST_DEADLINE_S = 15.0


def _metrics_server_class(family: socket.AddressFamily, workers: int) -> type[Any]:
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Handler(WSGIRequestHandler):
        timeout = METRICS_IO_TIMEOUT_S  # socket timeout per read/write: a stalled client lets go of its worker

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class BoundedWSGIServer(WSGIServer):
        """At most ``workers`` connections served at once, each on its own (daemon) thread."""

        address_family = family
        handler_class = Handler

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._slots = threading.BoundedSemaphore(workers)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self._slots.acquire(blocking=False):
                self.shutdown_request(request)  # full: refuse rather than queue or grow
                return
            threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True,
                             name="asm-metrics-http").start()

        def _serve_one(self, request: Any, client_address: Any) -> None:
            # A client trickling bytes under the per-read timeout is cut off at the overall deadline.
            deadline = threading.Timer(METRICS_REQUEST_DEADLINE_S, _shutdown_socket, (request,))
            deadline.daemon = True
            deadline.start()
            try:
                self.finish_request(request, client_address)
            except Exception:  # a broken client connection is not the server's problem
                log.debug("metrics request from %s failed", client_address, exc_info=True)
            finally:
                deadline.cancel()
                self.shutdown_request(request)
                self._slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("metrics request from %s failed", client_address, exc_info=True)

        def shutdown(self) -> None:
            super().shutdown()
            self.server_close()

    return BoundedWSGIServer


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def start_metrics_http(listen: str, registry: Any, workers: int = METRICS_WORKERS) -> tuple[Any, int]:
    """Serve ``registry`` at http://listen/metrics on its own thread; ((server, thread), bound port).

    Bounded, unlike prometheus_client's thread-per-connection server: ``workers`` connections at
    once, per-read and overall timeouts. Exposure is checked by :func:`check_exposure`.
    """
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app

    host, port = parse_address(listen)
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server_class = _metrics_server_class(family, workers)
        httpd = make_server(str(sockaddr[0]), port, make_wsgi_app(registry), server_class,
                            handler_class=server_class.handler_class)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True, name="asm-metrics-http-accept")
    thread.start()
    return (httpd, thread), int(httpd.server_port)


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
