"""Codex: ``codex exec --json`` (JSONL of thread/turn/item events).

The real CLI prints ``thread.started{thread_id}``, ``turn.started``, then
``item.started`` / ``item.completed`` for agent messages, reasoning and tool
items (command_execution, file_change, mcp_tool_call, web_search, todo_list),
and ends with ``turn.completed{usage}`` or ``turn.failed{error}``; top-level
``error`` lines are retry notices ("Reconnecting... 1/1"). codex reads stdin to
EOF before it starts: the prompt is given as ``-`` and written to stdin, which
is then closed (a prompt argument with stdin /dev/null makes it print
"Reading additional input from stdin...").
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
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
from asm_node.providers.base import (
    CommandSpec,
    ExitInfo,
    LineParser,
    RunSpec,
    denial,
    denial_warning,
    error_event,
    provider_init_event,
    result_event,
)
from asm_wire import ConfigError, PermissionMode, pb

#: A thread id codex names its rollout file after (a UUID): nothing that could be a path or a glob.
_THREAD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")
#: The bytes of a rollout file's tail the node reads (on its event loop, so bounded): a thread's
#: last token_count and its last turn are near the end; a turn larger than this is not looked into
#: (its sandbox refusals go unreported, its usage is codex's own figure, said so).
ROLLOUT_TAIL_BYTES = 8 << 20
#: What a command refused by codex's sandbox prints (the function_call_output in the rollout).
_SANDBOX_REFUSAL = re.compile(r"read-only file system|operation not permitted|permission denied", re.I)
_EXIT_CODE = re.compile(r"Process exited with code (-?\d+)")
#: What codex prints when the working directory is neither a git repository nor a trusted project.
_UNTRUSTED = "Not inside a trusted directory"
UNTRUSTED_HINT = (
    "Codex CLI refuses to run here: the working directory is not inside a git repository (nor a project "
    "Codex trusts). Set --opt skip_git_repo_check=true (Session(options={'skip_git_repo_check': True})), "
    "or run it in a git repository"
)

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


# -- the thread's rollout file: usage before this run, and what the sandbox refused ------------------


def rollout_file(env: Mapping[str, str], thread_id: str) -> Path | None:
    """$CODEX_HOME/sessions/YYYY/MM/DD/rollout-<time>-<thread id>.jsonl, or None."""
    if not _THREAD_ID.fullmatch(thread_id):
        return None
    store = CodexProvider.session_store
    directory = store.directory(env) if store is not None else None
    if directory is None:
        return None
    try:
        found = sorted((directory / "sessions").glob(f"[0-9]*/[0-9]*/[0-9]*/rollout-*-{thread_id}.jsonl"))
    except OSError:
        return None
    return found[-1] if found else None


def _rollout_tail(path: Path, needles: tuple[bytes, ...]) -> tuple[list[dict[str, Any]], bool] | None:
    """The JSON lines containing one of ``needles`` in the file's last ROLLOUT_TAIL_BYTES, and whether
    that is the whole file; None when it cannot be read."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            start = max(size - ROLLOUT_TAIL_BYTES, 0)
            f.seek(start)
            data = f.read(ROLLOUT_TAIL_BYTES)
    except OSError:
        return None
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first one is cut
    out = []
    for line in lines:
        if any(n in line for n in needles):
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # a torn last line while codex writes it
            if isinstance(obj, dict):
                out.append(obj)
    return out, start == 0


def _payload(obj: dict[str, Any]) -> dict[str, Any]:
    p = obj.get("payload")
    return p if isinstance(p, dict) else {}


def thread_total(path: Path) -> tuple[int, int] | None:
    """The thread's cumulative (input, output) tokens as its last ``token_count`` says; (0, 0) for a
    thread that has none yet; None when that is unknown (unreadable, or none in a long file's tail)."""
    tail = _rollout_tail(path, (b'"token_count"',))
    if tail is None:
        return None
    lines, whole = tail
    for obj in reversed(lines):
        p = _payload(obj)
        info = p.get("info") if p.get("type") == "token_count" else None
        usage = info.get("total_token_usage") if isinstance(info, dict) else None
        if isinstance(usage, dict):
            return as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens"))
    return (0, 0) if whole else None


@dataclass
class LastTurn:
    """What the rollout says about the thread's last turn (this run's)."""

    #: (input, output) tokens of this turn's requests (the sum of their ``last_token_usage``).
    usage: tuple[int, int] = (0, 0)
    #: call id -> (tool name, arguments) and call id -> output text.
    calls: dict[str, tuple[str, Any]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


def last_turn(path: Path) -> LastTurn | None:
    """The thread's last turn (from its last ``task_started``); None when unknown."""
    tail = _rollout_tail(path, (b'"task_started"', b'"token_count"', b'"function_call'))
    if tail is None:
        return None
    lines, whole = tail
    turn = LastTurn()
    started = False
    for obj in lines:
        p = _payload(obj)
        kind = p.get("type")
        if kind == "task_started":
            turn, started = LastTurn(), True
        elif kind == "token_count" and isinstance(p.get("info"), dict):
            last = p["info"].get("last_token_usage")
            if isinstance(last, dict):
                turn.usage = (turn.usage[0] + as_int(last.get("input_tokens")),
                              turn.usage[1] + as_int(last.get("output_tokens")))
        elif kind == "function_call":
            args: Any = p.get("arguments")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                pass
            turn.calls[str(p.get("call_id") or "")] = (str(p.get("name") or ""), args)
        elif kind == "function_call_output":
            output = p.get("output")
            turn.outputs[str(p.get("call_id") or "")] = output if isinstance(output, str) else json.dumps(output)
    return turn if started or whole else None


def sandbox_refusals(turn: LastTurn) -> list[dict[str, Any]]:
    """The turn's commands that failed with what a sandbox refusal prints, as normalized denials."""
    out = []
    for call_id, text in turn.outputs.items():
        code = _EXIT_CODE.search(text)
        refusal = _SANDBOX_REFUSAL.search(text)
        if refusal is None or (code is not None and code.group(1) == "0"):
            continue
        name, args = turn.calls.get(call_id, ("", {}))
        line = next((ln.strip() for ln in text.splitlines() if _SANDBOX_REFUSAL.search(ln)), refusal.group(0))
        cmd = args.get("cmd", args.get("command")) if isinstance(args, dict) else args
        tool, tool_input = ("Bash", {"command": cmd}) if name in ("exec_command", "shell", "local_shell") else \
            (name, args if isinstance(args, dict) else {"value": args})
        # EROFS is the sandbox's own answer to a write; EPERM/EACCES inside it most likely are too.
        sure = "read-only file system" in line.lower()
        why = "refused by codex's sandbox" if sure else "failed inside codex's sandbox"
        out.append(denial(tool, tool_input, f"{why}: {line[:500]}"))
    return out


class CodexParser(JsonLineParser):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._started_tools: set[str] = set()
        #: Set by CodexProvider.new_parser: where the rollout files are, whether commands run sandboxed.
        self.env: Mapping[str, str] = {}
        self.sandboxed = False
        #: The thread's usage before this run, by thread id (read before the CLI started), for a resume.
        self.baseline: dict[str, tuple[int, int]] = {}
        self.resumed = False
        self.thread_id = ""

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
        if t == "thread.started":
            self.thread_id = str(obj.get("thread_id") or "")
            out.append(provider_init_event(details={k: v for k, v in obj.items() if k != "type"}))
            return
        if t == "turn.completed":
            usage: dict[str, Any] = obj["usage"] if isinstance(obj.get("usage"), dict) else {}
            in_tok, out_tok = as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens"))
            output: dict[str, Any] = {"usage": usage}
            turn = self._last_turn()
            if self.resumed:
                in_tok, out_tok = self._per_run(in_tok, out_tok, turn, output, out)
            out.append(self.cost(in_tok, out_tok))
            if self.sandboxed and turn is not None:
                denials = sandbox_refusals(turn)
                if denials:
                    output["denials"] = denials
                    if len(denials) >= len(turn.calls):
                        output["all_tools_denied"] = True
                    out.extend(denial_warning(d) for d in denials)
            self.end(out, result_event("completed", "end_turn", output))
        elif t == "turn.failed":
            err: dict[str, Any] = obj["error"] if isinstance(obj.get("error"), dict) else {}
            msg = str(err.get("message") or "Codex turn failed")
            self.end(out, error_event(msg, classify_api_error(msg), "provider"), failed=True)
        elif t == "error":
            msg = str(obj.get("message") or obj.get("error") or "Codex error")
            out.append(error_event(msg, classify_api_error(msg), "provider", severity=pb.SEVERITY_WARNING))
        else:
            out.append(ev_raw(obj))


    def _last_turn(self) -> LastTurn | None:
        path = rollout_file(self.env, self.thread_id) if self.env else None
        return last_turn(path) if path is not None else None

    def _per_run(self, in_tok: int, out_tok: int, turn: LastTurn | None, output: dict[str, Any],
                 out: list[pb.Event]) -> tuple[int, int]:
        """Codex reports a resumed thread's cumulative usage: this run's is the total minus the
        thread's usage before the run (read from its rollout before the CLI started); else the
        rollout's own sum for this turn; else, said so in a warning, what codex reported."""
        output["thread_usage"] = {"input_tokens": in_tok, "output_tokens": out_tok}
        before = self.baseline.get(self.thread_id)
        if before is not None:
            return max(in_tok - before[0], 0), max(out_tok - before[1], 0)
        if turn is not None and turn.usage != (0, 0):
            return turn.usage
        out.append(error_event("Codex reported the resumed thread's cumulative usage and its usage before this run "
                               "is unknown: the cost_update counts the whole thread", "unknown", "provider",
                               severity=pb.SEVERITY_WARNING))
        return in_tok, out_tok

    def exit_error(self, exit: ExitInfo) -> pb.Event | None:
        if _UNTRUSTED in exit.stderr_tail:
            return error_event(UNTRUSTED_HINT, "config_invalid", "config", exit_code=exit.returncode or -1)
        return None


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


def latest_thread(env: Mapping[str, str], cwd: str) -> str:
    """The thread ``codex exec resume --last`` picks: the newest rollout recorded in this cwd."""
    store = CodexProvider.session_store
    if store is None:
        return ""
    for s in store.sessions("codex", env, 50):
        if s.cwd == cwd:
            return s.id
    return ""


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
            "steering": (False, "codex exec reads its prompt once; no input while it runs"),
            "mcp": (True, "operator-only option mcp_servers: -c mcp_servers.<name>.* settings"),
    }
    #: Rollouts: $CODEX_HOME (default ~/.codex)/sessions/YYYY/MM/DD/rollout-<time>-<thread id>.jsonl;
    #: resumable with exec resume <id>.
    session_store: ClassVar[SessionStore | None] = SessionStore(
        "codex_sessions_jsonl", ".codex", ("CODEX_HOME", ""),
        ("sessions", "[0-9][0-9][0-9][0-9]", "[0-9][0-9]", "[0-9][0-9]", "rollout-*.jsonl"), read_codex_session)
    display_name = "Codex CLI"
    #: ASM's model catalog (priv/models): ``/v1/models`` lists these as provider:model.
    models: ClassVar[tuple[str, ...]] = ("gpt-5-codex",)
    #: ASM.Cost.Models (USD per token).
    pricing: ClassVar[Mapping[str, tuple[float, float]]] = {
        "": (0.000001, 0.000004),
        "gpt-5-codex": (0.000001, 0.000004),
    }
    env_var = "CODEX_PATH"
    path_candidates = ("codex",)
    install_hint = "npm install -g @openai/codex"
    options_model = CodexOptions
    permission_modes: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        PermissionMode.DEFAULT: ("read-only sandbox", ()),
        PermissionMode.BYPASS: ("yolo", ("--dangerously-bypass-approvals-and-sandbox",)),
        PermissionMode.PLAN: ("plan", ("--sandbox", "read-only")),
    }
    mode_notes: ClassVar[Mapping[str, str]] = {
        PermissionMode.DEFAULT: ("codex exec's own default: writes are refused (permission_denied warnings, "
                                 "the result's denials); --opt sandbox=workspace-write allows writes in the workspace"),
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

    #: codex exec prints this whenever stdin is not a terminal (the node gives it /dev/null).
    stderr_noise: ClassVar[tuple[str, ...]] = ("Reading additional input from stdin",)

    def new_parser(self, spec: RunSpec) -> LineParser:
        parser = super().new_parser(spec)
        assert isinstance(parser, CodexParser)
        opts = spec.options["parsed"]
        parser.env = dict(spec.env)
        parser.sandboxed = spec.permission_mode != PermissionMode.BYPASS and opts.sandbox != "danger-full-access"
        if opts.resume:
            # Read before the CLI starts (it appends to the same file): the thread's usage so far.
            parser.resumed = True
            thread = opts.resume if opts.resume != "latest" else latest_thread(spec.env, spec.cwd)
            path = rollout_file(spec.env, thread) if thread else None
            total = thread_total(path) if path is not None else None
            if thread and total is not None:
                parser.baseline[thread] = total
        return parser

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
        overrides, forwarded = codex_config(opts.mcp_servers, spec.env)
        argv += [f"--config={item}" for item in overrides]
        if opts.skip_git_repo_check:
            argv.append("--skip-git-repo-check")
        if opts.output_schema is not None:
            # codex takes a file path here (ASM's core passed inline JSON, which codex rejects). A
            # private directory (mkdtemp: 0700, a name nobody can guess and plant a link or dir at
            # first); remove_run_files removes it at the run's end (its name starts with "asm-").
            base = Path(spec.env.get("TMPDIR") or "/tmp")
            base.mkdir(parents=True, exist_ok=True)
            schema_dir = Path(tempfile.mkdtemp(prefix=f"asm-{spec.run_id}-", dir=base))
            schema = schema_dir / "output-schema.json"
            schema.write_text(json.dumps(opts.output_schema))
            spec.files.append(str(schema))
            argv.append(f"--output-schema={schema}")
        for d in opts.additional_directories:
            argv.append(f"--add-dir={d}")
        if opts.sandbox and spec.permission_mode != PermissionMode.BYPASS:
            argv.append(f"--sandbox={opts.sandbox}")
            mode_args = tuple(a for a in mode_args if a not in ("--sandbox", "read-only"))
        argv += list(mode_args)
        argv += opts.args
        # The prompt goes in on stdin ("-"; build_command writes it and closes stdin): with the prompt
        # as an argument codex still reads stdin and says "Reading additional input from stdin...".
        argv += ["--", "-"]
        return argv, forwarded  # the MCP servers' env values, forwarded by name (env_vars), never on argv

    def build_command(self, spec: RunSpec) -> CommandSpec:
        cmd = super().build_command(spec)
        return dataclasses.replace(cmd, stdin=True, stdin_data=spec.prompt.encode(), close_stdin_after_data=True)
