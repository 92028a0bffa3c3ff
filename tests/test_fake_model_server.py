"""The scripted model server (tests/support/fake_model_server.py), alone and driving the real CLIs.

The first part talks to the fake with urllib/http.client. The second part runs the real Claude Code,
Codex and Gemini CLIs against it; those tests are skipped when ``scripts/install_clis.sh`` has not
installed the CLIs into ``${ASM_CLI_CACHE:-~/.cache/asm-clis}``.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli_env import GEMINI_MODEL, cli_env, find_cli, hermetic_env
from tests.support.fake_model_server import (
    TEXT_ANSWER,
    TOOL_COMMAND,
    TOOL_DONE,
    TOOL_RESULT,
    TOOLWRITE_COMMAND,
    FakeModelServer,
)

TOOL_OUTPUT = "tool-output-123"
TOOL_FINAL = f"Tool said: {TOOL_OUTPUT}"

ANTHROPIC_PATH = "/v1/messages?beta=true"
OPENAI_PATH = "/v1/responses"
GEMINI_STREAM_PATH = f"/v1beta/models/{GEMINI_MODEL}:streamGenerateContent?alt=sse"
GEMINI_ROUTER_PATH = "/v1beta/models/gemini-3.5-flash-lite:generateContent"


@pytest.fixture
def server() -> Iterator[FakeModelServer]:
    with FakeModelServer(slow_interval=0.01) as srv:
        yield srv


# --------------------------------------------------------------------------- HTTP helpers


def post(base: str, path: str, body: Any, timeout: float = 10.0) -> tuple[int, str, str]:
    """POST JSON; returns (status, content-type, body text)."""
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "x-api-key": "k"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def sse(text: str) -> list[tuple[str | None, Any]]:
    """Parse an SSE body into (event name, JSON data) pairs."""
    events: list[tuple[str | None, Any]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


# Request bodies shaped like the CLIs' (with the unknown fields they send).

BASH_TOOL = {"name": "Bash", "description": "run", "input_schema": {"type": "object"}}


def anthropic_body(*messages: dict[str, Any], tools: list[Any] | None = None) -> dict[str, Any]:
    return {"model": "claude-opus-4-8", "max_tokens": 64000, "stream": True, "thinking": {"type": "adaptive"},
            "context_management": {"edits": []}, "output_config": {"effort": "high"},
            "tools": [BASH_TOOL] if tools is None else tools, "messages": list(messages),
            "system": [{"type": "text", "text": "You are Claude Code. SCENARIO_ERR500 in system is ignored."}]}


def a_user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                         {"type": "text", "text": text}]}


EXEC_TOOL = {"type": "function", "name": "exec_command", "parameters": {"type": "object"}}


def openai_body(*items: dict[str, Any], tools: list[Any] | None = None) -> dict[str, Any]:
    return {"model": "gpt-5.5", "instructions": "You are Codex.", "stream": True, "store": False,
            "include": ["reasoning.encrypted_content"], "tools": [EXEC_TOOL] if tools is None else tools,
            "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "dev"}]},
                      {"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "<environment_context>...</environment_context>"}]},
                      *items]}


def o_user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


SHELL_DECL = {"functionDeclarations": [{"name": "run_shell_command", "parametersJsonSchema": {"type": "object"}}]}


def gemini_body(*contents: dict[str, Any], tools: list[Any] | None = None) -> dict[str, Any]:
    return {"contents": list(contents), "tools": [SHELL_DECL] if tools is None else tools,
            "systemInstruction": {"parts": [{"text": "You are Gemini CLI."}]},
            "generationConfig": {"temperature": 1, "thinkingConfig": {"includeThoughts": True}}}


def g_user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": "<session_context>\nToday is ...\nSCENARIO_ERR401 in a file name\n"
                                               "</session_context>"}, {"text": text}]}


# --------------------------------------------------------------------------- Anthropic


def anthropic_answer(events: list[tuple[str | None, Any]]) -> tuple[str, list[dict[str, Any]], str | None]:
    """(text, tool_use blocks with parsed input, stop_reason) from a Messages SSE stream."""
    text = ""
    tools: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    stop = None
    for name, data in events:
        assert name == data["type"]
        if name == "content_block_start" and data["content_block"]["type"] == "tool_use":
            tools.append(dict(data["content_block"]))
            partial[data["index"]] = ""
        elif name == "content_block_delta":
            if data["delta"]["type"] == "text_delta":
                text += data["delta"]["text"]
            else:
                partial[data["index"]] += data["delta"]["partial_json"]
        elif name == "message_delta":
            stop = data["delta"]["stop_reason"]
    for tool, js in zip(tools, partial.values(), strict=True):
        tool["input"] = json.loads(js)
    return text, tools, stop


def test_anthropic_text(server: FakeModelServer) -> None:
    status, ctype, body = post(server.base_url, ANTHROPIC_PATH, anthropic_body(a_user("Say hi. SCENARIO_TEXT")))
    assert status == 200 and ctype.startswith("text/event-stream")
    events = sse(body)
    names = [n for n, _ in events if n != "ping"]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    assert events[0][1]["message"]["model"] == "claude-opus-4-8"
    assert "usage" in events[0][1]["message"] and "usage" in dict(events)["message_delta"]
    assert anthropic_answer(events) == (TEXT_ANSWER, [], "end_turn")
    (rec,) = server.requests
    assert rec.api == "anthropic" and rec.path == "/v1/messages" and rec.query == {"beta": "true"}
    assert rec.scenario == "TEXT" and rec.headers["x-api-key"] == "k" and rec.body["max_tokens"] == 64000


@pytest.mark.parametrize(("marker", "command"), [("SCENARIO_TOOL", TOOL_COMMAND),
                                                 ("SCENARIO_TOOLWRITE", TOOLWRITE_COMMAND)])
def test_anthropic_tool_then_result(server: FakeModelServer, marker: str, command: str) -> None:
    first = a_user(f"Run a command. {marker}")
    _, _, body = post(server.base_url, ANTHROPIC_PATH, anthropic_body(first))
    text, tools, stop = anthropic_answer(sse(body))
    assert stop == "tool_use" and text
    assert [(t["name"], t["input"]["command"]) for t in tools] == [("Bash", command)]
    assert set(tools[0]["input"]) == {"command", "description"}
    # The follow-up with the tool result (Claude may interleave role:"system" entries).
    assistant = {"role": "assistant", "content": [{"type": "text", "text": text},
                                                  {"type": "tool_use", "id": tools[0]["id"], "name": "Bash",
                                                   "input": tools[0]["input"]}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tools[0]["id"],
                                           "content": [{"type": "text", "text": f"{TOOL_OUTPUT}\nmore"}],
                                           "is_error": False}]}
    system = {"role": "system", "content": "a mid-conversation system entry", "unknown_field": 1}
    _, _, body = post(server.base_url, ANTHROPIC_PATH, anthropic_body(first, assistant, system, result))
    assert anthropic_answer(sse(body)) == (TOOL_FINAL, [], "end_turn")
    assert server.requests[-1].turn == TOOL_RESULT
    # A string tool_result content with no output -> the fixed answer.
    empty = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": ""}]}
    _, _, body = post(server.base_url, ANTHROPIC_PATH, anthropic_body(first, assistant, empty))
    assert anthropic_answer(sse(body))[0] == TOOL_DONE


def test_anthropic_marker_only_from_last_user_turn(server: FakeModelServer) -> None:
    history = [a_user("SCENARIO_TOOL"), {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    _, _, body = post(server.base_url, ANTHROPIC_PATH, anthropic_body(*history, a_user("Second turn SCENARIO_TEXT")))
    assert anthropic_answer(sse(body)) == (TEXT_ANSWER, [], "end_turn")
    _, _, body = post(server.base_url, ANTHROPIC_PATH, anthropic_body(*history, a_user("no marker here")))
    assert anthropic_answer(sse(body))[0] == TEXT_ANSWER
    # A plain string content works too; no Bash tool offered -> text instead of a tool call.
    _, _, body = post(server.base_url, ANTHROPIC_PATH,
                      anthropic_body({"role": "user", "content": "SCENARIO_TOOL"}, tools=[]))
    assert anthropic_answer(sse(body)) == (TEXT_ANSWER, [], "end_turn")


def test_context_parts_are_not_prompts(server: FakeModelServer) -> None:
    """Markers inside injected context blocks (<system-reminder>, <environment_context>, ...) are ignored."""
    # Claude Code's real first request: user turn, then a role:"system" entry after it.
    user = {"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>\nfile SCENARIO_ERR500.txt\n</system-reminder>"},
        {"type": "text", "text": "Run a command. SCENARIO_TOOL", "cache_control": {"type": "ephemeral"}}]}
    system = {"role": "system", "content": "Available agent types ... SCENARIO_ERR401"}
    _, _, body = post(server.base_url, ANTHROPIC_PATH, anthropic_body(user, system))
    assert anthropic_answer(sse(body))[1][0]["input"]["command"] == TOOL_COMMAND
    env = o_user("<environment_context>\n  <cwd>/w/SCENARIO_ERR500</cwd>\n</environment_context>")
    status, _, _ = post(server.base_url, OPENAI_PATH, openai_body(env, o_user("hello")))
    assert status == 200 and server.requests[-1].scenario == "TEXT"


def test_anthropic_non_streaming(server: FakeModelServer) -> None:
    status, ctype, body = post(server.base_url, "/v1/messages",
                               {**anthropic_body(a_user("SCENARIO_TOOL")), "stream": False})
    assert status == 200 and ctype == "application/json"
    msg = json.loads(body)
    assert msg["stop_reason"] == "tool_use" and msg["content"][1]["input"]["command"] == TOOL_COMMAND


# --------------------------------------------------------------------------- OpenAI Responses


def openai_answer(events: list[tuple[str | None, Any]]) -> tuple[str, list[dict[str, Any]]]:
    text = ""
    done_items: list[dict[str, Any]] = []
    for name, data in events:
        assert name == data["type"]
        if name == "response.output_text.delta":
            text += data["delta"]
        elif name == "response.output_item.done":
            done_items.append(data["item"])
    calls = [i for i in done_items if i["type"] == "function_call"]
    return text, calls


def test_openai_text(server: FakeModelServer) -> None:
    status, ctype, body = post(server.base_url, OPENAI_PATH, openai_body(o_user("Say hi. SCENARIO_TEXT")))
    assert status == 200 and ctype.startswith("text/event-stream")
    events = sse(body)
    names = [n for n, _ in events]
    assert names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.output_text.delta" in names and "response.output_item.done" in names
    assert names[-1] == "response.completed"
    completed = events[-1][1]["response"]
    assert completed["status"] == "completed" and completed["usage"]["total_tokens"] > 0
    assert openai_answer(events) == (TEXT_ANSWER, [])
    assert server.requests[0].api == "openai" and server.requests[0].scenario == "TEXT"


@pytest.mark.parametrize(("marker", "command"), [("SCENARIO_TOOL", TOOL_COMMAND),
                                                 ("SCENARIO_TOOLWRITE", TOOLWRITE_COMMAND)])
def test_openai_tool_then_result(server: FakeModelServer, marker: str, command: str) -> None:
    first = o_user(f"Run a command. {marker}")
    _, _, body = post(server.base_url, OPENAI_PATH, openai_body(first))
    events = sse(body)
    _, calls = openai_answer(events)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("exec_command", {"cmd": command})]
    assert calls[0]["call_id"] and calls[0] in events[-1][1]["response"]["output"]
    call = {"type": "function_call", "name": "exec_command", "arguments": calls[0]["arguments"],
            "call_id": calls[0]["call_id"]}
    output = {"type": "function_call_output", "call_id": calls[0]["call_id"],
              "output": "Chunk ID: 1a2b\nWall time: 0.0100 seconds\nProcess exited with code 0\n"
                        f"Original token count: 4\nOutput:\n{TOOL_OUTPUT}\n"}
    _, _, body = post(server.base_url, OPENAI_PATH, openai_body(first, call, output))
    assert openai_answer(sse(body)) == (TOOL_FINAL, [])
    assert server.requests[-1].turn == TOOL_RESULT


def test_openai_marker_only_from_last_user_turn(server: FakeModelServer) -> None:
    history = [o_user("SCENARIO_TOOL"), {"type": "message", "role": "assistant",
                                         "content": [{"type": "output_text", "text": "done"}]}]
    _, _, body = post(server.base_url, OPENAI_PATH, openai_body(*history, o_user("Second turn SCENARIO_TEXT")))
    assert openai_answer(sse(body)) == (TEXT_ANSWER, [])
    _, _, body = post(server.base_url, OPENAI_PATH, openai_body(o_user("SCENARIO_TOOL"), tools=[]))
    assert openai_answer(sse(body)) == (TEXT_ANSWER, [])


# --------------------------------------------------------------------------- Gemini


def gemini_answer(events: list[tuple[str | None, Any]]) -> tuple[str, list[dict[str, Any]], str | None]:
    text = ""
    calls: list[dict[str, Any]] = []
    finish = None
    for name, data in events:
        assert name is None
        cand = data["candidates"][0]
        for part in cand["content"]["parts"]:
            if "text" in part:
                text += part["text"]
            if "functionCall" in part:
                calls.append(part["functionCall"])
        finish = cand.get("finishReason", finish)
    assert "usageMetadata" in events[-1][1]
    return text, calls, finish


def test_gemini_stream_text(server: FakeModelServer) -> None:
    status, ctype, body = post(server.base_url, GEMINI_STREAM_PATH, gemini_body(g_user("Say hi. SCENARIO_TEXT")))
    assert status == 200 and ctype.startswith("text/event-stream")
    events = sse(body)
    assert len(events) >= 2
    assert gemini_answer(events) == (TEXT_ANSWER, [], "STOP")
    assert events[-1][1]["usageMetadata"]["totalTokenCount"] > 0
    (rec,) = server.requests
    assert rec.api == "gemini" and rec.query == {"alt": "sse"} and rec.scenario == "TEXT"


@pytest.mark.parametrize(("marker", "command"), [("SCENARIO_TOOL", TOOL_COMMAND),
                                                 ("SCENARIO_TOOLWRITE", TOOLWRITE_COMMAND)])
def test_gemini_tool_then_result(server: FakeModelServer, marker: str, command: str) -> None:
    first = g_user(f"Run a command. {marker}")
    _, _, body = post(server.base_url, GEMINI_STREAM_PATH, gemini_body(first))
    _, calls, finish = gemini_answer(sse(body))
    assert finish == "STOP"
    assert [(c["name"], c["args"]["command"]) for c in calls] == [("run_shell_command", command)]
    assert set(calls[0]["args"]) == {"command", "description"}
    model_turn = {"role": "model", "parts": [{"text": "ok"}, {"functionCall": calls[0]}]}
    response = {"role": "user", "parts": [{"functionResponse": {"id": "run_shell_command_1", "name": "run_shell_command",
                                                                "response": {"output": TOOL_OUTPUT}}}]}
    _, _, body = post(server.base_url, GEMINI_STREAM_PATH, gemini_body(first, model_turn, response))
    assert gemini_answer(sse(body)) == (TOOL_FINAL, [], "STOP")
    # No run_shell_command offered (headless without --yolo) -> text.
    _, _, body = post(server.base_url, GEMINI_STREAM_PATH, gemini_body(first, tools=[]))
    assert gemini_answer(sse(body)) == (TEXT_ANSWER, [], "STOP")


def test_gemini_router_generate_content(server: FakeModelServer) -> None:
    schema = {"type": "object", "properties": {"complexity_reasoning": {"type": "string"},
                                               "complexity_score": {"type": "integer", "minimum": 1,
                                                                    "maximum": 100}},
              "required": ["complexity_reasoning", "complexity_score"]}
    body = gemini_body(g_user("Say hi. SCENARIO_TOOL"), tools=[])
    body["generationConfig"] = {"responseMimeType": "application/json", "responseJsonSchema": schema}
    status, ctype, text = post(server.base_url, GEMINI_ROUTER_PATH, body)
    assert status == 200 and ctype == "application/json"
    resp = json.loads(text)
    answer = json.loads(resp["candidates"][0]["content"]["parts"][0]["text"])
    assert answer == {"complexity_reasoning": answer["complexity_reasoning"], "complexity_score": 10}
    assert resp["usageMetadata"]["totalTokenCount"] > 0
    # Plain (non-JSON) generateContent answers text.
    status, _, text = post(server.base_url, "/v1beta/models/gemini-2.5-flash:generateContent",
                           gemini_body(g_user("hi")))
    assert status == 200 and json.loads(text)["candidates"][0]["content"]["parts"][0]["text"] == TEXT_ANSWER


# --------------------------------------------------------------------------- errors, slow, plumbing

ERROR_CASES: dict[tuple[str, int], dict[str, Any]] = {
    ("anthropic", 401): {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
    ("openai", 401): {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                "code": "invalid_api_key"}},
    ("gemini", 401): {"error": {"code": 401, "message": "API key not valid", "status": "UNAUTHENTICATED"}},
}


def _request_for(api: str, prompt: str) -> tuple[str, dict[str, Any]]:
    if api == "anthropic":
        return ANTHROPIC_PATH, anthropic_body(a_user(prompt))
    if api == "openai":
        return OPENAI_PATH, openai_body(o_user(prompt))
    return GEMINI_STREAM_PATH, gemini_body(g_user(prompt))


@pytest.mark.parametrize("status", [500, 401])
@pytest.mark.parametrize("api", ["anthropic", "openai", "gemini"])
def test_errors(server: FakeModelServer, api: str, status: int) -> None:
    path, body = _request_for(api, f"Fail. SCENARIO_ERR{status}")
    got, ctype, text = post(server.base_url, path, body)
    assert got == status and ctype == "application/json"
    err = json.loads(text)
    if (api, status) in ERROR_CASES:
        expected = ERROR_CASES[(api, status)]
        for key, value in expected.items():  # the documented fields (extra ones are allowed)
            if isinstance(value, dict):
                assert {k: err[key][k] for k in value} == value
            else:
                assert err[key] == value
    elif api == "anthropic":
        assert err["type"] == "error" and err["error"]["type"] == "api_error"
    elif api == "openai":
        assert err["error"]["type"] == "server_error"
    else:
        assert err["error"]["code"] == 500 and err["error"]["status"] == "INTERNAL"
    assert server.requests[-1].status == status


@pytest.mark.slow
@pytest.mark.parametrize("api", ["anthropic", "openai", "gemini"])
def test_slow_streams_many_deltas(server: FakeModelServer, api: str) -> None:
    path, body = _request_for(api, "Go slowly. SCENARIO_SLOW")
    _, _, text = post(server.base_url, path, body)
    events = sse(text)
    if api == "anthropic":
        deltas = [d for n, d in events if n == "content_block_delta"]
    elif api == "openai":
        deltas = [d for n, d in events if n == "response.output_text.delta"]
    else:
        deltas = events
    assert len(deltas) == 40


@pytest.mark.slow
def test_slow_real_timing_and_interrupt() -> None:
    """Default SLOW pacing is 0.25 s per delta; a client can drop the stream mid-run."""
    with FakeModelServer() as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        path, body = _request_for("anthropic", "SCENARIO_SLOW")
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        start = time.monotonic()
        seen = 0
        while seen < 4:
            line = resp.fp.readline()
            if b"text_delta" in line:
                seen += 1
        elapsed = time.monotonic() - start
        assert 0.5 < elapsed < 2.0, elapsed
        conn.close()  # interrupt
        assert srv.wait_idle(3.0), "the handler should notice the dropped client"
        # The server still works.
        status, _, _ = post(srv.base_url, *_request_for("openai", "hi"))
        assert status == 200


def test_keep_alive_and_unknown_paths(server: FakeModelServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for api in ("anthropic", "openai", "gemini", "anthropic"):
        path, body = _request_for(api, "SCENARIO_TEXT")
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert TEXT_ANSWER.split()[0] in resp.read().decode()
    conn.request("GET", "/nope")
    resp = conn.getresponse()
    assert resp.status == 404
    resp.read()
    conn.request("HEAD", "/")
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read()
    conn.close()
    assert [r.api for r in server.requests][:4] == ["anthropic", "openai", "gemini", "anthropic"]
    # Invalid JSON is tolerated (recorded with body None, answered as TEXT).
    req = urllib.request.Request(server.base_url + OPENAI_PATH, data=b"{not json", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    assert server.requests[-1].body is None


@pytest.mark.slow
def test_concurrent_requests() -> None:
    with FakeModelServer(slow_interval=0.05) as srv:
        results: list[int] = []
        lock = threading.Lock()

        def worker(i: int) -> None:
            api = ("anthropic", "openai", "gemini")[i % 3]
            path, body = _request_for(api, "SCENARIO_SLOW" if i % 2 else "SCENARIO_TEXT")
            status, _, _ = post(srv.base_url, path, body)
            with lock:
                results.append(status)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        # 6 slow streams of ~2 s each run in parallel, not one after another.
        assert time.monotonic() - start < 6
        assert results == [200] * 12 and len(srv.requests) == 12


def test_script_mode(tmp_path: Path) -> None:
    import sys

    script = Path(__file__).parent / "support" / "fake_model_server.py"
    proc = subprocess.Popen([sys.executable, str(script), "--port", "0", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake model server listening on http://127.0.0.1:")
        base = line.split()[-1]
        status, _, body = post(base, *_request_for("gemini", "SCENARIO_TEXT"))
        assert status == 200 and "fake model" in body
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0


# --------------------------------------------------------------------------- the real CLIs

CLI_TIMEOUT = 60


def _skip_unless_installed(name: str) -> Path:
    path = find_cli(name)
    if path is None:
        pytest.skip(f"{name} is not installed (run scripts/install_clis.sh)")
    return path


def cli_command(name: str, exe: Path, prompt: str, *, tools: bool, model: str | None = GEMINI_MODEL) -> list[str]:
    if name == "claude":
        cmd = [str(exe), "-p", prompt, "--output-format", "stream-json", "--verbose"]
        return cmd + (["--dangerously-skip-permissions"] if tools else [])
    if name == "codex":
        cmd = [str(exe), "exec", "--json", "--skip-git-repo-check"]
        return cmd + (["--dangerously-bypass-approvals-and-sandbox"] if tools else []) + [prompt]
    cmd = [str(exe)] + (["-m", model] if model else []) + ["-p", prompt, "--output-format", "stream-json"]
    return cmd + (["--yolo"] if tools else [])


class CliRun:
    def __init__(self, proc: subprocess.CompletedProcess[str], elapsed: float) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.elapsed = elapsed
        self.events: list[dict[str, Any]] = []
        for line in proc.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def describe(self) -> str:
        return (f"exit={self.returncode} in {self.elapsed:.1f}s\nevents={event_types(self.events)}\n"
                f"stdout={self.stdout[-3000:]}\nstderr={self.stderr[-3000:]}")


def event_types(events: list[dict[str, Any]]) -> list[str]:
    """A compact event-type sequence (for messages and the report)."""
    out = []
    for e in events:
        t = e.get("type", "?")
        if t == "system":
            t += "/" + str(e.get("subtype"))
        elif t in ("assistant", "user"):
            kinds = [str(c.get("type")) for c in e.get("message", {}).get("content", []) if isinstance(c, dict)]
            t += f"[{','.join(kinds)}]"
        elif t == "result":
            t += "/" + str(e.get("subtype") or e.get("status"))
        elif t.startswith("item."):
            t += "{" + str(e.get("item", {}).get("type")) + "}"
        elif t == "message":
            t += "{" + str(e.get("role")) + "}"
        out.append(t)
    return out


def run_cli(name: str, server: FakeModelServer, tmp_path: Path, prompt: str, *, tools: bool = False,
            model: str | None = GEMINI_MODEL) -> CliRun:
    exe = _skip_unless_installed(name)
    env = hermetic_env(cli_env(name, server.base_url, tmp_path / "scratch"))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    start = time.monotonic()
    proc = subprocess.run(cli_command(name, exe, prompt, tools=tools, model=model), env=env, cwd=work,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    run = CliRun(proc, time.monotonic() - start)
    print(f"\n{name} {prompt!r}: {event_types(run.events)} exit={run.returncode} {run.elapsed:.1f}s")
    return run


def final_texts(name: str, events: list[dict[str, Any]]) -> str:
    """All assistant text the CLI printed."""
    if name == "claude":
        return "\n".join(c.get("text", "") for e in events if e.get("type") == "assistant"
                         for c in e["message"]["content"] if c.get("type") == "text")
    if name == "codex":
        return "\n".join(e["item"]["text"] for e in events
                         if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message")
    return "".join(e.get("content", "") for e in events if e.get("type") == "message" and e.get("role") == "assistant")


def tool_outputs(name: str, events: list[dict[str, Any]]) -> list[str]:
    if name == "claude":
        out = []
        for e in events:
            if e.get("type") == "user":
                for c in e["message"]["content"]:
                    if isinstance(c, dict) and c.get("type") == "tool_result":
                        content = c.get("content")
                        out.append(content if isinstance(content, str) else json.dumps(content))
        return out
    if name == "codex":
        return [e["item"].get("aggregated_output", "") for e in events
                if e.get("type") == "item.completed" and e["item"].get("type") == "command_execution"]
    return [str(e.get("output", "")) for e in events if e.get("type") == "tool_result"]


API_OF = {"claude": "anthropic", "codex": "openai", "gemini": "gemini"}
CLIS = ["claude", "codex", "gemini"]


@pytest.fixture
def cli_server() -> Iterator[FakeModelServer]:
    with FakeModelServer() as srv:
        yield srv


@pytest.mark.real_cli
@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", CLIS)
def test_real_cli_text(name: str, cli_server: FakeModelServer, tmp_path: Path) -> None:
    run = run_cli(name, cli_server, tmp_path, "Say hi. SCENARIO_TEXT")
    assert run.returncode == 0, run.describe()
    assert TEXT_ANSWER in final_texts(name, run.events), run.describe()
    assert run.elapsed < 30
    model_calls = [r for r in cli_server.requests if r.api == API_OF[name]]
    assert model_calls and all(r.scenario == "TEXT" and r.status == 200 for r in model_calls)
    assert {r.api for r in cli_server.requests} <= {API_OF[name], "unknown"}  # only HEAD / probes besides
    if name == "claude":
        assert run.events[0]["type"] == "system" and run.events[-1]["type"] == "result"
        assert run.events[-1]["result"] == TEXT_ANSWER
        assert model_calls[0].headers.get("x-api-key") == "sk-ant-dummy-key"
    elif name == "codex":
        assert [e["type"] for e in run.events] == ["thread.started", "turn.started", "item.completed",
                                                  "turn.completed"]
        assert model_calls[0].headers.get("authorization") == "Bearer sk-dummy"
    else:
        assert run.events[0]["type"] == "init" and run.events[-1] == {**run.events[-1], "status": "success"}
        assert model_calls[0].headers.get("x-goog-api-key") == "dummy-gemini-key"
        assert all(GEMINI_MODEL in r.path for r in model_calls)  # -m pins the model: no router call


@pytest.mark.real_cli
@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", CLIS)
def test_real_cli_tool(name: str, cli_server: FakeModelServer, tmp_path: Path) -> None:
    run = run_cli(name, cli_server, tmp_path, "Run a command. SCENARIO_TOOL", tools=True)
    assert run.returncode == 0, run.describe()
    outputs = tool_outputs(name, run.events)
    assert any(TOOL_OUTPUT in o for o in outputs), run.describe()
    assert TOOL_FINAL in final_texts(name, run.events), run.describe()
    turns = [r.turn for r in cli_server.requests if r.api == API_OF[name] and r.scenario]
    assert turns[0] == "prompt" and TOOL_RESULT in turns
    assert run.elapsed < 30


@pytest.mark.real_cli
@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", CLIS)
def test_real_cli_err401(name: str, cli_server: FakeModelServer, tmp_path: Path) -> None:
    run = run_cli(name, cli_server, tmp_path, "Fail please. SCENARIO_ERR401")
    assert run.returncode != 0, run.describe()
    assert run.elapsed < 30, run.describe()
    assert any(r.status == 401 for r in cli_server.requests), run.describe()
    if name == "claude":
        assert run.events[-1]["type"] == "result" and run.events[-1]["is_error"] is True
        assert run.events[-1]["api_error_status"] == 401
    elif name == "codex":
        assert run.events[-1]["type"] == "turn.failed" and "401" in run.events[-1]["error"]["message"]
    else:
        assert run.events[-1]["type"] == "result" and run.events[-1]["status"] == "error"
        assert "API key not valid" in run.events[-1]["error"]["message"]


@pytest.mark.real_cli
@pytest.mark.timeout(90)
def test_real_gemini_auto_router(cli_server: FakeModelServer, tmp_path: Path) -> None:
    """Without -m, Gemini CLI first asks the router (generateContent, JSON mode)."""
    run = run_cli("gemini", cli_server, tmp_path, "Say hi. SCENARIO_TEXT", model=None)
    assert run.returncode == 0, run.describe()
    assert TEXT_ANSWER in final_texts("gemini", run.events)
    actions = [r.path.rsplit(":", 1)[-1] for r in cli_server.requests]
    assert actions[0] == "generateContent" and "streamGenerateContent" in actions, actions
