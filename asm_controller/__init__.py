"""asm_controller: drive provider CLIs on node agents and reduce their events into Results.

Layout: ``_client`` (gRPC NodeApi client, ControllerClient, TLS/keepalive config), ``_connector``
(connect, handshake, compatibility, preflight), ``_pool`` (NodePool: connections,
health, routing), ``_options`` (RunOptions, Checkpoint), ``_run`` (one run's driver,
behind a narrow host interface), ``_channel`` (driver -> subscriber hand-off), ``_queue``
(BoundedQueue: one bounded queue with named overflow policies),
``_session`` (sessions: admission, approvals, cost), ``_reducer`` (EventReducer,
Result), ``_events`` (Event), ``_snapshot`` (a run between two workspace snapshots).

    async with Session("shell", node=RemoteNode("10.0.0.5:7070", token=...)) as s:
        result = await s.query("echo hello")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asm_wire._lazy import lazy_exports

if TYPE_CHECKING:
    from asm_controller._client import (
        ControllerClient,
        GrpcNodeClient,
        KeepaliveConfig,
        LivenessConfig,
        RemoteNode,
        TLSConfig,
    )
    from asm_controller._connector import EmbeddedNode, NodeHandle, NodeTarget, check_compatible, connect, preflight
    from asm_controller._events import Event
    from asm_controller._pool import NodePool
    from asm_controller._queue import BoundedQueue, Overflow, QueueClosed, QueueDisconnected, QueueEmpty
    from asm_controller._reducer import Cost, EventReducer, Result
    from asm_controller._registry import NullRegistry, StoreRegistry
    from asm_controller._routing import HealthTracker, Router
    from asm_controller._session import Checkpoint, RunOptions, RunStream, Session, query
    from asm_controller._snapshot import SnapshotRun, SnapshotStream, run_with_snapshot, stream_with_snapshot
    from asm_controller._store import (
        IN_FLIGHT,
        InvalidRecord,
        MemoryStore,
        RunExists,
        RunNotFound,
        RunRecord,
        RunStore,
        StoreError,
        StoreWriter,
        open_store,
    )
    from asm_wire import (
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
        SnapshotNotFound,
        StoreLocked,
        WorkspaceError,
    )

#: Where each public name lives, imported on first use: a client run reads Session and RemoteNode and
#: never pays for the store backends, snapshots or the registry it does not touch (issue 15).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "asm_controller._client": (
        "ControllerClient", "GrpcNodeClient", "KeepaliveConfig", "LivenessConfig", "RemoteNode", "TLSConfig",
    ),
    "asm_controller._connector": (
        "EmbeddedNode", "NodeHandle", "NodeTarget", "check_compatible", "connect", "preflight",
    ),
    "asm_controller._events": ("Event",),
    "asm_controller._pool": ("NodePool",),
    "asm_controller._queue": ("BoundedQueue", "Overflow", "QueueClosed", "QueueDisconnected", "QueueEmpty",),
    "asm_controller._reducer": ("Cost", "EventReducer", "Result",),
    "asm_controller._registry": ("NullRegistry", "StoreRegistry",),
    "asm_controller._routing": ("HealthTracker", "Router",),
    "asm_controller._session": ("Checkpoint", "RunOptions", "RunStream", "Session", "query",),
    "asm_controller._snapshot": ("SnapshotRun", "SnapshotStream", "run_with_snapshot", "stream_with_snapshot",),
    "asm_controller._store": (
        "IN_FLIGHT", "InvalidRecord", "MemoryStore", "RunExists", "RunNotFound", "RunRecord", "RunStore",
        "StoreError", "StoreWriter", "open_store",
    ),
    "asm_wire": (
        "ApprovalNotFound", "AsmError", "ConfigError", "CwdNotAllowed", "DecodeError", "GitFailed", "GitTimeout",
        "LeaseLost", "NodeAtCapacity", "NodeCapabilityMismatch", "NodeConnectionError", "NodeConnectTimeout",
        "NodeNotFound", "NodeNotReady", "NodeUnauthenticated", "NodeUnreachable", "NodeVersionMismatch",
        "PermissionDenied", "ProviderMissing", "ReplayGap", "RunError", "SnapshotNotFound", "StoreLocked",
        "WorkspaceError",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "IN_FLIGHT",
    "ApprovalNotFound",
    "AsmError",
    "BoundedQueue",
    "Checkpoint",
    "ConfigError",
    "ControllerClient",
    "Cost",
    "CwdNotAllowed",
    "DecodeError",
    "EmbeddedNode",
    "Event",
    "EventReducer",
    "GitFailed",
    "GitTimeout",
    "GrpcNodeClient",
    "HealthTracker",
    "InvalidRecord",
    "KeepaliveConfig",
    "LeaseLost",
    "LivenessConfig",
    "MemoryStore",
    "NodeAtCapacity",
    "NodeCapabilityMismatch",
    "NodeConnectTimeout",
    "NodeConnectionError",
    "NodeHandle",
    "NodeNotFound",
    "NodeNotReady",
    "NodePool",
    "NodeTarget",
    "NodeUnauthenticated",
    "NodeUnreachable",
    "NodeVersionMismatch",
    "NullRegistry",
    "Overflow",
    "PermissionDenied",
    "ProviderMissing",
    "QueueClosed",
    "QueueDisconnected",
    "QueueEmpty",
    "RemoteNode",
    "ReplayGap",
    "Result",
    "Router",
    "RunError",
    "RunExists",
    "RunNotFound",
    "RunOptions",
    "RunRecord",
    "RunStore",
    "RunStream",
    "Session",
    "SnapshotNotFound",
    "SnapshotRun",
    "SnapshotStream",
    "StoreError",
    "StoreLocked",
    "StoreRegistry",
    "StoreWriter",
    "TLSConfig",
    "WorkspaceError",
    "check_compatible",
    "connect",
    "open_store",
    "preflight",
    "query",
    "run_with_snapshot",
    "stream_with_snapshot",
]
