"""asm_wire: the protocol both sides of asm share.

The generated protobuf/gRPC stubs (``asm_wire.v1``), the vocabulary (:mod:`asm_wire._vocab`: event
kinds, node states, run statuses, permission modes, ... and their proto conversions), the error tree
and its gRPC mapping (:mod:`asm_wire._errors`), versions and the compatibility rule, ids, and the
:class:`NodeApi` protocol that the controller uses to talk to a node, in-process or remote.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from asm_wire._address import grpc_target, is_loopback_host, parse_address
from asm_wire._api import NodeApi
from asm_wire._errors import (
    DOMAINS,
    KINDS,
    TABLE,
    ApprovalNotFound,
    AsmError,
    ConfigError,
    CwdNotAllowed,
    DecodeError,
    GitFailed,
    GitTimeout,
    LeaseLost,
    NodeAtCapacity,
    NodeCapabilityMismatch,
    NodeConnectionError,
    NodeConnectTimeout,
    NodeNotFound,
    NodeNotReady,
    NodeUnauthenticated,
    NodeUnreachable,
    NodeVersionMismatch,
    PermissionDenied,
    ProviderMissing,
    ReplayGap,
    RunError,
    RunNotFound,
    SnapshotNotFound,
    StoreError,
    StoreLocked,
    WorkspaceError,
    error_from_rpc,
    make_error,
    normalize_kind,
)
from asm_wire._ids import ulid, valid_id
from asm_wire._vocab import (
    CONTROLLER_CAPABILITIES,
    KIND_NAMES,
    KIND_VALUES,
    MAX_MESSAGE_BYTES,
    NODE_CAPABILITIES,
    REQUIRED_CAPABILITIES,
    SEVERITY_NAMES,
    TERMINAL_STATUSES,
    Capability,
    Decision,
    EventKind,
    NodeState,
    PermissionMode,
    RunStatus,
    Severity,
    SnapshotBackend,
    Strategy,
    choices,
    is_failure,
    kind_name,
    kind_value,
    node_state_name,
    node_state_value,
    run_status_name,
    run_status_value,
    severity_name,
)
from asm_wire.v1 import node_pb2 as pb

try:
    #: The installed distribution's version (pyproject.toml is its one declaration).
    __version__ = version("asm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
#: Bumped on any wire change a peer must understand; peers must agree exactly.
PROTOCOL_VERSION = 1


def version_major_minor(version: str) -> tuple[int, int] | None:
    """The first two integers of a version string ("0-9-build7" -> (0, 9)), as ASM compares them."""
    parts = [p for p in re.split(r"\D+", version) if p]
    if len(parts) < 2:
        return None
    return int(parts[0]), int(parts[1])


def error_info(err: AsmError) -> pb.ErrorInfo:
    return pb.ErrorInfo(kind=err.kind, domain=err.domain, message=err.message, reason=err.reason)


def error_from_info(info: pb.ErrorInfo) -> AsmError:
    return make_error(info.kind or "unknown", info.domain or "runtime", info.message, info.reason)


__all__ = [
    "CONTROLLER_CAPABILITIES",
    "DOMAINS",
    "KINDS",
    "KIND_NAMES",
    "KIND_VALUES",
    "MAX_MESSAGE_BYTES",
    "NODE_CAPABILITIES",
    "PROTOCOL_VERSION",
    "REQUIRED_CAPABILITIES",
    "SEVERITY_NAMES",
    "TABLE",
    "TERMINAL_STATUSES",
    "ApprovalNotFound",
    "AsmError",
    "Capability",
    "ConfigError",
    "CwdNotAllowed",
    "Decision",
    "DecodeError",
    "EventKind",
    "GitFailed",
    "GitTimeout",
    "LeaseLost",
    "NodeApi",
    "NodeAtCapacity",
    "NodeCapabilityMismatch",
    "NodeConnectTimeout",
    "NodeConnectionError",
    "NodeNotFound",
    "NodeNotReady",
    "NodeState",
    "NodeUnauthenticated",
    "NodeUnreachable",
    "NodeVersionMismatch",
    "PermissionDenied",
    "PermissionMode",
    "ProviderMissing",
    "ReplayGap",
    "RunError",
    "RunNotFound",
    "RunStatus",
    "Severity",
    "SnapshotBackend",
    "SnapshotNotFound",
    "StoreError",
    "StoreLocked",
    "Strategy",
    "WorkspaceError",
    "__version__",
    "choices",
    "error_from_info",
    "error_from_rpc",
    "error_info",
    "grpc_target",
    "is_failure",
    "is_loopback_host",
    "kind_name",
    "kind_value",
    "make_error",
    "node_state_name",
    "node_state_value",
    "normalize_kind",
    "parse_address",
    "pb",
    "run_status_name",
    "run_status_value",
    "severity_name",
    "ulid",
    "valid_id",
    "version_major_minor",
]
