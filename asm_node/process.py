"""Process supervision for CLI runs: spawn, read, signal, reap.

* Every CLI runs in its own session and process group (``start_new_session``),
  so signals reach its whole tree; never ``preexec_fn`` (gRPC is threaded).
* stdout is read in large chunks and split into lines here (not ``readline``),
  with a cap: a longer line is dropped and reported, the stream re-syncs at the
  next newline, and the agent never buffers more than the cap.
* Termination escalates SIGINT -> SIGTERM -> SIGKILL on the group, waiting for
  the *group* to be gone (not just the leader), and the leader is always reaped.
* No thread and no poll per run: a CLI's exit is a readable pidfd on the event loop
  (:class:`PidfdChildWatcher`, installed by :func:`spawn` instead of asyncio's threaded
  watcher, one thread per child on Python 3.11), and :func:`leader_exited` awaits it.
* The fork/exec (and a run cgroup's mkdir and entry) happens in a small spawn thread pool:
  a vfork parent waits until its child has exec'd, which on the loop stalled every other
  StartRun and stream (:func:`spawn_run`).
* A :class:`Reaper` watchdog kills registered groups if the agent itself dies.
* Where the node can create cgroup v2 groups (:class:`Cgroups`), each run also
  has its own cgroup, entered before the CLI runs: what leaves the process
  group (``setsid``) is still killed at run end and by the watchdog.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import functools
import itertools
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from asyncio.unix_events import _UnixSubprocessTransport  # type: ignore[attr-defined]
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVarTuple

_Ts = TypeVarTuple("_Ts")

log = logging.getLogger("asm_node.process")

READ_CHUNK = 256 * 1024


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def wait_group_gone(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Wait until the leader is reaped and no group member is left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if proc.returncode is not None and not group_alive(proc.pid):
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(remaining, 0.02))


class PidfdChildWatcher(asyncio.AbstractChildWatcher):
    """asyncio's child watcher without a thread per child: each child's pidfd is a reader on the
    running loop, and its exit is reaped (``waitpid`` of that pid only) when the pidfd turns readable.

    Python 3.11's default (``ThreadedChildWatcher``) blocks one thread in ``waitpid`` per child:
    1,000 sleeping runs were 1,000 threads. Its own ``PidfdChildWatcher`` does this too, but gives
    no way to learn of the exit before ``Process.wait()`` - which also waits for the pipes, held
    open by anything the CLI left behind; here each child also gets a future resolved at its exit
    (:meth:`take_exit`), which :func:`leader_exited` awaits instead of polling ``returncode``.
    """

    def __init__(self) -> None:
        self._exits: dict[int, asyncio.Future[int]] = {}

    def add_child_handler(self, pid: int, callback: Callable[[int, int, *_Ts], object], *args: *_Ts) -> None:
        loop = asyncio.get_running_loop()
        self._exits[pid] = loop.create_future()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:  # out of fds, say: this child is waited for the old way, by a thread
            log.warning("cannot open a pidfd for child %d (%s): a thread waits for it", pid, exc)
            threading.Thread(target=self._wait_blocking, args=(loop, pid, callback, args), daemon=True).start()
            return
        loop.add_reader(pidfd, self._reap, loop, pid, pidfd, callback, args)

    @staticmethod
    def _waitpid(pid: int) -> int:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by someone else: the status is lost (as in asyncio's watchers)
            log.warning("child %d was reaped elsewhere: its exit status is unknown", pid)
            return 255
        return os.waitstatus_to_exitcode(status)

    def _wait_blocking(self, loop: asyncio.AbstractEventLoop, pid: int, callback: Callable[..., object],
                       args: tuple[Any, ...]) -> None:
        returncode = self._waitpid(pid)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            loop.call_soon_threadsafe(self._exited, pid, returncode, callback, args)

    def _reap(self, loop: asyncio.AbstractEventLoop, pid: int, pidfd: int, callback: Callable[..., object],
              args: tuple[Any, ...]) -> None:
        loop.remove_reader(pidfd)
        try:
            returncode = self._waitpid(pid)  # does not block: the pidfd is readable once the child exited
        finally:
            os.close(pidfd)
        self._exited(pid, returncode, callback, args)

    def _exited(self, pid: int, returncode: int, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        callback(pid, returncode, *args)
        fut = self._exits.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result(returncode)

    def take_exit(self, pid: int) -> asyncio.Future[int] | None:
        """The future of child ``pid``'s exit (None once it was reaped): for the caller to keep."""
        return self._exits.get(pid)

    def remove_child_handler(self, pid: int) -> bool:
        return True  # its reader goes when it exits, which asyncio's transports always wait for

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        pass  # no loop of its own: the running loop of each add_child_handler call

    def close(self) -> None:
        pass

    def is_active(self) -> bool:
        return True

    def __enter__(self) -> PidfdChildWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_watcher: PidfdChildWatcher | None = None
#: Each spawned CLI's exit future (from the watcher), for :func:`leader_exited`.
_exits: weakref.WeakKeyDictionary[asyncio.subprocess.Process, asyncio.Future[int]] = weakref.WeakKeyDictionary()


def child_watcher() -> PidfdChildWatcher | None:
    """Install :class:`PidfdChildWatcher` as asyncio's child watcher (once); None where it cannot be
    (no pidfd, or Python >= 3.14, which has no child watchers and waits with pidfds itself)."""
    global _watcher
    if sys.version_info >= (3, 14) or not hasattr(os, "pidfd_open"):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+ deprecates child watchers
        if _watcher is None:
            try:
                os.close(os.pidfd_open(os.getpid()))
            except OSError:  # kernel < 5.3, or seccomp
                return None
            _watcher = PidfdChildWatcher()
        if asyncio.get_child_watcher() is not _watcher:
            asyncio.set_child_watcher(_watcher)
    return _watcher


async def leader_exited(proc: asyncio.subprocess.Process, interval: float = 0.05) -> int:
    """Return when the group leader has exited (reaped, ``proc.returncode`` set).

    ``Process.wait()`` also waits for the stdout/stderr pipes to close, which
    never happens while a leftover child of the CLI holds them. A CLI started by :func:`spawn`
    has an exit future (no poll, no thread); any other process has its returncode polled.
    """
    if proc.returncode is not None:
        return proc.returncode
    fut = _exits.get(proc)
    if fut is not None:
        rc = await asyncio.shield(fut)
        # The transport learns the status a loop iteration or two after the reap (call_soon).
        for _ in range(100):
            if proc.returncode is not None:
                return proc.returncode
            await asyncio.sleep(0)
        return rc
    waiter = asyncio.ensure_future(proc.wait())
    try:
        while proc.returncode is None:
            done, _ = await asyncio.wait({waiter}, timeout=interval)
            if done:
                break
        return proc.returncode if proc.returncode is not None else await waiter
    finally:
        waiter.cancel()


async def terminate_group(
    proc: asyncio.subprocess.Process, steps: Sequence[tuple[int, float]]
) -> None:
    """Signal the group through ``steps`` (signal, grace) until it is gone; then SIGKILL and reap."""
    for sig, grace in steps:
        if not signal_group(proc.pid, sig) and proc.returncode is not None:
            break
        if await wait_group_gone(proc, grace):
            break
    else:
        signal_group(proc.pid, signal.SIGKILL)
    # The leader is always reaped, whatever happened above.
    await leader_exited(proc)
    if group_alive(proc.pid):
        signal_group(proc.pid, signal.SIGKILL)
        await wait_group_gone(proc, 1.0)


class LineReader:
    """Splits a byte stream into lines with a hard cap on line length.

    ``on_lines`` gets lists of complete lines (without ``\\n``); ``on_overflow``
    gets the size seen so far of a line that exceeded the cap (it is dropped).
    """

    def __init__(
        self,
        cap: int,
        on_lines: Callable[[list[bytes]], None],
        on_overflow: Callable[[int], None],
    ) -> None:
        self.cap = cap
        self.on_lines = on_lines
        self.on_overflow = on_overflow
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._skipping = False
        self._skipped = 0

    def feed(self, chunk: bytes) -> None:
        if self._skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                self._skipped += len(chunk)
                return
            self._skipping = False
            self.on_overflow(self._skipped + nl)
            chunk = chunk[nl + 1 :]
            if not chunk:
                return
        nl = chunk.rfind(b"\n")
        if nl < 0:
            self._pending.append(chunk)
            self._pending_len += len(chunk)
            if self._pending_len > self.cap:
                self._skipping, self._skipped = True, self._pending_len
                self._pending, self._pending_len = [], 0
            return
        if self._pending:
            self._pending.append(chunk[: nl + 1])
            data = b"".join(self._pending)
        else:
            data = chunk[: nl + 1]
        rest = chunk[nl + 1 :]
        self._pending, self._pending_len = ([rest], len(rest)) if rest else ([], 0)
        lines = data.split(b"\n")
        lines.pop()  # the empty string after the last newline
        if len(data) > self.cap and any(len(ln) > self.cap for ln in lines):
            for ln in lines:
                if len(ln) > self.cap:
                    self.on_overflow(len(ln))
            lines = [ln for ln in lines if len(ln) <= self.cap]
        if lines:
            self.on_lines(lines)
        if self._pending_len > self.cap:
            self._skipping, self._skipped = True, self._pending_len
            self._pending, self._pending_len = [], 0

    def close(self) -> None:
        """End of stream: a final line without newline is still a line."""
        if self._skipping:
            self.on_overflow(self._skipped)
        elif self._pending:
            self.on_lines([b"".join(self._pending)])
        self._pending, self._pending_len, self._skipping = [], 0, False


async def pump(stream: asyncio.StreamReader, reader: LineReader, stop: Callable[[], bool] | None = None,
               gate: Callable[[], Awaitable[None] | None] | None = None,
               on_chunk: Callable[[], None] | None = None) -> None:
    """Feed ``stream`` to ``reader`` until EOF or ``stop()``.

    After each chunk ``gate()`` may return an awaitable: reading waits for it (back-pressure:
    the CLI then blocks on its full pipe), so what is read is never more than the consumer takes.
    ``on_chunk()`` is called for every chunk read, a line's end or not, and when reading resumes after
    such a wait (the run's idle deadline: a CLI blocked on its full pipe was not idle).
    """
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            reader.close()
            return
        if on_chunk is not None:
            on_chunk()
        reader.feed(chunk)
        if stop is not None and stop():
            return
        if gate is not None and (wait := gate()) is not None:
            await wait
            if on_chunk is not None:
                on_chunk()


_STREAM_LIMIT = 1024 * 1024
#: fork/exec threads. The parent of a vfork() waits until the child has exec'd (~0.5 ms, longer when
#: the machine is busy); on the event loop that wait is time in which no StartRun and no event is
#: served, so 1,000 concurrent StartRuns queued behind each other's spawns. Two threads: more gain
#: nothing on a 2-core node (the children's exec is the real cost) and each keeps a stack.
_SPAWN_THREADS = 2
_spawner: ThreadPoolExecutor | None = None


def _spawn_pool() -> ThreadPoolExecutor:
    global _spawner
    if _spawner is None:
        _spawner = ThreadPoolExecutor(_SPAWN_THREADS, thread_name_prefix="asm-spawn")
    return _spawner


class _AdoptedTransport(_UnixSubprocessTransport):  # type: ignore[misc]
    """asyncio's subprocess transport around a :class:`subprocess.Popen` made elsewhere (a spawn thread)."""

    def _start(self, args: Any, shell: Any, stdin: Any, stdout: Any, stderr: Any, bufsize: Any,
               **kwargs: Any) -> None:
        self._proc = kwargs["popen"]

    def exited(self, pid: int, returncode: int) -> None:
        """The child watcher's callback: what asyncio's loop does for its own children (the exit is
        handled one loop iteration later, after the pipes' last reads were scheduled)."""
        loop = self._loop
        loop.call_soon_threadsafe(loop.call_soon, self._process_exited, returncode)

    async def wait_exit(self) -> int | None:
        return await self._wait()  # type: ignore[no-any-return]


def _orphan(fut: asyncio.Future[Any]) -> None:
    """A spawn whose caller was cancelled meanwhile: its CLI must not outlive it unsupervised."""
    if fut.cancelled() or fut.exception() is not None:
        return
    popen, cgroup = fut.result()
    with contextlib.suppress(OSError):
        os.killpg(popen.pid, signal.SIGKILL)
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()

    def reap() -> None:  # off the loop: it is dying from SIGKILL
        popen.wait()
        if cgroup is not None:
            Cgroups.remove(cgroup)

    _spawn_pool().submit(reap)


async def _spawn_off_loop(watcher: PidfdChildWatcher, start: Callable[[], tuple[subprocess.Popen[bytes], str | None]],
                          argv: list[str], stdin: int) -> tuple[asyncio.subprocess.Process, str | None]:
    """``asyncio.create_subprocess_exec`` with ``start`` (:func:`_popen`) in a spawn thread, not on the loop.

    Then the same transport, protocol and child-watcher registration as asyncio's own
    ``_make_subprocess_transport`` - only the Popen call moved. A pidfd opened after the fork still
    finds the child: it cannot be reaped before the watcher does (nothing else waits for it).
    """
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(_spawn_pool(), start)
    try:
        popen, cgroup = await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_orphan)
        raise
    protocol = asyncio.subprocess.SubprocessStreamProtocol(limit=_STREAM_LIMIT, loop=loop)
    waiter = loop.create_future()
    transp = _AdoptedTransport(loop, protocol, argv, False, stdin, subprocess.PIPE, subprocess.PIPE, 0,
                               waiter=waiter, extra=None, popen=popen)
    watcher.add_child_handler(transp.get_pid(), transp.exited)
    try:
        await waiter
    except BaseException:
        transp.close()
        await transp.wait_exit()
        if cgroup is not None:
            Cgroups.remove(cgroup)
        raise
    return asyncio.subprocess.Process(transp, protocol, loop), cgroup


# Runs the CLI only once it is in its cgroup: the shell moves itself there, then execs the CLI
# (same pid), so nothing the CLI starts - even with setsid - is ever outside the cgroup.
_CGROUP_EXEC = 'echo $$ 2>/dev/null >"$0"; exec "$@"'


def _check_executable(argv0: str, cwd: str, env: dict[str, str]) -> None:
    """What ``exec`` would say about ``argv0``, raised here (the wrapper shell would only print it)."""
    if "/" in argv0:
        candidates = [os.path.join(cwd, argv0)]
    else:
        candidates = [os.path.join(d or ".", argv0) for d in env.get("PATH", os.defpath).split(os.pathsep)]
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", argv0)
    if not any(os.access(c, os.X_OK) for c in found):
        raise PermissionError(errno.EACCES, "Permission denied", argv0)


def _in_cgroup(argv: list[str], cwd: str, env: dict[str, str], cgroup: str) -> list[str]:
    _check_executable(argv[0], cwd, env)
    return ["/bin/sh", "-c", _CGROUP_EXEC, os.path.join(cgroup, "cgroup.procs"), *argv]


def _enter(cgroup: str, pid: int) -> None:
    """The parent's write of the pid into the cgroup (the wrapper's may have failed silently)."""
    try:
        _write_file(os.path.join(cgroup, "cgroup.procs"), str(pid))
    except ProcessLookupError:
        pass  # already exited
    except OSError as exc:
        log.warning("cannot put CLI %d into %s (%s): only its process group is tracked", pid, cgroup, exc)


#: A run's cgroup: a directory, a function making one (called where the spawn happens), or none.
CgroupSpec = str | Callable[[], str | None] | None


def _popen(argv: list[str], cwd: str, env: dict[str, str], stdin: int,
           cgroup: CgroupSpec) -> tuple[subprocess.Popen[bytes], str | None]:
    """All the blocking work of a spawn (cgroup mkdir, PATH lookup, fork/exec, cgroup entry), for a spawn thread.

    The Popen arguments are vfork-friendly (no ``preexec_fn``, no user/group change): Python's
    ``_posixsubprocess`` then uses vfork(), whose cost does not grow with the agent's memory.
    """
    path = cgroup() if callable(cgroup) else cgroup
    try:
        popen = subprocess.Popen(_in_cgroup(argv, cwd, env, path) if path else argv, cwd=cwd, env=env,
                                 stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True, bufsize=0)
    except BaseException:
        if path is not None:
            Cgroups.remove(path)
        raise
    if path is not None:
        _enter(path, popen.pid)
    return popen, path


async def spawn(
    argv: list[str], cwd: str, env: dict[str, str], stdin: bool, cgroup: str | None = None
) -> asyncio.subprocess.Process:
    """:func:`spawn_run` in ``cgroup`` (a directory of :class:`Cgroups`), when given."""
    return (await spawn_run(argv, cwd, env, stdin, cgroup))[0]


async def spawn_run(
    argv: list[str], cwd: str, env: dict[str, str], stdin: bool, cgroup: CgroupSpec = None
) -> tuple[asyncio.subprocess.Process, str | None]:
    """Start a CLI in its own session, in a cgroup when ``cgroup`` is or makes one; the process and its cgroup.

    The cgroup is entered before the CLI runs, through ``/bin/sh -c 'echo $$ > cgroup.procs; exec
    "$@"'`` (``preexec_fn`` is not allowed: gRPC is threaded); the only trace of the wrapper is the
    ``PWD`` variable the shell sets to the run's cwd. The parent writes the pid too, so a failed
    write in the wrapper is caught; a cgroup that cannot be entered leaves the run with
    process-group tracking only (logged). On a failed spawn the cgroup is removed.

    With the pidfd watcher the blocking part (:func:`_popen`) runs in a spawn thread, so the event
    loop goes on serving other StartRuns and events meanwhile; the caller still gets the process
    only once it exists (a StartRun's journal record, written before, stays before the spawn).
    """
    stdin_arg = subprocess.PIPE if stdin else subprocess.DEVNULL
    watcher = child_watcher()
    if watcher is not None:
        proc, path = await _spawn_off_loop(watcher, functools.partial(_popen, argv, cwd, env, stdin_arg, cgroup),
                                           argv, stdin_arg)
        exit_future = watcher.take_exit(proc.pid)
        if exit_future is not None:
            _exits[proc] = exit_future
        return proc, path
    path = cgroup() if callable(cgroup) else cgroup
    try:
        proc = await asyncio.create_subprocess_exec(
            *(_in_cgroup(argv, cwd, env, path) if path else argv), cwd=cwd, env=env, stdin=stdin_arg,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, limit=_STREAM_LIMIT)
    except BaseException:
        if path is not None:
            Cgroups.remove(path)
        raise
    if path is not None:
        _enter(path, proc.pid)
    return proc, path


def _write_file(path: str, data: str) -> None:
    """One write(2) of ``data`` (cgroup files take one value per write)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _cgroup_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        pass
    return None


class Cgroups:
    """Per-run cgroup v2 directories, so that a process that left its process group (``setsid``) is
    still found and killed.

    Lives under the agent's *own* cgroup (``/proc/self/cgroup``; in a container that is the delegated
    subtree): ``asm-node-<pid>-<random>/run-<n>``. No controller is enabled, so cgroup v2's "no
    internal processes" rule does not apply and the agent stays where it is; only membership
    (``cgroup.procs``) and ``cgroup.kill`` (kernel >= 5.14; otherwise every member gets SIGKILL) are
    used. :meth:`create` returns None when this is not possible (no cgroup2 mount, not writable, ...).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._n = itertools.count(1)  # next() is atomic: run cgroups are made in spawn threads
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # run cgroups whose members are still exiting
        self._closed = False

    @classmethod
    def create(cls) -> Cgroups | None:
        try:
            base = _own_cgroup_dir()
            if base is None:
                log.info("cgroup v2 is not mounted: runs are tracked by process group only (setsid escapes it)")
                return None
            cls.sweep_stale(base)
            root = os.path.join(base, f"asm-node-{os.getpid()}-{secrets.token_hex(4)}")
            os.mkdir(root)
        except OSError as exc:
            log.info("cannot create cgroups (%s): runs are tracked by process group only (setsid escapes it)", exc)
            return None
        tree = cls(root)
        probe = os.path.join(root, "probe")
        try:
            os.mkdir(probe)
            res = subprocess.run(["/bin/sh", "-c", 'echo $$ > "$0" && cat /proc/self/cgroup',
                                  os.path.join(probe, "cgroup.procs")], capture_output=True, cwd="/",
                                 env={"PATH": os.defpath}, timeout=10)
            ok = res.returncode == 0 and res.stdout.rstrip().endswith(b"/probe")
            why = res.stderr.decode("utf-8", "replace").strip()
        except (OSError, subprocess.SubprocessError) as exc:
            ok, why = False, str(exc)
        cls.remove(probe)
        if not ok:
            cls.remove(root)
            log.info("cannot move processes into cgroups (%s): runs are tracked by process group only", why)
            return None
        log.info("runs are tracked by cgroup under %s", root)
        return tree

    @classmethod
    def sweep_stale(cls, base: str) -> int:
        """Remove the cgroups of earlier agents that died with their watchdog (both SIGKILLed, a host OOM):
        what is still in them is an orphaned CLI, killed; returns how many node directories went.

        A directory is stale only when its agent pid is gone, so a live agent (another node on the
        host sharing the parent cgroup) is never touched.
        """
        removed = 0
        try:
            names = os.listdir(base)
        except OSError:
            return 0
        for name in names:
            prefix, _, rest = name.partition("-node-")
            pid_text = rest.partition("-")[0]
            if prefix != "asm" or not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            try:
                os.kill(int(pid_text), 0)
                continue  # its agent is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
            node_dir = os.path.join(base, name)
            try:
                runs = [os.path.join(node_dir, r) for r in os.listdir(node_dir) if r.startswith(("run-", "probe"))]
            except OSError:
                continue
            for run_dir in runs:
                if cls.populated(run_dir):
                    log.warning("killing processes %s left in %s by a dead agent", cls.pids(run_dir), run_dir)
                    cls.signal(run_dir, signal.SIGKILL)
                for _ in range(100):  # members take a moment to exit after SIGKILL
                    if cls.remove(run_dir):
                        break
                    time.sleep(0.02)
            if cls.remove(node_dir):
                removed += 1
        return removed

    def new_run(self) -> str | None:
        """A fresh, empty cgroup for one run (None if it could not be created)."""
        path = os.path.join(self.root, f"run-{next(self._n)}")
        try:
            os.mkdir(path)
        except OSError as exc:
            log.warning("cannot create %s (%s): the run is tracked by process group only", path, exc)
            return None
        return path

    @staticmethod
    def pids(path: str) -> list[int]:
        try:
            with open(os.path.join(path, "cgroup.procs")) as fh:
                return [int(x) for x in fh.read().split()]
        except (OSError, ValueError):
            return []

    @staticmethod
    def populated(path: str) -> bool:
        try:
            with open(os.path.join(path, "cgroup.events")) as fh:
                return "populated 1" in fh.read()
        except OSError:
            return False

    @classmethod
    def signal(cls, path: str, sig: int) -> None:
        if sig == signal.SIGKILL:
            try:
                _write_file(os.path.join(path, "cgroup.kill"), "1")
                return
            except OSError:
                pass  # kernel < 5.14: one by one
        for pid in cls.pids(path):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    @staticmethod
    def remove(path: str) -> bool:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def kill_and_remove(self, path: str) -> None:
        """SIGKILL every member and remove the directory (retried in the background while members exit)."""
        self.signal(path, signal.SIGKILL)
        if self.remove(path):
            return
        with self._lock:
            self._pending.add(path)

        def retry(left: int) -> None:
            if self.remove(path):
                with self._lock:
                    self._pending.discard(path)
                    last = self._closed and not self._pending
                if last:
                    self.remove(self.root)  # close() could not: this run was still in it
                return
            if left:
                self.signal(path, signal.SIGKILL)
                threading.Timer(0.05, retry, (left - 1,)).start()
            else:
                log.warning("cgroup %s still has processes %s after SIGKILL; left in place", path, self.pids(path))

        threading.Timer(0.01, retry, (100,)).start()

    def close(self) -> None:
        """Remove the node's directory (now, or as soon as the last run cgroup is gone)."""
        with self._lock:
            self._closed = True
            pending = bool(self._pending)
        if not self.remove(self.root) and not pending:
            log.warning("cannot remove %s (runs still in it?)", self.root)


def _own_cgroup_dir() -> str | None:
    """The directory of this process's cgroup in the (unified) cgroup v2 hierarchy, if mounted."""
    own = _cgroup_of(os.getpid())
    if own is None:
        return None
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields, _, rest = line.partition(" - ")
            if rest.split(" ", 1)[0] != "cgroup2":
                continue
            parts = fields.split(" ")
            mount_root, mount_point = parts[3], parts[4].replace("\\040", " ")
            rel = os.path.relpath(own, mount_root) if mount_root != "/" else own.lstrip("/")
            if rel.startswith(".."):
                continue
            path = os.path.normpath(os.path.join(mount_point, rel))
            if os.path.isfile(os.path.join(path, "cgroup.procs")):
                return path
    return None


async def terminate_cgroup(path: str, grace: float) -> None:
    """SIGTERM every process left in a run's cgroup, SIGKILL after ``grace``; wait until it is empty."""
    if not Cgroups.populated(path):
        return
    Cgroups.signal(path, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    term_until, kill_until = loop.time() + grace, loop.time() + grace + 2.0
    while True:
        await asyncio.sleep(0.02)
        if not Cgroups.populated(path) or loop.time() > kill_until:
            return
        if loop.time() > term_until:
            Cgroups.signal(path, signal.SIGKILL)


# Spawned by path (``python -I <path>``), not ``-m asm_node._reaper``: -m would import the asm_node
# package (grpc, pydantic, ...) from a sys.path the isolated child must not trust; the script needs only
# the standard library. That is why asm_node/_reaper.py is a runnable module with a __main__ block.
#: Registrations written into a new watchdog's pipe before it starts (well under Linux's 64 KiB buffer).
_PIPE_AHEAD_BYTES = 32 * 1024

_REAPER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_reaper.py")


#: Stopped watchdogs not reaped yet (nobody waits for one; their zombies go at the next chance).
_stopped_watchdogs: list[subprocess.Popen[bytes]] = []


def _reap_stopped() -> None:
    _stopped_watchdogs[:] = [p for p in _stopped_watchdogs if p.poll() is None]


atexit.register(_reap_stopped)


class Reaper:
    """Client side of the :mod:`asm_node._reaper` watchdog, and the runs' cgroups.

    The watchdog is ``python -I -S <path>/_reaper.py`` with cwd ``/`` and an environment of ``PATH``
    alone: isolated mode puts neither the cwd nor ``PYTHON*`` variables on ``sys.path``, so nothing
    planted next to the agent (a ``signal.py``) is imported, and no secret of the agent is in its
    environment. The agent checks it is alive (every ``agent.REAPER_CHECK_S`` seconds, and at each
    :meth:`track`); a dead watchdog is logged at ERROR, counted (:attr:`failures`) and restarted
    with every live group registered again.
    """

    def __init__(self, cgroups: bool = True) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin: BinaryIO | None = None
        self._groups: dict[int, str | None] = {}
        self._want_cgroups = cgroups
        self.cgroups: Cgroups | None = None
        self.failures = 0
        self._started = self._stopped = False

    def start(self) -> None:
        self._started, self._stopped = True, False
        if self._want_cgroups and self.cgroups is None:
            self.cgroups = Cgroups.create()
        self._spawn()

    def _spawn(self) -> None:
        _reap_stopped()
        # -S: no site (a venv's .pth hooks cost ~10 ms and MBs; the watchdog needs none of them).
        argv = [sys.executable, "-I", "-S", _REAPER_SCRIPT]
        if self.cgroups is not None:
            argv.append(self.cgroups.root)
        # The live groups are in the pipe before the watchdog exists: a restarted watchdog knows every
        # group from its first instant, so an agent killed right after the restart still has its CLIs
        # killed. Only what fits the pipe's buffer is written ahead (a blocking write with no reader
        # would hang); the rest follows once it runs.
        read_fd, write_fd = os.pipe()
        lines = [self._line(pgid, cgroup) for pgid, cgroup in self._groups.items()]
        ahead, size = 0, 0
        for line in lines:
            if size + len(line) > _PIPE_AHEAD_BYTES:
                break
            ahead, size = ahead + 1, size + len(line)
        stdin = os.fdopen(write_fd, "wb")
        try:
            if ahead:
                stdin.write(b"".join(lines[:ahead]))
                stdin.flush()
            # Its own session: a signal to the agent's group must not reach it.
            self._proc = subprocess.Popen(
                argv, stdin=read_fd, stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                cwd="/", env={"PATH": os.environ.get("PATH") or os.defpath, "LC_ALL": "C"},
            )
        except BaseException:
            stdin.close()
            raise
        finally:
            os.close(read_fd)
        self._stdin = stdin
        for line in lines[ahead:]:
            self._write(line)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def up(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def check(self) -> bool:
        """True when the watchdog is alive; otherwise log, count and restart it (re-registering every group)."""
        if not self._started or self._stopped or self.up:
            return True
        proc, self._proc = self._proc, None
        self.failures += 1
        status = proc.poll() if proc is not None else None
        self._close_stdin()
        log.error("reaper watchdog%s died (status %s): CLIs would outlive a crash of the agent; restarting it "
                  "with %d live group(s)", f" {proc.pid}" if proc else "", status, len(self._groups))
        try:
            self._spawn()  # with every live group
        except OSError as exc:
            log.error("cannot restart the reaper watchdog: %s", exc)
            return False
        return self.up

    def _close_stdin(self) -> None:
        stdin, self._stdin = self._stdin, None
        if stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                stdin.close()

    def _write(self, line: bytes) -> bool:
        if self._stdin is None:
            return False
        try:
            self._stdin.write(line)
            self._stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            return False
        return True

    @staticmethod
    def _line(pgid: int, cgroup: str | None) -> bytes:
        return b"+%d %s\n" % (pgid, os.fsencode(cgroup)) if cgroup else b"+%d\n" % pgid

    def _send(self, pgid: int, cgroup: str | None) -> bool:
        return self._write(self._line(pgid, cgroup))

    def new_cgroup(self) -> str | None:
        """A cgroup for the next run, or None (no cgroup tracking on this node)."""
        return self.cgroups.new_run() if self.cgroups is not None else None

    def track(self, pgid: int, cgroup: str | None = None) -> None:
        self._groups[pgid] = cgroup
        self.check()
        if not self._send(pgid, cgroup) and not self._stopped:
            self.check()  # died between the check and the write: restarted with this group too

    def untrack(self, pgid: int) -> None:
        """The run is over: kill what is left in its cgroup, remove it, and forget the group."""
        cgroup = self._groups.pop(pgid, None)
        if cgroup is not None and self.cgroups is not None:
            self.cgroups.kill_and_remove(cgroup)
        self._write(b"-%d\n" % pgid)

    async def kill_leftovers(self, pgid: int, grace: float) -> None:
        """Terminate what is left in the run's cgroup once its group is gone (processes that used setsid)."""
        cgroup = self._groups.get(pgid)
        if cgroup is not None:
            await terminate_cgroup(cgroup, grace)

    def stop(self) -> None:
        """Close the watchdog's pipe without waiting for it (no CLI exit waits on it): with no group
        left it exits at once; with groups left (runs that would not stop) it kills them on its own."""
        self._stopped = True
        proc, self._proc = self._proc, None
        self._close_stdin()
        if proc is not None and proc.poll() is None:
            _stopped_watchdogs.append(proc)  # reaped later: at the next start or stop, or at exit
        _reap_stopped()
        if self.cgroups is not None:
            self.cgroups.close()
            self.cgroups = None
