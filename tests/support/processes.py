"""Real ``asm`` processes for the tests, as thin uses of :mod:`asm_node.testing`, and small waits."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from asm_node.testing import PYTHON_BASENAME, ServedProcess, serve_controller, serve_node
from asm_node.testing import test_config as node_config

__all__ = [
    "PYTHON_BASENAME", "ROOT", "ControllerProcess", "NodeProcess", "node_config", "pid_alive",
    "start_controller_process", "start_node_process", "wait_until",
]

ROOT = Path(__file__).resolve().parents[2]

#: A served ``asm node serve`` (address, port, epoch, log(), stop()).
NodeProcess = ServedProcess
#: A served ``asm controller serve``.
ControllerProcess = ServedProcess


def start_node_process(
    tmp_path: Path, *args: str, listen: str = "127.0.0.1:0", env: dict[str, str] | None = None,
    timeout: float = 20.0, inherit: bool = True, cwd: Path | None = None, python_flags: Sequence[str] = (),
) -> NodeProcess:
    """``asm node serve --listen LISTEN ARGS`` (port 0: a free one) in ``cwd`` (default ``tmp_path``),
    ready by handshake."""
    return serve_node(tmp_path, *args, listen=listen, env=env, timeout=timeout, inherit=inherit, cwd=cwd,
                      python_flags=python_flags)


def start_controller_process(tmp_path: Path, *args: str, listen: str = "127.0.0.1:0", timeout: float = 20.0,
                             env: dict[str, str] | None = None) -> ControllerProcess:
    """``asm controller serve --listen LISTEN ARGS``, ready by handshake."""
    return serve_controller(tmp_path, *args, listen=listen, env=env, timeout=timeout)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (and the process may vanish while we look).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def http_base(ctl: ServedProcess, timeout: float = 10.0) -> str:
    """``http://127.0.0.1:PORT`` of a controller served with ``--http-listen`` (the port from its ready line)."""
    import re

    found: list[str] = []

    def ready() -> bool:
        m = re.search(r"HTTP on port (\d+)", ctl.log())
        if m:
            found.append(m.group(1))
        return bool(m)

    assert wait_until(ready, timeout), f"no HTTP port in the controller's log: {ctl.log()[-2000:]}"
    return f"http://127.0.0.1:{found[-1]}"
