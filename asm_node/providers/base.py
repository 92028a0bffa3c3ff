"""The provider interface: a command builder, a line parser and exit classification.

One module per provider implements it. A provider never spawns or signals a
process itself; :mod:`asm_node.process` does that for all of them, so
supervision (process groups, line caps, interrupt escalation, reaping) is
written once.

Parsers produce ``pb.Event`` messages with only ``kind`` and the payload set;
the run stamps the envelope (ids, seq, timestamps). They are pure (bytes in,
events out) so they can be tested on captured output without a process.
"""

from __future__ import annotations

import contextlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from asm_node.providers._sessions import SessionStore
from asm_wire import ConfigError, EventKind, PermissionMode, choices, kind_value, pb

#: The permission modes a run may ask for (the vocabulary is asm_wire.PermissionMode).
PERMISSION_MODES = choices(PermissionMode)

#: Rates (USD per token) for a provider that declares no pricing.
FALLBACK_RATES = (0.000001, 0.000001)

#: The bytes of a provider_init event's details_json at most (a CLI's start-up report can list hundreds of
#: tools and skills; the typed fields carry what a client needs, details the rest, cut to this bound).
MAX_INIT_DETAILS = 16 * 1024

#: Options every provider accepts that the node's run supervision handles, never the CLI:
#: a wall-clock deadline and an output-silence deadline, both in milliseconds (> 0).
RUN_OPTIONS = frozenset({"run_timeout_ms", "idle_timeout_ms"})


@dataclass(frozen=True)
class RunSpec:
    """A validated run request, as a provider sees it."""

    run_id: str
    session_id: str
    provider: str
    prompt: str
    cwd: str
    permission_mode: str
    options: Mapping[str, Any]
    #: The CLI's environment holds the node's credentials (ANTHROPIC_API_KEY ...): never in a repr.
    env: Mapping[str, str] = field(repr=False)
    #: Files a provider wrote for this run only (an MCP config with servers' env values, a schema):
    #: build_command hands them to the CommandSpec, and the run removes them when it ends.
    files: list[str] = field(default_factory=list, repr=False, compare=False)


@dataclass(frozen=True)
class CommandSpec:
    argv: list[str]
    cwd: str
    env: dict[str, str] = field(repr=False)
    #: Keep stdin open as a pipe (providers that take input mid-run); else /dev/null.
    stdin: bool = False
    #: Total deadline for the process, or None.
    timeout_s: float | None = None
    #: Written to stdin right after spawn (a prompt sent as stream-json input).
    stdin_data: bytes = b""
    #: Close stdin once the parser saw the terminal event (a stream-json CLI waits for more input).
    close_stdin_at_end: bool = False
    #: Close stdin right after writing ``stdin_data`` (a CLI that reads its prompt from stdin to EOF
    #: before it starts, e.g. ``codex exec -``); such a run takes no further input.
    close_stdin_after_data: bool = False
    #: Files written for this run only (RunSpec.files): removed when the run ends, whatever its end.
    run_files: tuple[str, ...] = ()


def remove_run_files(paths: tuple[str, ...]) -> None:
    """Remove a run's own files, and a directory of the run's that they leave empty (never raises)."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            parent = os.path.dirname(path)
            if os.path.basename(parent).startswith("asm-"):  # a per-run directory (asm-<run id>), not a shared one
                os.rmdir(parent)


@dataclass(frozen=True)
class ExitInfo:
    returncode: int | None  # None: never observed (spawn failed)
    signal: int  # the signal that ended it, 0 if it exited
    stderr_tail: str


@dataclass
class ProviderStatus:
    available: bool
    cli_path: str = ""
    version: str = ""
    env_var: str = ""
    error: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class LineParser(ABC):
    """Turns one run's stdout lines into events. Stateful per run."""

    def __init__(self) -> None:
        self.terminal = False  # set once a terminal event (result / fatal error) was emitted
        self.failed = False  # set when that terminal event was an error
        self.provider_session_id = ""

    @abstractmethod
    def feed_lines(self, lines: list[bytes], out: list[pb.Event]) -> None:
        """Append the events for these complete lines (newline removed) to ``out``."""

    def delta_texts(self, lines: list[bytes]) -> list[str] | None:
        """The lines as plain ``assistant_delta`` texts, when that is all they are (and nothing else
        about the parser changes): the run encodes those events directly (asm_node._encode). None:
        :meth:`feed_lines` takes them. A parser of a CLI's own format (JSON lines) has no such case."""
        return None

    @abstractmethod
    def finish(self, exit: ExitInfo) -> list[pb.Event]:
        """Events for the process exit (a result or an error), unless already terminal."""

    def approval_response(self, approval_id: str, decision: str, reason: str) -> bytes | None:
        """What to write to the CLI's stdin to deliver an approval decision; None if the CLI cannot take one."""
        return None

    def input_message(self, data: bytes) -> bytes:
        """What to write to the CLI's stdin for a client's input (SendInput): the bytes as given, unless
        the CLI frames its input (Claude's stream-json user messages); ConfigError for input it cannot take."""
        return data


class Provider(ABC):
    """One provider: a module declares its class (everything about its CLI) and one registry line
    (``asm_node.providers.REGISTRY``); the manifest, ``asm providers``, CLI help, the controller's
    metrics and the docs table are derived from these declarations."""

    name: str
    display_name: str
    env_var: str = ""
    #: ASM.Cost.Models: USD per token (input, output) by model; "" is the provider's default.
    pricing: ClassVar[Mapping[str, tuple[float, float]]] = MappingProxyType({})
    #: The models a caller may name as ``provider:model`` (ASM's priv/models catalogs): the inference
    #: endpoint's ``/v1/models`` lists them, and a lease's model reaches the CLI only for a provider with some.
    models: ClassVar[tuple[str, ...]] = ()
    #: permission mode -> what it means with this provider when its flags alone do not say it
    #: (e.g. Codex's default is codex exec's own read-only sandbox).
    mode_notes: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: Common features ("streaming", "tools", "resume", "interrupt", "cost", "approvals", "ollama"):
    #: supported?, and how. Each provider declares them next to the code that implements them.
    features: ClassVar[Mapping[str, tuple[bool, str]]] = MappingProxyType({})
    #: Where the CLI keeps resumable sessions on the host (ListProviderSessions); None: it keeps none.
    session_store: ClassVar[SessionStore | None] = None

    def list_sessions(self, env: Mapping[str, str], limit: int) -> list[pb.ProviderSession]:
        """The resumable sessions the CLI keeps on this host, newest first (blocking: run it off the loop)."""
        store = self.session_store
        return [] if store is None else store.sessions(self.name, env, limit)

    @classmethod
    def rates(cls, model: str) -> tuple[float, float]:
        """USD per (input, output) token for this model: its own row, else the provider's default."""
        return cls.pricing.get(model.strip()) or cls.pricing.get("", FALLBACK_RATES)

    @classmethod
    def build(cls, config: Any) -> Provider:
        """This provider for a node's configuration (``asm_node.config.NodeConfig``)."""
        from_config = getattr(cls, "from_config", None)
        return from_config(config) if callable(from_config) else cls()

    def permission_table(self) -> dict[str, dict[str, Any]]:
        """Each asm permission mode: supported?, its native name, CLI args and notes (the manifest's).
        By default a provider has no modes of its own: every mode is accepted and runs the same."""
        same = "no permission modes of its own: every mode runs the same"
        return {m: {"supported": True, "native": "(none)", "cli_args": [], "notes": self.mode_notes.get(m, same)}
                for m in PERMISSION_MODES}

    def option_names(self) -> list[str]:
        """Every option this provider accepts (the manifest's ``options``)."""
        return []

    @abstractmethod
    def status(self, env: Mapping[str, str], probe_version: bool = True) -> ProviderStatus:
        """Is the provider usable on this host (CLI found; its version, which may run the CLI)?"""

    @abstractmethod
    def validate_options(self, options: Mapping[str, Any], permission_mode: str) -> dict[str, Any]:
        """Return normalized options or raise ConfigError (nothing has been spawned yet)."""

    @abstractmethod
    def build_command(self, spec: RunSpec) -> CommandSpec: ...

    @abstractmethod
    def new_parser(self, spec: RunSpec) -> LineParser: ...


# -- helpers shared by providers ------------------------------------------------


def check_permission_mode(mode: str) -> str:
    m = (mode or "default").strip().lower()
    if m not in PERMISSION_MODES:
        raise ConfigError(f"unsupported permission mode {mode!r}: expected one of {', '.join(PERMISSION_MODES)}")
    return m


def reject_unknown(options: Mapping[str, Any], known: set[str], provider: str) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) for provider {provider}: {', '.join(unknown)} (known: {', '.join(sorted(known | RUN_OPTIONS))})"
        )


def error_event(
    message: str, code: str, domain: str, *, severity: pb.Severity.ValueType = pb.SEVERITY_ERROR, exit_code: int = -1
) -> pb.Event:
    return pb.Event(
        kind=kind_value(EventKind.ERROR),
        error=pb.Error(message=message, code=code, domain=domain, severity=severity, exit_code=exit_code),
    )


def result_event(status: str, stop_reason: str, output: Mapping[str, Any]) -> pb.Event:
    return pb.Event(
        kind=kind_value(EventKind.RESULT),
        result=pb.Result(status=status, stop_reason=stop_reason, output_json=json.dumps(output)),
    )


def denial(tool: str, tool_input: Any, reason: str) -> dict[str, Any]:
    """One entry of a result's ``output["denials"]``: the normalized shape every provider reports
    (the controller turns the list into ``Result.denials``)."""
    return {"tool": tool or "", "input": tool_input if isinstance(tool_input, dict) else {"value": tool_input},
            "reason": reason or "denied"}


def denial_warning(d: Mapping[str, Any]) -> pb.Event:
    """The warning event for one denial (code ``permission_denied``, domain ``provider``)."""
    detail = json.dumps(d.get("input") or {}, sort_keys=True)
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return error_event(f"{d.get('tool') or 'tool'} was denied: {d.get('reason') or 'denied'} (input {detail})",
                       "permission_denied", "provider", severity=pb.SEVERITY_WARNING)


def provider_init_event(*, model: str = "", tools: Any = (), cwd: str = "", permission_mode: str = "",
                        mcp_servers: Any = (), cli_version: str = "", details: Mapping[str, Any] | None = None
                        ) -> pb.Event:
    """A CLI's start-up report as the typed ``provider_init`` event; ``details`` (the rest of the
    report) is kept as JSON up to MAX_INIT_DETAILS bytes, else replaced by a note saying it was cut."""
    servers = []
    for s in mcp_servers if isinstance(mcp_servers, list | tuple) else ():
        if isinstance(s, dict):
            servers.append(pb.McpServerStatus(name=str(s.get("name") or "")[:256],
                                              status=str(s.get("status") or "")[:256]))
        elif isinstance(s, str):
            servers.append(pb.McpServerStatus(name=s[:256]))
    names = [str(t.get("name") or "") if isinstance(t, dict) else str(t)
             for t in (tools if isinstance(tools, list | tuple) else ())]
    kept = {str(k): v for k, v in (details or {}).items()}
    text = json.dumps(kept, default=str)
    if len(text.encode()) > MAX_INIT_DETAILS:
        # Drop the largest fields first (a tool or skill list) and name them; each size measured once.
        sizes = {k: len(json.dumps(v, default=str).encode()) + len(k.encode()) + 6 for k, v in kept.items()}
        total, dropped = sum(sizes.values()), []
        for k in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if total <= MAX_INIT_DETAILS - 4096:  # room for the names of what was dropped
                break
            del kept[k]
            total -= sizes[k]
            dropped.append(k[:100])
        text = json.dumps({**kept, "truncated_keys": dropped[:50]}, default=str)
        if len(text.encode()) > MAX_INIT_DETAILS:
            text = json.dumps({"truncated_keys": dropped[:50]})
    return pb.Event(kind=kind_value(EventKind.PROVIDER_INIT), provider_init=pb.ProviderInit(
        model=model or "", tools=[n[:256] for n in names[:1000]], cwd=cwd or "", permission_mode=permission_mode or "",
        mcp_servers=servers[:200], cli_version=cli_version or "", details_json=text))


def stderr_summary(tail: str, lines: int = 5, width: int = 240) -> str:
    picked = [ln[:width] for ln in tail.strip().splitlines()[-lines:]]
    return " | ".join(picked)
