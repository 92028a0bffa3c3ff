"""Pipeline plugs and policy on the controller, with a scripted provider that emits tool calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from asm_controller import EmbeddedNode, Event, LivenessConfig, RemoteNode, Session
from asm_controller.extensions.pipeline import Continue, CostTracker, Policy, PolicyGuard, derived
from asm_node import NodeAgent
from asm_node.testing import ScriptedProvider
from asm_wire import ConfigError
from tests.support.processes import NodeProcess, node_config, pid_alive
from tests.support.tcp_proxy import TcpProxy

# The "CLI": prints the script given as its prompt (JSON lines), slowly, then waits a bit.
CLI = "import sys, time\nfor line in sys.argv[1].split('|'):\n    print(line, flush=True)\n    time.sleep(0.02)\ntime.sleep(float(sys.argv[2]))"


def tool_provider() -> ScriptedProvider:
    """``tools``: prints its prompt's script (JSON lines, the scripted dialect), then lingers ``linger`` s."""
    return ScriptedProvider(script=CLI, name="tools", display_name="Scripted tools",
                            args=lambda spec: [spec.prompt, str(float(spec.options.get("linger", 0)))])


def script(*items: dict[str, Any]) -> str:
    return "|".join(json.dumps(i) for i in items)


TOOL_RUN = script({"text": "Let me look. "}, {"tool": "Bash"}, {"text": "Done."}, {"result": [10, 20]})


@pytest.fixture
async def tools_agent() -> AsyncIterator[NodeAgent]:
    agent = NodeAgent(node_config(), providers={"tools": tool_provider()})
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def run(s: Session, prompt: str, **kw: Any) -> tuple[list[Event], Any]:
    stream = s.stream(prompt, **kw)
    events = [ev async for ev in stream]
    return events, stream.result


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


async def test_warn_keeps_the_event_and_emits_a_valid_guardrail_event(tools_agent: NodeAgent) -> None:
    policy = Policy(disallow_tools=["Bash"], on_tool_violation="warn")
    async with Session("tools", node=EmbeddedNode(tools_agent), pipeline=[policy]) as s:
        events, result = await run(s, TOOL_RUN)
    assert result.ok and result.text == "Let me look. \n\nDone."  # two paragraphs (issue 14)
    k = kinds(events)
    assert k.index("tool_use") + 1 == k.index("guardrail_triggered")
    g = events[k.index("guardrail_triggered")].payload
    assert (g["rule"], g["action"], g["direction"]) == ("tool_disallowed", "warn", "input")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.id for e in events}) == len(events)


async def test_block_drops_the_event_and_the_run_goes_on(tools_agent: NodeAgent) -> None:
    async with Session("tools", node=EmbeddedNode(tools_agent),
                       pipeline=[Policy(disallow_tools=["Bash"], on_tool_violation="block")]) as s:
        events, result = await run(s, TOOL_RUN)
    assert result.ok and "tool_use" not in kinds(events) and "guardrail_triggered" in kinds(events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_cancel_fails_the_run_and_stops_the_cli(tools_agent: NodeAgent) -> None:
    async with Session("tools", node=EmbeddedNode(tools_agent), options={"linger": 20},
                       pipeline=[Policy(disallow_tools=["Bash"])]) as s:
        stream = s.stream(script({"tool": "Bash"}, {"text": "never"}))
        events = await asyncio.wait_for(_collect(stream), 15)
        result = stream.result
        pid = events[0].payload["pid"]
    assert result.status == "failed" and result.error.kind == "guardrail_blocked"
    assert "Tool blocked by policy: Bash" in result.error.message
    assert kinds(events)[-2:] == ["error", "run_completed"] and "tool_use" not in kinds(events)
    assert await asyncio.to_thread(_gone, pid)


def _gone(pid: int) -> bool:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


async def _collect(stream: Any) -> list[Event]:
    return [ev async for ev in stream]


@pytest.mark.parametrize("decision", ["allow", "deny"])
async def test_request_approval_replaces_the_event(tools_agent: NodeAgent, decision: str) -> None:
    policy = Policy(disallow_tools=["Bash"], on_tool_violation="request_approval")
    async with Session("tools", node=EmbeddedNode(tools_agent), options={"linger": 1.0}, pipeline=[policy]) as s:
        stream = s.stream(TOOL_RUN)
        events: list[Event] = []
        async for ev in stream:
            events.append(ev)
            if ev.kind == "approval_requested":
                assert ev.payload["subject"] == "Bash" and ev.payload["approval_id"].startswith("policy-approval-")
                await s.approve(ev.payload["approval_id"], decision)
        result = stream.result
    assert "tool_use" not in kinds(events)
    resolved = [e.payload for e in events if e.kind == "approval_resolved"]
    assert [(r["decision"]) for r in resolved] == [decision]
    if decision == "allow":
        assert result.ok
    else:
        assert result.error is not None and result.error.kind == "guardrail_blocked" and "denied" in result.error.message


async def test_unanswered_policy_approval_times_out(tools_agent: NodeAgent) -> None:
    policy = Policy(disallow_tools=["Bash"], on_tool_violation="request_approval")
    async with Session("tools", node=EmbeddedNode(tools_agent), options={"linger": 3}, pipeline=[policy],
                       approval_timeout_ms=300) as s:
        events, result = await run(s, TOOL_RUN)
    resolved = [e.payload for e in events if e.kind == "approval_resolved"]
    assert [(r["decision"], r["reason"]) for r in resolved] == [("deny", "timeout")]
    assert result.error is not None and result.error.kind == "guardrail_blocked"


async def test_output_budget_is_cumulative_and_allowed_tools(tools_agent: NodeAgent) -> None:
    async with Session("tools", node=EmbeddedNode(tools_agent),
                       pipeline=[Policy(max_output_tokens=15, on_budget_violation="warn")]) as s:
        events, result = await run(s, TOOL_RUN)
    g = [e.payload for e in events if e.kind == "guardrail_triggered"]
    assert g and g[0]["rule"] == "output_budget_exceeded" and json.loads(json.dumps(g[0]["details"]))[
        "total_output_tokens"] == 20
    assert result.ok
    async with Session("tools", node=EmbeddedNode(tools_agent), allowed_tools=["Read"]) as s:
        _, refused = await run(s, TOOL_RUN)
    assert refused.error is not None and refused.error.message == "Tool blocked by allowlist: Bash"
    async with Session("tools", node=EmbeddedNode(tools_agent), allowed_tools=["Bash"]) as s:
        _, allowed = await run(s, TOOL_RUN)
    assert allowed.ok
    async with Session("tools", node=EmbeddedNode(tools_agent), pipeline=[PolicyGuard(max_output_tokens=5)]) as s:
        _, guarded = await run(s, TOOL_RUN)
    assert guarded.error is not None and guarded.error.kind == "guardrail_blocked"


async def test_cost_tracker_prices_usage_once(tools_agent: NodeAgent) -> None:
    async with Session("tools", node=EmbeddedNode(tools_agent), pipeline=[CostTracker(0.1, 0.2)]) as s:
        events, result = await run(s, TOOL_RUN)
        assert (result.cost.input_tokens, result.cost.output_tokens) == (10, 20)
        assert result.cost.cost_usd == pytest.approx(10 * 0.1 + 20 * 0.2)
        assert kinds(events).index("cost_update") == kinds(events).index("result") + 1
        assert s.cost.cost_usd == pytest.approx(5.0)
        # A provider that reports its own cost is not counted twice.
        _, reported = await run(s, script({"cost": [1, 2]}, {"result": [1, 2]}))
        assert reported.cost.cost_usd == pytest.approx(0.5)


async def test_observers_see_injected_events_and_a_failing_one_is_harmless(tools_agent: NodeAgent) -> None:
    seen: list[str] = []

    def broken(events: list[Event]) -> None:
        raise RuntimeError("observer bug")

    async with Session("tools", node=EmbeddedNode(tools_agent), observers=[broken, lambda b: seen.extend(
            e.kind for e in b)], pipeline=[Policy(disallow_tools=["Bash"], on_tool_violation="warn")]) as s:
        events, result = await run(s, TOOL_RUN)
    assert result.ok and seen == kinds(events) and "guardrail_triggered" in seen


def test_policy_validation() -> None:
    with pytest.raises(ConfigError):
        Policy(on_tool_violation="explode")
    with pytest.raises(ConfigError):
        Policy(max_output_tokens=-1)
    with pytest.raises(ConfigError):
        Policy(disallow_tools=[""])


@pytest.mark.slow
async def test_plug_injections_stay_exactly_once_across_reattaches(node_process: Callable[..., NodeProcess]) -> None:
    from tests.support.faults import node_args, ticker

    def every_tenth(ev: Event, ctx: dict[str, Any]) -> Continue:
        if ev.kind == "assistant_delta" and int(ev.pb.assistant_delta.content) % 10 == 0:
            return Continue(inject=[derived(ev, "guardrail_triggered", rule="tenth", action="warn")])
        return Continue()

    node = node_process(*node_args())
    proxy = await TcpProxy(node.port).start()
    live = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0, node_lost_timeout_s=3.0)
    try:
        async with Session("shell", node=RemoteNode(proxy.address, liveness=live), pipeline=[every_tenth]) as s:
            stream = s.stream(ticker(50, 0.03))
            events: list[Event] = []
            async for ev in stream:
                events.append(ev)
                if ev.kind == "assistant_delta" and ev.pb.assistant_delta.content in ("15\n", "35\n"):
                    proxy.cut()
                    await asyncio.sleep(0.5)
                    proxy.restore()
            result = stream.result
        assert result.ok and result.metadata["reconnects"] >= 1
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        deltas = [e.pb.assistant_delta.content for e in events if e.kind == "assistant_delta"]
        assert deltas == [f"{i}\n" for i in range(50)]
        assert kinds(events).count("guardrail_triggered") == 5
    finally:
        await proxy.stop()
