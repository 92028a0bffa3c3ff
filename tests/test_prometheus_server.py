"""A real Prometheus (tests/support/prometheus_server.py) scraping real exporters on 127.0.0.1.

Skips when the ``prometheus`` binary is missing (scripts/install_prometheus.sh installs it).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.support.asm_metrics import ASM_METRICS, family
from tests.support.processes import ROOT, NodeProcess
from tests.support.prometheus_server import PrometheusError, PrometheusServer, prometheus_binary

pytestmark = [
    pytest.mark.skipif(prometheus_binary() is None, reason="prometheus is not installed (scripts/install_prometheus.sh)"),
    pytest.mark.slow,  # a real Prometheus, waited on for its scrape intervals
]

RULES = ROOT / "deploy" / "prometheus" / "rules" / "asm.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "asm-fleet.json"


@pytest.fixture
def exporter() -> Iterator[tuple[str, Counter]]:
    """A prometheus_client HTTP exporter on 127.0.0.1 with one counter: (address, counter)."""
    registry = CollectorRegistry()
    counter = Counter("test_requests", "Requests seen by the test exporter", ["path"], registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}", counter
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_scrapes_an_exporter_within_15s(tmp_path: Path, exporter: tuple[str, Counter]) -> None:
    address, counter = exporter
    counter.labels(path="/a").inc(3)
    started = time.monotonic()
    with PrometheusServer.start(tmp_path / "prom", [address]) as prom:
        assert prom.proc.poll() is None and prom.url.startswith("http://127.0.0.1:")
        targets = prom.wait_for_targets_up(timeout=15)
        (target,) = targets
        assert target["health"] == "up"
        assert target["labels"] == {"job": "test", "instance": address}
        assert target["scrapeUrl"] == f"http://{address}/metrics"
        value = prom.wait_for(lambda: prom.query_value('test_requests_total{job="test", path="/a"}') == 3,
                              timeout=max(0.0, 15 - (time.monotonic() - started)))
        assert value
        assert time.monotonic() - started < 15
        (series,) = prom.query("test_requests_total")
        assert series["metric"] == {"__name__": "test_requests_total", "job": "test", "instance": address,
                                    "path": "/a"}
        # Scraped every second: a new value shows up within a few.
        counter.labels(path="/a").inc(2)
        prom.wait_for(lambda: prom.query_value('test_requests_total{path="/a"}') == 5, timeout=10)
        assert prom.query_value("absent_metric_xyz") is None
        with pytest.raises(PrometheusError, match="bad_data"):
            prom.query("sum(")
    # Stopped and reaped by PID.
    assert prom.proc.returncode is not None


def test_reports_a_down_target(tmp_path: Path, exporter: tuple[str, Counter]) -> None:
    address, _ = exporter
    dead = f"127.0.0.1:{closed_port()}"
    with PrometheusServer.start(tmp_path / "prom", {"live": [address], "dead": [dead]}) as prom:
        def health() -> dict[str, str] | None:
            h = {t["labels"]["job"]: t["health"] for t in prom.targets()}
            return h if h == {"live": "up", "dead": "down"} else None
        prom.wait_for(health, timeout=15)
        (down,) = [t for t in prom.targets() if t["labels"]["job"] == "dead"]
        assert down["lastError"]
        assert prom.query_value(f'up{{instance="{dead}"}}') == 0
        assert prom.query_value(f'up{{instance="{address}"}}') == 1


def test_deploy_rules_and_dashboard_queries_run_in_prometheus(tmp_path: Path, exporter: tuple[str, Counter]) -> None:
    address, _ = exporter
    with PrometheusServer.start(tmp_path / "prom", {"asm-node": [address]}, rule_files=[RULES]) as prom:
        expected = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}

        def evaluated() -> list[dict[str, object]] | None:
            rules = [r for g in prom.rules() for r in g["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else None
        rules = prom.wait_for(evaluated, timeout=15)
        assert {r["name"] for r in rules} == expected
        assert not [r for r in rules if r.get("lastError")]
        # Every dashboard query is valid PromQL for this Prometheus (Grafana's variables filled in).
        dash = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        assert exprs
        for expr in exprs:
            concrete = (expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
                        .replace("$instance", ".*").replace("$node", ".*"))
            assert "$" not in concrete, expr
            prom.query(concrete)  # raises PrometheusError on a bad query


def _start_controller(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "asm_cli", "controller", "serve", "--listen", "127.0.0.1:0",
                                 "--metrics-listen", "127.0.0.1:0", *args],
                                stdout=subprocess.DEVNULL, stderr=log, cwd=str(ROOT))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"metrics on port (\d+)", log_path.read_text(errors="replace"))
        if m:
            return proc, int(m.group(1)), log_path
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"controller did not start: {log_path.read_text(errors='replace')}")


def test_scrapes_a_real_node_and_controller(tmp_path: Path, node_process: Callable[..., NodeProcess]) -> None:
    """A live cluster (a controller and two nodes): Prometheus sees every target up and the key series."""
    node, node2 = node_process("--metrics-listen", "127.0.0.1:0"), node_process("--metrics-listen", "127.0.0.1:0")
    node_metrics = []
    for n in (node, node2):
        m = re.search(r"metrics on port (\d+)", n.log())
        assert m, n.log()
        node_metrics.append(f"127.0.0.1:{m.group(1)}")
    ctl, ctl_port, ctl_log = _start_controller(tmp_path, "--node", node.address, "--node", node2.address)
    try:
        grpc_port = int(re.search(r"\(port (\d+)\)", ctl_log.read_text()).group(1))  # type: ignore[union-attr]
        run = subprocess.run([sys.executable, "-m", "asm_cli", "run", "--controller", f"127.0.0.1:{grpc_port}",
                              "--provider", "shell", "echo scraped"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        jobs = {"asm-node": node_metrics, "asm-controller": [f"127.0.0.1:{ctl_port}"]}
        with PrometheusServer.start(tmp_path / "prom", jobs, rule_files=[RULES]) as prom:
            prom.wait_for_targets_up(timeout=15)
            up = [t for t in prom.targets() if t.get("health") == "up"]
            assert len(up) == 3, prom.targets()
            assert prom.wait_for(lambda: prom.query_value(
                'sum(asm_controller_runs_routed_total{job="asm-controller", outcome="completed"})') == 1)
            assert prom.query_value('sum(asm_node_runs_finished_total{job="asm-node", outcome="completed"})') == 1
            assert prom.query_value('asm_controller_provider_nodes{job="asm-controller", provider="shell"}') == 2
            assert prom.wait_for(lambda: prom.query_value('sum(asm_node_state{job="asm-node", state="ready"})') == 2)
            assert prom.query_value('count(asm_node_build_info{job="asm-node"})') == 2
            assert prom.wait_for(lambda: prom.query_value(
                f'asm_controller_node_up{{job="asm-controller", node="{node.address}"}}') == 1)
            assert prom.query_value('asm_controller_build_info{job="asm-controller"}') == 1
            names = {s["metric"]["__name__"] for s in prom.query('{__name__=~"asm_.+"}')}
            unknown = {n for n in names if family(n) not in ASM_METRICS}
            assert not unknown, f"exported but not in tests/support/asm_metrics.py (nor the dashboard/rules): {sorted(unknown)}"
            assert {"asm_node_build_info", "asm_node_state", "asm_controller_build_info",
                    "asm_controller_node_up"} <= names
            # The node is up: NodeDown is neither pending nor firing.
            assert not [a for a in prom.alerts() if a["labels"]["alertname"] in ("NodeDown", "ControllerDown")]
    finally:
        if ctl.poll() is None:
            ctl.terminate()
            try:
                ctl.wait(15)
            except subprocess.TimeoutExpired:
                ctl.kill()
                ctl.wait()
    assert ctl.returncode is not None, ctl_log.read_text()
