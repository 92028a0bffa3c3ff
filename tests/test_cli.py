"""The ``asm`` command line, as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cli import ASM, asm, jsonl
from tests.support.processes import ROOT, NodeProcess


def test_run_on_embedded_node_prints_events_and_summary() -> None:
    proc = asm("run", "--provider", "shell", "--output", "jsonl", "echo hello")
    assert proc.returncode == 0, proc.stderr
    lines = jsonl(proc.stdout)
    assert [line["kind"] for line in lines] == ["run_started", "assistant_delta", "result", "run_completed", "result_summary"]
    for line in lines[:-1]:
        assert {"kind", "seq", "run_id", "payload"} <= set(line)
    summary = lines[-1]
    assert summary["status"] == "completed" and "hello" in str(summary["text"])
    assert summary["error"] is None and summary["node_id"]
    assert summary["cost"] == {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}


def test_run_on_remote_node_with_token(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    tok = tmp_path / "t"
    tok.write_text("tok-123\n")
    node = node_process("--token-file", str(tok))
    proc = asm("run", "--node", node.address, "--provider", "shell", "--output", "jsonl", "echo hello",
               env={"ASM_TOKEN": "tok-123"})
    assert proc.returncode == 0, proc.stderr
    lines = jsonl(proc.stdout)
    assert lines[0]["kind"] == "run_started" and lines[-1]["kind"] == "result_summary"
    assert "hello" in str(lines[-1]["text"])
    assert lines[-1]["metadata"]["node_epoch"] == node.epoch  # type: ignore[index]


@pytest.mark.slow
def test_text_output_and_failed_run_exit_code() -> None:
    ok = asm("run", "--provider", "shell", "echo plain text")
    assert ok.returncode == 0 and ok.stdout == "plain text\n"
    failed = asm("run", "--provider", "shell", "false")
    assert failed.returncode == 1
    assert "tool_failed" in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.slow
def test_user_mistakes_print_one_line_and_no_traceback(tmp_path: Path) -> None:
    cases = [
        (["run", "--provider", "shell", "--bogus", "echo"], 2),
        (["run", "--provider", "shell", "--permission-mode", "yolo", "echo"], 2),
        (["run", "--node", "127.0.0.1:1", "--provider", "shell", "echo hi"], 3),
        (["run", "--node", "not-an-address", "--provider", "shell", "echo hi"], 2),
        (["run", "--provider", "shell", "--opt", "novalue", "echo hi"], 2),
        (["run", "--provider", "shell", "--token-file", str(tmp_path / "missing"), "--node", "127.0.0.1:1", "echo"], 2),
        (["node", "serve", "--listen", "127.0.0.1:0", "--workspace-root", str(tmp_path / "nope")], 2),
    ]
    for args, code in cases:
        proc = asm(*args)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr, args
        errors = [line for line in proc.stderr.splitlines() if line.startswith("asm: error:")]
        assert errors, (args, proc.stderr)
    # `asm nodes` reports per-node errors in its table (and exits 3), not as a usage error.
    nodes = asm("nodes", "--node", "127.0.0.1:1")
    assert nodes.returncode == 3 and "unreachable" in nodes.stdout and "Traceback" not in nodes.stderr


@pytest.mark.slow
def test_cwd_outside_roots_is_a_clear_error(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    node = node_process("--workspace-root", str(root))
    proc = asm("run", "--node", node.address, "--provider", "shell", "--cwd", "/etc", "pwd")
    assert proc.returncode == 3
    assert "outside the node's workspace roots" in proc.stderr and "Traceback" not in proc.stderr
    inside = asm("run", "--node", node.address, "--provider", "shell", "--cwd", str(root), "pwd")
    assert inside.returncode == 0 and inside.stdout.strip() == str(root)


@pytest.mark.slow
def test_nodes_lists_handshake(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    proc = asm("nodes", "--node", node.address, "--output", "json", "--provider", "shell")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["epoch"] == node.epoch and row["version"] == "0.1.0"
    assert row["providers"][0]["name"] == "shell" and row["preflight"]["ok"] is True
    assert row["load"] == {"active_runs": 0, "max_runs": 8}


@pytest.mark.slow
def test_ctrl_c_interrupts_the_run_and_still_prints_the_summary(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    proc = subprocess.Popen([*ASM, "run", "--node", node.address, "--provider", "shell", "--output", "jsonl", "sleep 30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    assert proc.stdout is not None
    first = proc.stdout.readline()  # run_started: the CLI is running on the node
    assert json.loads(first)["kind"] == "run_started"
    pid = json.loads(first)["payload"]["pid"]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 10
    summary = jsonl(out)[-1]
    assert summary["kind"] == "result_summary" and summary["status"] == "interrupted"
    assert summary["error"]["kind"] == "user_cancelled"  # type: ignore[index]
    assert "Traceback" not in err
    try:
        os.kill(pid, 0)
        alive = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive


def test_generated_stubs_match_proto() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_node_without_the_cli_fails_preflight_naming_it(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_process(env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
                             "CLAUDE_CLI_PATH": "", "CODEX_PATH": ""})
    nodes = asm("nodes", "--node", node.address, "--provider", "claude", "--output", "json")
    assert nodes.returncode == 3
    (row,) = json.loads(nodes.stdout)
    assert row["preflight"]["error"]["kind"] == "cli_not_found"
    assert "CLAUDE_CLI_PATH" in row["preflight"]["error"]["message"]
    run = asm("run", "--node", node.address, "--provider", "codex", "hello")
    assert run.returncode == 3 and "CODEX_PATH" in run.stderr and "Codex CLI not found" in run.stderr


@pytest.mark.slow
def test_provider_manifest_cli() -> None:
    proc = asm("providers", "--output", "json")
    assert proc.returncode == 0
    by_name = {m["provider"]: m for m in json.loads(proc.stdout)}
    assert by_name["claude"]["permission_modes"]["bypass"]["cli_args"] == ["--permission-mode", "bypassPermissions"]
    assert by_name["codex"]["permission_modes"]["auto"]["supported"] is False
    assert by_name["gemini"]["common_features"]["ollama"]["supported"] is False
    assert by_name["claude"]["common_features"]["ollama"]["supported"] is True
    assert "reasoning_effort" in by_name["codex"]["options"]
    bad = asm("run", "--provider", "codex", "--permission-mode", "auto", "hi")
    assert bad.returncode in (2, 3) and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_run_with_snapshot_reports_the_workspace_diff(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"]):
        subprocess.run(cmd, cwd=repo, check=True)
    (repo / "kept.txt").write_text("x\n")
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True)
    node = node_process("--shell-allow", "touch", "--workspace-root", str(tmp_path))
    proc = asm("run", "--node", node.address, "--provider", "shell", "--snapshot", "--cwd", str(repo),
               "--output", "jsonl", "touch made-by-agent.txt")
    assert proc.returncode == 0, proc.stderr
    snaps = json.loads(proc.stdout.splitlines()[-1])["metadata"]["snapshots"]
    assert snaps["backend"] == "git"
    assert snaps["diff"] == {"added": ["made-by-agent.txt"], "modified": [], "deleted": []}
    text = asm("run", "--node", node.address, "--provider", "shell", "--snapshot", "hash", "--cwd", str(repo),
               "touch second.txt")
    assert text.returncode == 0 and "1 added" in text.stderr and "A second.txt" in text.stderr


@pytest.mark.slow
def test_record_then_replay_prints_the_same_result_summary(node_process: Callable[..., NodeProcess],
                                                           tmp_path: Path) -> None:
    node = node_process()
    store = tmp_path / "events.jsonl"
    live = asm("run", "--node", node.address, "--provider", "shell", "--record", str(store), "--output", "jsonl",
               "echo recorded run")
    assert live.returncode == 0, live.stderr
    replay = asm("replay", str(store), "--output", "jsonl")
    assert replay.returncode == 0, replay.stderr
    live_lines, replay_lines = live.stdout.splitlines(), replay.stdout.splitlines()
    assert json.loads(replay_lines[-1]) == json.loads(live_lines[-1])
    assert [json.loads(x)["seq"] for x in replay_lines[:-1]] == [json.loads(x)["seq"] for x in live_lines[:-1]]
    text = asm("replay", str(store))
    assert text.returncode == 0 and text.stdout == "recorded run\n"
    missing = asm("replay", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and missing.stderr.startswith("asm: error:") and "Traceback" not in missing.stderr
    unknown = asm("replay", str(store), "--run", "no-such-run")
    assert unknown.returncode == 5 and "Traceback" not in unknown.stderr  # no such run (not_found)
