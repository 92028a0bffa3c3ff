"""Finished runs' retention counts what their events cost in memory (frame bytes + FRAME_OVERHEAD each)."""

from __future__ import annotations

from asm_node import NodeAgent
from asm_node.eventlog import FRAME_OVERHEAD
from asm_node.testing import ScriptedProvider, test_config
from asm_wire import pb

MANY_TINY = "import sys\nsys.stdout.write('x\\n' * 3000)\n"


async def test_retained_bytes_is_the_held_cost_of_the_finished_runs() -> None:
    agent = NodeAgent(test_config(), providers={"scripted": ScriptedProvider(script=MANY_TINY)})
    await agent.start()
    try:
        for i in range(3):
            request = pb.StartRunRequest(run_id=f"cost-{i}", provider="scripted", prompt="p")
            assert [ev async for batch in agent.start_run(request) for ev in batch.events]
        runs = [agent.runs[f"cost-{i}"] for i in range(3)]
        assert all(r.done for r in runs)
        # Thousands of one-character lines: the per-event overhead is most of what they hold.
        assert sum(r.held_cost - r.held_bytes for r in runs) >= 3 * 3000 * FRAME_OVERHEAD
        assert agent.retained_bytes == sum(r.held_cost for r in runs)
    finally:
        await agent.stop()
