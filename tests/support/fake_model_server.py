"""A scripted model server for running the real agent CLIs offline.

It speaks just enough of three wire APIs for Claude Code, Codex and Gemini CLI
(see shared/spec/real_clis.md):

* Anthropic Messages  ``POST /v1/messages[?beta=true]``                (SSE, or JSON if ``stream`` is false)
* OpenAI Responses    ``POST /v1/responses``                           (SSE)
* Gemini              ``POST /v1beta/models/<model>:streamGenerateContent?alt=sse`` (SSE)
                      ``POST /v1beta/models/<model>:generateContent``  (JSON; the ``auto`` router call)

It is stateless. The scenario comes from a marker in the *last user turn* of the request:

==================== ===========================================================================
``SCENARIO_TEXT``     a plain text answer (also the default when there is no marker)
``SCENARIO_TOOL``     call the shell tool with ``echo tool-output-123``; answer the tool result with
                      ``Tool said: <first line of the output>``
``SCENARIO_TOOLWRITE`` like TOOL, but the command is ``touch denied-file.txt``
``SCENARIO_SLOWTOOL`` like TOOL, but the command sleeps 2 s first (a turn to steer into while tools run)
``SCENARIO_ERR500``   HTTP 500 with the API's JSON error body
``SCENARIO_ERR401``   HTTP 401 with the API's JSON error body
``SCENARIO_SLOW``     a text answer streamed as 40 deltas, 0.25 s apart
``SCENARIO_STEER``    streamed like SLOW: a run a test steers while it streams (see below)
``SCENARIO_MCP``      call the offered tool whose name contains ``lookup`` (the test MCP server's,
                      tests/support/mcp_server.py; each CLI names MCP tools its own way); answer
                      its result with ``Tool said: <first line of the result>``
==================== ===========================================================================

Steering: a request whose last user turn (Claude Code also sends a steered message mid-turn as a
``system`` entry after a tool result) carries ``STEERED-<word>`` is answered
``Steered answer: STEERED-<word>``, whatever its scenario, so a test sees the steered text took effect.

Text parts that are entirely one tagged block (Gemini's ``<session_context>``, Claude's
``<system-reminder>``, Codex's ``<environment_context>``) are not searched for markers.

A request whose last turn carries a tool result (Anthropic ``tool_result``, OpenAI
``function_call_output``, Gemini ``functionResponse``) gets the final text answer. When the request
does not offer the shell tool, TOOL scenarios answer with text instead.

Every request (including Claude Code's ``HEAD /`` probe) is recorded in :attr:`FakeModelServer.requests`.

Use from tests::

    with FakeModelServer() as server:
        env = {"ANTHROPIC_BASE_URL": server.base_url, ...}

or as a script: ``python tests/support/fake_model_server.py --port 18081``.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import re
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TEXT_ANSWER = "Hello from the fake model."
TOOL_PREAMBLE = "I'll run a command."
TOOL_COMMAND = "echo tool-output-123"
TOOLWRITE_COMMAND = "touch denied-file.txt"
SLOWTOOL_COMMAND = "sleep 2 && echo tool-output-123"
TOOL_DONE = "Done after tool."
SLOW_DELTAS = 40
SLOW_INTERVAL = 0.25

MCP_TOOL = "lookup"
MCP_INPUT = {"key": "asm"}
MCP_PREAMBLE = "I'll look it up."
#: Decision.mcp_tool when Codex offers its MCP tools only through `tool_search`: search first.
TOOL_SEARCH = "\x00tool_search"
#: _plan's "command" for a call of the offered MCP tool instead of the shell tool.
MCP_CALL = "\x00mcp"

SCENARIOS = ("TEXT", "TOOL", "TOOLWRITE", "SLOWTOOL", "ERR500", "ERR401", "SLOW", "STEER", "MCP")
_MARKER = re.compile(r"SCENARIO_([A-Z0-9]+)")
_STEERED = re.compile(r"STEERED-[A-Za-z0-9-]+")

# Turn kinds.
PROMPT = "prompt"
TOOL_RESULT = "tool_result"

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


@dataclass
class RecordedRequest:
    """One request the fake server received."""

    method: str
    path: str  # without the query string
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or None
    api: str  # "anthropic" | "openai" | "gemini" | "unknown"
    scenario: str | None = None  # TEXT, TOOL, ... (None for unknown paths)
    turn: str | None = None  # PROMPT or TOOL_RESULT
    status: int = 0
    seq: int = field(default_factory=lambda: next(_ids))
    time: float = field(default_factory=time.time)

    @property
    def full_path(self) -> str:
        if not self.query:
            return self.path
        return self.path + "?" + "&".join(f"{k}={v}" for k, v in self.query.items())


@dataclass
class Decision:
    scenario: str
    turn: str  # PROMPT | TOOL_RESULT
    tool_output: str | None = None  # text of the tool result, for TOOL_RESULT turns
    tool_offered: bool = True
    #: The steered token in the last user turn (answered whatever the scenario).
    steered: str | None = None
    #: The offered tool whose name contains MCP_TOOL (for SCENARIO_MCP).
    mcp_tool: str | None = None
    #: The namespace the Responses API groups that tool under (Codex: ``mcp__<server>``), if any.
    mcp_namespace: str | None = None


def steered_token(texts: list[str]) -> str | None:
    """The last ``STEERED-<word>`` in these texts, if any."""
    found = [m.group(0) for t in texts for m in _STEERED.finditer(t)]
    return found[-1] if found else None


def mcp_tool_of(names: list[str]) -> str | None:
    """The offered tool that is the test MCP server's ``lookup`` (mcp__srv__lookup, srv__lookup, ...)."""
    for name in names:
        if MCP_TOOL in name:
            return name
    return None


# --------------------------------------------------------------------------- scenario helpers


# A text part that is entirely one tagged block is context the CLI injected, not the prompt:
# Gemini's <session_context>, Claude's <system-reminder>, Codex's <environment_context>, ...
_CONTEXT_PART = re.compile(r"^\s*<([A-Za-z_][\w -]*)>.*</\1>\s*$", re.DOTALL)


def is_context_part(text: str) -> bool:
    return bool(_CONTEXT_PART.match(text))


def find_scenario(text: str | list[str]) -> str:
    """The scenario named by the last known marker (TEXT when none).

    Given a list of text parts, parts that are injected context blocks are ignored.
    """
    if isinstance(text, list):
        text = "\n".join(t for t in text if not is_context_part(t))
    found = "TEXT"
    for m in _MARKER.finditer(text):
        if m.group(1) in SCENARIOS:
            found = m.group(1)
    return found


def first_output_line(output: str) -> str | None:
    """The first meaningful line of a tool's output, as the CLIs wrap it.

    Codex 0.169 wraps it as ``Chunk ID: ...\\nProcess exited with code 0\\n...\\nOutput:\\n<output>``;
    Gemini CLI 0.61 as ``<untrusted_context>\\nOutput: <output>\\nProcess Group PGID: ...``; Claude sends it bare.
    """
    lines = output.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("Output:"):
            rest = stripped[len("Output:"):].strip()
            if rest:
                return rest
            for nxt in lines[i + 1:]:
                if nxt.strip():
                    return nxt.strip()
            return None
    for line in lines:
        # A bare tag line is the CLI's wrapping (Gemini's <untrusted_context> around MCP output).
        if line.strip() and not re.fullmatch(r"</?[A-Za-z_][\w-]*>", line.strip()):
            return line.strip()
    return None


def final_tool_text(output: str | None) -> str:
    line = first_output_line(output) if output else None
    return f"Tool said: {line}" if line else TOOL_DONE


def _text_of(value: Any) -> str:
    """Concatenate all text found in a content value (string, list of blocks/parts, dict)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(t for t in (_text_of(v) for v in value) if t)
    if isinstance(value, dict):
        parts = []
        for key in ("text", "content", "output", "input_text", "result", "response", "error", "stdout"):
            if key in value:
                parts.append(_text_of(value[key]))
        return "\n".join(p for p in parts if p)
    return str(value)


def _tool_command(scenario: str) -> str:
    return {"TOOLWRITE": TOOLWRITE_COMMAND, "SLOWTOOL": SLOWTOOL_COMMAND}.get(scenario, TOOL_COMMAND)


# --- Anthropic


def decide_anthropic(body: dict[str, Any]) -> Decision:
    messages = body.get("messages") or []
    tools = body.get("tools") or []
    offered = any(isinstance(t, dict) and t.get("name") == "Bash" for t in tools)
    mcp = mcp_tool_of([str(t.get("name") or "") for t in tools if isinstance(t, dict)])
    # The last user turn: the trailing user (and system) entries after the last assistant message.
    trailing: list[dict[str, Any]] = []
    for msg in reversed(messages):
        if not isinstance(msg, dict):
            continue
        if msg.get("role") == "assistant":
            break
        trailing.append(msg)
    trailing.reverse()
    tool_outputs: list[str] = []
    texts: list[str] = []
    steer_texts: list[str] = []
    for msg in trailing:
        if msg.get("role") == "system":  # a message steered in mid-turn (Claude Code)
            steer_texts.append(_text_of(msg.get("content")))
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for block in content or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_result":
                tool_outputs.append(_text_of(block.get("content")))
            elif block.get("type") == "text":
                texts.append(str(block.get("text", "")))
    steered = steered_token(texts + steer_texts)
    if tool_outputs:
        return Decision("TEXT", TOOL_RESULT, tool_outputs[-1], offered, steered, mcp)
    return Decision(find_scenario(texts), PROMPT, None, offered, steered, mcp)


# --- OpenAI Responses


def decide_openai(body: dict[str, Any]) -> Decision:
    items = body.get("input")
    tools = body.get("tools") or []
    offered = any(isinstance(t, dict) and t.get("name") == "exec_command" for t in tools)
    mcp, namespace = _openai_mcp_tool(tools)
    searchable = any(isinstance(t, dict) and t.get("type") == "tool_search" for t in tools)
    if isinstance(items, str):
        return Decision(find_scenario(items), PROMPT, None, offered, steered_token([items]), mcp, namespace)
    trailing: list[dict[str, Any]] = []
    for item in reversed(items or []):
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        role = item.get("role")
        if kind == "message" and role == "assistant":
            break
        if kind in ("function_call", "custom_tool_call", "reasoning", "local_shell_call"):
            # Part of the model's last turn: only outputs after it belong to the user turn.
            break
        trailing.append(item)
    trailing.reverse()
    tool_outputs = [
        _text_of(i.get("output")) for i in trailing
        if i.get("type") in ("function_call_output", "custom_tool_call_output", "local_shell_call_output")
    ]
    # Codex defers MCP tools behind `tool_search`: what a search found is in its tool_search_output.
    found = [i for i in trailing if i.get("type") == "tool_search_output"]
    if found:
        if mcp is None:
            mcp, namespace = _openai_mcp_tool([t for i in found for t in (i.get("tools") or [])])
        return Decision("MCP", PROMPT, None, offered, None, mcp, namespace)
    texts: list[str] = []
    for i in trailing:
        if i.get("type", "message") == "message" and i.get("role") == "user":
            content = i.get("content")
            texts.extend([_text_of(p) for p in content] if isinstance(content, list) else [_text_of(content)])
    steered = steered_token(texts)
    if tool_outputs:
        return Decision("TEXT", TOOL_RESULT, tool_outputs[-1], offered, steered, mcp, namespace)
    scenario = find_scenario(texts)
    if scenario == "MCP" and mcp is None and searchable:
        mcp = TOOL_SEARCH
    return Decision(scenario, PROMPT, None, offered, steered, mcp, namespace)


def _openai_mcp_tool(tools: list[Any]) -> tuple[str | None, str | None]:
    """(name, namespace) of the offered MCP lookup tool: a function, or one inside a ``namespace`` tool."""
    for t in tools:
        if not isinstance(t, dict):
            continue
        if t.get("type") == "namespace":
            inner = mcp_tool_of([str(i.get("name") or "") for i in t.get("tools") or [] if isinstance(i, dict)])
            if inner:
                return inner, str(t.get("name") or "")
        elif MCP_TOOL in str(t.get("name") or ""):
            return str(t["name"]), None
    return None, None


# --- Gemini


def decide_gemini(body: dict[str, Any]) -> Decision:
    contents = body.get("contents") or []
    offered = False
    declared: list[str] = []
    for tool in body.get("tools") or []:
        if isinstance(tool, dict):
            for decl in tool.get("functionDeclarations") or []:
                if isinstance(decl, dict):
                    declared.append(str(decl.get("name") or ""))
                if isinstance(decl, dict) and decl.get("name") == "run_shell_command":
                    offered = True
    mcp = mcp_tool_of(declared)
    trailing: list[dict[str, Any]] = []
    for content in reversed(contents):
        if not isinstance(content, dict):
            continue
        if content.get("role") == "model":
            break
        trailing.append(content)
    trailing.reverse()
    tool_outputs: list[str] = []
    texts: list[str] = []
    for content in trailing:
        for part in content.get("parts") or []:
            if not isinstance(part, dict):
                continue
            if "functionResponse" in part:
                resp = (part.get("functionResponse") or {}).get("response")
                tool_outputs.append(_text_of(resp))
            elif "text" in part:
                texts.append(str(part.get("text", "")))
    steered = steered_token(texts)
    if tool_outputs:
        return Decision("TEXT", TOOL_RESULT, tool_outputs[-1], offered, steered, mcp)
    # The prompt comes after the <session_context> part; the last marker wins.
    return Decision(find_scenario(texts), PROMPT, None, offered, steered, mcp)


# --------------------------------------------------------------------------- error bodies


def error_body(api: str, status: int) -> dict[str, Any]:
    if api == "anthropic":
        if status == 401:
            return {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
        return {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}
    if api == "openai":
        if status == 401:
            return {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                              "param": None, "code": "invalid_api_key"}}
        return {"error": {"message": "The server had an error while processing your request.",
                          "type": "server_error", "param": None, "code": "server_error"}}
    if api == "gemini":
        if status == 401:
            return {"error": {"code": 401, "message": "API key not valid", "status": "UNAUTHENTICATED"}}
        return {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}
    return {"error": {"code": status, "message": "error"}}


# --------------------------------------------------------------------------- the server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeModelServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "FakeModelServer/1.0"

    # -- plumbing

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # FakeModelServer._done logs one line per request when verbose

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.verbose:
            sys.stderr.write("fake-model: " + (format % args) + "\n")

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            raw = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
        encoding = self.headers.get("Content-Encoding", "").lower().strip()
        if encoding == "gzip":
            raw = gzip.decompress(raw)
        elif encoding == "deflate":
            raw = zlib.decompress(raw)
        return raw

    def _send_json(self, status: int, obj: Any, extra_headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _start_sse(self, extra_headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        if self.server.fake._stopping.is_set():
            raise ConnectionAbortedError("server stopping")
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_sse(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _event(self, name: str | None, obj: Any) -> None:
        payload = json.dumps(obj, separators=(",", ":"))
        if name:
            self._chunk(f"event: {name}\ndata: {payload}\n\n".encode())
        else:
            self._chunk(f"data: {payload}\r\n\r\n".encode())

    def _pause(self, seconds: float) -> None:
        if self.server.fake._stopping.wait(seconds):
            raise ConnectionAbortedError("server stopping")

    # -- dispatch

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path = split.path
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers = {k.lower(): v for k, v in self.headers.items()}
        raw = self._read_body() if method == "POST" else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                body = None
        api = "unknown"
        if path.startswith("/v1/messages"):
            api = "anthropic"
        elif path.startswith(("/v1/responses", "/v1/models")):
            api = "openai"
        elif path.startswith(("/v1beta/", "/v1alpha/")):
            api = "gemini"
        rec = RecordedRequest(method, path, query, headers, body, api)
        fake = self.server.fake
        fake._record(rec)
        try:
            self._route(method, path, rec)
        except (TimeoutError, BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        finally:
            fake._done(rec)

    def _route(self, method: str, path: str, rec: RecordedRequest) -> None:
        body = rec.body if isinstance(rec.body, dict) else {}
        if method == "HEAD":  # Claude Code probes the base URL after API errors
            rec.status = 200
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif method == "POST" and path == "/v1/messages":
            self._anthropic(rec, body)
        elif method == "POST" and path == "/v1/messages/count_tokens":
            rec.status = 200
            self._send_json(200, {"input_tokens": 100})
        elif method == "POST" and path == "/v1/responses":
            self._openai(rec, body)
        elif method == "GET" and path == "/v1/models":
            rec.status = 200
            self._send_json(200, {"object": "list", "data": [
                {"id": "claude-opus-4-8", "type": "model", "display_name": "Claude (fake)", "object": "model"},
                {"id": "gpt-5.5", "object": "model", "owned_by": "fake"},
            ]})
        elif method == "POST" and rec.api == "gemini" and ":" in path:
            model, _, action = path.rsplit("/", 1)[-1].partition(":")
            if action == "streamGenerateContent":
                self._gemini_stream(rec, body, model)
            elif action == "generateContent":
                self._gemini_generate(rec, body, model)
            elif action == "countTokens":
                rec.status = 200
                self._send_json(200, {"totalTokens": 100})
            else:
                self._not_found(rec)
        else:
            self._not_found(rec)

    def _not_found(self, rec: RecordedRequest) -> None:
        rec.status = 404
        self._send_json(404, {"error": {"code": 404, "message": f"no route for {rec.method} {rec.path}",
                                        "status": "NOT_FOUND", "type": "not_found_error"}})

    def _maybe_error(self, rec: RecordedRequest, decision: Decision) -> bool:
        status = {"ERR500": 500, "ERR401": 401}.get(decision.scenario)
        if status is None:
            return False
        rec.status = status
        extra = {"request-id": _new_id("req_")} if rec.api == "anthropic" else None
        self._send_json(status, error_body(rec.api, status), extra)
        return True

    def _plan(self, decision: Decision) -> tuple[list[str], str | None]:
        """(text deltas, shell command, MCP_CALL or None) for the answer."""
        if decision.steered:
            return _split(f"Steered answer: {decision.steered}"), None
        if decision.turn == TOOL_RESULT:
            text = final_tool_text(decision.tool_output)
            return _split(text), None
        if decision.scenario in ("TOOL", "TOOLWRITE", "SLOWTOOL") and decision.tool_offered:
            return [TOOL_PREAMBLE], _tool_command(decision.scenario)
        if decision.scenario == "MCP" and decision.mcp_tool:
            return [MCP_PREAMBLE], MCP_CALL
        if decision.scenario in ("SLOW", "STEER"):
            n = self.server.fake.slow_deltas
            return [f"slow{i} " for i in range(n - 1)] + ["done."], None
        return _split(TEXT_ANSWER), None

    def _delta_pause(self, decision: Decision, index: int) -> None:
        if decision.scenario in ("SLOW", "STEER") and decision.turn == PROMPT and not decision.steered and index > 0:
            self._pause(self.server.fake.slow_interval)

    # -- Anthropic Messages

    def _anthropic(self, rec: RecordedRequest, body: dict[str, Any]) -> None:
        decision = decide_anthropic(body)
        rec.scenario, rec.turn = decision.scenario, decision.turn
        if self._maybe_error(rec, decision):
            return
        deltas, command = self._plan(decision)
        model = str(body.get("model") or "claude-opus-4-8")
        msg_id = _new_id("msg_")
        tool_id = _new_id("toolu_")
        tool_name, tool_input = "Bash", {"command": command, "description": "echo" if command == TOOL_COMMAND else "Create a file"}
        if command == MCP_CALL:
            tool_name, tool_input = str(decision.mcp_tool), dict(MCP_INPUT)
        stop_reason = "tool_use" if command else "end_turn"
        usage = {"input_tokens": 100, "output_tokens": 1, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        rec.status = 200
        if body.get("stream") is False:
            content: list[dict[str, Any]] = [{"type": "text", "text": "".join(deltas)}]
            if command:
                content.append({"type": "tool_use", "id": tool_id, "name": tool_name, "input": tool_input})
            self._send_json(200, {"id": msg_id, "type": "message", "role": "assistant", "model": model,
                                  "content": content, "stop_reason": stop_reason, "stop_sequence": None,
                                  "usage": {**usage, "output_tokens": 20}})
            return
        self._start_sse({"request-id": _new_id("req_")})
        self._event("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage}})
        self._event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
        self._event("ping", {"type": "ping"})
        for i, delta in enumerate(deltas):
            self._delta_pause(decision, i)
            self._event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": delta}})
        self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
        if command:
            self._event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": tool_id, "name": tool_name, "input": {}}})
            js = json.dumps(tool_input)
            half = len(js) // 2
            for piece in (js[:half], js[half:]):
                self._event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                                    "delta": {"type": "input_json_delta", "partial_json": piece}})
            self._event("content_block_stop", {"type": "content_block_stop", "index": 1})
        self._event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                      "usage": {"output_tokens": 20}})
        self._event("message_stop", {"type": "message_stop"})
        self._end_sse()

    # -- OpenAI Responses

    def _openai(self, rec: RecordedRequest, body: dict[str, Any]) -> None:
        decision = decide_openai(body)
        rec.scenario, rec.turn = decision.scenario, decision.turn
        if self._maybe_error(rec, decision):
            return
        deltas, command = self._plan(decision)
        model = str(body.get("model") or "gpt-5.5")
        resp_id = _new_id("resp_")
        created = int(time.time())
        seq = itertools.count()
        base = {"id": resp_id, "object": "response", "created_at": created, "model": model,
                "status": "in_progress", "output": [], "usage": None}
        rec.status = 200
        self._start_sse({"x-request-id": _new_id("req_")})

        def ev(kind: str, **fields: Any) -> None:
            self._event(kind, {"type": kind, "sequence_number": next(seq), **fields})

        ev("response.created", response=base)
        ev("response.in_progress", response=base)
        outputs: list[dict[str, Any]] = []
        # The text message.
        msg_id = _new_id("msg_")
        text = "".join(deltas)
        ev("response.output_item.added", output_index=0, item={
            "id": msg_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []})
        ev("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
           part={"type": "output_text", "text": "", "annotations": []})
        for i, delta in enumerate(deltas):
            self._delta_pause(decision, i)
            ev("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0, delta=delta)
        ev("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=text)
        part = {"type": "output_text", "text": text, "annotations": []}
        ev("response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=part)
        msg_item = {"id": msg_id, "type": "message", "role": "assistant", "status": "completed", "content": [part]}
        ev("response.output_item.done", output_index=0, item=msg_item)
        outputs.append(msg_item)
        if command == MCP_CALL and decision.mcp_tool == TOOL_SEARCH:
            # Codex runs the search itself and sends what it found (tool_search_output) next.
            item = {"id": _new_id("ts_"), "type": "tool_search_call", "status": "completed",
                    "call_id": _new_id("call_"), "execution": "client", "arguments": {"query": MCP_TOOL, "limit": 8}}
            ev("response.output_item.added", output_index=1, item={**item, "status": "in_progress"})
            ev("response.output_item.done", output_index=1, item=item)
            outputs.append(item)
        elif command:
            fc_id = _new_id("fc_")
            call_id = _new_id("call_")
            fn, args = "exec_command", json.dumps({"cmd": command})
            extra: dict[str, Any] = {}
            if command == MCP_CALL:
                fn, args = str(decision.mcp_tool), json.dumps(MCP_INPUT)
                if decision.mcp_namespace:
                    extra["namespace"] = decision.mcp_namespace
            ev("response.output_item.added", output_index=1, item={
                "id": fc_id, "type": "function_call", "status": "in_progress", "name": fn,
                "call_id": call_id, "arguments": "", **extra})
            ev("response.function_call_arguments.delta", item_id=fc_id, output_index=1, delta=args)
            ev("response.function_call_arguments.done", item_id=fc_id, output_index=1, arguments=args)
            fc_item = {"id": fc_id, "type": "function_call", "status": "completed", "name": fn,
                       "call_id": call_id, "arguments": args, **extra}
            ev("response.output_item.done", output_index=1, item=fc_item)
            outputs.append(fc_item)
        usage = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 20,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 120}
        ev("response.completed", response={**base, "status": "completed", "output": outputs, "usage": usage})
        self._end_sse()

    # -- Gemini

    def _gemini_stream(self, rec: RecordedRequest, body: dict[str, Any], model: str) -> None:
        decision = decide_gemini(body)
        rec.scenario, rec.turn = decision.scenario, decision.turn
        if self._maybe_error(rec, decision):
            return
        deltas, command = self._plan(decision)
        resp_id = _new_id("")
        rec.status = 200
        self._start_sse()

        def chunk(parts: list[dict[str, Any]], final: bool) -> None:
            cand: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
            obj: dict[str, Any] = {"candidates": [cand], "modelVersion": model, "responseId": resp_id}
            if final:
                cand["finishReason"] = "STOP"
                obj["usageMetadata"] = {"promptTokenCount": 100, "candidatesTokenCount": 20,
                                        "totalTokenCount": 120}
            else:
                obj["usageMetadata"] = {"promptTokenCount": 100, "totalTokenCount": 100}
            self._event(None, obj)

        for i, delta in enumerate(deltas):
            self._delta_pause(decision, i)
            chunk([{"text": delta}], final=(i == len(deltas) - 1 and not command))
        if command == MCP_CALL:
            chunk([{"functionCall": {"name": str(decision.mcp_tool), "args": dict(MCP_INPUT)}}], final=True)
        elif command:
            chunk([{"functionCall": {"name": "run_shell_command", "args": {
                "command": command, "description": "echo" if command == TOOL_COMMAND else "Create a file"}}}],
                final=True)
        self._end_sse()

    def _gemini_generate(self, rec: RecordedRequest, body: dict[str, Any], model: str) -> None:
        decision = decide_gemini(body)
        rec.scenario, rec.turn = decision.scenario, decision.turn
        if self._maybe_error(rec, decision):
            return
        config = body.get("generationConfig") or body.get("generation_config") or {}
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        if config.get("responseMimeType") == "application/json" or schema:
            text = json.dumps(_answer_for_schema(schema))
        else:
            deltas, _ = self._plan(Decision("TEXT" if decision.scenario == "SLOW" else decision.scenario,
                                            decision.turn, decision.tool_output, False))
            text = "".join(deltas)
        rec.status = 200
        self._send_json(200, {
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP",
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 20, "totalTokenCount": 120},
            "modelVersion": model, "responseId": _new_id("")})


def _split(text: str) -> list[str]:
    """Split a text into two deltas (at a space near the middle)."""
    cut = text.find(" ", len(text) // 2)
    if cut <= 0:
        return [text]
    return [text[:cut + 1], text[cut + 1:]]


def _answer_for_schema(schema: Any) -> Any:
    """A plausible JSON answer for a Gemini JSON-mode request (router, next-speaker check, ...)."""
    if not isinstance(schema, dict):
        return {"complexity_reasoning": "Simple request (fake router).", "complexity_score": 10}
    props = schema.get("properties") or {}
    if "complexity_score" in props or "complexity_reasoning" in props:
        return {"complexity_reasoning": "Simple request (fake router).", "complexity_score": 10}
    if "next_speaker" in props:
        return {"reasoning": "The model finished its answer.", "next_speaker": "user"}
    return _example(schema)


def _example(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    kind = str(schema.get("type", "object")).lower()
    if kind == "object":
        return {k: _example(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return max(int(schema.get("minimum", 1) or 1), 1)
    if kind == "boolean":
        return False
    return "fake"


class FakeModelServer:
    """The scripted model server, run in a background thread.

    ``start()``/``stop()``, or use it as a (sync or async) context manager.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, verbose: bool = False,
                 slow_deltas: int = SLOW_DELTAS, slow_interval: float = SLOW_INTERVAL) -> None:
        self.host = host
        self._requested_port = port
        self.verbose = verbose
        self.slow_deltas = slow_deltas
        self.slow_interval = slow_interval
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._in_flight = 0
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FakeModelServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _Server((self.host, self._requested_port), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"fake-model-server:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # wake handler threads blocked on keep-alive reads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FakeModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeModelServer:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- recorded requests

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def requests_for(self, api: str | None = None, path_contains: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            reqs = list(self.requests)
        return [r for r in reqs if (api is None or r.api == api)
                and (path_contains is None or path_contains in r.path)]

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being served."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _record(self, rec: RecordedRequest) -> None:
        with self._cond:
            self.requests.append(rec)
            self._in_flight += 1

    def _done(self, rec: RecordedRequest) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()
        if self.verbose:
            sys.stderr.write(f"fake-model: {rec.method} {rec.full_path} api={rec.api} scenario={rec.scenario} "
                             f"turn={rec.turn} -> {rec.status}\n")

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18081, help="0 picks a free port")
    parser.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    parser.add_argument("--dump", metavar="FILE", help="on exit, write the recorded requests as JSONL to FILE")
    args = parser.parse_args(argv)
    server = FakeModelServer(args.port, args.host, verbose=not args.quiet).start()
    print(f"fake model server listening on {server.base_url}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    # Poll: a signal delivered to a server thread would not wake an untimed wait in the main thread.
    while not done.wait(0.2):
        pass
    server.stop()
    if args.dump:
        with open(args.dump, "w") as f:
            for r in server.requests:
                f.write(json.dumps({"method": r.method, "path": r.full_path, "api": r.api, "scenario": r.scenario,
                                    "turn": r.turn, "status": r.status, "headers": r.headers, "body": r.body}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
