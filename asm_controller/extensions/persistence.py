"""Persistence: an event log per session, an async writer off the run path, and replay.

Stores (:class:`EventStore`): :class:`MemoryStore` and :class:`FileStore`. Both are
idempotent by event id **per session** (ASM keys a *global* id set; two sessions
that happen to reuse an id both keep their event here). An event without an id
is keyed by ``"<run_id>:<seq>"``, the node's own id scheme. ``list_events``
returns events in first-write order; a duplicate is ignored (first write wins).

On-disk format (:class:`FileStore`), version 1: one JSON object per line::

    {"v":1,"session_id":"s","run_id":"r","id":"r:3","seq":3,"kind":"assistant_delta",
     "ts":1700000000123456789,"crc":2868023451,"pb":"<base64 of the serialized pb.Event>"}

* ``pb`` is authoritative: the protobuf's own bytes round-trip exactly (int64 and
  uint64 with no string conversions, enum values, doubles, unknown fields and
  enum values written by a newer node), and encoding is ~3x cheaper than
  ``MessageToDict`` + JSON. ``crc`` (CRC-32 of those bytes) catches a damaged
  line that still parses.
* The other fields are a readable header for ``grep``/``jq`` (filter by session,
  run, kind) and are checked against the decoded event on load.
* ``v`` versions the format. A line with a *newer* ``v`` is preserved and
  reported, never truncated (a newer writer's data); an older writer's line
  without ``v`` is corrupt.

Crash safety:

* Every append writes whole lines (all events of the call) with one
  ``os.write`` on an ``O_APPEND`` descriptor, under an exclusive ``flock`` on
  ``<path>.lock`` held for the store's lifetime: no other process appends in
  between, and a crash can only leave a torn *last* line. A failed write is cut
  back (``ftruncate``) so the file never keeps half a line mid-file.
* ``append()`` returning is the acknowledgement. ``fsync="always"``: the data was
  ``fdatasync``-ed before it returned (survives power loss). ``"batch"``: written
  to the OS (survives a crash of the process) and synced within
  ``fsync_interval`` seconds, and on ``sync()``/``close()``. ``"never"``: the OS
  decides.
* Opening reads the whole file and rebuilds the dedup index. A line counts only
  when it ends with its newline (a write that did not finish was never
  acknowledged). Damage at the tail (a torn final write, garbage appended) is
  cut back to the end of the last good line; a bad line in the middle (invalid
  JSON, bad version, bad base64/checksum/protobuf, header mismatch) is skipped
  and left in the file until ``compact()`` or a ``reset_session`` rewrites it.
  Both are logged and described in :attr:`FileStore.recovered` (and by
  :func:`replay_file` in ``Result.metadata["damage"]``). A store of ours never
  refuses to open because of damage (ASM refused on any bad line).
* Opening for writing never takes over a file that is not ours: a non-empty file
  in which :func:`sniff_store` finds no record, or anything but a regular file
  (directory, FIFO, socket, device), is a ConfigError before the lock file or any
  byte is written. A symlink is followed once: the store is its target.
* File I/O runs on one dedicated thread per store, never on the event loop.
  ``reset_session``/``compact`` rewrite the file (temp file, fsync, atomic rename).

:class:`AsyncWriter` is the pipeline observer (``Session(..., observers=[writer])``)
that takes events off the run path into a bounded queue and appends them in
batches; see its docstring for the overflow policies.

History: :func:`replay_session` (a fold) and :func:`rebuild_run` (the real
:class:`EventReducer`, so the Result equals the live one). For the CLI:
:func:`record_events`, :func:`open_recorder` and :func:`replay_file`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, cast, runtime_checkable

from google.protobuf.message import DecodeError

from asm_controller._events import Event
from asm_controller._queue import BoundedQueue, Overflow
from asm_controller._reducer import EventReducer, Result
from asm_wire import KIND_NAMES, AsmError, ConfigError, pb

log = logging.getLogger("asm_controller.persistence")

FORMAT_VERSION: Final = 1
FSYNC_MODES: Final = ("always", "batch", "never")
OVERFLOW_POLICIES: Final = ("drop_newest", "drop_oldest", "block")
_MAX_PROBLEMS: Final = 100

A = TypeVar("A")


def _key(m: pb.Event) -> str:
    return m.id or f"{m.run_id}:{m.seq}"


def _copy(ev: Event) -> Event:
    msg = pb.Event()
    msg.CopyFrom(ev.pb)
    return Event(msg)


def _runtime_error(message: str, reason: str = "", cause: BaseException | None = None) -> AsmError:
    err = AsmError(message, kind="unknown", domain="runtime", reason=reason)
    if cause is not None:
        err.__cause__ = cause
    return err


# -- the store contract -----------------------------------------------------------------


@runtime_checkable
class EventStore(Protocol):
    """An append-only event log, idempotent by event id per session."""

    async def append(self, events: Iterable[Event]) -> int:
        """Store the events not stored yet (by id, per session); the number newly stored."""
        ...

    async def list_events(self, session_id: str | None = None, run_id: str | None = None) -> list[Event]:
        """Events in first-write order, optionally of one session and/or one run."""
        ...

    async def sessions(self) -> list[str]:
        """Session ids in first-write order."""
        ...

    async def runs(self, session_id: str | None = None) -> list[str]:
        """Run ids (of one session, or of all) in first-write order."""
        ...

    async def reset_session(self, session_id: str) -> int:
        """Forget a session's events (and their ids, which may be appended again); how many."""
        ...

    async def sync(self) -> None:
        """Make everything appended so far durable."""
        ...

    async def close(self) -> None: ...


class _Index:
    """Events in store order plus the per-session dedup sets (shared by both stores)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.seen: dict[str, set[str]] = {}
        self.runs: dict[str, dict[str, None]] = {}
        self.run_order: dict[tuple[str, str], None] = {}

    def fresh(self, events: Iterable[Event]) -> list[Event]:
        """The events not stored yet, without duplicates inside the batch either."""
        out: list[Event] = []
        batch: set[tuple[str, str]] = set()
        seen = self.seen
        for ev in events:
            m = ev.pb
            key = _key(m)
            ids = seen.get(m.session_id)
            if (ids is not None and key in ids) or (m.session_id, key) in batch:
                continue
            batch.add((m.session_id, key))
            out.append(ev)
        return out

    def add(self, ev: Event) -> bool:
        m = ev.pb
        ids = self.seen.setdefault(m.session_id, set())
        key = _key(m)
        if key in ids:
            return False
        ids.add(key)
        self.events.append(ev)
        self.runs.setdefault(m.session_id, {})[m.run_id] = None
        self.run_order.setdefault((m.session_id, m.run_id), None)
        return True

    def select(self, session_id: str | None, run_id: str | None) -> list[Event]:
        if session_id is None and run_id is None:
            return list(self.events)
        return [e for e in self.events
                if (session_id is None or e.pb.session_id == session_id) and (run_id is None or e.pb.run_id == run_id)]

    def run_ids(self, session_id: str | None) -> list[str]:
        if session_id is not None:
            return list(self.runs.get(session_id, {}))
        return list(dict.fromkeys(rid for _, rid in self.run_order))

    def drop(self, session_id: str) -> int:
        if session_id not in self.seen:
            return 0
        before = len(self.events)
        self.events = [e for e in self.events if e.pb.session_id != session_id]
        del self.seen[session_id]
        self.runs.pop(session_id, None)
        self.run_order = {k: None for k in self.run_order if k[0] != session_id}
        return before - len(self.events)


class MemoryStore:
    """An in-memory :class:`EventStore` (events are copied on append)."""

    def __init__(self) -> None:
        self._ix = _Index()

    async def append(self, events: Iterable[Event]) -> int:
        return sum(self._ix.add(_copy(ev)) for ev in self._ix.fresh(events))

    async def list_events(self, session_id: str | None = None, run_id: str | None = None) -> list[Event]:
        return self._ix.select(session_id, run_id)

    async def sessions(self) -> list[str]:
        return list(self._ix.seen)

    async def runs(self, session_id: str | None = None) -> list[str]:
        return self._ix.run_ids(session_id)

    async def reset_session(self, session_id: str) -> int:
        return self._ix.drop(session_id)

    async def sync(self) -> None:
        return None

    async def close(self) -> None:
        return None


# -- FileStore ----------------------------------------------------------------------------


class _Corrupt(Exception):
    pass


def encode_line(m: pb.Event) -> bytes:
    """One event as a version-1 line (with its newline)."""
    raw = m.SerializeToString(deterministic=True)
    kind = KIND_NAMES[m.kind] if 0 <= m.kind < len(KIND_NAMES) else str(int(m.kind))
    rec = {"v": FORMAT_VERSION, "session_id": m.session_id, "run_id": m.run_id, "id": m.id, "seq": m.seq,
           "kind": kind, "ts": m.timestamp_unix_nano, "crc": zlib.crc32(raw), "pb": base64.b64encode(raw).decode()}
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> pb.Event | int:
    """The event of a line (without its newline), or the format version of a newer line; raises _Corrupt."""
    if not line.strip():
        raise _Corrupt("empty line")
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise _Corrupt("invalid JSON (torn or damaged line)") from None
    if not isinstance(rec, dict):
        raise _Corrupt("not a JSON object")
    v = rec.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise _Corrupt(f"missing or invalid format version {v!r}")
    if v > FORMAT_VERSION:
        return v
    data = rec.get("pb")
    if not isinstance(data, str):
        raise _Corrupt("no 'pb' field")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _Corrupt("invalid base64 in 'pb'") from None
    if rec.get("crc") != zlib.crc32(raw):
        raise _Corrupt("checksum mismatch")
    try:
        msg = pb.Event.FromString(raw)
    except DecodeError:
        raise _Corrupt("invalid protobuf") from None
    if (rec.get("id"), rec.get("session_id"), rec.get("run_id")) != (msg.id, msg.session_id, msg.run_id):
        raise _Corrupt("header does not match the event")
    return msg


@dataclass
class LineProblem:
    line: int  # 1-based physical line number
    offset: int
    length: int
    reason: str
    where: str  # "tail" (cut back) or "middle" (skipped, kept in the file)


@dataclass
class RecoveryReport:
    """What opening a damaged file found and did (:attr:`FileStore.recovered`)."""

    path: str
    truncated: bool = False  # the damaged tail was cut off (False for a read-only open)
    truncated_at: int | None = None  # offset of the end of the last good line
    tail_lines: int = 0
    tail_bytes: int = 0
    skipped_lines: int = 0  # bad lines in the middle: ignored, left in the file
    skipped_bytes: int = 0
    future_lines: int = 0  # lines of a newer format version: preserved, not readable here
    problems: list[LineProblem] = field(default_factory=list)  # the first 100

    def __str__(self) -> str:
        parts = []
        if self.tail_lines:
            verb = f"truncated at byte {self.truncated_at}" if self.truncated else f"ignored after byte {self.truncated_at}"
            parts.append(f"{self.tail_lines} damaged line(s) / {self.tail_bytes} bytes at the end ({verb})")
        if self.skipped_lines:
            parts.append(f"{self.skipped_lines} bad line(s) / {self.skipped_bytes} bytes skipped in the middle")
        if self.future_lines:
            parts.append(f"{self.future_lines} line(s) of a newer format version kept unread")
        first = self.problems[0] if self.problems else None
        where = f"; first: line {first.line} at byte {first.offset}: {first.reason}" if first else ""
        return f"event store {self.path}: " + ", ".join(parts) + where


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def _write_all(fd: int, data: bytes) -> None:
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.write(fd, view[done:])


_SNIFF_BYTES: Final = 1 << 20
_SNIFF_LINES: Final = 64
_LINE_PREFIX: Final = b'{"v":'  # every line encode_line writes starts so


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _open_regular(path: Path, flags: int) -> int:
    """Open ``path`` only if it is a regular file: O_NOFOLLOW (the caller resolved a symlink)
    and O_NONBLOCK (a FIFO swapped in meanwhile cannot block the open), then fstat."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"event store {path} is not a file: it is {_file_kind(st.st_mode)}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sniff_store(fd: int) -> str | None:
    """None when the open regular file ``fd`` looks like an event store of ours, else why not.

    Ours: one of its first 64 complete lines (within the first MiB) is a store record
    (it decodes, or is a newer format version), or it is a single unfinished line that
    starts like one (a first write torn by a crash). An empty file is ours.
    """
    head = os.pread(fd, _SNIFF_BYTES, 0)
    if not head:
        return None
    lines = head.split(b"\n")
    complete = lines[:-1]
    for line in complete[:_SNIFF_LINES]:
        try:
            decode_line(line)
        except _Corrupt:
            continue
        return None
    if not complete and head.startswith(_LINE_PREFIX):
        return None
    return "its first line is not an event record" if complete else "it does not start with an event record"


class FileStore:
    """An append-only JSON-lines :class:`EventStore` (see the module docstring for format and guarantees).

    ``FileStore(path, fsync="always"|"batch"|"never", readonly=False, lock_timeout=0.0)``.
    Opening happens on first use or with ``await store.open()`` (or ``async with``).
    A second writer on the same path (this or another process) gets an AsmError
    (kind ``transport_busy``, reason ``store_locked``) after ``lock_timeout``
    seconds. ``readonly=True`` takes no lock and changes nothing: a damaged tail
    (e.g. a write in progress by the recording process) is ignored, not cut.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: str = "always", *, readonly: bool = False,
                 lock_timeout: float = 0.0, fsync_interval: float = 0.2) -> None:
        if not str(path):
            raise ConfigError("file store requires a non-empty path")
        if fsync not in FSYNC_MODES:
            raise ConfigError(f"fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        if lock_timeout < 0 or fsync_interval < 0:
            raise ConfigError("lock_timeout and fsync_interval must be >= 0")
        self.path = Path(path)
        self.fsync = fsync
        self.readonly = readonly
        self.lock_timeout = lock_timeout
        self.fsync_interval = fsync_interval
        #: Set when the file was damaged at open (also logged as a warning).
        self.recovered: RecoveryReport | None = None
        self._ix = _Index()
        self._future: list[bytes] = []  # newer-version lines, kept across rewrites
        self._lock = threading.Lock()  # guards _ix between the I/O thread (writer) and the loop (readers)
        self._executor: ThreadPoolExecutor | None = None
        self._fd = -1
        self._lock_fd = -1
        self._size = 0
        self._dirty = False
        self._broken: AsmError | None = None
        self._sync_error: OSError | None = None  # a periodic fsync failed: what was appended may be lost
        self._sync_timer: asyncio.TimerHandle | None = None
        self._opened = False
        self._closed = False
        self._opening: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"FileStore({str(self.path)!r}, fsync={self.fsync!r}, readonly={self.readonly})"

    async def __aenter__(self) -> FileStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------------------

    async def _io(self, fn: Callable[..., A], *args: Any) -> A:
        if self._executor is None:
            raise _runtime_error(f"event store {self.path} is closed", "store_closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        if self._closed:
            raise _runtime_error(f"event store {self.path} is closed", "store_closed")
        if self._opened:
            return
        if self._opening is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asm-filestore")
            self._opening = asyncio.ensure_future(self._io(self._open_sync))
        opening = self._opening
        try:
            await asyncio.shield(opening)
        except BaseException:
            if opening.done() and self._opening is opening:  # failed (not just this caller cancelled): retryable
                self._opening = None
                if self._executor is not None:
                    self._executor.shutdown(wait=False)
                    self._executor = None
            raise
        self._opened = True

    async def _ready(self) -> None:
        if not self._opened or self._closed:
            await self.open()

    def _open_sync(self) -> None:
        try:
            if os.path.islink(self.path):
                # A symlink is followed once, here: the store *is* its target (the lock,
                # compaction's rename and every append apply to the target; the link stays).
                self.path = Path(os.path.realpath(self.path))
            try:
                st: os.stat_result | None = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"event store {self.path} is not a file: it is {_file_kind(st.st_mode)}")
            if self.readonly:
                if st is None:
                    raise ConfigError(f"event store {self.path} does not exist")
                fd = _open_regular(self.path, os.O_RDONLY)
                try:
                    self._load(write=False, fd=fd)
                finally:
                    os.close(fd)
                return
            if st is not None and st.st_size > 0:
                # Before the lock file or any byte is written: never take over a file that is not ours.
                fd = _open_regular(self.path, os.O_RDONLY)
                try:
                    why = sniff_store(fd)
                finally:
                    os.close(fd)
                if why is not None:
                    raise ConfigError(f"{self.path} is not an event store ({why}); refusing to write to it")
            created = st is None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            self._fd = _open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            if created and self.fsync != "never":
                _fsync_dir(self.path.parent)
            self._load(write=True, fd=self._fd)
        except AsmError:
            self._release()
            raise
        except OSError as exc:
            self._release()
            raise _runtime_error(f"cannot open event store {self.path}: {exc.strerror or exc}",
                                 "store_open_failed", exc) from exc

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    os.close(self._lock_fd)
                    self._lock_fd = -1
                    raise AsmError(f"event store {self.path} is in use by another writer (lock {lock_path} is held)",
                                   kind="transport_busy", domain="runtime", reason="store_locked") from None
                time.sleep(0.05)

    def _release(self) -> None:
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                try:
                    os.close(fd)  # closing the lock file releases the flock
                except OSError:
                    pass
                setattr(self, attr, -1)

    def _load(self, write: bool, fd: int) -> None:
        report = RecoveryReport(str(self.path))
        ix = _Index()
        future: list[bytes] = []
        good_end = 0  # end offset of the last line worth keeping (good or newer-version)
        pending_tail: list[LineProblem] = []  # bad lines after good_end (tail unless a good line follows)
        offset = 0
        os.lseek(fd, 0, os.SEEK_SET)  # appends ignore the offset (O_APPEND): reading through the same fd is safe
        with open(os.dup(fd), "rb") as f:
            for lineno, line in enumerate(f, 1):
                length = len(line)
                try:
                    if not line.endswith(b"\n"):
                        raise _Corrupt("unterminated last line (torn write)")
                    decoded = decode_line(line[:-1])
                except _Corrupt as bad:
                    pending_tail.append(LineProblem(lineno, offset, length, str(bad), "tail"))
                else:
                    for p in pending_tail:  # a good line follows: those were in the middle
                        p.where = "middle"
                        report.skipped_lines += 1
                        report.skipped_bytes += p.length
                        self._problem(report, p)
                    pending_tail = []
                    if isinstance(decoded, int):
                        future.append(line)
                        report.future_lines += 1
                        self._problem(report, LineProblem(lineno, offset, length,
                                                          f"format version {decoded} is newer than {FORMAT_VERSION}",
                                                          "middle"))
                    else:
                        ix.add(Event(decoded))
                    good_end = offset + length
                offset += length
        if pending_tail and write and good_end == 0 and not pending_tail[0].reason.startswith("unterminated"):
            # Nothing in the file is ours (it changed since the check at open): cutting the
            # "damaged tail" would erase all of it.
            raise ConfigError(f"{self.path} is not an event store (no line is an event record); refusing to write to it")
        if pending_tail:
            report.tail_lines = len(pending_tail)
            report.tail_bytes = offset - good_end
            report.truncated_at = good_end
            for p in pending_tail:
                self._problem(report, p)
            if write:
                os.ftruncate(self._fd, good_end)
                if self.fsync != "never":
                    os.fsync(self._fd)
                report.truncated = True
                offset = good_end
        self._size = offset
        with self._lock:
            self._ix = ix
            self._future = future
        if report.tail_lines or report.skipped_lines or report.future_lines:
            self.recovered = report
            log.warning("%s", report)

    @staticmethod
    def _problem(report: RecoveryReport, p: LineProblem) -> None:
        if len(report.problems) < _MAX_PROBLEMS:
            report.problems.append(p)

    def _check_writable(self) -> None:
        if self.readonly:
            raise ConfigError(f"event store {self.path} was opened read-only")
        if self._broken is not None:
            raise self._broken

    def _write(self, data: bytes) -> None:
        """Append ``data`` (whole lines) or leave the file as it was; raises OSError."""
        start = self._size
        try:
            _write_all(self._fd, data)  # one os.write unless the kernel writes short
            if self.fsync == "always":
                _datasync(self._fd)
            else:
                self._dirty = True
        except OSError as failed:
            try:
                os.ftruncate(self._fd, start)  # no half line may stay in front of the next append
            except OSError as exc:
                self._broken = _runtime_error(
                    f"event store {self.path} could not undo a failed write ({failed.strerror or failed}); "
                    "compact() or reopen it", "store_broken", exc)
            raise
        self._size = start + len(data)

    def _append_sync(self, events: list[Event]) -> int:
        self._check_writable()
        fresh = self._ix.fresh(events)  # only this thread mutates the index: reading it here needs no lock
        if not fresh:
            return 0
        lines = [encode_line(ev.pb) for ev in fresh]
        try:
            self._write(b"".join(lines))
        except OSError as exc:
            raise _runtime_error(f"failed to append {len(fresh)} event(s) to {self.path}: {exc.strerror or exc}",
                                 "store_write_failed", exc) from exc
        # The index holds what is on disk: decoded copies, not the caller's (mutable) messages.
        stored = [Event(pb.Event.FromString(ev.pb.SerializeToString())) for ev in fresh]
        with self._lock:
            for ev in stored:
                self._ix.add(ev)
        return len(stored)

    def _sync_sync(self) -> None:
        if self._fd >= 0 and self._dirty and self.fsync != "never":
            _datasync(self._fd)
            self._dirty = False

    def _timed_sync(self) -> None:
        self._sync_timer = None
        if self._executor is None or self._closed:
            return

        def run() -> None:
            try:
                self._sync_sync()
            except OSError as exc:
                # Kept: Linux reports a writeback error to one fsync only, so the next one may
                # "succeed" although the data is gone. sync() raises it from now on.
                self._sync_error = exc
                log.warning("event store %s: periodic fsync failed: %s", self.path, exc)

        self._executor.submit(run)

    def _reset_sync(self, session_id: str) -> int:
        self._check_writable()
        if session_id not in self._ix.seen:
            return 0
        self._rewrite([ev for ev in self._ix.events if ev.pb.session_id != session_id])
        with self._lock:
            return self._ix.drop(session_id)

    def _compact_sync(self) -> None:
        if self.readonly:
            raise ConfigError(f"event store {self.path} was opened read-only")
        self._rewrite(self._ix.events)
        if self.recovered is not None:
            self.recovered.skipped_lines = self.recovered.skipped_bytes = 0

    def _rewrite(self, keep: list[Event]) -> None:
        """Replace the file by ``keep`` (and the newer-format lines): temp file, fsync, atomic rename."""
        tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                chunk: list[bytes] = list(self._future)
                for ev in keep:
                    chunk.append(encode_line(ev.pb))
                    if len(chunk) >= 4096:
                        _write_all(fd, b"".join(chunk))
                        chunk = []
                _write_all(fd, b"".join(chunk))
                if self.fsync != "never":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            if self.fsync != "never":
                _fsync_dir(self.path.parent)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _runtime_error(f"failed to rewrite event store {self.path}: {exc.strerror or exc}",
                                 "store_rewrite_failed", exc) from exc
        old, self._fd = self._fd, -1
        if old >= 0:
            os.close(old)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            self._broken = _runtime_error(f"event store {self.path} was rewritten but cannot be reopened: {exc}",
                                          "store_broken", exc)
            raise self._broken from exc
        self._dirty = False
        self._broken = None

    def _close_sync(self) -> None:
        try:
            if not self.readonly and self._fd >= 0 and self._broken is None:
                self._sync_sync()
        finally:
            self._release()

    # -- the EventStore API ------------------------------------------------------------

    async def append(self, events: Iterable[Event]) -> int:
        await self._ready()
        n = await self._io(self._append_sync, list(events))
        if n and self.fsync == "batch" and self._sync_timer is None:
            self._sync_timer = asyncio.get_running_loop().call_later(self.fsync_interval, self._timed_sync)
        return n

    async def list_events(self, session_id: str | None = None, run_id: str | None = None) -> list[Event]:
        await self._ready()
        with self._lock:
            return self._ix.select(session_id, run_id)

    async def sessions(self) -> list[str]:
        await self._ready()
        with self._lock:
            return list(self._ix.seen)

    async def runs(self, session_id: str | None = None) -> list[str]:
        await self._ready()
        with self._lock:
            return self._ix.run_ids(session_id)

    async def last_run(self) -> tuple[str, str] | None:
        """(session_id, run_id) of the run whose first event was stored last."""
        await self._ready()
        with self._lock:
            return next(reversed(self._ix.run_order), None)

    async def reset_session(self, session_id: str) -> int:
        await self._ready()
        return await self._io(self._reset_sync, session_id)

    async def compact(self) -> None:
        """Rewrite the file without the bad lines that opening skipped (same temp-file + rename as a reset)."""
        await self._ready()
        await self._io(self._compact_sync)

    async def sync(self) -> None:
        await self._ready()
        if not self.readonly:
            try:
                await self._io(self._sync_sync)
                if self._sync_error is not None:
                    raise self._sync_error
            except OSError as exc:
                raise _runtime_error(f"fsync of event store {self.path} failed: {exc}", "store_sync_failed",
                                     exc) from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._opening is not None:
            try:
                await asyncio.shield(self._opening)
            except BaseException:
                pass
        if self._executor is not None:
            try:
                await self._io(self._close_sync)
            finally:
                self._executor.shutdown(wait=False)
                self._executor = None


# -- AsyncWriter ------------------------------------------------------------------------


class AsyncWriter:
    """Persists events off the run path: a bounded queue drained in batches into a store.

    Use it as a session observer (``Session(..., observers=[writer])``: it is called
    with each batch of events) or call :meth:`enqueue`. Both are synchronous, O(1)
    per event and never wait for the store. When the queue (``queue_size`` events;
    the batch being written is not counted) is full:

    * ``"drop_newest"`` (default): the incoming event is dropped;
    * ``"drop_oldest"``: the oldest queued event is dropped to make room;
    * ``"block"``: ``await writer.put(ev)`` waits for room — the only mode that can
      slow the run path, by design (back-pressure instead of loss). The
      synchronous forms cannot wait and drop the incoming event (logged once).

    Dropped events are counted in :attr:`dropped`. A failed append is retried
    (``retries`` times, exponential backoff; stores are idempotent, so a retry
    never duplicates); then the batch is given up: counted in :attr:`failed`, the
    error kept in :attr:`errors` (the last 100), logged, passed to ``on_error``,
    and raised by the next :meth:`flush` whose window it falls in. The run never
    sees it. :meth:`flush` waits until every event enqueued before it was handed
    to the store and the store synced; :meth:`close` drains the queue and stops
    (and closes the store when ``close_store=True``).
    """

    def __init__(self, store: EventStore, *, queue_size: int = 10_000, overflow: str = "drop_newest",
                 batch_size: int = 512, retries: int = 3, retry_backoff: float = 0.05,
                 on_error: Callable[[AsmError, list[Event]], None] | None = None, close_store: bool = False) -> None:
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError("queue_size must be an integer >= 1")
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size must be an integer >= 1")
        if retries < 0 or retry_backoff < 0:
            raise ConfigError("retries and retry_backoff must be >= 0")
        self.store = store
        self.queue_size = queue_size
        self.overflow = overflow
        self.batch_size = batch_size
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.on_error = on_error
        self.close_store = close_store
        #: Counters: accepted into the queue, handed to the store, dropped (overflow, or after close), given up.
        self.enqueued = 0
        self.written = 0
        self.failed = 0
        self.errors: deque[AsmError] = deque(maxlen=100)
        #: Set by close() when the final sync failed: the written events may not be durable.
        self.sync_error: AsmError | None = None
        # (ticket, event); the queue counts what it drops (overflow, or after close).
        self._q: BoundedQueue[tuple[int, Event]] = BoundedQueue(queue_size, cast(Overflow, overflow))
        self._ticket = 0  # last ticket issued (tickets number accepted events 1, 2, ...)
        self._inflight_first = 0  # first ticket of the batch being written, 0 when none
        self._unreported: list[tuple[int, int, AsmError]] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._warned_sync_block = False

    async def __aenter__(self) -> AsyncWriter:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __call__(self, events: Sequence[Event]) -> None:
        """The observer form: enqueue a batch of events."""
        for ev in events:
            self.enqueue(ev)

    @property
    def dropped(self) -> int:
        """Events not accepted: overflow, or given after :meth:`close` began."""
        return self._q.dropped

    @property
    def queued(self) -> int:
        return len(self._q)

    def stats(self) -> dict[str, int]:
        return {"enqueued": self.enqueued, "written": self.written, "dropped": self.dropped, "failed": self.failed,
                "queued": len(self._q)}

    def _start(self) -> None:
        if self._task is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop yet: the queue holds the events until one runs
            self._task = loop.create_task(self._drain(), name="asm-persistence-writer")

    def enqueue(self, ev: Event) -> bool:
        """Queue one event without waiting; False when it was dropped."""
        q = self._q
        evicting = q.full() and not self._closing
        if not q.offer((self._ticket + 1, ev)):
            if self.overflow == "block" and not self._closing and not self._warned_sync_block:
                self._warned_sync_block = True
                log.warning("persistence writer: queue full and overflow='block' needs `await put()`; "
                            "dropping events given to the synchronous enqueue")
            return False
        self._ticket += 1
        self.enqueued += 1
        if evicting and self._waiters:  # drop_oldest evicted an event: a flush may be satisfied now
            self._notify()
        if self._task is None:
            self._start()
        return True

    async def put(self, ev: Event) -> bool:
        """Queue one event; with ``overflow="block"`` wait for room first."""
        if self.overflow == "block":
            await self._q.wait_room()  # room, or closing (then enqueue counts it as dropped)
        return self.enqueue(ev)

    async def put_many(self, events: Iterable[Event]) -> int:
        n = 0
        for ev in events:
            n += await self.put(ev)
        return n

    def _processed(self) -> int:
        """Every ticket up to this one was written, given up or dropped."""
        if self._inflight_first:
            return self._inflight_first - 1
        if self._q:
            return self._q.peek()[0] - 1
        return self._ticket

    def _notify(self) -> None:
        done = self._processed()
        keep = []
        for target, fut in self._waiters:
            if target <= done:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def _drain(self) -> None:
        q = self._q
        while True:
            if not await q.wait():  # closing, and everything queued was written
                return
            batch = q.get_batch(self.batch_size)  # wakes a put() waiting for room
            self._inflight_first = batch[0][0]
            try:
                await self._write(batch)
            finally:
                self._inflight_first = 0
                self._notify()

    async def _write(self, batch: list[tuple[int, Event]]) -> None:
        events = [ev for _, ev in batch]
        for attempt in range(self.retries + 1):
            try:
                await self.store.append(events)
                self.written += len(events)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt < self.retries:
                    await asyncio.sleep(self.retry_backoff * (2 ** attempt))
                    continue
                err = exc if isinstance(exc, AsmError) else _runtime_error(
                    f"persistence append failed: {type(exc).__name__}: {exc}", "store_write_failed", exc)
                self.failed += len(events)
                self.errors.append(err)
                self._unreported.append((batch[0][0], batch[-1][0], err))
                del self._unreported[:-100]
                log.warning("persistence writer: %d event(s) not stored after %d attempt(s): %s",
                            len(events), attempt + 1, err)
                if self.on_error is not None:
                    try:
                        self.on_error(err, events)
                    except Exception:
                        log.exception("persistence writer: on_error callback failed")

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything enqueued before this call is stored and synced.

        Raises AsmError (reason ``persistence_write_failed``) if some of those events
        could not be stored, and TimeoutError after ``timeout`` seconds.
        """
        target = self._ticket
        if self._processed() < target:
            self._start()
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((target, fut))
            await asyncio.wait_for(fut, timeout)
        await self.store.sync()
        failed = [u for u in self._unreported if u[0] <= target]
        if failed:
            self._unreported = [u for u in self._unreported if u[0] > target]
            n = sum(hi - lo + 1 for lo, hi, _ in failed)
            first = failed[0][2]
            raise _runtime_error(f"{n} event(s) could not be stored: {first.message}", "persistence_write_failed",
                                 first)

    async def close(self) -> None:
        """Drain the queue (no new events are accepted), stop, and close the store if owned."""
        if self._closed:
            return
        self._closing = True
        self._q.close()  # refuses new events, releases blocked put()s, lets the drain finish
        if self._q and self._task is None:
            self._start()
        try:
            if self._task is not None:
                await self._task
            try:
                await self.store.sync()
            except Exception as exc:
                err = exc if isinstance(exc, AsmError) else _runtime_error(
                    f"persistence sync failed: {type(exc).__name__}: {exc}", "store_sync_failed", exc)
                self.errors.append(err)
                self.sync_error = err
                log.warning("persistence writer: final sync failed: %s", err)
        finally:
            self._closed = True
            self._notify()
            if self.close_store:
                try:
                    await self.store.close()
                except Exception as exc:
                    err = exc if isinstance(exc, AsmError) else _runtime_error(
                        f"persistence close failed: {type(exc).__name__}: {exc}", "store_sync_failed", exc)
                    self.errors.append(err)
                    self.sync_error = self.sync_error or err
                    log.warning("persistence writer: closing the store failed: %s", err)


# -- history ----------------------------------------------------------------------------


async def replay_session(store: EventStore, session_id: str, init: A, fn: Callable[[A, Event], A]) -> A:
    """Left fold of ``fn(acc, event)`` over the session's events (store order).

    A store failure is raised as an AsmError (kind ``unknown``, domain ``runtime``)
    with the original exception as ``__cause__``; an exception from ``fn`` propagates.
    """
    try:
        events = await store.list_events(session_id)
    except AsmError:
        raise
    except Exception as exc:
        raise _runtime_error(f"replay_session failed: {type(exc).__name__}: {exc}", "store_read_failed", exc) from exc
    acc = init
    for ev in events:
        acc = fn(acc, ev)
    return acc


async def _rebuild(store: EventStore, run_id: str, session_id: str | None) -> tuple[list[Event], Result]:
    try:
        events = await store.list_events(session_id=session_id, run_id=run_id)
    except AsmError:
        raise
    except Exception as exc:
        raise _runtime_error(f"rebuild_run failed: {type(exc).__name__}: {exc}", "store_read_failed", exc) from exc
    where = f" of session {session_id!r}" if session_id is not None else ""
    if not events:
        raise _runtime_error(f"run {run_id!r}{where} not found in the event store", "run_not_found")
    sids = list(dict.fromkeys(e.session_id for e in events))
    if len(sids) > 1:
        raise _runtime_error(f"run {run_id!r} is in several sessions ({', '.join(map(repr, sids))}); "
                             "give the session id", "run_ambiguous")
    # The live reducer consumed them in seq order (dropping repeats): so does this one.
    events.sort(key=lambda e: e.pb.seq)
    first = events[0]
    reducer = EventReducer(run_id, first.session_id, first.provider or "unknown")
    applied = [ev for ev in events if reducer.apply(ev)]
    return applied, reducer.result()


async def rebuild_run(store: EventStore, run_id: str, session_id: str | None = None) -> Result:
    """The run's Result, reduced from its stored events by the live EventReducer.

    Text, cost, stop reason, error, status, event count and ``duration_ms`` (from
    the events' own timestamps) equal the live Result's; the controller-side
    ``metadata`` (node, attempts) is not in the events and is not rebuilt.
    Raises AsmError kind ``unknown`` (reason ``run_not_found``) for a run the store
    does not hold, and (``run_ambiguous``) when the id is in several sessions and
    no ``session_id`` is given.
    """
    return (await _rebuild(store, run_id, session_id))[1]


# -- CLI helpers ----------------------------------------------------------------------------


async def record_events(path: str | os.PathLike[str], events: Iterable[Event], fsync: str = "always") -> int:
    """Append events to the event store at ``path`` (created if missing); how many were new."""
    async with FileStore(path, fsync=fsync) as store:
        return await store.append(events)


async def open_recorder(path: str | os.PathLike[str], fsync: str = "batch", queue_size: int = 10_000) -> AsyncWriter:
    """A writer recording into the FileStore at ``path`` (for ``asm run --record``).

    ``overflow="block"``: ``await writer.put(ev)`` never loses an event (it waits
    only when the disk is ``queue_size`` events behind). ``await writer.close()``
    drains, syncs and closes the store. Raises AsmError when the file is locked by
    another writer or cannot be opened.
    """
    store = FileStore(path, fsync=fsync)
    await store.open()
    return AsyncWriter(store, queue_size=queue_size, overflow="block", close_store=True)


_COMPLETED_KIND: Final = KIND_NAMES.index("run_completed")


def store_damage(report: RecoveryReport | None) -> list[dict[str, Any]]:
    """The file-level damage opening found, as ``result_summary.metadata.damage`` entries."""
    if report is None:
        return []
    out: list[dict[str, Any]] = []
    if report.tail_lines:
        out.append({"kind": "torn_tail", "lines": report.tail_lines, "bytes": report.tail_bytes,
                    "offset": report.truncated_at})
    middle = [p for p in report.problems if p.where == "middle" and not p.reason.startswith("format version")]
    if report.skipped_lines:
        first = middle[0] if middle else None
        out.append({"kind": "bad_lines", "lines": report.skipped_lines, "bytes": report.skipped_bytes,
                    "first_line": first.line if first else None, "first_offset": first.offset if first else None,
                    "reason": first.reason if first else None})
    if report.future_lines:
        out.append({"kind": "newer_format", "lines": report.future_lines})
    return out


def run_damage(events: Sequence[Event]) -> list[dict[str, Any]]:
    """What is missing from one run's stored events: seq gaps (the node numbers a run's
    events 1, 2, 3, ... with no holes) and a missing ``run_completed`` (its last event)."""
    out: list[dict[str, Any]] = []
    expected = 1
    for seq in sorted({e.pb.seq for e in events}):
        if seq > expected:
            if len(out) < _MAX_PROBLEMS:
                out.append({"kind": "seq_gap", "from": expected, "to": seq - 1, "missing": seq - expected})
        expected = max(expected, seq + 1)
    if not any(e.pb.kind == _COMPLETED_KIND for e in events):
        out.append({"kind": "missing_run_completed", "last_seq": expected - 1})
    return out


async def replay_file(path: str | os.PathLike[str], session_id: str | None = None,
                      run_id: str | None = None) -> list[tuple[list[Event], Result]]:
    """Runs rebuilt from an event store file, each as (its events in seq order, its Result).

    * ``run_id`` given: that run (in ``session_id`` when given);
    * only ``session_id``: every run of the session, in the order they started;
    * neither: the last run — the one whose first event was stored last.

    The file is opened read-only (no lock, nothing truncated), so a file being
    recorded can be replayed. Errors are AsmError: a missing file is a ConfigError
    (``config_invalid``); an empty store, an unknown session or run are kind
    ``unknown`` (reasons ``store_empty``, ``session_not_found``, ``run_not_found``).

    Damage is never silent: a Result whose record is incomplete gets
    ``metadata["damage"]``, a list of :func:`store_damage` entries (the file's torn
    tail, bad lines, newer-format lines: every run of the file gets them) and
    :func:`run_damage` entries (seq gaps, no ``run_completed``). Intact: no key.
    """
    p = Path(path)
    async with FileStore(p, readonly=True) as store:
        sessions = await store.sessions()
        if not sessions:
            raise _runtime_error(f"event store {p} holds no events", "store_empty")
        if session_id is not None and session_id not in sessions:
            known = ", ".join(sessions[-10:])
            raise _runtime_error(f"session {session_id!r} is not in {p} (sessions: {known})", "session_not_found")
        if run_id is not None:
            runs = [await _rebuild(store, run_id, session_id)]
        elif session_id is not None:
            runs = [await _rebuild(store, rid, session_id) for rid in await store.runs(session_id)]
        else:
            last = await store.last_run()
            assert last is not None
            runs = [await _rebuild(store, last[1], last[0])]
        file_damage = store_damage(store.recovered)
        for events, result in runs:
            damage = file_damage + run_damage(events)
            if damage:
                result.metadata["damage"] = damage
        return runs


__all__ = [
    "FORMAT_VERSION", "FSYNC_MODES", "OVERFLOW_POLICIES", "AsyncWriter", "EventStore", "FileStore", "LineProblem",
    "MemoryStore", "RecoveryReport", "decode_line", "encode_line", "open_recorder", "rebuild_run", "record_events",
    "replay_file", "replay_session", "run_damage", "sniff_store", "store_damage",
]
