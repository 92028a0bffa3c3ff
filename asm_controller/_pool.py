"""The node pool: one connection per node, its handshake, liveness and routing health.

Sessions, the controller service, the metrics collector and the CLI all look at
nodes through a :class:`NodePool`; nothing else holds node connections. A pool
may be shared by several sessions (the controller's registry and its sessions
see the same handles); whoever created it closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from asm_controller._connector import NodeHandle, NodeTarget, connect
from asm_controller._routing import Candidate, HealthTracker, Router
from asm_wire import ConfigError

if TYPE_CHECKING:  # metrics (prometheus_client) are imported only by whoever makes them
    from asm_controller._metrics import ControllerMetrics


def provider_key(node_key: str, provider: str) -> str:
    """The health tracker key of one (node, provider) routing candidate."""
    return f"{provider}@{node_key}"


class NodePool:
    """Connected nodes by target key, connected on first use (concurrent first uses share one handshake)."""

    def __init__(self, strategy: str = "priority", failure_cooldown_s: float = 30.0,
                 metrics: ControllerMetrics | None = None) -> None:
        self.router = Router(strategy, failure_cooldown_s)
        #: ASM's routing health per (node, provider) candidate (key: :func:`provider_key`), for provider
        #: failover: a provider that failed on a node before doing any work is tried there last until
        #: the cooldown has passed (the same cooldown and clock as the nodes').
        self.provider_health = HealthTracker(failure_cooldown_s, self.router.health.clock)
        self.metrics = metrics
        self._handles: dict[str, NodeHandle] = {}
        self._connecting: dict[str, asyncio.Future[NodeHandle]] = {}

    @property
    def health(self) -> HealthTracker:
        """Routing health per node key (healthy / degraded / unhealthy for a cooldown)."""
        return self.router.health

    def get(self, key: str) -> NodeHandle | None:
        """The node's handle if it was ever connected (kept while it is lost: its last handshake)."""
        return self._handles.get(key)

    def handles(self) -> list[NodeHandle]:
        """A snapshot of every connected node's handle."""
        return list(self._handles.values())

    def plan(self, cands: Sequence[Candidate], skip: Callable[[Candidate], str | None],
             cooling: Callable[[Candidate], bool] | None = None) -> tuple[list[Candidate], list[dict[str, Any]]]:
        """The routing order for a run and the candidates skipped (with why); ``cooling``: also tried last."""
        return self.router.plan(cands, skip, cooling)

    async def handle(self, target: NodeTarget | None, *, ready: bool = True) -> NodeHandle:
        """The node's handle, connecting (handshake, compatibility check) on first use; typed errors.

        ``ready=False`` also connects to a draining node (to follow its runs; routing still skips it).
        """
        if target is None:
            raise ConfigError("no node to run on")
        key = target.key
        handle = self._handles.get(key)
        if handle is not None:
            return handle
        pending = self._connecting.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(target, ready))
            self._connecting[key] = pending
            try:
                handle = await asyncio.shield(pending)
                self._handles[key] = handle
                return handle
            finally:
                self._connecting.pop(key, None)
        return await asyncio.shield(pending)

    async def _connect(self, target: NodeTarget, ready: bool) -> NodeHandle:
        t0 = time.perf_counter()
        handle = await connect(target, ready=ready)
        if self.metrics is not None:
            histogram = self.metrics.handshake.labels(target.address)
            histogram.observe(time.perf_counter() - t0)
            handle.on_heartbeat = histogram.observe
        return handle

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Routing health per node (healthy / degraded / unhealthy) and the node's liveness."""
        snap = self.router.health.snapshot()
        for key, handle in self._handles.items():
            entry = snap.setdefault(key, {"status": "healthy", "failures": 0, "last_error": None, "excluded": False})
            entry.update(node=handle.target.address, state=handle.state, epoch=handle.epoch,
                         heartbeat_age_s=round(handle.heartbeat_age_s, 3))
        return snap

    async def close(self) -> None:
        """Stop watching every node and close its connection."""
        handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            with contextlib.suppress(Exception):
                await handle.close()
