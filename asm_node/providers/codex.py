"""Codex: ``codex exec --json`` (JSONL of thread/turn/item events).

The real CLI prints ``thread.started{thread_id}``, ``turn.started``, then
``item.started`` / ``item.completed`` for agent messages, reasoning and tool
items (command_execution, file_change, mcp_tool_call, web_search, todo_list),
and ends with ``turn.completed{usage}`` or ``turn.failed{error}``; top-level
``error`` lines are retry notices ("Reconnecting... 1/1"). stdin must be
/dev/null: codex reads stdin to EOF before it starts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from asm_node.providers._cli import (
    CliProvider,
    CommonOptions,
    JsonLineParser,
    as_int,
    classify_api_error,
    ev_message,
    ev_raw,
    ev_thinking,
    ev_tool_result,
    ev_tool_use,
)
from asm_node.providers._mcp import McpServers, codex_config
from asm_node.providers._sessions import Found, SessionFile, SessionStore, label_of, text_of
from asm_node.providers.base import RunSpec, error_event, result_event
from asm_wire import ConfigError, PermissionMode, pb

_TOOL_ITEMS = ("command_execution", "file_change", "mcp_tool_call", "web_search", "todo_list")
_FAILED = ("failed", "errored", "error", "interrupted", "not_found", "declined")


class CodexOptions(CommonOptions):
    system_prompt: str | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    provider_backend: Literal["openai", "oss", "model_provider"] | None = None
    model_provider: str | None = None
    oss_provider: str | None = None
    skip_git_repo_check: bool = False
    output_schema: dict[str, Any] | None = None
    additional_directories: list[str] = Field(default_factory=list)
    sandbox: Literal["read-only", "workspace-write", "danger-full-access"] | None = None
    #: Extra ``-c key=value`` settings (values are TOML-encoded from JSON).
    config: dict[str, Any] = Field(default_factory=dict)
    #: MCP servers for this run (``-c mcp_servers.<name>.*``): asm_node.providers._mcp.
    mcp_servers: McpServers = Field(default_factory=dict)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value)  # strings, lists and tables in JSON form are valid TOML inline values


def tool_of(item: dict[str, Any]) -> tuple[str, Any]:
    t = item.get("type")
    if t == "command_execution":
        cmd = item.get("command")
        return "Bash", {"command": " ".join(cmd) if isinstance(cmd, list) else cmd}
    if t == "file_change":
        changes = item.get("changes") or []
        first = changes[0].get("path") if changes and isinstance(changes[0], dict) else None
        return "Edit", {"file_path": first, "changes": changes}
    if t == "web_search":
        return "WebSearch", {"query": item.get("query")}
    if t == "mcp_tool_call":
        return f"{item.get('server')}.{item.get('tool')}", {"arguments": item.get("arguments")}
    return "TodoWrite", {"items": item.get("items")}


class CodexParser(JsonLineParser):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._started_tools: set[str] = set()

    def handle(self, obj: dict[str, Any], out: list[pb.Event]) -> None:
        t = obj.get("type")
        item = obj.get("item") if isinstance(obj.get("item"), dict) else None
        if t == "item.started" and item is not None:
            if item.get("type") in _TOOL_ITEMS:
                iid = str(item.get("id") or "")
                self._started_tools.add(iid)
                name, tool_input = tool_of(item)
                out.append(ev_tool_use(name, iid, tool_input))
            return  # a text item that started says nothing yet
        if t == "item.completed" and item is not None:
            itype = item.get("type")
            iid = str(item.get("id") or "")
            if itype == "agent_message":
                out.append(ev_message([str(item.get("text") or "")], str(item.get("model") or "")))
            elif itype == "reasoning":
                out.append(ev_thinking(str(item.get("text") or item.get("thinking") or ""), str(item.get("signature") or "")))
            elif itype in _TOOL_ITEMS:
                if iid not in self._started_tools:
                    name, tool_input = tool_of(item)
                    out.append(ev_tool_use(name, iid, tool_input))
                content = next((item[k] for k in ("aggregated_output", "result", "output", "content") if k in item), None)
                exit_code = item.get("exit_code")
                is_error = item.get("status") in _FAILED or (isinstance(exit_code, int) and exit_code != 0)
                out.append(ev_tool_result(iid, content, is_error))
            elif itype == "error":
                out.append(error_event(str(item.get("message") or "codex error"), "unknown", "provider",
                                       severity=pb.SEVERITY_WARNING))
            else:
                out.append(ev_raw(obj))
            return
        if t == "turn.completed":
            usage: dict[str, Any] = obj["usage"] if isinstance(obj.get("usage"), dict) else {}
            in_tok, out_tok = as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens"))
            out.append(self.cost(in_tok, out_tok))
            self.end(out, result_event("completed", "end_turn", {"usage": usage}))
        elif t == "turn.failed":
            err: dict[str, Any] = obj["error"] if isinstance(obj.get("error"), dict) else {}
            msg = str(err.get("message") or "Codex turn failed")
            self.end(out, error_event(msg, classify_api_error(msg), "provider"), failed=True)
        elif t == "error":
            msg = str(obj.get("message") or obj.get("error") or "Codex error")
            out.append(error_event(msg, classify_api_error(msg), "provider", severity=pb.SEVERITY_WARNING))
        else:
            out.append(ev_raw(obj))


def read_codex_session(f: SessionFile) -> Found | None:
    """A rollout file: its first line is ``session_meta`` (id = the thread id, cwd); the label is the
    first user message that is not the CLI's own context (``<environment_context>``, ...)."""
    lines = f.objects()
    meta = next(lines, None)
    if meta is None or meta.get("type") != "session_meta" or not isinstance(meta.get("payload"), dict):
        return None
    payload = meta["payload"]
    sid, cwd = str(payload.get("id") or ""), str(payload.get("cwd") or "")
    for obj in lines:
        item = obj.get("payload")
        if obj.get("type") == "response_item" and isinstance(item, dict) and item.get("type") == "message" \
                and item.get("role") == "user":
            text = text_of(item.get("content")).strip()
            if text and not text.startswith("<"):
                return Found(sid, label_of(text), cwd)
    return Found(sid, "", cwd)


class CodexProvider(CliProvider):
    name = "codex"
    #: The common features (supported?, how), shown by `asm providers`: declared here, with the CLI.
    features: ClassVar[Mapping[str, tuple[bool, str]]] = {
            "streaming": (True, "item events; agent messages arrive whole"),
            "tools": (True, "command_execution, file_change, mcp_tool_call, web_search, todo_list"),
            "resume": (True, "exec resume <thread_id>, or exec resume --last"),
            "interrupt": (True, "SIGINT to the process group; the thread stays resumable"),
            "cost": (True, "usage from turn.completed, priced with the table"),
            "approvals": (False, "codex exec never prompts"),
            "ollama": (True, "--oss with model_provider ollama"),
    }
    #: Rollouts: $CODEX_HOME (default ~/.codex)/sessions/YYYY/MM/DD/rollout-<time>-<thread id>.jsonl;
    #: resumable with exec resume <id>.
    session_store: ClassVar[SessionStore | None] = SessionStore(
        "codex_sessions_jsonl", ".codex", ("CODEX_HOME", ""),
        ("sessions", "[0-9][0-9][0-9][0-9]", "[0-9][0-9]", "[0-9][0-9]", "rollout-*.jsonl"), read_codex_session)
    display_name = "Codex CLI"
    env_var = "CODEX_PATH"
    path_candidates = ("codex",)
    install_hint = "npm install -g @openai/codex"
    options_model = CodexOptions
    permission_modes: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        PermissionMode.DEFAULT: ("default", ()),
        PermissionMode.BYPASS: ("yolo", ("--dangerously-bypass-approvals-and-sandbox",)),
        PermissionMode.PLAN: ("plan", ("--sandbox", "read-only")),
    }
    unsupported_modes: ClassVar[dict[str, str]] = {
        PermissionMode.AUTO: (
            "permission mode 'auto' is not supported for codex: codex's auto-edit mode (--full-auto) writes a "
            "repo-local .codex directory, so asm (like ASM) refuses it; use default, plan or bypass, or "
            "--opt sandbox=workspace-write"
        ),
    }
    parser_class = CodexParser
    #: Any ``-c`` setting: model_providers.*.base_url (where the key goes), mcp_servers.*.command (what runs),
    #: shell_environment_policy (the tools' environment).
    operator_options: ClassVar[frozenset[str]] = CliProvider.operator_options | {"config", "mcp_servers"}

    def validate_options(self, options: Any, permission_mode: str) -> dict[str, Any]:
        out = super().validate_options(options, permission_mode)
        opts = out["parsed"]
        if opts.system_prompt is not None:
            raise ConfigError("option system_prompt is not supported by codex exec (put instructions in AGENTS.md)")
        return out

    def apply_ollama(self, opts: Any) -> None:
        if opts.provider_backend not in (None, "oss"):
            raise ConfigError("Ollama needs provider_backend oss (or unset) for codex")
        if opts.oss_provider not in (None, "ollama"):
            raise ConfigError("Ollama needs oss_provider ollama (or unset) for codex")
        if opts.model and opts.ollama_model and opts.model != opts.ollama_model:
            raise ConfigError("for codex on Ollama, model and ollama_model must be the same")
        opts.provider_backend, opts.oss_provider = "oss", "ollama"
        opts.model = opts.model or opts.ollama_model or "gpt-oss:20b"

    def argv(self, path: str, spec: RunSpec, opts: Any) -> tuple[list[str], dict[str, str]]:
        _, mode_args = self.native_mode(spec.permission_mode)
        argv = [path, "exec"]
        if opts.resume == "latest":
            argv += ["resume", "--last"]
        elif opts.resume:
            argv += ["resume", opts.resume]
        argv.append("--json")
        config: list[tuple[str, Any]] = []
        if opts.provider_backend == "oss":
            argv.append("--oss")
            if opts.model:
                config.append(("model", opts.model))
        elif opts.model:
            argv.append(f"--model={opts.model}")
        if opts.model_provider:
            config.append(("model_provider", opts.model_provider))
        if opts.reasoning_effort:
            config.append(("model_reasoning_effort", opts.reasoning_effort))
        config += list(opts.config.items())
        for key, value in config:
            argv.append(f"--config={key}={_toml(value)}")
        argv += [f"--config={item}" for item in codex_config(opts.mcp_servers)]
        if opts.skip_git_repo_check:
            argv.append("--skip-git-repo-check")
        if opts.output_schema is not None:
            # codex takes a file path here (ASM's core passed inline JSON, which codex rejects).
            schema_dir = Path(spec.env.get("TMPDIR") or "/tmp") / f"asm-{spec.run_id}"
            schema_dir.mkdir(parents=True, exist_ok=True)
            schema = schema_dir / "output-schema.json"
            schema.write_text(json.dumps(opts.output_schema))
            argv.append(f"--output-schema={schema}")
        for d in opts.additional_directories:
            argv.append(f"--add-dir={d}")
        if opts.sandbox and spec.permission_mode != PermissionMode.BYPASS:
            argv.append(f"--sandbox={opts.sandbox}")
            mode_args = tuple(a for a in mode_args if a not in ("--sandbox", "read-only"))
        argv += list(mode_args)
        argv += opts.args
        argv += ["--", spec.prompt]
        return argv, {}
