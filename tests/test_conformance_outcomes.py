"""Honest outcomes with the real Claude Code, Codex and Gemini CLIs (issue 14), through a node agent
process and the controller, against the scripted model server: a tool call the permission mode or
sandbox refuses (file not created, the denial in the result event's output and as a warning), resumed
threads charged per run, an untrusted directory, plan mode, and the CLIs' start-up report as the
typed ``provider_init`` event.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asm_controller import Event, RemoteNode, Result, Session
from tests.support.cli_env import CLI_NAMES, GEMINI_MODEL
from tests.support.conformance import OPTIONS, start_cli_node
from tests.support.fake_model_server import FakeModelServer
from tests.support.processes import NodeProcess

pytestmark = pytest.mark.real_cli  # every test here drives an installed CLI (skipped without it)

#: The fake model server's usage for one request (tests/support/fake_model_server.py).
ONE_REQUEST = (100, 20)


@pytest.fixture(scope="module")
def model_server() -> Iterator[FakeModelServer]:
    server = FakeModelServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=CLI_NAMES)
def cli_node(request: pytest.FixtureRequest, model_server: FakeModelServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, NodeProcess, Path]]:
    name: str = request.param
    scratch = tmp_path_factory.mktemp(f"outcomes-{name}")
    node = start_cli_node(name, model_server, scratch)
    try:
        yield name, node, scratch
    finally:
        node.stop()


def workspace(scratch: Path, label: str) -> Path:
    ws = scratch / f"ws-{label}"
    ws.mkdir(exist_ok=True)
    return ws


async def run(s: Session, prompt: str, **overrides: Any) -> tuple[list[Event], Result]:
    stream = s.stream(prompt, **overrides)
    events = [ev async for ev in stream]
    assert stream.result is not None
    return events, stream.result


def result_output(events: list[Event]) -> dict[str, Any]:
    out = next(e for e in events if e.kind == "result").payload["output"]
    assert isinstance(out, dict)
    return out


def denial_warnings(result: Result) -> list[str]:
    return [w.message for w in result.warnings if w.kind == "permission_denied"]


async def test_denial_without_bypass(cli_node: tuple[str, NodeProcess, Path]) -> None:
    name, node, scratch = cli_node
    ws = workspace(scratch, "denial")
    target = ws / "denied-file.txt"
    async with Session(name, node=RemoteNode(node.address), cwd=str(ws), options=OPTIONS[name]) as s:
        events, result = await run(s, "Write a file. SCENARIO_TOOLWRITE")
    assert result.status == "completed", result.error
    assert not target.exists(), "the permission mode should have stopped the write"
    output = result_output(events)
    if name == "gemini":
        # Headless Gemini does not offer its shell tool without --yolo: nothing was attempted, nothing denied.
        assert "tool_use" not in [e.kind for e in events]
        assert "denials" not in output and not denial_warnings(result)
        return
    denials = output["denials"]
    assert len(denials) == 1 and set(denials[0]) == {"tool", "input", "reason"}
    assert denials[0]["tool"] == "Bash" and "touch denied-file.txt" in denials[0]["input"]["command"]
    assert output["all_tools_denied"] is True
    warnings = denial_warnings(result)
    assert len(warnings) == 1 and "Bash" in warnings[0] and "touch denied-file.txt" in warnings[0]
    if name == "codex":  # codex prints nothing about the refusal: the node read it from the thread's rollout
        assert "sandbox" in denials[0]["reason"] and "Read-only file system" in denials[0]["reason"]


async def test_resume_is_charged_per_run(cli_node: tuple[str, NodeProcess, Path]) -> None:
    name, node, scratch = cli_node
    ws = workspace(scratch, "resume")
    per_run: list[tuple[int, int]] = []
    async with Session(name, node=RemoteNode(node.address), cwd=str(ws), options=OPTIONS[name]) as s:
        _, first = await run(s, "Turn one. SCENARIO_TEXT")
        assert first.ok, first.error
        per_run.append((first.cost.input_tokens, first.cost.output_tokens))
        for turn in ("two", "three"):
            stream = s.resume_run(f"Turn {turn}. SCENARIO_TEXT")
            events = [ev async for ev in stream]
            assert stream.result is not None and stream.result.ok, stream.result and stream.result.error
            assert stream.result.provider_session_id == first.provider_session_id
            costs = [e.payload for e in events if e.kind == "cost_update"]
            assert len(costs) == 1
            per_run.append((int(costs[0]["input_tokens"]), int(costs[0]["output_tokens"])))
        total = s.cost
    # One request per run (the fake answers each with 100/20): every run is charged its own, never the
    # thread's total so far (Codex reports 100/20, 200/40, 300/60 for these three).
    assert per_run == [ONE_REQUEST] * 3, per_run
    assert (total.input_tokens, total.output_tokens) == (300, 60)


async def test_plan_mode_does_not_write(cli_node: tuple[str, NodeProcess, Path]) -> None:
    name, node, scratch = cli_node
    ws = workspace(scratch, "plan")
    async with Session(name, node=RemoteNode(node.address), cwd=str(ws), options=OPTIONS[name],
                       permission_mode="plan") as s:
        events, result = await run(s, "Write a file. SCENARIO_TOOLWRITE")
    assert not (ws / "denied-file.txt").exists()
    assert result.status == "completed", result.error
    output = result_output(events)
    if name == "codex":  # --sandbox read-only: the write is refused and said so
        assert output["denials"][0]["tool"] == "Bash" and denial_warnings(result)


async def test_start_up_report_is_a_typed_provider_init(cli_node: tuple[str, NodeProcess, Path]) -> None:
    name, node, scratch = cli_node
    ws = workspace(scratch, "init")
    async with Session(name, node=RemoteNode(node.address), cwd=str(ws), options=OPTIONS[name]) as s:
        events, result = await run(s, "Say hi. SCENARIO_TEXT")
    assert result.ok, result.error
    inits = [e for e in events if e.kind == "provider_init"]
    assert len(inits) == 1
    init = inits[0].payload
    if name == "claude":
        assert init["cwd"] == str(ws) and init["permission_mode"] == "default"
        assert "Bash" in init["tools"] and init["cli_version"].startswith("2.")
        assert init["model"]
    elif name == "gemini":
        assert init["model"] == GEMINI_MODEL
    else:
        assert init["details"] == {"thread_id": result.provider_session_id}
        # The prompt went in on stdin, closed after it: codex has nothing to say about stdin.
        assert "Hello from the fake model" in result.text
        assert not [e for e in events if e.kind == "stderr" and "additional input" in str(e.payload)]
    assert len(inits[0].pb.provider_init.details_json.encode()) <= 16 * 1024


# -- an untrusted directory: what each CLI honestly does -------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"permission_mode": "plan"}, {"options": {"sandbox": "workspace-write"}}],
                         ids=["default", "plan", "workspace-write"])
async def test_codex_outside_a_git_repository_is_config_invalid_with_the_hint(
        model_server: FakeModelServer, tmp_path: Path, overrides: dict[str, Any]) -> None:
    node = start_cli_node("codex", model_server, tmp_path)
    ws = workspace(tmp_path, "untrusted")
    try:
        async with Session("codex", node=RemoteNode(node.address), cwd=str(ws), **overrides) as s:
            events, result = await run(s, "Say hi. SCENARIO_TEXT")
    finally:
        node.stop()
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == "config_invalid", result.error
    assert "--opt skip_git_repo_check=true" in result.error.message and "git repository" in result.error.message
    assert "Reading additional input from stdin" not in result.error.message
    assert not [e for e in events if "additional input" in str(e.payload)]


async def test_gemini_in_an_untrusted_folder_is_config_invalid(model_server: FakeModelServer, tmp_path: Path) -> None:
    node = start_cli_node("gemini", model_server, tmp_path, GEMINI_CLI_TRUST_WORKSPACE=None)
    ws = workspace(tmp_path, "untrusted")
    try:
        async with Session("gemini", node=RemoteNode(node.address), cwd=str(ws), options=OPTIONS["gemini"]) as s:
            _, result = await run(s, "Say hi. SCENARIO_TEXT")
    finally:
        node.stop()
    assert result.error is not None and result.error.kind == "config_invalid", result.error
    assert "GEMINI_CLI_TRUST_WORKSPACE=true" in result.error.message


async def test_claude_runs_in_a_directory_that_is_not_a_git_repository(model_server: FakeModelServer,
                                                                        tmp_path: Path) -> None:
    node = start_cli_node("claude", model_server, tmp_path)
    ws = workspace(tmp_path, "no-git")
    try:
        async with Session("claude", node=RemoteNode(node.address), cwd=str(ws)) as s:
            _, result = await run(s, "Say hi. SCENARIO_TEXT")
    finally:
        node.stop()
    assert not (ws / ".git").exists()
    assert result.ok, result.error  # Claude Code has no trust check in --print mode


async def test_codex_takes_a_prompt_longer_than_an_argument_may_be(model_server: FakeModelServer,
                                                                   tmp_path: Path) -> None:
    # Linux refuses one argv string over 128 KiB (E2BIG): the prompt goes in on stdin instead.
    node = start_cli_node("codex", model_server, tmp_path)
    ws = workspace(tmp_path, "long")
    try:
        async with Session("codex", node=RemoteNode(node.address), cwd=str(ws), options=OPTIONS["codex"]) as s:
            _, result = await run(s, "Say hi. SCENARIO_TEXT " + "filler " * 25_000)
    finally:
        node.stop()
    assert result.ok, result.error
    assert "Hello from the fake model" in result.text
