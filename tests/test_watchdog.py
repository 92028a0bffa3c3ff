"""The reaper watchdog cannot be hijacked, is watched, and processes that escape with setsid die too
(issue 9, item 5).

* The watchdog runs ``python -I`` with cwd ``/`` and a minimal environment: a ``signal.py`` /
  ``secrets.py`` planted in the agent's cwd is never imported, no secret of the agent is inherited.
  (The node below is started with ``python -I -m asm_cli`` so the *agent* does not import them either,
  as with the installed ``asm`` console script, whose sys.path has no cwd.)
* A dead watchdog is logged at ERROR, counted (``asm_node_reaper_failures_total``, ``asm_node_reaper_up``)
  and restarted with the live groups registered again.
* Runs are tracked by cgroup v2 where the node can create cgroups: a process that left the run's
  process group (``setsid -f``, ``os.setsid()`` in a forked child) is killed at run end and when the agent
  is SIGKILLed. Where cgroups are unavailable those tests skip, saying why.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asm_controller import EmbeddedNode, RemoteNode, Session
from asm_controller._client import LivenessConfig
from asm_node import NodeAgent
from asm_node.process import Cgroups, Reaper, spawn
from tests.support.processes import PYTHON_BASENAME, NodeProcess, node_config, pid_alive, start_node_process, wait_until

pytestmark = pytest.mark.slow  # agents killed under a watchdog, escapes waited out

EVIL = "open({marker!r}, 'a').write(__name__ + '\\n')\nraise SystemExit('hijacked by a planted ' + __name__)\n"
SECRET = "sk-secret-of-the-agent-0123456789"
# The agent is SIGKILLed in these tests: notice it quickly.
LIVE = LivenessConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0, node_lost_timeout_s=2.0)


def py(code: str) -> str:
    encoded = base64.b64encode(code.encode()).decode()
    return f"{PYTHON_BASENAME} -c \"exec(__import__('base64').b64decode('{encoded}'))\""


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def watchdog_pid(agent_pid: int) -> int | None:
    for child in children(agent_pid):
        try:
            if b"_reaper" in Path(f"/proc/{child}/cmdline").read_bytes() and pid_alive(child):
                return child
        except FileNotFoundError:
            continue
    return None


@pytest.fixture
def planted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(cwd with a malicious signal.py and secrets.py, the marker they write when imported)."""
    cwd = tmp_path / "agent-cwd"
    cwd.mkdir()
    marker = tmp_path / "imported"
    for name in ("signal", "secrets"):
        (cwd / f"{name}.py").write_text(EVIL.format(marker=str(marker)))
    yield cwd, marker


def start_isolated_node(cwd: Path, tmp_path: Path, *args: str) -> NodeProcess:
    """``asm node serve`` with cwd ``cwd`` and a secret in its environment (the agent itself isolated)."""
    return start_node_process(tmp_path, *args, env={"ANTHROPIC_API_KEY": SECRET}, cwd=cwd, python_flags=("-I",))


@pytest.fixture
def isolated_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def factory(cwd: Path, *args: str) -> NodeProcess:
        node = start_isolated_node(cwd, tmp_path, *args)
        started.append(node)
        return node

    yield factory
    for node in started:
        node.stop(signal.SIGKILL)


async def _start_sleep(node: NodeProcess) -> tuple[Session, object, int]:
    session = Session("shell", node=RemoteNode(node.address, liveness=LIVE))
    stream = session.stream("sleep 60")
    started = await stream.__anext__()
    assert started.kind == "run_started"
    return session, stream, started.payload["pid"]


def check_isolated_watchdog(node: NodeProcess, marker: Path) -> None:
    assert wait_until(lambda: watchdog_pid(node.pid) is not None, 5.0), "no watchdog running"
    time.sleep(0.5)  # a hijacked watchdog dies at once
    wd = watchdog_pid(node.pid)
    assert wd is not None and pid_alive(wd), f"the watchdog died: {node.log()}"
    assert not marker.exists(), f"planted modules were imported: {marker.read_text()}"
    assert os.readlink(f"/proc/{wd}/cwd") == "/"
    environ = Path(f"/proc/{wd}/environ").read_bytes().split(b"\0")
    assert not [e for e in environ if SECRET.encode() in e or e.startswith(b"ASM_")], environ
    assert b"-I" in Path(f"/proc/{wd}/cmdline").read_bytes().split(b"\0")


async def test_a_planted_signal_py_does_not_kill_the_watchdog(
    planted: tuple[Path, Path], isolated_node: Callable[..., NodeProcess]
) -> None:
    cwd, marker = planted
    node = isolated_node(cwd)
    await asyncio.to_thread(check_isolated_watchdog, node, marker)
    session, _stream, pid = await _start_sleep(node)
    assert pid_alive(pid)
    node.proc.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(wait_until, lambda: not pid_alive(pid), 10.0), "the CLI outlived the agent"
    await session.stop()


async def test_a_dead_watchdog_is_logged_and_restarted_with_the_live_groups(
    planted: tuple[Path, Path], isolated_node: Callable[..., NodeProcess]
) -> None:
    cwd, marker = planted
    node = isolated_node(cwd)
    session, _stream, pid = await _start_sleep(node)
    first = watchdog_pid(node.pid)
    assert first is not None
    os.kill(first, signal.SIGKILL)  # e.g. a run killed it
    assert await asyncio.to_thread(
        wait_until, lambda: (watchdog_pid(node.pid) or first) != first, 5.0), f"not restarted: {node.log()}"
    assert "ERROR" in node.log() and "reaper watchdog" in node.log()
    assert not marker.exists()
    # The new watchdog knows the running CLI: it dies with the agent.
    node.proc.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(wait_until, lambda: not pid_alive(pid), 10.0), "the CLI outlived the agent"
    await session.stop()


async def test_watchdog_health_is_a_metric(caplog: pytest.LogCaptureFixture) -> None:
    agent = NodeAgent(node_config())
    await agent.start()
    try:
        registry = agent.metrics.registry
        assert registry.get_sample_value("asm_node_reaper_up") == 1.0
        assert registry.get_sample_value("asm_node_reaper_failures_total") == 0.0
        first = agent.reaper_pid
        assert first is not None
        with caplog.at_level(logging.ERROR, logger="asm_node.process"):
            os.kill(first, signal.SIGKILL)
            await asyncio.to_thread(wait_until, lambda: not pid_alive(first), 5.0)
            assert registry.get_sample_value("asm_node_reaper_up") == 0.0
            for _ in range(100):
                if registry.get_sample_value("asm_node_reaper_failures_total") == 1.0:
                    break
                await asyncio.sleep(0.05)
        assert registry.get_sample_value("asm_node_reaper_failures_total") == 1.0
        assert registry.get_sample_value("asm_node_reaper_up") == 1.0
        assert agent.reaper_pid not in (None, first)
        assert [r for r in caplog.records if r.levelno == logging.ERROR and "reaper watchdog" in r.getMessage()]
    finally:
        await agent.stop()
    assert agent.reaper_pid is None


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    """Where escaping processes write their pids; whatever is still alive at teardown is killed (by pid)."""
    path = tmp_path / "pids"
    path.write_text("")
    yield path
    for pid in [int(x) for x in path.read_text().split()]:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _cgroups_or_skip() -> Cgroups:
    tree = Cgroups.create()
    if tree is None:
        pytest.skip("this node cannot create cgroup v2 groups (no cgroup2 mount, no permission, or no "
                    "delegation): runs are tracked by process group only and setsid escapes are a documented limit")
    tree.close()
    return tree


def escape(pidfile: Path, linger: bool = False) -> str:
    """A CLI that leaves two processes outside its process group, then exits (or sleeps on: ``linger``)."""
    return py(f"""
import os, subprocess, time
subprocess.Popen(["setsid", "-f", "sh", "-c", "echo $$ >> {pidfile}; exec sleep 1000"],
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if os.fork() == 0:
    os.setsid()
    fd = os.open(os.devnull, os.O_RDWR)
    for i in range(3):
        os.dup2(fd, i)
    with open("{pidfile}", "a") as f:
        f.write(str(os.getpid()) + "\\n")
    time.sleep(1000)
    os._exit(0)
deadline = time.time() + 10
while time.time() < deadline and len(open("{pidfile}").read().split()) < 2:
    time.sleep(0.01)
print("escaped", flush=True)
""" + ("time.sleep(1000)\n" if linger else ""))


def escaped(pidfile: Path) -> list[int]:
    pids = [int(x) for x in pidfile.read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        assert os.getpgid(pid) == os.getsid(pid) == pid or not pid_alive(pid)  # outside the CLI's group
    return pids


async def test_processes_that_escape_with_setsid_die_at_run_end(tmp_path: Path, pidfile: Path) -> None:
    tree = _cgroups_or_skip()
    agent = NodeAgent(node_config(workspace_roots=[tmp_path]))
    await agent.start()
    try:
        assert agent.reaper is not None and agent.reaper.cgroups is not None
        assert agent.metrics.registry.get_sample_value("asm_node_cgroup_tracking") == 1.0
        node_dir = agent.reaper.cgroups.root
        t0 = time.monotonic()
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            result = await s.query(escape(pidfile), cwd=str(tmp_path))
        took = time.monotonic() - t0
        assert result.ok, result.error
        pids = escaped(pidfile)
        assert await asyncio.to_thread(wait_until, lambda: not any(pid_alive(p) for p in pids), 2.0), (
            f"escaped processes {[p for p in pids if pid_alive(p)]} outlived their run")
        assert took < 5.0, f"the run took {took:.1f}s (waited for the escaped processes' pipes?)"
        assert await asyncio.to_thread(wait_until, lambda: os.listdir(node_dir) == [] or
                                       not [d for d in os.listdir(node_dir) if d.startswith("run-")], 3.0)
    finally:
        await agent.stop()
    assert not await asyncio.to_thread(os.path.exists, node_dir), "the node's cgroup directory was left behind"
    assert tree.root != node_dir


async def test_processes_that_escape_with_setsid_die_with_a_killed_agent(
    tmp_path: Path, pidfile: Path, isolated_node: Callable[..., NodeProcess]
) -> None:
    _cgroups_or_skip()
    node = isolated_node(tmp_path, "--shell-allow", PYTHON_BASENAME, "--shell-allow", "sleep")
    session = Session("shell", node=RemoteNode(node.address, liveness=LIVE))
    # The CLI escapes, then keeps running: the agent is killed mid-run.
    stream = session.stream(escape(pidfile, linger=True))
    started = await stream.__anext__()
    leader = started.payload["pid"]
    assert await asyncio.to_thread(wait_until, lambda: len(pidfile.read_text().split()) == 2, 10.0)
    pids = escaped(pidfile)
    node.proc.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(wait_until, lambda: not any(pid_alive(p) for p in [leader, *pids]), 10.0), (
        f"still alive after the agent was killed: {[p for p in [leader, *pids] if pid_alive(p)]}")
    await session.stop()


def test_a_restarted_watchdog_knows_the_groups_from_its_first_instant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent killed right after it restarted a dead watchdog (before it wrote any line to the
    new one) still has its CLIs killed: the live groups are in the pipe before the watchdog starts."""
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    reaper = Reaper(cgroups=False)
    reaper.start()
    try:
        reaper.track(victim.pid)
        first = reaper.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: not reaper.up, 5.0)
        # The agent dies the instant the new watchdog exists: nothing it would write afterwards
        # reaches the watchdog, and its end of the pipe closes (EOF, as at a SIGKILL).
        monkeypatch.setattr(Reaper, "_write", lambda self, line: False)
        reaper.check()
        monkeypatch.undo()
        reaper._close_stdin()
        assert reaper.pid != first
        assert wait_until(lambda: victim.poll() is not None, 10.0), "the CLI outlived the agent"
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()
        reaper.stop()


def test_reaper_without_cgroups_tracks_groups_only() -> None:
    reaper = Reaper(cgroups=False)
    reaper.start()
    try:
        assert reaper.up and reaper.cgroups is None and reaper.new_cgroup() is None
    finally:
        reaper.stop()
    assert not reaper.up


async def test_the_cli_is_in_its_cgroup_before_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper shell puts the CLI in its cgroup before exec: even with the parent's own write
    failing, the CLI's first look at /proc/self/cgroup is the run's cgroup."""
    _cgroups_or_skip()
    import asm_node.process as process

    real_write = process._write_file

    def parent_cannot_write(path: str, data: str) -> None:
        if path.endswith("cgroup.procs"):
            raise PermissionError(13, "denied for the test")
        real_write(path, data)

    monkeypatch.setattr(process, "_write_file", parent_cannot_write)
    agent = NodeAgent(node_config(workspace_roots=[tmp_path]))
    await agent.start()
    try:
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            result = await s.query(py("print(open('/proc/self/cgroup').read().strip().rpartition('/')[2])"),
                                   cwd=str(tmp_path))
        assert result.ok, result.error
        assert result.text.strip() == "run-1"
    finally:
        await agent.stop()


async def test_spawn_errors_stay_typed_with_the_cgroup_wrapper(tmp_path: Path) -> None:
    _cgroups_or_skip()
    tree = Cgroups.create()
    assert tree is not None
    try:
        not_exec = tmp_path / "not-executable"
        not_exec.write_text("#!/bin/sh\necho hi\n")
        for argv0, exc in (("no-such-cli-anywhere", FileNotFoundError), (str(not_exec), PermissionError),
                           ("./not-executable", PermissionError)):
            cgroup = tree.new_run()
            assert cgroup is not None
            with pytest.raises(exc):
                await spawn([argv0], str(tmp_path), {"PATH": os.defpath}, False, cgroup)
            assert not await asyncio.to_thread(os.path.exists, cgroup), "a failed spawn left its cgroup"
    finally:
        tree.close()


def test_cgroups_left_by_a_dead_agent_and_watchdog_are_swept_at_start() -> None:
    """Both the agent and its watchdog SIGKILLed (a host OOM): the next agent kills what was left in the
    dead agent's run cgroups and removes them; a live agent's directory is never touched."""
    import threading

    from asm_node.process import _own_cgroup_dir

    _cgroups_or_skip()
    base = _own_cgroup_dir()
    assert base is not None
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free: the "dead agent"
    stale = os.path.join(base, f"asm-node-{gone.pid}-t{os.getpid()}")
    live = os.path.join(base, f"asm-node-1-t{os.getpid()}")  # pid 1 is alive: another agent
    os.makedirs(os.path.join(stale, "run-1"))
    os.makedirs(os.path.join(live, "run-1"))
    orphan = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    threading.Thread(target=orphan.wait, daemon=True).start()  # reap it once killed
    try:
        with open(os.path.join(stale, "run-1", "cgroup.procs"), "w") as fh:
            fh.write(str(orphan.pid))
        tree = Cgroups.create()
        assert tree is not None
        tree.close()
        assert wait_until(lambda: not pid_alive(orphan.pid), 5.0), "the orphaned CLI survived"
        assert not os.path.exists(stale)
        assert os.path.isdir(os.path.join(live, "run-1"))
    finally:
        if pid_alive(orphan.pid):
            orphan.kill()
        for d in (os.path.join(stale, "run-1"), stale, os.path.join(live, "run-1"), live):
            wait_until(lambda d=d: Cgroups.remove(d), 2.0)
