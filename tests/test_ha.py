"""Two controller replicas on one real PostgreSQL in front of three real nodes.

* ``kill -9`` of the replica that owns 20 in-flight and 50 queued runs: the other takes every lease
  over once it expires, re-attaches the runs on their nodes from the last persisted seq and starts
  the queued ones; each run's CLI ran exactly once across the fleet and each following client
  (failing over to the other replica) received every event exactly once.
* A partition between one replica and the database: it stops acting on its runs within its lease
  (they are taken over by the other replica), and takes runs again once the database is back.
* Any replica answers for a run the other follows: get, interrupt, attach.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asm_controller import RemoteNode
from asm_controller._client import ControllerClient, GrpcNodeClient
from asm_wire import pb
from tests.support.fleet import Followed, assert_once, counted_cli, executions, follow
from tests.support.pg_server import PostgresServer
from tests.support.processes import (
    PYTHON_BASENAME,
    ControllerProcess,
    NodeProcess,
    start_controller_process,
    wait_until,
)
from tests.support.tcp_proxy import TcpProxy
from tests.test_controller_recovery import _metrics_port
from tests.test_fleet_queue import _metric

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

TTL = "3"  # seconds: the lease TTL of these replicas (the default is 10)


@pytest.fixture
def controllers(tmp_path: Path) -> Iterator[Callable[..., ControllerProcess]]:
    started: list[ControllerProcess] = []

    def start(*args: str) -> ControllerProcess:
        ctl = start_controller_process(tmp_path, *args)
        started.append(ctl)
        return ctl

    yield start
    for ctl in started:
        ctl.stop()


def _req(run_id: str, command: str, **fields: int) -> pb.StartRunRequest:
    return pb.StartRunRequest(run_id=run_id, provider="shell", prompt=command, **fields)


async def _runs(address: str, status: str) -> list[pb.RunInfo]:
    client = GrpcNodeClient(RemoteNode(address))
    try:
        return list((await client.list_runs(pb.ListRunsRequest(status=status, limit=1000))).runs)
    finally:
        await client.close()


async def _wait_counts(address: str, running: int, queued: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    seen = (0, 0)
    while time.monotonic() < deadline:
        seen = (len(await _runs(address, "running")), len(await _runs(address, "queued")))
        if seen == (running, queued):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"expected {running} running and {queued} queued, saw {seen}")


async def _info(address: str, run_id: str) -> pb.RunInfo:
    client = GrpcNodeClient(RemoteNode(address))
    try:
        return await client.get_run(pb.GetRunRequest(run_id=run_id))
    finally:
        await client.close()


def _nodes(node_process: Callable[..., NodeProcess], slots: list[int]) -> list[NodeProcess]:
    return [node_process("--shell-allow", PYTHON_BASENAME, "--max-runs", str(n)) for n in slots]


def _replica_args(url: str, nodes: list[NodeProcess], replica_id: str) -> tuple[str, ...]:
    fleet = [a for n in nodes for a in ("--node", n.address)]
    return (*fleet, "--state", url, "--replica-id", replica_id, "--lease-ttl", TTL, "--node-lost-timeout", "20")


async def test_kill_9_of_the_replica_owning_20_active_and_50_queued_runs_loses_and_repeats_nothing(
    pg: PostgresServer, node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
    tmp_path: Path,
) -> None:
    url = pg.create_database()
    nodes = _nodes(node_process, [7, 7, 6])  # 20 slots
    a = controllers(*_replica_args(url, nodes, "replica-a"))
    b = controllers(*_replica_args(url, nodes, "replica-b"), "--metrics-listen", "127.0.0.1:0")
    log = tmp_path / "executions.txt"
    ids = [f"run-{i:02d}" for i in range(70)]
    followers = [asyncio.create_task(follow([a.address, b.address], _req(rid, counted_cli(log, rid, 12, 0.25))))
                 for rid in ids]
    await _wait_counts(b.address, running=20, queued=50)  # the other replica sees them in the store
    running = [i.run_id for i in await _runs(b.address, "running")]
    a.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.to_thread(a.proc.wait, 10)
    # Takeover within the lease bound: the TTL, plus one renewal period of B, plus slack for a loaded host.
    while (await _info(b.address, running[0])).replica != "replica-b":
        assert time.monotonic() - killed < float(TTL) * 4 / 3 + 3.0, "no takeover within the lease bound"
        await asyncio.sleep(0.1)
    done: list[Followed] = await asyncio.wait_for(asyncio.gather(*followers), 240)
    for f in done:
        assert_once(f)
        assert f.completed is not None and f.completed.run_completed.status == "completed", (f.run_id, f.events[-2:])
    counts = executions(log)
    assert {rid: counts[rid] for rid in ids} == dict.fromkeys(ids, 1), "a CLI ran twice or never"
    assert sum(counts.values()) == 70
    assert len(re.findall(r"took over run \S+ from replica replica-a", b.log())) >= 20, b.log()[-3000:]
    moved = sum(1 for f in done if b.address in f.addresses)
    assert moved == 70, "every client finished through the surviving replica"
    # The registry says so too (its end is written right behind the stream's).
    for _ in range(50):
        completed = {i.run_id for i in await _runs(b.address, "completed")}
        if set(ids) <= completed:
            break
        await asyncio.sleep(0.1)
    missing = sorted(set(ids) - completed)
    assert not missing, [(await _info(b.address, rid)) for rid in missing[:3]]
    port = _metrics_port(b)
    assert (_metric(port, "asm_controller_lease_takeovers_total") or 0) >= 20
    assert (_metric(port, "asm_controller_store_latency_seconds_count", op="take_lease") or 0) >= 20
    assert await asyncio.to_thread(wait_until, lambda: _metric(port, "asm_controller_replicas") == 1.0, 10.0)


async def test_a_replica_cut_from_the_database_stops_acting_and_the_other_takes_over(
    pg: PostgresServer, node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
    tmp_path: Path,
) -> None:
    url = pg.create_database()
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = await TcpProxy(port).start()
    try:
        nodes = _nodes(node_process, [4])
        # Started from a thread: the proxy forwards in this event loop, which must keep running meanwhile.
        a = await asyncio.to_thread(controllers, *_replica_args(url.replace(f":{port}/", f":{proxy.port}/"), nodes,
                                                               "replica-a"))
        b = controllers(*_replica_args(url, nodes, "replica-b"))
        log = tmp_path / "executions.txt"
        ids = [f"cut-{i}" for i in range(4)]
        followers = [asyncio.create_task(follow([a.address, b.address], _req(rid, counted_cli(log, rid, 40, 0.2))))
                     for rid in ids]
        try:
            await _wait_counts(b.address, running=4, queued=0)
        except AssertionError as err:  # say what the replicas and the followers saw
            ended = [f.exception() or f.result() for f in followers if f.done()]
            raise AssertionError(f"{err}; followers done: {ended}; replica A: {a.log()[-3000:]}; "
                                 f"replica B: {b.log()[-1500:]}") from None
        proxy.cut()
        cut_at = time.monotonic()
        assert await asyncio.to_thread(wait_until, lambda: "fences itself" in a.log(), 10.0), a.log()[-2000:]
        fenced_after = time.monotonic() - cut_at
        assert fenced_after < float(TTL), f"fenced {fenced_after:.1f}s after the cut, past its lease"
        done = await asyncio.wait_for(asyncio.gather(*followers), 120)
        for f in done:
            assert_once(f)
        assert executions(log) == dict.fromkeys(ids, 1)
        assert "took over run" in b.log()
        # A new run sent to the cut replica is refused (UNAVAILABLE): the client's next address takes it.
        extra = await follow([a.address, b.address], _req("after-cut", counted_cli(log, "after-cut", 1, 0)))
        assert_once(extra)
        assert any("store_unreachable" in e for e in extra.errors), extra.errors
        proxy.restore()
        assert await asyncio.to_thread(wait_until, lambda: "reaches its store again" in a.log(), 15.0)
    finally:
        await proxy.stop()


async def test_any_replica_answers_for_a_run_the_other_follows(
    pg: PostgresServer, node_process: Callable[..., NodeProcess], controllers: Callable[..., ControllerProcess],
    tmp_path: Path,
) -> None:
    url = pg.create_database()
    nodes = _nodes(node_process, [1])
    a = controllers(*_replica_args(url, nodes, "replica-a"))
    b = controllers(*_replica_args(url, nodes, "replica-b"))
    log = tmp_path / "executions.txt"
    first = asyncio.create_task(follow([a.address], _req("long", counted_cli(log, "long", 200, 0.05))))
    await asyncio.to_thread(wait_until, lambda: executions(log)["long"] == 1, 15.0)
    # A follower on B (not the owner) gets the same events from the store, in order, once.
    on_b = asyncio.create_task(follow([b.address], _req("long", "")))
    queued = asyncio.create_task(follow([a.address], _req("queued", counted_cli(log, "queued", 1, 0))))
    await asyncio.sleep(1.0)
    client = GrpcNodeClient(RemoteNode(b.address))
    try:
        info = await client.get_run(pb.GetRunRequest(run_id="queued"))
        assert info.status == pb.RUN_STATUS_QUEUED and info.queue_position == 1
        assert info.replica == "replica-a"
        # Interrupting through B: the queued run ends (compare-and-set in the store), the running one
        # is interrupted on its node; A, their owner, sees both ends.
        assert (await client.interrupt_run(pb.InterruptRunRequest(run_id="queued"))).accepted
        assert (await client.interrupt_run(pb.InterruptRunRequest(run_id="long"))).accepted
    finally:
        await client.close()
    cancelled = await asyncio.wait_for(queued, 30)
    assert cancelled.error_code == "user_cancelled", cancelled
    owner_view, b_view = await asyncio.wait_for(asyncio.gather(first, on_b), 30)
    assert_once(owner_view)
    assert_once(b_view)
    assert owner_view.completed is not None and owner_view.completed.run_completed.status == "interrupted"
    assert [m.seq for m in b_view.events] == [m.seq for m in owner_view.events]
    await asyncio.sleep(0.5)
    assert executions(log) == {"long": 1}
    ctl = ControllerClient(RemoteNode(b.address))
    try:
        fleet = await ctl.list_nodes()
    finally:
        await ctl.close()
    assert {r.replica_id for r in fleet.replicas} == {"replica-a", "replica-b"}
    assert [r.self for r in fleet.replicas if r.replica_id == "replica-b"] == [True]
    from tests.test_controller_recovery import asm

    shown = await asyncio.to_thread(asm, "nodes", "--controller", b.address)
    assert shown.returncode == 0, shown.stderr
    assert "routing: least_loaded" in shown.stdout
    assert "replica-a at" in shown.stdout and "replica-b (this one) at" in shown.stdout, shown.stdout
