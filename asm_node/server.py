"""The node agent's gRPC server: NodeService over a :class:`NodeAgent`, plus health, reflection and metrics.

Auth is a bearer token or named tokens (constant-time comparison) and/or
mutual TLS; each call runs as its principal, which owns the runs it starts. A
non-loopback listen address without either is refused unless ``insecure``.
Event streams are sent as the pre-serialized batches the runs keep.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import grpc

from asm_node.agent import NodeAgent
from asm_node.config import NodeConfig
from asm_wire import pb
from asm_wire._gc import SERVING_YOUNG, settle_heap
from asm_wire._principal import load_tokens
from asm_wire._server import (
    NODE_SERVICE,
    ServerLimits,
    TokenAuthInterceptor,
    add_health_and_reflection,
    bind,
    new_server,
    node_service_handler,
    run_until_signal,
    server_credentials,
    set_serving,
    start_metrics_http,
)
from asm_wire._server import check_exposure as _check_exposure

log = logging.getLogger("asm_node.server")


def check_exposure(config: NodeConfig) -> None:
    """Refuse to serve a non-loopback address with no authentication at all."""
    # A tokens file's tokens are held to the 16-byte minimum when it is read.
    _check_exposure(config.listen,
                    token=config.token.get_secret_value() if config.token else config.tokens_file is not None,
                    tls_cert=config.tls_cert is not None, tls_ca=config.tls_ca is not None, insecure=config.insecure,
                    metrics_listen=config.metrics_listen, metrics_insecure=config.metrics_insecure)


class NodeServer:
    """A started gRPC server around a NodeAgent."""

    def __init__(self, agent: NodeAgent, server: grpc.aio.Server, port: int, metrics_port: int | None,
                 health: object) -> None:
        self.agent = agent
        self.server = server
        self.port = port
        self.metrics_port = metrics_port
        self._health = health
        self._metrics_http: tuple[object, object] | None = None

    async def stop(self, grace: float = 5.0) -> None:
        self.agent.state = pb.NODE_STATE_STOPPING
        with contextlib.suppress(Exception):
            await set_serving(self._health, [NODE_SERVICE], False)  # type: ignore[arg-type]
        await self.agent.stop(timeout=grace)
        await self.server.stop(grace=1.0)
        if self._metrics_http is not None:
            http_server, _thread = self._metrics_http
            http_server.shutdown()  # type: ignore[attr-defined]


async def start_server(config: NodeConfig, agent: NodeAgent | None = None) -> NodeServer:
    check_exposure(config)
    creds = server_credentials(config.tls_cert, config.tls_key, config.tls_ca)
    # Principals: named tokens (plus the single token as "default", admin), else client certificates.
    tokens = load_tokens(config.token.get_secret_value() if config.token else None, config.tokens_file)
    agent = agent or NodeAgent(config)
    interceptors = []
    if tokens is not None or config.tls_ca is not None:
        rejected = agent.metrics.rejected.labels("auth")
        interceptors.append(TokenAuthInterceptor(tokens, on_reject=rejected.inc, client_certs=config.tls_ca is not None,
                                                 admins=config.admin_principals))
    server = new_server(interceptors, ServerLimits(
        handshake_timeout_s=config.handshake_timeout_s, max_connections=config.max_connections,
        max_concurrent_streams=config.max_concurrent_streams, max_concurrent_rpcs=config.max_concurrent_rpcs))
    server.add_generic_rpc_handlers((node_service_handler(agent),))
    health = add_health_and_reflection(server, [NODE_SERVICE])
    port = bind(server, config.listen, creds)
    metrics_http, metrics_port = None, None
    if config.metrics_listen:
        metrics_http, metrics_port = start_metrics_http(config.metrics_listen, agent.metrics.registry)
    await agent.start()
    await server.start()
    await set_serving(health, [NODE_SERVICE], True)
    node = NodeServer(agent, server, port, metrics_port, health)
    node._metrics_http = metrics_http
    return node


async def serve(config: NodeConfig, on_ready: Callable[[NodeServer], None] | None = None) -> None:
    """Run a node agent until SIGINT/SIGTERM, then stop its runs and exit cleanly."""
    server = await start_server(config)
    settle_heap(SERVING_YOUNG)  # after start-up (its objects are frozen): asm_wire._gc, why
    await run_until_signal(server, on_ready)
