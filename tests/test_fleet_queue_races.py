"""FleetQueue against the store's view, in-process: a run granted its try while the queue reads the
store (where its placement already shows it as no longer queued) is not taken for one ended elsewhere."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

import asm_controller._fleetqueue as fleetqueue
from asm_controller._fleetqueue import FleetQueue


def _run(run_id: str) -> Any:
    return SimpleNamespace(run_id=run_id, priority=0, queued_at=None, queue_deadline=None,
                           opts_queue_timeout_s=None, cancel_requested=False)


async def _noop(*_: object) -> None:
    return None


async def _depth() -> int:
    return 0


async def test_a_run_placed_while_the_queue_reads_the_store_is_not_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleetqueue, "TICK_S", 0.01)
    run, reads = _run("placed"), 0
    queue: FleetQueue

    async def still_queued(ids: list[str]) -> set[str]:
        nonlocal reads
        reads += 1
        assert ids == ["placed"]
        # Meanwhile a slot frees: the run gets its try and is placed (the store says "pending" now).
        queue.wake()
        for _ in range(3):
            await asyncio.sleep(0)
        return set()

    queue = FleetQueue(max_queued=10, record=_noop, depth=_depth, room=lambda: False, still_queued=still_queued)
    await asyncio.wait_for(queue.wait(run, None), 5)  # granted (a cancel would raise user_cancelled here)
    await asyncio.sleep(0.05)  # a tick or more later: the queue's look at the store is done
    assert reads == 1
    assert run.cancel_requested is False, "a run placed during the store read was cancelled as ended elsewhere"
    queue.leave(run)
    await queue.close()


async def test_a_waiting_run_ended_in_the_store_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleetqueue, "TICK_S", 0.01)
    run = _run("ended")

    async def still_queued(ids: list[str]) -> set[str]:
        return set()  # interrupted through another replica: not queued any more

    queue = FleetQueue(max_queued=10, record=_noop, depth=_depth, room=lambda: False, still_queued=still_queued)
    with pytest.raises(Exception) as info:
        await asyncio.wait_for(queue.wait(run, None), 5)
    assert getattr(info.value, "kind", None) == "user_cancelled" and run.cancel_requested is True
    await queue.close()
