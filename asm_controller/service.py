"""``asm controller serve``: a long-running controller in front of a fleet of nodes.

To its clients the controller *is* a node: it serves the same NodeService
(start, attach, interrupt, approve, ...) and routes each run to a node of its
fleet, with the session runtime's admission, health, failover, re-attachment
and node-loss handling. ``asm run --controller HOST:PORT`` is therefore just a
remote node run. ControllerService adds the fleet view (ListNodes) and
DrainNode (admin only). Clients are principals (named tokens, or client
certificates) as on a node: each sees and touches only the runs it started
here, which the controller records in memory. Nodes come from ``--node`` flags, a file, or a DNS name that
resolves to many addresses (a Kubernetes headless Service), re-resolved
periodically. Metrics (``asm_controller_*``), health checking and reflection
are served too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from asm_controller._client import GrpcNodeClient, LivenessConfig, RemoteNode, TLSConfig
from asm_controller._metrics import ControllerMetrics
from asm_controller._routing import eligible
from asm_controller._session import Session
from asm_wire import (
    PROTOCOL_VERSION,
    AsmError,
    ConfigError,
    NodeNotReady,
    __version__,
    error_info,
    make_error,
    parse_address,
    pb,
)
from asm_wire._options import parse_options_json
from asm_wire._principal import check_owner, current_principal, load_tokens, may_access, require_admin
from asm_wire._server import (
    CONTROLLER_SERVICE,
    NODE_SERVICE,
    ServerLimits,
    TokenAuthInterceptor,
    add_health_and_reflection,
    bind,
    check_exposure,
    new_server,
    node_service_handler,
    run_until_signal,
    server_credentials,
    set_serving,
    start_metrics_http,
    unary,
    unary_method,
)

log = logging.getLogger("asm_controller.service")

CAPABILITIES = (
    "run.start.v1", "run.attach.v1", "run.interrupt.v1", "run.query.v1", "approval.resolve.v1", "input.send.v1",
    "fleet.v1",
)


@dataclass
class ControllerConfig:
    listen: str = "127.0.0.1:7080"
    nodes: list[str] = field(default_factory=list)
    nodes_file: Path | None = None
    nodes_dns: str | None = None
    dns_interval_s: float = 15.0
    metrics_listen: str | None = None
    metrics_insecure: bool = False  # allow a non-loopback metrics_listen (no auth on /metrics)
    token: str | None = field(default=None, repr=False)  # clients must present it; never in a repr/log
    tokens_file: Path | None = None  # named client tokens (NAME:TOKEN[:admin] per line): principals
    admin_principals: list[str] = field(default_factory=list)  # client-cert principals with the admin role
    node_token: str | None = field(default=None, repr=False)  # presented to the nodes
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    node_tls: TLSConfig | None = None
    insecure: bool = False
    strategy: str = "priority"
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    max_concurrent_runs: int = 1000
    expected_providers: list[str] = field(default_factory=list)  # always alerted on (--expect-provider)
    # Connection/stream/RPC caps and handshake timeout. Every run routed through the controller holds
    # one of its RPCs: the RPC cap stays well above max_concurrent_runs, or health probes would be refused.
    limits: ServerLimits = field(default_factory=lambda: ServerLimits(max_concurrent_rpcs=4_000))


#: Sequence numbers stay below this (uint64 on the wire, with room to renumber a run's end after a cursor).
_MAX_SEQ = 2**63


def read_nodes_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read nodes file {path}: {exc.strerror}") from None
    out = [ln.split("#", 1)[0].strip() for ln in lines]
    out = [ln for ln in out if ln]
    for addr in out:
        parse_address(addr)
    return out


async def resolve_dns(name_port: str) -> list[str]:
    """NAME:PORT → every address NAME resolves to (a headless Service lists its pods)."""
    host, port = parse_address(name_port)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise make_error("connection_failed", "transport", f"cannot resolve {host}: {exc}",
                         reason="unreachable") from None
    addrs = sorted({(str(i[4][0]), int(i[4][1])) for i in infos})
    return [f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in addrs]


class FleetApi:
    """NodeService as the controller serves it: every run is routed through one Session over the fleet."""

    def __init__(self, config: ControllerConfig, metrics: ControllerMetrics) -> None:
        self.config = config
        self.epoch = f"controller-{int(time.time() * 1000)}"
        self.session = Session("shell", node=[], max_concurrent_runs=config.max_concurrent_runs,
                               max_queued_runs=0, strategy=config.strategy, metrics=metrics, preflight=True)
        self._targets: dict[str, RemoteNode] = {}
        # run_id -> the principal that started it through this controller. In memory only: a
        # restarted controller forgets its runs anyway (durable controller state is a later issue).
        self._owners: dict[str, str] = {}

    def set_nodes(self, addresses: Sequence[str]) -> None:
        targets = []
        for addr in addresses:
            target = self._targets.get(addr)
            if target is None:
                target = RemoteNode(addr, token=self.config.node_token, tls=self.config.node_tls,
                                    liveness=self.config.liveness)
                self._targets[addr] = target
            targets.append(target)
        self.session.defaults = replace(self.session.defaults, node=targets)

    @property
    def targets(self) -> list[RemoteNode]:
        return [t for t in self.session.defaults.nodes if isinstance(t, RemoteNode)]

    async def refresh(self) -> None:
        """Contact every node once (so routing and ListNodes know them)."""
        async def one(t: RemoteNode) -> None:
            with contextlib.suppress(AsmError):
                await self.session.pool.handle(t)
        await asyncio.gather(*(one(t) for t in self.targets))

    # -- NodeService ------------------------------------------------------------------

    async def handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
        providers: dict[str, pb.ProviderInfo] = {}
        active = max_runs = 0
        for handle in self.session.pool.handles():
            if handle.state == "lost":
                continue
            active += handle.info.load.active_runs
            max_runs += handle.info.limits.max_runs
            for p in handle.info.providers:
                if p.available and p.name not in providers:
                    providers[p.name] = p
        return pb.HandshakeResponse(
            agent_version=__version__, protocol_version=PROTOCOL_VERSION, capabilities=list(CAPABILITIES),
            node_id=f"controller@{socket.gethostname()}", boot_epoch=self.epoch,
            host=pb.HostFacts(hostname=socket.gethostname(), cpu_count=os.cpu_count() or 0),
            providers=list(providers.values()), limits=pb.Limits(max_runs=max_runs),
            load=pb.Load(active_runs=active), state=pb.NODE_STATE_READY,
        )

    async def preflight(self, request: pb.PreflightRequest) -> pb.PreflightResponse:
        reasons = []
        for t in self.targets:
            handle = self.session.pool.get(t.key)
            if handle is None or handle.state == "lost":
                reasons.append(f"{t.address}: not connected")
                continue
            why = eligible(handle.info, request.provider, {})
            if why is None:
                return pb.PreflightResponse(ok=True, resolved_cwd=request.cwd)
            reasons.append(f"{t.address}: {why}")
        err = make_error("connection_failed", "transport",
                         f"no node of this controller can take a {request.provider} run ({'; '.join(reasons) or 'no nodes'})",
                         reason="no_eligible_node")
        return pb.PreflightResponse(ok=False, error=error_info(err))

    def _check_run(self, run_id: str) -> None:
        """PermissionDenied for another principal's run (admins may use every run)."""
        owner = self._owners.get(run_id)
        if owner is not None:
            check_owner(owner, f"run {run_id}")

    def _claim(self, run_id: str) -> None:
        """Record the caller as the owner of a new run id; another principal's id is refused (no attach)."""
        me = current_principal().name
        owner = self._owners.setdefault(run_id, me)
        if owner != me:
            check_owner(owner, f"run {run_id}")
        if len(self._owners) > 2 * self.session.stats()["runs"] + 1024:  # forget runs the session forgot
            known = {r.run_id for r in self.session.runs()}
            self._owners = {k: v for k, v in self._owners.items() if k in known or k == run_id}

    async def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        self._claim(request.run_id)
        run = self.session.get_run(request.run_id)
        if run is not None:  # an existing run id attaches (never a second CLI)
            async for batch in self.attach_run(pb.AttachRunRequest(run_id=request.run_id, after_seq=request.after_seq)):
                yield batch
            return
        options = parse_options_json(request.options_json)  # a bounded JSON object, like a node checks
        overrides: dict[str, Any] = {
            "run_id": request.run_id, "provider": request.provider, "cwd": request.cwd,
            "permission_mode": request.permission_mode or "default", "options": options, "env": dict(request.env),
        }
        if request.approval_timeout_ms:
            overrides["approval_timeout_ms"] = request.approval_timeout_ms
        stream = self.session.stream(request.prompt, **overrides)
        async for events in stream.batches():
            yield pb.EventBatch(events=[ev.pb for ev in events])

    async def attach_run(self, request: pb.AttachRunRequest) -> AsyncIterator[pb.EventBatch]:
        """Follow a run from ``after_seq``: the node's stream while the controller's run goes on, and
        the controller's own end once it has ended (node_lost, failed, completed) -- so a client
        never waits on a node this controller has given up on."""
        self._check_run(request.run_id)
        if request.after_seq >= _MAX_SEQ:  # no run gets there; renumbering past it would overflow uint64
            raise ConfigError(f"after_seq {request.after_seq} is past any run's events (at most {_MAX_SEQ - 1})")
        run = self.session.get_run(request.run_id)
        if run is None or (run.handle is None and run.state != "done"):
            raise make_error("unknown", "runtime", f"Unknown run id: {request.run_id}")
        cursor = request.after_seq
        if run.state == "done" or run.handle is None:
            yield pb.EventBatch(events=run.final_events(cursor))
            return
        node_stream = aiter(run.handle.api.attach_run(pb.AttachRunRequest(run_id=run.node_run_id,
                                                                          after_seq=cursor)))
        ended = asyncio.ensure_future(run.done.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(anext(node_stream, None))
                await asyncio.wait({nxt, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # the controller ended the run while the node stream was silent
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, AsmError, StopAsyncIteration):
                        await nxt
                    break
                try:
                    batch = nxt.result()
                except AsmError:
                    if not run.done.is_set():
                        raise  # the client re-attaches (with backoff); by then the run may have ended
                    break
                if batch is None:
                    return
                if batch.events:
                    cursor = max(cursor, batch.events[-1].seq)
                yield batch
                if any(m.kind == pb.EVENT_KIND_RUN_COMPLETED for m in batch.events):
                    return
            final = run.final_events(cursor)
            if final:
                yield pb.EventBatch(events=final)
        finally:
            ended.cancel()
            with contextlib.suppress(Exception):
                await node_stream.aclose()  # type: ignore[attr-defined]

    async def interrupt_run(self, request: pb.InterruptRunRequest) -> pb.InterruptRunResponse:
        self._check_run(request.run_id)
        await self.session.interrupt(request.run_id)
        return pb.InterruptRunResponse(accepted=True)

    async def resolve_approval(self, request: pb.ResolveApprovalRequest) -> pb.ResolveApprovalResponse:
        pending = self.session.approval_run(request.approval_id)  # approvals are keyed by id, not run
        if pending is not None:
            self._check_run(pending.run_id)
        await self.session.approve(request.approval_id, request.decision, request.reason)
        return pb.ResolveApprovalResponse()

    async def send_input(self, request: pb.SendInputRequest) -> pb.SendInputResponse:
        self._check_run(request.run_id)
        run = self.session.get_run(request.run_id)
        if run is None or run.handle is None:
            raise make_error("unknown", "runtime", f"Unknown run id: {request.run_id}")
        return await run.handle.api.send_input(pb.SendInputRequest(run_id=run.node_run_id, data=request.data,
                                                                   end_input=request.end_input))

    async def get_run(self, request: pb.GetRunRequest) -> pb.RunInfo:
        self._check_run(request.run_id)
        run = self.session.get_run(request.run_id)
        if run is None or run.handle is None:
            raise make_error("unknown", "runtime", f"Unknown run id: {request.run_id}")
        info = await run.handle.api.get_run(pb.GetRunRequest(run_id=run.node_run_id))
        info.run_id = request.run_id
        info.owner = self._owners.get(request.run_id, info.owner)
        return info

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        """Every node's runs, under the controller's run ids and owners; a non-admin sees only its own."""
        mine = {(r.handle.target.key, r.node_run_id): r.run_id
                for r in self.session.runs() if r.handle is not None}
        admin = current_principal().admin
        out = pb.ListRunsResponse()
        for handle in self.session.pool.handles():
            with contextlib.suppress(AsmError):
                for info in (await handle.api.list_runs(request)).runs:
                    run_id = mine.get((handle.target.key, info.run_id))
                    if run_id is None:  # not started through this controller: only an admin sees it
                        if admin:
                            out.runs.append(info)
                        continue
                    info.run_id = run_id
                    info.owner = self._owners.get(run_id, info.owner)
                    if may_access(info.owner):
                        out.runs.append(info)
        return out

    async def snapshot(self, request: pb.SnapshotRequest) -> pb.SnapshotInfo:
        raise ConfigError("workspace snapshots are taken on a node: ask the node that owns the workspace")

    async def diff(self, request: pb.DiffRequest) -> pb.DiffResponse:
        raise ConfigError("workspace snapshots are taken on a node: ask the node that owns the workspace")

    async def rollback(self, request: pb.RollbackRequest) -> pb.RollbackResponse:
        raise ConfigError("workspace snapshots are taken on a node: ask the node that owns the workspace")

    async def drain(self, request: pb.DrainRequest) -> pb.DrainResponse:
        require_admin("Drain")
        raise ConfigError("drain a node of this controller with DrainNode (asm node drain --controller ... --node ...)")

    async def undrain(self, request: pb.UndrainRequest) -> pb.DrainResponse:
        require_admin("Undrain")
        raise ConfigError("undrain a node of this controller with UndrainNode "
                          "(asm node undrain --controller ... --node ...)")

    # -- ControllerService --------------------------------------------------------------

    async def list_nodes(self, request: pb.ListNodesRequest) -> pb.ListNodesResponse:
        out = pb.ListNodesResponse()
        health = self.session.pool.health
        for t in self.targets:
            status = pb.NodeStatus(address=t.address, health=health.status(t.key))
            handle = self.session.pool.get(t.key)
            info: pb.HandshakeResponse | None = None
            if handle is None:
                try:
                    try:
                        handle = await self.session.pool.handle(t)
                    except NodeNotReady:
                        # A draining node the controller meets first now: a state to show, not an error.
                        info = await self._bare_handshake(t)
                except AsmError as err:
                    status.state, status.up = "unknown", False
                    status.error.CopyFrom(error_info(err))
                    out.nodes.append(status)
                    continue
            if info is None:
                assert handle is not None
                info = handle.info
            if handle is None:
                status.node_id, status.epoch, status.agent_version = info.node_id, info.boot_epoch, info.agent_version
                status.up, status.state = True, pb.NodeState.Name(info.state).removeprefix("NODE_STATE_").lower()
                status.active_runs, status.max_runs = info.load.active_runs, info.limits.max_runs
                status.drain_deadline_unix_nano = info.drain_deadline_unix_nano
                status.providers.extend(info.providers)
                status.labels.update(info.labels)
                out.nodes.append(status)
                continue
            status.node_id, status.epoch, status.agent_version = info.node_id, info.boot_epoch, info.agent_version
            status.up = handle.state != "lost"
            status.state = "lost" if handle.state == "lost" else \
                pb.NodeState.Name(info.state).removeprefix("NODE_STATE_").lower()
            status.heartbeat_age_ms = int(handle.heartbeat_age_s * 1000)
            status.drain_deadline_unix_nano = info.drain_deadline_unix_nano
            status.active_runs, status.max_runs = info.load.active_runs, info.limits.max_runs
            status.providers.extend(info.providers)
            status.labels.update(info.labels)
            out.nodes.append(status)
        return out

    async def drain_node(self, request: pb.DrainNodeRequest) -> pb.DrainResponse:
        require_admin("DrainNode")
        target = next((t for t in self.targets if t.address == request.address), None)
        if target is None:
            raise make_error("unknown", "runtime", f"{request.address} is not a node of this controller")
        try:
            handle = await self.session.pool.handle(target)
        except NodeNotReady:
            # Already draining (first contact): Drain answers its current state, as a node does.
            client = GrpcNodeClient(target)
            try:
                return await client.drain(pb.DrainRequest(deadline_ms=request.deadline_ms))
            finally:
                await client.close()
        resp = await handle.api.drain(pb.DrainRequest(deadline_ms=request.deadline_ms))
        with contextlib.suppress(AsmError):
            await handle.heartbeat(2.0)  # routing sees "draining" at once
        return resp

    async def _bare_handshake(self, target: RemoteNode) -> pb.HandshakeResponse:
        """A handshake without connect()'s readiness check; a failure is the node's error, as in ListNodes."""
        client = GrpcNodeClient(target)
        try:
            return await client.handshake(
                pb.HandshakeRequest(controller_version=__version__, protocol_version=PROTOCOL_VERSION),
                timeout=target.connect_timeout_s)
        finally:
            await client.close()

    async def undrain_node(self, request: pb.UndrainNodeRequest) -> pb.DrainResponse:
        require_admin("UndrainNode")
        target = next((t for t in self.targets if t.address == request.address), None)
        if target is None:
            raise make_error("unknown", "runtime", f"{request.address} is not a node of this controller")
        handle = self.session.pool.get(target.key)
        if handle is None:
            # First contact with a draining node: connect() refuses a node that is not ready, so
            # undrain it over a bare client, then connect as usual.
            client = GrpcNodeClient(target)
            try:
                resp = await client.undrain(pb.UndrainRequest())
            finally:
                await client.close()
            with contextlib.suppress(AsmError):
                await self.session.pool.handle(target)
            return resp
        resp = await handle.api.undrain(pb.UndrainRequest())
        with contextlib.suppress(AsmError):
            await handle.heartbeat(2.0)  # routing sees "ready" at once
        return resp


def controller_service_handler(api: FleetApi) -> grpc.GenericRpcHandler:
    u = unary_method  # an undecodable request is INVALID_ARGUMENT, not UNKNOWN with a traceback
    return grpc.method_handlers_generic_handler(CONTROLLER_SERVICE, {
        "ListNodes": u("ListNodes", unary(api.list_nodes), pb.ListNodesRequest, pb.ListNodesResponse.SerializeToString),
        "DrainNode": u("DrainNode", unary(api.drain_node), pb.DrainNodeRequest, pb.DrainResponse.SerializeToString),
        "UndrainNode": u("UndrainNode", unary(api.undrain_node), pb.UndrainNodeRequest,
                         pb.DrainResponse.SerializeToString),
    })


class ControllerServer:
    def __init__(self, api: FleetApi, server: grpc.aio.Server, port: int, metrics_port: int | None) -> None:
        self.api = api
        self.server = server
        self.port = port
        self.metrics_port = metrics_port
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_http: Any = None

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.server.stop(grace=1.0)
        await self.api.session.stop(timeout=5.0)
        if self._metrics_http is not None:
            self._metrics_http[0].shutdown()


async def _node_addresses(config: ControllerConfig) -> list[str]:
    addrs = list(config.nodes)
    if config.nodes_file is not None:
        addrs += read_nodes_file(config.nodes_file)
    if config.nodes_dns:
        try:
            addrs += await resolve_dns(config.nodes_dns)
        except AsmError as err:
            log.warning("%s", err.message)
    return list(dict.fromkeys(addrs))


async def start_controller(config: ControllerConfig, metrics: ControllerMetrics | None = None) -> ControllerServer:
    if not (config.nodes or config.nodes_file or config.nodes_dns):
        raise ConfigError("a controller needs nodes: --node HOST:PORT, --nodes-file F or --nodes-dns NAME:PORT")
    for addr in config.nodes:
        parse_address(addr)
    # A tokens file's tokens are held to the 16-byte minimum when it is read.
    check_exposure(config.listen, token=config.token or (config.tokens_file is not None),
                   tls_cert=config.tls_cert is not None, tls_ca=config.tls_ca is not None, insecure=config.insecure,
                   metrics_listen=config.metrics_listen, metrics_insecure=config.metrics_insecure)
    tokens = load_tokens(config.token, config.tokens_file)
    creds = server_credentials(config.tls_cert, config.tls_key, config.tls_ca)
    metrics = metrics or ControllerMetrics()
    metrics.expect_providers(config.expected_providers)
    api = FleetApi(config, metrics)
    api.set_nodes(await _node_addresses(config))
    interceptors = []
    if tokens is not None or config.tls_ca is not None:
        interceptors.append(TokenAuthInterceptor(tokens, client_certs=config.tls_ca is not None,
                                                 admins=config.admin_principals))
    server = new_server(interceptors, config.limits)
    server.add_generic_rpc_handlers((node_service_handler(api), controller_service_handler(api)))
    health = add_health_and_reflection(server, [NODE_SERVICE, CONTROLLER_SERVICE])
    port = bind(server, config.listen, creds)
    metrics_http, metrics_port = None, None
    if config.metrics_listen:
        metrics_http, metrics_port = start_metrics_http(config.metrics_listen, metrics.registry)
    await server.start()
    await api.refresh()
    await set_serving(health, [NODE_SERVICE, CONTROLLER_SERVICE], True)
    ctl = ControllerServer(api, server, port, metrics_port)
    ctl._metrics_http = metrics_http
    if config.nodes_dns or config.nodes_file:
        ctl._tasks.append(asyncio.create_task(_rediscover(config, api)))
    return ctl


async def _rediscover(config: ControllerConfig, api: FleetApi) -> None:
    """Re-resolve the DNS name (and re-read the file): pods come and go."""
    while True:
        await asyncio.sleep(config.dns_interval_s)
        try:
            addrs = await _node_addresses(config)
        except AsmError as err:
            log.warning("node discovery failed: %s", err.message)
            continue
        if addrs != [t.address for t in api.targets]:
            log.info("fleet is now: %s", ", ".join(addrs) or "(empty)")
            api.set_nodes(addrs)
            await api.refresh()


async def serve_controller(config: ControllerConfig, on_ready: Callable[[ControllerServer], None] | None = None) -> None:
    await run_until_signal(await start_controller(config), on_ready)
