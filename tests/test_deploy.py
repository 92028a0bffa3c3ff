"""Structural checks of the deployment files: deploy/, docker-compose.yml, Dockerfile, .dockerignore.

Everything is parsed (YAML/JSON/unit files), and the pieces are checked against each other and
against the real CLI: every flag used in compose, Kubernetes and systemd exists in
``asm node serve --help`` / ``asm controller serve --help``; ports, probes, scrape targets,
annotations and ServiceMonitors agree; every metric in the alert rules and the dashboard is one asm
exports (tests/support/asm_metrics.py). promtool and systemd-analyze run when installed
(scripts/install_prometheus.sh), otherwise those tests skip.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.asm_metrics import ASM_METRICS, METRIC_NAME, family, referenced_metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules" / "asm.yml"
RULES_TEST = PROM_DIR / "tests" / "asm_test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "asm-fleet.json"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# The fixed CLI surface.
NODE_GRPC, NODE_METRICS, CONTROLLER_GRPC, CONTROLLER_METRICS = 7070, 9470, 7080, 9480
PORTS = {"node": (NODE_GRPC, NODE_METRICS), "controller": (CONTROLLER_GRPC, CONTROLLER_METRICS)}
JOBS = {"node": "asm-node", "controller": "asm-controller"}
NODE_SOURCES = ("--node", "--nodes-file", "--nodes-dns")
ALERTS = {"NodeDown", "NodeLost", "NoHealthyNodeForProvider", "HighAdmissionFailureRate", "RunsStuckWithoutEvents",
          "ApprovalsTimingOut"}
#: Controller replicas on PostgreSQL (issue 12).
HA_ALERTS = {"FleetQueueStale", "FleetQueueDeep", "ControllerLeaseTakeovers", "ControllerReplicasBelowTwo",
             "ControllerStoreSlow"}
CONTROLLERS = ("controller1", "controller2")  # the compose replicas
DB_ENV = "deploy/compose/db.env"  # the compose database password: the user's, git-ignored
K8S_POSTGRES = DEPLOY / "k8s-postgres"  # the optional overlay: base + a PostgreSQL StatefulSet


# --- helpers ------------------------------------------------------------------------------------

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(load_yaml_docs(path))
    return docs


def k8s_find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), f"not HOST:PORT: {address!r}"
    return host, int(port)


@functools.cache
def serve_help(component: str) -> str | None:
    """``asm <component> serve --help`` from the real CLI, or None when that command does not exist."""
    proc = subprocess.run([sys.executable, "-m", "asm_cli", component, "serve", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        if "invalid choice" in proc.stderr:
            return None
        raise AssertionError(f"asm {component} serve --help failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def help_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def parse_flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """``[("--listen", "0.0.0.0:7070"), ...]`` from argv after ``<component> serve``."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        assert tok.startswith(("--", "$")), f"unexpected positional argument {tok!r} in {argv}"
        if tok.startswith("$"):  # systemd: a whitespace-split variable with extra flags
            i += 1
            continue
        if "=" in tok:
            flag, value = tok.split("=", 1)
            out.append((flag, value))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append((tok, argv[i + 1]))
            i += 2
        else:
            out.append((tok, None))
            i += 1
    return out


def flag_values(flags: list[tuple[str, str | None]], flag: str) -> list[str]:
    return [v for f, v in flags if f == flag and v is not None]


def one(flags: list[tuple[str, str | None]], flag: str) -> str:
    values = flag_values(flags, flag)
    assert len(values) == 1, f"expected one {flag}, got {values}"
    return values[0]


# --- systemd unit files -------------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (keys may repeat); continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def systemd_argv(unit: Path, env: dict[str, str] | None = None) -> list[str]:
    """ExecStart split like systemd; ``${VAR}``/``$VAR`` substituted from ``env`` when given."""
    exec_start = parse_unit(unit)["Service"]["ExecStart"]
    assert len(exec_start) == 1
    words = shlex.split(exec_start[0])
    if env is None:
        return words
    out: list[str] = []
    for w in words:
        m = re.fullmatch(r"\$\{(\w+)\}", w)
        if m:
            assert m.group(1) in env, f"{unit.name}: ${{{m.group(1)}}} is not set in the example env file"
            out.append(env[m.group(1)])
            continue
        m = re.fullmatch(r"\$(\w+)", w)
        if m:
            assert m.group(1) in env, f"{unit.name}: ${m.group(1)} is not set in the example env file"
            out.extend(env[m.group(1)].split())
            continue
        assert "$" not in w, f"{unit.name}: unsupported variable use in {w!r}"
        out.append(w)
    return out


SYSTEMD_UNITS = {"node": SYSTEMD / "asm-node.service", "controller": SYSTEMD / "asm-controller.service"}
SYSTEMD_ENV = {"node": SYSTEMD / "node.env.example", "controller": SYSTEMD / "controller.env.example"}


# --- every `asm <component> serve` command in the deploy files ----------------------------------

def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def k8s_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for the main containers of the Deployments/StatefulSets."""
    for doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, c


def serve_commands(resolve_env: bool = False) -> list[tuple[str, str, list[str]]]:
    """(where, component, argv after ``<component> serve``) for compose, Kubernetes and systemd."""
    found: list[tuple[str, str, list[str]]] = []

    def add(where: str, argv: list[str]) -> None:
        assert len(argv) >= 2 and argv[0] in ("node", "controller") and argv[1] == "serve", \
            f"{where}: not an `asm node|controller serve` command: {argv}"
        found.append((where, argv[0], argv[2:]))

    for name, svc in compose()["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd[:1] in (["node"], ["controller"]):
            add(f"docker-compose.yml service {name}", [str(x) for x in cmd])
    for workload, c in k8s_containers():
        add(f"k8s {workload['kind']}/{workload['metadata']['name']}", [str(x) for x in c["args"]])
    for component, unit in SYSTEMD_UNITS.items():
        argv = systemd_argv(unit, env_file(SYSTEMD_ENV[component]) if resolve_env else None)
        assert Path(argv[0]).name == "asm", f"{unit.name}: ExecStart does not run asm: {argv[0]}"
        add(f"systemd {unit.name}", argv[1:])
    return found


def test_every_deploy_file_has_serve_commands() -> None:
    where = [(w.split()[0], comp) for w, comp, _ in serve_commands()]
    for source in ("docker-compose.yml", "k8s", "systemd"):
        for component in ("node", "controller"):
            assert (source, component) in where, f"no {component} command in {source}"


# --- flags exist in the real CLI ----------------------------------------------------------------

def _check_flags(component: str, pending: set[str]) -> None:
    text = serve_help(component)
    assert text is not None, f"`asm {component} serve --help` failed: the deploy files call a command that is gone"
    known = help_flags(text)
    missing_pending: set[str] = set()
    for where, comp, argv in serve_commands():
        if comp != component:
            continue
        for flag, _ in parse_flags(argv):
            if flag in known:
                continue
            if flag in pending:
                missing_pending.add(flag)
                continue
            raise AssertionError(f"{where}: `asm {component} serve` has no {flag} (flags: {sorted(known)})")
    assert not missing_pending, f"`asm {component} serve --help` has no {sorted(missing_pending)}"


def test_node_flags_exist_in_cli() -> None:
    # --metrics-listen is part of the fixed CLI surface but may land after these files.
    _check_flags("node", pending={"--metrics-listen"})


def test_controller_flags_exist_in_cli() -> None:
    _check_flags("controller", pending=set())


def test_serve_commands_ports_and_required_flags() -> None:
    for where, component, argv in serve_commands(resolve_env=True):
        flags = parse_flags(argv)
        grpc, metrics = PORTS[component]
        assert host_port(one(flags, "--listen"))[1] == grpc, f"{where}: --listen must be on port {grpc}"
        assert host_port(one(flags, "--metrics-listen"))[1] == metrics, f"{where}: --metrics-listen must be on {metrics}"
        assert one(flags, "--token-file"), where
        if component == "node":
            assert flag_values(flags, "--workspace-root"), f"{where}: a node without --workspace-root runs anywhere"
        else:
            sources = [f for f, _ in flags if f in NODE_SOURCES]
            assert sources and len(set(sources)) == 1, f"{where}: exactly one kind of {NODE_SOURCES}, got {sources}"


# --- docker-compose.yml -------------------------------------------------------------------------

def test_compose_services_and_wiring() -> None:
    data = compose()
    services = data["services"]
    assert {*CONTROLLERS, "postgres", "node1", "node2", "prometheus", "grafana"} <= set(services)
    secrets = data.get("secrets", {})

    def token_file_ok(name: str, flags: list[tuple[str, str | None]]) -> None:
        path = one(flags, "--token-file")
        mounted = {f"/run/secrets/{s if isinstance(s, str) else s.get('target', s['source'])}"
                   for s in services[name].get("secrets", [])}
        assert path in mounted, f"{name}: --token-file {path} is not a mounted compose secret ({mounted})"

    node_ports: dict[str, tuple[int, int]] = {}
    for name in ("node1", "node2"):
        svc = services[name]
        assert svc.get("init") is True, f"{name}: needs init: true (reaps orphaned CLI children)"
        cmd = [str(x) for x in svc["command"]]
        assert cmd[:2] == ["node", "serve"]
        flags = parse_flags(cmd[2:])
        token_file_ok(name, flags)
        node_ports[name] = (host_port(one(flags, "--listen"))[1], host_port(one(flags, "--metrics-listen"))[1])
        assert node_ports[name] == (NODE_GRPC, NODE_METRICS)
        # The workspace root must exist in the image (created in the Dockerfile) or on a volume.
        root = one(flags, "--workspace-root")
        assert root.startswith("/home/asm/"), f"{name}: workspace root {root} not under the asm user's home"

    for name in CONTROLLERS:
        cmd = [str(x) for x in services[name]["command"]]
        assert cmd[:2] == ["controller", "serve"]
        flags = parse_flags(cmd[2:])
        token_file_ok(name, flags)
        assert flag_values(flags, "--node") == ["node1:7070", "node2:7070"]
        for address in flag_values(flags, "--node"):
            host, port = host_port(address)
            assert host in services and port == node_ports[host][0], f"{name} --node {address}"
    for name in ("node1", "node2", *CONTROLLERS):
        for secret in services[name].get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in secrets, f"{name}: secret {source} not defined"

    # The token file lives where the docs say and is never committed.
    token = secrets["asm_token"]["file"]
    assert (ROOT / token).parent.is_dir()
    gitignored = subprocess.run(["git", "check-ignore", "-q", token], cwd=ROOT).returncode == 0
    assert gitignored, f"{token} must be git-ignored"

    # Prometheus: mounts deploy/prometheus and loads prometheus.yml from it.
    prom = services["prometheus"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in prom["volumes"]}
    assert mounts.get("./deploy/prometheus") == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]

    # Grafana: provisioning, and the dashboards where the provider looks for them.
    graf = services["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in graf["volumes"]}
    assert mounts.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    provider_path = load_yaml(GRAFANA / "provisioning" / "dashboards" / "asm.yml")["providers"][0]["options"]["path"]
    assert mounts.get("./deploy/grafana/dashboards") == provider_path
    for svc in services.values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"bind mount source {src} does not exist"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"published port {port} must bind 127.0.0.1"


def test_compose_controller_replicas_share_postgres() -> None:
    """Two replicas with their own id and advertised address, on the compose PostgreSQL, whose
    password is the user's file: nothing secret is committed."""
    data = compose()
    services = data["services"]
    pg = services["postgres"]
    assert str(pg["image"]).split(":")[0] == "postgres", "the official PostgreSQL image"
    assert "POSTGRES_PASSWORD" not in (pg.get("environment") or {}), "no password in the compose file"
    assert pg["env_file"] == [f"./{DB_ENV}"]
    assert "pg_isready" in pg["healthcheck"]["test"]
    assert not pg.get("ports"), "PostgreSQL stays on the compose network"
    ids, advertised, published = set(), set(), set()
    for name in CONTROLLERS:
        svc = services[name]
        flags = parse_flags([str(x) for x in svc["command"]][2:])
        ids.add(one(flags, "--replica-id"))
        host, port = host_port(one(flags, "--advertise"))
        assert host == name and port == CONTROLLER_GRPC, f"{name}: --advertise must be its own compose address"
        advertised.add(host)
        assert not flag_values(flags, "--state"), f"{name}: the state URL comes from ASM_CONTROLLER_STATE"
        url = svc["environment"]["ASM_CONTROLLER_STATE"]
        assert re.fullmatch(r"postgresql://asm@postgres:5432/asm", url), f"{name}: {url} (no password in it)"
        assert svc["env_file"] == [f"./{DB_ENV}"], f"{name}: PGPASSWORD comes from {DB_ENV}"
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        health = svc["healthcheck"]
        assert health["test"][0] == "CMD" and "grpc_health" in health["test"][-1] and "7080" in health["test"][-1]
        assert svc["init"] is True
        (pub,) = svc["ports"]
        published.add(str(pub).split(":")[1])
    assert len(ids) == len(advertised) == len(published) == 2, (ids, advertised, published)
    gitignored = subprocess.run(["git", "check-ignore", "-q", DB_ENV], cwd=ROOT).returncode == 0
    assert gitignored, f"{DB_ENV} must be git-ignored"
    tracked = subprocess.run(["git", "ls-files", DB_ENV], cwd=ROOT, capture_output=True, text=True).stdout
    assert not tracked.strip(), f"{DB_ENV} is committed"
    readme = (DEPLOY / "compose" / "README.md").read_text()
    assert "db.env" in readme and "POSTGRES_PASSWORD" in readme and "PGPASSWORD" in readme


HEALTHCHECK_TIMEOUT = 30


@pytest.mark.slow
def test_compose_controller_healthcheck_runs_against_a_real_controller(tmp_path: Path) -> None:
    """The compose healthcheck's command, as written, against a live controller (healthy) and a
    closed port (unhealthy)."""
    from asm_node.testing import free_port, serve_controller, serve_node

    test = compose()["services"]["controller1"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = str(test[3])
    with serve_node(tmp_path) as node, serve_controller(tmp_path, "--node", node.address) as ctl:
        ok = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:7080", ctl.address)],
                            capture_output=True, text=True, timeout=HEALTHCHECK_TIMEOUT)
        assert ok.returncode == 0, ok.stderr
    closed = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:7080", f"127.0.0.1:{free_port()}")],
                            capture_output=True, text=True, timeout=HEALTHCHECK_TIMEOUT)
    assert closed.returncode != 0


def test_docker_compose_config_validates() -> None:
    """`docker compose config` (the compose spec's own validation) when the compose plugin is installed."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed")
    proc = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and "asm_token" in output and not (ROOT / "deploy/compose/asm_token").exists():
        pytest.skip(f"deploy/compose/asm_token does not exist (see deploy/compose/README.md): {output.strip()}")
    if proc.returncode != 0 and "db.env" in output and not (ROOT / DB_ENV).exists():
        pytest.skip(f"{DB_ENV} does not exist (see deploy/compose/README.md): {output.strip()}")
    assert proc.returncode == 0, output


def test_prometheus_static_targets_are_the_compose_metrics_ports() -> None:
    services = compose()["services"]
    jobs = {j["job_name"]: j for j in load_yaml(PROM_CONFIG)["scrape_configs"]}
    assert set(jobs) == {"asm-node", "asm-controller"}
    seen_nodes = set()
    for component, job in JOBS.items():
        targets = [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
        assert targets
        for target in targets:
            host, port = host_port(target)
            assert port == PORTS[component][1], f"{job}: {target} is not the metrics port"
            cmd = [str(x) for x in services[host]["command"]]
            assert cmd[0] == component
            assert host_port(one(parse_flags(cmd[2:]), "--metrics-listen"))[1] == port
            seen_nodes.add(host)
    assert {"node1", "node2", *CONTROLLERS} <= seen_nodes


# --- Prometheus config and rules ----------------------------------------------------------------

def kubernetes_sd_alternative() -> list[dict[str, Any]]:
    text = PROM_CONFIG.read_text()
    block = re.search(r"# BEGIN kubernetes_sd\n(.*?)\n\s*# END kubernetes_sd", text, re.S)
    assert block, "the commented kubernetes_sd alternative is missing"
    lines = [re.sub(r"^\s*# ?", "", line) for line in block.group(1).splitlines()]
    jobs: list[dict[str, Any]] = yaml.safe_load("\n".join(lines))
    return jobs


def test_prometheus_config_structure() -> None:
    config = load_yaml(PROM_CONFIG)
    assert config["rule_files"] == ["rules/*.yml"]
    matched = sorted((PROM_DIR / "rules").glob("*.yml"))
    assert matched == [RULES], f"rules/*.yml must match only rule files, got {matched}"
    assert "groups" in load_yaml(RULES)
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
    # The commented Kubernetes alternative: the same job names, pod discovery in namespace asm,
    # keeping pods by the labels the manifests set and the annotation the manifests set.
    alt = {j["job_name"]: j for j in kubernetes_sd_alternative()}
    assert set(alt) == set(JOBS.values())
    for component, job in JOBS.items():
        sd = alt[job]["kubernetes_sd_configs"][0]
        assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["asm"]
        keeps = {tuple(r["source_labels"]): r["regex"] for r in alt[job]["relabel_configs"] if r.get("action") == "keep"}
        assert keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == f"asm-{component}"
        assert keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"


def rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(RULES)["groups"] for r in g["rules"]]


def test_alert_rules_structure() -> None:
    by_name = {r["alert"]: r for r in rules()}
    assert ALERTS | HA_ALERTS <= set(by_name)
    for name, rule in by_name.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), name
    def squash(s: str) -> str:
        return re.sub(r"\s+", "", s)
    assert squash(by_name["NodeDown"]["expr"]) == 'up{job="asm-node"}==0' and by_name["NodeDown"]["for"] == "1m"
    # Counter alerts count a first increment too: increase(), or a series > 0 that did not exist
    # one window ago while its target did (tests/test_monitoring.py runs them in a real Prometheus).
    for alert, counter, window in (("NodeLost", "asm_controller_node_lost_total", "5m"),
                                   ("ApprovalsTimingOut", "asm_controller_approvals_timed_out_total", "15m")):
        assert squash(by_name[alert]["expr"]) == (
            f"increase({counter}[{window}])>0or(({counter}>0unless{counter}offset{window})"
            f"andon(job,instance)(upoffset{window}))"), alert
    # Only providers some node advertised (or the operator expects): never one nobody installed.
    assert squash(by_name["NoHealthyNodeForProvider"]["expr"]) == (
        "asm_controller_provider_nodes==0andon(job,instance,provider)asm_controller_provider_advertised==1")
    assert by_name["NoHealthyNodeForProvider"]["for"] == "2m"
    hafr = by_name["HighAdmissionFailureRate"]["expr"]
    assert "rate(asm_controller_admission_failovers_total" in hafr and "rate(asm_controller_runs_routed_total" in hafr
    assert squash(by_name["RunsStuckWithoutEvents"]["expr"]) == "asm_node_run_idle_seconds_max>900"
    assert by_name["RunsStuckWithoutEvents"]["for"] == "5m"
    # Job selectors name jobs that exist.
    jobs = {j["job_name"] for j in load_yaml(PROM_CONFIG)["scrape_configs"]}
    for rule in by_name.values():
        for job in re.findall(r'job\s*=~?\s*"([^"]+)"', rule["expr"]):
            assert job in jobs, f"{rule['alert']}: job {job!r} is not scraped"


def test_ha_alert_rules() -> None:
    by_name = {r["alert"]: r for r in rules()}

    def squash(s: str) -> str:
        return re.sub(r"\s+", "", s)
    # The queue is fleet-wide (each replica reports the store's value): one alert per job, not per replica.
    assert squash(by_name["FleetQueueStale"]["expr"]) == "maxby(job)(asm_controller_queue_oldest_age_seconds)>300"
    assert "max by (job) (asm_controller_queue_depth)" in by_name["FleetQueueDeep"]["expr"]
    # Takeovers: the same first-increment rule as NodeLost.
    counter = "asm_controller_lease_takeovers_total"
    assert squash(by_name["ControllerLeaseTakeovers"]["expr"]) == (
        f"increase({counter}[5m])>0or(({counter}>0unless{counter}offset5m)andon(job,instance)(upoffset5m))")
    # Fewer than two replicas pages only where two or more were seen (never a single SQLite controller).
    replicas = squash(by_name["ControllerReplicasBelowTwo"]["expr"])
    assert replicas.startswith("maxby(job)(asm_controller_replicas)<2andon(job)") and "max_over_time" in replicas
    assert by_name["ControllerReplicasBelowTwo"]["labels"]["severity"] == "critical"
    assert "asm_controller_store_latency_seconds_bucket" in by_name["ControllerStoreSlow"]["expr"]


def test_rule_unit_tests_cover_the_key_alerts() -> None:
    data = load_yaml(RULES_TEST)
    assert [(RULES_TEST.parent / f).resolve() for f in data["rule_files"]] == [RULES.resolve()]
    firing = {t["alertname"] for test in data["tests"] for t in test["alert_rule_test"] if t["exp_alerts"]}
    assert {"NodeDown", "NodeLost", "NoHealthyNodeForProvider"} | HA_ALERTS <= firing
    # Realistic inputs: a counter series that is born at its first increment (no earlier sample,
    # `_` in promtool's notation) must be among the NodeLost inputs that fire, and a provider nobody
    # advertised among the NoHealthyNodeForProvider inputs.
    def inputs(alert: str) -> list[str]:
        return [s["values"] for test in data["tests"] if any(t["alertname"] == alert and t["exp_alerts"]
                                                              for t in test["alert_rule_test"])
                for s in test["input_series"]]
    assert any(v.startswith("_") and "1" in v for v in inputs("NodeLost"))
    assert any('provider="amp"' in s["series"] and s["values"].startswith("0")
               for test in data["tests"] for s in test["input_series"]
               if s["series"].startswith("asm_controller_provider_advertised"))


def test_metric_names_in_rules_and_dashboard_are_known() -> None:
    for path in (RULES, RULES_TEST, DASHBOARD):
        text = path.read_text()
        unknown = referenced_metrics(text) - ASM_METRICS
        assert not unknown, f"{path.relative_to(ROOT)} uses metrics asm does not export: {sorted(unknown)}"
    # Histogram suffixes only on histograms, and the family helper agrees with the plain regex.
    assert family("asm_node_run_duration_seconds_bucket") == "asm_node_run_duration_seconds"
    assert family("asm_node_events_total_count") == "asm_node_events_total_count"
    assert METRIC_NAME.findall('rate(asm_node_events_total{kind="x"}[1m])') == ["asm_node_events_total"]


# --- Grafana ------------------------------------------------------------------------------------

def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_grafana_provisioning() -> None:
    ds = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert ds["apiVersion"] == 1
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "asm.yml")
    assert providers["apiVersion"] == 1 and providers["providers"][0]["type"] == "file"

    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    (ds_var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == prom["uid"]
    ds_refs = {f"${{{ds_var['name']}}}", prom["uid"]}
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no queries"
        assert panel["datasource"]["uid"] in ds_refs, panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip() and t["refId"], panel["title"]
        gp = panel["gridPos"]
        assert 0 <= gp["x"] and gp["x"] + gp["w"] <= 24, panel["title"]


def test_dashboard_covers_the_metrics() -> None:
    exprs = dashboard_exprs()
    used = referenced_metrics("\n".join(exprs))
    assert used == ASM_METRICS, f"metrics without a panel: {sorted(ASM_METRICS - used)}"
    joined = "\n".join(exprs)
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(asm_node_run_duration_seconds_bucket" in joined
    for grouping in ("by (outcome)", "by (kind)", "by (reason)", "by (provider, direction)", "by (state)"):
        assert grouping in joined, grouping


# --- Kubernetes ---------------------------------------------------------------------------------

def test_k8s_manifests_parse_and_are_namespaced() -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Secret", "Service", "StatefulSet", "Deployment", "PodDisruptionBudget",
            "ServiceMonitor"} <= kinds
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"], d
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == ns["metadata"]["name"] == "asm", d["metadata"]
    kustomization = load_yaml(K8S / "kustomization.yaml")
    for res in kustomization["resources"]:
        assert (K8S / res).is_file(), res
    assert "servicemonitors.yaml" not in kustomization["resources"]  # needs the operator's CRDs


def kustomization_docs(directory: Path) -> list[dict[str, Any]]:
    """The manifests a kustomization lists (its files; directories are other kustomizations)."""
    docs = []
    for res in load_yaml(directory / "kustomization.yaml")["resources"]:
        path = (directory / res).resolve()
        docs.extend(kustomization_docs(path) if path.is_dir() else load_yaml_docs(path))
    return docs


def test_k8s_applies_no_secret_by_default() -> None:
    """`kubectl apply -k deploy/k8s` creates no Secret: no placeholder token or database URL is ever
    applied; the workloads reference the Secrets by name (created by the operator, or generated by
    the overlay from the operator's own password file)."""
    docs = kustomization_docs(K8S)
    assert not [d for d in docs if d["kind"] == "Secret"], "the default manifests must not create a Secret"
    assert not [d for d in k8s_docs() if d["kind"] == "Secret" and d["metadata"]["name"] == "asm-controller-db"]
    assert "secret.yaml" not in load_yaml(K8S / "kustomization.yaml")["resources"]
    assert "kubectl -n asm create secret generic asm-controller-db" in (K8S / "controller.yaml").read_text()


def _controller_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_k8s_controller_replicas_probes_and_pdb() -> None:
    dep = k8s_find("Deployment", "asm-controller")
    assert dep["spec"]["replicas"] == 2
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a rollout must not take a replica down before its successor is up"
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == CONTROLLER_GRPC
    env = _controller_env(container)
    ref = env["ASM_CONTROLLER_STATE"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "asm-controller-db", "key": "url"}, "the database URL comes from the Secret"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] is True
    flags = parse_flags([str(a) for a in container["args"]][2:])
    assert not flag_values(flags, "--state"), "the URL stays out of argv (ps); ASM_CONTROLLER_STATE carries it"
    assert one(flags, "--replica-id") == "$(POD_NAME)"
    assert one(flags, "--advertise") == f"$(POD_IP):{CONTROLLER_GRPC}"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    pdb = k8s_find("PodDisruptionBudget", "asm-controller")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_postgres_overlay() -> None:
    """The optional overlay: the base plus a PostgreSQL StatefulSet, the database Secret generated
    from a password file the operator creates (git-ignored, never committed)."""
    kust = load_yaml(K8S_POSTGRES / "kustomization.yaml")
    assert kust["resources"] == ["../k8s", "postgres.yaml"]
    (gen,) = kust["secretGenerator"]
    assert gen["name"] == "asm-controller-db" and gen["namespace"] == "asm"
    assert gen["files"] == ["password=db-password"]
    (url,) = gen["literals"]
    assert url.startswith("url=postgresql://asm@asm-postgres.asm.svc.cluster.local:5432/"), url
    password = "deploy/k8s-postgres/db-password"
    assert subprocess.run(["git", "check-ignore", "-q", password], cwd=ROOT).returncode == 0
    assert not subprocess.run(["git", "ls-files", password], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    docs = load_yaml_docs(K8S_POSTGRES / "postgres.yaml")
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert all(d["metadata"]["namespace"] == "asm" for d in docs)
    assert svc["metadata"]["name"] == "asm-postgres" and sts["spec"]["serviceName"] == "asm-postgres"
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (c,) = pod["containers"]
    assert str(c["image"]).split(":")[0] == "postgres"
    env = {e["name"]: e for e in c["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "asm-controller-db", "key": "password"}
    assert "value" not in env["POSTGRES_PASSWORD"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert "pg_isready" in c[probe]["exec"]["command"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {m["name"] for m in c["volumeMounts"]}


def test_kubectl_kustomize_builds_base_and_overlay(tmp_path: Path) -> None:
    """`kubectl kustomize` (when installed) renders the base with no Secret, refuses the overlay
    without the password file, and renders it with one."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")

    def build(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)

    base = build(K8S)
    assert base.returncode == 0, base.stderr
    kinds = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(base.stdout) if d]
    assert ("Deployment", "asm-controller") in kinds and ("PodDisruptionBudget", "asm-controller") in kinds
    assert not [k for k in kinds if k[0] == "Secret"]
    shutil.copytree(K8S, tmp_path / "k8s")
    shutil.copytree(K8S_POSTGRES, tmp_path / "k8s-postgres", ignore=shutil.ignore_patterns("db-password"))
    missing = build(tmp_path / "k8s-postgres")
    assert missing.returncode != 0 and "db-password" in missing.stderr
    (tmp_path / "k8s-postgres" / "db-password").write_text("s3cret")
    overlay = build(tmp_path / "k8s-postgres")
    assert overlay.returncode == 0, overlay.stderr
    docs = [d for d in yaml.safe_load_all(overlay.stdout) if d]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "asm-controller-db" and set(secret["data"]) == {"url", "password"}
    assert ("StatefulSet", "asm-postgres") in [(d["kind"], d["metadata"]["name"]) for d in docs]


def test_k8s_secret_is_a_documented_placeholder() -> None:
    secret = k8s_find("Secret", "asm-token")
    assert set(secret["stringData"]) == {"token"}
    assert "REPLACE" in secret["stringData"]["token"]
    assert "kubectl -n asm create secret generic asm-token" in (K8S / "secret.yaml").read_text()


def test_k8s_nodes_headless_service_and_statefulset() -> None:
    svc = k8s_find("Service", "asm-nodes")
    sts = k8s_find("StatefulSet", "asm-node")
    assert svc["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == NODE_GRPC and ports["metrics"]["port"] == NODE_METRICS
    assert sts["spec"]["serviceName"] == "asm-nodes"
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    cports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert cports == {"grpc": NODE_GRPC, "metrics": NODE_METRICS}
    for p in ports.values():
        assert p["targetPort"] in cports or p["targetPort"] in cports.values()
    pdb = k8s_find("PodDisruptionBudget", "asm-node")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


def test_k8s_controller_discovers_nodes_through_the_headless_service() -> None:
    svc = k8s_find("Service", "asm-nodes")
    dep = k8s_find("Deployment", "asm-controller")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    flags = parse_flags([str(a) for a in container["args"]][2:])
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    expected = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{grpc_port}"
    assert one(flags, "--nodes-dns") == expected == "asm-nodes.asm.svc.cluster.local:7070"
    csvc = k8s_find("Service", "asm-controller")
    ports = {p["name"]: p["port"] for p in csvc["spec"]["ports"]}
    assert ports == {"grpc": CONTROLLER_GRPC, "metrics": CONTROLLER_METRICS}
    assert csvc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_probes_annotations_resources_security() -> None:
    for workload, c in k8s_containers():
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        component = c["args"][0]
        grpc, metrics = PORTS[component]
        flags = parse_flags([str(a) for a in c["args"]][2:])
        assert host_port(one(flags, "--listen")) == ("0.0.0.0", grpc)
        assert host_port(one(flags, "--metrics-listen")) == ("0.0.0.0", metrics)
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == grpc, f"{where}: {probe} must be a gRPC probe on {grpc}"
        if "startupProbe" in c:
            assert c["startupProbe"]["grpc"]["port"] == grpc
        pod = workload["spec"]["template"]
        ann = pod["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == str(metrics)
        assert ann.get("prometheus.io/path", "/metrics") == "/metrics"
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": grpc, "metrics": metrics}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: resources.{kind}"
        psc = pod["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
        for cc in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            sc = cc["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
        # The token file comes from the Secret's volume; writable paths are volumes.
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        volumes.update({t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])})
        token = one(flags, "--token-file")
        (token_vol,) = [n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == "asm-token"]
        assert token == f"{mounts[token_vol]}/token"
        for root in flag_values(flags, "--workspace-root"):
            assert any(root.startswith(mp + "/") or root == mp for n, mp in mounts.items() if n in volumes
                       and "secret" not in volumes[n]), f"{where}: workspace root {root} is not on a volume"


def test_k8s_servicemonitors_point_at_the_metrics_ports() -> None:
    monitors = [d for d in k8s_docs() if d["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"asm-node", "asm-controller"}
    services = [d for d in k8s_docs() if d["kind"] == "Service"]
    for mon in monitors:
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        sel = mon["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in services if sel.items() <= s["metadata"].get("labels", {}).items()]
        component = "node" if svc["metadata"]["name"] == "asm-nodes" else "controller"
        svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        for ep in mon["spec"]["endpoints"]:
            assert svc_ports[ep["port"]] == PORTS[component][1], f"{mon['metadata']['name']}: not the metrics port"
            assert ep.get("path", "/metrics") == "/metrics"
        # The job label becomes the name the alert rules select on.
        assert svc["metadata"]["labels"][mon["spec"]["jobLabel"]] == JOBS[component]


# --- systemd ------------------------------------------------------------------------------------

@pytest.mark.parametrize("component", ["node", "controller"])
def test_systemd_unit(component: str) -> None:
    unit = SYSTEMD_UNITS[component]
    svc = parse_unit(unit)["Service"]

    def val(key: str) -> str:
        assert key in svc, f"{unit.name}: {key}= missing"
        return svc[key][-1]

    assert val("Type") == "simple"
    assert val("User") == "asm"
    assert val("Restart") == "on-failure"
    assert val("KillMode") == "mixed"
    timeout = val("TimeoutStopSec")
    assert re.fullmatch(r"\d+s?", timeout) and int(timeout.rstrip("s")) >= 15
    assert val("NoNewPrivileges") == "yes"
    assert val("ProtectSystem") == "strict"
    assert val("EnvironmentFile") == f"/etc/asm/{component}.env"
    assert parse_unit(unit)["Install"]["WantedBy"] == ["multi-user.target"]
    # The example env file sets every variable ExecStart uses (systemd_argv asserts that).
    argv = systemd_argv(unit, env_file(SYSTEMD_ENV[component]))
    if component == "node":
        rw = " ".join(svc.get("ReadWritePaths", [])).split()
        for root in flag_values(parse_flags(argv[3:]), "--workspace-root"):
            assert any(root == p or root.startswith(p.rstrip("/") + "/") for p in rw), \
                f"workspace root {root} is not in ReadWritePaths {rw} (ProtectSystem=strict makes it read-only)"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists the ExecStart binary exists: point it at this venv's asm.
    asm = Path(sys.executable).parent / "asm"
    if not asm.exists():
        pytest.skip(f"{asm} not installed")
    paths = []
    for unit in SYSTEMD_UNITS.values():
        path = tmp_path / unit.name
        path.write_text(unit.read_text().replace("/usr/local/bin/asm", str(asm)))
        paths.append(str(path))
    proc = subprocess.run([tool, "verify", *paths], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and "asm-" not in output:
        pytest.skip(f"systemd-analyze verify cannot run here: {output.strip()[:300]}")
    ours = [line for line in output.splitlines() if "asm-node" in line or "asm-controller" in line]
    assert proc.returncode == 0 and not ours, output


# --- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def install_clis_pins() -> dict[str, str]:
    text = (ROOT / "scripts" / "install_clis.sh").read_text()
    return dict(re.findall(r'"(@[\w-]+/[\w-]+)@([\d.]+):\w+"', text))


def test_dockerfile() -> None:
    ins = dockerfile_instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert froms[-1].startswith("python:3.11-slim")
    args = dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    runs = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), runs)
    apt = re.search(r"apt-get install ([^&]*)", runs)
    assert apt and {"nodejs", "npm", "tini"} <= set(apt.group(1).split())
    npm = re.search(r"npm install -g ([^&]*)", runs)
    assert npm
    pinned = dict(re.findall(r'"?(@[\w-]+/[\w-]+)@([\d.]+)"?', npm.group(1)))
    pins = install_clis_pins()
    assert pins == {"@anthropic-ai/claude-code": "2.1.197", "@openai/codex": "0.169.0", "@google/gemini-cli": "0.61.0"}
    assert pinned == pins, "the Dockerfile's CLI pins must match scripts/install_clis.sh"
    assert re.search(r"pip install (\S*/src|\.)(\s|$)", runs)
    (entrypoint,) = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["tini", "--", "asm"]
    users = [rest for op, rest in ins if op == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    created = re.search(r"useradd [^&]*--uid (\d+)[^&]* asm(\s|$)", runs)
    assert created and user in ("asm", created.group(1)), f"USER {user} is not the asm user"
    exposed = {p for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    assert {"7070", "9470", "7080", "9480"} <= exposed
    # The uid matches what Kubernetes runs as.
    for workload, _ in k8s_containers():
        assert str(workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == created.group(1)


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule for the simple patterns used here: a pattern matches the path or a parent
    directory; ``**/`` matches at any depth; ``!`` re-includes (last match wins)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if pat.startswith("**/"):
            tail = pat[3:]
            hit = any(fnmatch.fnmatchcase(p.split("/")[-1], tail) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


@pytest.mark.slow
def test_dockerignore_context_builds_the_package(tmp_path: Path) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for must in (".git", ".venv", "tests", "**/__pycache__"):
        assert must in patterns
    # The build context as docker would send it (tracked and untracked, non-ignored files).
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    context = tmp_path / "context"
    kept = [f for f in files if (ROOT / f).is_file() and not dockerignored(f, patterns)]
    for f in kept:
        (context / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, context / f)
    assert {"pyproject.toml", "README.md", "asm_cli/main.py", "asm_node/server.py"} <= set(kept)
    assert not [f for f in kept if f.startswith(("tests/", "deploy/", ".ci/"))]
    # `pip install .` from that context works: build the wheel offline and look inside.
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(context)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("asm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("asm_wire", "asm_node", "asm_controller", "asm_cli"):
        assert f"{pkg}/__init__.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)


# --- promtool -----------------------------------------------------------------------------------

def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (scripts/install_prometheus.sh)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_promtool_check_config() -> None:
    proc = promtool("check", "config", str(PROM_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout + proc.stderr


def test_promtool_check_config_kubernetes_alternative(tmp_path: Path) -> None:
    config = load_yaml(PROM_CONFIG)
    config["scrape_configs"] = kubernetes_sd_alternative()
    config["rule_files"] = [str(PROM_DIR / "rules" / "*.yml")]
    path = tmp_path / "prometheus-k8s.yml"
    path.write_text(yaml.safe_dump(config))
    proc = promtool("check", "config", str(path))
    if "field kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's package is)")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_config_kubernetes_alternative_relabeling(tmp_path: Path) -> None:
    """The alternative's relabel_configs, with discovery swapped for a static target (any promtool can check it)."""
    jobs = kubernetes_sd_alternative()
    for job in jobs:
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [{"targets": ["127.0.0.1:9470"]}]
    config = load_yaml(PROM_CONFIG)
    config["scrape_configs"] = jobs
    config["rule_files"] = [str(PROM_DIR / "rules" / "*.yml")]
    path = tmp_path / "prometheus-relabel.yml"
    path.write_text(yaml.safe_dump(config))
    proc = promtool("check", "config", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules() -> None:
    proc = promtool("test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr
