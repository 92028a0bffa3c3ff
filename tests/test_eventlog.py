"""The node's event log on its own: no process, no agent, no gRPC; events are plain serialized bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from asm_node.eventlog import FRAME_OVERHEAD, MAX_BATCH_BYTES, MAX_BATCH_EVENTS, EventLog, ReplayBudget, frame
from asm_wire import KIND_VALUES, ReplayGap, pb


def _event(i: int, size: int = 1) -> bytes:
    """A serialized event whose text says which one it is (``size`` pads it)."""
    text = f"{i}:".ljust(size, "x")
    return pb.Event(kind=KIND_VALUES["assistant_delta"], seq=i,
                    assistant_delta=pb.AssistantDelta(content=text)).SerializeToString()


def _log(max_events: int = 1000, max_bytes: int = 1 << 30, backlog: int = 1 << 30,
         budget: ReplayBudget | None = None, name: str = "r1") -> EventLog:
    return EventLog(name, max_events=max_events, max_bytes=max_bytes, backlog_max_bytes=backlog, budget=budget)


def _fill(log: EventLog, n: int, size: int = 1) -> None:
    """Append events ``last_seq + 1 .. last_seq + n``, one append each."""
    for i in range(log.last_seq + 1, log.last_seq + n + 1):
        log.append([_event(i, size)])


def _seqs(batch: bytes) -> list[int]:
    return [ev.seq for ev in pb.EventBatch.FromString(batch).events]


async def _until(cond: Callable[[], bool]) -> None:
    for _ in range(100):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def _read_all(log: EventLog, after: int = 0) -> list[int]:
    return [s async for b in log.follow(after) for s in _seqs(b)]


def test_frame_is_an_event_batch_entry_for_short_and_long_events() -> None:
    for size in (1, 127, 128, 300, 70_000):
        data = _event(1, size)
        (ev,) = pb.EventBatch.FromString(frame(data)).events
        assert ev.SerializeToString() == data


async def test_append_then_replay_in_order_and_after_a_seq() -> None:
    log = _log()
    log.append([_event(1), _event(2)])
    _fill(log, 3)
    assert (log.first_held_seq, log.last_seq) == (1, 5)
    log.close()
    assert await _read_all(log) == [1, 2, 3, 4, 5]
    assert await _read_all(log, 3) == [4, 5]
    assert await _read_all(log, 5) == []  # closed and caught up: the follow ends


async def test_live_follower_gets_later_appends_and_ends_on_close() -> None:
    log = _log()
    _fill(log, 2)
    got: list[int] = []

    async def follow() -> None:
        async for b in log.follow(0):
            got.extend(_seqs(b))

    task = asyncio.create_task(follow())
    await _until(lambda: got == [1, 2])
    assert log.followers == 1
    _fill(log, 2)
    await _until(lambda: got == [1, 2, 3, 4])
    assert not task.done()
    log.close()
    await asyncio.wait_for(task, 1)
    assert log.followers == 0


async def test_batches_are_bounded_in_events_and_bytes_and_a_huge_event_still_goes() -> None:
    log = _log(max_events=100_000)
    log.append([_event(i) for i in range(1, MAX_BATCH_EVENTS + 11)])
    log.append([_event(MAX_BATCH_EVENTS + 11, MAX_BATCH_BYTES + 10)])
    log.close()
    batches = [b async for b in log.follow(0)]
    assert [len(_seqs(b)) for b in batches] == [MAX_BATCH_EVENTS, 10, 1]
    assert [s for b in batches for s in _seqs(b)] == list(range(1, MAX_BATCH_EVENTS + 12))


async def test_back_pressure_waits_for_the_slowest_follower_and_wakes_at_half() -> None:
    log = _log(backlog=10 * (FRAME_OVERHEAD + 200))
    assert log.gate() is None  # nobody attached: nothing to wait for
    follower = log.follow(0)
    _fill(log, 1, 190)
    assert _seqs(await anext(follower)) == [1]  # attached, cursor at 2
    _fill(log, 30, 190)
    assert log.backlog_bytes > log.backlog_max_bytes
    gate = log.gate()
    assert gate is not None and log.paused and log.pauses == 1
    assert log.gate() is gate and log.pauses == 1  # one pause, however often the writer asks
    assert _seqs(await anext(follower)) == list(range(2, 32))  # takes everything: backlog 0
    assert gate.done() and not log.paused
    await follower.aclose()


async def test_back_pressure_released_by_the_follower_leaving_and_by_stop_pacing() -> None:
    log = _log(backlog=1000)
    follower = log.follow(0)
    _fill(log, 1, 500)
    await anext(follower)
    _fill(log, 10, 500)
    gate = log.gate()
    assert gate is not None
    await follower.aclose()  # the only follower went: nobody to wait for
    assert gate.done() and log.gate() is None and log.followers == 0

    log2 = _log(backlog=1000)
    follower = log2.follow(0)
    _fill(log2, 1, 500)
    await anext(follower)
    _fill(log2, 10, 500)
    gate = log2.gate()
    assert gate is not None
    log2.stop_pacing()
    assert gate.done() and log2.gate() is None  # never paced again, follower or not
    await follower.aclose()


async def test_eviction_by_count_and_replay_gap_names_the_seqs_gone() -> None:
    log = _log(max_events=4, name="run-x")
    _fill(log, 10)
    # 9 frames passed 2 x 4: down to 4 (seqs 6..9), then seq 10 appended.
    assert (log.first_held_seq, log.last_seq) == (6, 10)
    with pytest.raises(ReplayGap) as exc:
        await _read_all(log, 0)
    err = exc.value
    assert (err.kind, err.reason) == ("buffer_overflow", "replay_gap")
    assert "events 1..5 of run run-x" in err.message and "held now: 6..10" in err.message
    assert log.followers == 0  # the failed follower left no cursor behind
    log.close()
    assert await _read_all(log, 5) == [6, 7, 8, 9, 10]


async def test_an_attached_cursor_is_never_evicted_past() -> None:
    log = _log(max_events=4)
    follower = log.follow(0)
    _fill(log, 1)
    await anext(follower)  # cursor at 2
    _fill(log, 20)
    assert log.first_held_seq == 2  # over the bound, yet held for the attached follower
    got = _seqs(await anext(follower))
    assert got == list(range(2, 22))
    _fill(log, 1)  # now everything is sent: the next append may evict
    assert log.first_held_seq > 2
    await follower.aclose()


def test_byte_bound_per_log_evicts_oldest_down_to_three_quarters() -> None:
    per = len(frame(_event(1, 1000))) + FRAME_OVERHEAD
    log = _log(max_bytes=20 * per)
    _fill(log, 20, 1000)
    assert log.first_held_seq == 1 and log.held_cost == 20 * per
    _fill(log, 1, 1000)
    assert log.held_cost <= 15 * per and log.last_seq == 21
    assert log.held_bytes == log.held_cost - (log.last_seq - log.first_held_seq + 1) * FRAME_OVERHEAD


def test_node_budget_counts_every_live_log_and_trims_the_largest() -> None:
    per = len(frame(_event(1, 1000))) + FRAME_OVERHEAD
    budget = ReplayBudget(40 * per)
    big, small = _log(budget=budget, name="big"), _log(budget=budget, name="small")
    _fill(small, 5, 1000)
    _fill(big, 30, 1000)
    assert budget.held == big.held_cost + small.held_cost == 35 * per
    _fill(big, 6, 1000)  # 41 > 40: down to 30, from the largest log
    assert budget.held == big.held_cost + small.held_cost <= 30 * per
    assert small.first_held_seq == 1 and big.first_held_seq > 1
    big.close()  # a closed log leaves the budget (its frames count as retention now)
    assert budget.held == small.held_cost and budget.runs == {small}
    _fill(big, 1, 1000)  # appends after close are held but no longer budgeted
    assert budget.held == small.held_cost


async def test_a_paused_writer_resumes_only_once_the_backlog_is_down_to_half() -> None:
    per = len(frame(_event(4000))) + FRAME_OVERHEAD
    log = _log(max_events=100_000, backlog=1500 * per)
    follower = log.follow(0)
    log.append([_event(1)])
    await anext(follower)  # attached, cursor at 2
    log.append([_event(i) for i in range(2, 5002)])
    gate = log.gate()
    assert gate is not None
    assert len(_seqs(await anext(follower))) == MAX_BATCH_EVENTS  # 904 left: under the bound, over half
    assert log.backlog_max_bytes // 2 < log.backlog_bytes <= log.backlog_max_bytes
    assert log.paused and not gate.done()
    await anext(follower)
    assert gate.done() and not log.paused
    await follower.aclose()
