"""Retention of finished runs: bounded by age, count and bytes, and admission that does not scan it.

A node used to keep every finished run for ``retention_s`` and count active runs by scanning
all of them on every admission: a soak fell from 570 to 55 runs/s. These tests build thousands
of finished runs in-process (real ``Run`` objects, completed without a process) and check the
admission path never iterates the registry, and that each bound evicts the oldest finished runs.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asm_controller import EmbeddedNode, GrpcNodeClient, RemoteNode, Session
from asm_node import NodeAgent
from asm_node.providers.base import CommandSpec, RunSpec
from asm_node.run import Run
from asm_wire import KIND_VALUES, AsmError, ReplayGap, RunNotFound, pb
from tests.support.processes import NodeProcess, node_config


def _run(agent: NodeAgent, rid: str, payload: int = 0) -> Run:
    """A registered run (active until completed), built without spawning anything."""
    provider = agent.providers["shell"]
    spec = RunSpec(run_id=rid, session_id=rid, provider="shell", prompt="true", cwd="/", permission_mode="default",
                   options=provider.validate_options({}, "default"), env={})
    run = Run(spec, CommandSpec(argv=["true"], cwd="/", env={}), provider.new_parser(spec), agent.config, None,
              agent._run_finished, agent.metrics)
    agent._register(run)
    if payload:
        run._emit([pb.Event(kind=KIND_VALUES["assistant_delta"],
                            assistant_delta=pb.AssistantDelta(content="x" * payload))])
    return run


def _finished(agent: NodeAgent, rid: str, payload: int = 0) -> Run:
    run = _run(agent, rid, payload)
    run._complete("completed", 0, 0)
    return run


async def _get_kind(agent: NodeAgent, rid: str) -> str | None:
    try:
        await agent.get_run(pb.GetRunRequest(run_id=rid))
    except AsmError as err:
        return err.kind
    return None


class _NoScan(dict[str, Run]):
    """The run registry, refusing to be iterated: any whole-registry scan fails the test."""

    def _scan(self, *_: object) -> Any:
        raise AssertionError("the run registry was scanned")

    __iter__ = values = items = keys = _scan


class _CountingFinished(OrderedDict[str, tuple[Run, int]]):
    """The finished-run index, counting the entries eviction looks at."""

    looked = 0

    def items(self) -> Iterator[tuple[str, tuple[Run, int]]]:  # type: ignore[override]
        for item in super().items():
            self.looked += 1
            yield item


async def test_admission_does_not_scan_retained_runs() -> None:
    agent = NodeAgent(node_config(reaper=False, retention_max_runs=5000, max_runs=3))
    for i in range(5000):
        _finished(agent, f"done-{i}")
    active = [_run(agent, f"live-{i}") for i in range(2)]
    assert len(agent.runs) == 5002 and agent.active_runs() == 2

    agent.runs = _NoScan(agent.runs)
    agent._finished = counting = _CountingFinished(agent._finished)
    for _ in range(200):
        agent._admit("shell", "")  # the whole admission path: state, provider, capacity, cwd
    assert agent.active_runs() == 2
    handshake = await agent.handshake(pb.HandshakeRequest())
    assert (handshake.load.active_runs, handshake.load.retained_runs) == (2, 5000)

    # A third active run fills the node: capacity is still counted right, without a scan.
    third = _run(agent, "live-2")
    with pytest.raises(AsmError) as exc:
        agent._admit("shell", "")
    assert exc.value.reason == "at_capacity"

    # Finishing a run over the count bound evicts exactly the oldest one, looking at O(1) entries.
    active[0]._complete("completed", 0, 0)
    assert counting.looked <= 3
    assert "done-0" not in agent.runs and "done-1" in agent.runs and "live-0" in agent.runs
    assert len(counting) == 5000 and agent.active_runs() == 2
    third._complete("completed", 0, 0)
    assert counting.looked <= 6 and "done-1" not in agent.runs


async def test_count_bound_evicts_oldest_finished_and_evicted_id_is_not_found() -> None:
    agent = NodeAgent(node_config(reaper=False, retention_max_runs=3))
    live = _run(agent, "live")
    for i in range(5):
        _finished(agent, f"r{i}")
    assert sorted(agent.runs) == ["live", "r2", "r3", "r4"]
    assert await _get_kind(agent, "r0") == "not_found"
    with pytest.raises(AsmError) as exc:
        agent.attach_run_frames(pb.AttachRunRequest(run_id="r1"))
    assert isinstance(exc.value, RunNotFound) and exc.value.kind == "not_found" and "r1" in exc.value.message
    assert await _get_kind(agent, "r4") is None and await _get_kind(agent, "live") is None
    live._complete("completed", 0, 0)
    assert sorted(agent.runs) == ["live", "r3", "r4"]


async def test_byte_bound_counts_held_frames_and_evicts_oldest() -> None:
    agent = NodeAgent(node_config(reaper=False, retention_max_bytes=100_000))
    big = _finished(agent, "big-0", payload=40_000)
    assert 40_000 < big.held_bytes < 41_000
    _finished(agent, "big-1", payload=40_000)
    assert agent.retained_bytes == big.held_cost * 2
    _finished(agent, "big-2", payload=40_000)  # 120 kB held: the oldest goes
    assert sorted(agent.runs) == ["big-1", "big-2"]
    assert agent.retained_bytes <= 100_000
    # A run larger than the whole budget is not kept at all, and takes nobody else with it
    # beyond what the bound needs; an active run of any size is never evicted.
    live = _run(agent, "live-huge", payload=300_000)
    _finished(agent, "huge", payload=200_000)
    assert "huge" not in agent.runs and "live-huge" in agent.runs
    live._complete("completed", 0, 0)
    assert "live-huge" not in agent.runs and agent.retained_bytes <= 100_000


@pytest.mark.slow
async def test_age_bound_evicts_finished_never_active() -> None:
    agent = NodeAgent(node_config(reaper=False, retention_s=0.3))
    await agent.start()
    try:
        live = _run(agent, "live")
        for i in range(3):
            _finished(agent, f"old-{i}")
        await asyncio.sleep(0.15)
        _finished(agent, "young")
        await asyncio.sleep(0.3)  # the old ones are past 0.3 s, "young" is not yet
        assert sorted(agent.runs) == ["live", "young"]
        await asyncio.sleep(0.3)
        assert sorted(agent.runs) == ["live"]
        assert agent.retained_bytes == 0
        assert await _get_kind(agent, "young") == "not_found"
        live._complete("completed", 0, 0)
    finally:
        await agent.stop()


async def test_follower_of_an_evicted_run_gets_every_event() -> None:
    """Eviction drops the registry's reference only: a replay already under way completes."""
    agent = NodeAgent(node_config(reaper=False, retention_max_runs=1))
    run = _finished(agent, "first", payload=10)
    frames = agent.attach_run_frames(pb.AttachRunRequest(run_id="first"))
    got = pb.EventBatch.FromString(await frames.__anext__())
    _finished(agent, "second")
    assert "first" not in agent.runs
    rest = [pb.EventBatch.FromString(b) async for b in frames]
    events = [*got.events, *(e for b in rest for e in b.events)]
    assert [e.seq for e in events] == list(range(1, run.last_seq + 1))
    assert events[-1].kind == pb.EVENT_KIND_RUN_COMPLETED


async def test_real_runs_respect_the_count_bound(tmp_path: Path) -> None:
    agent = NodeAgent(node_config(retention_max_runs=2))
    await agent.start()
    try:
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            ids = []
            for _ in range(4):
                stream = s.stream("true")
                async for _ev in stream:
                    pass
                assert stream.result is not None and stream.result.ok
                ids.append(stream.run_id)
        assert sorted(agent.runs) == sorted(ids[2:])
        assert agent.active_runs() == 0
    finally:
        await agent.stop()


async def test_node_serve_retention_flags(node_process: Any) -> None:
    node: NodeProcess = node_process("--retention-runs", "1", "--retention-seconds", "60",
                                     "--retention-bytes", "1000000")
    client = GrpcNodeClient(RemoteNode(node.address))
    try:
        for rid in ("flag-a", "flag-b"):
            async for _batch in client.start_run(pb.StartRunRequest(run_id=rid, provider="shell", prompt="true")):
                pass
        hs = await client.handshake(pb.HandshakeRequest())
        assert hs.load.retained_runs == 1
        assert (await client.get_run(pb.GetRunRequest(run_id="flag-b"))).status == pb.RUN_STATUS_COMPLETED
        # Evicted: no longer held (not listed, no events) though the run journal still has its outcome.
        assert [r.run_id for r in (await client.list_runs(pb.ListRunsRequest())).runs] == ["flag-b"]
        evicted = await client.get_run(pb.GetRunRequest(run_id="flag-a"))
        assert evicted.status == pb.RUN_STATUS_COMPLETED and evicted.first_held_seq == evicted.last_seq + 1
    finally:
        await client.close()


def test_negative_retention_flag_is_a_config_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "asm_cli", "node", "serve", "--listen", "127.0.0.1:0",
                           "--retention-runs", "-1"], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode != 0
    assert "retention_max_runs" in proc.stderr and "Traceback" not in proc.stderr


async def test_a_cursor_older_than_the_held_events_is_a_replay_gap() -> None:
    """The node's replay bound is a typed ReplayGap (kind buffer_overflow, reason replay_gap), not a string to match."""
    agent = NodeAgent(node_config(reaper=False, replay_buffer_events=16))
    run = _run(agent, "long")
    for _ in range(40):
        run._emit([pb.Event(kind=KIND_VALUES["assistant_delta"], assistant_delta=pb.AssistantDelta(content="x"))])
    with pytest.raises(ReplayGap) as exc:
        async for _ in run.follow(0):
            pass
    assert (exc.value.kind, exc.value.reason) == ("buffer_overflow", "replay_gap") and "long" in exc.value.message
    run._complete("completed", 0, 0)
