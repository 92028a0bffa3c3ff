"""Drain for operators: ``asm node drain``/``undrain``, directly and through a controller.

Real ``asm node serve`` / ``asm controller serve`` processes on 127.0.0.1 and
the ``asm`` CLI as a subprocess. An undrain before the deadline lets the
running run complete and admits new ones; it is admin-only like Drain; ``asm
nodes`` shows a draining node as a state (exit 0), not as an error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from asm_wire import pb
from asm_wire.v1 import node_pb2_grpc
from tests.support.cli import ASM, jsonl
from tests.support.processes import ROOT, ControllerProcess, NodeProcess, start_controller_process

pytestmark = pytest.mark.slow  # node and controller processes, drain deadlines

ALICE = "alice-token-0123456789"
ROOT_TOKEN = "root-token-0123456789abc"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ASM_TOKEN" and not k.startswith("ASM_NODE_")}
    env.update(extra)
    return env


def asm(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ASM, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else _env(), cwd=str(ROOT))


def _start_run(address: str, command: str, *, controller: bool = False,
               env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    flag = "--controller" if controller else "--node"
    proc = subprocess.Popen([*ASM, "run", flag, address, "--provider", "shell", "--output", "jsonl", command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env=env if env is not None else _env())
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["kind"] == "run_started"
    return proc


def _summary(out: str) -> dict[str, Any]:
    summary = jsonl(out)[-1]
    assert summary["kind"] == "result_summary"
    return summary


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: ``asm controller serve --node ...`` processes (stopped by PID); returns the address."""
    procs: list[ControllerProcess] = []

    def start(*nodes: str) -> str:
        procs.append(start_controller_process(tmp_path, *(a for n in nodes for a in ("--node", n)), env=_env()))
        return procs[-1].address

    yield start
    for proc in procs:
        proc.stop()


def test_undrain_before_the_deadline_lets_the_run_complete(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    run = _start_run(node.address, "sleep 8")
    t0 = time.monotonic()
    drain = asm("node", "drain", "--node", node.address, "--deadline", "6", "--output", "json")
    assert drain.returncode == 0, drain.stderr
    assert json.loads(drain.stdout)[0]["state"] == "draining"
    refused = asm("run", "--node", node.address, "--provider", "shell", "echo no")
    assert refused.returncode == 3 and "draining" in refused.stderr
    undrain = asm("node", "undrain", "--node", node.address, "--output", "json")
    assert undrain.returncode == 0, undrain.stderr
    (row,) = json.loads(undrain.stdout)
    assert row["state"] == "ready" and row["active_runs"] == 1 and row["deadline_unix_nano"] == 0
    assert time.monotonic() - t0 < 6, "undrained too late for this test (a slow machine)"
    out, err = run.communicate(timeout=30)  # runs past the old deadline (6 s): not interrupted
    assert run.returncode == 0, err
    assert _summary(out)["status"] == "completed"
    again = asm("run", "--node", node.address, "--provider", "shell", "echo admitted")
    assert again.returncode == 0 and "admitted" in again.stdout, again.stderr
    # Undrain of a ready node is a no-op, and a second drain works (the old drain task is gone).
    assert asm("node", "undrain", "--node", node.address).returncode == 0
    assert asm("node", "drain", "--node", node.address, "--deadline", "0").returncode == 0
    assert asm("node", "undrain", "--node", node.address).returncode == 0


def test_nodes_shows_a_draining_node_as_a_state(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    assert asm("node", "drain", "--node", node.address, "--deadline", "120").returncode == 0
    table = asm("nodes", "--node", node.address)
    assert table.returncode == 0, (table.stdout, table.stderr)
    assert re.search(r"draining \(deadline in (1[01]\d|120)s\)", table.stdout), table.stdout
    assert "error" not in table.stdout
    as_json = asm("nodes", "--node", node.address, "--output", "json")
    assert as_json.returncode == 0, as_json.stderr
    (row,) = json.loads(as_json.stdout)
    assert row["state"] == "draining" and row["epoch"] == node.epoch and row["drain_deadline_unix_nano"] > 0
    # Asked whether it would take a run now: no (a preflight failure, exit 3), still with its state.
    pre = asm("nodes", "--node", node.address, "--output", "json", "--provider", "shell")
    assert pre.returncode == 3, pre.stderr
    (row,) = json.loads(pre.stdout)
    assert row["state"] == "draining" and row["preflight"]["error"]["reason"] == "not_ready"


def test_undrain_needs_an_admin(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nroot:{ROOT_TOKEN}:admin\n")
    node = node_process("--tokens-file", str(tokens))
    assert asm("node", "drain", "--node", node.address, "--deadline", "60",
               env=_env(ASM_TOKEN=ROOT_TOKEN)).returncode == 0
    denied = asm("node", "undrain", "--node", node.address, env=_env(ASM_TOKEN=ALICE))
    assert denied.returncode == 1, denied.stderr
    assert "asm: error:" in denied.stderr and "admin" in denied.stderr and "Traceback" not in denied.stderr

    async def raw_undrain(token: str) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            try:
                await stub.Undrain(pb.UndrainRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    import asyncio

    assert asyncio.run(raw_undrain(ALICE)) == grpc.StatusCode.PERMISSION_DENIED
    still = asm("nodes", "--node", node.address, "--output", "json", env=_env(ASM_TOKEN=ROOT_TOKEN))
    assert json.loads(still.stdout)[0]["state"] == "draining"  # alice changed nothing
    assert asyncio.run(raw_undrain(ROOT_TOKEN)) == grpc.StatusCode.OK
    ready = asm("nodes", "--node", node.address, "--output", "json", env=_env(ASM_TOKEN=ROOT_TOKEN))
    assert json.loads(ready.stdout)[0]["state"] == "ready"


def test_drain_and_undrain_through_the_controller(node_process: Callable[..., NodeProcess],
                                                  controller: Callable[..., str]) -> None:
    node = node_process()
    ctl = controller(node.address)
    assert asm("run", "--controller", ctl, "--provider", "shell", "echo before").returncode == 0
    run = _start_run(ctl, "sleep 8", controller=True)
    t0 = time.monotonic()
    drain = asm("node", "drain", "--controller", ctl, "--node", node.address, "--deadline", "6",
                "--output", "json")
    assert drain.returncode == 0, drain.stderr
    assert json.loads(drain.stdout)[0]["state"] == "draining"
    nodes = asm("nodes", "--controller", ctl, "--output", "json")
    assert nodes.returncode == 0, nodes.stderr
    (row,) = json.loads(nodes.stdout)
    assert row["state"] == "draining" and row["drain_deadline_unix_nano"] > 0
    refused = asm("run", "--controller", ctl, "--provider", "shell", "echo no")
    assert refused.returncode != 0 and "draining" in refused.stderr, refused.stderr
    undrain = asm("node", "undrain", "--controller", ctl, "--node", node.address)
    assert undrain.returncode == 0 and "ready" in undrain.stdout, undrain.stderr
    assert time.monotonic() - t0 < 6, "undrained too late for this test (a slow machine)"
    out, err = run.communicate(timeout=30)
    assert run.returncode == 0, err
    assert _summary(out)["status"] == "completed"
    after = asm("run", "--controller", ctl, "--provider", "shell", "echo after")
    assert after.returncode == 0 and "after" in after.stdout, after.stderr
    unknown = asm("node", "undrain", "--controller", ctl, "--node", "127.0.0.1:1")
    # An address the controller does not hold is NodeNotFound (kind not_found): the CLI's "no such id" exit.
    assert unknown.returncode == 5 and "not a node of this controller" in unknown.stderr


def test_drain_deadline_through_the_controller_is_node_draining(node_process: Callable[..., NodeProcess],
                                                                controller: Callable[..., str]) -> None:
    node = node_process()
    ctl = controller(node.address)
    run = _start_run(ctl, "sleep 30", controller=True)
    assert asm("node", "drain", "--controller", ctl, "--node", node.address, "--deadline", "0.5").returncode == 0
    out, err = run.communicate(timeout=30)
    assert run.returncode == 4, err
    summary = _summary(out)
    assert summary["status"] == "interrupted" and summary["error"]["kind"] == "node_draining"


def test_controller_meeting_a_draining_node_shows_its_state(node_process: Callable[..., NodeProcess],
                                                            controller: Callable[..., str]) -> None:
    node = node_process()
    assert asm("node", "drain", "--node", node.address, "--deadline", "60").returncode == 0
    ctl = controller(node.address)  # first contact: the node is already draining
    nodes = asm("nodes", "--controller", ctl, "--output", "json")
    assert nodes.returncode == 0, nodes.stderr
    assert json.loads(nodes.stdout)[0]["state"] == "draining"
    again = asm("node", "drain", "--controller", ctl, "--node", node.address, "--output", "json")
    assert again.returncode == 0 and json.loads(again.stdout)[0]["state"] == "draining", again.stderr
    assert asm("node", "undrain", "--controller", ctl, "--node", node.address).returncode == 0
    ok = asm("run", "--controller", ctl, "--provider", "shell", "echo back")
    assert ok.returncode == 0 and "back" in ok.stdout, ok.stderr
