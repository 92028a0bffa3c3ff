"""The HA / queue / store / routing metric definitions (issue 12): names, types, bounded labels."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from asm_controller._metrics import MAX_STORE_OPS, ControllerMetrics
from asm_wire import ConfigError

#: family name as exposed -> (type, label names besides le)
EXPECTED = {
    "asm_controller_leases_held": ("gauge", set()),
    "asm_controller_lease_takeovers": ("counter", set()),
    "asm_controller_leases_lost": ("counter", set()),
    "asm_controller_replicas": ("gauge", set()),
    "asm_controller_lease_renew_failures": ("counter", set()),
    "asm_controller_queue_depth": ("gauge", set()),
    "asm_controller_queue_oldest_age_seconds": ("gauge", set()),
    "asm_controller_queue_wait_seconds": ("histogram", set()),
    "asm_controller_queue_timeouts": ("counter", set()),
    "asm_controller_store_latency_seconds": ("histogram", {"op"}),
    "asm_controller_routing_strategy_info": ("gauge", {"strategy"}),
}


def families(m: ControllerMetrics) -> dict[str, tuple[str, set[str]]]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        out[fam.name] = (fam.type, labels)
    return out


def test_the_metrics_exist_with_their_types_and_no_run_labels() -> None:
    m = ControllerMetrics()
    m.set_strategy("least_loaded")
    m.observe_store("update", 0.002)
    m.queue_wait.observe(3.0)
    m.lease_takeovers.inc()
    got = families(m)
    for name, (kind, labels) in EXPECTED.items():
        assert name in got, f"{name} is not exported"
        assert got[name] == (kind, labels), name
    for name, (_, labels) in got.items():
        assert not labels & {"run", "run_id", "session", "session_id"}, f"{name} has a run-id label"


def test_strategy_info_is_one_series_of_the_current_strategy() -> None:
    m = ControllerMetrics()
    m.set_strategy("priority")
    m.set_strategy("least_loaded")
    samples = [s for fam in text_string_to_metric_families(generate_latest(m.registry).decode())
               if fam.name == "asm_controller_routing_strategy_info" for s in fam.samples]
    assert [(s.labels, s.value) for s in samples] == [({"strategy": "least_loaded"}, 1.0)]
    with pytest.raises(ConfigError):
        m.set_strategy("fastest")


def test_store_op_label_stays_bounded() -> None:
    m = ControllerMetrics()
    for i in range(MAX_STORE_OPS + 50):
        m.observe_store(f"op{i}", 0.001)
    ops = {s.labels["op"] for fam in text_string_to_metric_families(generate_latest(m.registry).decode())
           if fam.name == "asm_controller_store_latency_seconds" for s in fam.samples}
    assert len(ops) == MAX_STORE_OPS + 1 and "other" in ops
