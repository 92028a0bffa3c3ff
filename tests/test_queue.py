"""BoundedQueue: each overflow policy, close/abandon, waking blocked putters and getters, drop counters."""

from __future__ import annotations

import asyncio

import pytest

from asm_controller import BoundedQueue, ConfigError, QueueClosed, QueueDisconnected, QueueEmpty
from asm_controller._queue import OVERFLOW_POLICIES


def filled(policy: str, n: int = 3, maxsize: int = 3) -> BoundedQueue[int]:
    q: BoundedQueue[int] = BoundedQueue(maxsize, policy)  # type: ignore[arg-type]
    for i in range(1, n + 1):
        q.offer(i)
    return q


def drain(q: BoundedQueue[int]) -> list[int]:
    return q.get_batch(10_000)


def test_policies_are_the_four_named_ones() -> None:
    assert OVERFLOW_POLICIES == ("block", "drop_newest", "drop_oldest", "disconnect")


@pytest.mark.parametrize("maxsize", [0, -1, 1.5, True, "3"])
def test_maxsize_must_be_a_positive_integer(maxsize: object) -> None:
    with pytest.raises(ConfigError):
        BoundedQueue(maxsize, "block")  # type: ignore[arg-type]


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="drop_oldest"):
        BoundedQueue(3, "drop_random")  # type: ignore[arg-type]


def test_drop_newest_refuses_the_incoming_item() -> None:
    q = filled("drop_newest", 5)
    assert drain(q) == [1, 2, 3]
    assert (q.accepted, q.dropped) == (3, 2)


def test_drop_oldest_evicts_to_make_room() -> None:
    q = filled("drop_oldest", 5)
    assert q.offer(6) is True
    assert drain(q) == [4, 5, 6]
    assert (q.accepted, q.dropped) == (6, 3)


def test_block_offer_cannot_wait_so_refuses_when_full() -> None:
    q = filled("block", 4)
    assert q.offer(9) is False
    assert drain(q) == [1, 2, 3] and q.dropped == 2


def test_disconnect_cuts_the_consumer_off() -> None:
    q = filled("disconnect", 3)
    assert not q.disconnected
    assert q.offer(4) is False
    assert q.disconnected and q.closed and len(q) == 0
    assert q.dropped == 4  # the three queued (discarded) and the incoming one
    assert q.offer(5) is False and q.force(6) is False and q.dropped == 6


async def test_disconnect_raises_in_the_waiting_getter() -> None:
    q: BoundedQueue[int] = BoundedQueue(1, "disconnect")
    q.offer(1)
    assert await q.get() == 1
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.offer(2)
    q.offer(3)  # full: the reader is one behind, and this policy gives no slack
    with pytest.raises(QueueDisconnected):
        await getter
    assert isinstance(QueueDisconnected(), QueueClosed)


async def test_block_put_waits_for_room_and_get_wakes_it() -> None:
    q = filled("block", 2, maxsize=2)
    putter = asyncio.create_task(q.put(3))
    await asyncio.sleep(0.01)
    assert not putter.done() and len(q) == 2
    assert q.get_nowait() == 1
    assert await asyncio.wait_for(putter, 1) is True
    assert drain(q) == [2, 3] and q.dropped == 0


async def test_get_batch_wakes_every_blocked_putter_in_order() -> None:
    q = filled("block", 1, maxsize=1)
    putters = [asyncio.create_task(q.put(i)) for i in (2, 3)]
    await asyncio.sleep(0.01)
    seen: list[int] = []
    while len(seen) < 3:
        seen.append(await asyncio.wait_for(q.get(), 1))
    await asyncio.gather(*putters)
    assert seen == [1, 2, 3]


async def test_getter_waits_for_an_item() -> None:
    q: BoundedQueue[str] = BoundedQueue(2)
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    q.offer("x")
    assert await asyncio.wait_for(getter, 1) == "x"


async def test_close_drains_then_raises_and_wakes_the_getter() -> None:
    q = filled("drop_newest", 2)
    q.close()
    assert q.offer(3) is False and q.dropped == 1
    assert [await q.get(), await q.get()] == [1, 2]
    with pytest.raises(QueueClosed):
        await q.get()
    q2: BoundedQueue[int] = BoundedQueue(2)
    getter = asyncio.create_task(q2.get())
    await asyncio.sleep(0)
    q2.close()
    with pytest.raises(QueueClosed):
        await asyncio.wait_for(getter, 1)
    assert not await q2.wait()


async def test_close_releases_a_blocked_putter_which_is_refused() -> None:
    q = filled("block", 1, maxsize=1)
    putter = asyncio.create_task(q.put(2))
    await asyncio.sleep(0.01)
    q.close()
    assert await asyncio.wait_for(putter, 1) is False
    assert q.dropped == 1 and drain(q) == [1]


async def test_force_goes_past_the_bound_and_past_close() -> None:
    q = filled("block", 2, maxsize=2)
    assert q.force(3) is True
    q.close()
    assert q.force(4) is True
    assert drain(q) == [1, 2, 3, 4] and q.dropped == 0


async def test_abandon_discards_and_releases_a_blocked_putter() -> None:
    q = filled("block", 2, maxsize=2)
    putter = asyncio.create_task(q.put(3))
    await asyncio.sleep(0.01)
    q.abandon()
    assert await asyncio.wait_for(putter, 1) is False
    assert len(q) == 0 and q.dropped == 3  # two discarded, one refused
    assert q.force(4) is False and q.offer(5) is False and q.dropped == 5
    assert not await q.wait()


async def test_wait_room_reports_room_or_closed() -> None:
    q = filled("drop_newest", 1, maxsize=1)
    waiter = asyncio.create_task(q.wait_room())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    q.get_nowait()
    assert await asyncio.wait_for(waiter, 1) is True
    q.offer(2)
    closer = asyncio.create_task(q.wait_room())
    await asyncio.sleep(0.01)
    q.close()
    assert await asyncio.wait_for(closer, 1) is False


def test_peek_and_get_nowait_on_empty() -> None:
    q: BoundedQueue[int] = BoundedQueue(2)
    with pytest.raises(QueueEmpty):
        q.peek()
    with pytest.raises(QueueEmpty):
        q.get_nowait()
    q.offer(7)
    assert q.peek() == 7 and len(q) == 1 and q.get_nowait() == 7 and not q
    assert q.get_batch(5) == []


def test_usable_before_any_event_loop_runs() -> None:
    q: BoundedQueue[int] = BoundedQueue(2, "drop_oldest")
    for i in range(4):
        q.offer(i)

    async def main() -> list[int]:
        return [await q.get(), await q.get()]

    assert asyncio.run(main()) == [2, 3]
