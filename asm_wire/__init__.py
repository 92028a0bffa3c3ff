"""asm_wire: the protocol both sides of asm share.

The generated protobuf/gRPC stubs (``asm_wire.v1``), the vocabulary (:mod:`asm_wire._vocab`: event
kinds, node states, run statuses, permission modes, ... and their proto conversions), the error tree
and its gRPC mapping (:mod:`asm_wire._errors`), versions and the compatibility rule, ids, and the
:class:`NodeApi` protocol that the controller uses to talk to a node, in-process or remote.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING, Any

from asm_wire._lazy import lazy_exports

if TYPE_CHECKING:
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

#: Where each public name lives: imported on first use (``import asm_wire`` alone costs nothing; issue 15).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "asm_wire._address": ("grpc_target", "is_loopback_host", "parse_address"),
    "asm_wire._api": ("NodeApi",),
    "asm_wire._errors": (
        "DOMAINS", "KINDS", "TABLE", "ApprovalNotFound", "AsmError", "ConfigError", "CwdNotAllowed", "DecodeError",
        "GitFailed", "GitTimeout", "LeaseLost", "NodeAtCapacity", "NodeCapabilityMismatch", "NodeConnectionError",
        "NodeConnectTimeout", "NodeNotFound", "NodeNotReady", "NodeUnauthenticated", "NodeUnreachable",
        "NodeVersionMismatch", "PermissionDenied", "ProviderMissing", "ReplayGap", "RunError", "RunNotFound",
        "SnapshotNotFound", "StoreError", "StoreLocked", "WorkspaceError", "error_from_rpc", "make_error",
        "normalize_kind",
    ),
    "asm_wire._ids": ("ulid", "valid_id"),
    "asm_wire._vocab": (
        "CONTROLLER_CAPABILITIES", "KIND_NAMES", "KIND_VALUES", "MAX_MESSAGE_BYTES", "NODE_CAPABILITIES",
        "REQUIRED_CAPABILITIES", "SEVERITY_NAMES", "TERMINAL_STATUSES", "Capability", "Decision", "EventKind",
        "NodeState", "PermissionMode", "RunStatus", "Severity", "SnapshotBackend", "Strategy", "choices",
        "is_failure", "kind_name", "kind_value", "node_state_name", "node_state_value", "run_status_name",
        "run_status_value", "severity_name",
    ),
    "asm_wire.v1": ("node_pb2 as pb",),
}
_lazy_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def _metadata_version(path: str) -> str | None:
    """The ``Version:`` header of a dist-info METADATA / egg-info PKG-INFO file (None if unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("Version:"):
                    return line[len("Version:"):].strip()
                if not line.strip():  # the headers end at the first blank line
                    break
    except OSError:
        pass
    return None


def _installed_version() -> str:
    """The installed distribution's version (pyproject.toml is its one declaration).

    The answer of ``importlib.metadata.version("asm")`` (the same sys.path walk: the first
    ``asm-*.dist-info`` or ``asm*.egg-info`` entry), read directly: importing importlib.metadata
    (email, zipfile, csv, ...) costs a client run ~10 ms. Anything unusual falls back to it."""
    for entry in sys.path:
        try:
            children = os.listdir(entry or ".")
        except OSError:
            continue
        for child in children:
            low = child.lower()
            if not low.endswith((".dist-info", ".egg-info")):
                continue
            if re.sub(r"[-_.]+", "_", low.rpartition(".")[0].partition("-")[0]) != "asm":
                continue
            where = os.path.join(entry or ".", child)
            found = _metadata_version(os.path.join(where, "METADATA" if low.endswith(".dist-info") else "PKG-INFO")
                                      if os.path.isdir(where) else where)
            if found:
                return found
            break  # a match importlib.metadata would read differently: ask it
        else:
            continue
        break
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = globals()["__version__"] = _installed_version()
        return value
    return _lazy_getattr(name)


#: Bumped on any wire change a peer must understand; peers must agree exactly.
PROTOCOL_VERSION = 1


def version_major_minor(version: str) -> tuple[int, int] | None:
    """The first two integers of a version string ("0-9-build7" -> (0, 9)), as ASM compares them."""
    parts = [p for p in re.split(r"\D+", version) if p]
    if len(parts) < 2:
        return None
    return int(parts[0]), int(parts[1])


def error_info(err: AsmError) -> pb.ErrorInfo:
    from asm_wire.v1 import node_pb2 as pb

    return pb.ErrorInfo(kind=err.kind, domain=err.domain, message=err.message, reason=err.reason)


def error_from_info(info: pb.ErrorInfo) -> AsmError:
    from asm_wire._errors import make_error

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
