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

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from asm_node.providers._sessions import SessionStore
from asm_wire import ConfigError, EventKind, PermissionMode, choices, kind_value, pb

#: The permission modes a run may ask for (the vocabulary is asm_wire.PermissionMode).
PERMISSION_MODES = choices(PermissionMode)

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
    env: Mapping[str, str]


@dataclass(frozen=True)
class CommandSpec:
    argv: list[str]
    cwd: str
    env: dict[str, str]
    #: Keep stdin open as a pipe (providers that take input mid-run); else /dev/null.
    stdin: bool = False
    #: Total deadline for the process, or None.
    timeout_s: float | None = None
    #: Written to stdin right after spawn (a prompt sent as stream-json input).
    stdin_data: bytes = b""
    #: Close stdin once the parser saw the terminal event (a stream-json CLI waits for more input).
    close_stdin_at_end: bool = False


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
    name: str
    display_name: str
    env_var: str = ""
    #: Common features ("streaming", "tools", "resume", "interrupt", "cost", "approvals", "ollama"):
    #: supported?, and how. Each provider declares them next to the code that implements them.
    features: ClassVar[Mapping[str, tuple[bool, str]]] = MappingProxyType({})
    #: Where the CLI keeps resumable sessions on the host (ListProviderSessions); None: it keeps none.
    session_store: ClassVar[SessionStore | None] = None

    def list_sessions(self, env: Mapping[str, str], limit: int) -> list[pb.ProviderSession]:
        """The resumable sessions the CLI keeps on this host, newest first (blocking: run it off the loop)."""
        store = self.session_store
        return [] if store is None else store.sessions(self.name, env, limit)

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
            f"unknown option(s) for provider {provider}: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
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


def stderr_summary(tail: str, lines: int = 5, width: int = 240) -> str:
    picked = [ln[:width] for ln in tail.strip().splitlines()[-lines:]]
    return " | ".join(picked)
