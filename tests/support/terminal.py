"""``asm`` on a pseudo-terminal for the tests: read its screen (escape sequences removed) and type into it."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from collections.abc import Callable, Iterator

__all__ = ["ANSI", "Terminal", "terminals"]

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
