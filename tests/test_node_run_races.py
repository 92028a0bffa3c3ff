"""A node run's end under races (node audit 3, 5, 8): an interrupt while the run starts, a run task
cancelled or broken mid-spawn, an interrupt after the CLI exited. Every run ends exactly once, with
``run_completed``, and an InterruptRun's answer says what really happened."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

import asm_node.run as run_module
from asm_node import NodeAgent
from asm_node.process import group_alive, leader_exited, spawn_run
from asm_node.testing import ScriptedProvider, test_config
from asm_wire import KIND_NAMES, pb

#: A CLI that ignores SIGINT and would run for a long time: only a kill ends it quickly.
STUBBORN = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)\n"


async def collect(frames: AsyncIterator[bytes]) -> list[pb.Event]:
    events: list[pb.Event] = []
    async for data in frames:
        events.extend(pb.EventBatch.FromString(data).events)
    return events


def kinds(events: list[pb.Event]) -> list[str]:
    return [KIND_NAMES[e.kind] for e in events]


@pytest.fixture
async def agent() -> AsyncIterator[NodeAgent]:
    node = NodeAgent(test_config(), providers={"scripted": ScriptedProvider(script=STUBBORN)})
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def start(agent: NodeAgent, run_id: str) -> AsyncIterator[bytes]:
    return agent.start_run_frames(pb.StartRunRequest(run_id=run_id, provider="scripted", prompt="p"))


# -- 3: an interrupt accepted while the run is starting ------------------------------------------


async def test_an_interrupt_before_the_spawn_means_the_cli_never_runs(
        agent: NodeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    spawns = 0
    real = spawn_run

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal spawns
        spawns += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(run_module, "spawn_run", counting)
    frames = start(agent, "r-early")  # the run exists; its task has not run yet
    assert agent.runs["r-early"].status == "starting"
    assert (await agent.interrupt_run(pb.InterruptRunRequest(run_id="r-early"))).accepted
    events = await asyncio.wait_for(collect(frames), 30)
    assert spawns == 0
    assert kinds(events) == ["error", "run_completed"]  # no run_started: nothing ran
    assert events[0].error.code == "user_cancelled"
    assert events[-1].run_completed.status == "interrupted"
    assert "r-early" not in agent._active


async def test_an_interrupt_during_the_spawn_kills_the_cli_at_once(
        agent: NodeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned, release = asyncio.Event(), asyncio.Event()
    real = spawn_run

    async def held(*args: Any, **kwargs: Any) -> Any:
        result = await real(*args, **kwargs)  # the CLI exists; the run has not seen it yet
        spawned.set()
        await release.wait()
        return result

    monkeypatch.setattr(run_module, "spawn_run", held)
    frames = asyncio.ensure_future(collect(start(agent, "r-spawning")))
    await asyncio.wait_for(spawned.wait(), 30)
    assert (await agent.interrupt_run(pb.InterruptRunRequest(run_id="r-spawning"))).accepted
    release.set()
    events = await asyncio.wait_for(frames, 30)
    end = events[-1].run_completed
    assert (end.status, end.signal) == ("interrupted", signal.SIGKILL)  # not SIGINT (ignored), then SIGTERM
    assert kinds(events)[-2:] == ["error", "run_completed"] and events[-2].error.code == "user_cancelled"
    assert not group_alive(agent.runs["r-spawning"].pid)


# -- 5: every way out of the run's task ends the run ---------------------------------------------


async def test_a_run_cancelled_in_its_spawn_still_ends_for_its_follower(monkeypatch: pytest.MonkeyPatch) -> None:
    node = NodeAgent(test_config(), providers={"scripted": ScriptedProvider(script=STUBBORN)})
    await node.start()
    entered = asyncio.Event()

    async def stuck(*_args: Any, **_kwargs: Any) -> Any:
        entered.set()
        await asyncio.Event().wait()  # a spawn that never returns (a full spawn pool, a hung filesystem)

    monkeypatch.setattr(run_module, "spawn_run", stuck)
    frames = asyncio.ensure_future(collect(start(node, "r-cancel")))
    await asyncio.wait_for(entered.wait(), 30)
    await node.stop(timeout=0.2)  # interrupts, then cancels the task still in its spawn
    events = await asyncio.wait_for(frames, 30)
    assert kinds(events) == ["error", "run_completed"]
    assert events[0].error.code == "node_shutdown"
    assert events[-1].run_completed.status == "interrupted"
    run = node.runs["r-cancel"]
    assert run.done and run.log.closed and "r-cancel" not in node._active


async def test_a_failing_spawn_step_fails_the_run_instead_of_leaving_it_open(
        agent: NodeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("spawn pool broke")

    monkeypatch.setattr(run_module, "spawn_run", broken)
    events = await asyncio.wait_for(collect(start(agent, "r-broken")), 30)
    assert kinds(events) == ["error", "run_completed"]
    assert events[0].error.code == "runtime" and "spawn pool broke" in events[0].error.message
    assert events[-1].run_completed.status == "failed"
    assert "r-broken" not in agent._active


async def test_a_failure_after_the_spawn_kills_the_cli_and_fails_the_run(
        agent: NodeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_pump(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("pump broke")

    monkeypatch.setattr(run_module, "pump", broken_pump)
    events = await asyncio.wait_for(collect(start(agent, "r-pump")), 30)
    assert kinds(events) == ["run_started", "error", "run_completed"]
    assert events[1].error.code == "runtime" and "pump broke" in events[1].error.message
    assert events[-1].run_completed.status == "failed"
    assert not group_alive(agent.runs["r-pump"].pid)  # the CLI did not outlive its run
    assert "r-pump" not in agent._active


# -- 8: an interrupt after the CLI exited is not accepted ----------------------------------------


async def test_an_interrupt_after_the_cli_exited_is_not_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    node = NodeAgent(test_config(), providers={"scripted": ScriptedProvider(lines=["a"])})
    await node.start()
    real = leader_exited
    calls = 0
    cleanup, release = asyncio.Event(), asyncio.Event()

    async def hooked(proc: Any, *args: Any) -> int:
        nonlocal calls
        rc = await real(proc, *args)
        calls += 1
        if calls == 2:  # the run's cleanup after the exit (the first call is the wait for it)
            cleanup.set()
            await release.wait()
        return rc

    monkeypatch.setattr(run_module, "leader_exited", hooked)
    try:
        frames = asyncio.ensure_future(collect(start(node, "r-exited")))
        await asyncio.wait_for(cleanup.wait(), 30)
        response = await node.interrupt_run(pb.InterruptRunRequest(run_id="r-exited"))
        release.set()
        events = await asyncio.wait_for(frames, 30)
        assert not response.accepted  # the run ends on its own: an accepted interrupt would be a lie
        assert events[-1].run_completed.status == "completed"
        assert "error" not in kinds(events)
    finally:
        release.set()
        await node.stop()


async def test_an_interrupt_after_the_last_turn_ended_is_not_accepted() -> None:
    script = "import json, time\nprint(json.dumps({'result': [1, 1]}), flush=True)\ntime.sleep(60)\n"
    node = NodeAgent(test_config(), providers={"scripted": ScriptedProvider(script=script)})
    await node.start()
    try:
        frames = node.start_run(pb.StartRunRequest(run_id="r-turn", provider="scripted", prompt="p"))
        events: list[pb.Event] = []
        while not any(e.HasField("result") for e in events):
            events.extend((await asyncio.wait_for(frames.__anext__(), 30)).events)
        response = await node.interrupt_run(pb.InterruptRunRequest(run_id="r-turn"))
        async for batch in frames:
            events.extend(batch.events)
        assert not response.accepted  # the result stands; the lingering CLI is stopped after exit_grace_s
        assert events[-1].run_completed.status == "completed"
    finally:
        await node.stop()
