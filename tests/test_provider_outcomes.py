"""Honest outcomes, node side, on the parsers (no process): the CLIs' start-up report as the typed
``provider_init`` event, denials in one normalized shape with a warning each, Codex resumes charged
per run, Codex outside a git repository, and credentials out of every repr/str.
(tests/test_conformance_outcomes.py checks the same against the real CLIs.)"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from asm_controller import Event, Result
from asm_controller._reducer import EventReducer
from asm_node.providers import ClaudeProvider, CliProvider, CodexProvider, GeminiProvider
from asm_node.providers._cli import REDACTED, redact
from asm_node.providers.base import MAX_INIT_DETAILS, ExitInfo, RunSpec, provider_init_event
from asm_node.providers.claude import ClaudeOptions
from asm_node.providers.codex import UNTRUSTED_HINT
from asm_wire import KIND_NAMES, ConfigError, pb

FIXTURES = Path(__file__).parent / "fixtures" / "cli"
PROVIDERS: dict[str, CliProvider] = {
    p.name: p for p in (cls(cls.operator_options) for cls in (ClaudeProvider, CodexProvider, GeminiProvider))
}
THREAD = "01a232f5-36de-7001-a3d9-66e868b38583"


def spec(provider: str, env: dict[str, str] | None = None, mode: str = "default", cwd: str = "/tmp",
         **options: Any) -> RunSpec:
    p = PROVIDERS[provider]
    return RunSpec(run_id="r1", session_id="s1", provider=provider, prompt="hi", cwd=cwd, permission_mode=mode,
                   options=p.validate_options(options, mode), env=env if env is not None else {"HOME": "/nonexistent"})


def parse(provider: str, lines: list[Any], exit_code: int = 0, stderr: str = "", env: dict[str, str] | None = None,
          mode: str = "default", cwd: str = "/tmp", **options: Any) -> tuple[list[pb.Event], Result]:
    parser = PROVIDERS[provider].new_parser(spec(provider, env, mode, cwd, **options))
    out: list[pb.Event] = []
    parser.feed_lines([ln if isinstance(ln, bytes) else json.dumps(ln).encode() for ln in lines], out)
    out += parser.finish(ExitInfo(returncode=exit_code, signal=0, stderr_tail=stderr))
    out.append(pb.Event(kind=pb.EVENT_KIND_RUN_COMPLETED, run_completed=pb.RunCompleted(
        status="failed" if parser.failed else "completed", exit_code=exit_code)))
    reducer = EventReducer("r1", "s1", provider)
    for i, ev in enumerate(out, 1):
        ev.seq = i
        reducer.apply(Event(ev))
    return out, reducer.result()


def kinds(events: list[pb.Event]) -> list[str]:
    return [KIND_NAMES[e.kind] for e in events]


def output_of(events: list[pb.Event]) -> dict[str, Any]:
    ev = next(e for e in events if KIND_NAMES[e.kind] == "result")
    out = json.loads(ev.result.output_json)
    assert isinstance(out, dict)
    return out


# -- provider_init ----------------------------------------------------------------------------------


def test_claude_system_init_is_a_typed_provider_init() -> None:
    lines = (FIXTURES / "claude_text.jsonl").read_bytes().splitlines()
    events, result = parse("claude", lines)
    assert kinds(events)[0] == "provider_init" and result.ok
    init = events[0].provider_init
    assert init.model == "claude-opus-4-8[1m]" and init.cwd == "/tmp/asm-fixture/ws"
    assert init.permission_mode == "default" and init.cli_version == "2.1.197"
    assert "Bash" in init.tools and "Write" in init.tools
    details = json.loads(init.details_json)
    assert details["apiKeySource"] == "ANTHROPIC_API_KEY" and "skills" in details
    assert "tools" not in details and "model" not in details  # the typed fields are not repeated


def test_claude_init_mcp_servers_and_a_huge_report_stay_bounded() -> None:
    init = {"type": "system", "subtype": "init", "model": "m", "tools": ["Bash", "mcp__files__read"],
            "mcp_servers": [{"name": "files", "status": "connected"}, {"name": "db", "status": "failed"}],
            "skills": ["s" * 100] * 2000, "output_style": "default"}
    events, _ = parse("claude", [init, {"type": "result", "subtype": "success", "result": "ok"}])
    pi = events[0].provider_init
    assert [(s.name, s.status) for s in pi.mcp_servers] == [("files", "connected"), ("db", "failed")]
    assert len(pi.details_json.encode()) <= MAX_INIT_DETAILS
    details = json.loads(pi.details_json)
    assert details == {"output_style": "default", "truncated_keys": ["skills"]}


def test_provider_init_event_never_exceeds_its_bound() -> None:
    huge = {f"k{i}": "v" * 5000 for i in range(50)}
    ev = provider_init_event(model="m", details=huge)
    assert len(ev.provider_init.details_json.encode()) <= MAX_INIT_DETAILS
    assert ev.provider_init.model == "m"


def test_gemini_init_and_codex_thread_started_are_provider_init() -> None:
    events, _ = parse("gemini", (FIXTURES / "gemini_text.jsonl").read_bytes().splitlines())
    assert kinds(events)[0] == "provider_init" and events[0].provider_init.model == "gemini-2.5-flash"
    assert json.loads(events[0].provider_init.details_json)["session_id"] == "00000000-0000-4000-8000-000000000001"
    events, _ = parse("codex", (FIXTURES / "codex_text.jsonl").read_bytes().splitlines())
    assert kinds(events)[0] == "provider_init"
    assert json.loads(events[0].provider_init.details_json) == {"thread_id": "00000000-0000-4000-8000-000000000001"}


# -- denials ----------------------------------------------------------------------------------------


def claude_denied_run(extra_tool: bool = False) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "touch f"}}]
    if extra_tool:
        blocks.append({"type": "tool_use", "id": "t2", "name": "Bash", "input": {"command": "echo hi"}})
    results = [{"type": "tool_result", "tool_use_id": "t1", "is_error": True,
                "content": "Claude requested permissions to use Bash, but you haven't granted it yet."}]
    if extra_tool:
        results.append({"type": "tool_result", "tool_use_id": "t2", "content": "hi"})
    return [
        {"type": "assistant", "message": {"id": "m1", "content": blocks}},
        {"type": "user", "message": {"content": results}},
        {"type": "assistant", "message": {"id": "m2", "content": [{"type": "text", "text": "I could not."}]}},
        {"type": "result", "subtype": "success", "is_error": False, "result": "I could not.",
         "permission_denials": [{"tool_name": "Bash", "tool_use_id": "t1", "tool_input": {"command": "touch f"}}]},
    ]


def test_claude_permission_denials_are_normalized_with_a_warning_each() -> None:
    events, result = parse("claude", claude_denied_run())
    output = output_of(events)
    assert output["denials"] == [{"tool": "Bash", "input": {"command": "touch f"},
                                  "reason": "Claude requested permissions to use Bash, but you haven't granted it yet."}]
    assert output["all_tools_denied"] is True
    assert output["permission_denials"]  # the CLI's own list is kept as it said it
    warnings = [e.error for e in events if KIND_NAMES[e.kind] == "error"]
    assert [(w.code, w.domain, w.severity) for w in warnings] == [("permission_denied", "provider", pb.SEVERITY_WARNING)]
    assert "touch f" in warnings[0].message
    assert result.status == "completed"  # the run went on; it is not a *plain* success:
    assert [w.kind for w in result.warnings] == ["permission_denied"]


def test_a_run_with_one_tool_allowed_is_not_all_denied() -> None:
    events, _ = parse("claude", claude_denied_run(extra_tool=True))
    output = output_of(events)
    assert len(output["denials"]) == 1 and "all_tools_denied" not in output


def test_no_denials_no_key() -> None:
    events, result = parse("claude", (FIXTURES / "claude_tool.jsonl").read_bytes().splitlines())
    assert "denials" not in output_of(events) and not result.warnings


# -- codex: rollout files, per-run usage, sandbox refusals ----------------------------------------


def rollout(home: Path, thread: str, records: list[dict[str, Any]], cwd: str = "/tmp", day: str = "01") -> Path:
    path = home / "sessions" / "2026" / "01" / day / f"rollout-2026-01-{day}T00-00-00-{thread}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"type": "session_meta", "payload": {"id": thread, "cwd": cwd}}
    path.write_text("\n".join(json.dumps(r) for r in [meta, *records]) + "\n")
    return path


def task_started() -> dict[str, Any]:
    return {"type": "event_msg", "payload": {"type": "task_started"}}


def token_count(total: tuple[int, int], last: tuple[int, int]) -> dict[str, Any]:
    return {"type": "event_msg", "payload": {"type": "token_count", "info": {
        "total_token_usage": {"input_tokens": total[0], "output_tokens": total[1]},
        "last_token_usage": {"input_tokens": last[0], "output_tokens": last[1]}}}}


def codex_turn(total: tuple[int, int], thread: str = THREAD) -> list[dict[str, Any]]:
    return [{"type": "thread.started", "thread_id": thread}, {"type": "turn.started"},
            {"type": "item.completed", "item": {"id": "item_0", "type": "agent_message", "text": "Hello"}},
            {"type": "turn.completed", "usage": {"input_tokens": total[0], "output_tokens": total[1]}}]


def cost_of(events: list[pb.Event]) -> tuple[int, int]:
    costs = [e.cost_update for e in events if KIND_NAMES[e.kind] == "cost_update"]
    assert len(costs) == 1
    return costs[0].input_tokens, costs[0].output_tokens


def test_codex_resume_by_id_is_charged_the_run_not_the_thread(tmp_path: Path) -> None:
    home = tmp_path / "codex"
    rollout(home, THREAD, [task_started(), token_count((100, 20), (100, 20)),
                           task_started(), token_count((200, 40), (100, 20))])
    events, result = parse("codex", codex_turn((300, 60)), env={"CODEX_HOME": str(home)}, resume=THREAD)
    assert cost_of(events) == (100, 20)
    assert result.cost.input_tokens == 100 and result.cost.output_tokens == 20
    assert output_of(events)["thread_usage"] == {"input_tokens": 300, "output_tokens": 60}
    assert not result.warnings


def test_codex_resume_latest_uses_the_newest_thread_of_this_cwd(tmp_path: Path) -> None:
    home = tmp_path / "codex"
    other = "01a232f5-0000-7001-a3d9-000000000001"
    rollout(home, THREAD, [token_count((500, 50), (500, 50))], cwd="/work/a", day="01")
    rollout(home, other, [token_count((900, 90), (900, 90))], cwd="/work/b", day="02")  # newer, other cwd
    os.utime(next(home.rglob(f"*{other}.jsonl")), (2_000_000_000, 2_000_000_000))
    events, _ = parse("codex", codex_turn((600, 70)), env={"CODEX_HOME": str(home)}, cwd="/work/a", resume="latest")
    assert cost_of(events) == (100, 20)


def test_codex_resume_with_no_readable_history_says_the_cost_is_the_threads(tmp_path: Path) -> None:
    events, result = parse("codex", codex_turn((300, 60)), env={"CODEX_HOME": str(tmp_path / "none")}, resume=THREAD)
    assert cost_of(events) == (300, 60)
    assert any("cumulative" in w.message for w in result.warnings)


def test_codex_reads_only_the_rollouts_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asm_node.providers.codex as codex

    home = tmp_path / "codex"
    filler = {"type": "response_item", "payload": {"type": "message", "content": "x" * 1000}}
    path = rollout(home, THREAD, [task_started(), token_count((100, 20), (100, 20)), *[filler] * 50,
                                  task_started(), token_count((200, 40), (100, 20))])
    monkeypatch.setattr(codex, "ROLLOUT_TAIL_BYTES", 4096)  # the tail holds the last token_count only
    assert codex.thread_total(path) == (200, 40)
    path.write_text(path.read_text() + "\n".join([json.dumps(filler)] * 10) + "\n")
    assert codex.thread_total(path) is None  # none in the tail of a longer file: unknown, not zero
    events, result = parse("codex", codex_turn((300, 60)), env={"CODEX_HOME": str(home)}, resume=THREAD)
    assert cost_of(events) == (300, 60) and any("cumulative" in w.message for w in result.warnings)


def test_a_new_codex_thread_reports_what_codex_says(tmp_path: Path) -> None:
    events, result = parse("codex", codex_turn((100, 20)), env={"CODEX_HOME": str(tmp_path)})
    assert cost_of(events) == (100, 20) and "thread_usage" not in output_of(events) and not result.warnings


def sandbox_turn() -> list[dict[str, Any]]:
    call = {"type": "response_item", "payload": {"type": "function_call", "name": "exec_command", "call_id": "c1",
                                                  "arguments": json.dumps({"cmd": "touch denied-file.txt"})}}
    output = {"type": "response_item", "payload": {"type": "function_call_output", "call_id": "c1", "output": (
        "Chunk ID: 1\nProcess exited with code 1\nOutput:\ntouch: cannot touch 'denied-file.txt': Read-only file system\n")}}
    return [task_started(), call, output, token_count((200, 40), (100, 20))]


@pytest.mark.parametrize("mode", ["default", "plan"])
def test_codex_sandbox_refusals_become_denials(tmp_path: Path, mode: str) -> None:
    home = tmp_path / "codex"
    rollout(home, THREAD, sandbox_turn())
    events, result = parse("codex", codex_turn((200, 40)), env={"CODEX_HOME": str(home)}, mode=mode,
                           skip_git_repo_check=True)
    output = output_of(events)
    assert output["denials"] == [{"tool": "Bash", "input": {"command": "touch denied-file.txt"},
                                  "reason": "refused by codex's sandbox: touch: cannot touch 'denied-file.txt': "
                                            "Read-only file system"}]
    assert output["all_tools_denied"] is True
    assert [w.kind for w in result.warnings] == ["permission_denied"]


def test_codex_bypass_has_no_sandbox_to_refuse(tmp_path: Path) -> None:
    home = tmp_path / "codex"
    rollout(home, THREAD, sandbox_turn())  # an ordinary failure under bypass is the command's, not a denial
    events, result = parse("codex", codex_turn((200, 40)), env={"CODEX_HOME": str(home)}, mode="bypass")
    assert "denials" not in output_of(events) and not result.warnings


def test_codex_outside_a_git_repository_is_config_invalid_with_the_hint() -> None:
    stderr = ("Reading additional input from stdin...\n"
              "Not inside a trusted directory and --skip-git-repo-check was not specified.\n")
    _, result = parse("codex", [], exit_code=1, stderr=stderr)
    assert result.error is not None and result.error.kind == "config_invalid"
    assert result.error.message == UNTRUSTED_HINT
    assert "--opt skip_git_repo_check=true" in UNTRUSTED_HINT and "git repository" in UNTRUSTED_HINT


def test_codex_takes_its_prompt_on_stdin_then_eof(tmp_path: Path) -> None:
    fake = tmp_path / "codex"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    prompt = "a prompt -- with --flags\nand lines " + "x" * 200_000  # longer than one argv string may be
    s = RunSpec(run_id="r1", session_id="s1", provider="codex", prompt=prompt, cwd="/tmp", permission_mode="default",
                options=PROVIDERS["codex"].validate_options({}, "default"), env={"CODEX_PATH": str(fake)})
    cmd = PROVIDERS["codex"].build_command(s)
    assert cmd.argv[-2:] == ["--", "-"] and not any("a prompt" in a for a in cmd.argv)
    assert cmd.stdin and cmd.stdin_data == prompt.encode() and cmd.close_stdin_after_data


def test_codex_stdin_notice_is_left_out_of_other_errors() -> None:
    _, result = parse("codex", [], exit_code=3, stderr="Reading additional input from stdin...\nboom: bad thing\n")
    assert result.error is not None and result.error.kind == "transport_error"
    assert "boom: bad thing" in result.error.message and "stdin" not in result.error.message


# -- credentials out of reprs ----------------------------------------------------------------------


SECRET = "sk-ant-secret-0123456789"


def test_options_repr_and_str_redact_credentials() -> None:
    opts = ClaudeOptions(anthropic_auth_token=SECRET, model="m")
    for text in (repr(opts), str(opts), f"{opts}", repr({"parsed": opts})):
        assert SECRET not in text and REDACTED in text
    assert opts.anthropic_auth_token == SECRET  # the value itself is untouched


def test_redact_reaches_into_mappings() -> None:
    value = {"files": {"command": "srv", "env": {"API_TOKEN": SECRET, "MODE": "x"}, "headers": {"Authorization": SECRET}}}
    assert SECRET not in repr(redact(value))
    assert redact(value)["files"]["env"]["MODE"] == "x"


def test_run_and_command_specs_never_show_the_environment(tmp_path: Path) -> None:
    fake = tmp_path / "claude"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    env = {"CLAUDE_CLI_PATH": str(fake), "ANTHROPIC_API_KEY": SECRET, "HOME": str(tmp_path)}
    s = spec("claude", env=env, anthropic_auth_token=SECRET)
    cmd = PROVIDERS["claude"].build_command(s)
    assert cmd.env["ANTHROPIC_AUTH_TOKEN"] == SECRET  # it reaches the CLI ...
    for text in (repr(s), str(s), repr(cmd), str(cmd)):
        assert SECRET not in text  # ... and no repr


def test_a_refused_option_logs_no_credential(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError) as info:
        PROVIDERS["claude"].validate_options({"anthropic_auth_token": SECRET, "max_turns": "many"}, "default")
    logging.getLogger("asm_node").error("refused: %s (%r)", info.value, info.value)
    assert SECRET not in str(info.value) and SECRET not in caplog.text
