"""A node scales without a thread or a poll per run, its watchdog is small and waited for by nobody,
and its events leave as soon as they are made (issue 15, items 2, 4 and 5).

The speed figures live in ``scripts/bench.py --scale``; these tests check the behaviour behind them.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from asm_controller import EmbeddedNode, RunStream, Session
from asm_node import NodeAgent
from asm_node import process as process_mod
from asm_node.eventlog import EventLog
from asm_node.process import Reaper, leader_exited, spawn
from asm_node.testing import running_agent
from asm_node.testing import test_config as node_config
from asm_wire import pb
from tests.support.processes import PYTHON_BASENAME, pid_alive, wait_until

RUNS = 50


@contextmanager
def counting_timers() -> Iterator[list[float]]:
    """Every timer (``call_at``, which ``call_later``/``sleep``/``wait(timeout=)`` use) the running loop
    schedules meanwhile: a polling loop shows up here, an awaited pidfd or future does not."""
    loop = asyncio.get_running_loop()
    seen: list[float] = []
    original = loop.call_at

    def call_at(when: float, callback: Callable[..., object], *args: Any, **kw: Any) -> asyncio.TimerHandle:
        seen.append(when)
        return original(when, callback, *args, **kw)

    loop.call_at = call_at  # type: ignore[method-assign,assignment]
    try:
        yield seen
    finally:
        del loop.call_at


@asynccontextmanager
async def sleeping_runs(agent: NodeAgent, n: int) -> AsyncIterator[list[RunStream]]:
    session = Session("shell", node=EmbeddedNode(agent), max_concurrent_runs=n, max_queued_runs=n)
    streams = [session.stream("sleep 60") for _ in range(n)]
    try:
        firsts = await asyncio.wait_for(asyncio.gather(*(s.__anext__() for s in streams)), 60)
        assert [f.kind for f in firsts] == ["run_started"] * n
        yield streams
    finally:
        await asyncio.wait_for(asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True), 60)
        await session.stop()


@pytest.mark.slow
async def test_fifty_sleeping_runs_add_no_thread_each() -> None:
    async with running_agent(node_config(max_runs=RUNS)) as agent:
        await asyncio.sleep(0.2)  # the start-up's CLI version probe (a pool thread) has run
        before = threading.active_count()
        async with sleeping_runs(agent, RUNS):
            during = threading.active_count()
        # asyncio's default (threaded) child watcher had one thread per CLI: 50 here.
        assert during - before <= 3, f"{during - before} threads more with {RUNS} runs alive"


@pytest.mark.slow
@pytest.mark.parametrize("idle_timeout_ms", [None, 60_000])
async def test_fifty_sleeping_runs_schedule_no_timer_each(idle_timeout_ms: int | None) -> None:
    # With an idle deadline too: it is slept until, not looked at twice a second per run.
    config = node_config(max_runs=RUNS, idle_timeout_ms=idle_timeout_ms)
    async with running_agent(config) as agent, sleeping_runs(agent, RUNS):
        await asyncio.sleep(0.2)
        with counting_timers() as timers:
            await asyncio.sleep(1.0)
    # A 50 ms poll per run would be ~1,000 timers in this second; what is left is the node's own
    # housekeeping (and this test's sleep).
    assert len(timers) < 20, f"{len(timers)} timers in 1 s with {RUNS} sleeping runs"


async def test_exit_statuses_come_through_the_pidfd_watcher(tmp_path: Any) -> None:
    env = {"PATH": os.defpath}
    # No thread waits for a CLI: neither asyncio's own watcher's ("waitpid-PID") nor the pidfd watcher's
    # fallback (target _wait_blocking). Other threads of the test process (the spawn pool's, a finishing
    # thread of an earlier test) may come and go meanwhile: counting them all was flaky under load.
    def waiters() -> list[str]:
        return [t.name for t in threading.enumerate() if "waitpid" in t.name or "_wait_blocking" in t.name]

    await (await spawn(["true"], str(tmp_path), env, False)).wait()
    code = await spawn(["sh", "-c", "exit 3"], str(tmp_path), env, False)
    killed = await spawn(["sleep", "30"], str(tmp_path), env, False)
    assert waiters() == [], f"a thread was started to wait for the CLI: {threading.enumerate()}"
    assert isinstance(asyncio.get_child_watcher(), process_mod.PidfdChildWatcher)
    os.kill(killed.pid, signal.SIGKILL)
    assert await asyncio.wait_for(leader_exited(code), 10) == 3
    assert await asyncio.wait_for(leader_exited(killed), 10) == -signal.SIGKILL
    assert code.returncode == 3 and killed.returncode == -signal.SIGKILL
    for proc in (code, killed):
        await proc.wait()


async def test_a_child_without_a_pidfd_is_still_waited_for(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert process_mod.child_watcher() is not None

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    proc = await spawn(["sh", "-c", "exit 5"], str(tmp_path), {"PATH": os.defpath}, False)
    assert await asyncio.wait_for(leader_exited(proc), 10) == 5
    await proc.wait()


@contextmanager
def slow_popen(delay: float, pids: list[int]) -> Iterator[None]:
    """Popen that takes ``delay`` seconds first, as a fork/exec does on a loaded machine; records the pids."""
    real = subprocess.Popen

    def popen(*args: Any, **kw: Any) -> Any:
        time.sleep(delay)
        proc = real(*args, **kw)
        pids.append(proc.pid)
        return proc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", popen)
        yield


async def test_the_event_loop_keeps_running_while_a_cli_is_spawned(tmp_path: Any) -> None:
    # On the loop, 1,000 concurrent StartRuns queued behind each other's fork/exec.
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    ticker = asyncio.create_task(tick())
    pids: list[int] = []
    try:
        with slow_popen(0.5, pids):
            proc = await spawn(["sh", "-c", "exit 4"], str(tmp_path), {"PATH": os.defpath}, False)
    finally:
        ticker.cancel()
    assert ticks >= 5, f"the loop ran {ticks} times in a 0.5 s spawn"
    assert pids == [proc.pid] and await asyncio.wait_for(leader_exited(proc), 10) == 4
    await proc.wait()


async def test_a_spawn_cancelled_midway_leaves_no_cli_behind(tmp_path: Any) -> None:
    pids: list[int] = []
    with slow_popen(0.3, pids):
        task = asyncio.create_task(spawn(["sleep", "30"], str(tmp_path), {"PATH": os.defpath}, False))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if pids:
                break
            await asyncio.sleep(0.05)
    assert pids, "the spawn thread did not go on with the fork"

    def reaped(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    # The fork went on in its thread; its CLI is killed and reaped, not left running unsupervised.
    for _ in range(200):
        if reaped(pids[0]):
            break
        await asyncio.sleep(0.05)
    assert reaped(pids[0]), f"CLI {pids[0]} of a cancelled spawn is still there"


async def test_leader_exit_is_awaited_not_polled_even_with_its_pipes_held(tmp_path: Any) -> None:
    # The leader starts a child that keeps stdout/stderr open, then waits to be told to exit.
    proc = await spawn(["sh", "-c", "sleep 30 & read _; exit 7"], str(tmp_path), {"PATH": os.defpath}, True)
    waiter = asyncio.create_task(leader_exited(proc))
    with counting_timers() as timers:
        await asyncio.sleep(0.3)
    assert not waiter.done()
    assert len(timers) == 1, f"leader_exited scheduled {len(timers) - 1} timers while it waited"  # 1: the sleep
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()  # the transport closes only once every pipe has
    assert await asyncio.wait_for(waiter, 10) == 7  # the pipes are still held by the sleep
    os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


# -- the watchdog ------------------------------------------------------------------------------

FORBIDDEN_IN_WATCHDOG = {"site", "signal", "enum", "typing", "re", "functools", "subprocess", "asyncio",
                         "asm_node", "asm_wire", "grpc", "google"}


def test_the_watchdog_imports_only_the_interpreters_own_modules() -> None:
    res = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", process_mod._REAPER_SCRIPT],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd="/", timeout=30)
    assert res.returncode == 0, res.stderr
    imported = {m.group(1).strip().split(".")[0] for m in re.finditer(r"^import time:[^|]*\|[^|]*\|(.*)$",
                                                                        res.stderr, re.M)}
    assert "os" in imported, res.stderr  # the parse found the imports
    assert not imported & FORBIDDEN_IN_WATCHDOG, sorted(imported & FORBIDDEN_IN_WATCHDOG)


def test_the_watchdog_runs_without_site_and_stays_small() -> None:
    reaper = Reaper(cgroups=False)
    reaper.start()
    try:
        pid = reaper.pid
        assert pid is not None
        assert wait_until(lambda: _state(pid) == "S", 10.0)  # started, blocked reading its pipe
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        assert b"-I" in argv and b"-S" in argv, argv
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))  # type: ignore[union-attr]
        assert rss_kb <= 10 * 1024, f"watchdog RSS {rss_kb} kB"
    finally:
        reaper.stop()


def _all_stopped_watchdogs_reaped() -> bool:
    process_mod._reap_stopped()
    return not process_mod._stopped_watchdogs


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


@pytest.mark.slow
def test_stop_does_not_wait_for_the_watchdog_and_it_still_does_its_job() -> None:
    # A CLI that ignores SIGTERM keeps the watchdog busy for its 2 s grace before SIGKILL.
    victim = subprocess.Popen([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, "
                               "signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline() == b"ready\n"
        reaper = Reaper(cgroups=False)
        reaper.start()
        watchdog = reaper.pid
        assert watchdog is not None
        reaper.track(victim.pid)
        reaper.stop()  # the agent going away with a run it could not stop
        assert pid_alive(watchdog), "stop() waited for the watchdog to finish"
        assert victim.poll() is None
        assert wait_until(lambda: victim.poll() is not None, 10.0), "the watchdog did not kill the CLI"
        assert victim.returncode == -signal.SIGKILL
        # Nobody waited for it, and it is not left a zombie for long: reaped at the next chance.
        assert wait_until(_all_stopped_watchdogs_reaped, 10.0)
        assert not os.path.exists(f"/proc/{watchdog}")
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        if victim.stdout is not None:
            victim.stdout.close()


# -- events leave at once when idle, coalesce under load ----------------------------------------

def _log() -> EventLog:
    return EventLog("r", max_events=10_000, max_bytes=1 << 24, backlog_max_bytes=1 << 24)


def _event(i: int) -> bytes:
    return pb.Event(seq=i, assistant_delta=pb.AssistantDelta(content=f"line {i}")).SerializeToString()


async def test_an_event_on_an_idle_link_leaves_at_once_without_a_timer() -> None:
    log = _log()
    got: list[int] = []
    arrived = asyncio.Event()

    async def follower() -> None:
        async for data in log.follow(0):
            got.append(len(pb.EventBatch.FromString(data).events))
            arrived.set()

    task = asyncio.create_task(follower())
    await asyncio.sleep(0)
    with counting_timers() as timers:
        log.append([_event(1)])
        for _ in range(5):  # a few loop turns, no clock
            await asyncio.sleep(0)
            if arrived.is_set():
                break
    assert got == [1], "the lone event waited for company"
    assert timers == [], "a timer was armed for an event"
    log.close()
    await asyncio.wait_for(task, 5)


async def test_events_made_while_the_follower_is_busy_leave_in_one_batch() -> None:
    log = _log()
    batches: list[int] = []

    async def follower() -> None:
        async for data in log.follow(0):
            batches.append(len(pb.EventBatch.FromString(data).events))

    task = asyncio.create_task(follower())
    await asyncio.sleep(0)
    for i in range(1, 101):  # a burst: the follower gets no turn in between
        log.append([_event(i)])
    log.close()
    await asyncio.wait_for(task, 5)
    assert batches == [100]


@pytest.mark.slow
async def test_a_line_reaches_the_follower_while_the_cli_is_still_running() -> None:
    async with running_agent(node_config()) as agent:
        session = Session("shell", node=EmbeddedNode(agent))
        code = base64.b64encode(b"import time\nprint('hi', flush=True)\ntime.sleep(30)").decode()
        stream = session.stream(f"{PYTHON_BASENAME} -c \"exec(__import__('base64').b64decode('{code}'))\"")
        try:
            kinds: list[str] = []
            while "assistant_delta" not in kinds:
                kinds.append((await asyncio.wait_for(stream.__anext__(), 10)).kind)
            assert kinds[0] == "run_started"
        finally:
            await stream.aclose()
            await session.stop()


def test_the_scale_benchmark_judges_its_issue15_targets() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    bench_scale = importlib.import_module("bench_scale")
    out = {
        "scale": [{"tree": "now", "n": 100, "threads": 9, "idle_cpu_pct": 3.0, "rss_mb": 60.0, "admit_s": 2.0,
                   "local_s": 0.5},
                  {"tree": "now", "n": 1000, "threads": 9, "idle_cpu_pct": 0.4, "rss_mb": 110.0, "admit_s": 3.0,
                   "local_s": 0.6}],
        "watchdog": [{"tree": "now", "rss_mb": 8.5, "life_s": 0.012, "bare_s": 0.008, "stop_s": 0.0001}],
        "latency": [{"tree": "now", "node": {"p99": 9.0, "node_cpu_us": 150.0}, "local": {"p99": 30.0},
                     "raw_grpc_cpu_us": 250.0}],
    }
    got = {f["name"]: f["met"] for f in bench_scale.issue15_figures(out)}
    assert got["4. node threads, 1000 sleeping runs"] is True
    assert got["4. node idle CPU, 100 sleeping runs"] is None  # only the largest N is judged
    assert got["4. admission of 1000 runs"] is False
    assert got["2. watchdog RSS"] is True and got["2. Reaper.stop() (what a CLI waits at exit)"] is True
    assert got["5. p99 latency, 100 runs x 20 lines/s"] is None  # a noisier baseline decides nothing
    assert got["5. node CPU per event (100 runs)"] is False
