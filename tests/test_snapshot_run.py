"""The snapshot workflow as a library call (run_with_snapshot / stream_with_snapshot), and ControllerClient."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from asm_controller import (
    AsmError,
    ConfigError,
    ControllerClient,
    EmbeddedNode,
    NodeConnectionError,
    RemoteNode,
    Session,
    run_with_snapshot,
    stream_with_snapshot,
)
from asm_controller.service import ControllerConfig, start_controller
from asm_node import NodeAgent, NodeConfig
from asm_node.server import start_server
from asm_wire import pb
from tests.support.processes import node_config


def _repo(path: Path) -> Path:
    path.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["git", "config", "commit.gpgsign", "false"]):
        subprocess.run(cmd, cwd=path, check=True)
    (path / "kept.txt").write_text("x\n")
    subprocess.run(["git", "add", "."], cwd=path, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=path, check=True)
    return path


def _agent(root: Path) -> NodeAgent:
    cfg = node_config(workspace_roots=[str(root)])
    return NodeAgent(NodeConfig(**{**cfg.model_dump(), "shell_allowed_commands": [*cfg.shell_allowed_commands,
                                                                                   "touch"]}))


async def test_run_with_snapshot_returns_the_result_and_the_diff(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    agent = _agent(tmp_path)
    await agent.start()
    try:
        async with Session("shell", node=EmbeddedNode(agent), cwd=str(repo)) as s:
            run = await run_with_snapshot(s, "touch made.txt")
            assert run.result.ok, run.result.error
            assert run.backend == "git"  # auto: the workspace is a repository
            assert list(run.diff.added) == ["made.txt"] and not run.diff.modified and not run.diff.deleted
            assert run.before.id != run.after.id
            assert run.result.metadata["snapshots"] == run.to_dict() == {
                "backend": "git", "before": run.before.id, "after": run.after.id,
                "diff": {"added": ["made.txt"], "modified": [], "deleted": []},
            }
            # Overrides as for Session.stream; an explicit backend.
            hashed = await s.run_with_snapshot("touch hashed.txt", backend="hash", run_id="snap-2")  # the method
            assert hashed.result.ok and hashed.result.run_id == "snap-2" and hashed.backend == "hash"
            assert list(hashed.diff.added) == ["hashed.txt"]
    finally:
        await agent.stop()


async def test_stream_with_snapshot_streams_then_diffs_at_the_end(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    agent = _agent(tmp_path)
    await agent.start()
    try:
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            stream = await s.stream_with_snapshot("touch streamed.txt", cwd=str(repo))
            assert stream.before.backend == "git" and stream.snapshots is None
            kinds = [ev.kind async for ev in stream]
            assert "run_completed" in kinds
            assert stream.snapshots is not None and list(stream.snapshots.diff.added) == ["streamed.txt"]
            assert stream.result is not None and stream.result.metadata["snapshots"]["diff"]["added"] == [
                "streamed.txt"]
            assert stream.snapshots.result is stream.result
    finally:
        await agent.stop()


async def test_snapshot_pins_the_first_reachable_node_and_refuses_bad_input(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    agent = _agent(tmp_path)
    await agent.start()
    dead = RemoteNode("127.0.0.1:9", connect_timeout_s=0.5)
    try:
        async with Session("shell", node=[dead, EmbeddedNode(agent)], cwd=str(repo)) as s:
            run = await run_with_snapshot(s, "touch pinned.txt")
            assert run.result.ok and list(run.diff.added) == ["pinned.txt"]
            with pytest.raises(ConfigError, match="snapshot backend"):
                await stream_with_snapshot(s, "true", backend="zfs")
        async with Session("shell", node=dead, cwd=str(repo)) as s:
            with pytest.raises(NodeConnectionError):  # nothing ran: no node to snapshot on
                await run_with_snapshot(s, "touch never.txt")
        assert not (repo / "never.txt").exists()
    finally:
        await agent.stop()


async def test_controller_client_lists_drains_and_undrains(tmp_path: Path) -> None:
    node = await start_server(node_config())
    ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{node.port}"],
                                                  token="ctl-secret", node_token=None))
    address = f"127.0.0.1:{node.port}"
    try:
        async with ControllerClient(RemoteNode(f"127.0.0.1:{ctl.port}", token="ctl-secret")) as client:
            listed = await client.list_nodes()
            assert [st.address for st in listed.nodes] == [address]
            drained = await client.drain_node(address, 60_000)
            assert drained.state == pb.NODE_STATE_DRAINING and drained.deadline_unix_nano > 0
            undrained = await client.undrain_node(address)
            assert undrained.state == pb.NODE_STATE_READY
            with pytest.raises(AsmError):  # not a node of the fleet: the server's typed answer
                await client.drain_node("127.0.0.1:1", 1000)
        async with ControllerClient(RemoteNode(f"127.0.0.1:{ctl.port}", token="wrong")) as client:
            with pytest.raises(AsmError) as err:  # the auth metadata is the target's token
                await client.list_nodes()
            assert err.value.reason == "unauthenticated"
    finally:
        await ctl.stop()
        await node.stop()
