"""``scripts/bench.py --ha``: the HA figures of issue 12 (controller replicas on PostgreSQL, the fleet queue).

One run measures, side by side:

(f) runs/s of ``true`` (shell provider) through one controller on SQLite (the single-controller default,
    the reference), through ONE PostgreSQL replica, and through TWO replicas with the clients split
    across both; the same three real node agents, the same concurrency, the same number of runs. The
    cases are interleaved over rounds (machine noise hits them alike); the per-process CPU seconds
    (controllers, nodes, PostgreSQL, this client) show where the time goes.
(g) takeover after ``kill -9`` of a replica: a ticker run followed through replica A by a client that
    fails over to B; the time from the kill to the next event the client receives through B (and to
    B owning the run, GetRun polled every 50 ms), per lease TTL; every event must arrive once.
(h) queue wait: one node with one slot, busy; a run queued behind the blocker; the time from the
    blocker's run_completed at its client to the queued run's run_started at its client. Through the
    SQLite controller, through one replica (both runs on it), and across replicas (blocker on A,
    queued run on B, which learns of the free slot from the node's load reports).

Everything listens on 127.0.0.1; PostgreSQL is the throwaway cluster of tests/support/pg_server.py.
Every process is stopped by its PID, every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asm_controller import RemoteNode
from asm_controller._client import GrpcNodeClient
from asm_node.testing import PYTHON_BASENAME, ServedProcess, serve_controller, serve_node
from asm_wire import AsmError, pb
from tests.support.faults import ticker
from tests.support.pg_server import PostgresServer, postgres_bin_dir

__all__ = ["HaConfig", "available", "report_ha", "run_ha"]

#: The shell provider's per-command timeout (30 s) must not cut a ticker off on a loaded host.
_LONG_OPTIONS = json.dumps({"command_timeout_ms": 600_000})
#: Errors after which a follower tries the next replica (as tests/support/fleet.py does).
_RETRYABLE_KINDS = {"connection_failed", "transport", "node_not_ready", "unknown", "timeout", "node_unreachable"}
_RETRYABLE_REASONS = {"lease_lost", "store_unreachable"}
#: (h): a queued run started this soon after the blocker's end was woken by that end itself (not by
#: the queue's next 1 s look at the nodes' load reports).
FAST_START_S = 0.2
#: The product default lease TTL (``asm controller serve --lease-ttl``).
DEFAULT_TTL = 10.0


@dataclass
class HaConfig:
    runs: int = 300  # (f) runs per case per round
    concurrency: int = 8  # (f) clients running back to back
    rounds: int = 2  # (f) interleaved rounds
    ttls: tuple[float, ...] = (3.0, DEFAULT_TTL)  # (g) lease TTLs measured
    takeovers: int = 3  # (g) kills per TTL
    queue_reps: int = 6  # (h) repetitions per path
    #: (h) the blocker's length: longer than the controllers' 1 s heartbeat to their nodes, as any real
    #: run is (a shorter one often ends before a heartbeat reported it, and the queued run starts at once).
    blocker_s: float = 1.5
    budget_s: float = 170.0  # takeover repetitions past it are skipped (the mode stays under ~3 minutes)


def available() -> bool:
    """PostgreSQL's server binaries are installed (scripts/install_postgres.sh)."""
    return postgres_bin_dir() is not None


# -- processes ---------------------------------------------------------------------------------


class Fleet:
    """Every process this mode starts; :meth:`stop` stops each by its PID (PostgreSQL last)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {"XDG_STATE_HOME": str(workdir / "xdg")}
        self.procs: list[ServedProcess] = []
        self.pg: PostgresServer | None = None

    def node(self, *args: str) -> ServedProcess:
        proc = serve_node(self.workdir, "--shell-allow", PYTHON_BASENAME, *args, env=self.env)
        self.procs.append(proc)
        return proc

    def controller(self, nodes: Sequence[ServedProcess], *args: str) -> ServedProcess:
        fleet = [a for n in nodes for a in ("--node", n.address)]
        proc = serve_controller(self.workdir, *fleet, *args, env=self.env)
        self.procs.append(proc)
        return proc

    def replica(self, url: str, nodes: Sequence[ServedProcess], replica_id: str, ttl: float) -> ServedProcess:
        return self.controller(nodes, "--state", url, "--replica-id", replica_id, "--lease-ttl", f"{ttl:g}")

    def cpu_s(self, procs: Sequence[ServedProcess]) -> float:
        return sum(_cpu_s(p.pid) for p in procs if p.proc.poll() is None)

    def pg_cpu_s(self) -> float:
        """CPU seconds of the postmaster, its live children (the backends serving the replicas) and its
        reaped ones (in its cutime/cstime): a backend that exits between two samples still counts."""
        if self.pg is None or self.pg.proc is None:
            return float("nan")
        root = self.pg.proc.pid
        total = _cpu_s(root, reaped=True)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _ppid(int(entry)) == root:
                total += _cpu_s(int(entry))
        return total

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()
        if self.pg is not None:
            self.pg.stop()
            self.pg = None


def _stat(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _cpu_s(pid: int, *, reaped: bool = False) -> float:
    """utime + stime of a process (+ cutime + cstime: its waited-for children) in seconds; 0 when gone."""
    fields = _stat(pid)
    if len(fields) <= 14:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (every process on the host)."""
    try:
        with open("/proc/stat") as f:
            values = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _ppid(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if len(fields) > 1 else -1


async def _parallel(*starts: Callable[[], ServedProcess]) -> list[ServedProcess]:
    """Start processes from threads at once (each start waits for its handshake)."""
    return list(await asyncio.gather(*(asyncio.to_thread(s) for s in starts)))


# -- a client following a run across replicas ---------------------------------------------------


@dataclass
class Trace:
    """Every event a follower received: (perf_counter at receipt, the replica it came through, event)."""

    run_id: str
    events: list[tuple[float, str, pb.Event]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def at(self, kind: int) -> float | None:
        return next((t for t, _, m in self.events if m.kind == kind), None)

    @property
    def completed(self) -> pb.Event | None:
        return next((m for _, _, m in self.events if m.kind == pb.EVENT_KIND_RUN_COMPLETED), None)

    @property
    def once(self) -> bool:
        """Every event once, in order: seqs 1..N without gap or repeat, ending in run_completed."""
        seqs = [m.seq for _, _, m in self.events]
        return self.completed is not None and seqs == list(range(1, len(seqs) + 1))


def _request(run_id: str, prompt: str, *, long: bool = False) -> pb.StartRunRequest:
    req = pb.StartRunRequest(run_id=run_id, provider="shell", prompt=prompt)
    if long:
        req.options_json = _LONG_OPTIONS
    return req


async def follow(addresses: Sequence[str], request: pb.StartRunRequest, trace: Trace, *,
                 timeout: float = 60.0) -> Trace:
    """StartRun on the first address; on a broken stream StartRun again after the last seq received (a
    known run id attaches) on the next address, 0.2 s later, until run_completed or ``timeout``."""
    deadline = time.monotonic() + timeout
    cursor, i = 0, 0
    while time.monotonic() < deadline:
        addr = addresses[i % len(addresses)]
        client = GrpcNodeClient(RemoteNode(addr))
        req = pb.StartRunRequest()
        req.CopyFrom(request)
        req.after_seq = cursor
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                async for batch in client.start_run(req):
                    now = time.perf_counter()
                    for m in batch.events:
                        trace.events.append((now, addr, m))
                        cursor = max(cursor, m.seq)
                    if trace.completed is not None:
                        return trace
            trace.errors.append(f"{addr}: stream ended without run_completed")
        except AsmError as err:
            trace.errors.append(f"{addr}: {err.kind}/{err.reason}: {err.message}")
            if err.kind not in _RETRYABLE_KINDS and err.reason not in _RETRYABLE_REASONS:
                return trace
            i += 1
        except TimeoutError:
            trace.errors.append(f"{addr}: no run_completed within {timeout:g}s")
            return trace
        finally:
            await client.close()
        await asyncio.sleep(0.2)
    return trace


async def _get_run(address: str, run_id: str) -> pb.RunInfo | None:
    client = GrpcNodeClient(RemoteNode(address))
    try:
        return await client.get_run(pb.GetRunRequest(run_id=run_id))
    except AsmError:
        return None
    finally:
        await client.close()


async def _interrupt(address: str, run_id: str) -> None:
    client = GrpcNodeClient(RemoteNode(address))
    try:
        await client.interrupt_run(pb.InterruptRunRequest(run_id=run_id))
    except AsmError:
        pass
    finally:
        await client.close()


async def _until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


# -- (f) runs/s ----------------------------------------------------------------------------------


async def _one_true(client: GrpcNodeClient, run_id: str) -> tuple[float, str | None]:
    """One run of ``true`` through a controller: (completed in seconds, failure or None)."""
    t0 = time.perf_counter()
    status = ""
    try:
        async with asyncio.timeout(30):
            async for batch in client.start_run(_request(run_id, "true")):
                for m in batch.events:
                    if m.kind == pb.EVENT_KIND_RUN_COMPLETED:
                        status = m.run_completed.status
    except (AsmError, TimeoutError) as err:
        return time.perf_counter() - t0, f"{type(err).__name__}: {err}"
    return time.perf_counter() - t0, None if status == "completed" else f"ended {status or 'without run_completed'}"


async def throughput_case(addresses: Sequence[str], runs: int, concurrency: int, tag: str,
                          cpu: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """``runs`` runs of ``true`` by ``concurrency`` clients back to back, client i on address i % len."""
    clients = [GrpcNodeClient(RemoteNode(addresses[i % len(addresses)])) for i in range(concurrency)]
    try:
        for k, c in enumerate(clients):  # warm: channel up, the controller's first-run paths taken
            await _one_true(c, f"{tag}-warm-{k}")
        counter = itertools.count()
        latencies: list[float] = []
        failures: list[str] = []

        async def worker(client: GrpcNodeClient) -> None:
            while (i := next(counter)) < runs:
                dt, err = await _one_true(client, f"{tag}-{i}")
                if err is None:
                    latencies.append(dt)
                else:
                    failures.append(err)

        c0, p0, h0 = cpu(), time.process_time(), host_cpu()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        wall = time.perf_counter() - t0
        c1, h1 = cpu(), host_cpu()
        used = {k: c1[k] - c0[k] for k in c0}
        used["client"] = time.process_time() - p0
        busy = (h1[0] - h0[0]) / (h1[1] - h0[1]) if h1[1] > h0[1] else float("nan")
    finally:
        for c in clients:
            await c.close()
    return {"wall": wall, "ok": len(latencies), "failures": failures, "rate": len(latencies) / wall,
            "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"), "cpu": used,
            "host_busy": busy}


# -- (g) takeover ---------------------------------------------------------------------------------


async def takeover_once(fleet: Fleet, url: str, nodes: Sequence[ServedProcess], survivor: ServedProcess,
                        ttl: float, tag: str) -> dict[str, Any]:
    """Start replica A, follow a ticker through it (B next), kill -9 A; time to the next event via B."""
    a_id = f"a-{tag}"
    (a,) = await _parallel(lambda: fleet.replica(url, nodes, a_id, ttl))
    run_id = f"takeover-{tag}"
    lines = int((4 * ttl + 15) / 0.05)  # ticks well past any takeover bound; interrupted once measured
    trace = Trace(run_id)
    task = asyncio.create_task(follow([a.address, survivor.address], _request(run_id, ticker(lines, 0.05), long=True),
                                      trace, timeout=4 * ttl + 40))
    out: dict[str, Any] = {"ttl": ttl, "gap": None, "owned": None, "once": False}
    try:
        if not await _until(lambda: len(trace.events) >= 10, 20.0):
            out["error"] = f"no events through A: {trace.errors[-2:]}"
            return out
        # A kills at a random phase of A's renewal period (TTL/3): the takeover time depends on it.
        await asyncio.sleep(random.uniform(0, ttl / 3))
        info = await _get_run(survivor.address, run_id)
        if info is None or info.replica != a_id:
            out["error"] = f"the run is not A's before the kill: {info.replica if info else '?'}"
        a.proc.send_signal(signal.SIGKILL)  # by PID
        killed = time.perf_counter()
        await asyncio.to_thread(a.proc.wait, 10)

        async def owned() -> None:
            # B's log line, polled: GetRun through B does not name the replica of a run B follows on its node.
            line = f"took over run {run_id} from replica {a_id}"
            while time.perf_counter() - killed < 4 * ttl + 20:
                if line in await asyncio.to_thread(survivor.log):
                    out["owned"] = time.perf_counter() - killed
                    return
                await asyncio.sleep(0.02)

        poll = asyncio.create_task(owned())
        via_b = lambda: any(addr == survivor.address and t > killed for t, addr, _ in trace.events)  # noqa: E731
        if await _until(via_b, 4 * ttl + 20, 0.005):
            out["gap"] = next(t for t, addr, _ in trace.events if addr == survivor.address and t > killed) - killed
        await asyncio.wait_for(poll, 4 * ttl + 25)
        await _interrupt(survivor.address, run_id)
        await asyncio.wait_for(task, 30)
        out["once"] = trace.once
        out["events"] = len(trace.events)
    finally:
        if not task.done():
            await _interrupt(survivor.address, run_id)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        a.stop()
    return out


# -- (h) queue wait --------------------------------------------------------------------------------


async def queue_once(blocker_at: str, queued_at: str, tag: str, blocker_s: float = 1.5) -> dict[str, Any]:
    """A blocker busy on the only slot, a run queued behind it: blocker's run_completed -> queued's
    run_started, both at their clients."""
    blocker, queued = Trace(f"blocker-{tag}"), Trace(f"queued-{tag}")
    command = ticker(max(1, round(blocker_s / 0.05)), 0.05)
    b_task = asyncio.create_task(follow([blocker_at], _request(blocker.run_id, command, long=True), blocker))
    q_task: asyncio.Task[Trace] | None = None
    out: dict[str, Any] = {"wait": None, "queued": False}
    try:
        if not await _until(lambda: blocker.at(pb.EVENT_KIND_RUN_STARTED) is not None, 20.0):
            out["error"] = f"the blocker did not start: {blocker.errors[-2:]}"
            return out
        q_task = asyncio.create_task(follow([queued_at], _request(queued.run_id, "true"), queued))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not q_task.done():
            info = await _get_run(queued_at, queued.run_id)
            if info is not None and info.status == pb.RUN_STATUS_QUEUED:
                out["queued"] = True
                break
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(b_task, q_task), 30)
        done, started = blocker.at(pb.EVENT_KIND_RUN_COMPLETED), queued.at(pb.EVENT_KIND_RUN_STARTED)
        if done is not None and started is not None:
            out["wait"] = started - done
        out["once"] = blocker.once and queued.once
        if not out["once"]:
            out["error"] = f"blocker {blocker.errors[-1:]} queued {queued.errors[-1:]}"
    finally:
        for t in (b_task, q_task):
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
    return out


# -- driver ------------------------------------------------------------------------------------------


async def run_ha(cfg: HaConfig, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    t_start = time.perf_counter()
    fleet = Fleet(workdir)
    out: dict[str, Any] = {"cfg": cfg, "throughput": {}, "takeover": [], "queue": {}, "skipped": []}
    try:
        fleet.pg = await asyncio.to_thread(PostgresServer.start)
        pg = fleet.pg
        db1, db2 = await asyncio.to_thread(lambda: (pg.create_database("bench_ha_1"), pg.create_database("bench_ha_2")))
        out["pg_version"] = await asyncio.to_thread(_pg_version, pg)
        nodes = await _parallel(*(lambda: fleet.node() for _ in range(3)))
        (one_slot,) = await _parallel(lambda: fleet.node("--max-runs", "1"))
        ttl_f = cfg.ttls[0]
        sqlite, a, b = await _parallel(
            lambda: fleet.controller(nodes, "--state", f"sqlite:///{workdir / 'bench-f.sqlite3'}"),
            lambda: fleet.replica(db1, nodes, "f-a", ttl_f),
            lambda: fleet.replica(db1, nodes, "f-b", ttl_f))
        log(f"[f] up in {time.perf_counter() - t_start:.1f}s: PostgreSQL pid {fleet.pg.proc.pid if fleet.pg.proc else '?'}"
            f", 3 nodes + a 1-slot node, SQLite controller, replicas f-a/f-b (TTL {ttl_f:g}s)")

        def cpu() -> dict[str, float]:
            return {"sqlite": fleet.cpu_s([sqlite]), "a": fleet.cpu_s([a]), "b": fleet.cpu_s([b]),
                    "nodes": fleet.cpu_s(nodes), "pg": fleet.pg_cpu_s()}

        cases = {"sqlite, 1 controller": ("sq", [sqlite.address]), "pg, 1 replica": ("p1", [a.address]),
                 "pg, 2 replicas": ("p2", [a.address, b.address])}
        for rnd in range(cfg.rounds):
            for name, (key, addrs) in cases.items():
                r = await throughput_case(addrs, cfg.runs, cfg.concurrency, f"f{rnd}-{key}", cpu)
                out["throughput"].setdefault(name, []).append(r)
                log(f"    round {rnd + 1} {name:<22} {r['rate']:7.1f} runs/s ({r['ok']} ok, "
                    f"{len(r['failures'])} failed, {r['wall']:.1f}s)")

        # (h) queue wait, then (g) on the same replicas (default TTL) in front of the 1-slot node.
        ttl_h = cfg.ttls[-1]
        q_sqlite, c, d = await _parallel(
            lambda: fleet.controller([one_slot], "--state", f"sqlite:///{workdir / 'bench-h.sqlite3'}"),
            lambda: fleet.replica(db2, [one_slot], "h-c", ttl_h),
            lambda: fleet.replica(db2, [one_slot], "h-d", ttl_h))
        paths = {"sqlite controller": ("sq", q_sqlite.address, q_sqlite.address),
                 "pg, same replica": ("p1", c.address, c.address), "pg, across replicas": ("p2", c.address, d.address)}
        log(f"[h] queue wait, {cfg.queue_reps} per path ({time.perf_counter() - t_start:.0f}s)")
        for rep in range(cfg.queue_reps):
            for name, (key, x, y) in paths.items():
                out["queue"].setdefault(name, []).append(await queue_once(x, y, f"{rep}-{key}", cfg.blocker_s))
        for name, rows in out["queue"].items():
            waits = [r["wait"] for r in rows if r["wait"] is not None and r["queued"]]
            log(f"    {name:<22} median {_ms(_median(waits) * 1000)} ms "
                f"over {len(waits)}")
        # Only the survivor of each pair stays: it alone can take the killed replica's leases over.
        for proc in (q_sqlite, sqlite, a, c):
            proc.stop()

        # (g): kill -9 of the replica following the run; the shortest TTL first (the default one last).
        log(f"[g] takeover after kill -9, {cfg.takeovers} per TTL {', '.join(f'{t:g}s' for t in cfg.ttls)} "
            f"({time.perf_counter() - t_start:.0f}s)")
        targets = [(ttl_f, db1, nodes, b), (ttl_h, db2, [one_slot], d)]
        for ttl, url, fleet_nodes, survivor in targets[: len(cfg.ttls)]:
            for rep in range(cfg.takeovers):
                # The next repetition's worst case: a replica start, TTL * 4/3 and the interrupt.
                if time.perf_counter() - t_start + 4 * ttl / 3 + 6 > cfg.budget_s:
                    out["skipped"].append((ttl, rep))
                    continue
                r = await takeover_once(fleet, url, fleet_nodes, survivor, ttl, f"{ttl:g}s-{rep}")
                out["takeover"].append(r)
                log(f"    TTL {ttl:g}s #{rep + 1}: next event via B {_ms(_s(r['gap']) * 1000)} ms after the kill, "
                    f"B owns it at {_ms(_s(r['owned']) * 1000)} ms, every event once: {r['once']}"
                    + (f" ({r['error']})" if r.get("error") else ""))
    except Exception as exc:  # a benchmark reports what it measured before the failure
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"bench --ha: aborted: {out['error']}\n{traceback.format_exc()}")
    finally:
        fleet.stop()
    out["wall"] = time.perf_counter() - t_start
    return out


def _pg_version(pg: PostgresServer) -> str:
    done = subprocess.run([str(pg.bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=10)
    return done.stdout.strip() or "?"


def _s(x: float | None) -> float:
    return float("nan") if x is None else x


def _ms(x: float) -> str:
    return "n/a" if x != x else f"{x:8.1f}"


def report_ha(out: dict[str, Any]) -> None:
    cfg: HaConfig = out["cfg"]
    print(f"\n(f) runs/s of 'true' through controllers, 3 node agents (8 slots each), {cfg.concurrency} clients "
          f"back to back, {cfg.runs} runs per case per round, {cfg.rounds} interleaved rounds "
          f"(PostgreSQL {out.get('pg_version', '?')})")
    thr = out["throughput"]
    if thr:
        ref = _median([r["rate"] for r in thr.get("sqlite, 1 controller", [])])
        one = _median([r["rate"] for r in thr.get("pg, 1 replica", [])])
        print(f"{'':<24}{'runs/s med':>11}{'best':>8}{'vs sqlite':>10}{'vs 1 rep':>9}{'p50 ms':>8}"
              f"{'failed':>7}{'host busy':>10}   CPU ms per run: controllers / nodes / postgres / client")
        for name, rows in thr.items():
            rates = [r["rate"] for r in rows]
            med = statistics.median(rates)
            failed = sum(len(r["failures"]) for r in rows)
            ok = sum(r["ok"] for r in rows) or 1
            cpu = {k: sum(r["cpu"][k] for r in rows) * 1000 / ok for k in rows[0]["cpu"]}
            ctl = cpu["sqlite"] if name.startswith("sqlite") else cpu["a"] + cpu["b"]
            pg = "-" if name.startswith("sqlite") else f"{cpu['pg']:.1f}"
            p50 = statistics.median(r["p50_ms"] for r in rows)
            busy = statistics.median(r["host_busy"] for r in rows) * 100
            print(f"{name:<24}{med:>11.1f}{max(rates):>8.1f}{med / ref:>9.2f}x{med / one:>8.2f}x{p50:>8.1f}"
                  f"{failed:>7}{busy:>9.0f}%   {ctl:.1f} / {cpu['nodes']:.1f} / {pg} / {cpu['client']:.1f}")
            for f in [f for r in rows for f in r["failures"]][:2]:
                print(f"    !! {f}")
        print("(the 1-replica case runs with the second replica up and idle; host busy = all CPUs of the host, "
              "other users included; PostgreSQL is the test cluster: fsync=off, synchronous_commit=off; SQLite: "
              "WAL, synchronous=NORMAL)")
    print("\n(g) takeover after kill -9 of the replica a client follows a run through (the client moves to the "
          "other replica 0.2 s after its stream breaks)")
    for ttl in cfg.ttls:
        rows = [r for r in out["takeover"] if r["ttl"] == ttl]
        gaps = [r["gap"] for r in rows if r["gap"] is not None]
        owned = [r["owned"] for r in rows if r["owned"] is not None]
        lags = [r["gap"] - r["owned"] for r in rows if r["gap"] is not None and r["owned"] is not None]
        skipped = sum(1 for t, _ in out["skipped"] if t == ttl)
        if not rows:
            print(f"  TTL {ttl:g}s: not measured (time budget){'' if not skipped else f', {skipped} skipped'}")
            continue
        print(f"  TTL {ttl:>4g}s: kill -> next event via B median {_ms(_median(gaps) * 1000)} ms "
              f"(min {_ms(min(gaps, default=float('nan')) * 1000)}, max {_ms(max(gaps, default=float('nan')) * 1000)})"
              f"; kill -> B owns the run median {_ms(_median(owned) * 1000)} ms, owns -> next event "
              f"{_ms(_median(lags) * 1000)} ms; {len(gaps)}/{len(rows)} measured"
              f", every event once: {all(r['once'] for r in rows)}"
              f"{'' if not skipped else f'; {skipped} skipped (time budget)'}"
              f"  [expected: 2/3..4/3 x TTL = {2 * ttl / 3:.1f}..{4 * ttl / 3:.1f}s]")
        for r in rows:
            if r.get("error"):
                print(f"    !! {r['error']}")
    print(f"\n(h) queue wait: 1-slot node busy with a {cfg.blocker_s:g} s run, a run queued behind it; blocker "
          f"run_completed -> queued run_started, both at their clients, {cfg.queue_reps} per path")
    for name, rows in out["queue"].items():
        waits = [r["wait"] for r in rows if r["wait"] is not None and r["queued"]]
        not_queued = sum(1 for r in rows if not r["queued"])
        fast = sum(1 for w in waits if w < FAST_START_S)
        print(f"  {name:<22} median {_ms(_median(waits) * 1000)} ms, min {_ms(min(waits, default=float('nan')) * 1000)}"
              f", max {_ms(max(waits, default=float('nan')) * 1000)} over {len(waits)}; {fast} under "
              f"{FAST_START_S * 1000:.0f} ms"
              f"{f' ({not_queued} not seen queued: left out)' if not_queued else ''}"
              f", every event once: {all(r.get('once') for r in rows)}")
        for r in rows:
            if r.get("error"):
                print(f"    !! {r['error']}")
    print(f"  (a start slower than {FAST_START_S * 1000:.0f} ms waited for the queue's next look at the nodes' "
          "load reports, every 1 s: the node's last heartbeat still counted the blocker, so the wake-up at its end "
          "skipped the node as at capacity)")
    if out.get("error"):
        print(f"\n!! --ha aborted early: {out['error']}")
    print(f"\n--ha wall time {out['wall']:.1f}s")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
