"""Deadlines: run_timeout_ms (wall clock), idle_timeout_ms (no output) and the shell's command timeout end a
run with a typed ``timeout`` whose reason says which one fired; the node's defaults by flag; an approval's
wait is not idleness; a run's approval_timeout_ms is honoured."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from asm_controller import EmbeddedNode, Event, RemoteNode, Result, Session
from asm_node import NodeAgent
from asm_node.testing import ScriptedProvider, running_agent
from asm_wire import AsmError, ConfigError, pb
from tests.support.processes import PYTHON_BASENAME, NodeProcess, node_config, pid_alive
from tests.support.providers import approval_provider


def _ticker(n: int, every_s: float) -> str:
    """A shell prompt: Python prints a line every ``every_s`` seconds, ``n`` times (no shell metacharacters)."""
    return (f"{PYTHON_BASENAME} -c \"[print(i, flush=True) or __import__('time').sleep({every_s}) "
            f"for i in range({n})]\"")


async def _run(s: Session, prompt: str, **overrides: Any) -> tuple[list[Event], Result]:
    stream = s.stream(prompt, **overrides)
    events = [ev async for ev in stream]
    assert stream.result is not None
    return events, stream.result


@pytest.mark.parametrize(("option", "reason", "named"), [
    ("run_timeout_ms", "run_timeout", "run_timeout_ms of 600 ms"),
    ("idle_timeout_ms", "idle_timeout", "idle_timeout_ms of 600 ms"),
    ("command_timeout_ms", "command_timeout", "command_timeout_ms of 600 ms"),
])
@pytest.mark.slow
async def test_each_deadline_ends_the_run_with_a_typed_timeout(agent: NodeAgent, option: str, reason: str,
                                                               named: str) -> None:
    async with Session("shell", node=EmbeddedNode(agent), options={option: 600}) as s:
        t0 = time.monotonic()
        events, result = await _run(s, "sleep 30")
    elapsed = time.monotonic() - t0
    assert 0.5 < elapsed < 5, elapsed
    assert result.status == "failed"
    assert result.error is not None and (result.error.kind, result.error.reason) == ("timeout", reason), result.error
    assert named in result.error.message and "stopped" in result.error.message
    assert result.to_summary()["error"]["reason"] == reason
    pid = events[0].payload["pid"]
    assert not pid_alive(pid), "the CLI outlived its deadline"
    info = await agent.get_run(pb.GetRunRequest(run_id=result.run_id))
    assert info.status == pb.RUN_STATUS_FAILED


@pytest.mark.slow
async def test_output_keeps_a_run_from_being_idle(agent: NodeAgent) -> None:
    """A line every 0.2 s for 3 s under idle_timeout_ms=1500: never idle, it completes; the run deadline is
    separate. (The margins are wide: a loaded machine starts the ticker's interpreter late.)"""
    async with Session("shell", node=EmbeddedNode(agent), options={"idle_timeout_ms": 1500}) as s:
        _, ok = await _run(s, _ticker(15, 0.2))
        assert ok.ok, ok.error
        assert ok.text.split() == [str(i) for i in range(15)]
        _, late = await _run(s, _ticker(40, 0.2), options={"run_timeout_ms": 2500})
    assert late.error is not None and late.error.reason == "run_timeout"
    shown = late.text.split()
    assert 1 <= len(shown) < 40 and shown == [str(i) for i in range(len(shown))], "the output before the deadline is kept"


@pytest.mark.parametrize("bad", [0, -5, 1.5, "soon", True, 10**13, [1]])
async def test_a_bad_deadline_is_config_invalid(agent: NodeAgent, bad: object) -> None:
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        for option in ("run_timeout_ms", "idle_timeout_ms"):
            result = await s.query("true", options={option: bad})
            assert isinstance(result.error, ConfigError), result.error
            assert result.error.reason == "invalid_deadline" and option in result.error.message
    assert agent.active_runs() == 0


class _Recording(ScriptedProvider):
    """Records the options it is asked to validate."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines)
        self.seen: list[dict[str, Any]] = []

    def validate_options(self, options: Any, permission_mode: str) -> dict[str, Any]:
        self.seen.append(dict(options))
        return dict(options)


@pytest.mark.slow
async def test_the_deadlines_never_reach_the_provider(agent: NodeAgent) -> None:
    """The node takes them out before the provider validates: a provider need not know the names (the shell
    provider, which refuses unknown options, accepts them)."""
    provider = _Recording(["hello"])
    async with running_agent(node_config(), providers={"scripted": provider}) as other, \
            Session("scripted", node=EmbeddedNode(other)) as s:
        result = await s.query("go", options={"run_timeout_ms": 5000, "idle_timeout_ms": "5000", "keep": 1})
    assert result.ok, result.error
    assert provider.seen == [{"keep": 1}]
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        result = await s.query("echo hi", options={"run_timeout_ms": "5000", "idle_timeout_ms": 5000})
    assert result.ok and result.text == "hi\n"


@pytest.mark.slow
async def test_node_defaults_apply_and_a_run_replaces_them() -> None:
    async with running_agent(node_config(run_timeout_ms=700)) as agent, \
            Session("shell", node=EmbeddedNode(agent)) as s:
        _, cut = await _run(s, "sleep 30")
        assert cut.error is not None and cut.error.reason == "run_timeout" and "700 ms" in cut.error.message
        _, longer = await _run(s, "sleep 1", options={"run_timeout_ms": 5000})
        assert longer.ok, longer.error
    async with running_agent(node_config(idle_timeout_ms=600)) as agent, \
            Session("shell", node=EmbeddedNode(agent)) as s:
        _, idle = await _run(s, "sleep 30")
    assert idle.error is not None and idle.error.reason == "idle_timeout"


@pytest.fixture
async def approval_agent() -> AsyncIterator[NodeAgent]:
    async with running_agent(node_config(), providers={"scripted": approval_provider()}) as agent:
        yield agent


@pytest.mark.slow
async def test_a_pending_approval_is_not_idle(approval_agent: NodeAgent) -> None:
    """idle_timeout_ms=500 while an approval waits 1.5 s for its answer: the run is not stopped."""
    async with Session("scripted", node=EmbeddedNode(approval_agent), options={"idle_timeout_ms": 500},
                       approval_timeout_ms=60_000) as s:
        stream = s.stream("go")
        events: list[Event] = []
        async for ev in stream:
            events.append(ev)
            if ev.kind == "approval_requested":
                await asyncio.sleep(1.5)
                await s.approve(ev.payload["approval_id"], "allow")
                await approval_agent.send_input(pb.SendInputRequest(run_id=stream.run_id, data=b"ok\n", end_input=True))
        result = stream.result
    assert result is not None and result.ok, result and result.error
    assert [e.payload["decision"] for e in events if e.kind == "approval_resolved"] == ["allow"]


@pytest.mark.slow
async def test_silence_after_the_answer_is_idle_again(approval_agent: NodeAgent) -> None:
    """Once the approval is answered the idle clock runs again: the CLI waits for input that never comes."""
    async with Session("scripted", node=EmbeddedNode(approval_agent), options={"idle_timeout_ms": 600},
                       approval_timeout_ms=60_000) as s:
        stream = s.stream("go")
        async for ev in stream:
            if ev.kind == "approval_requested":
                await s.approve(ev.payload["approval_id"], "allow")
        result = stream.result
    assert result is not None and result.error is not None and result.error.reason == "idle_timeout"


@pytest.mark.slow
async def test_a_deadline_denies_the_pending_approval(approval_agent: NodeAgent) -> None:
    async with Session("scripted", node=EmbeddedNode(approval_agent), options={"run_timeout_ms": 800},
                       approval_timeout_ms=60_000) as s:
        events, result = await _run(s, "go")
    resolved = [(e.payload["decision"], e.payload["reason"]) for e in events if e.kind == "approval_resolved"]
    assert resolved == [("deny", "run_timeout")]
    assert result.error is not None and result.error.reason == "run_timeout"


@pytest.mark.slow
async def test_the_run_approval_timeout_is_honoured(approval_agent: NodeAgent) -> None:
    """The node's default is 120 s; the run asks for 1 s: denied after about a second, with a warning."""
    async with Session("scripted", node=EmbeddedNode(approval_agent), approval_timeout_ms=1000,
                       options={"run_timeout_ms": 10_000}) as s:
        t0 = time.monotonic()
        stream = s.stream("go")
        resolved_at = 0.0
        events: list[Event] = []
        async for ev in stream:
            events.append(ev)
            if ev.kind == "approval_resolved":
                resolved_at = time.monotonic() - t0
                await s.interrupt(stream.run_id)
        result = stream.result
    assert 0.9 < resolved_at < 5, resolved_at
    assert [(e.payload["decision"], e.payload["reason"]) for e in events if e.kind == "approval_resolved"] == [
        ("deny", "timeout")]
    assert result is not None
    warnings = [(w.kind, w.reason) for w in result.warnings]
    assert ("approval_denied", "approval_timeout") in warnings, result.warnings
    assert "1000 ms" in next(w.message for w in result.warnings if w.kind == "approval_denied")


@pytest.mark.slow
async def test_the_node_default_approval_timeout_applies_when_the_run_sets_none() -> None:
    async with running_agent(node_config(approval_timeout_ms=1000), providers={"scripted": approval_provider()}) as agent, \
            Session("scripted", node=EmbeddedNode(agent), options={"run_timeout_ms": 10_000}) as s:
        stream = s.stream("go")
        async for ev in stream:
            if ev.kind == "approval_resolved":
                assert ev.payload["reason"] == "timeout"
                await s.interrupt(stream.run_id)
        assert stream.result is not None and any(w.reason == "approval_timeout" for w in stream.result.warnings)


async def test_approval_timeout_bounds(approval_agent: NodeAgent) -> None:
    with pytest.raises(ValidationError):
        node_config(approval_timeout_ms=500)  # the node default: 1 s .. 24 h
    with pytest.raises(ValidationError):
        node_config(approval_timeout_ms=25 * 3600 * 1000)
    async with Session("scripted", node=EmbeddedNode(approval_agent)) as s:
        with pytest.raises(ConfigError):  # the controller's own check
            await s.query("go", approval_timeout_ms=25 * 3600 * 1000)
    with pytest.raises(AsmError) as err:  # the wire field, straight to the node
        await approval_agent.start_run(pb.StartRunRequest(run_id="too-long", provider="scripted", prompt="go",
                                                          approval_timeout_ms=2**32 - 1)).__anext__()
    assert err.value.kind == "config_invalid" and "24 h" in err.value.message


@pytest.mark.slow
@pytest.mark.parametrize("name", ["codex", "gemini", "amp"])
async def test_approvals_where_the_cli_never_asks_is_config_invalid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Codex exec, Gemini headless and Amp --execute cannot be asked: refused with the reason, before any spawn."""
    env = {"codex": "CODEX_PATH", "gemini": "GEMINI_CLI_PATH", "amp": "AMP_CLI_PATH"}[name]
    monkeypatch.setenv(env, "/bin/true")  # "installed", so the refusal is about approvals
    async with running_agent(node_config()) as agent, Session(name, node=EmbeddedNode(agent)) as s:
        result = await s.query("hi", options={"approvals": True})
    err = result.error
    assert isinstance(err, ConfigError) and err.reason == "approvals_unsupported", err
    assert "cannot ask for approvals" in err.message and "--permission-mode" in err.message


# -- the flags of a served node ------------------------------------------------------------------


@pytest.mark.slow
def test_node_serve_deadline_flags(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_process("--run-timeout", "1s", "--approval-timeout", "2m")

    async def go() -> Result:
        async with Session("shell", node=RemoteNode(node.address)) as s:
            return await s.query("sleep 30")

    t0 = time.monotonic()
    result = asyncio.run(go())
    assert time.monotonic() - t0 < 8
    assert result.error is not None and (result.error.kind, result.error.reason) == ("timeout", "run_timeout")
    assert "1000 ms" in result.error.message


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--approval-timeout", "500ms", "out of range: from 1s to 24h"),
    ("--approval-timeout", "25h", "out of range"),
    ("--run-timeout", "soon", "expects a duration"),
    ("--idle-timeout", "0", "out of range"),
])
@pytest.mark.slow
def test_node_serve_refuses_a_bad_duration(tmp_path: Path, flag: str, value: str, message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "asm_cli", "node", "serve", "--listen", "127.0.0.1:0", flag, value,
                           "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and flag in proc.stderr and "Traceback" not in proc.stderr


def test_durations_on_the_command_line() -> None:
    from asm_cli.commands._duration import bounded_duration_ms, parse_duration_ms

    assert [parse_duration_ms(t, "--x") for t in ("90", "1.5", "500ms", "30s", "2m", "1h30m", " 1H ")] == [
        90_000, 1_500, 500, 30_000, 120_000, 5_400_000, 3_600_000]
    for bad in ("", "soon", "1x", "m", "1h 30m", "-1s", "1e3"):
        with pytest.raises(ConfigError, match="expects a duration"):
            parse_duration_ms(bad, "--x")
    with pytest.raises(ConfigError, match="out of range: from 1s to 24h") as err:
        bounded_duration_ms("25h", "--approval-timeout", 1000, 24 * 3600 * 1000)
    assert err.value.kind == "config_invalid"


@pytest.mark.slow
async def test_a_cli_that_ignores_sigint_is_still_stopped(agent: NodeAgent) -> None:
    """The deadline escalates as an interrupt does: SIGINT, then SIGTERM (test graces: 1 s each)."""
    stubborn = f"{PYTHON_BASENAME} -c \"__import__('signal').signal(2, 1) and __import__('time').sleep(30)\""
    async with Session("shell", node=EmbeddedNode(agent), options={"run_timeout_ms": 500}) as s:
        t0 = time.monotonic()
        events, result = await _run(s, stubborn)
    assert 1.4 < time.monotonic() - t0 < 6, "SIGINT alone cannot have stopped it; SIGTERM must have"
    assert result.error is not None and result.error.reason == "run_timeout"
    assert not pid_alive(events[0].payload["pid"])
