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
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from asm_controller._client import RemoteNode
from asm_controller._connector import EmbeddedNode, NodeHandle, NodeTarget, connect, preflight
from asm_controller._events import Event
from asm_controller._reducer import Cost, EventReducer, Result
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

    def merged(self, overrides: Mapping[str, Any]) -> RunOptions:
        unknown = sorted(set(overrides) - set(self.__dataclass_fields__) - {"run_id"})
        if unknown:
            raise ConfigError(f"unknown run option(s): {', '.join(unknown)}")
        changes = {k: v for k, v in overrides.items() if k != "run_id" and v is not None}
        if "options" in changes:
            changes["options"] = {**self.options, **changes["options"]}
        if "env" in changes:
            changes["env"] = {**self.env, **changes["env"]}
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
        if self.permission_mode not in PERMISSION_MODES:
            raise ConfigError(
                f"unsupported permission mode {self.permission_mode!r}: expected one of {', '.join(PERMISSION_MODES)}"
            )
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


class _Run:
    """Controller side of one run: admission state, driver task, reducer, subscriber channel."""

    def __init__(self, session: Session, run_id: str, prompt: str, opts: RunOptions, subscribed: bool) -> None:
        self.session = session
        self.run_id = run_id
        self.prompt = prompt
        self.opts = opts
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
        self._interrupt_sent = False
        self._started_on_node = False
        self._typed_error: AsmError | None = None

    # -- driving ---------------------------------------------------------------

    def start(self) -> None:
        self.state = "active"
        self.task = asyncio.create_task(self._drive(), name=f"asm-run-{self.run_id}")

    def _request(self, cwd: str) -> pb.StartRunRequest:
        return pb.StartRunRequest(
            run_id=self.run_id, session_id=self.session.session_id, provider=self.opts.provider,
            prompt=self.prompt, cwd=cwd, permission_mode=self.opts.permission_mode,
            options_json=_json(self.opts.options), env=dict(self.opts.env),
            approval_timeout_ms=self.opts.approval_timeout_ms,
        )

    async def _drive(self) -> None:
        try:
            handle, batches, first = await self._admit()
            await self._consume(first, batches)
            if not self.reducer.finished:
                raise make_error("node_lost", "transport",
                                 f"the stream from node {handle.target.address} ended before the run completed")
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

    async def _admit(self) -> tuple[NodeHandle, AsyncIterator[pb.EventBatch], pb.EventBatch]:
        """Start the run on the first candidate node that admits it; return its stream and first batch.

        The node's StartRun does the admission checks itself (provider, cwd,
        capacity, state) and refuses with the same typed errors as Preflight,
        so a run costs one round trip. Only those refusals move on to the next
        node: nothing has started anywhere yet, so trying elsewhere cannot run
        the prompt twice.
        """
        attempts: list[dict[str, Any]] = []
        self.reducer.metadata["attempts"] = attempts
        last: AsmError | None = None
        for target in self.opts.nodes:
            if self.cancel_requested:
                raise make_error("user_cancelled", "runtime", "Run interrupted before it started")
            try:
                handle = await self.session._handle(target)
                cwd = self.opts.cwd
                if self.opts.preflight:
                    cwd = await preflight(handle, self.opts.provider, cwd)
                self.handle = handle
                self._started_on_node = True
                batches = aiter(handle.api.start_run(self._request(cwd)))
                first = await anext(batches)
            except NodeConnectionError as err:
                self._started_on_node = False
                attempts.append({"node": target.address, "error": err.to_dict()})
                last = err
                continue
            except StopAsyncIteration:
                raise make_error("node_lost", "transport", f"node {target.address} closed the run's stream") from None
            attempts.append({"node": target.address, "node_id": handle.node_id, "admitted": True})
            self.reducer.metadata.update(
                node_id=handle.node_id, node_epoch=handle.epoch, node_address=target.address,
                execution=handle.execution,
            )
            return handle, batches, first
        if last is None:
            raise ConfigError("no node to run on: give the session (or the run) a node")
        if len(attempts) > 1:
            last.message = f"no node admitted the run ({len(attempts)} tried); last: {last.message}"
        raise last

    async def _consume(self, first: pb.EventBatch, batches: AsyncIterator[pb.EventBatch]) -> None:
        reducer, channel, session = self.reducer, self.channel, self.session
        batch: pb.EventBatch | None = first
        while batch is not None:
            fresh = [ev for ev in map(Event, batch.events) if reducer.apply(ev)]
            if reducer.bookkeeping:
                # Approvals and cost reach the session before the subscriber sees the event.
                session._observe(self, reducer.bookkeeping)
                reducer.bookkeeping.clear()
            if self.cancel_requested and not self._interrupt_sent:
                await self._send_interrupt()
            if channel is not None and fresh:
                await channel.put(fresh)
            if reducer.finished:
                return
            batch = await anext(batches, None)

    def _synthesize_failure(self, err: AsmError) -> None:
        """End the run's stream with an error and run_completed made here (the node never finished it)."""
        r = self.reducer
        if r.finished:
            return
        status = "interrupted" if err.kind == "user_cancelled" else "failed"
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
        if self.channel is not None:
            self.channel.put_final(events)
        self._typed_error = err

    def _finish(self) -> None:
        self.state = "done"
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
            await self.handle.api.interrupt_run(pb.InterruptRunRequest(run_id=self.run_id))
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


def _json(options: Mapping[str, Any]) -> str:
    import json

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

    def __init__(self, session: Session, prompt: str, opts: RunOptions, run_id: str) -> None:
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
            self._run = self._session._submit(self._prompt, self._opts, self.run_id, subscribed=True)
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
            preflight=preflight,
        )
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

    # -- public API ------------------------------------------------------------

    def stream(self, prompt: str, **overrides: Any) -> RunStream:
        """A lazy stream of the run's events (submitted on first iteration)."""
        if not isinstance(prompt, str):
            raise ConfigError("prompt must be a string")
        opts = self.defaults.merged(overrides)
        run_id = overrides.get("run_id") or ulid()
        if not valid_id(run_id):
            raise ConfigError(f"invalid run_id {run_id!r}")
        return RunStream(self, prompt, opts, run_id)

    async def query(self, prompt: str, **overrides: Any) -> Result:
        """Run to completion and return the Result (check ``result.ok`` / ``result.error``)."""
        if not isinstance(prompt, str):
            raise ConfigError("prompt must be a string")
        opts = self.defaults.merged(overrides)
        run_id = overrides.get("run_id") or ulid()
        if not valid_id(run_id):
            raise ConfigError(f"invalid run_id {run_id!r}")
        run = self._submit(prompt, opts, run_id, subscribed=False)
        try:
            await run.done.wait()
        except asyncio.CancelledError:
            await run.interrupt()
            raise
        return run.result()

    async def interrupt(self, run_id: str) -> None:
        run = self._runs.get(run_id)
        if run is None or run.state == "done":
            raise make_error("unknown", "runtime", f"Unknown run id: {run_id}")
        await run.interrupt()

    async def approve(self, approval_id: str, decision: str, reason: str = "") -> None:
        if decision not in ("allow", "deny"):
            raise ConfigError(f"invalid decision {decision!r}: expected 'allow' or 'deny'")
        run = self._approvals.pop(approval_id, None)
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

    def _submit(self, prompt: str, opts: RunOptions, run_id: str, subscribed: bool) -> _Run:
        if self.status != "ready":
            raise make_error("config_invalid", "runtime", f"session {self.session_id} is {self.status}")
        if run_id in self._runs:
            raise ConfigError(f"run id {run_id!r} was already used in this session")
        if not opts.nodes:
            raise ConfigError("no node to run on: give the session (or the run) a node")
        run = _Run(self, run_id, prompt, opts, subscribed)
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
            elif kind == pb.EVENT_KIND_COST_UPDATE:
                c = ev.pb.cost_update
                self._cost.add(Cost(c.input_tokens, c.output_tokens, c.cost_usd))

    async def _handle(self, target: NodeTarget | None) -> NodeHandle:
        if target is None:
            raise ConfigError("no node to run on")
        key = target.key
        handle = self._handles.get(key)
        if handle is not None:
            return handle
        pending = self._connecting.get(key)
        if pending is None:
            pending = asyncio.ensure_future(connect(target))
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
