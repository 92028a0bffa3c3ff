"""Steering a run (issue 14, 7): Session.send_input / SendInput / ``asm input``, without a real CLI.

The turn accounting of the Claude parser is tested on lines as Claude Code 2.1 prints them with
``--input-format stream-json --replay-user-messages`` (measured: a message steered in while an
answer streams is echoed with ``isReplay`` after that answer's ``result`` and gets a turn and a
``result`` of its own; one steered in while tools run is echoed before the turn's only ``result``;
``total_cost_usd`` is cumulative per process). The run path uses a fake ``claude`` that behaves the
same way (tests/support/fake_claude.py); the real CLI is in tests/test_conformance_steering.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asm_controller import EmbeddedNode, EventReducer, Session
from asm_controller._events import Event
from asm_node import NodeAgent
from asm_node.providers.base import RunSpec
from asm_node.providers.claude import ClaudeProvider
from asm_node.run import MAX_INPUT_BACKLOG_BYTES, MAX_INPUT_BYTES
from asm_node.testing import ScriptedProvider, running_agent, test_config
from asm_wire import KIND_NAMES, AsmError, ConfigError, RunNotFound, pb
from tests.support.fake_claude import install_fake_claude

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture
def fake_claude(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = install_fake_claude(tmp_path)
    monkeypatch.setenv("CLAUDE_CLI_PATH", str(script))
    return script


@pytest.fixture
async def claude_agent(fake_claude: Path) -> Any:
    async with running_agent(test_config()) as agent:
        yield agent


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def replay(text: str) -> bytes:
    return line({"type": "user", "isReplay": True, "message": {"role": "user", "content": [{"type": "text", "text": text}]}})


def answer(mid: str, text: str) -> bytes:
    return line({"type": "assistant", "message": {"id": mid, "content": [{"type": "text", "text": text}]}})


def result(total_usd: float, text: str = "", **extra: Any) -> bytes:
    return line({"type": "result", "subtype": "success", "is_error": False, "result": text,
                 "usage": {"input_tokens": 100, "output_tokens": 20}, "total_cost_usd": total_usd, **extra})


def claude_parser(**options: Any) -> Any:
    provider = ClaudeProvider()
    spec = RunSpec(run_id="r1", session_id="s1", provider="claude", prompt="hi", cwd="/tmp", permission_mode="default",
                   options=provider.validate_options(options, "default"), env=dict(os.environ))
    return provider.new_parser(spec)


def kinds(events: list[pb.Event]) -> list[str]:
    return [KIND_NAMES[e.kind] for e in events]


def reduce(events: list[pb.Event]) -> Any:
    reducer = EventReducer("r1", "s1", "claude")
    for i, ev in enumerate([*events, pb.Event(kind=pb.EVENT_KIND_RUN_COMPLETED,
                                              run_completed=pb.RunCompleted(status="completed"))], 1):
        ev.seq = i
        reducer.apply(Event(ev))
    return reducer.result()


# -- the parser's turn accounting -------------------------------------------------------


def test_a_message_steered_mid_answer_gets_its_own_turn_and_the_run_ends_after_it() -> None:
    parser = claude_parser()
    out: list[pb.Event] = []
    parser.feed_lines([replay("hi"), answer("m1", "first")], out)
    steered = parser.input_message(b"STEERED-TEXT-42")
    assert json.loads(steered) == {"type": "user", "message": {"role": "user", "content": [
        {"type": "text", "text": "STEERED-TEXT-42"}]}}
    parser.feed_lines([result(0.001, "first")], out)
    assert not parser.terminal  # the steered message is still to be answered
    assert kinds(out) == ["assistant_message", "cost_update"]
    parser.feed_lines([replay("STEERED-TEXT-42"), answer("m2", "second"), result(0.003, "second")], out)
    assert parser.terminal and not parser.failed
    assert kinds(out) == ["assistant_message", "cost_update", "user_message", "assistant_message", "cost_update",
                          "result"]
    res = reduce(out)
    # The cumulative 0.003 is charged once: 0.001 for the first turn, 0.002 for the second.
    assert res.cost.cost_usd == pytest.approx(0.003) and res.cost.input_tokens == 200
    assert "first" in res.text and res.text.endswith("second")


def test_a_message_steered_while_tools_run_joins_the_turn() -> None:
    parser = claude_parser()
    out: list[pb.Event] = []
    parser.feed_lines([replay("hi"), answer("m1", "running a tool")], out)
    parser.input_message(b"also this")
    parser.feed_lines([replay("also this"), answer("m2", "done, and also this")], out)
    parser.feed_lines([result(0.002, "done")], out)
    assert parser.terminal  # the CLI took it before its only result: nothing more to wait for


def test_a_failed_turn_ends_the_run_even_with_a_steered_message_pending() -> None:
    parser = claude_parser()
    out: list[pb.Event] = []
    parser.input_message(b"more")
    parser.feed_lines([replay("hi"), line({"type": "result", "subtype": "success", "is_error": True,
                                           "api_error_status": 500, "result": "API Error: 500"})], out)
    assert parser.terminal and parser.failed


def test_a_capture_without_replays_ends_at_its_result() -> None:
    """A CLI run with the prompt on argv (steering=False; recorded fixtures) prints no replays."""
    parser = claude_parser(steering=False)
    out: list[pb.Event] = []
    parser.feed_lines([answer("m1", "hello"), result(0.001, "hello")], out)
    assert parser.terminal and reduce(out).cost.cost_usd == pytest.approx(0.001)


@pytest.mark.parametrize("data", [b"", b"   \n", b"\xff\xfe"])
def test_input_that_is_no_message_is_refused_typed(data: bytes) -> None:
    with pytest.raises(ConfigError) as bad:
        claude_parser().input_message(data)
    assert bad.value.reason == "input_invalid"


def test_every_claude_run_takes_its_prompt_on_stdin_unless_steering_is_off() -> None:
    provider = ClaudeProvider()
    env = {**os.environ, "CLAUDE_CLI_PATH": "/bin/true"}

    def command(**options: Any) -> Any:
        spec = RunSpec(run_id="r1", session_id="s1", provider="claude", prompt="-rf prompt", cwd="/tmp",
                       permission_mode="default", options=provider.validate_options(options, "default"), env=env)
        return provider.build_command(spec)

    steerable = command()
    assert "-rf prompt" not in steerable.argv and steerable.stdin and steerable.close_stdin_at_end
    assert steerable.argv[-3:] == ["--input-format", "stream-json", "--replay-user-messages"]
    assert json.loads(steerable.stdin_data)["message"]["content"][0]["text"] == "-rf prompt"
    plain = command(steering=False)
    assert plain.argv[-2:] == ["--", "-rf prompt"] and not plain.stdin and "--input-format" not in plain.argv
    with_approvals = command(approvals=True, steering=False)
    assert {"--input-format", "--permission-prompt-tool"} <= set(with_approvals.argv) and with_approvals.stdin


# -- through a node agent ---------------------------------------------------------------


async def test_session_send_input_steers_a_running_claude_run(claude_agent: NodeAgent) -> None:
    async with Session("claude", node=EmbeddedNode(claude_agent), cwd=str(ROOT)) as s:
        stream = s.stream("tell me SLOW")
        sent = False
        events = []
        async for ev in stream:
            events.append(ev)
            if ev.kind == "assistant_delta" and not sent:
                sent = True
                await s.send_input(stream.run_id, "STEERED-TEXT-42")
        res = stream.result
        assert res is not None and res.ok, res and res.error
        assert res.text.endswith("answer 2: STEERED-TEXT-42"), res.text
        assert res.cost.input_tokens == 200 and res.cost.cost_usd == pytest.approx(0.002)
        assert [e.kind for e in events].count("result") == 1
        # The run has ended: its input is refused, typed, on the session and on the node.
        with pytest.raises(AsmError) as late:
            await s.send_input(stream.run_id, "too late")
        assert (late.value.kind, late.value.reason) == ("config_invalid", "run_not_running")
        with pytest.raises(AsmError) as late_node:
            await claude_agent.send_input(pb.SendInputRequest(run_id=stream.run_id, data=b"x"))
        assert late_node.value.reason == "run_not_running"
        with pytest.raises(RunNotFound):
            await s.send_input("no-such-run", "hello")
        with pytest.raises(ConfigError) as empty:
            await s.send_input(stream.run_id, "  ")
        assert empty.value.reason == "input_invalid"


async def test_an_unsteered_claude_run_ends_and_its_cli_exits(claude_agent: NodeAgent) -> None:
    async with Session("claude", node=EmbeddedNode(claude_agent), cwd=str(ROOT)) as s:
        res = await s.query("just once")
    assert res.ok and res.text == "answer 1: just once"
    [info] = (await claude_agent.list_runs(pb.ListRunsRequest())).runs
    assert info.status == pb.RUN_STATUS_COMPLETED and info.exit_code == 0  # stdin closed: the CLI exited itself


async def test_a_provider_without_input_refuses_it(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        stream = s.stream("sleep 30")
        await stream.__anext__()
        with pytest.raises(AsmError) as refused:
            await s.send_input(stream.run_id, "hello")
        assert (refused.value.kind, refused.value.reason) == ("config_invalid", "input_not_supported")
        await s.interrupt(stream.run_id)
        _ = [ev async for ev in stream]


def test_asm_input_usage_errors_are_one_line() -> None:
    def asm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "asm_cli", "input", *args], capture_output=True, text=True,
                              timeout=60, cwd=str(ROOT))

    for args in (("run-1", "  ", "--node", "127.0.0.1:1"), ("bad id!", "hi", "--node", "127.0.0.1:1")):
        proc = asm(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("asm: error:") and "Traceback" not in proc.stderr
    unreachable = asm("run-1", "hello", "--node", "127.0.0.1:1", "--connect-timeout", "1")
    assert unreachable.returncode == 3 and "Traceback" not in unreachable.stderr
    missing = asm("run-1", "hello")
    assert missing.returncode == 2


# -- the scripted model server's steering rule --------------------------------------------


def test_the_model_server_answers_a_steered_message_wherever_claude_puts_it() -> None:
    from tests.support.fake_model_server import PROMPT, TOOL_RESULT, decide_anthropic, decide_gemini, decide_openai

    queued = decide_anthropic({"messages": [
        {"role": "user", "content": "Tell me slowly. SCENARIO_STEER"}, {"role": "assistant", "content": "slow0"},
        {"role": "user", "content": [{"type": "text", "text": "Also: STEERED-TEXT-42"}]}]})
    assert (queued.turn, queued.steered) == (PROMPT, "STEERED-TEXT-42")
    merged = decide_anthropic({"messages": [
        {"role": "user", "content": "Run it. SCENARIO_SLOWTOOL"}, {"role": "assistant", "content": "tool"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "tool-output-123"}]},
        {"role": "system", "content": "The user sent a new message while you were working:\nSTEERED-TEXT-42"}]})
    assert (merged.turn, merged.steered) == (TOOL_RESULT, "STEERED-TEXT-42")
    plain = decide_anthropic({"messages": [{"role": "user", "content": "hi SCENARIO_STEER"}]})
    assert (plain.scenario, plain.steered) == ("STEER", None)
    assert decide_openai({"input": "x STEERED-A-1"}).steered == "STEERED-A-1"
    assert decide_gemini({"contents": [{"role": "user", "parts": [{"text": "STEERED-B"}]}]}).steered == "STEERED-B"


# -- SendInput bounds (node audit 2): a CLI that does not read its stdin cannot grow the node's buffer --


async def test_input_to_a_cli_that_does_not_read_stays_bounded_and_is_refused_typed() -> None:
    provider = ScriptedProvider(script="import time; print('up', flush=True); time.sleep(60)", stdin=True)
    async with running_agent(test_config(), providers={"scripted": provider}) as agent:
        frames = agent.start_run(pb.StartRunRequest(run_id="r-deaf", provider="scripted", prompt="p"))
        await asyncio.wait_for(frames.__anext__(), 30)  # run_started: stdin is open
        run = agent.runs["r-deaf"]
        assert run._proc is not None and run._proc.stdin is not None
        transport = run._proc.stdin.transport

        def send(data: bytes) -> Any:
            return agent.send_input(pb.SendInputRequest(run_id="r-deaf", data=data))

        with pytest.raises(ConfigError) as too_large:
            await send(b"x" * (MAX_INPUT_BYTES + 1))
        assert too_large.value.reason == "input_too_large" and str(MAX_INPUT_BYTES) in too_large.value.message

        # Two calls at once: one writes and waits for the CLI, the other waits its turn (nothing written).
        first, second = (asyncio.ensure_future(send(b"a" * MAX_INPUT_BYTES)) for _ in range(2))
        for _ in range(3):
            await asyncio.sleep(0)  # each task's first step: the write (or the wait for the lock)
        assert not first.done() and not second.done()
        assert transport.get_write_buffer_size() <= MAX_INPUT_BYTES
        first.cancel()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)

        # Callers that give up (a client deadline) leave their bytes queued: the queue stays under its cap.
        refused: list[AsmError] = []
        for _ in range(2 * MAX_INPUT_BACKLOG_BYTES // MAX_INPUT_BYTES):
            try:
                await asyncio.wait_for(send(b"b" * MAX_INPUT_BYTES), 0.2)
            except TimeoutError:
                pass
            except AsmError as exc:
                refused.append(exc)
            assert transport.get_write_buffer_size() <= MAX_INPUT_BACKLOG_BYTES
        assert refused, "a full input queue must refuse more input"
        err = refused[0]
        assert (err.kind, err.reason) == ("at_capacity", "input_backlog") and "retry" in err.message
        assert err.grpc_status().name == "RESOURCE_EXHAUSTED"
        run.interrupt()
        async for _ in frames:
            pass
