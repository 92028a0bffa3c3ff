#!/usr/bin/env python3
"""Benchmark: run start latency and event throughput, node vs local, side by side.

    .venv/bin/python scripts/bench.py                 # default: 200 runs, 200k events
    .venv/bin/python scripts/bench.py --quick         # smoke run: 20 runs, 20k events
    .venv/bin/python scripts/bench.py --runs 500 --events 500000
    .venv/bin/python scripts/bench.py --profile       # also cProfile the remote query throughput

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

This is a benchmark, not a test: it prints figures and exits 0 (a failed run
is reported in the table, not raised). The node process and temp files are
always cleaned up.
"""

from __future__ import annotations

import argparse
import asyncio
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
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
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
#: The shell provider's default per-command timeout is 30 s; a slow remote
#: throughput run must not be cut off by it (it would show up as a failure).
RUN_OPTIONS = {"command_timeout_ms": 600_000}


# -- node process -------------------------------------------------------------------


class NodeProcess:
    """``asm node serve`` as a child process; stopped by its PID."""

    def __init__(self, workdir: Path) -> None:
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.epoch = ""
        self.workdir = workdir

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "asm_cli", "node", "serve", "--listen", "127.0.0.1:0"],
                stdout=subprocess.DEVNULL, stderr=log, cwd=str(self.workdir),
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
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
        err = (f"first={first.kind} status={getattr(result, 'status', None)} "
               f"error={getattr(result, 'error', None)}")
    return (t1 - t0) * 1000, (t2 - t0) * 1000, err


async def latency(sessions: dict[str, Session], runs: int, warmup: int) -> dict[str, dict[str, list[Any]]]:
    """Interleaved: each round runs the local baseline and then every session once, so that
    machine noise (other processes, CPU frequency) hits all of them alike."""
    out: dict[str, dict[str, list[Any]]] = {
        name: {"start": [], "complete": [], "failures": []} for name in ("local", *sessions)
    }
    for i in range(warmup + runs):
        s, c = await local_once()
        if i >= warmup:
            out["local"]["start"].append(s)
            out["local"]["complete"].append(c)
        for name, session in sessions.items():
            s, c, err = await session_once(session)
            if err:
                out[name]["failures"].append(err)
            elif i >= warmup:
                out[name]["start"].append(s)
                out[name]["complete"].append(c)
    return out


# -- (b) throughput ----------------------------------------------------------------------


def write_jsonl(path: Path, n: int) -> int:
    """N JSON lines of ~100 bytes each; returns the file size."""
    base = 'lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore'
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
        err = (f"status={getattr(result, 'status', None)} events={getattr(result, 'events', None)} "
               f"streamed={count} (want {n + 3}) error={getattr(result, 'error', None)}")
    return dt, err


async def repeat_throughput(
    fn: Callable[[], Awaitable[tuple[float, str | None]]], n: int, repeats: int
) -> dict[str, Any]:
    rates: list[float] = []
    errors: list[str] = []
    for _ in range(repeats):
        gc.collect()
        dt, err = await fn()
        if err:
            errors.append(err)
        else:
            rates.append(n / dt)
    return {"rates": rates, "errors": errors}


# -- driver --------------------------------------------------------------------------------


async def warm(session: Session, count: int) -> None:
    for _ in range(count):
        result = await session.query("true")
        if not result.ok:
            raise RuntimeError(f"warm-up run failed: {result.status} {result.error}")


async def run_all(args: argparse.Namespace, workdir: Path, node: NodeProcess) -> dict[str, Any]:
    out: dict[str, Any] = {"latency": {}, "throughput": {}}
    remote = Session("shell", node=RemoteNode(f"127.0.0.1:{node.port}"), options=RUN_OPTIONS)
    agent = NodeAgent(NodeConfig())
    await agent.start()
    embedded = Session("shell", node=EmbeddedNode(agent), options=RUN_OPTIONS)
    try:
        await warm(remote, args.warmup)
        await warm(embedded, args.warmup)

        # (a) start latency
        print(f"[a] start latency: {args.runs} runs of 'true' each (after {args.warmup} warm-up runs)", flush=True)
        t = time.perf_counter()
        out["latency"] = await latency({"remote": remote, "embedded": embedded}, args.runs, args.warmup)
        print(f"    done in {time.perf_counter() - t:.1f}s", flush=True)

        # (b) throughput
        path = workdir / "events.jsonl"
        size = write_jsonl(path, args.events)
        out["jsonl_bytes"] = size
        print(f"[b] throughput: {args.events:,} lines ({size / args.events:.0f} B/line, {size / 1e6:.1f} MB), "
              f"{THROUGHPUT_REPEATS} repeats each", flush=True)
        n = args.events
        cases: list[tuple[str, Callable[[], Awaitable[tuple[float, str | None]]]]] = [
            ("local read+parse", lambda: local_throughput(path, n)),
            ("remote query", lambda: query_throughput(remote, path, n)),
            ("remote stream", lambda: stream_throughput(remote, path, n)),
            ("embedded query", lambda: query_throughput(embedded, path, n)),
            ("embedded stream", lambda: stream_throughput(embedded, path, n)),
        ]
        for name, fn in cases:
            t = time.perf_counter()
            out["throughput"][name] = await repeat_throughput(fn, n, THROUGHPUT_REPEATS)
            print(f"    {name:<18} {time.perf_counter() - t:5.1f}s", flush=True)

        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            dt, err = await query_throughput(remote, path, n)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(15)
            out["profile"] = (dt, err, buf.getvalue())
    finally:
        await remote.stop()
        await embedded.stop()
        await agent.stop()
    return out


def report(args: argparse.Namespace, out: dict[str, Any], node_pid: int | None) -> None:
    print()
    print("=" * 78)
    print(f"asm benchmark  python {platform.python_version()}  nproc {os.cpu_count()}  "
          f"{platform.system()} {platform.machine()}  node pid {node_pid}")
    print("=" * 78)

    lat = out["latency"]
    loc = lat["local"]
    print(f"\n(a) run start latency, prompt 'true', {args.runs} runs, ms")
    print(f"{'':<22}{'start p50':>10}{'start p90':>10}{'compl p50':>10}{'compl p90':>10}"
          f"{'Δstart p50':>12}{'Δcompl p50':>12}")
    verdicts: list[str] = []
    for name in ("local", "remote", "embedded"):
        d = lat[name]
        label = {"local": "local spawn (asyncio)", "remote": "remote node (gRPC)", "embedded": "embedded node"}[name]
        ds = median(d["start"]) - median(loc["start"])
        dc = median(d["complete"]) - median(loc["complete"])
        extra = "" if name == "local" else f"{ms(ds):>12}{ms(dc):>12}"
        print(f"{label:<22}{ms(median(d['start'])):>10}{ms(p90(d['start'])):>10}"
              f"{ms(median(d['complete'])):>10}{ms(p90(d['complete'])):>10}{extra}")
        if d["failures"]:
            print(f"    !! {len(d['failures'])} failed run(s), first: {d['failures'][0]}")
        if name != "local":
            ok = ds <= LATENCY_TARGET_MS
            verdicts.append(f"{label}: median start overhead {ds:.2f} ms "
                            f"({'meets' if ok else 'MISSES'} the <= {LATENCY_TARGET_MS:g} ms target); "
                            f"median complete overhead {dc:.2f} ms")

    thr = out["throughput"]
    local_best = max(thr["local read+parse"]["rates"], default=float("nan"))
    local_med = median(thr["local read+parse"]["rates"])
    print(f"\n(b) throughput, {args.events:,} events of ~{out['jsonl_bytes'] / args.events:.0f} B, "
          f"{THROUGHPUT_REPEATS} repeats, events/s")
    print(f"{'':<22}{'best':>12}{'median':>12}{'best/local':>12}{'med/local':>12}")
    for name, d in thr.items():
        best, med = max(d["rates"], default=float("nan")), median(d["rates"])
        ratio = "" if name.startswith("local") else f"{best / local_best:>11.2f}x{med / local_med:>11.2f}x"
        print(f"{name:<22}{rate(best):>12}{rate(med):>12}{ratio}")
        if d["errors"]:
            print(f"    !! {len(d['errors'])} failed repeat(s), first: {d['errors'][0]}")
        if not name.startswith("local"):
            ok_abs, ok_rel = best >= THROUGHPUT_TARGET, best >= RATIO_TARGET * local_best
            verdicts.append(
                f"{name}: best {best:,.0f} ev/s ({'meets' if ok_abs else 'MISSES'} >= {THROUGHPUT_TARGET:,.0f}), "
                f"{best / local_best:.2f}x local ({'meets' if ok_rel else 'MISSES'} >= {RATIO_TARGET}x)"
            )

    print("\ntargets:")
    for v in verdicts:
        print(f"  - {v}")

    if "profile" in out:
        dt, err, text = out["profile"]
        print(f"\ncProfile of one remote query throughput run ({args.events:,} events, {dt:.2f}s under the profiler"
              f"{', ERROR: ' + err if err else ''}), top 15 by cumulative time, benchmark (controller) process:")
        print(text.rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="latency runs per target (default 200; 20 with --quick)")
    parser.add_argument("--events", type=int, default=None,
                        help="JSONL lines for the throughput runs (default 200000; 20000 with --quick)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up runs before timing (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run with small N")
    parser.add_argument("--profile", action="store_true",
                        help="also run one remote query throughput run under cProfile and print the top 15")
    args = parser.parse_args()
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
    node = NodeProcess(workdir)
    node_pid: int | None = None
    out: dict[str, Any] | None = None
    try:
        node.start()
        node_pid = node.pid
        print(f"node agent pid {node_pid} on 127.0.0.1:{node.port} (epoch {node.epoch})", flush=True)
        out = asyncio.run(run_all(args, workdir, node))
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
        report(args, out, node_pid)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    # Ctrl-C during the node's start-up must still stop it: main() handles it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
