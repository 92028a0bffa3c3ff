"""Sessions: ASM's facade semantics (stream, query, interrupt, approve, ...).

A :class:`Session` holds defaults (provider, node, cwd, options, ...) that each
run may override, admits runs (``max_concurrent_runs`` active, then up to
``max_queued_runs`` queued, else ``at_capacity``), and tracks approvals and
cost across its runs. Its nodes live in a :class:`~asm_controller.NodePool`
(its own, or one shared with others); each run is a
:class:`~asm_controller._run.Run` driven through the session's narrow host
interface. Fixed relative to ASM 0.9.2 (asm_runtime.md section 8):

* a queued run that is cancelled ends its stream with a ``user_cancelled``
  error instead of hanging; a queued run whose start fails gets that error;
* every free slot promotes a queued run, not one per run exit;
* ``stop()`` interrupts the session's runs on their nodes (their CLIs stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from asm_controller._client import RemoteNode
from asm_controller._connector import EmbeddedNode, NodeHandle, NodeTarget
from asm_controller._events import Event
from asm_controller._fleetqueue import FleetQueue, NullFleetQueue
from asm_controller._options import Checkpoint, RunOptions
from asm_controller._pool import NodePool
from asm_controller._reducer import Cost, Result
from asm_controller._registry import NullRegistry, Registry
from asm_controller._run import Run
from asm_controller._snapshot import SnapshotRun, SnapshotStream, run_with_snapshot, stream_with_snapshot
from asm_wire import ApprovalNotFound, ConfigError, Decision, RunNotFound, choices, make_error, pb, ulid, valid_id

if TYPE_CHECKING:  # metrics (prometheus_client) and the store are imported only by whoever makes them
    from asm_controller._metrics import ControllerMetrics
    from asm_controller._store import RunRecord


class RunStream:
    """An async iterator over one run's events; ``result`` once it is done.

    Nothing is submitted until the first iteration (ASM's lazy stream). Use it
    as an async context manager, or call :meth:`aclose`, to interrupt the run
    when you stop reading early.
    """

    def __init__(self, session: Session, prompt: str, opts: RunOptions, run_id: str, attach: bool = False,
                 after_seq: int = 0, owner: str = "", session_id: str = "") -> None:
        self._owner = owner
        self._session_id = session_id
        self._attach = attach
        self._after_seq = after_seq
        self._session = session
        self._prompt = prompt
        self._opts = opts
        self.run_id = run_id
        self._run: Run | None = None
        self._batch: list[Event] = []
        self._index = 0
        self._ended = False

    def _submit(self) -> Run:
        if self._run is None:
            self._run = self._session._submit(self._prompt, self._opts, self.run_id, subscribed=True,
                                              attach=self._attach, after_seq=self._after_seq,
                                              owner=self._owner, session_id=self._session_id)
        return self._run

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> Event:
        if self._index < len(self._batch):
            ev = self._batch[self._index]
            self._index += 1
            return ev
        batch = await self._fetch()
        if batch is None:
            raise StopAsyncIteration
        self._batch, self._index = batch, 1
        return batch[0]

    async def _fetch(self) -> list[Event] | None:
        """The channel's next batch (submitting the run first); None, and ended, at its end."""
        if self._ended:
            return None
        run = self._submit()
        assert run.channel is not None
        batch = await run.channel.get()
        if batch is None:
            self._ended = True
        return batch

    async def next_batch(self) -> list[Event] | None:
        """The rest of the batch the last event came in, else the next batch (as it arrived); None at
        the end. The same events as ``async for``, in order, a batch per await instead of an event
        (the CLI's printing loop); the two may be mixed. The list is the stream's: do not change it."""
        if self._index < len(self._batch):
            rest = self._batch[self._index:] if self._index else self._batch
            self._index = len(self._batch)
            return rest
        batch = await self._fetch()
        if batch is not None:
            self._batch, self._index = batch, len(batch)
        return batch

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
    """A set of runs sharing defaults, admission limits, approvals and cost.

    ``providers=["claude", "gemini"]`` (or ``provider="claude,gemini"``) is a provider failover list:
    a candidate that fails before doing any work (no CLI, auth, rate limit, HTTP 5xx) hands the run
    to the next, with a health cooldown per (node, provider) (``failure_cooldown_s``). ``options``
    go to every candidate; ``provider_options={"gemini": {...}}`` to one. ``lane``: ASM's lane
    ("auto" or "core"; "sdk" is refused: asm runs the CLIs only).
    """

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
        approval_timeout_ms: int = 0,
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
        providers: Sequence[str] | None = None,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
        lane: str = "auto",
        metrics: ControllerMetrics | None = None,
        pool: NodePool | None = None,
        registry: Registry | None = None,
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
            providers=providers if isinstance(providers, str) else tuple(providers or ()),
            provider_options=dict(provider_options or {}), lane=lane,
        )
        self._own_pool = pool is None
        self.pool = pool if pool is not None else NodePool(strategy, failure_cooldown_s, metrics)
        self.metrics = metrics
        #: Where runs are recorded (nothing by default; the controller service gives a durable one).
        self.registry: Registry = registry if registry is not None else NullRegistry()
        #: Where a run waits when every node is full (none: it fails at_capacity; the service gives a FleetQueue).
        self.queue: FleetQueue | NullFleetQueue = NullFleetQueue()
        if metrics is not None:
            metrics.watch(self)
        self.defaults.validate()
        self.max_concurrent_runs = max_concurrent_runs
        self.max_queued_runs = max_queued_runs
        self.status = "ready"
        self._active: dict[str, Run] = {}
        self._queued: deque[Run] = deque()
        self._runs: dict[str, Run] = {}
        self._finished: deque[str] = deque()
        self.history_size = 128
        self._approvals: dict[str, Run] = {}
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
        """A lazy stream of the run's events (submitted on first iteration).

        ``run_id`` names the run (default: a new ULID); ``owner`` is recorded as the principal that started it;
        ``session_id`` puts the run in another session than this one's (a controller's client names its own).
        """
        opts, run_id = self._prepare(prompt, overrides)
        owner = overrides.get("owner") or ""
        if not isinstance(owner, str):
            raise ConfigError("owner must be a string")
        session_id = overrides.get("session_id") or ""
        if not isinstance(session_id, str) or (session_id and not valid_id(session_id)):
            raise ConfigError(f"invalid session_id {session_id!r}")
        return RunStream(self, prompt, opts, run_id, owner=owner, session_id=session_id)

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

    async def run_with_snapshot(self, prompt: str, *, backend: str = "auto", **overrides: Any) -> SnapshotRun:
        """Run between two workspace snapshots: the Result, the snapshots and their diff (see ``_snapshot``)."""
        return await run_with_snapshot(self, prompt, backend=backend, **overrides)

    async def stream_with_snapshot(self, prompt: str, *, backend: str = "auto", **overrides: Any) -> SnapshotStream:
        """The streaming form of :meth:`run_with_snapshot` (the diff is taken when the stream ends)."""
        return await stream_with_snapshot(self, prompt, backend=backend, **overrides)

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

    async def connect(self, target: NodeTarget | None = None) -> NodeHandle:
        """The node's handle (connected, handshaken, compatible), through the session's pool; the
        session's first node when no target is given. Typed errors (NodeUnreachable, ...)."""
        if target is None:
            nodes = self.defaults.nodes
            if not nodes:
                raise ConfigError("no node to connect to: give the session (or this call) a node")
            target = nodes[0]
        return await self.pool.handle(target)

    def health(self) -> dict[str, dict[str, Any]]:
        """Routing health per node (healthy / degraded / unhealthy) and the node's liveness."""
        return self.pool.snapshot()

    def provider_health(self) -> dict[str, dict[str, Any]]:
        """Provider failover health per (node, provider): ``"claude@grpc://a:7070"`` -> status, failures, ..."""
        return self.pool.provider_health.snapshot()

    def get_run(self, run_id: str) -> Run | None:
        """The run with this id while the session remembers it (active, queued, or in its bounded history)."""
        return self._runs.get(run_id)

    def runs(self) -> list[Run]:
        """A snapshot of the runs the session remembers."""
        return list(self._runs.values())

    def approval_run(self, approval_id: str) -> Run | None:
        """The run a pending approval belongs to."""
        return self._approvals.get(approval_id)

    def stats(self) -> dict[str, int]:
        """Counts for metrics: active and queued runs, pending approvals, remembered runs."""
        return {"active": len(self._active), "queued": len(self._queued), "approvals_pending": len(self._approvals),
                "runs": len(self._runs)}

    async def interrupt(self, run_id: str) -> None:
        run = self._runs.get(run_id)
        if run is None or run.state == "done":
            raise RunNotFound(f"Unknown run id: {run_id}")
        await run.interrupt()

    async def approve(self, approval_id: str, decision: str, reason: str = "") -> None:
        if decision not in choices(Decision):
            raise ConfigError(f"invalid decision {decision!r}: expected {' or '.join(map(repr, choices(Decision)))}")
        run = self._approvals.pop(approval_id, None)
        if run is not None and run.is_local_approval(approval_id):
            run.resolve_local_approval(approval_id, decision, reason)
            return
        if run is None or run.handle is None:
            raise ApprovalNotFound(f"Unknown approval id: {approval_id}")
        await run.handle.api.resolve_approval(
            pb.ResolveApprovalRequest(run_id=run.run_id, approval_id=approval_id, decision=decision, reason=reason)
        )

    async def send_input(self, run_id: str, text: str) -> None:
        """Steer a running run: ``text`` goes to its CLI as a user message (Claude Code's stream-json
        input) and may change the answer. A provider that takes no input refuses with ``config_invalid``
        (reason ``input_not_supported``); a run that has ended, with reason ``run_not_running``."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("send_input needs a non-empty text", reason="input_invalid")
        run = self._runs.get(run_id)
        if run is None:
            raise RunNotFound(f"Unknown run id: {run_id}")
        if run.state == "done" or run.handle is None:
            raise make_error("config_invalid", "runtime", f"run {run_id} is not running", reason="run_not_running")
        await run.handle.api.send_input(pb.SendInputRequest(run_id=run.node_run_id, data=text.encode("utf-8")))

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

    def resume_run(self, prompt: str, target: str = "checkpoint", *, provider_session_id: str | None = None,
                   **overrides: Any) -> RunStream:
        """Continue a provider session: the checkpoint's (default), the latest, or an exact id.

        ``provider_session_id`` names one exactly, e.g. one ``asm sessions --node N --provider P`` listed
        (ListProviderSessions): it is the CLI's own session on that host, so give ``node`` (and
        ``provider``) when the session's defaults do not already point there.
        The run goes to the node that holds that provider session unless ``node`` is given.
        """
        if provider_session_id is not None:
            if not isinstance(provider_session_id, str) or not provider_session_id.strip():
                raise ConfigError("provider_session_id must be a non-empty provider session id")
            if target != "checkpoint":
                raise ConfigError("give either a resume target or provider_session_id, not both")
            target = provider_session_id
        resume, cp = self._continuation(target)
        if cp is not None:
            overrides.setdefault("node", cp.node)
            overrides.setdefault("provider", cp.provider)
        if "providers" not in overrides:
            # A provider session belongs to its provider: a resume never fails over to another one.
            overrides.setdefault("provider", self.defaults.candidates[0])
        overrides["options"] = {**overrides.get("options", {}), "resume": resume}
        return self.stream(prompt, **overrides)

    async def intervene(self, run_id: str, prompt: str, **overrides: Any) -> RunStream:
        """Interrupt a running run, then continue the same provider session with ``prompt``.

        Unlike ASM 0.9.2, the continuation is checked *before* the interrupt, and the
        new run starts after the old one has ended (so it is not stuck behind it in the queue).
        """
        run = self._runs.get(run_id)
        if run is None or run.state == "done":
            raise RunNotFound(f"Unknown active run id: {run_id}")
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
            raise RunNotFound(f"Unknown run id: {run_id}")
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
        await self._close()

    async def detach(self, timeout: float = 5.0) -> None:
        """Stop following every run *without* interrupting it: the runs go on on their nodes.

        For a controller with a durable registry that is stopping (an upgrade, a restart): its
        runs stay in flight in the registry and the next controller re-attaches them.
        """
        self.status = "stopping"
        runs = list(self._active.values())
        for run in runs:
            run.detaching = True
            if run.task is not None:
                run.task.cancel()
        tasks = [r.task for r in runs if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self._close()

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.registry.flush()
        if self._own_pool:
            await self.pool.close()
        self.status = "stopped"

    def adopt(self, record: RunRecord, node: NodeTarget, events: Sequence[pb.Event]) -> Run:
        """Take over a run a previous controller recorded (in flight on ``node``), and re-attach it there.

        ``events`` are the run's stored events: the reducer is rebuilt from them and the run goes
        on after the record's node cursor, so every event is reduced (and recorded) once.
        """
        overrides = self._recorded_options(record)
        overrides["node"] = node
        opts = self.defaults.merged(overrides)
        run = self._submit("", opts, record.run_id, subscribed=False, attach=True, after_seq=record.node_seq,
                           owner=record.owner, restored=events, node_run_id=record.node_run_id or record.run_id,
                           session_id=record.session_id)
        return run

    def requeue(self, record: RunRecord) -> Run:
        """Take over a run another controller (or this one before a restart) left in the fleet queue:
        it waits again at its place (its priority and queued time), then starts as usual."""
        overrides = self._recorded_options(record)
        overrides["priority"] = record.priority
        for key in ("providers", "provider_options"):  # not started yet: every candidate is still open
            if key in record.spec:
                overrides[key] = record.spec[key]
        if "providers" in overrides:
            del overrides["provider"]
        opts = self.defaults.merged(overrides)
        run = Run(self, record.run_id, record.prompt, opts, False, session_id=record.session_id)
        run.owner, run.recorded, run.fleet_queued = record.owner, True, True
        run.queued_at, run.queue_deadline = record.queued_at, record.queue_deadline
        return self._enter(run)

    def _recorded_options(self, record: RunRecord) -> dict[str, Any]:
        spec = record.spec
        overrides: dict[str, Any] = {"provider": record.provider}
        for key in ("cwd", "permission_mode", "options", "approval_timeout_ms", "on_node_lost", "selector",
                    "resume_prompt", "lane"):
            if key in spec:
                overrides[key] = spec[key]
        return overrides

    def release(self, run: Run) -> None:
        """Stop following one run without ending it: another replica holds its lease now (or this one
        lost the store). Its subscribers are told to re-attach (see FleetApi). A run that is done here is
        forgotten: a takeover of its (still live) record follows it again under the same id."""
        if run.state == "done":
            if self._runs.get(run.run_id) is run:
                del self._runs[run.run_id]
                with contextlib.suppress(ValueError):  # its history slot must not evict the new follower
                    self._finished.remove(run.run_id)
            return
        run.detaching = True  # its driver ends without recording an end (a queued one leaves the queue)
        if run.task is not None:
            run.task.cancel()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- internals -------------------------------------------------------------

    def _submit(self, prompt: str, opts: RunOptions, run_id: str, subscribed: bool, attach: bool = False,
                after_seq: int = 0, owner: str = "", restored: Sequence[pb.Event] | None = None,
                node_run_id: str = "", session_id: str = "") -> Run:
        if self.status != "ready":
            raise make_error("config_invalid", "runtime", f"session {self.session_id} is {self.status}")
        if run_id in self._runs:
            raise ConfigError(f"run id {run_id!r} was already used in this session")
        if not opts.nodes:
            raise ConfigError("no node to run on: give the session (or the run) a node")
        run = Run(self, run_id, prompt, opts, subscribed, attach=attach, after_seq=after_seq, session_id=session_id)
        run.owner = owner
        if restored is not None:
            run.restore(restored, node_run_id)
        return self._enter(run)

    def _enter(self, run: Run) -> Run:
        if self.status != "ready":
            raise make_error("config_invalid", "runtime", f"session {self.session_id} is {self.status}")
        run_id = run.run_id
        if run_id in self._runs:
            raise ConfigError(f"run id {run_id!r} was already used in this session")
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

    def dequeue(self, run: Run) -> None:
        with contextlib.suppress(ValueError):
            self._queued.remove(run)

    def run_finished(self, run: Run) -> None:
        self._active.pop(run.run_id, None)
        self.queue.wake()  # its slot on its node may be a queued run's now
        if run.detaching and not run.reducer.finished:
            # Released (another replica follows it) or detached: not this session's to remember; a later
            # takeover of the same run here starts from the store again.
            self._runs.pop(run.run_id, None)
            return
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

    def observe(self, run: Run, events: list[Event]) -> None:
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

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def query(prompt: str, provider: str = "shell", *, node: NodeTarget, **options: Any) -> Result:
    """One-shot: an ephemeral session, one run, always stopped afterwards."""
    session = Session(provider, node=node, **options)
    try:
        return await session.query(prompt)
    finally:
        await session.stop()


__all__ = ["Checkpoint", "EmbeddedNode", "RemoteNode", "RunOptions", "RunStream", "Session", "query"]
