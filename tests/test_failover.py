"""Failover before node_lost (issue 10 item 5), with real node processes and SIGKILL.

A run sent right after its node died goes to the next node at once (library
Session and the controller service), the dead node is marked unhealthy and the
failed attempt is in ``metadata["attempts"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable

import pytest

from asm_controller import Event, LivenessConfig, RemoteNode, Session
from asm_controller.service import ControllerConfig, start_controller
from tests.support.faults import node_args
from tests.support.processes import NodeProcess
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow  # real node processes and failover bounds

# The default bound (8 s): the point is that nobody waits for it.
LIVE = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=0.5, node_lost_timeout_s=8.0)


def _failed_attempt_on(attempts: list[dict[str, object]], address: str) -> bool:
    return any(a.get("node") == address and "error" in a for a in attempts)


async def test_library_run_sent_after_its_node_died_moves_to_the_next(
    node_process: Callable[..., NodeProcess],
) -> None:
    a, b = node_process(*node_args()), node_process(*node_args())
    nodes = [RemoteNode(a.address, liveness=LIVE), RemoteNode(b.address, liveness=LIVE)]
    async with Session("shell", node=nodes) as s:
        warm = await s.query("echo warm")
        assert warm.ok and warm.metadata["node_address"] == a.address  # a is connected and preferred
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        moved = await s.query("echo moved")
        took = time.monotonic() - t0
        assert moved.ok, moved.error
        assert moved.metadata["node_address"] == b.address
        assert _failed_attempt_on(moved.metadata["attempts"], a.address), moved.metadata["attempts"]
        assert took < 4.0, f"failover took {took:.1f}s"  # far inside the 8 s node_lost bound
        assert s.health()[nodes[0].key]["status"] == "unhealthy"
        # The next run does not even start with a: it is cooling down.
        again = await s.query("echo again")
        assert again.ok and again.metadata["node_address"] == b.address


async def test_controller_run_sent_after_its_node_died_moves_to_the_next(
    node_process: Callable[..., NodeProcess],
) -> None:
    a, b = node_process(*node_args()), node_process(*node_args())
    # priority: the run after the kill is sent to the dead node first (least_loaded may not pick it).
    ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[a.address, b.address], liveness=LIVE,
                                                  strategy="priority"))
    try:
        async with Session("shell", node=RemoteNode(f"127.0.0.1:{ctl.port}")) as client:
            warm = client.stream("echo warm")
            assert [ev async for ev in warm]
            # The controller's own Result for the run (same run id): kill the node that took it.
            stamp = ctl.api.session.result(warm.run_id).metadata
            first_node, other = (a, b) if stamp["node_address"] == a.address else (b, a)
            assert stamp["node_address"] == first_node.address
            first_node.proc.send_signal(signal.SIGKILL)
            first_node.proc.wait()
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            stream = client.stream("echo moved")
            events: list[Event] = [ev async for ev in stream]
            took = time.monotonic() - t0
            result = stream.result
            assert result is not None and result.ok, result and result.error
            assert any(e.kind == "run_completed" for e in events)
            stamp = ctl.api.session.result(stream.run_id).metadata
            assert stamp["node_address"] == other.address
            assert _failed_attempt_on(stamp["attempts"], first_node.address), stamp["attempts"]
            assert took < 4.0, f"failover took {took:.1f}s"
        health = ctl.api.session.health()
        assert health[f"grpc://{first_node.address}"]["status"] == "unhealthy"
    finally:
        await ctl.stop()


class _BlackholeProxy(TcpProxy):
    """A TcpProxy that can swallow bytes (requests go out, nothing comes back) before a cut."""

    blackhole = False

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self.cut_active:
                data = await reader.read(65536)
                if not data:
                    break
                if self.blackhole:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()


async def test_start_run_sent_but_unanswered_is_retried_on_the_same_node_only(
    node_process: Callable[..., NodeProcess],
) -> None:
    a, b = node_process(*node_args()), node_process(*node_args())
    proxy = await _BlackholeProxy(a.port).start()
    try:
        nodes = [RemoteNode(proxy.address, liveness=LIVE), RemoteNode(b.address, liveness=LIVE)]
        async with Session("shell", node=nodes) as s:
            assert (await s.query("echo warm")).metadata["node_address"] == proxy.address
            proxy.blackhole = True  # the next StartRun leaves, but no answer comes back...

            async def break_it() -> None:
                await asyncio.sleep(0.5)
                proxy.cut()  # ...then the connection breaks: did it reach the node? We cannot know.
                proxy.blackhole = False
                proxy.restore()

            breaker = asyncio.create_task(break_it())
            result = await asyncio.wait_for(s.query("echo once", run_id="maybe-sent-1"), 30)
            await breaker
            # Never moved to b (it might have run twice): StartRun with the same run id went to a again.
            assert result.ok, result.error
            assert result.metadata["node_address"] == proxy.address
            assert result.text == "once\n"
            assert s.pool.get(nodes[1].key) is None  # b was never even contacted
    finally:
        await proxy.stop()


async def test_hung_node_start_run_is_never_moved_elsewhere(node_process: Callable[..., NodeProcess]) -> None:
    live = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=0.5, node_lost_timeout_s=3.0)
    a, b = node_process(*node_args()), node_process(*node_args())
    nodes = [RemoteNode(a.address, liveness=live), RemoteNode(b.address, liveness=live)]
    try:
        async with Session("shell", node=nodes) as s:
            assert (await s.query("echo warm")).metadata["node_address"] == a.address
            a.proc.send_signal(signal.SIGSTOP)  # StartRun is delivered to a's socket, never answered
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            result = await asyncio.wait_for(s.query("echo maybe"), 20)
            took = time.monotonic() - t0
            assert result.error is not None and result.error.kind == "node_lost", result.error
            assert took <= 3.0 + 1.5, f"node_lost after {took:.1f}s"
            assert s.pool.get(nodes[1].key) is None  # not started a second time on b
    finally:
        a.proc.send_signal(signal.SIGCONT)
