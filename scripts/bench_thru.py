"""``scripts/bench.py --thru``: controller throughput (issue 15, deliverable 6).

Two figures, each beside its baseline, measured side by side in one run:

(j) one stream through ``asm controller serve`` vs the same stream straight from the node: a run of
    ``cat FILE`` printing ``events`` JSONL lines of ~100 bytes (one ``assistant_delta`` each), read to
    its end with ``Session.stream`` on ``RemoteNode(<node>)`` and on ``RemoteNode(<controller>)``,
    interleaved, ``repeats`` times each; events/s = events / wall, the ratio controller/direct, and
    the controller's CPU per event (from /proc). The controller keeps its default registry (SQLite).
(k) short runs/s: ``runs`` runs of ``true`` (shell provider), ``concurrency`` at a time, over N node
    agents (N in ``node_counts``) with ``--strategy least_loaded``:
      * through ``asm controller serve`` (default SQLite registry; and ``--state memory:``), each run
        one StartRun stream of a bare gRPC client, read to its run_completed;
      * the library directly: one ``Session(nodes=[the N nodes], strategy="least_loaded")`` in this
        process (the controller's own code, no controller service in between) -- the baseline.
    The node agents run ``per_host`` to a process (``--node-host``: real gRPC servers, one port each):
    50 node processes of ~100 MB each would measure the host's memory, not the controller.

Every process is stopped by its PID; every run has a timeout (a hang is a failure, not a wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from asm_controller import RemoteNode, Session  # noqa: E402
from asm_wire import pb  # noqa: E402

__all__ = ["ThruConfig", "issue15_figures", "node_host_main", "report_thru", "run_issue15", "run_thru"]

#: Issue 15's targets.
RUNS_TARGET = 1000.0
STREAM_RATIO_TARGET = 0.9
_OPTIONS = '{"command_timeout_ms": 600000}'
_RUN_TIMEOUT_S = 30.0
_READY = re.compile(r"^ports (\S+)$", re.M)


@dataclass
class ThruConfig:
    events: int = 200_000  # (j) lines of the stream run
    repeats: int = 3  # (j) repetitions per path
    runs: int = 1000  # (k) short runs per case
    concurrency: int = 32  # (k) runs in flight
    node_counts: tuple[int, ...] = (10, 50)  # (k)
    per_host: int = 10  # node agents per host process
    memory_store: bool = True  # (k) also a controller with --state memory:
    #: Another checkout (e.g. ``git archive main``): its controller measured beside this one's ("before").
    baseline_root: Path | None = None


# -- processes ----------------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _env(root: Path = ROOT) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


class _Proc:
    """A child process with its stderr in a log file; stopped by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: list[str], log_path: Path, cwd: Path, root: Path = ROOT) -> None:
        self.log_path = log_path
        self.name = " ".join(argv[2:5])
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, cwd=str(cwd), env=_env(root))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.log())
            if m:
                return m
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early ({self.proc.returncode}): {self.log()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout:g}s: {self.log()[-2000:]}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_node_hosts(n: int, per_host: int, workdir: Path) -> tuple[list[_Proc], list[str]]:
    """``n`` node agents in ceil(n / per_host) processes; their addresses."""
    hosts: list[_Proc] = []
    addresses: list[str] = []
    try:
        for i in range(0, n, per_host):
            k = min(per_host, n - i)
            state = workdir / f"nodes-{n}-{i}"
            hosts.append(_Proc([sys.executable, str(Path(__file__).resolve()), "--node-host", str(k), str(state)],
                               workdir / f"nodehost-{n}-{i}.log", workdir))
        for h in hosts:
            addresses += [f"127.0.0.1:{p}" for p in h.wait_for(_READY, 60.0).group(1).split(",")]
    except BaseException:
        for h in hosts:
            h.stop()
        raise
    return hosts, addresses


def start_controller(workdir: Path, nodes: list[str], state: str, tag: str, root: Path = ROOT) -> tuple[_Proc, str]:
    """``asm controller serve`` (of the code at ``root``) over ``nodes``, least_loaded, its registry ``state``."""
    from asm_node.testing import free_port, wait_serving

    port = free_port()
    argv = [sys.executable, "-m", "asm_cli", "controller", "serve", "--listen", f"127.0.0.1:{port}",
            "--strategy", "least_loaded", "--state", state]
    for a in nodes:
        argv += ["--node", a]
    ctl = _Proc(argv, workdir / f"controller-{tag}-{time.monotonic_ns()}.log", workdir, root)
    alive = (lambda p: lambda: p.poll() is None)(ctl.proc)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=60.0, alive=alive)
    except BaseException:
        ctl.stop()
        raise RuntimeError(f"controller not ready: {ctl.log()[-2000:]}") from None
    return ctl, f"127.0.0.1:{port}"


def node_host_main(count: int, state_dir: str) -> int:
    """``bench_thru.py --node-host N DIR``: N node agents (real gRPC servers on 127.0.0.1) in this
    process until SIGTERM; prints ``ports P1,P2,...`` on stderr once all serve."""
    from asm_node import NodeConfig
    from asm_node.server import start_server

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        servers = []
        try:
            for i in range(count):
                cfg = NodeConfig(listen="127.0.0.1:0", state_dir=Path(state_dir) / str(i), max_runs=64)
                servers.append(await start_server(cfg))
            print("ports " + ",".join(str(s.port) for s in servers), file=sys.stderr, flush=True)
            await stop.wait()
        finally:
            for s in servers:
                with contextlib.suppress(Exception):
                    await s.stop()

    asyncio.run(serve())
    return 0


# -- (j) one stream -----------------------------------------------------------------------------------


def _write_lines(path: Path, n: int) -> None:
    base = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore"
    with open(path, "w") as f:
        for i in range(n):
            head = f'{{"type":"assistant","i":{i},"text":"'
            f.write(head + base[:max(8, 97 - len(head))] + '"}\n')


async def _one_stream(address: str, path: Path, n: int) -> tuple[float, str | None]:
    t0 = time.perf_counter()
    count = 0
    try:
        async with asyncio.timeout(max(60.0, n / 5000)):
            async with Session("shell", node=RemoteNode(address)) as s:
                stream = s.stream(f"cat {path}", cwd=str(path.parent), options={"command_timeout_ms": 600_000})
                async for _ev in stream:
                    count += 1
                ok = bool(stream.result and stream.result.ok)
    except TimeoutError:
        return time.perf_counter() - t0, "hang"
    except Exception as exc:  # a benchmark reports, it does not crash
        return time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - t0
    if not ok or count != n + 3:
        return wall, f"ok={ok}, {count} events (expected {n + 3})"
    return wall, None


async def stream_figures(cfg: ThruConfig, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    path = workdir / "lines.jsonl"
    _write_lines(path, cfg.events)
    hosts, nodes = start_node_hosts(1, 1, workdir)
    paths = ["direct", "controller"] + (["before"] if cfg.baseline_root else [])
    out: dict[str, Any] = {"events": cfg.events, "failures": [], **{p: [] for p in paths},
                           **{f"{p}_cpu": [] for p in paths}}
    ctls: dict[str, tuple[_Proc, str]] = {}
    try:
        ctls["controller"] = start_controller(workdir, nodes, f"sqlite:///{workdir / 'stream.sqlite3'}", "stream")
        if cfg.baseline_root:
            ctls["before"] = start_controller(workdir, nodes, f"sqlite:///{workdir / 'stream-before.sqlite3'}",
                                              "stream-before", cfg.baseline_root)
        addr = {"direct": nodes[0], **{k: a for k, (_, a) in ctls.items()}}
        for p in paths:  # warm every path
            await _one_stream(addr[p], path, min(cfg.events, 2000))
        for rep in range(cfg.repeats):
            for p in paths[rep % len(paths):] + paths[:rep % len(paths)]:  # the order rotates
                pid = ctls[p][0].pid if p in ctls else None
                c0 = _cpu_s(pid) if pid else 0.0
                wall, err = await _one_stream(addr[p], path, cfg.events)
                if err:
                    out["failures"].append(f"{p}: {err}")
                    continue
                out[p].append(cfg.events / wall)
                if pid:
                    out[f"{p}_cpu"].append(_cpu_s(pid) - c0)
                log(f"    (j) {p:<10} {cfg.events / wall:>10,.0f} events/s")
    finally:
        for c, _ in ctls.values():
            c.stop()
        for h in hosts:
            h.stop()
    return out


# -- (k) short runs/s ---------------------------------------------------------------------------------


async def _runs_via_controller(address: str, runs: int, concurrency: int, cwd: str) -> dict[str, Any]:
    """``runs`` runs of ``true`` through the controller's StartRun (a bare gRPC client), ``concurrency``
    at a time; each must end with run_completed after a result."""
    from asm_controller._client import GrpcNodeClient
    from asm_wire import ulid

    client = GrpcNodeClient(RemoteNode(address))
    failures: list[str] = []
    times: list[float] = []
    todo = iter(range(runs))

    async def one() -> None:
        t0 = time.perf_counter()
        req = pb.StartRunRequest(run_id=ulid(), provider="shell", prompt="true", cwd=cwd, options_json=_OPTIONS)
        kinds: list[int] = []
        try:
            async with asyncio.timeout(_RUN_TIMEOUT_S):
                async for batch in client.start_run(req):
                    kinds += [m.kind for m in batch.events]
        except Exception as exc:  # reported, not raised
            failures.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        if not kinds or kinds[-1] != pb.EVENT_KIND_RUN_COMPLETED or pb.EVENT_KIND_ERROR in kinds:
            failures.append(f"kinds {kinds}")
            return
        times.append(time.perf_counter() - t0)

    async def worker() -> None:
        for _ in todo:
            await one()

    try:
        for _ in range(min(concurrency, 8)):  # warm the channel and the controller's node channels
            await one()
        failures.clear()
        times.clear()
        todo = iter(range(runs))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return {"rate": len(times) / wall, "p50_ms": statistics.median(times) * 1000 if times else float("nan"),
            "failed": len(failures), "first_failure": failures[0] if failures else "", "wall": wall}


async def _runs_library(nodes: list[str], runs: int, concurrency: int, cwd: str) -> dict[str, Any]:
    """The same runs through a library Session over the same nodes (no controller service)."""
    failures: list[str] = []
    times: list[float] = []
    async with Session("shell", node=[RemoteNode(a) for a in nodes], strategy="least_loaded",
                       max_concurrent_runs=concurrency, max_queued_runs=runs + concurrency, cwd=cwd,
                       options={"command_timeout_ms": 600_000}) as s:
        todo = iter(range(runs))

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(_RUN_TIMEOUT_S):
                    r = await s.query("true")
            except Exception as exc:  # reported, not raised
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            if not r.ok:
                failures.append(f"{r.status}: {r.error}"[:200])
                return
            times.append(time.perf_counter() - t0)

        async def worker() -> None:
            for _ in todo:
                await one()

        for _ in range(min(concurrency, 8)):
            await one()
        failures.clear()
        times.clear()
        todo = iter(range(runs))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"rate": len(times) / wall, "p50_ms": statistics.median(times) * 1000 if times else float("nan"),
            "failed": len(failures), "first_failure": failures[0] if failures else "", "wall": wall}


async def runs_figures(cfg: ThruConfig, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in cfg.node_counts:
        hosts, nodes = start_node_hosts(n, cfg.per_host, workdir)
        row: dict[str, Any] = {}
        try:
            host_cpu0 = sum(_cpu_s(h.pid) for h in hosts)
            row["library"] = await _runs_library(nodes, cfg.runs, cfg.concurrency, str(workdir))
            log(f"    (k) {n:>3} nodes  library            {row['library']['rate']:8.1f} runs/s")
            stores = [("sqlite", f"sqlite:///{workdir / f'runs-{n}.sqlite3'}", ROOT)]
            if cfg.baseline_root:
                stores.append(("sqlite-before", f"sqlite:///{workdir / f'runs-{n}-before.sqlite3'}", cfg.baseline_root))
            if cfg.memory_store:
                stores.append(("memory", "memory:", ROOT))
            for name, state, root in stores:
                ctl, addr = start_controller(workdir, nodes, state, f"runs-{n}-{name}", root)
                try:
                    await asyncio.sleep(1.5)  # the first heartbeats: least_loaded sees every node's load
                    c0, h0 = _cpu_s(ctl.pid), sum(_cpu_s(h.pid) for h in hosts)
                    r = await _runs_via_controller(addr, cfg.runs, cfg.concurrency, str(workdir))
                    r["ctl_ms_per_run"] = (_cpu_s(ctl.pid) - c0) * 1000 / max(1, cfg.runs)
                    r["nodes_ms_per_run"] = (sum(_cpu_s(h.pid) for h in hosts) - h0) * 1000 / max(1, cfg.runs)
                    row[f"controller-{name}"] = r
                    log(f"    (k) {n:>3} nodes  controller ({name:<6}) {r['rate']:8.1f} runs/s")
                finally:
                    ctl.stop()
            row["host_cpu_s"] = sum(_cpu_s(h.pid) for h in hosts) - host_cpu0
        finally:
            for h in hosts:
                h.stop()
        out[str(n)] = row
    return out


async def run_thru(cfg: ThruConfig, workdir: Path, log: Callable[[str], None], *, stream: bool = True,
                   runs: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"cfg": cfg}
    if stream:
        out["stream"] = await stream_figures(cfg, workdir, log)
    if runs:
        out["runs"] = await runs_figures(cfg, workdir, log)
    return out


# -- report -------------------------------------------------------------------------------------------


def _best(xs: list[float]) -> float:
    return max(xs) if xs else float("nan")


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def issue15_figures(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue-15 targets these figures decide: name, value, unit, baseline, ratio, target, met."""
    figs: list[dict[str, Any]] = []
    st = out.get("stream")
    if st is not None:
        d, c = _med(st["direct"]), _med(st["controller"])
        ratio = c / d if d == d and d > 0 else float("nan")
        figs.append({"name": "6. one stream through the controller (events/s, median)", "value": c,
                     "unit": "ev/s", "baseline": d, "baseline_name": "direct from the node", "ratio": ratio,
                     "target": f">= {STREAM_RATIO_TARGET:g}x direct", "met": ratio >= STREAM_RATIO_TARGET})
    for n, row in (out.get("runs") or {}).items():
        r, lib = row.get("controller-sqlite"), row.get("library")
        if r is None or lib is None:
            continue
        ratio = r["rate"] / lib["rate"] if lib["rate"] else float("nan")
        figs.append({"name": f"6. short runs/s via asm controller serve, {n} nodes, least_loaded", "value": r["rate"],
                     "unit": "runs/s", "baseline": lib["rate"], "baseline_name": "library Session directly",
                     "ratio": ratio, "target": f">= {RUNS_TARGET:,.0f} runs/s" if n == "10" else "(figure)",
                     "met": r["rate"] >= RUNS_TARGET if n == "10" else None})
    return figs


def report_thru(out: dict[str, Any]) -> None:
    cfg: ThruConfig = out["cfg"]
    st = out.get("stream")
    if st is not None:
        print(f"\n(j) one stream of {st['events']:,} events (`cat` of JSONL lines), {cfg.repeats} repeats each, "
              "interleaved; controller: asm controller serve, SQLite registry")
        print(f"  {'path':<34}{'best ev/s':>11}{'median ev/s':>13}{'vs direct':>11}{'ctl µs/event':>14}")
        d_best, d_med = _best(st["direct"]), _med(st["direct"])
        print(f"  {'direct from the node':<34}{d_best:>11,.0f}{d_med:>13,.0f}{'1.00x':>11}{'-':>14}")
        for p, label in (("controller", "through the controller"), ("before", "through the controller, before")):
            if p not in st:
                continue
            c_best, c_med = _best(st[p]), _med(st[p])
            cpu = _med(st[f"{p}_cpu"]) * 1e6 / st["events"] if st[f"{p}_cpu"] else float("nan")
            print(f"  {label:<34}{c_best:>11,.0f}{c_med:>13,.0f}{c_med / d_med:>10.2f}x{cpu:>14.2f}")
        for f in st["failures"]:
            print(f"  !! {f}")
    runs = out.get("runs")
    if runs:
        print(f"\n(k) short runs/s: {cfg.runs} runs of `true` (shell), {cfg.concurrency} in flight, least_loaded; "
              f"node agents {cfg.per_host} to a process")
        print(f"  {'nodes':>5}  {'path':<28}{'runs/s':>9}{'vs library':>11}{'p50 ms':>8}{'failed':>7}"
              f"{'ctl ms/run':>11}{'nodes ms/run':>13}")
        for n, row in runs.items():
            lib = row["library"]
            for name in ("library", "controller-sqlite", "controller-sqlite-before", "controller-memory"):
                r = row.get(name)
                if r is None:
                    continue
                label = {"library": "library Session (baseline)", "controller-sqlite": "controller, SQLite",
                         "controller-sqlite-before": "controller, SQLite, before",
                         "controller-memory": "controller, memory:"}[name]
                ctl = f"{r['ctl_ms_per_run']:.2f}" if "ctl_ms_per_run" in r else "-"
                nodes = f"{r['nodes_ms_per_run']:.2f}" if "nodes_ms_per_run" in r else "-"
                print(f"  {n:>5}  {label:<28}{r['rate']:>9.1f}{r['rate'] / lib['rate']:>10.2f}x{r['p50_ms']:>8.1f}"
                      f"{r['failed']:>7}{ctl:>11}{nodes:>13}")
                if r["first_failure"]:
                    print(f"  !! {n} nodes {label}: {r['first_failure']}")
    for f in issue15_figures(out):
        met = {True: "met", False: "NOT met", None: "-"}[f["met"]]
        print(f"  target {f['name']}: {f['value']:,.1f} {f['unit']} vs {f['baseline']:,.1f} "
              f"({f['baseline_name']}), {f['ratio']:.2f}x; {f['target']}: {met}")


async def run_issue15(quick: bool, workdir: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """bench.py --issue15's entry: the figures (printed), then the targets they decide."""
    cfg = ThruConfig()
    if quick:
        cfg.events, cfg.repeats, cfg.runs, cfg.node_counts, cfg.memory_store = 50_000, 1, 200, (10,), False
    out = await run_thru(cfg, workdir, log)
    report_thru(out)
    return issue15_figures(out)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--node-host":
        sys.exit(node_host_main(int(sys.argv[2]), sys.argv[3]))
    print("usage: scripts/bench.py --thru  (this module's own entry is --node-host N DIR)", file=sys.stderr)
    sys.exit(2)
