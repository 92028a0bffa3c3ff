"""``asm controller serve``: a long-running controller in front of a fleet of nodes.

To its clients the controller *is* a node: it serves the same NodeService
(start, attach, interrupt, approve, ...) and routes each run to a node of its
fleet, with the session runtime's admission, health, failover, re-attachment
and node-loss handling. ``asm run --controller HOST:PORT`` is therefore just a
remote node run. ControllerService adds the fleet view (ListNodes) and
DrainNode (admin only). Clients are principals (named tokens, or client
certificates) as on a node: each sees and touches only the runs it started
here. Every run is recorded in the controller's run registry (``--state``:
SQLite by default, PostgreSQL, or memory) before StartRun leaves for a node;
a restarted controller reloads it, re-attaches the runs still in flight on
their nodes and keeps its boot epoch, so its clients reconnect instead of
losing their runs. Nodes come from ``--node`` flags, a file, or a DNS name that
resolves to many addresses (a Kubernetes headless Service), re-resolved
periodically. Metrics (``asm_controller_*``), health checking and reflection
are served too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from asm_controller._client import GrpcNodeClient, LivenessConfig, RemoteNode, TLSConfig
from asm_controller._connector import NodeHandle
from asm_controller._events import Event
from asm_controller._fleetqueue import FleetQueue
from asm_controller._history import (
    check_filter,
    decode_page_token,
    encode_page_token,
    session_info,
    time_range,
)
from asm_controller._lease import LeaseKeeper
from asm_controller._metrics import ControllerMetrics
from asm_controller._registry import StoreRegistry, decode_chunks
from asm_controller._routing import eligible
from asm_controller._run import Run
from asm_controller._session import Session
from asm_controller._store import (
    DEFAULT_HISTORY_MAX_BYTES,
    IN_FLIGHT,
    STATUSES,
    Lease,
    LeaseLost,
    MemoryStore,
    RunRecord,
    RunStore,
    StoreWriter,
    open_store,
)
from asm_controller._wire import take as take_wire
from asm_wire import (
    CONTROLLER_CAPABILITIES,
    PROTOCOL_VERSION,
    TERMINAL_STATUSES,
    AsmError,
    ConfigError,
    NodeNotFound,
    NodeNotReady,
    NodeUnreachable,
    ReplayGap,
    RunNotFound,
    RunStatus,
    StoreError,
    __version__,
    error_info,
    make_error,
    node_state_name,
    parse_address,
    pb,
    run_status_value,
    valid_id,
)
from asm_wire._gc import SERVING_YOUNG, settle_heap
from asm_wire._options import parse_options_json
from asm_wire._principal import check_owner, current_principal, load_tokens, require_admin
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
    strategy: str = "least_loaded"  # asm_wire.Strategy; the library Session keeps "priority"
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    max_concurrent_runs: int = 1000
    expected_providers: list[str] = field(default_factory=list)  # always alerted on (--expect-provider)
    # Connection/stream/RPC caps and handshake timeout. Every run routed through the controller holds
    # one of its RPCs: the RPC cap stays well above max_concurrent_runs, or health probes would be refused.
    limits: ServerLimits = field(default_factory=lambda: ServerLimits(max_concurrent_rpcs=4_000))
    #: The run registry: "memory:" (forgotten on exit), "sqlite:///PATH" (the CLI's default, under
    #: --state-dir) or "postgresql://...". See asm_controller._store.
    state: str = "memory:"
    #: Ended runs (and their event logs) are pruned from the registry after this long.
    state_max_age_s: float = 7 * 86400.0
    #: Per-run bound of the registry's event log (older events are dropped; a re-attach before them
    #: gets replay_gap).
    history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES
    #: Total bytes of ended runs' event logs kept (the oldest logs go first; their records stay).
    log_retention_bytes: int = 2**30
    #: This replica's id in a shared store (default: random per process). A stable one (a StatefulSet
    #: pod name) takes its own runs back at once after a restart instead of waiting for the lease TTL.
    replica_id: str | None = None
    #: The address clients reach this replica at (shown to the others); default: listen.
    advertise: str | None = None
    #: A run's lease expires this long after its replica's last renewal (renewed every third of it).
    lease_ttl_s: float = 10.0
    #: Runs waiting in the fleet queue (every node full), fleet-wide; 0 = no queue (at_capacity at once).
    max_queued: int = 10_000
    #: Serve the HTTP API (REST/SSE, asm_controller.http) here too: same tokens, TLS and exposure rule.
    http_listen: str | None = None
    #: Provider options every chat completion of that provider gets (a chat request names only the model):
    #: {"codex": {"skip_git_repo_check": True}} (--completion-option codex:skip_git_repo_check=true).
    completion_options: dict[str, dict[str, Any]] = field(default_factory=dict)


#: How often expired inference endpoint leases are removed from the store (seconds).
ENDPOINT_SWEEP_S = 60.0

#: How long an interrupt of a run placed on a node waits for the node to know it (its StartRun on the way).
INTERRUPT_WAIT_S = 10.0
#: How long a run taken over as placed (pending, no events) is re-attached while its node does not know it.
ATTACH_NOT_FOUND_GRACE_S = 5.0

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
        raise NodeUnreachable(f"cannot resolve {host}: {exc}") from None
    addrs = sorted({(str(i[4][0]), int(i[4][1])) for i in infos})
    return [f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in addrs]


def new_epoch() -> str:
    return f"controller-{int(time.time() * 1000)}"


def new_replica_id() -> str:
    return f"{socket.gethostname()[:40]}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def _store_edge() -> Iterator[None]:
    """An unreachable store is this replica's trouble, not the run's: UNAVAILABLE (the client's next
    address answers), never INTERNAL."""
    try:
        yield
    except StoreError as err:
        if err.reason != "store_unavailable":
            raise
        raise NodeNotReady(f"this controller replica cannot reach its run store ({err.message}); try another "
                           "replica", reason="store_unreachable") from None


#: A StartRun selector's bounds (a client's field: hostile until checked).
_SELECTOR_MAX_PAIRS, _SELECTOR_MAX_CHARS = 32, 256


def _check_selector(selector: Mapping[str, str]) -> dict[str, str]:
    """A client's node selector, bounded: config_invalid (reason invalid_selector) past the bounds."""
    if len(selector) > _SELECTOR_MAX_PAIRS:
        raise ConfigError(f"a selector has at most {_SELECTOR_MAX_PAIRS} label pairs, not {len(selector)}",
                          reason="invalid_selector")
    for key, value in selector.items():
        if not key or len(key) > _SELECTOR_MAX_CHARS or len(value) > _SELECTOR_MAX_CHARS or "\x00" in key + value:
            raise ConfigError(f"selector label {key[:40]!r}: keys are 1-{_SELECTOR_MAX_CHARS} characters, values "
                              f"at most {_SELECTOR_MAX_CHARS}, no NUL", reason="invalid_selector")
    return dict(selector)


def _moved(run_id: str) -> AsmError:
    # UNAVAILABLE: the client re-attaches (to this replica or the next address) and is served from the store.
    return NodeNotReady(f"run {run_id} is now followed by another controller replica; re-attach",
                        reason="lease_lost")


def _not_found(run_id: str) -> AsmError:
    return RunNotFound(f"Unknown run id: {run_id}")


#: ListRuns' status filter: the CLI's names -> the registry's (its "pending" is the wire's "starting"; the
#: wire's other statuses share their names).
_STATUS_NAMES = {"pending": "pending", RunStatus.STARTING.value: "pending",
                 **{s.value: s.value for s in RunStatus if s not in (RunStatus.UNSPECIFIED, RunStatus.STARTING)}}
#: The registry's statuses on the wire: its "pending" is the wire's "starting"; the others share their names.
_RUN_STATUS = {name: run_status_value(RunStatus.STARTING if name == "pending" else name) for name in STATUSES}


def run_info(rec: RunRecord) -> pb.RunInfo:
    """A registry record as the wire's RunInfo (queue_position is the caller's: it needs the store)."""
    info = pb.RunInfo(run_id=rec.run_id, session_id=rec.session_id, provider=rec.provider,
                      status=_RUN_STATUS.get(rec.status, pb.RUN_STATUS_UNSPECIFIED), last_seq=rec.last_seq,
                      first_held_seq=rec.first_held_seq, owner=rec.owner, cwd=str(rec.spec.get("cwd", "")),
                      started_unix_nano=int(rec.created_at * 1e9),
                      finished_unix_nano=int(rec.ended_at * 1e9) if rec.ended_at else 0)
    info.node = rec.node_address
    exit_code = (rec.result or {}).get("exit_code")
    if isinstance(exit_code, int):
        info.exit_code = exit_code
    # Store v2's fields, read with defaults so this works on a v1 record too.
    priority = getattr(rec, "priority", 0)
    if isinstance(priority, int):
        info.priority = priority
    queued_at = getattr(rec, "queued_at", None)
    if isinstance(queued_at, int | float) and queued_at > 0:
        info.queued_unix_nano = int(queued_at * 1e9)
    info.replica = str(getattr(rec, "lease_owner", "") or "")
    if rec.result is not None:
        info.result_json = json.dumps(rec.result, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return info


def batched(events: Sequence[pb.Event], max_bytes: int = 1 << 20, max_events: int = 512) -> list[pb.EventBatch]:
    """Events as batches well inside gRPC's message limit (always at least one batch)."""
    out: list[pb.EventBatch] = [pb.EventBatch()]
    size = 0
    for m in events:
        n = m.ByteSize()
        if out[-1].events and (size + n > max_bytes or len(out[-1].events) >= max_events):
            out.append(pb.EventBatch())
            size = 0
        out[-1].events.append(m)
        size += n
    return out


def end_after(events: Sequence[pb.Event], cursor: int) -> list[pb.Event]:
    """A finished run's events after ``cursor``; when the client has seen further than the log (its end
    was numbered before the client's cursor), the terminal error/run_completed renumbered after it."""
    out = [m for m in events if m.seq > cursor]
    if any(m.kind == pb.EVENT_KIND_RUN_COMPLETED for m in out) or not events:
        return out
    end = [m for m in events[-2:] if m.kind in (pb.EVENT_KIND_ERROR, pb.EVENT_KIND_RUN_COMPLETED)]
    renumbered = []
    for i, m in enumerate(end, start=1):
        c = pb.Event.FromString(m.SerializeToString())
        c.seq, c.id = cursor + i, f"{c.run_id}:{cursor + i}"
        renumbered.append(c)
    return renumbered


class FleetApi:
    """NodeService as the controller serves it: every run is routed through one Session over the fleet."""

    def __init__(self, config: ControllerConfig, metrics: ControllerMetrics, store: RunStore | None = None,
                 epoch: str | None = None) -> None:
        self.config = config
        self.epoch = epoch or new_epoch()
        metrics.set_strategy(config.strategy)
        self.store: RunStore = store if store is not None else MemoryStore(history_max_bytes=config.history_max_bytes)
        self.replica_id = config.replica_id or new_replica_id()
        # Its event data is the runs' EventBatch bytes: a busy run's chunks are written as few.
        writer = StoreWriter(self.store, on_skipped=self._write_skipped, coalesce_events=True)
        self.registry = StoreRegistry(self.store, writer, owner=self.replica_id, lease_ttl_s=config.lease_ttl_s)
        #: The registry outlives this process (SQLite, PostgreSQL): stopping detaches instead of interrupting.
        self.durable = False
        self.session = Session("shell", node=[], max_concurrent_runs=config.max_concurrent_runs,
                               max_queued_runs=0, strategy=config.strategy, metrics=metrics, preflight=True,
                               registry=self.registry)
        self.queue = FleetQueue(max_queued=config.max_queued, record=self.registry.queued, depth=self._queue_depth,
                                room=self._room, metrics=metrics, ended=self._ended_in_store)
        self.session.queue = self.queue
        self.keeper = LeaseKeeper(self.store, self, replica_id=self.replica_id,
                                  address=config.advertise or config.listen, ttl_s=config.lease_ttl_s, metrics=metrics)
        self._targets: dict[str, RemoteNode] = {}

    # -- leases (LeaseHost) and the fleet queue's collaborators -----------------------

    def leased_runs(self) -> list[Run]:
        return [r for r in self.session.runs() if r.lease is not None and r.state != "done"]

    def release(self, run: Run, why: str) -> None:
        self.session.release(run)

    def follows(self, run_id: str) -> bool:
        # A run that ended here while it was released (fenced: its store unreachable) follows nothing:
        # its live record is taken back (and its end recorded from its node) by the keeper's sweep.
        run = self.session.get_run(run_id)
        return run is not None and not (run.state == "done" and run.detaching)

    def _write_skipped(self, run_id: str, err: AsmError) -> None:
        """A write of a run was refused by the store: with LeaseLost another replica follows it now."""
        if isinstance(err, LeaseLost):
            run = self.session.get_run(run_id)
            if run is not None and run.state != "done":
                self.keeper.lost(run, err.message)

    async def take_over(self, rec: RunRecord, lease: Lease) -> None:
        """Follow a run whose lease this replica just took: re-attach it on its node, or queue it again."""
        known = self.session.get_run(rec.run_id)
        if known is not None and known.state != "done":
            # Ours already (its lease had expired: a long pause): it writes with the new token from now on.
            known.lease, known.lease_at = lease, time.monotonic()
            return
        if rec.status in TERMINAL_STATUSES:
            return  # ended meanwhile (``rec`` is read after the lease was taken): nothing to follow
        if known is not None:
            # Done here but still live in the store (its end was not recorded, or not with the lease it
            # had): holding the lease while following nothing would keep it live forever. The record
            # is followed again, from its node, like any other replica's.
            self.session.release(known)
        if rec.status == "queued":
            if rec.spec.get("env_keys"):
                await self._end_unplaced(rec, lease=lease, code="runtime", reason="env_unavailable", why=(
                    f"was queued with environment variables ({', '.join(rec.spec['env_keys'])}), which are never "
                    "stored: it cannot be started by another controller; submit it again"))
                return
            run = self.session.requeue(rec)
        elif not rec.node_address:
            await self._end_unplaced(rec, lease=lease)
            return
        else:
            try:
                parse_address(rec.node_address)
                events = decode_chunks(await self.store.events_after(rec.run_id, 0))
                run = self.session.adopt(rec, self._target(rec.node_address), events)
                if rec.status == "pending" and not events:
                    # Placed, not known to have started: the old owner's StartRun may not have reached the
                    # node yet (a replica paused past its lease, resumed just before it was taken).
                    run.not_found_grace_until = time.monotonic() + ATTACH_NOT_FOUND_GRACE_S
            except LeaseLost:
                raise
            except AsmError as err:
                await self._end_unplaced(rec, f"cannot be re-attached: {err.message}", lease=lease)
                return
        run.lease, run.lease_at = lease, time.monotonic()  # before its driver first runs (next loop turn)
        if self.session.metrics is not None:
            self.session.metrics.recovered.inc()

    async def _queue_depth(self) -> int:
        return (await self.store.queue_stats())[0]

    def _room(self) -> bool:
        """Does some node report room (its last heartbeat)? The fleet queue then tries its head."""
        for h in self.session.pool.handles():
            info = h.info
            if h.state != "lost" and info.state == pb.NODE_STATE_READY and (
                    not info.limits.max_runs or info.load.active_runs < info.limits.max_runs):
                return True
        return False

    async def _ended_in_store(self, ids: list[str]) -> set[str]:
        """Which of these waiting runs have ended in the store (whoever ended them), or are gone from it.

        One read of this replica's queued runs answers for most; the others (a lease another replica
        took, a refused try still pending, a waiting resume) are read one by one, and only an end
        counts: a moved lease is the LeaseKeeper's to release, never an end to give the client.
        """
        queued = await self.store.queued(limit=self.config.max_queued + len(ids), lease_owner=self.replica_id)
        here = {r.run_id for r in queued}
        ended: set[str] = set()
        for rid in ids:
            if rid in here:
                continue
            rec = await self.store.get(rid)
            if rec is None or rec.status in TERMINAL_STATUSES:
                ended.add(rid)
        return ended

    def _target(self, addr: str) -> RemoteNode:
        target = self._targets.get(addr)
        if target is None:
            target = RemoteNode(addr, token=self.config.node_token, tls=self.config.node_tls,
                                liveness=self.config.liveness)
            self._targets[addr] = target
        return target

    def set_nodes(self, addresses: Sequence[str]) -> None:
        self.session.defaults = replace(self.session.defaults, node=[self._target(a) for a in addresses])

    async def recover(self, *, exclusive: bool = True) -> int:
        """Join the store and take over the runs this replica should follow; returns how many.

        ``exclusive`` (SQLite, memory: this is the store's only controller): every run in flight or
        queued, re-attached on the node that owns it or queued again. Otherwise (PostgreSQL, replicas)
        this replica's own earlier leases and every expired one; the lease keeper takes later ones.
        A run recorded but never placed on a node (the controller died before StartRun left)
        never ran anywhere: it is ended as failed (run_lost), never started now.
        """
        taken = await self.keeper.start(exclusive=exclusive)
        if taken:
            log.info("took over %d run(s) from %s", taken, self.store.url)
        return taken

    async def _end_unplaced(self, rec: RunRecord, why: str = "", *, lease: Lease | None = None,
                            code: str = "run_lost", status: RunStatus = RunStatus.FAILED,
                            expect_status: str | None = None, reason: str = "") -> None:
        """Record the end of a run that never started (or cannot be followed again), with its final events."""
        message = (f"the controller restarted before run {rec.run_id} was sent to a node; it never ran"
                   if not why else f"run {rec.run_id} {why}")
        common = {"run_id": rec.run_id, "session_id": rec.session_id, "provider": rec.provider}
        end = [Event.synthetic("error", **common, seq=rec.last_seq + 1, message=message, code=code,
                               domain="runtime", severity=pb.SEVERITY_ERROR, exit_code=-1),
               Event.synthetic("run_completed", **common, seq=rec.last_seq + 2, status=status.value,
                               exit_code=-1)]
        if reason:
            end[0].pb.metadata["reason"] = reason
        batch = pb.EventBatch(events=[e.pb for e in end]).SerializeToString()
        result = {"kind": "result_summary", "run_id": rec.run_id, "session_id": rec.session_id,
                  "provider": rec.provider, "status": status.value,
                  "error": {"kind": code, "domain": "runtime", "message": message, **({"reason": reason} if reason else {})}}
        # The status and the log's end in one transaction: a reader that sees the ended status finds the
        # end in the log, a crash never leaves one without the other, and when the compare-and-set
        # (expect_status) fails the events never land in the log of a run its owner placed meanwhile.
        await self.store.end_run(rec.run_id, rec.last_seq + 1, rec.last_seq + 2, batch, fence=lease,
                                 expect_status=expect_status, status=status.value, ended_at=time.time(),
                                 prompt="", result=result)

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
            agent_version=__version__, protocol_version=PROTOCOL_VERSION,
            capabilities=[c.value for c in CONTROLLER_CAPABILITIES],
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
        text = f"no node of this controller can take a {request.provider} run ({'; '.join(reasons) or 'no nodes'})"
        if reasons and all(r.endswith(f": no {request.provider} CLI") for r in reasons):
            # The provider's CLI is missing everywhere: the same cli_not_found a run gets (issue 14).
            err = make_error("cli_not_found", "provider", text, reason="provider_missing")
        else:
            err = make_error("connection_failed", "transport", text, reason="no_eligible_node")
        return pb.PreflightResponse(ok=False, error=error_info(err))

    async def _record(self, run_id: str) -> RunRecord | None:
        """The registry's record of a run, after the caller's ownership is checked (PermissionDenied)."""
        # An id no run can have is held by no registry either: not_found, like a node answers it.
        with _store_edge():
            rec = await self.store.get(run_id) if valid_id(run_id) else None
        if rec is not None and rec.owner:
            check_owner(rec.owner, f"run {run_id}")
        return rec

    async def _check_run(self, run_id: str) -> tuple[Run | None, RunRecord | None]:
        """The live run and/or its record; PermissionDenied for another principal's run (admins may use every
        run); a run neither knows is not_found."""
        run = self.session.get_run(run_id)
        if run is not None:
            if run.owner:
                check_owner(run.owner, f"run {run_id}")
            return run, None
        rec = await self._record(run_id)
        if rec is None:
            raise _not_found(run_id)
        return None, rec

    async def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        """A new run id starts a run (recorded first); a known one (live, or in the registry: also after a
        restart, also when it has ended) attaches to it -- never a second execution."""
        async with contextlib.aclosing(self._start_run(request, frames=False)) as batches:
            async for batch in batches:
                assert isinstance(batch, pb.EventBatch)
                yield batch

    def start_run_frames(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch | bytes]:
        """:meth:`start_run` for the gRPC server: a node's batch the run passed on unchanged is relayed
        as the bytes it came in (asm_controller._wire), not encoded again."""
        return self._start_run(request, frames=True)

    async def _start_run(self, request: pb.StartRunRequest, *, frames: bool) -> AsyncGenerator[pb.EventBatch | bytes, None]:
        run = self.session.get_run(request.run_id)
        known = run is not None or await self._record(request.run_id) is not None
        if run is not None and run.owner:
            check_owner(run.owner, f"run {request.run_id}")
        if known or self.session.get_run(request.run_id) is not None:
            async for batch in self._attach_run(pb.AttachRunRequest(run_id=request.run_id, after_seq=request.after_seq),
                                                frames=frames):
                yield batch
            return
        if not self.keeper.healthy:
            raise NodeNotReady("this controller replica cannot reach its run store: it takes no runs now "
                               "(try another replica)", reason="store_unreachable")
        options = parse_options_json(request.options_json)  # a bounded JSON object, like a node checks
        overrides: dict[str, Any] = {
            "run_id": request.run_id, "provider": request.provider, "cwd": request.cwd,
            "permission_mode": request.permission_mode or "default", "options": options, "env": dict(request.env),
            "owner": current_principal().name, "priority": request.priority, "session_id": request.session_id,
            "queue_timeout_ms": request.queue_timeout_ms,
        }
        if request.approval_timeout_ms:
            overrides["approval_timeout_ms"] = request.approval_timeout_ms
        if request.selector:
            overrides["selector"] = _check_selector(request.selector)
        stream = self.session.stream(request.prompt, **overrides)
        cursor = 0
        async for events in stream.batches():
            wire = getattr(events, "wire", None) if frames else None
            yield wire if wire is not None else pb.EventBatch(events=[ev.pb for ev in events])
            if events:
                cursor = events[-1].pb.seq
        released = self.session.get_run(request.run_id)
        if (released is None or released.detaching) and stream.result is not None and stream.result.status not in TERMINAL_STATUSES:
            # Not this replica's any more: ended through another one (its end is in the store), or
            # followed there (the client re-attaches; this replica may have lost its store).
            with contextlib.suppress(AsmError):
                rec = await self.store.get(request.run_id)
                if rec is not None and rec.status in TERMINAL_STATUSES:
                    async for logged in self._follow_record(rec, cursor, frames=frames):
                        yield logged
                    return
            raise _moved(request.run_id)

    async def attach_run(self, request: pb.AttachRunRequest) -> AsyncIterator[pb.EventBatch]:
        """Follow a run from ``after_seq``: the node's stream while the controller's run goes on, and
        the controller's own end once it has ended (node_lost, failed, completed) -- so a client
        never waits on a node this controller has given up on. A run this controller no longer
        follows (ended, or forgotten by the session) is answered from the registry's event log."""
        async with contextlib.aclosing(self._attach_run(request, frames=False)) as batches:
            async for batch in batches:
                assert isinstance(batch, pb.EventBatch)
                yield batch

    def attach_run_frames(self, request: pb.AttachRunRequest) -> AsyncIterator[pb.EventBatch | bytes]:
        """:meth:`attach_run` for the gRPC server: the node's batches relayed as the bytes they came in."""
        return self._attach_run(request, frames=True)

    async def _attach_run(self, request: pb.AttachRunRequest, *, frames: bool
                          ) -> AsyncGenerator[pb.EventBatch | bytes, None]:
        if request.after_seq >= _MAX_SEQ:  # no run gets there; renumbering past it would overflow uint64
            raise ConfigError(f"after_seq {request.after_seq} is past any run's events (at most {_MAX_SEQ - 1})")
        run, rec = await self._check_run(request.run_id)
        cursor = request.after_seq
        if run is None:
            assert rec is not None
            async for logged in self._follow_record(rec, cursor, frames=frames):
                yield logged
            return
        if run.detaching and run.state == "done" and not run.reducer.finished:
            async for logged in self._follow_record(await self._must_record(run.run_id), cursor, frames=frames):
                yield logged
            return
        if not run.bound.is_set() and run.state != "done":
            # Being admitted (perhaps waiting in the fleet queue), or a recovered run re-attaching on its
            # node: until its node has answered, the node may not know it yet. Its end comes either way (a
            # recovered run that cannot re-attach ends node_lost), and the client may hang up meanwhile.
            waits = [asyncio.ensure_future(run.bound.wait()), asyncio.ensure_future(run.done.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        if run.state == "done" or run.handle is None:
            for done_batch in await self._ended(run, cursor):
                yield done_batch
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
                wire = take_wire(batch)  # taken either way: the table holds only batches not yet relayed
                if batch.events:
                    cursor = max(cursor, batch.events[-1].seq)
                yield wire if frames and wire is not None else batch
                if any(m.kind == pb.EVENT_KIND_RUN_COMPLETED for m in batch.events):
                    return
            for end_batch in await self._ended(run, cursor):
                if end_batch.events:
                    yield end_batch
        finally:
            ended.cancel()
            with contextlib.suppress(Exception):
                await node_stream.aclose()  # type: ignore[attr-defined]

    async def _must_record(self, run_id: str) -> RunRecord:
        with _store_edge():
            rec = await self.store.get(run_id)
        if rec is None:
            raise _not_found(run_id)
        return rec

    async def _follow_record(self, rec: RunRecord, cursor: int, *, frames: bool = False
                             ) -> AsyncIterator[pb.EventBatch | bytes]:
        """A run another replica follows (or none yet, its lease expiring): its events from the store's log
        as its owner writes them, to its end. Taken over here meanwhile: followed here from the cursor."""
        delay, settle = 0.02, 0
        while True:
            local = self.session.get_run(rec.run_id)
            if local is not None and not local.detaching:
                async for batch in self._attach_run(pb.AttachRunRequest(run_id=rec.run_id, after_seq=cursor),
                                                    frames=frames):
                    yield batch
                return
            if rec.status in TERMINAL_STATUSES:
                with _store_edge():
                    end = await self._logged_end(rec, cursor)
                ended = any(m.kind == pb.EVENT_KIND_RUN_COMPLETED for b in end for m in b.events)
                if ended or settle >= 20:  # its end is written right after its status (bounded wait)
                    for batch in end:
                        yield batch
                    return
                settle += 1
            else:
                if cursor + 1 < rec.first_held_seq:
                    raise ReplayGap(f"events {cursor + 1}..{rec.first_held_seq - 1} of run {rec.run_id} are no "
                                    f"longer held by the controller (held: {rec.first_held_seq}..{rec.last_seq})")
                with _store_edge():
                    fresh = decode_chunks(await self.store.events_after(rec.run_id, cursor), cursor)
                if fresh:
                    for batch in batched(fresh):
                        yield batch
                    cursor = fresh[-1].seq
                    if fresh[-1].kind == pb.EVENT_KIND_RUN_COMPLETED:
                        return
                    delay = 0.02
                    rec = await self._must_record(rec.run_id)
                    continue
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)
            rec = await self._must_record(rec.run_id)

    async def _node_of(self, rec: RunRecord) -> NodeHandle:
        """The node a run of another replica is on (for an interrupt, an approval or input sent here)."""
        if rec.status not in IN_FLIGHT or not rec.node_address:
            raise make_error("config_invalid", "runtime", f"run {rec.run_id} is not running",
                             reason="run_not_running")
        return await self.session.pool.handle(self._target(rec.node_address))

    async def _interrupt_record(self, rec: RunRecord) -> bool:
        """Interrupt a run this replica does not follow: a queued one ends here (compare-and-set on its
        status: its owner then drops it), a placed one is interrupted on its node (its owner sees the end).

        A run placed a moment ago may not be on its node yet (its StartRun is on the way: the node
        answers not_found): the interrupt is tried again, the record read again each time (it may have
        started, ended or moved), for at most INTERRUPT_WAIT_S."""
        deadline, delay = time.monotonic() + INTERRUPT_WAIT_S, 0.02
        while True:
            if rec.status in TERMINAL_STATUSES:
                return False
            if rec.status == "queued":
                try:
                    await self._end_unplaced(rec, "was interrupted while queued", code="user_cancelled",
                                             status=RunStatus.INTERRUPTED, expect_status="queued")
                    return True
                except LeaseLost:
                    rec = await self._must_record(rec.run_id)  # placed meanwhile: interrupt it on its node
                    if rec.status in TERMINAL_STATUSES:
                        return False
            handle = await self._node_of(rec)
            try:
                resp = await handle.api.interrupt_run(pb.InterruptRunRequest(run_id=rec.node_run_id or rec.run_id))
                return resp.accepted
            except RunNotFound:
                if rec.status != "pending" or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)
            local = self.session.get_run(rec.run_id)
            if local is not None and not local.detaching:  # taken over here meanwhile
                await self.session.interrupt(rec.run_id)
                return True
            rec = await self._must_record(rec.run_id)

    async def _ended(self, run: Run, cursor: int) -> list[pb.EventBatch]:
        """An ended run's events after ``cursor``: from the registry's log (a gap is typed), else its tail."""
        if run.recorded:
            await self.registry.flush()  # its end is in the log now
            rec = await self.store.get(run.run_id)
            if rec is not None and rec.status in TERMINAL_STATUSES:
                return await self._logged_end(rec, cursor)
        return [pb.EventBatch(events=run.final_events(cursor))]

    async def _logged_end(self, rec: RunRecord, cursor: int) -> list[pb.EventBatch]:
        """A run from the registry: its logged events after ``cursor`` (an ended run's end always)."""
        if rec.status not in TERMINAL_STATUSES:
            # In flight but not followed here (it could not be recovered yet): the client retries.
            raise NodeNotReady(f"run {rec.run_id} is being recovered; try again")
        if cursor + 1 < rec.first_held_seq:
            # As a node says it (same kind and reason): the client's code handles one gap.
            raise ReplayGap(f"events {cursor + 1}..{rec.first_held_seq - 1} of run "
                            f"{rec.run_id} are no longer held by the controller (its history keeps "
                            f"{self.config.history_max_bytes} bytes per run; held: "
                            f"{rec.first_held_seq}..{rec.last_seq})")
        chunks = await self.store.events_after(rec.run_id, cursor)
        if not chunks:  # the client has seen past the log's end: its last events, to renumber the end
            chunks = await self.store.events_after(rec.run_id, max(0, rec.last_seq - 2))
        return batched(end_after(decode_chunks(chunks), cursor))

    async def interrupt_run(self, request: pb.InterruptRunRequest) -> pb.InterruptRunResponse:
        run, rec = await self._check_run(request.run_id)
        if run is None or run.detaching:
            rec = rec if rec is not None else await self._must_record(request.run_id)
            return pb.InterruptRunResponse(accepted=await self._interrupt_record(rec))
        await self.session.interrupt(request.run_id)
        return pb.InterruptRunResponse(accepted=True)

    async def resolve_approval(self, request: pb.ResolveApprovalRequest) -> pb.ResolveApprovalResponse:
        pending = self.session.approval_run(request.approval_id)  # approvals are keyed by id, not run
        if pending is not None:
            await self._check_run(pending.run_id)
        elif request.run_id and self.session.get_run(request.run_id) is None:
            # A run another replica follows: answered on its node (the owner sees approval_resolved).
            if request.decision not in ("allow", "deny"):
                raise ConfigError(f"invalid decision {request.decision!r}: expected 'allow' or 'deny'")
            _, rec = await self._check_run(request.run_id)
            assert rec is not None
            handle = await self._node_of(rec)
            return await handle.api.resolve_approval(pb.ResolveApprovalRequest(
                run_id=rec.node_run_id or rec.run_id, approval_id=request.approval_id, decision=request.decision,
                reason=request.reason))
        await self.session.approve(request.approval_id, request.decision, request.reason)
        return pb.ResolveApprovalResponse()

    async def send_input(self, request: pb.SendInputRequest) -> pb.SendInputResponse:
        run, rec = await self._check_run(request.run_id)
        if run is None and rec is not None:
            handle = await self._node_of(rec)
            return await handle.api.send_input(pb.SendInputRequest(
                run_id=rec.node_run_id or rec.run_id, data=request.data, end_input=request.end_input))
        if run is None or run.handle is None or run.state == "done":
            raise make_error("config_invalid", "runtime", f"run {request.run_id} is not running",
                             reason="run_not_running")
        return await run.handle.api.send_input(pb.SendInputRequest(run_id=run.node_run_id, data=request.data,
                                                                   end_input=request.end_input))

    async def get_run(self, request: pb.GetRunRequest) -> pb.RunInfo:
        run, rec = await self._check_run(request.run_id)
        if run is not None and run.handle is not None and run.state != "done":
            with contextlib.suppress(AsmError):
                info = await run.handle.api.get_run(pb.GetRunRequest(run_id=run.node_run_id))
                info.run_id = request.run_id
                info.owner = run.owner or info.owner
                info.node = run.handle.target.address
                info.priority = run.priority
                info.replica = self.replica_id if run.lease is not None else ""
                return info
        if rec is None:
            if run is not None and run.recorded:
                await self.registry.flush()  # its last writes (an end, a queue status) are queued behind it
            rec = await self.store.get(request.run_id)
        if rec is None:
            raise _not_found(request.run_id)
        info = run_info(rec)
        info.priority, info.replica = rec.priority, rec.lease_owner
        if rec.status == "queued":
            info.queue_position = await self.store.queue_position(rec.run_id) or 0
        return info

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        """The registry's runs, newest first, filtered and paged (keyset: ``next_page_token`` continues after
        this page's last run, stable while runs start); a non-admin sees only its own."""
        status = request.status.strip().lower()
        if status and status not in _STATUS_NAMES:
            raise ConfigError(f"unknown run status {request.status!r}: expected one of {', '.join(_STATUS_NAMES)}",
                              reason="invalid_status")
        since, until = time_range(request.since_unix_nano, request.until_unix_nano)
        before = decode_page_token("runs", request.page_token)
        me = current_principal()
        limit = request.limit or 1000
        # One more than asked: whether a next page exists, without a token that leads to an empty page.
        records = await self.store.list_runs(
            status=_STATUS_NAMES.get(status) if status else None, owner=None if me.admin else me.name,
            session_id=check_filter("session_id", request.session_id, 128, an_id=True),
            provider=check_filter("provider", request.provider, 64), node=check_filter("node", request.node, 512),
            since=since, until=until, before=before, limit=limit + 1)
        out = pb.ListRunsResponse()
        if len(records) > limit:
            records = records[:limit]
            out.next_page_token = encode_page_token("runs", records[-1].created_at, records[-1].run_id)
        position = getattr(self.store, "queue_position", None)
        for rec in records:
            if request.active_only and rec.status not in IN_FLIGHT and rec.status != "queued":
                continue
            info = run_info(rec)
            if rec.status == "queued" and position is not None:
                info.queue_position = await position(rec.run_id) or 0
            out.runs.append(info)
        return out

    async def list_provider_sessions(self, request: pb.ListProviderSessionsRequest
                                     ) -> pb.ListProviderSessionsResponse:
        """The resumable sessions a provider CLI keeps on the fleet's node ``request.node`` (asked there; admin
        only, as on a node: a host's CLI stores are nobody's in particular)."""
        require_admin("ListProviderSessions")
        if not request.node:
            raise ConfigError("ListProviderSessions on a controller needs node: the address of one of its nodes",
                              reason="node_required")
        target = next((t for t in self.targets if t.address == request.node), None)
        if target is None:
            raise NodeNotFound(f"{request.node[:200]} is not a node of this controller")
        # A bare client, as for a drain: a draining node still answers what it keeps.
        client = GrpcNodeClient(target)
        try:
            return await client.list_provider_sessions(
                pb.ListProviderSessionsRequest(provider=request.provider, limit=request.limit))
        finally:
            await client.close()

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
        out = pb.ListNodesResponse(strategy=self.session.pool.router.strategy)
        now = time.time()
        with contextlib.suppress(AsmError):  # the fleet view stays available while the store is not
            for rep in await self.store.replicas(now=now):
                out.replicas.append(pb.ReplicaStatus(
                    replica_id=rep.replica_id, address=rep.address, leases=rep.leases,
                    heartbeat_age_ms=max(0, int((now - rep.heartbeat_at) * 1000)), self=rep.replica_id == self.replica_id))
            out.queued_runs = (await self.store.queue_stats())[0]
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
                status.up, status.state = True, node_state_name(info.state)
                status.active_runs, status.max_runs = info.load.active_runs, info.limits.max_runs
                status.drain_deadline_unix_nano = info.drain_deadline_unix_nano
                status.providers.extend(info.providers)
                status.labels.update(info.labels)
                out.nodes.append(status)
                continue
            status.node_id, status.epoch, status.agent_version = info.node_id, info.boot_epoch, info.agent_version
            status.up = handle.state != "lost"
            status.state = "lost" if handle.state == "lost" else node_state_name(info.state)
            status.heartbeat_age_ms = int(handle.heartbeat_age_s * 1000)
            status.drain_deadline_unix_nano = info.drain_deadline_unix_nano
            status.active_runs, status.max_runs = info.load.active_runs, info.limits.max_runs
            status.providers.extend(info.providers)
            status.labels.update(info.labels)
            out.nodes.append(status)
        return out

    async def list_sessions(self, request: pb.ListSessionsRequest) -> pb.ListSessionsResponse:
        """The registry's sessions (its runs grouped by session id), latest activity first, paged like
        ListRuns; a non-admin sees only its own runs' sessions."""
        before = decode_page_token("sessions", request.page_token)
        me = current_principal()
        limit = request.limit or 100
        records = await self.store.sessions(
            owner=None if me.admin else me.name, provider=check_filter("provider", request.provider, 64),
            node=check_filter("node", request.node, 512), before=before, limit=limit + 1)
        out = pb.ListSessionsResponse()
        if len(records) > limit:
            records = records[:limit]
            out.next_page_token = encode_page_token("sessions", records[-1].last_at, records[-1].session_id)
        out.sessions.extend(session_info(rec) for rec in records)
        return out

    async def drain_node(self, request: pb.DrainNodeRequest) -> pb.DrainResponse:
        require_admin("DrainNode")
        target = next((t for t in self.targets if t.address == request.address), None)
        if target is None:
            raise NodeNotFound(f"{request.address} is not a node of this controller")
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
            raise NodeNotFound(f"{request.address} is not a node of this controller")
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
        "ListSessions": u("ListSessions", unary(api.list_sessions), pb.ListSessionsRequest,
                          pb.ListSessionsResponse.SerializeToString),
    })


class ControllerServer:
    def __init__(self, api: FleetApi, server: grpc.aio.Server, port: int, metrics_port: int | None) -> None:
        self.api = api
        self.server = server
        self.port = port
        self.metrics_port = metrics_port
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_http: Any = None
        self.http: Any = None  # asm_controller.http.HttpServer with --http-listen
        self.http_port: int | None = None
        self.endpoints: Any = None  # asm_controller.inference.EndpointPublisher with --http-listen

    async def stop(self) -> None:
        """Stop serving. With a durable registry the runs go on on their nodes (the next controller
        re-attaches them); with a memory one they are interrupted, as nothing could follow them again."""
        for t in self._tasks:
            t.cancel()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=1.0)
        held = [(r.run_id, r.lease) for r in self.api.leased_runs()]
        if self.api.durable:
            await self.api.session.detach(timeout=5.0)
        else:
            await self.api.session.stop(timeout=5.0)
        await self.api.queue.close()
        # Its leases are handed over at once (another replica takes its runs without waiting for the TTL).
        await self.api.keeper.stop(release=held if self.api.durable else ())
        with contextlib.suppress(Exception):
            await self.api.registry.writer.close()
        with contextlib.suppress(Exception):
            await self.api.store.close()
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


async def start_controller(config: ControllerConfig, metrics: ControllerMetrics | None = None, *,
                           http_routers: Sequence[Any] = ()) -> ControllerServer:
    """Serve the controller. ``http_routers`` (FastAPI APIRouters) are mounted on the HTTP API (--http-listen)."""
    if not (config.nodes or config.nodes_file or config.nodes_dns):
        raise ConfigError("a controller needs nodes: --node HOST:PORT, --nodes-file F or --nodes-dns NAME:PORT")
    for addr in config.nodes:
        parse_address(addr)
    # A tokens file's tokens are held to the 16-byte minimum when it is read.
    check_exposure(config.listen, token=config.token or (config.tokens_file is not None),
                   tls_cert=config.tls_cert is not None, tls_ca=config.tls_ca is not None, insecure=config.insecure,
                   metrics_listen=config.metrics_listen, metrics_insecure=config.metrics_insecure)
    if config.http_listen:
        # The HTTP API authenticates by bearer token only (no client-certificate principals over HTTP):
        # with mutual TLS alone every HTTP caller would be the admin "anonymous".
        if config.tls_ca is not None and not (config.token or config.tokens_file):
            raise ConfigError("--http-listen authenticates by bearer token: with --tls-ca give --token-file or "
                              "--tokens-file too (client-certificate principals are served over gRPC only)")
        check_exposure(config.http_listen, token=config.token or (config.tokens_file is not None),
                       tls_cert=config.tls_cert is not None, tls_ca=False, insecure=config.insecure)
    tokens = load_tokens(config.token, config.tokens_file)
    creds = server_credentials(config.tls_cert, config.tls_key, config.tls_ca)
    metrics = metrics or ControllerMetrics()
    metrics.expect_providers(config.expected_providers)
    store = open_store(config.state, history_max_bytes=config.history_max_bytes,
                       observe=metrics.observe_store)
    await store.open()
    try:
        await store.claim()  # SQLite: this controller alone; PostgreSQL: shared by replicas (leases)
        durable = not isinstance(store, MemoryStore)
        shared = store.url.startswith("postgresql")
        epoch = new_epoch()
        if durable:
            # The epoch lives with the registry: a restarted controller is the same controller to its
            # clients (they reconnect and re-attach), not a new one whose runs are gone.
            stored = await store.meta_get("controller_epoch")
            if stored is None:
                await store.meta_set("controller_epoch", epoch)
            else:
                epoch = stored
            pruned = await store.prune(time.time() - config.state_max_age_s, max_log_bytes=config.log_retention_bytes)
            if pruned:
                log.info("pruned %d ended run(s) older than %gs from %s", pruned, config.state_max_age_s, store.url)
        api = FleetApi(config, metrics, store, epoch)
        api.durable = durable
        api.set_nodes(await _node_addresses(config))
        await api.recover(exclusive=not shared)
    except BaseException:
        with contextlib.suppress(Exception):
            await store.close()
        raise
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
    if config.http_listen:
        from asm_controller.http import HttpServer, create_app, principal_of  # FastAPI: only when it is served
        from asm_controller.http._endpoints import build_endpoints_router
        from asm_controller.inference import (
            EndpointPublisher,
            StoreLeaseStore,
            catalog_ids,
            fleet_run_fn,
            inference_router,
        )

        async def models() -> list[str]:
            # The providers some node of the fleet offers now (and their catalogs' models).
            offered = sorted({p.name for h in api.session.pool.handles() if h.state != "lost"
                              for p in h.info.providers if p.available})
            return catalog_ids(offered)

        # ASM's inference endpoint: each completion is a run over the fleet (routing, failover, queue, registry).
        # Its endpoint leases (ensure_endpoint) live in the run store: every replica serves every lease,
        # a restart on the same --state keeps them. The base URL is set once the port is known.
        publisher = EndpointPublisher("", StoreLeaseStore(store))
        inference = inference_router(fleet_run_fn(api, provider_options=config.completion_options), models,
                                     publisher=publisher, principal_fn=principal_of)
        try:
            app = create_app(api, tokens=tokens, routers=[inference, build_endpoints_router(publisher), *http_routers])
            ctl.http = await HttpServer.start(app, config.http_listen, tls_cert=config.tls_cert,
                                              tls_key=config.tls_key, tls_ca=config.tls_ca)
        except BaseException:
            await ctl.stop()
            raise
        ctl.http_port = ctl.http.port
        # The URL clients reach the HTTP API at: --advertise's host (else the listen host; a wildcard bind:
        # this host's name), the HTTP port, https with TLS.
        host = parse_address(config.advertise or config.http_listen)[0]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        publisher.base_url_root = f"{'https' if config.tls_cert else 'http'}://{host}:{ctl.http_port}"
        ctl.endpoints = publisher

        async def sweep_endpoint_leases() -> None:
            """Expired leases leave the store (a lookup refuses them already; this keeps the table small)."""
            while True:
                await asyncio.sleep(ENDPOINT_SWEEP_S)
                try:
                    gone = await publisher.sweep()
                    if gone:
                        log.info("%d expired endpoint lease(s) removed", gone)
                except AsmError as err:
                    log.warning("sweeping expired endpoint leases failed: %s", err.message)

        ctl._tasks.append(asyncio.create_task(sweep_endpoint_leases()))
    if config.nodes_dns or config.nodes_file:
        ctl._tasks.append(asyncio.create_task(_rediscover(config, api)))
    if durable:
        ctl._tasks.append(asyncio.create_task(_prune_periodically(config, store)))
    ctl._tasks.append(asyncio.create_task(_queue_metrics(api, metrics)))
    return ctl


async def _prune_periodically(config: ControllerConfig, store: RunStore) -> None:
    """Ended runs older than state_max_age_s leave the registry (hourly, or sooner for short ages)."""
    while True:
        await asyncio.sleep(min(3600.0, max(1.0, config.state_max_age_s / 4)))
        try:
            await store.prune(time.time() - config.state_max_age_s, max_log_bytes=config.log_retention_bytes)
        except AsmError as err:
            log.warning("pruning the run registry failed: %s", err.message)


async def _queue_metrics(api: FleetApi, metrics: ControllerMetrics) -> None:
    """The fleet queue's depth and oldest age (fleet-wide, from the store) every few seconds."""
    while True:
        await asyncio.sleep(2.0)
        with contextlib.suppress(AsmError):
            depth, oldest = await api.store.queue_stats()
            metrics.queue_depth.set(depth)
            metrics.queue_oldest_age.set(max(0.0, time.time() - oldest) if oldest is not None else 0.0)


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


#: The collector's first-generation threshold in a serving controller (CPython's default: 700).
SERVING_GC_THRESHOLD = SERVING_YOUNG


def tune_gc_for_serving() -> None:
    """The cyclic collector tuned for relaying (``asm controller serve``'s process only, never a library
    user's): asm_wire._gc.settle_heap, why there."""
    settle_heap(SERVING_GC_THRESHOLD)


async def serve_controller(config: ControllerConfig, on_ready: Callable[[ControllerServer], None] | None = None) -> None:
    server = await start_controller(config)
    tune_gc_for_serving()  # after start-up: its objects are frozen, not traversed again
    await run_until_signal(server, on_ready)
