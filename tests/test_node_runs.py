"""Node agent runs, end to end through the controller: streaming, reduction, limits, signals."""

from __future__ import annotations

import asyncio
import base64
import os
import signal

import pytest

from asm_controller import EmbeddedNode, Event, RemoteNode, Session
from asm_node import NodeAgent, NodeServer
from asm_wire import KIND_NAMES, AsmError, pb
from tests.support.processes import PYTHON_BASENAME, node_config, pid_alive


def py(code: str) -> str:
    """A shell-provider prompt that runs python ``code`` without a shell (no metacharacters needed)."""
    encoded = base64.b64encode(code.encode()).decode()
    return f"{PYTHON_BASENAME} -c \"exec(__import__('base64').b64decode('{encoded}'))\""


async def collect(stream: object) -> list[Event]:
    return [ev async for ev in stream]  # type: ignore[attr-defined]


async def test_echo_streams_sequenced_events_and_reduces(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        stream = s.stream("echo hello world")
        events = await collect(stream)
    assert [e.kind for e in events] == ["run_started", "assistant_delta", "result", "run_completed"]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert len({e.id for e in events}) == 4
    assert all(e.run_id == stream.run_id for e in events)
    assert events[0].payload["pid"] > 0
    result = stream.result
    assert result is not None and result.ok
    assert result.text == "hello world\n"
    assert result.exit_code == 0
    assert result.metadata["node_id"] == agent.node_id
    assert result.metadata["node_epoch"] == agent.boot_epoch
    assert result.metadata["execution"] == "embedded"


async def test_remote_run_over_grpc_matches_embedded(grpc_node: NodeServer) -> None:
    async with Session("shell", node=RemoteNode(f"127.0.0.1:{grpc_node.port}")) as s:
        result = await s.query(py("for i in range(500): print(i)"))
    assert result.ok, result.error
    assert result.text == "".join(f"{i}\n" for i in range(500))
    assert result.events == 500 + 3
    assert result.metadata["execution"] == "remote"


async def test_nonzero_exit_is_a_tool_failed_error_with_stderr(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        result = await s.query(py("import sys\nsys.stderr.write('boom here\\n')\nsys.exit(3)"))
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == "tool_failed"
    assert result.error.exit_code == 3 and "boom here" in result.error.message
    assert any(m.kind == "stderr" and m.payload["content"] == "boom here" for m in result.messages)


async def test_denied_and_unlisted_commands_never_spawn(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        denied = await s.query("rm -rf /tmp/nothing")
        unlisted = await s.query("curl http://127.0.0.1")
        metachar = await s.query("echo hi; echo there")
    for r in (denied, unlisted, metachar):
        assert r.error is not None and r.error.kind == "guardrail_blocked"
        assert not any(m.kind == "run_started" for m in r.messages)
    assert "denied" in denied.error.message  # type: ignore[union-attr]
    assert "not in the allowed list" in unlisted.error.message  # type: ignore[union-attr]
    assert agent.active_runs() == 0


async def test_unknown_option_is_config_invalid_before_spawn(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent), options={"colour": "blue"}) as s:
        result = await s.query("echo hi")
    assert result.error is not None and result.error.kind == "config_invalid"
    assert "colour" in result.error.message


async def test_overlong_line_becomes_buffer_overflow_and_run_continues() -> None:
    agent = NodeAgent(node_config(line_cap_bytes=4096))
    await agent.start()
    try:
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            result = await s.query(py("print('a'*100000)\nprint('after')\nprint('b'*9000, end='')"))
        assert result.ok, result.error
        assert result.text == "after\n"
        kinds = [w.kind for w in result.warnings]
        assert kinds == ["buffer_overflow", "buffer_overflow"]
        assert "100000 bytes" in result.warnings[0].message
        # The agent is still serving.
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            assert (await s.query("echo alive")).text == "alive\n"
    finally:
        await agent.stop()


async def test_stderr_flood_is_bounded_and_does_not_block() -> None:
    agent = NodeAgent(node_config(stderr_cap_bytes=16 * 1024))
    await agent.start()
    try:
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            code = "import sys\nfor i in range(200000): sys.stderr.write('x'*40+'\\n')\nprint('done')"
            result = await asyncio.wait_for(s.query(py(code)), 60)
        assert result.ok, result.error
        assert result.text == "done\n"
        stderr_bytes = sum(len(m.payload["content"]) + 1 for m in result.messages if m.kind == "stderr")
        assert 0 < stderr_bytes <= 16 * 1024 + 64
        assert [w.kind for w in result.warnings] == ["buffer_overflow"]
        assert "stderr exceeded" in result.warnings[0].message
    finally:
        await agent.stop()


async def test_interrupt_active_run_kills_its_process(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        stream = s.stream("sleep 30")
        events: list[Event] = []
        pid = 0
        async for ev in stream:
            events.append(ev)
            if ev.kind == "run_started":
                pid = ev.payload["pid"]
                await s.interrupt(stream.run_id)
    result = stream.result
    assert result is not None and result.status == "interrupted"
    assert result.error is not None and result.error.kind == "user_cancelled"
    assert events[-1].kind == "run_completed"
    assert not pid_alive(pid)


@pytest.mark.slow
async def test_interrupt_escalates_to_sigkill_for_a_cli_ignoring_signals() -> None:
    agent = NodeAgent(node_config(interrupt_grace_s=0.3, term_grace_s=0.3))
    await agent.start()
    code = (
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"
    )
    try:
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            stream = s.stream(py(code))
            pid = 0
            async for ev in stream:
                if ev.kind == "run_started":
                    pid = ev.payload["pid"]
                if ev.kind == "assistant_delta":
                    await s.interrupt(stream.run_id)
        result = stream.result
        assert result is not None and result.status == "interrupted"
        completed = result.messages[-1]
        assert completed.kind == "run_completed" and completed.payload["signal"] == signal.SIGKILL
        assert not pid_alive(pid)
    finally:
        await agent.stop()


@pytest.mark.slow
async def test_leftover_children_of_a_finished_run_are_killed(agent: NodeAgent) -> None:
    code = "import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid, flush=True)"
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        result = await s.query(py(code))
    assert result.ok, result.error
    child = int(result.text.strip())
    assert not pid_alive(child)


async def test_cancelled_queued_run_ends_with_user_cancelled(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent), max_concurrent_runs=1, max_queued_runs=1) as s:
        active = s.stream("sleep 30")
        first = await active.__anext__()
        assert first.kind == "run_started"
        queued = s.stream("echo never")
        consumer = asyncio.create_task(collect(queued))
        await asyncio.sleep(0.05)
        assert s.info()["queued_runs"] == [queued.run_id]
        await s.interrupt(queued.run_id)
        events = await asyncio.wait_for(consumer, 5)
        assert [e.kind for e in events] == ["error", "run_completed"]
        assert events[0].payload["code"] == "user_cancelled"
        assert queued.result is not None and queued.result.status == "interrupted"
        await s.interrupt(active.run_id)
        rest = await asyncio.wait_for(collect(active), 10)
        assert rest[-1].kind == "run_completed"


async def test_session_admission_limits(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent), max_concurrent_runs=1, max_queued_runs=1) as s:
        a = s.stream("sleep 30")
        await a.__anext__()
        b = s.stream("echo queued")
        await b.__aenter__()  # submits
        c = s.stream("echo refused")
        with pytest.raises(AsmError) as exc:
            await c.__anext__()
        assert exc.value.kind == "at_capacity"
        await s.interrupt(a.run_id)
        # The queued run is promoted when the slot frees up.
        events = await asyncio.wait_for(collect(b), 10)
        assert b.result is not None and b.result.text == "queued\n", events


async def test_node_max_runs_refuses_with_typed_at_capacity() -> None:
    agent = NodeAgent(node_config(max_runs=1))
    await agent.start()
    try:
        async with Session("shell", node=EmbeddedNode(agent), max_concurrent_runs=2) as s:
            first = s.stream("sleep 30")
            await first.__anext__()
            second = await s.query("echo no room")
            assert second.error is not None and second.error.kind == "at_capacity"
            assert second.error.reason == "at_capacity"
            await s.interrupt(first.run_id)
            await collect(first)
    finally:
        await agent.stop()


@pytest.mark.slow
async def test_repeated_start_with_same_run_id_launches_one_cli(agent: NodeAgent) -> None:
    req = pb.StartRunRequest(run_id="same-run", provider="shell", prompt=py("import time\nprint('x')\ntime.sleep(0.5)"))

    async def follow() -> list[pb.Event]:
        out: list[pb.Event] = []
        async for batch in agent.start_run(req):
            out.extend(batch.events)
        return out

    a, b = await asyncio.gather(follow(), follow())
    assert len(agent.runs) == 1
    assert [e.seq for e in a] == [e.seq for e in b]
    pids = {e.run_started.pid for e in a + b if KIND_NAMES[e.kind] == "run_started"}
    assert len(pids) == 1
    # A third start after the run finished replays it instead of running again.
    again = await follow()
    assert [e.SerializeToString() for e in again] == [e.SerializeToString() for e in a]


async def test_attach_replays_after_sequence(agent: NodeAgent) -> None:
    async with Session("shell", node=EmbeddedNode(agent)) as s:
        stream = s.stream(py("for i in range(5): print(i)"))
        events = await collect(stream)
    replay: list[pb.Event] = []
    async for batch in agent.attach_run(pb.AttachRunRequest(run_id=stream.run_id, after_seq=3)):
        replay.extend(batch.events)
    assert [e.seq for e in replay] == [e.seq for e in events[3:]]
    assert replay[-1].kind == pb.EVENT_KIND_RUN_COMPLETED


@pytest.mark.slow
async def test_disconnected_subscriber_does_not_stop_the_run(grpc_node: NodeServer) -> None:
    from asm_controller import GrpcNodeClient

    client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{grpc_node.port}"))
    req = pb.StartRunRequest(run_id="detach-1", provider="shell", prompt=py("import time\ntime.sleep(0.5)\nprint('late')"))
    seen: list[pb.Event] = []
    async for batch in client.start_run(req):
        seen.extend(batch.events)
        break  # drop the stream after the first batch
    await client.close()
    client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{grpc_node.port}"))
    try:
        rest: list[pb.Event] = []
        async for batch in client.attach_run(pb.AttachRunRequest(run_id="detach-1", after_seq=seen[-1].seq)):
            rest.extend(batch.events)
        assert rest[0].seq == seen[-1].seq + 1
        assert any(e.assistant_delta.content == "late\n" for e in rest)
        assert rest[-1].run_completed.status == "completed"
    finally:
        await client.close()


async def test_stop_session_stops_its_clis(agent: NodeAgent) -> None:
    s = Session("shell", node=EmbeddedNode(agent))
    stream = s.stream("sleep 30")
    started = await stream.__anext__()
    pid = started.payload["pid"]
    assert os.getpgid(pid) == pid  # the CLI leads its own process group
    await s.stop()
    assert not pid_alive(pid)
    assert stream.result is not None and stream.result.status == "interrupted"


async def test_cwd_must_resolve_inside_workspace_roots(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path)) / "root"
    (root / "sub").mkdir(parents=True)
    outside = Path(str(tmp_path)) / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    agent = NodeAgent(node_config(workspace_roots=[root]))
    await agent.start()
    try:
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            ok = await s.query("pwd", cwd=str(root / "sub"))
            escaped = await s.query("pwd", cwd=str(root / "escape"))
            dotdot = await s.query("pwd", cwd=str(root / "sub" / ".." / ".." / "outside"))
        assert ok.ok and ok.text.strip() == str(root / "sub")
        for r in (escaped, dotdot):
            assert r.error is not None and r.error.reason == "cwd_not_allowed"
            assert type(r.error).__name__ == "CwdNotAllowed"
    finally:
        await agent.stop()



@pytest.mark.slow
async def test_slow_subscriber_gets_every_event_and_the_end(agent: NodeAgent, tmp_path: object) -> None:
    from pathlib import Path

    n = 30_000
    data = Path(str(tmp_path)) / "lines.txt"
    data.write_text("".join(f"line {i}\n" for i in range(n)))
    async with Session("shell", node=EmbeddedNode(agent), cwd=str(tmp_path)) as s:
        stream = s.stream(f"cat {data}")
        count = 0
        async for _ev in stream:
            count += 1
            if count % 500 == 0:
                await asyncio.sleep(0.01)  # a reader slower than the node
        assert count == n + 3
        assert stream.result is not None and stream.result.ok
        assert stream.result.text.count("\n") == n


@pytest.mark.slow
async def test_abandoned_stream_does_not_block_the_run(agent: NodeAgent, tmp_path: object) -> None:
    from pathlib import Path

    data = Path(str(tmp_path)) / "lines.txt"
    data.write_text("x\n" * 200_000)
    async with Session("shell", node=EmbeddedNode(agent), cwd=str(tmp_path)) as s:
        stream = s.stream(f"cat {data}")
        async for _ev in stream:
            break  # walk away without aclose()
        run = stream._run
        assert run is not None
        del stream
        import gc

        gc.collect()
        await asyncio.wait_for(run.done.wait(), 20)
        assert run.result().ok
