"""A real network link between controller and node: a network namespace joined by a veth pair.

Root only (it creates the namespace and the link itself; nothing else is
touched); skipped cleanly otherwise. The link is cut with ``ip link set down``,
which loses packets silently, unlike the proxy tests' resets.

**Rule for every test or benchmark that creates or cuts links:** no packet may
ever leave the machine. Taking the host end of a veth down removes its
connected route, and packets to the node's address would then follow the
default route off the machine. So before any link exists, a ``blackhole``
route covering the whole test subnet (a /24 around the veth's /30) is
installed: while the link is up the more specific connected /30 wins; once it
is cut, the blackhole catches everything. Every cut is checked (``ip route
get`` must answer blackhole, never a gateway) and the route is removed at
teardown, after the link.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from asm_controller import LivenessConfig, RemoteNode, Session
from asm_node.testing import wait_serving
from tests.support.faults import assert_exactly_once, ticker
from tests.support.processes import PYTHON_BASENAME, NodeProcess

pytestmark = pytest.mark.netns

HOST_IP, NODE_IP = "10.213.7.1", "10.213.7.2"
#: Covers the veth's /30: what the kernel uses once the link is down (never the default route).
GUARD_SUBNET = "10.213.7.0/24"
LIVE = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0, node_lost_timeout_s=4.0)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def route_to_node() -> str:
    """How the host would send a packet to the node right now (``ip route get``)."""
    probe = _ip("route", "get", NODE_IP, check=False)
    return probe.stdout + probe.stderr


def cut_link(host_if: str) -> None:
    """Take the host end down and prove that packets to the node now go nowhere."""
    _ip("link", "set", host_if, "down")
    route = route_to_node()
    # With the link down only the blackhole covers NODE_IP: a "via" here would be the default route.
    assert " via " not in route and ("blackhole" in route or "No route" in route or "Invalid" in route), route


def install_guard() -> None:
    # Replace, not add: a guard left by an interrupted earlier run is fine to reuse.
    _ip("route", "replace", "blackhole", GUARD_SUBNET)


@pytest.fixture
def netns_node(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, node_if = f"asmt{tag}", f"asmh{tag}", f"asmn{tag}"
    probe = _ip("netns", "add", ns, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    node: NodeProcess | None = None
    try:
        install_guard()  # before any link exists, so no cut can ever fall back to the default route
        _ip("link", "add", host_if, "type", "veth", "peer", "name", node_if)
        _ip("link", "set", node_if, "netns", ns)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{NODE_IP}/30", "dev", node_if)
        _ip("-n", ns, "link", "set", node_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        token = "netns-token-0123456789"  # >= 16 bytes: the node listens on a non-loopback address
        (tmp_path / "tok").write_text(token)
        log = tmp_path / "node.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "asm_cli", "node", "serve", "--listen",
                 f"{NODE_IP}:7070", "--token-file", str(tmp_path / "tok"), "--shell-allow", PYTHON_BASENAME,
                 "--detach-grace", "3"], stdout=subprocess.DEVNULL, stderr=f, cwd=str(tmp_path))
        node = NodeProcess(proc, 7070, log)
        try:  # ready when it answers a handshake across the veth pair
            node.info = wait_serving(f"{NODE_IP}:7070", token=token, timeout=20, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError):
            pytest.fail(f"node in namespace did not start: {log.read_text()}")
        yield f"{NODE_IP}:7070", token, host_if
    finally:
        if node is not None:
            node.stop()
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)
        _ip("route", "del", "blackhole", GUARD_SUBNET, check=False)


async def test_link_cut_and_restored_within_bound(netns_node: tuple[str, str, str]) -> None:
    address, token, host_if = netns_node
    async with Session("shell", node=RemoteNode(address, token=token, liveness=LIVE)) as s:
        stream = s.stream(ticker(40, 0.05))
        events = []
        async for ev in stream:
            events.append(ev)
            if ev.kind == "assistant_delta" and ev.payload["content"] == "10\n":
                cut_link(host_if)
                await asyncio.sleep(1.5)
                _ip("link", "set", host_if, "up")
        result = stream.result
    assert result is not None and result.ok, result and result.error
    assert_exactly_once(events, 40)


async def test_link_cut_past_bound_is_node_lost(netns_node: tuple[str, str, str]) -> None:
    address, token, host_if = netns_node
    async with Session("shell", node=RemoteNode(address, token=token, liveness=LIVE)) as s:
        stream = s.stream("sleep 30")
        await stream.__anext__()
        t0 = time.monotonic()
        cut_link(host_if)
        try:
            rest = [ev async for ev in stream]
        finally:
            _ip("link", "set", host_if, "up")
        assert rest[-1].kind == "run_completed"
        assert stream.result is not None and stream.result.error is not None
        assert stream.result.error.kind == "node_lost"
        assert time.monotonic() - t0 <= LIVE.node_lost_timeout_s + 3


def test_no_link_is_cut_outside_the_guarded_helper() -> None:
    """Every ``ip link set ... down`` in tests and scripts goes through cut_link (which checks the route)."""
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in [*root.glob("tests/*.py"), *root.glob("scripts/*.py"), *root.glob("scripts/*.sh")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if '"down"' in line and '"link"' in line and "def cut_link" not in line:
                offenders.append(f"{path.name}:{n}")
    assert offenders == [f"test_netns.py:{_cut_line()}"], offenders


def _cut_line() -> int:
    lines = Path(__file__).read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("def cut_link"))
    return next(i for i in range(start, len(lines)) if '"down"' in lines[i]) + 1
