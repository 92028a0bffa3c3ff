"""Process supervision for CLI runs: spawn, read, signal, reap.

* Every CLI runs in its own session and process group (``start_new_session``),
  so signals reach its whole tree; never ``preexec_fn`` (gRPC is threaded).
* stdout is read in large chunks and split into lines here (not ``readline``),
  with a cap: a longer line is dropped and reported, the stream re-syncs at the
  next newline, and the agent never buffers more than the cap.
* Termination escalates SIGINT -> SIGTERM -> SIGKILL on the group, waiting for
  the *group* to be gone (not just the leader), and the leader is always reaped.
* A :class:`Reaper` watchdog kills registered groups if the agent itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

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


async def leader_exited(proc: asyncio.subprocess.Process, interval: float = 0.05) -> int:
    """Return when the group leader has exited.

    ``Process.wait()`` also waits for the stdout/stderr pipes to close, which
    never happens while a leftover child of the CLI holds them; the returncode
    is set as soon as the leader is reaped, so watch that too.
    """
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


async def pump(stream: asyncio.StreamReader, reader: LineReader, stop: Callable[[], bool] | None = None) -> None:
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            reader.close()
            return
        reader.feed(chunk)
        if stop is not None and stop():
            return


async def spawn(
    argv: list[str], cwd: str, env: dict[str, str], stdin: bool
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        limit=1024 * 1024,
    )


class Reaper:
    """Client side of the :mod:`asm_node._reaper` watchdog."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Its own session: a signal to the agent's group must not reach it.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "asm_node._reaper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _write(self, line: bytes) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            log.warning("reaper watchdog is gone; CLI groups will not be cleaned up if the agent dies")
            self._proc = None

    def track(self, pgid: int) -> None:
        self._write(b"+%d\n" % pgid)

    def untrack(self, pgid: int) -> None:
        self._write(b"-%d\n" % pgid)

    def stop(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin:
                proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
