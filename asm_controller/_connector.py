"""Node connector: connect, handshake, compatibility, preflight, each with a typed error.

Compatibility rule (ASM's, with the protocol version standing in for the OTP
release): same agent major.minor as this controller, the same wire protocol
version, and every capability the controller needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from asm_controller._client import GrpcNodeClient, LivenessConfig, RemoteNode
from asm_wire import (
    PROTOCOL_VERSION,
    REQUIRED_CAPABILITIES,
    AsmError,
    NodeApi,
    NodeCapabilityMismatch,
    NodeConnectTimeout,
    NodeNotReady,
    NodeUnauthenticated,
    NodeUnreachable,
    NodeVersionMismatch,
    __version__,
    error_from_info,
    node_state_name,
    pb,
    version_major_minor,
)

log = logging.getLogger("asm_controller.connector")

@dataclass(frozen=True)
class EmbeddedNode:
    """A node agent living in this process (``asm_node.NodeAgent``), used without gRPC."""

    api: NodeApi
    name: str = "embedded"
    priority: int = 100
    weight: int = 1

    @property
    def key(self) -> str:
        return f"embedded://{id(self.api)}"

    @property
    def address(self) -> str:
        return self.name


NodeTarget = EmbeddedNode | RemoteNode


class RunWatcher(Protocol):
    """What a node handle tells the runs on it."""

    def node_lost(self, reason: str) -> None: ...

    @property
    def node_epoch(self) -> str: ...


class NodeHandle:
    """A connected node whose handshake passed the compatibility rule, watched for liveness.

    Remote nodes get a heartbeat task: a node without a good heartbeat for
    ``node_lost_timeout_s`` is *lost* (its runs are told at once); a node that
    answers with a new boot epoch was restarted (the runs of the old epoch are
    lost, the node itself is usable again).
    """

    def __init__(self, target: NodeTarget, api: NodeApi, info: pb.HandshakeResponse) -> None:
        self.target = target
        self.api = api
        self.info = info
        self.state = "up"  # up | lost
        self.last_ok = time.monotonic()
        self.lost_reason = ""
        self.epoch_changes = 0
        self._runs: set[RunWatcher] = set()
        #: Called with each heartbeat's latency (the controller's metrics hook).
        self.on_heartbeat: Callable[[float], None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        if isinstance(target, RemoteNode):
            self._monitor = asyncio.create_task(self._watch(target), name=f"asm-node-watch-{target.address}")

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def epoch(self) -> str:
        return self.info.boot_epoch

    @property
    def execution(self) -> str:
        return "embedded" if isinstance(self.target, EmbeddedNode) else "remote"

    def run_ended(self) -> None:
        """A run this controller placed here ended: the node's last load report counts it until the next
        heartbeat, so it is taken off now (a run waiting in the fleet queue gets the slot at once, not
        a heartbeat later). The next report replaces the figure with the node's own."""
        load = self.info.load
        if load.active_runs > 0:
            load.active_runs -= 1

    @property
    def heartbeat_age_s(self) -> float:
        return time.monotonic() - self.last_ok

    def register(self, run: RunWatcher) -> None:
        self._runs.add(run)

    def unregister(self, run: RunWatcher) -> None:
        self._runs.discard(run)

    def _lose(self, reason: str, runs: list[RunWatcher]) -> None:
        for run in runs:
            self._runs.discard(run)
            run.node_lost(reason)

    async def heartbeat(self, timeout: float) -> pb.HandshakeResponse:
        """One handshake; updates the node's view (load, state, epoch) and spots restarts."""
        assert isinstance(self.api, GrpcNodeClient)
        t0 = time.monotonic()
        info = await self.api.handshake(
            pb.HandshakeRequest(controller_version=__version__, protocol_version=PROTOCOL_VERSION), timeout=timeout)
        self.last_ok = time.monotonic()
        if self.on_heartbeat is not None:
            self.on_heartbeat(self.last_ok - t0)
        if info.boot_epoch != self.info.boot_epoch:
            old = self.info.boot_epoch
            self.epoch_changes += 1
            self._lose(f"node {self.target.address} restarted (epoch {old} -> {info.boot_epoch}); "
                       "its runs are gone", [r for r in self._runs if r.node_epoch == old])
        self.info = info
        if self.state == "lost":
            log.warning("node %s is reachable again", self.target.address)
        self.state = "up"
        return info

    async def _watch(self, target: RemoteNode) -> None:
        """Probe on a fixed cadence; declare the node lost ``node_lost_timeout_s`` after the last good probe.

        Each probe times out within the interval (and never past the loss deadline), so one is
        always in flight while the node is silent and the loss is declared at
        ``last_ok + node_lost_timeout_s`` exactly, not a probe timeout later. A node that hangs
        at time S is therefore lost between S + bound - interval and S + bound, and a stall
        shorter than bound - interval is answered by the probe in flight when it ends.
        """
        live = target.liveness
        interval = live.heartbeat_interval_s
        probe_timeout = probe_timeout_s(live)
        next_at = time.monotonic() + interval
        while True:
            # Wake for the next probe, or at the loss deadline if that comes first (a probe that
            # failed fast, e.g. refused, must not push the verdict to the next tick).
            deadline = self.last_ok + live.node_lost_timeout_s
            wake = next_at if self.state == "lost" else min(next_at, deadline)
            await asyncio.sleep(max(0.005, wake - time.monotonic()))  # never a busy loop
            if wake >= next_at:
                # A late wake-up (loaded loop) keeps the cadence without a burst of probes.
                next_at = max(next_at + interval, time.monotonic())
            left = self.last_ok + live.node_lost_timeout_s - time.monotonic()
            try:
                await self.heartbeat(max(0.05, min(probe_timeout, left)) if self.state != "lost" else probe_timeout)
            except AsmError as err:
                if err.kind == "at_capacity":  # refused by a full server: it answered, so it is alive
                    self.last_ok = time.monotonic()
                    continue
                silent = time.monotonic() - self.last_ok
                # 10 ms of slack: a probe capped at the deadline may time out a hair early.
                if self.state != "lost" and silent >= live.node_lost_timeout_s - 0.01:
                    self.state = "lost"
                    self.lost_reason = (f"node {target.address} unreachable for {silent:.1f}s "
                                        f"(node_lost_timeout {live.node_lost_timeout_s:g}s): {err.message}")
                    log.warning("%s", self.lost_reason)
                    self._lose(self.lost_reason, list(self._runs))

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if isinstance(self.api, GrpcNodeClient):
            await self.api.close()


def probe_timeout_s(live: LivenessConfig) -> float:
    """A heartbeat probe's timeout: ``heartbeat_timeout_s``, but never longer than the interval."""
    return min(live.heartbeat_timeout_s, live.heartbeat_interval_s)


def check_compatible(info: pb.HandshakeResponse, address: str, *, ready: bool = True) -> None:
    ours, theirs = version_major_minor(__version__), version_major_minor(info.agent_version)
    if theirs is None or ours != theirs:
        raise NodeVersionMismatch(
            f"node {address} runs asm {info.agent_version or '?'}, this controller {__version__} "
            "(major.minor must match)",
            details={"local": __version__, "remote": info.agent_version},
        )
    if info.protocol_version != PROTOCOL_VERSION:
        raise NodeVersionMismatch(
            f"node {address} speaks wire protocol {info.protocol_version}, this controller {PROTOCOL_VERSION}",
            details={"local_protocol": PROTOCOL_VERSION, "remote_protocol": info.protocol_version},
        )
    missing = sorted(c.value for c in REQUIRED_CAPABILITIES - set(info.capabilities))
    if missing:
        raise NodeCapabilityMismatch(
            f"node {address} lacks capabilities: {', '.join(missing)}", details={"missing": missing}
        )
    if ready and info.state != pb.NODE_STATE_READY:
        raise NodeNotReady(f"node {address} is {node_state_name(info.state)}")


def _connect_error(err: AsmError, node: RemoteNode) -> AsmError:
    text = err.message
    if err.kind == "auth_error" or err.reason == "unauthenticated":
        return NodeUnauthenticated(f"node {node.address} refused our credentials: {text}")
    if err.kind == "timeout":
        return NodeConnectTimeout(f"node {node.address} did not answer within {node.connect_timeout_s:g}s")
    lowered = text.lower()
    if any(s in lowered for s in ("ssl", "tls", "handshake", "certificate", "verification", "unauthenticated")):
        return NodeUnauthenticated(f"TLS handshake with node {node.address} failed: {text}")
    if err.kind in ("connection_failed", "transport_error"):
        return NodeUnreachable(f"node {node.address} is unreachable: {text}")
    return err


async def connect(target: NodeTarget, *, ready: bool = True) -> NodeHandle:
    """Open (or wrap) the node, handshake and check compatibility; typed errors on failure.

    ``ready=False`` accepts a draining node (to follow the runs it still has, never to start one).
    """
    request = pb.HandshakeRequest(controller_version=__version__, protocol_version=PROTOCOL_VERSION)
    if isinstance(target, EmbeddedNode):
        info = await target.api.handshake(request)
        check_compatible(info, target.name, ready=ready)
        return NodeHandle(target, target.api, info)
    client = GrpcNodeClient(target)
    try:
        try:
            info = await client.handshake(request, timeout=target.connect_timeout_s)
        except AsmError as err:
            raise _connect_error(err, target) from None
        check_compatible(info, target.address, ready=ready)
    except BaseException:
        with contextlib.suppress(Exception):
            await client.close()
        raise
    return NodeHandle(target, client, info)


async def preflight(handle: NodeHandle, provider: str, cwd: str) -> str:
    """Ask the node whether it would admit this run; return the resolved cwd or raise the typed reason."""
    resp = await handle.api.preflight(pb.PreflightRequest(provider=provider, cwd=cwd))
    if not resp.ok:
        raise error_from_info(resp.error)
    return resp.resolved_cwd
