"""Workspace snapshots on the node that owns the workspace: git and hash backends.

(Skeleton: the backends are being written.)
"""

from __future__ import annotations

from asm_wire import ConfigError, pb


class Workspaces:
    """Snapshot, diff and rollback of working directories (blocking; called in a thread)."""

    def snapshot(self, cwd: str, backend: str, label: str) -> pb.SnapshotInfo:
        raise ConfigError("workspace snapshots are not available on this node yet")

    def diff(self, cwd: str, from_id: str, to_id: str, max_patch_bytes: int) -> pb.DiffResponse:
        raise ConfigError("workspace snapshots are not available on this node yet")

    def rollback(self, cwd: str, snapshot_id: str) -> pb.RollbackResponse:
        raise ConfigError("workspace snapshots are not available on this node yet")
