"""The hash backend: a manifest of content hashes for any directory; diff only, kept in memory."""

from __future__ import annotations

import hashlib
import os
import stat
import time

from asm_node.workspace._model import _display, _not_found, _Snap
from asm_wire import AsmError, ConfigError, SnapshotBackend, pb, ulid

__all__ = ["HashBackend"]


class HashBackend:
    """Snapshots as ``{path: sha256 | "link:<target>"}`` manifests (see the package docstring)."""

    name: str = SnapshotBackend.HASH

    def snapshot(self, root: str, label: str) -> _Snap:
        manifest = _manifest(root)
        return _Snap(id=f"hash-{ulid().lower()}", backend=SnapshotBackend.HASH, cwd=root, label=label,
                     created_unix_nano=time.time_ns(), file_count=len(manifest), manifest=manifest)

    def recover(self, root: str, snapshot_id: str) -> _Snap:
        raise _not_found(snapshot_id, "hash snapshots live in the node's memory and are forgotten "
                                      "when the node restarts")

    def diff(self, root: str, old: _Snap, new: _Snap | None, max_patch_bytes: int) -> pb.DiffResponse:
        after = new.manifest if new is not None else _manifest(root)
        before = old.manifest
        return pb.DiffResponse(
            added=sorted(after.keys() - before.keys()),
            deleted=sorted(before.keys() - after.keys()),
            modified=sorted(p for p in before.keys() & after.keys() if before[p] != after[p]),
        )

    def rollback(self, root: str, snap: _Snap) -> pb.RollbackResponse:
        raise ConfigError(f"hash snapshots cannot be rolled back ({snap.id}): they record content hashes, "
                          "not content; take a git snapshot (backend \"git\") to be able to roll back",
                          reason="rollback_unsupported")


def _manifest(root: str) -> dict[str, str]:
    """{relative path: sha256 hex | "link:<target>"} of every file below root, ``.git`` entries skipped."""
    out: dict[str, str] = {}
    stack: list[tuple[bytes, bytes]] = [(os.fsencode(root), b"")]
    while stack:
        directory, rel = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            if rel:
                continue  # removed while we walked
            raise ConfigError(f"workspace cwd {root!r} disappeared", reason="cwd_not_found") from None
        except OSError as exc:
            raise AsmError(f"cannot list {_display(directory)!r} for a hash snapshot: {exc.strerror}") from exc
        for entry in entries:
            if entry.name == b".git":
                continue
            path = rel + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    out[_display(path)] = "link:" + _display(os.readlink(entry.path))
                elif stat.S_ISDIR(st.st_mode):
                    stack.append((entry.path, path + b"/"))
                elif stat.S_ISREG(st.st_mode):
                    out[_display(path)] = _sha256(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise AsmError(f"cannot read {_display(path)!r} for a hash snapshot: {exc.strerror}") from exc
    return out


def _sha256(path: bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
