"""The ``mcp_servers`` option (issue 14, 8): validation, who may set it, and how each CLI gets it.

The real CLIs against tests/support/mcp_server.py are in tests/test_conformance_steering.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asm_node.providers._cli import CliProvider
from asm_node.providers._mcp import MAX_SERVERS, secure_for_gemini, write_gemini_settings
from asm_node.providers.base import CommandSpec, RunSpec
from asm_node.providers.claude import ClaudeProvider
from asm_node.providers.codex import CodexProvider
from asm_node.providers.gemini import GeminiProvider
from asm_wire import ConfigError
from tests.support import mcp_server

ROOT = Path(__file__).resolve().parent.parent
CLASSES: dict[str, type[CliProvider]] = {"claude": ClaudeProvider, "codex": CodexProvider, "gemini": GeminiProvider}
SERVERS = {"look-up_1": {"command": "/usr/bin/python3", "args": ["-m", "srv", "a b; rm -rf /", "$(id)"],
                         "env": {"TOKEN": 'se"cr\\et', "MODE": "x"}},
           "docs": {"url": "https://mcp.example.com/mcp?x=1"}}


def allowed(name: str) -> CliProvider:
    return CLASSES[name](["mcp_servers"])


def command(name: str, env: dict[str, str] | None = None, cwd: str = "/tmp", **options: Any) -> CommandSpec:
    provider = allowed(name)
    full_env = {**os.environ, provider.env_var: "/bin/true", **(env or {})}
    spec = RunSpec(run_id=f"run-{uuid.uuid4().hex[:6]}", session_id="s1", provider=name, prompt="hi", cwd=cwd,
                   permission_mode="default", options=provider.validate_options(options, "default"), env=full_env)
    return provider.build_command(spec)


@pytest.fixture
def secure_state() -> Iterator[Path]:
    """An XDG_STATE_HOME Gemini would read a system settings file under (root-owned, no g/o write)."""
    path = ROOT / f".test-state-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    try:
        if secure_for_gemini(path):
            pytest.skip(f"no root-owned private directory here: {secure_for_gemini(path)}")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "needle"), [
    ({"bad name": {"command": "x"}}, "must match"),
    ({"x" * 65: {"command": "x"}}, "must match"),
    ({"a": {"command": "./relative"}}, "absolute path or a bare program name"),
    ({"a": {"command": "-flag"}}, "absolute path or a bare program name"),
    ({"a": {"command": "two words"}}, "absolute path or a bare program name"),
    ({"a": {"command": "x", "url": "https://h"}}, "exactly one of command"),
    ({"a": {}}, "exactly one of command"),
    ({"a": {"url": "file:///etc/passwd"}}, "http:// or https://"),
    ({"a": {"url": "https://"}}, "http:// or https://"),
    ({"a": {"url": "https://h/\nx"}}, "whitespace or control"),
    ({"a": {"command": "x", "env": {"1BAD": "v"}}}, "not a variable name"),
    ({"a": {"command": "x", "env": {"A-B": "v"}}}, "not a variable name"),
    ({"a": {"command": "x", "args": ["ok", 3]}}, "args.1"),
    ({"a": {"command": "x", "args": ["a\x00b"]}}, "NUL"),
    ({"a": {"command": "x", "args": ["a"] * 65}}, "args"),
    ({"a": {"command": "x", "args": ["a" * 4097]}}, "args.0"),
    ({"a": {"command": "x", "cwd": "/"}}, "Extra inputs"),
    ({f"s{i}": {"command": "x"} for i in range(MAX_SERVERS + 1)}, f"at most {MAX_SERVERS}"),
    (["x"], "must be an object"),
    ({"a": "x"}, "expected an object"),
])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_bad_servers_are_refused_before_anything_runs(name: str, value: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as bad:
        allowed(name).validate_options({"mcp_servers": value}, "default")
    assert needle in bad.value.message and "mcp_servers" in bad.value.message


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_option_is_the_operators(name: str) -> None:
    with pytest.raises(ConfigError) as refused:
        CLASSES[name]().validate_options({"mcp_servers": {"docs": {"url": "https://h/mcp"}}}, "default")
    assert refused.value.reason == "option_not_allowed" and "--allow-run-option mcp_servers" in refused.value.message
    assert "mcp_servers" not in CLASSES[name]().client_options()
    assert "mcp_servers" in allowed(name).client_options()


# -- rendering -----------------------------------------------------------------------------


def test_claude_gets_exactly_these_servers_as_json_without_a_shell(tmp_path: Path) -> None:
    cmd = command("claude", env={"XDG_STATE_HOME": str(tmp_path / "state")}, mcp_servers=SERVERS)
    argv = cmd.argv
    [flag] = [a for a in argv if a.startswith("--mcp-config=")]
    path = Path(flag.removeprefix("--mcp-config="))
    # A private file of the run's in the node's state dir, never the servers' env values on argv.
    assert path.parent == tmp_path / "state" / "asm" / "claude-mcp" and cmd.run_files == (str(path),)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not any('se"cr' in a for a in argv)
    assert json.loads(path.read_text()) == {"mcpServers": {
        "look-up_1": {"type": "stdio", "command": "/usr/bin/python3", "args": SERVERS["look-up_1"]["args"],
                      "env": SERVERS["look-up_1"]["env"]},
        "docs": {"type": "http", "url": "https://mcp.example.com/mcp?x=1"}}}
    assert "--strict-mcp-config" in argv  # the node user's own MCP configuration is not mixed in
    plain = command("claude")
    assert not [a for a in plain.argv if "mcp" in a] and plain.run_files == ()


def _codex_table(argv: list[str]) -> dict[str, Any]:
    items = [a.removeprefix("--config=") for a in argv if a.startswith("--config=mcp_servers.")]
    table: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        parsed = tomllib.loads(f"v = {value}")["v"]  # what Codex's TOML parser reads
        node = table
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = parsed
    return table


def test_codex_gets_toml_overrides_it_parses_back_to_the_servers() -> None:
    cmd = command("codex", mcp_servers=SERVERS)
    argv = cmd.argv
    assert _codex_table(argv) == {"mcp_servers": {
        "look-up_1": {"command": "/usr/bin/python3", "args": SERVERS["look-up_1"]["args"],
                      "env_vars": ["TOKEN", "MODE"]},
        "docs": {"url": "https://mcp.example.com/mcp?x=1"}}}
    # The values are in the CLI's environment, forwarded by name: never on argv.
    assert (cmd.env["TOKEN"], cmd.env["MODE"]) == ('se"cr\\et', "x")
    assert not any('se"cr' in a for a in argv)
    assert argv[-2] == "--"  # the overrides come before the prompt


def test_codex_keeps_on_argv_only_a_value_forwarding_would_change() -> None:
    """A key the CLI's own environment has with another value (PATH), or two servers set differently,
    stays in that server's env table: putting it in Codex's environment would change Codex's own."""
    servers = {"a": {"command": "a", "env": {"PATH": "/srv/bin", "SHARED": "1", "SECRET_A": "sa", "HOME": "/h"}},
               "b": {"command": "b", "env": {"SHARED": "2", "SECRET_B": "sb"}}}
    cmd = command("codex", env={"PATH": "/usr/bin", "HOME": "/h"}, mcp_servers=servers)
    table = _codex_table(cmd.argv)["mcp_servers"]
    assert table["a"]["env_vars"] == ["SECRET_A", "HOME"] and table["a"]["env"] == {"PATH": "/srv/bin", "SHARED": "1"}
    assert table["b"]["env_vars"] == ["SECRET_B"] and table["b"]["env"] == {"SHARED": "2"}
    assert cmd.env["PATH"] == "/usr/bin" and "SHARED" not in cmd.env and cmd.env["SECRET_A"] == "sa"


def test_gemini_refuses_a_settings_path_gemini_would_skip(tmp_path: Path) -> None:
    """Under /tmp (world-writable) Gemini CLI ignores a system settings file: the run is refused, typed."""
    with pytest.raises(ConfigError) as refused:
        command("gemini", env={"XDG_STATE_HOME": str(tmp_path / "state")}, mcp_servers=SERVERS)
    assert refused.value.reason == "mcp_unsupported" and "root" in refused.value.message
    assert not list((tmp_path / "state" / "asm" / "gemini-mcp").glob("*.json"))  # nothing left behind


def test_gemini_settings_file_outside_the_workspace_keeps_the_system_settings(secure_state: Path,
                                                                             tmp_path: Path) -> None:
    system = tmp_path / "system.json"
    system.write_text(json.dumps({"general": {"maxAttempts": 1}, "mcpServers": {"ops": {"command": "opsd"}}}))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    cmd = command("gemini", cwd=str(workspace), env={"XDG_STATE_HOME": str(secure_state),
                                                     "GEMINI_CLI_SYSTEM_SETTINGS_PATH": str(system)},
                  mcp_servers=SERVERS)
    path = Path(cmd.env["GEMINI_CLI_SYSTEM_SETTINGS_PATH"])
    assert path.parent == secure_state / "asm" / "gemini-mcp" and not path.is_relative_to(workspace)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not secure_for_gemini(path)
    settings = json.loads(path.read_text())
    assert settings["general"] == {"maxAttempts": 1}  # the operator's system settings stay in force
    assert settings["mcpServers"] == {
        "ops": {"command": "opsd"},
        "look-up_1": {"command": "/usr/bin/python3", "args": SERVERS["look-up_1"]["args"],
                      "env": SERVERS["look-up_1"]["env"]},
        "docs": {"httpUrl": "https://mcp.example.com/mcp?x=1"}}
    assert list(workspace.iterdir()) == []
    # Without mcp_servers nothing is written and Gemini's own settings are untouched.
    plain = command("gemini", env={"XDG_STATE_HOME": str(secure_state)})
    assert plain.env.get("GEMINI_CLI_SYSTEM_SETTINGS_PATH") == os.environ.get("GEMINI_CLI_SYSTEM_SETTINGS_PATH")
    assert len(list(path.parent.iterdir())) == 1


def test_gemini_settings_dir_inside_the_workspace_is_refused(secure_state: Path) -> None:
    servers = {"a": {"command": "x"}}
    parsed = allowed("gemini").validate_options({"mcp_servers": servers}, "default")["parsed"].mcp_servers
    with pytest.raises(ConfigError) as refused:
        write_gemini_settings(parsed, {"XDG_STATE_HOME": str(secure_state)}, "r1", str(secure_state))
    assert refused.value.reason == "mcp_unsupported"


# -- the test MCP server ---------------------------------------------------------------------


def test_the_test_mcp_server_speaks_json_rpc_over_stdio(tmp_path: Path) -> None:
    requests = [{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}},
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "lookup", "arguments": {}}},
                {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "nope"}},
                {"jsonrpc": "2.0", "id": 5, "method": "nope"}]
    log = tmp_path / "log.jsonl"
    proc = subprocess.run([sys.executable, mcp_server.__file__, "--log", str(log)], capture_output=True, text=True,
                          input="".join(json.dumps(r) + "\n" for r in requests) + "not json\n", timeout=30,
                          env={**os.environ, "MCP_SECRET": "from-env"})
    replies = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["id"] for r in replies] == [1, 2, 3, 4, 5, None]  # no reply to the notification
    assert replies[0]["result"]["protocolVersion"] == "2025-06-18"
    assert [t["name"] for t in replies[1]["result"]["tools"]] == [mcp_server.TOOL]
    assert replies[2]["result"]["content"] == [{"type": "text", "text": "from-env"}]
    assert replies[3]["error"]["code"] == -32602 and replies[4]["error"]["code"] == -32601
    assert replies[5]["error"]["code"] == -32700
    assert len(log.read_text().splitlines()) == len(requests)


def test_the_model_server_finds_each_clis_mcp_tool() -> None:
    from tests.support.fake_model_server import TOOL_SEARCH, decide_anthropic, decide_gemini, decide_openai

    prompt = [{"role": "user", "content": "Find the secret. SCENARIO_MCP"}]
    claude = decide_anthropic({"messages": prompt, "tools": [{"name": "Bash"}, {"name": "mcp__asmtest__lookup"}]})
    assert (claude.scenario, claude.mcp_tool) == ("MCP", "mcp__asmtest__lookup")
    gemini = decide_gemini({"contents": [{"role": "user", "parts": [{"text": "SCENARIO_MCP"}]}],
                            "tools": [{"functionDeclarations": [{"name": "mcp_asmtest_lookup"}]}]})
    assert gemini.mcp_tool == "mcp_asmtest_lookup"
    # Codex 0.169 defers MCP tools behind tool_search: search first, then call the namespaced tool found.
    user = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "SCENARIO_MCP"}]}
    first = decide_openai({"input": [user], "tools": [{"type": "function", "name": "exec_command"},
                                                      {"type": "tool_search"}]})
    assert first.mcp_tool == TOOL_SEARCH
    found = {"type": "tool_search_output", "tools": [{"type": "namespace", "name": "mcp__asmtest",
                                                      "tools": [{"type": "function", "name": "lookup"}]}]}
    second = decide_openai({"input": [user, {"type": "tool_search_call"}, found], "tools": []})
    assert (second.scenario, second.mcp_tool, second.mcp_namespace) == ("MCP", "lookup", "mcp__asmtest")


# -- the run's own files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["claude", "codex"])
async def test_a_runs_mcp_secrets_are_in_no_argv_and_its_files_go_when_it_ends(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a node: the CLI (a stand-in script) sees the servers, its argv and run_started event hold
    no env value, and the config file the node wrote is gone once the run has ended."""
    from asm_controller import EmbeddedNode, Session
    from asm_node.testing import running_agent, test_config

    seen = tmp_path / "seen.json"
    script = tmp_path / f"fake-{name}"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      "cfg = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--mcp-config=')]\n"
                      "text = open(cfg[0]).read() if cfg else ''\n"
                      f"json.dump({{'argv': sys.argv, 'env': os.environ.get('TOKEN'), 'config': text}}, "
                      f"open({str(seen)!r}, 'w'))\n")
    script.chmod(0o755)
    monkeypatch.setenv(CLASSES[name].env_var, str(script))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    async with running_agent(test_config(allow_run_options=["mcp_servers"])) as agent:
        async with Session(name, node=EmbeddedNode(agent), cwd=str(workspace)) as s:
            stream = s.stream("hi", options={"mcp_servers": SERVERS, "skip_git_repo_check": True} if name == "codex"
                              else {"mcp_servers": SERVERS})
            events = [ev async for ev in stream]
    got = json.loads(seen.read_text())
    secret = SERVERS["look-up_1"]["env"]["TOKEN"]
    assert not any(secret in a for a in got["argv"])
    started = next(e for e in events if e.kind == "run_started")
    assert not any(secret in a for a in started.payload["args"])
    if name == "claude":
        assert json.loads(got["config"])["mcpServers"]["look-up_1"]["env"]["TOKEN"] == secret
    else:
        assert got["env"] == secret  # in Codex's environment, forwarded by name
    assert not list((tmp_path / "state").rglob("*.json"))  # the run's file went with the run
    assert list(workspace.iterdir()) == []
