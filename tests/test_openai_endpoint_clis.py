"""ASM's inference endpoint in front of the real Codex and Gemini CLIs (Claude's is in
tests/test_openai_endpoint.py), each behind the scripted model server (tests/support/fake_model_server.py),
used by the real ``openai`` package, stream and non-stream.

A chat request carries only the model id (``provider[:model]``), so the options the conformance tests
give these CLIs come another way: Gemini's pinned model is the model id's (``gemini:gemini-2.5-flash``,
which fleet_run_fn passes as the ``model`` option); Codex's ``skip_git_repo_check`` is the server's
default for every Codex completion (``asm controller serve --completion-option
codex:skip_git_repo_check=true``): its node's directory is not a git repository, where Codex refuses
to run without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from asm_controller import Result
from asm_controller.inference import finish_reason
from asm_node.testing import ServedProcess, serve_controller
from tests.support.cli_env import GEMINI_MODEL, cli_env, find_cli, hermetic_env
from tests.support.fake_model_server import FakeModelServer
from tests.support.processes import http_base, start_node_process

TOKEN = "openai-clis-token-0123456789abcdef"
ENV_VARS = {"codex": "CODEX_PATH", "gemini": "GEMINI_CLI_PATH"}
#: The model id a client asks for: Gemini's pinned (skips its router, caps its retries).
MODEL_IDS = {"codex": "codex", "gemini": f"gemini:{GEMINI_MODEL}"}


def _http_base(ctl: ServedProcess) -> str:
    return http_base(ctl) + "/v1"


@pytest.fixture(params=sorted(ENV_VARS))
def cli_endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, FakeModelServer]]:
    """(provider, the endpoint's base URL, the model server) for a controller in front of one node with the CLI."""
    name: str = request.param
    path = find_cli(name)
    if path is None:
        pytest.skip(f"{name} CLI not installed (run scripts/install_clis.sh)")
    workspace = tmp_path / "not-a-repo"  # Codex refuses to run here without --skip-git-repo-check
    workspace.mkdir()
    server = FakeModelServer().start()
    try:
        env = hermetic_env({**cli_env(name, server.base_url, tmp_path), ENV_VARS[name]: str(path)})
        (tmp_path / "token").write_text(TOKEN)
        node = start_node_process(tmp_path, "--node-id", f"node-{name}", "--token-file", str(tmp_path / "token"),
                                  env=env, inherit=False, cwd=workspace)
        try:
            defaults = ["--completion-option", "codex:skip_git_repo_check=true"] if name == "codex" else []
            ctl = serve_controller(tmp_path, "--node", node.address, "--token-file", str(tmp_path / "token"),
                                   "--http-listen", "127.0.0.1:0", "--state", "memory:", *defaults, token=TOKEN)
            try:
                yield name, _http_base(ctl), server
            finally:
                ctl.stop()
        finally:
            node.stop()
    finally:
        server.stop()


def test_a_gemini_success_finishes_as_stop() -> None:
    """The Gemini node's stop reason is its CLI's result status, "success": an OpenAI client wants "stop"."""
    done = Result(run_id="r", session_id="s", provider="gemini", status="completed", stop_reason="success")
    assert finish_reason(done) == "stop"


@pytest.mark.slow
def test_a_keep_alive_request_does_not_wait_for_a_delayed_ack(tmp_path: Path) -> None:
    """Found by scripts/bench.py --http: the HTTP listener's connections had Nagle on, so each response
    (headers, then body) stalled ~40 ms on the client's delayed ACK: /v1/models took 44 ms, not 1 ms."""
    import statistics
    import time

    import httpx

    (tmp_path / "token").write_text(TOKEN)
    node = start_node_process(tmp_path, "--token-file", str(tmp_path / "token"))
    try:
        ctl = serve_controller(tmp_path, "--node", node.address, "--token-file", str(tmp_path / "token"),
                               "--http-listen", "127.0.0.1:0", "--state", "memory:", token=TOKEN)
        try:
            with httpx.Client(base_url=_http_base(ctl), headers={"authorization": f"Bearer {TOKEN}"}) as http:
                times = []
                for _ in range(20):  # one keep-alive connection: the stall hit every request after the first few
                    t0 = time.perf_counter()
                    assert http.get("/models").status_code == 200
                    times.append(time.perf_counter() - t0)
        finally:
            ctl.stop()
    finally:
        node.stop()
    assert statistics.median(times[5:]) < 0.025, [round(t * 1000) for t in times]


@pytest.mark.slow
@pytest.mark.real_cli
def test_the_openai_client_gets_the_real_cli_answer(cli_endpoint: tuple[str, str, FakeModelServer]) -> None:
    name, base, server = cli_endpoint
    model = MODEL_IDS[name]
    client = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=120)
    assert name in {m.id for m in client.models.list()}
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi. SCENARIO_TEXT"}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Hello from the fake model" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.model == model for c in chunks)
    done = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi. SCENARIO_TEXT"}])
    assert "Hello from the fake model" in (done.choices[0].message.content or "")
    assert done.choices[0].finish_reason == "stop"
    assert done.model == model
    assert done.usage is not None and done.usage.total_tokens > 0
    # The CLI really asked the model server (the answer is not the endpoint's own).
    assert any("SCENARIO_TEXT" in str(r.body) for r in server.requests if r.method == "POST")
    if name == "gemini":  # the model id's model reached the CLI (Gemini names it in its request path)
        turns = [r.path for r in server.requests if r.method == "POST" and "streamGenerateContent" in r.path]
        assert turns and all(f"/models/{GEMINI_MODEL}:" in p for p in turns), turns


@pytest.mark.slow
@pytest.mark.real_cli
async def test_the_async_openai_client_streams_the_real_cli_answer(
        cli_endpoint: tuple[str, str, FakeModelServer]) -> None:
    name, base, _ = cli_endpoint
    client = openai.AsyncOpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=120)
    try:
        stream = await client.chat.completions.create(
            model=MODEL_IDS[name], messages=[{"role": "user", "content": "Say hi. SCENARIO_TEXT"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    finally:
        await client.close()
    assert "Hello from the fake model" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].total_tokens > 0
