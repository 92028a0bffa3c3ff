"""ASM's inference endpoint on a real controller (`asm controller serve --http-listen`) in front of real
nodes, used by the real `openai` Python package (sync and async, stream and non-stream) and by `curl -N`:
a shell node, and the real Claude Code CLI behind the scripted model server."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from asm_node.testing import serve_controller
from tests.support.processes import http_base, start_node_process, wait_until

pytestmark = pytest.mark.slow

TOKEN = "openai-token-0123456789abcdef"


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "token").write_text(TOKEN)
    nodes = [start_node_process(tmp_path, "--shell-allow", "echo", "--token-file", str(tmp_path / "token"))
             for _ in range(2)]
    try:
        ctl = serve_controller(tmp_path, *[a for n in nodes for a in ("--node", n.address)], "--token-file",
                               str(tmp_path / "token"), "--http-listen", "127.0.0.1:0", "--state", "memory:",
                               token=TOKEN)
        try:
            yield http_base(ctl) + "/v1"
        finally:
            ctl.stop()
    finally:
        for n in nodes:
            n.stop()


def test_the_openai_client_completes_and_streams_over_the_fleet(endpoint: str) -> None:
    client = openai.OpenAI(base_url=endpoint, api_key=TOKEN, max_retries=0)
    models = {m.id for m in client.models.list()}
    assert "shell" in models
    done = client.chat.completions.create(model="shell", messages=[{"role": "user", "content": "echo hello fleet"}])
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content is not None and "hello fleet" in done.choices[0].message.content
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None
    chunks = list(client.chat.completions.create(
        model="shell", messages=[{"role": "user", "content": "echo streamed words"}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "streamed words" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # A wrong token is refused, typed (the client raises its own error class).
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=endpoint, api_key="wrong-token-0123456789abcdef", max_retries=0).models.list()
    # Tools are refused as ASM refuses them: the CLIs run their own tools.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="shell", messages=[{"role": "user", "content": "echo x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


async def test_the_async_openai_client_streams(endpoint: str) -> None:
    client = openai.AsyncOpenAI(base_url=endpoint, api_key=TOKEN, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="shell", messages=[{"role": "user", "content": "echo async words"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()
    assert "async words" in text


def test_curl_streams_chat_completion_chunks_ending_done(endpoint: str) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run([curl, "-sN", "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
                          "-d", '{"model": "shell", "stream": true, "messages": [{"role": "user", "content": "echo via curl"}]}',
                          endpoint + "/chat/completions"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    frames = [line.removeprefix("data: ") for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    assert all('"object":"chat.completion.chunk"' in f.replace(" ", "") for f in frames[:-1]), frames[:2]
    assert "via curl" in out.stdout


@pytest.mark.real_cli
def test_the_openai_client_streams_the_real_claude_code_answer(tmp_path: Path) -> None:
    from tests.support.cli_env import cli_env, find_cli, hermetic_env
    from tests.support.fake_model_server import FakeModelServer

    path = find_cli("claude")
    if path is None:
        pytest.skip("claude CLI not installed (run scripts/install_clis.sh)")
    server = FakeModelServer().start()
    try:
        env = hermetic_env({**cli_env("claude", server.base_url, tmp_path), "CLAUDE_CLI_PATH": str(path)})
        (tmp_path / "token").write_text(TOKEN)
        node = start_node_process(tmp_path, "--token-file", str(tmp_path / "token"), env=env, inherit=False)
        try:
            ctl = serve_controller(tmp_path, "--node", node.address, "--token-file", str(tmp_path / "token"),
                                   "--http-listen", "127.0.0.1:0", "--state", "memory:", token=TOKEN)
            try:
                client = openai.OpenAI(base_url=http_base(ctl) + "/v1", api_key=TOKEN, max_retries=0)
                chunks = list(client.chat.completions.create(
                    model="claude", messages=[{"role": "user", "content": "Say hi. SCENARIO_TEXT"}], stream=True))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert "Hello from the fake model" in text
                done = client.chat.completions.create(
                    model="claude", messages=[{"role": "user", "content": "Say hi. SCENARIO_TEXT"}])
                assert "Hello from the fake model" in (done.choices[0].message.content or "")
                assert done.usage is not None and done.usage.total_tokens > 0
            finally:
                ctl.stop()
        finally:
            node.stop()
    finally:
        server.stop()


async def test_a_client_that_leaves_a_stream_interrupts_its_run(tmp_path: Path) -> None:
    """ASM: halting the stream cancels the run. A CLI left running for nobody would go on spending and
    acting; the run ends interrupted and its CLI is gone."""
    from asm_controller import GrpcNodeClient, RemoteNode
    from asm_wire import pb
    from tests.support.faults import py
    from tests.support.processes import PYTHON_BASENAME, pid_alive

    (tmp_path / "token").write_text(TOKEN)
    pidfile = tmp_path / "pid"
    node = start_node_process(tmp_path, "--shell-allow", PYTHON_BASENAME, "--token-file", str(tmp_path / "token"))
    try:
        ctl = serve_controller(tmp_path, "--node", node.address, "--token-file", str(tmp_path / "token"),
                               "--http-listen", "127.0.0.1:0", "--state", "memory:", token=TOKEN)
        try:
            client = openai.AsyncOpenAI(base_url=http_base(ctl) + "/v1", api_key=TOKEN, max_retries=0)
            command = py(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                         "print('working', flush=True)\ntime.sleep(60)")
            stream = await client.chat.completions.create(
                model="shell", messages=[{"role": "user", "content": command}], stream=True)
            async for chunk in stream:
                if chunk.choices and "working" in (chunk.choices[0].delta.content or ""):
                    break
            await stream.close()  # the client hangs up mid-answer
            await client.close()
            pid = int(pidfile.read_text())
            assert wait_until(lambda: not pid_alive(pid), 20), "the CLI outlived its client"
            node_client = GrpcNodeClient(RemoteNode(ctl.address, token=TOKEN))
            try:
                listed = await node_client.list_runs(pb.ListRunsRequest())
            finally:
                await node_client.close()
            assert [r.status for r in listed.runs] == [pb.RUN_STATUS_INTERRUPTED]
        finally:
            ctl.stop()
    finally:
        node.stop()
