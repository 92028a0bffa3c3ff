"""A real Prometheus server for tests: scrapes given metrics addresses on 127.0.0.1 every second.

    with PrometheusServer.start(tmp_path, {"asm-node": [node_metrics], "asm-controller": [ctl_metrics]}) as prom:
        prom.wait_for_targets_up()
        prom.wait_for(lambda: prom.query_value('asm_node_runs_active') == 0)
        assert prom.query('asm_node_state{state="ready"} == 1')

Targets are a list of ``HOST:PORT`` metrics addresses (one job, ``job`` = "test") or a mapping of
job name to such lists. ``rule_files`` are loaded too (evaluated every scrape interval), so alert
rules can be checked with :meth:`PrometheusServer.alerts`. The server runs the ``prometheus``
binary from PATH (``scripts/install_prometheus.sh``; :func:`prometheus_binary` is None when it is
missing, for ``pytest.skip``), keeps its TSDB under the given directory, listens on a free port of
127.0.0.1 and is stopped by PID.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["PrometheusError", "PrometheusServer", "prometheus_binary", "start_prometheus"]


class PrometheusError(RuntimeError):
    pass


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` binary, or None."""
    return shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(jobs: Mapping[str, Sequence[str]], scrape_interval: str, rule_files: Sequence[Path]) -> str:
    # JSON is YAML; no yaml dependency needed.
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": list(targets)}]}
            for job, targets in jobs.items()
        ],
    }
    return json.dumps(config, indent=2)


class PrometheusServer:
    """A running ``prometheus`` process; use :meth:`start` (a context manager that stops it)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, workdir: Path, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.workdir = workdir
        self.log_path = log_path

    # --- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        workdir: Path,
        targets: Sequence[str] | Mapping[str, Sequence[str]],
        *,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        timeout: float = 30.0,
    ) -> PrometheusServer:
        """Start Prometheus scraping ``targets``; returns once it answers ``/-/ready``.

        ``workdir`` gets the generated config, the TSDB and the log (``prometheus.log``).
        """
        binary = prometheus_binary()
        if binary is None:
            raise PrometheusError("prometheus is not installed (scripts/install_prometheus.sh)")
        jobs: Mapping[str, Sequence[str]] = (
            {"test": list(targets)} if not isinstance(targets, Mapping) else targets
        )
        for job, addresses in jobs.items():
            for address in addresses:
                if ":" not in address or "/" in address:
                    raise ValueError(f"job {job!r}: target {address!r} is not HOST:PORT")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(_config(jobs, scrape_interval, rule_files))
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probing and binding it
            port = _free_port()
            log_path = workdir / f"prometheus-{port}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={workdir / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--storage.tsdb.retention.time=1h",
                        "--log.level=info",
                    ],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir),
                )
            server = cls(proc, port, workdir, log_path)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if server._ready():
                    return server
                time.sleep(0.1)
            server.stop()
            last_error = server.log()
            if "address already in use" not in last_error:
                break
        raise PrometheusError(f"prometheus did not become ready:\n{last_error[-4000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, SIGKILL after ``timeout``; always reaps the process."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- HTTP API -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; returns ``data`` or raises PrometheusError with Prometheus' error."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:  # 400/422/503 carry a JSON error body
            try:
                body = json.load(e)
            except ValueError:
                raise PrometheusError(f"GET {url}: HTTP {e.code}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def targets(self) -> list[dict[str, Any]]:
        """The active targets (``/api/v1/targets``): dicts with ``labels``, ``health``, ``lastError``, ..."""
        return list(self.api("targets", state="active")["activeTargets"])

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query (``/api/v1/query``): the result vector, each ``{"metric": {...}, "value": [t, "v"]}``.

        A scalar or string result is returned as one element without labels.
        """
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_value(self, expr: str) -> float | None:
        """The single value of ``expr`` (None when the result is empty; error when there are several)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr!r} returned {len(result)} series: {result}")
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def rules(self) -> list[dict[str, Any]]:
        """Loaded rule groups (``/api/v1/rules``)."""
        return list(self.api("rules")["groups"])

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts (``/api/v1/alerts``)."""
        return list(self.api("alerts")["alerts"])

    # --- waiting --------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.25) -> Any:
        """Poll ``predicate`` until it returns something truthy (returned); PrometheusError on timeout.

        Errors from the predicate (a series not there yet) count as "not yet".
        """
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                last = predicate()
                if last:
                    return last
            except (PrometheusError, LookupError, ValueError) as e:
                last = e
            if time.monotonic() >= deadline:
                raise PrometheusError(f"timed out after {timeout} s; last: {last!r}\ntargets: {self._targets_brief()}")
            time.sleep(interval)

    def wait_for_targets_up(self, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until every configured target has been scraped successfully; returns the targets."""
        def all_up() -> list[dict[str, Any]] | None:
            targets = self.targets()
            return targets if targets and all(t["health"] == "up" for t in targets) else None
        result: list[dict[str, Any]] = self.wait_for(all_up, timeout)
        return result

    def _targets_brief(self) -> str:
        try:
            return ", ".join(f"{t['scrapeUrl']}={t['health']} {t.get('lastError', '')}".strip()
                             for t in self.targets())
        except (PrometheusError, OSError) as e:
            return repr(e)


#: ``start_prometheus(workdir, targets, ...)`` is :meth:`PrometheusServer.start`.
start_prometheus = PrometheusServer.start
