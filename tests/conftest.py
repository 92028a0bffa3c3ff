"""Shared fixtures (only fixtures: shared code is in tests/support/ and the shipped asm_node.testing):
node agents as real processes on 127.0.0.1, in-process ones, a throwaway PostgreSQL, hermetic settings."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from asm_node import NodeAgent, NodeServer
from asm_node.testing import running_agent, running_server
from tests.support.pg_server import PostgresServer, postgres_bin_dir
from tests.support.processes import NodeProcess, node_config, start_node_process


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


@pytest.fixture
async def agent() -> AsyncIterator[NodeAgent]:
    """An in-process node agent (embedded node)."""
    async with running_agent(node_config()) as a:
        yield a


@pytest.fixture
async def grpc_node() -> AsyncIterator[NodeServer]:
    """A node agent behind a real gRPC server on 127.0.0.1, in this process."""
    async with running_server(node_config()) as server:
        yield server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes the ``pg`` fixture needs PostgreSQL: it is ``postgres`` (for ``-m "not postgres"``)."""
    for item in items:
        if "pg" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
