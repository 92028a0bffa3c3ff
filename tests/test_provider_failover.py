"""Provider-level failover (issue 14 item 6), lanes and the missing-CLI error (item 10), per-run cost (item 2).

Real node agents (in-process, and behind gRPC) with scripted "CLIs" named like the real providers:
a provider that fails before doing any work hands the run to the next candidate; one that did work
keeps it. ASM's health tracker per (node, provider) sends later runs past a failed pair until the
cooldown has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from asm_controller import EmbeddedNode, Event, EventReducer, GrpcNodeClient, RemoteNode, Session
from asm_controller.service import ControllerConfig, start_controller
from asm_node.agent import NodeAgent
from asm_node.providers import LineParser, ProviderStatus
from asm_node.providers.base import error_event, result_event
from asm_node.testing import ScriptedProvider, running_agent, running_server, test_config
from asm_wire import KIND_VALUES, ConfigError, ProviderMissing, pb, ulid


class ProviderParser(LineParser):
    """A scripted CLI's lines, one JSON object each: {"text"} a delta, {"msg", "model"} an assistant
    message, {"tool"} a tool call, {"text", "psid"} a delta naming the provider session, {"cost": [in, out]}, {"fail": kind, "message"} a fatal error, {"done"}."""

    def feed_lines(self, lines: list[bytes], out: list[pb.Event]) -> None:
        for line in lines:
            d = json.loads(line)
            if "text" in d:
                out.append(pb.Event(kind=KIND_VALUES["assistant_delta"], assistant_delta=pb.AssistantDelta(
                    content=d["text"]), provider_session_id=d.get("psid", "")))
            elif "msg" in d:
                out.append(pb.Event(kind=KIND_VALUES["assistant_message"], assistant_message=pb.AssistantMessage(
                    content=[pb.ContentBlock(type="text", text=d["msg"])], model=d.get("model", "m"))))
            elif "tool" in d:
                out.append(pb.Event(kind=KIND_VALUES["tool_use"], tool_use=pb.ToolUse(
                    tool_name=d["tool"], tool_call_id="t1", input_json="{}")))
            elif "cost" in d:
                out.append(pb.Event(kind=KIND_VALUES["cost_update"], cost_update=pb.CostUpdate(
                    input_tokens=d["cost"][0], output_tokens=d["cost"][1], cost_usd=0.25)))
            elif "fail" in d:
                self.terminal = self.failed = True
                out.append(error_event(d["message"], d["fail"], "provider"))
            elif "done" in d:
                self.terminal = True
                out.append(result_event("completed", "end_turn", {}))

    def finish(self, exit: Any) -> list[pb.Event]:
        return [] if self.terminal else [result_event("completed", "exit", {})]


def cli(name: str, *lines: Mapping[str, Any]) -> ScriptedProvider:
    return ScriptedProvider(list(lines), name=name, display_name=name.title(), parser=ProviderParser)


class MissingCli(ScriptedProvider):
    """A provider whose CLI is not installed on the node (as CLAUDE_CLI_PATH pointing at nothing)."""

    def status(self, env: Mapping[str, str], probe_version: bool = True) -> ProviderStatus:
        return ProviderStatus(available=False, error=f"{self.display_name} CLI not found at /nowhere/{self.name}")


def missing(name: str) -> MissingCli:
    return MissingCli([], name=name, display_name=name.title(), parser=ProviderParser)


def echo_options(name: str) -> ScriptedProvider:
    """A CLI that answers with the options its run got."""
    return ScriptedProvider(script="import sys\nprint(sys.argv[1], flush=True)\nprint('{\"done\": 1}')\n",
                            args=lambda spec: [json.dumps({"text": json.dumps(dict(spec.options), sort_keys=True)})],
                            name=name, parser=ProviderParser)


GEMINI_OK = cli("gemini", {"text": "gemini here"}, {"cost": [3, 4]}, {"done": 1})
HTTP_500 = {"fail": "transport_error", "message": "API Error: 500 Internal server error (HTTP 500)"}


@pytest.fixture
def agent_with() -> Any:
    """A started node agent with the given providers (name=provider), as an async context manager."""
    @contextlib.asynccontextmanager
    async def make(**providers: Any) -> AsyncIterator[NodeAgent]:
        async with running_agent(test_config(), providers=providers) as agent:
            yield agent
    return make


async def collect(s: Session, prompt: str = "hi", **kw: Any) -> tuple[list[Event], Any]:
    stream = s.stream(prompt, **kw)
    events = [ev async for ev in stream]
    return events, stream.result


def attempts_of(result: Any, provider: str) -> list[dict[str, Any]]:
    return [a for a in result.metadata["attempts"] if a.get("provider") == provider]


async def test_missing_cli_moves_to_the_next_provider_and_later_runs_skip_it(agent_with: Any) -> None:
    async with agent_with(claude=missing("claude"), gemini=GEMINI_OK) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent)) as s:
        events, result = await collect(s)
        assert result.ok, result.error
        assert result.provider == "gemini" and result.metadata["provider"] == "gemini"
        assert result.text == "gemini here"
        assert result.metadata["providers"] == ["claude", "gemini"]
        claude = attempts_of(result, "claude")
        assert claude and claude[0]["error"]["kind"] == "cli_not_found", result.metadata["attempts"]
        assert any(a.get("admitted") for a in attempts_of(result, "gemini"))
        # The subscriber sees one run: run_started first, seqs 1..n, the failover as a warning.
        assert events[0].kind == "run_started" and [e.seq for e in events] == list(range(1, len(events) + 1))
        assert {e.run_id for e in events} == {result.run_id}
        notice = next(w for w in result.warnings if w.kind == "cli_not_found")
        assert "claude" in notice.message and "trying gemini" in notice.message
        assert s.checkpoint is None or s.checkpoint.provider == "gemini"
        # The (node, claude) pair is cooling down: the next run goes to gemini first.
        again = await s.query("again")
        assert again.ok and again.provider == "gemini"
        assert attempts_of(again, "claude") == [], again.metadata["attempts"]


async def test_auth_error_before_any_work_fails_over(agent_with: Any) -> None:
    claude = cli("claude", {"fail": "auth_error", "message": "Invalid API key"})
    async with agent_with(claude=claude, gemini=GEMINI_OK) as agent, \
            Session("claude,gemini", node=EmbeddedNode(agent)) as s:
        events, result = await collect(s)
    assert result.ok and result.provider == "gemini" and result.text == "gemini here"
    failed = [a for a in attempts_of(result, "claude") if a.get("failover")]
    assert failed and failed[0]["error"]["kind"] == "auth_error" and failed[0]["node_id"] == agent.node_id
    assert [w.kind for w in result.warnings] == ["auth_error"]
    assert sum(1 for e in events if e.kind == "run_started") == 1  # the failed attempt's events are not shown
    assert (result.cost.input_tokens, result.cost.output_tokens) == (3, 4)
    assert s.pool.provider_health.snapshot()[f"claude@{EmbeddedNode(agent).key}"]["status"] == "unhealthy"


async def test_claudes_synthetic_api_error_message_is_not_work(agent_with: Any) -> None:
    # Claude Code prints an assistant message "API Error: 500 ..." (model <synthetic>) before its error result.
    claude = cli("claude", {"msg": "API Error: 500 Internal server error", "model": "<synthetic>"}, HTTP_500)
    async with agent_with(claude=claude, gemini=GEMINI_OK) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent)) as s:
        result = await s.query("hi")
    assert result.ok and result.provider == "gemini"
    assert "API Error" not in result.text
    assert [w.kind for w in result.warnings] == ["transport_error"]


async def test_a_provider_that_did_work_is_never_re_run(agent_with: Any) -> None:
    claude = cli("claude", {"text": "Working on it"}, HTTP_500)
    async with agent_with(claude=claude, gemini=GEMINI_OK) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent)) as s:
        events, result = await collect(s)
    assert not result.ok and result.provider == "claude"
    assert result.error is not None and result.error.kind == "transport_error"
    assert result.text == "Working on it"
    assert attempts_of(result, "gemini") == []
    assert "gemini here" not in "".join(e.pb.assistant_delta.content for e in events)


async def test_a_tool_call_is_work(agent_with: Any) -> None:
    claude = cli("claude", {"tool": "Bash"}, HTTP_500)
    async with agent_with(claude=claude, gemini=GEMINI_OK) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent)) as s:
        result = await s.query("hi")
    assert result.provider == "claude" and result.error is not None and result.error.kind == "transport_error"


async def test_a_failure_that_is_not_a_provider_outage_does_not_fail_over(agent_with: Any) -> None:
    claude = cli("claude", {"fail": "config_invalid", "message": "bad flag"})
    async with agent_with(claude=claude, gemini=GEMINI_OK) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent)) as s:
        result = await s.query("hi")
    assert result.provider == "claude" and result.error is not None and result.error.kind == "config_invalid"
    assert attempts_of(result, "gemini") == []


async def test_every_candidate_failing_ends_with_the_last_error_and_every_attempt(agent_with: Any) -> None:
    async with agent_with(claude=missing("claude"), gemini=cli("gemini", HTTP_500)) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent)) as s:
        result = await s.query("hi")
    assert result.error is not None and result.error.kind == "transport_error" and result.provider == "gemini"
    assert attempts_of(result, "claude") and attempts_of(result, "gemini")
    assert [w.kind for w in result.warnings] == ["cli_not_found"]


async def test_the_cooldown_passes_and_the_first_candidate_is_tried_again(agent_with: Any) -> None:
    claude = cli("claude", {"fail": "rate_limit", "message": "429 Too Many Requests"})
    async with agent_with(claude=claude, gemini=GEMINI_OK) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent), failure_cooldown_s=0.5) as s:
        first = await s.query("1")
        cooling = await s.query("2")
        await asyncio.sleep(0.6)
        later = await s.query("3")
    assert first.provider == cooling.provider == later.provider == "gemini"
    assert attempts_of(first, "claude") and attempts_of(later, "claude")  # tried, failed over
    assert attempts_of(cooling, "claude") == []  # skipped while cooling


async def test_options_and_provider_options(agent_with: Any) -> None:
    async with agent_with(claude=missing("claude"), gemini=echo_options("gemini")) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent), options={"shared": 1},
                    provider_options={"gemini": {"model": "gemini-2.5-flash"}, "claude": {"model": "opus"}}) as s:
        result = await s.query("hi")
    assert result.ok and json.loads(result.text) == {"model": "gemini-2.5-flash", "shared": 1}


async def test_a_run_override_names_its_own_provider(agent_with: Any) -> None:
    async with agent_with(claude=missing("claude"), gemini=GEMINI_OK) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent)) as s:
        only = await s.query("hi", provider="claude")
        listed = await s.query("hi", providers=["gemini"])
    assert isinstance(only.error, ProviderMissing) and only.provider == "claude"
    assert listed.ok and listed.provider == "gemini"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"providers": ["claude", "claude"]}, "duplicate provider candidate 'claude'"),
    ({"providers": ["claude", ""]}, "empty name"),
    ({"providers": ["claude", 3]}, "providers must be a list of provider names"),
    ({"providers": ["claude", "gemini"], "provider_options": {"codex": {}}}, "provider_options for codex"),
    ({"provider_options": {"shell": "x"}}, "provider_options must map"),
    ({"lane": "turbo"}, "invalid lane 'turbo'; expected auto, core, or sdk"),
    ({"lane": "sdk"}, "asm has no SDK runtime"),
])
def test_bad_failover_and_lane_options_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Session(node=EmbeddedNode(NodeAgent(test_config())), **kwargs)


def test_sdk_lane_with_a_remote_node_is_config_invalid() -> None:
    with pytest.raises(ConfigError, match="sdk lane is unavailable for remote-node execution") as info:
        Session("claude", node=RemoteNode("127.0.0.1:7070"), lane="sdk")
    assert info.value.kind == "config_invalid"
    s = Session("claude", node=RemoteNode("127.0.0.1:7070"))
    with pytest.raises(ConfigError, match="sdk lane is unavailable"):
        s.stream("hi", lane="sdk")


async def test_lane_metadata_as_asm_records_it(agent_with: Any) -> None:
    async with agent_with(gemini=GEMINI_OK) as agent:
        async with Session("gemini", node=EmbeddedNode(agent)) as s:
            local = await s.query("hi")
            core = await s.query("hi", lane="core")
        async with running_server(agent=agent) as server, \
                Session("gemini", node=RemoteNode(f"127.0.0.1:{server.port}")) as s:
            remote = await s.query("hi")
            remote_core = await s.query("hi", lane="core")
    lanes = [(r.metadata["lane"], r.metadata["requested_lane"], r.metadata["lane_fallback_reason"])
             for r in (local, core, remote, remote_core)]
    assert lanes == [("core", "auto", None), ("core", "core", None), ("core", "auto", "sdk_remote_unsupported"),
                     ("core", "core", None)]


async def test_the_same_missing_cli_is_cli_not_found_on_every_run(agent_with: Any) -> None:
    async with agent_with(claude=missing("claude")) as agent, Session("claude", node=EmbeddedNode(agent)) as s:
        results = [await s.query("hi") for _ in range(3)]
    for r in results:
        assert isinstance(r.error, ProviderMissing), r.error
        assert r.error.kind == "cli_not_found" and "CLI not found at /nowhere/claude" in r.error.message


async def test_session_cost_is_the_sum_of_per_run_costs(agent_with: Any) -> None:
    one = cli("fake", {"cost": [100, 20]}, {"text": "a"}, {"done": 1})
    async with agent_with(fake=one) as agent, Session("fake", node=EmbeddedNode(agent)) as s:
        runs = [await s.query(str(i)) for i in range(3)]
        total = s.cost
    assert [(r.cost.input_tokens, r.cost.output_tokens) for r in runs] == [(100, 20)] * 3
    assert (total.input_tokens, total.output_tokens) == (300, 60)
    assert total.cost_usd == pytest.approx(0.75)


async def test_failover_and_the_node_name_through_a_controller(agent_with: Any) -> None:
    async with agent_with(claude=missing("claude"), gemini=GEMINI_OK) as agent, \
            running_server(agent=agent) as server:
        ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{server.port}"]))
        try:
            target = RemoteNode(f"127.0.0.1:{ctl.port}")
            async with Session(providers=["claude", "gemini"], node=target) as s:
                result = await s.query("hi")
            assert result.ok and result.provider == "gemini" and result.text == "gemini here"
            # The node that ran it, not the controller (issue 14 item 3); the controller is named apart.
            assert result.metadata["node_id"] == agent.node_id
            assert result.metadata["node_address"] == f"127.0.0.1:{server.port}"
            assert result.metadata["controller_address"] == target.address
            assert result.metadata["controller_id"] != agent.node_id
            # A StartRun naming "claude,gemini" fails over on the controller itself (no proto change).
            client = GrpcNodeClient(target)
            try:
                events = [m async for b in client.start_run(pb.StartRunRequest(
                    run_id=ulid(), provider="claude,gemini", prompt="hi")) for m in b.events]
            finally:
                await client.close()
            reducer = EventReducer("r", "s", "?")
            for m in events:
                reducer.apply(Event(m))
            assert reducer.finished and reducer.result().ok and reducer.result().text == "gemini here"
            assert {m.provider for m in events if m.kind == pb.EVENT_KIND_RUN_STARTED} == {"gemini"}
            stamp = json.loads(next(m for m in events if m.kind == pb.EVENT_KIND_RUN_STARTED).metadata[
                "asm.controller"])
            assert stamp["provider"] == "gemini" and stamp["providers"] == ["claude", "gemini"]
            assert any(a.get("provider") == "claude" and a.get("skipped") == "no claude CLI" for a in stamp["attempts"])
        finally:
            await ctl.stop()


def test_node_and_checkpoint_repr_and_str_never_show_the_token() -> None:
    from asm_controller import Checkpoint
    from asm_controller._client import TLSConfig
    node = RemoteNode("127.0.0.1:7070", token="s3cr3t-token", tls=TLSConfig(key=b"PRIVATE-KEY"))
    cp = Checkpoint("claude", "psid", "run", node, "node-1", 1.0)
    for text in (repr(node), str(node), repr(cp), str(cp), f"{node}", f"{cp!r}"):
        assert "s3cr3t-token" not in text and "PRIVATE-KEY" not in text
        assert "127.0.0.1:7070" in text



async def test_a_queued_failover_run_taken_over_keeps_its_candidates(agent_with: Any) -> None:
    from asm_controller._registry import run_spec
    from asm_controller._run import Run
    from asm_controller._store import RunRecord

    async with agent_with(claude=missing("claude"), gemini=echo_options("gemini")) as agent:
        async with Session(providers=["claude", "gemini"], node=EmbeddedNode(agent), options={"shared": 1},
                           provider_options={"gemini": {"model": "g"}}, lane="core") as s:
            spec = run_spec(Run(s, "r0", "hi", s.defaults, False))
        assert spec["providers"] == ["claude", "gemini"] and spec["options"] == {"shared": 1}
        assert spec["provider_options"] == {"gemini": {"model": "g"}} and spec["lane"] == "core"
        # Another replica (a session without those defaults) takes the queued run over from its record.
        async with Session("shell", node=EmbeddedNode(agent)) as other:
            run = other.requeue(RunRecord(run_id="r1", session_id=other.session_id, provider="claude", spec=spec,
                                          prompt="hi", status="queued"))
            await run.done.wait()
        result = run.result()
    assert result.ok and result.provider == "gemini", result.error
    assert json.loads(result.text) == {"model": "g", "shared": 1}
    assert result.metadata["requested_lane"] == "core"


async def test_every_candidate_failing_through_a_controller_keeps_the_warnings(agent_with: Any) -> None:
    # The controller refuses each candidate (cli_not_found): the run ends with the last, the first is a warning.
    async with agent_with(claude=missing("claude"), gemini=missing("gemini")) as agent, \
            running_server(agent=agent) as server:
        ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{server.port}"]))
        try:
            async with Session(providers=["claude", "gemini"], node=RemoteNode(f"127.0.0.1:{ctl.port}")) as s:
                stream = s.stream("hi")
                events = [e async for e in stream]
        finally:
            await ctl.stop()
    result = stream.result
    assert result is not None and isinstance(result.error, ProviderMissing) and result.provider == "gemini"
    assert [w.kind for w in result.warnings] == ["cli_not_found"] and "trying gemini" in result.warnings[0].message
    assert [e.seq for e in events] == list(range(1, len(events) + 1)) and events[-1].kind == "run_completed"


async def test_the_missing_cli_through_a_controller_is_cli_not_found_every_time(agent_with: Any) -> None:
    async with agent_with(claude=missing("claude")) as agent, running_server(agent=agent) as server:
        ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{server.port}"]))
        try:
            target = RemoteNode(f"127.0.0.1:{ctl.port}")
            async with Session("claude", node=target) as s:
                plain = [await s.query("hi") for _ in range(2)]
            async with Session("claude", node=target, preflight=True) as s:
                checked = [await s.query("hi") for _ in range(2)]
        finally:
            await ctl.stop()
    for r in plain + checked:
        assert r.error is not None and r.error.kind == "cli_not_found", r.error
        assert r.error.reason == "provider_missing"


async def test_a_resume_is_never_failed_over_to_another_provider(agent_with: Any) -> None:
    gemini = cli("gemini", {"text": "gemini here", "psid": "g-1"}, {"done": 1})
    async with agent_with(claude=missing("claude"), gemini=gemini) as agent, \
            Session(providers=["claude", "gemini"], node=EmbeddedNode(agent)) as s:
        result = await s.query("hi")
        assert result.ok and result.provider == "gemini" and result.provider_session_id == "g-1"
        assert s.checkpoint is not None and s.checkpoint.provider == "gemini"
        resumed = s.resume_run("more")  # the checkpoint's provider
        assert [e async for e in resumed] and resumed.result is not None
        assert resumed.result.provider == "gemini" and "providers" not in resumed.result.metadata
        exact = s.resume_run("more", "some-claude-session-id")  # no checkpoint for it: the first candidate only
        assert [e async for e in exact] and exact.result is not None
    assert isinstance(exact.result.error, ProviderMissing) and exact.result.provider == "claude"
