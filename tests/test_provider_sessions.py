"""ListProviderSessions: the resumable sessions each CLI keeps on a node's host.

The stores are built under a temporary HOME from the real files the CLIs wrote
(tests/fixtures/sessions/), plus fakes for the bounds: newest first, ``limit``, malformed and
foreign files skipped, symlinks never followed out of the store, the environment overrides.
The end-to-end tests serve a real node (with that HOME) and a real controller in front of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from asm_controller import EmbeddedNode, GrpcNodeClient, RemoteNode, Session
from asm_node.providers import AmpProvider, ClaudeProvider, CodexProvider, GeminiProvider, ShellProvider, _sessions
from asm_node.testing import ServedProcess, running_agent, serve_controller
from asm_wire import AsmError, ConfigError, pb
from tests.support.fake_claude import install_fake_claude
from tests.support.processes import ROOT, node_config, start_node_process

FIXTURES = Path(__file__).parent / "fixtures" / "sessions"
CLAUDE_ID = "45021732-68d9-4433-9cb2-c91e319f8d9b"
CODEX_ID = "01a23253-5de8-7e32-86b5-1893b1c60d5b"
GEMINI_ID = "a19dfcc4-0dbf-4697-8a3c-fbc588019f9c"
CODEX_FILE = f"rollout-2026-12-01T15-57-34-{CODEX_ID}.jsonl"
GEMINI_FILE = "session-2026-12-01T15-57-a19dfcc4.jsonl"


def lay_out(home: Path) -> dict[str, Path]:
    """The real session files where each CLI keeps them under ``home``; each store's session directory."""
    claude = home / ".claude" / "projects" / "-srv-ws"
    codex = home / ".codex" / "sessions" / "2026" / "12" / "01"
    gemini = home / ".gemini" / "tmp" / "ws"
    for d in (claude, codex, gemini / "chats"):
        d.mkdir(parents=True)
    (claude / f"{CLAUDE_ID}.jsonl").write_bytes((FIXTURES / f"{CLAUDE_ID}.jsonl").read_bytes())
    (codex / CODEX_FILE).write_bytes((FIXTURES / CODEX_FILE).read_bytes())
    (gemini / "chats" / GEMINI_FILE).write_bytes((FIXTURES / GEMINI_FILE).read_bytes())
    (gemini / ".project_root").write_text("/srv/ws")
    return {"claude": claude, "codex": codex, "gemini": gemini / "chats"}


def ids(sessions: list[pb.ProviderSession]) -> list[str]:
    return [s.id for s in sessions]


def test_each_cli_store_is_read_from_the_files_the_real_cli_wrote(tmp_path: Path) -> None:
    lay_out(tmp_path)
    env = {"HOME": str(tmp_path)}
    expected = {ClaudeProvider: (CLAUDE_ID, "claude_projects_jsonl"), CodexProvider: (CODEX_ID, "codex_sessions_jsonl"),
                GeminiProvider: (GEMINI_ID, "gemini_chats_jsonl")}
    for cls, (sid, kind) in expected.items():
        [found] = cls().list_sessions(env, 0)
        # The label is the user's prompt, not the CLI's own context (<environment_context>, <session_context>).
        assert (found.provider, found.id, found.label, found.cwd, found.source_kind) == (
            cls.name, sid, "Say hi. SCENARIO_TEXT", "/srv/ws", kind), cls
        assert found.updated_unix_nano > 0
    # Amp keeps its threads in its service; the shell keeps nothing: no sessions, no error.
    shell = ShellProvider.from_config(node_config())
    assert AmpProvider().list_sessions(env, 0) == [] and shell.list_sessions(env, 0) == []
    # No store (the CLI never ran here), or no HOME at all: none.
    assert ClaudeProvider().list_sessions({"HOME": str(tmp_path / "nobody")}, 0) == []
    assert ClaudeProvider().list_sessions({}, 0) == []


def test_the_environment_moves_a_store(tmp_path: Path) -> None:
    lay_out(tmp_path / "elsewhere")
    env = {"HOME": str(tmp_path / "empty"), "CLAUDE_CONFIG_DIR": str(tmp_path / "elsewhere" / ".claude"),
           "CODEX_HOME": str(tmp_path / "elsewhere" / ".codex"), "GEMINI_CLI_HOME": str(tmp_path / "elsewhere")}
    assert ids(ClaudeProvider().list_sessions(env, 0)) == [CLAUDE_ID]
    assert ids(CodexProvider().list_sessions(env, 0)) == [CODEX_ID]
    assert ids(GeminiProvider().list_sessions(env, 0)) == [GEMINI_ID]


def _claude_session(directory: Path, sid: str, prompt: str, mtime: int, cwd: str = "/srv/ws") -> Path:
    path = directory / f"{sid}.jsonl"
    lines = [{"type": "queue-operation", "sessionId": sid},
             {"type": "user", "sessionId": sid, "cwd": cwd, "message": {"role": "user", "content": prompt}}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.utime(path, ns=(mtime, mtime))
    return path


def test_newest_first_bounded_by_limit_and_bad_files_skipped(tmp_path: Path) -> None:
    store = lay_out(tmp_path)["claude"]
    os.utime(store / f"{CLAUDE_ID}.jsonl", ns=(10**18, 10**18))
    for i in range(5):
        _claude_session(store, f"s-{i}", f"prompt {i}", mtime=(2 * 10**18) + i * 10**9)
    # Another project, and what must be skipped: not JSON, another session's lines, no session id at all,
    # a directory named like a session, a FIFO.
    other = store.parent / "-srv-other"
    other.mkdir()
    _claude_session(other, "s-other", "elsewhere", mtime=3 * 10**18, cwd="/srv/other")
    (store / "garbage.jsonl").write_bytes(b"\x00\xff not json\n{broken\n")
    (store / "foreign.jsonl").write_text(json.dumps({"type": "user", "sessionId": "someone-else"}) + "\n")
    (store / "empty.jsonl").write_text("")
    (store / "dir.jsonl").mkdir()
    os.mkfifo(store / "fifo.jsonl")
    for p in ("garbage.jsonl", "foreign.jsonl", "empty.jsonl"):
        os.utime(store / p, ns=(4 * 10**18, 4 * 10**18))  # newest: they are looked at first, then skipped
    env = {"HOME": str(tmp_path)}
    found = ClaudeProvider().list_sessions(env, 0)
    assert ids(found) == ["s-other", "s-4", "s-3", "s-2", "s-1", "s-0", CLAUDE_ID]
    assert (found[0].cwd, found[0].label) == ("/srv/other", "elsewhere")
    assert [s.updated_unix_nano for s in found[1:3]] == [2 * 10**18 + 4 * 10**9, 2 * 10**18 + 3 * 10**9]
    assert ids(ClaudeProvider().list_sessions(env, 3)) == ["s-other", "s-4", "s-3"]
    # The bound: never more than MAX_LIMIT, whatever is asked.
    assert len(ClaudeProvider().list_sessions(env, 10**6)) == 7


def test_symlinks_are_never_followed_out_of_the_store(tmp_path: Path) -> None:
    store = lay_out(tmp_path / "home")["claude"]
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = _claude_session(outside, "secret", "not yours", mtime=5 * 10**18)
    (store / "linked.jsonl").symlink_to(secret)  # a file link
    (store.parent / "-linked-project").symlink_to(outside, target_is_directory=True)  # a directory link
    env = {"HOME": str(tmp_path / "home")}
    assert ids(ClaudeProvider().list_sessions(env, 0)) == [CLAUDE_ID]
    # The store's own directory may be a link (dotfiles): it is where the CLI writes.
    (tmp_path / "linkhome").mkdir()
    (tmp_path / "linkhome" / ".claude").symlink_to(tmp_path / "home" / ".claude", target_is_directory=True)
    assert ids(ClaudeProvider().list_sessions({"HOME": str(tmp_path / "linkhome")}, 0)) == [CLAUDE_ID]
    # Gemini's .project_root is read next to the chat, never through a link.
    gemini = tmp_path / "home" / ".gemini" / "tmp" / "ws"
    (gemini / ".project_root").unlink()
    (outside / "root").write_text("/etc")
    (gemini / ".project_root").symlink_to(outside / "root")
    [chat] = GeminiProvider().list_sessions(env, 0)
    assert (chat.id, chat.cwd) == (GEMINI_ID, "")


def test_a_file_is_read_only_as_far_as_needed_and_never_past_the_bound(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / ".claude" / "projects" / "-srv-ws"
    store.mkdir(parents=True)
    path = store / "big.jsonl"
    head = json.dumps({"type": "user", "sessionId": "big", "cwd": "/srv/ws",
                       "message": {"role": "user", "content": "first"}}) + "\n"
    path.write_text(head + "x" * (4 << 20) + "\n")
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        reads.append(len(data))
        return data

    monkeypatch.setattr(_sessions.os, "read", counting_read)
    [found] = ClaudeProvider().list_sessions({"HOME": str(tmp_path)}, 0)
    assert (found.id, found.label) == ("big", "first")
    assert sum(reads) <= 65536  # cwd and label were on the first line: one chunk read, not 4 MiB
    # A file with no label within MAX_READ_BYTES is still listed (its id), after reading at most that much.
    path.write_text(json.dumps({"type": "system", "sessionId": "big", "cwd": "/srv/ws"}) + "\n" + "y" * (4 << 20))
    reads.clear()
    [found] = ClaudeProvider().list_sessions({"HOME": str(tmp_path)}, 0)
    assert (found.id, found.label) == ("big", "") and sum(reads) <= _sessions.MAX_READ_BYTES


# -- on a node and through a controller (real processes) ---------------------------------------------


TOKENS = "ops:ops-token-0123456789abcdef:admin\nalice:alice-token-0123456789abcdef\n"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[ServedProcess, ServedProcess, Path]]:
    home = tmp_path / "home"
    lay_out(home)
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    env = {"HOME": str(home), "CODEX_HOME": "", "CLAUDE_CONFIG_DIR": "", "GEMINI_CLI_HOME": ""}
    node = start_node_process(tmp_path, "--tokens-file", str(tokens), env=env)
    node_token = tmp_path / "node-token"
    node_token.write_text("ops-token-0123456789abcdef")
    try:
        ctl = serve_controller(tmp_path, "--node", node.address, "--tokens-file", str(tokens),
                                       "--node-token-file", str(node_token), "--state", "memory:",
                                       token="ops-token-0123456789abcdef")
    except BaseException:
        node.stop()
        raise
    try:
        yield node, ctl, tmp_path
    finally:
        ctl.stop()
        node.stop()


async def _ask(address: str, token: str, request: pb.ListProviderSessionsRequest) -> pb.ListProviderSessionsResponse:
    client = GrpcNodeClient(RemoteNode(address, token=token))
    try:
        return await client.list_provider_sessions(request)
    finally:
        await client.close()


@pytest.mark.slow
async def test_a_node_lists_its_cli_sessions_and_a_controller_forwards_to_the_named_node(
        fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    node, ctl, _ = fleet
    admin = "ops-token-0123456789abcdef"
    on_node = await _ask(node.address, admin, pb.ListProviderSessionsRequest(provider="claude"))
    assert [(s.id, s.label, s.cwd) for s in on_node.sessions] == [(CLAUDE_ID, "Say hi. SCENARIO_TEXT", "/srv/ws")]
    assert ids(list((await _ask(node.address, admin, pb.ListProviderSessionsRequest(provider="shell"))).sessions)) == []
    via = await _ask(ctl.address, admin, pb.ListProviderSessionsRequest(provider="codex", node=node.address))
    assert ids(list(via.sessions)) == [CODEX_ID]
    # The typed refusals: an unknown provider, a controller without a node / with one outside its fleet,
    # a principal that is not an admin (a host's CLI stores are nobody's in particular).
    with pytest.raises(AsmError) as unknown:
        await _ask(node.address, admin, pb.ListProviderSessionsRequest(provider="nope"))
    assert (unknown.value.kind, unknown.value.reason) == ("config_invalid", "unknown_provider")
    with pytest.raises(AsmError) as no_node:
        await _ask(ctl.address, admin, pb.ListProviderSessionsRequest(provider="claude"))
    assert no_node.value.kind == "config_invalid"
    with pytest.raises(AsmError) as elsewhere:
        await _ask(ctl.address, admin, pb.ListProviderSessionsRequest(provider="claude", node="127.0.0.1:1"))
    assert (elsewhere.value.kind, elsewhere.value.reason) == ("not_found", "node_not_found")
    for address in (node.address, ctl.address):
        with pytest.raises(AsmError) as denied:
            await _ask(address, "alice-token-0123456789abcdef",
                       pb.ListProviderSessionsRequest(provider="claude", node=node.address))
        assert denied.value.reason == "permission_denied"


@pytest.mark.slow
def test_asm_sessions_lists_a_nodes_cli_sessions(fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    node, ctl, tmp_path = fleet
    token = tmp_path / "admin-token"
    token.write_text("ops-token-0123456789abcdef")

    def asm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "asm_cli", "sessions", *args, "--token-file", str(token)],
                              capture_output=True, text=True, timeout=60, cwd=str(ROOT))

    direct = asm("--node", node.address, "--provider", "gemini", "--output", "json")
    assert direct.returncode == 0, direct.stderr
    [row] = json.loads(direct.stdout)
    assert (row["id"], row["provider"], row["cwd"], row["source_kind"]) == (GEMINI_ID, "gemini", "/srv/ws",
                                                                          "gemini_chats_jsonl")
    via = asm("--controller", ctl.address, "--node", node.address, "--provider", "claude", "--provider-sessions")
    assert via.returncode == 0, via.stderr
    assert CLAUDE_ID in via.stdout and "Say hi. SCENARIO_TEXT" in via.stdout and via.stdout.startswith("ID")
    # Usage errors (exit 2, one line): no provider; a node outside the controller's fleet is not_found (5).
    no_provider = asm("--node", node.address)
    assert no_provider.returncode == 2 and "--provider" in no_provider.stderr
    outside = asm("--controller", ctl.address, "--node", "127.0.0.1:1", "--provider", "claude", "--provider-sessions")
    assert outside.returncode == 5, outside.stderr
    for proc in (direct, via, no_provider, outside):
        assert "Traceback" not in proc.stderr


# -- Session.resume_run(provider_session_id=...) ----------------------------------------


async def test_resume_run_continues_a_listed_provider_session_by_its_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The id a listing gave goes to the CLI as its resume id, from a Session that never ran it (no checkpoint)."""
    monkeypatch.setenv("CLAUDE_CLI_PATH", str(install_fake_claude(tmp_path)))
    async with running_agent(node_config()) as agent, \
            Session("claude", node=EmbeddedNode(agent), cwd=str(tmp_path)) as s:
        assert s.checkpoint is None
        stream = s.resume_run("go on", provider_session_id=CLAUDE_ID)
        events = [ev async for ev in stream]
        assert f"--resume={CLAUDE_ID}" in events[0].payload["args"]
        assert stream.result is not None and stream.result.ok, stream.result and stream.result.error
        assert stream.result.provider_session_id == CLAUDE_ID
        assert s.checkpoint is not None and s.checkpoint.provider_session_id == CLAUDE_ID
        # Typed refusals, before anything runs: an empty id, an id and a target, an id that is a flag.
        with pytest.raises(ConfigError):
            s.resume_run("go on", provider_session_id=" ")
        with pytest.raises(ConfigError):
            s.resume_run("go on", "latest", provider_session_id=CLAUDE_ID)
        flag = s.resume_run("go on", provider_session_id="--dangerously-skip-permissions")
        _ = [ev async for ev in flag]
        assert flag.result is not None and flag.result.error is not None
        assert flag.result.error.kind == "config_invalid" and "session id" in flag.result.error.message
