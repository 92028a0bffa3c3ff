"""FileStore: the crash-safe JSON-lines event store (format and guarantees: the package docstring)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from asm_controller._events import Event
from asm_controller.extensions.persistence._codec import (
    FORMAT_VERSION,
    CorruptLine,
    decode_line,
    encode_line,
    sniff_store,
)
from asm_controller.extensions.persistence._store import _Index, _runtime_error
from asm_wire import AsmError, ConfigError, pb

__all__ = ["FSYNC_MODES", "FileStore", "LineProblem", "RecoveryReport"]

log = logging.getLogger("asm_controller.persistence")


A = TypeVar("A")

FSYNC_MODES: Final = ("always", "batch", "never")
_MAX_PROBLEMS: Final = 100


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


class FileStore:
    """An append-only JSON-lines :class:`EventStore` (see the package docstring for format and guarantees).

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
                        raise CorruptLine("unterminated last line (torn write)")
                    decoded = decode_line(line[:-1])
                except CorruptLine as bad:
                    pending_tail.append(LineProblem(lineno, offset, length, bad.message, "tail"))
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
