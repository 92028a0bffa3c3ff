"""Conformance: the real Claude Code, Codex and Gemini CLIs through a node agent and the controller.

Each CLI runs as it would in production: a node agent process whose environment
points the CLI at the scripted model server on 127.0.0.1 (tests/support/fake_model_server.py),
with a hermetic HOME/TMPDIR (tests/support/cli_env.py); the test drives it with the
controller over gRPC and checks the normalized events and the reduced Result.
The CLIs come from scripts/install_clis.sh; without them these tests skip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asm_controller import Event, RemoteNode, Result, Session
from tests.support.cli_env import CLI_NAMES, cli_env, find_cli, hermetic_env
from tests.support.conformance import OPTIONS, new_workspace, start_cli_node
from tests.support.fake_model_server import FakeModelServer
from tests.support.processes import NodeProcess, pid_alive, start_node_process

pytestmark = pytest.mark.real_cli  # every test here drives an installed CLI (skipped without it)



@pytest.fixture(scope="module")
def model_server() -> Iterator[FakeModelServer]:
    server = FakeModelServer(slow_deltas=40, slow_interval=0.25).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=CLI_NAMES)
def cli_node(request: pytest.FixtureRequest, model_server: FakeModelServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, NodeProcess, Path]]:
    name: str = request.param
    scratch = tmp_path_factory.mktemp(f"conf-{name}")
    node = start_cli_node(name, model_server, scratch)
    workspace = new_workspace(scratch)
    try:
        yield name, node, workspace
    finally:
        node.stop()


def session(cli_node: tuple[str, NodeProcess, Path], **kw: Any) -> Session:
    name, node, workspace = cli_node
    return Session(name, node=RemoteNode(node.address), cwd=str(workspace), options=OPTIONS[name], **kw)


async def run(s: Session, prompt: str, **overrides: Any) -> tuple[list[Event], Result]:
    stream = s.stream(prompt, **overrides)
    events = [ev async for ev in stream]
    assert stream.result is not None
    return events, stream.result


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


async def test_plain_text(cli_node: tuple[str, NodeProcess, Path]) -> None:
    async with session(cli_node) as s:
        events, result = await run(s, "Say hi. SCENARIO_TEXT")
    assert kinds(events)[0] == "run_started" and kinds(events)[-2:] == ["result", "run_completed"]
    assert result.ok, result.error
    assert "Hello from the fake model" in result.text
    assert result.provider_session_id
    assert result.cost.input_tokens > 0 and result.cost.cost_usd > 0
    assert "cost_update" in kinds(events)
    assert result.metadata["node_id"] == f"node-{cli_node[0]}"


async def test_tool_call_and_final_answer(cli_node: tuple[str, NodeProcess, Path]) -> None:
    async with session(cli_node, permission_mode="bypass") as s:
        events, result = await run(s, "Run a command. SCENARIO_TOOL")
    assert result.ok, result.error
    uses = [e for e in events if e.kind == "tool_use"]
    results = [e for e in events if e.kind == "tool_result"]
    assert uses and results
    assert "echo tool-output-123" in str(uses[0].payload["input"])
    assert "tool-output-123" in str(results[0].payload["content"])
    assert results[0].payload["tool_call_id"] == uses[0].payload["tool_call_id"]
    assert not results[0].payload["is_error"]
    assert "tool-output-123" in result.text or "Done" in result.text


async def test_tool_refused_by_permission_mode(cli_node: tuple[str, NodeProcess, Path]) -> None:
    name, _, workspace = cli_node
    mode = {"claude": "default", "codex": "plan", "gemini": "default"}[name]
    target = workspace / "denied-file.txt"
    async with session(cli_node, permission_mode=mode) as s:
        events, result = await run(s, "Write a file. SCENARIO_TOOLWRITE")
    assert result.status == "completed", result.error
    assert not target.exists(), "the permission mode should have stopped the write"
    if name == "claude":
        refused = [e for e in events if e.kind == "tool_result" and e.payload["is_error"]]
        assert refused and "blocked" in str(refused[0].payload["content"])
        assert result.messages[-2].payload["output"].get("permission_denials")
    if name == "gemini":  # without --yolo the shell tool is not even offered
        assert "tool_use" not in kinds(events)


async def test_resume_previous_provider_session(cli_node: tuple[str, NodeProcess, Path],
                                                model_server: FakeModelServer) -> None:
    async with session(cli_node) as s:
        _, first = await run(s, "Remember this. SCENARIO_TEXT")
        assert first.ok and first.provider_session_id
        cp = s.checkpoint
        assert cp is not None and cp.provider_session_id == first.provider_session_id
        model_server.clear()
        stream = s.resume_run("Second turn SCENARIO_TEXT")
        events = [ev async for ev in stream]
        second = stream.result
    assert second is not None and second.ok, second and second.error
    assert second.provider_session_id == first.provider_session_id
    assert "--resume" in str(events[0].payload["args"]) or "resume" in events[0].payload["args"]
    # The model saw the earlier turn in the resumed conversation.
    history = " ".join(str(r.body) for r in model_server.requests if r.method == "POST")
    assert "Remember this" in history


@pytest.mark.parametrize(("scenario", "kind"), [("SCENARIO_ERR500", "transport_error"), ("SCENARIO_ERR401", "auth_error")])
async def test_model_server_errors(cli_node: tuple[str, NodeProcess, Path], scenario: str, kind: str) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with session(cli_node) as s:
        _, result = await run(s, f"Fail please. {scenario}")
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == kind, result.error
    assert loop.time() - t0 < 45


async def test_interrupt_mid_run_then_resume(cli_node: tuple[str, NodeProcess, Path]) -> None:
    name = cli_node[0]
    async with session(cli_node) as s:
        stream = s.stream("Talk slowly. SCENARIO_SLOW")
        pid, seen_text = 0, False
        later: asyncio.Task[None] | None = None
        async for ev in stream:
            if ev.kind == "run_started":
                pid = ev.payload["pid"]
                if name == "codex":
                    # Codex prints its message only when the turn is over (the slow answer takes 10 s):
                    # interrupting on its text raced the run's end, so it is interrupted a moment in.
                    later = asyncio.create_task(_interrupt_after(s, stream.run_id, 1.5))
            if ev.kind in ("assistant_delta", "assistant_message") and not seen_text:
                seen_text = True
                if later is None:
                    await s.interrupt(stream.run_id)
        if later is not None:
            await later
        result = stream.result
        assert result is not None and result.status == "interrupted", result
        assert result.error is not None and result.error.kind == "user_cancelled"
        assert (seen_text or name == "codex") and not pid_alive(pid)
        if result.provider_session_id:  # the provider session stays resumable
            again = s.resume_run("Are you there? SCENARIO_TEXT")
            _ = [ev async for ev in again]
            assert again.result is not None and again.result.ok, again.result and again.result.error


async def _interrupt_after(s: Session, run_id: str, delay: float) -> None:
    await asyncio.sleep(delay)
    await s.interrupt(run_id)


def test_asm_run_cli_with_each_real_cli(cli_node: tuple[str, NodeProcess, Path]) -> None:
    """`asm run --provider <cli> --output jsonl` as a user types it, against a node that has the CLI."""
    import json
    import subprocess
    import sys

    from tests.support.processes import ROOT

    name, node, workspace = cli_node
    opts = [f"--opt={k}={json.dumps(v)}" for k, v in OPTIONS[name].items()]
    proc = subprocess.run(
        [sys.executable, "-m", "asm_cli", "run", "--node", node.address, "--provider", name, "--cwd", str(workspace),
         "--permission-mode", "bypass", "--output", "jsonl", *opts, "Run a command. SCENARIO_TOOL"],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    seen = [line["kind"] for line in lines]
    assert seen[0] == "run_started" and seen[-1] == "result_summary"
    assert {"tool_use", "tool_result", "result"} <= set(seen)
    assert any(k in seen for k in ("assistant_delta", "assistant_message"))
    summary = lines[-1]
    assert summary["status"] == "completed" and summary["cost"]["cost_usd"] > 0
    assert summary["node_id"] == f"node-{name}"


def test_asm_nodes_lists_cli_versions(cli_node: tuple[str, NodeProcess, Path]) -> None:
    import json
    import subprocess
    import sys

    from tests.support.processes import ROOT

    name, node, _ = cli_node
    proc = subprocess.run([sys.executable, "-m", "asm_cli", "nodes", "--node", node.address, "--output", "json",
                           "--provider", name], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    versions = {p["name"]: p["version"] for p in row["providers"] if p["available"]}
    expected = {"claude": "2.1.197", "codex": "0.169.0", "gemini": "0.61.0"}[name]
    assert versions[name] == expected
    assert row["preflight"]["ok"] is True


async def test_intervene_interrupts_then_continues_the_same_session(cli_node: tuple[str, NodeProcess, Path]) -> None:
    async with session(cli_node) as s:
        stream = s.stream("Talk slowly. SCENARIO_SLOW")
        psid = None
        async for ev in stream:
            # Codex sends its agent message whole, at the end: intervene as soon as the
            # provider session exists (and has had a moment to be saved), not at the first text.
            if ev.provider_session_id:
                psid = ev.provider_session_id
                await asyncio.sleep(0.5)
                break
        assert psid, "the CLI reported its session id"
        follow_up = await s.intervene(stream.run_id, "Change of plan. SCENARIO_TEXT")
        events = [ev async for ev in follow_up]
        first = s.result(stream.run_id)
        assert first.status == "interrupted"
        result = follow_up.result
        assert result is not None and result.ok, result and result.error
        assert result.provider_session_id == psid
        assert "Hello from the fake model" in result.text
        assert events[0].kind == "run_started"


async def test_node_lost_resume_continues_the_provider_session_on_another_node(
    model_server: FakeModelServer, tmp_path: Path,
) -> None:
    """on_node_lost="resume" with a shared workspace: the Claude session moves to the surviving node."""
    import signal

    from asm_controller import LivenessConfig

    path = find_cli("claude")
    if path is None:
        pytest.skip("claude CLI not installed (run scripts/install_clis.sh)")
    env = hermetic_env({**cli_env("claude", model_server.base_url, tmp_path), "CLAUDE_CLI_PATH": str(path)})
    a = start_node_process(tmp_path, "--node-id", "resume-a", env=env, inherit=False)
    b = start_node_process(tmp_path, "--node-id", "resume-b", env=env, inherit=False)
    workspace = tmp_path / "shared-ws"
    workspace.mkdir()
    live = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0, node_lost_timeout_s=3.0)
    try:
        nodes = [RemoteNode(a.address, liveness=live), RemoteNode(b.address, liveness=live)]
        async with Session("claude", node=nodes, cwd=str(workspace), on_node_lost="resume") as s:
            stream = s.stream("Talk slowly. SCENARIO_SLOW")
            events: list[Event] = []
            async for ev in stream:
                events.append(ev)
                if ev.kind == "assistant_delta" and a.proc.poll() is None:
                    a.proc.send_signal(signal.SIGKILL)
            result = stream.result
        assert result is not None and result.ok, result and result.error
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert [w.kind for w in result.warnings if w.kind == "node_lost"] == ["node_lost"]
        assert result.metadata["node_address"] == b.address
        assert result.metadata["resumed"][0]["from"] == a.address
        assert result.metadata["resumed"][0]["provider_session_id"] == result.provider_session_id
        assert "Hello from the fake model" in result.text
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("decision", ["allow", "deny"])
async def test_claude_approval_is_delivered_to_the_cli(model_server: FakeModelServer, tmp_path: Path,
                                                       decision: str) -> None:
    """--opt approvals=true: Claude asks over stdio, the session's approve() answers the real CLI."""
    path = find_cli("claude")
    if path is None:
        pytest.skip("claude CLI not installed (run scripts/install_clis.sh)")
    env = hermetic_env({**cli_env("claude", model_server.base_url, tmp_path), "CLAUDE_CLI_PATH": str(path)})
    node = start_node_process(tmp_path, env=env, inherit=False)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    try:
        async with Session("claude", node=RemoteNode(node.address), cwd=str(workspace),
                           options={"approvals": True}) as s:
            stream = s.stream("Write a file. SCENARIO_TOOLWRITE")
            events: list[Event] = []
            async for ev in stream:
                events.append(ev)
                if ev.kind == "approval_requested":
                    assert ev.payload["subject"] == "Bash"
                    assert "touch" in ev.payload["details"]["tool_input"]["command"]
                    await s.approve(ev.payload["approval_id"], decision)
            result = stream.result
        assert result is not None and result.ok, result and result.error
        kinds_seen = [e.kind for e in events]
        assert kinds_seen.count("approval_requested") == 1 and kinds_seen.count("approval_resolved") == 1
        tool_result = next(e for e in events if e.kind == "tool_result")
        created = (workspace / "denied-file.txt").exists()
        if decision == "allow":
            assert created and not tool_result.payload["is_error"]
        else:
            assert not created and tool_result.payload["is_error"]
    finally:
        node.stop()
