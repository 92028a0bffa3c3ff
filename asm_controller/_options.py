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

#: ASM's lanes (asm_runtime.md 4.6). asm has only the core lane (the CLI as a subprocess): "auto" resolves to
#: it, "sdk" is refused (asm has no SDK runtime, and ASM refuses it for remote-node execution anyway).
LANES = ("auto", "core", "sdk")


def split_providers(text: str) -> tuple[str, ...]:
    """``"claude,gemini"`` -> ``("claude", "gemini")``: a provider failover list in one string (the CLI's
    ``--provider``, StartRunRequest.provider through a controller)."""
    return tuple(p.strip() for p in text.split(","))


def lane_metadata(requested: str, remote: bool) -> dict[str, Any]:
    """Result.metadata's lane keys, as ASM resolves them: auto on a remote node falls back from the
    (never available) SDK lane with ``sdk_remote_unsupported``; otherwise no fallback reason."""
    return {"lane": "core", "requested_lane": requested,
            "lane_fallback_reason": "sdk_remote_unsupported" if requested == "auto" and remote else None}


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
    #: Provider failover: the candidates in order (``provider`` is the first); empty: ``provider`` only.
    #: A candidate that fails before doing any work (no CLI, auth, rate limit, HTTP 5xx) hands the run
    #: to the next one (see asm_controller._run).
    providers: Sequence[str] = ()
    #: Options for one candidate only, over ``options`` (which every candidate gets).
    provider_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: ASM's lane: "auto" (default) or "core"; "sdk" is a config_invalid (no SDK lane in asm).
    lane: str = "auto"

    def __post_init__(self) -> None:
        # "claude,gemini" names a failover list (asm run --provider claude,gemini; a controller's StartRun).
        if isinstance(self.provider, str) and "," in self.provider and not self.providers:
            object.__setattr__(self, "providers", split_providers(self.provider))
        if isinstance(self.providers, str):
            object.__setattr__(self, "providers", split_providers(self.providers))
        if isinstance(self.providers, Sequence) and self.providers:
            providers = tuple(self.providers)
            object.__setattr__(self, "providers", providers if len(providers) > 1 else ())
            object.__setattr__(self, "provider", providers[0])

    @property
    def candidates(self) -> tuple[str, ...]:
        """The providers to try, in order."""
        return tuple(self.providers) or (self.provider,)

    def for_provider(self, provider: str) -> RunOptions:
        """This run's options for one candidate: that provider alone, its own options over the shared ones."""
        own = self.provider_options.get(provider) or {}
        return replace(self, provider=provider, providers=(), options={**self.options, **own})

    def merged(self, overrides: Mapping[str, Any]) -> RunOptions:
        # run_id, owner and session_id name the run, they do not configure it (Session takes them apart).
        unknown = sorted(set(overrides) - set(self.__dataclass_fields__) - {"run_id", "owner", "session_id"})
        if unknown:
            raise ConfigError(f"unknown run option(s): {', '.join(unknown)}")
        changes = {k: v for k, v in overrides.items() if k not in ("run_id", "owner", "session_id") and v is not None}
        if "provider" in changes and "providers" not in changes:
            changes["providers"] = ()  # a run naming its provider does not inherit the session's failover list
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
        if not isinstance(self.provider, str) or not self.provider:
            raise ConfigError("a provider is required")
        if isinstance(self.providers, bytes) or not isinstance(self.providers, Sequence) or not all(
                isinstance(p, str) for p in self.providers):
            raise ConfigError(f"providers must be a list of provider names, not {self.providers!r}")
        if any(not p for p in self.providers):
            raise ConfigError(f"providers has an empty name: {list(self.providers)!r}")
        seen = [p for i, p in enumerate(self.providers) if p in self.providers[:i]]
        if seen:
            raise ConfigError(f"duplicate provider candidate {seen[0]!r} in providers")
        if not isinstance(self.provider_options, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Mapping) for k, v in self.provider_options.items()):
            raise ConfigError("provider_options must map a provider name to its options (a dict)")
        strays = sorted(set(self.provider_options) - set(self.candidates))
        if strays:
            raise ConfigError(f"provider_options for {', '.join(strays)}, which is not a provider of this run "
                              f"(candidates: {', '.join(self.candidates)})")
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
        if self.lane not in LANES:
            raise ConfigError(f"invalid lane {self.lane!r}; expected auto, core, or sdk")
        if self.lane == "sdk":
            if any(isinstance(n, RemoteNode) for n in self.nodes):
                raise ConfigError("sdk lane is unavailable for remote-node execution")
            raise ConfigError("sdk lane requested but asm has no SDK runtime (only the core lane: the CLI)")


@dataclass(frozen=True)
class Checkpoint:
    """Where a session can be continued: a provider session id on a node."""

    provider: str
    provider_session_id: str
    run_id: str
    node: NodeTarget
    node_id: str
    captured_at: float

