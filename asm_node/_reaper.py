"""Watchdog process: kills the agent's CLIs if the agent dies.

Started as ``python -I -S .../_reaper.py [NODE_CGROUP_DIR]`` with cwd ``/``: isolated mode, so
nothing in the agent's cwd or ``PYTHON*`` variables is imported, and no ``site`` (a venv's
``.pth`` hooks, such as an editable install's finder, cost ~10 ms and several MB and are not
needed). It imports only ``os`` and the builtin ``_signal``/``time``/``sys`` (not ``signal``: its
enums pull in ``enum``, ``functools``, ``re``...), so it starts in about the time of the bare
interpreter and stays under 10 MB RSS; it must keep working whatever is installed next to it.

Why a process at all, and not the kernel's help alone: ``PR_SET_PDEATHSIG`` needs ``preexec_fn``
(forbidden: gRPC is threaded) and signals only the direct child, not what the CLI started or what
left with ``setsid``; a child subreaper would make the *agent* the reaper of orphans, and it is
the agent that died; a pidfd dies with its owner. Only a separate process that outlives the
agent can act after a SIGKILL, and a pipe's EOF is how it learns of the death, with no polling.

The agent writes ``+PGID`` or ``+PGID CGROUP_DIR`` / ``-PGID`` lines to our stdin as it spawns and
reaps CLIs. When stdin reaches EOF (the agent exited, however it died, even by SIGKILL) every group
still registered, and every process in its run's cgroup (which also holds what left the group with
``setsid``), gets SIGTERM, then SIGKILL; the run cgroups and the node's cgroup directory are
removed. It ignores SIGINT/SIGTERM so a Ctrl-C to the terminal's process group cannot kill it before
it has done its job; EOF is its only way out. Nobody waits for it: the agent closes the pipe and
goes on (a clean stop has no groups left, so it exits at once).
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # not ``typing.TYPE_CHECKING``: importing typing costs ~7 ms (mypy knows the name)
if TYPE_CHECKING:
    import signal
else:
    try:  # the C module: ``signal`` itself would import enum (and with it functools, re, ...)
        import _signal as signal
    except ImportError:  # another interpreter
        import signal


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _populated(cgroup: str) -> bool:
    try:
        with open(os.path.join(cgroup, "cgroup.events")) as fh:
            return "populated 1" in fh.read()
    except OSError:
        return False


def _signal_cgroup(cgroup: str, sig: int) -> None:
    if sig == signal.SIGKILL:
        try:
            fd = os.open(os.path.join(cgroup, "cgroup.kill"), os.O_WRONLY)
            try:
                os.write(fd, b"1")
            finally:
                os.close(fd)
            return
        except OSError:
            pass
    try:
        with open(os.path.join(cgroup, "cgroup.procs")) as fh:
            pids = [int(x) for x in fh.read().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _kill(groups: list[int], cgroups: list[str], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for cgroup in cgroups:
        _signal_cgroup(cgroup, sig)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    node_cgroup = sys.argv[1] if len(sys.argv) > 1 else ""
    groups: dict[int, str] = {}
    for raw in sys.stdin.buffer:
        pgid_part, _, cgroup_part = raw.rstrip(b"\n").partition(b" ")
        if len(pgid_part) < 2 or not pgid_part[1:].isdigit():
            continue
        pgid = int(pgid_part[1:])
        if pgid_part[:1] == b"+":
            cgroup = os.fsdecode(cgroup_part)
            # Only a run cgroup of this node is ever killed.
            ok = node_cgroup and os.path.dirname(cgroup) == node_cgroup
            groups[pgid] = cgroup if ok else ""
        elif pgid_part[:1] == b"-":
            groups.pop(pgid, None)
    live = [g for g in groups if g > 1 and _alive(g)]
    cgroups = [c for c in groups.values() if c and _populated(c)]
    _kill(live, cgroups, signal.SIGTERM)
    deadline = time.monotonic() + 2.0
    while (live or cgroups) and time.monotonic() < deadline:
        time.sleep(0.05)
        live = [g for g in live if _alive(g)]
        cgroups = [c for c in cgroups if _populated(c)]
    _kill(live, cgroups, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while any(_populated(c) for c in groups.values() if c) and time.monotonic() < deadline:
        time.sleep(0.02)
    leftover: list[str] = []
    if node_cgroup:
        try:
            # Also run cgroups the agent had not registered yet (or was still removing): empty ones go.
            leftover = [os.path.join(node_cgroup, d) for d in os.listdir(node_cgroup) if d.startswith("run-")]
        except OSError:
            pass
    for cgroup in {*[c for c in groups.values() if c], *leftover}:
        try:
            os.rmdir(cgroup)
        except OSError:
            pass
    if node_cgroup:
        try:
            os.rmdir(node_cgroup)
        except OSError:
            pass


# The agent runs this file directly (asm_node.process.Reaper: ``python -I .../_reaper.py``), never
# imports it: this block is the watchdog's entry point.
if __name__ == "__main__":
    main()
