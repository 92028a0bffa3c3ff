"""Workspace git runs no repository-controlled code (issue 9, item 4).

A repository's ``.git/config`` (written by whatever ran in the workspace) sets ``core.fsmonitor``,
hooks, filter drivers named by ``.gitattributes``, diff drivers and an included config: snapshots,
diffs and rollbacks through a real node (gRPC on 127.0.0.1) still work, and none of those programs
ever runs. Git gets a scrubbed environment (no ``ASM_TOKEN``), keeps git's ``safe.directory`` rule,
and every git failure is a typed error.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asm_controller._client import GrpcNodeClient, RemoteNode
from asm_node import NodeServer
from asm_node.workspace import Workspaces
from asm_wire import AsmError, ConfigError, GitFailed, WorkspaceError, pb

# Git as the test (the "user") runs it: never the node's hardened invocation, and never the evil config.
_PLAIN = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*_PLAIN, "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def evil_script(path: Path, markers: Path, name: str) -> str:
    """A program that leaves ``markers/<name>`` (with whether it saw ASM_TOKEN) and passes stdin through."""
    path.write_text(f'#!/bin/sh\necho "$0 $* token=${{ASM_TOKEN:-none}}" >> "{markers / name}"\nexec cat\n')
    path.chmod(0o755)
    return str(path)


def booby_trap(repo: Path, tmp: Path) -> Path:
    """Arm ``repo`` with every repository-controlled way of making git run a program; returns the marker dir."""
    markers = tmp / "markers"
    markers.mkdir()
    bin_ = tmp / "evil-bin"
    bin_.mkdir()
    hooks = tmp / "evil-hooks"
    hooks.mkdir()
    for hook in ("reference-transaction", "post-checkout", "pre-commit", "post-index-change", "pre-auto-gc"):
        for d in (hooks, repo / ".git" / "hooks"):
            evil_script(d / hook, markers, f"hook-{hook}")
    included = tmp / "included.gitconfig"
    included.write_text(f"[filter \"inc\"]\n\tclean = {evil_script(bin_ / 'inc-clean', markers, 'inc-clean')}\n"
                        f"\tsmudge = {evil_script(bin_ / 'inc-smudge', markers, 'inc-smudge')}\n\trequired = true\n")
    cfg = {
        "core.fsmonitor": evil_script(bin_ / "fsmonitor", markers, "fsmonitor"),
        "core.hooksPath": str(hooks),
        "core.pager": evil_script(bin_ / "pager", markers, "pager"),
        "filter.evil.clean": evil_script(bin_ / "clean", markers, "filter-clean"),
        "filter.evil.smudge": evil_script(bin_ / "smudge", markers, "filter-smudge"),
        "filter.evil.required": "true",
        "filter.proc.process": evil_script(bin_ / "process", markers, "filter-process"),
        "diff.evil.textconv": evil_script(bin_ / "textconv", markers, "textconv"),
        "diff.evil.command": evil_script(bin_ / "diffcmd", markers, "diff-command"),
        "diff.external": evil_script(bin_ / "extdiff", markers, "diff-external"),
        "gc.auto": "1",
        "include.path": str(included),
    }
    for key, value in cfg.items():
        git(repo, "config", key, value)
    return markers


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q")
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@example.com")
    (path / ".gitattributes").write_text("*.txt filter=evil diff=evil\n*.dat filter=inc\n*.bin filter=proc\n")
    (path / "a.txt").write_text("alpha\n")
    (path / "b.dat").write_text("bravo\n")
    (path / "c.bin").write_text("charlie\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


@pytest.fixture
async def client(grpc_node: NodeServer) -> AsyncIterator[GrpcNodeClient]:
    c = GrpcNodeClient(RemoteNode(f"127.0.0.1:{grpc_node.port}"))
    try:
        yield c
    finally:
        await c.close()


async def test_a_booby_trapped_repository_runs_nothing_and_snapshots_still_work(
    tmp_path: Path, client: GrpcNodeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASM_TOKEN", "s3cret-token-of-the-agent")
    repo = make_repo(tmp_path / "repo")
    markers = booby_trap(repo, tmp_path)
    cwd = str(repo)

    first = await client.snapshot(pb.SnapshotRequest(cwd=cwd, backend="git", label="before"))
    (repo / "a.txt").write_text("alpha, changed\n")
    (repo / "b.dat").unlink()
    (repo / "new.txt").write_text("new\n")
    (repo / "c.bin").write_text("charlie, changed\n")
    second = await client.snapshot(pb.SnapshotRequest(cwd=cwd, backend="git", label="after"))
    d = await client.diff(pb.DiffRequest(cwd=cwd, from_id=first.id))
    assert list(d.added) == ["new.txt"] and list(d.deleted) == ["b.dat"]
    assert list(d.modified) == ["a.txt", "c.bin"]
    assert "+alpha, changed" in d.patch  # the raw content: no textconv, no external diff
    between = await client.diff(pb.DiffRequest(cwd=cwd, from_id=first.id, to_id=second.id))
    assert list(between.modified) == ["a.txt", "c.bin"]
    res = await client.rollback(pb.RollbackRequest(cwd=cwd, snapshot_id=first.id))
    assert list(res.restored) == ["a.txt", "b.dat", "c.bin"] and list(res.removed) == ["new.txt"]
    assert (repo / "a.txt").read_text() == "alpha\n"
    assert (repo / "b.dat").read_text() == "bravo\n"
    assert (repo / "c.bin").read_text() == "charlie\n"
    # Roll forward again, through the pre-rollback snapshot's ref (a fresh lookup).
    await client.rollback(pb.RollbackRequest(cwd=cwd, snapshot_id=second.id))
    assert (repo / "a.txt").read_text() == "alpha, changed\n"

    ran = {p.name: p.read_text() for p in markers.iterdir()}
    assert ran == {}, f"repository-controlled programs ran as the agent: {ran}"


async def test_git_gets_a_scrubbed_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A git wrapper records its environment and arguments: no agent secret, no user config, safe options."""
    monkeypatch.setenv("ASM_TOKEN", "s3cret-token-of-the-agent")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-agent-key")
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "git-calls"
    wrapper = tmp_path / "git-wrapper"
    wrapper.write_text(f'#!/bin/sh\n{{ env; echo "ARGS $*"; echo ---; }} >> "{log}"\nexec git "$@"\n')
    wrapper.chmod(0o755)
    ws = Workspaces(git=str(wrapper))
    info = ws.snapshot(str(repo), "git", "")
    (repo / "a.txt").write_text("changed\n")
    ws.rollback(str(repo), info.id)
    calls = log.read_text().split("---\n")[:-1]
    assert len(calls) > 5
    for call in calls:
        env = dict(line.split("=", 1) for line in call.splitlines() if "=" in line and not line.startswith("ARGS"))
        args = next(line for line in call.splitlines() if line.startswith("ARGS "))
        assert "ASM_TOKEN" not in env and "ANTHROPIC_API_KEY" not in env, env
        if args.startswith(("ARGS config --system", "ARGS config --global")):
            continue  # reading the operator's safe.directory entries: their config, still no secret
        assert env["GIT_CONFIG_NOSYSTEM"] == "1" and env["GIT_CONFIG_GLOBAL"] == os.devnull
        assert env["HOME"] != os.environ.get("HOME") and os.listdir(env["HOME"]) == []
        assert env["LC_ALL"] == "C"
        assert "core.fsmonitor=false" in args and "core.hooksPath=/dev/null" in args
    # Every `add` and `checkout-index` disabled the repository's filter drivers by name.
    filtering = [c for c in calls if " add " in c or " checkout-index " in c]
    assert filtering and all("filter.evil.clean=" not in c for c in filtering)  # no driver configured yet
    (tmp_path / "t").mkdir()
    booby_trap(repo, tmp_path / "t")
    log.write_text("")
    ws.snapshot(str(repo), "git", "")
    adds = [c for c in log.read_text().split("---\n") if " add " in c]
    assert adds and all("filter.evil.clean= " in c and "filter.evil.required=false" in c
                        and "filter.inc.smudge= " in c and "filter.proc.process= " in c for c in adds)


def test_operator_filters_never_run_and_snapshots_hold_the_working_tree_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter from the operator's own git config (like git-lfs) filled the real index with *cleaned*
    blobs; the node runs no filter, so a snapshot re-hashes tracked files and rollback restores the bytes
    that were on disk, not the cleaned blob."""
    markers = tmp_path / "markers"
    markers.mkdir()
    upper = tmp_path / "upper"
    upper.write_text(f'#!/bin/sh\necho ran >> "{markers / "operator-filter"}"\nexec tr a-z A-Z\n')
    upper.chmod(0o755)
    operator_cfg = tmp_path / "operator.gitconfig"
    operator_cfg.write_text(f'[filter "up"]\n\tclean = {upper}\n')
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitattributes").write_text("*.up filter=up\n")
    (repo / "doc.up").write_text("lower case on disk\n")
    past = time.time() - 100
    os.utime(repo / "doc.up", (past, past))  # not "racily clean": the index's stat data is trusted
    env = {**os.environ, "GIT_CONFIG_GLOBAL": str(operator_cfg)}
    subprocess.run([*_PLAIN, "-C", str(repo), "-c", "user.name=T", "-c", "user.email=t@e", "add", "-A"],
                   check=True, env=env)
    subprocess.run([*_PLAIN, "-C", str(repo), "-c", "user.name=T", "-c", "user.email=t@e", "commit", "-qm", "i"],
                   check=True, env=env)
    assert git(repo, "cat-file", "-p", "HEAD:doc.up") == "LOWER CASE ON DISK\n"  # the index holds the cleaned blob
    (markers / "operator-filter").unlink()

    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(operator_cfg))  # the agent's user has that config
    ws = Workspaces()
    info = ws.snapshot(str(repo), "git", "")
    (repo / "doc.up").write_text("changed\n")
    ws.rollback(str(repo), info.id)
    assert (repo / "doc.up").read_text() == "lower case on disk\n"
    assert not markers.joinpath("operator-filter").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a repository owned by another user")
def test_a_repository_of_another_user_is_refused_unless_the_operator_allows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "repo")
    for dirpath, dirnames, filenames in os.walk(repo):
        for name in [*dirnames, *filenames, "."]:
            os.lchown(os.path.join(dirpath, name), 54321, 54321)
    operator_cfg = tmp_path / "operator.gitconfig"
    operator_cfg.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(operator_cfg))
    with pytest.raises(ConfigError, match="owned by another user") as err:
        Workspaces().snapshot(str(repo), "git", "")
    assert err.value.reason == "git_unsafe_repository"
    assert Workspaces().snapshot(str(repo), "auto", "").backend == "hash"
    # The operator's own safe.directory entry is honoured (never a blanket safe.directory=*).
    operator_cfg.write_text(f"[safe]\n\tdirectory = {repo}\n")
    assert Workspaces().snapshot(str(repo), "git", "").backend == "git"


async def test_git_failures_are_typed_over_grpc(
    tmp_path: Path, grpc_node: NodeServer, client: GrpcNodeClient, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_repo(tmp_path / "repo")
    broken = tmp_path / "broken-git"
    broken.write_text('#!/bin/sh\nfor a; do [ "$a" = write-tree ] && { echo "fatal: disk on fire" >&2; exit 128; }; '
                      'done\nexec git "$@"\n')
    broken.chmod(0o755)
    grpc_node.agent.workspace = Workspaces(git=str(broken))
    with caplog.at_level(logging.ERROR), pytest.raises(AsmError, match="disk on fire") as err:
        await client.snapshot(pb.SnapshotRequest(cwd=str(repo), backend="git"))
    assert (err.value.kind, err.value.domain, err.value.reason) == ("tool_failed", "tool", "git_failed")
    assert isinstance(err.value, GitFailed)  # the class survives the gRPC round trip
    assert "git write-tree failed" in err.value.message
    assert not [r for r in caplog.records if r.exc_info], "a git failure logged a traceback"


def test_io_failures_are_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo")
    ws = Workspaces()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))  # the temp index has nowhere to go
    with pytest.raises(AsmError, match="workspace snapshot failed") as err:
        ws.snapshot(str(repo), "git", "")
    assert (err.value.kind, err.value.reason) == ("tool_failed", "workspace_io")
    assert isinstance(err.value, WorkspaceError)


def test_snapshot_ids_are_matched_whole(tmp_path: Path) -> None:
    # `^...$` with .match let "git-<id>\n" through to git as a ref name.
    repo = make_repo(tmp_path / "repo")
    ws = Workspaces()
    snap = ws.snapshot(str(repo), "git", "")
    with pytest.raises(AsmError) as info:
        ws.diff(str(repo), snap.id + "\n", "", 1024)
    assert "snapshot ids look like" in info.value.message
    assert ws.diff(str(repo), snap.id, "", 1024) is not None
