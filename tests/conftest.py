"""Shared fixtures: node agents as real processes on 127.0.0.1, and in-process ones."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from asm_node import NodeAgent, NodeConfig, NodeServer, start_server
from tests.pg_server import PostgresServer, postgres_bin_dir

ROOT = Path(__file__).resolve().parent.parent
_READY = re.compile(r"listening on \S+ \(port (\d+), epoch (\w+)\)")
PYTHON_BASENAME = os.path.basename(sys.executable)


@dataclass
class NodeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    epoch: str
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_node_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 20.0, inherit: bool = True,
    cwd: Path | None = None, python_flags: Sequence[str] = (),
) -> NodeProcess:
    """``asm node serve --listen 127.0.0.1:0 ARGS`` in ``cwd`` (default ``tmp_path``), ready when it logs
    its port. ``python_flags`` go before ``-m`` (``-I``: run as the installed console script does)."""
    log_path = tmp_path / f"node-{time.monotonic_ns()}.log"
    env = dict(env or {})
    if "--state-dir" not in args and "ASM_NODE_STATE_DIR" not in env:
        # Each node its own run journal: nodes of one test run side by side, and a fixed run id
        # must not find another test's (or an earlier session's) journaled outcome.
        env["ASM_NODE_STATE_DIR"] = str(log_path.with_suffix(".state"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "asm_cli", "node", "serve", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.DEVNULL, stderr=log, env={**(os.environ if inherit else {}), **env},
            cwd=str(cwd or tmp_path),
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _READY.search(log_path.read_text(errors="replace"))
        if match:
            return NodeProcess(proc, int(match.group(1)), match.group(2), log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"node agent exited early ({proc.returncode}): {log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"node agent did not become ready: {log_path.read_text()}")


@dataclass
class ControllerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        return NodeProcess.stop(self, sig, timeout)  # type: ignore[arg-type]


_CTL_READY = re.compile(r"listening on \S+ \(port (\d+)\)")


def start_controller_process(tmp_path: Path, *args: str, listen: str = "127.0.0.1:0", timeout: float = 20.0,
                             env: dict[str, str] | None = None) -> ControllerProcess:
    """``asm controller serve --listen LISTEN ARGS``, ready when it logs its port."""
    log_path = tmp_path / f"controller-{time.monotonic_ns()}.log"
    if "--state" not in args and "--state-dir" not in args:
        args = (*args, "--state-dir", str(log_path.with_suffix(".state")))  # each its own registry
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "asm_cli", "controller", "serve", "--listen", listen, *args],
                                stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})},
                                cwd=str(tmp_path))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _CTL_READY.search(log_path.read_text(errors="replace"))
        if match:
            return ControllerProcess(proc, int(match.group(1)), log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited early ({proc.returncode}): {log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"controller did not become ready: {log_path.read_text()}")


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster (initdb in a temp dir, a free port), stopped by PID afterwards."""
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed: run scripts/install_postgres.sh")
    with PostgresServer.start() as server:
        yield server


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node agents a test starts itself journal under a per-test XDG_STATE_HOME, never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: start ``asm node serve`` processes; all are stopped (by PID) at teardown."""
    started: list[NodeProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> NodeProcess:
        node = start_node_process(tmp_path, *args, env=env)
        started.append(node)
        return node

    yield factory
    for node in started:
        node.stop()


@pytest.fixture(autouse=True)
def _no_ambient_asm_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the machine's own asm settings: NodeConfig is a BaseSettings (an ambient
    ``ASM_NODE_TOKEN`` would change every config) and clients read ``ASM_TOKEN``."""
    for key in list(os.environ):
        if key == "ASM_TOKEN" or key.startswith("ASM_NODE_"):
            monkeypatch.delenv(key)


def node_config(**overrides: object) -> NodeConfig:
    """A NodeConfig with short graces so tests finish quickly."""
    base: dict[str, object] = {
        "listen": "127.0.0.1:0", "interrupt_grace_s": 1.0, "term_grace_s": 1.0, "exit_grace_s": 0.5,
        "shell_allowed_commands": [*NodeConfig().shell_allowed_commands, PYTHON_BASENAME, "python3", "sh"],
    }
    base.update(overrides)
    return NodeConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
async def agent() -> AsyncIterator[NodeAgent]:
    """An in-process node agent (embedded node)."""
    a = NodeAgent(node_config())
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


@pytest.fixture
async def grpc_node() -> AsyncIterator[NodeServer]:
    """A node agent behind a real gRPC server on 127.0.0.1, in this process."""
    server = await start_server(node_config())
    try:
        yield server
    finally:
        await server.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (and the process may vanish while we look).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
