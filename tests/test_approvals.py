"""Approvals and run queries, with a scripted test provider whose CLI asks for approvals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from asm_controller import EmbeddedNode, Event, Session
from asm_node import NodeAgent
from asm_node.testing import ScriptedProvider
from asm_wire import ApprovalNotFound, AsmError, RunNotFound, pb
from tests.support.processes import node_config
from tests.support.providers import approval_provider


@pytest.fixture
async def scripted_agent() -> AsyncIterator[NodeAgent]:
    agent = NodeAgent(node_config(approval_timeout_ms=1000), providers={"scripted": approval_provider()})
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def test_approve_reaches_the_run_and_is_recorded(scripted_agent: NodeAgent) -> None:
    async with Session("scripted", node=EmbeddedNode(scripted_agent), approval_timeout_ms=60_000) as s:
        stream = s.stream("go")
        events: list[Event] = []
        async for ev in stream:
            events.append(ev)
            if ev.kind == "approval_requested":
                # Registered with the session before we saw it: approving at once cannot race.
                await s.approve(ev.payload["approval_id"], "allow")
                with pytest.raises(AsmError) as again:
                    await s.approve(ev.payload["approval_id"], "allow")
                assert isinstance(again.value, ApprovalNotFound)
                assert (again.value.kind, again.value.domain) == ("not_found", "approval")
                # Let the CLI finish: it waits for input.
                await scripted_agent.send_input(pb.SendInputRequest(run_id=stream.run_id, data=b"ok\n", end_input=True))
        resolved = [e for e in events if e.kind == "approval_resolved"]
        assert [(e.payload["approval_id"], e.payload["decision"]) for e in resolved] == [("ap-1", "allow")]
        assert stream.result is not None and stream.result.ok and stream.result.text == "ok"


async def test_unanswered_approval_is_denied_with_timeout(scripted_agent: NodeAgent) -> None:
    async with Session("scripted", node=EmbeddedNode(scripted_agent)) as s:
        stream = s.stream("go")
        resolved: list[Event] = []
        async for ev in stream:
            if ev.kind == "approval_resolved":
                resolved.append(ev)
                await s.interrupt(stream.run_id)
        assert [(e.payload["decision"], e.payload["reason"]) for e in resolved] == [("deny", "timeout")]
        with pytest.raises(AsmError) as exc:
            await s.approve("ap-1", "allow")
        assert exc.value.kind == "not_found"


async def test_invalid_decision_and_unknown_approval(scripted_agent: NodeAgent) -> None:
    async with Session("scripted", node=EmbeddedNode(scripted_agent)) as s:
        with pytest.raises(AsmError) as bad:
            await s.approve("ap-1", "maybe")
        assert bad.value.kind == "config_invalid"
        with pytest.raises(AsmError) as unknown:
            await s.approve("nope", "deny")
        assert unknown.value.domain == "approval"


async def test_get_and_list_runs_and_input_refused_for_shell(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        stream = s.stream("sleep 30")
        started = await stream.__anext__()
        info = await agent.get_run(pb.GetRunRequest(run_id=stream.run_id))
        assert info.status == pb.RUN_STATUS_RUNNING and info.pid == started.payload["pid"]
        listed = await agent.list_runs(pb.ListRunsRequest(active_only=True))
        assert [r.run_id for r in listed.runs] == [stream.run_id]
        with pytest.raises(AsmError) as refused:
            await agent.send_input(pb.SendInputRequest(run_id=stream.run_id, data=b"x"))
        assert refused.value.kind == "config_invalid"
        await s.interrupt(stream.run_id)
        rest = [ev async for ev in stream]
        assert rest[-1].kind == "run_completed"
    done = await agent.get_run(pb.GetRunRequest(run_id=stream.run_id))
    assert done.status == pb.RUN_STATUS_INTERRUPTED and done.last_seq == rest[-1].seq
    with pytest.raises(AsmError) as missing:
        await agent.get_run(pb.GetRunRequest(run_id="no-such-run"))
    assert isinstance(missing.value, RunNotFound) and missing.value.kind == "not_found"


async def test_an_approval_asked_again_is_one_request_answered_once() -> None:
    """The CLI asks for the same pending approval id twice: the earlier timer is cancelled (it would deny
    the repeat early, node audit 9), the timeout counts from the latest ask, one answer resolves it."""
    script = ("import json, sys\n"
              "ask = json.dumps({'approval': 'ap', 'tool': 'Bash'})\n"
              "print(ask, flush=True); sys.stdin.readline()\n"
              "print(ask, flush=True); sys.stdin.readline()\n"
              "print(json.dumps({'result': [1, 1]}), flush=True)\n")
    provider = ScriptedProvider(script=script, stdin=True)
    agent = NodeAgent(node_config(approval_timeout_ms=60_000), providers={"scripted": provider})
    await agent.start()
    try:
        frames = agent.start_run(pb.StartRunRequest(run_id="r-ask2", provider="scripted", prompt="p"))
        events: list[pb.Event] = []

        async def until_asked(times: int) -> None:
            while sum(e.HasField("approval_requested") for e in events) < times:
                events.extend((await asyncio.wait_for(frames.__anext__(), 30)).events)

        await until_asked(1)
        run = agent.runs["r-ask2"]
        first = run._approvals["ap"]
        await agent.send_input(pb.SendInputRequest(run_id="r-ask2", data=b"again\n"))
        await until_asked(2)
        assert first.cancelled() and run._approvals["ap"] is not first and len(run._approvals) == 1
        await agent.resolve_approval(pb.ResolveApprovalRequest(run_id="r-ask2", approval_id="ap", decision="allow"))
        with pytest.raises(ApprovalNotFound):
            await agent.resolve_approval(pb.ResolveApprovalRequest(run_id="r-ask2", approval_id="ap", decision="deny"))
        await agent.send_input(pb.SendInputRequest(run_id="r-ask2", data=b"done\n"))
        async for batch in frames:
            events.extend(batch.events)
        resolved = [(e.approval_resolved.approval_id, e.approval_resolved.decision) for e in events
                    if e.HasField("approval_resolved")]
        assert resolved == [("ap", "allow")]
        assert not [e for e in events if e.HasField("error")]
        assert events[-1].run_completed.status == "completed"
    finally:
        await agent.stop()
