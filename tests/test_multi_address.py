"""One controller service at several addresses (``--controller A,B``, ``RemoteNode("a:1,b:2")``).

Real processes on 127.0.0.1: the client moves to the next address when one is refused or breaks, never
on a server's typed answer; a run followed through a controller that is ``kill -9``'d continues on another
controller on the same registry with every event exactly once, and the CLI ran once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asm_controller import ControllerClient, GrpcNodeClient, RemoteNode
from asm_node.testing import free_port, wait_serving
from asm_wire import AsmError, ConfigError, pb
from tests.support.faults import py
from tests.support.processes import PYTHON_BASENAME, ROOT, ControllerProcess, NodeProcess, start_controller_process

pytestmark = pytest.mark.slow  # real controller and node processes, killed and restarted

ASM = [sys.executable, "-m", "asm_cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "ASM_TOKEN" and not k.startswith("ASM_NODE_")}


def asm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ASM, *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(ROOT))


@pytest.fixture
def controllers(tmp_path: Path) -> Iterator[Callable[..., ControllerProcess]]:
    started: list[ControllerProcess] = []

    def start(*args: str, listen: str = "127.0.0.1:0") -> ControllerProcess:
        ctl = start_controller_process(tmp_path, *args, listen=listen, env=_env())
        started.append(ctl)
        return ctl

    yield start
    for ctl in started:
        ctl.stop()


def _dead() -> str:
    """An address with nothing listening (connection refused)."""
    return f"127.0.0.1:{free_port()}"


def counted_ticker(pids: Path, n: int, interval: float) -> str:
    """A CLI that appends its pid to ``pids`` (every execution leaves a line), then prints n numbered lines."""
    return py(f"import os, time\nwith open({str(pids)!r}, 'a') as f:\n    f.write(str(os.getpid()) + '\\n')\n"
              f"for i in range({n}):\n    print(i, flush=True)\n    time.sleep({interval})")


def _read_until(proc: subprocess.Popen[str], pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    out: list[dict[str, Any]] = []
    for _ in range(1000):
        line = proc.stdout.readline()
        assert line, f"client ended early: {proc.stderr.read() if proc.stderr else ''}"
        out.append(json.loads(line))
        if pred(out[-1]):
            return out
    raise AssertionError("condition never met")


# -- the library target ----------------------------------------------------------------------------


def test_remote_node_takes_a_comma_separated_list_and_validates_each() -> None:
    node = RemoteNode("127.0.0.1:1, [::1]:2")
    assert node.addresses == ("127.0.0.1:1", "[::1]:2")
    assert RemoteNode("127.0.0.1:1").addresses == ("127.0.0.1:1",)
    with pytest.raises(ConfigError, match="empty element"):
        RemoteNode("127.0.0.1:1,,127.0.0.1:2")
    with pytest.raises(ConfigError, match="invalid address"):
        RemoteNode("127.0.0.1:1,127.0.0.1:99999")


async def test_library_client_moves_past_a_dead_address_and_stays_on_the_live_one(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
) -> None:
    a = node_process()
    ctl = controllers("--node", a.address)
    async with ControllerClient(RemoteNode(f"{_dead()},{ctl.address}")) as client:
        resp = await client.list_nodes()
        assert [n.address for n in resp.nodes] == [a.address]
        assert client._endpoints.current == 1  # the next calls go straight to the live one
        await client.list_nodes()
    node_client = GrpcNodeClient(RemoteNode(f"{_dead()},{_dead()},{ctl.address}"))
    try:
        info = await node_client.handshake(pb.HandshakeRequest())
        assert info.node_id.startswith("controller@")
    finally:
        await node_client.close()


async def test_a_connected_client_moves_on_when_its_controller_is_killed(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
) -> None:
    a = node_process()
    first = controllers("--node", a.address)
    second = controllers("--node", a.address)
    async with ControllerClient(RemoteNode(f"{first.address},{second.address}")) as client:
        await client.list_nodes()
        assert client._endpoints.current == 0
        first.stop(signal.SIGKILL)
        resp = await client.list_nodes()  # no error: the call goes to the next address
        assert [n.address for n in resp.nodes] == [a.address]
        assert client._endpoints.current == 1


async def test_an_address_that_never_connects_is_left_after_the_connect_timeout(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
) -> None:
    """A socket that accepts TCP but never speaks HTTP/2: the channel stays connecting (a deadline on connect)."""
    a = node_process()
    ctl = controllers("--node", a.address)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        mute = f"127.0.0.1:{silent.getsockname()[1]}"
        async with ControllerClient(RemoteNode(f"{mute},{ctl.address}", connect_timeout_s=1.0)) as client:
            t0 = time.monotonic()
            resp = await client.list_nodes()
            assert [n.address for n in resp.nodes] == [a.address]
            assert 0.8 <= time.monotonic() - t0 < 10
            assert client._endpoints.current == 1
            t0 = time.monotonic()
            await client.list_nodes()
            assert time.monotonic() - t0 < 0.8, "the silent address was tried again"


async def test_every_address_dead_fails_as_one_address_does() -> None:
    one, two = _dead(), _dead()
    client = GrpcNodeClient(RemoteNode(f"{one},{two}", connect_timeout_s=1.0))
    try:
        with pytest.raises(AsmError) as info:
            await client.handshake(pb.HandshakeRequest(), timeout=2.0)
        assert info.value.kind == "connection_failed"
    finally:
        await client.close()


async def test_a_typed_answer_is_not_retried_on_the_next_address(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
) -> None:
    """The first controller answers not_found: the second (which would answer too) is never asked."""
    a = node_process()
    first = controllers("--node", a.address)
    second = controllers("--node", a.address)
    client = GrpcNodeClient(RemoteNode(f"{first.address},{second.address}"))
    try:
        with pytest.raises(AsmError) as info:
            await client.get_run(pb.GetRunRequest(run_id="never-was"))
        assert info.value.kind in ("unknown", "not_found")
        assert client._endpoints.current == 0
        assert set(client._endpoints._channels) == {0}, "the second address was contacted"
    finally:
        await client.close()


# -- the CLI ---------------------------------------------------------------------------------------


def test_nodes_runs_and_run_through_dead_then_live(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
) -> None:
    a = node_process("--shell-allow", PYTHON_BASENAME)
    ctl = controllers("--node", a.address)
    target = f"{_dead()},{ctl.address}"
    nodes = asm("nodes", "--controller", target, "--output", "json")
    assert nodes.returncode == 0, nodes.stderr
    assert [row["node"] for row in json.loads(nodes.stdout)] == [a.address]
    run = asm("run", "--controller", target, "--provider", "shell", "--output", "jsonl", "--run-id", "two-addr-1",
              py("print('hello from a replica')"))
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.splitlines()[-1])
    assert summary["status"] == "completed" and "hello from a replica" in summary["text"]
    runs = asm("runs", "--controller", target, "--output", "json")
    assert runs.returncode == 0, runs.stderr
    assert [r["run_id"] for r in json.loads(runs.stdout)] == ["two-addr-1"]
    attach = asm("attach", "two-addr-1", "--controller", target, "--output", "jsonl")
    assert attach.returncode == 0, attach.stderr
    assert json.loads(attach.stdout.splitlines()[-1])["status"] == "completed"


def test_attach_unknown_run_is_not_found_from_the_first_address_not_retried_on_the_second(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
) -> None:
    """The first answers not_found (exit 5); the second address is one with nothing listening, so a
    retry there would turn the answer into 'unreachable' (exit 3)."""
    a = node_process()
    ctl = controllers("--node", a.address)
    attach = asm("attach", "never-was", "--controller", f"{ctl.address},{_dead()}")
    assert attach.returncode == 5, attach.stderr
    assert "never-was" in attach.stderr and "Traceback" not in attach.stderr


def test_every_address_dead_is_exit_3() -> None:
    nodes = asm("nodes", "--controller", f"{_dead()},{_dead()}", "--connect-timeout", "2")
    assert nodes.returncode == 3, nodes.stderr
    assert "Traceback" not in nodes.stderr


@pytest.mark.parametrize("target", ["127.0.0.1:1,,127.0.0.1:2", "127.0.0.1:1,", ",127.0.0.1:1",
                                    "127.0.0.1:1,127.0.0.1:99999", "127.0.0.1:1,nonsense"])
@pytest.mark.parametrize("command", [["nodes"], ["runs"], ["attach", "r1"], ["run", "--provider", "shell", "x"]])
def test_a_bad_address_list_is_a_usage_error(target: str, command: list[str]) -> None:
    out = asm(*command, "--controller", target)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("asm: error: --controller") and "Traceback" not in out.stderr
    assert "empty address" in out.stderr or "invalid address" in out.stderr


def test_several_addresses_for_a_node_stay_an_error() -> None:
    """``--node`` names one node per flag (repeat it for several nodes): a comma list is refused as before."""
    out = asm("nodes", "--node", "127.0.0.1:1,127.0.0.1:2")
    assert out.returncode == 2 and "bad node attribute '127.0.0.1:2'" in out.stderr, out.stderr


# -- following a run across controllers -----------------------------------------------------------

LINES = 60


def _follow_across_a_kill(node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
                          tmp_path: Path, second_state: str | None) -> tuple[subprocess.Popen[str], list[dict[str, Any]],
                                                                               str, str, Path]:
    a = node_process("--shell-allow", PYTHON_BASENAME)
    state = f"sqlite:///{tmp_path / 'ctl-state' / 'controller.sqlite3'}"
    first = controllers("--node", a.address, "--state", state)
    b_address = _dead()  # the second controller's address: nothing there until the first has died
    pids = tmp_path / "executions.txt"
    client = subprocess.Popen([*ASM, "run", "--controller", f"{first.address},{b_address}", "--provider", "shell",
                               "--output", "jsonl", "--run-id", "across-1", counted_ticker(pids, LINES, 0.1)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(ROOT))
    seen = _read_until(client, lambda e: e["kind"] == "assistant_delta" and e["payload"]["content"] == "5\n")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(20)
    controllers("--node", a.address, "--state", second_state or state, listen=b_address)
    return client, seen, first.address, b_address, pids


def test_a_followed_run_continues_on_the_next_controller_with_every_event_once(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    client, seen, _, b_address, pids = _follow_across_a_kill(node_process, controllers, tmp_path, None)
    try:
        out, err = client.communicate(timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    lines = seen + [json.loads(line) for line in out.splitlines()]
    summary = lines[-1]
    assert summary["kind"] == "result_summary" and summary["status"] == "completed", summary
    events = lines[:-1]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "an event lost or repeated"
    deltas = [e["payload"]["content"] for e in events if e["kind"] == "assistant_delta"]
    assert deltas == [f"{i}\n" for i in range(LINES)]
    assert len(pids.read_text().split()) == 1, "the prompt was executed more than once"
    # The second controller has the run (the same registry): runs lists it as completed.
    runs = asm("runs", "--controller", b_address, "--output", "json")
    (row,) = [r for r in json.loads(runs.stdout) if r["run_id"] == "across-1"]
    assert row["status"] == "completed"


def test_a_controller_on_another_registry_is_not_the_same_service(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    """The next address answers with another boot epoch (another store): the run is lost there, as when
    a controller at one address comes back with a fresh registry -- never silently continued."""
    other = f"sqlite:///{tmp_path / 'other-state' / 'controller.sqlite3'}"
    client, _, _, _, _ = _follow_across_a_kill(node_process, controllers, tmp_path, other)
    try:
        out, err = client.communicate(timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 1, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1]["kind"] == "result_summary" and lines[-1]["status"] == "failed", lines[-1]
    (lost,) = [e for e in lines if e["kind"] == "error" and e["payload"]["code"] == "node_lost"]
    assert "restarted (epoch" in lost["payload"]["message"], lost


def test_one_dns_name_with_several_records_follows_the_run_to_the_live_one(
    node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    """gRPC resolves ``localhost`` to [::1] and 127.0.0.1: controller A on 127.0.0.1:P, then (A dead) B
    on [::1]:P on the same registry. A client given the one name ``localhost:P`` follows its run across."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    a = node_process("--shell-allow", PYTHON_BASENAME)
    state = f"sqlite:///{tmp_path / 'ctl-state' / 'controller.sqlite3'}"
    first = controllers("--node", a.address, "--state", state)
    port = first.port
    pids = tmp_path / "executions.txt"
    client = subprocess.Popen([*ASM, "run", "--controller", f"localhost:{port}", "--provider", "shell",
                               "--output", "jsonl", "--run-id", "dns-1", counted_ticker(pids, LINES, 0.1)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(ROOT))
    second: subprocess.Popen[bytes] | None = None
    try:
        seen = _read_until(client, lambda e: e["kind"] == "assistant_delta" and e["payload"]["content"] == "5\n")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(20)
        with open(tmp_path / "second.log", "wb") as log:
            second = subprocess.Popen([*ASM, "controller", "serve", "--listen", f"[::1]:{port}", "--node", a.address,
                                       "--state", state], stdout=subprocess.DEVNULL, stderr=log, env=_env(),
                                      cwd=str(tmp_path))
        wait_serving(f"[::1]:{port}", alive=lambda: second is not None and second.poll() is None)
        out, err = client.communicate(timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if second is not None and second.poll() is None:
            second.terminate()
            second.wait(15)
    assert client.returncode == 0, err
    lines = seen + [json.loads(line) for line in out.splitlines()]
    assert lines[-1]["kind"] == "result_summary" and lines[-1]["status"] == "completed", lines[-1]
    events = lines[:-1]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "an event lost or repeated"
    assert [e["payload"]["content"] for e in events if e["kind"] == "assistant_delta"] == [f"{i}\n" for i in range(LINES)]
    assert len(pids.read_text().split()) == 1, "the prompt was executed more than once"
