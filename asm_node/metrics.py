"""Prometheus metrics of a node agent (``asm_node_*``), in a registry of its own.

Hot-path counts (events by kind) are plain integers kept by each run and
summed at scrape time by a collector, so the event path pays no metric lock.
No run or session id is ever a label.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from asm_wire import KIND_NAMES, NodeState, __version__, choices, node_state_name

if TYPE_CHECKING:
    from asm_node.agent import NodeAgent

# Agent runs last from seconds to hours.
RUN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
#: Final run statuses (asm_node.run.Run._complete).
RUN_OUTCOMES = ("completed", "failed", "interrupted")
FIRST_EVENT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Gauge("asm_node_build_info", "Agent version and boot epoch", ["version", "epoch", "node_id"],
                                registry=r)
        self.runs_started = Counter("asm_node_runs_started", "Runs started", ["provider"], registry=r)
        self.runs_finished = Counter("asm_node_runs_finished", "Runs finished", ["provider", "outcome"], registry=r)
        self.run_duration = Histogram("asm_node_run_duration_seconds", "Run duration", ["provider"],
                                      buckets=RUN_BUCKETS, registry=r)
        self.first_event = Histogram("asm_node_time_to_first_event_seconds",
                                     "Time from spawn to the CLI's first output event", ["provider"],
                                     buckets=FIRST_EVENT_BUCKETS, registry=r)
        self.attaches = Counter("asm_node_attaches", "Attaches to an existing run (re-attach, replay)", registry=r)
        self.replayed = Counter("asm_node_replayed_events", "Events sent again to a re-attaching follower", registry=r)
        self.overflows = Counter("asm_node_buffer_overflows", "Lines dropped or buffers exceeded", ["stream"],
                                 registry=r)
        self.rejected = Counter("asm_node_requests_rejected", "Requests refused", ["reason"], registry=r)
        self.journal_failures = Counter("asm_node_journal_failures",
                                        "Run journal reads/writes that failed (logged at ERROR)", ["op"], registry=r)
        for op in ("write", "read"):
            self.journal_failures.labels(op)
        for reason in ("auth", "capacity", "preflight", "config", "not_ready"):
            self.rejected.labels(reason)
        for stream in ("stdout", "stderr", "replay"):
            self.overflows.labels(stream)
        ProcessCollector(registry=r)  # process_* (CPU, RSS, fds, start time)
        PlatformCollector(registry=r)  # python_info

    def bind(self, agent: NodeAgent) -> None:
        self.build_info.labels(__version__, agent.boot_epoch, agent.node_id).set(1)
        # Series at 0 for every provider this node has: a counter born at its first increment is
        # invisible to increase()/rate() until its second.
        for provider in agent.providers:
            self.runs_started.labels(provider)
            for outcome in RUN_OUTCOMES:
                self.runs_finished.labels(provider, outcome)
        self.registry.register(_AgentCollector(agent))


class _AgentCollector(Collector):
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        agent = self.agent
        active = [r for r in agent.runs.values() if not r.done]
        yield GaugeMetricFamily("asm_node_runs_active", "Runs running now", value=len(active))
        yield GaugeMetricFamily("asm_node_cli_processes", "CLI processes (process groups) alive",
                                value=sum(1 for r in active if r.pid))
        now = time.monotonic()
        idle = max((now - r.last_event_mono for r in active), default=0.0)
        yield GaugeMetricFamily("asm_node_run_idle_seconds_max",
                                "Longest time any running run has gone without an event", value=idle)
        state = GaugeMetricFamily("asm_node_state", "Node state (1 for the current one)", labels=["state"])
        current = node_state_name(agent.state)
        for name in choices(NodeState)[1:]:  # every state but unspecified
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        counts = list(agent.kind_totals)
        for r in agent.runs.values():
            if not r.counted:
                counts = [a + b for a, b in zip(counts, r.kind_counts, strict=True)]
        events = CounterMetricFamily("asm_node_events", "Events emitted, by kind", labels=["kind"])
        for i, name in enumerate(KIND_NAMES[1:], start=1):
            events.add_metric([name], counts[i])
        yield events
        reaper = agent.reaper
        if reaper is not None:
            yield GaugeMetricFamily("asm_node_reaper_up",
                                    "1 while the reaper watchdog (kills CLIs if the agent dies) is alive",
                                    value=1.0 if reaper.up else 0.0)
            yield CounterMetricFamily("asm_node_reaper_failures",
                                      "Times the reaper watchdog was found dead (then restarted)",
                                      value=reaper.failures)
            yield GaugeMetricFamily("asm_node_cgroup_tracking",
                                    "1 when runs are tracked by cgroup (setsid cannot escape), 0 by process group",
                                    value=1.0 if reaper.cgroups is not None else 0.0)
