"""What the backends share: the snapshot record, its wire form, and the snapshots kept in memory."""

from __future__ import annotations

import functools
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from asm_wire import SnapshotBackend, SnapshotNotFound, WorkspaceError, choices, pb

__all__ = ["BACKENDS"]

#: The backend names a SnapshotRequest may give (``auto``: git when the cwd is in a work tree).
BACKENDS = choices(SnapshotBackend)
_ID_RE = re.compile(r"(git|hash)-[0-9a-z]{1,64}")


def _display(path: bytes) -> str:
    """A path for the wire: UTF-8 decoded; undecodable bytes as ``\\xNN`` (protobuf strings must be UTF-8)."""
    return path.decode("utf-8", "backslashreplace")


def _not_found(snapshot_id: str, why: str) -> SnapshotNotFound:
    return SnapshotNotFound(f"unknown snapshot id {snapshot_id!r}: {why}")


@dataclass
class _Snap:
    id: str
    backend: str
    cwd: str
    label: str
    created_unix_nano: int
    head: str = ""
    tree: str = ""
    file_count: int = 0
    manifest: dict[str, str] = field(default_factory=dict)

    def info(self) -> pb.SnapshotInfo:
        return pb.SnapshotInfo(
            id=self.id, backend=self.backend, cwd=_display(os.fsencode(self.cwd)), label=self.label,
            created_unix_nano=self.created_unix_nano, git_head=self.head, git_tree=self.tree,
            file_count=self.file_count,
        )


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _typed_io(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """An OS error on the way (temp index, unreadable or vanished file) is a typed error, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            raise WorkspaceError(f"workspace {fn.__name__} failed: {exc}") from exc
    return wrapper


class _Memory:
    """The snapshots this process knows, newest last, capped per backend (git ones are also in refs)."""

    def __init__(self, caps: dict[str, int]) -> None:
        self.caps = caps
        self._lock = threading.Lock()
        self._snapshots: OrderedDict[str, _Snap] = OrderedDict()

    def remember(self, snap: _Snap) -> None:
        with self._lock:
            self._snapshots[snap.id] = snap
            self._snapshots.move_to_end(snap.id)
            for backend, cap in self.caps.items():
                ids = [k for k, s in self._snapshots.items() if s.backend == backend]
                for k in ids[:max(len(ids) - cap, 0)]:
                    del self._snapshots[k]

    def get(self, snapshot_id: str) -> _Snap | None:
        with self._lock:
            return self._snapshots.get(snapshot_id)
