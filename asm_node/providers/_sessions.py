"""The resumable sessions a provider CLI keeps on its host (``ListProviderSessions``).

Each provider module declares its CLI's store as a :class:`SessionStore` (where the files are,
relative to HOME or an environment variable, and a ``read`` function that understands one
file); this module does the walking for all of them, with the same bounds:

* at most ``limit`` sessions (<= :data:`MAX_LIMIT`), newest first (by file mtime);
* at most :data:`MAX_SCAN` directory entries looked at, each file read only as far as its reader
  needs and never past :data:`MAX_READ_BYTES`;
* nothing below the store's directory is followed through a symlink (every level is opened with
  ``O_NOFOLLOW`` relative to its parent's descriptor, so a link swapped in later is refused too);
* an unreadable, malformed or foreign file is skipped, never an error for the whole listing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asm_wire import pb

#: The most sessions one call answers, and the default when the request says 0.
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
#: Directory entries looked at per call (a huge store is listed from what was seen).
MAX_SCAN = 20_000
#: Bytes read from one session file, and from all of them in one call.
MAX_READ_BYTES = 1 << 20
MAX_TOTAL_READ_BYTES = 64 << 20
#: A label is the session's first prompt (or title), cut to this many characters.
MAX_LABEL_CHARS = 200

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class Found:
    """What a reader found in one session file (the id is required; the rest may be empty)."""

    id: str
    label: str = ""
    cwd: str = ""


class SessionFile:
    """One candidate file, opened for its reader: its name, bounded lines, and small files next to it."""

    def __init__(self, root_fd: int, parts: tuple[str, ...], fd: int, budget: list[int]) -> None:
        self.name = parts[-1]
        self._root_fd, self._parts, self._fd, self._budget = root_fd, parts, fd, budget

    def lines(self) -> Iterator[bytes]:
        """The file's complete lines (without the newline), up to MAX_READ_BYTES; read lazily."""
        buf = b""
        read = 0
        while read < MAX_READ_BYTES and self._budget[0] > 0:
            chunk = os.read(self._fd, min(65536, MAX_READ_BYTES - read, self._budget[0]))
            if not chunk:
                if buf:
                    yield buf
                return
            read += len(chunk)
            self._budget[0] -= len(chunk)
            buf += chunk
            *complete, buf = buf.split(b"\n")
            yield from complete

    def objects(self) -> Iterator[dict[str, Any]]:
        """The file's lines that are JSON objects (others are skipped)."""
        for line in self.lines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    yield obj

    def sibling(self, *rel: str, max_bytes: int = 4096) -> bytes | None:
        """A small file relative to this file's directory (``".."`` allowed, never above the store's
        directory, never through a symlink); None when it is missing or not a regular file."""
        parts = list(self._parts[:-1])
        for part in rel:
            if part == "..":
                if not parts:
                    return None
                parts.pop()
            elif part and part != "." and "/" not in part:
                parts.append(part)
            else:
                return None
        fd = _open_under(self._root_fd, tuple(parts))
        if fd is None:
            return None
        try:
            return os.read(fd, max_bytes)
        except OSError:
            return None
        finally:
            os.close(fd)


@dataclass(frozen=True)
class SessionStore:
    """Where a provider's CLI keeps resumable sessions, and how to read one."""

    #: ProviderSession.source_kind, e.g. "claude_projects_jsonl".
    source_kind: str
    #: The store's directory under HOME (e.g. ".claude") ...
    home_dir: str
    #: ... unless this environment variable is set: then the directory is $VAR/SUBDIR (e.g. ("CODEX_HOME", "")).
    env_dir: tuple[str, str]
    #: Path components below that directory, each a glob (the last one names the files).
    pattern: tuple[str, ...]
    #: One file -> what it says about its session; None (or an exception) skips the file.
    read: Callable[[SessionFile], Found | None]

    def directory(self, env: Mapping[str, str]) -> Path | None:
        """The store's directory for this environment (None when neither HOME nor env_dir is set)."""
        var, subdir = self.env_dir
        named = env.get(var, "") if var else ""
        if named and os.path.isabs(named):
            return Path(named, subdir)
        home = env.get("HOME", "")
        return Path(home, self.home_dir) if home and os.path.isabs(home) else None

    def sessions(self, provider: str, env: Mapping[str, str], limit: int) -> list[pb.ProviderSession]:
        """Up to ``limit`` sessions, newest first (blocking: call it off the event loop)."""
        limit = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
        directory = self.directory(env)
        if directory is None:
            return []
        try:
            # The store's directory itself may be a link (dotfiles); nothing below it is followed.
            root_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return []  # no store (the CLI never ran here) or not readable: no sessions
        try:
            candidates: list[tuple[int, tuple[str, ...]]] = []
            _scan(root_fd, (), self.pattern, candidates, [MAX_SCAN])
            candidates.sort(reverse=True)
            out: list[pb.ProviderSession] = []
            budget = [MAX_TOTAL_READ_BYTES]
            for mtime_ns, parts in candidates:
                if len(out) >= limit or budget[0] <= 0:
                    break
                found = self._read_one(root_fd, parts, budget)
                if found is None:
                    continue
                out.append(pb.ProviderSession(provider=provider, id=found.id, label=found.label[:MAX_LABEL_CHARS],
                                              cwd=found.cwd, updated_unix_nano=mtime_ns,
                                              source_kind=self.source_kind))
            return out
        finally:
            os.close(root_fd)

    def _read_one(self, root_fd: int, parts: tuple[str, ...], budget: list[int]) -> Found | None:
        fd = _open_under(root_fd, parts)
        if fd is None:
            return None
        try:
            found = self.read(SessionFile(root_fd, parts, fd, budget))
        except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeError):
            return None  # one bad file never fails the listing
        finally:
            os.close(fd)
        if found is None or not found.id or len(found.id) > 512 or "\x00" in found.id:
            return None
        return found


def _scan(dir_fd: int, parts: tuple[str, ...], pattern: tuple[str, ...],
          out: list[tuple[int, tuple[str, ...]]], left: list[int]) -> None:
    """Collect (mtime_ns, path parts) of the regular files matching ``pattern`` below ``dir_fd``."""
    glob, rest = pattern[0], pattern[1:]
    try:
        entries = list(os.scandir(dir_fd))
    except OSError:
        return
    for entry in entries:
        if left[0] <= 0:
            return
        left[0] -= 1
        if not fnmatch.fnmatchcase(entry.name, glob):
            continue
        try:
            if rest:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    _scan(child, (*parts, entry.name), rest, out, left)
                finally:
                    os.close(child)
            elif entry.is_file(follow_symlinks=False):
                out.append((entry.stat(follow_symlinks=False).st_mtime_ns, (*parts, entry.name)))
        except OSError:
            continue


def _open_under(root_fd: int, parts: tuple[str, ...]) -> int | None:
    """Open root/parts... for reading, every level without following a symlink; a regular file only."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not parts or not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd
    except OSError:
        os.close(fd)
        return None


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the ``text`` of its blocks joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text") or "") for b in content if isinstance(b, dict))
    return ""


def label_of(text: str) -> str:
    """A one-line label: whitespace collapsed, cut to MAX_LABEL_CHARS."""
    return " ".join(text.split())[:MAX_LABEL_CHARS]
