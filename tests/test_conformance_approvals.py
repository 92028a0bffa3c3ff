"""Conformance with the real CLIs: Claude Code's approvals answered by a person through ``asm run`` on a
pseudo-terminal and through ``asm approve`` from another process, and deadlines ending a slow Claude Code,
Codex and Gemini run with a typed ``timeout`` (``run_timeout_ms``; ``idle_timeout_ms`` only for a silent one).

As in tests/test_conformance.py: a node agent process per CLI with a hermetic environment pointing the CLI
at the scripted model server on 127.0.0.1 (SCENARIO_SLOW streams 40 deltas 0.25 s apart, 10 s in all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cli_env import CLI_NAMES
from tests.support.conformance import OPTIONS, new_workspace, start_cli_node
from tests.support.fake_model_server import FakeModelServer
from tests.support.processes import ROOT, NodeProcess, pid_alive
from tests.support.terminal import Lines, Terminal, terminals

pytestmark = pytest.mark.real_cli  # every test here drives an installed CLI (skipped without it)



@pytest.fixture(scope="module")
def model_server() -> Iterator[FakeModelServer]:
    server = FakeModelServer(slow_deltas=40, slow_interval=0.25).start()
    try:
        yield server
    finally:
        server.stop()


def _node(name: str, model_server: FakeModelServer, scratch: Path) -> tuple[NodeProcess, Path]:
    return start_cli_node(name, model_server, scratch), new_workspace(scratch)


@pytest.fixture(scope="module", params=CLI_NAMES)
def cli_node(request: pytest.FixtureRequest, model_server: FakeModelServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, NodeProcess, Path]]:
    name: str = request.param
    node, workspace = _node(name, model_server, tmp_path_factory.mktemp(f"deadline-{name}"))
    try:
        yield name, node, workspace
    finally:
        node.stop()


@pytest.fixture
def claude_node(model_server: FakeModelServer, tmp_path: Path) -> Iterator[tuple[NodeProcess, Path]]:
    node, workspace = _node("claude", model_server, tmp_path)
    try:
        yield node, workspace
    finally:
        node.stop()


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    yield from terminals()


def asm(*args: str) -> list[str]:
    return [sys.executable, "-m", "asm_cli", *args]


def _opts(name: str) -> list[str]:
    return [f"--opt={k}={json.dumps(v)}" for k, v in OPTIONS[name].items()]


# -- deadlines ---------------------------------------------------------------------------------


def test_run_timeout_ends_a_slow_run(cli_node: tuple[str, NodeProcess, Path]) -> None:
    """`asm run --opt run_timeout_ms=2000` on a 10 s answer: stopped at about 2 s, kind timeout, reason
    run_timeout, the CLI gone, exit 1."""
    name, node, workspace = cli_node
    t0 = time.monotonic()
    proc = subprocess.run(asm("run", "--node", node.address, "--provider", name, "--cwd", str(workspace),
                              "--output", "jsonl", *_opts(name), "--opt", "run_timeout_ms=2000",
                              "Talk slowly. SCENARIO_SLOW"),
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    summary = lines[-1]
    assert summary["kind"] == "result_summary" and summary["status"] == "failed", summary
    assert summary["error"]["kind"] == "timeout" and summary["error"]["reason"] == "run_timeout", summary["error"]
    assert "run_timeout_ms of 2000 ms" in summary["error"]["message"]
    assert elapsed < 2 + 8 + 8, elapsed  # 2 s, then at most the interrupt escalation (a CLI slow to exit)
    started = next(line for line in lines if line["kind"] == "run_started")
    assert not pid_alive(started["payload"]["pid"]), "the CLI outlived its deadline"


def test_idle_timeout_tells_a_streaming_run_from_a_silent_one(cli_node: tuple[str, NodeProcess, Path]) -> None:
    """idle_timeout_ms=4000 on the 10 s answer: Claude Code and Gemini stream a delta every 0.25 s, so it never
    fires and the run completes; Codex prints nothing until its turn ends, so it is silent and stopped."""
    name, node, workspace = cli_node
    t0 = time.monotonic()
    proc = subprocess.run(asm("run", "--node", node.address, "--provider", name, "--cwd", str(workspace),
                              "--output", "jsonl", *_opts(name), "--opt", "idle_timeout_ms=4000",
                              "Talk slowly. SCENARIO_SLOW"),
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    summary = json.loads(proc.stdout.splitlines()[-1])
    if name == "codex":
        assert proc.returncode == 1, proc.stderr
        assert summary["error"]["kind"] == "timeout" and summary["error"]["reason"] == "idle_timeout", summary
        assert time.monotonic() - t0 < 4 + 8 + 8
    else:
        assert proc.returncode == 0, proc.stderr
        assert summary["status"] == "completed" and summary["error"] is None, summary


# -- Claude Code approvals ------------------------------------------------------------------------


@pytest.mark.parametrize(("typed", "decision"), [("y", "allow"), ("n", "deny")])
def test_claude_approval_at_the_terminal(claude_node: tuple[NodeProcess, Path], terminal: Callable[..., Terminal],
                                         typed: str, decision: str) -> None:
    """`asm run --provider claude --opt approvals=true` on a terminal asks "Allow Bash(touch ...)?", and the
    real CLI obeys the answer: the file exists after y, not after n."""
    node, workspace = claude_node
    target = workspace / "denied-file.txt"
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    t = terminal(asm("run", "--node", node.address, "--provider", "claude", "--cwd", str(workspace), "--opt",
                     "approvals=true", "Write a file. SCENARIO_TOOLWRITE"), env, str(ROOT))
    end = t.expect(r"Allow Bash\([^\n]*touch[^\n]*\)\? \[y/N/a\]", timeout=60)
    assert '"command":' in t.text and "denied-file.txt" in t.text
    t.type(typed + "\n")
    t.expect("approved" if decision == "allow" else "denied", start=end)
    code = t.wait(timeout=90)
    assert code == 0, t.text
    assert target.exists() == (decision == "allow"), t.text
    assert t.text.count("[y/N/a]") == 1


def test_claude_approval_from_another_shell(claude_node: tuple[NodeProcess, Path]) -> None:
    """jsonl to a pipe: the approval is printed and waits; `asm approve ... allow` from another process makes
    the real CLI run the tool."""
    node, workspace = claude_node
    run = subprocess.Popen(asm("run", "--node", node.address, "--provider", "claude", "--cwd", str(workspace),
                               "--opt", "approvals=true", "--output", "jsonl", "Write a file. SCENARIO_TOOLWRITE"),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=str(ROOT))
    try:
        assert run.stdout is not None and run.stderr is not None
        lines = Lines(run.stdout)
        asked = lines.until(lambda ev: ev["kind"] == "approval_requested", timeout=60)
        approval_id = asked["payload"]["approval_id"]
        assert asked["payload"]["subject"] == "Bash"
        time.sleep(1.0)
        assert not (workspace / "denied-file.txt").exists(), "ran before anyone answered"
        ok = subprocess.run(asm("approve", asked["run_id"], approval_id, "allow", "--node", node.address),
                            capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert ok.returncode == 0, ok.stderr
        rest = [json.loads(line) for line in lines.rest(timeout=90)]
        assert run.wait(30) == 0
        err = run.stderr.read()
        assert rest[-1]["kind"] == "result_summary" and rest[-1]["status"] == "completed", rest[-1]
        assert [e["payload"]["decision"] for e in rest if e["kind"] == "approval_resolved"] == ["allow"]
        assert f"asm approve {asked['run_id']} {approval_id} allow|deny --node {node.address}" in err
        assert (workspace / "denied-file.txt").exists()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
