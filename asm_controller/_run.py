"""The controller side of one run: start it on a node, follow its stream, reduce it, end it typed.

A :class:`Run` talks to its owner (a :class:`~asm_controller.Session`) only through
the narrow :class:`RunHost` interface: the node pool, metrics, and four callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from asm_controller._channel import BatchChannel
from asm_controller._client import ANSWERED, RemoteNode
from asm_controller._connector import NodeHandle, NodeTarget, preflight, probe_timeout_s
from asm_controller._events import Event
from asm_controller._fleetqueue import FleetQueue, NullFleetQueue
from asm_controller._options import RunOptions, lane_metadata
from asm_controller._pool import NodePool, provider_key
from asm_controller._reducer import INTERRUPT_KINDS, NODE_STOPPED_KINDS, RAN_ON_KEYS, EventReducer, Result, is_work
from asm_controller._registry import Registry, restore_reducer
from asm_controller._routing import Candidate, eligible, reported_load
from asm_controller._wire import Frames
from asm_controller._wire import take as take_wire
from asm_controller.extensions.pipeline import AllowedTools, Pipeline
from asm_wire import (
    TERMINAL_STATUSES,
    AsmError,
    Capability,
    ConfigError,
    Decision,
    LeaseLost,
    NodeCapabilityMismatch,
    NodeConnectionError,
    NodeConnectTimeout,
    NodeNotReady,
    NodeUnauthenticated,
    NodeUnreachable,
    NodeVersionMismatch,
    ProviderMissing,
    RunNotFound,
    RunStatus,
    make_error,
    normalize_kind,
    pb,
)

if TYPE_CHECKING:  # metrics (prometheus_client) are imported only by whoever makes them
    from asm_controller._metrics import ControllerMetrics

log = logging.getLogger("asm_controller.session")

_RUN_COMPLETED = pb.EVENT_KIND_RUN_COMPLETED


class RunHost(Protocol):
    """What a run needs from its owner."""

    @property
    def session_id(self) -> str: ...

    @property
    def pool(self) -> NodePool: ...

    @property
    def metrics(self) -> ControllerMetrics | None: ...

    @property
    def registry(self) -> Registry: ...

    def observe(self, run: Run, events: list[Event]) -> None:
        """Session bookkeeping (approvals, cost) for events, before the subscriber sees them."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task the owner keeps a reference to (and cancels on stop)."""

    def run_finished(self, run: Run) -> None:
        """The run ended (its stream is closed): free its slot, promote a queued run."""

    def dequeue(self, run: Run) -> None:
        """A queued run was cancelled before it started."""

    @property
    def queue(self) -> FleetQueue | NullFleetQueue:
        """Where a run no node can take waits (the no-op queue: it fails at once)."""
        ...


CONTROLLER_METADATA_KEY = "asm.controller"
_TRANSIENT_KINDS = frozenset({"connection_failed", "transport_error", "timeout"})


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, AsmError) and exc.kind in _TRANSIENT_KINDS and not isinstance(exc, _ADMISSION_REFUSALS)


_ADMISSION_REFUSALS = (NodeUnauthenticated, NodeVersionMismatch, NodeCapabilityMismatch)
# Failures that say the node itself is in trouble (they mark it unhealthy for the cooldown).
_NODE_FAULTS = (NodeUnreachable, NodeConnectTimeout, NodeNotReady, NodeVersionMismatch, NodeCapabilityMismatch)


# What gRPC core says when the channel never reached the node: a call that failed like this was
# never delivered, so it can go to another node without any risk of running twice.
_NOT_DELIVERED = ("failed to connect", "connection refused", "connect failed", "dns resolution failed",
                  "name resolution", "no route to host", "network is unreachable")


def _not_delivered(err: AsmError) -> bool:
    """True when a StartRun failed before the request could reach the node (refused, never connected)."""
    if err.kind != "connection_failed":
        return False
    text = err.message.lower()
    return any(s in text for s in _NOT_DELIVERED)


#: Provider failover (ASM's routing extension): failures of a provider *before it did any work* that move
#: the run to the next provider candidate. transport_error only for an HTTP 5xx (_SERVER_ERROR): a CLI that
#: crashed or was killed is not a provider outage.
FAILOVER_KINDS = frozenset({"cli_not_found", "auth_error", "rate_limit", "transport_error"})
_SERVER_ERROR = re.compile(r"\b5\d\d\b|internal server error|overloaded|service unavailable|bad gateway", re.I)


def failover_error(err: AsmError) -> bool:
    """A failure that says this provider cannot serve now (no CLI, auth, rate limit, HTTP 5xx): try the next."""
    if err.kind not in FAILOVER_KINDS:
        return False
    if err.kind == "transport_error":
        return err.domain == "provider" and bool(_SERVER_ERROR.search(err.message))
    return True


def _first_failure(events: Sequence[pb.Event]) -> AsmError | None:
    for m in events:
        if m.kind == pb.EVENT_KIND_ERROR and m.error.severity in (
                pb.SEVERITY_UNSPECIFIED, pb.SEVERITY_ERROR, pb.SEVERITY_FATAL):
            e = m.error
            return make_error(normalize_kind(e.code), e.domain or "runtime", e.message,
                              reason=m.metadata.get("reason", ""))
    return None


async def _replay(first_error: BaseException | None, rest: AsyncIterator[pb.EventBatch]) -> AsyncIterator[pb.EventBatch]:
    """The stream after the batches a provider probe held: its error (the stream broke), or the rest."""
    if first_error is not None:
        raise first_error
    async for batch in rest:
        yield batch


def _backoff(failures: int) -> float:
    """Jittered exponential pause before the next attempt after ``failures`` failed ones (50 ms .. 1 s)."""
    return float(min(1.0, 0.05 * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0))


class _NodeLost(Exception):
    """Internal: the run's node was declared lost (or restarted), or stopped the run (``kind``
    node_draining / node_shutdown: its drain deadline passed, it is shutting down)."""

    def __init__(self, reason: str, kind: str = "node_lost") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class Run:
    """Controller side of one run: admission, driver task, reducer, subscriber channel.

    The driver starts the run on the first node that admits it, follows its
    event stream, and when the stream breaks re-attaches from the last
    sequence number it has (jittered exponential backoff, bounded by the
    node-lost timeout); the reducer drops any event it has already seen, so
    the subscriber gets every event exactly once, in order. A node declared
    lost (or restarted) ends the run with ``node_lost``: a started run is never
    started again elsewhere, unless ``on_node_lost="resume"`` asks to continue
    its *provider session* on another node.
    """

    def __init__(self, host: RunHost, run_id: str, prompt: str, opts: RunOptions, subscribed: bool,
                 attach: bool = False, after_seq: int = 0, session_id: str = "") -> None:
        self.host = host
        self.run_id = run_id
        #: The session the run belongs to: its host's, unless the caller named one (a controller's client).
        self.session_id = session_id or host.session_id
        self.prompt = prompt
        #: The run's options as asked (with every provider candidate); ``opts`` is the current attempt's.
        self.requested = opts
        self.opts = opts.for_provider(opts.candidates[0]) if opts.providers else opts
        self.attach = attach
        #: Until then (monotonic), a node that does not know this attached run yet is asked again: a run
        #: taken over as placed a moment ago (its StartRun may still be on its way there; FleetApi.take_over).
        self.not_found_grace_until = 0.0
        self.state = "new"  # new | queued | active | done
        self.reducer = EventReducer(
            run_id, self.session_id, self.opts.provider,
            {"provider": self.opts.provider, **lane_metadata(opts.lane, False), "execution": "pending"},
        )
        if opts.providers:
            self.reducer.metadata["providers"] = list(opts.candidates)
        #: Warnings about provider candidates that failed before doing any work (delivered after run_started).
        self._notices: list[Event] = []
        self._pair: tuple[str, str] | None = None  # (node key, provider) of the current attempt
        self.channel: BatchChannel | None = BatchChannel() if subscribed else None
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.handle: NodeHandle | None = None
        self.cancel_requested = False
        self.reconnects = 0
        self._interrupt_sent = False
        self._started_on_node = False
        self._typed_error: AsmError | None = None
        self._lost: str | None = None
        self._epoch = ""
        self._follow_task: asyncio.Task[None] | None = None
        self._node_run_id = run_id  # differs after a resume on another node
        self._left_nodes: set[str] = set()  # nodes this run was lost on: never resumed onto again
        # The node's sequence number seen so far (the re-attach cursor). Events are renumbered
        # for the subscriber when a pipeline injects or drops events, or after a resume elsewhere.
        self._node_seq = after_seq
        #: The principal that started the run (recorded in the registry; the service checks it).
        self.owner = ""
        #: Set once the run is bound to a node (a recovered run: once it has re-attached there).
        self.bound = asyncio.Event()
        #: True once the registry holds the run (its events and end are recorded from then on).
        self.recorded = False
        #: The controller is stopping without ending the run (Session.detach): nothing is recorded as its end.
        self.detaching = False
        #: Fleet queue: its priority, when it entered the queue and when it gives up (unix seconds).
        self.priority = opts.priority
        self.opts_queue_timeout_s = opts.queue_timeout_ms / 1000
        self.queued_at: float | None = None
        self.queue_deadline: float | None = None
        #: True while the run is recorded as queued (placing then moves it to its node).
        self.fleet_queued = False
        #: This replica's lease on the run in a shared store (asm_controller._store.Lease), or None.
        self.lease: Any = None
        self.lease_at = 0.0  # time.monotonic() when the lease was granted
        self.reducer.last_seq = after_seq  # attach after_seq: events up to it are not wanted
        plugs = list(opts.pipeline)
        if opts.allowed_tools:
            plugs.insert(0, AllowedTools(opts.allowed_tools))
        self._pipeline = Pipeline(plugs) if plugs else None
        self._ctx: dict[str, Any] = {}
        self._renumber = self._pipeline is not None
        self._local_approvals: dict[str, asyncio.TimerHandle] = {}
        # The last events handed out (a client re-attaching through the controller after the run
        # ended gets its end from here), and whether the current stream delivered anything.
        self._tail: deque[Event] = deque(maxlen=256)
        self._progress = False

    @property
    def node_seq(self) -> int:
        """The node's sequence number seen so far (the re-attach cursor)."""
        return self._node_seq

    @property
    def node_run_id(self) -> str:
        """The run's id on its node (differs from ``run_id`` after a resume on another node)."""
        return self._node_run_id

    # -- node watching (called by NodeHandle) ----------------------------------------

    @property
    def node_epoch(self) -> str:
        return self._epoch

    def node_lost(self, reason: str) -> None:
        if self._lost is None and not self.reducer.finished:
            self._lost = reason
            if self._follow_task is not None:
                self._follow_task.cancel()

    # -- driving ---------------------------------------------------------------

    def start(self) -> None:
        self.state = "active"
        self.task = asyncio.create_task(self._drive(), name=f"asm-run-{self.run_id}")

    def _request(self, cwd: str, prompt: str | None = None, options: Mapping[str, Any] | None = None) -> pb.StartRunRequest:
        return pb.StartRunRequest(
            run_id=self._node_run_id, session_id=self.session_id, provider=self.opts.provider,
            prompt=self.prompt if prompt is None else prompt, cwd=cwd, permission_mode=self.opts.permission_mode,
            options_json=_json(self.opts.options if options is None else options), env=dict(self.opts.env),
            approval_timeout_ms=self.opts.approval_timeout_ms,
            # For a controller: its fleet queue's order and bound (a node ignores both).
            priority=self.opts.priority, queue_timeout_ms=self.opts.queue_timeout_ms,
            selector=dict(self.opts.selector),
        )

    async def _drive(self) -> None:
        try:
            if self.attach:
                handle, batches, first = await self._attach_existing()
            else:
                # Recorded with the node it goes to before anything is sent (registry.placing in
                # _admit): a restarted controller knows of it and never runs it twice.
                handle, batches, first = await self._start()
                self._stamp(first)
            while True:
                try:
                    await self._follow(handle, batches, first)
                    return
                except _NodeLost as lost:
                    if lost.kind == "node_lost":
                        self.host.pool.health.failure(handle.target.key, "node_lost")
                        if self.host.metrics is not None:
                            self.host.metrics.node_lost.labels(handle.target.address).inc()
                        err = make_error("node_lost", "transport", lost.reason)
                    else:  # the node said why it stopped the run (routing skips a draining/stopping node)
                        err = make_error(lost.kind, "runtime", lost.reason)
                    if self.opts.on_node_lost != "resume" or self.cancel_requested:
                        raise err from None
                    handle, batches, first = await self._resume_elsewhere(handle, err)
        except LeaseLost as lost:
            # The store refused this run's write: another replica or request changed it first (ended a
            # queued run, took its lease). Its end is the store's to give, not this replica's to invent.
            log.warning("run %s is no longer this controller's to follow: %s", self.run_id, lost.message)
            self.detaching = True
        except AsmError as err:
            self._synthesize_failure(err)
        except asyncio.CancelledError:
            if not self.detaching:
                self._synthesize_failure(make_error("user_cancelled", "runtime", "Run cancelled"))
            raise
        except Exception as exc:  # a bug must not leave a stream hanging
            log.exception("run %s driver failed", self.run_id)
            self._synthesize_failure(make_error("runtime", "runtime", f"controller error: {exc}"))
        finally:
            self._finish()

    def _stamp(self, batch: pb.EventBatch) -> None:
        """Carry the controller's view of the run (node, epoch, attempts) on its run_started event,
        so a recorded run replays into the same Result metadata."""
        for m in batch.events:
            if m.kind == pb.EVENT_KIND_RUN_STARTED:
                theirs = m.metadata.get(CONTROLLER_METADATA_KEY)
                if theirs and "controller_id" in self.reducer.metadata:
                    # Run through a controller: its stamp names the node that runs it (kept in ours).
                    with contextlib.suppress(ValueError, TypeError):
                        ran_on = json.loads(theirs)
                        self.reducer.metadata.update({k: ran_on[k] for k in RAN_ON_KEYS if k in ran_on})
                m.metadata[CONTROLLER_METADATA_KEY] = json.dumps(self.reducer.metadata, default=str)
                return

    def _bind(self, handle: NodeHandle, target: NodeTarget) -> None:
        self.handle = handle
        self._epoch = handle.epoch
        self._lost = None
        self.bound.set()
        self.reducer.metadata.update(
            node_id=handle.node_id, node_epoch=handle.epoch, node_address=target.address, execution=handle.execution,
            **lane_metadata(self.requested.lane, handle.execution == "remote"),
        )
        if Capability.FLEET.value in handle.info.capabilities:
            # A controller: the node that runs it comes in its stamp on run_started (see EventReducer).
            self.reducer.metadata.update(controller_id=handle.node_id, controller_address=target.address)

    # -- provider failover ------------------------------------------------------------

    def _provider_order(self) -> list[str]:
        """The provider candidates in configuration order; a provider cooling down (it failed before
        doing any work on every node it could go to) goes last, like a cooling node."""
        cands = self.requested.candidates
        health = self.host.pool.provider_health
        keys = [t.key for t in self.requested.nodes]

        def cooling(p: str) -> bool:
            return bool(keys) and all(not health.available(provider_key(k, p)) for k in keys)

        return sorted(cands, key=lambda p: (cooling(p), cands.index(p)))

    async def _start(self) -> tuple[NodeHandle, AsyncIterator[pb.EventBatch], pb.EventBatch]:
        """Admit the run; with several provider candidates, move to the next while one fails before any work.

        ASM's routing semantics: a candidate that fails (no CLI, auth, rate limit, HTTP 5xx) before
        its first real output is marked unhealthy on that node for the cooldown and the next one
        is tried, on any eligible node. Nothing of a failed attempt reaches the subscriber but a
        warning after run_started; each attempt is in ``metadata["attempts"]``. A provider that did
        work (text, a tool call, an approval request) keeps the run: it is never silently re-run.
        """
        if not self.requested.providers:
            return await self._admit(self._request)
        order = self._provider_order()
        attempts: list[dict[str, Any]] = self.reducer.metadata.setdefault("attempts", [])
        for i, provider in enumerate(order):
            last = i == len(order) - 1
            self.opts = self.requested.for_provider(provider)
            self.reducer.provider = provider
            self.reducer.metadata["provider"] = provider
            if i:
                # A new run on its node (the failed attempt's id is taken there); renumbered into this one.
                self._node_run_id, self._node_seq, self._renumber = f"{self.run_id}.p{i}", 0, True
            mark = len(attempts)
            try:
                handle, batches, first = await self._admit(self._request)
            except AsmError as refused:
                if last or self.cancel_requested or refused.kind != "cli_not_found":
                    raise
                self._failed_attempt(provider, None, refused, order[i + 1])
                continue
            finally:
                for a in attempts[mark:]:  # which candidate each attempt was for
                    a.setdefault("provider", provider)
            self._pair = (handle.target.key, provider)
            if last or self.cancel_requested:
                return handle, batches, first
            held, rest, err = await self._probe(handle, batches, first)
            if err is None:
                return handle, rest, held
            handle.run_ended()
            self.handle, self._started_on_node = None, False
            self.host.pool.provider_health.failure(provider_key(handle.target.key, provider), err.kind)
            attempts[-1].update(error=err.to_dict(), failover=True)  # the admitted entry: it failed
            self._failed_attempt(provider, handle, err, order[i + 1])
        raise AssertionError("unreachable: the last provider candidate returns or raises")

    def _failed_attempt(self, provider: str, handle: NodeHandle | None, err: AsmError, nxt: str) -> None:
        where = f" on {handle.target.address}" if handle is not None else ""
        if self.host.metrics is not None:
            self.host.metrics.failovers.inc()
        log.info("run %s: provider %s failed before doing any work%s (%s: %s); trying %s",
                 self.run_id, provider, where, err.kind, err.message, nxt)
        self._notices.append(Event.synthetic(
            "error", run_id=self.run_id, session_id=self.session_id, provider=provider, seq=0,
            message=f"provider {provider} failed before doing any work{where} ({err.message}); trying {nxt}",
            code=err.kind, domain=err.domain, severity=pb.SEVERITY_WARNING, exit_code=-1))

    async def _probe(self, handle: NodeHandle, batches: AsyncIterator[pb.EventBatch], first: pb.EventBatch
                     ) -> tuple[pb.EventBatch, AsyncIterator[pb.EventBatch], AsmError | None]:
        """Hold the attempt's events until it does work or ends: (held events as one batch, the rest
        of the stream, None) to go on with it, or (.., .., its error) when it failed before any work."""
        held: list[pb.Event] = []
        batch: pb.EventBatch | None = first
        broke: BaseException | None = None
        handle.register(self)
        self._follow_task = asyncio.current_task()
        try:
            while batch is not None:
                held.extend(batch.events)
                if any(is_work(m) for m in batch.events) or self.cancel_requested:
                    break
                if any(m.kind == _RUN_COMPLETED for m in batch.events):
                    err = _first_failure(held)
                    if err is not None and failover_error(err):
                        return pb.EventBatch(events=held), batches, err
                    break
                try:
                    batch = await anext(batches, None)
                except AsmError as exc:  # the stream broke: the follower re-attaches after what is held
                    broke = exc
                    break
        except asyncio.CancelledError:
            if self._lost is None:
                raise
            raise make_error("node_lost", "transport", self._lost) from None
        finally:
            self._follow_task = None
            handle.unregister(self)
        return pb.EventBatch(events=held), _replay(broke, batches), None

    def _take_notices(self) -> list[Event]:
        """The failed candidates' warnings, numbered next in the run (applied to the reducer)."""
        out, self._notices = self._notices, []
        for e in out:
            seq = self.reducer.last_seq + 1
            e.pb.seq, e.pb.id = seq, f"{self.run_id}:{seq}"
            self.reducer.apply(e)
        return out

    async def _admit(
        self, request: Callable[[str], pb.StartRunRequest], exclude: frozenset[str] = frozenset()
    ) -> tuple[NodeHandle, AsyncIterator[pb.EventBatch], pb.EventBatch]:
        """:meth:`_admit_once`, waiting in the fleet queue while every eligible node is full."""
        queue = self.host.queue
        attempts: list[dict[str, Any]] = self.reducer.metadata.setdefault("attempts", [])
        try:
            while True:
                if self.cancel_requested:
                    raise make_error("user_cancelled", "runtime", "Run interrupted while queued")
                if not queue.entitled(self):
                    await queue.wait(self, None)  # earlier runs wait: behind them, not past them
                    continue
                mark = len(attempts)
                try:
                    placed = await self._admit_once(request, exclude)
                except AsmError as err:
                    if not queue.enabled or self.cancel_requested or not _full(attempts[mark:], err):
                        raise
                    # A queued run's refused tries are not kept one by one: it may wait for hours.
                    del attempts[mark:]
                    if not any("queued" in a for a in attempts):
                        attempts.append({"queued": True, "reason": err.message})
                    await queue.wait(self, err)
                    continue
                return placed
        finally:
            queue.leave(self)

    async def _admit_once(
        self, request: Callable[[str], pb.StartRunRequest], exclude: frozenset[str] = frozenset()
    ) -> tuple[NodeHandle, AsyncIterator[pb.EventBatch], pb.EventBatch]:
        """Start the run on the first node (in routing order) that admits it; return its stream and first batch.

        The node's StartRun does the admission checks itself (provider, cwd,
        capacity, state) and refuses with the same typed errors as Preflight,
        so a run costs one round trip. Only those refusals move on to the next
        node: nothing has started anywhere yet, so trying elsewhere cannot run
        the prompt twice.
        """
        host = self.host
        attempts: list[dict[str, Any]] = self.reducer.metadata.setdefault("attempts", [])
        cands = [Candidate(t.key, i, t.priority, t.weight, t, reported_load(host.pool.get(t.key)))
                 for i, t in enumerate(self.opts.nodes) if t.key not in exclude]

        provider = self.opts.provider
        missing: list[str] = []  # what the nodes without the provider's CLI say about it

        def skip(c: Candidate) -> str | None:
            handle = host.pool.get(c.key)
            if handle is None:
                return None
            if handle.state == "lost":
                return "lost"
            why = eligible(handle.info, provider, _local_selector(handle.info, self.opts.selector))
            if why == f"no {provider} CLI":
                missing.append(_missing_cli(handle, provider))
            return why

        def cooling(c: Candidate) -> bool:
            return not host.pool.provider_health.available(provider_key(c.key, provider))

        plan, skipped = host.pool.plan(cands, skip, cooling if self.requested.providers else None)
        mark = len(attempts)
        attempts.extend(skipped)
        last: AsmError | None = None
        for cand in plan:
            target = cand.target
            if self.cancel_requested:
                raise make_error("user_cancelled", "runtime", "Run interrupted before it started")
            sent = False  # has a StartRun for this run left for this node?
            try:
                handle = await host.pool.handle(target)
                reason = eligible(handle.info, self.opts.provider, _local_selector(handle.info, self.opts.selector))
                if reason is not None and reason.startswith("label"):
                    # Only now known (first contact). Other refusals come, typed, from StartRun itself.
                    attempts.append({"node": target.address, "skipped": reason})
                    continue
                cwd = self.opts.cwd
                if self.opts.preflight:
                    t0 = time.perf_counter()
                    cwd = await preflight(handle, self.opts.provider, cwd)
                    if host.metrics is not None:
                        host.metrics.preflight.labels(target.address).observe(time.perf_counter() - t0)
                self.handle = handle
                await host.registry.placing(self, handle)  # durable: where the run may now be
                self._started_on_node = True
                sent = True
                batches, first = await self._first_batch(handle, request(cwd))
            except AsmError as err:
                # Exactly-once rule: a node's typed refusal, a failed connect/handshake/preflight
                # (nothing sent yet) and a StartRun the channel could not deliver (refused, never
                # connected) move on to the next node. A StartRun that may have reached the node
                # (sent, then no answer) is retried on the same node only: StartRun with the same
                # run id attaches there, so it can never run twice.
                transient = _transient(err)
                delivered_maybe = sent and transient and not _not_delivered(err)
                if not isinstance(err, NodeConnectionError) and not (transient and not delivered_maybe):
                    if not delivered_maybe:
                        raise
                    handle, batches, first = await self._restart_same(handle, request(cwd), err)
                else:
                    self._started_on_node = False
                    self.handle = None
                    # A refusal for this run (cwd, capacity, ...) says nothing of the node's health.
                    if isinstance(err, _NODE_FAULTS) or (transient and not isinstance(err, NodeConnectionError)):
                        host.pool.health.failure(target.key, err.reason or "unreachable")
                    elif isinstance(err, ProviderMissing) and self.requested.providers:
                        host.pool.provider_health.failure(provider_key(target.key, provider), err.kind)
                    attempts.append({"node": target.address, "error": err.to_dict()})
                    if host.metrics is not None:
                        host.metrics.failovers.inc()
                    last = err
                    continue
            except StopAsyncIteration:
                raise make_error("node_lost", "transport", f"node {target.address} closed the run's stream") from None
            host.pool.health.success(target.key)
            attempts.append({"node": target.address, "node_id": handle.node_id, "admitted": True})
            self._bind(handle, target)
            return handle, batches, first
        if last is None:
            skips = [a for a in attempts[mark:] if "skipped" in a]
            if skips and missing and all(a["skipped"] == f"no {provider} CLI" for a in skips):
                # The same answer as a first contact gets from StartRun (and on every run of the session).
                raise ProviderMissing(missing[0] if len(missing) == 1 else "; ".join(dict.fromkeys(missing)))
            detail = "; ".join(f"{a['node']}: {a['skipped']}" for a in attempts if "skipped" in a)
            if detail:
                raise NodeConnectionError(f"no eligible node for provider {self.opts.provider} ({detail})",
                                          reason="no_eligible_node")
            raise ConfigError("no node to run on: give the session (or the run) a node")
        tried = sum(1 for a in attempts if "error" in a)
        if tried > 1:
            last.message = f"no node admitted the run ({tried} tried); last: {last.message}"
        raise last

    async def _first_batch(
        self, handle: NodeHandle, req: pb.StartRunRequest
    ) -> tuple[AsyncIterator[pb.EventBatch], pb.EventBatch]:
        """Send StartRun and wait for its first batch; a node declared lost meanwhile ends the wait."""
        self._epoch, self._lost = handle.epoch, None
        batches = aiter(handle.api.start_run(req))
        handle.register(self)
        self._follow_task = asyncio.current_task()
        try:
            return batches, await anext(batches)
        except asyncio.CancelledError:
            if self._lost is None:
                raise
            raise make_error("node_lost", "transport", self._lost) from None
        finally:
            self._follow_task = None
            handle.unregister(self)

    async def _restart_same(
        self, handle: NodeHandle, req: pb.StartRunRequest, err: AsmError
    ) -> tuple[NodeHandle, AsyncIterator[pb.EventBatch], pb.EventBatch]:
        """StartRun was sent but not answered: repeat it (same run id: it attaches) on the same node.

        Backoff between attempts, for at most the node-lost bound; a node that is lost or comes
        back with a new epoch ends the run with node_lost (it may have started there: never elsewhere).
        """
        target = handle.target
        bound = target.liveness.node_lost_timeout_s if isinstance(target, RemoteNode) else 0.0
        deadline = time.monotonic() + bound
        epoch, failures = handle.epoch, 0
        while True:
            if self.cancel_requested:
                raise make_error("user_cancelled", "runtime", "Run interrupted before it started")
            if handle.state == "lost" or time.monotonic() >= deadline:
                raise make_error("node_lost", "transport", f"node {target.address} did not answer StartRun of run "
                                 f"{self.run_id} within {bound:g}s (it may have started there): {err.message}")
            failures += 1
            await asyncio.sleep(min(_backoff(failures), max(0.0, deadline - time.monotonic())))
            try:
                if isinstance(target, RemoteNode):
                    info = await handle.heartbeat(probe_timeout_s(target.liveness))
                    if info.boot_epoch != epoch:
                        raise make_error("node_lost", "transport", f"node {target.address} restarted (epoch {epoch}"
                                         f" -> {info.boot_epoch}) before run {self.run_id} was known to start")
                batches, first = await self._first_batch(handle, req)
                return handle, batches, first
            except StopAsyncIteration:
                raise make_error("node_lost", "transport", f"node {target.address} closed the run's stream") from None
            except AsmError as again:
                if not _transient(again):
                    raise
                err = again

    async def _attach_existing(self) -> tuple[NodeHandle, AsyncIterator[pb.EventBatch], pb.EventBatch | None]:
        """Follow a run that already exists on a node (e.g. after a controller restart), after ``after_seq``."""
        (target,) = self.opts.nodes[:1]
        # The node may be briefly unreachable (a controller restarting with its fleet): try within
        # the node-lost bound, with backoff, before the run is given up as lost.
        bound = target.liveness.node_lost_timeout_s if isinstance(target, RemoteNode) else 0.0
        deadline, failures = time.monotonic() + bound, 0
        while True:
            try:
                handle = await self.host.pool.handle(target, ready=False)
                break
            except NodeConnectionError as err:
                failures += 1
                if time.monotonic() + _backoff(failures) >= deadline or not isinstance(err, _NODE_FAULTS):
                    raise make_error("node_lost", "transport", f"cannot re-attach run {self.run_id} on "
                                     f"{target.address}: {err.message}") from None
                await asyncio.sleep(_backoff(failures))
        self._bind(handle, target)
        self._started_on_node = True
        batches = aiter(handle.api.attach_run(pb.AttachRunRequest(run_id=self._node_run_id,
                                                                  after_seq=self._node_seq)))
        return handle, batches, None

    async def _resume_elsewhere(
        self, lost: NodeHandle, err: AsmError
    ) -> tuple[NodeHandle, AsyncIterator[pb.EventBatch], pb.EventBatch]:
        """on_node_lost="resume": continue the provider session on another node (same run, re-sequenced)."""
        # Every node the run has left stays excluded: at most one resume per node, so a run
        # whose nodes keep failing ends (no eligible node) instead of bouncing between them.
        self._left_nodes.add(lost.target.key)
        if all(t.key in self._left_nodes for t in self.opts.nodes):
            raise make_error(err.kind, err.domain, f"{err.message}; no node left to resume on "
                             "(a run resumes at most once per node)")
        psid = self.reducer.provider_session_id
        if not psid:
            raise make_error(err.kind, err.domain, f"{err.message}; no provider session id to resume")
        notice = Event.synthetic(
            "error", run_id=self.run_id, session_id=self.session_id, provider=self.opts.provider,
            seq=self.reducer.last_seq + 1, message=f"{err.message}; resuming provider session {psid} on another node",
            code=err.kind, domain=err.domain, severity=pb.SEVERITY_WARNING, exit_code=-1)
        self.reducer.apply(notice)
        self.host.registry.log(self, [notice])
        if self.channel is not None:
            self.channel.put_final([notice])
        self._emit_observers([notice])
        self._node_seq = 0  # a new run on the new node: its events are renumbered into this one
        self._renumber = True
        self.reducer.metadata.setdefault("resumed", []).append({"from": lost.target.address, "provider_session_id": psid})
        self._node_run_id = f"{self.run_id}.r{len(self.reducer.metadata['resumed'])}"
        options = {**self.opts.options, "resume": psid}
        return await self._admit(lambda cwd: self._request(cwd, self.opts.resume_prompt, options),
                                 exclude=frozenset(self._left_nodes))

    async def _follow(self, handle: NodeHandle, batches: AsyncIterator[pb.EventBatch], first: pb.EventBatch | None) -> None:
        """Consume the run's stream to its end, re-attaching whenever the stream breaks."""
        handle.register(self)
        live = handle.target.liveness if isinstance(handle.target, RemoteNode) else None
        # A stream that stays up this long counts as recovered: the next break is a new outage.
        steady = 2 * live.heartbeat_interval_s if live is not None else 0.0
        broken_since: float | None = None
        failures, was_answered = 0, False
        try:
            while True:
                opened = time.monotonic()
                self._progress = False
                self._follow_task = asyncio.create_task(self._consume(first, batches))
                try:
                    await self._follow_task
                    if self.reducer.finished:
                        return
                    broke: AsmError = make_error("transport_error", "transport", "stream ended before run_completed")
                except asyncio.CancelledError:
                    if self._lost is None:
                        raise
                    raise _NodeLost(self._lost) from None
                except AsmError as err:
                    if isinstance(err, RunNotFound) and self._node_seq == 0 \
                            and time.monotonic() < self.not_found_grace_until:
                        # Placed by the replica whose lease this one took, a moment before: its StartRun
                        # may reach the node yet. Asked again (bounded) rather than ending a run that runs.
                        failures += 1
                        await asyncio.sleep(min(0.5, 0.02 * 2 ** min(failures, 5)))
                        batches, first = aiter(handle.api.attach_run(pb.AttachRunRequest(
                            run_id=self._node_run_id, after_seq=self._node_seq))), None
                        continue
                    # run_lost: the node restarted while the run ran (its run journal says so).
                    if isinstance(err, RunNotFound) or err.kind == "run_lost":
                        raise _NodeLost(f"node {handle.target.address} no longer knows run {self._node_run_id} "
                                        f"({err.message})") from None
                    if not _transient(err):
                        raise
                    broke = err
                finally:
                    self._follow_task = None
                if self._lost is not None:
                    raise _NodeLost(self._lost)
                log.info("run %s: stream from %s broke (%s); re-attaching after seq %d", self.run_id,
                         handle.target.address, broke.message, self._node_seq)
                now = time.monotonic()
                # A broken transport is bounded by the heartbeats (the node is lost when none succeeds
                # for the bound). A server that answers but cannot serve the run (a controller whose
                # node is gone) is bounded here: from the first of such answers in a row, however many
                # re-attaches open and break, until events flow again. One heartbeat interval of grace
                # lets a controller with the same bound deliver its own node_lost verdict first.
                answered = bool(broke.details.get(ANSWERED))
                recovered = self._progress or now - opened >= steady
                if recovered:
                    failures = 0  # the backoff counts breaks in a row without progress
                if broken_since is None or recovered or not (answered and was_answered):
                    broken_since = now + (live.heartbeat_interval_s if answered and live is not None else 0.0)
                was_answered = answered
                batches, first = await self._reattach(handle, broken_since, failures), None
                failures += 1
        finally:
            handle.unregister(self)

    async def _reattach(self, handle: NodeHandle, since: float, failures: int) -> AsyncIterator[pb.EventBatch]:
        """Open AttachRun(after_seq) again, with jittered exponential backoff, until the node is declared
        lost or ``node_lost_timeout`` has passed since the outage began (``since``)."""
        target = handle.target
        bound = target.liveness.node_lost_timeout_s if isinstance(target, RemoteNode) else 0.0
        deadline = since + bound
        self.reconnects += 1
        self.reducer.metadata["reconnects"] = self.reconnects
        if self.host.metrics is not None:
            self.host.metrics.reconnects.labels(target.address).inc()

        async def attempt() -> AsyncIterator[pb.EventBatch]:
            if self._lost is not None:
                raise _NodeLost(self._lost)
            if isinstance(target, RemoteNode):
                info = await handle.heartbeat(probe_timeout_s(target.liveness))
                if info.boot_epoch != self._epoch:
                    raise _NodeLost(f"node {target.address} restarted (epoch {self._epoch} -> {info.boot_epoch})")
            return aiter(handle.api.attach_run(pb.AttachRunRequest(
                run_id=self._node_run_id, after_seq=self._node_seq)))

        # One loop with one deadline: the backoff sleeps are capped at it, and a declared loss
        # cancels the waiting as well as an attempt (so node_lost comes at the bound, not a pause later).
        self._follow_task = asyncio.current_task()
        last: AsmError | None = None
        tries = failures  # the last re-attach opened but broke at once: back off before the next
        try:
            while True:
                if tries:
                    await asyncio.sleep(min(_backoff(tries), max(0.0, deadline - time.monotonic())))
                if self._lost is not None:
                    raise _NodeLost(self._lost)
                if bound and time.monotonic() >= deadline:
                    raise _NodeLost(f"node {target.address} unreachable for {bound:g}s while re-attaching"
                                    + (f": {last.message}" if last is not None else ""))
                try:
                    return await attempt()
                except AsmError as err:
                    if not bound or not _transient(err):
                        raise _NodeLost(f"node {target.address} unreachable while re-attaching: {err.message}") from None
                    last, tries = err, tries + 1
        except asyncio.CancelledError:
            if self._lost is None:
                raise
            raise _NodeLost(self._lost) from None
        finally:
            self._follow_task = None

    async def _consume(self, first: pb.EventBatch | None, batches: AsyncIterator[pb.EventBatch]) -> None:
        reducer, channel, host = self.reducer, self.channel, self.host
        observers = self.opts.observers
        batch: pb.EventBatch | None = first if first is not None else await anext(batches, None)
        while batch is not None:
            self._progress = True
            # The node's bytes of this batch, to relay and record it without encoding it again; not the
            # first one's (its run_started carries the controller's stamp, written in place).
            wire = take_wire(batch)
            if batch is first:
                wire = None
            stopped = self._node_stopped(batch)
            if stopped is not None:
                gone = batch.events[stopped].error
                batch = pb.EventBatch(events=batch.events[:stopped])
            if self._renumber:
                fresh = self._transform(batch)
                if fresh is None:  # the pipeline failed the run
                    return
            else:
                # The hot path: node events as they are (the reducer drops any seen twice).
                fresh = reducer.apply_batch(batch.events)
                if wire is not None and stopped is None and len(fresh) == len(batch.events):
                    fresh = Frames(fresh, wire)  # exactly the node's events, unchanged
                self._node_seq = reducer.last_seq
            if reducer.bookkeeping:
                # Approvals and cost reach the session before the subscriber sees the event.
                host.observe(self, reducer.bookkeeping)
                reducer.bookkeeping.clear()
            if fresh:
                self._tail.extend(fresh)
                await host.registry.events(self, fresh)
            if observers and fresh:
                self._emit_observers(fresh)
            if self.cancel_requested and not self._interrupt_sent:
                await self._send_interrupt()
            if channel is not None and fresh:
                await channel.put(fresh)
            if reducer.finished:
                return
            if stopped is not None:
                raise _NodeLost(gone.message, gone.code)
            batch = await anext(batches, None)

    def _node_stopped(self, batch: pb.EventBatch) -> int | None:
        """With on_node_lost="resume": the index of the node's final node_draining/node_shutdown error.

        The run ends there on this node; its error and run_completed are not delivered: the
        run moves on (resumes) elsewhere, like a lost node's run.
        """
        if self.opts.on_node_lost != "resume" or self.cancel_requested:
            return None
        for i, m in enumerate(batch.events):
            if (m.kind == pb.EVENT_KIND_ERROR and m.error.code in NODE_STOPPED_KINDS
                    and m.error.severity in (pb.SEVERITY_UNSPECIFIED, pb.SEVERITY_ERROR, pb.SEVERITY_FATAL)):
                return i
        return None

    def _transform(self, batch: pb.EventBatch) -> list[Event] | None:
        """Pipeline and renumbering; None when a plug failed the run (already ended here)."""
        reducer, pipeline = self.reducer, self._pipeline
        out: list[Event] = []
        for m in batch.events:
            if m.seq <= self._node_seq:
                continue  # seen before a re-attach
            self._node_seq = m.seq
            ev = Event(m)
            emitted, err = pipeline.run(ev, self._ctx) if pipeline is not None else ([ev], None)
            if err is not None:
                if self.channel is not None and out:
                    self.channel.put_final(out)
                self.host.registry.log(self, out)
                self._emit_observers(out)
                self._reject(err)
                return None
            for e in emitted:
                if self._notices and e.pb.kind == _RUN_COMPLETED:
                    out.extend(self._take_notices())  # a stream without run_started (a controller's refusal)
                seq = reducer.last_seq + 1
                e.pb.seq, e.pb.run_id, e.pb.id = seq, self.run_id, f"{self.run_id}:{seq}"
                if not e.pb.session_id:
                    e.pb.session_id = self.session_id
                reducer.apply(e)
                out.append(e)
                if self._notices and e.pb.kind == pb.EVENT_KIND_RUN_STARTED:
                    out.extend(self._take_notices())
                if e.pb.kind == pb.EVENT_KIND_APPROVAL_REQUESTED and e.pb.metadata.get("policy") == "1":
                    self._arm_local_approval(e.pb.approval_requested.approval_id)
        return out

    def _reject(self, err: AsmError) -> None:
        """A plug failed the run: stop the CLI on its node and end the stream with the error."""
        self.cancel_requested = True
        if self.handle is not None and not self._interrupt_sent:
            self.host.spawn(self._send_interrupt())
        self._synthesize_failure(err)

    def _emit_observers(self, events: list[Event]) -> None:
        for observer in self.opts.observers:
            try:
                observer(events)
            except Exception:  # an observer must never break a run
                log.exception("observer %r failed on run %s", observer, self.run_id)

    # -- policy approvals (raised by a pipeline plug, answered on the controller) ---------

    def _arm_local_approval(self, approval_id: str) -> None:
        loop = asyncio.get_running_loop()
        self._local_approvals[approval_id] = loop.call_later(
            (self.opts.approval_timeout_ms or 120_000) / 1000, self.resolve_local_approval, approval_id, Decision.DENY,
            "timeout")

    def is_local_approval(self, approval_id: str) -> bool:
        """Whether a pipeline plug raised this approval (answered here, not by the node)."""
        return approval_id in self._local_approvals

    def resolve_local_approval(self, approval_id: str, decision: str, reason: str = "") -> bool:
        timer = self._local_approvals.pop(approval_id, None)
        if timer is None or self.reducer.finished:
            return False
        timer.cancel()
        r = self.reducer
        ev = Event.synthetic("approval_resolved", run_id=self.run_id, session_id=self.session_id,
                             provider=self.opts.provider, seq=r.last_seq + 1, approval_id=approval_id,
                             decision=decision, reason=reason)
        r.apply(ev)
        self.host.observe(self, r.bookkeeping)
        r.bookkeeping.clear()
        self.host.registry.log(self, [ev])
        if self.channel is not None:
            self.channel.put_final([ev])
        self._emit_observers([ev])
        if decision != Decision.ALLOW:
            # The CLI already went ahead (the policy sees events after the fact): a denial stops the run.
            self._reject(make_error("guardrail_blocked", "guardrail",
                                    f"policy approval {approval_id} denied ({reason or 'deny'})"))
        return True

    def _synthesize_failure(self, err: AsmError) -> None:
        """End the run's stream with an error and run_completed made here (the node never finished it)."""
        r = self.reducer
        if r.finished:
            return
        status = RunStatus.INTERRUPTED if err.kind in INTERRUPT_KINDS else RunStatus.FAILED
        common = {"run_id": self.run_id, "session_id": self.session_id, "provider": self.opts.provider}
        notices = self._take_notices()
        events = [
            Event.synthetic("error", **common, seq=r.last_seq + 1, message=err.message, code=err.kind,
                            domain=err.domain, severity=pb.SEVERITY_ERROR, exit_code=-1),
            Event.synthetic("run_completed", **common, seq=r.last_seq + 2, status=status, exit_code=-1),
        ]
        if err.reason:
            events[0].pb.metadata["reason"] = err.reason
        for ev in events:
            r.apply(ev)
        events = notices + events
        self._tail.extend(events)
        self.host.registry.log(self, events)
        if self.channel is not None:
            self.channel.put_final(events)
        self._emit_observers(events)
        self._typed_error = err

    def restore(self, events: Sequence[pb.Event], node_run_id: str) -> None:
        """A recovered run: fold in its stored events (the re-attach goes on after them), mark it recorded."""
        self.reducer.last_seq = 0
        applied = restore_reducer(self.reducer, events)
        self._tail.extend(applied)
        self._node_run_id = node_run_id
        if node_run_id != self.run_id:  # it had resumed on another node: that node's events are renumbered
            self._renumber = True
        self.recorded = True

    def _track_provider(self) -> None:
        """Provider failover health of the attempt that kept the run: a failure before any work marks its
        (node, provider) unhealthy for the cooldown, a completed run marks it healthy again."""
        if not self.requested.providers or self._pair is None:
            return
        r = self.reducer
        key = provider_key(*self._pair)
        err = r.error
        if err is not None and failover_error(err) and not r.worked:
            self.host.pool.provider_health.failure(key, err.kind)
        elif err is None and r.status == RunStatus.COMPLETED:
            self.host.pool.provider_health.success(key)

    def _finish(self) -> None:
        self.state = "done"
        self._track_provider()
        if self.handle is not None and self._started_on_node:
            self.handle.run_ended()  # before run_finished wakes the fleet queue: the slot is free now
        metrics = self.host.metrics
        if metrics is not None:
            err = self.reducer.error
            outcome = "node_lost" if err is not None and err.kind == "node_lost" else self.reducer.status
            if outcome != "node_lost" and outcome not in TERMINAL_STATUSES:
                outcome = RunStatus.FAILED
            metrics.routed.labels(str(self.reducer.metadata.get("node_address", "none")), outcome).inc()
        if self._typed_error is not None:
            # Keep the precise error class (NodeUnreachable, CwdNotAllowed, ...) for callers.
            self.reducer.set_error(self._typed_error)
        registry = self.host.registry
        if not self.detaching or self.reducer.finished:
            # An end the reducer has is recorded even when the run was released meanwhile (fenced while
            # its last batch was being written): a refused fenced write is just dropped, a lost end is
            # a run that stays live in the store with nobody following it.
            try:
                registry.ended(self)
            except AsmError as err:  # the store refused a value: the end still reaches the subscriber
                log.error("run %s: its end cannot be recorded: %s", self.run_id, err)
            except Exception:  # a bug (a closed writer) must not leave the subscriber waiting either
                log.exception("run %s: recording its end failed", self.run_id)
        if self.channel is not None:
            self.channel.close()
        self.done.set()
        self.host.run_finished(self)
        if registry.durable:
            self.host.spawn(registry.flush())  # the end is durable soon, without holding the stream

    async def _send_interrupt(self) -> None:
        if self.handle is None or self._interrupt_sent:
            return
        self._interrupt_sent = True
        try:
            await self.handle.api.interrupt_run(pb.InterruptRunRequest(run_id=self._node_run_id))
        except AsmError as err:
            if isinstance(err, RunNotFound):  # not created on the node yet: retried after the next batch
                self._interrupt_sent = False
            else:
                log.warning("interrupt of run %s failed: %s", self.run_id, err)

    async def interrupt(self) -> None:
        self.cancel_requested = True
        if self.host.queue.cancel(self):
            return  # it was waiting in the fleet queue: its driver ends it user_cancelled
        if self.state == "queued":
            self.host.dequeue(self)
            self._synthesize_failure(make_error("user_cancelled", "runtime", "Run interrupted while queued"))
            self._finish()
        elif self._started_on_node:
            await self._send_interrupt()

    def result(self) -> Result:
        return self.reducer.result()

    def final_events(self, after_seq: int) -> list[pb.Event]:
        """A finished run's last events after ``after_seq``, for a client re-attaching late.

        When the client has seen further into the node's stream than this controller did
        (its terminal events were numbered before the client's cursor), the terminal
        ``error``/``run_completed`` are renumbered after the cursor, so the client still gets its end.
        """
        out = [pb.Event.FromString(e.pb.SerializeToString()) for e in self._tail if e.pb.seq > after_seq]
        if any(m.kind == _RUN_COMPLETED for m in out) or not self._tail:
            return out
        tail = list(self._tail)
        end = [e for e in tail[-2:] if e.pb.kind in (pb.EVENT_KIND_ERROR, _RUN_COMPLETED)]
        renumbered = []
        for i, e in enumerate(end, start=1):
            m = pb.Event.FromString(e.pb.SerializeToString())
            m.seq, m.id = after_seq + i, f"{m.run_id}:{after_seq + i}"
            renumbered.append(m)
        return renumbered


def _missing_cli(handle: NodeHandle, provider: str) -> str:
    """Why a node has no usable CLI for ``provider``, in its own words (its handshake), naming the node."""
    info = next((p for p in handle.info.providers if p.name == provider), None)
    if info is not None and info.error.message:
        return info.error.message
    if info is None:
        known = ", ".join(sorted(p.name for p in handle.info.providers))
        return f"provider {provider!r} is not available on node {handle.node_id} (available: {known})"
    return f"{provider} is not installed on node {handle.node_id}"


def _local_selector(info: pb.HandshakeResponse, selector: Mapping[str, str]) -> Mapping[str, str]:
    """The selector to check against this target's labels: none for a controller, which has no labels of
    its own and applies the selector to its nodes (it travels in StartRunRequest.selector)."""
    return {} if Capability.FLEET.value in info.capabilities else selector


def _full(attempts: Sequence[Mapping[str, Any]], err: AsmError) -> bool:
    """Did this admission round fail because nodes were full (rather than unsuitable or broken)?"""
    if err.kind == "at_capacity" or err.reason == "at_capacity":
        return True
    for a in attempts:
        if a.get("skipped") == "at capacity":
            return True
        failed = a.get("error")
        if isinstance(failed, Mapping) and (failed.get("kind") == "at_capacity" or failed.get("reason") == "at_capacity"):
            return True
    return False


def _json(options: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(options)) if options else ""
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run options must be JSON-serializable: {exc}") from None

