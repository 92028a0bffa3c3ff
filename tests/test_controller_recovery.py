"""A controller with durable state survives ``kill -9``: nothing runs twice, no event is lost or repeated.

Real processes throughout: two ``asm node serve``, ``asm controller serve --state ...`` (SQLite, and the
same scenario on a real PostgreSQL), and ``asm run --controller`` as the following client. The run is
placed on the *second* node (the first is drained while it starts, then undrained), so a controller that
re-sent StartRun after its restart would start a second CLI on the free first node.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import py
from tests.support.pg_server import PostgresServer
from tests.support.processes import (
    PYTHON_BASENAME,
    ROOT,
    ControllerProcess,
    NodeProcess,
    start_controller_process,
)

pytestmark = pytest.mark.slow  # controllers killed and restarted mid-run

ASM = [sys.executable, "-m", "asm_cli"]
LINES = 60


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "ASM_TOKEN" and not k.startswith("ASM_NODE_")}


def asm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ASM, *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def counted_ticker(pids: Path, n: int, interval: float) -> str:
    """A CLI that appends its pid to ``pids`` (every execution leaves a line), then prints n numbered lines."""
    return py(f"import os, time\nwith open({str(pids)!r}, 'a') as f:\n    f.write(str(os.getpid()) + '\\n')\n"
              f"for i in range({n}):\n    print(i, flush=True)\n    time.sleep({interval})")


@pytest.fixture
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ctl-state' / 'controller.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("pg")
    return server.create_database()


@pytest.fixture
def controllers(tmp_path: Path) -> Iterator[Callable[..., ControllerProcess]]:
    started: list[ControllerProcess] = []

    def start(*args: str, listen: str = "127.0.0.1:0") -> ControllerProcess:
        ctl = start_controller_process(tmp_path, *args, listen=listen, env=_env())
        started.append(ctl)
        return ctl

    yield start
    for ctl in started:
        ctl.stop()


def _read_until(proc: subprocess.Popen[str], pred: Callable[[dict[str, Any]], bool], limit: int = 1000
                ) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    out: list[dict[str, Any]] = []
    for _ in range(limit):
        line = proc.stdout.readline()
        assert line, f"client ended early: {proc.stderr.read() if proc.stderr else ''}"
        out.append(json.loads(line))
        if pred(out[-1]):
            return out
    raise AssertionError("condition never met")


def _metrics_port(ctl: ControllerProcess, timeout: float = 10.0) -> int:
    """The metrics port from the controller's ready line (written just after it starts answering RPCs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics on port (\d+)", ctl.log())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no metrics port in the controller's log: {ctl.log()}")


@pytest.mark.parametrize(("state_url", "sig"), [("sqlite", signal.SIGKILL),
                                               pytest.param("postgresql", signal.SIGKILL, marks=pytest.mark.postgres),
                                               ("sqlite", signal.SIGTERM)], indirect=["state_url"])
def test_controller_kill_9_and_restart_mid_run_delivers_every_event_once_and_runs_one_cli(
    state_url: str, sig: signal.Signals, node_process: Callable[..., NodeProcess],
    controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    """SIGKILL: the controller vanishes. SIGTERM: it stops gracefully and, its registry being durable,
    detaches (the run goes on on its node) instead of interrupting the run."""
    a = node_process("--shell-allow", PYTHON_BASENAME)
    b = node_process("--shell-allow", PYTHON_BASENAME)
    port = _free_port()
    listen = f"127.0.0.1:{port}"
    args = ("--node", a.address, "--node", b.address, "--state", state_url)
    ctl = controllers(*args, listen=listen)
    # a first in routing order, but draining while the run starts: the run goes to b.
    assert asm("node", "drain", "--node", a.address, "--deadline", "600").returncode == 0
    time.sleep(1.2)  # the controller's next heartbeat sees a draining
    pids = tmp_path / "executions.txt"
    command = counted_ticker(pids, LINES, 0.1)
    client = subprocess.Popen([*ASM, "run", "--controller", ctl.address, "--provider", "shell", "--output", "jsonl",
                               "--run-id", "survivor-1", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(), cwd=str(ROOT))
    try:
        seen = _read_until(client, lambda e: e["kind"] == "assistant_delta" and e["payload"]["content"] == "5\n")
        assert asm("node", "undrain", "--node", a.address).returncode == 0  # a is free again
        ctl.proc.send_signal(sig)
        ctl.proc.wait(20)
        ctl = controllers(*args, "--metrics-listen", "127.0.0.1:0", listen=listen)  # same address, same state
        metrics_port = _metrics_port(ctl)
        out, err = client.communicate(timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    lines = seen + [json.loads(line) for line in out.splitlines()]
    summary = lines[-1]
    assert summary["kind"] == "result_summary" and summary["status"] == "completed", summary
    events = lines[:-1]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "an event lost or repeated"
    deltas = [e["payload"]["content"] for e in events if e["kind"] == "assistant_delta"]
    assert deltas == [f"{i}\n" for i in range(LINES)]
    assert summary["text"] == "".join(f"{i}\n" for i in range(LINES))
    assert len(pids.read_text().split()) == 1, "the prompt was executed more than once"
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert "asm_controller_runs_recovered_total 1.0" in scrape

    # After the restart the registry still knows the run: attach prints its summary, runs lists it.
    attach = asm("attach", "survivor-1", "--controller", ctl.address, "--output", "jsonl")
    assert attach.returncode == 0, attach.stderr
    again = json.loads(attach.stdout.splitlines()[-1])
    assert again["kind"] == "result_summary" and again["status"] == "completed"
    runs = asm("runs", "--controller", ctl.address, "--output", "json")
    assert runs.returncode == 0, runs.stderr
    (row,) = [r for r in json.loads(runs.stdout) if r["run_id"] == "survivor-1"]
    assert row["status"] == "completed" and row["node"] == b.address

    # The same run id sent again (the user re-runs the command) attaches: still one execution.
    rerun = asm("run", "--controller", ctl.address, "--provider", "shell", "--output", "jsonl",
                "--run-id", "survivor-1", command)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout.splitlines()[-1])["status"] == "completed"
    assert len(pids.read_text().split()) == 1


def test_an_unknown_run_id_is_not_found_through_a_restarted_controller(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    a = node_process("--shell-allow", PYTHON_BASENAME)
    state = f"sqlite:///{tmp_path / 'state.sqlite3'}"
    ctl = controllers("--node", a.address, "--state", state)
    ctl.proc.send_signal(signal.SIGKILL)
    ctl.proc.wait(10)
    ctl = controllers("--node", a.address, "--state", state)
    attach = asm("attach", "never-was", "--controller", ctl.address)
    assert attach.returncode == 5, attach.stderr
    assert "never-was" in attach.stderr and "Traceback" not in attach.stderr
    assert asm("runs", "--controller", ctl.address, "--output", "json").stdout.strip() == "[]"  # nothing started


def test_two_controllers_cannot_share_one_registry(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    a = node_process()
    state = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    controllers("--node", a.address, "--state", state)
    with pytest.raises(RuntimeError, match="another controller uses the run store"):
        controllers("--node", a.address, "--state", state)
