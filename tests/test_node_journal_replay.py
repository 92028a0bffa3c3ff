"""A journaled (evicted) run's replay: the outcome, or ReplayGap, never a silent hole.

In-process ``NodeAgent`` (in-memory journal) with ``retention_max_runs=0``: a run is
evicted the moment it ends, so every later attach is answered from the journal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from asm_node import NodeAgent
from asm_node.testing import ScriptedProvider, test_config
from asm_wire import ReplayGap, pb

LINES = ["a", "b", "c", "d", {"error": "boom"}]


async def events(stream: AsyncIterator[pb.EventBatch]) -> list[pb.Event]:
    return [ev async for batch in stream for ev in batch.events]


@pytest.fixture
async def agent() -> AsyncIterator[NodeAgent]:
    node = NodeAgent(test_config(retention_max_runs=0), providers={"scripted": ScriptedProvider(lines=LINES)})
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def test_an_evicted_runs_replay_from_before_its_outcome_is_a_replay_gap(agent: NodeAgent) -> None:
    request = pb.StartRunRequest(run_id="rg-1", provider="scripted", prompt="p")
    seen = await events(agent.start_run(request))
    assert "rg-1" not in agent.runs  # evicted: the journal answers from now on
    last = seen[-1].seq
    assert seen[-1].kind == pb.EVENT_KIND_RUN_COMPLETED and last > 4
    gaps = agent.metrics.overflows.labels("replay")
    before = gaps._value.get()
    # A follower that saw 1..2 and comes back: events 3..last-2 are gone, it is told so.
    with pytest.raises(ReplayGap) as caught:
        await events(agent.attach_run(pb.AttachRunRequest(run_id="rg-1", after_seq=2)))
    assert caught.value.reason == "replay_gap" and f"events 3..{last - 2} " in caught.value.message
    with pytest.raises(ReplayGap):  # a StartRun re-attaching with its cursor is answered the same way
        await events(agent.start_run(pb.StartRunRequest(run_id="rg-1", provider="scripted", prompt="p",
                                                        after_seq=2)))
    assert gaps._value.get() == before + 2
    # A cursor at what is kept gets the rest; one at the end gets nothing; a new caller gets the outcome.
    tail = await events(agent.attach_run(pb.AttachRunRequest(run_id="rg-1", after_seq=last - 2)))
    assert [e.seq for e in tail] == [last - 1, last]
    assert [e.kind for e in tail] == [pb.EVENT_KIND_ERROR, pb.EVENT_KIND_RUN_COMPLETED]
    assert await events(agent.attach_run(pb.AttachRunRequest(run_id="rg-1", after_seq=last))) == []
    summary = await events(agent.attach_run(pb.AttachRunRequest(run_id="rg-1")))
    assert [e.seq for e in summary] == [last - 1, last] and summary[-1].metadata["origin"] == "node_journal"
