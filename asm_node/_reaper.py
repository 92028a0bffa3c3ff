"""Watchdog process: kills the agent's CLI process groups if the agent dies.

The agent writes ``+PGID`` / ``-PGID`` lines to our stdin as it spawns and reaps
CLIs. When stdin reaches EOF (the agent exited, however it died, even by
SIGKILL) every group still registered gets SIGTERM, then SIGKILL. It ignores
SIGINT/SIGTERM so a Ctrl-C to the terminal's process group cannot kill it
before it has done its job; EOF is its only way out.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip()
        if len(line) < 2 or not line[1:].isdigit():
            continue
        pgid = int(line[1:])
        if line[:1] == b"+":
            groups.add(pgid)
        elif line[:1] == b"-":
            groups.discard(pgid)
    live = [g for g in groups if g > 1 and _alive(g)]
    for pgid in live:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 2.0
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = [g for g in live if _alive(g)]
    for pgid in live:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    main()
