"""Node agent settings: flags override env (``ASM_NODE_*``), which override defaults."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# ASM.Options.Shell defaults (asm_runtime.md 4.2).
DEFAULT_SHELL_ALLOWED = (
    "echo", "pwd", "ls", "cat", "head", "tail", "wc", "date", "whoami", "uname", "true", "false", "sleep",
)
DEFAULT_SHELL_DENIED = (
    "rm", "sudo", "su", "chmod", "chown", "dd", "mkfs", "shutdown", "reboot", "kill", "killall",
)


class NodeConfig(BaseSettings):
    """Everything a node agent needs to know; validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="ASM_NODE_", extra="forbid")

    listen: str = "127.0.0.1:7070"
    #: Serve Prometheus metrics over HTTP here (/metrics); None = off.
    metrics_listen: str | None = None
    node_id: str = Field(default_factory=lambda: os.uname().nodename)
    token: SecretStr | None = None
    #: Named tokens, one ``NAME:TOKEN[:admin]`` per line; each name is a principal that owns its runs.
    tokens_file: Path | None = None
    #: Client-certificate principals (``cn:<CN>``) with the admin role (see all runs, drain).
    admin_principals: list[str] = Field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure: bool = False
    #: A run's cwd must resolve (after symlinks) inside one of these; empty = anywhere.
    workspace_roots: list[Path] = Field(default_factory=list)
    max_runs: int = Field(default=8, ge=1)
    #: Longest stdout line accepted from a CLI; a longer one becomes a buffer_overflow event.
    line_cap_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    #: Stderr bytes forwarded as events per run; the rest is dropped (the tail is kept).
    stderr_cap_bytes: int = Field(default=1024 * 1024, ge=1024)
    stderr_tail_bytes: int = Field(default=64 * 1024, ge=1024)
    #: Events held per run for attach/replay; older ones are evicted first.
    replay_buffer_events: int = Field(default=100_000, ge=16)
    #: How long a finished run stays attachable.
    retention_s: float = Field(default=300.0, ge=0)
    #: A running run with no subscriber is interrupted after this long.
    detach_grace_s: float = Field(default=60.0, ge=0)
    #: Interrupt escalation: SIGINT, wait, SIGTERM, wait, SIGKILL.
    interrupt_grace_s: float = Field(default=3.0, ge=0)
    term_grace_s: float = Field(default=3.0, ge=0)
    #: After a terminal event, how long the CLI may take to exit by itself.
    exit_grace_s: float = Field(default=2.0, ge=0)
    approval_timeout_ms: int = Field(default=120_000, ge=1)
    shell_allowed_commands: list[str] = Field(default_factory=lambda: list(DEFAULT_SHELL_ALLOWED))
    shell_denied_commands: list[str] = Field(default_factory=lambda: list(DEFAULT_SHELL_DENIED))
    shell_allow_interpolation: bool = False
    #: Environment variables of the agent that CLIs must not inherit (secrets of the agent itself).
    env_deny: list[str] = Field(default_factory=lambda: ["ASM_TOKEN", "ASM_NODE_TOKEN"])
    #: Variables a run request may set; anything else in a request is refused.
    env_allow: list[str] = Field(default_factory=list)
    #: Operator labels reported in the handshake (routing selectors match them).
    labels: dict[str, str] = Field(default_factory=dict)
    #: Spawn a watchdog that kills every CLI process group if the agent dies (even by SIGKILL).
    reaper: bool = True

    @field_validator("workspace_roots")
    @classmethod
    def _resolve_roots(cls, roots: list[Path]) -> list[Path]:
        out = []
        for root in roots:
            resolved = Path(os.path.realpath(os.path.expanduser(root)))
            if not resolved.is_dir():
                raise ValueError(f"workspace root {str(root)!r} is not a directory")
            out.append(resolved)
        return out
