"""PubSub: an in-process event bus with per-subscriber bounded queues, and a bridge to external brokers.

The Python form of ASM's ``Extensions.PubSub`` (asm_extensions.md section 5).

    bus = Bus()
    async with bus.subscribe(session_topic(sid)) as sub:      # an async iterator of Messages
        async for msg in sub:
            print(msg.topic, msg.event.kind, msg.payload)

    async with Broadcaster(bus) as b:                         # the run side: O(1), never blocks
        await b.pump(stream)                                   # or Session(..., observers=[b.publish_many])

Topics (ASM's names, prefix ``asm`` by default)
-----------------------------------------------
* ``asm:events`` — every event (scope ``all``);
* ``asm:session:<session_id>`` — a session's events (scope ``session``);
* ``asm:session:<session_id>:run:<run_id>`` — one run's events (scope ``run``).

Ids are not escaped (asm's ids are ULIDs and ``[A-Za-z0-9._-]`` names); a scope
whose id is empty is skipped. Unlike ASM, whose default scopes are
``[session, run]``, the bus publishes to all three by default: a topic nobody
subscribes to costs one dict lookup.

Payload schema, version 1
-------------------------
What a subscriber or an external broker receives for one topic::

    {"v": 1, "topic": "<the topic it was published on>", "event": <Event.to_dict()>}

``event`` is ``Event.to_dict()``: ``id``, ``kind``, ``seq``, ``run_id``,
``session_id``, ``provider``, ``provider_session_id``, ``timestamp`` (ISO-8601),
``metadata`` and ``payload`` (the kind's fields). ``v`` changes only on an
incompatible change; consumers must ignore keys they do not know. On an
external broker the payload is that object as UTF-8 JSON (:func:`encode_payload`).
In-process, a :class:`Message` carries the :class:`Event` itself (``msg.event``,
nothing is serialized unless ``msg.payload`` is read); treat both as read-only,
they are shared by every subscriber. ASM's payload repeated *all* topics in
``meta.topics`` (hard part 10); here ``topic`` is the one it came on.

Delivery rules
--------------
* :meth:`Bus.publish` never blocks, never awaits and never raises to the
  publisher. Each subscription has its own bounded queue (default 1000) and
  drop policy: ``drop_oldest`` (default: a slow subscriber sees the latest
  events) or ``drop_newest`` (it sees a prefix). Drops are counted per
  subscription (``sub.dropped``). A slow or failing subscriber only affects
  itself.
* Subscribing twice gives two independent subscriptions (two queues; each
  gets every message once). ``unsubscribe()`` stops delivery at once; what was
  already queued is still yielded, then iteration ends.
* A subscription with a ``handler`` runs it in its own task; an exception in
  the handler is counted (``sub.errors``), logged once, and the subscription
  goes on.
* ``publish`` must be called on the event loop's thread (from a thread, use
  ``loop.call_soon_threadsafe(bus.publish, event)``).

Differences from ASM's broadcaster (hard part 9), on purpose: there is no
unbounded mailbox in front of the bounded queue (``publish`` appends to it
directly); events being dispatched do not count toward the limit, so
``drop_oldest`` always has a queued event to drop; one topic failing on an
external broker does not stop the others; fan-out runs in batches.

External brokers
----------------
An :class:`ExternalBus` is anything with ``async publish(topic, payload: bytes)``.
:class:`ExternalBridge` forwards every event the bus publishes, once per topic,
from its own task and bounded queue, so a slow or failing broker never reaches
the run. No broker client is a dependency of asm; an adapter is a few lines,
e.g. with ``redis.asyncio`` (``pip install redis``)::

    class RedisBus:
        def __init__(self, client: redis.asyncio.Redis) -> None:
            self.client = client

        async def publish(self, topic: str, payload: bytes) -> None:
            await self.client.publish(topic, payload)  # SUBSCRIBE asm:session:<sid> on the other side

or with ``nats-py`` (NATS subjects use ``.``, so ``asm.session.<sid>`` and
wildcards like ``asm.session.*``)::

    class NatsBus:
        def __init__(self, nc: nats.aio.client.Client) -> None:
            self.nc = nc

        async def publish(self, topic: str, payload: bytes) -> None:
            await self.nc.publish(topic.replace(":", "."), payload)

    bridge = ExternalBridge(bus, RedisBus(redis.asyncio.Redis()))
    bridge.start()          # inside the event loop; await bridge.aclose() at shutdown

:class:`InMemoryExternalBus` is the reference adapter (it records what it gets).
Retries are the adapter's business; the bridge counts failures
(``bridge.errors``) and applies a per-publish timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast, runtime_checkable

from asm_controller._events import Event
from asm_controller._queue import BoundedQueue
from asm_wire import ConfigError

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SCOPES",
    "SCHEMA_VERSION",
    "Broadcaster",
    "Bus",
    "ExternalBridge",
    "ExternalBus",
    "InMemoryExternalBus",
    "Message",
    "Subscription",
    "all_topic",
    "encode_payload",
    "payload_for",
    "run_topic",
    "session_topic",
    "topics_for",
]

log = logging.getLogger("asm.pubsub")

#: The payload schema version (the ``"v"`` field).
SCHEMA_VERSION = 1
DEFAULT_PREFIX = "asm"
Scope = Literal["all", "session", "run"]
DEFAULT_SCOPES: tuple[Scope, ...] = ("all", "session", "run")
Policy = Literal["drop_oldest", "drop_newest"]
_POLICIES = ("drop_oldest", "drop_newest")


# -- topics and payloads ----------------------------------------------------------------


def all_topic(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:events"


def session_topic(session_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:session:{session_id}"


def run_topic(session_id: str, run_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:session:{session_id}:run:{run_id}"


def _check_scopes(scopes: Sequence[str], prefix: str) -> tuple[Scope, ...]:
    if not prefix or not prefix.strip():
        raise ConfigError(f"pubsub topic prefix must be non-blank, got: {prefix!r}")
    out: list[Scope] = []
    for s in scopes:
        if s not in ("all", "session", "run"):
            raise ConfigError(f"pubsub scopes entries must be all, session, or run, got: {s!r}")
        if s not in out:
            out.append(cast(Scope, s))
    return tuple(out)


def topics_for(event: Event, scopes: Sequence[str] = DEFAULT_SCOPES, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The topics an event is published on, in scope order, without duplicates."""
    return _topics(event, _check_scopes(scopes, prefix), prefix)


def _topics(event: Event, scopes: Sequence[Scope], prefix: str) -> list[str]:
    m = event.pb
    sid, rid = m.session_id, m.run_id
    out: list[str] = []
    for scope in scopes:
        if scope == "all":
            out.append(f"{prefix}:events")
        elif scope == "session":
            if sid:
                out.append(f"{prefix}:session:{sid}")
        elif scope == "run" and sid and rid:
            out.append(f"{prefix}:session:{sid}:run:{rid}")
    return out


def payload_for(topic: str, event: Event) -> dict[str, Any]:
    """The versioned payload of an event on a topic (see the module docstring)."""
    return {"v": SCHEMA_VERSION, "topic": topic, "event": event.to_dict()}


def encode_payload(topic: str, event: Event, event_json: str | None = None) -> bytes:
    """The payload as UTF-8 JSON; pass ``event_json`` (``json.dumps(event.to_dict())``) to reuse it
    across topics. Equal to ``json.dumps(payload_for(topic, event)).encode()``."""
    if event_json is None:
        event_json = json.dumps(event.to_dict(), default=str)
    return f'{{"v": {SCHEMA_VERSION}, "topic": {json.dumps(topic)}, "event": {event_json}}}'.encode()


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery: the topic it came on and the event (shared, read-only)."""

    topic: str
    event: Event

    @property
    def payload(self) -> dict[str, Any]:
        """``{"v": 1, "topic": ..., "event": event.to_dict()}``."""
        return payload_for(self.topic, self.event)

    def to_json(self) -> bytes:
        return encode_payload(self.topic, self.event)


# -- subscriptions ---------------------------------------------------------------------------


def _check_queue(maxsize: int, policy: str) -> None:
    if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
        raise ConfigError(f"pubsub queue size must be a positive integer, got: {maxsize!r}")
    if policy not in _POLICIES:
        raise ConfigError(f"pubsub overflow policy must be drop_oldest or drop_newest, got: {policy!r}")


class Subscription:
    """A subscriber's bounded queue of :class:`Message`; an async iterator.

    ``dropped`` counts messages lost to overflow, ``delivered`` those queued, ``errors``
    handler failures (handler mode only). Use as ``async with`` (or call
    :meth:`unsubscribe`) to stop delivery. One consumer per subscription: subscribe
    twice for two."""

    def __init__(self, bus: Bus | None, topic: str, *, maxsize: int = 1000,
                 policy: Policy = "drop_oldest") -> None:
        _check_queue(maxsize, policy)
        self._bus = bus
        self.topic = topic
        self.maxsize = maxsize
        self.policy: Policy = policy
        self.errors = 0
        self.last_error: BaseException | None = None
        self.closed = False
        self._queue: BoundedQueue[Message] = BoundedQueue(maxsize, policy)
        self._task: asyncio.Task[None] | None = None

    @property
    def dropped(self) -> int:
        """Messages lost to overflow (refused under drop_newest, evicted under drop_oldest)."""
        return self._queue.dropped

    @property
    def delivered(self) -> int:
        """Messages queued for this subscriber (an evicted one still counts: it was delivered)."""
        return self._queue.accepted

    # -- the publisher's side (never blocks, never raises) --------------------------------

    def _offer(self, msg: Message) -> None:
        if self.closed:
            return  # not counted as a drop: nobody listens any more
        self._queue.offer(msg)

    # -- the subscriber's side ---------------------------------------------------------------

    def qsize(self) -> int:
        return len(self._queue)

    def get_nowait(self) -> Message | None:
        """The next queued message, or None."""
        return self._queue.get_nowait() if self._queue else None

    async def get(self) -> Message:
        """The next message; raises :class:`StopAsyncIteration` once unsubscribed and drained."""
        if not await self._queue.wait():
            raise StopAsyncIteration
        return self._queue.get_nowait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        return await self.get()

    def unsubscribe(self) -> None:
        """Stop delivery now; queued messages are still yielded, then iteration ends. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._bus is not None:
            self._bus._remove(self)
        self._queue.close()  # wakes the reader (skipping one whose loop is gone); queued ones stay

    async def aclose(self, timeout: float | None = 5.0) -> None:
        """Unsubscribe; in handler mode, let the handler finish what is queued (up to ``timeout``
        seconds, then it is cancelled)."""
        self.unsubscribe()
        task = self._task
        if task is None or task is asyncio.current_task():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- handler mode ------------------------------------------------------------------------

    def _start_handler(self, handler: Callable[[Message], object]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run_handler(handler),
                                                            name=f"asm-pubsub-{self.topic}")

    async def _run_handler(self, handler: Callable[[Message], object]) -> None:
        while True:
            try:
                msg = await self.get()
            except StopAsyncIteration:
                return
            try:
                out = handler(msg)
                if inspect.isawaitable(out):
                    await out
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                self.last_error = exc
                if self.errors == 1:
                    log.warning("pubsub handler for %s failed (further failures are only counted): %r",
                                self.topic, exc)

    def __repr__(self) -> str:
        return (f"Subscription(topic={self.topic!r}, queued={len(self._queue)}, dropped={self.dropped}, "
                f"closed={self.closed})")


class Bus:
    """The in-process bus: topic -> subscriptions. See the module docstring for the rules."""

    def __init__(self, *, prefix: str = DEFAULT_PREFIX, scopes: Sequence[str] = DEFAULT_SCOPES) -> None:
        self.scopes = _check_scopes(scopes, prefix)
        self.prefix = prefix
        self.published = 0
        # Copy-on-write tuples: publish iterates a snapshot, (un)subscribe replaces it.
        self._subs: dict[str, tuple[Subscription, ...]] = {}
        self._taps: tuple[Callable[[Event], None], ...] = ()

    # -- topics -----------------------------------------------------------------------------

    @property
    def all_topic(self) -> str:
        return all_topic(self.prefix)

    def session_topic(self, session_id: str) -> str:
        return session_topic(session_id, self.prefix)

    def run_topic(self, session_id: str, run_id: str) -> str:
        return run_topic(session_id, run_id, self.prefix)

    def topics_for(self, event: Event) -> list[str]:
        return _topics(event, self.scopes, self.prefix)

    # -- subscribing ------------------------------------------------------------------------

    def subscribe(self, topic: str, *, maxsize: int = 1000, policy: Policy = "drop_oldest",
                  handler: Callable[[Message], object] | None = None) -> Subscription:
        """A new, independent subscription to ``topic``. With ``handler`` (sync or async), a task
        (started now, so this needs a running loop) calls it for each message."""
        sub = Subscription(self, topic, maxsize=maxsize, policy=policy)
        if handler is not None:
            sub._start_handler(handler)
        self._subs[topic] = (*self._subs.get(topic, ()), sub)
        return sub

    def add_tap(self, fn: Callable[[Event], None]) -> None:
        """Call ``fn(event)`` for every event published, once per event, inside :meth:`publish`.
        ``fn`` must be O(1) and must not block (e.g. an enqueue, as :class:`ExternalBridge` does);
        its exceptions are logged and swallowed."""
        self._taps = (*self._taps, fn)

    def remove_tap(self, fn: Callable[[Event], None]) -> None:
        self._taps = tuple(t for t in self._taps if t != fn)  # bound methods: equal, not identical

    def _remove(self, sub: Subscription) -> None:
        if sub.topic is None:
            return
        rest = tuple(s for s in self._subs.get(sub.topic, ()) if s is not sub)
        if rest:
            self._subs[sub.topic] = rest
        else:
            self._subs.pop(sub.topic, None)

    def subscriptions(self, topic: str | None = None) -> list[Subscription]:
        if topic is not None:
            return list(self._subs.get(topic, ()))
        return [s for subs in self._subs.values() for s in subs]

    # -- publishing -------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to every subscription of each of its topics. Never blocks, never raises."""
        try:
            self.published += 1
            subs = self._subs
            if subs:
                for topic in _topics(event, self.scopes, self.prefix):
                    targets = subs.get(topic)
                    if targets:
                        msg = Message(topic, event)
                        for sub in targets:
                            _offer(sub, msg)
        except Exception:  # pragma: no cover - publishing must never break the publisher
            log.exception("pubsub publish failed for %r", event)
        for tap in self._taps:
            try:
                tap(event)
            except Exception:
                log.exception("pubsub tap %r failed", tap)

    def publish_many(self, events: Iterable[Event]) -> None:
        """:meth:`publish` each event (the shape of a session observer: ``observers=[bus.publish_many]``)."""
        for event in events:
            self.publish(event)

    def callback(self, event: Event, _text: str = "") -> None:
        """:meth:`publish`, shaped as a rendering ``CallbackSink`` callback."""
        self.publish(event)

    def close(self) -> None:
        """Unsubscribe everyone (their iterations end once drained)."""
        for sub in self.subscriptions():
            sub.unsubscribe()


def _offer(sub: Subscription, msg: Message) -> None:
    try:
        sub._offer(msg)
    except Exception as exc:  # e.g. the subscriber's loop is closed: that subscriber only
        sub.errors += 1
        sub.last_error = exc


# -- the run side: a bounded, non-blocking broadcaster --------------------------------------


class _Pump:
    """A bounded queue drained in batches by one task (shared by Broadcaster and ExternalBridge)."""

    def __init__(self, maxsize: int, policy: Policy, name: str) -> None:
        _check_queue(maxsize, policy)
        self.maxsize = maxsize
        self.policy: Policy = policy
        self._name = name
        self._queue: BoundedQueue[Event] = BoundedQueue(maxsize, policy)
        self._idle: asyncio.Event | None = None
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    @property
    def dropped(self) -> int:
        """Events lost: to overflow, or offered after :meth:`aclose` began."""
        return self._queue.dropped

    def _enqueue(self, event: Event) -> None:
        if not self._queue.offer(event):
            return  # refused (counted): closing, or full under drop_newest
        if self._task is None:
            self._try_start()
        if self._idle is not None:
            self._idle.clear()

    def _try_start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the events wait for start()
        self._idle = asyncio.Event()
        if not self._queue:
            self._idle.set()
        self._task = loop.create_task(self._drain(), name=self._name)

    def start(self) -> None:
        """Start the dispatch task (needs a running loop; publishing inside a loop starts it too)."""
        if self._task is None:
            self._try_start()
            if self._task is None:
                raise RuntimeError(f"{self._name}: start() needs a running event loop")

    async def _drain(self) -> None:
        assert self._idle is not None
        idle = self._idle
        while True:
            if not self._queue:
                idle.set()
                if not await self._queue.wait():  # closed and drained
                    return
                continue
            batch = self._queue.get_batch(256)
            self._busy = True
            try:
                await self._dispatch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - _dispatch guards itself
                log.exception("%s: dispatch failed", self._name)
            finally:
                self._busy = False
            await asyncio.sleep(0)  # let the publisher (and everyone else) run between batches

    async def _dispatch(self, batch: list[Event]) -> None:
        raise NotImplementedError

    def pending(self) -> int:
        return len(self._queue)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued so far was dispatched."""
        if self._task is None:
            if not self._queue:
                return
            self.start()
        assert self._idle is not None
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def aclose(self, timeout: float | None = 5.0) -> None:
        """Dispatch what is queued (up to ``timeout`` seconds), then stop."""
        self._queue.close()  # later events are refused (counted); the queued ones are still dispatched
        task = self._task
        if task is None:
            if self._queue:
                self.start()
                task = self._task
            if task is None:
                return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Broadcaster(_Pump):
    """Takes a run's events without ever blocking it and publishes them on a :class:`Bus` from its own
    task, in batches, so the fan-out to many subscribers is off the run's path.

    Feed it with :meth:`publish` / :meth:`publish_many` (a session observer), :meth:`callback` (a
    rendering ``CallbackSink``), or ``await pump(events)`` (an async iterator such as a RunStream).
    The queue is bounded (``max_queue``, default 2048) with the given drop policy; ``dropped`` counts.
    """

    def __init__(self, bus: Bus, *, max_queue: int = 2048, policy: Policy = "drop_oldest") -> None:
        super().__init__(max_queue, policy, "asm-pubsub-broadcaster")
        self.bus = bus

    def publish(self, event: Event) -> None:
        """Queue one event; O(1), never blocks, never raises."""
        try:
            self._enqueue(event)
        except Exception:  # pragma: no cover
            log.exception("broadcaster publish failed")

    def publish_many(self, events: Iterable[Event]) -> None:
        for event in events:
            self.publish(event)

    def callback(self, event: Event, _text: str = "") -> None:
        """:meth:`publish`, shaped as a rendering ``CallbackSink`` callback (ASM's ``event_callback``)."""
        self.publish(event)

    async def pump(self, events: AsyncIterable[Event]) -> int:
        """Queue every event of ``events`` until it ends; returns how many. Does not wait for dispatch
        (see :meth:`flush`)."""
        self.start()
        n = 0
        async for event in events:
            self.publish(event)
            n += 1
        return n

    async def _dispatch(self, batch: list[Event]) -> None:
        publish = self.bus.publish
        for event in batch:
            publish(event)

    async def __aenter__(self) -> Broadcaster:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- external brokers ---------------------------------------------------------------------------


@runtime_checkable
class ExternalBus(Protocol):
    """An external broker (Redis, NATS, ...): publish ``payload`` (UTF-8 JSON, schema v1) on ``topic``."""

    async def publish(self, topic: str, payload: bytes) -> None: ...


class InMemoryExternalBus:
    """The reference :class:`ExternalBus`: records ``(topic, payload)`` pairs in ``records``."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes) -> None:
        self.records.append((topic, payload))

    def decoded(self, topic: str | None = None) -> list[dict[str, Any]]:
        """The recorded payloads (optionally of one topic), parsed."""
        return [json.loads(p) for t, p in self.records if topic is None or t == topic]


class ExternalBridge(_Pump):
    """Forwards every event published on ``bus`` to an :class:`ExternalBus`, once per topic of the
    event (``bus.topics_for``), from its own task with a bounded queue (``max_queue``, default 1000,
    ``policy``), so the broker's speed never reaches the publisher. Each publish gets ``timeout_s``;
    a failing or timed-out topic is counted in ``errors`` (the first is logged) and does not stop the
    event's other topics. ``sent`` counts successful publishes."""

    def __init__(self, bus: Bus, adapter: ExternalBus, *, max_queue: int = 1000, policy: Policy = "drop_oldest",
                 timeout_s: float = 5.0) -> None:
        super().__init__(max_queue, policy, "asm-pubsub-bridge")
        self.bus = bus
        self.adapter = adapter
        self.timeout_s = timeout_s
        self.sent = 0
        self.errors = 0
        self.last_error: BaseException | None = None
        self._attached = False

    def start(self) -> None:
        """Attach to the bus and start forwarding (needs a running loop)."""
        super().start()
        if not self._attached:
            self.bus.add_tap(self._enqueue)
            self._attached = True

    async def _dispatch(self, batch: list[Event]) -> None:
        for event in batch:
            topics = self.bus.topics_for(event)
            if not topics:
                continue
            try:
                event_json = json.dumps(event.to_dict(), default=str)
            except Exception as exc:  # pragma: no cover - to_dict is JSON-safe
                self._error(exc, topics[0])
                continue
            for topic in topics:
                try:
                    await asyncio.wait_for(self.adapter.publish(topic, encode_payload(topic, event, event_json)),
                                           self.timeout_s)
                    self.sent += 1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._error(exc, topic)

    def _error(self, exc: BaseException, topic: str) -> None:
        self.errors += 1
        self.last_error = exc
        if self.errors == 1:
            log.warning("pubsub bridge: publishing on %s failed (further failures are only counted): %r", topic, exc)

    async def aclose(self, timeout: float | None = 5.0) -> None:
        """Detach from the bus, forward what is queued (up to ``timeout`` s), then stop."""
        if self._attached:
            self.bus.remove_tap(self._enqueue)
            self._attached = False
        await super().aclose(timeout)

    async def __aenter__(self) -> ExternalBridge:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

