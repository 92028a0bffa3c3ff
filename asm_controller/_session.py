"""Sessions and runs: ASM's facade semantics (stream, query, interrupt, approve, ...).

A :class:`Session` holds defaults (provider, node, cwd, options, ...) that each
run may override, admits runs (``max_concurrent_runs`` active, then up to
``max_queued_runs`` queued, else ``at_capacity``), and tracks approvals and
cost across its runs.

Each run is driven by one task that reads event batches from its node, folds
them into the run's single :class:`EventReducer`, registers approvals *before*
anyone sees the event, and hands batches to the subscriber, if any. Fixed
relative to ASM 0.9.2 (asm_runtime.md section 8):

* a queued run that is cancelled ends its stream with a ``user_cancelled``
  error instead of hanging; a queued run whose start fails gets that error;
* every free slot promotes a queued run, not one per run exit;
* ``stop()`` interrupts the session's runs on their nodes (their CLIs stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from asm_controller._client import ANSWERED, RemoteNode
from asm_controller._connector import EmbeddedNode, NodeHandle, NodeTarget, connect, preflight, probe_timeout_s
from asm_controller._events import Event
from asm_controller._metrics import ControllerMetrics
from asm_controller._reducer import INTERRUPT_KINDS, NODE_STOPPED_KINDS, Cost, EventReducer, Result
from asm_controller._routing import Candidate, Router, eligible
from asm_controller.extensions.pipeline import AllowedTools, Pipeline
from asm_wire import AsmError, ConfigError, NodeConnectionError, make_error, pb, ulid, valid_id

log = logging.getLogger("asm_controller.session")

PERMISSION_MODES = ("default", "auto", "bypass", "plan")
_RUN_COMPLETED = pb.EVENT_KIND_RUN_COMPLETED


@dataclass(frozen=True)
class RunOptions:
    """What a run needs; session defaults with per-run overrides applied."""

    provider: str
    #: Where to run: one node, or several tried in order until one admits the run.
    node: NodeTarget | Sequence[NodeTarget] | None
    cwd: str = ""
    permission_mode: str = "default"
    options: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    approval_timeout_ms: int = 120_000
    #: An explicit Preflight round trip before StartRun (StartRun checks the same things anyway).
    preflight: bool = False
    #: Only nodes whose handshake labels include all of these.
    selector: Mapping[str, str] = field(default_factory=dict)
    #: "fail" (default): a lost node ends the run with node_lost. "resume": continue the
    #: provider session on another eligible node (only meaningful with a shared workspace).
    on_node_lost: str = "fail"
    resume_prompt: str = "Continue where you left off."
    #: Plugs run over every event on the controller (asm_controller.extensions.pipeline).
    pipeline: Sequence[Any] = ()
    #: Only these tools may be used (a tool_use of another fails the run, guardrail_blocked).
    allowed_tools: Sequence[str] = ()
    #: Called with each batch of final events (persistence, pubsub, rendering); must not block.
    observers: Sequence[Callable[[list[Event]], None]] = ()

    def merged(self, overrides: Mapping[str, Any]) -> RunOptions:
        unknown = sorted(set(overrides) - set(self.__dataclass_fields__) - {"run_id"})
        if unknown:
            raise ConfigError(f"unknown run option(s): {', '.join(unknown)}")
        changes = {k: v for k, v in overrides.items() if k != "run_id" and v is not None}
        if "options" in changes:
            changes["options"] = {**self.options, **changes["options"]}
        if "env" in changes:
            changes["env"] = {**self.env, **changes["env"]}
        for key in ("pipeline", "allowed_tools", "observers"):
            if key in changes:
                changes[key] = tuple(changes[key])
        merged = replace(self, **changes)
        merged.validate()
        return merged

    @property
    def nodes(self) -> tuple[NodeTarget, ...]:
        if self.node is None:
            return ()
        if isinstance(self.node, EmbeddedNode | RemoteNode):
            return (self.node,)
        return tuple(self.node)

    def validate(self) -> None:
        if not self.provider:
            raise ConfigError("a provider is required")
        node = self.node
        if node is not None and not isinstance(node, EmbeddedNode | RemoteNode) and (
            isinstance(node, str | bytes) or not isinstance(node, Sequence)
            or not all(isinstance(n, EmbeddedNode | RemoteNode) for n in node)
        ):
            # A str is a Sequence too: "host:port" would have become one node per character.
            raise ConfigError(f"node must be a RemoteNode, an EmbeddedNode or a list of them, not {self.node!r} "
                              "(for an address: RemoteNode('host:port', token=...))")
        if self.permission_mode not in PERMISSION_MODES:
            raise ConfigError(
                f"unsupported permission mode {self.permission_mode!r}: expected one of {', '.join(PERMISSION_MODES)}"
            )
        if self.on_node_lost not in ("fail", "resume"):
            raise ConfigError(f"on_node_lost must be 'fail' or 'resume', not {self.on_node_lost!r}")
        if not isinstance(self.approval_timeout_ms, int) or self.approval_timeout_ms <= 0:
            raise ConfigError("approval_timeout_ms must be a positive integer")


@dataclass(frozen=True)
class Checkpoint:
    """Where a session can be continued: a provider session id on a node."""

    provider: str
    provider_session_id: str
    run_id: str
    node: NodeTarget
    node_id: str
    captured_at: float


class _BatchChannel:
    """Run driver -> subscriber hand-off: bounded for data, never blocking for the end.

    ``put`` waits while ``high_water`` batches are unread (back-pressure all the
    way to the node); ``put_final`` and ``close`` always succeed, so the end of
    a stream can never be lost behind a slow reader. A reader that goes away
    (``abandon``) stops the back-pressure so the run still completes.
    """

    def __init__(self, high_water: int = 64) -> None:
        self._items: deque[list[Event]] = deque()
        self._high = high_water
        self._closed = False
        self._abandoned = False
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def put(self, batch: list[Event]) -> None:
        while len(self._items) >= self._high and not self._abandoned:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        self.put_final(batch)

    def put_final(self, batch: list[Event]) -> None:
        if not self._abandoned:
            self._items.append(batch)
            self._wake(self._getter)

    def close(self) -> None:
        self._closed = True
        self._wake(self._getter)

    def abandon(self) -> None:
        self._abandoned = True
        self._items.clear()
        self._wake(self._putter)

    async def get(self) -> list[Event] | None:
        while not self._items:
            if self._closed:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            await self._getter
        batch = self._items.popleft()
        self._wake(self._putter)
        return batch


CONTROLLER_METADATA_KEY = "asm.controller"
_TRANSIENT_KINDS = frozenset({"connection_failed", "transport_error", "timeout"})


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, AsmError) and exc.kind in _TRANSIENT_KINDS and exc.reason not in _ADMISSION_REASONS


_ADMISSION_REASONS = frozenset({"unauthenticated", "version_mismatch", "capability_mismatch"})
# Failures that say the node itself is in trouble (they mark it unhealthy for the cooldown).
_NODE_FAULTS = frozenset({"unreachable", "connect_timeout", "not_ready", "version_mismatch", "capability_mismatch"})


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


class _Run:
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

    def __init__(self, session: Session, run_id: str, prompt: str, opts: RunOptions, subscribed: bool,
                 attach: bool = False, after_seq: int = 0) -> None:
        self.session = session
        self.run_id = run_id
        self.prompt = prompt
        self.opts = opts
        self.attach = attach
        self.state = "new"  # new | queued | active | done
        self.reducer = EventReducer(
            run_id, session.session_id, opts.provider,
            {"provider": opts.provider, "lane": "core", "execution": "pending"},
        )
        self.channel: _BatchChannel | None = _BatchChannel() if subscribed else None
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
            run_id=self._node_run_id, session_id=self.session.session_id, provider=self.opts.provider,
            prompt=self.prompt if prompt is None else prompt, cwd=cwd, permission_mode=self.opts.permission_mode,
            options_json=_json(self.opts.options if options is None else options), env=dict(self.opts.env),
            approval_timeout_ms=self.opts.approval_timeout_ms,
        )

    async def _drive(self) -> None:
        try:
            if self.attach:
                handle, batches, first = await self._attach_existing()
            else:
                handle, batches, first = await self._admit(self._request)
                self._stamp(first)
            while True:
                try:
                    await self._follow(handle, batches, first)
                    return
                except _NodeLost as lost:
                    if lost.kind == "node_lost":
                        self.session._router.health.failure(handle.target.key, "node_lost")
                        if self.session.metrics is not None:
                            self.session.metrics.node_lost.labels(handle.target.address).inc()
                        err = make_error("node_lost", "transport", lost.reason)
                    else:  # the node said why it stopped the run (routing skips a draining/stopping node)
                        err = make_error(lost.kind, "runtime", lost.reason)
                    if self.opts.on_node_lost != "resume" or self.cancel_requested:
                        raise err from None
                    handle, batches, first = await self._resume_elsewhere(handle, err)
        except AsmError as err:
            self._synthesize_failure(err)
        except asyncio.CancelledError:
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
                m.metadata[CONTROLLER_METADATA_KEY] = json.dumps(self.reducer.metadata, default=str)
                return

    def _bind(self, handle: NodeHandle, target: NodeTarget) -> None:
        self.handle = handle
        self._epoch = handle.epoch
        self._lost = None
        self.reducer.metadata.update(
            node_id=handle.node_id, node_epoch=handle.epoch, node_address=target.address, execution=handle.execution,
        )

    async def _admit(
        self, request: Callable[[str], pb.StartRunRequest], exclude: frozenset[str] = frozenset()
    ) -> tuple[NodeHandle, AsyncIterator[pb.EventBatch], pb.EventBatch]:
        """Start the run on the first node (in routing order) that admits it; return its stream and first batch.

        The node's StartRun does the admission checks itself (provider, cwd,
        capacity, state) and refuses with the same typed errors as Preflight,
        so a run costs one round trip. Only those refusals move on to the next
        node: nothing has started anywhere yet, so trying elsewhere cannot run
        the prompt twice.
        """
        session = self.session
        attempts: list[dict[str, Any]] = self.reducer.metadata.setdefault("attempts", [])
        cands = [Candidate(t.key, i, t.priority, t.weight, t) for i, t in enumerate(self.opts.nodes) if t.key not in exclude]

        def skip(c: Candidate) -> str | None:
            handle = session._handles.get(c.key)
            if handle is None:
                return None
            if handle.state == "lost":
                return "lost"
            return eligible(handle.info, self.opts.provider, self.opts.selector)

        plan, skipped = session._router.plan(cands, skip)
        attempts.extend(skipped)
        last: AsmError | None = None
        for cand in plan:
            target = cand.target
            if self.cancel_requested:
                raise make_error("user_cancelled", "runtime", "Run interrupted before it started")
            sent = False  # has a StartRun for this run left for this node?
            try:
                handle = await session._handle(target)
                reason = eligible(handle.info, self.opts.provider, self.opts.selector)
                if reason is not None and reason.startswith("label"):
                    # Only now known (first contact). Other refusals come, typed, from StartRun itself.
                    attempts.append({"node": target.address, "skipped": reason})
                    continue
                cwd = self.opts.cwd
                if self.opts.preflight:
                    t0 = time.perf_counter()
                    cwd = await preflight(handle, self.opts.provider, cwd)
                    if session.metrics is not None:
                        session.metrics.preflight.labels(target.address).observe(time.perf_counter() - t0)
                self.handle = handle
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
                    if err.reason in _NODE_FAULTS or (transient and not isinstance(err, NodeConnectionError)):
                        session._router.health.failure(target.key, err.reason or "unreachable")
                    attempts.append({"node": target.address, "error": err.to_dict()})
                    if session.metrics is not None:
                        session.metrics.failovers.inc()
                    last = err
                    continue
            except StopAsyncIteration:
                raise make_error("node_lost", "transport", f"node {target.address} closed the run's stream") from None
            session._router.health.success(target.key)
            attempts.append({"node": target.address, "node_id": handle.node_id, "admitted": True})
            self._bind(handle, target)
            return handle, batches, first
        if last is None:
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
        handle = await self.session._handle(target)
        self._bind(handle, target)
        self._started_on_node = True
        batches = aiter(handle.api.attach_run(pb.AttachRunRequest(run_id=self.run_id, after_seq=self._node_seq)))
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
            "error", run_id=self.run_id, session_id=self.session.session_id, provider=self.opts.provider,
            seq=self.reducer.last_seq + 1, message=f"{err.message}; resuming provider session {psid} on another node",
            code=err.kind, domain=err.domain, severity=pb.SEVERITY_WARNING, exit_code=-1)
        self.reducer.apply(notice)
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
                    # run_lost: the node restarted while the run ran (its run journal says so).
                    if (err.kind in ("unknown", "not_found") and err.domain == "runtime") or err.kind == "run_lost":
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
        if self.session.metrics is not None:
            self.session.metrics.reconnects.labels(target.address).inc()

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
        reducer, channel, session = self.reducer, self.channel, self.session
        observers = self.opts.observers
        batch: pb.EventBatch | None = first if first is not None else await anext(batches, None)
        while batch is not None:
            self._progress = True
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
                fresh = [ev for ev in map(Event, batch.events) if reducer.apply(ev)]
                self._node_seq = reducer.last_seq
            if reducer.bookkeeping:
                # Approvals and cost reach the session before the subscriber sees the event.
                session._observe(self, reducer.bookkeeping)
                reducer.bookkeeping.clear()
            if fresh:
                self._tail.extend(fresh)
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
                self._emit_observers(out)
                self._reject(err)
                return None
            for e in emitted:
                seq = reducer.last_seq + 1
                e.pb.seq, e.pb.run_id, e.pb.id = seq, self.run_id, f"{self.run_id}:{seq}"
                if not e.pb.session_id:
                    e.pb.session_id = self.session.session_id
                reducer.apply(e)
                out.append(e)
                if e.pb.kind == pb.EVENT_KIND_APPROVAL_REQUESTED and e.pb.metadata.get("policy") == "1":
                    self._arm_local_approval(e.pb.approval_requested.approval_id)
        return out

    def _reject(self, err: AsmError) -> None:
        """A plug failed the run: stop the CLI on its node and end the stream with the error."""
        self.cancel_requested = True
        if self.handle is not None and not self._interrupt_sent:
            task = asyncio.get_running_loop().create_task(self._send_interrupt())
            self.session._background.add(task)
            task.add_done_callback(self.session._background.discard)
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
            self.opts.approval_timeout_ms / 1000, self.resolve_local_approval, approval_id, "deny", "timeout")

    def resolve_local_approval(self, approval_id: str, decision: str, reason: str = "") -> bool:
        timer = self._local_approvals.pop(approval_id, None)
        if timer is None or self.reducer.finished:
            return False
        timer.cancel()
        r = self.reducer
        ev = Event.synthetic("approval_resolved", run_id=self.run_id, session_id=self.session.session_id,
                             provider=self.opts.provider, seq=r.last_seq + 1, approval_id=approval_id,
                             decision=decision, reason=reason)
        r.apply(ev)
        self.session._observe(self, r.bookkeeping)
        r.bookkeeping.clear()
        if self.channel is not None:
            self.channel.put_final([ev])
        self._emit_observers([ev])
        if decision != "allow":
            # The CLI already went ahead (the policy sees events after the fact): a denial stops the run.
            self._reject(make_error("guardrail_blocked", "guardrail",
                                    f"policy approval {approval_id} denied ({reason or 'deny'})"))
        return True

    def _synthesize_failure(self, err: AsmError) -> None:
        """End the run's stream with an error and run_completed made here (the node never finished it)."""
        r = self.reducer
        if r.finished:
            return
        status = "interrupted" if err.kind in INTERRUPT_KINDS else "failed"
        common = {"run_id": self.run_id, "session_id": self.session.session_id, "provider": self.opts.provider}
        events = [
            Event.synthetic("error", **common, seq=r.last_seq + 1, message=err.message, code=err.kind,
                            domain=err.domain, severity=pb.SEVERITY_ERROR, exit_code=-1),
            Event.synthetic("run_completed", **common, seq=r.last_seq + 2, status=status, exit_code=-1),
        ]
        if err.reason:
            events[0].pb.metadata["reason"] = err.reason
        for ev in events:
            r.apply(ev)
        self._tail.extend(events)
        if self.channel is not None:
            self.channel.put_final(events)
        self._emit_observers(events)
        self._typed_error = err

    def _finish(self) -> None:
        self.state = "done"
        metrics = self.session.metrics
        if metrics is not None:
            err = self.reducer.error
            outcome = "node_lost" if err is not None and err.kind == "node_lost" else self.reducer.status
            if outcome not in ("completed", "failed", "interrupted", "node_lost"):
                outcome = "failed"
            metrics.routed.labels(str(self.reducer.metadata.get("node_address", "none")), outcome).inc()
        if self._typed_error is not None:
            # Keep the precise error class (NodeUnreachable, CwdNotAllowed, ...) for callers.
            self.reducer.set_error(self._typed_error)
        if self.channel is not None:
            self.channel.close()
        self.done.set()
        self.session._run_finished(self)

    async def _send_interrupt(self) -> None:
        if self.handle is None or self._interrupt_sent:
            return
        self._interrupt_sent = True
        try:
            await self.handle.api.interrupt_run(pb.InterruptRunRequest(run_id=self._node_run_id))
        except AsmError as err:
            if err.kind == "unknown":  # not created on the node yet: retried after the next batch
                self._interrupt_sent = False
            else:
                log.warning("interrupt of run %s failed: %s", self.run_id, err)

    async def interrupt(self) -> None:
        self.cancel_requested = True
        if self.state == "queued":
            self.session._dequeue(self)
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


def _json(options: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(options)) if options else ""
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run options must be JSON-serializable: {exc}") from None


class RunStream:
    """An async iterator over one run's events; ``result`` once it is done.

    Nothing is submitted until the first iteration (ASM's lazy stream). Use it
    as an async context manager, or call :meth:`aclose`, to interrupt the run
    when you stop reading early.
    """

    def __init__(self, session: Session, prompt: str, opts: RunOptions, run_id: str, attach: bool = False,
                 after_seq: int = 0) -> None:
        self._attach = attach
        self._after_seq = after_seq
        self._session = session
        self._prompt = prompt
        self._opts = opts
        self.run_id = run_id
        self._run: _Run | None = None
        self._batch: list[Event] = []
        self._index = 0
        self._ended = False

    def _submit(self) -> _Run:
        if self._run is None:
            self._run = self._session._submit(self._prompt, self._opts, self.run_id, subscribed=True,
                                              attach=self._attach, after_seq=self._after_seq)
        return self._run

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> Event:
        if self._index < len(self._batch):
            ev = self._batch[self._index]
            self._index += 1
            return ev
        if self._ended:
            raise StopAsyncIteration
        run = self._submit()
        assert run.channel is not None
        batch = await run.channel.get()
        if batch is None:
            self._ended = True
            raise StopAsyncIteration
        self._batch, self._index = batch, 1
        return batch[0]

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The events in the batches they arrived in (cheaper than one at a time for relays)."""
        if self._index < len(self._batch):
            yield self._batch[self._index:]
            self._index = len(self._batch)
        run = self._submit()
        assert run.channel is not None
        try:
            while (batch := await run.channel.get()) is not None:
                yield batch
        finally:
            self._ended = True
            if run.state != "done":
                run.channel.abandon()  # the relay went away: the run goes on (detach, don't kill)

    @property
    def result(self) -> Result | None:
        """The reduced Result (final once iteration has ended)."""
        return self._run.result() if self._run is not None else None

    async def aclose(self) -> None:
        run = self._run
        if run is not None and run.state != "done":
            await run.interrupt()
            if run.channel is not None:
                run.channel.abandon()
            await run.done.wait()

    def __del__(self) -> None:
        # Dropped without aclose (e.g. `break` out of `async for`): stop back-pressure
        # so the run can still finish and free its slot.
        run = self._run
        if run is not None and run.channel is not None and run.state != "done":
            run.channel.abandon()

    async def __aenter__(self) -> RunStream:
        self._submit()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Session:
    """A set of runs sharing defaults, admission limits, approvals and cost."""

    def __init__(
        self,
        provider: str = "shell",
        *,
        node: NodeTarget | Sequence[NodeTarget] | None = None,
        session_id: str | None = None,
        cwd: str = "",
        permission_mode: str = "default",
        options: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        approval_timeout_ms: int = 120_000,
        max_concurrent_runs: int = 1,
        max_queued_runs: int = 10,
        preflight: bool = False,
        strategy: str = "priority",
        selector: Mapping[str, str] | None = None,
        on_node_lost: str = "fail",
        pipeline: Sequence[Any] = (),
        allowed_tools: Sequence[str] = (),
        observers: Sequence[Callable[[list[Event]], None]] = (),
        failure_cooldown_s: float = 30.0,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.session_id = session_id or ulid()
        if not valid_id(self.session_id):
            raise ConfigError(f"invalid session_id {self.session_id!r}")
        if not isinstance(max_concurrent_runs, int) or max_concurrent_runs < 1:
            raise ConfigError("max_concurrent_runs must be an integer >= 1")
        if not isinstance(max_queued_runs, int) or max_queued_runs < 0:
            raise ConfigError("max_queued_runs must be an integer >= 0")
        self.defaults = RunOptions(
            provider=provider, node=node, cwd=cwd, permission_mode=permission_mode,
            options=dict(options or {}), env=dict(env or {}), approval_timeout_ms=approval_timeout_ms,
            preflight=preflight, selector=dict(selector or {}), on_node_lost=on_node_lost,
            pipeline=tuple(pipeline), allowed_tools=tuple(allowed_tools), observers=tuple(observers),
        )
        self._router = Router(strategy, failure_cooldown_s)
        self.metrics = metrics
        if metrics is not None:
            metrics.watch(self)
        self.defaults.validate()
        self.max_concurrent_runs = max_concurrent_runs
        self.max_queued_runs = max_queued_runs
        self.status = "ready"
        self._active: dict[str, _Run] = {}
        self._queued: deque[_Run] = deque()
        self._runs: dict[str, _Run] = {}
        self._finished: deque[str] = deque()
        self.history_size = 128
        self._approvals: dict[str, _Run] = {}
        self._handles: dict[str, NodeHandle] = {}
        self._connecting: dict[str, asyncio.Future[NodeHandle]] = {}
        self._cost = Cost()
        self._checkpoint: Checkpoint | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- public API ------------------------------------------------------------

    def _prepare(self, prompt: str, overrides: Mapping[str, Any]) -> tuple[RunOptions, str]:
        if not isinstance(prompt, str):
            raise ConfigError("prompt must be a string")
        opts = self.defaults.merged(overrides)
        run_id = overrides.get("run_id") or ulid()
        if not valid_id(run_id):
            raise ConfigError(f"invalid run_id {run_id!r}")
        return opts, run_id

    def stream(self, prompt: str, **overrides: Any) -> RunStream:
        """A lazy stream of the run's events (submitted on first iteration)."""
        opts, run_id = self._prepare(prompt, overrides)
        return RunStream(self, prompt, opts, run_id)

    async def query(self, prompt: str, **overrides: Any) -> Result:
        """Run to completion and return the Result (check ``result.ok`` / ``result.error``)."""
        opts, run_id = self._prepare(prompt, overrides)
        run = self._submit(prompt, opts, run_id, subscribed=False)
        try:
            await run.done.wait()
        except asyncio.CancelledError:
            await run.interrupt()
            raise
        return run.result()

    def attach(self, run_id: str, node: NodeTarget, provider: str | None = None, *, after_seq: int = 0) -> RunStream:
        """Follow a run that already exists on ``node``: its held events after ``after_seq``, then live.

        Never starts anything. For a controller that restarted: the node kept
        the run (and its CLI) going while nobody was attached, and replays what
        it holds. The Result is reduced from the events received.
        """
        if not valid_id(run_id):
            raise ConfigError(f"invalid run_id {run_id!r}")
        if not isinstance(after_seq, int) or isinstance(after_seq, bool) or not 0 <= after_seq < 2**63:
            raise ConfigError(f"after_seq must be an integer from 0 to 2**63-1, not {after_seq!r}")
        opts = self.defaults.merged({"node": node, **({"provider": provider} if provider else {})})
        return RunStream(self, "", opts, run_id, attach=True, after_seq=after_seq)

    def health(self) -> dict[str, dict[str, Any]]:
        """Routing health per node (healthy / degraded / unhealthy) and the node's liveness."""
        snap = self._router.health.snapshot()
        for key, handle in self._handles.items():
            entry = snap.setdefault(key, {"status": "healthy", "failures": 0, "last_error": None, "excluded": False})
            entry.update(node=handle.target.address, state=handle.state, epoch=handle.epoch,
                         heartbeat_age_s=round(handle.heartbeat_age_s, 3))
        return snap

    async def interrupt(self, run_id: str) -> None:
        run = self._runs.get(run_id)
        if run is None or run.state == "done":
            raise make_error("unknown", "runtime", f"Unknown run id: {run_id}")
        await run.interrupt()

    async def approve(self, approval_id: str, decision: str, reason: str = "") -> None:
        if decision not in ("allow", "deny"):
            raise ConfigError(f"invalid decision {decision!r}: expected 'allow' or 'deny'")
        run = self._approvals.pop(approval_id, None)
        if run is not None and approval_id in run._local_approvals:
            run.resolve_local_approval(approval_id, decision, reason)
            return
        if run is None or run.handle is None:
            raise make_error("unknown", "approval", f"Unknown approval id: {approval_id}")
        await run.handle.api.resolve_approval(
            pb.ResolveApprovalRequest(run_id=run.run_id, approval_id=approval_id, decision=decision, reason=reason)
        )

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The last provider session a run of this session reported (last writer wins)."""
        return self._checkpoint

    def _continuation(self, target: str) -> tuple[str, Checkpoint | None]:
        if target == "latest":
            return "latest", self._checkpoint
        if target == "checkpoint":
            cp = self._checkpoint
            if cp is None:
                raise make_error("config_invalid", "provider",
                                 "session checkpoint does not contain a resumable provider session id")
            return cp.provider_session_id, cp
        if isinstance(target, str) and target.strip():
            return target.strip(), None
        raise ConfigError(f"invalid resume target {target!r}; expected 'checkpoint', 'latest', or a session id")

    def resume_run(self, prompt: str, target: str = "checkpoint", **overrides: Any) -> RunStream:
        """Continue a provider session: the checkpoint's (default), the latest, or an exact id.

        The run goes to the node that holds that provider session unless ``node`` is given.
        """
        resume, cp = self._continuation(target)
        if cp is not None:
            overrides.setdefault("node", cp.node)
            overrides.setdefault("provider", cp.provider)
        overrides["options"] = {**overrides.get("options", {}), "resume": resume}
        return self.stream(prompt, **overrides)

    async def intervene(self, run_id: str, prompt: str, **overrides: Any) -> RunStream:
        """Interrupt a running run, then continue the same provider session with ``prompt``.

        Unlike ASM 0.9.2, the continuation is checked *before* the interrupt, and the
        new run starts after the old one has ended (so it is not stuck behind it in the queue).
        """
        run = self._runs.get(run_id)
        if run is None or run.state == "done":
            raise make_error("unknown", "runtime", f"Unknown active run id: {run_id}")
        psid = run.reducer.provider_session_id
        if not psid or run.handle is None:
            raise make_error("config_invalid", "provider",
                             f"run {run_id} has not reported a provider session id yet; nothing to continue")
        await run.interrupt()
        await run.done.wait()
        overrides.setdefault("node", run.handle.target)
        overrides.setdefault("provider", run.opts.provider)
        overrides["options"] = {**overrides.get("options", {}), "resume": psid}
        return self.stream(prompt, **overrides)

    def info(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "provider": self.defaults.provider,
            "status": self.status,
            "active_runs": list(self._active),
            "queued_runs": [r.run_id for r in self._queued],
            "options": dict(self.defaults.options),
        }

    @property
    def cost(self) -> Cost:
        return Cost(self._cost.input_tokens, self._cost.output_tokens, self._cost.cost_usd)

    def result(self, run_id: str) -> Result:
        run = self._runs.get(run_id)
        if run is None:
            raise make_error("unknown", "runtime", f"Unknown run id: {run_id}")
        return run.result()

    async def stop(self, timeout: float = 15.0) -> None:
        """Cancel queued runs, interrupt active ones on their nodes, and close connections."""
        self.status = "stopping"
        for run in list(self._queued):
            await run.interrupt()
        active = list(self._active.values())
        for run in active:
            await run.interrupt()
        tasks = [r.task for r in active if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        for handle in self._handles.values():
            with contextlib.suppress(Exception):
                await handle.close()
        self._handles.clear()
        self.status = "stopped"

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- internals -------------------------------------------------------------

    def _submit(self, prompt: str, opts: RunOptions, run_id: str, subscribed: bool, attach: bool = False,
                after_seq: int = 0) -> _Run:
        if self.status != "ready":
            raise make_error("config_invalid", "runtime", f"session {self.session_id} is {self.status}")
        if run_id in self._runs:
            raise ConfigError(f"run id {run_id!r} was already used in this session")
        if not opts.nodes:
            raise ConfigError("no node to run on: give the session (or the run) a node")
        run = _Run(self, run_id, prompt, opts, subscribed, attach=attach, after_seq=after_seq)
        if len(self._active) < self.max_concurrent_runs:
            self._active[run_id] = run
            run.start()
        elif len(self._queued) < self.max_queued_runs:
            run.state = "queued"
            self._queued.append(run)
        else:
            raise make_error("at_capacity", "runtime", "Session at run capacity")
        self._runs[run_id] = run
        return run

    def _dequeue(self, run: _Run) -> None:
        with contextlib.suppress(ValueError):
            self._queued.remove(run)

    def _run_finished(self, run: _Run) -> None:
        self._active.pop(run.run_id, None)
        psid = run.reducer.provider_session_id
        if psid and run.handle is not None:
            self._checkpoint = Checkpoint(
                provider=run.opts.provider, provider_session_id=psid, run_id=run.run_id,
                node=run.handle.target, node_id=run.handle.node_id, captured_at=time.time(),
            )
        # Keep a bounded history for result(run_id); a long-lived session must not grow forever.
        self._finished.append(run.run_id)
        while len(self._finished) > self.history_size:
            self._runs.pop(self._finished.popleft(), None)
        for approval_id in [a for a, r in self._approvals.items() if r is run]:
            del self._approvals[approval_id]
        while self._queued and len(self._active) < self.max_concurrent_runs and self.status == "ready":
            nxt = self._queued.popleft()
            self._active[nxt.run_id] = nxt
            nxt.start()

    def _observe(self, run: _Run, events: list[Event]) -> None:
        """Session bookkeeping for a batch, done before the subscriber sees it."""
        for ev in events:
            kind = ev.pb.kind
            if kind == pb.EVENT_KIND_APPROVAL_REQUESTED:
                self._approvals[ev.pb.approval_requested.approval_id] = run
            elif kind == pb.EVENT_KIND_APPROVAL_RESOLVED:
                self._approvals.pop(ev.pb.approval_resolved.approval_id, None)
                if self.metrics is not None and ev.pb.approval_resolved.reason == "timeout":
                    self.metrics.approvals_timed_out.inc()
            elif kind == pb.EVENT_KIND_COST_UPDATE:
                c = ev.pb.cost_update
                self._cost.add(Cost(c.input_tokens, c.output_tokens, c.cost_usd))
                if self.metrics is not None:
                    provider = run.opts.provider
                    self.metrics.tokens.labels(provider, "input").inc(c.input_tokens)
                    self.metrics.tokens.labels(provider, "output").inc(c.output_tokens)
                    self.metrics.cost.labels(provider).inc(c.cost_usd)

    async def _connect(self, target: NodeTarget) -> NodeHandle:
        t0 = time.perf_counter()
        handle = await connect(target)
        if self.metrics is not None:
            histogram = self.metrics.handshake.labels(target.address)
            histogram.observe(time.perf_counter() - t0)
            handle.on_heartbeat = histogram.observe
        return handle

    async def _handle(self, target: NodeTarget | None) -> NodeHandle:
        if target is None:
            raise ConfigError("no node to run on")
        key = target.key
        handle = self._handles.get(key)
        if handle is not None:
            return handle
        pending = self._connecting.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(target))
            self._connecting[key] = pending
            try:
                handle = await asyncio.shield(pending)
                self._handles[key] = handle
                return handle
            finally:
                self._connecting.pop(key, None)
        return await asyncio.shield(pending)


async def query(prompt: str, provider: str = "shell", *, node: NodeTarget, **options: Any) -> Result:
    """One-shot: an ephemeral session, one run, always stopped afterwards."""
    session = Session(provider, node=node, **options)
    try:
        return await session.query(prompt)
    finally:
        await session.stop()


__all__ = ["Checkpoint", "EmbeddedNode", "RemoteNode", "RunOptions", "RunStream", "Session", "query"]
