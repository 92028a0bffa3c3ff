"""The inference endpoint's mappings and refusals (ASM section 7), without HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest

from asm_controller import Event
from asm_controller._reducer import Cost, Result
from asm_controller.inference import (
    MAX_MESSAGES,
    MAX_PROMPT_BYTES,
    SSE_DONE,
    TOOLS_REFUSED,
    BackendManifest,
    ChatCompletionRequest,
    CompletionBuilder,
    ConsumerManifest,
    EndpointError,
    EndpointPublisher,
    EndpointRequest,
    InferenceError,
    MemoryLeaseStore,
    backend_manifest,
    build_prompt,
    catalog_ids,
    check_request,
    consumer_manifest,
    finish_reason,
    from_asm_error,
    parse_model,
    publication,
    resolve_compatibility,
    usage,
)
from asm_wire import NodeAtCapacity, NodeNotReady, RunError, pb
from asm_wire._principal import Principal, acting_as

# -- scripted events ---------------------------------------------------------------------------


class Script:
    """Events of one run, numbered as a node would."""

    def __init__(self, run_id: str = "r1", provider: str = "claude", *, from_node: bool = True) -> None:
        self.run_id, self.provider, self.seq, self.from_node = run_id, provider, 0, from_node

    def ev(self, kind: str, **payload: Any) -> Event:
        self.seq += 1
        e = Event.synthetic(kind, run_id=self.run_id, session_id="s1", provider=self.provider, seq=self.seq, **payload)
        if self.from_node:
            del e.pb.metadata["origin"]  # a node's event, not the controller's own
        return e

    def started(self) -> Event:
        return self.ev("run_started")

    def delta(self, text: str) -> Event:
        return self.ev("assistant_delta", content=text)

    def message(self, text: str) -> Event:
        return self.ev("assistant_message", content=[pb.ContentBlock(type="text", text=text)])

    def cost(self, i: int, o: int) -> Event:
        return self.ev("cost_update", input_tokens=i, output_tokens=o, total_tokens=i + o, cost_usd=0.01)

    def result(self, stop: str = "end_turn") -> Event:
        return self.ev("result", status="completed", stop_reason=stop)

    def error(self, code: str, message: str = "boom") -> Event:
        return self.ev("error", code=code, message=message, severity=pb.SEVERITY_ERROR, domain="runtime", exit_code=-1)

    def completed(self, status: str = "completed") -> Event:
        return self.ev("run_completed", status=status, exit_code=0 if status == "completed" else -1)


def ok_run(script: Script | None = None) -> list[Event]:
    s = script or Script()
    return [s.started(), s.delta("Hel"), s.delta("lo"), s.message("Hello"), s.cost(12, 3), s.result(), s.completed()]


# -- model ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_id", "provider", "model"), [
    ("claude", "claude", None), ("claude:sonnet", "claude", "sonnet"), ("codex:gpt-5-codex", "codex", "gpt-5-codex"),
    ("gemini:gemini-2.5-flash", "gemini", "gemini-2.5-flash"), ("codex_exec:gpt-5", "codex", "gpt-5"),
    ("Claude", "claude", None), ("shell", "shell", None), ("claude: opus ", "claude", "opus"),
])
def test_a_model_id_names_a_provider_and_optionally_its_model(model_id: str, provider: str, model: str | None) -> None:
    ref = parse_model(model_id)
    assert (ref.provider, ref.model) == (provider, model)
    assert ref.id == (f"{provider}:{model}" if model else provider)


def test_model_ids_asm_refuses_and_why() -> None:
    with pytest.raises(InferenceError) as e:
        parse_model("gpt-4o")
    assert e.value.status == 404 and e.value.code == "unsupported_provider" and e.value.param == "model"
    assert "'gpt-4o'" in e.value.message and "claude" in e.value.message
    with pytest.raises(InferenceError) as e:
        parse_model("claude:")
    assert e.value.status == 400 and e.value.code == "missing_model_identity"
    with pytest.raises(InferenceError) as e:
        parse_model("claude", require_model=True)
    assert e.value.code == "missing_model_identity"
    for missing in (None, "", "  "):
        with pytest.raises(InferenceError) as e:
            parse_model(missing)
        assert e.value.status == 400 and e.value.param == "model"
    with pytest.raises(InferenceError) as e:
        parse_model("claude", providers=("shell",))  # a provider the fleet does not have
    assert e.value.code == "unsupported_provider"


def test_the_models_list_is_each_provider_then_its_catalog() -> None:
    assert catalog_ids(["claude", "shell"]) == ["claude", "claude:opus", "claude:sonnet", "claude:haiku", "shell"]


# -- prompt ------------------------------------------------------------------------------------


def req(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "claude", **body})


def test_messages_become_asms_role_prefixed_transcript() -> None:
    r = req(messages=[{"role": "system", "content": "Be brief."}, {"role": "USER", "content": "Hi"},
                      {"role": "assistant", "content": "  "}, {"content": "no role"},
                      {"role": "assistant", "content": None}, {"role": "user", "content": "line1\nline2"}])
    assert build_prompt(r) == "system: Be brief.\nuser: Hi\nuser: no role\nuser: line1\nline2"


def test_prompt_wins_over_messages_unless_blank() -> None:
    assert build_prompt(req(prompt="do it", messages=[{"role": "user", "content": "x"}])) == "do it"
    assert build_prompt(req(prompt="  ", messages=[{"role": "user", "content": "x"}])) == "user: x"


def test_text_parts_are_joined_and_other_parts_refused() -> None:
    r = req(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert build_prompt(r) == "user: a\nb"
    r = req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(InferenceError) as e:
        build_prompt(r)
    assert e.value.status == 400 and e.value.param == "messages[0].content[0]" and "image_url" in e.value.message


def test_no_input_is_asms_unsupported_input_shape() -> None:
    for body in ({}, {"messages": []}, {"messages": [{"role": "user", "content": " "}]}):
        with pytest.raises(InferenceError) as e:
            build_prompt(req(**body))
        assert e.value.status == 400 and e.value.code == "invalid_request"
        assert e.value.message == ("Unsupported input shape. Expected non-empty prompt string or map with "
                                   "`prompt`/`messages`.")


def test_asms_bounds_on_messages_roles_and_prompt_bytes() -> None:
    many = [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)
    with pytest.raises(InferenceError, match="too many messages: 129"):
        build_prompt(req(messages=many))
    assert build_prompt(req(messages=many[:MAX_MESSAGES])).count("user: x") == MAX_MESSAGES
    with pytest.raises(InferenceError, match="unsupported role 'function'") as e:
        build_prompt(req(messages=[{"role": "function", "content": "x"}]))
    assert e.value.param == "messages[0].role"
    with pytest.raises(InferenceError, match=f"at most {MAX_PROMPT_BYTES}"):
        build_prompt(req(prompt="é" * (MAX_PROMPT_BYTES // 2 + 1)))
    assert len(build_prompt(req(prompt="x" * MAX_PROMPT_BYTES))) == MAX_PROMPT_BYTES


def test_shell_gets_its_one_command_line_as_is() -> None:
    assert build_prompt(req(messages=[{"role": "user", "content": "echo hi"}]), "shell") == "echo hi"
    with pytest.raises(InferenceError, match="one command line"):
        build_prompt(req(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "echo"}]), "shell")


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_tool_bearing_requests_are_refused_with_asms_message(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InferenceError) as e:
        check_request(req(**body))
    assert e.value.status == 400 and e.value.message == TOOLS_REFUSED and e.value.param == param


def test_what_asm_ignores_is_accepted_and_what_cannot_be_honoured_is_refused() -> None:
    check_request(req(tools=[], tool_choice="none", functions=[], function_call="none", temperature=0.2,
                      max_tokens=10, top_p=1, stop=["x"], seed=1, user="u", n=1, response_format={"type": "text"},
                      some_future_field=True))
    for body, param in (({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                        ({"response_format": {"type": "json_object"}}, "response_format")):
        with pytest.raises(InferenceError) as e:
            check_request(req(**body))
        assert e.value.status == 400 and e.value.param == param


# -- finish_reason and usage -------------------------------------------------------------------


def result(stop: str | None = None, error: RunError | None = None) -> Result:
    return Result(run_id="r", session_id="s", provider="claude", status="failed" if error else "completed",
                  stop_reason=stop, error=error)


@pytest.mark.parametrize(("stop", "expected"), [
    (None, "stop"), ("end_turn", "stop"), ("stop", "stop"), ("length", "length"), ("max_tokens", "length"),
    ("MAX_TOKENS", "length"), ("tool_calls", "tool_calls"), ("user_cancelled", "cancelled"), ("refusal", "refusal"),
])
def test_finish_reason_from_the_stop_reason(stop: str | None, expected: str) -> None:
    assert finish_reason(result(stop)) == expected


def test_finish_reason_of_a_failed_or_cancelled_run_is_its_kind() -> None:
    assert finish_reason(result(error=RunError("x", kind="user_cancelled"))) == "cancelled"
    assert finish_reason(result(error=RunError("x", kind="node_draining"))) == "cancelled"
    assert finish_reason(result(error=RunError("x", kind="timeout"))) == "timeout"


def test_usage_is_the_runs_cost_in_tokens() -> None:
    u = usage(Cost(input_tokens=7, output_tokens=5, cost_usd=0.1))
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (7, 5, 12)


# -- events -> response and chunks -------------------------------------------------------------


def test_a_run_becomes_a_chat_completion_with_usage() -> None:
    b = CompletionBuilder("chatcmpl-r1", "claude:sonnet", created=5)
    texts = b.feed(ok_run())
    assert texts == ["Hel", "lo"]  # the full message adds nothing: never doubled
    body = b.response().model_dump()
    assert body == {
        "id": "chatcmpl-r1", "object": "chat.completion", "created": 5, "model": "claude:sonnet",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello", "refusal": None},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}, "system_fingerprint": None,
    }


def test_a_message_that_is_not_the_streamed_text_is_sent_whole() -> None:
    s = Script()
    b = CompletionBuilder("c", "claude")
    assert b.feed([s.started(), s.delta("thinking aloud"), s.message("Answer"), s.message("More")]) == [
        "thinking aloud", "\n\nAnswer", "\n\nMore"]  # separate messages: paragraphs (issue 14)
    assert b.feed([s.delta("Ans"), s.message("Answer!")]) == ["\n\nAns", "wer!"]
    b.feed([s.result(), s.completed()])
    content = b.response().choices[0].message.content
    assert content == "thinking aloud\n\nAnswer\n\nMore\n\nAnswer!"
    assert content == "".join(["thinking aloud", "\n\nAnswer", "\n\nMore", "\n\nAns", "wer!"])  # = the chunks


def test_replayed_events_send_nothing_twice() -> None:
    events = ok_run()
    b = CompletionBuilder("c", "claude")
    assert b.feed(events[:3]) == ["Hel", "lo"]
    assert b.feed(events) == []  # a re-attach replays from an older cursor


def test_a_failed_run_is_an_error_response_not_retried() -> None:
    s = Script()
    b = CompletionBuilder("c", "claude")
    b.feed([s.started(), s.delta("part"), s.error("timeout", "the CLI took too long"), s.completed("failed")])
    with pytest.raises(InferenceError) as e:
        b.response()
    assert e.value.status == 504 and e.value.message == "the CLI took too long" and e.value.retry is False
    assert e.value.headers() == {"x-should-retry": "false"}


def test_a_run_the_fleet_refused_before_any_node_is_retryable() -> None:
    s = Script(from_node=False)
    b = CompletionBuilder("c", "claude")
    b.feed([s.error("at_capacity", "every node is busy"), s.completed("failed")])
    assert not b.ran
    with pytest.raises(InferenceError) as e:
        b.response()
    assert (e.value.status, e.value.retry, e.value.type) == (429, True, "rate_limit_error")


def test_a_run_cut_short_is_a_502() -> None:
    s = Script()
    b = CompletionBuilder("c", "claude")
    b.feed([s.started(), s.delta("part")])
    with pytest.raises(InferenceError) as e:
        b.response()
    assert e.value.status == 502 and e.value.code == "run_incomplete"


def frames_json(frames: list[str]) -> list[Any]:
    out: list[Any] = []
    for f in frames:
        assert f.startswith("data: ") and f.endswith("\n\n")
        data = f[len("data: "):-2]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_the_stream_frames_role_deltas_finish_usage_done() -> None:
    b = CompletionBuilder("chatcmpl-r1", "claude", created=5)
    frames = [b.first_chunk().sse()]
    frames += [b.chunk_for(t).sse() for t in b.feed(ok_run())]
    frames += b.closing_frames(include_usage=True)
    first, d1, d2, last, use, done = frames_json(frames)
    assert first["object"] == "chat.completion.chunk" and first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert [d1["choices"][0]["delta"], d2["choices"][0]["delta"]] == [{"content": "Hel"}, {"content": "lo"}]
    assert d1["choices"][0]["finish_reason"] is None
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert use["choices"] == [] and use["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert done == "[DONE]" and frames[-1] == SSE_DONE
    assert {f["id"] for f in (first, d1, last, use)} == {"chatcmpl-r1"}


def test_a_failed_streamed_run_ends_with_its_finish_reason_then_an_error_frame() -> None:
    s = Script()
    b = CompletionBuilder("c", "claude")
    b.feed([s.started(), s.delta("part"), s.error("user_cancelled", "interrupted"), s.completed("interrupted")])
    last, err, done = frames_json(b.closing_frames())
    assert last["choices"][0]["finish_reason"] == "cancelled"
    assert err["error"]["message"] == "interrupted" and done == "[DONE]"


def test_asm_errors_before_a_run_map_to_retryable_statuses() -> None:
    e = from_asm_error(NodeAtCapacity("all slots busy"), ran=False)
    assert (e.status, e.type, e.retry) == (429, "rate_limit_error", True)
    e = from_asm_error(NodeNotReady("draining"), ran=False)
    assert (e.status, e.type, e.retry, e.code) == (503, "server_error", True, "not_ready")
    assert e.body().model_dump() == {"error": {"message": "draining", "type": "server_error", "code": "not_ready",
                                               "param": None}}


# -- contracts ---------------------------------------------------------------------------------


def test_asms_consumer_manifest() -> None:
    m = consumer_manifest()
    assert m.contract_version == "inference.v1" and m.consumer == "asm_openai_endpoint"
    assert m.optional_capabilities == {"streaming": True} and m.constraints == {"target_class": "cli_endpoint"}
    d = ConsumerManifest()
    assert (d.accepted_runtime_kinds, d.accepted_management_modes, d.accepted_protocols) == (
        ["task"], ["jido_managed"], ["openai_chat_completions"])
    # ASM's spelling of capability keys is read too
    assert ConsumerManifest.model_validate({"required_capabilities": {"streaming?": True}}).required_capabilities == {
        "streaming": True}


def test_publication_all_publish_completion_and_streaming_only_claude_and_codex_agent_v2() -> None:
    for p in ("claude", "codex", "gemini", "amp"):
        pub = publication(p)
        assert pub["cli_completion_v1"] and pub["cli_streaming_v1"]
        assert pub["cli_agent_v2"] is (p in ("claude", "codex"))
        assert pub["common_surface_only"] is (p in ("gemini", "amp"))
    assert publication("gemini")["derivation"] == ["prompt_driven_cli_profile", "streaming_profile_capability",
                                                   "common_surface_only_provider"]
    bm = backend_manifest("claude", publication("claude"))
    assert bm.capabilities.streaming is True and bm.capabilities.tool_calling is False
    assert bm.capabilities.embeddings == "unknown" and bm.resource_profile == {"profile": "cli_session"}


def test_backend_capabilities_must_be_bool_or_unknown() -> None:
    with pytest.raises(ValueError):
        BackendManifest.model_validate({"capabilities": {"streaming?": "maybe"}})


def ereq(**kw: Any) -> EndpointRequest:
    return EndpointRequest.model_validate({"model_preference": {"provider": "claude", "id": "sonnet"}, **kw})


def test_compatibility_checks_in_asms_order() -> None:
    backend = backend_manifest("claude", publication("claude"))
    nostream = backend.model_copy(update={"capabilities": backend.capabilities.model_copy(update={"streaming": False})})

    def check(request: EndpointRequest, consumer: ConsumerManifest, b: BackendManifest = backend) -> tuple[str, list[str]]:
        r = resolve_compatibility(request, consumer, b)
        return r.reason, r.missing_requirements

    # Everything wrong at once: the first check (runtime kind) wins, then each in turn.
    bad = ConsumerManifest(accepted_runtime_kinds=["service"], accepted_management_modes=["x"], accepted_protocols=["y"])
    tools = ereq(tools=[{"name": "f"}], stream=True)
    assert check(tools, bad, nostream) == ("runtime_kind_mismatch", ["runtime_kind"])
    bad = bad.model_copy(update={"accepted_runtime_kinds": ["task"]})
    assert check(tools, bad, nostream) == ("management_mode_mismatch", ["management_mode"])
    bad = bad.model_copy(update={"accepted_management_modes": ["jido_managed"]})
    assert check(tools, bad, nostream) == ("unsupported_protocol", ["protocol"])
    good = ConsumerManifest()
    r = resolve_compatibility(tools, good, nostream)
    assert (r.reason, r.missing_requirements, r.metadata) == ("missing_streaming", ["streaming"], {"requested_stream": True})
    r = resolve_compatibility(tools, good, backend)
    assert (r.reason, r.missing_requirements, r.metadata) == ("missing_capability", ["tool_calling"], {"requested_tools": True})
    assert check(ereq(tool_policy={"tools": ["Bash"]}), good) == ("missing_capability", ["tool_calling"])
    assert check(ereq(tool_choice="auto"), good)[0] == "missing_capability"
    assert check(ereq(stream="true"), good, nostream)[0] == "missing_streaming"  # ASM's string "true"
    # required capabilities: strict equality ("unknown" is not False)
    assert check(ereq(), ConsumerManifest(required_capabilities={"embeddings": False})) == (
        "missing_capability", ["embeddings"])
    assert check(ereq(), ConsumerManifest(required_capabilities={"copy": True})) == ("missing_capability", ["copy"])
    assert check(ereq(), ConsumerManifest(required_capabilities={"streaming?": True}), nostream) == (
        "missing_streaming", ["streaming"])
    r = resolve_compatibility(ereq(tool_choice="none", tools=[]), ConsumerManifest(
        required_capabilities={"embeddings": "unknown"}, optional_capabilities={"tool_calling": True, "streaming": True}),
        backend)
    assert r.compatible and r.reason == "protocol_match" and r.warnings == ["tool_calling"]
    assert (r.resolved_runtime_kind, r.resolved_management_mode, r.resolved_protocol) == (
        "task", "jido_managed", "openai_chat_completions")
    assert r.metadata["provider"] == "claude" and r.metadata["published_capabilities"]["cli_agent_v2"] is True


# -- leases ------------------------------------------------------------------------------------


async def test_ensure_endpoint_publishes_a_lease_with_its_own_url_and_token() -> None:
    store = MemoryLeaseStore()
    pub = EndpointPublisher("http://127.0.0.1:8080/", store, ttl_s=60)
    with acting_as(Principal("alice")):
        desc, compat = await pub.ensure_endpoint(
            {"model_preference": {"provider": "codex_exec", "model": "gpt-5-codex"}, "stream?": True},
            consumer_manifest(), {"boundary_ref": "b1"})
    assert compat.compatible and desc.contract_version == "inference.v1"
    ref = desc.lease_ref
    assert ref.startswith("lease_") and desc.endpoint_id.startswith("endpoint_")
    assert desc.base_url == f"http://127.0.0.1:8080/leases/{ref}/v1"
    assert desc.health_ref == f"http://127.0.0.1:8080/leases/{ref}/health"
    token = desc.headers["authorization"].removeprefix("Bearer ")
    assert len(token) == 24 and desc.provider_identity == "codex" and desc.model_identity == "gpt-5-codex"
    assert desc.source_runtime_ref == ref and desc.boundary_ref == "b1"
    assert desc.capabilities == {"streaming": True, "tool_calling": False}
    assert desc.metadata["backend_manifest"]["backend"] == "asm_inference_endpoint"
    lease = await pub.lookup(ref)
    assert lease is not None and lease.principal == "alice" and not lease.admin
    assert lease.authorized(f"Bearer {token}") and not lease.authorized(token) and not lease.authorized(None)
    assert desc.expires_at is not None and 59 < desc.expires_at - lease.created_at <= 60
    await pub.release_endpoint(desc)
    assert await pub.lookup(ref) is None
    await pub.release_endpoint(ref)  # idempotent
    await pub.release_endpoint({"lease_ref": ref})
    await pub.release_endpoint({})


async def test_ensure_endpoint_refusals_carry_asms_reasons() -> None:
    pub = EndpointPublisher("http://h")

    async def reason(request: Any, manifest: Any = None) -> EndpointError:
        with pytest.raises(EndpointError) as e:
            await pub.ensure_endpoint(request, consumer_manifest() if manifest is None else manifest)
        return e.value

    assert (await reason("not a map")).reason == "invalid_request"
    assert (await reason({"model_preference": {"provider": "claude", "id": "x"}}, 42)).reason == \
        "invalid_consumer_manifest"
    assert (await reason({"model_preference": {"provider": "openai", "id": "x"}})).reason == "unsupported_provider"
    assert (await reason({"model_preference": {"provider": "claude"}})).reason == "missing_model_identity"
    assert (await reason({"model_preference": {"provider": "claude", "id": "  "}})).reason == "missing_model_identity"
    err = await reason({"model_preference": {"provider": "claude", "id": "x"}, "tools": [{"name": "f"}]})
    assert err.reason == "incompatible" and err.result is not None
    assert err.result.reason == "missing_capability" and err.result.missing_requirements == ["tool_calling"]
    assert err.kind == "config_invalid"  # an AsmError like every asm failure
    assert len(pub.store) == 0  # type: ignore[arg-type]


async def test_leases_expire() -> None:
    pub = EndpointPublisher("http://h", ttl_s=0.05)
    desc, _ = await pub.ensure_endpoint(ereq(), consumer_manifest())
    long, _ = await pub.ensure_endpoint(ereq(), consumer_manifest(), ttl_s=60)
    assert await pub.lookup(desc.lease_ref) is not None
    import asyncio
    await asyncio.sleep(0.1)
    assert await pub.sweep() == 1
    assert await pub.lookup(desc.lease_ref) is None and await pub.lookup(long.lease_ref) is not None
    with pytest.raises(EndpointError, match="ttl_s"):
        await pub.ensure_endpoint(ereq(), consumer_manifest(), ttl_s=10**9)


async def test_sse_frames_carry_a_failure_raised_mid_stream_and_a_cut_stream() -> None:
    from collections.abc import AsyncIterator

    from asm_controller.inference import sse_frames

    s = Script()

    async def failing() -> AsyncIterator[list[Event]]:
        yield [s.started(), s.delta("part")]
        raise NodeNotReady("the node went away")

    frames = frames_json([f async for f in sse_frames(failing(), CompletionBuilder("c", "claude"))])
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert frames[1]["choices"][0]["delta"] == {"content": "part"}
    assert frames[2]["error"]["message"] == "the node went away" and frames[3] == "[DONE]" and len(frames) == 4

    async def cut() -> AsyncIterator[list[Event]]:
        yield [Script().started()]

    frames = frames_json([f async for f in sse_frames(cut(), CompletionBuilder("c", "claude"))])
    assert frames[1]["error"]["code"] == "run_incomplete" and frames[2] == "[DONE]"
