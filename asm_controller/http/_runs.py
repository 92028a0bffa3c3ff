"""The run API: start, list, get, follow (SSE), interrupt, approve, input -- each a FleetApi method, so
replicas, the fleet queue, leases and history behave as over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from asm_controller._events import Event
from asm_controller.http._convert import message_dict, run_dict
from asm_controller.http._deps import Caller, caller
from asm_controller.http._errors import error_body
from asm_wire import TERMINAL_STATUSES, AsmError, ConfigError, RunNotFound, pb, run_status_value, ulid

#: A comment line on a silent event stream this often, so proxies and clients keep the connection.
KEEPALIVE_S = 15.0
#: How long POST /v1/runs waits for the run to be admitted (recorded, or refused) before answering anyway.
ADMIT_WAIT_S = 10.0

_CallerDep = Annotated[Caller, Depends(caller)]
_TERMINAL = frozenset(run_status_value(s) for s in TERMINAL_STATUSES)


class StartRunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=64)
    prompt: str
    options: dict[str, Any] = Field(default_factory=dict, description="provider options (validated by the node)")
    cwd: str = ""
    permission_mode: Literal["", "default", "auto", "bypass", "plan"] = ""
    env: dict[str, str] = Field(default_factory=dict, description="merged only for keys the node allows")
    run_id: str | None = Field(default=None, description="idempotency: a known id answers the existing run")
    session_id: str = ""
    priority: int = Field(default=0, ge=-1000, le=1000)
    queue_timeout_ms: int = Field(default=0, ge=0, le=2**32 - 1)
    approval_timeout_ms: int = Field(default=0, ge=0, le=2**32 - 1)
    selector: dict[str, str] = Field(default_factory=dict,
                                     description="only nodes whose labels include all of these (at most 32 pairs)")


class StartRunAnswer(BaseModel):
    created: bool = Field(description="false: the run id was known, this is the existing run")
    run: dict[str, Any]


class RunList(BaseModel):
    runs: list[dict[str, Any]]
    next_page_token: str = ""


class ApprovalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["allow", "deny"]
    reason: str = Field(default="", max_length=4096)


class InputBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(default="", description="text written to the CLI's stdin (UTF-8)")
    end_input: bool = False


class Accepted(BaseModel):
    accepted: bool


class Empty(BaseModel):
    pass


class RunTasks:
    """The StartRun relays POST /v1/runs started: each is consumed to the run's end (no client reads it;
    the run itself would go on without a reader, but this keeps it exactly as a gRPC client's). Cancelled
    when the server stops (the runs go on: a durable controller re-attaches them)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, it: AsyncIterator[pb.EventBatch]) -> asyncio.Task[None]:
        async def drain() -> None:
            async for _ in it:
                pass

        task = asyncio.create_task(drain())
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # seen: a failed relay is the run's own end (or the POST's answer)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        for t in list(self.tasks):
            with contextlib.suppress(BaseException):
                await t


def sse_frame(ev: pb.Event) -> bytes:
    e = Event(ev)
    return f"id: {ev.seq}\nevent: {e.kind}\ndata: {json.dumps(e.to_dict(), ensure_ascii=False)}\n\n".encode()


def _cursor(last_event_id: str | None, after_seq: int | None) -> int:
    """Resume after ``Last-Event-ID`` (what a reconnecting EventSource sends), else ``?after_seq=``."""
    if last_event_id is not None and last_event_id.strip():
        text = last_event_id.strip()
        if not text.isdigit() or int(text) >= 2**63:
            raise ConfigError(f"Last-Event-ID must be an event seq (a non-negative integer), got {text[:40]!r}",
                              reason="invalid_last_event_id")
        return int(text)
    return after_seq or 0


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1/runs", tags=["runs"])

    @router.post("", status_code=201, response_model=StartRunAnswer,
                 summary="Start a run (or answer the existing run of a known run_id)")
    async def start_run(body: StartRunBody, request: Request, response: Response, c: _CallerDep) -> StartRunAnswer:
        run_id = body.run_id or ulid()
        if body.run_id is not None:
            with contextlib.suppress(RunNotFound):
                info = await c.call(c.api.get_run, pb.GetRunRequest(run_id=run_id))
                response.status_code = 200
                return StartRunAnswer(created=False, run=run_dict(info))
        req = pb.StartRunRequest(
            run_id=run_id, provider=body.provider, prompt=body.prompt, cwd=body.cwd,
            permission_mode=body.permission_mode, options_json=json.dumps(body.options) if body.options else "",
            env=body.env, session_id=body.session_id, priority=body.priority, queue_timeout_ms=body.queue_timeout_ms,
            approval_timeout_ms=body.approval_timeout_ms, selector=body.selector)
        tasks: RunTasks = request.app.state.asm_run_tasks
        async with c.acting():  # the relay task copies this context: it runs as the caller
            task = tasks.start(c.api.start_run(req))
        # Until the run is admitted (in the controller's session, or recorded) or refused (the relay failed).
        deadline = time.monotonic() + ADMIT_WAIT_S
        while not task.done() and c.api.session.get_run(run_id) is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            raise exc
        # Its record may trail its admission by a write: asked again until it is there.
        while True:
            try:
                info = await c.call(c.api.get_run, pb.GetRunRequest(run_id=run_id))
                return StartRunAnswer(created=True, run=run_dict(info))
            except RunNotFound:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.02)

    @router.get("", response_model=RunList, summary="List runs (newest first, filtered, paged)")
    async def list_runs(c: _CallerDep, status: str = "", provider: str = "", node: str = "", session_id: str = "",
                        active_only: bool = False, since_unix_nano: Annotated[int, Query(ge=0)] = 0,
                        until_unix_nano: Annotated[int, Query(ge=0)] = 0,
                        limit: Annotated[int, Query(ge=0, le=10_000)] = 0, page_token: str = "") -> RunList:
        resp = await c.call(c.api.list_runs, pb.ListRunsRequest(
            status=status, provider=provider, node=node, session_id=session_id, active_only=active_only,
            since_unix_nano=since_unix_nano, until_unix_nano=until_unix_nano, limit=limit, page_token=page_token))
        return RunList(runs=[run_dict(r) for r in resp.runs], next_page_token=resp.next_page_token)

    @router.get("/{run_id}", summary="A run: its record and, once ended, its Result")
    async def get_run(run_id: str, c: _CallerDep) -> dict[str, Any]:
        return run_dict(await c.call(c.api.get_run, pb.GetRunRequest(run_id=run_id)))

    @router.get("/{run_id}/events", summary="The run's events as Server-Sent Events (resumable)",
                response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "`id:` seq, `event:` kind, `data:` the event; ends after run_completed"},
                           204: {"description": "the run has ended and the cursor is at its end: nothing to send"}})
    async def run_events(run_id: str, request: Request, c: _CallerDep,
                         after_seq: Annotated[int | None, Query(ge=0, lt=2**63)] = None,
                         last_event_id: Annotated[str | None, Header()] = None) -> Response:
        cursor = _cursor(last_event_id, after_seq)
        # Refusals (not found, another principal's run) as the one error shape before the stream starts.
        info = await c.call(c.api.get_run, pb.GetRunRequest(run_id=run_id))
        if info.status in _TERMINAL and cursor >= info.last_seq:
            # Everything was seen (an EventSource reconnects after the end): 204 tells it to stop, where
            # AttachRun would renumber the end after the cursor and send it again.
            return Response(status_code=204)
        closing: asyncio.Event = request.app.state.asm_closing
        return StreamingResponse(_events(c, run_id, cursor, closing), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @router.post("/{run_id}/interrupt", response_model=Accepted, summary="Interrupt a run")
    async def interrupt(run_id: str, c: _CallerDep) -> Accepted:
        resp = await c.call(c.api.interrupt_run, pb.InterruptRunRequest(run_id=run_id))
        return Accepted(accepted=resp.accepted)

    @router.post("/{run_id}/approvals/{approval_id}", response_model=Empty, summary="Allow or deny a pending approval")
    async def approve(run_id: str, approval_id: str, body: ApprovalBody, c: _CallerDep) -> Empty:
        await c.call(c.api.resolve_approval, pb.ResolveApprovalRequest(
            run_id=run_id, approval_id=approval_id, decision=body.decision, reason=body.reason))
        return Empty()

    @router.post("/{run_id}/input", summary="Write to the run's stdin")
    async def send_input(run_id: str, body: InputBody, c: _CallerDep) -> dict[str, Any]:
        resp = await c.call(c.api.send_input, pb.SendInputRequest(
            run_id=run_id, data=body.data.encode(), end_input=body.end_input))
        return message_dict(resp)

    return router


async def _events(c: Caller, run_id: str, cursor: int, closing: asyncio.Event) -> AsyncIterator[bytes]:
    """AttachRun from ``cursor``, each event once (a seq at or below the last one sent is skipped), a comment
    every KEEPALIVE_S while silent; ends after run_completed, on a failure (an ``event: stream_error`` frame: the
    client reconnects with Last-Event-ID) or when the server stops."""
    yield b"retry: 1000\n\n"
    async with c.acting():
        stream = aiter(c.api.attach_run(pb.AttachRunRequest(run_id=run_id, after_seq=cursor)))
        stop = asyncio.ensure_future(closing.wait())
        nxt: asyncio.Future[pb.EventBatch | None] | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(anext(stream, None))
                while not nxt.done():
                    await asyncio.wait({nxt, stop}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
                    if stop.done() and not nxt.done():
                        return
                    if not nxt.done():
                        yield b": keep-alive\n\n"
                try:
                    batch = nxt.result()
                except AsmError as err:
                    yield f"event: stream_error\ndata: {json.dumps(error_body(err))}\n\n".encode()
                    return
                if batch is None:
                    return
                # A batch's frames in one write (one per event cost 1.5x the client's CPU: see the benchmark).
                frames: list[bytes] = []
                ended = False
                for ev in batch.events:
                    if ev.seq <= cursor:
                        continue
                    cursor = ev.seq
                    frames.append(sse_frame(ev))
                    if ev.kind == pb.EVENT_KIND_RUN_COMPLETED:
                        ended = True
                        break
                if frames:
                    yield b"".join(frames)
                if ended:
                    return
        finally:
            # The client hung up (or the server stops): the pending read ends first, then the AttachRun
            # relay closes (a read left pending would hold it until the run's next event).
            stop.cancel()
            if nxt is not None and not nxt.done():
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
