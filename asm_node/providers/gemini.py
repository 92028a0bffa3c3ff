"""Gemini CLI: ``gemini --prompt=... --output-format stream-json``.

The real CLI prints ``init{session_id}``, ``message`` lines (the user turn, then
assistant text as ``delta: true`` chunks), ``tool_use{tool_name, tool_id,
parameters}``, ``tool_result{tool_id, status, output|error}`` and a final
``result{status: success|error, stats}``. Its exit codes are unusual: 41 bad
auth settings, 55 untrusted folder, 145 after an HTTP 401, 244 after an HTTP 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

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
    ev_tool_result,
    ev_tool_use,
    ev_user,
)
from asm_node.providers._mcp import McpServers, write_gemini_settings
from asm_node.providers._sessions import Found, SessionFile, SessionStore, label_of, text_of
from asm_node.providers.base import ExitInfo, RunSpec, error_event, provider_init_event, result_event, stderr_summary
from asm_wire import ConfigError, pb

_EXIT_CODES = {
    41: ("auth_error", "Gemini CLI auth settings are invalid"),
    55: ("config_invalid", "Gemini CLI refuses to run in an untrusted folder (set GEMINI_CLI_TRUST_WORKSPACE=true)"),
    145: ("auth_error", "Gemini API refused the credentials (HTTP 401)"),
    244: ("transport_error", "Gemini API failed (HTTP 500)"),
}


class GeminiOptions(CommonOptions):
    system_prompt: str | None = None
    sandbox: bool = False
    extensions: list[str] = Field(default_factory=list)
    #: MCP servers for this run (a system settings file the node writes outside the workspace,
    #: GEMINI_CLI_SYSTEM_SETTINGS_PATH): asm_node.providers._mcp.
    mcp_servers: McpServers = Field(default_factory=dict)


class GeminiParser(JsonLineParser):
    def handle(self, obj: dict[str, Any], out: list[pb.Event]) -> None:
        t = obj.get("type")
        if t == "message":
            role, content = obj.get("role"), obj.get("content")
            if role == "assistant":
                if obj.get("delta"):
                    out.append(ev_delta(content if isinstance(content, str) else ""))
                else:
                    out.append(ev_message(content if isinstance(content, list) else [str(content or "")],
                                          str(obj.get("model") or "")))
            elif role == "user":
                out.append(ev_user(content if isinstance(content, list) else [str(content or "")]))
            else:
                out.append(ev_raw(obj))
        elif t == "init":
            out.append(provider_init_event(model=str(obj.get("model") or ""), details={
                k: v for k, v in obj.items() if k not in ("type", "model")}))
        elif t == "tool_use":
            out.append(ev_tool_use(str(obj.get("tool_name") or obj.get("name") or ""),
                                   str(obj.get("tool_id") or obj.get("id") or ""),
                                   obj.get("parameters", obj.get("tool_input", obj.get("input"))) or {}))
        elif t == "tool_result":
            is_error = obj.get("status") == "error" or bool(obj.get("is_error"))
            content = obj.get("output", obj.get("content"))
            if is_error and content is None:
                content = obj.get("error")
            out.append(ev_tool_result(str(obj.get("tool_id") or obj.get("id") or ""), content, is_error))
        elif t == "result":
            stats: dict[str, Any] = obj["stats"] if isinstance(obj.get("stats"), dict) else {}
            in_tok, out_tok = as_int(stats.get("input_tokens")), as_int(stats.get("output_tokens"))
            if in_tok or out_tok:
                out.append(self.cost(in_tok, out_tok))
            if obj.get("status") == "error":
                err: dict[str, Any] = obj["error"] if isinstance(obj.get("error"), dict) else {}
                msg = str(err.get("message") or "Gemini CLI reported an error result")
                self.end(out, error_event(msg, classify_api_error(msg), "provider"), failed=True)
            else:
                self.end(out, result_event("completed", str(obj.get("status") or "success"), {"stats": stats}))
        elif t == "error":
            msg = str(obj.get("message") or "Gemini CLI error")
            if str(obj.get("severity") or "").lower() == "fatal":
                self.end(out, error_event(msg, classify_api_error(msg), "provider", severity=pb.SEVERITY_FATAL), failed=True)
            else:
                out.append(error_event(msg, classify_api_error(msg), "provider", severity=pb.SEVERITY_WARNING))
        else:
            out.append(ev_raw(obj))

    def exit_error(self, exit: ExitInfo) -> pb.Event | None:
        known = _EXIT_CODES.get(exit.returncode or 0)
        if known is None:
            return None
        kind, text = known
        detail = stderr_summary(exit.stderr_tail, lines=2)
        return error_event(text + (f": {detail}" if detail else ""), kind, "provider", exit_code=exit.returncode or -1)


def read_gemini_session(f: SessionFile) -> Found | None:
    """A chat log ``session-*.jsonl`` (Gemini CLI 0.61): the first line holds ``sessionId``; messages
    follow one a line (``$set`` lines update fields); the project's cwd is in ``../.project_root``."""
    lines = f.objects()
    head = next(lines, None)
    if head is None or not isinstance(head.get("sessionId"), str):
        return None
    root = f.sibling("..", ".project_root")
    cwd = root.decode("utf-8", "replace").strip() if root else ""
    for obj in lines:
        for msg in obj.get("$set", {}).get("messages", []) if isinstance(obj.get("$set"), dict) else [obj]:
            if isinstance(msg, dict) and msg.get("type") == "user":
                text = text_of(msg.get("content")).strip()
                if text and not text.startswith("<session_context>"):
                    return Found(head["sessionId"], label_of(text), cwd)
    return Found(head["sessionId"], "", cwd)


class GeminiProvider(CliProvider):
    name = "gemini"
    #: The common features (supported?, how), shown by `asm providers`: declared here, with the CLI.
    features: ClassVar[Mapping[str, tuple[bool, str]]] = {
            "streaming": (True, "assistant message deltas"),
            "tools": (True, "tool_use / tool_result"),
            "resume": (True, "--resume=<session_id> or --resume=latest"),
            "interrupt": (True, "SIGINT to the process group"),
            "cost": (True, "stats from the result line, priced with the table"),
            "approvals": (False, "headless mode never prompts; --approval-mode / --yolo decide"),
            "ollama": (False, "not supported by the Gemini CLI"),
            "steering": (False, "headless mode reads its prompt once; no input while it runs"),
            "mcp": (True, "operator-only option mcp_servers: a system settings file the node writes (root-owned "
                    "path required by the CLI, else mcp_unsupported)"),
    }
    #: Chats: ~/.gemini/tmp/<project>/chats/session-<time>-<id>.jsonl, the project's cwd in
    #: <project>/.project_root (GEMINI_CLI_HOME replaces HOME); resumable with --resume <id>.
    session_store: ClassVar[SessionStore | None] = SessionStore(
        "gemini_chats_jsonl", ".gemini", ("GEMINI_CLI_HOME", ".gemini"), ("tmp", "*", "chats", "session-*.jsonl"),
        read_gemini_session)
    display_name = "Gemini CLI"
    #: ASM's model catalog (priv/models): ``/v1/models`` lists these as provider:model.
    models: ClassVar[tuple[str, ...]] = ("gemini-2.5-pro", "gemini-2.5-flash")
    #: ASM.Cost.Models (USD per token).
    pricing: ClassVar[Mapping[str, tuple[float, float]]] = {
        "": (0.0000015, 0.000006),
        "gemini-2.5-pro": (0.000002, 0.000008),
        "gemini-2.5-flash": (0.000001, 0.000004),
    }
    env_var = "GEMINI_CLI_PATH"
    path_candidates = ("gemini",)
    install_hint = "npm install -g @google/gemini-cli"
    options_model = GeminiOptions
    permission_modes: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "default": ("default", ()),  # headless: tools that need a confirmation are not offered
        "auto": ("auto_edit", ("--approval-mode", "auto_edit")),
        "bypass": ("yolo", ("--yolo",)),
        "plan": ("plan", ("--approval-mode", "plan")),
    }
    mode_notes: ClassVar[Mapping[str, str]] = {
        "default": "headless Gemini does not offer the tools that would ask (its shell tool)",
    }
    parser_class = GeminiParser
    #: The common ones and mcp_servers: the Gemini endpoint (GOOGLE_GEMINI_BASE_URL) comes from the node's environment.
    operator_options: ClassVar[frozenset[str]] = CliProvider.operator_options | {"mcp_servers"}

    def validate_options(self, options: Any, permission_mode: str) -> dict[str, Any]:
        out = super().validate_options(options, permission_mode)
        if out["parsed"].system_prompt is not None:
            raise ConfigError("option system_prompt is not supported by the Gemini CLI in headless mode")
        return out

    def argv(self, path: str, spec: RunSpec, opts: Any) -> tuple[list[str], dict[str, str]]:
        _, mode_args = self.native_mode(spec.permission_mode)
        argv = [path, f"--prompt={spec.prompt}", "--output-format", "stream-json"]
        if opts.model:
            argv.append(f"--model={opts.model}")
        if opts.sandbox:
            argv.append("--sandbox")
        if opts.extensions:
            argv.append(f"--extensions={','.join(opts.extensions)}")
        if opts.resume:
            argv.append(f"--resume={opts.resume}")
        argv += list(mode_args)
        argv += opts.args
        env: dict[str, str] = {}
        if opts.mcp_servers:
            settings = write_gemini_settings(opts.mcp_servers, spec.env, spec.run_id, spec.cwd)
            spec.files.append(settings)  # removed when the run ends (it may hold servers' env values)
            env["GEMINI_CLI_SYSTEM_SETTINGS_PATH"] = settings
        return argv, env
