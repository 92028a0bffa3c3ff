"""The inference router behind a real uvicorn on 127.0.0.1, driven by the real ``openai`` package.

A scripted ``run_fn`` for every route and refusal; one test runs the ``shell`` provider on an embedded
node agent through a Session, as the controller will.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2 as httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from asm_controller import EmbeddedNode, Event, Session
from asm_controller.inference import (
    CompletionCall,
    EndpointPublisher,
    consumer_manifest,
    fleet_run_fn,
    inference_router,
    session_run_fn,
)
from asm_node.testing import running_agent
from asm_wire import NodeAtCapacity, pb
from asm_wire._principal import Principal, acting_as


class Scripted:
    """A run_fn that answers from a script keyed by the prompt, and records its calls."""

    def __init__(self) -> None:
        self.calls: list[CompletionCall] = []
        self.closed: list[str] = []  # runs whose event stream was closed before its end

    def __call__(self, call: CompletionCall) -> AsyncIterator[list[Event]]:
        self.calls.append(call)
        return self._run(call)

    async def _run(self, call: CompletionCall) -> AsyncIterator[list[Event]]:
        ended = False
        try:
            async for batch in self._events(call):
                yield batch
            ended = True
        finally:
            if not ended:
                self.closed.append(call.run_id)

    async def _events(self, call: CompletionCall) -> AsyncIterator[list[Event]]:
        seq = 0

        def ev(kind: str, **payload: Any) -> Event:
            nonlocal seq
            seq += 1
            e = Event.synthetic(kind, run_id=call.run_id, session_id="s", provider=call.provider, seq=seq, **payload)
            del e.pb.metadata["origin"]  # as from a node
            return e

        if "capacity" in call.prompt:
            raise NodeAtCapacity("every node is at capacity")
        yield [ev("run_started")]
        for word in ("Hello", ", ", "world"):
            await asyncio.sleep(0.3 if "slow" in call.prompt else 0)
            yield [ev("assistant_delta", content=word)]
        if "fail" in call.prompt:
            yield [ev("error", code="timeout", message="the CLI took too long", severity=pb.SEVERITY_ERROR,
                      domain="transport", exit_code=-1), ev("run_completed", status="failed", exit_code=-1)]
            return
        yield [ev("assistant_message", content=[pb.ContentBlock(type="text", text="Hello, world")]),
               ev("cost_update", input_tokens=11, output_tokens=4, total_tokens=15, cost_usd=0.001),
               ev("result", status="completed", stop_reason="max_tokens" if "long" in call.prompt else "end_turn"),
               ev("run_completed", status="completed", exit_code=0)]


async def list_models() -> Sequence[str]:
    return ["claude", "claude:sonnet", "shell"]


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, Scripted, EndpointPublisher]]:
    fn = Scripted()
    app = FastAPI()
    publisher = EndpointPublisher("http://placeholder")
    app.include_router(inference_router(fn, list_models, publisher=publisher, keepalive_s=0.1))
    async with serving(app) as url:
        publisher.base_url_root = url
        yield url, fn, publisher


MESSAGES: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


async def test_sync_client_non_stream(scripted: tuple[str, Scripted, EndpointPublisher]) -> None:
    url, fn, _ = scripted

    def call() -> Any:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        return client.chat.completions.create(model="claude:sonnet", messages=MESSAGES, temperature=0.3)

    c = await asyncio.to_thread(call)
    assert c.object == "chat.completion" and c.model == "claude:sonnet" and c.id.startswith("chatcmpl-")
    assert c.choices[0].message.content == "Hello, world" and c.choices[0].message.role == "assistant"
    assert c.choices[0].finish_reason == "stop"
    assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (11, 4, 15)
    (run,) = fn.calls
    assert (run.provider, run.model, run.prompt, run.stream) == ("claude", "sonnet", "system: Be brief.\nuser: Say hello",
                                                                 False)
    assert c.id == f"chatcmpl-{run.run_id}"


async def test_sync_client_stream(scripted: tuple[str, Scripted, EndpointPublisher]) -> None:
    url, _, _ = scripted

    def call() -> list[Any]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        return list(client.chat.completions.create(model="claude", messages=MESSAGES, stream=True,
                                                   stream_options={"include_usage": True}))

    chunks = await asyncio.to_thread(call)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Hello, world"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


async def test_async_client_stream_and_non_stream(scripted: tuple[str, Scripted, EndpointPublisher]) -> None:
    url, fn, _ = scripted
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    c = await client.chat.completions.create(model="codex:gpt-5-codex", messages=[{"role": "user", "content": "long"}])
    assert c.choices[0].finish_reason == "length" and c.choices[0].message.content == "Hello, world"
    stream = await client.chat.completions.create(model="gemini", messages=[{"role": "user", "content": "x"}],
                                                  stream=True)
    texts = [ch.choices[0].delta.content async for ch in stream if ch.choices and ch.choices[0].delta.content]
    assert texts == ["Hello", ", ", "world"]
    assert [(c.provider, c.model) for c in fn.calls] == [("codex", "gpt-5-codex"), ("gemini", None)]
    models = await client.models.list()
    assert [m.id for m in models.data] == ["claude", "claude:sonnet", "shell"]
    await client.close()


async def test_refusals_reach_the_client_as_openai_errors(scripted: tuple[str, Scripted, EndpointPublisher]) -> None:
    url, fn, _ = scripted
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="claude", messages=MESSAGES,
                                             tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.message.endswith("tool-bearing requests are not supported on cli completion endpoints")
    assert e.value.param == "tools" and e.value.code == "invalid_request" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as nf:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert nf.value.code == "unsupported_provider"
    with pytest.raises(openai.BadRequestError, match="Unsupported input shape"):
        await client.chat.completions.create(model="claude", messages=[])
    with pytest.raises(openai.RateLimitError) as rl:  # refused at admission: an HTTP error even when streaming
        await client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "capacity"}],
                                             stream=True)
    assert rl.value.response.headers["x-should-retry"] == "true"
    with pytest.raises(openai.InternalServerError) as ie:
        await client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "fail"}])
    assert ie.value.status_code == 504 and ie.value.message.endswith("the CLI took too long")
    assert ie.value.response.headers["x-should-retry"] == "false"
    assert len(fn.calls) == 2  # the refusals before a run started none
    retrying = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2)
    with pytest.raises(openai.InternalServerError):  # the client's own retries would run the CLI again: told not to
        await retrying.chat.completions.create(model="claude", messages=[{"role": "user", "content": "fail"}])
    assert len(fn.calls) == 3
    await retrying.close()
    # a failure once the stream is under way: the text so far, then the error raised by the client
    stream = await client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "fail"}],
                                                  stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="the CLI took too long"):
        async for ch in stream:
            seen.append(ch.choices[0].delta.content or "" if ch.choices else "")
    assert "".join(seen) == "Hello, world"
    await client.close()


async def test_malformed_bodies_get_asms_messages_in_openais_shape(
        scripted: tuple[str, Scripted, EndpointPublisher]) -> None:
    url, _, _ = scripted
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/v1/chat/completions", content=b"[1, 2]")
        assert r.status_code == 400 and r.json() == {"error": {
            "message": "request body must be a JSON object", "type": "invalid_request_error", "code": "invalid_request",
            "param": None}}
        r = await http.post("/v1/chat/completions", content=b"{nope")
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("request body is not JSON")
        r = await http.post("/v1/chat/completions", json={"model": "claude", "messages": "hi"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        # stream: "true" as a string is ASM's too; the raw frames end with [DONE]
        r = await http.post("/v1/chat/completions", json={"model": "claude", "stream": "true",
                                                          "messages": [{"role": "user", "content": "x"}]})
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = r.text.split("\n\n")
        assert frames[-2:] == ["data: [DONE]", ""] and all(f.startswith("data: ") for f in frames[:-1])
        assert json.loads(frames[-3][len("data: "):])["choices"][0]["finish_reason"] == "stop"


async def test_a_lease_serves_its_pinned_model_with_its_own_token(
        scripted: tuple[str, Scripted, EndpointPublisher]) -> None:
    url, fn, publisher = scripted
    with acting_as(Principal("alice")):
        desc, _ = await publisher.ensure_endpoint(
            {"model_preference": {"provider": "gemini", "id": "gemini-2.5-pro"}}, consumer_manifest())
    assert desc.base_url == f"{url}/leases/{desc.lease_ref}/v1"
    token = desc.headers["authorization"].removeprefix("Bearer ")
    client = openai.AsyncOpenAI(base_url=desc.base_url, api_key=token, max_retries=0)
    c = await client.chat.completions.create(model="gemini-2.5-pro", messages=MESSAGES)
    assert c.choices[0].message.content == "Hello, world"
    stream = await client.chat.completions.create(model="gemini:gemini-2.5-pro", messages=MESSAGES, stream=True)
    assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices]) == "Hello, world"
    assert [(c.provider, c.model, c.principal.name, c.lease_ref) for c in fn.calls] == [
        ("gemini", "gemini-2.5-pro", "alice", desc.lease_ref)] * 2
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="gemini-2.5-flash", messages=MESSAGES)
    assert e.value.message.endswith('endpoint is pinned to model gemini-2.5-pro, got "gemini-2.5-flash"')
    assert [m.id for m in (await client.models.list()).data] == ["gemini-2.5-pro"]
    async with httpx.AsyncClient(base_url=url) as http:
        health = f"/leases/{desc.lease_ref}/health"
        r = await http.get(health, headers=desc.headers)
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["provider"] == "gemini"
        r = await http.get(health, headers={"authorization": f"Bearer {token}x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.json()["error"]["type"] == "authentication_error"
        r = await http.get(health, headers={"authorization": token})  # exactly "Bearer <token>"
        assert r.status_code == 401
        r = await http.get("/leases/lease_nope/health")  # an unknown lease is 404 before any token check
        assert r.status_code == 404 and r.json()["error"] == {
            "message": "unknown lease", "type": "invalid_request_error", "code": "not_found", "param": None}
        await publisher.release_endpoint(desc)
        r = await http.get(health, headers=desc.headers)
        assert r.status_code == 404
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="gemini-2.5-pro", messages=MESSAGES)
    await client.close()


async def test_the_shell_provider_on_a_real_embedded_node() -> None:
    async with running_agent() as agent, Session("shell", node=EmbeddedNode(agent)) as session:
        run_fn = session_run_fn(session)

        async def models() -> Sequence[str]:
            return ["shell"]

        app = FastAPI()
        app.include_router(inference_router(run_fn, models))
        async with serving(app) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            c = await client.chat.completions.create(model="shell", messages=[{"role": "user", "content": "echo hello"}])
            assert c.choices[0].message.content == "hello\n" and c.choices[0].finish_reason == "stop"
            assert c.usage is not None and c.usage.total_tokens == 0  # shell spends no tokens
            run = session.get_run(c.id.removeprefix("chatcmpl-"))
            assert run is not None and run.result().ok and run.owner == "anonymous"
            stream = await client.chat.completions.create(
                model="shell", messages=[{"role": "user", "content": "echo a-b"}], stream=True)
            chunks = [ch async for ch in stream]
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "a-b\n"
            assert chunks[-1].choices[0].finish_reason == "stop"

            def sync_call() -> str | None:
                sync = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                return sync.chat.completions.create(model="shell", messages=[{"role": "user", "content": "echo sync"}]
                                                    ).choices[0].message.content

            assert await asyncio.to_thread(sync_call) == "sync\n"
            with pytest.raises(openai.APIStatusError) as e:  # the node refuses the command: a failed run
                await client.chat.completions.create(model="shell", messages=[{"role": "user", "content": "rm -rf x"}])
            assert e.value.status_code == 403 and e.value.response.headers["x-should-retry"] == "false"
            assert e.value.message.endswith("command 'rm' is denied")
            with pytest.raises(openai.PermissionDeniedError):  # refused at once: an HTTP error, not a stream
                await client.chat.completions.create(model="shell", stream=True,
                                                     messages=[{"role": "user", "content": "rm -rf x"}])
            await client.close()


def test_the_openapi_document_lists_the_routes_and_the_request_body() -> None:
    app = FastAPI()
    app.include_router(inference_router(Scripted(), list_models, publisher=EndpointPublisher("http://h")))
    doc = app.openapi()
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/models", "/leases/{lease_ref}/health",
                                 "/leases/{lease_ref}/v1/chat/completions", "/leases/{lease_ref}/v1/models"}
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages", "stream", "tools"} <= set(body["properties"])
    assert "#/$defs/" not in json.dumps(doc)  # every reference resolves inside the document
    bare = FastAPI()
    bare.include_router(inference_router(Scripted(), list_models))  # no publisher: no lease routes
    assert set(bare.openapi()["paths"]) == {"/v1/chat/completions", "/v1/models"}


@pytest.mark.slow
async def test_a_quiet_stream_gets_keepalives_and_a_client_that_leaves_stops_reading_the_run(
        scripted: tuple[str, Scripted, EndpointPublisher]) -> None:
    url, fn, _ = scripted
    slow = {"model": "claude", "stream": True, "messages": [{"role": "user", "content": "slow"}]}
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/v1/chat/completions", json=slow)
    assert ": keep-alive\n\n" in r.text and r.text.endswith("data: [DONE]\n\n")
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(model="claude", messages=slow["messages"], stream=True)
    texts = [ch.choices[0].delta.content async for ch in stream if ch.choices and ch.choices[0].delta.content]
    assert texts == ["Hello", ", ", "world"]  # the comments are invisible to the client
    assert fn.closed == []
    stream = await client.chat.completions.create(model="claude", messages=slow["messages"], stream=True)
    async for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            break
    await stream.close()
    for _ in range(100):
        if fn.closed:
            break
        await asyncio.sleep(0.05)
    assert fn.closed == [fn.calls[-1].run_id]
    await client.close()


async def test_fleet_run_fn_starts_a_fleet_run_as_the_caller() -> None:
    from asm_wire._principal import current_principal

    seen: list[tuple[pb.StartRunRequest, str]] = []

    class Fleet:
        async def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
            seen.append((request, current_principal().name))
            ev = Event.synthetic("run_started", run_id=request.run_id, session_id="", provider=request.provider, seq=1)
            yield pb.EventBatch(events=[ev.pb])

    run_fn = fleet_run_fn(Fleet(), cwd="/work", permission_mode="bypass", options={"model": "x", "max_turns": 3})
    call = CompletionCall("claude", "sonnet", "user: hi", Principal("bob"), "run-1", stream=False)
    batches = [b async for b in run_fn(call)]
    assert [[e.kind for e in b] for b in batches] == [["run_started"]]
    ((request, who),) = seen
    assert who == "bob" and (request.run_id, request.provider, request.prompt, request.cwd) == (
        "run-1", "claude", "user: hi", "/work")
    assert request.permission_mode == "bypass" and json.loads(request.options_json) == {"model": "sonnet", "max_turns": 3}
    seen.clear()
    [_ async for _ in run_fn(CompletionCall("claude", None, "p", Principal("bob"), "run-2", stream=True))]
    assert json.loads(seen[0][0].options_json) == {"model": "x", "max_turns": 3}  # no model in the id: the default


async def test_a_completion_runs_over_the_fleet_of_a_real_controller(tmp_path: Any) -> None:
    """fleet_run_fn on a controller's FleetApi, a node agent behind real gRPC: routed, recorded, owned."""
    from asm_controller.service import ControllerConfig, start_controller
    from asm_node.testing import running_server

    async with running_server() as node:
        ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{node.port}"],
                                                      state=f"sqlite:///{tmp_path / 'ctl.sqlite3'}"))
        try:
            app = FastAPI()
            app.include_router(inference_router(fleet_run_fn(ctl.api), list_models))
            async with serving(app) as url:
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                c = await client.chat.completions.create(model="shell",
                                                         messages=[{"role": "user", "content": "echo fleet"}])
                assert c.choices[0].message.content == "fleet\n" and c.choices[0].finish_reason == "stop"
                stream = await client.chat.completions.create(
                    model="shell", messages=[{"role": "user", "content": "echo streamed"}], stream=True)
                assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices]) == "streamed\n"
                await client.close()
            await ctl.api.registry.flush()
            rec = await ctl.api.store.get(c.id.removeprefix("chatcmpl-"))
            assert rec is not None and rec.status == "completed" and rec.provider == "shell"
            assert rec.owner == "anonymous"
        finally:
            await ctl.stop()
