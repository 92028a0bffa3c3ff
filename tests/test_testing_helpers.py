"""The shipped test helpers (asm_node.testing, asm_controller.testing) do what they say."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import pytest

from asm_controller import EmbeddedNode, RemoteNode, Session
from asm_controller.testing import FakeNodeApi, delta, error, result
from asm_node.testing import (
    ScriptedProvider,
    free_port,
    handshake,
    running_agent,
    running_server,
    serve_controller,
    serve_node,
    test_config,
    wait_serving,
)
from asm_wire import pb


async def test_scripted_provider_prints_its_lines_as_events() -> None:
    provider = ScriptedProvider(["plain text, ", {"text": "then json"}, {"tool": "Bash"}, {"result": [1, 2]}])
    async with running_agent(providers={"scripted": provider}) as agent:
        async with Session("scripted", node=EmbeddedNode(agent)) as s:
            stream = s.stream("go")
            kinds = [ev.kind async for ev in stream]
    assert stream.result is not None and stream.result.ok
    assert stream.result.text == "plain text, then json"
    assert kinds[0] == "run_started" and kinds[-1] == "run_completed"
    assert "tool_use" in kinds and "result" in kinds


async def test_scripted_provider_runs_a_script_with_args_and_stdin() -> None:
    script = ("import json, sys\nprint(sys.argv[1], flush=True)\n"
              "print(json.dumps({'text': sys.stdin.readline().strip()}))\n")
    provider = ScriptedProvider(script=script, args=lambda spec: [spec.prompt.upper()], stdin=True)
    async with running_agent(providers={"scripted": provider}) as agent:
        async with Session("scripted", node=EmbeddedNode(agent)) as s:
            stream = s.stream("hello ")
            async for ev in stream:
                if ev.kind == "run_started":
                    await agent.send_input(pb.SendInputRequest(run_id=stream.run_id, data=b"back\n", end_input=True))
    assert stream.result is not None and stream.result.text == "HELLO back"


def test_scripted_provider_takes_lines_or_a_script() -> None:
    with pytest.raises(ValueError):
        ScriptedProvider()
    with pytest.raises(ValueError):
        ScriptedProvider(["x"], script="print(1)")


async def test_running_server_answers_a_handshake() -> None:
    async with running_server(test_config(node_id="helper-node")) as server:
        info = await asyncio.to_thread(handshake, f"127.0.0.1:{server.port}")
    assert info.node_id == "helper-node" and info.boot_epoch == server.agent.boot_epoch


def test_wait_serving_times_out_when_nothing_listens() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_serving(f"127.0.0.1:{free_port()}", timeout=0.5)
    assert time.monotonic() - started < 5


def test_wait_serving_gives_up_once_the_server_is_gone() -> None:
    with pytest.raises(RuntimeError):
        wait_serving(f"127.0.0.1:{free_port()}", timeout=10, alive=lambda: False)


def test_serve_node_is_ready_by_handshake_and_stops(tmp_path: Path) -> None:
    with serve_node(tmp_path, "--node-id", "served") as node:
        assert node.info is not None and node.info.node_id == "served"
        assert node.epoch == node.info.boot_epoch != ""
        assert handshake(node.address).boot_epoch == node.epoch  # serving at the address it reports
    assert node.proc.returncode is not None
    with socket.socket() as s:  # the port is free again: the process is gone
        s.bind(("127.0.0.1", node.port))


def test_serve_node_with_a_token_file_handshakes_with_that_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("a-token-of-sixteen-chars\n")
    with serve_node(tmp_path, "--token-file", str(tmp_path / "token")) as node:
        assert node.info is not None and node.epoch  # authenticated: it told us its epoch
        with pytest.raises(grpc.RpcError):
            handshake(node.address)  # and without the token it is refused


def test_serve_node_that_exits_early_raises_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited early"):
        serve_node(tmp_path, "--no-such-flag")


@pytest.mark.slow
def test_serve_controller_is_ready_by_handshake(tmp_path: Path) -> None:
    with serve_node(tmp_path) as node, serve_controller(tmp_path, "--node", node.address) as ctl:
        assert ctl.info is not None and ctl.port != node.port
        assert handshake(ctl.address).agent_version == node.info.agent_version  # type: ignore[union-attr]

        async def go() -> str:
            async with Session("shell", node=RemoteNode(ctl.address)) as s:
                return (await s.query("echo hi")).text

        assert "hi" in asyncio.run(go())


async def test_fake_node_api_plays_its_script_and_records_calls() -> None:
    api = FakeNodeApi([[delta("Hello, ")], [delta("world"), result()]])
    async with Session("fake", node=EmbeddedNode(api)) as s:
        res = await s.query("hi")
    assert res.ok and res.text == "Hello, world"
    starts = api.calls_named("start_run")
    assert len(starts) == 1 and starts[0].prompt == "hi"  # type: ignore[attr-defined]
    assert api.calls[0].method == "handshake"
    run = api.runs[starts[0].run_id]  # type: ignore[attr-defined]
    assert [ev.seq for ev in run.events] == [1, 2, 3, 4]
    assert run.events[-1].kind == pb.EVENT_KIND_RUN_COMPLETED


async def test_fake_node_api_scripts_per_request_and_fails_runs() -> None:
    api = FakeNodeApi(lambda req: [[error("rate_limit", f"no {req.prompt}", "provider")]])
    async with Session("fake", node=EmbeddedNode(api)) as s:
        res = await s.query("luck")
    assert not res.ok and res.error is not None and "no luck" in res.error.message


async def test_fake_node_api_holds_a_run_until_interrupted() -> None:
    api = FakeNodeApi([[delta("working")]], hold=True)
    async with Session("fake", node=EmbeddedNode(api)) as s:
        stream = s.stream("go")
        async for ev in stream:
            if ev.kind == "assistant_delta":
                await s.interrupt(stream.run_id)
    assert api.calls_named("interrupt_run")
    assert stream.result is not None and stream.result.status == "interrupted"


async def test_fake_node_api_replays_after_a_seq() -> None:
    api = FakeNodeApi([[delta("a"), delta("b")], [delta("c")]])
    batches = [b async for b in api.start_run(pb.StartRunRequest(run_id="r1", provider="fake"))]
    assert [len(b.events) for b in batches] == [2, 1, 1]
    again = [ev.seq async for b in api.attach_run(pb.AttachRunRequest(run_id="r1", after_seq=2)) for ev in b.events]
    assert again == [3, 4]
    info = await api.get_run(pb.GetRunRequest(run_id="r1"))
    assert info.status == pb.RUN_STATUS_COMPLETED and info.last_seq == 4


@pytest.mark.parametrize("var", ["ASM_TOKEN", "ASM_NODE_TOKEN"])
def test_serve_node_with_a_token_in_env_handshakes_with_it(tmp_path: Path, var: str) -> None:
    with serve_node(tmp_path, env={var: "a-token-of-sixteen-chars"}) as node:
        assert node.info is not None and node.epoch


def test_serve_node_refused_for_want_of_a_token_is_ready_without_an_epoch(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("alice:alice-token-0123456789\n")
    with serve_node(tmp_path, "--tokens-file", str(tmp_path / "tokens")) as node:
        assert node.info is None and node.epoch == ""
        assert handshake(node.address, "alice-token-0123456789").boot_epoch != ""


def test_serve_node_picks_another_port_when_its_pick_was_taken(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import asm_node.testing as testing

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1]])
        monkeypatch.setattr(testing, "free_port", lambda host="127.0.0.1": next(picks, None) or free_port(host))
        with serve_node(tmp_path) as node:
            assert node.port != taken.getsockname()[1] and node.info is not None
