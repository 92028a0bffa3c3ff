"""Typed terminal kinds: a drain deadline and a node shutdown are not the user's Ctrl-C.

Real ``asm node serve`` processes and the ``asm`` CLI as a subprocess: a run
past its node's drain deadline ends with ``node_draining``, a run whose node
gets SIGTERM with ``node_shutdown``, both ``interrupted`` and exit code 4
("the node stopped the run: retry elsewhere"); Ctrl-C still exits 130 with
``user_cancelled``. With ``on_node_lost="resume"`` both move the run's provider
session to another node, like a lost node.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asm_controller import Event, LivenessConfig, RemoteNode, Session
from asm_wire import KINDS, AsmError, pb
from tests.support.cli import ASM, asm, jsonl
from tests.support.cli_env import cli_env, find_cli, hermetic_env
from tests.support.processes import ROOT, NodeProcess, start_node_process

EXIT_NODE_STOPPED = 4


def _start_run(node: NodeProcess, command: str = "sleep 30") -> tuple[subprocess.Popen[str], int]:
    """``asm run --output jsonl`` in the background, once its CLI runs on the node (returns the CLI's pid)."""
    proc = subprocess.Popen([*ASM, "run", "--node", node.address, "--provider", "shell", "--output", "jsonl", command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    assert first["kind"] == "run_started"
    return proc, int(first["payload"]["pid"])


def _summary(out: str) -> dict[str, Any]:
    summary = jsonl(out)[-1]
    assert summary["kind"] == "result_summary"
    return summary


def test_kinds_are_typed_and_map_to_unavailable() -> None:
    import grpc

    for kind in ("node_draining", "node_shutdown"):
        assert kind in KINDS
        err = AsmError("x", kind=kind)
        assert err.grpc_status() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
def test_drain_deadline_ends_the_run_with_node_draining(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    proc, _pid = _start_run(node)
    t0 = time.monotonic()
    drain = asm("node", "drain", "--node", node.address, "--deadline", "1")
    assert drain.returncode == 0, drain.stderr
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_NODE_STOPPED, err
    assert time.monotonic() - t0 < 15
    summary = _summary(out)
    assert summary["status"] == "interrupted"
    assert summary["error"]["kind"] == "node_draining", summary["error"]
    assert "drain" in summary["error"]["message"]
    # The node's own record agrees: the run was interrupted, and its final error says why.
    node_error = [e for e in jsonl(out) if e["kind"] == "error"][-1]
    assert node_error["payload"]["code"] == "node_draining"
    assert "Traceback" not in err


@pytest.mark.slow
def test_node_sigterm_ends_the_run_with_node_shutdown(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    proc, _pid = _start_run(node)
    node.proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_NODE_STOPPED, err
    summary = _summary(out)
    assert summary["status"] == "interrupted"
    assert summary["error"]["kind"] == "node_shutdown", summary["error"]
    assert "shutting down" in summary["error"]["message"]
    assert node.proc.wait(15) == 0
    assert "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_is_still_user_cancelled_and_130(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    proc, _pid = _start_run(node)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    summary = _summary(out)
    assert summary["status"] == "interrupted" and summary["error"]["kind"] == "user_cancelled"


@pytest.mark.slow
async def test_resume_path_is_taken_for_a_drained_run(node_process: Callable[..., NodeProcess]) -> None:
    """on_node_lost="resume" applies to node_draining: the run tries to move (a shell run has no
    provider session to continue, so it ends typed, saying so)."""
    a, b = node_process("--node-id", "drain-a"), node_process("--node-id", "drain-b")
    async with Session("shell", node=[RemoteNode(a.address), RemoteNode(b.address)], on_node_lost="resume") as s:
        stream = s.stream("sleep 30")
        events: list[Event] = []
        async for ev in stream:
            events.append(ev)
            if ev.kind == "run_started":
                from asm_controller import GrpcNodeClient

                client = GrpcNodeClient(RemoteNode(a.address))
                try:
                    await client.drain(pb.DrainRequest(deadline_ms=300))
                finally:
                    await client.close()
        result = stream.result
    assert result is not None and result.error is not None
    assert result.error.kind == "node_draining" and result.status == "interrupted"
    assert "no provider session id to resume" in result.error.message
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind == "run_completed"


@pytest.mark.real_cli
@pytest.mark.parametrize("how", ["drain", "sigterm"])
async def test_claude_session_resumes_on_another_node(tmp_path: Path, how: str) -> None:
    """The real Claude CLI against the scripted model server: a drained (or stopped) node's run
    continues its provider session on the other node, in the same stream."""
    from asm_controller import GrpcNodeClient
    from tests.support.fake_model_server import FakeModelServer

    path = find_cli("claude")
    if path is None:
        pytest.skip("claude CLI not installed (run scripts/install_clis.sh)")
    server = FakeModelServer(slow_deltas=40, slow_interval=0.25).start()
    env = hermetic_env({**cli_env("claude", server.base_url, tmp_path), "CLAUDE_CLI_PATH": str(path)})
    a = start_node_process(tmp_path, "--node-id", "stop-a", env=env, inherit=False)
    b = start_node_process(tmp_path, "--node-id", "stop-b", env=env, inherit=False)
    workspace = tmp_path / "shared-ws"
    workspace.mkdir()
    live = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0, node_lost_timeout_s=3.0)
    try:
        nodes = [RemoteNode(a.address, liveness=live), RemoteNode(b.address, liveness=live)]
        async with Session("claude", node=nodes, cwd=str(workspace), on_node_lost="resume") as s:
            stream = s.stream("Talk slowly. SCENARIO_SLOW")
            events: list[Event] = []
            stopped = False
            async for ev in stream:
                events.append(ev)
                if ev.kind == "assistant_delta" and not stopped:
                    stopped = True
                    if how == "drain":
                        client = GrpcNodeClient(RemoteNode(a.address))
                        try:
                            await client.drain(pb.DrainRequest(deadline_ms=200))
                        finally:
                            await client.close()
                    else:
                        a.proc.send_signal(signal.SIGTERM)
            result = stream.result
        kind = "node_draining" if how == "drain" else "node_shutdown"
        assert result is not None and result.ok, result and result.error
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert kind in [w.kind for w in result.warnings]
        assert result.metadata["node_address"] == b.address
        assert result.metadata["resumed"][0]["from"] == a.address
        assert result.metadata["resumed"][0]["provider_session_id"] == result.provider_session_id
        assert "Hello from the fake model" in result.text
    finally:
        a.stop()
        b.stop()
        server.stop()


@pytest.mark.real_cli
async def test_a_resumed_run_never_goes_back_to_a_node_it_left(tmp_path: Path) -> None:
    """At most one resume per node: drained off a, resumed on b, a undrained, then b drained too -- the
    run ends instead of bouncing back to a (it used to exclude only the node it had just left)."""
    from asm_controller import GrpcNodeClient
    from tests.support.fake_model_server import FakeModelServer

    path = find_cli("claude")
    if path is None:
        pytest.skip("claude CLI not installed (run scripts/install_clis.sh)")
    server = FakeModelServer(slow_deltas=40, slow_interval=0.25).start()
    env = hermetic_env({**cli_env("claude", server.base_url, tmp_path), "CLAUDE_CLI_PATH": str(path)})
    a = start_node_process(tmp_path, "--node-id", "bounce-a", env=env, inherit=False)
    b = start_node_process(tmp_path, "--node-id", "bounce-b", env=env, inherit=False)
    workspace = tmp_path / "shared-ws"
    workspace.mkdir()
    live = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0, node_lost_timeout_s=3.0)

    async def admin(address: str, request: pb.DrainRequest | None) -> None:
        client = GrpcNodeClient(RemoteNode(address))
        try:
            await (client.drain(request) if request is not None else client.undrain(pb.UndrainRequest()))
        finally:
            await client.close()

    try:
        nodes = [RemoteNode(a.address, liveness=live), RemoteNode(b.address, liveness=live)]
        async with Session("claude", node=nodes, cwd=str(workspace), on_node_lost="resume") as s:
            # The resumed turn must be slow too, so that b can be drained while it runs.
            stream = s.stream("Talk slowly. SCENARIO_SLOW", resume_prompt="Go on slowly. SCENARIO_SLOW")
            step = 0
            async for ev in stream:
                if ev.kind == "assistant_delta" and step == 0:
                    step = 1
                    await admin(a.address, pb.DrainRequest(deadline_ms=200))
                elif ev.kind == "assistant_delta" and step == 2:
                    step = 3  # now on b, a is ready again: drain b
                    await admin(b.address, pb.DrainRequest(deadline_ms=200))
                elif ev.kind == "error" and step == 1 and "resuming" in str(ev.payload.get("message")):
                    step = 2
                    await admin(a.address, None)
            result = stream.result
        assert step == 3
        assert result is not None and result.error is not None, result
        assert result.error.kind == "node_draining", result.error  # ended: no node left to resume on
        assert result.metadata["node_address"] == b.address
        client = GrpcNodeClient(RemoteNode(a.address))
        try:
            runs = (await client.list_runs(pb.ListRunsRequest())).runs
        finally:
            await client.close()
        assert len(runs) == 1, [r.run_id for r in runs]  # a never got the run back
    finally:
        a.stop()
        b.stop()
        server.stop()
