"""Real node agent processes: no CLI survives the agent, whatever way the agent ends."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import pytest

from asm_controller import RemoteNode, Session
from tests.support.processes import NodeProcess, pid_alive, wait_until

pytestmark = pytest.mark.slow  # node agents killed and their CLIs waited out


async def _start_sleep(node: NodeProcess) -> tuple[Session, object, int]:
    session = Session("shell", node=RemoteNode(node.address))
    stream = session.stream("sleep 60")
    started = await stream.__anext__()
    assert started.kind == "run_started"
    return session, stream, started.payload["pid"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
async def test_no_cli_left_behind_when_the_agent_ends(node_process: Callable[..., NodeProcess], sig: int) -> None:
    node = node_process()
    session, stream, pid = await _start_sleep(node)
    assert pid_alive(pid)
    node.proc.send_signal(sig)
    assert await asyncio.to_thread(wait_until, lambda: not pid_alive(pid), 10.0), f"CLI {pid} outlived the agent"
    await asyncio.to_thread(node.proc.wait, 15)
    # The controller's stream ends too, with a typed error, instead of hanging.
    events = await asyncio.wait_for(_drain(stream), 15)
    assert events[-1].kind == "run_completed"
    result = stream.result  # type: ignore[attr-defined]
    assert result is not None and not result.ok
    await session.stop()


async def _drain(stream: object) -> list[object]:
    return [ev async for ev in stream]  # type: ignore[attr-defined]


async def test_graceful_agent_stop_interrupts_runs(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    session, stream, pid = await _start_sleep(node)
    node.proc.send_signal(signal.SIGTERM)
    events = await asyncio.wait_for(_drain(stream), 15)
    kinds = [e.kind for e in events]  # type: ignore[attr-defined]
    # The agent interrupted the run and told us before it went away.
    assert kinds[-2:] == ["error", "run_completed"], kinds
    assert stream.result.error.kind == "node_shutdown"  # type: ignore[attr-defined]  # not the user's Ctrl-C
    assert node.proc.wait(15) == 0
    assert not pid_alive(pid)
    await session.stop()
