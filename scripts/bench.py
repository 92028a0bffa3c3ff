#!/usr/bin/env python3
"""Benchmark: run start latency and event throughput, node vs local, side by side.

    .venv/bin/python scripts/bench.py                 # default: 200 runs, 200k events
    .venv/bin/python scripts/bench.py --quick         # smoke run: 20 runs, 20k events
    .venv/bin/python scripts/bench.py --runs 500 --events 500000
    .venv/bin/python scripts/bench.py --profile       # instead: cProfile one remote query (both processes)
    .venv/bin/python scripts/bench.py --soak 10       # instead: (d) 10 minutes of back-to-back runs
    .venv/bin/python scripts/bench.py --flood         # instead: (e) output floods, node RSS sampled
    .venv/bin/python scripts/bench.py --ha            # instead: (f)-(h) HA figures on PostgreSQL (~2.5 min)
    .venv/bin/python scripts/bench.py --http          # instead: (i)-(ii) HTTP figures (issue 13, ~30 s)
    .venv/bin/python scripts/bench.py --cli           # instead: the CLI's start and output (issue 15, ~80 s)

(a) Run start latency over a warm connection. For each of ``--runs`` runs of the
    prompt ``true`` (shell provider):

    * start: ``session.stream("true")`` + first ``__anext__`` until the
      ``run_started`` event arrives;
    * complete: until the stream ends (``run_completed`` seen, stream exhausted).

    Measured through a node agent in a separate process (``asm node serve`` on
    127.0.0.1, gRPC) and through an embedded in-process ``NodeAgent``, against
    the local baseline ``asyncio.create_subprocess_exec("true", ...)`` (start =
    spawn returned; complete = spawn + read stdout to EOF + wait).

(b) Throughput: a command (``cat FILE``) prints ``--events`` JSONL lines of
    ~100 bytes; each line becomes an ``assistant_delta`` event that goes
    node -> controller -> reducer. Measured with ``session.query`` (no
    subscriber) and ``session.stream`` (an ``async for`` consumer), remote and
    embedded, against reading and ``json.loads``-ing the same lines locally
    from ``cat`` through an asyncio pipe. Each measurement is repeated 3 times
    (best and median reported); events/s = N / wall time. A run must be ok and
    carry exactly N + 3 events (run_started, N assistant_delta, result,
    run_completed), else it is reported as failed.

(d) ``--soak MINUTES``: ``--soak-concurrency`` clients run ``true`` back to back
    against one node process for MINUTES. Every ``--soak-interval`` seconds it
    prints the interval's throughput (runs/s) and the node's RSS (VmRSS), open
    fds and threads from /proc; at the end, least-squares slopes of each over
    the intervals after ``--soak-warmup`` seconds, and the throughput ratio of
    the last to the first of those intervals. Targets: ratio >= 0.8, RSS flat
    (grows less than max(5 MB, 5 %) over the measured span).

(e) ``--flood``: a run writing ``--flood-tiny-bytes`` of 2-byte lines (one event
    each) and one writing ``--flood-long-bytes`` of 1 MiB lines, each on a fresh
    node process with the default bounds, streamed over gRPC; every event is
    counted (seq without gaps) and the node's peak RSS is sampled.

(f)-(h) ``--ha`` (scripts/bench_ha.py; needs PostgreSQL, scripts/install_postgres.sh): on a throwaway
    cluster (tests/support/pg_server.py) with real node agents, (f) runs/s of ``true`` through one
    SQLite controller, one PostgreSQL replica and two (clients split across both), (g) kill -9 of the
    replica a client follows a ticker run through -> the next event via the other replica, for lease
    TTLs 3 s and 10 s (the default), (h) fleet-queue wait: a slot frees -> the queued run starts. It
    takes ~2.5 minutes on 2 CPUs, so it is NOT part of the default run (which stays ~85 s): only with
    ``--ha`` (``--ha --quick``: one round, TTL 3 s only, ~40 s). Without PostgreSQL it says so and exits 0.

(i)-(ii) ``--http`` (scripts/bench_http.py): a controller with ``--http-listen`` in front of one node
    process; (i) chat completion latency of ``shell`` ``echo x`` through the real ``openai`` client
    (and a bare httpx POST) against ``Session.query`` through the same controller over gRPC,
    interleaved, medians/p90 and the overhead in ms and as a ratio; (ii) events/s of one ``cat`` stream
    of ``--http-events`` lines through the gRPC StartRun stream and through ``POST /v1/runs`` + the
    SSE ``/v1/runs/{id}/events`` (every seq checked once), live and replayed. About 30 s on 2 CPUs
    with its own controller and node processes, so NOT part of the default run (~85 s already): only
    with ``--http`` (``--http --quick``: ~8 s).

``--cli`` (scripts/bench_cli.py): whole ``asm`` processes as a user runs them, beside their
    baselines: start (``python -c pass``, a local ``sh -c "echo hi"``, ``asm --version``/``--help``,
    ``asm run --node N "echo hi"``, the embedded ``asm run "echo hi"``; median and p90 of interleaved
    rounds) and output (2,000,000 lines through ``--output jsonl`` and ``text`` against a local
    read + ``json.loads`` of the same lines; the jsonl encoder's µs an event). Not part of the default
    run: only with ``--cli`` (``--cli --quick``: 10 rounds, 200,000 lines) or ``--issue15``.

This is a benchmark, not a test: it prints figures and exits 0 (a failed run
is reported in the table, not raised; a run whose stream never ends is cut off
by a timeout and reported as a hang). The node process (stopped by its PID)
and temp files are always cleaned up. Results and findings: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from asm_controller import EmbeddedNode, RemoteNode, Session  # noqa: E402
from asm_node import NodeAgent, NodeConfig  # noqa: E402

_READY = re.compile(r"listening on \S+ \(port (\d+), epoch (\w+)\)")

LATENCY_TARGET_MS = 5.0
THROUGHPUT_TARGET = 100_000.0
RATIO_TARGET = 0.5
THROUGHPUT_REPEATS = 3
#: Guards against a stream that never ends (it is reported as a failed run, not waited for).
LATENCY_RUN_TIMEOUT_S = 10.0
#: The shell provider's default per-command timeout is 30 s; a slow remote
#: throughput run must not be cut off by it (it would show up as a failure).
RUN_OPTIONS = {"command_timeout_ms": 600_000}


# -- node process -------------------------------------------------------------------


class NodeProcess:
    """``asm node serve`` as a child process; stopped by its PID."""

    def __init__(self, workdir: Path, profile_path: Path | None = None, extra: list[str] | None = None) -> None:
        self.extra = extra or []
        self.log_path = workdir / f"node-{time.monotonic_ns()}.log"
        self.profile_path = profile_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.epoch = ""
        self.workdir = workdir

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "wb") as log:
            prefix = ["-m", "cProfile", "-o", str(self.profile_path)] if self.profile_path else []
            self.proc = subprocess.Popen(
                [sys.executable, *prefix, "-m", "asm_cli", "node", "serve", "--listen", "127.0.0.1:0", *self.extra],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=str(self.workdir),
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    # The node's run journal in the benchmark's temp dir, not the user's state dir.
                    "ASM_NODE_STATE_DIR": str(self.log_path.with_suffix(".state")),
                },
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log_path.read_text(errors="replace"))
            if match:
                self.port, self.epoch = int(match.group(1)), match.group(2)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"node agent exited early ({self.proc.returncode}): {self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"node agent did not become ready within {timeout:g}s: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None


# -- statistics -----------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p90(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


def ms(x: float) -> str:
    return "n/a" if x != x else f"{x:8.2f}"


def rate(x: float) -> str:
    return "n/a" if x != x else f"{x:>10,.0f}"


# -- (a) start latency ------------------------------------------------------------------


async def local_once() -> tuple[float, float]:
    """The baseline: spawn ``true`` with asyncio; (spawn returned, stdout EOF + reaped), in ms."""
    PIPE = asyncio.subprocess.PIPE
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("true", stdout=PIPE, stderr=PIPE, start_new_session=True)
    t1 = time.perf_counter()
    assert proc.stdout is not None
    await proc.stdout.read()  # to EOF
    await proc.wait()
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t0) * 1000


async def session_once(session: Session) -> tuple[float, float, str | None]:
    """One run of ``true``: (run_started arrived, stream ended) in ms, and a failure description."""
    t0 = time.perf_counter()
    stream = session.stream("true")
    first = await stream.__anext__()
    t1 = time.perf_counter()
    async for _ev in stream:
        pass
    t2 = time.perf_counter()
    result = stream.result
    err = None
    if first.kind != "run_started" or result is None or not result.ok:
        err = f"first={first.kind} status={getattr(result, 'status', None)} error={getattr(result, 'error', None)}"
    return (t1 - t0) * 1000, (t2 - t0) * 1000, err


async def latency(sessions: dict[str, Session], runs: int, warmup: int) -> dict[str, dict[str, list[Any]]]:
    """Interleaved: each round runs the local baseline and then every session once, so that
    machine noise (other processes, CPU frequency) hits all of them alike."""
    out: dict[str, dict[str, list[Any]]] = {
        name: {"start": [], "complete": [], "failures": []} for name in ("local", *sessions)
    }
    for i in range(warmup + runs):
        s, c = await asyncio.wait_for(local_once(), LATENCY_RUN_TIMEOUT_S)
        if i >= warmup:
            out["local"]["start"].append(s)
            out["local"]["complete"].append(c)
        for name, session in sessions.items():
            try:
                s, c, err = await asyncio.wait_for(session_once(session), LATENCY_RUN_TIMEOUT_S)
            except TimeoutError:
                s, c, err = 0.0, 0.0, f"no end of stream after {LATENCY_RUN_TIMEOUT_S:g}s (hang)"
            if err:
                out[name]["failures"].append(err)
            elif i >= warmup:
                out[name]["start"].append(s)
                out[name]["complete"].append(c)
    return out


# -- (b) throughput ----------------------------------------------------------------------


def write_jsonl(path: Path, n: int) -> int:
    """N JSON lines of ~100 bytes each; returns the file size."""
    base = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore"
    with open(path, "w") as f:
        for i in range(n):
            head = f'{{"type":"assistant","i":{i},"text":"'
            pad = max(8, 99 - len(head) - 2)
            f.write(head + base[:pad] + '"}\n')
    return path.stat().st_size


async def local_throughput(path: Path, n: int) -> tuple[float, str | None]:
    PIPE = asyncio.subprocess.PIPE
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("cat", str(path), stdout=PIPE, limit=1 << 20)
    assert proc.stdout is not None
    count = 0
    loads = json.loads
    async for line in proc.stdout:
        loads(line)
        count += 1
    await proc.wait()
    dt = time.perf_counter() - t0
    err = None if count == n and proc.returncode == 0 else f"read {count} lines, exit {proc.returncode}"
    return dt, err


async def query_throughput(session: Session, path: Path, n: int) -> tuple[float, str | None]:
    t0 = time.perf_counter()
    result = await session.query(f"cat {path}")
    dt = time.perf_counter() - t0
    err = None
    if not result.ok or result.events != n + 3:
        err = f"status={result.status} events={result.events} (want {n + 3}) error={result.error}"
    return dt, err


async def stream_throughput(session: Session, path: Path, n: int) -> tuple[float, str | None]:
    t0 = time.perf_counter()
    stream = session.stream(f"cat {path}")
    count = 0
    async for _ev in stream:
        count += 1
    dt = time.perf_counter() - t0
    result = stream.result
    err = None
    if result is None or not result.ok or result.events != n + 3 or count != n + 3:
        err = (
            f"status={getattr(result, 'status', None)} events={getattr(result, 'events', None)} "
            f"streamed={count} (want {n + 3}) error={getattr(result, 'error', None)}"
        )
    return dt, err


def proc_cpu_s(pid: int | None) -> float:
    """user+system CPU seconds of another process (from /proc), NaN when unavailable."""
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def rss_mb(pid: int | str | None = "self") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def measure(
    fn: Callable[[], Awaitable[tuple[float, str | None]]], timeout: float, node_pid: int | None
) -> dict[str, Any]:
    """One throughput repeat: wall time, this process's CPU time, the node process's CPU time."""
    gc.collect()
    c0, n0 = time.process_time(), proc_cpu_s(node_pid)
    t0 = time.perf_counter()
    try:
        dt, err = await asyncio.wait_for(fn(), timeout)
    except TimeoutError:
        dt, err = time.perf_counter() - t0, f"no end of stream after {timeout:g}s (hang)"
    return {"wall": dt, "cpu": time.process_time() - c0, "node_cpu": proc_cpu_s(node_pid) - n0, "error": err}


# -- driver --------------------------------------------------------------------------------


async def warm(session: Session, count: int) -> None:
    for _ in range(count):
        result = await asyncio.wait_for(session.query("true"), 30)
        if not result.ok:
            raise RuntimeError(f"warm-up run failed: {result.status} {result.error}")


def throughput_timeout(n: int) -> float:
    return max(30.0, n / 5_000)


async def run_all(args: argparse.Namespace, workdir: Path, node: NodeProcess) -> dict[str, Any]:
    out: dict[str, Any] = {"latency": {}, "throughput": {}}
    remote = Session("shell", node=RemoteNode(f"127.0.0.1:{node.port}"), options=RUN_OPTIONS)
    agent = NodeAgent(NodeConfig())
    await agent.start()
    # The embedded node confines `cat` to the run's cwd: the bench files live in workdir.
    embedded = Session("shell", node=EmbeddedNode(agent), options=RUN_OPTIONS, cwd=str(workdir))
    try:
        await warm(remote, args.warmup)
        await warm(embedded, args.warmup)

        # (a) start latency
        print(
            f"[a] start latency: {args.runs} runs of 'true' per target, interleaved (after {args.warmup} warm-up runs)",
            flush=True,
        )
        t = time.perf_counter()
        out["latency"] = await latency({"remote": remote, "embedded": embedded}, args.runs, args.warmup)
        print(f"    done in {time.perf_counter() - t:.1f}s", flush=True)

        # (b) throughput
        path = workdir / "events.jsonl"
        size = write_jsonl(path, args.events)
        out["jsonl_bytes"] = size
        n = args.events
        print(
            f"[b] throughput: {n:,} lines ({size / n:.0f} B/line, {size / 1e6:.1f} MB), "
            f"{THROUGHPUT_REPEATS} interleaved repeats per case",
            flush=True,
        )
        cases: list[tuple[str, Callable[[], Awaitable[tuple[float, str | None]]], int | None]] = [
            ("local read+parse", lambda: local_throughput(path, n), None),
            ("remote query", lambda: query_throughput(remote, path, n), node.pid),
            ("remote stream", lambda: stream_throughput(remote, path, n), node.pid),
            ("embedded query", lambda: query_throughput(embedded, path, n), None),
            ("embedded stream", lambda: stream_throughput(embedded, path, n), None),
        ]
        for name, _, _ in cases:
            out["throughput"][name] = []
        t = time.perf_counter()
        for rep in range(THROUGHPUT_REPEATS):
            for name, fn, pid in cases:
                out["throughput"][name].append(await measure(fn, throughput_timeout(n), pid))
            print(f"    repeat {rep + 1}/{THROUGHPUT_REPEATS} done ({time.perf_counter() - t:.1f}s)", flush=True)
        out["memory"] = {
            "controller_rss_mb": rss_mb(),
            "node_rss_mb": rss_mb(node.pid),
            "remote_session_runs": remote.stats()["runs"],
            "embedded_session_runs": embedded.stats()["runs"],
            "embedded_agent_runs": len(agent.runs),
        }
    finally:
        await remote.stop()
        await embedded.stop()
        await agent.stop()
    return out


async def run_profile(args: argparse.Namespace, workdir: Path, node: NodeProcess) -> dict[str, Any]:
    """--profile: one remote query throughput run under cProfile (the node runs under cProfile too)."""
    remote = Session("shell", node=RemoteNode(f"127.0.0.1:{node.port}"), options=RUN_OPTIONS)
    try:
        await warm(remote, args.warmup)
        path = workdir / "events.jsonl"
        write_jsonl(path, args.events)
        print(f"[profile] one remote query of {args.events:,} events under cProfile", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        r = await measure(
            lambda: query_throughput(remote, path, args.events), throughput_timeout(args.events), node.pid
        )
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(15)
        return {"run": r, "controller": buf.getvalue()}
    finally:
        await remote.stop()


def _best_med(rows: list[dict[str, Any]], n: int) -> tuple[float, float, list[str]]:
    rates = [n / r["wall"] for r in rows if not r["error"]]
    return max(rates, default=float("nan")), median(rates), [r["error"] for r in rows if r["error"]]


def report(args: argparse.Namespace, out: dict[str, Any], node_pid: int | None) -> None:
    print()
    print("=" * 86)
    print(
        f"asm benchmark  python {platform.python_version()}  nproc {os.cpu_count()}  "
        f"{platform.system()} {platform.machine()}  runs {args.runs}  events {args.events:,}"
    )
    print("=" * 86)

    lat = out["latency"]
    loc = lat["local"]
    print(f"\n(a) run start latency, prompt 'true', {args.runs} runs per target, ms")
    print(
        f"{'':<24}{'start p50':>10}{'start p90':>10}{'compl p50':>10}{'compl p90':>10}"
        f"{'ovh start':>11}{'ovh compl':>11}"
    )
    verdicts: list[str] = []
    labels = {"local": "local asyncio spawn", "remote": "remote node (gRPC)", "embedded": "embedded node"}
    for name in ("local", "remote", "embedded"):
        d = lat[name]
        ds = median(d["start"]) - median(loc["start"])
        dc = median(d["complete"]) - median(loc["complete"])
        extra = "" if name == "local" else f"{ms(ds):>11}{ms(dc):>11}"
        print(
            f"{labels[name]:<24}{ms(median(d['start'])):>10}{ms(p90(d['start'])):>10}"
            f"{ms(median(d['complete'])):>10}{ms(p90(d['complete'])):>10}{extra}"
        )
        if d["failures"]:
            print(f"    !! {len(d['failures'])} failed run(s), first: {d['failures'][0]}")
        if name != "local":
            ok = ds <= LATENCY_TARGET_MS
            verdicts.append(
                f"{labels[name]}: median start overhead {ds:.2f} ms "
                f"({'meets' if ok else 'MISSES'} <= {LATENCY_TARGET_MS:g} ms); "
                f"median complete overhead {dc:.2f} ms"
            )
    print(
        "(ovh = median minus the local median; start = run_started received / spawn returned;"
        " compl = stream ended / stdout EOF + reaped)"
    )

    thr = out["throughput"]
    n = args.events
    local_best, local_med, _ = _best_med(thr["local read+parse"], n)
    print(
        f"\n(b) throughput, {n:,} events of ~{out['jsonl_bytes'] / n:.0f} B, "
        f"{THROUGHPUT_REPEATS} repeats, events/s (CPU s = median per run)"
    )
    print(
        f"{'':<20}{'best':>11}{'median':>11}{'best/local':>11}{'med/local':>10}"
        f"{'bench CPU s':>12}{'node CPU s':>11}{'wall s':>8}"
    )
    for name, rows in thr.items():
        best, med, errors = _best_med(rows, n)
        ratio = (
            f"{'':>11}{'':>10}" if name.startswith("local") else f"{best / local_best:>10.2f}x{med / local_med:>9.2f}x"
        )
        ok_rows = [r for r in rows if not r["error"]] or rows
        cpu, ncpu, wall = (median([r[k] for r in ok_rows]) for k in ("cpu", "node_cpu", "wall"))
        ncpu_s = f"{ncpu:>11.2f}" if ncpu == ncpu else f"{'-':>11}"
        print(f"{name:<20}{rate(best):>11}{rate(med):>11}{ratio}{cpu:>12.2f}{ncpu_s}{wall:>8.2f}")
        for e in errors:
            print(f"    !! failed repeat: {e}")
        if not name.startswith("local"):
            ok_abs, ok_rel = best >= THROUGHPUT_TARGET, best >= RATIO_TARGET * local_best
            verdicts.append(
                f"{name}: best {best:,.0f} ev/s ({'meets' if ok_abs else 'MISSES'} >= {THROUGHPUT_TARGET:,.0f}), "
                f"{best / local_best:.2f}x local ({'meets' if ok_rel else 'MISSES'} >= {RATIO_TARGET}x)"
            )
    print(
        "(bench CPU = this process: controller, reducer and, for embedded, the node agent too;"
        " node CPU = the node agent process)"
    )

    mem = out.get("memory")
    if mem:
        print(
            f"\nmemory at the end: benchmark process RSS {mem['controller_rss_mb']:.0f} MB "
            f"(remote session holds {mem['remote_session_runs']} runs, embedded session "
            f"{mem['embedded_session_runs']}, embedded agent retains {mem['embedded_agent_runs']}), "
            f"node process RSS {mem['node_rss_mb']:.0f} MB"
        )

    print("\ntargets:")
    for v in verdicts:
        print(f"  - {v}")


def report_profile(args: argparse.Namespace, out: dict[str, Any], node_stats: str) -> None:
    r = out["run"]
    print(
        f"\ncProfile, one remote query of {args.events:,} events: {r['wall']:.2f}s wall "
        f"({args.events / r['wall']:,.0f} ev/s under the profiler), benchmark CPU {r['cpu']:.2f}s, "
        f"node CPU {r['node_cpu']:.2f}s{', ERROR: ' + r['error'] if r['error'] else ''}"
    )
    print("\n--- benchmark (controller) process, top 15 by cumulative time ---")
    print(out["controller"].rstrip())
    print("\n--- node agent process (whole life: warm-up + this run), top 15 by internal time ---")
    print(node_stats.rstrip())


# -- (c) faults: detection, reconnect-and-replay, forced reconnects ---------------------------------


def _ticker(n: int, interval: float) -> str:
    code = f"import time\nfor i in range({n}):\n    print(i, flush=True)\n    time.sleep({interval})"
    encoded = base64.b64encode(code.encode()).decode()
    return f"{os.path.basename(sys.executable)} -c \"exec(__import__('base64').b64decode('{encoded}'))\""


async def run_faults(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from asm_controller import LivenessConfig
    from tests.support.tcp_proxy import TcpProxy  # the same controllable proxy the fault tests use

    live = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0, node_lost_timeout_s=args.lost_timeout)
    extra = ["--shell-allow", os.path.basename(sys.executable), "--detach-grace", "5"]
    out: dict[str, Any] = {"lost_timeout": args.lost_timeout, "kill_to_lost": [], "replay": []}

    # SIGKILL of the agent running the run -> node_lost reaches the subscriber.
    for _ in range(3 if not args.quick else 1):
        node = NodeProcess(workdir, extra=extra)
        node.start()
        try:
            async with Session("shell", node=RemoteNode(f"127.0.0.1:{node.port}", liveness=live)) as s:
                stream = s.stream("sleep 60")
                await stream.__anext__()
                t0 = time.perf_counter()
                assert node.proc is not None
                node.proc.send_signal(signal.SIGKILL)
                async for _ev in stream:
                    pass
                kind = stream.result.error.kind if stream.result and stream.result.error else "none"
                out["kill_to_lost"].append((time.perf_counter() - t0, kind))
        finally:
            node.stop()

    # SIGSTOP (a hung agent) -> node_lost: the liveness bound (lost at last_ok + node_lost_timeout).
    out["stop_to_lost"] = []
    for _ in range(2 if not args.quick else 1):
        node = NodeProcess(workdir, extra=extra)
        node.start()
        assert node.proc is not None
        try:
            async with Session("shell", node=RemoteNode(f"127.0.0.1:{node.port}", liveness=live)) as s:
                stream = s.stream("sleep 60")
                await stream.__anext__()
                await asyncio.sleep(1.0)
                node.proc.send_signal(signal.SIGSTOP)
                t0 = time.perf_counter()
                async for _ev in stream:
                    pass
                out["stop_to_lost"].append(time.perf_counter() - t0)
        finally:
            node.proc.send_signal(signal.SIGCONT)
            node.stop()

    # Failover latency: a run sent 0.5 s after its (connected, preferred) node was killed -9.
    out["failover"] = []
    for _ in range(3 if not args.quick else 1):
        a, b = NodeProcess(workdir, extra=extra), NodeProcess(workdir, extra=extra)
        a.start()
        b.start()
        assert a.proc is not None
        try:
            nodes = [RemoteNode(f"127.0.0.1:{a.port}", liveness=live), RemoteNode(f"127.0.0.1:{b.port}", liveness=live)]
            async with Session("shell", node=nodes) as s:
                await s.query("echo warm")
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait()
                await asyncio.sleep(0.5)
                t0 = time.perf_counter()
                moved = await s.query("echo moved")
                where = "other" if moved.ok and moved.metadata.get("node_address") == nodes[1].address else "FAILED"
                out["failover"].append((time.perf_counter() - t0, where))
        finally:
            a.stop()
            b.stop()

    node = NodeProcess(workdir, extra=extra)
    node.start()
    proxy = await TcpProxy(node.port).start()
    try:
        # Reconnect and replay: cut the connection, restore it at once, time until the next event arrives.
        async with Session("shell", node=RemoteNode(proxy.address, liveness=live)) as s:
            stream = s.stream(_ticker(400, 0.01))
            cut_at: float | None = None
            conns = 0
            async for ev in stream:
                # Time to the first event that came over the new connection (not one already queued here).
                if cut_at is not None and proxy.connections > conns and ev.kind == "assistant_delta":
                    out["replay"].append(time.perf_counter() - cut_at)
                    cut_at = None
                if ev.kind == "assistant_delta" and int(ev.pb.assistant_delta.content) % 20 == 5 and cut_at is None:
                    conns = proxy.connections
                    proxy.cut()
                    proxy.restore()
                    cut_at = time.perf_counter()

        # 100 forced reconnects under load: every event must arrive exactly once.
        n_lines = 40_000 if not args.quick else 8_000
        async with Session("shell", node=RemoteNode(proxy.address, liveness=live)) as s:
            stream = s.stream(_ticker(n_lines, 0.0005), options=RUN_OPTIONS)  # not cut off at 30 s when loaded
            cuts = 0
            target = 100 if not args.quick else 20

            async def cutter() -> None:
                nonlocal cuts
                while cuts < target:
                    await asyncio.sleep(0.12)
                    proxy.cut()
                    proxy.restore()
                    cuts += 1

            task = asyncio.create_task(cutter())
            seqs: list[int] = []
            lines: list[str] = []
            t0 = time.perf_counter()
            async for ev in stream:
                seqs.append(ev.seq)
                if ev.kind == "assistant_delta":
                    lines.append(ev.pb.assistant_delta.content)
            task.cancel()
            wall = time.perf_counter() - t0
            result = stream.result
            expected = [f"{i}\n" for i in range(n_lines)]
            out["forced"] = {
                "cuts": cuts, "reconnects": result.metadata.get("reconnects", 0) if result else 0,
                "events": len(seqs), "lines": n_lines,
                "lost": len(set(expected) - set(lines)), "duplicated": len(seqs) - len(set(seqs)),
                "in_order": seqs == sorted(seqs), "ok": bool(result and result.ok), "wall": wall,
            }
    finally:
        await proxy.stop()
        node.stop()

    # The client's default bound (8 s): a controller restart (a new process) has to fit inside it.
    out["controller"] = await controller_figures(args, workdir, LivenessConfig(
        heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0, node_lost_timeout_s=8.0))

    # Node RSS during a 2M-line run on a node with the default bounds (back-pressure, bounded retention).
    from tests.support.flood import flood, tiny_lines
    prompt, n_rss = tiny_lines(sys.executable, 2 * RSS_RUN_LINES)
    node = NodeProcess(workdir, extra=["--shell-allow", sys.executable, "--shell-allow", os.path.basename(sys.executable)])
    node.start()
    try:
        assert node.pid is not None
        out["rss_run"] = await flood(f"127.0.0.1:{node.port}", node.pid, "rss-run", prompt, n_rss)
    finally:
        node.stop()
    return out


async def controller_figures(args: argparse.Namespace, workdir: Path, live: Any) -> dict[str, Any]:
    """Controller restart -> next event at the following client; throughput through a controller by registry."""
    from asm_node.testing import serve_controller

    extra = ["--shell-allow", os.path.basename(sys.executable)]
    out: dict[str, Any] = {"restart": [], "through": {}}
    env = {"XDG_STATE_HOME": str(workdir / "xdg")}
    node = NodeProcess(workdir, extra=extra)
    node.start()
    try:
        node_addr = f"127.0.0.1:{node.port}"
        for i in range(3 if not args.quick else 1):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            state = f"sqlite:///{workdir / f'ctl-{i}.sqlite3'}"
            ctl = serve_controller(workdir, "--node", node_addr, "--state", state, listen=f"127.0.0.1:{port}", env=env)
            try:
                async with Session("shell", node=RemoteNode(f"127.0.0.1:{port}", liveness=live)) as s:
                    stream = s.stream(_ticker(300, 0.01))
                    seqs: list[int] = []
                    killed_at = restarted_at = None
                    gap = None
                    async for ev in stream:
                        seqs.append(ev.seq)
                        if killed_at is not None and gap is None and ev.kind == "assistant_delta":
                            now = time.perf_counter()
                            assert restarted_at is not None
                            gap = (now - killed_at, now - restarted_at)
                        if killed_at is None and len(seqs) == 30:
                            ctl.proc.send_signal(signal.SIGKILL)
                            ctl.proc.wait()
                            killed_at = time.perf_counter()
                            ctl = serve_controller(workdir, "--node", node_addr, "--state", state,
                                                   listen=f"127.0.0.1:{port}", env=env)
                            restarted_at = time.perf_counter()
                    once = seqs == list(range(1, len(seqs) + 1))
                    ok = bool(stream.result and stream.result.ok)
                    if gap is not None:
                        out["restart"].append((*gap, once and ok))
            finally:
                ctl.stop()
        # The cost of the durable registry: one run's events through a controller, memory vs SQLite.
        n = 100_000 if not args.quick else 20_000
        path = workdir / "through.jsonl"
        write_jsonl(path, n)
        for name in ("memory", "sqlite"):
            state = "memory:" if name == "memory" else f"sqlite:///{workdir / 'through.sqlite3'}"
            ctl = serve_controller(workdir, "--node", node_addr, "--state", state, env=env)
            port = ctl.port
            try:
                async with Session("shell", node=RemoteNode(f"127.0.0.1:{port}", liveness=live)) as s:
                    # Start latency through the controller: the registry records every run (durably for
                    # SQLite) before its StartRun leaves for the node.
                    starts = []
                    for _ in range(5):
                        await s.query("true")
                    for _ in range(40 if not args.quick else 10):
                        t1 = time.perf_counter()
                        r = await s.query("true")
                        if r.ok:
                            starts.append(time.perf_counter() - t1)
                    out.setdefault("start", {})[name] = median(starts) if starts else float("nan")
                    t0 = time.perf_counter()
                    count = 0
                    async for _ev in s.stream(f"cat {path}", cwd=str(workdir), options=RUN_OPTIONS):
                        count += 1
                    out["through"][name] = count / (time.perf_counter() - t0)
            finally:
                ctl.stop()
    finally:
        node.stop()
    return out


#: Lines of the (c) "node RSS during a run" figure (issue 10: 2M lines under 256 MB).
RSS_RUN_LINES = 2_000_000


def report_faults(out: dict[str, Any]) -> None:
    print(f"\n(c) faults (node_lost_timeout {out['lost_timeout']:g}s, heartbeat 0.5s)")
    kills = out["kill_to_lost"]
    if kills:
        times = [t for t, _ in kills]
        print(f"  SIGKILL of the node -> node_lost at the subscriber: median {median(times):.2f}s, "
              f"max {max(times):.2f}s over {len(times)} (kinds: {', '.join(sorted({k for _, k in kills}))})")
    stops = out.get("stop_to_lost") or []
    if stops:
        print(f"  SIGSTOP of the node -> node_lost: median {median(stops):.2f}s, min {min(stops):.2f}s, "
              f"max {max(stops):.2f}s over {len(stops)} (bound {out['lost_timeout']:g}s)")
    fo = out.get("failover") or []
    if fo:
        lat = [t for t, _ in fo]
        print(f"  run sent 0.5 s after its node was killed -9 -> done on the other node: median "
              f"{ms(median(lat) * 1000)} ms, max {ms(max(lat) * 1000)} ms over {len(lat)} "
              f"({', '.join(sorted({w for _, w in fo}))})")
    if out["replay"]:
        print(f"  cut + immediate restore -> next event: median {ms(median(out['replay']) * 1000)} ms, "
              f"p90 {ms(p90(out['replay']) * 1000)} ms over {len(out['replay'])} cuts")
    f = out.get("forced")
    if f:
        print(f"  {f['cuts']} forced reconnects under load ({f['lines']:,} lines, {f['reconnects']} re-attaches, "
              f"{f['wall']:.1f}s): lost {f['lost']}, duplicated {f['duplicated']}, "
              f"in order {f['in_order']}, run ok {f['ok']}")
    c = out.get("controller") or {}
    if c.get("restart"):
        kill = [k for k, _, _ in c["restart"]]
        start = [r for _, r, _ in c["restart"]]
        print(f"  controller kill -9 + restart (SQLite registry) -> next event at the following client: median "
              f"{ms(median(kill) * 1000)} ms after the kill, {ms(median(start) * 1000)} ms after the new "
              f"controller was ready, over {len(kill)} (every event once, run ok: "
              f"{all(ok for _, _, ok in c['restart'])})")
    by_registry = c.get("start") or {}
    if len(by_registry) == 2:
        mem_s, sql_s = by_registry["memory"], by_registry["sqlite"]
        print(f"  a run of 'true' through a controller, completed: median {ms(mem_s * 1000)} ms with a memory "
              f"registry, {ms(sql_s * 1000)} ms with SQLite ({sql_s / mem_s:.2f}x)")
    through = c.get("through") or {}
    if len(through) == 2:
        print(f"  one run's events through a controller: memory registry {rate(through['memory'])}, SQLite "
              f"{rate(through['sqlite'])} ({through['sqlite'] / through['memory']:.2f}x)")
    r = out.get("rss_run")
    if r:
        ok = r.error is None and not r.gaps and r.deltas == r.lines
        print(f"  node RSS during a {r.lines:,}-line run (default node, gRPC follower): {r.start_rss_mb:.0f} -> "
              f"peak {r.peak_rss_mb:.0f} MB (target < 256 MB: {'ok' if r.peak_rss_mb < 256 else 'MISSED'}), "
              f"{r.wall_s:.1f}s, {'every line once' if ok else f'INCOMPLETE: {r.deltas:,} lines, error {r.error}'}")


# -- (d) soak ---------------------------------------------------------------------------------


def proc_figures(pid: int) -> tuple[float, int, int]:
    """(VmRSS in MB, open fds, threads) of a process, from /proc; NaN/-1 when unavailable."""
    rss, threads = float("nan"), -1
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    return rss, fds, threads


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (NaN with fewer than two points)."""
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


async def run_soak(args: argparse.Namespace, node: NodeProcess) -> dict[str, Any]:
    from asm_controller import GrpcNodeClient
    from asm_wire import pb

    assert node.pid is not None
    pid, address = node.pid, f"127.0.0.1:{node.port}"
    duration = args.soak * 60
    sessions = [Session("shell", node=RemoteNode(address), options=RUN_OPTIONS) for _ in range(args.soak_concurrency)]
    done = 0
    failures: list[str] = []
    stop_at = time.monotonic() + duration

    failed = 0

    def fail(what: str) -> None:
        nonlocal failed
        failed += 1
        if len(failures) < 20:
            failures.append(what)

    async def worker(session: Session) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            try:
                result = await asyncio.wait_for(session.query("true"), 30)
            except Exception as exc:  # a soak reports a failed run, it does not stop
                fail(f"{type(exc).__name__}: {exc}")
                continue
            if result.ok:
                done += 1
            else:
                fail(f"{result.status}: {result.error}")

    rows: list[dict[str, float]] = []
    print(f"[d] soak: {args.soak:g} min of 'true' runs, {args.soak_concurrency} clients, node pid {pid}; "
          f"interval {args.soak_interval:g}s, warm-up {args.soak_warmup:g}s", flush=True)
    print(f"    {'t(s)':>6} {'runs/s':>8} {'rss MB':>8} {'fds':>5} {'threads':>7} {'client MB':>9}", flush=True)

    async def sampler() -> None:
        t0 = last_t = time.monotonic()
        last_done = 0
        while True:
            await asyncio.sleep(min(args.soak_interval, max(0.0, stop_at - time.monotonic())))
            now = time.monotonic()
            rss, fds, threads = proc_figures(pid)
            row = {"t": now - t0, "rate": (done - last_done) / (now - last_t), "rss": rss, "fds": fds,
                   "threads": threads, "client_rss": rss_mb()}
            rows.append(row)
            last_t, last_done = now, done
            print(f"    {row['t']:6.0f} {row['rate']:8.0f} {rss:8.1f} {fds:5d} {threads:7d} {row['client_rss']:9.1f}",
                  flush=True)
            if now >= stop_at:
                return

    try:
        await warm(sessions[0], args.warmup)
        tasks = [asyncio.create_task(worker(s)) for s in sessions]
        await sampler()
        await asyncio.gather(*tasks)
        client = GrpcNodeClient(RemoteNode(address))
        try:
            hs = await client.handshake(pb.HandshakeRequest(), timeout=30)
        finally:
            await client.close()
    finally:
        for session in sessions:
            await session.stop()
    return {"rows": rows, "runs": done, "failures": failures, "failed": failed, "duration": duration,
            "retained_runs": hs.load.retained_runs, "active_runs": hs.load.active_runs}


def report_soak(args: argparse.Namespace, out: dict[str, Any]) -> None:
    rows = out["rows"]
    print(f"\n(d) soak: {out['runs']:,} runs in {out['duration']:.0f}s ({out['runs'] / out['duration']:.0f} runs/s), "
          f"{out['failed']} failed; node retains {out['retained_runs']} finished runs, "
          f"{out['active_runs']} active at the end")
    for f in out["failures"][:3]:
        print(f"    failure: {f}")
    # Intervals that started after the warm-up (a short last interval is measured like the others).
    measured = [r for i, r in enumerate(rows) if (rows[i - 1]["t"] if i else 0.0) >= args.soak_warmup]
    if len(measured) < 2:
        print("    fewer than two intervals after the warm-up: no slopes (use a longer --soak or a shorter interval)")
        return
    ts = [r["t"] / 60 for r in measured]
    for key, unit in (("rate", "runs/s"), ("rss", "MB"), ("fds", "fds"), ("threads", "threads"),
                      ("client_rss", "client MB")):
        ys = [float(r[key]) for r in measured]
        print(f"    {key:>10}: first {ys[0]:8.1f}  last {ys[-1]:8.1f}  min {min(ys):8.1f}  max {max(ys):8.1f}  "
              f"slope {slope(ts, ys):+8.2f} {unit}/min")
    first, last = measured[0], measured[-1]
    ratio = last["rate"] / first["rate"] if first["rate"] else float("nan")
    span_min = ts[-1] - ts[0]
    rss_growth = slope(ts, [r["rss"] for r in measured]) * span_min
    rss_allow = max(5.0, 0.05 * first["rss"])
    print(f"    throughput last/first interval after warm-up: {ratio:.2f} (target >= 0.80: "
          f"{'ok' if ratio >= 0.8 else 'MISSED'})")
    print(f"    RSS trend over the {span_min:.1f} measured min: {rss_growth:+.1f} MB (flat target: < {rss_allow:.1f} MB: "
          f"{'ok' if rss_growth < rss_allow else 'MISSED'})")


# -- (e) flood --------------------------------------------------------------------------------


def run_flood(args: argparse.Namespace, workdir: Path) -> list[tuple[str, Any]]:
    from tests.support.flood import flood, long_lines, tiny_lines

    py = sys.executable
    allow = ["--shell-allow", py, "--shell-allow", os.path.basename(py)]
    out: list[tuple[str, Any]] = []
    cases = [("tiny", *tiny_lines(py, args.flood_tiny_bytes)), ("long", *long_lines(py, args.flood_long_bytes))]
    for name, prompt, lines in cases:
        extra = list(allow)
        if name == "tiny" and args.flood_replay_events:
            os.environ["ASM_NODE_REPLAY_BUFFER_EVENTS"] = str(args.flood_replay_events)
        node = NodeProcess(workdir, extra=extra)
        try:
            node.start()
            assert node.pid is not None
            print(f"[e] flood {name}: {lines:,} lines on node pid {node.pid}", flush=True)
            out.append((name, asyncio.run(flood(f"127.0.0.1:{node.port}", node.pid, f"flood-{name}", prompt, lines))))
        finally:
            os.environ.pop("ASM_NODE_REPLAY_BUFFER_EVENTS", None)
            node.stop()
    return out


def report_flood(out: list[tuple[str, Any]]) -> None:
    print("\n(e) flood: every event streamed from a node process over gRPC, node RSS sampled every 20 ms")
    for name, r in out:
        ok = r.error is None and not r.gaps and r.deltas == r.lines and r.events == r.lines + 3
        print(f"  {name:<5} {r.lines:>12,} lines {r.delta_bytes / 2**20:9.1f} MiB  {r.wall_s:7.1f}s  "
              f"{r.events_per_s:>10,.0f} ev/s {r.delta_bytes / 2**20 / r.wall_s if r.wall_s else 0:7.1f} MiB/s  "
              f"node RSS {r.start_rss_mb:.0f} -> peak {r.peak_rss_mb:.0f} (end {r.end_rss_mb:.0f}) MB  "
              f"{'all events' if ok else f'INCOMPLETE: {r.events} events, error {r.error}, gaps {r.gaps[:3]}'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="latency runs per target (default 200; 20 with --quick)")
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help="JSONL lines for the throughput runs (default 200000; 20000 with --quick)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="warm-up runs before timing (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run with small N")
    parser.add_argument("--lost-timeout", type=float, default=3.0,
                        help="node_lost_timeout for the fault figures (default 3 s; the product default is 8 s)")
    parser.add_argument("--no-faults", action="store_true", help="skip the (c) fault figures")
    parser.add_argument("--controller-only", action="store_true",
                        help="only (c)'s controller figures: restart -> next event, throughput by registry")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark: one remote query throughput run under cProfile, with the "
        "node agent under cProfile too; prints the top 15 functions of each process",
    )
    parser.add_argument("--soak", type=float, metavar="MINUTES",
                        help="instead of the benchmark: (d) back-to-back runs for MINUTES, with RSS/fd/thread slopes")
    parser.add_argument("--soak-interval", type=float, default=None, metavar="SECONDS",
                        help="soak sampling interval (default 60 s; 10 s for a soak under 5 minutes)")
    parser.add_argument("--soak-warmup", type=float, default=None, metavar="SECONDS",
                        help="soak intervals starting before this are not in the slopes (default: one interval)")
    parser.add_argument("--soak-concurrency", type=int, default=4, metavar="N", help="soak clients (default 4)")
    parser.add_argument("--ha", action="store_true",
                        help="instead of the benchmark: (f)-(h) HA figures on a throwaway PostgreSQL (~2.5 min)")
    parser.add_argument("--ha-runs", type=int, default=None, metavar="N",
                        help="(f) runs per case per round (default 300; 60 with --quick)")
    parser.add_argument("--ha-concurrency", type=int, default=8, metavar="N", help="(f) clients (default 8)")
    parser.add_argument("--http", action="store_true",
                        help="instead of the benchmark: (i)-(ii) HTTP figures (chat completion overhead, SSE events/s)")
    parser.add_argument("--http-runs", type=int, default=None, metavar="N",
                        help="(i) completions per path (default 200; 30 with --quick)")
    parser.add_argument("--http-events", type=int, default=None, metavar="N",
                        help="(ii) lines of the stream run (default 100000; 20000 with --quick)")
    parser.add_argument("--thru", action="store_true",
                        help="instead of the benchmark: (j)-(k) controller throughput (one stream, short runs/s at "
                        "10/50 nodes; ~2 min)")
    parser.add_argument("--thru-runs", type=int, default=None, metavar="N", help="(k) short runs per case (default 1000)")
    parser.add_argument("--thru-events", type=int, default=None, metavar="N",
                        help="(j) lines of the stream run (default 200000)")
    parser.add_argument("--thru-baseline", type=Path, default=None, metavar="DIR",
                        help="(j)-(k): also measure the controller of the checkout in DIR (e.g. `git archive main`) "
                        "beside this one's, interleaved (before/after)")
    parser.add_argument("--issue15", "--all15", action="store_true",
                        help="instead of the benchmark: every issue-15 figure in one run (scripts/bench_cli.py, "
                        "bench_scale.py, bench_thru.py where present) and a summary: figure, baseline, ratio, met")
    parser.add_argument("--compare-ssh", metavar="USER@127.0.0.1", default=None,
                        help="asm vs ssh (fresh and multiplexed) for `echo hi` and a 2M-line command, against an "
                        "sshd on this machine with key auth (alone, or with --issue15)")
    parser.add_argument("--scale", action="store_true",
                        help="instead of the benchmark: (m)-(o) many runs on a node, the watchdog, latency under load")
    parser.add_argument("--scale-before", type=Path, default=None, metavar="DIR",
                        help="--scale also measures the code in DIR (e.g. a checkout of main), side by side")
    parser.add_argument("--scale-sizes", default="100,500,1000", metavar="N,N",
                        help="--scale: concurrent sleeping runs per measurement (default 100,500,1000)")
    parser.add_argument("--cli", action="store_true",
                        help="instead of the benchmark: the CLI's start and output figures (bench_cli.py)")
    parser.add_argument("--cli-runs", type=int, default=None, metavar="N",
                        help="--cli: interleaved start rounds (default 30; 10 with --quick)")
    parser.add_argument("--cli-lines", type=int, default=None, metavar="N",
                        help="--cli: output lines (default 2,000,000; 200,000 with --quick)")
    parser.add_argument("--flood", action="store_true", help="instead of the benchmark: (e) output floods")
    parser.add_argument("--flood-tiny-bytes", type=int, default=4_000_000, metavar="B",
                        help="bytes of 2-byte lines for --flood (default 4 MB = 2M events; the issue asks 1 GB)")
    parser.add_argument("--flood-replay-events", type=int, default=0, metavar="N",
                        help="replay_buffer_events of the tiny-flood node (default 0: the node's default; "
                        "the node applies back-pressure, so no value is needed to get every event)")
    parser.add_argument("--flood-long-bytes", type=int, default=256 * 2**20, metavar="B",
                        help="bytes of 1 MiB lines for --flood (default 256 MiB)")
    args = parser.parse_args()
    if args.issue15:
        return main_issue15(args)
    if args.thru:
        return main_thru(args)
    if args.compare_ssh is not None:
        return main_ssh(args)
    if args.ha:
        return main_ha(args, parser)
    if args.http:
        return main_http(args, parser)
    if args.scale:
        return main_scale(args, parser)
    if args.cli:
        return main_cli(args, parser)
    if args.controller_only:
        return main_controller(args)
    if args.soak is not None or args.flood:
        return main_soak_flood(args, parser)
    if args.runs is None:
        args.runs = 20 if args.quick else 200
    if args.events is None:
        args.events = 20_000 if args.quick else 200_000
    if args.runs < 1 or args.events < 1:
        parser.error("--runs and --events must be >= 1")
    if shutil.which("true") is None or shutil.which("cat") is None:
        print("bench: 'true' and 'cat' must be on PATH", file=sys.stderr)
        return 0

    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="asm-bench-"))
    node = NodeProcess(workdir, workdir / "node.prof" if args.profile else None)
    node_pid: int | None = None
    out: dict[str, Any] | None = None
    faults: dict[str, Any] | None = None
    node_stats = ""
    try:
        node.start()
        node_pid = node.pid
        print(f"node agent pid {node_pid} on 127.0.0.1:{node.port} (epoch {node.epoch})", flush=True)
        out = asyncio.run((run_profile if args.profile else run_all)(args, workdir, node))
        node.stop()
        if not args.profile and not args.no_faults:
            faults = asyncio.run(run_faults(args, workdir))
        if args.profile:
            node.stop()  # SIGTERM: the node exits cleanly and cProfile writes its file
            buf = io.StringIO()
            try:
                pstats.Stats(str(workdir / "node.prof"), stream=buf).sort_stats("tottime").print_stats(15)
            except (OSError, TypeError, EOFError) as exc:
                buf.write(f"(no node profile: {exc})")
            node_stats = buf.getvalue()
    except BaseException as exc:  # a benchmark reports, it does not crash
        if isinstance(exc, KeyboardInterrupt):
            print("bench: interrupted", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"bench: aborted: {exc}", file=sys.stderr)
            log = node.log()
            if log:
                print(f"--- node log (last 2000 chars) ---\n{log[-2000:]}", file=sys.stderr)
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if out is not None:
        if args.profile:
            report_profile(args, out, node_stats)
        else:
            report(args, out, node_pid)
    if faults is not None:
        report_faults(faults)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f}s")
    return 0


def main_controller(args: argparse.Namespace) -> int:
    from asm_controller import LivenessConfig

    workdir = Path(tempfile.mkdtemp(prefix="asm-bench-"))
    live = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0, node_lost_timeout_s=8.0)
    try:
        out = asyncio.run(controller_figures(args, workdir, live))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report_faults({"lost_timeout": 8.0, "kill_to_lost": [], "replay": [], "controller": out})
    return 0


def main_ha(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import bench_ha  # scripts/ is this script's directory, first on sys.path

    cfg = bench_ha.HaConfig(concurrency=args.ha_concurrency)
    cfg.runs = args.ha_runs if args.ha_runs is not None else (60 if args.quick else cfg.runs)
    if args.quick:
        cfg.rounds, cfg.takeovers, cfg.queue_reps, cfg.ttls = 1, 1, 3, (3.0,)
    if cfg.runs < 1 or cfg.concurrency < 1:
        parser.error("--ha-runs and --ha-concurrency must be >= 1")
    print(f"asm bench --ha  python {platform.python_version()}  nproc {os.cpu_count()}  {platform.system()} "
          f"{platform.machine()}  (figures on a shared machine vary with its load)", flush=True)
    if not bench_ha.available():
        print("bench: --ha needs PostgreSQL (scripts/install_postgres.sh); nothing measured", file=sys.stderr)
        return 0
    out = run_mode("asm-bench-ha-", lambda workdir: bench_ha.run_ha(cfg, workdir, lambda line: print(line, flush=True)))
    if out is not None:
        bench_ha.report_ha(out)
    return 0



def run_mode(prefix: str, run: Callable[[Path], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any] | None:
    """One benchmark mode in its own scratch directory: its figures, or None after a failure is
    reported (a benchmark reports, it does not crash)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return asyncio.run(run(workdir))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            print("bench: interrupted", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"bench: aborted: {exc}", file=sys.stderr)
        return None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

def main_http(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import bench_http  # scripts/ is this script's directory, first on sys.path

    cfg = bench_http.HttpConfig(warmup=args.warmup)
    cfg.runs = args.http_runs if args.http_runs is not None else (30 if args.quick else cfg.runs)
    cfg.events = args.http_events if args.http_events is not None else (20_000 if args.quick else cfg.events)
    if args.quick:
        cfg.repeats = 1
    if cfg.runs < 1 or cfg.events < 1:
        parser.error("--http-runs and --http-events must be >= 1")
    t_start = time.perf_counter()
    print(f"asm bench --http  python {platform.python_version()}  nproc {os.cpu_count()}  {platform.system()} "
          f"{platform.machine()}  (figures on a shared machine vary with its load)", flush=True)
    out = run_mode("asm-bench-http-", lambda workdir: bench_http.run_http(cfg, workdir, lambda line: print(line, flush=True)))
    if out is not None:
        bench_http.report_http(out)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f}s")
    return 0


# -- issue 15 -------------------------------------------------------------------------------------------

#: The issue-15 benchmark modules, in the order their figures are printed. Each may offer
#: ``async run_issue15(quick, workdir, log) -> list[target dict]`` (keys: name, value, unit, baseline,
#: baseline_name, ratio, target, met: True/False/None for a figure without a target); it prints its
#: own tables and returns the targets for the summary. A module that is missing or has no such
#: function is reported as skipped.
ISSUE15_MODULES = ("bench_cli", "bench_scale", "bench_thru")


def machine_details() -> str:
    """nproc, CPU model, kernel, Python, load: the line every recorded figure needs beside it."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = "?"
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return (f"nproc {os.cpu_count()}, CPU {model}, {platform.system()} {platform.release()} {platform.machine()}, "
            f"Python {platform.python_version()}, load average {load}")


def _run_module(name: str, quick: bool, workdir: Path) -> tuple[list[dict[str, Any]], str | None]:
    import importlib

    try:
        mod = importlib.import_module(name)
    except ImportError as exc:
        return [], f"scripts/{name}.py not importable ({exc})"
    fn = getattr(mod, "run_issue15", None)
    if fn is None:
        return [], f"scripts/{name}.py has no run_issue15(); run its own mode"
    sub = workdir / name
    sub.mkdir()
    try:
        return list(asyncio.run(fn(quick, sub, lambda line: print(line, flush=True)))), None
    except BaseException as exc:  # a benchmark reports, it does not crash
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc()
        return [], f"scripts/{name}.py aborted: {type(exc).__name__}: {exc}"


def _num(x: Any, unit: str = "") -> str:
    if not isinstance(x, int | float) or x != x:
        return "-"
    text = f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}"
    return f"{text} {unit}".strip()


def report_issue15(figures: list[dict[str, Any]], skipped: list[str]) -> None:
    print("\n=== issue 15: every target, its figure, its baseline, the ratio ===")
    print(f"  {'target':<66}{'figure':>16}{'baseline':>16}{'ratio':>8}  {'wanted':<22}result")
    for f in figures:
        met = {True: "met", False: "NOT met", None: "(figure)"}.get(f.get("met"), "?")
        ratio = f.get("ratio")
        ratio_s = f"{ratio:.2f}x" if isinstance(ratio, int | float) and ratio == ratio else "-"
        print(f"  {str(f.get('name', '?'))[:65]:<66}{_num(f.get('value'), f.get('unit', '')):>16}"
              f"{_num(f.get('baseline'), f.get('unit', '')):>16}{ratio_s:>8}  {f.get('target', '')!s:<22}{met}")
        if f.get("baseline_name"):
            print(f"  {'':<66}{'':>16}{'(' + str(f['baseline_name'])[:40] + ')':>16}")
    for s in skipped:
        print(f"  skipped: {s}")
    judged = [f for f in figures if f.get("met") is not None]
    print(f"  {sum(1 for f in judged if f['met'])} of {len(judged)} targets met on this machine")


def main_issue15(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    print(f"asm bench --issue15  {machine_details()}  (figures on a shared machine vary with its load)", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="asm-bench-15-"))
    figures: list[dict[str, Any]] = []
    skipped: list[str] = []
    try:
        for name in ISSUE15_MODULES:
            print(f"\n--- {name} ---", flush=True)
            got, why = _run_module(name, args.quick, workdir)
            figures += got
            if why:
                print(f"  skipped: {why}", flush=True)
                skipped.append(why)
        if args.compare_ssh is not None:
            ssh_out = _ssh(args, workdir)
            if ssh_out is not None and "skipped" in ssh_out:
                skipped.append(f"--compare-ssh: {ssh_out['skipped']}")
        else:
            skipped.append("--compare-ssh: no USER@127.0.0.1 given (asm vs ssh not measured)")
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report_issue15(figures, skipped)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f}s")
    return 0


def main_thru(args: argparse.Namespace) -> int:
    import bench_thru  # scripts/ is this script's directory, first on sys.path

    cfg = bench_thru.ThruConfig()
    if args.quick:
        cfg.events, cfg.repeats, cfg.runs, cfg.node_counts = 50_000, 1, 200, (10,)
    cfg.runs = args.thru_runs if args.thru_runs is not None else cfg.runs
    cfg.events = args.thru_events if args.thru_events is not None else cfg.events
    cfg.baseline_root = args.thru_baseline
    t_start = time.perf_counter()
    print(f"asm bench --thru  {machine_details()}  (figures on a shared machine vary with its load)", flush=True)
    out = run_mode("asm-bench-thru-", lambda workdir: bench_thru.run_thru(cfg, workdir, lambda line: print(line, flush=True)))
    if out is not None:
        bench_thru.report_thru(out)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f}s")
    return 0


def _ssh(args: argparse.Namespace, workdir: Path) -> dict[str, Any] | None:
    import bench_ssh  # scripts/ is this script's directory, first on sys.path

    cfg = bench_ssh.SshConfig(host=args.compare_ssh)
    if args.quick:
        cfg.repeats, cfg.lines = 5, 200_000
    sub = workdir / "ssh"
    sub.mkdir()
    out: dict[str, Any] | None = None
    try:
        out = bench_ssh.run_ssh(cfg, sub, lambda line: print(line, flush=True))
    except BaseException as exc:  # a benchmark reports, it does not crash
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc()
        out = {"skipped": f"aborted: {type(exc).__name__}: {exc}"}
    bench_ssh.report_ssh(out)
    return out


def main_ssh(args: argparse.Namespace) -> int:
    print(f"asm bench --compare-ssh  {machine_details()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="asm-bench-ssh-"))
    try:
        _ssh(args, workdir)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main_scale(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import bench_scale  # scripts/ is this script's directory, first on sys.path

    cfg = bench_scale.ScaleConfig(before=args.scale_before)
    try:
        cfg.sizes = tuple(int(x) for x in args.scale_sizes.split(","))
    except ValueError:
        parser.error("--scale-sizes: comma-separated run counts")
    if args.quick:
        cfg.sizes, cfg.idle_s, cfg.latency_lines, cfg.repeats = (100,), 2.0, 100, 5
    cfg.trees = ([("before", args.scale_before.resolve())] if args.scale_before else []) + [("now", ROOT)]
    t_start = time.perf_counter()
    print(f"asm bench --scale  {machine_details()}  (figures on a shared machine vary with its load)", flush=True)
    why = bench_scale.available()
    if why:
        print(f"bench: --scale: {why}; nothing measured", file=sys.stderr)
        return 0
    out = run_mode("asm-bench-scale-", lambda workdir: bench_scale.run_scale(cfg, workdir, lambda line: print(line, flush=True)))
    if out is not None:
        bench_scale.report_scale(out)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f}s")
    return 0


def main_cli(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import bench_cli  # scripts/ is this script's directory, first on sys.path

    cfg = bench_cli.CliConfig(warmup=args.warmup)
    cfg.runs = args.cli_runs if args.cli_runs is not None else (10 if args.quick else cfg.runs)
    cfg.lines = args.cli_lines if args.cli_lines is not None else (200_000 if args.quick else cfg.lines)
    if cfg.runs < 1 or cfg.lines < 1:
        parser.error("--cli-runs and --cli-lines must be >= 1")
    if not bench_cli.available():
        print("bench: --cli needs sh and cat on PATH; nothing measured", file=sys.stderr)
        return 0
    t_start = time.perf_counter()
    out = run_mode("asm-bench-cli-", lambda workdir: bench_cli.run_cli(cfg, workdir, lambda line: print(line, flush=True)))
    if out is not None:
        bench_cli.report_cli(out)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f}s")
    return 0


def main_soak_flood(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.soak is not None:
        if args.soak <= 0 or args.soak_concurrency < 1:
            parser.error("--soak needs MINUTES > 0 and --soak-concurrency >= 1")
        if args.soak_interval is None:
            args.soak_interval = 60.0 if args.soak >= 5 else 10.0
        if args.soak_interval <= 0:
            parser.error("--soak-interval must be > 0")
        if args.soak_warmup is None:
            args.soak_warmup = args.soak_interval
    if args.flood and (args.flood_tiny_bytes < 2 or args.flood_long_bytes < 2**20):
        parser.error("--flood-tiny-bytes must be >= 2 and --flood-long-bytes >= 1 MiB")
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="asm-bench-"))
    print(f"asm bench  python {platform.python_version()}  nproc {os.cpu_count()}  {platform.system()} "
          f"{platform.machine()}  (figures on a shared machine vary with its load)", flush=True)
    node = NodeProcess(workdir)
    soak: dict[str, Any] | None = None
    floods: list[tuple[str, Any]] = []
    try:
        if args.soak is not None:
            node.start()
            soak = asyncio.run(run_soak(args, node))
            node.stop()
        if args.flood:
            floods = run_flood(args, workdir)
    except BaseException as exc:  # a benchmark reports, it does not crash
        if isinstance(exc, KeyboardInterrupt):
            print("bench: interrupted", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"bench: aborted: {exc}", file=sys.stderr)
            log = node.log()
            if log:
                print(f"--- node log (last 2000 chars) ---\n{log[-2000:]}", file=sys.stderr)
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if soak is not None:
        report_soak(args, soak)
    if floods:
        report_flood(floods)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    # Ctrl-C during the node's start-up must still stop it: main() handles it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
