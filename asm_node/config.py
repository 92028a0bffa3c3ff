"""Node agent settings: flags override env (``ASM_NODE_*``), which override defaults."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# ASM.Options.Shell defaults (asm_runtime.md 4.2).
DEFAULT_SHELL_ALLOWED = (
    "echo", "pwd", "ls", "cat", "head", "tail", "wc", "date", "whoami", "uname", "true", "false", "sleep",
)
DEFAULT_SHELL_DENIED = (
    "rm", "sudo", "su", "chmod", "chown", "dd", "mkfs", "shutdown", "reboot", "kill", "killall",
)
#: Allowed commands that read the files they are given: their path arguments are confined.
DEFAULT_SHELL_CONFINED = ("cat", "head", "tail", "ls", "wc", "date")

#: Bounds of an approval's wait (the node default, ``asm node serve --approval-timeout``): 1 s .. 24 h.
MIN_APPROVAL_TIMEOUT_MS = 1_000
MAX_APPROVAL_TIMEOUT_MS = 24 * 3600 * 1000
#: Longest run_timeout_ms / idle_timeout_ms a node default or a run may ask for: 7 days.
MAX_DEADLINE_MS = 7 * 24 * 3600 * 1000

#: The agent's own secrets: no CLI, hook or watchdog environment ever carries them.
SECRET_ENV = ("ASM_TOKEN", "ASM_NODE_TOKEN")


class NodeConfig(BaseSettings):
    """Everything a node agent needs to know; validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="ASM_NODE_", extra="forbid")

    listen: str = "127.0.0.1:7070"
    #: Serve Prometheus metrics over HTTP here (/metrics); None = off.
    metrics_listen: str | None = None
    #: Allow a non-loopback metrics_listen (the metrics endpoint has no authentication).
    metrics_insecure: bool = False
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
    #: Abuse bounds of the gRPC server (asm_wire._server.ServerLimits): a connection must finish its
    #: handshake in handshake_timeout_s; at most max_connections open (None: half the fd limit),
    #: max_concurrent_streams per connection, max_concurrent_rpcs in all (then RESOURCE_EXHAUSTED).
    handshake_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int | None = Field(default=None, ge=1)
    max_concurrent_streams: int = Field(default=1000, ge=1)
    max_concurrent_rpcs: int = Field(default=1000, ge=1)
    #: A run's cwd must resolve (after symlinks) inside one of these; empty = anywhere.
    workspace_roots: list[Path] = Field(default_factory=list)
    max_runs: int = Field(default=8, ge=1)
    #: Longest stdout line accepted from a CLI; a longer one becomes a buffer_overflow event.
    line_cap_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    #: Stderr bytes forwarded as events per run; the rest is dropped (the tail is kept).
    stderr_cap_bytes: int = Field(default=1024 * 1024, ge=1024)
    stderr_tail_bytes: int = Field(default=64 * 1024, ge=1024)
    #: Events held per run for re-attach beyond what attached followers have yet to receive; older
    #: ones are evicted first (at twice this, down to this). Events not yet sent to an attached
    #: follower are never evicted: the stdout back-pressure below bounds them instead.
    replay_buffer_events: int = Field(default=100_000, ge=16)
    #: A run's unsent backlog (held frames after its slowest attached follower, in bytes including
    #: ~88 B of bookkeeping per event) above which the node stops reading the CLI's stdout, so the
    #: CLI blocks on its pipe until the followers catch up (reading resumes at half of it).
    backlog_max_bytes: int = Field(default=32 * 1024 * 1024, ge=64 * 1024)
    #: Bytes (same measure) a running run keeps for re-attach; the oldest already-sent frames (all of
    #: them when nobody is attached) are evicted past it, down to three quarters of it.
    replay_max_bytes_per_run: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    #: ... and all running runs of the node together (finished ones: ``retention_max_bytes``).
    replay_max_bytes_per_node: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    #: How long a finished run stays attachable.
    retention_s: float = Field(default=300.0, ge=0)
    #: At most this many finished runs are kept attachable; the oldest finished ones are evicted first.
    retention_max_runs: int = Field(default=1000, ge=0)
    #: ... and at most this many bytes of their held event frames (a finished run larger than this
    #: on its own is evicted at once; a follower already streaming it keeps its copy).
    retention_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    #: The run journal (asm_node.journal: every run id started, so none runs twice) lives here as
    #: SQLite; None = in memory (library NodeAgent(), embedded node). `asm node serve` defaults it to
    #: asm_node.journal.default_state_dir().
    state_dir: Path | None = None
    #: Journal entries of ended runs are forgotten this long after they ended (at start and periodically).
    journal_max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    #: ... and past this many ended runs the oldest ended ones are forgotten (asm_node.journal.DEFAULT_MAX_RUNS):
    #: an id forgotten by the node could run again there (the controller's registry still refuses a known id).
    journal_max_runs: int = Field(default=1_000_000, ge=1)
    #: A running run with no subscriber is interrupted after this long.
    detach_grace_s: float = Field(default=60.0, ge=0)
    #: Interrupt escalation: SIGINT, wait, SIGTERM, wait, SIGKILL.
    interrupt_grace_s: float = Field(default=3.0, ge=0)
    term_grace_s: float = Field(default=3.0, ge=0)
    #: After a terminal event, how long the CLI may take to exit by itself.
    exit_grace_s: float = Field(default=2.0, ge=0)
    #: How long a pending approval waits when the run asks for no timeout of its own (then denied, reason
    #: ``timeout``, with an ``approval_denied`` warning).
    approval_timeout_ms: int = Field(default=120_000, ge=MIN_APPROVAL_TIMEOUT_MS, le=MAX_APPROVAL_TIMEOUT_MS)
    #: Node-wide defaults of the run options run_timeout_ms (wall clock) and idle_timeout_ms (no
    #: stdout/stderr output, not counting time an approval is pending); None = off. A run's option replaces them.
    run_timeout_ms: int | None = Field(default=None, ge=1, le=MAX_DEADLINE_MS)
    idle_timeout_ms: int | None = Field(default=None, ge=1, le=MAX_DEADLINE_MS)
    shell_allowed_commands: list[str] = Field(default_factory=lambda: list(DEFAULT_SHELL_ALLOWED))
    shell_denied_commands: list[str] = Field(default_factory=lambda: list(DEFAULT_SHELL_DENIED))
    shell_allow_interpolation: bool = False
    #: Shell commands whose path-like arguments must resolve inside the workspace roots (the run's cwd
    #: when there are none); /proc, /sys and /dev are refused through them even when not confined.
    shell_confined_commands: list[str] = Field(default_factory=lambda: list(DEFAULT_SHELL_CONFINED))
    shell_confine_reads: bool = True
    #: A longer shell command line is refused (config_invalid) before it is parsed.
    shell_max_prompt_bytes: int = Field(default=64 * 1024, ge=1)
    #: Environment variables of the agent that CLIs must not inherit (secrets of the agent itself);
    #: SECRET_ENV is never inherited, whatever this says.
    env_deny: list[str] = Field(default_factory=lambda: list(SECRET_ENV))
    #: Variables a run request may set; anything else in a request is refused. Never a denied one.
    env_allow: list[str] = Field(default_factory=list)
    #: Operator-only provider options a run may set (a CLI's args, base URLs, auth tokens ...);
    #: the providers declare which options are operator-only, ``cli_path`` is never a run's.
    allow_run_options: list[str] = Field(default_factory=list)
    #: Operator labels reported in the handshake (routing selectors match them).
    labels: dict[str, str] = Field(default_factory=dict)
    #: Spawn a watchdog that kills every CLI process group if the agent dies (even by SIGKILL).
    reaper: bool = True

    @model_validator(mode="after")
    def _allow_no_denied_env(self) -> NodeConfig:
        denied = sorted(set(self.env_allow) & ({*self.env_deny, *SECRET_ENV}))
        if denied:
            raise ValueError(f"env_allow names a denied variable ({', '.join(denied)}): a run may never set it")
        return self

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
