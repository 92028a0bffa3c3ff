"""``asm`` on a pseudo-terminal for the tests (read its screen, escape sequences removed, and type into it), and
the JSON lines of a piped one."""

from __future__ import annotations

import json
import os
import queue
import re
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

__all__ = ["ANSI", "Lines", "Terminal", "terminals"]

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """``asm`` on a pseudo-terminal (stdin, stdout and stderr), read and typed into like a person would."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
        self.master, slave = os.openpty()
        os.set_blocking(self.master, False)
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     start_new_session=True)
        os.close(slave)
        self.raw = b""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def _pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self.master, 65536)
            except OSError:  # EIO: the other side closed
                time.sleep(timeout)

    def expect(self, pattern: str, timeout: float = 30.0, start: int = 0) -> int:
        """Wait until ``pattern`` (a regex) is in the screen text after ``start``; its end offset."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text[start:])
            if m:
                return start + m.end()
            assert time.monotonic() < deadline, f"{pattern!r} not seen; screen:\n{self.text[-3000:]}"
            self._pump(0.1)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"asm did not exit; screen:\n{self.text[-3000:]}"
            self._pump(0.1)
        for _ in range(5):
            self._pump(0.05)
        os.close(self.master)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()



def terminals() -> Iterator[Callable[[list[str], dict[str, str], str], Terminal]]:
    """A factory of :class:`Terminal` (for a fixture); every one still running is killed at the end."""
    started: list[Terminal] = []

    def start(argv: list[str], env: dict[str, str], cwd: str) -> Terminal:
        t = Terminal(argv, env, cwd)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


class Lines:
    """The lines of a child's pipe, read by a thread (``select`` on a buffered pipe misses lines already read
    into the buffer), each with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put("")  # EOF

    def next(self, timeout: float) -> str:
        """The next line ('' at EOF); AssertionError when none comes within ``timeout``."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout:g}s") from None

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
              seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """JSON lines until one matches ``predicate`` (returned); every one read is appended to ``seen``."""
        deadline = time.monotonic() + timeout
        got: list[dict[str, Any]] = [] if seen is None else seen
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"not seen in time; events: {got}"
            line = self.next(left)
            assert line, f"the stream ended first; events: {got}"
            ev: dict[str, Any] = json.loads(line)
            got.append(ev)
            if predicate(ev):
                return ev

    def rest(self, timeout: float = 30.0) -> list[str]:
        """Every remaining line, to EOF."""
        out = []
        while line := self.next(timeout):
            out.append(line)
        return out
