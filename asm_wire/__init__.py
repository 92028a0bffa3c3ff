"""asm_wire: the protocol both sides of asm share.

The generated protobuf/gRPC stubs (``asm_wire.v1``), the error type and its gRPC
mapping, versions and the compatibility rule, ids, and the :class:`NodeApi`
protocol that the controller uses to talk to a node, in-process or remote.
"""

from __future__ import annotations

import re

from asm_wire._address import grpc_target, is_loopback_host, parse_address
from asm_wire._api import NodeApi
from asm_wire._errors import (
    DOMAINS,
    KINDS,
    AsmError,
    ConfigError,
    CwdNotAllowed,
    NodeAtCapacity,
    NodeCapabilityMismatch,
    NodeConnectionError,
    NodeConnectTimeout,
    NodeNotReady,
    NodeUnauthenticated,
    NodeUnreachable,
    NodeVersionMismatch,
    PermissionDenied,
    ProviderMissing,
    RunError,
    RunNotFound,
    error_from_rpc,
    make_error,
    normalize_kind,
)
from asm_wire._ids import ulid, valid_id
from asm_wire.v1 import node_pb2 as pb

__version__ = "0.1.0"
#: Bumped on any wire change a peer must understand; peers must agree exactly.
PROTOCOL_VERSION = 1

#: Event kind names, indexed by the EventKind enum value.
KIND_NAMES: tuple[str, ...] = (
    "unspecified", "run_started", "assistant_delta", "assistant_message", "user_message",
    "thinking", "tool_use", "tool_result", "approval_requested", "approval_resolved",
    "cost_update", "result", "error", "stderr", "raw", "run_completed", "guardrail_triggered",
)
KIND_VALUES: dict[str, pb.EventKind.ValueType] = {name: pb.EventKind.ValueType(i) for i, name in enumerate(KIND_NAMES)}

SEVERITY_NAMES: tuple[str, ...] = ("error", "info", "warning", "error", "fatal")


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
    "DOMAINS", "KINDS", "KIND_NAMES", "KIND_VALUES", "PROTOCOL_VERSION", "SEVERITY_NAMES",
    "AsmError", "ConfigError", "CwdNotAllowed", "NodeApi", "NodeAtCapacity", "NodeCapabilityMismatch",
    "NodeConnectTimeout", "NodeConnectionError", "NodeNotReady", "NodeUnauthenticated",
    "NodeUnreachable", "NodeVersionMismatch", "PermissionDenied", "ProviderMissing", "RunError", "RunNotFound", "__version__",
    "error_from_info", "error_from_rpc", "error_info", "grpc_target", "is_loopback_host",
    "make_error", "normalize_kind", "parse_address", "pb", "ulid", "valid_id", "version_major_minor",
]
