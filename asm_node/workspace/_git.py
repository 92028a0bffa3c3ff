"""The git backend: snapshots as tree objects kept by ``refs/asm/snapshots/<id>``, diff, and rollback
(what it writes, what it refuses, what it leaves alone: the package docstring)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

from asm_node.workspace._gitrun import _IDENTITY, GitRunner, _git_failed, _unsafe_repository
from asm_node.workspace._model import _display, _Memory, _not_found, _Snap
from asm_wire import AsmError, ConfigError, GitFailed, SnapshotBackend, SnapshotNotFound, pb, ulid

__all__ = ["REF_PREFIX", "GitBackend"]

log = logging.getLogger("asm_node.workspace")

REF_PREFIX = "refs/asm/snapshots/"
_META_TAG = b"asm-snapshot: "
_GITLINK = "160000"


@dataclass
class _Repo:
    cwd: str       # the snapshot root (realpath)
    toplevel: str  # the work tree's top level (realpath)
    prefix: str    # cwd relative to toplevel: "" or "a/b/"
    index: str     # the real index file


@dataclass
class _Change:
    status: str    # A | D | M | T ... from git diff-tree --raw
    path: bytes    # relative to the snapshot root
    old_mode: str  # mode in the current state ("000000": absent)
    new_mode: str  # mode in the snapshot


class GitBackend:
    """Snapshots of a git work tree (or a directory inside one) without touching its index, HEAD or refs.

    Every git command goes through ``runner``; every snapshot made (the ones asked for and the
    pre-rollback guards) is remembered in ``memory``. Operations on one repository are serialized.
    """

    name: str = SnapshotBackend.GIT

    def __init__(self, runner: GitRunner, memory: _Memory) -> None:
        self._runner = runner
        self._memory = memory
        self._locks_lock = threading.Lock()
        self._repo_locks: dict[str, threading.RLock] = {}

    def usable(self, root: str) -> bool:
        """Whether ``root`` can have git snapshots (for backend ``auto``); other failures raise."""
        return self._git_repo_or_none(root) is not None

    def snapshot(self, root: str, label: str) -> _Snap:
        repo = self._repo(root)
        with self._repo_lock(repo):
            head = self._head(repo)
            tree = self._capture_tree(repo)
            return self._store_git_snapshot(repo, tree, head, label)

    def recover(self, root: str, snapshot_id: str) -> _Snap:
        """A snapshot this process does not remember, read back from its ref."""
        return self._recover(self._repo(root), snapshot_id)

    def diff(self, root: str, old: _Snap, new: _Snap | None, max_patch_bytes: int) -> pb.DiffResponse:
        limit = max_patch_bytes if max_patch_bytes > 0 else 256 * 1024
        repo = self._repo(root)
        with self._repo_lock(repo):
            self._require_tree(repo, old)
            if new is not None:
                self._require_tree(repo, new)
            to_tree = new.tree if new is not None else self._capture_tree(repo)
            added: list[str] = []
            modified: list[str] = []
            deleted: list[str] = []
            for ch in self._tree_changes(repo, old.tree, to_tree):
                {"A": added, "D": deleted}.get(ch.status, modified).append(_display(ch.path))
            raw, over = self._runner.capped(repo.toplevel, [
                "diff-tree", "-r", "-p", "--no-renames", "--no-color", "--no-ext-diff", "--no-textconv",
                old.tree, to_tree], limit)
        patch, truncated = _cut(raw, limit)
        return pb.DiffResponse(added=sorted(added), modified=sorted(modified), deleted=sorted(deleted),
                               patch=patch, truncated=truncated or over)

    def rollback(self, root: str, snap: _Snap) -> pb.RollbackResponse:
        repo = self._repo(root)
        with self._repo_lock(repo):
            head = self._head(repo)
            if head != snap.head:
                raise ConfigError(
                    f"refusing to roll back to {snap.id}: HEAD moved since the snapshot "
                    f"(was {snap.head or 'no commit'}, now {head or 'no commit'}); check out "
                    f"{snap.head or 'the original state'} first or take a new snapshot", reason="head_moved")
            self._require_tree(repo, snap)
            current = self._capture_tree(repo)
            if current == snap.tree:
                return pb.RollbackResponse()
            changes = self._tree_changes(repo, current, snap.tree)
            restore, remove = self._plan(repo, changes)  # refuses (ConfigError) before anything is changed
            guard = self._store_git_snapshot(repo, current, head, f"pre-rollback of {snap.id}")
            log.info("rolling back %s to %s: %d to restore, %d to remove; the previous state is snapshot %s",
                     repo.cwd, snap.id, len(restore), len(remove), guard.id)
            try:
                self._apply(repo, snap.tree, restore, remove)
            except Exception as exc:
                self._recover_from_failed_rollback(repo, snap, guard, exc)
            after = self._capture_tree(repo)
            if after != snap.tree:
                log.warning("rollback of %s to %s: the working directory now has tree %s, not %s "
                            "(changed concurrently?)", repo.cwd, snap.id, after, snap.tree)
        return pb.RollbackResponse(restored=sorted(_display(p) for p in restore),
                                   removed=sorted(_display(p) for p in remove))

    # -- snapshots in refs, repository plumbing ----------------------------------------

    def _store_git_snapshot(self, repo: _Repo, tree: str, head: str, label: str) -> _Snap:
        snap = _Snap(id=f"git-{ulid().lower()}", backend=SnapshotBackend.GIT, cwd=repo.cwd, label=label,
                     created_unix_nano=time.time_ns(), head=head, tree=tree,
                     file_count=self._count_files(repo, tree))
        meta = {"v": 1, "id": snap.id, "cwd": snap.cwd, "prefix": repo.prefix, "label": label,
                "created_unix_nano": snap.created_unix_nano, "head": head, "tree": tree,
                "file_count": snap.file_count}
        message = (f"asm workspace snapshot {snap.id}\n\n".encode()
                   + _META_TAG + json.dumps(meta, sort_keys=True).encode() + b"\n")
        args = ["commit-tree", "--no-gpg-sign", tree] + (["-p", head] if head else [])
        commit = self._runner.run(repo.cwd, args, input=message, env=_IDENTITY).stdout.strip().decode()
        self._runner.run(repo.cwd, ["update-ref", "--no-deref", "-m", f"asm snapshot {snap.id}",
                                    REF_PREFIX + snap.id, commit, ""])
        self._memory.remember(snap)
        return snap

    def _recover(self, repo: _Repo, snapshot_id: str) -> _Snap:
        ref = REF_PREFIX + snapshot_id
        res = self._runner.run(repo.cwd, ["rev-parse", "--verify", "-q", ref + "^{commit}"], check=False)
        if res.returncode != 0:
            raise _not_found(snapshot_id, f"not in this node's memory and no {ref} in the repository of {repo.cwd!r}")
        commit = res.stdout.strip().decode()
        body = self._runner.run(repo.cwd, ["cat-file", "commit", commit]).stdout
        headers, _, message = body.partition(b"\n\n")
        tree = next((h[5:].decode() for h in headers.split(b"\n") if h.startswith(b"tree ")), "")
        line = next((ln[len(_META_TAG):] for ln in message.split(b"\n") if ln.startswith(_META_TAG)), None)
        try:
            meta = json.loads(line) if line is not None else None
            if not isinstance(meta, dict) or meta.get("id") != snapshot_id or not tree:
                raise ValueError("no asm-snapshot metadata for this id")
            return _Snap(id=snapshot_id, backend=SnapshotBackend.GIT, cwd=str(meta["cwd"]), label=str(meta.get("label", "")),
                         created_unix_nano=int(meta.get("created_unix_nano", 0)), head=str(meta.get("head", "")),
                         tree=tree, file_count=int(meta.get("file_count", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotNotFound(f"{ref} is not an asm snapshot commit ({exc})") from exc

    def _repo_lock(self, repo: _Repo) -> threading.RLock:
        with self._locks_lock:
            return self._repo_locks.setdefault(repo.toplevel, threading.RLock())

    def _git_repo_or_none(self, root: str) -> _Repo | None:
        try:
            return self._repo(root)
        except ConfigError as exc:
            if exc.reason in ("git_missing", "not_a_git_work_tree", "cwd_ignored", "git_unsafe_repository"):
                return None
            raise

    def _repo(self, root: str) -> _Repo:
        res = self._runner.run(root, ["rev-parse", "--is-inside-work-tree"], check=False)
        if res.returncode != 0 and b"dubious ownership" in res.stderr:
            raise _unsafe_repository(root)
        if res.returncode != 0 or res.stdout.strip() != b"true":
            raise ConfigError(f"{root!r} is not inside a git work tree: the git backend needs one "
                              "(use backend \"hash\" for a plain directory)", reason="not_a_git_work_tree")
        top = self._runner.run(root, ["rev-parse", "--show-toplevel"]).stdout.removesuffix(b"\n")
        index = self._runner.run(root, ["rev-parse", "--git-path", "index"]).stdout.removesuffix(b"\n")
        toplevel = os.path.realpath(os.fsdecode(top))
        prefix = os.path.relpath(root, toplevel)
        if prefix == os.curdir:
            prefix = ""
        elif prefix == os.pardir or prefix.startswith(os.pardir + os.sep):
            raise ConfigError(f"{root!r} is not below its git top level {toplevel!r}", reason="not_a_git_work_tree")
        else:
            prefix = prefix.replace(os.sep, "/") + "/"
            ignored = self._runner.run(root, ["check-ignore", "-q", "."], check=False)
            if ignored.returncode == 0:
                raise ConfigError(f"{root!r} is ignored by git (.gitignore), so a git snapshot would be empty; "
                                  "use backend \"hash\"", reason="cwd_ignored")
        return _Repo(cwd=root, toplevel=toplevel, prefix=prefix, index=os.path.join(root, os.fsdecode(index)))

    def _head(self, repo: _Repo) -> str:
        res = self._runner.run(repo.cwd, ["rev-parse", "--verify", "-q", "HEAD^{commit}"], check=False)
        return res.stdout.strip().decode() if res.returncode == 0 else ""

    def _require_tree(self, repo: _Repo, snap: _Snap) -> None:
        res = self._runner.run(repo.cwd, ["cat-file", "-e", snap.tree + "^{tree}"], check=False)
        if res.returncode != 0:
            raise SnapshotNotFound(f"the tree {snap.tree} of snapshot {snap.id} is no longer in the repository of "
                                   f"{repo.cwd!r} (was {REF_PREFIX}{snap.id} deleted and the objects pruned?)")

    def _capture_tree(self, repo: _Repo) -> str:
        """Write the current content of the snapshot root as a tree, through a temporary index."""
        with tempfile.TemporaryDirectory(prefix="asm-workspace-") as tmp:
            index = os.path.join(tmp, "index")
            if os.path.isfile(repo.index):
                shutil.copyfile(repo.index, index)
            env = {"GIT_INDEX_FILE": index}
            added = self._runner.run(repo.cwd, ["--literal-pathspecs", "add", "-A", "--", "."], env=env, check=False)
            if added.returncode != 0:
                # `git add` refuses a nested repository that has no commit yet (an agent ran
                # `git init`): leave those out of the snapshot (and so out of any rollback).
                unborn = self._unborn_nested_repos(repo, env)
                if not unborn:
                    raise _git_failed(["add"], repo.cwd, added.returncode, added.stderr)
                self._runner.run(repo.cwd, ["add", "-A", "--", ":(literal).",
                                            *(b":(exclude,literal)" + p for p in unborn)], env=env)
            if self._runner.filter_names(repo.cwd) or self._runner.operator()[1]:
                # Filter drivers exist (the repository's, or the operator's, e.g. git-lfs) but never run
                # here: the copied index may hold *filtered* blobs for unchanged files. Re-hash every
                # tracked file as it is on disk, so the snapshot is the working tree's bytes throughout.
                self._runner.run(repo.cwd, ["--literal-pathspecs", "add", "--renormalize", "--", "."], env=env)
            res = self._runner.run(repo.cwd, ["write-tree"], env=env, check=False)
            if res.returncode != 0:
                # Unmerged entries elsewhere in the repository (a conflict outside cwd) block
                # write-tree: stage the whole work tree in the temp index and try again.
                self._runner.run(repo.toplevel, ["--literal-pathspecs", "add", "-A", "--", "."], env=env)
                res = self._runner.run(repo.cwd, ["write-tree"], env=env)
            top_tree = res.stdout.strip().decode()
        if not repo.prefix:
            return top_tree
        # (Everything after the colon is the path: no ^{tree} peeling here, check the type instead.)
        sub = self._runner.run(repo.toplevel, ["rev-parse", "--verify", "-q", f"{top_tree}:{repo.prefix.rstrip('/')}"],
                               check=False)
        if sub.returncode == 0:
            oid = sub.stdout.strip().decode()
            if self._runner.run(repo.toplevel, ["cat-file", "-t", oid]).stdout.strip() == b"tree":
                return oid
        # Nothing in cwd that git would track (empty, or only ignored files): the empty tree.
        empty = self._runner.run(repo.cwd, ["hash-object", "-w", "-t", "tree", "--stdin"], input=b"")
        return empty.stdout.strip().decode()

    def _unborn_nested_repos(self, repo: _Repo, env: dict[str, str]) -> list[bytes]:
        """Untracked nested repositories below cwd whose HEAD has no commit (paths relative to cwd)."""
        out = self._runner.run(repo.cwd, ["--literal-pathspecs", "ls-files", "-z", "--others", "--exclude-standard",
                                          "--", "."], env=env).stdout
        root = os.fsencode(repo.cwd)
        unborn: list[bytes] = []
        for path in out.split(b"\0"):
            if not path.endswith(b"/"):
                continue
            full = os.path.join(root, path)
            if os.path.lexists(os.path.join(full, b".git")):
                res = self._runner.run(os.fsdecode(full), ["rev-parse", "--verify", "-q", "HEAD^{commit}"], check=False)
                if res.returncode != 0:
                    unborn.append(path.rstrip(b"/"))
        return unborn

    def _count_files(self, repo: _Repo, tree: str) -> int:
        out = self._runner.run(repo.toplevel, ["ls-tree", "--full-tree", "-r", "-z", "--name-only", tree]).stdout
        return out.count(b"\0")

    def _tree_changes(self, repo: _Repo, old: str, new: str) -> list[_Change]:
        out = self._runner.run(repo.toplevel,
                               ["diff-tree", "-r", "-z", "--no-renames", "--no-ext-diff", old, new]).stdout
        fields = out.split(b"\0")
        changes: list[_Change] = []
        i = 0
        while i < len(fields) and fields[i]:
            meta = fields[i].decode().split(" ")
            if len(meta) != 5 or not meta[0].startswith(":") or i + 1 >= len(fields):
                raise GitFailed(f"unexpected git diff-tree output {fields[i]!r}")
            status = meta[4][:1]
            npaths = 2 if status in ("R", "C") else 1
            path = fields[i + npaths]
            changes.append(_Change(status=status, path=path, old_mode=meta[0][1:], new_mode=meta[1]))
            i += 1 + npaths
        return changes

    # -- rollback -------------------------------------------------------------------

    def _plan(self, repo: _Repo, changes: Iterable[_Change]) -> tuple[list[bytes], list[bytes]]:
        """(paths to write from the snapshot, paths to delete); refuses unsafe or conflicting rollbacks."""
        root = os.fsencode(repo.cwd)
        restore: list[bytes] = []
        remove: list[bytes] = []
        gitlinks: list[bytes] = []
        for ch in changes:
            _check_rel(ch.path)
            if _GITLINK in (ch.old_mode, ch.new_mode):
                gitlinks.append(ch.path)  # nested repositories are never touched
            elif ch.status == "D":
                remove.append(ch.path)
            else:
                restore.append(ch.path)
        removing = set(remove)
        conflicts: list[str] = []
        for path in remove:
            full = os.path.join(root, path)
            if not _inside(os.path.realpath(os.path.dirname(full)), root):
                raise ConfigError(f"refusing to roll back: {_display(path)!r} is not inside {repo.cwd!r}",
                                  reason="unsafe_path")
        for path in restore:
            parts = path.split(b"/")
            for n in range(1, len(parts)):
                anc = b"/".join(parts[:n])
                if any(anc == g or anc.startswith(g + b"/") for g in gitlinks):
                    conflicts.append(f"{_display(anc)} (a nested repository)")
                    break
                try:
                    st = os.lstat(os.path.join(root, anc))
                except FileNotFoundError:
                    break
                if stat.S_ISDIR(st.st_mode):
                    continue
                if anc not in removing:
                    conflicts.append(f"{_display(anc)} (an ignored file where the snapshot has a directory)")
                break
            full = os.path.join(root, path)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                left = [p for p in _files_under(full, path) if p not in removing]
                if left:
                    conflicts.append(f"{_display(path)} (a directory holding ignored files, e.g. {_display(left[0])})")
        if conflicts:
            raise ConfigError("refusing to roll back: it would overwrite or delete content the snapshot does not "
                              "cover: " + "; ".join(sorted(set(conflicts))[:20]) + " - move it away and retry",
                              reason="rollback_conflict")
        return restore, remove

    def _apply(self, repo: _Repo, tree: str, restore: list[bytes], remove: list[bytes]) -> None:
        root = os.fsencode(repo.cwd)
        for path in sorted(remove, reverse=True):
            full = os.path.join(root, path)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                raise AsmError(f"{_display(path)!r} became a directory during the rollback")
            os.unlink(full)
            parent = os.path.dirname(full)
            while parent != root and _inside(parent, root):
                try:
                    os.rmdir(parent)
                except OSError:
                    break
                parent = os.path.dirname(parent)
        if not restore:
            return
        with tempfile.TemporaryDirectory(prefix="asm-workspace-") as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
            read = ["read-tree", f"--prefix={repo.prefix}", tree] if repo.prefix else ["read-tree", tree]
            self._runner.run(repo.toplevel, read, env=env)
            prefix = repo.prefix.encode()
            self._runner.run(repo.toplevel, ["checkout-index", "-f", "-z", "--stdin"], env=env,
                             input=b"".join(prefix + p + b"\0" for p in restore))

    def _recover_from_failed_rollback(self, repo: _Repo, snap: _Snap, guard: _Snap, exc: Exception) -> NoReturn:
        log.error("rollback of %s to %s failed: %s; restoring %s", repo.cwd, snap.id, exc, guard.id)
        try:
            current = self._capture_tree(repo)
            restore, remove = self._plan(repo, self._tree_changes(repo, current, guard.tree))
            self._apply(repo, guard.tree, restore, remove)
        except Exception as exc2:
            raise AsmError(f"rollback to {snap.id} failed ({exc}) and restoring the previous state also failed "
                           f"({exc2}); the previous state is snapshot {guard.id}") from exc
        raise AsmError(f"rollback to {snap.id} failed ({exc}); the working directory was restored to its "
                       f"previous state (kept as snapshot {guard.id})") from exc


# -- helpers ---------------------------------------------------------------------------


def _cut(data: bytes, limit: int) -> tuple[str, bool]:
    """Decode a patch and cut it to at most ``limit`` UTF-8 bytes (at a line end when possible)."""
    text = data.decode("utf-8", "replace")
    encoded = text.encode()
    if len(encoded) <= limit and len(data) <= limit:
        return text, False
    head = encoded[:limit]
    nl = head.rfind(b"\n")
    if nl >= 0:
        head = head[:nl + 1]
    return head.decode("utf-8", "ignore"), True


def _check_rel(path: bytes) -> None:
    parts = path.split(b"/")
    if (not path or path.startswith(b"/") or b"\0" in path
            or any(p in (b"", b".", b"..") or p.lower() == b".git" for p in parts)):
        raise ConfigError(f"refusing to roll back: unsafe path {_display(path)!r} in the snapshot", reason="unsafe_path")


def _inside(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


def _files_under(full: bytes, rel: bytes) -> list[bytes]:
    """Relative paths of every non-directory entry below a directory (not following symlinks)."""
    out: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(full):
        sub = os.path.relpath(dirpath, full)
        base = rel if sub == b"." else rel + b"/" + sub.replace(os.sep.encode(), b"/")
        out.extend(base + b"/" + name for name in filenames)
        out.extend(base + b"/" + name for name in dirnames if os.path.islink(os.path.join(dirpath, name)))
    return out
