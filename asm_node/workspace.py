"""Workspace snapshots on the node that owns the workspace: git and hash backends.

:class:`Workspaces` is blocking code; the node agent calls it through
``asyncio.to_thread`` after resolving the request's cwd against its workspace
roots. Every failure is an :class:`~asm_wire.AsmError` (bad input, unknown ids,
a refused rollback: :class:`~asm_wire.ConfigError`), never a bare exception.

**Snapshot root.** A snapshot covers exactly the directory it was taken in
(the request's cwd, symlinks resolved), never more: when cwd is a
subdirectory of a repository, the git snapshot is the *subtree* of that
directory, diff paths are relative to it, and a rollback only ever writes or
deletes below it. (ASM insists on the repository top level; covering only
cwd keeps a node inside the workspace roots it was given even when a root is
a subdirectory of a larger repository.) A snapshot is bound to its
directory: diffing or rolling it back from another cwd is refused.

**Git backend** (cwd inside a git work tree, not inside ``.git`` and not
ignored). The working tree's content - tracked files with their uncommitted
changes, plus untracked files that are not ignored - is written as a tree
object through a *temporary* index: a copy of the real index (so git's stat
cache makes this cheap and files force-added despite ``.gitignore`` stay
included) in a private temp directory, ``git add -A -- .`` from cwd,
``git write-tree``, then the subtree of cwd. The real index, HEAD and the
user's refs are never written. HEAD's commit is recorded ("" in a repository
without commits).

*gc protection and restarts.* ASM's snapshot trees are unreferenced, so
``git gc`` may prune them. Here every git snapshot gets a commit
(``git commit-tree``, HEAD as parent when there is one, a fixed
``asm-node`` identity, never signed) referenced by
``refs/asm/snapshots/<id>``; the commit message carries the metadata as one
``asm-snapshot: {json}`` line. A node that restarted (or another
``Workspaces`` instance) recovers a git snapshot from that ref. The refs are
never deleted by asm: list them with ``git for-each-ref refs/asm/snapshots``
and drop one with ``git update-ref -d refs/asm/snapshots/<id>``.

*Diff* compares trees with ``git diff-tree -r --no-renames -z`` (names are
NUL-separated, so spaces, quotes, newlines and non-ASCII names come out
exactly; ASM parsed quoted names). The unified patch is streamed and cut at
``max_patch_bytes`` (``truncated`` set) rather than read whole. Diffing
against "now" captures the current state into an unreferenced temp tree.

*Rollback* refuses when HEAD moved since the snapshot. It then captures the
current state, compares it with the snapshot and touches only what differs:
files that differ or are missing are written from the snapshot with
``git checkout-index -f`` out of a temporary index (so modes, symlinks and
eol conversion apply as on a checkout; filter drivers never run), files that are not in the
snapshot (tracked or untracked, never ignored ones) are deleted, and
directories left empty by those deletions are removed. Before anything is
changed, every path is checked (relative, no ``..`` or ``.git`` component,
parent resolving inside the snapshot root) and a rollback that would have to
overwrite or delete ignored content (an ignored file where a snapshot file
must go, a directory that still holds ignored files) or write into a nested
repository is refused. Nested repositories (gitlinks) are never touched.

*The index after a rollback:* **left exactly as it was.** Staged changes
stay staged (ASM ran ``git reset --mixed`` and lost them); HEAD and
branches do not move. If nothing was staged after the snapshot,
``git status`` afterwards is what it was at snapshot time; entries staged
after the snapshot still show as staged (``git restore --staged`` drops
them).

*Nothing is lost:* the pre-rollback state is itself kept as a git snapshot
(label ``pre-rollback of <id>``, logged, with its ref), so a rollback can be
undone by rolling back to that snapshot. If applying the rollback fails
half-way, that state is restored before the error is reported.

**Hash backend** (any directory, diff only). A manifest ``{relative path:
sha256 of the content (streamed), or "link:<target>" for a symlink}``;
entries named ``.git`` (repository directories and gitfiles) are skipped at
every depth, ``.gitignore`` is not honoured, other file types are skipped.
Hash snapshots live in this process's memory only (the newest
``max_hash_snapshots`` are kept): a node restart forgets them. They cannot be
rolled back (they store no content).

**No repository-controlled code.** Whatever ran in the workspace may have
written ``.git/config``; git runs as the agent. So git is always run without a
shell, with a timeout (a ``timeout`` error), and:

* ``core.fsmonitor=false``, ``core.hooksPath=/dev/null`` (no hook, e.g.
  ``reference-transaction`` on ``update-ref``), ``gc.auto=0``, a ``cat``
  pager, ``safe.bareRepository=explicit`` (no bare repository planted in the
  work tree is discovered); diffs with ``--no-ext-diff --no-textconv``,
  commits with ``--no-gpg-sign``;
* every filter driver the repository's config defines (includes followed) is
  made a no-op by name (``filter.<name>.clean/smudge/process`` empty,
  ``required=false``), read again before *each* git command: not only ``add``
  and ``checkout-index`` run filters, any command that writes the index
  re-hashes racily-clean entries through them. A driver name git cannot take
  on its command line (``=`` in it) refuses the repository
  (``unsafe_git_config``). Snapshots therefore hold the working tree's bytes:
  when any filter driver exists (the repository's, or the operator's own such
  as git-lfs), tracked files are re-hashed (``add --renormalize``) instead of
  trusting index blobs that went through a filter; a rollback writes those
  bytes back;
* a scrubbed environment: ``PATH``, an empty private ``HOME``, ``LC_ALL=C``,
  ``GIT_CONFIG_NOSYSTEM=1``, ``GIT_CONFIG_GLOBAL=/dev/null``,
  ``GIT_ATTR_NOSYSTEM=1``, ``core.attributesFile=/dev/null``: nothing of the
  agent's environment (``ASM_TOKEN``, API keys) and none of the user's or the
  system's git config;
* ``safe.directory`` keeps git's meaning and is never set to ``*`` by the
  node: a repository owned by another user than the agent's is refused
  (``git_unsafe_repository``; ``auto`` falls back to ``hash``), unless the
  operator listed it in the agent user's own global/system config (those
  entries alone are read from it, once). The agent normally runs as the
  workspace owner; an agent running as root on a volume owned by someone else
  is exactly where planted config is hostile.

Git failures are typed: ``tool_failed`` (domain ``tool``, reason
``git_failed``) with git's message; a missing git is ``git_missing``.
Operations on one repository are serialized by a per-repository lock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, ParamSpec, TypeVar

from asm_wire import AsmError, ConfigError, pb, ulid

log = logging.getLogger("asm_node.workspace")

BACKENDS = ("git", "hash", "auto")
REF_PREFIX = "refs/asm/snapshots/"
_META_TAG = b"asm-snapshot: "
_ID_RE = re.compile(r"(git|hash)-[0-9a-z]{1,64}")
_GITLINK = "160000"
_IDENTITY = {
    "GIT_AUTHOR_NAME": "asm-node", "GIT_AUTHOR_EMAIL": "asm-node@localhost",
    "GIT_COMMITTER_NAME": "asm-node", "GIT_COMMITTER_EMAIL": "asm-node@localhost",
}
# The variables that say where the operator's own (global, system) git config is.
_OPERATOR_CONFIG_ENV = frozenset({"HOME", "XDG_CONFIG_HOME", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM",
                                  "GIT_CONFIG_NOSYSTEM", "PREFIX"})

# Every git command runs with these: nothing configured in the repository (or by the agent's user)
# can make git run a program. Filter drivers are disabled per name (see Workspaces._filter_overrides);
# diffs use --no-ext-diff --no-textconv; commit-tree --no-gpg-sign.
_SAFE_CONFIG = (
    "-c", "core.quotepath=off", "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null",
    "-c", "core.attributesFile=/dev/null", "-c", "core.pager=cat",
    "-c", "commit.gpgSign=false", "-c", "gc.auto=0", "-c", "maintenance.auto=false",
    "-c", "safe.bareRepository=explicit", "-c", "core.untrackedCache=false",
)


def _display(path: bytes) -> str:
    """A path for the wire: UTF-8 decoded; undecodable bytes as ``\\xNN`` (protobuf strings must be UTF-8)."""
    return path.decode("utf-8", "backslashreplace")


def _not_found(snapshot_id: str, why: str) -> ConfigError:
    return ConfigError(f"unknown snapshot id {snapshot_id!r}: {why}", reason="snapshot_not_found")


@dataclass
class _Repo:
    cwd: str       # the snapshot root (realpath)
    toplevel: str  # the work tree's top level (realpath)
    prefix: str    # cwd relative to toplevel: "" or "a/b/"
    index: str     # the real index file


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


@dataclass
class _Change:
    status: str    # A | D | M | T ... from git diff-tree --raw
    path: bytes    # relative to the snapshot root
    old_mode: str  # mode in the current state ("000000": absent)
    new_mode: str  # mode in the snapshot


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _typed_io(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """An OS error on the way (temp index, unreadable or vanished file) is a typed error, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            raise AsmError(f"workspace {fn.__name__} failed: {exc}", kind="tool_failed", domain="tool",
                           reason="workspace_io") from exc
    return wrapper


class Workspaces:
    """Snapshot, diff and rollback of working directories (blocking; called in a thread)."""

    def __init__(self, *, git: str = "git", git_timeout_s: float = 120.0, max_hash_snapshots: int = 64,
                 max_git_snapshots: int = 4096) -> None:
        self.git = git
        self.git_timeout_s = git_timeout_s
        self.max_hash_snapshots = max_hash_snapshots
        self.max_git_snapshots = max_git_snapshots  # in memory; older ones are recovered from their ref
        self._lock = threading.Lock()
        self._snapshots: OrderedDict[str, _Snap] = OrderedDict()
        self._repo_locks: dict[str, threading.RLock] = {}
        self._operator_cfg: tuple[list[str], frozenset[str]] | None = None
        # An empty private HOME: git finds no ~/.gitconfig or ~/.config/git/attributes of the agent's user.
        self._home = tempfile.mkdtemp(prefix="asm-git-home-")
        weakref.finalize(self, shutil.rmtree, self._home, True)

    # -- public API -------------------------------------------------------------

    @_typed_io
    def snapshot(self, cwd: str, backend: str, label: str) -> pb.SnapshotInfo:
        root = self._root(cwd)
        backend = (backend or "git").strip().lower()
        if backend not in BACKENDS:
            raise ConfigError(f"unknown workspace backend {backend!r} (use one of: git, hash, auto)",
                              reason="unknown_backend")
        if backend == "auto":
            backend = "git" if self._git_repo_or_none(root) is not None else "hash"
        if backend == "hash":
            manifest = _manifest(root)
            snap = _Snap(id=f"hash-{ulid().lower()}", backend="hash", cwd=root, label=label,
                         created_unix_nano=time.time_ns(), file_count=len(manifest), manifest=manifest)
            self._remember(snap)
            return snap.info()
        repo = self._repo(root)
        with self._repo_lock(repo):
            head = self._head(repo)
            tree = self._capture_tree(repo)
            snap = self._store_git_snapshot(repo, tree, head, label)
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
        if old.backend == "hash":
            after = new.manifest if new is not None else _manifest(root)
            before = old.manifest
            return pb.DiffResponse(
                added=sorted(after.keys() - before.keys()),
                deleted=sorted(before.keys() - after.keys()),
                modified=sorted(p for p in before.keys() & after.keys() if before[p] != after[p]),
            )
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
            raw, over = self._git_capped(repo.toplevel, [
                "diff-tree", "-r", "-p", "--no-renames", "--no-color", "--no-ext-diff", "--no-textconv",
                old.tree, to_tree], limit)
        patch, truncated = _cut(raw, limit)
        return pb.DiffResponse(added=sorted(added), modified=sorted(modified), deleted=sorted(deleted),
                               patch=patch, truncated=truncated or over)

    @_typed_io
    def rollback(self, cwd: str, snapshot_id: str) -> pb.RollbackResponse:
        root = self._root(cwd)
        if not snapshot_id:
            raise ConfigError("rollback needs snapshot_id")
        snap = self._lookup(snapshot_id, root)
        if snap.backend == "hash":
            raise ConfigError(f"hash snapshots cannot be rolled back ({snap.id}): they record content hashes, "
                              "not content; take a git snapshot (backend \"git\") to be able to roll back",
                              reason="rollback_unsupported")
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

    # -- snapshots in memory and in refs -------------------------------------------

    def _remember(self, snap: _Snap) -> None:
        with self._lock:
            self._snapshots[snap.id] = snap
            self._snapshots.move_to_end(snap.id)
            for backend, cap in (("hash", self.max_hash_snapshots), ("git", self.max_git_snapshots)):
                ids = [k for k, s in self._snapshots.items() if s.backend == backend]
                for k in ids[:max(len(ids) - cap, 0)]:
                    del self._snapshots[k]

    def _lookup(self, snapshot_id: str, root: str) -> _Snap:
        if not _ID_RE.fullmatch(snapshot_id):
            raise _not_found(snapshot_id, "snapshot ids look like git-<id> or hash-<id>")
        with self._lock:
            snap = self._snapshots.get(snapshot_id)
        if snap is None:
            if snapshot_id.startswith("hash-"):
                raise _not_found(snapshot_id, "hash snapshots live in the node's memory and are forgotten "
                                              "when the node restarts")
            repo = self._repo(root)
            snap = self._recover(repo, snapshot_id)
            self._remember(snap)
        if snap.cwd != root:
            raise ConfigError(f"snapshot {snapshot_id} was taken for {snap.cwd!r}, not for {root!r}",
                              reason="snapshot_cwd_mismatch")
        return snap

    def _store_git_snapshot(self, repo: _Repo, tree: str, head: str, label: str) -> _Snap:
        snap = _Snap(id=f"git-{ulid().lower()}", backend="git", cwd=repo.cwd, label=label,
                     created_unix_nano=time.time_ns(), head=head, tree=tree,
                     file_count=self._count_files(repo, tree))
        meta = {"v": 1, "id": snap.id, "cwd": snap.cwd, "prefix": repo.prefix, "label": label,
                "created_unix_nano": snap.created_unix_nano, "head": head, "tree": tree,
                "file_count": snap.file_count}
        message = (f"asm workspace snapshot {snap.id}\n\n".encode()
                   + _META_TAG + json.dumps(meta, sort_keys=True).encode() + b"\n")
        args = ["commit-tree", "--no-gpg-sign", tree] + (["-p", head] if head else [])
        commit = self._git(repo.cwd, args, input=message, env=_IDENTITY).stdout.strip().decode()
        self._git(repo.cwd, ["update-ref", "--no-deref", "-m", f"asm snapshot {snap.id}",
                             REF_PREFIX + snap.id, commit, ""])
        self._remember(snap)
        return snap

    def _recover(self, repo: _Repo, snapshot_id: str) -> _Snap:
        ref = REF_PREFIX + snapshot_id
        res = self._git(repo.cwd, ["rev-parse", "--verify", "-q", ref + "^{commit}"], check=False)
        if res.returncode != 0:
            raise _not_found(snapshot_id, f"not in this node's memory and no {ref} in the repository of {repo.cwd!r}")
        commit = res.stdout.strip().decode()
        body = self._git(repo.cwd, ["cat-file", "commit", commit]).stdout
        headers, _, message = body.partition(b"\n\n")
        tree = next((h[5:].decode() for h in headers.split(b"\n") if h.startswith(b"tree ")), "")
        line = next((ln[len(_META_TAG):] for ln in message.split(b"\n") if ln.startswith(_META_TAG)), None)
        try:
            meta = json.loads(line) if line is not None else None
            if not isinstance(meta, dict) or meta.get("id") != snapshot_id or not tree:
                raise ValueError("no asm-snapshot metadata for this id")
            return _Snap(id=snapshot_id, backend="git", cwd=str(meta["cwd"]), label=str(meta.get("label", "")),
                         created_unix_nano=int(meta.get("created_unix_nano", 0)), head=str(meta.get("head", "")),
                         tree=tree, file_count=int(meta.get("file_count", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{ref} is not an asm snapshot commit ({exc})", reason="snapshot_not_found") from exc

    # -- git plumbing ---------------------------------------------------------------

    def _root(self, cwd: str) -> str:
        if not cwd:
            raise ConfigError("a workspace cwd is required")
        root = os.path.realpath(os.path.expanduser(cwd))
        if not os.path.isdir(root):
            raise ConfigError(f"workspace cwd {cwd!r} does not exist or is not a directory", reason="cwd_not_found")
        return root

    def _repo_lock(self, repo: _Repo) -> threading.RLock:
        with self._lock:
            return self._repo_locks.setdefault(repo.toplevel, threading.RLock())

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        """A scrubbed environment: nothing of the agent's (no ``ASM_TOKEN``), no user or system git config."""
        env = {
            "PATH": os.environ.get("PATH") or os.defpath, "HOME": self._home, "XDG_CONFIG_HOME": self._home,
            "LC_ALL": "C", "LANG": "C", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_ATTR_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "GIT_PAGER": "cat",
        }
        env.update(extra or {})
        return env

    def _cmd(self, cwd: str, args: Sequence[str | bytes], overrides: Sequence[str] = ()) -> list[str | bytes]:
        return [self.git, "--no-pager", *_SAFE_CONFIG, *self._operator()[0], *overrides, "-C", cwd, *args]

    def _operator(self) -> tuple[list[str], frozenset[str]]:
        """(``-c safe.directory=..`` options, filter driver names) from the operator's own global/system config.

        Our git never reads that config (it would bring the operator's filters, hooks and helpers), but
        the ``safe.directory`` entries the operator set are honoured, and filter drivers configured there
        (``git lfs install``) mean the real index may hold filtered blobs: see :meth:`_capture_tree`.
        Read once; reading config runs nothing.
        """
        with self._lock:
            if self._operator_cfg is not None:
                return self._operator_cfg
        safe: list[str] = []
        names: set[str] = set()
        # Only what locates the operator's config files: no secret of the agent's reaches this git either.
        env = {k: v for k, v in os.environ.items() if k in _OPERATOR_CONFIG_ENV}
        env.update(LC_ALL="C", GIT_TERMINAL_PROMPT="0", PATH=os.environ.get("PATH") or os.defpath)
        for scope in ("--system", "--global"):
            for key, value in self._config_entries(["config", scope, "--null", "--get-regexp",
                                                    r"^(safe\.directory|filter\.)"], "/", env):
                if key == "safe.directory":
                    safe += ["-c", f"safe.directory={value}"]
                elif key.startswith("filter."):
                    names.add(key[len("filter."):].rpartition(".")[0])
        with self._lock:
            self._operator_cfg = (safe, frozenset(names))
            return self._operator_cfg

    def _config_entries(self, args: list[str], cwd: str, env: dict[str, str]) -> list[tuple[str, str]]:
        try:
            res = subprocess.run([self.git, *args], cwd=cwd, env=env, capture_output=True, stdin=subprocess.DEVNULL,
                                 timeout=self.git_timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            return []  # no git, or none usable: the snapshot's own git call reports it
        out: list[tuple[str, str]] = []
        for entry in res.stdout.split(b"\0") if res.returncode == 0 else []:
            key, _, value = entry.partition(b"\n")
            if key:
                out.append((key.decode("utf-8", "replace"), value.decode("utf-8", "surrogateescape")))
        return out

    def _filter_names(self, cwd: str) -> list[str]:
        """Names of the filter drivers the repository's own config defines (``filter.<name>.*``)."""
        res = subprocess.run(self._cmd(cwd, ["config", "--null", "--get-regexp", r"^filter\."]), capture_output=True,
                             env=self._env(None), timeout=self.git_timeout_s, stdin=subprocess.DEVNULL)
        if res.returncode not in (0, 1):  # 1: no such key
            raise _git_failed(["config"], cwd, res.returncode, res.stderr)
        names = {entry.partition(b"\n")[0][len(b"filter."):].rpartition(b".")[0]
                 for entry in res.stdout.split(b"\0") if entry}
        for name in names:
            if b"=" in name or b"\n" in name:
                raise ConfigError(f"the repository of {cwd!r} defines a filter driver named {_display(name)!r}, "
                                  "which cannot be disabled on git's command line: refusing to run git there",
                                  reason="unsafe_git_config")
        return sorted(os.fsdecode(n) for n in names)

    def _filter_overrides(self, cwd: str) -> list[str]:
        """``-c`` options that turn every filter driver the repository defines into a no-op.

        Read right before *every* git command, not only ``add`` and ``checkout-index``: any command
        that writes the index (``write-tree``) re-hashes "racily clean" entries through the clean
        filter. Reading it each time also disables a driver added to ``.git/config`` since the last
        command.
        """
        out: list[str] = []
        for name in self._filter_names(cwd):
            for var, value in (("clean", ""), ("smudge", ""), ("process", ""), ("required", "false")):
                out += ["-c", f"filter.{name}.{var}={value}"]
        return out

    def _git(self, cwd: str, args: Sequence[str | bytes], *, input: bytes | None = None,
             env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        try:
            overrides = self._filter_overrides(cwd)
            res = subprocess.run(self._cmd(cwd, args, overrides), input=input, capture_output=True,
                                 env=self._env(env), timeout=self.git_timeout_s,
                                 stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise ConfigError(f"git executable {self.git!r} is not available on this node", reason="git_missing") from exc
        except subprocess.TimeoutExpired as exc:
            raise AsmError(f"git {_subcommand(args)!s} in {cwd!r} timed out after {self.git_timeout_s:g}s",
                           kind="timeout", domain="tool", reason="git_timeout") from exc
        except OSError as exc:
            raise AsmError(f"cannot run git in {cwd!r}: {exc}", kind="tool_failed", domain="tool",
                           reason="git_failed") from exc
        if check and res.returncode != 0:
            raise _git_failed(args, cwd, res.returncode, res.stderr)
        return res

    def _git_capped(self, cwd: str, args: Sequence[str], limit: int) -> tuple[bytes, bool]:
        """Run git and read at most ``limit`` bytes of its stdout (then kill it): (data, truncated)."""
        timed_out: list[bool] = []
        with tempfile.TemporaryFile() as err:
            try:
                overrides = self._filter_overrides(cwd)
                proc = subprocess.Popen(self._cmd(cwd, args, overrides), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=err, env=self._env(None))
            except FileNotFoundError as exc:
                raise ConfigError(f"git executable {self.git!r} is not available on this node",
                                  reason="git_missing") from exc
            except subprocess.TimeoutExpired as exc:
                raise AsmError(f"git config in {cwd!r} timed out after {self.git_timeout_s:g}s",
                               kind="timeout", domain="tool", reason="git_timeout") from exc
            except OSError as exc:
                raise AsmError(f"cannot run git in {cwd!r}: {exc}", kind="tool_failed", domain="tool",
                               reason="git_failed") from exc

            def kill() -> None:
                timed_out.append(True)
                proc.kill()

            timer = threading.Timer(self.git_timeout_s, kill)
            timer.start()
            chunks: list[bytes] = []
            size = 0
            over = False
            try:
                assert proc.stdout is not None
                with proc.stdout:
                    while chunk := proc.stdout.read(min(1 << 16, limit + 1 - size)):
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > limit:
                            over = True
                            proc.kill()
                            break
                rc = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if timed_out:
                raise AsmError(f"git {_subcommand(args)} in {cwd!r} timed out after {self.git_timeout_s:g}s",
                               kind="timeout", domain="tool", reason="git_timeout")
            if not over and rc != 0:
                err.seek(0)
                raise _git_failed(args, cwd, rc, err.read())
        return b"".join(chunks), over

    def _git_repo_or_none(self, root: str) -> _Repo | None:
        try:
            return self._repo(root)
        except ConfigError as exc:
            if exc.reason in ("git_missing", "not_a_git_work_tree", "cwd_ignored", "git_unsafe_repository"):
                return None
            raise

    def _repo(self, root: str) -> _Repo:
        res = self._git(root, ["rev-parse", "--is-inside-work-tree"], check=False)
        if res.returncode != 0 and b"dubious ownership" in res.stderr:
            raise _unsafe_repository(root)
        if res.returncode != 0 or res.stdout.strip() != b"true":
            raise ConfigError(f"{root!r} is not inside a git work tree: the git backend needs one "
                              "(use backend \"hash\" for a plain directory)", reason="not_a_git_work_tree")
        top = self._git(root, ["rev-parse", "--show-toplevel"]).stdout.removesuffix(b"\n")
        index = self._git(root, ["rev-parse", "--git-path", "index"]).stdout.removesuffix(b"\n")
        toplevel = os.path.realpath(os.fsdecode(top))
        prefix = os.path.relpath(root, toplevel)
        if prefix == os.curdir:
            prefix = ""
        elif prefix == os.pardir or prefix.startswith(os.pardir + os.sep):
            raise ConfigError(f"{root!r} is not below its git top level {toplevel!r}", reason="not_a_git_work_tree")
        else:
            prefix = prefix.replace(os.sep, "/") + "/"
            ignored = self._git(root, ["check-ignore", "-q", "."], check=False)
            if ignored.returncode == 0:
                raise ConfigError(f"{root!r} is ignored by git (.gitignore), so a git snapshot would be empty; "
                                  "use backend \"hash\"", reason="cwd_ignored")
        return _Repo(cwd=root, toplevel=toplevel, prefix=prefix, index=os.path.join(root, os.fsdecode(index)))

    def _head(self, repo: _Repo) -> str:
        res = self._git(repo.cwd, ["rev-parse", "--verify", "-q", "HEAD^{commit}"], check=False)
        return res.stdout.strip().decode() if res.returncode == 0 else ""

    def _require_tree(self, repo: _Repo, snap: _Snap) -> None:
        res = self._git(repo.cwd, ["cat-file", "-e", snap.tree + "^{tree}"], check=False)
        if res.returncode != 0:
            raise ConfigError(f"the tree {snap.tree} of snapshot {snap.id} is no longer in the repository of "
                              f"{repo.cwd!r} (was {REF_PREFIX}{snap.id} deleted and the objects pruned?)",
                              reason="snapshot_not_found")

    def _capture_tree(self, repo: _Repo) -> str:
        """Write the current content of the snapshot root as a tree, through a temporary index."""
        with tempfile.TemporaryDirectory(prefix="asm-workspace-") as tmp:
            index = os.path.join(tmp, "index")
            if os.path.isfile(repo.index):
                shutil.copyfile(repo.index, index)
            env = {"GIT_INDEX_FILE": index}
            added = self._git(repo.cwd, ["--literal-pathspecs", "add", "-A", "--", "."], env=env, check=False)
            if added.returncode != 0:
                # `git add` refuses a nested repository that has no commit yet (an agent ran
                # `git init`): leave those out of the snapshot (and so out of any rollback).
                unborn = self._unborn_nested_repos(repo, env)
                if not unborn:
                    raise _git_failed(["add"], repo.cwd, added.returncode, added.stderr)
                self._git(repo.cwd, ["add", "-A", "--", ":(literal).",
                                     *(b":(exclude,literal)" + p for p in unborn)], env=env)
            if self._filter_names(repo.cwd) or self._operator()[1]:
                # Filter drivers exist (the repository's, or the operator's, e.g. git-lfs) but never run
                # here: the copied index may hold *filtered* blobs for unchanged files. Re-hash every
                # tracked file as it is on disk, so the snapshot is the working tree's bytes throughout.
                self._git(repo.cwd, ["--literal-pathspecs", "add", "--renormalize", "--", "."], env=env)
            res = self._git(repo.cwd, ["write-tree"], env=env, check=False)
            if res.returncode != 0:
                # Unmerged entries elsewhere in the repository (a conflict outside cwd) block
                # write-tree: stage the whole work tree in the temp index and try again.
                self._git(repo.toplevel, ["--literal-pathspecs", "add", "-A", "--", "."], env=env)
                res = self._git(repo.cwd, ["write-tree"], env=env)
            top_tree = res.stdout.strip().decode()
        if not repo.prefix:
            return top_tree
        # (Everything after the colon is the path: no ^{tree} peeling here, check the type instead.)
        sub = self._git(repo.toplevel, ["rev-parse", "--verify", "-q", f"{top_tree}:{repo.prefix.rstrip('/')}"],
                        check=False)
        if sub.returncode == 0:
            oid = sub.stdout.strip().decode()
            if self._git(repo.toplevel, ["cat-file", "-t", oid]).stdout.strip() == b"tree":
                return oid
        # Nothing in cwd that git would track (empty, or only ignored files): the empty tree.
        return self._git(repo.cwd, ["hash-object", "-w", "-t", "tree", "--stdin"], input=b"").stdout.strip().decode()

    def _unborn_nested_repos(self, repo: _Repo, env: dict[str, str]) -> list[bytes]:
        """Untracked nested repositories below cwd whose HEAD has no commit (paths relative to cwd)."""
        out = self._git(repo.cwd, ["--literal-pathspecs", "ls-files", "-z", "--others", "--exclude-standard",
                                   "--", "."], env=env).stdout
        root = os.fsencode(repo.cwd)
        unborn: list[bytes] = []
        for path in out.split(b"\0"):
            if not path.endswith(b"/"):
                continue
            full = os.path.join(root, path)
            if os.path.lexists(os.path.join(full, b".git")):
                res = self._git(os.fsdecode(full), ["rev-parse", "--verify", "-q", "HEAD^{commit}"], check=False)
                if res.returncode != 0:
                    unborn.append(path.rstrip(b"/"))
        return unborn

    def _count_files(self, repo: _Repo, tree: str) -> int:
        out = self._git(repo.toplevel, ["ls-tree", "--full-tree", "-r", "-z", "--name-only", tree]).stdout
        return out.count(b"\0")

    def _tree_changes(self, repo: _Repo, old: str, new: str) -> list[_Change]:
        out = self._git(repo.toplevel, ["diff-tree", "-r", "-z", "--no-renames", "--no-ext-diff", old, new]).stdout
        fields = out.split(b"\0")
        changes: list[_Change] = []
        i = 0
        while i < len(fields) and fields[i]:
            meta = fields[i].decode().split(" ")
            if len(meta) != 5 or not meta[0].startswith(":") or i + 1 >= len(fields):
                raise AsmError(f"unexpected git diff-tree output {fields[i]!r}", kind="tool_failed", domain="tool",
                               reason="git_failed")
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
            self._git(repo.toplevel, read, env=env)
            prefix = repo.prefix.encode()
            self._git(repo.toplevel, ["checkout-index", "-f", "-z", "--stdin"], env=env,
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


def _subcommand(args: Sequence[str | bytes]) -> str:
    """The git subcommand in ``args`` (after any global ``--option``)."""
    for arg in args:
        text = os.fsdecode(arg)
        if not text.startswith("-"):
            return text
    return ""


def _git_failed(args: Sequence[str | bytes], cwd: str, rc: int, stderr: bytes) -> AsmError:
    tail = stderr.decode("utf-8", "replace").strip()[-2000:]
    if "dubious ownership" in tail:
        return _unsafe_repository(cwd)
    return AsmError(f"git {_subcommand(args)} failed in {cwd!r} (exit {rc}): {tail or 'no message'}",
                    kind="tool_failed", domain="tool", reason="git_failed")


def _unsafe_repository(cwd: str) -> ConfigError:
    return ConfigError(
        f"the git repository of {cwd!r} is owned by another user than the node agent's, so git refuses it "
        "(safe.directory): the node never overrides that; the operator can allow it for the agent's user with "
        "`git config --global --add safe.directory <repository>`, or use backend \"hash\"",
        reason="git_unsafe_repository")


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
