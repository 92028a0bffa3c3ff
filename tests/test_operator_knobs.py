"""Operator-only knobs and the agent's secrets (issue 9, items 2 and 3).

* A provider option that changes which binary runs, where a CLI sends
  credentials or the CLI's environment is refused (``config_invalid``,
  reason ``option_not_allowed``) unless the node operator allows it with
  ``--allow-run-option NAME``; ``cli_path`` is node configuration, never a run's.
* A node (or controller) started with ASM_TOKEN in its environment re-executes
  itself without it: ``/proc/<pid>/environ`` of the agent and of everything it
  starts never shows the token, while auth with it still works.

Everything runs as real processes on 127.0.0.1; the "Claude CLI" is a small
script that reports its argv and ANTHROPIC_BASE_URL, so no model is needed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from asm_controller import RemoteNode, TLSConfig
from asm_controller.service import ControllerConfig
from asm_node import NodeAgent, NodeConfig
from asm_node.providers import AmpProvider, ClaudeProvider, CodexProvider, GeminiProvider
from asm_node.providers._cli import CliProvider, cli_version
from asm_node.providers.features import manifests
from asm_wire import ConfigError, pb
from tests.support.processes import PYTHON_BASENAME, ROOT, NodeProcess, node_config, start_node_process

CLI_CLASSES: list[type[CliProvider]] = [ClaudeProvider, CodexProvider, GeminiProvider, AmpProvider]


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process env without asm credentials or node settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "ASM_TOKEN" and not k.startswith("ASM_NODE_")}
    env.update(extra)
    return env


def _asm(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asm_cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else _clean_env(), cwd=str(ROOT))


def _summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in proc.stderr, proc.stderr
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "result_summary"
    return summary


@pytest.fixture
def fake_claude(tmp_path: Path) -> Path:
    """A 'Claude CLI' printing stream-json whose result is its argv and ANTHROPIC_BASE_URL; a run leaves a mark."""
    script = tmp_path / "fake-claude"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "if '--version' in sys.argv:\n"
        "    sys.exit(print('9.9.9 (fake)'))\n"
        "open(os.environ['MARK_FILE'], 'a').write('claude ran\\n')\n"
        "report = {'argv': sys.argv[1:], 'base_url': os.environ.get('ANTHROPIC_BASE_URL'),\n"
        "          'auth_token': os.environ.get('ANTHROPIC_AUTH_TOKEN')}\n"
        "text = {'type': 'text', 'text': json.dumps(report)}\n"
        "print(json.dumps({'type': 'assistant', 'message': {'id': 'm1', 'content': [text]}}))\n"
        "print(json.dumps({'type': 'result', 'subtype': 'success', 'result': text['text']}))\n"
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def claude_node(
    tmp_path: Path, fake_claude: Path
) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: a node whose Claude CLI is ``fake_claude`` (node config: CLAUDE_CLI_PATH)."""
    started: list[NodeProcess] = []

    def start(*args: str) -> NodeProcess:
        env = {"CLAUDE_CLI_PATH": str(fake_claude), "MARK_FILE": str(tmp_path / "mark")}
        node = start_node_process(tmp_path, *args, env=env)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def _run_claude(node: NodeProcess, *opts: str) -> dict[str, Any]:
    flags = [f for o in opts for f in ("--opt", o)]
    return _summary(_asm("run", "--node", node.address, "--provider", "claude", "--output", "jsonl", *flags, "hi"))


def _assert_not_allowed(summary: dict[str, Any], option: str) -> None:
    assert summary["status"] == "failed"
    err = summary["error"]
    assert err["kind"] == "config_invalid" and err["reason"] == "option_not_allowed", err
    assert f"option {option} " in err["message"]


# -- 2. operator-only knobs, through a real node -----------------------------------------------


@pytest.mark.slow
def test_cli_path_is_refused_and_nothing_runs(claude_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    """The attack: `--opt cli_path=/any/binary` must never make the node execute it, whatever is allowed."""
    evil = tmp_path / "evil"
    evil.write_text(f"#!/bin/sh\necho pwned > {tmp_path / 'pwned'}\n")
    evil.chmod(0o755)
    for node in (claude_node(), claude_node("--allow-run-option", "args", "--allow-run-option", "anthropic_base_url")):
        summary = _run_claude(node, f"cli_path={evil}")
        _assert_not_allowed(summary, "cli_path")
        assert "CLAUDE_CLI_PATH" in summary["error"]["message"]  # says where the operator sets it
        summary = _run_claude(node, "cli_path=/bin/sh")
        _assert_not_allowed(summary, "cli_path")
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "mark").exists()  # not even the node's own CLI ran for a refused run


@pytest.mark.slow
def test_allowing_cli_path_is_refused_at_start(tmp_path: Path) -> None:
    proc = _asm("node", "serve", "--listen", "127.0.0.1:0", "--allow-run-option", "cli_path")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "listening on" not in proc.stderr
    assert proc.stderr.startswith("asm: error:") and "cli_path is node configuration" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "fragment"), [
    (["--allow-run-option", "anthropic_base_ur"], "no provider has an operator-only option 'anthropic_base_ur'"),
    (["--env-allow", "CLAUDE_CLI_PATH"], "CLI binary is node configuration"),
    (["--env-allow", "ASM_TOKEN"], "env_allow names a denied variable (ASM_TOKEN)"),
    (["--env-allow", "ASM_NODE_TOKEN"], "env_allow names a denied variable (ASM_NODE_TOKEN)"),
])
def test_operator_misconfiguration_is_refused_at_start(flags: list[str], fragment: str) -> None:
    proc = _asm("node", "serve", "--listen", "127.0.0.1:0", *flags)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "listening on" not in proc.stderr
    assert fragment in proc.stderr


@pytest.mark.slow
def test_base_url_and_auth_token_need_the_operator(claude_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/collect"
    default = claude_node()
    _assert_not_allowed(_run_claude(default, f"anthropic_base_url={url}"), "anthropic_base_url")
    _assert_not_allowed(_run_claude(default, "anthropic_auth_token=mine"), "anthropic_auth_token")
    _assert_not_allowed(_run_claude(default, "ollama=true", f"ollama_base_url={url}"), "ollama_base_url")
    summary = _run_claude(default, f"anthropic_base_url={url}")
    assert "--allow-run-option anthropic_base_url" in summary["error"]["message"]
    assert not (tmp_path / "mark").exists()

    allowed = claude_node("--allow-run-option", "anthropic_base_url")
    summary = _run_claude(allowed, f"anthropic_base_url={url}")
    assert summary["status"] == "completed", summary
    report = json.loads(summary["text"])
    assert report["base_url"] == url  # it reached the CLI's environment
    # Allowing one option allows that one only.
    _assert_not_allowed(_run_claude(allowed, "anthropic_auth_token=mine"), "anthropic_auth_token")


@pytest.mark.slow
def test_args_refused_by_default_allowed_by_operator(claude_node: Callable[..., NodeProcess]) -> None:
    extra = '["--mcp-config", "/tmp/x.json"]'
    _assert_not_allowed(_run_claude(claude_node(), f"args={extra}"), "args")
    summary = _run_claude(claude_node("--allow-run-option", "args"), f"args={extra}")
    assert summary["status"] == "completed", summary
    argv = json.loads(summary["text"])["argv"]
    assert argv[argv.index("--mcp-config") + 1] == "/tmp/x.json"


@pytest.mark.slow
def test_client_options_still_work(claude_node: Callable[..., NodeProcess]) -> None:
    summary = _run_claude(claude_node(), "model=sonnet", "max_turns=2")
    assert summary["status"] == "completed", summary
    argv = json.loads(summary["text"])["argv"]
    assert "--model=sonnet" in argv and "--max-turns=2" in argv


@pytest.mark.slow
def test_embedded_node_user_is_its_operator(fake_claude: Path, tmp_path: Path) -> None:
    """`asm run` without --node runs as the user who typed it: operator options allowed, cli_path still not."""
    env = _clean_env(CLAUDE_CLI_PATH=str(fake_claude), MARK_FILE=str(tmp_path / "mark"))
    base = ("run", "--provider", "claude", "--cwd", str(tmp_path), "--output", "jsonl")
    summary = _summary(_asm(*base, "--opt", 'args=["--add-dir=/x"]', "hi", env=env))
    assert summary["status"] == "completed", summary
    assert "--add-dir=/x" in json.loads(summary["text"])["argv"]
    _assert_not_allowed(_summary(_asm(*base, "--opt", "cli_path=/bin/sh", "hi", env=env)), "cli_path")


# -- 2. every provider declares its privileged options; each is refused by default -----------------


@pytest.mark.parametrize(
    ("cls", "option", "value"),
    [(cls, name, {"args": ["--x"], "config": {"a": 1}, "mcp_config": {"servers": []}}.get(name, "http://x"))
     for cls in CLI_CLASSES for name in sorted(cls.operator_options)],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v)[:20],
)
def test_each_operator_option_refused_unless_allowed(cls: type[CliProvider], option: str, value: Any) -> None:
    with pytest.raises(ConfigError) as exc:
        cls().validate_options({option: value}, "default")
    assert exc.value.reason == "option_not_allowed" and f"--allow-run-option {option}" in exc.value.message
    # With the allowance, the operator-only check passes (the option may still be refused for its own reasons).
    try:
        cls([option]).validate_options({option: value}, "default")
    except ConfigError as err:
        assert err.reason != "option_not_allowed", err.message


def test_privileged_options_are_declared() -> None:
    assert {"args", "ollama_base_url"} <= ClaudeProvider.operator_options
    assert {"anthropic_base_url", "anthropic_auth_token"} <= ClaudeProvider.operator_options
    assert "config" in CodexProvider.operator_options  # -c model_providers.*.base_url, mcp_servers.*.command
    assert "mcp_config" in AmpProvider.operator_options  # MCP servers are programs Amp starts
    for cls in CLI_CLASSES:
        assert cls.node_only_options == {"cli_path"}
        assert "cli_path" not in cls.options_model.model_fields
        assert cls.operator_options <= set(cls.options_model.model_fields)


@pytest.mark.slow
def test_manifest_and_cli_list_who_may_set_each_option() -> None:
    rows = {m["provider"]: m for m in manifests()}
    claude = rows["claude"]
    assert "anthropic_base_url" in claude["operator_options"] and "anthropic_base_url" not in claude["client_options"]
    assert "model" in claude["client_options"] and claude["node_only_options"] == ["cli_path"]
    for m in rows.values():
        assert not set(m["client_options"]) & set(m["operator_options"])
    allowed = {m["provider"]: m for m in manifests(NodeConfig(allow_run_options=["args"]))}
    assert "args" in allowed["codex"]["client_options"]
    proc = _asm("providers")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"operator-only \(asm node serve --allow-run-option NAME\): .*anthropic_base_url", proc.stdout)
    assert "never a run's: cli_path (set $CLAUDE_CLI_PATH)" in proc.stdout


# -- 3. secrets stay with the agent --------------------------------------------------------------


def _environ(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


@pytest.fixture
def env_printer(tmp_path: Path) -> str:
    """A shell-provider command line whose output is the exec-time environment of the run's process."""
    script = tmp_path / "print_environ.py"
    script.write_text("import sys\nsys.stdout.write(open('/proc/self/environ').read().replace('\\0', '\\n'))\n")
    return f"{PYTHON_BASENAME} {script}"


@pytest.mark.slow
@pytest.mark.parametrize("var", ["ASM_TOKEN", "ASM_NODE_TOKEN"])
def test_node_with_token_in_env_keeps_it_out_of_proc_environ(tmp_path: Path, var: str, env_printer: str) -> None:
    token = "tok-" + os.urandom(12).hex()
    node = start_node_process(tmp_path, "--shell-allow", PYTHON_BASENAME, env={var: token, "KEEP_ME": "1"})
    try:
        assert node.proc.poll() is None
        environ = _environ(node.pid)  # the same pid: the node re-executed itself in place
        assert not [e for e in environ if token in e], environ
        assert not [e for e in environ if e.startswith(("ASM_TOKEN=", "ASM_NODE_TOKEN="))]
        assert "KEEP_ME=1" in environ  # the rest of the environment is kept
        for child in _descendants(node.pid):  # the reaper watchdog and anything else the agent started
            assert not [e for e in _environ(child) if token in e], child

        # Auth with the token works; without it, or with another, it does not.
        ok = _asm("nodes", "--node", node.address, "--output", "json", env=_clean_env(ASM_TOKEN=token))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)[0]["epoch"] == node.epoch
        bad = _asm("nodes", "--node", node.address, "--output", "json", env=_clean_env(ASM_TOKEN=token + "x"))
        assert bad.returncode == 3 and json.loads(bad.stdout)[0]["error"]["reason"] == "unauthenticated"

        # A run's CLI reads its own /proc/self/environ: no token there either.
        run = _asm("run", "--node", node.address, "--provider", "shell", "--output", "jsonl", env_printer,
                   env=_clean_env(ASM_TOKEN=token))
        summary = _summary(run)
        assert summary["status"] == "completed", summary
        assert "PATH=" in summary["text"] and token not in summary["text"]
        assert "ASM_TOKEN=" not in summary["text"] and "ASM_NODE_TOKEN=" not in summary["text"]
        assert "ASM_SECRETS_FD=" not in summary["text"]  # the hand-over is the agent's business only
        assert token not in node.log()
    finally:
        node.stop()


def test_too_long_env_token_is_a_typed_error() -> None:
    proc = _asm("node", "serve", "--listen", "127.0.0.1:0", env=_clean_env(ASM_TOKEN="x" * 5000))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "use --token-file" in proc.stderr


@pytest.mark.slow
def test_token_file_is_read_once(tmp_path: Path) -> None:
    first, second = "first-" + os.urandom(8).hex(), "second-" + os.urandom(8).hex()
    tokfile = tmp_path / "token"
    tokfile.write_text(first + "\n")
    node = start_node_process(tmp_path, "--token-file", str(tokfile))
    try:
        tokfile.write_text(second + "\n")
        ok = _asm("nodes", "--node", node.address, "--output", "json", env=_clean_env(ASM_TOKEN=first))
        assert ok.returncode == 0, ok.stderr
        tokfile.unlink()  # nothing reads it again: auth keeps working
        again = _asm("nodes", "--node", node.address, "--output", "json", env=_clean_env(ASM_TOKEN=first))
        assert again.returncode == 0, again.stderr
        new = _asm("nodes", "--node", node.address, "--output", "json", env=_clean_env(ASM_TOKEN=second))
        assert new.returncode == 3
    finally:
        node.stop()


@pytest.mark.slow
def test_controller_with_token_in_env_keeps_it_out_of_proc_environ(tmp_path: Path) -> None:
    token = "ctl-" + os.urandom(12).hex()
    (tmp_path / "token").write_text(token)
    node = start_node_process(tmp_path, "--token-file", str(tmp_path / "token"))
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "asm_cli", "controller", "serve", "--listen", "127.0.0.1:0",
                                 "--node", node.address], stdout=subprocess.DEVNULL, stderr=log,
                                env=_clean_env(ASM_TOKEN=token), cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 20
        while not (m := re.search(r"listening on \S+ \(port (\d+)\)", log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        address = f"127.0.0.1:{m.group(1)}"
        assert not [e for e in _environ(proc.pid) if token in e]
        ok = _asm("nodes", "--controller", address, "--output", "json", env=_clean_env(ASM_TOKEN=token))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)[0]["epoch"] == node.epoch  # it reached the node with the handed-over token
        bad = _asm("nodes", "--controller", address, "--output", "json", env=_clean_env(ASM_TOKEN="nope"))
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        node.stop()


async def test_secret_env_never_inherited_even_if_env_deny_is_emptied(
    monkeypatch: pytest.MonkeyPatch, env_printer: str
) -> None:
    """SECRET_ENV is stripped from every CLI's environment whatever env_deny says; a request cannot add it back."""
    secret = "agent-" + os.urandom(8).hex()
    monkeypatch.setenv("ASM_TOKEN", secret)
    monkeypatch.setenv("ASM_NODE_TOKEN", secret)
    agent = NodeAgent(node_config(env_deny=[], token=None))
    await agent.start()
    try:
        with pytest.raises(ConfigError) as exc:
            agent.start_run_frames(pb.StartRunRequest(run_id="r-env", provider="shell", prompt="true",
                                                      env={"ASM_TOKEN": "x"}))
        assert "ASM_TOKEN" in exc.value.message
        frames = [f async for f in agent.start_run_frames(pb.StartRunRequest(
            run_id="r-env2", provider="shell", prompt=env_printer))]
    finally:
        await agent.stop()
    events = [e for f in frames for e in pb.EventBatch.FromString(f).events]
    text = "".join(e.assistant_delta.content for e in events)
    assert "PATH=" in text and secret not in text


def test_cli_version_probe_gets_no_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`<cli> --version` (run by the handshake) starts from the agent's environment minus its secrets too."""
    secret = "probe-" + os.urandom(8).hex()
    monkeypatch.setenv("ASM_TOKEN", secret)
    monkeypatch.setenv("ASM_NODE_TOKEN", secret)
    seen = tmp_path / "seen-env"
    cli = tmp_path / "probe-cli"
    cli.write_text(f"#!/bin/sh\nenv > {seen}\necho 1.2.3\n")
    cli.chmod(0o755)
    assert cli_version(str(cli)) == "1.2.3"
    assert "PATH=" in seen.read_text() and secret not in seen.read_text()


def test_reprs_never_show_tokens() -> None:
    secret = "repr-" + os.urandom(8).hex()
    key = b"-----BEGIN PRIVATE KEY-----" + secret.encode()
    for obj in (ControllerConfig(token=secret, node_token=secret), RemoteNode("127.0.0.1:1", token=secret),
                TLSConfig(key=key), NodeConfig(token=SecretStr(secret))):
        assert secret not in repr(obj) and secret not in str(obj), type(obj)
