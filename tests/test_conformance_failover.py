"""Conformance, provider failover (issue 14 item 6) with the real Claude Code and Gemini CLIs.

One node agent process has both CLIs (a hermetic env per test, like tests/test_conformance.py):
Claude's CLI path points at nothing, or Claude's API answers HTTP 500 -> the run moves to Gemini
(against the scripted model server); a Claude run that produced output is never re-run on Gemini.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from asm_controller import RemoteNode, Session
from tests.support.cli_env import GEMINI_MODEL, cli_env, find_cli, hermetic_env
from tests.support.fake_model_server import TEXT_ANSWER, FakeModelServer
from tests.support.processes import ROOT, NodeProcess, start_node_process

pytestmark = pytest.mark.real_cli  # drives the installed CLIs (skipped without them)

GEMINI_OPTIONS = {"gemini": {"model": GEMINI_MODEL}}  # pinned: no router call, capped retries


class Always500(ThreadingHTTPServer):
    """An Anthropic API that answers every request with HTTP 500 (Claude's HEAD probe gets 200)."""

    def __init__(self) -> None:
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.end_headers()

            def do_POST(self) -> None:
                server.hits += 1
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.dumps({"type": "error", "error": {"type": "api_error",
                                                              "message": "Internal server error"}}).encode()
                self.send_response(500)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def model_server() -> Iterator[FakeModelServer]:
    server = FakeModelServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def clis() -> tuple[Path, Path]:
    claude, gemini = find_cli("claude"), find_cli("gemini")
    if claude is None or gemini is None:
        pytest.skip("claude and gemini CLIs not installed (run scripts/install_clis.sh)")
    return claude, gemini


def both_env(model_server: FakeModelServer, scratch: Path, claude: Path | str, gemini: Path,
             claude_url: str | None = None) -> dict[str, str]:
    """One process environment for both CLIs: Gemini's HOME (its settings), Claude's own variables."""
    env = {**cli_env("claude", claude_url or model_server.base_url, scratch),
           **cli_env("gemini", model_server.base_url, scratch)}
    return hermetic_env({**env, "CLAUDE_CLI_PATH": str(claude), "GEMINI_CLI_PATH": str(gemini)})


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[NodeProcess] = []

    def make(env: dict[str, str]) -> tuple[NodeProcess, Path]:
        node = start_node_process(tmp_path, "--node-id", f"failover-{len(started)}", env=env, inherit=False)
        started.append(node)
        ws = tmp_path / f"ws{len(started)}"
        ws.mkdir()
        return node, ws

    yield make
    for node in started:
        node.stop()


def gemini_requests(server: FakeModelServer) -> int:
    return sum(1 for r in server.requests if r.api == "gemini")


async def test_claude_cli_missing_moves_to_gemini(clis: tuple[Path, Path], model_server: FakeModelServer,
                                                   node_factory: Any, tmp_path: Path) -> None:
    _, gemini = clis
    node, ws = node_factory(both_env(model_server, tmp_path, tmp_path / "no-such-claude", gemini))
    async with Session(providers=["claude", "gemini"], node=RemoteNode(node.address), cwd=str(ws),
                       provider_options=GEMINI_OPTIONS) as s:
        result = await s.query("Say hi. SCENARIO_TEXT")
        again = await s.query("Say hi again. SCENARIO_TEXT")
    assert result.ok, result.error
    assert result.provider == "gemini" and TEXT_ANSWER in result.text
    claude = [a for a in result.metadata["attempts"] if a.get("provider") == "claude"]
    assert claude and (claude[0].get("error", {}).get("kind") == "cli_not_found"
                       or claude[0].get("skipped") == "no claude CLI"), result.metadata["attempts"]
    assert any(w.kind == "cli_not_found" and "trying gemini" in w.message for w in result.warnings)
    assert again.ok and again.provider == "gemini"


def test_asm_run_provider_list_moves_to_gemini(clis: tuple[Path, Path], model_server: FakeModelServer,
                                               tmp_path: Path) -> None:
    # "Done when": asm run --provider claude,gemini moves to Gemini when Claude's CLI is missing (embedded node).
    _, gemini = clis
    env = both_env(model_server, tmp_path, tmp_path / "no-such-claude", gemini)
    ws = tmp_path / "ws"
    ws.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "asm_cli", "run", "--provider", "claude,gemini", "--cwd", str(ws), "--output", "jsonl",
         "--opt", f"model={GEMINI_MODEL}", "Say hi. SCENARIO_TEXT"],
        capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()][-1]
    assert summary["kind"] == "result_summary" and summary["status"] == "completed"
    assert summary["provider"] == "gemini" and TEXT_ANSWER in summary["text"]
    assert any(w["kind"] == "cli_not_found" for w in summary["warnings"])


async def test_claude_http_500_moves_to_gemini(clis: tuple[Path, Path], model_server: FakeModelServer,
                                                node_factory: Any, tmp_path: Path) -> None:
    claude, gemini = clis
    broken = Always500()
    try:
        node, ws = node_factory(both_env(model_server, tmp_path, claude, gemini, claude_url=broken.base_url))
        async with Session(providers=["claude", "gemini"], node=RemoteNode(node.address), cwd=str(ws),
                           provider_options=GEMINI_OPTIONS) as s:
            stream = s.stream("Say hi. SCENARIO_TEXT")
            events = [ev async for ev in stream]
        result = stream.result
        assert result is not None and result.ok, result.error if result else None
        assert broken.hits >= 1  # Claude Code really ran and got its 500
        assert result.provider == "gemini" and TEXT_ANSWER in result.text
        assert "API Error" not in result.text  # Claude's synthetic error message is not shown as the answer
        failed = [a for a in result.metadata["attempts"] if a.get("provider") == "claude" and a.get("failover")]
        assert failed and failed[0]["error"]["kind"] == "transport_error", result.metadata["attempts"]
        assert [e.kind for e in events].count("run_started") == 1
        assert {e.provider for e in events if e.kind == "run_started"} == {"gemini"}
    finally:
        broken.shutdown()
        broken.server_close()


async def test_a_claude_run_that_produced_output_is_not_re_run(clis: tuple[Path, Path], model_server: FakeModelServer,
                                                               node_factory: Any, tmp_path: Path) -> None:
    claude, gemini = clis
    node, ws = node_factory(both_env(model_server, tmp_path, claude, gemini))
    before = gemini_requests(model_server)
    async with Session(providers=["claude", "gemini"], node=RemoteNode(node.address), cwd=str(ws),
                       provider_options=GEMINI_OPTIONS) as s:
        done = await s.query("Say hi. SCENARIO_TEXT")
        # Streamed output, then the run is stopped: it stays Claude's (interrupted), never re-run on Gemini.
        stream = s.stream("Talk slowly. SCENARIO_SLOW")
        async for ev in stream:
            if ev.kind == "assistant_delta":
                await s.interrupt(stream.run_id)
                break
        async for _ in stream:
            pass
        await asyncio.sleep(0.5)
    assert done.ok and done.provider == "claude" and TEXT_ANSWER in done.text
    stopped = stream.result
    assert stopped is not None and stopped.provider == "claude" and stopped.status == "interrupted"
    assert stopped.text  # it had produced output
    assert gemini_requests(model_server) == before  # Gemini was never asked
