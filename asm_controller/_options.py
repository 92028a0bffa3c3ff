"""What a run needs (:class:`RunOptions`: session defaults with per-run overrides) and where a session can go on
(:class:`Checkpoint`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from asm_controller._client import RemoteNode
from asm_controller._connector import EmbeddedNode, NodeTarget
from asm_controller._events import Event
from asm_wire import ConfigError, PermissionMode, choices

#: The permission modes a run may ask for (the vocabulary is asm_wire.PermissionMode).
PERMISSION_MODES = choices(PermissionMode)


@dataclass(frozen=True)
class RunOptions:
    """What a run needs; session defaults with per-run overrides applied."""

    provider: str
    #: Where to run: one node, or several tried in order until one admits the run.
    node: NodeTarget | Sequence[NodeTarget] | None
    cwd: str = ""
    permission_mode: str = "default"
    options: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    #: How long the node lets an approval wait before denying it; 0 = the node's default (asm node serve
    #: --approval-timeout, 120 s unless set).
    approval_timeout_ms: int = 0
    #: An explicit Preflight round trip before StartRun (StartRun checks the same things anyway).
    preflight: bool = False
    #: Only nodes whose handshake labels include all of these.
    selector: Mapping[str, str] = field(default_factory=dict)
    #: "fail" (default): a lost node ends the run with node_lost. "resume": continue the
    #: provider session on another eligible node (only meaningful with a shared workspace).
    on_node_lost: str = "fail"
    resume_prompt: str = "Continue where you left off."
    #: Plugs run over every event on the controller (asm_controller.extensions.pipeline).
    pipeline: Sequence[Any] = ()
    #: Only these tools may be used (a tool_use of another fails the run, guardrail_blocked).
    allowed_tools: Sequence[str] = ()
    #: Called with each batch of final events (persistence, pubsub, rendering); must not block.
    observers: Sequence[Callable[[list[Event]], None]] = ()
    #: Fleet queue (a controller service's): higher runs first, FIFO within a priority (-1000..1000).
    priority: int = 0
    #: A run still in the fleet queue after this long ends with queue_timeout; 0 = no bound.
    queue_timeout_ms: int = 0

    def merged(self, overrides: Mapping[str, Any]) -> RunOptions:
        # run_id, owner and session_id name the run, they do not configure it (Session takes them apart).
        unknown = sorted(set(overrides) - set(self.__dataclass_fields__) - {"run_id", "owner", "session_id"})
        if unknown:
            raise ConfigError(f"unknown run option(s): {', '.join(unknown)}")
        changes = {k: v for k, v in overrides.items() if k not in ("run_id", "owner", "session_id") and v is not None}
        if "options" in changes:
            changes["options"] = {**self.options, **changes["options"]}
        if "env" in changes:
            changes["env"] = {**self.env, **changes["env"]}
        for key in ("pipeline", "allowed_tools", "observers"):
            if key in changes:
                changes[key] = tuple(changes[key])
        merged = replace(self, **changes)
        merged.validate()
        return merged

    @property
    def nodes(self) -> tuple[NodeTarget, ...]:
        if self.node is None:
            return ()
        if isinstance(self.node, EmbeddedNode | RemoteNode):
            return (self.node,)
        return tuple(self.node)

    def validate(self) -> None:
        if not self.provider:
            raise ConfigError("a provider is required")
        node = self.node
        if node is not None and not isinstance(node, EmbeddedNode | RemoteNode) and (
            isinstance(node, str | bytes) or not isinstance(node, Sequence)
            or not all(isinstance(n, EmbeddedNode | RemoteNode) for n in node)
        ):
            # A str is a Sequence too: "host:port" would have become one node per character.
            raise ConfigError(f"node must be a RemoteNode, an EmbeddedNode or a list of them, not {self.node!r} "
                              "(for an address: RemoteNode('host:port', token=...))")
        if self.permission_mode not in PERMISSION_MODES:
            raise ConfigError(
                f"unsupported permission mode {self.permission_mode!r}: expected one of {', '.join(PERMISSION_MODES)}"
            )
        if self.on_node_lost not in ("fail", "resume"):
            raise ConfigError(f"on_node_lost must be 'fail' or 'resume', not {self.on_node_lost!r}")
        if (isinstance(self.approval_timeout_ms, bool) or not isinstance(self.approval_timeout_ms, int)
                or not 0 <= self.approval_timeout_ms <= 24 * 3600 * 1000):
            raise ConfigError("approval_timeout_ms must be an integer of milliseconds up to 24 h (0: the node's default)")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or not -1000 <= self.priority <= 1000:
            raise ConfigError(f"priority must be an integer from -1000 to 1000, not {self.priority!r}")
        if (isinstance(self.queue_timeout_ms, bool) or not isinstance(self.queue_timeout_ms, int)
                or not 0 <= self.queue_timeout_ms <= 2**32 - 1):
            raise ConfigError(f"queue_timeout_ms must be an integer from 0 to 2**32-1, not {self.queue_timeout_ms!r}")


@dataclass(frozen=True)
class Checkpoint:
    """Where a session can be continued: a provider session id on a node."""

    provider: str
    provider_session_id: str
    run_id: str
    node: NodeTarget
    node_id: str
    captured_at: float

