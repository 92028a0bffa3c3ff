"""``asm attach`` and ``asm runs``, as a user runs them: real node and controller processes, the real CLI.

The runs are gated: a script prints some lines, waits for a file the test creates, prints the rest and
exits with a chosen code. So "attached while it runs" is a fact of the test, not a race it hopes to win.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asm_controller import GrpcNodeClient, RemoteNode, Session
from asm_node import NodeAgent, start_server
from asm_wire import AsmError, RunNotFound, pb
from tests.support.processes import ROOT, ControllerProcess, NodeProcess, node_config, start_controller_process

pytestmark = pytest.mark.slow  # node and controller processes driven through the CLI

ASM = [sys.executable, "-m", "asm_cli"]
GATED = """\
import os, sys, time
gate, before, after, code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(before):
    print(f"before {i}", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.02)
for i in range(after):
    print(f"after {i}", flush=True)
sys.exit(code)
"""


def asm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ASM, *args], capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


def jsonl(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def no_traceback(proc: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> None:
    stderr = proc.stderr if isinstance(proc, subprocess.CompletedProcess) else proc[2]
    assert "Traceback" not in stderr, stderr


class Bg:
    """A background ``asm`` process whose stdout is read line by line (the test waits on what it printed)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*ASM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
        self._buf = b""

    def lines(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The first ``n`` jsonl lines, as soon as they are out (the rest stays for :meth:`finish`)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while (have := self._buf.count(b"\n")) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"only {have} of {n} lines in {timeout}s: {self._buf[-500:]!r}"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"stdout closed after {have} lines: {self.finish()}"
                self._buf += chunk
        return jsonl(b"\n".join(self._buf.split(b"\n")[:n]).decode())

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, (self._buf + out).decode(), err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def bg() -> Iterator[Callable[..., Bg]]:
    started: list[Bg] = []

    def start(*args: str) -> Bg:
        p = Bg(*args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture
def gated(tmp_path: Path) -> Callable[[str, int, int, int], tuple[str, Path]]:
    """(prompt, gate file) of a gated shell run: ``before`` lines, wait for the gate, ``after`` lines, exit ``code``."""
    script = tmp_path / "gated.py"
    script.write_text(GATED)

    def make(name: str, before: int, after: int, code: int) -> tuple[str, Path]:
        gate = tmp_path / f"gate-{name}"
        return f"{sys.executable} {script} {gate} {before} {after} {code}", gate

    return make


@pytest.fixture
def node(node_process: Callable[..., NodeProcess]) -> NodeProcess:
    return node_process("--shell-allow", sys.executable)


def events_of(lines: list[dict[str, Any]]) -> list[tuple[int, str, Any]]:
    """What identifies an event across two followers: seq, kind, payload."""
    return [(e["seq"], e["kind"], e["payload"]) for e in lines if e["kind"] != "result_summary"]


def outcome(summary: dict[str, Any]) -> tuple[Any, ...]:
    return (summary["kind"], summary["run_id"], summary["provider"], summary["status"], summary["text"],
            summary["error"], summary["exit_code"], summary["events"])


def runs_json(where: str, address: str, *extra: str) -> list[dict[str, Any]]:
    proc = asm("runs", f"--{where}", address, "--output", "json", *extra)
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


# -- asm attach --node ------------------------------------------------------------------


def test_attach_follows_a_running_run_to_its_end_like_the_run_itself(
    node: NodeProcess, bg: Callable[..., Bg], gated: Callable[[str, int, int, int], tuple[str, Path]],
) -> None:
    """Attached mid-run: the held events, then the live ones, then the run's own summary and exit code
    (here a failing run: exit 1, not attach's own success). --after-seq 3 gets exactly the events after 3."""
    prompt, gate = gated("a", 3, 4, 7)
    run = bg("run", "--node", node.address, "--provider", "shell", "--run-id", "follow-me", "--output", "jsonl", prompt)
    assert [e["kind"] for e in run.lines(4)] == ["run_started", *["assistant_delta"] * 3]
    whole = bg("attach", "follow-me", "--node", node.address, "--output", "jsonl")
    later = bg("attach", "follow-me", "--node", node.address, "--output", "jsonl", "--after-seq", "3")
    # Both followers are attached and have what the node held before the gate opens.
    assert [e["seq"] for e in whole.lines(4)] == [1, 2, 3, 4]
    assert [e["seq"] for e in later.lines(1)] == [4]
    gate.touch()
    run_rc, run_out, run_err = run.finish()
    rc, out, err = whole.finish()
    later_rc, later_out, later_err = later.finish()
    no_traceback((rc, out, err))
    no_traceback((later_rc, later_out, later_err))
    assert run_rc == 1, run_err
    ran, followed = jsonl(run_out), jsonl(out)
    assert events_of(followed) == events_of(ran)
    texts = [e["payload"]["content"] for e in followed if e["kind"] == "assistant_delta"]
    assert texts == [f"before {i}\n" for i in range(3)] + [f"after {i}\n" for i in range(4)]
    assert followed[-1]["kind"] == "result_summary" and outcome(followed[-1]) == outcome(ran[-1])
    assert followed[-1]["status"] == "failed" and followed[-1]["error"]["kind"] == "tool_failed"
    assert rc == run_rc, err
    # --after-seq 3: every event after 3 and none before, then the summary of what it followed.
    tail = jsonl(later_out)
    assert events_of(tail) == [e for e in events_of(ran) if e[0] > 3]
    assert tail[-1]["kind"] == "result_summary" and tail[-1]["status"] == "failed" and later_rc == 1


def test_attach_to_a_finished_run_prints_its_events_and_summary(node: NodeProcess) -> None:
    ran = asm("run", "--node", node.address, "--provider", "shell", "--run-id", "done-1", "--output", "jsonl",
              "echo finished work")
    assert ran.returncode == 0, ran.stderr
    followed = asm("attach", "done-1", "--node", node.address, "--output", "jsonl")
    assert followed.returncode == 0, followed.stderr
    assert events_of(jsonl(followed.stdout)) == events_of(jsonl(ran.stdout))
    assert outcome(jsonl(followed.stdout)[-1]) == outcome(jsonl(ran.stdout)[-1])
    # Text output: the same text on stdout and the same kind of summary line on stderr as `asm run`.
    text_run = asm("run", "--node", node.address, "--provider", "shell", "--run-id", "done-2", "echo plain")
    text_attach = asm("attach", "done-2", "--node", node.address)
    assert (text_attach.returncode, text_attach.stdout) == (text_run.returncode, text_run.stdout) == (0, "plain\n")
    assert "completed" in text_attach.stderr and "completed" in text_run.stderr
    # A cursor at the end: no event is printed, the summary still has the run's outcome.
    last = events_of(jsonl(ran.stdout))[-1][0]
    at_end = asm("attach", "done-1", "--node", node.address, "--output", "jsonl", "--after-seq", str(last))
    assert at_end.returncode == 0, at_end.stderr
    [summary] = jsonl(at_end.stdout)
    assert summary["kind"] == "result_summary" and summary["status"] == "completed" and summary["error"] is None
    # Past the end: a typed usage error naming the run's last seq.
    past = asm("attach", "done-1", "--node", node.address, "--after-seq", str(last + 1))
    assert past.returncode == 2 and f"its last seq is {last}" in past.stderr and past.stdout == ""
    no_traceback(past)


def test_attach_to_a_failed_finished_run_exits_like_the_run(node: NodeProcess) -> None:
    ran = asm("run", "--node", node.address, "--provider", "shell", "--run-id", "failed-1", "--output", "jsonl", "false")
    followed = asm("attach", "failed-1", "--node", node.address, "--output", "jsonl")
    assert ran.returncode == followed.returncode == 1
    assert outcome(jsonl(followed.stdout)[-1]) == outcome(jsonl(ran.stdout)[-1])
    assert jsonl(followed.stdout)[-1]["error"]["kind"] == "tool_failed"


def test_attach_after_a_node_restart_gets_the_journaled_outcome(
    tmp_path: Path, node_process: Callable[..., NodeProcess], bg: Callable[..., Bg],
    gated: Callable[[str, int, int, int], tuple[str, Path]],
) -> None:
    """The node forgot the runs (restart) but journaled them: an ended one gives its outcome, never a
    new execution; one that was running when the agent died is run_lost (exit 1)."""
    state = str(tmp_path / "journal")
    first = node_process("--shell-allow", sys.executable, "--state-dir", state)
    ran = asm("run", "--node", first.address, "--provider", "shell", "--run-id", "before-restart", "--output",
              "jsonl", "false")
    assert ran.returncode == 1
    prompt, _gate = gated("k", 1, 0, 0)
    doomed = bg("run", "--node", first.address, "--provider", "shell", "--run-id", "cut-off", "--output", "jsonl",
                prompt)
    doomed.lines(2)
    first.stop(signal.SIGKILL)
    doomed.kill()
    second = node_process("--shell-allow", sys.executable, "--state-dir", state)
    followed = asm("attach", "before-restart", "--node", second.address, "--output", "jsonl")
    assert followed.returncode == 1, followed.stderr
    *events, summary = jsonl(followed.stdout)
    assert [e["kind"] for e in events] == ["error", "run_completed"]
    assert all(e["metadata"]["origin"] == "node_journal" for e in events)
    assert (summary["status"], summary["error"]["kind"]) == ("failed", "tool_failed")
    lost = asm("attach", "cut-off", "--node", second.address)
    assert lost.returncode == 1 and "run_lost" not in lost.stdout and "is lost" in lost.stderr, lost.stderr
    no_traceback(lost)
    assert runs_json("node", second.address) == []  # nothing ran again


def test_unknown_run_id_is_a_typed_not_found_and_nothing_is_started(node: NodeProcess) -> None:
    proc = asm("attach", "never-started", "--node", node.address, "--output", "jsonl")
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("asm: error: run never-started is not known to node ")
    no_traceback(proc)
    # Attach never starts anything: the node still has no run at all, and the id is still unknown.
    assert runs_json("node", node.address) == []
    assert asm("attach", "never-started", "--node", node.address).returncode == 5
    # A malformed id is a usage error (exit 2), before any call.
    bad = asm("attach", "no spaces!", "--node", node.address)
    assert bad.returncode == 2 and "invalid run id" in bad.stderr
    no_traceback(bad)
    assert runs_json("node", node.address) == []


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "", str(2**63), "99999999999999999999999"])
def test_bad_after_seq_is_a_usage_error(value: str) -> None:
    proc = asm("attach", "r1", "--node", "127.0.0.1:1", "--after-seq", value)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("asm: error: argument --after-seq: "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    no_traceback(proc)


def test_attach_needs_exactly_one_place() -> None:
    for args in (["attach", "r1"], ["attach", "r1", "--node", "127.0.0.1:1", "--controller", "127.0.0.1:2"]):
        proc = asm(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("asm: error: "), proc.stderr
        no_traceback(proc)


def test_attach_to_an_unreachable_node_exits_3() -> None:
    proc = asm("attach", "r1", "--node", "127.0.0.1:1")
    assert proc.returncode == 3 and "unreachable" in proc.stderr
    no_traceback(proc)


def test_ctrl_c_detaches_and_the_run_goes_on(
    node: NodeProcess, bg: Callable[..., Bg], gated: Callable[[str, int, int, int], tuple[str, Path]],
) -> None:
    prompt, gate = gated("d", 2, 2, 0)
    run = bg("run", "--node", node.address, "--provider", "shell", "--run-id", "keep-going", "--output", "jsonl", prompt)
    run.lines(3)
    follower = bg("attach", "keep-going", "--node", node.address, "--output", "jsonl")
    assert [e["seq"] for e in follower.lines(3)] == [1, 2, 3]
    follower.proc.send_signal(signal.SIGINT)
    rc, out, err = follower.finish(timeout=15)
    assert rc == 130, err
    [line] = err.splitlines()  # nothing else: no warning about tasks or channels left behind
    assert line.startswith("asm: detached from run keep-going") and "--after-seq 3" in line
    assert "result_summary" not in out
    no_traceback((rc, out, err))
    # The run was not interrupted: it is still running, and ends as it would have.
    assert [r["run_id"] for r in runs_json("node", node.address, "--status", "running")] == ["keep-going"]
    gate.touch()
    run_rc, run_out, run_err = run.finish()
    assert run_rc == 0, run_err
    summary = jsonl(run_out)[-1]
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["text"] == "before 0\nbefore 1\nafter 0\nafter 1\n"
    # Re-attach from the detach point: the rest, and the summary.
    again = asm("attach", "keep-going", "--node", node.address, "--output", "jsonl", "--after-seq", "3")
    assert again.returncode == 0 and jsonl(again.stdout)[0]["seq"] == 4


# -- asm runs --------------------------------------------------------------------------


def test_runs_lists_and_filters_by_status(
    node: NodeProcess, bg: Callable[..., Bg], gated: Callable[[str, int, int, int], tuple[str, Path]],
) -> None:
    assert asm("run", "--node", node.address, "--provider", "shell", "--run-id", "ok-1", "echo one").returncode == 0
    assert asm("run", "--node", node.address, "--provider", "shell", "--run-id", "bad-1", "false").returncode == 1
    prompt, gate = gated("r", 1, 0, 0)
    run = bg("run", "--node", node.address, "--provider", "shell", "--run-id", "live-1", "--output", "jsonl", prompt)
    run.lines(2)
    try:
        running = runs_json("node", node.address, "--status", "running")
        assert [r["run_id"] for r in running] == ["live-1"]
        row = running[0]
        assert (row["status"], row["provider"], row["node"], row["finished_unix_nano"]) == (
            "running", "shell", node.address, 0)
        assert row["session_id"] and row["started"].endswith("Z") and row["duration_s"] >= 0
        assert [r["run_id"] for r in runs_json("node", node.address, "--status", "completed")] == ["ok-1"]
        assert [r["run_id"] for r in runs_json("node", node.address, "--status", "failed")] == ["bad-1"]
        assert [r["run_id"] for r in runs_json("node", node.address)] == ["ok-1", "bad-1", "live-1"]
        assert [r["run_id"] for r in runs_json("node", node.address, "--limit", "2")] == ["bad-1", "live-1"]
        table = asm("runs", "--node", node.address)
        assert table.returncode == 0
        head, *rows = table.stdout.splitlines()
        assert head.split() == ["RUN", "SESSION", "PROVIDER", "NODE", "STATUS", "STARTED", "DURATION"]
        assert [(r.split()[0], r.split()[4]) for r in rows] == [("ok-1", "completed"), ("bad-1", "failed"),
                                                                ("live-1", "running")]
        assert all(re.fullmatch(r"\d+\.\ds", r.split()[6]) for r in rows)
    finally:
        gate.touch()
    assert run.finish()[0] == 0
    assert runs_json("node", node.address, "--status", "running") == []


def test_runs_bad_status_and_flags_are_typed(node: NodeProcess) -> None:
    proc = asm("runs", "--node", node.address, "--status", "bogus")
    assert proc.returncode == 2, proc.stderr
    assert "unknown run status 'bogus'" in proc.stderr and "running" in proc.stderr and "completed" in proc.stderr
    no_traceback(proc)
    for args in (["--limit", "-1"], ["--limit", "x"], ["--limit", str(2**32)], []):
        bad = asm("runs", *(["--node", node.address] if args else []), *args)
        assert bad.returncode == 2 and bad.stderr.startswith("asm: error: "), (args, bad.stderr)
        no_traceback(bad)
    down = asm("runs", "--node", "127.0.0.1:1")
    assert down.returncode == 3 and "unreachable" in down.stderr
    no_traceback(down)


async def test_list_runs_rpc_filters_and_limits(tmp_path: Path) -> None:
    """The node side of ListRuns(status, limit), through real gRPC."""
    server = await start_server(node_config())
    client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{server.port}"))
    try:
        async with Session("shell", node=RemoteNode(f"127.0.0.1:{server.port}")) as s:
            for i in range(3):
                assert (await s.query("echo x", run_id=f"q{i}")).ok
            assert not (await s.query("false", run_id="q-fail")).ok
        listed = await client.list_runs(pb.ListRunsRequest(status="completed"))
        assert [r.run_id for r in listed.runs] == ["q0", "q1", "q2"]
        assert [r.node for r in listed.runs] == ["", "", ""]  # a node leaves it empty: the runs are its own
        assert [r.run_id for r in (await client.list_runs(pb.ListRunsRequest(limit=2))).runs] == ["q2", "q-fail"]
        assert [r.run_id for r in (await client.list_runs(pb.ListRunsRequest(status="failed"))).runs] == ["q-fail"]
        assert len((await client.list_runs(pb.ListRunsRequest())).runs) == 4
        with pytest.raises(AsmError) as exc:
            await client.list_runs(pb.ListRunsRequest(status="x" * 10_000))
        assert exc.value.kind == "config_invalid" and len(exc.value.message) < 200
        assert "starting, running, completed, failed, interrupted" in exc.value.message
    finally:
        await client.close()
        await server.stop()


# -- not_found on the wire, and a follower that gets it -----------------------------------


class _Forgetful(NodeAgent):
    """A server that answers AttachRun with ``not_found`` (as a controller answers an id it does not know)."""

    def attach_run_frames(self, request: pb.AttachRunRequest) -> Any:
        raise RunNotFound(f"Unknown run id: {request.run_id}")


async def test_not_found_round_trips_and_a_follower_treats_it_as_the_run_gone() -> None:
    config = node_config()
    server = await start_server(config, agent=_Forgetful(config))
    target = RemoteNode(f"127.0.0.1:{server.port}")
    client = GrpcNodeClient(target)
    try:
        with pytest.raises(RunNotFound) as exc:
            async for _ in client.attach_run(pb.AttachRunRequest(run_id="gone")):
                pass
        assert (exc.value.kind, exc.value.domain, exc.value.reason) == ("not_found", "runtime", "run_not_found")
        assert RunNotFound("x").grpc_status().name == "NOT_FOUND"
        # Session's follower: the server no longer knows the run (like kind "unknown"): node_lost, at once.
        async with Session("shell", node=target) as s:
            stream = s.attach("gone", target)
            t0 = time.monotonic()
            seen = [ev async for ev in stream]
            assert time.monotonic() - t0 < 5
            assert stream.result is not None and stream.result.error is not None
            assert stream.result.error.kind == "node_lost" and "no longer knows run gone" in stream.result.error.message
            assert [ev.kind for ev in seen] == ["error", "run_completed"]
    finally:
        await client.close()
        await server.stop()


# -- through a controller -------------------------------------------------------------------


@pytest.fixture
def controller(tmp_path: Path, node: NodeProcess) -> Iterator[ControllerProcess]:
    with start_controller_process(tmp_path, "--node", node.address) as ctl:
        yield ctl


def test_attach_through_a_controller(
    controller: ControllerProcess, bg: Callable[..., Bg], gated: Callable[[str, int, int, int], tuple[str, Path]],
) -> None:
    prompt, gate = gated("c", 2, 3, 0)
    run = bg("run", "--controller", controller.address, "--provider", "shell", "--run-id", "via-ctl",
             "--output", "jsonl", prompt)
    run.lines(3)
    follower = bg("attach", "via-ctl", "--controller", controller.address, "--output", "jsonl")
    assert [e["seq"] for e in follower.lines(3)] == [1, 2, 3]
    assert "via-ctl" in [r["run_id"] for r in runs_json("controller", controller.address)]
    gate.touch()
    run_rc, run_out, run_err = run.finish()
    rc, out, err = follower.finish()
    no_traceback((rc, out, err))
    assert run_rc == rc == 0, (run_err, err)
    assert events_of(jsonl(out)) == events_of(jsonl(run_out))
    assert outcome(jsonl(out)[-1]) == outcome(jsonl(run_out)[-1])
    # After its end, through the controller: its final events and summary.
    done = asm("attach", "via-ctl", "--controller", controller.address, "--output", "jsonl", "--after-seq", "4")
    assert done.returncode == 0, done.stderr
    assert [e[0] for e in events_of(jsonl(done.stdout))] == [e[0] for e in events_of(jsonl(run_out)) if e[0] > 4]
    assert jsonl(done.stdout)[-1]["status"] == "completed"
    unknown = asm("attach", "not-there", "--controller", controller.address)
    assert unknown.returncode == 5 and "not known to controller" in unknown.stderr
    no_traceback(unknown)
