"""Claude Code: ``claude --print --output-format stream-json --verbose``.

What the real CLI prints (Claude Code 2.1.x, shared/spec/real_clis.md):
``system/init``, then one ``assistant`` line *per content block* (all blocks of
one API message share ``message.id``), ``user`` lines carrying tool results,
``system/api_retry`` lines while it retries, optional ``stream_event`` lines
(``--include-partial-messages``) with text deltas, and a final ``result``,
which can say ``is_error: true`` with ``api_error_status`` while its subtype
still says ``success``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field

from asm_node.providers._cli import (
    CliProvider,
    CommonOptions,
    JsonLineParser,
    as_int,
    classify_api_error,
    ev_delta,
    ev_message,
    ev_raw,
    ev_thinking,
    ev_tool_result,
    ev_tool_use,
    ev_user,
)
from asm_node.providers._mcp import McpServers, write_claude_config
from asm_node.providers._sessions import Found, SessionFile, SessionStore, label_of, text_of
from asm_node.providers.base import (
    CommandSpec,
    RunSpec,
    denial,
    denial_warning,
    error_event,
    provider_init_event,
    result_event,
)
from asm_wire import KIND_VALUES, ConfigError, PermissionMode, pb


class ClaudeOptions(CommonOptions):
    system_prompt: str | None = None
    append_system_prompt: str | None = None
    max_turns: int | None = Field(default=None, gt=0)
    provider_backend: Literal["anthropic", "ollama"] | None = None
    anthropic_base_url: str | None = None
    anthropic_auth_token: str | None = None
    external_model_overrides: dict[str, str] = Field(default_factory=dict)
    #: Stream text as it is generated (``--include-partial-messages``).
    include_partial_messages: bool = True
    include_thinking: bool = False
    #: Route tool permission prompts through asm (approval_requested / approve()): the prompt goes
    #: in as stream-json input and Claude asks over stdio (--permission-prompt-tool stdio).
    approvals: bool = False
    #: Keep the run steerable (Session.send_input / asm input): the prompt goes in as the first
    #: stream-json user message and stdin stays open until the last turn's result. False passes the
    #: prompt on argv with stdin closed, as before steering existed.
    steering: bool = True
    #: MCP servers for this run (--mcp-config, with --strict-mcp-config): asm_node.providers._mcp.
    mcp_servers: McpServers = Field(default_factory=dict)


def _text_of(content: Any) -> Any:
    """A tool_result's content: plain text when it is text blocks, else as given."""
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "".join(str(b.get("text") or "") for b in content)
    return content


class ClaudeParser(JsonLineParser):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._seen_blocks: dict[str, set[str]] = {}
        self.last_usage: dict[str, Any] = {}
        self.last_stop_reason = ""
        self._permission_requests: dict[str, dict[str, Any]] = {}
        #: tool_use ids seen, and the text of the error results the CLI gave them (a denial's reason).
        self._tool_ids: set[str] = set()
        self._error_results: dict[str, str] = {}
        #: Steering: messages steered in after the prompt, the user messages the CLI took (echoed back
        #: with isReplay by --replay-user-messages, in stdin order: the prompt first), and the
        #: cumulative cost reported so far.
        self.steered_sent = 0
        self.replays = 0
        self._reported_usd = 0.0

    def _block_key(self, b: Any) -> str:
        if isinstance(b, dict):
            return f"{b.get('type')}:{b.get('id') or ''}:{b.get('text') or b.get('thinking') or ''}"
        return f"str:{b}"

    def assistant(self, msg: dict[str, Any], out: list[pb.Event]) -> None:
        mid = str(msg.get("id") or "")
        model = str(msg.get("model") or "")
        if isinstance(msg.get("usage"), dict):
            self.last_usage = msg["usage"]
        if msg.get("stop_reason"):
            self.last_stop_reason = str(msg["stop_reason"])
        content = msg.get("content")
        blocks = content if isinstance(content, list) else ([content] if content else [])
        seen = self._seen_blocks.setdefault(mid, set()) if mid else set()
        for b in blocks:
            key = self._block_key(b)
            if mid and key in seen:
                continue  # the same block again under the same message id: never duplicate it
            seen.add(key)
            btype = b.get("type") if isinstance(b, dict) else "text"
            if btype == "tool_use":
                self._tool_ids.add(str(b.get("id") or ""))
                out.append(ev_tool_use(str(b.get("name") or ""), str(b.get("id") or ""), b.get("input") or {}))
            elif btype == "thinking":
                out.append(ev_thinking(str(b.get("thinking") or b.get("text") or ""), str(b.get("signature") or "")))
            elif btype == "redacted_thinking":
                out.append(ev_thinking("", ""))
            else:
                out.append(ev_message([b], model, mid))

    def user(self, msg: Any, out: list[pb.Event]) -> None:
        content = msg.get("content") if isinstance(msg, dict) else msg
        if isinstance(content, str):
            out.append(ev_user([content]))
            return
        others = []
        for b in content if isinstance(content, list) else []:
            if isinstance(b, dict) and b.get("type") == "tool_result":
                if b.get("is_error"):
                    text = _text_of(b.get("content"))
                    self._error_results[str(b.get("tool_use_id") or "")] = text if isinstance(text, str) else ""
                out.append(ev_tool_result(str(b.get("tool_use_id") or b.get("id") or ""), _text_of(b.get("content")),
                                          bool(b.get("is_error"))))
            else:
                others.append(b)
        if others:
            out.append(ev_user(others))

    def result(self, obj: dict[str, Any], out: list[pb.Event]) -> None:
        usage: dict[str, Any] = obj["usage"] if isinstance(obj.get("usage"), dict) else self.last_usage
        in_tok, out_tok = as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens"))
        reported = obj.get("total_cost_usd")
        if in_tok or out_tok or isinstance(reported, int | float):
            out.append(self.cost(in_tok, out_tok, float(reported) if isinstance(reported, int | float) else None))
        subtype = str(obj.get("subtype") or "")
        if obj.get("is_error") or subtype.startswith("error"):
            status = obj.get("api_error_status")
            status = status if isinstance(status, int) else None
            text = str(obj.get("result") or obj.get("error") or subtype or "Claude CLI reported an error result")
            kind = classify_api_error(text, status)
            if kind == "unknown" and subtype == "error_max_turns":
                kind = "tool_failed"
            domain = "provider"
            msg = text if status is None else f"{text} (HTTP {status})"
            self.end(out, error_event(msg, kind, domain), failed=True)
            return
        output: dict[str, Any] = {k: obj[k] for k in ("result", "duration_ms", "num_turns", "usage", "permission_denials",
                                      "total_cost_usd", "session_id") if k in obj}
        self.report_denials(obj.get("permission_denials"), output, out)
        stop = str(obj.get("stop_reason") or self.last_stop_reason or subtype or "end_turn")
        self.end(out, result_event("completed", stop, output))

    def report_denials(self, raw: Any, output: dict[str, Any], out: list[pb.Event]) -> None:
        """The CLI's ``permission_denials`` as the normalized ``output["denials"]`` (tool, input, reason),
        one ``permission_denied`` warning each, and ``all_tools_denied`` when no tool call got through."""
        if not isinstance(raw, list) or not raw:
            return
        denials = []
        denied_ids = set()
        for d in raw:
            if not isinstance(d, dict):
                continue
            tid = str(d.get("tool_use_id") or "")
            denied_ids.add(tid)
            reason = self._error_results.get(tid) or "denied by the permission mode"
            denials.append(denial(str(d.get("tool_name") or ""), d.get("tool_input") or {}, reason[:1000]))
        if not denials:
            return
        output["denials"] = denials
        if self._tool_ids and self._tool_ids <= denied_ids:
            output["all_tools_denied"] = True
        out.extend(denial_warning(d) for d in denials)

    def approval_response(self, approval_id: str, decision: str, reason: str) -> bytes | None:
        request = self._permission_requests.pop(approval_id, None)
        if request is None:
            return None
        if decision == "allow":
            answer: dict[str, Any] = {"behavior": "allow", "updatedInput": request.get("input") or {}}
        else:
            answer = {"behavior": "deny", "message": f"Denied by the operator ({reason or 'deny'})"}
        msg = {"type": "control_response",
               "response": {"subtype": "success", "request_id": approval_id, "response": answer}}
        return (json.dumps(msg) + "\n").encode()

    def input_message(self, data: bytes) -> bytes:
        """A steered user message as Claude's stream-json input; one more turn to wait for."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("input for a Claude run is text: it must be UTF-8", reason="input_invalid") from None
        if not text.strip():
            raise ConfigError("input for a Claude run must not be empty", reason="input_invalid")
        self.steered_sent += 1
        message = {"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": text}]}}
        return (json.dumps(message) + "\n").encode()

    def turn_result(self, obj: dict[str, Any], out: list[pb.Event]) -> dict[str, Any] | None:
        """A ``result`` line: the run's end (returned, cost made per turn), or None when a steered
        message is still to be answered (Claude runs a turn of its own for a message that arrived
        while it answered the last one: its cost is emitted now, the run goes on)."""
        reported = obj.get("total_cost_usd")
        turn_usd: float | None = None
        if isinstance(reported, int | float) and not isinstance(reported, bool):
            # Claude reports the process's cumulative cost on every result line.
            turn_usd = max(float(reported) - self._reported_usd, 0.0)
            self._reported_usd = float(reported)
        failed = bool(obj.get("is_error")) or str(obj.get("subtype") or "").startswith("error")
        if failed or max(self.replays - 1, 0) >= self.steered_sent:
            return obj if turn_usd is None else {**obj, "total_cost_usd": turn_usd}
        usage = obj["usage"] if isinstance(obj.get("usage"), dict) else self.last_usage
        in_tok, out_tok = as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens"))
        if in_tok or out_tok or turn_usd is not None:
            out.append(self.cost(in_tok, out_tok, turn_usd))
        return None

    def handle(self, obj: dict[str, Any], out: list[pb.Event]) -> None:
        t = obj.get("type") or obj.get("event")
        if t == "control_request":
            req: dict[str, Any] = obj["request"] if isinstance(obj.get("request"), dict) else {}
            rid = str(obj.get("request_id") or "")
            if req.get("subtype") == "can_use_tool" and rid:
                self._permission_requests[rid] = req
                details = {"tool_input": req.get("input") or {}, "tool_use_id": req.get("tool_use_id")}
                out.append(pb.Event(kind=KIND_VALUES["approval_requested"], approval_requested=pb.ApprovalRequested(
                    approval_id=rid, subject=str(req.get("tool_name") or ""), details_json=json.dumps(details))))
            else:
                out.append(ev_raw(obj))
            return
        if t == "stream_event":
            event = obj.get("event") or {}
            delta = event.get("delta") if isinstance(event, dict) else None
            if event.get("type") == "content_block_delta" and isinstance(delta, dict) and delta.get("type") == "text_delta":
                out.append(ev_delta(str(delta.get("text") or "")))
            return  # other stream events only re-state what the assistant lines carry
        if t == "assistant" or t == "assistant_message":
            msg = obj.get("message")
            self.assistant(msg if isinstance(msg, dict) else {"content": obj.get("content") or []}, out)
        elif t == "user" and obj.get("isReplay"):
            self.replays += 1
            if self.replays > 1:  # a steered message the CLI took (the prompt itself is not news)
                self.user(obj.get("message") or {}, out)
        elif t == "user":
            self.user(obj.get("message") or {}, out)
        elif t == "result":
            final = self.turn_result(obj, out)
            if final is not None:
                self.result(final, out)
        elif t == "system" and obj.get("subtype") == "init":
            rest = {k: v for k, v in obj.items() if k not in (
                "type", "subtype", "model", "tools", "cwd", "permissionMode", "mcp_servers", "claude_code_version")}
            out.append(provider_init_event(
                model=str(obj.get("model") or ""), tools=obj.get("tools") or [], cwd=str(obj.get("cwd") or ""),
                permission_mode=str(obj.get("permissionMode") or ""), mcp_servers=obj.get("mcp_servers") or [],
                cli_version=str(obj.get("claude_code_version") or ""), details=rest))
        elif t == "system" and obj.get("subtype") == "api_retry":
            status = obj.get("error_status") if isinstance(obj.get("error_status"), int) else None
            err = str(obj.get("error") or "api error")
            msg = f"API retry {obj.get('attempt', '?')}/{obj.get('max_retries', '?')}: {err}" + (
                f" (HTTP {status})" if status else "")
            out.append(error_event(msg, classify_api_error(err, status), "provider", severity=pb.SEVERITY_WARNING))
        elif t in ("assistant_delta", "text_delta"):  # ASM's flat vocabulary, kept as aliases
            out.append(ev_delta(str(obj.get("delta") or obj.get("text") or "")))
        elif t == "tool_use":
            out.append(ev_tool_use(str(obj.get("tool_name") or obj.get("name") or ""),
                                   str(obj.get("tool_id") or obj.get("id") or ""), obj.get("tool_input") or obj.get("input") or {}))
        elif t == "tool_result":
            out.append(ev_tool_result(str(obj.get("tool_id") or obj.get("id") or ""), obj.get("content"),
                                      bool(obj.get("is_error") or obj.get("error"))))
        elif t == "thinking":
            out.append(ev_thinking(str(obj.get("thinking") or obj.get("text") or ""), str(obj.get("signature") or "")))
        elif t == "error":
            out.append(error_event(str(obj.get("message") or "Claude CLI error"), classify_api_error(str(obj.get("message") or "")),
                                   "provider", severity=pb.SEVERITY_WARNING))
        else:
            out.append(ev_raw(obj))


def read_claude_session(f: SessionFile) -> Found | None:
    """A transcript ``<session-id>.jsonl``: the cwd its lines carry and its first prompt (or summary)."""
    if not f.name.endswith(".jsonl"):
        return None
    sid, cwd, label, seen = f.name[: -len(".jsonl")], "", "", False
    for obj in f.objects():
        if obj.get("sessionId") not in (None, sid):
            return None  # not this session's transcript
        seen = seen or "sessionId" in obj
        cwd = cwd or str(obj.get("cwd") or "")
        kind = obj.get("type")
        if not label and kind == "summary":
            label = label_of(str(obj.get("summary") or ""))
        elif not label and kind == "user" and not obj.get("isMeta") and isinstance(obj.get("message"), dict):
            text = text_of(obj["message"].get("content")).strip()
            if text and not text.startswith("<"):  # "<command-name>...", caveats: not the user's words
                label = label_of(text)
        if cwd and label:
            break
    return Found(sid, label, cwd) if seen else None


class ClaudeProvider(CliProvider):
    name = "claude"
    #: The common features (supported?, how), shown by `asm providers`: declared here, with the CLI.
    features: ClassVar[Mapping[str, tuple[bool, str]]] = {
            "streaming": (True, "--include-partial-messages text deltas"),
            "tools": (True, "tool_use / tool_result from assistant and user lines"),
            "resume": (True, "--resume=<session_id>, or --continue for the latest"),
            "interrupt": (True, "SIGINT to the process group; the session stays resumable"),
            "cost": (True, "usage and total_cost_usd from the result line"),
            "approvals": (True, "option approvals=true: --permission-prompt-tool stdio, asm asks and writes the answer back; "
                          "otherwise the permission mode decides"),
            "ollama": (True, "ANTHROPIC_BASE_URL/AUTH_TOKEN pointed at Ollama"),
            "steering": (True, "Session.send_input / asm input: a user message into the running session over "
                         "stream-json input (off with steering=false)"),
            "mcp": (True, "operator-only option mcp_servers: --mcp-config with --strict-mcp-config"),
    }
    #: Transcripts: ~/.claude/projects/<cwd with / and . as ->/<session-id>.jsonl (CLAUDE_CONFIG_DIR moves
    #: ~/.claude); resumable with --resume <id>.
    session_store: ClassVar[SessionStore | None] = SessionStore(
        "claude_projects_jsonl", ".claude", ("CLAUDE_CONFIG_DIR", ""), ("projects", "*", "*.jsonl"), read_claude_session)
    display_name = "Claude CLI"
    #: ASM's model catalog (priv/models): ``/v1/models`` lists these as provider:model.
    models: ClassVar[tuple[str, ...]] = ("opus", "sonnet", "haiku")
    #: ASM.Cost.Models (USD per token); the CLI's own total_cost_usd wins over these when it reports one.
    pricing: ClassVar[Mapping[str, tuple[float, float]]] = {
        "": (0.000003, 0.000015),
        "claude-3-5-sonnet": (0.000003, 0.000015),
        "claude-3-7-sonnet": (0.000003, 0.000015),
    }
    env_var = "CLAUDE_CLI_PATH"
    path_candidates = ("claude-code", "claude")
    known_locations = (
        "~/.npm-global/bin/claude", "/usr/local/bin/claude", "~/.local/bin/claude", "~/node_modules/.bin/claude",
        "~/.yarn/bin/claude", "~/.claude/local/claude",
    )
    install_hint = "npm install -g @anthropic-ai/claude-code"
    options_model = ClaudeOptions
    permission_modes: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        PermissionMode.DEFAULT: ("default", ("--permission-mode", "default")),
        PermissionMode.AUTO: ("accept_edits", ("--permission-mode", "acceptEdits")),
        PermissionMode.BYPASS: ("bypass_permissions", ("--permission-mode", "bypassPermissions")),
        PermissionMode.PLAN: ("plan", ("--permission-mode", "plan")),
    }
    parser_class = ClaudeParser
    #: Where Claude sends the node's ANTHROPIC_API_KEY, and the credential it sends.
    operator_options: ClassVar[frozenset[str]] = CliProvider.operator_options | {
        "anthropic_base_url", "anthropic_auth_token", "mcp_servers"}

    def build_command(self, spec: RunSpec) -> CommandSpec:
        cmd = super().build_command(spec)
        opts = spec.options["parsed"]
        if not (opts.approvals or opts.steering):
            return cmd
        # The prompt goes in as a stream-json user message; stdin stays open for approval answers
        # and steered messages until the last turn's result.
        message = {"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": spec.prompt}]}}
        return dataclasses.replace(cmd, stdin=True, stdin_data=(json.dumps(message) + "\n").encode(),
                                   close_stdin_at_end=True)

    def apply_ollama(self, opts: Any) -> None:
        if opts.provider_backend not in (None, "ollama"):
            raise ConfigError("Ollama needs provider_backend ollama (or unset) for claude")
        opts.provider_backend = "ollama"
        if opts.ollama_base_url:
            opts.anthropic_base_url = opts.ollama_base_url
        opts.anthropic_auth_token = opts.anthropic_auth_token or "ollama"
        if opts.model and opts.ollama_model and opts.model != opts.ollama_model:
            existing = opts.external_model_overrides.get(opts.model)
            if existing not in (None, opts.ollama_model):
                raise ConfigError(f"external_model_overrides[{opts.model!r}] conflicts with ollama_model")
            opts.external_model_overrides[opts.model] = opts.ollama_model
        opts.model = opts.model or opts.ollama_model

    def argv(self, path: str, spec: RunSpec, opts: Any) -> tuple[list[str], dict[str, str]]:
        _, mode_args = self.native_mode(spec.permission_mode)
        argv = [path, "--print", "--output-format", "stream-json", "--verbose"]
        if opts.include_partial_messages:
            argv.append("--include-partial-messages")
        argv += list(mode_args)
        model = opts.external_model_overrides.get(opts.model, opts.model) if opts.model else None
        if model:
            argv.append(f"--model={model}")
        if opts.max_turns:
            argv.append(f"--max-turns={opts.max_turns}")
        if opts.system_prompt:
            argv.append(f"--system-prompt={opts.system_prompt}")
        if opts.append_system_prompt:
            argv.append(f"--append-system-prompt={opts.append_system_prompt}")
        if opts.resume == "latest":
            argv.append("--continue")
        elif opts.resume:
            argv.append(f"--resume={opts.resume}")
        if opts.mcp_servers:
            # Exactly these servers: the node user's own MCP configuration is not mixed in.
            # From a private file: the servers' env values must not be on argv (ps, the run_started event).
            config = write_claude_config(opts.mcp_servers, spec.env, spec.run_id)
            spec.files.append(config)
            argv += [f"--mcp-config={config}", "--strict-mcp-config"]
        argv += opts.args
        if opts.approvals or opts.steering:
            # --replay-user-messages: the CLI echoes each input message as it takes it (turn accounting).
            argv += ["--input-format", "stream-json", "--replay-user-messages"]
            if opts.approvals:
                argv += ["--permission-prompt-tool", "stdio"]
        else:
            argv += ["--", spec.prompt]
        env: dict[str, str] = {}
        if opts.anthropic_base_url:
            env["ANTHROPIC_BASE_URL"] = opts.anthropic_base_url
        if opts.anthropic_auth_token:
            env["ANTHROPIC_AUTH_TOKEN"] = opts.anthropic_auth_token
        if opts.provider_backend == "ollama":
            env["ANTHROPIC_API_KEY"] = ""
            env.setdefault("ANTHROPIC_BASE_URL", "http://127.0.0.1:11434")
        return argv, env
