"""The workspace package's face: the names of the old module still import, and the two backends
work on their own behind the small Backend protocol (the facade only picks and dispatches)."""

from __future__ import annotations

from pathlib import Path

import pytest

import asm_node.workspace as workspace
from asm_node.workspace import BACKENDS, REF_PREFIX, Backend, GitBackend, GitRunner, HashBackend, Workspaces
from asm_wire import ConfigError, SnapshotNotFound


def test_names_of_the_old_module_still_import() -> None:
    assert BACKENDS == ("git", "hash", "auto")
    assert REF_PREFIX == "refs/asm/snapshots/"
    assert all(hasattr(workspace, n) for n in workspace.__all__)


def test_backends_satisfy_the_protocol() -> None:
    backends: dict[str, Backend] = dict(Workspaces().backends)
    assert sorted(backends) == ["git", "hash"]
    assert isinstance(backends["git"], GitBackend) and isinstance(backends["hash"], HashBackend)
    for name, b in backends.items():
        assert b.name == name
        for method in ("snapshot", "recover", "diff", "rollback"):
            assert callable(getattr(b, method))


def test_hash_backend_alone(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n")
    b = HashBackend()
    snap = b.snapshot(str(tmp_path), "lbl")
    assert snap.backend == "hash" and snap.id.startswith("hash-") and snap.file_count == 1
    (tmp_path / "a.txt").write_text("two\n")
    (tmp_path / "b.txt").write_text("new\n")
    d = b.diff(str(tmp_path), snap, None, 0)
    assert list(d.modified) == ["a.txt"] and list(d.added) == ["b.txt"] and not d.deleted
    with pytest.raises(ConfigError) as err:
        b.rollback(str(tmp_path), snap)
    assert err.value.reason == "rollback_unsupported"
    with pytest.raises(SnapshotNotFound) as err:
        b.recover(str(tmp_path), snap.id)
    assert err.value.reason == "snapshot_not_found" and err.value.kind == "not_found"


def test_the_facade_shares_one_git_runner() -> None:
    ws = Workspaces(git="/opt/git", git_timeout_s=3.0)
    assert isinstance(ws.runner, GitRunner)
    assert (ws.git, ws.git_timeout_s, ws.runner.git, ws.runner.git_timeout_s) == ("/opt/git", 3.0, "/opt/git", 3.0)
    ws.git = "/usr/bin/git"
    assert ws.runner.git == "/usr/bin/git"
    assert (ws.max_hash_snapshots, ws.max_git_snapshots) == (64, 4096)


def test_hash_snapshots_over_the_cap_are_forgotten(tmp_path: Path) -> None:
    ws = Workspaces(max_hash_snapshots=2)
    ids = [ws.snapshot(str(tmp_path), "hash", str(i)).id for i in range(3)]
    with pytest.raises(SnapshotNotFound, match="forgotten when the node restarts"):
        ws.diff(str(tmp_path), ids[0], "", 0)
    assert not ws.diff(str(tmp_path), ids[2], "", 0).added
