"""The Prometheus metric names asm exports (the contract the deploy/ rules and dashboard rely on).

Names are the metric family names as exposed, counters with their ``_total``; a histogram's
``_bucket``/``_sum``/``_count`` series and prometheus_client's ``_created`` series map back to the
family with :func:`family`.
"""

from __future__ import annotations

import re

NODE_METRICS = frozenset({
    "asm_node_build_info",
    "asm_node_runs_active",
    "asm_node_runs_started_total",
    "asm_node_runs_finished_total",
    "asm_node_run_duration_seconds",
    "asm_node_time_to_first_event_seconds",
    "asm_node_events_total",
    "asm_node_cli_processes",
    "asm_node_attaches_total",
    "asm_node_replayed_events_total",
    "asm_node_buffer_overflows_total",
    "asm_node_requests_rejected_total",
    "asm_node_run_idle_seconds_max",
    "asm_node_state",
    "asm_node_reaper_up",
    "asm_node_reaper_failures_total",
    "asm_node_cgroup_tracking",
    "asm_node_journal_failures_total",
})

CONTROLLER_METRICS = frozenset({
    "asm_controller_build_info",
    "asm_controller_node_state",
    "asm_controller_node_up",
    "asm_controller_node_heartbeat_age_seconds",
    "asm_controller_handshake_duration_seconds",
    "asm_controller_preflight_duration_seconds",
    "asm_controller_runs_routed_total",
    "asm_controller_admission_failovers_total",
    "asm_controller_node_lost_total",
    "asm_controller_reconnects_total",
    "asm_controller_approvals_pending",
    "asm_controller_approvals_timed_out_total",
    "asm_controller_tokens_total",
    "asm_controller_cost_usd_total",
    "asm_controller_provider_nodes",
    "asm_controller_provider_advertised",
    "asm_controller_runs_active",
    "asm_controller_runs_recovered_total",
    "asm_controller_registry_pending_bytes",
    "asm_controller_registry_write_errors_total",
    "asm_controller_leases_held",
    "asm_controller_lease_takeovers_total",
    "asm_controller_leases_lost_total",
    "asm_controller_replicas",
    "asm_controller_lease_renew_failures_total",
    "asm_controller_queue_depth",
    "asm_controller_queue_oldest_age_seconds",
    "asm_controller_queue_wait_seconds",
    "asm_controller_queue_timeouts_total",
    "asm_controller_store_latency_seconds",
    "asm_controller_routing_strategy_info",
})

ASM_METRICS = NODE_METRICS | CONTROLLER_METRICS

HISTOGRAMS = frozenset({
    "asm_node_run_duration_seconds",
    "asm_node_time_to_first_event_seconds",
    "asm_controller_handshake_duration_seconds",
    "asm_controller_preflight_duration_seconds",
    "asm_controller_queue_wait_seconds",
    "asm_controller_store_latency_seconds",
})

#: A metric name as it appears in PromQL or an exposition (greedy: the whole identifier).
METRIC_NAME = re.compile(r"\basm_(?:node|controller)_[a-z0-9_]+")


def family(name: str) -> str:
    """The family a series name belongs to: strips ``_bucket``/``_sum``/``_count`` of histograms and
    maps ``X_created`` to ``X_total`` or ``X`` (prometheus_client's creation-time series)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    if name.endswith("_created"):
        base = name[: -len("_created")]
        if base + "_total" in ASM_METRICS:
            return base + "_total"
        return base
    return name


def referenced_metrics(text: str) -> set[str]:
    """Metric families named in ``text`` (PromQL, JSON, YAML, ...)."""
    return {family(m) for m in METRIC_NAME.findall(text)}
