"""The inference endpoint's routes, as a FastAPI router the controller's HTTP app mounts.

``POST /v1/chat/completions`` and ``GET /v1/models`` serve the fleet (the app authenticates the caller
and says who it is with ``principal_fn``); with a publisher, ``/leases/<ref>/v1/chat/completions``,
``/leases/<ref>/v1/models`` and ``/leases/<ref>/health`` serve each lease with its own token -- the
app must leave ``/leases/`` to these routes' own check. The run itself is ``run_fn``'s (the
controller routes it over the fleet like any run).

Checks in ASM's order: (on a lease) the lease, then its token (404 before 401); the body is a JSON
object; the model (the lease's pinned one, or a provider the fleet has); streaming published; no
tools; then what asm cannot honour; then the prompt. Errors are OpenAI's body shape (see _errors).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from asm_controller._events import Event
from asm_controller.inference._completion import CompletionBuilder, complete, sse_frames
from asm_controller.inference._errors import InferenceError, bad_request, from_asm_error
from asm_controller.inference._leases import EndpointPublisher, Lease
from asm_controller.inference._modelid import PROVIDERS, ModelRef, parse_model
from asm_controller.inference._openai import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList
from asm_controller.inference._prompt import build_prompt, check_request
from asm_wire import AsmError, ulid
from asm_wire._principal import Principal, current_principal

#: The largest request body read (bytes); the app may bound it lower. Four times the prompt bound: JSON escapes.
MAX_BODY_BYTES = 4 * 262_144


@dataclass(frozen=True)
class CompletionCall:
    """One chat completion to run: what ``run_fn`` gets."""

    provider: str
    model: str | None
    prompt: str
    principal: Principal
    run_id: str
    stream: bool
    lease_ref: str | None = None


RunFn = Callable[[CompletionCall], AsyncIterator[list[Event]]]
ListModelsFn = Callable[[], Awaitable[Sequence[str]]]
PrincipalFn = Callable[[Request], Principal]


def _inlined_schema(model: type[ChatCompletionRequest]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined: the body is read by hand (for ASM's error
    messages), so FastAPI cannot put it in the OpenAPI document's components itself."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    out: dict[str, Any] = inline(schema)
    return out


_REQUEST_BODY: Any = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inlined_schema(ChatCompletionRequest)}}}}


def _default_principal(request: Request) -> Principal:
    p = getattr(request.state, "principal", None)
    return p if isinstance(p, Principal) else current_principal()


def _error(err: InferenceError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers())


async def _parse(request: Request) -> ChatCompletionRequest:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InferenceError(413, f"request body is {len(raw)} bytes (at most {MAX_BODY_BYTES})")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise bad_request(f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"invalid {param or 'request'}: {first['msg']}", param=param) from None


def _stream_response(batches: AsyncIterator[list[Event]], builder: CompletionBuilder, include_usage: bool,
                     first: list[Event] | None, keepalive_s: float | None) -> StreamingResponse:
    async def chained() -> AsyncIterator[list[Event]]:
        if first is not None:
            yield first
        async for batch in batches:
            yield batch

    return StreamingResponse(sse_frames(chained(), builder, include_usage=include_usage, keepalive_s=keepalive_s),
                             media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _close(batches: AsyncIterator[list[Event]]) -> None:
    aclose = getattr(batches, "aclose", None)
    if aclose is not None:
        await aclose()


async def _answer(run_fn: RunFn, call: CompletionCall, model_id: str, req: ChatCompletionRequest,
                  keepalive_s: float | None) -> Response:
    builder = CompletionBuilder(f"chatcmpl-{call.run_id}", model_id)
    batches = run_fn(call).__aiter__()
    try:
        if not call.stream:
            response: ChatCompletion = await complete(batches, builder)
            return JSONResponse(response.model_dump(exclude_none=True))
        # The first batch before the headers: a run refused at admission is an HTTP error, not a stream.
        try:
            first: list[Event] | None = await batches.__anext__()
        except StopAsyncIteration:
            first = None
        if first is not None:
            # A run that ended in its first batch with an error (refused by the fleet, a bad option) is
            # answered with its HTTP status too; a probe keeps the real builder's text for the stream.
            probe = CompletionBuilder(builder.id, model_id)
            probe.feed(first)
            result = probe.result()
            if probe.finished and result is not None and result.error is not None:
                await _close(batches)
                return _error(from_asm_error(result.error, ran=probe.ran))
    except AsmError as e:
        return _error(from_asm_error(e, ran=builder.result() is not None))
    except InferenceError as e:
        return _error(e)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _stream_response(batches, builder, include_usage, first, keepalive_s)


def inference_router(run_fn: RunFn, list_models_fn: ListModelsFn, *, publisher: EndpointPublisher | None = None,
                     principal_fn: PrincipalFn = _default_principal,
                     providers: Collection[str] = PROVIDERS, keepalive_s: float | None = 15.0) -> APIRouter:
    """The routes of the inference endpoint (module docstring); ``providers``: the model ids' providers;
    ``keepalive_s``: how often a quiet stream gets an SSE comment (None: never)."""
    router = APIRouter(tags=["inference"])
    # The registry's live view stays live (a provider registered later is served); a caller's list is copied.
    known = providers if providers is PROVIDERS else tuple(providers)

    @router.post("/v1/chat/completions", response_model=ChatCompletion, openapi_extra=_REQUEST_BODY,
                 summary="OpenAI-compatible chat completion over the fleet (stream: true for SSE chunks)")
    async def chat_completions(request: Request) -> Response:
        try:
            req = await _parse(request)
            ref: ModelRef = parse_model(req.model, providers=known)
            check_request(req)
            prompt = build_prompt(req, ref.provider)
        except InferenceError as e:
            return _error(e)
        call = CompletionCall(ref.provider, ref.model, prompt, principal_fn(request), ulid(), req.streaming)
        return await _answer(run_fn, call, ref.id, req, keepalive_s)

    @router.get("/v1/models", response_model=ModelList, summary="The model ids the fleet serves")
    async def models(request: Request) -> ModelList:
        principal_fn(request)  # the same token as every /v1 call (it refuses a missing or wrong one)
        return ModelList(data=[ModelCard(id=m) for m in await list_models_fn()])

    if publisher is None:
        return router

    async def lease_of(request: Request, lease_ref: str) -> Lease:
        lease = await publisher.lookup(lease_ref)
        if lease is None:
            raise InferenceError(404, "unknown lease")  # before the token check, as in ASM
        if not lease.authorized(request.headers.get("authorization")):
            raise InferenceError(401, "unauthorized")
        return lease

    @router.get("/leases/{lease_ref}/health", summary="A lease's health (its own token)")
    async def lease_health(request: Request, lease_ref: str) -> Response:
        try:
            lease = await lease_of(request, lease_ref)
        except InferenceError as e:
            return _error(e)
        return JSONResponse({"status": "ok", "endpoint_id": lease.endpoint_id, "lease_ref": lease.lease_ref,
                             "provider": lease.provider, "expires_at": lease.expires_at})

    @router.get("/leases/{lease_ref}/v1/models", response_model=ModelList, summary="A lease's one model")
    async def lease_models(request: Request, lease_ref: str) -> Response:
        try:
            lease = await lease_of(request, lease_ref)
        except InferenceError as e:
            return _error(e)
        return JSONResponse(ModelList(data=[ModelCard(id=lease.model)]).model_dump())

    @router.post("/leases/{lease_ref}/v1/chat/completions", response_model=ChatCompletion,
                 openapi_extra=_REQUEST_BODY, summary="A chat completion on a lease's pinned provider and model")
    async def lease_chat_completions(request: Request, lease_ref: str) -> Response:
        try:
            lease = await lease_of(request, lease_ref)
            req = await _parse(request)
            if req.model is not None and not lease.accepts_model(req.model):
                raise bad_request(f"endpoint is pinned to model {lease.model}, got {json.dumps(req.model)}",
                                  param="model")
            if req.streaming and not lease.streaming:
                raise bad_request("streaming is not published for this endpoint", param="stream")
            check_request(req)
            prompt = build_prompt(req, lease.provider)
        except InferenceError as e:
            return _error(e)
        call = CompletionCall(lease.provider, lease.model, prompt, lease.owner(), ulid(), req.streaming,
                              lease_ref=lease.lease_ref)
        return await _answer(run_fn, call, req.model or lease.model, req, keepalive_s)

    return router
