"""The facade: resolve the cwd, pick the backend, remember snapshots, dispatch by a snapshot's backend."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

from asm_node.workspace._git import GitBackend
from asm_node.workspace._gitrun import GitRunner
from asm_node.workspace._hash import HashBackend
from asm_node.workspace._model import _ID_RE, BACKENDS, _Memory, _not_found, _Snap, _typed_io
from asm_wire import ConfigError, SnapshotBackend, pb

__all__ = ["Backend", "Workspaces"]


class Backend(Protocol):
    """One way of snapshotting a directory. ``root`` is the resolved snapshot root; snapshots are
    bound to it (the facade checks that before calling ``diff``/``rollback``)."""

    name: str

    def snapshot(self, root: str, label: str) -> _Snap: ...

    def recover(self, root: str, snapshot_id: str) -> _Snap:
        """A snapshot of this backend that is not in memory (or a :class:`~asm_wire.SnapshotNotFound`)."""
        ...

    def diff(self, root: str, old: _Snap, new: _Snap | None, max_patch_bytes: int) -> pb.DiffResponse:
        """``old`` against ``new``, or against the directory as it is now when ``new`` is None."""
        ...

    def rollback(self, root: str, snap: _Snap) -> pb.RollbackResponse: ...


class Workspaces:
    """Snapshot, diff and rollback of working directories (blocking; called in a thread)."""

    def __init__(self, *, git: str = "git", git_timeout_s: float = 120.0, max_hash_snapshots: int = 64,
                 max_git_snapshots: int = 4096) -> None:
        self.runner = GitRunner(git, git_timeout_s)
        # Git snapshots over the cap are forgotten here only: they are recovered from their ref.
        self._memory = _Memory({SnapshotBackend.HASH: max_hash_snapshots, SnapshotBackend.GIT: max_git_snapshots})
        self._git = GitBackend(self.runner, self._memory)
        self._backends: dict[str, Backend] = {SnapshotBackend.GIT: self._git, SnapshotBackend.HASH: HashBackend()}

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The backends by name (read-only): ``git`` and ``hash``."""
        return MappingProxyType(self._backends)

    @property
    def git(self) -> str:
        return self.runner.git

    @git.setter
    def git(self, value: str) -> None:
        self.runner.git = value

    @property
    def git_timeout_s(self) -> float:
        return self.runner.git_timeout_s

    @git_timeout_s.setter
    def git_timeout_s(self, value: float) -> None:
        self.runner.git_timeout_s = value

    @property
    def max_hash_snapshots(self) -> int:
        return self._memory.caps[SnapshotBackend.HASH]

    @property
    def max_git_snapshots(self) -> int:
        return self._memory.caps[SnapshotBackend.GIT]

    @_typed_io
    def snapshot(self, cwd: str, backend: str, label: str) -> pb.SnapshotInfo:
        root = self._root(cwd)
        backend = (backend or SnapshotBackend.GIT).strip().lower()
        if backend not in BACKENDS:
            raise ConfigError(f"unknown workspace backend {backend!r} (use one of: {', '.join(BACKENDS)})",
                              reason="unknown_backend")
        if backend == SnapshotBackend.AUTO:
            backend = SnapshotBackend.GIT if self._git.usable(root) else SnapshotBackend.HASH
        snap = self._backends[backend].snapshot(root, label)
        self._memory.remember(snap)
        return snap.info()

    @_typed_io
    def diff(self, cwd: str, from_id: str, to_id: str, max_patch_bytes: int) -> pb.DiffResponse:
        root = self._root(cwd)
        if not from_id:
            raise ConfigError("diff needs from_id (a snapshot id)")
        old = self._lookup(from_id, root)
        new = self._lookup(to_id, root) if to_id else None
        if new is not None and new.backend != old.backend:
            raise ConfigError(f"cannot diff a {old.backend} snapshot ({old.id}) against a {new.backend} snapshot "
                              f"({new.id}): both must come from the same backend")
        return self._backends[old.backend].diff(root, old, new, max_patch_bytes)

    @_typed_io
    def rollback(self, cwd: str, snapshot_id: str) -> pb.RollbackResponse:
        root = self._root(cwd)
        if not snapshot_id:
            raise ConfigError("rollback needs snapshot_id")
        snap = self._lookup(snapshot_id, root)
        return self._backends[snap.backend].rollback(root, snap)

    def _lookup(self, snapshot_id: str, root: str) -> _Snap:
        if not _ID_RE.fullmatch(snapshot_id):
            raise _not_found(snapshot_id, "snapshot ids look like git-<id> or hash-<id>")
        snap = self._memory.get(snapshot_id)
        if snap is None:
            snap = self._backends[snapshot_id.partition("-")[0]].recover(root, snapshot_id)
            self._memory.remember(snap)
        if snap.cwd != root:
            raise ConfigError(f"snapshot {snapshot_id} was taken for {snap.cwd!r}, not for {root!r}",
                              reason="snapshot_cwd_mismatch")
        return snap

    @staticmethod
    def _root(cwd: str) -> str:
        if not cwd:
            raise ConfigError("a workspace cwd is required")
        root = os.path.realpath(os.path.expanduser(cwd))
        if not os.path.isdir(root):
            raise ConfigError(f"workspace cwd {cwd!r} does not exist or is not a directory", reason="cwd_not_found")
        return root
