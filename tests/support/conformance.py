"""What every real-CLI conformance file shares: a node agent process per CLI, its CLI pointed at the
scripted model server on 127.0.0.1 with a hermetic HOME/TMPDIR (tests/support/cli_env.py).

The CLI comes from scripts/install_clis.sh; without it the calling test is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.cli_env import GEMINI_MODEL, cli_env, find_cli, hermetic_env
from tests.support.fake_model_server import FakeModelServer
from tests.support.processes import NodeProcess, start_node_process

#: The node's environment variable naming each CLI's binary.
ENV_VARS = {"claude": "CLAUDE_CLI_PATH", "codex": "CODEX_PATH", "gemini": "GEMINI_CLI_PATH"}
#: Per-provider options for the fake server: Codex outside a git repository, Gemini's model pinned
#: (skips its router, caps retries).
OPTIONS: dict[str, dict[str, Any]] = {"claude": {}, "codex": {"skip_git_repo_check": True},
                                      "gemini": {"model": GEMINI_MODEL}}


def cli_node_env(name: str, server: FakeModelServer, scratch: Path, **changes: str | None) -> dict[str, str]:
    """The node's environment for CLI ``name`` (skips the test when it is not installed); a change of
    ``None`` removes that variable."""
    path = find_cli(name)
    if path is None:
        pytest.skip(f"{name} CLI not installed (run scripts/install_clis.sh)")
    env = hermetic_env({**cli_env(name, server.base_url, scratch), ENV_VARS[name]: str(path)})
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def start_cli_node(name: str, server: FakeModelServer, scratch: Path, *node_args: str,
                   **changes: str | None) -> NodeProcess:
    """A node agent process ``node-<name>`` that runs CLI ``name`` against ``server``."""
    env = cli_node_env(name, server, scratch, **changes)
    return start_node_process(scratch, "--node-id", f"node-{name}", *node_args, env=env, inherit=False)


def new_workspace(scratch: Path) -> Path:
    workspace = scratch / "ws"
    workspace.mkdir()
    return workspace
