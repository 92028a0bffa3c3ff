"""FleetQueue against the store's view, in-process: a run granted its try while the queue reads the
store is not taken for one ended elsewhere (a compare-and-set on its placement decides); an interrupt
that lands while the run enters the queue (or is recorded queued again after a refused try) ends it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

import asm_controller._fleetqueue as fleetqueue
from asm_controller._fleetqueue import FleetQueue


def _run(run_id: str) -> Any:
    return SimpleNamespace(run_id=run_id, priority=0, queued_at=None, queue_deadline=None,
                           opts_queue_timeout_s=None, cancel_requested=False, recorded=False, fleet_queued=False)


async def _noop(*_: object) -> None:
    return None


async def _depth() -> int:
    return 0


async def test_a_run_placed_while_the_queue_reads_the_store_is_not_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleetqueue, "TICK_S", 0.01)
    run, reads = _run("placed"), 0
    queue: FleetQueue

    async def ended(ids: list[str]) -> set[str]:
        nonlocal reads
        reads += 1
        assert ids == ["placed"]
        # Meanwhile a slot frees: the run gets its try and is placed. Even a read that says it ended
        # leaves it alone now: its placement's compare-and-set on "queued" decides.
        queue.wake()
        for _ in range(3):
            await asyncio.sleep(0)
        return {"placed"}

    queue = FleetQueue(max_queued=10, record=_noop, depth=_depth, room=lambda: False, ended=ended)
    await asyncio.wait_for(queue.wait(run, None), 5)  # granted (a cancel would raise user_cancelled here)
    await asyncio.sleep(0.05)  # a tick or more later: the queue's look at the store is done
    assert reads == 1
    assert run.cancel_requested is False, "a run placed during the store read was cancelled as ended elsewhere"
    queue.leave(run)
    await queue.close()


async def test_a_waiting_run_ended_in_the_store_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleetqueue, "TICK_S", 0.01)
    run = _run("ended")

    async def ended(ids: list[str]) -> set[str]:
        return set(ids)  # interrupted through another replica: ended in the store

    queue = FleetQueue(max_queued=10, record=_noop, depth=_depth, room=lambda: False, ended=ended)
    with pytest.raises(Exception) as info:
        await asyncio.wait_for(queue.wait(run, None), 5)
    assert getattr(info.value, "kind", None) == "user_cancelled" and run.cancel_requested is True
    await queue.close()


async def test_an_interrupt_during_the_queued_record_ends_the_run() -> None:
    """Run.interrupt while the queue writes the "queued" record: its cancel finds no waiter yet (False),
    so wait() itself must see cancel_requested, or the run waits for a slot that may never come."""
    run = _run("interrupted")
    queue: FleetQueue

    async def record(r: Any) -> None:
        await asyncio.sleep(0)
        r.cancel_requested = True  # Run.interrupt, then:
        assert queue.cancel(r) is False  # not waiting yet
        await asyncio.sleep(0)

    queue = FleetQueue(max_queued=10, record=record, depth=_depth, room=lambda: False)
    with pytest.raises(Exception) as info:
        await asyncio.wait_for(queue.wait(run, None), 2)
    assert getattr(info.value, "kind", None) == "user_cancelled"
    assert queue.waiting() == 0
    await queue.close()


async def test_an_interrupt_during_the_depth_read_ends_the_run() -> None:
    run = _run("interrupted")
    records = 0

    async def depth() -> int:
        run.cancel_requested = True  # Run.interrupt: no waiter to cancel yet
        return 0

    async def record(r: Any) -> None:
        nonlocal records
        records += 1

    queue = FleetQueue(max_queued=10, record=record, depth=depth, room=lambda: False)
    with pytest.raises(Exception) as info:
        await asyncio.wait_for(queue.wait(run, None), 2)
    assert getattr(info.value, "kind", None) == "user_cancelled"
    assert records == 0 and queue.waiting() == 0  # never recorded queued
    await queue.close()


async def test_a_placed_try_refused_is_recorded_queued_again_and_may_be_interrupted_then() -> None:
    """A granted run whose placement moved it to "pending" (fleet_queued False) and whose StartRun was
    refused is recorded queued again before it waits; an interrupt during that write ends it."""
    run = _run("placed")
    records = 0

    async def record(r: Any) -> None:
        nonlocal records
        records += 1
        r.recorded, r.fleet_queued = True, True  # what StoreRegistry.queued does
        if records == 2:
            r.cancel_requested = True  # Run.interrupt during the second write: the waiter is removed
            queue.cancel(r)

    queue = FleetQueue(max_queued=10, record=record, depth=_depth, room=lambda: False)
    first = asyncio.create_task(queue.wait(run, None))
    for _ in range(10):
        await asyncio.sleep(0)
    assert queue.waiting() == 1 and not first.done()
    queue.wake()
    await asyncio.wait_for(first, 2)  # granted its try
    run.fleet_queued = False  # placing: "pending" on the node; then StartRun said at_capacity
    with pytest.raises(Exception) as info:
        await asyncio.wait_for(queue.wait(run, None), 2)
    assert records == 2, "a refused placed try was not recorded queued again"
    assert getattr(info.value, "kind", None) == "user_cancelled"
    assert queue.waiting() == 0
    await queue.close()
