"""What every CLI provider shares: finding the binary, common options, JSON line
parsing, exit classification and pricing.

A provider module (claude.py, codex.py, ...) only says how to build its argv
and how to map its own JSON line types to events.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from asm_node.config import SECRET_ENV
from asm_node.providers.base import (
    FALLBACK_RATES,
    PERMISSION_MODES,
    CommandSpec,
    ExitInfo,
    LineParser,
    Provider,
    ProviderStatus,
    RunSpec,
    check_permission_mode,
    error_event,
    result_event,
    stderr_summary,
)
from asm_wire import KIND_VALUES, ConfigError, pb


def rates_for(provider: str, model: str) -> tuple[float, float]:
    """ASM.Cost.Models: the exact (provider, model) rates, then the provider's default, from the
    ``pricing`` each provider module declares."""
    from asm_node.providers import provider_class

    cls = provider_class(provider)
    return cls.rates(model) if cls is not None else FALLBACK_RATES


#: Option names (and names inside an option's mappings, e.g. an MCP server's env) whose values are
#: credentials: never shown by repr/str, so never in a log line or a traceback.
SECRET_NAME = re.compile(r"token|secret|password|passwd|api_?key|auth|credential|bearer|cookie", re.I)
REDACTED = "<redacted>"


def redact(value: Any, name: str = "") -> Any:
    """``value`` with every credential-named entry (at any depth) replaced by REDACTED."""
    if name and SECRET_NAME.search(name) and value not in (None, "", {}, []):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


class CommonOptions(BaseModel):
    """Options every CLI provider accepts (ASM's common schema, the parts a CLI run uses).

    Its repr (and str) redact credentials (``anthropic_auth_token``, an env entry named like a
    token or key): options end up in log lines and tracebacks."""

    model_config = ConfigDict(extra="forbid", strict=False)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact(value, name or "")

    model: str | None = None
    #: Extra CLI arguments, appended verbatim (operator-only: a flag can point the CLI at any file or URL).
    args: list[str] = Field(default_factory=list)
    #: Continue a provider session: an exact id, or "latest".
    resume: str | None = None
    #: Override the pricing table (USD per token).
    input_rate: float | None = Field(default=None, ge=0)
    output_rate: float | None = Field(default=None, ge=0)
    ollama: bool = False
    ollama_model: str | None = None
    ollama_base_url: str | None = None
    ollama_http: bool | None = None
    ollama_timeout_ms: int | None = Field(default=None, gt=0)

    def ollama_requested(self) -> bool:
        return bool(
            self.ollama or self.ollama_model or self.ollama_base_url
            or self.ollama_http is not None or self.ollama_timeout_ms is not None
        )


def validate_model(model_cls: type[BaseModel], options: Mapping[str, Any], provider: str) -> Any:
    try:
        return model_cls.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid options for provider {provider}: {problems}") from None


_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,511}")


def check_session_id(value: str, provider: str) -> str:
    """A provider session id for resume: no leading '-', no spaces or control chars (flag injection)."""
    if value == "latest" or _SAFE_ID.fullmatch(value):
        return value
    raise ConfigError(f"invalid {provider} session id to resume: {value!r}")


# -- finding the CLI -------------------------------------------------------------

_version_cache: dict[str, str] = {}
_version_lock = threading.Lock()


def cli_version(path: str) -> str:
    """``<cli> --version`` (cached per path); empty when it fails."""
    with _version_lock:
        if path in _version_cache:
            return _version_cache[path]
    try:
        proc = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
            env={**{k: v for k, v in os.environ.items() if k not in SECRET_ENV}, "NO_COLOR": "1"},
        )
        out = (proc.stdout or proc.stderr).strip().splitlines()
        version = out[0].strip() if proc.returncode == 0 and out else ""
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    m = re.search(r"\d+\.\d+\.\d+[\w.+-]*", version)
    version = m.group(0) if m else version
    with _version_lock:
        _version_cache[path] = version
    return version


#: Why a run may not set an option (ConfigError reason).
OPTION_NOT_ALLOWED = "option_not_allowed"


class CliProvider(Provider):
    """A provider backed by an agent CLI that prints JSON lines.

    Options are split by who may set them. A client sets the ordinary ones; an
    option that changes which binary runs, where the CLI sends credentials or
    the CLI's environment is an operator privilege (``operator_options``): a
    run may set it only when the node allows it (``asm node serve
    --allow-run-option NAME``). ``node_only_options`` no run may set at all:
    the CLI binary is node configuration (``env_var`` in the node's environment).
    """

    env_var: str
    path_candidates: ClassVar[tuple[str, ...]] = ()
    known_locations: ClassVar[tuple[str, ...]] = ()
    install_hint: str = ""
    options_model: ClassVar[type[CommonOptions]] = CommonOptions
    #: normalized mode -> (native mode, CLI args); a missing mode is rejected with `unsupported_modes`.
    permission_modes: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {}
    unsupported_modes: ClassVar[dict[str, str]] = {}
    stdin_input: ClassVar[bool] = False
    #: Options a run may set only with the operator's allowance (every CLI: extra args, a model server URL).
    operator_options: ClassVar[frozenset[str]] = frozenset({"args", "ollama_base_url"})
    #: Options no run may set: node configuration.
    node_only_options: ClassVar[frozenset[str]] = frozenset({"cli_path"})

    #: stderr lines the CLI always prints that say nothing about a failure (left out of error messages).
    stderr_noise: ClassVar[tuple[str, ...]] = ()

    def __init__(self, allow_run_options: Iterable[str] = ()) -> None:
        self.allowed_run_options = frozenset(allow_run_options) & self.operator_options

    @classmethod
    def build(cls, config: Any) -> Provider:
        return cls(config.allow_run_options)

    def permission_table(self) -> dict[str, dict[str, Any]]:
        modes: dict[str, dict[str, Any]] = {}
        for mode in PERMISSION_MODES:
            if mode in self.unsupported_modes:
                modes[mode] = {"supported": False, "reason": self.unsupported_modes[mode]}
            else:
                native, args = self.permission_modes[mode]
                modes[mode] = {"supported": True, "native": native, "cli_args": list(args),
                               "notes": self.mode_notes.get(mode, "")}
        return modes

    def option_names(self) -> list[str]:
        return sorted(self.options_model.model_fields)

    def strip_noise(self, tail: str) -> str:
        """The stderr tail without the lines this CLI prints on every run (``stderr_noise`` prefixes)."""
        if not self.stderr_noise:
            return tail
        return "\n".join(ln for ln in tail.splitlines() if not ln.strip().startswith(self.stderr_noise))

    def client_options(self) -> list[str]:
        """The options any client may set on this node (the operator's allowances included)."""
        fields = set(self.options_model.model_fields) - self.node_only_options
        return sorted(fields - (self.operator_options - self.allowed_run_options))

    def check_run_options(self, options: Mapping[str, Any]) -> None:
        """Refuse options that are node configuration, or operator privileges the node did not allow."""
        for name in sorted(options):
            if name in self.node_only_options:
                raise ConfigError(
                    f"option {name} is node configuration, never set by a run: the node operator chooses the "
                    f"{self.display_name} binary with {self.env_var} in the node's environment",
                    reason=OPTION_NOT_ALLOWED,
                )
            if name in self.operator_options and name not in self.allowed_run_options:
                raise ConfigError(
                    f"option {name} of provider {self.name} is not allowed on this node: it changes which binary "
                    f"runs, where {self.display_name} sends credentials or its environment (the node operator "
                    f"allows it with --allow-run-option {name})",
                    reason=OPTION_NOT_ALLOWED,
                )

    def resolve(self, env: Mapping[str, str]) -> tuple[str | None, str]:
        """Find the CLI: the env var, then PATH, then known locations."""
        path_env = env.get("PATH")
        value = env.get(self.env_var)
        if value:
            if "/" in value:
                if os.path.isfile(value) and os.access(value, os.X_OK):
                    return value, ""
                return None, f"{self.env_var} points to {value!r}, which is not an executable file"
            found = shutil.which(value, path=path_env)
            if found:
                return found, ""
            return None, f"{self.env_var} names {value!r}, which is not on the node's PATH"
        for name in self.path_candidates:
            found = shutil.which(name, path=path_env)
            if found:
                return found, ""
        home = env.get("HOME", "")
        for loc in self.known_locations:
            p = loc.replace("~", home, 1) if loc.startswith("~") else loc
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p, ""
        return None, (
            f"{self.display_name} not found on this node: install it ({self.install_hint}) "
            f"or set {self.env_var} to its path"
        )

    def status(self, env: Mapping[str, str], probe_version: bool = True) -> ProviderStatus:
        path, error = self.resolve(env)
        if path is None:
            return ProviderStatus(available=False, env_var=self.env_var, error=error)
        version = cli_version(path) if probe_version else _version_cache.get(path, "")
        return ProviderStatus(available=True, cli_path=path, version=version, env_var=self.env_var)

    def native_mode(self, mode: str) -> tuple[str, tuple[str, ...]]:
        m = check_permission_mode(mode)
        if m in self.unsupported_modes:
            raise ConfigError(self.unsupported_modes[m])
        return self.permission_modes[m]

    def validate_options(self, options: Mapping[str, Any], permission_mode: str) -> dict[str, Any]:
        self.check_run_options(options)
        opts = validate_model(self.options_model, options, self.name)
        self.native_mode(permission_mode)
        if opts.ollama_requested():
            self.apply_ollama(opts)
        if opts.resume is not None:
            check_session_id(opts.resume, self.name)
        for arg in opts.args:
            if not isinstance(arg, str) or not arg.strip():
                raise ConfigError("option args must be a list of non-empty strings")
        return {"parsed": opts}

    def apply_ollama(self, opts: Any) -> None:
        raise ConfigError(f"provider {self.name} does not support the common Ollama surface")

    def build_command(self, spec: RunSpec) -> CommandSpec:
        opts = spec.options["parsed"]
        path, error = self.resolve(spec.env)
        if path is None:
            from asm_wire import make_error

            raise make_error("cli_not_found", "provider", error, reason="provider_missing")
        argv, env = self.argv(path, spec, opts)
        full_env = dict(spec.env)
        full_env.update(env)
        return CommandSpec(argv=argv, cwd=spec.cwd, env=full_env, stdin=self.stdin_input, run_files=tuple(spec.files))

    @abstractmethod
    def argv(self, path: str, spec: RunSpec, opts: Any) -> tuple[list[str], dict[str, str]]:
        """The argv (path first) and extra environment for this run."""

    def new_parser(self, spec: RunSpec) -> LineParser:
        opts = spec.options["parsed"]
        model = opts.model or ""
        in_rate, out_rate = self.rates(model)
        if opts.input_rate is not None:
            in_rate = opts.input_rate
        if opts.output_rate is not None:
            out_rate = opts.output_rate
        explicit = opts.input_rate is not None or opts.output_rate is not None
        return self.parser_class(self, in_rate, out_rate, explicit)

    parser_class: ClassVar[Callable[..., JsonLineParser]]


# -- JSON line parsing -------------------------------------------------------------

_SESSION_KEYS = ("session_id", "thread_id", "sessionId", "provider_session_id", "conversation_id")
#: A session id the node can stamp on every event and pass back as ``--resume ID``: printable,
#: bounded, no NUL, no lone surrogate (either would fail the protobuf encoding or the exec).
_SESSION_ID = re.compile(r"[\x21-\x7e]{1,256}")


def ev_delta(text: str) -> pb.Event:
    ev = pb.Event(kind=KIND_VALUES["assistant_delta"])
    ev.assistant_delta.content = text
    ev.assistant_delta.format = "text"
    return ev


def block(b: Any) -> pb.ContentBlock:
    if isinstance(b, str):
        return pb.ContentBlock(type="text", text=b)
    if isinstance(b, dict):
        btype = str(b.get("type") or "other")
        if btype == "text":
            return pb.ContentBlock(type="text", text=str(b.get("text") or ""))
        return pb.ContentBlock(type=btype, json=json.dumps(b))
    return pb.ContentBlock(type="other", json=json.dumps(b))


def ev_message(blocks: Sequence[Any], model: str = "", message_id: str = "") -> pb.Event:
    return pb.Event(
        kind=KIND_VALUES["assistant_message"],
        assistant_message=pb.AssistantMessage(content=[block(b) for b in blocks], role="assistant",
                                              model=model or "", message_id=message_id or ""),
    )


def ev_user(blocks: Sequence[Any]) -> pb.Event:
    return pb.Event(kind=KIND_VALUES["user_message"],
                    user_message=pb.UserMessage(content=[block(b) for b in blocks], role="user"))


def ev_thinking(text: str, signature: str = "") -> pb.Event:
    return pb.Event(kind=KIND_VALUES["thinking"], thinking=pb.Thinking(content=text, signature=signature or ""))


def ev_tool_use(name: str, call_id: str, tool_input: Any) -> pb.Event:
    return pb.Event(kind=KIND_VALUES["tool_use"], tool_use=pb.ToolUse(
        tool_name=name or "", tool_call_id=call_id or "", input_json=json.dumps(tool_input if tool_input is not None else {})))


def ev_tool_result(call_id: str, content: Any, is_error: bool) -> pb.Event:
    return pb.Event(kind=KIND_VALUES["tool_result"], tool_result=pb.ToolResult(
        tool_call_id=call_id or "", content_json=json.dumps(content), is_error=bool(is_error)))


def ev_cost(input_tokens: int, output_tokens: int, cost_usd: float) -> pb.Event:
    return pb.Event(kind=KIND_VALUES["cost_update"], cost_update=pb.CostUpdate(
        input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens,
        cost_usd=cost_usd))


def ev_raw(content: Any) -> pb.Event:
    text = content if isinstance(content, str) else json.dumps(content)
    return pb.Event(kind=KIND_VALUES["raw"], raw=pb.Raw(stream="stdout", content=text))


def ev_raw_line(line: bytes) -> pb.Event:
    """A stdout line as printed: text when it is UTF-8, else its exact bytes in ``Raw.data`` (lossless)."""
    try:
        return pb.Event(kind=KIND_VALUES["raw"], raw=pb.Raw(stream="stdout", content=line.decode("utf-8")))
    except UnicodeDecodeError:
        return pb.Event(kind=KIND_VALUES["raw"], raw=pb.Raw(stream="stdout", data=line))


def as_int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float):
        return max(int(value), 0)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return 0


def classify_api_error(text: str, status: int | None = None) -> str:
    """An ASM error kind for a provider API failure, from its HTTP status or its message."""
    lowered = text.lower()
    if status in (401, 403) or re.search(
        r"\b401\b|unauthori[sz]ed|invalid api key|invalid x-api-key|api key not valid|authentication|"
        r"not authenticated|please log ?in|unauthenticated", lowered
    ):
        return "auth_error"
    if status == 429 or re.search(r"\b429\b|rate.?limit|resource_exhausted|too many requests|quota", lowered):
        return "rate_limit"
    if (status is not None and status >= 500) or re.search(r"\b50[0-4]\b|internal server error|overloaded|high demand|unavailable", lowered):
        return "transport_error"
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    return "unknown"


class JsonLineParser(LineParser):
    """Decodes JSON lines; never raises. A non-JSON line becomes a ``raw`` event."""

    def __init__(self, provider: CliProvider, input_rate: float, output_rate: float, explicit_rates: bool) -> None:
        super().__init__()
        self.provider = provider
        self.input_rate = input_rate
        self.output_rate = output_rate
        self.explicit_rates = explicit_rates

    def cost(self, input_tokens: int, output_tokens: int, reported_usd: float | None = None) -> pb.Event:
        """Usage as a cost_update: explicit rates > the CLI's own figure > the pricing table."""
        if reported_usd is not None and not self.explicit_rates:
            usd = float(reported_usd)
        else:
            usd = input_tokens * self.input_rate + output_tokens * self.output_rate
        return ev_cost(input_tokens, output_tokens, usd)

    def end(self, out: list[pb.Event], ev: pb.Event, failed: bool = False) -> None:
        out.append(ev)
        self.terminal = True
        self.failed = failed

    def feed_lines(self, lines: list[bytes], out: list[pb.Event]) -> None:
        for line in lines:
            if self.terminal:
                return
            text = line.rstrip(b"\r")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
                out.append(ev_raw_line(text))
                continue
            if not isinstance(obj, dict):
                # The line as printed: re-encoding the value can fail (a lone surrogate in a string).
                out.append(ev_raw_line(text))
                continue
            if not self.provider_session_id:
                for key in _SESSION_KEYS:
                    value = obj.get(key)
                    if isinstance(value, str) and _SESSION_ID.fullmatch(value.strip()):
                        self.provider_session_id = value.strip()
                        break
            try:
                self.handle(obj, out)
            except Exception as exc:  # a surprising shape must not kill the run
                out.append(ev_raw_line(text))
                out.append(error_event(f"could not decode {self.provider.display_name} line: {exc}", "parse_error",
                                       "parser", severity=pb.SEVERITY_WARNING))

    @abstractmethod
    def handle(self, obj: dict[str, Any], out: list[pb.Event]) -> None: ...

    def exit_error(self, exit: ExitInfo) -> pb.Event | None:
        """Provider-specific meaning of an exit status (e.g. Gemini's 145 = HTTP 401)."""
        return None

    def finish(self, exit: ExitInfo) -> list[pb.Event]:
        if self.terminal:
            return []
        self.terminal = True
        name = self.provider.display_name
        exit = dataclasses.replace(exit, stderr_tail=self.provider.strip_noise(exit.stderr_tail))
        if exit.signal:
            self.failed = True
            return [error_event(f"{name} terminated by signal {exit.signal}", "transport_error", "provider")]
        code = exit.returncode
        if code == 0:
            return [result_event("completed", "exit", {"exit_code": 0})]
        self.failed = True
        special = self.exit_error(exit)
        if special is not None:
            return [special]
        tail = exit.stderr_tail
        detail = stderr_summary(tail)
        if re.search(r"\bcd:\s+.+No such file or directory", tail, re.I):
            return [error_event(f"{name}: working directory does not exist", "config_invalid", "config", exit_code=code or -1)]
        if code == 127:
            return [error_event(f"{name} not found: {detail}", "cli_not_found", "provider", exit_code=127)]
        if re.search(r"not authenticated|authentication required|please log ?in|run .* login|requires login", tail, re.I):
            return [error_event(f"{name} requires authentication: {detail}", "auth_error", "provider", exit_code=code or -1)]
        msg = f"{name} exited with code {code}" + (f": {detail}" if detail else "")
        return [error_event(msg, "transport_error", "provider", exit_code=code if code is not None else -1)]


def write_temp_json(directory: Path, name: str, value: Any) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(value))
    return str(path)
