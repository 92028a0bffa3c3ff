"""Approvals a person can answer, through the ``asm`` CLI: ``asm run`` asks on a terminal (a pseudo-terminal
here), ``--approve allow|deny`` for scripts, ``asm approve`` from another shell, and a timed-out approval
is not a success.

The CLI is a stand-in for Claude Code (``CLAUDE_CLI_PATH``) that speaks its stream-json dialect: it asks
``can_use_tool`` over stdio as the real one does with ``--permission-prompt-tool stdio``, and reports the
answer it received (the real CLI's turn is tests/test_conformance_approvals.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import NodeProcess, start_controller_process
from tests.support.terminal import Lines, Terminal, terminals

# One or more can_use_tool requests (FAKE_APPROVALS, default 1), each answer appended to FAKE_LOG and
# reported in the final text.
FAKE_CLAUDE = r'''
import json, os, sys
if "--version" in sys.argv:
    print("2.0.0 (Claude Code)")
    sys.exit(0)
def out(obj):
    print(json.dumps(obj), flush=True)
first = sys.stdin.readline()  # the prompt, a stream-json user message
out({"type": "system", "subtype": "init", "session_id": "fake-1", "model": "fake", "tools": ["Bash"],
     "cwd": os.getcwd(), "permissionMode": "default"})
answers = []
for n in range(int(os.environ.get("FAKE_APPROVALS", "1"))):
    command = "echo hi" if n == 0 else f"echo again {n}"
    out({"type": "control_request", "request_id": f"req-{n + 1}",
         "request": {"subtype": "can_use_tool", "tool_name": "Bash", "input": {"command": command},
                     "tool_use_id": f"tu-{n + 1}"}})
    line = sys.stdin.readline()
    answer = json.loads(line)["response"]["response"] if line else {"behavior": "eof"}
    answers.append(answer["behavior"])
    with open(os.environ["FAKE_LOG"], "a") as fh:
        fh.write(json.dumps(answer) + "\n")
text = "answers: " + ",".join(answers)
out({"type": "assistant", "message": {"id": "m1", "role": "assistant", "content": [{"type": "text", "text": text}]},
     "session_id": "fake-1"})
out({"type": "result", "subtype": "success", "is_error": False, "result": text, "session_id": "fake-1",
     "stop_reason": "end_turn", "usage": {"input_tokens": 10, "output_tokens": 2}, "permission_denials": []})
sys.stdin.read()  # asm closes stdin after the result
'''

@pytest.fixture
def fake_claude(tmp_path: Path) -> Iterator[dict[str, str]]:
    script = tmp_path / "claude"
    script.write_text(f"#!{sys.executable}\n{FAKE_CLAUDE}")
    script.chmod(0o755)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    env = {**os.environ, "CLAUDE_CLI_PATH": str(script), "FAKE_LOG": str(tmp_path / "answers.jsonl"),
           "WS": str(workspace)}
    env.pop("NO_COLOR", None)
    yield env


def answers(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_LOG"])
    return [json.loads(line)["behavior"] for line in path.read_text().splitlines()] if path.exists() else []


def asm(*args: str) -> list[str]:
    return [sys.executable, "-m", "asm_cli", *args]


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    yield from terminals()


RUN = ("run", "--provider", "claude", "--opt", "approvals=true", "Run a command")


@pytest.mark.slow
@pytest.mark.parametrize(("typed", "decision"), [("y", "allow"), ("n", "deny"), ("", "deny")])
@pytest.mark.parametrize("term", ["xterm-256color", "dumb"])
def test_run_on_a_terminal_asks_and_obeys(fake_claude: dict[str, str], terminal: Callable[..., Terminal],
                                          typed: str, decision: str, term: str) -> None:
    """Rich (spinner paused while asking) and plain terminals alike: the tool input is shown, the answer obeyed."""
    t = terminal(asm(*RUN[:1], "--cwd", fake_claude["WS"], *RUN[1:]), {**fake_claude, "TERM": term}, fake_claude["WS"])
    end = t.expect(r"Allow Bash\(echo hi\)\? \[y/N/a\]")
    assert '"command": "echo hi"' in t.text, t.text
    t.type(typed + "\n")
    t.expect(f"answers: {decision}", start=end)
    assert t.wait() == 0, t.text
    assert answers(fake_claude) == [decision]
    assert t.text.count("[y/N/a]") == 1


@pytest.mark.slow
def test_a_answers_every_later_approval_of_the_run(fake_claude: dict[str, str],
                                                   terminal: Callable[..., Terminal]) -> None:
    t = terminal(asm(*RUN[:1], "--cwd", fake_claude["WS"], *RUN[1:]), {**fake_claude, "FAKE_APPROVALS": "3"},
                 fake_claude["WS"])
    t.expect(r"\[y/N/a\]")
    t.type("a\n")
    t.expect("answers: allow,allow,allow")
    assert t.wait() == 0, t.text
    assert t.text.count("[y/N/a]") == 1, "asked again after 'a'"
    assert answers(fake_claude) == ["allow"] * 3


@pytest.mark.slow
def test_an_unclear_answer_is_asked_again(fake_claude: dict[str, str], terminal: Callable[..., Terminal]) -> None:
    t = terminal(asm(*RUN[:1], "--cwd", fake_claude["WS"], *RUN[1:]), fake_claude, fake_claude["WS"])
    end = t.expect(r"\[y/N/a\]")
    t.type("maybe\n")
    end = t.expect(r"answer y \(allow\), n \(deny, the default\) or a", start=end)
    t.expect(r"\[y/N/a\]", start=end)
    t.type("yes\n")
    assert t.wait() == 0, t.text
    assert answers(fake_claude) == ["allow"]


@pytest.mark.slow
@pytest.mark.parametrize("decision", ["allow", "deny"])
def test_approve_flag_answers_without_a_terminal(fake_claude: dict[str, str], decision: str) -> None:
    proc = subprocess.run(asm(*RUN[:1], "--cwd", fake_claude["WS"], "--approve", decision, "--output", "jsonl",
                              *RUN[1:]), env=fake_claude, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    resolved = [e["payload"] for e in events if e["kind"] == "approval_resolved"]
    assert [r["decision"] for r in resolved] == [decision] and "--approve" in resolved[0]["reason"]
    assert events[-1]["kind"] == "result_summary" and events[-1]["text"] == f"answers: {decision}"
    assert answers(fake_claude) == [decision]


@pytest.mark.slow
def test_approve_prompt_needs_a_terminal(fake_claude: dict[str, str]) -> None:
    proc = subprocess.run(asm(*RUN[:1], "--approve", "prompt", *RUN[1:]), env=fake_claude, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "--approve prompt needs a terminal" in proc.stderr
    assert answers(fake_claude) == []


@pytest.mark.slow
def test_an_approval_nobody_answers_is_denied_and_exits_1(fake_claude: dict[str, str]) -> None:
    """No terminal, no --approve, an embedded node: the event is printed, the run says nobody can answer it
    from elsewhere, the timeout denies it, the summary warns and the exit code is 1 (not a success)."""
    t0 = time.monotonic()
    proc = subprocess.run(asm(*RUN[:1], "--cwd", fake_claude["WS"], "--approval-timeout", "1s", "--output",
                              "jsonl", *RUN[1:]), env=fake_claude, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 1, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert any(e["kind"] == "approval_requested" for e in events)
    summary = events[-1]
    assert summary["kind"] == "result_summary" and summary["status"] == "completed"
    assert any(w["kind"] == "approval_denied" and w.get("reason") == "approval_timeout" for w in summary["warnings"])
    assert "embedded in this asm process" in proc.stderr
    assert "were not answered in time and were denied" in proc.stderr
    assert answers(fake_claude) == ["deny"]


@pytest.mark.slow
def test_text_output_without_a_terminal_shows_the_timed_out_approval(fake_claude: dict[str, str]) -> None:
    proc = subprocess.run(asm(*RUN[:1], "--cwd", fake_claude["WS"], "--approval-timeout", "1s", *RUN[1:]),
                          env=fake_claude, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert "approval requested" in proc.stderr and "warning (approval_denied)" in proc.stderr, proc.stderr
    assert "was not answered within 1000 ms" in proc.stderr


@pytest.mark.slow
def test_asm_approve_from_another_shell(fake_claude: dict[str, str], node_process: Callable[..., NodeProcess]) -> None:
    """jsonl to a pipe: the approval is printed with the command to answer it; ``asm approve`` in another
    process answers; answering again, or an unknown run, is a clear not-found (exit 5)."""
    node = node_process(env={"CLAUDE_CLI_PATH": fake_claude["CLAUDE_CLI_PATH"], "FAKE_LOG": fake_claude["FAKE_LOG"]})
    run = subprocess.Popen(asm(*RUN[:1], "--node", node.address, "--cwd", fake_claude["WS"], "--output", "jsonl",
                               *RUN[1:]), env=fake_claude, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None and run.stderr is not None
        lines = Lines(run.stdout)
        asked = lines.until(lambda ev: ev["kind"] == "approval_requested")
        run_id = str(asked["run_id"])
        approval_id = str(asked["payload"]["approval_id"])
        time.sleep(1.0)  # nothing answers by itself
        assert answers(fake_claude) == []
        ok = subprocess.run(asm("approve", run_id, approval_id, "allow", "--reason", "looks fine", "--node",
                                node.address), env=fake_claude, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert f"allowed: approval {approval_id} of run {run_id}" in ok.stdout
        seen: list[dict[str, Any]] = []
        summary = lines.until(lambda ev: ev["kind"] == "result_summary", seen=seen)
        assert run.wait(30) == 0
        stderr = run.stderr.read()
        assert f"asm approve {run_id} {approval_id} allow|deny --node {node.address}" in stderr, stderr
        assert summary["text"] == "answers: allow" and summary["status"] == "completed"
        resolved = [e["payload"] for e in seen if e["kind"] == "approval_resolved"]
        assert [(r["approval_id"], r["decision"], r["reason"]) for r in resolved] == [(approval_id, "allow", "looks fine")]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    again = subprocess.run(asm("approve", run_id, approval_id, "deny", "--node", node.address), env=fake_claude,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 5 and "is not pending" in again.stderr and "Traceback" not in again.stderr
    unknown = subprocess.run(asm("approve", "no-such-run", "req-1", "allow", "--node", node.address), env=fake_claude,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 5 and "no-such-run" in unknown.stderr, unknown.stderr
    usage = subprocess.run(asm("approve", run_id, approval_id, "maybe", "--node", node.address), env=fake_claude,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2
    neither = subprocess.run(asm("approve", run_id, approval_id, "allow"), env=fake_claude, capture_output=True,
                             text=True, timeout=60)
    assert neither.returncode == 2 and "--node" in neither.stderr
    assert answers(fake_claude) == ["allow"]


@pytest.mark.slow
def test_asm_approve_through_a_controller(fake_claude: dict[str, str], node_process: Callable[..., NodeProcess],
                                          tmp_path: Path) -> None:
    """`asm run --controller C` waits; `asm approve ... --controller C` answers it on the run's node."""
    node = node_process(env={"CLAUDE_CLI_PATH": fake_claude["CLAUDE_CLI_PATH"], "FAKE_LOG": fake_claude["FAKE_LOG"]})
    ctl = start_controller_process(tmp_path, "--node", node.address)
    try:
        run = subprocess.Popen(asm(*RUN[:1], "--controller", ctl.address, "--cwd", fake_claude["WS"], "--output",
                                   "jsonl", *RUN[1:]), env=fake_claude, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert run.stdout is not None and run.stderr is not None
            lines = Lines(run.stdout)
            asked = lines.until(lambda ev: ev["kind"] == "approval_requested")
            run_id, approval_id = str(asked["run_id"]), str(asked["payload"]["approval_id"])
            ok = subprocess.run(asm("approve", run_id, approval_id, "deny", "--controller", ctl.address),
                                env=fake_claude, capture_output=True, text=True, timeout=60)
            assert ok.returncode == 0, ok.stderr
            assert f"denied: approval {approval_id} of run {run_id}" in ok.stdout
            rest = lines.rest(timeout=60)
            assert run.wait(60) == 0
            err = run.stderr.read()
            assert f"--controller {ctl.address}" in err
            assert json.loads(rest[-1])["text"] == "answers: deny"
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        again = subprocess.run(asm("approve", run_id, approval_id, "allow", "--controller", ctl.address),
                               env=fake_claude, capture_output=True, text=True, timeout=60)
        assert again.returncode == 5 and "is not pending" in again.stderr, again.stderr
    finally:
        ctl.stop()
    assert answers(fake_claude) == ["deny"]


def test_the_question_shows_the_input_safely() -> None:
    from asm_cli.ui import approval_question

    shown, question = approval_question("Bash", json.dumps({"tool_input": {"command": "echo \x1b[2Jhi\nthere"},
                                                            "tool_use_id": "t1"}))
    assert question == "Allow Bash(echo hi there)? [y/N/a] "
    assert "\x1b" not in shown and '"command"' in shown and "tool_use_id" not in shown
    long_shown, _ = approval_question("Write", json.dumps({"tool_input": {f"k{i}": i for i in range(50)}}))
    assert long_shown.splitlines()[-1].startswith("… ") and len(long_shown.splitlines()) == 21
    _, bare = approval_question("", "not json")
    assert bare.startswith("Allow this tool call(") or bare == "Allow this tool call? [y/N/a] "


@pytest.mark.slow
def test_ctrl_c_while_asked_interrupts_the_run(fake_claude: dict[str, str], terminal: Callable[..., Terminal]) -> None:
    """Ctrl-C at the question interrupts the run (its pending approval is denied, reason interrupted): the
    question goes away, exit 130."""
    t = terminal(asm(*RUN[:1], "--cwd", fake_claude["WS"], *RUN[1:]), {**fake_claude, "TERM": "xterm-256color"},
                 fake_claude["WS"])
    end = t.expect(r"\[y/N/a\]")
    t.proc.send_signal(signal.SIGINT)  # what the terminal sends for Ctrl-C
    t.expect(r"was answered meanwhile: deny \(interrupted\)", start=end)
    assert t.wait() == 130, t.text


@pytest.mark.slow
def test_asm_attach_answers_what_is_still_pending_and_never_an_old_approval(
        fake_claude: dict[str, str], node_process: Callable[..., NodeProcess]) -> None:
    """Two approvals: the first answered with ``asm approve`` before anyone attaches, then ``asm attach
    --approve deny`` reads the run's history (both requests) and answers only the one still pending."""
    env = {**fake_claude, "FAKE_APPROVALS": "2"}
    node = node_process(env={"CLAUDE_CLI_PATH": env["CLAUDE_CLI_PATH"], "FAKE_LOG": env["FAKE_LOG"],
                             "FAKE_APPROVALS": "2"})
    run = subprocess.Popen(asm(*RUN[:1], "--node", node.address, "--cwd", env["WS"], "--output", "jsonl", *RUN[1:]),
                           env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None
        lines = Lines(run.stdout)
        first = lines.until(lambda ev: ev["kind"] == "approval_requested")
        run_id = str(first["run_id"])
        ok = subprocess.run(asm("approve", run_id, str(first["payload"]["approval_id"]), "allow", "--node",
                                node.address), env=env, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        second = lines.until(lambda ev: ev["kind"] == "approval_requested")
        assert second["payload"]["approval_id"] != first["payload"]["approval_id"]
        attach = subprocess.run(asm("attach", run_id, "--node", node.address, "--approve", "deny", "--output",
                                    "jsonl"), env=env, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        assert attach.returncode == 0, attach.stderr
        events = [json.loads(line) for line in attach.stdout.splitlines()]
        assert events[-1]["kind"] == "result_summary" and events[-1]["text"] == "answers: allow,deny"
        resolved = [e["payload"] for e in events if e["kind"] == "approval_resolved"]
        assert [(r["decision"], "asm attach --approve deny" in r["reason"]) for r in resolved] == [
            ("allow", False), ("deny", True)]
        assert "no longer pending" not in attach.stderr and "Traceback" not in attach.stderr
        assert run.wait(30) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert answers(env) == ["allow", "deny"]


@pytest.mark.slow
def test_asm_attach_approve_prompt_needs_a_terminal() -> None:
    proc = subprocess.run(asm("attach", "some-run", "--node", "127.0.0.1:1", "--approve", "prompt"),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "--approve prompt needs a terminal" in proc.stderr
