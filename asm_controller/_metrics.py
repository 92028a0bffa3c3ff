"""Prometheus metrics of a controller (``asm_controller_*``), in a registry of its own.

Node labels are node addresses (bounded by the fleet); never run or session ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from asm_wire import __version__, pb

if TYPE_CHECKING:
    from asm_controller._session import Session

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STATES = ("healthy", "degraded", "unhealthy", "draining", "lost")


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        Gauge("asm_controller_build_info", "Controller version", ["version"], registry=r).labels(__version__).set(1)
        self.handshake = Histogram("asm_controller_handshake_duration_seconds", "Handshake (and heartbeat) latency",
                                   ["node"], buckets=LATENCY_BUCKETS, registry=r)
        self.preflight = Histogram("asm_controller_preflight_duration_seconds", "Preflight latency", ["node"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.routed = Counter("asm_controller_runs_routed", "Runs finished, by the node they ran on and outcome",
                              ["node", "outcome"], registry=r)
        self.failovers = Counter("asm_controller_admission_failovers",
                                 "Admissions refused by a node (the run moved on to the next)", registry=r)
        self.node_lost = Counter("asm_controller_node_lost", "Runs ended (or moved) because their node was lost",
                                 ["node"], registry=r)
        self.reconnects = Counter("asm_controller_reconnects", "Run streams re-attached after a break", ["node"],
                                  registry=r)
        self.approvals_timed_out = Counter("asm_controller_approvals_timed_out", "Approvals denied by timeout",
                                           registry=r)
        self.tokens = Counter("asm_controller_tokens", "Tokens reported by providers", ["provider", "direction"],
                              registry=r)
        self.cost = Counter("asm_controller_cost_usd", "Cost reported by providers (USD)", ["provider"], registry=r)
        self._sessions: list[Session] = []
        r.register(_SessionCollector(self))

    def watch(self, session: Session) -> None:
        self._sessions.append(session)


class _SessionCollector(Collector):
    def __init__(self, metrics: ControllerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = GaugeMetricFamily("asm_controller_node_state", "Node state (1 for the current one)",
                                  labels=["node", "state"])
        up = GaugeMetricFamily("asm_controller_node_up", "Node answering heartbeats", labels=["node"])
        age = GaugeMetricFamily("asm_controller_node_heartbeat_age_seconds", "Time since the last good heartbeat",
                                labels=["node"])
        providers = GaugeMetricFamily("asm_controller_provider_nodes",
                                      "Healthy, ready nodes that have the provider's CLI", labels=["provider"])
        counts: dict[str, int] = {}
        active = pending = 0
        for session in self.metrics._sessions:
            active += len(session._active)
            pending += len(session._approvals)
            for target in session.defaults.nodes:
                handle = session._handles.get(target.key)
                health = session._router.health.status(target.key)
                if handle is None:
                    current, is_up, hb = health, 0.0, None
                elif handle.state == "lost":
                    current, is_up, hb = "lost", 0.0, handle.heartbeat_age_s
                else:
                    draining = handle.info.state != pb.NODE_STATE_READY
                    current = "draining" if draining else health
                    is_up, hb = 1.0, handle.heartbeat_age_s
                    if not draining and health != "unhealthy":
                        for p in handle.info.providers:
                            if p.available:
                                counts[p.name] = counts.get(p.name, 0) + 1
                node = target.address
                for s in STATES:
                    state.add_metric([node, s], 1.0 if s == current else 0.0)
                up.add_metric([node], is_up)
                if hb is not None:
                    age.add_metric([node], hb)
        for name in ("claude", "codex", "gemini", "amp", "shell"):
            providers.add_metric([name], counts.get(name, 0))
        yield state
        yield up
        yield age
        yield providers
        yield GaugeMetricFamily("asm_controller_runs_active", "Runs in progress", value=active)
        yield GaugeMetricFamily("asm_controller_approvals_pending", "Approvals waiting for a decision", value=pending)
