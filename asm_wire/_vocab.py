"""asm's vocabulary: every closed set of names the wire, the node and the controller share.

One declaration per set, and the conversions between a proto enum's integer and its name live
here and nowhere else. The sets that mirror a proto enum (:class:`EventKind`, :class:`NodeState`,
:class:`RunStatus`, :class:`Severity`) are checked against ``asm_wire.v1`` by tests/test_vocab.py:
adding a value to the proto without adding it here (or the other way round) fails that test.
:data:`KIND_NAMES` is derived from ``pb.EventKind`` itself, never kept by hand.

All sets are :class:`enum.StrEnum`: a member *is* its string (``PermissionMode.AUTO == "auto"``), so
a value read from JSON, argparse or a proto string field compares, hashes and serialises as before.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from asm_wire.v1 import node_pb2 as pb

__all__ = [
    "CONTROLLER_CAPABILITIES", "KIND_NAMES", "KIND_VALUES", "MAX_MESSAGE_BYTES", "NODE_CAPABILITIES",
    "REQUIRED_CAPABILITIES", "SEVERITY_NAMES", "TERMINAL_STATUSES",
    "Capability", "Decision", "EventKind", "NodeState", "PermissionMode", "RunStatus", "Severity",
    "SnapshotBackend", "Strategy",
    "choices", "is_failure", "kind_name", "kind_value", "node_state_name", "node_state_value", "run_status_name",
    "run_status_value", "severity_name",
]

#: gRPC message cap on both sides (server and client channels): event batches carry lines up to a
#: node's line cap (8 MiB by default), so the cap sits well above it.
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024


def _names(enum: object, prefix: str) -> tuple[str, ...]:
    """A proto enum's short lower-case names indexed by value (the enum must be dense from 0)."""
    items = sorted(((int(v), str(n)) for n, v in enum.items()), key=lambda p: p[0])  # type: ignore[attr-defined]
    if [v for v, _ in items] != list(range(len(items))):
        raise RuntimeError(f"proto enum {prefix}* is not dense from 0: cannot index its names")
    return tuple(n.removeprefix(prefix).lower() for _, n in items)


# -- proto-backed sets ---------------------------------------------------------------------------


class EventKind(StrEnum):
    """An event's kind, as ``pb.EventKind`` without its ``EVENT_KIND_`` prefix."""

    UNSPECIFIED = "unspecified"
    RUN_STARTED = "run_started"
    ASSISTANT_DELTA = "assistant_delta"
    ASSISTANT_MESSAGE = "assistant_message"
    USER_MESSAGE = "user_message"
    THINKING = "thinking"
    TOOL_USE = "tool_use"
    TOOL_RESULT = "tool_result"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_RESOLVED = "approval_resolved"
    COST_UPDATE = "cost_update"
    RESULT = "result"
    ERROR = "error"
    STDERR = "stderr"
    RAW = "raw"
    RUN_COMPLETED = "run_completed"
    GUARDRAIL_TRIGGERED = "guardrail_triggered"
    PROVIDER_INIT = "provider_init"


class NodeState(StrEnum):
    """A node's admission state, as ``pb.NodeState`` without its ``NODE_STATE_`` prefix."""

    UNSPECIFIED = "unspecified"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"


class RunStatus(StrEnum):
    """A run's status on a node, as ``pb.RunStatus`` without its ``RUN_STATUS_`` prefix.

    ``RunCompleted.status`` and ``Result``'s reduced status use the last three
    (:data:`TERMINAL_STATUSES`).
    """

    UNSPECIFIED = "unspecified"
    STARTING = "starting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    QUEUED = "queued"  # controller only: in the fleet queue


#: The statuses a run ends with (``RunCompleted.status``): it will not change again.
TERMINAL_STATUSES: Final = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.INTERRUPTED})


class Severity(StrEnum):
    """An error event's severity, as ``pb.Severity``; ``unspecified`` is read as ``error``."""

    UNSPECIFIED = "unspecified"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    FATAL = "fatal"


#: Event kind names indexed by ``pb.EventKind`` value, derived from the proto enum.
KIND_NAMES: Final[tuple[str, ...]] = _names(pb.EventKind, "EVENT_KIND_")
KIND_VALUES: Final[dict[str, pb.EventKind.ValueType]] = {
    name: pb.EventKind.ValueType(i) for i, name in enumerate(KIND_NAMES)
}
_NODE_STATE_NAMES: Final = _names(pb.NodeState, "NODE_STATE_")
_RUN_STATUS_NAMES: Final = _names(pb.RunStatus, "RUN_STATUS_")
#: Severity names indexed by ``pb.Severity`` value, ``unspecified`` read as ``error`` (the proto's rule).
SEVERITY_NAMES: Final[tuple[str, ...]] = tuple(
    "error" if n == "unspecified" else n for n in _names(pb.Severity, "SEVERITY_"))


def _name(names: tuple[str, ...], value: int) -> str:
    # A value from a newer peer's proto has no name here: say its number rather than fail.
    return names[value] if 0 <= value < len(names) else str(int(value))


def kind_name(value: int) -> str:
    """``pb.EVENT_KIND_TOOL_USE`` -> ``"tool_use"`` (a value this proto lacks -> its number)."""
    return _name(KIND_NAMES, value)


def kind_value(name: str) -> pb.EventKind.ValueType:
    """``"tool_use"`` -> ``pb.EVENT_KIND_TOOL_USE``; KeyError for a name that is not a kind."""
    return KIND_VALUES[name]


def node_state_name(value: int) -> str:
    """``pb.NODE_STATE_DRAINING`` -> ``"draining"`` (a value this proto lacks -> its number)."""
    return _name(_NODE_STATE_NAMES, value)


def node_state_value(name: str) -> pb.NodeState.ValueType:
    """``"draining"`` -> ``pb.NODE_STATE_DRAINING``; ValueError for a name that is not a state."""
    return pb.NodeState.ValueType(_NODE_STATE_NAMES.index(NodeState(name)))


def run_status_name(value: int) -> str:
    """``pb.RUN_STATUS_FAILED`` -> ``"failed"`` (a value this proto lacks -> its number)."""
    return _name(_RUN_STATUS_NAMES, value)


def run_status_value(name: str) -> pb.RunStatus.ValueType:
    """``"failed"`` -> ``pb.RUN_STATUS_FAILED``; ValueError for a name that is not a status."""
    return pb.RunStatus.ValueType(_RUN_STATUS_NAMES.index(RunStatus(name)))


def severity_name(value: int) -> str:
    """``pb.SEVERITY_WARNING`` -> ``"warning"``; unspecified and unknown values read as ``"error"``."""
    return SEVERITY_NAMES[value] if 0 <= value < len(SEVERITY_NAMES) else "error"


def is_failure(severity: int) -> bool:
    """Does an error event of this severity fail its run? (error, fatal, and unspecified = error)"""
    return severity in (pb.SEVERITY_ERROR, pb.SEVERITY_FATAL, pb.SEVERITY_UNSPECIFIED)


def choices(vocabulary: type[StrEnum]) -> tuple[str, ...]:
    """A vocabulary's values in declaration order, as plain strings (argparse ``choices=``, messages)."""
    return tuple(member.value for member in vocabulary)


# -- sets carried as strings on the wire -----------------------------------------------------------


class PermissionMode(StrEnum):
    """How much a CLI may do unasked (``StartRunRequest.permission_mode``); providers map each to flags."""

    DEFAULT = "default"
    AUTO = "auto"
    BYPASS = "bypass"
    PLAN = "plan"


class Decision(StrEnum):
    """An approval's answer (``ResolveApprovalRequest.decision``, ``ApprovalResolved.decision``)."""

    ALLOW = "allow"
    DENY = "deny"


class Strategy(StrEnum):
    """How the controller picks a node among the eligible ones (see asm_controller._routing)."""

    PRIORITY = "priority"
    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"
    #: Power-of-two choices on the nodes' reported load (the controller service's default).
    LEAST_LOADED = "least_loaded"


class SnapshotBackend(StrEnum):
    """How a workspace snapshot is taken (``SnapshotRequest.backend``); ``auto`` = git when it is a repo."""

    GIT = "git"
    HASH = "hash"
    AUTO = "auto"


class Capability(StrEnum):
    """A handshake capability: what a peer's NodeService implements."""

    RUN_START = "run.start.v1"
    RUN_ATTACH = "run.attach.v1"
    RUN_INTERRUPT = "run.interrupt.v1"
    RUN_QUERY = "run.query.v1"
    APPROVAL_RESOLVE = "approval.resolve.v1"
    INPUT_SEND = "input.send.v1"
    #: The controller's fleet calls (ControllerService).
    FLEET = "fleet.v1"


#: What a node agent announces, in this order (the handshake lists them as given).
NODE_CAPABILITIES: Final[tuple[Capability, ...]] = (
    Capability.RUN_START, Capability.RUN_ATTACH, Capability.RUN_INTERRUPT, Capability.RUN_QUERY,
    Capability.APPROVAL_RESOLVE, Capability.INPUT_SEND,
)
#: What a controller announces: a node's set plus the fleet calls.
CONTROLLER_CAPABILITIES: Final[tuple[Capability, ...]] = (*NODE_CAPABILITIES, Capability.FLEET)
#: What a controller needs from a node to use it at all.
REQUIRED_CAPABILITIES: Final = frozenset({
    Capability.RUN_START, Capability.RUN_ATTACH, Capability.RUN_INTERRUPT, Capability.APPROVAL_RESOLVE,
})
