"""Workspace snapshots: the git backend (snapshot, diff, rollback, gc, recovery) and the hash backend."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from asm_node import NodeAgent, NodeConfig
from asm_node.workspace import REF_PREFIX, GitBackend, Workspaces, _Repo
from asm_wire import AsmError, ConfigError, CwdNotAllowed, GitTimeout, SnapshotNotFound, pb

SPACED = "notes with spaces.txt"
UNICODE = "café-ünïcode.txt"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def status(repo: Path) -> str:
    return git(repo, "-c", "core.quotepath=off", "status", "--porcelain", "--untracked-files=all")


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "commit.gpgsign", "false")
    (path / ".gitignore").write_text("*.log\nbuild/\n")
    (path / "tracked.txt").write_text("one\ntwo\nthree\n")
    (path / SPACED).write_text("spaced\n")
    (path / UNICODE).write_text("unicode\n")
    (path / "src").mkdir()
    (path / "src" / "main.py").write_text("print('hi')\n")
    (path / "gone.txt").write_text("will be deleted\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def files(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if ".git" in p.relative_to(root).parts or p.is_dir():
            continue
        out[p.relative_to(root).as_posix()] = p.read_text()
    return out


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


def mutate(repo: Path) -> None:
    (repo / "tracked.txt").write_text("one\nTWO CHANGED\nthree\n")
    (repo / SPACED).write_text("spaced, modified\n")
    (repo / UNICODE).unlink()
    (repo / "gone.txt").unlink()
    (repo / "src" / "new module.py").write_text("x = 1\n")
    (repo / "brand-new.txt").write_text("untracked\n")
    (repo / "debug.log").write_text("ignored, written after the snapshot\n")


# -- git backend --------------------------------------------------------------------


def test_git_snapshot_diff_rollback(repo: Path) -> None:
    ws = Workspaces()
    # State at snapshot time: an uncommitted edit, a staged new file, an untracked file, an ignored file.
    (repo / "src" / "main.py").write_text("print('uncommitted')\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    (repo / "untracked-before.txt").write_text("untracked at snapshot time\n")
    (repo / "old.log").write_text("ignored\n")
    before_files = files(repo)
    before_status = status(repo)
    head = git(repo, "rev-parse", "HEAD").strip()
    index_before = (repo / ".git" / "index").read_bytes()

    info = ws.snapshot(str(repo), "git", "before the agent")
    assert info.id.startswith("git-") and info.backend == "git" and info.label == "before the agent"
    assert info.git_head == head and len(info.git_tree) == 40
    assert info.cwd == str(repo.resolve())
    # tracked (5 incl. .gitignore) + staged + untracked; not the ignored file
    assert info.file_count == 8
    assert git(repo, "rev-parse", f"{REF_PREFIX}{info.id}^{{tree}}").strip() == info.git_tree
    # The snapshot wrote neither the index nor HEAD.
    assert (repo / ".git" / "index").read_bytes() == index_before
    assert status(repo) == before_status
    assert git(repo, "ls-tree", "-r", "--name-only", info.git_tree).splitlines().count("untracked-before.txt") == 1

    mutate(repo)
    diff = ws.diff(str(repo), info.id, "", 1 << 20)
    assert list(diff.added) == ["brand-new.txt", "src/new module.py"]
    assert list(diff.modified) == [SPACED, "tracked.txt"]
    assert list(diff.deleted) == [UNICODE, "gone.txt"]
    assert "-two\n+TWO CHANGED\n" in diff.patch
    assert UNICODE in diff.patch  # names are not octal-quoted
    assert not diff.truncated

    # Truncation at max_patch_bytes.
    small = ws.diff(str(repo), info.id, "", 100)
    assert small.truncated and len(small.patch.encode()) <= 100
    assert list(small.added) == list(diff.added)

    res = ws.rollback(str(repo), info.id)
    assert sorted(res.restored) == sorted([SPACED, UNICODE, "gone.txt", "tracked.txt"])
    assert sorted(res.removed) == ["brand-new.txt", "src/new module.py"]
    after = files(repo)
    # Every file is back, the added ones are gone, the ignored files are untouched (the new one stays).
    assert after.pop("debug.log") == "ignored, written after the snapshot\n"
    assert after == before_files
    assert (repo / "old.log").read_text() == "ignored\n"
    # HEAD and the real index are as they were: git status is what it was at snapshot time.
    assert git(repo, "rev-parse", "HEAD").strip() == head
    assert status(repo) == before_status
    assert "A  staged.txt" in before_status
    # The state before the rollback was kept as a snapshot (undo).
    refs = git(repo, "for-each-ref", "--format=%(refname)", REF_PREFIX).split()
    assert len(refs) == 2
    # Nothing left to do: a second rollback is a no-op and the diff is empty.
    assert ws.rollback(str(repo), info.id) == pb.RollbackResponse()
    empty = ws.diff(str(repo), info.id, "", 1000)
    assert not (empty.added or empty.modified or empty.deleted or empty.patch)


def test_rollback_can_be_undone_with_the_pre_rollback_snapshot(repo: Path) -> None:
    ws = Workspaces()
    info = ws.snapshot(str(repo), "git", "")
    mutate(repo)
    mutated = files(repo)
    ws.rollback(str(repo), info.id)
    refs = git(repo, "for-each-ref", "--format=%(refname:lstrip=3)", REF_PREFIX).split()
    (guard,) = [r for r in refs if r != info.id]
    ws.rollback(str(repo), guard)
    assert files(repo) == mutated


def test_diff_between_two_snapshots(repo: Path) -> None:
    ws = Workspaces()
    a = ws.snapshot(str(repo), "git", "a")
    mutate(repo)
    b = ws.snapshot(str(repo), "git", "b")
    (repo / "later.txt").write_text("not in b\n")
    d = ws.diff(str(repo), a.id, b.id, 0)
    assert list(d.added) == ["brand-new.txt", "src/new module.py"]
    assert "later.txt" not in d.patch
    back = ws.diff(str(repo), b.id, a.id, 0)
    assert list(back.deleted) == list(d.added)


def test_rollback_refused_when_head_moved(repo: Path) -> None:
    ws = Workspaces()
    info = ws.snapshot(str(repo), "git", "")
    (repo / "tracked.txt").write_text("committed later\n")
    git(repo, "commit", "-q", "-am", "moves HEAD")
    with pytest.raises(ConfigError, match="HEAD moved") as err:
        ws.rollback(str(repo), info.id)
    assert err.value.kind == "config_invalid"
    assert (repo / "tracked.txt").read_text() == "committed later\n"
    # Diff still works.
    assert list(ws.diff(str(repo), info.id, "", 0).modified) == ["tracked.txt"]


def test_repo_without_commits(tmp_path: Path) -> None:
    repo = tmp_path / "fresh"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("a\n")
    ws = Workspaces()
    info = ws.snapshot(str(repo), "git", "")
    assert info.git_head == "" and info.file_count == 1
    (repo / "a.txt").write_text("changed\n")
    (repo / "b.txt").write_text("b\n")
    res = ws.rollback(str(repo), info.id)
    assert list(res.restored) == ["a.txt"] and list(res.removed) == ["b.txt"]
    assert files(repo) == {"a.txt": "a\n"}
    assert not (repo / ".git" / "index").exists()  # still never written


def test_snapshot_survives_gc_and_a_new_instance(repo: Path) -> None:
    info = Workspaces().snapshot(str(repo), "git", "kept")
    (repo / "brand-new.txt").write_text("added after the snapshot\n")
    (repo / "tracked.txt").write_text("edited\n")
    git(repo, "-c", "gc.reflogExpire=now", "-c", "gc.reflogExpireUnreachable=now", "gc", "-q", "--prune=now")
    assert git(repo, "cat-file", "-t", info.git_tree).strip() == "tree"

    fresh = Workspaces()  # a restarted node: nothing in memory
    d = fresh.diff(str(repo), info.id, "", 0)
    assert list(d.added) == ["brand-new.txt"] and list(d.modified) == ["tracked.txt"]
    res = fresh.rollback(str(repo), info.id)
    assert list(res.removed) == ["brand-new.txt"]
    assert (repo / "tracked.txt").read_text() == "one\ntwo\nthree\n"


def test_untracked_content_survives_gc(repo: Path) -> None:
    (repo / "only-here.txt").write_text("exists only in the snapshot\n")
    info = Workspaces().snapshot(str(repo), "git", "")
    (repo / "only-here.txt").unlink()
    git(repo, "gc", "-q", "--prune=now")
    Workspaces().rollback(str(repo), info.id)
    assert (repo / "only-here.txt").read_text() == "exists only in the snapshot\n"


def test_subdirectory_snapshot_covers_only_the_subdirectory(repo: Path) -> None:
    ws = Workspaces()
    sub = repo / "src"
    info = ws.snapshot(str(sub), "git", "")
    assert info.file_count == 1
    (repo / "tracked.txt").write_text("outside the snapshot root\n")
    (sub / "main.py").write_text("changed\n")
    (sub / "extra.py").write_text("new\n")
    d = ws.diff(str(sub), info.id, "", 0)
    assert list(d.added) == ["extra.py"] and list(d.modified) == ["main.py"]
    res = ws.rollback(str(sub), info.id)
    assert list(res.restored) == ["main.py"] and list(res.removed) == ["extra.py"]
    assert (repo / "tracked.txt").read_text() == "outside the snapshot root\n"
    with pytest.raises(ConfigError, match="was taken for"):
        ws.diff(str(repo), info.id, "", 0)


def test_rollback_refuses_to_clobber_ignored_content(repo: Path) -> None:
    ws = Workspaces()
    (repo / "data").write_text("a file in the snapshot\n")
    info = ws.snapshot(str(repo), "git", "")
    (repo / "data").unlink()
    (repo / "data").mkdir()
    (repo / "data" / "cache.log").write_text("ignored\n")
    with pytest.raises(ConfigError, match="ignored"):
        ws.rollback(str(repo), info.id)
    assert (repo / "data" / "cache.log").read_text() == "ignored\n"
    # A directory that only held non-ignored files is replaced by the snapshot's file.
    (repo / "data" / "cache.log").unlink()
    (repo / "data" / "x.txt").write_text("x\n")
    res = ws.rollback(str(repo), info.id)
    assert list(res.removed) == ["data/x.txt"] and list(res.restored) == ["data"]
    assert (repo / "data").read_text() == "a file in the snapshot\n"


def test_symlinks_and_modes(repo: Path) -> None:
    ws = Workspaces()
    (repo / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(repo / "run.sh", 0o755)
    os.symlink("tracked.txt", repo / "link")
    info = ws.snapshot(str(repo), "git", "")
    os.chmod(repo / "run.sh", 0o644)
    os.unlink(repo / "link")
    os.symlink("/etc", repo / "link")
    d = ws.diff(str(repo), info.id, "", 0)
    assert list(d.modified) == ["link", "run.sh"]
    ws.rollback(str(repo), info.id)
    assert os.readlink(repo / "link") == "tracked.txt"
    assert os.stat(repo / "run.sh").st_mode & 0o111


def test_awkward_names(repo: Path) -> None:
    ws = Workspaces()
    quoted = 'say "hi"\tand\nnewline.txt'
    raw = os.fsencode(repo) + b"/latin1-\xe9.txt"  # not UTF-8
    (repo / quoted).write_text("q\n")
    info = ws.snapshot(str(repo), "git", "")
    (repo / quoted).write_text("changed\n")
    with open(raw, "wb") as fh:
        fh.write(b"x\n")
    d = ws.diff(str(repo), info.id, "", 0)
    assert list(d.modified) == [quoted]
    assert list(d.added) == ["latin1-\\xe9.txt"]  # undecodable bytes shown escaped
    d.SerializeToString()  # valid protobuf strings
    res = ws.rollback(str(repo), info.id)
    assert list(res.removed) == ["latin1-\\xe9.txt"] and list(res.restored) == [quoted]
    assert not os.path.lexists(raw) and (repo / quoted).read_text() == "q\n"


def test_nested_repositories_are_left_alone(repo: Path) -> None:
    ws = Workspaces()
    info = ws.snapshot(str(repo), "git", "")
    unborn = repo / "scratch"  # `git init` without a commit: git add refuses it, the snapshot skips it
    unborn.mkdir()
    git(unborn, "init", "-q")
    (unborn / "work.txt").write_text("w\n")
    born = make_repo(repo / "vendor" / "lib")  # a nested repository with commits: a gitlink
    (repo / "plain.txt").write_text("p\n")
    d = ws.diff(str(repo), info.id, "", 0)
    assert list(d.added) == ["plain.txt", "vendor/lib"]
    res = ws.rollback(str(repo), info.id)
    assert list(res.removed) == ["plain.txt"]
    assert (unborn / "work.txt").read_text() == "w\n"
    assert (born / "tracked.txt").read_text() == "one\ntwo\nthree\n"
    assert ws.snapshot(str(unborn), "git", "").file_count == 1  # and it can be snapshotted on its own


def test_failed_rollback_restores_the_previous_state(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspaces()
    info = ws.snapshot(str(repo), "git", "")
    mutate(repo)
    mutated = files(repo)
    real_apply = GitBackend._apply  # the git backend writes the working tree
    calls: list[int] = []

    def failing_apply(self: GitBackend, repo_: _Repo, tree: str, restore: list[bytes], remove: list[bytes]) -> None:
        calls.append(1)
        if len(calls) == 1:  # the rollback: delete what it would delete, then fail
            real_apply(self, repo_, tree, [], remove)
            raise OSError("disk on fire")
        real_apply(self, repo_, tree, restore, remove)

    monkeypatch.setattr(GitBackend, "_apply", failing_apply)
    with pytest.raises(AsmError, match=r"disk on fire.*restored to its previous state"):
        ws.rollback(str(repo), info.id)
    assert files(repo) == mutated


@pytest.mark.slow
def test_concurrent_snapshots(repo: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ws = Workspaces()
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda i: ws.snapshot(str(repo), "git" if i % 2 else "hash", str(i)), range(16)))
    assert len({i.id for i in infos}) == 16
    assert len({i.git_tree for i in infos if i.backend == "git"}) == 1
    assert len(git(repo, "for-each-ref", REF_PREFIX).splitlines()) == 8


def test_errors_are_clear(repo: Path, tmp_path: Path) -> None:
    ws = Workspaces()
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ConfigError, match="not inside a git work tree") as err:
        ws.snapshot(str(plain), "git", "")
    assert err.value.kind == "config_invalid"
    with pytest.raises(ConfigError, match="not inside a git work tree"):
        ws.snapshot(str(repo / ".git"), "git", "")
    with pytest.raises(ConfigError, match="unknown workspace backend"):
        ws.snapshot(str(repo), "svn", "")
    with pytest.raises(ConfigError, match="does not exist"):
        ws.snapshot(str(tmp_path / "missing"), "git", "")
    with pytest.raises(SnapshotNotFound, match="unknown snapshot id"):
        ws.diff(str(repo), "git-doesnotexist", "", 0)
    with pytest.raises(SnapshotNotFound, match="unknown snapshot id"):
        ws.rollback(str(repo), "git-../../heads/main")
    with pytest.raises(SnapshotNotFound, match="unknown snapshot id"):
        ws.diff(str(repo), "hash-0123", "", 0)
    with pytest.raises(ConfigError, match="from_id"):
        ws.diff(str(repo), "", "", 0)
    (repo / "build").mkdir()
    with pytest.raises(ConfigError, match="ignored by git"):
        ws.snapshot(str(repo / "build"), "git", "")
    info = ws.snapshot(str(repo), "git", "")
    other = make_repo(tmp_path / "other")
    with pytest.raises(ConfigError, match="was taken for"):
        ws.rollback(str(other), info.id)
    with pytest.raises(SnapshotNotFound, match="unknown snapshot id"):  # a fresh node: not in memory, no ref there
        Workspaces().rollback(str(other), info.id)
    h = ws.snapshot(str(repo), "hash", "")
    with pytest.raises(ConfigError, match="same backend"):
        ws.diff(str(repo), info.id, h.id, 0)
    with pytest.raises(ConfigError, match="git executable"):
        Workspaces(git="/nonexistent/git").snapshot(str(repo), "git", "")
    assert ws.snapshot(str(plain), "auto", "").backend == "hash"
    assert ws.snapshot(str(repo), "auto", "").backend == "git"


@pytest.mark.slow
def test_git_timeout_is_an_asm_error(repo: Path, tmp_path: Path) -> None:
    slow = tmp_path / "slowgit"
    slow.write_text("#!/bin/sh\nexec sleep 5\n")
    slow.chmod(0o755)
    with pytest.raises(AsmError, match="timed out") as err:
        Workspaces(git=str(slow), git_timeout_s=0.2).snapshot(str(repo), "git", "")
    assert err.value.kind == "timeout" and isinstance(err.value, GitTimeout) and err.value.reason == "git_timeout"


# -- hash backend -------------------------------------------------------------------


def test_hash_backend(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    (root / "nested" / ".git").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref\n")
    (root / "nested" / ".git" / "config").write_text("x\n")
    (root / "a.txt").write_text("a\n")
    (root / "nested" / "b.txt").write_text("b\n")
    (root / "gone.txt").write_text("gone\n")
    os.symlink("a.txt", root / "link")
    ws = Workspaces()
    info = ws.snapshot(str(root), "hash", "h")
    assert info.id.startswith("hash-") and info.backend == "hash"
    assert info.file_count == 4 and info.git_tree == ""

    (root / "a.txt").write_text("changed\n")
    (root / "gone.txt").unlink()
    (root / "new file é.txt").write_text("new\n")
    (root / ".git" / "HEAD").write_text("changed, but skipped\n")
    (root / "nested" / ".git" / "config").write_text("changed, but skipped\n")
    os.unlink(root / "link")
    os.symlink("nested/b.txt", root / "link")
    d = ws.diff(str(root), info.id, "", 0)
    assert list(d.added) == ["new file é.txt"]
    assert list(d.modified) == ["a.txt", "link"]
    assert list(d.deleted) == ["gone.txt"]
    assert d.patch == "" and not d.truncated

    later = ws.snapshot(str(root), "hash", "")
    assert list(ws.diff(str(root), info.id, later.id, 0).added) == ["new file é.txt"]
    with pytest.raises(ConfigError, match="hash snapshots cannot be rolled back"):
        ws.rollback(str(root), info.id)
    with pytest.raises(SnapshotNotFound, match="forgotten when the node restarts"):
        Workspaces().diff(str(root), info.id, "", 0)


# -- through the node agent ---------------------------------------------------------


async def test_node_agent_end_to_end(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "ws" / "repo")
    agent = NodeAgent(NodeConfig(workspace_roots=[tmp_path / "ws"]))
    before = status(repo)
    info = await agent.snapshot(pb.SnapshotRequest(cwd=str(repo), backend="git", label="e2e"))
    assert info.id.startswith("git-") and info.label == "e2e"
    mutate(repo)
    d = await agent.diff(pb.DiffRequest(cwd=str(repo), from_id=info.id))
    assert list(d.added) == ["brand-new.txt", "src/new module.py"]
    assert "TWO CHANGED" in d.patch
    res = await agent.rollback(pb.RollbackRequest(cwd=str(repo), snapshot_id=info.id))
    assert sorted(res.removed) == ["brand-new.txt", "src/new module.py"]
    assert status(repo) == before

    h = await agent.snapshot(pb.SnapshotRequest(cwd=str(repo), backend="hash"))
    with pytest.raises(ConfigError, match="cannot be rolled back"):
        await agent.rollback(pb.RollbackRequest(cwd=str(repo), snapshot_id=h.id))

    outside = make_repo(tmp_path / "elsewhere")
    with pytest.raises(CwdNotAllowed):
        await agent.snapshot(pb.SnapshotRequest(cwd=str(outside), backend="git"))
    with pytest.raises(CwdNotAllowed):
        await agent.diff(pb.DiffRequest(cwd=str(outside), from_id=info.id))
    with pytest.raises(CwdNotAllowed):
        await agent.rollback(pb.RollbackRequest(cwd=str(outside), snapshot_id=info.id))
