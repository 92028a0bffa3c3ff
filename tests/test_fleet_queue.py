"""The fleet queue with real processes: a controller (SQLite registry) in front of a node with one slot.

Runs submitted while the node is full wait instead of failing ``at_capacity``, start in priority
order (FIFO within a priority), end with a typed ``queue_timeout`` or ``user_cancelled`` when asked,
respect ``--max-queued``, and survive a ``kill -9`` of the controller.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asm_controller import RemoteNode
from asm_controller._client import GrpcNodeClient
from asm_wire import AsmError, pb
from tests.support.fleet import Followed, assert_once, counted_cli, executions, follow
from tests.support.processes import (
    PYTHON_BASENAME,
    ControllerProcess,
    NodeProcess,
    start_controller_process,
    wait_until,
)
from tests.test_controller_recovery import _metrics_port

pytestmark = pytest.mark.slow


@pytest.fixture
def controllers(tmp_path: Path) -> Iterator[Callable[..., ControllerProcess]]:
    started: list[ControllerProcess] = []

    def start(*args: str, listen: str = "127.0.0.1:0") -> ControllerProcess:
        ctl = start_controller_process(tmp_path, *args, listen=listen)
        started.append(ctl)
        return ctl

    yield start
    for ctl in started:
        ctl.stop()


def _req(run_id: str, command: str, **fields: int) -> pb.StartRunRequest:
    return pb.StartRunRequest(run_id=run_id, provider="shell", prompt=command, **fields)


async def _status(address: str, run_id: str) -> pb.RunInfo:
    client = GrpcNodeClient(RemoteNode(address))
    try:
        return await client.get_run(pb.GetRunRequest(run_id=run_id))
    finally:
        await client.close()


async def _wait_status(address: str, run_id: str, status: int, timeout: float = 20.0) -> pb.RunInfo:
    deadline = asyncio.get_running_loop().time() + timeout
    info = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            info = await _status(address, run_id)
            if info.status == status:
                return info
        except AsmError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached status {status}: {info}")


def _metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of the controller's /metrics (None when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == name or (want and head.startswith(name + "{") and want in head):
            return float(value)
    return None


async def _start_blocker(address: str, log: Path, gate: Path) -> asyncio.Task[Followed]:
    """Run "blocker" (it holds the node's one slot until ``gate`` exists, at most 60 s) and wait until it runs."""
    from tests.support.faults import py

    gated = py(f"import os, time\nwith open({str(log)!r}, 'a') as f:\n    f.write('blocker\\n')\n"
               f"deadline = time.monotonic() + 60\nwhile not os.path.exists({str(gate)!r}) and "
               "time.monotonic() < deadline:\n    time.sleep(0.02)")
    blocker = asyncio.create_task(follow([address], _req("blocker", gated)))
    await asyncio.to_thread(wait_until, lambda: executions(log)["blocker"] == 1, 15.0)
    return blocker


@pytest.fixture
def one_slot(node_process: Callable[..., NodeProcess]) -> NodeProcess:
    return node_process("--shell-allow", PYTHON_BASENAME, "--max-runs", "1")


async def test_queued_runs_start_in_priority_order_fifo_within_a_priority(
    one_slot: NodeProcess, controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    ctl = controllers("--node", one_slot.address, "--metrics-listen", "127.0.0.1:0")
    log = tmp_path / "executions.txt"
    blocker = asyncio.create_task(follow([ctl.address], _req("blocker", counted_cli(log, "blocker", 16, 0.15))))
    await asyncio.to_thread(wait_until, lambda: executions(log)["blocker"] == 1, 15.0)
    order = [("p0a", 0), ("p5a", 5), ("p0b", 0), ("p10", 10), ("p5b", 5)]
    followers = []
    for run_id, priority in order:
        followers.append(asyncio.create_task(
            follow([ctl.address], _req(run_id, counted_cli(log, run_id, 2, 0.05), priority=priority))))
        info = await _wait_status(ctl.address, run_id, pb.RUN_STATUS_QUEUED)
        assert info.priority == priority
    positions = {rid: (await _status(ctl.address, rid)).queue_position for rid, _ in order}
    assert positions == {"p10": 1, "p5a": 2, "p5b": 3, "p0a": 4, "p0b": 5}
    from tests.test_controller_recovery import asm

    listed = await asyncio.to_thread(asm, "runs", "--controller", ctl.address, "--status", "queued")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "queued #1" in rows["p10"] and "queued #5" in rows["p0b"], listed.stdout
    port = _metrics_port(ctl)
    assert await asyncio.to_thread(wait_until, lambda: _metric(port, "asm_controller_queue_depth") == 5.0, 10.0)
    assert (_metric(port, "asm_controller_queue_oldest_age_seconds") or 0.0) > 0.0
    done = await asyncio.gather(blocker, *followers)
    for f in done:
        assert_once(f)
        assert f.completed is not None and f.completed.run_completed.status == "completed", [
            (m.error.code, m.error.message) for m in f.events if m.kind == pb.EVENT_KIND_ERROR]
    started = log.read_text().split()
    assert started == ["blocker", "p10", "p5a", "p5b", "p0a", "p0b"]
    assert _metric(port, "asm_controller_queue_wait_seconds_count") == 5.0
    assert (_metric(port, "asm_controller_store_latency_seconds_count", op="queue_stats") or 0.0) >= 1.0


async def test_queue_timeout_ends_a_waiting_run_typed_and_it_never_runs(
    one_slot: NodeProcess, controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    ctl = controllers("--node", one_slot.address)
    log = tmp_path / "executions.txt"
    blocker = asyncio.create_task(follow([ctl.address], _req("blocker", counted_cli(log, "blocker", 20, 0.1))))
    await asyncio.to_thread(wait_until, lambda: executions(log)["blocker"] == 1, 15.0)
    late = await follow([ctl.address], _req("late", counted_cli(log, "late", 1, 0), queue_timeout_ms=400))
    assert (late.error_code, late.error_reason) == ("timeout", "queue_timeout"), late.events  # ASM's kind
    assert late.completed is not None and late.completed.run_completed.status == "failed"
    assert (await _status(ctl.address, "late")).status == pb.RUN_STATUS_FAILED
    from tests.test_controller_recovery import asm

    cli = await asyncio.to_thread(asm, "run", "--controller", ctl.address, "--provider", "shell", "--priority", "3",
                                  "--queue-timeout", "0.3", "--output", "jsonl", counted_cli(log, "cli-late", 1, 0))
    assert cli.returncode == 1, cli.stderr
    summary = json.loads(cli.stdout.splitlines()[-1])
    assert summary["error"]["kind"] == "timeout" and "fleet queue" in summary["error"]["message"], summary
    bad = await asyncio.to_thread(asm, "run", "--controller", ctl.address, "--provider", "shell", "--priority", "5000",
                                  "true")
    assert bad.returncode == 2 and "-1000 to 1000" in bad.stderr and "Traceback" not in bad.stderr
    assert_once(await blocker)
    assert executions(log)["late"] == 0


async def test_an_interrupted_queued_run_ends_user_cancelled_and_never_runs(
    one_slot: NodeProcess, controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    ctl = controllers("--node", one_slot.address)
    log = tmp_path / "executions.txt"
    blocker = asyncio.create_task(follow([ctl.address], _req("blocker", counted_cli(log, "blocker", 15, 0.1))))
    await asyncio.to_thread(wait_until, lambda: executions(log)["blocker"] == 1, 15.0)
    waiting = asyncio.create_task(follow([ctl.address], _req("waiting", counted_cli(log, "waiting", 1, 0))))
    await _wait_status(ctl.address, "waiting", pb.RUN_STATUS_QUEUED)
    client = GrpcNodeClient(RemoteNode(ctl.address))
    try:
        resp = await client.interrupt_run(pb.InterruptRunRequest(run_id="waiting"))
    finally:
        await client.close()
    assert resp.accepted
    cancelled = await waiting
    assert cancelled.error_code == "user_cancelled", cancelled.events
    assert cancelled.completed is not None and cancelled.completed.run_completed.status == "interrupted"
    assert_once(await blocker)
    await asyncio.sleep(0.5)  # the slot is free now: a cancelled run must still not start
    assert executions(log)["waiting"] == 0


async def test_max_queued_refuses_past_the_bound_with_queue_full(
    one_slot: NodeProcess, controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    ctl = controllers("--node", one_slot.address, "--max-queued", "1")
    log = tmp_path / "executions.txt"
    blocker = asyncio.create_task(follow([ctl.address], _req("blocker", counted_cli(log, "blocker", 10, 0.1))))
    await asyncio.to_thread(wait_until, lambda: executions(log)["blocker"] == 1, 15.0)
    first = asyncio.create_task(follow([ctl.address], _req("first", counted_cli(log, "first", 1, 0))))
    await _wait_status(ctl.address, "first", pb.RUN_STATUS_QUEUED)
    refused = await follow([ctl.address], _req("second", counted_cli(log, "second", 1, 0)))
    assert (refused.error_code, refused.error_reason) == ("queue_full", "queue_full"), refused.events
    assert_once(await blocker)
    assert_once(await first)
    assert executions(log) == {"blocker": 1, "first": 1}


async def test_without_a_queue_a_full_fleet_refuses_at_once(
    one_slot: NodeProcess, controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    ctl = controllers("--node", one_slot.address, "--max-queued", "0")
    log = tmp_path / "executions.txt"
    blocker = asyncio.create_task(follow([ctl.address], _req("blocker", counted_cli(log, "blocker", 10, 0.1))))
    await asyncio.to_thread(wait_until, lambda: executions(log)["blocker"] == 1, 15.0)
    refused = await follow([ctl.address], _req("other", counted_cli(log, "other", 1, 0)))
    assert refused.error_code in ("at_capacity", "connection_failed"), refused.events
    assert_once(await blocker)


async def test_queued_runs_survive_a_kill_9_of_the_controller(
    one_slot: NodeProcess, controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    from tests.test_controller_recovery import _free_port

    listen = f"127.0.0.1:{_free_port()}"
    state = f"sqlite:///{tmp_path / 'ctl' / 'state.sqlite3'}"
    ctl = controllers("--node", one_slot.address, "--state", state, listen=listen)
    log = tmp_path / "executions.txt"
    blocker = asyncio.create_task(follow([ctl.address], _req("blocker", counted_cli(log, "blocker", 30, 0.1))))
    await asyncio.to_thread(wait_until, lambda: executions(log)["blocker"] == 1, 15.0)
    waiting = []
    for run_id, priority in [("low", 0), ("high", 9), ("mid", 4)]:
        waiting.append(asyncio.create_task(
            follow([ctl.address], _req(run_id, counted_cli(log, run_id, 3, 0.05), priority=priority))))
        await _wait_status(ctl.address, run_id, pb.RUN_STATUS_QUEUED)
    ctl.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(ctl.proc.wait, 10)
    controllers("--node", one_slot.address, "--state", state, listen=listen)  # same address, same registry
    for f in await asyncio.gather(blocker, *waiting):
        assert_once(f)
        assert f.completed is not None and f.completed.run_completed.status == "completed", [
            (m.error.code, m.error.message) for m in f.events if m.kind == pb.EVENT_KIND_ERROR]
    assert log.read_text().split() == ["blocker", "high", "mid", "low"]


async def test_a_queued_run_with_env_cannot_be_started_by_the_next_controller(
    one_slot: NodeProcess, controllers: Callable[..., ControllerProcess], tmp_path: Path,
) -> None:
    """Env values are never stored (they may be secrets): a queued run that had some ends typed
    (env_unavailable) after a restart instead of starting without them."""
    from tests.test_controller_recovery import _free_port

    listen = f"127.0.0.1:{_free_port()}"
    state = f"sqlite:///{tmp_path / 'ctl' / 'state.sqlite3'}"
    ctl = controllers("--node", one_slot.address, "--state", state, listen=listen)
    log = tmp_path / "executions.txt"
    blocker = asyncio.create_task(follow([ctl.address], _req("blocker", counted_cli(log, "blocker", 20, 0.1))))
    await asyncio.to_thread(wait_until, lambda: executions(log)["blocker"] == 1, 15.0)
    req = _req("with-env", counted_cli(log, "with-env", 1, 0))
    req.env["API_KEY"] = "s3cret-value"
    waiting = asyncio.create_task(follow([ctl.address], req))
    await _wait_status(ctl.address, "with-env", pb.RUN_STATUS_QUEUED)
    db = Path(state.removeprefix("sqlite:///"))
    assert not [f for f in db.parent.iterdir() if b"s3cret-value" in f.read_bytes()]  # the file and its WAL
    ctl.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(ctl.proc.wait, 10)
    controllers("--node", one_slot.address, "--state", state, listen=listen)
    ended = await waiting
    assert (ended.error_code, ended.error_reason) == ("runtime", "env_unavailable"), ended.events
    assert "API_KEY" in ended.events[-2].error.message
    assert_once(await blocker)
    assert executions(log)["with-env"] == 0


async def test_a_slot_freed_by_a_run_ending_here_starts_the_next_queued_run_without_waiting_for_a_heartbeat(
    one_slot: NodeProcess, tmp_path: Path,
) -> None:
    """Heartbeats every 10 s, the last one saying the node is full: the queued run still starts as soon
    as the blocker ends (this controller saw it end there), not when the next load report says so."""
    from asm_controller import ControllerClient, LivenessConfig
    from asm_controller.service import ControllerConfig, start_controller

    ctl = await start_controller(ControllerConfig(
        listen="127.0.0.1:0", nodes=[one_slot.address], state="memory:",
        liveness=LivenessConfig(heartbeat_interval_s=10.0, heartbeat_timeout_s=5.0, node_lost_timeout_s=90.0)))
    try:
        address = f"127.0.0.1:{ctl.port}"
        log, gate = tmp_path / "executions.txt", tmp_path / "gate"
        blocker = await _start_blocker(address, log, gate)

        async def reported_active() -> int:
            async with ControllerClient(RemoteNode(address)) as client:
                return (await client.list_nodes()).nodes[0].active_runs

        for _ in range(300):  # until a heartbeat reports the node full (the next is ~10 s away then)
            if await reported_active() == 1:
                break
            await asyncio.sleep(0.1)
        assert await reported_active() == 1
        queued = asyncio.create_task(follow([address], _req("next", counted_cli(log, "next", 1, 0))))
        await _wait_status(address, "next", pb.RUN_STATUS_QUEUED)
        gate.touch()
        assert_once(await blocker)
        ended = asyncio.get_running_loop().time()
        assert_once(await asyncio.wait_for(queued, 40))
        assert asyncio.get_running_loop().time() - ended < 5.0, "it waited for the next heartbeat"
    finally:
        await ctl.stop()


async def test_a_queued_run_ended_in_the_store_meanwhile_ends_with_that_end_when_its_turn_comes(
    one_slot: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another replica interrupts a run queued here (a compare-and-set on its status in the store), and
    the slot frees before this replica's queue notices: placing it is refused (LeaseLost). Its follower
    gets the store's end, user_cancelled, not the refusal's text as a runtime failure; it never runs."""
    import asm_controller._fleetqueue as fleetqueue
    from asm_controller.service import ControllerConfig, start_controller

    monkeypatch.setattr(fleetqueue, "TICK_S", 60.0)  # the queue's own look at the store comes too late
    ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[one_slot.address],
                                                  state=f"sqlite:///{tmp_path / 'runs.db'}"))
    try:
        address = f"127.0.0.1:{ctl.port}"
        log, gate = tmp_path / "executions.txt", tmp_path / "gate"
        blocker = await _start_blocker(address, log, gate)
        queued = asyncio.create_task(follow([address], _req("next", counted_cli(log, "next", 1, 0))))
        await _wait_status(address, "next", pb.RUN_STATUS_QUEUED)
        rec = await ctl.api.store.get("next")
        assert rec is not None and rec.status == "queued"
        # What replica B does for a queued run it does not follow (FleetApi._interrupt_record).
        assert await ctl.api._interrupt_record(rec)
        gate.touch()
        assert_once(await blocker)
        cancelled = await asyncio.wait_for(queued, 40)
        assert_once(cancelled)
        assert cancelled.error_code == "user_cancelled", cancelled
        assert cancelled.completed is not None and cancelled.completed.run_completed.status == "interrupted"
        assert cancelled.errors == [], "the end comes on the same stream, without a re-attach"
        await asyncio.sleep(0.5)
        assert executions(log)["next"] == 0
    finally:
        await ctl.stop()
