"""Provider command builders and parsers, on the real CLIs' captured output.

The claude/codex/gemini captures in tests/fixtures/cli are recorded by scripts/record_fixtures.py from the real CLIs
against tests/support/fake_model_server.py, so their texts are that server's scripted answers.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from asm_controller import Event, EventReducer, Result
from asm_node.providers import AmpProvider, ClaudeProvider, CodexProvider, GeminiProvider, RunSpec
from asm_node.providers._cli import CliProvider
from asm_node.providers.base import ExitInfo
from asm_wire import KIND_NAMES, AsmError, ConfigError, pb
from tests.support.fake_model_server import TEXT_ANSWER, TOOL_COMMAND, TOOL_PREAMBLE

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cli"  # recorded by scripts/record_fixtures.py
TOOL_OUTPUT = TOOL_COMMAND.removeprefix("echo ")
TOOL_ANSWER = f"Tool said: {TOOL_OUTPUT}"  # the fake server's answer to the tool result
# Command builders under test: every operator-only option allowed (tests/test_operator_knobs.py tests the refusal).
PROVIDERS: dict[str, CliProvider] = {
    p.name: p for p in (cls(cls.operator_options) for cls in (ClaudeProvider, CodexProvider, GeminiProvider, AmpProvider))
}


def spec(provider: str, prompt: str = "hi", mode: str = "default", env: dict[str, str] | None = None,
         **options: Any) -> RunSpec:
    p = PROVIDERS[provider]
    return RunSpec(run_id="r1", session_id="s1", provider=provider, prompt=prompt, cwd="/tmp", permission_mode=mode,
                   options=p.validate_options(options, mode), env=env if env is not None else dict(os.environ))


def parse(provider: str, lines: list[bytes], exit_code: int = 0, stderr: str = "", **options: Any) -> tuple[list[pb.Event], Result]:
    parser = PROVIDERS[provider].new_parser(spec(provider, **options))
    out: list[pb.Event] = []
    parser.feed_lines(lines, out)
    out += parser.finish(ExitInfo(returncode=exit_code, signal=0, stderr_tail=stderr))
    out.append(pb.Event(kind=pb.EVENT_KIND_RUN_COMPLETED,
                        run_completed=pb.RunCompleted(status="failed" if parser.failed else "completed", exit_code=exit_code)))
    reducer = EventReducer("r1", "s1", provider)
    for i, ev in enumerate(out, 1):
        ev.seq = i
        if parser.provider_session_id:
            ev.provider_session_id = parser.provider_session_id
        reducer.apply(Event(ev))
    return out, reducer.result()


def fixture(name: str) -> list[bytes]:
    return (FIXTURES / name).read_bytes().splitlines()


def kinds(events: list[pb.Event]) -> list[str]:
    return [KIND_NAMES[e.kind] for e in events]


# -- Claude ---------------------------------------------------------------------------


def test_claude_text_capture() -> None:
    events, result = parse("claude", fixture("claude_text.jsonl"))
    assert kinds(events) == ["provider_init", "raw", "assistant_delta", "assistant_delta", "assistant_message", "cost_update",
                             "result", "run_completed"]
    assert result.ok and result.text == TEXT_ANSWER  # the deltas and the full message are not doubled
    assert result.provider_session_id == "00000000-0000-4000-8000-000000000001"
    assert result.stop_reason == "end_turn"
    assert result.cost.cost_usd == pytest.approx(0.001)  # the CLI's own figure wins over the table


def test_claude_tool_capture_splits_blocks_and_reads_user_tool_results() -> None:
    events, result = parse("claude", fixture("claude_tool.jsonl"))
    assert kinds(events) == ["provider_init", "raw", "assistant_delta", "assistant_message", "tool_use", "tool_result", "raw",
                             "assistant_delta", "assistant_message", "cost_update", "result", "run_completed"]
    tool_use = events[4].tool_use
    assert tool_use.tool_name == "Bash" and json.loads(tool_use.input_json)["command"] == TOOL_COMMAND
    assert events[5].tool_result.tool_call_id == tool_use.tool_call_id
    assert json.loads(events[5].tool_result.content_json) == TOOL_OUTPUT
    assert result.text == TOOL_PREAMBLE + "\n\n" + TOOL_ANSWER  # two messages: two paragraphs (issue 14)


def test_claude_same_block_repeated_under_one_message_id_is_not_duplicated() -> None:
    msg = {"id": "msg_1", "model": "m", "content": [{"type": "text", "text": "Hello"}]}
    again = {"id": "msg_1", "model": "m", "content": [{"type": "text", "text": "Hello"},
                                                     {"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]}
    lines = [json.dumps({"type": "assistant", "message": m}).encode() for m in (msg, again)]
    events, result = parse("claude", lines)
    assert kinds(events)[:2] == ["assistant_message", "tool_use"]
    assert result.text == "Hello"


def test_claude_partial_messages_stream_deltas_without_doubling() -> None:
    def delta(text: str) -> bytes:
        return json.dumps({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                                                              "delta": {"type": "text_delta", "text": text}}}).encode()

    lines = [delta("Hel"), delta("lo"),
             json.dumps({"type": "stream_event", "event": {"type": "message_stop"}}).encode(),
             json.dumps({"type": "assistant", "message": {"id": "m1", "content": [{"type": "text", "text": "Hello"}]}}).encode(),
             json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": "Hello"}).encode()]
    events, result = parse("claude", lines)
    assert kinds(events)[:3] == ["assistant_delta", "assistant_delta", "assistant_message"]
    assert result.text == "Hello"


@pytest.mark.parametrize(("status", "kind"), [(500, "transport_error"), (401, "auth_error"), (429, "rate_limit")])
def test_claude_error_result_with_success_subtype(status: int, kind: str) -> None:
    lines = [
        json.dumps({"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 1, "retry_delay_ms": 500,
                    "error_status": status, "error": "server_error"}).encode(),
        json.dumps({"type": "assistant", "message": {"id": "x", "model": "<synthetic>",
                                                     "content": [{"type": "text", "text": f"API Error: {status}"}]}}).encode(),
        json.dumps({"type": "result", "subtype": "success", "is_error": True, "api_error_status": status,
                    "result": f"API Error: {status} boom"}).encode(),
    ]
    events, result = parse("claude", lines, exit_code=1)
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == kind and f"HTTP {status}" in result.error.message
    assert [w.kind for w in result.warnings] == [kind]  # the retry line: visible, not terminal
    assert kinds(events).count("error") == 2  # the retry warning and the terminal error; exit 1 adds nothing


def test_claude_unknown_and_garbage_lines_never_crash() -> None:
    rng = random.Random(7)
    junk = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))) for _ in range(200)]
    lines = [b"not json", b"[1,2]", b"42", b'{"type":"brand_new_type","x":1}', b'{"type":"assistant","message":7}',
             b'{"type":"user","message":{"content":5}}', *junk]
    events, result = parse("claude", lines)
    assert "raw" in kinds(events) and result.ok  # clean exit, no result line: completed


# -- Codex ----------------------------------------------------------------------------


def test_codex_text_capture() -> None:
    events, result = parse("codex", fixture("codex_text.jsonl"))
    assert kinds(events) == ["provider_init", "raw", "assistant_message", "cost_update", "result", "run_completed"]
    assert result.ok and result.text == TEXT_ANSWER
    assert result.provider_session_id == "00000000-0000-4000-8000-000000000001"
    assert (result.cost.input_tokens, result.cost.output_tokens) == (100, 20)
    assert result.cost.cost_usd == pytest.approx(100 * 0.000001 + 20 * 0.000004)


def test_codex_tool_capture_maps_command_execution_to_bash() -> None:
    events, result = parse("codex", fixture("codex_tool.jsonl"))
    assert kinds(events) == ["provider_init", "raw", "assistant_message", "tool_use", "tool_result", "assistant_message",
                             "cost_update", "result", "run_completed"]
    assert events[3].tool_use.tool_name == "Bash"
    assert TOOL_COMMAND in json.loads(events[3].tool_use.input_json)["command"]
    assert events[4].tool_result.tool_call_id == events[3].tool_use.tool_call_id
    assert json.loads(events[4].tool_result.content_json) == TOOL_OUTPUT + "\n"
    assert not events[4].tool_result.is_error
    assert result.text == TOOL_PREAMBLE + "\n\n" + TOOL_ANSWER  # two messages: two paragraphs (issue 14)


def test_codex_turn_failed_is_terminal_and_reconnects_are_warnings() -> None:
    lines = [b'{"type":"thread.started","thread_id":"t-1"}', b'{"type":"turn.started"}',
             b'{"type":"error","message":"Reconnecting... 1/1 (unexpected status 401 Unauthorized)"}',
             b'{"type":"turn.failed","error":{"message":"unexpected status 401 Unauthorized: Incorrect API key"}}']
    _, result = parse("codex", lines, exit_code=1)
    assert result.status == "failed" and result.error is not None and result.error.kind == "auth_error"
    assert [w.kind for w in result.warnings] == ["auth_error"]


def test_codex_failed_command_is_an_error_tool_result() -> None:
    item = {"id": "item_0", "type": "command_execution", "command": "false", "aggregated_output": "", "exit_code": 1,
            "status": "failed"}
    events, _ = parse("codex", [json.dumps({"type": "item.completed", "item": item}).encode()])
    assert kinds(events)[:2] == ["tool_use", "tool_result"] and events[1].tool_result.is_error


# -- Gemini ---------------------------------------------------------------------------


def test_gemini_text_capture() -> None:
    events, result = parse("gemini", fixture("gemini_text.jsonl"))
    assert kinds(events) == ["provider_init", "user_message", "assistant_delta", "assistant_delta", "cost_update", "result",
                             "run_completed"]
    assert result.ok and result.text == TEXT_ANSWER
    assert result.provider_session_id == "00000000-0000-4000-8000-000000000001"


def test_gemini_tool_capture_reads_parameters_and_status() -> None:
    events, result = parse("gemini", fixture("gemini_tool.jsonl"))
    use = next(e for e in events if e.kind == pb.EVENT_KIND_TOOL_USE).tool_use
    res = next(e for e in events if e.kind == pb.EVENT_KIND_TOOL_RESULT).tool_result
    assert use.tool_name == "run_shell_command"
    assert json.loads(use.input_json)["command"] == TOOL_COMMAND
    assert res.tool_call_id == use.tool_call_id and not res.is_error
    assert result.text == TOOL_PREAMBLE + "\n\n" + TOOL_ANSWER  # two messages: two paragraphs (issue 14)


def test_gemini_error_result_and_exit_codes() -> None:
    line = json.dumps({"type": "result", "status": "error",
                       "error": {"type": "unknown", "message": "[API Error: {\"error\":{\"code\":401}} API key not valid]"}})
    _, result = parse("gemini", [line.encode()], exit_code=145)
    assert result.error is not None and result.error.kind == "auth_error"
    _, crashed = parse("gemini", [], exit_code=244, stderr="Error: 500 Internal")
    assert crashed.error is not None and crashed.error.kind == "transport_error" and crashed.error.exit_code == 244
    _, untrusted = parse("gemini", [], exit_code=55)
    assert untrusted.error is not None and untrusted.error.kind == "config_invalid"


# -- Amp ------------------------------------------------------------------------------


def test_amp_documented_stream_shape() -> None:
    events, result = parse("amp", fixture("amp_stream_json.jsonl"))
    assert kinds(events) == ["provider_init", "assistant_message", "cost_update", "result", "run_completed"]
    assert result.ok and result.text == "OK" and result.stop_reason == "success"
    assert (result.cost.input_tokens, result.cost.output_tokens) == (10, 13)  # remembered from the assistant line


@pytest.mark.parametrize("capture", ["claude_text.jsonl", "claude_tool.jsonl"])
def test_amp_parses_claude_captures_relabelled(capture: str) -> None:
    _, as_claude = parse("claude", fixture(capture))
    _, as_amp = parse("amp", fixture(capture))
    assert as_amp.ok and as_amp.text == as_claude.text
    assert [m.kind for m in as_amp.messages] == [m.kind for m in as_claude.messages]


# -- command builders -------------------------------------------------------------------


def argv(provider: str, prompt: str = "hi", mode: str = "default", **options: Any) -> list[str]:
    fake = Path("/bin/true")
    env = {**os.environ, PROVIDERS[provider].env_var: str(fake)}
    return PROVIDERS[provider].build_command(spec(provider, prompt, mode, env=env, **options)).argv


def test_claude_argv() -> None:
    # steering=False: the prompt on argv, as before runs were steerable (the default sends it on stdin,
    # tests/test_steering.py).
    a = argv("claude", "-rf prompt", "auto", model="sonnet", max_turns=3, append_system_prompt="be terse",
             resume="abc-123", args=["--add-dir=/x"], steering=False)
    assert a[:5] == ["/bin/true", "--print", "--output-format", "stream-json", "--verbose"]
    assert ["--permission-mode", "acceptEdits"] == a[a.index("--permission-mode"):a.index("--permission-mode") + 2]
    assert "--model=sonnet" in a and "--max-turns=3" in a and "--resume=abc-123" in a
    assert "--append-system-prompt=be terse" in a and "--add-dir=/x" in a
    assert a[-2:] == ["--", "-rf prompt"]  # a prompt that looks like a flag stays a prompt
    assert "--continue" in argv("claude", resume="latest")


def test_permission_modes_map_to_native_flags() -> None:
    assert "bypassPermissions" in argv("claude", mode="bypass")
    assert "--dangerously-bypass-approvals-and-sandbox" in argv("codex", mode="bypass")
    assert "--yolo" in argv("gemini", mode="bypass")
    assert ["--approval-mode", "plan"] == argv("gemini", mode="plan")[-2:]
    assert "--dangerously-allow-all" in argv("amp", mode="bypass")
    with pytest.raises(ConfigError) as exc:
        argv("codex", mode="auto")
    assert "not supported for codex" in exc.value.message


def test_codex_argv_and_resume() -> None:
    a = argv("codex", "go", model="gpt-5.5", reasoning_effort="high", skip_git_repo_check=True,
             additional_directories=["/data"], config={"model_providers.x.request_max_retries": 1})
    assert a[:3] == ["/bin/true", "exec", "--json"] and a[-2:] == ["--", "-"]  # the prompt goes in on stdin
    assert "--model=gpt-5.5" in a and '--config=model_reasoning_effort="high"' in a
    assert "--config=model_providers.x.request_max_retries=1" in a
    assert "--skip-git-repo-check" in a and "--add-dir=/data" in a
    assert argv("codex", resume="t-1")[:4] == ["/bin/true", "exec", "resume", "t-1"]
    assert argv("codex", resume="latest")[:4] == ["/bin/true", "exec", "resume", "--last"]


def test_gemini_and_amp_argv() -> None:
    g = argv("gemini", "--hi", model="gemini-2.5-flash", extensions=["a", "b"], resume="latest", sandbox=True)
    assert g[1] == "--prompt=--hi" and "--model=gemini-2.5-flash" in g and "--extensions=a,b" in g
    assert "--resume=latest" in g and "--sandbox" in g
    a = argv("amp", "ship it", mcp_config={"servers": []})
    assert a[1:5] == ["--execute=ship it", "--stream-json", "--no-ide", "--no-notifications"]


@pytest.mark.parametrize(
    ("provider", "options", "fragment"),
    [
        ("claude", {"colour": "blue"}, "colour"),
        ("claude", {"max_turns": "many"}, "max_turns"),
        ("codex", {"reasoning_effort": "extreme"}, "reasoning_effort"),
        ("gemini", {"extensions": "notalist"}, "extensions"),
        ("claude", {"resume": "--dangerous"}, "session id"),
        ("gemini", {"ollama": True}, "Ollama"),
        ("amp", {"ollama_model": "llama3"}, "Ollama"),
        ("codex", {"system_prompt": "x"}, "system_prompt"),
    ],
)
def test_invalid_options_are_config_invalid(provider: str, options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        PROVIDERS[provider].validate_options(options, "default")
    assert exc.value.kind == "config_invalid" and fragment in exc.value.message


def test_ollama_for_claude_and_codex() -> None:
    cmd = PROVIDERS["claude"].build_command(spec(
        "claude", env={**os.environ, "CLAUDE_CLI_PATH": "/bin/true"}, ollama=True, ollama_model="llama3.2",
        ollama_base_url="http://127.0.0.1:11434"))
    assert "--model=llama3.2" in cmd.argv
    assert cmd.env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:11434" and cmd.env["ANTHROPIC_AUTH_TOKEN"] == "ollama"
    c = argv("codex", ollama=True)
    assert "--oss" in c and '--config=model="gpt-oss:20b"' in c


def test_missing_cli_names_the_env_var(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    status = PROVIDERS["codex"].status(env)
    assert not status.available and "CODEX_PATH" in status.error
    bad = PROVIDERS["gemini"].status({**env, "GEMINI_CLI_PATH": str(tmp_path / "nope")})
    assert not bad.available and "GEMINI_CLI_PATH" in bad.error
    with pytest.raises(AsmError) as exc:
        PROVIDERS["claude"].build_command(spec("claude", env=env))
    assert exc.value.kind == "cli_not_found" and "CLAUDE_CLI_PATH" in exc.value.message


@pytest.mark.parametrize("value", ["abc\n", "abc\n--dangerous", "-x", "a b", ""])
def test_resume_session_id_is_anchored_at_the_very_end(value: str) -> None:
    # A `$`-anchored pattern accepted "abc\n": the id goes to the CLI's --resume as is.
    from asm_node.providers._cli import check_session_id

    with pytest.raises(ConfigError):
        check_session_id(value, "claude")
    assert check_session_id("abc-1.2:x@y", "claude") == "abc-1.2:x@y"
