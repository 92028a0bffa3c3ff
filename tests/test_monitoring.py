"""Metrics, health checking, reflection and the controller service, with real processes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from asm_controller import RemoteNode, Session
from asm_node.testing import ServedProcess, free_port
from tests.support.processes import PYTHON_BASENAME, ROOT, NodeProcess, start_controller_process

pytestmark = pytest.mark.slow  # node and controller processes, Prometheus scrapes, alert windows


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of an /metrics endpoint, keyed by (name, sorted labels)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_port(node: NodeProcess) -> int:
    m = re.search(r"metrics on port (\d+)", node.log())
    assert m, node.log()
    return int(m.group(1))


@dataclass
class ControllerProcess:
    """A served controller and the metrics port it was given."""

    served: ServedProcess
    metrics_port: int

    @property
    def address(self) -> str:
        return self.served.address

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.served.proc

    def stop(self) -> None:
        self.served.stop()


@pytest.fixture
def controller_process(tmp_path: Path) -> Iterator[Callable[..., ControllerProcess]]:
    started: list[ControllerProcess] = []

    def start(*args: str) -> ControllerProcess:
        metrics = free_port()
        ctl = ControllerProcess(start_controller_process(tmp_path, "--metrics-listen", f"127.0.0.1:{metrics}", *args),
                                metrics)
        started.append(ctl)
        return ctl

    yield start
    for ctl in started:
        ctl.stop()


def asm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asm_cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT))


async def test_node_metrics_move_when_runs_happen(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process("--metrics-listen", "127.0.0.1:0", "--shell-allow", PYTHON_BASENAME, "--line-cap", "1024")
    port = metrics_port(node)
    before = scrape(port)
    assert value(before, "asm_node_build_info", version="0.1.0", epoch=node.epoch, node_id=node.log().split()[2]) == 1
    assert value(before, "asm_node_state", state="ready") == 1
    async with Session("shell", node=RemoteNode(node.address)) as s:
        ok = await s.query("echo one")
        failed = await s.query("false")
        long_line = await s.query(f"{PYTHON_BASENAME} -c \"print('x'*5000)\"")
        busy = s.stream("sleep 30")
        await busy.__anext__()
        during = scrape(port)
        await s.interrupt(busy.run_id)
        async for _ in busy:
            pass
    assert ok.ok and failed.status == "failed" and long_line.warnings
    after = scrape(port)
    assert value(during, "asm_node_runs_active") == 1 and value(during, "asm_node_cli_processes") == 1
    assert value(after, "asm_node_runs_active") == 0
    assert value(after, "asm_node_runs_started_total", provider="shell") == 4
    assert value(after, "asm_node_runs_finished_total", provider="shell", outcome="completed") == 2
    assert value(after, "asm_node_runs_finished_total", provider="shell", outcome="failed") == 1
    assert value(after, "asm_node_runs_finished_total", provider="shell", outcome="interrupted") == 1
    assert value(after, "asm_node_run_duration_seconds_count", provider="shell") == 4
    assert value(after, "asm_node_time_to_first_event_seconds_count", provider="shell") >= 1
    assert value(after, "asm_node_events_total", kind="run_completed") == 4
    assert value(after, "asm_node_events_total", kind="assistant_delta") >= 1
    assert value(after, "asm_node_buffer_overflows_total", stream="stdout") == 1
    # Bucket bounds reach hours for agent runs.
    assert any(name == "asm_node_run_duration_seconds_bucket" and ("le", "14400.0") in labels
               for name, labels in after)
    # No run or session ids as labels, anywhere.
    assert not any(k in ("run_id", "session_id") for _, labels in after for k, _ in labels)


async def test_node_rejections_are_counted(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("right")
    node = node_process("--metrics-listen", "127.0.0.1:0", "--token-file", str(tok), "--max-runs", "1",
                        "--workspace-root", str(tmp_path))
    port = metrics_port(node)
    async with Session("shell", node=RemoteNode(node.address, token="wrong")) as s:
        assert (await s.query("echo x")).error is not None
    async with Session("shell", node=RemoteNode(node.address, token="right"), max_concurrent_runs=2) as s:
        busy = s.stream("sleep 30")
        await busy.__anext__()
        refused = await s.query("echo no room")
        assert refused.error is not None and refused.error.kind == "at_capacity"
        await s.interrupt(busy.run_id)
        async for _ in busy:
            pass
        outside = await s.query("echo x", cwd="/")
        assert outside.error is not None and outside.error.reason == "cwd_not_allowed"
    after = scrape(port)
    assert value(after, "asm_node_requests_rejected_total", reason="auth") >= 1
    assert value(after, "asm_node_requests_rejected_total", reason="capacity") == 1
    assert value(after, "asm_node_requests_rejected_total", reason="preflight") == 1


async def _health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(resp.status)


async def _reflected_services(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def req() -> object:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for resp in stub.ServerReflectionInfo(req()):
            return sorted(s.name for s in resp.list_services_response.service)
    return []


async def test_controller_service_routes_runs_and_exports_fleet_metrics(
    node_process: Callable[..., NodeProcess], controller_process: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    tok = tmp_path / "tok"
    tok.write_text("fleet-token")
    a = node_process("--token-file", str(tok), "--label", "gpu=t4")
    b = node_process("--token-file", str(tok), "--label", "gpu=a100")
    ctl = controller_process("--node", a.address, "--node", b.address, "--token-file", str(tok))
    # Health and reflection, without a token (probes carry none).
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await _health(ctl.address) == serving and await _health(a.address) == serving
    assert await _health(ctl.address, "asm.v1.ControllerService") == serving
    services = await _reflected_services(ctl.address)
    assert {"asm.v1.NodeService", "asm.v1.ControllerService", "grpc.health.v1.Health"} <= set(services)
    assert "asm.v1.NodeService" in await _reflected_services(b.address)
    # A run through the controller, as a client on another machine would do it.
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "asm_cli", "run", "--controller", ctl.address, "--provider", "shell",
                         "--token-file", str(tok), "--output", "jsonl", "echo through the controller"],
        capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.splitlines()[-1])
    assert summary["status"] == "completed" and summary["text"] == "through the controller\n"
    # The fleet as the controller sees it.
    nodes = await asyncio.to_thread(asm, "nodes", "--controller", ctl.address, "--token-file", str(tok),
                                    "--output", "json")
    assert nodes.returncode == 0, nodes.stderr
    rows = {r["node"]: r for r in json.loads(nodes.stdout)}
    assert set(rows) == {a.address, b.address}
    assert rows[b.address]["labels"] == {"gpu": "a100"} and rows[a.address]["epoch"] == a.epoch
    assert all(r["state"] == "ready" and r["up"] for r in rows.values())
    table = await asyncio.to_thread(asm, "nodes", "--controller", ctl.address, "--token-file", str(tok),
                                    "--watch", "0.2", "--watch-count", "2")
    assert table.returncode == 0 and table.stdout.count("NODE  ") == 2 and "HEARTBEAT" in table.stdout
    samples = scrape(ctl.metrics_port)
    assert value(samples, "asm_controller_node_up", node=a.address) == 1
    assert value(samples, "asm_controller_node_state", node=a.address, state="healthy") == 1
    assert value(samples, "asm_controller_provider_nodes", provider="shell") == 2
    routed = sum(v for (name, _), v in samples.items() if name == "asm_controller_runs_routed_total")
    assert routed == 1
    assert value(samples, "asm_controller_handshake_duration_seconds_count", node=a.address) >= 1
    # Drain a node through the controller: it shows as draining and runs go to the other.
    async with Session("shell", node=RemoteNode(ctl.address, token="fleet-token")) as s:
        from asm_wire import pb
        from asm_wire.v1 import node_pb2_grpc

        client = next(iter(s.pool.handles()), None)
        assert client is None
        handle = await s.pool.handle(s.defaults.nodes[0])
        stub = node_pb2_grpc.ControllerServiceStub(handle.api.channel)  # type: ignore[attr-defined]
        resp = await stub.DrainNode(pb.DrainNodeRequest(address=a.address, deadline_ms=5000),
                                    metadata=(("authorization", "Bearer fleet-token"),))
        assert resp.state == pb.NODE_STATE_DRAINING
        for _ in range(3):
            r = await s.query("echo after drain")
            assert r.ok
    samples = scrape(ctl.metrics_port)
    assert value(samples, "asm_controller_node_state", node=a.address, state="draining") == 1
    assert value(samples, "asm_controller_runs_routed_total", node=b.address, outcome="completed") >= 3


async def test_controller_discovers_nodes_by_dns_and_file(
    node_process: Callable[..., NodeProcess], controller_process: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    a = node_process()
    nodes_file = tmp_path / "nodes.txt"
    nodes_file.write_text(f"# fleet\n{a.address}\n")
    by_file = controller_process("--nodes-file", str(nodes_file))
    by_dns = controller_process("--nodes-dns", f"localhost:{a.port}")
    for ctl in (by_file, by_dns):
        async with Session("shell", node=RemoteNode(ctl.address)) as s:
            r = await s.query("echo found")
        assert r.ok and r.text == "found\n", r.error
    out = await asyncio.to_thread(asm, "nodes", "--controller", by_dns.address, "--output", "json")
    assert [row["node"] for row in json.loads(out.stdout) if row.get("up")] == [f"127.0.0.1:{a.port}"]


def test_controller_without_nodes_is_a_clear_error() -> None:
    proc = asm("controller", "serve", "--listen", "127.0.0.1:0")
    assert proc.returncode == 2 and proc.stderr.startswith("asm: error:") and "Traceback" not in proc.stderr


# --- alerts that fire: series at zero, process collectors, the deploy rules on live exporters ---------

NODE_PROVIDERS = ("claude", "codex", "gemini", "amp", "shell")


def assert_process_metrics(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], pid: int) -> None:
    """prometheus_client's ProcessCollector/PlatformCollector, read from the exporter's own /proc."""
    assert value(samples, "process_resident_memory_bytes") > 1_000_000
    assert value(samples, "process_open_fds") >= 3 and value(samples, "process_max_fds") > 0
    assert value(samples, "process_cpu_seconds_total") > 0
    start = value(samples, "process_start_time_seconds")
    assert abs(start - time.time()) < 600, start
    assert any(name == "python_info" for name, _ in samples)
    with open(f"/proc/{pid}/status") as f:  # the numbers are the exporter's, not the test's
        rss_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    assert 0.5 < value(samples, "process_resident_memory_bytes") / (rss_kb * 1024) < 2


async def test_counters_exist_at_zero_and_process_metrics_are_scraped(
    node_process: Callable[..., NodeProcess], controller_process: Callable[..., ControllerProcess],
) -> None:
    """Every counter series a rule relies on exists at 0 before its first increment: a series born at
    its first increment is invisible to increase() (NodeLost never fired on a first loss)."""
    node = node_process("--metrics-listen", "127.0.0.1:0")
    gone = f"127.0.0.1:{closed_port()}"  # a node of the fleet that never answered
    ctl = controller_process("--node", node.address, "--node", gone, "--expect-provider", "gemini")
    n = scrape(metrics_port(node))
    for provider in NODE_PROVIDERS:
        assert (("asm_node_runs_started_total", (("provider", provider),)) in n), provider
        for outcome in ("completed", "failed", "interrupted"):
            key = ("asm_node_runs_finished_total", (("outcome", outcome), ("provider", provider)))
            assert n.get(key) == 0, key
    assert_process_metrics(n, node.pid)
    c = scrape(ctl.metrics_port)
    for address in (node.address, gone):
        assert c.get(("asm_controller_node_lost_total", (("node", address),))) == 0, address
        assert c.get(("asm_controller_reconnects_total", (("node", address),))) == 0, address
        for outcome in ("completed", "failed", "interrupted", "node_lost"):
            assert c.get(("asm_controller_runs_routed_total", (("node", address), ("outcome", outcome)))) == 0
    for provider in NODE_PROVIDERS:
        assert c.get(("asm_controller_cost_usd_total", (("provider", provider),))) == 0
        assert c.get(("asm_controller_tokens_total", (("direction", "input"), ("provider", provider)))) == 0
    # Advertised: shell by the node's handshake; gemini because the operator expects it; amp (in no
    # image, not on this machine's PATH) by nobody.
    advertised = {p: c.get(("asm_controller_provider_advertised", (("provider", p),))) for p in NODE_PROVIDERS}
    assert advertised["shell"] == 1 and advertised["gemini"] == 1 and advertised["amp"] == 0, advertised
    assert_process_metrics(c, ctl.proc.pid)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_expect_provider_must_name_a_provider() -> None:
    proc = asm("controller", "serve", "--listen", "127.0.0.1:0", "--node", "127.0.0.1:1", "--expect-provider", "zzz")
    assert proc.returncode == 2 and "unknown provider(s) zzz" in proc.stderr and "Traceback" not in proc.stderr


async def test_deploy_alerts_fire_on_a_first_node_loss_and_not_for_uninstalled_providers(
    node_process: Callable[..., NodeProcess], controller_process: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    """A real Prometheus with deploy/prometheus/rules/asm.yml over a live controller: the first loss of
    a node fires NodeLost within seconds; amp (installed nowhere) is never even pending."""
    from tests.support.prometheus_server import PrometheusServer, prometheus_binary

    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (scripts/install_prometheus.sh)")
    rules = ROOT / "deploy" / "prometheus" / "rules" / "asm.yml"
    node = node_process()
    ctl = controller_process("--node", node.address, "--node-lost-timeout", "1")
    jobs = {"asm-controller": [f"127.0.0.1:{ctl.metrics_port}"]}
    lost_series = f'asm_controller_node_lost_total{{job="asm-controller", node="{node.address}"}}'
    with PrometheusServer.start(tmp_path / "prom", jobs, rule_files=[rules]) as prom:
        prom.wait_for_targets_up(timeout=15)
        # A few scrapes of the healthy fleet first, as in production (the loss is not at the first scrape).
        assert prom.wait_for(lambda: (prom.query_value('count_over_time(up{job="asm-controller"}[1m])') or 0) >= 3)
        async with Session("shell", node=RemoteNode(ctl.address)) as s:
            busy = s.stream("sleep 60")
            await busy.__anext__()
            node.stop(signal.SIGKILL)
            async for _ in busy:
                pass
        assert busy.result is not None and busy.result.error is not None
        assert busy.result.error.kind == "node_lost", busy.result.error

        def node_lost_firing() -> list[dict[str, object]]:
            return [a for a in prom.alerts() if a["labels"]["alertname"] == "NodeLost"
                    and a["labels"].get("node") == node.address and a["state"] == "firing"]
        assert prom.wait_for(node_lost_firing, timeout=20)
        assert prom.query_value(lost_series) == 1
        no_node = [a["labels"].get("provider") for a in prom.alerts()
                   if a["labels"]["alertname"] == "NoHealthyNodeForProvider"]
        # shell was advertised and its only node is gone: pending (for: 2m). Nothing else.
        assert set(no_node) <= {"shell"}, no_node
        assert prom.query_value('asm_controller_provider_advertised{provider="amp"}') == 0
        assert prom.query_value('process_resident_memory_bytes{job="asm-controller"}') > 0  # type: ignore[operator]
