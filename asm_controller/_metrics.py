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

from asm_node.providers import provider_names
from asm_wire import ConfigError, NodeState, RunStatus, Strategy, __version__, choices, pb

if TYPE_CHECKING:
    from asm_controller._session import Session

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STATES = ("healthy", "degraded", "unhealthy", NodeState.DRAINING.value, "lost")
#: The provider label values: the node's provider registry (each provider module declares itself),
#: read when a metrics object is made, so a provider added there is here too.
PROVIDERS = provider_names()
#: Outcomes of ``asm_controller_runs_routed_total`` (Session._finish maps every end to one of them).
OUTCOMES = (RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.INTERRUPTED.value, "node_lost")
#: Queue waits run from milliseconds (a slot was free a heartbeat later) to hours (a full fleet).
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: At most this many distinct store op names get their own series; any further one counts as "other"
#: (the store reports ops from a fixed set; this keeps the label bounded whatever it sends).
MAX_STORE_OPS = 64


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
        # HA replicas on a shared store: leases (one owner per in-flight run), per replica.
        self.leases_held = Gauge("asm_controller_leases_held", "Runs whose lease this replica holds", registry=r)
        self.lease_takeovers = Counter(
            "asm_controller_lease_takeovers",
            "Runs this replica took over after their owner's lease expired (a replica died or was cut off)",
            registry=r)
        self.leases_lost = Counter(
            "asm_controller_leases_lost",
            "Leases this replica lost (fenced: another replica took the run over, or renewal failed)", registry=r)
        self.replicas = Gauge("asm_controller_replicas", "Live controller replicas in the store (this one included)",
                              registry=r)
        self.lease_renew_failures = Counter("asm_controller_lease_renew_failures",
                                            "Lease renewals that failed (the store did not answer in time)",
                                            registry=r)
        # The fleet queue: runs waiting for a node with room.
        self.queue_depth = Gauge("asm_controller_queue_depth", "Runs waiting in the fleet queue (fleet-wide)",
                                 registry=r)
        self.queue_oldest_age = Gauge("asm_controller_queue_oldest_age_seconds",
                                      "How long the oldest queued run has waited (0 when the queue is empty)",
                                      registry=r)
        self.queue_wait = Histogram("asm_controller_queue_wait_seconds",
                                    "Time from queued to placed on a node, per run that waited",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.queue_timeouts = Counter("asm_controller_queue_timeouts",
                                      "Queued runs ended by their queue timeout (queue_timeout)", registry=r)
        self.store_latency = Histogram("asm_controller_store_latency_seconds", "Run store operation latency",
                                       ["op"], buckets=LATENCY_BUCKETS, registry=r)
        self._store_ops: set[str] = set()
        self.strategy_info = Gauge("asm_controller_routing_strategy_info",
                                   "The routing strategy of this replica (1 for the current one)", ["strategy"],
                                   registry=r)
        #: The providers this controller knows (the registry's, when this object was made).
        self.providers = provider_names()
        for provider in self.providers:
            self.cost.labels(provider)
            for direction in ("input", "output"):
                self.tokens.labels(provider, direction)

    def set_strategy(self, name: str) -> None:
        """The routing strategy in use: ``asm_controller_routing_strategy_info{strategy=name}`` is 1 (one series)."""
        if name not in choices(Strategy):
            raise ConfigError(f"unknown routing strategy {name!r}: expected one of {', '.join(choices(Strategy))}")
        self.strategy_info.clear()
        self.strategy_info.labels(name).set(1)

    def observe_store(self, op: str, seconds: float) -> None:
        """A run store operation's latency (the store's ``observe`` hook); op names past MAX_STORE_OPS
        distinct ones are counted as ``other``."""
        if op not in self._store_ops:
            if len(self._store_ops) >= MAX_STORE_OPS:
                op = "other"
            else:
                self._store_ops.add(op)
        self.store_latency.labels(op).observe(seconds)

    def expect_providers(self, names: Sequence[str]) -> None:
        """The operator's list (``--expect-provider``): these page when no node can run them, even
        if no node has ever been seen advertising them."""
        unknown = sorted(set(names) - set(self.providers))
        if unknown:
            raise ConfigError(f"unknown provider(s) {', '.join(unknown)}: use {', '.join(self.providers)}")
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
        for name in self.metrics.providers:
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
