"""PubSub: topic routing, independent subscriptions, bounded queues and drop policies, isolation of
slow/failing subscribers, the payload schema, unsubscribe, the broadcaster and external bridges."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from asm_controller._events import Event
from asm_controller.extensions.pubsub import (
    SCHEMA_VERSION,
    Broadcaster,
    Bus,
    ExternalBridge,
    ExternalBus,
    InMemoryExternalBus,
    Message,
    all_topic,
    encode_payload,
    run_topic,
    session_topic,
    topics_for,
)
from asm_wire import KIND_VALUES, ConfigError, pb


def ev(seq: int, session_id: str = "s1", run_id: str = "r1", content: str = "x") -> Event:
    return Event(pb.Event(id=f"{run_id}:{seq}", run_id=run_id, session_id=session_id, provider="shell", seq=seq,
                          kind=KIND_VALUES["assistant_delta"], timestamp_unix_nano=seq,
                          assistant_delta=pb.AssistantDelta(content=content)))


def drain(sub: Any) -> list[Message]:
    out = []
    while (m := sub.get_nowait()) is not None:
        out.append(m)
    return out


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def test_topic_names_are_asms() -> None:
    e = ev(1, "S", "R")
    assert topics_for(e) == ["asm:events", "asm:session:S", "asm:session:S:run:R"]
    assert topics_for(e, ["run", "all", "run"], prefix="x") == ["x:session:S:run:R", "x:events"]
    assert (all_topic(), session_topic("S"), run_topic("S", "R")) == ("asm:events", "asm:session:S",
                                                                       "asm:session:S:run:R")
    assert topics_for(ev(1, "", "R")) == ["asm:events"]  # no session id: no session/run topic
    with pytest.raises(ConfigError):
        Bus(scopes=["all", "node"])
    with pytest.raises(ConfigError):
        Bus(prefix=" ")


def test_routing_all_session_run() -> None:
    bus = Bus()
    every = bus.subscribe(bus.all_topic)
    s1 = bus.subscribe(bus.session_topic("s1"))
    s1r1 = bus.subscribe(bus.run_topic("s1", "r1"))
    s2 = bus.subscribe(session_topic("s2"))
    bus.publish(ev(1, "s1", "r1"))
    bus.publish(ev(1, "s1", "r2"))
    bus.publish(ev(1, "s2", "r3"))
    assert [(m.event.session_id, m.event.run_id) for m in drain(every)] == [("s1", "r1"), ("s1", "r2"), ("s2", "r3")]
    assert [m.event.run_id for m in drain(s1)] == ["r1", "r2"]
    assert [(m.topic, m.event.run_id) for m in drain(s1r1)] == [("asm:session:s1:run:r1", "r1")]
    assert [m.event.run_id for m in drain(s2)] == ["r3"]


async def test_two_subscriptions_are_independent_and_each_gets_every_message_once() -> None:
    bus = Bus()
    a = bus.subscribe("asm:session:s1")
    b = bus.subscribe("asm:session:s1")
    assert a is not b
    for i in range(1, 4):
        bus.publish(ev(i))
    got_a = [(await a.get()).event.seq for _ in range(3)]
    assert got_a == [1, 2, 3] and a.qsize() == 0
    assert [m.event.seq for m in drain(b)] == [1, 2, 3]
    a.unsubscribe()
    bus.publish(ev(4))
    assert a.qsize() == 0 and [m.event.seq for m in drain(b)] == [4]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_slow_subscriber_drops_with_its_policy_and_never_blocks_the_publisher(policy: Any) -> None:
    bus = Bus()
    slow = bus.subscribe("asm:events", maxsize=10, policy=policy)  # never reads
    fast_seen: list[int] = []
    fast = bus.subscribe("asm:events", maxsize=100_000, handler=lambda m: fast_seen.append(m.event.seq))
    n = 100_000
    events = [ev(i) for i in range(1, n + 1)]
    t0 = time.perf_counter()
    for e in events:
        bus.publish(e)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, elapsed  # bounded: publish never waits for anyone
    assert slow.qsize() == 10 and slow.dropped == n - 10 and slow.delivered == 10 + (n - 10) * (policy == "drop_oldest")
    kept = [m.event.seq for m in drain(slow)]
    assert kept == (list(range(n - 9, n + 1)) if policy == "drop_oldest" else list(range(1, 11)))
    await until(lambda: len(fast_seen) == n)  # the slow one did not cost the fast one anything
    assert fast.dropped == 0 and fast_seen[:3] == [1, 2, 3]
    await fast.aclose()


async def test_a_failing_subscriber_does_not_affect_the_others() -> None:
    bus = Bus()
    seen: list[int] = []

    def boom(m: Message) -> None:
        raise RuntimeError("subscriber bug")

    async def collect(m: Message) -> None:
        seen.append(m.event.seq)

    bad = bus.subscribe("asm:events", handler=boom)
    good = bus.subscribe("asm:events", handler=collect)
    crashing = bus.subscribe("asm:events")

    async def consume_and_crash() -> None:
        async for _ in crashing:
            raise ValueError("consumer crashed")

    task = asyncio.create_task(consume_and_crash())
    for i in range(1, 6):
        bus.publish(ev(i))  # never raises to the publisher
    await until(lambda: len(seen) == 5 and bad.errors == 5 and task.done())
    assert seen == [1, 2, 3, 4, 5] and isinstance(bad.last_error, RuntimeError)
    with pytest.raises(ValueError):
        await task
    bus.publish(ev(6))  # the crashed consumer's queue is bounded and only its own
    await until(lambda: len(seen) == 6)
    for sub in (bad, good):
        await sub.aclose()


def test_payload_schema_version_1() -> None:
    bus = Bus()
    sub = bus.subscribe("asm:session:s1:run:r1")
    e = ev(7, content="hello")
    bus.publish(e)
    (msg,) = drain(sub)
    assert SCHEMA_VERSION == 1
    assert msg.payload == {"v": 1, "topic": "asm:session:s1:run:r1", "event": e.to_dict()}
    assert msg.payload["event"]["payload"]["content"] == "hello"
    assert json.loads(msg.to_json()) == json.loads(json.dumps(msg.payload))
    assert encode_payload("t", e) == json.dumps({"v": 1, "topic": "t", "event": e.to_dict()}).encode()


async def test_unsubscribe_stops_delivery_and_ends_iteration() -> None:
    bus = Bus()
    sub = bus.subscribe("asm:events")
    bus.publish(ev(1))
    sub.unsubscribe()
    bus.publish(ev(2))
    assert [m.event.seq async for m in sub] == [1]  # what was queued, then the end
    assert bus.subscriptions("asm:events") == []

    waiting = bus.subscribe("asm:events")
    reader = asyncio.create_task(waiting.get())
    await asyncio.sleep(0)
    waiting.unsubscribe()  # wakes a parked reader
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(reader, 1)

    async with bus.subscribe("asm:events") as scoped:
        bus.publish(ev(3))
    bus.publish(ev(4))
    assert [m.event.seq for m in drain(scoped)] == [3] and bus.subscriptions() == []


def test_queue_configuration_is_checked() -> None:
    bus = Bus()
    with pytest.raises(ConfigError):
        bus.subscribe("asm:events", maxsize=0)
    with pytest.raises(ConfigError):
        bus.subscribe("asm:events", policy="drop_all")  # type: ignore[arg-type]


async def test_broadcaster_pumps_a_run_without_blocking_it() -> None:
    bus = Bus()
    sub = bus.subscribe("asm:session:s1", maxsize=1000)

    async def run() -> AsyncIterator[Event]:
        for i in range(1, 101):
            yield ev(i)

    async with Broadcaster(bus) as b:
        assert await b.pump(run()) == 100
        await b.flush(timeout=5)
    assert [m.event.seq for m in drain(sub)] == list(range(1, 101)) and b.dropped == 0


@pytest.mark.parametrize(("policy", "kept"), [("drop_oldest", [8, 9, 10]), ("drop_newest", [1, 2, 3])])
async def test_broadcaster_queue_is_bounded(policy: Any, kept: list[int]) -> None:
    bus = Bus()
    sub = bus.subscribe("asm:events")
    b = Broadcaster(bus, max_queue=3, policy=policy)
    b.publish_many([ev(i) for i in range(1, 11)])  # a session observer's call: no await in between
    assert b.pending() == 3 and b.dropped == 7
    await b.flush(timeout=5)
    assert [m.event.seq for m in drain(sub)] == kept
    await b.aclose()
    b.publish(ev(11))  # after close: dropped, never raised
    assert b.dropped == 8


async def test_external_adapter_receives_bytes_per_topic() -> None:
    bus = Bus()
    ext = InMemoryExternalBus()
    assert isinstance(ext, ExternalBus)
    async with ExternalBridge(bus, ext) as bridge:
        bus.publish(ev(1, "s1", "r1", content="a"))
        bus.publish(ev(2, "s1", "r1", content="b"))
        await bridge.flush(timeout=5)
    assert [t for t, _ in ext.records] == ["asm:events", "asm:session:s1", "asm:session:s1:run:r1"] * 2
    assert all(isinstance(p, bytes) for _, p in ext.records)
    for topic, raw in ext.records:
        payload = json.loads(raw)
        assert payload["v"] == 1 and payload["topic"] == topic and payload["event"]["kind"] == "assistant_delta"
    assert [p["event"]["payload"]["content"] for p in ext.decoded("asm:session:s1")] == ["a", "b"]
    assert bridge.sent == 6 and bridge.errors == 0
    bus.publish(ev(3))  # detached after close
    await asyncio.sleep(0.01)
    assert len(ext.records) == 6


async def test_external_failures_and_slowness_stay_in_the_bridge() -> None:
    class Flaky:
        def __init__(self) -> None:
            self.got: list[str] = []

        async def publish(self, topic: str, payload: bytes) -> None:
            if topic == "asm:events":
                raise ConnectionError("broker down")
            await asyncio.sleep(0.001)
            self.got.append(topic)

    bus = Bus()
    flaky = Flaky()
    bridge = ExternalBridge(bus, flaky, max_queue=5)
    bridge.start()
    t0 = time.perf_counter()
    for i in range(1, 1001):
        bus.publish(ev(i))
    assert time.perf_counter() - t0 < 2.0  # the publisher never waited for the broker
    await bridge.flush(timeout=10)
    await bridge.aclose()
    assert bridge.dropped >= 990  # bounded: most events were dropped, and counted
    assert bridge.errors >= 1 and isinstance(bridge.last_error, ConnectionError)
    # a failing topic did not stop the event's other topics
    assert flaky.got and flaky.got[:2] == ["asm:session:s1", "asm:session:s1:run:r1"]


async def test_bus_callback_and_observer_shapes() -> None:
    bus = Bus()
    sub = bus.subscribe("asm:events")
    bus.callback(ev(1), "rendered text")  # a rendering CallbackSink callback
    bus.publish_many([ev(2), ev(3)])  # a session observer
    assert [m.event.seq for m in drain(sub)] == [1, 2, 3] and bus.published == 3
