"""Test helpers for code that drives nodes through the controller (shipped, so nobody copies them).

:class:`FakeNodeApi` implements :class:`asm_wire.NodeApi` without a node: each run plays scripted
event batches, and every call is recorded. Use it as ``Session(..., node=EmbeddedNode(FakeNodeApi(...)))``::

    api = FakeNodeApi([[delta("Hello, ")], [delta("world"), result()]])
    async with Session("fake", node=EmbeddedNode(api)) as s:
        assert (await s.query("hi")).text == "Hello, world"
    assert api.calls_named("start_run")[0].prompt == "hi"

The fake stamps ids, run id, session id, provider and seq on the events (as a node does), and ends a
run with ``run_completed`` unless its script does. :func:`delta`, :func:`result`, :func:`error` and
:func:`completed` build the common events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from asm_wire import KIND_VALUES, PROTOCOL_VERSION, RunNotFound, __version__, pb

__all__ = ["FAKE_CAPABILITIES", "Call", "FakeNodeApi", "Script", "completed", "delta", "error", "result"]

#: What a node offers (the controller requires the run/approval ones).
FAKE_CAPABILITIES = ("run.start.v1", "run.attach.v1", "run.interrupt.v1", "run.query.v1",
                     "approval.resolve.v1", "input.send.v1")

#: Batches of events for one run; or, per StartRun request, a function returning them.
Script = Sequence[Sequence[pb.Event]] | Callable[[pb.StartRunRequest], Sequence[Sequence[pb.Event]]]


def delta(text: str) -> pb.Event:
    """An ``assistant_delta`` event."""
    return pb.Event(kind=KIND_VALUES["assistant_delta"], assistant_delta=pb.AssistantDelta(content=text))


def result(status: str = "completed", stop_reason: str = "end_turn", output_json: str = "{}") -> pb.Event:
    """A ``result`` event."""
    return pb.Event(kind=KIND_VALUES["result"],
                    result=pb.Result(status=status, stop_reason=stop_reason, output_json=output_json))


def error(code: str, message: str, domain: str = "runtime",
          severity: pb.Severity.ValueType = pb.SEVERITY_ERROR) -> pb.Event:
    """An ``error`` event (by default of error severity: a failure)."""
    return pb.Event(kind=KIND_VALUES["error"], error=pb.Error(
        code=code, domain=domain, message=message, severity=severity))


def completed(status: str = "completed", exit_code: int = 0) -> pb.Event:
    """A ``run_completed`` event, the last of every run."""
    return pb.Event(kind=KIND_VALUES["run_completed"],
                    run_completed=pb.RunCompleted(status=status, exit_code=exit_code))


@dataclass(frozen=True)
class Call:
    """One recorded call: the method name and its request."""

    method: str
    request: Message


@dataclass
class _FakeRun:
    request: pb.StartRunRequest
    batches: list[list[pb.Event]]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted: bool = False

    @property
    def events(self) -> list[pb.Event]:
        return [ev for b in self.batches for ev in b]

    @property
    def ended(self) -> bool:
        return any(ev.kind == pb.EVENT_KIND_RUN_COMPLETED for ev in self.events)


class FakeNodeApi:
    """A scripted :class:`asm_wire.NodeApi`: runs play ``script``; every call lands in :attr:`calls`.

    ``script`` is the same batches for every run, or a function of the StartRun request.
    ``hold=True`` keeps a run open after its script (before ``run_completed``) until
    :meth:`InterruptRun <interrupt_run>` or :meth:`finish`: a run that is "still running".
    """

    def __init__(
        self, script: Script = (), *, provider: str = "fake", node_id: str = "fake-node", boot_epoch: str = "e1",
        state: pb.NodeState.ValueType = pb.NODE_STATE_READY, capabilities: Iterable[str] = FAKE_CAPABILITIES,
        labels: dict[str, str] | None = None, hold: bool = False, version: str = __version__,
    ) -> None:
        self.script = script
        self.provider = provider
        self.node_id = node_id
        self.boot_epoch = boot_epoch
        self.state = state
        self.capabilities = list(capabilities)
        self.labels = dict(labels or {})
        self.hold = hold
        self.version = version
        self.calls: list[Call] = []
        self.runs: dict[str, _FakeRun] = {}

    def calls_named(self, method: str) -> list[Message]:
        """The requests of the recorded calls to ``method`` (e.g. ``"start_run"``), in order."""
        return [c.request for c in self.calls if c.method == method]

    def _record(self, method: str, request: Message) -> None:
        self.calls.append(Call(method, request))

    def finish(self, run_id: str) -> None:
        """Let a held run end (its ``run_completed`` follows)."""
        self.runs[run_id].done.set()

    # -- NodeApi ------------------------------------------------------------------

    async def handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
        self._record("handshake", request)
        active = sum(1 for r in self.runs.values() if not r.done.is_set())
        return pb.HandshakeResponse(
            agent_version=self.version, protocol_version=PROTOCOL_VERSION, capabilities=self.capabilities,
            node_id=self.node_id, boot_epoch=self.boot_epoch, state=self.state, labels=self.labels,
            providers=[pb.ProviderInfo(name=self.provider, available=True, cli_path="fake", version="test")],
            load=pb.Load(active_runs=active), started_unix_nano=time.time_ns(),
        )

    async def preflight(self, request: pb.PreflightRequest) -> pb.PreflightResponse:
        self._record("preflight", request)
        info = pb.ProviderInfo(name=self.provider, available=True, cli_path="fake", version="test")
        if request.provider != self.provider:
            return pb.PreflightResponse(ok=False, error=pb.ErrorInfo(
                kind="cli_not_found", domain="provider", message=f"unknown provider {request.provider!r}"))
        return pb.PreflightResponse(ok=True, resolved_cwd=request.cwd or "/", provider=info)

    def _stamp(self, run: _FakeRun, events: Sequence[pb.Event], seq: int) -> list[pb.Event]:
        out = []
        for ev in events:
            seq += 1
            e = pb.Event()
            e.CopyFrom(ev)
            rid = run.request.run_id
            e.id, e.run_id, e.seq = f"{rid}:{seq}", rid, seq
            e.session_id, e.provider = run.request.session_id, run.request.provider
            e.timestamp_unix_nano = time.time_ns()
            out.append(e)
        return out

    async def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        self._record("start_run", request)
        run = self.runs.get(request.run_id)
        if run is None:
            run = self._play(request)
        async for batch in self._follow(run, request.after_seq):
            yield batch

    def _play(self, request: pb.StartRunRequest) -> _FakeRun:
        script = self.script(request) if callable(self.script) else self.script
        run = _FakeRun(request, [])
        seq = 0
        for events in script:
            stamped = self._stamp(run, events, seq)
            seq += len(stamped)
            run.batches.append(stamped)
        if run.ended or not self.hold:
            self._complete(run)
        self.runs[request.run_id] = run
        return run

    def _complete(self, run: _FakeRun) -> None:
        if not run.ended:
            status = "interrupted" if run.interrupted else "completed"
            run.batches.append(self._stamp(run, [completed(status)], len(run.events)))
        run.done.set()

    async def _follow(self, run: _FakeRun, after_seq: int) -> AsyncIterator[pb.EventBatch]:
        sent = after_seq
        while True:
            for batch in list(run.batches):
                picked = [ev for ev in batch if ev.seq > sent]
                if picked:
                    yield pb.EventBatch(events=picked)
                    sent = picked[-1].seq
            if run.ended:
                return
            await run.done.wait()  # a held run: until interrupted or finished
            self._complete(run)

    async def attach_run(self, request: pb.AttachRunRequest) -> AsyncIterator[pb.EventBatch]:
        self._record("attach_run", request)
        run = self.runs.get(request.run_id)
        if run is None:
            raise RunNotFound(f"no run {request.run_id}")
        async for batch in self._follow(run, request.after_seq):
            yield batch

    async def interrupt_run(self, request: pb.InterruptRunRequest) -> pb.InterruptRunResponse:
        self._record("interrupt_run", request)
        run = self.runs.get(request.run_id)
        if run is None or run.done.is_set():
            return pb.InterruptRunResponse(accepted=False)
        run.interrupted = True
        run.done.set()
        return pb.InterruptRunResponse(accepted=True)

    async def resolve_approval(self, request: pb.ResolveApprovalRequest) -> pb.ResolveApprovalResponse:
        self._record("resolve_approval", request)
        return pb.ResolveApprovalResponse()

    async def send_input(self, request: pb.SendInputRequest) -> pb.SendInputResponse:
        self._record("send_input", request)
        return pb.SendInputResponse()

    def _info(self, run: _FakeRun) -> pb.RunInfo:
        status = pb.RUN_STATUS_RUNNING
        if run.done.is_set():
            status = pb.RUN_STATUS_INTERRUPTED if run.interrupted else pb.RUN_STATUS_COMPLETED
        return pb.RunInfo(run_id=run.request.run_id, session_id=run.request.session_id,
                          provider=run.request.provider, status=status, last_seq=len(run.events),
                          first_held_seq=1 if run.events else 0, cwd=run.request.cwd, node=self.node_id)

    async def get_run(self, request: pb.GetRunRequest) -> pb.RunInfo:
        self._record("get_run", request)
        run = self.runs.get(request.run_id)
        if run is None:
            raise RunNotFound(f"no run {request.run_id}")
        return self._info(run)

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        self._record("list_runs", request)
        runs = [r for r in self.runs.values() if not (request.active_only and r.done.is_set())]
        return pb.ListRunsResponse(runs=[self._info(r) for r in runs])

    async def drain(self, request: pb.DrainRequest) -> pb.DrainResponse:
        self._record("drain", request)
        self.state = pb.NODE_STATE_DRAINING
        return pb.DrainResponse(state=self.state)

    async def undrain(self, request: pb.UndrainRequest) -> pb.DrainResponse:
        self._record("undrain", request)
        self.state = pb.NODE_STATE_READY
        return pb.DrainResponse(state=self.state)

    async def snapshot(self, request: pb.SnapshotRequest) -> pb.SnapshotInfo:
        self._record("snapshot", request)
        return pb.SnapshotInfo()

    async def diff(self, request: pb.DiffRequest) -> pb.DiffResponse:
        self._record("diff", request)
        return pb.DiffResponse()

    async def rollback(self, request: pb.RollbackRequest) -> pb.RollbackResponse:
        self._record("rollback", request)
        return pb.RollbackResponse()
