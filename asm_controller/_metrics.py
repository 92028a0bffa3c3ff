"""Prometheus metrics of a controller (``asm_controller_*``), in a registry of its own.

Node labels are node addresses (bounded by the fleet); never run or session ids.

Every counter series whose label values are known up front exists at 0 from the first scrape
(providers, outcomes, and each node address once the controller knows it): a series born at its
first increment has no earlier sample, so ``increase()`` over it stays 0 and an alert such as
``NodeLost`` would miss the first loss (deploy/prometheus/rules/asm.yml).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from asm_wire import ConfigError, NodeState, RunStatus, __version__, pb

if TYPE_CHECKING:
    from asm_controller._session import Session

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STATES = ("healthy", "degraded", "unhealthy", NodeState.DRAINING.value, "lost")
PROVIDERS = ("claude", "codex", "gemini", "amp", "shell")
#: Outcomes of ``asm_controller_runs_routed_total`` (Session._finish maps every end to one of them).
OUTCOMES = (RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.INTERRUPTED.value, "node_lost")


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        #: Providers NoHealthyNodeForProvider may page for: the operator's list plus every provider a
        #: node has advertised (available) in a handshake since this controller started. Sticky, so a
        #: provider whose only node died (or left the DNS name) still pages.
        self.advertised: set[str] = set()
        self._nodes_known: set[str] = set()
        self._sessions: list[Session] = []
        # Registered first: the registry collects in registration order, so the node-labelled
        # counters created at 0 here are in the same scrape.
        r.register(_SessionCollector(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
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
        self.recovered = Counter("asm_controller_runs_recovered",
                                 "In-flight runs a restarted controller took over from its registry", registry=r)
        self.cost = Counter("asm_controller_cost_usd", "Cost reported by providers (USD)", ["provider"], registry=r)
        for provider in PROVIDERS:
            self.cost.labels(provider)
            for direction in ("input", "output"):
                self.tokens.labels(provider, direction)

    def expect_providers(self, names: Sequence[str]) -> None:
        """The operator's list (``--expect-provider``): these page when no node can run them, even
        if no node has ever been seen advertising them."""
        unknown = sorted(set(names) - set(PROVIDERS))
        if unknown:
            raise ConfigError(f"unknown provider(s) {', '.join(unknown)}: use {', '.join(PROVIDERS)}")
        self.advertised.update(names)

    def watch(self, session: Session) -> None:
        self._sessions.append(session)
        for target in session.defaults.nodes:
            self.node_known(target.address)

    def node_known(self, address: str) -> None:
        """Create the node's counter series at 0 (idempotent; called for every node at each scrape)."""
        if address in self._nodes_known:
            return
        self._nodes_known.add(address)
        self.node_lost.labels(address)
        self.reconnects.labels(address)
        for outcome in OUTCOMES:
            self.routed.labels(address, outcome)


class _SessionCollector(Collector):
    def __init__(self, metrics: ControllerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily("asm_controller_node_state", "Node state (1 for the current one)",
                                  labels=["node", "state"])
        up = GaugeMetricFamily("asm_controller_node_up", "Node answering heartbeats", labels=["node"])
        age = GaugeMetricFamily("asm_controller_node_heartbeat_age_seconds", "Time since the last good heartbeat",
                                labels=["node"])
        providers = GaugeMetricFamily("asm_controller_provider_nodes",
                                      "Healthy, ready nodes that have the provider's CLI", labels=["provider"])
        advertised = GaugeMetricFamily(
            "asm_controller_provider_advertised",
            "1 if some node advertised the provider since the controller started, or the operator expects it "
            "(--expect-provider)", labels=["provider"])
        counts: dict[str, int] = {}
        active = pending = 0
        for session in self.metrics._sessions:
            stats = session.stats()
            active += stats["active"]
            pending += stats["approvals_pending"]
            for target in session.defaults.nodes:
                self.metrics.node_known(target.address)
                handle = session.pool.get(target.key)
                health = session.pool.health.status(target.key)
                if handle is not None:  # its last good handshake, kept while the node is lost
                    self.metrics.advertised.update(p.name for p in handle.info.providers if p.available)
                if handle is None:
                    current, is_up, hb = health, 0.0, None
                elif handle.state == "lost":
                    current, is_up, hb = "lost", 0.0, handle.heartbeat_age_s
                else:
                    draining = handle.info.state != pb.NODE_STATE_READY
                    current = NodeState.DRAINING.value if draining else health
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
        for name in PROVIDERS:
            providers.add_metric([name], counts.get(name, 0))
            advertised.add_metric([name], 1.0 if name in self.metrics.advertised else 0.0)
        yield state
        yield up
        yield age
        yield providers
        yield advertised
        yield GaugeMetricFamily("asm_controller_runs_active", "Runs in progress", value=active)
        # The run registry's writer (its database): bytes queued behind the runs, failed writes so far.
        pending_bytes = errors = 0
        seen: set[int] = set()
        for session in self.metrics._sessions:
            writer = getattr(session.registry, "writer", None)
            if writer is not None and id(writer) not in seen:
                seen.add(id(writer))
                pending_bytes += writer.pending_bytes
                errors += writer.errors
        yield GaugeMetricFamily("asm_controller_registry_pending_bytes",
                                "Event-log bytes queued for the run registry's database", value=pending_bytes)
        yield CounterMetricFamily("asm_controller_registry_write_errors",
                                  "Failed writes to the run registry's database (each retried)", value=errors)
        yield GaugeMetricFamily("asm_controller_approvals_pending", "Approvals waiting for a decision", value=pending)
