"""Workspace snapshots on the node that owns the workspace: git and hash backends.

:class:`Workspaces` is blocking code; the node agent calls it through
``asyncio.to_thread`` after resolving the request's cwd against its workspace
roots. Every failure is an :class:`~asm_wire.AsmError`, never a bare exception: bad
input and a refused rollback are :class:`~asm_wire.ConfigError`; an unknown snapshot id is
:class:`~asm_wire.SnapshotNotFound`, git failing or timing out :class:`~asm_wire.GitFailed` /
:class:`~asm_wire.GitTimeout`, an OS error on the way :class:`~asm_wire.WorkspaceError`.

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

**Layout** (one job per module): ``_workspaces`` (:class:`Workspaces`, the facade: cwd, backend
choice, snapshots in memory, dispatch), ``_git`` (:class:`GitBackend`), ``_hash``
(:class:`HashBackend`), ``_gitrun`` (:class:`GitRunner`, the hardened way to run git),
``_model`` (the snapshot record). A backend is anything with the :class:`Backend` methods.
"""

from asm_node.workspace._git import REF_PREFIX, GitBackend
from asm_node.workspace._git import _Repo as _Repo  # importable from here, as before (tests type with it)
from asm_node.workspace._gitrun import GitRunner
from asm_node.workspace._hash import HashBackend
from asm_node.workspace._model import BACKENDS
from asm_node.workspace._workspaces import Backend, Workspaces

__all__ = ["BACKENDS", "REF_PREFIX", "Backend", "GitBackend", "GitRunner", "HashBackend", "Workspaces"]
