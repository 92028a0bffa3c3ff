"""Back-pressure, not drops: a run's events are never discarded while a client is attached.

Real ``asm node serve`` processes over gRPC on 127.0.0.1, the node's RSS read from /proc:

* ``asm run --node N --provider shell --output jsonl`` (the real CLI, a subprocess) of a command
  printing 2,000,000 lines on a DEFAULT node: every line arrives once, seqs contiguous, node RSS
  under 256 MB (the node stops reading the CLI's stdout instead of buffering or dropping);
* a slow library consumer (``Session.stream`` with sleeps): the CLI blocks on its pipe (its
  output falls behind, the node's backlog and RSS stay bounded) and still every event arrives;
* a detached run printing past ``replay_max_bytes_per_run``: re-attach from seq 0 is a typed
  ``replay_gap`` naming the seqs that are gone; re-attach from a held seq replays to the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from asm_controller import GrpcNodeClient, RemoteNode, Session
from asm_wire import AsmError, pb
from tests.support.flood import RssSampler, _python_prompt, tiny_lines
from tests.support.processes import NodeProcess

pytestmark = pytest.mark.slow  # floods and slow consumers: seconds each, by design

PYTHON = sys.executable
RSS_BOUND_MB = 256.0


def _allow_python() -> tuple[str, ...]:
    return ("--shell-allow", PYTHON, "--shell-allow", os.path.basename(PYTHON))


def _code_of(n: int, marker: str = "", pad: int = 0) -> str:
    """Python printing ``n`` numbered lines (``i:`` and ``pad`` dots), then touching ``marker`` if given."""
    code = (
        "import sys\nw = sys.stdout.buffer.write\n"
        f"n = {n}\nstep = 4096\ntail = b'{'.' * pad}\\n'\n"
        "for s in range(0, n, step): w(b''.join(b'%d:' % i + tail for i in range(s, min(n, s + step))))\n"
        "sys.stdout.flush()\n"
    )
    if marker:
        code += f"open({marker!r}, 'w').close()\n"
    return code


def _numbered_lines(n: int, marker: str = "", pad: int = 0) -> str:
    return _python_prompt(PYTHON, _code_of(n, marker, pad))


async def test_cli_jsonl_2m_lines_every_line_once_rss_bounded(
        node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    lines = 2_000_000
    prompt, n = tiny_lines(PYTHON, 2 * lines)
    assert n == lines
    node = node_process(*_allow_python())  # default bounds: nothing overridden
    tally = _JsonlTally()
    with RssSampler(node.pid) as rss:
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "asm_cli", "run", "--node", node.address, "--provider", "shell",
            "--output", "jsonl", "--opt", "command_timeout_ms=600000", prompt,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, limit=1 << 20)
        assert cli.stdout is not None and cli.stderr is not None
        err_task = asyncio.create_task(cli.stderr.read())
        while chunk := await asyncio.wait_for(cli.stdout.read(1 << 20), 120):
            tally.feed(chunk)
        await asyncio.wait_for(cli.wait(), 60)
        err = await err_task
    tally.close()
    assert cli.returncode == 0, err.decode()[-2000:]
    deltas, seqs, kinds = tally.deltas, tally.seqs, tally.kinds
    assert deltas == lines, kinds
    assert kinds.get("run_completed") == 1 and "error" not in kinds, kinds
    assert seqs == list(range(1, len(seqs) + 1))  # every event once, in order, no gap
    assert rss.samples > 0
    assert rss.peak_mb < RSS_BOUND_MB, f"node peak RSS {rss.peak_mb:.0f} MB over {lines:,} lines"
    assert node.proc.poll() is None


class _JsonlTally:
    """Counts the CLI's JSONL output as it streams: kinds, assistant_delta lines, event seqs."""

    def __init__(self) -> None:
        self.kinds: dict[str, int] = {}
        self.seqs: list[int] = []
        self.deltas = 0
        self._rest = b""

    def feed(self, chunk: bytes) -> None:
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        for raw in lines:
            self._line(raw)

    def close(self) -> None:
        if self._rest.strip():
            self._line(self._rest)

    def _line(self, raw: bytes) -> None:
        ev = json.loads(raw)
        kind = ev["kind"]
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if "seq" in ev:
            self.seqs.append(ev["seq"])
        if kind == "assistant_delta":
            self.deltas += 1


async def test_slow_consumer_blocks_the_cli_and_gets_everything(
        node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    # 40 MB of output: far more than what can sit in buffers on the way (the pipe, the node's
    # 2 MiB read buffer, its 1 MiB backlog, the HTTP/2 windows, the library's 64-batch channel).
    lines, pad = 400_000, 100
    marker = tmp_path / "cli-done"
    node = node_process(*_allow_python(), "--backlog-bytes", str(1 << 20))
    sess = Session("shell", node=RemoteNode(node.address), options={"command_timeout_ms": 120_000})
    received, last_seq = 0, 0
    cli_done_at = None
    gaps = 0
    try:
        with RssSampler(node.pid) as rss:
            async for ev in sess.stream(_numbered_lines(lines, str(marker), pad), run_id="slow-1"):
                if ev.seq != last_seq + 1:
                    gaps += 1
                last_seq = ev.seq
                if ev.kind == "assistant_delta":
                    assert ev.payload.get("content") == f"{received}:{'.' * pad}\n"
                    received += 1
                    if received % 20_000 == 0:
                        await asyncio.sleep(0.2)  # a slow consumer
                        if cli_done_at is None and marker.exists():
                            cli_done_at = received
    finally:
        await sess.stop()
    assert gaps == 0 and received == lines and marker.exists()
    # Had the node read on, the CLI would have finished writing within the first sleeps (the
    # consumer sleeps 0.2 s per 20k lines: at most ~40k lines taken by then); held back, it can
    # only finish once the consumer has taken all but the backlog bound and what sits in buffers
    # on the way. A quarter of the output is far from both, on a loaded machine too.
    assert cli_done_at is None or cli_done_at >= lines // 4, cli_done_at
    assert rss.peak_mb < RSS_BOUND_MB
    info = await _get_run(node.address, "slow-1")
    assert info.last_seq == last_seq


async def _get_run(address: str, run_id: str) -> pb.RunInfo:
    client = GrpcNodeClient(RemoteNode(address))
    try:
        return await client.get_run(pb.GetRunRequest(run_id=run_id))
    finally:
        await client.close()


async def test_backlog_paused_run_resumes_and_completes(
        node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    """A follower that reads nothing for a while: the CLI is held (not read on), nothing is dropped."""
    lines = 200_000  # of ~108 bytes: 21 MB
    marker = tmp_path / "cli-done"
    node = node_process(*_allow_python(), "--backlog-bytes", str(1 << 20))
    client = GrpcNodeClient(RemoteNode(node.address))
    req = pb.StartRunRequest(run_id="held-1", provider="shell", prompt=_numbered_lines(lines, str(marker), 100),
                             options_json=json.dumps({"command_timeout_ms": 120_000}))
    stream = client.start_run(req).__aiter__()
    try:
        first = await stream.__anext__()
        assert first.events[0].seq == 1
        await asyncio.sleep(1.5)  # the client reads nothing: the node's backlog fills and it stops reading
        assert not marker.exists(), "the CLI finished writing although nobody read its events"
        info = await client.get_run(pb.GetRunRequest(run_id="held-1"))
        assert info.status == pb.RUN_STATUS_RUNNING and info.first_held_seq == 1
        assert info.last_seq < lines // 2, info.last_seq  # far from all read: the CLI is blocked
        last, deltas = first.events[-1].seq, sum(e.kind == pb.EVENT_KIND_ASSISTANT_DELTA for e in first.events)
        async for batch in stream:
            assert batch.events[0].seq == last + 1
            last = batch.events[-1].seq
            deltas += sum(e.kind == pb.EVENT_KIND_ASSISTANT_DELTA for e in batch.events)
        assert deltas == lines and marker.exists()
    finally:
        await client.close()


async def test_detached_run_past_the_bound_replay_gap_names_the_seqs(
        node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    # Fewer events than replay_buffer_events (100k): only the byte bound can evict here.
    lines = 90_000
    marker = tmp_path / "cli-done"
    per_run = 1 << 20  # ~6k events of ~80 B (+ FRAME_OVERHEAD each)
    node = node_process(*_allow_python(), "--replay-bytes", str(per_run), "--detach-grace", "30")
    # A long tail so the run is still running (detached, within the grace) when we re-attach.
    code_tail = "import time\ntime.sleep(30)\n"
    client = GrpcNodeClient(RemoteNode(node.address))
    req = pb.StartRunRequest(run_id="gone-1", provider="shell",
                             prompt=_python_prompt(PYTHON, _code_of(lines, str(marker)) + code_tail),
                             options_json=json.dumps({"command_timeout_ms": 120_000}))
    try:
        stream = client.start_run(req).__aiter__()
        first = await stream.__anext__()
        assert first.events[0].seq == 1
        await stream.aclose()  # detach: the node reads on, retention bounded per run
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, "the detached CLI was never read to its end"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        info = await client.get_run(pb.GetRunRequest(run_id="gone-1"))
        assert info.status == pb.RUN_STATUS_RUNNING and info.subscribers == 0
        assert info.last_seq == lines + 1  # run_started + every line, all read while detached
        first_held = info.first_held_seq
        assert 2 < first_held and info.last_seq - first_held < 10_000, (first_held, info.last_seq)
        with pytest.raises(AsmError) as exc:
            async for _ in client.attach_run(pb.AttachRunRequest(run_id="gone-1", after_seq=0)):
                pass
        err = exc.value
        assert err.kind == "buffer_overflow" and err.reason == "replay_gap"
        assert re.search(rf"events 1\.\.{first_held - 1} of run gone-1 are no longer held .*"
                         rf"held now: {first_held}\.\.{info.last_seq}", err.message), err.message
        # Re-attach from a held seq: every event after it, contiguous, then interrupt to end the run.
        after = info.last_seq - 1000
        got = []
        agen = client.attach_run(pb.AttachRunRequest(run_id="gone-1", after_seq=after)).__aiter__()
        while len(got) < 1000:
            batch = await agen.__anext__()
            got.extend(e.seq for e in batch.events)
        assert got[:1000] == list(range(after + 1, after + 1001))
        await client.interrupt_run(pb.InterruptRunRequest(run_id="gone-1"))
        async for batch in agen:
            got.extend(e.seq for e in batch.events)
        assert got == list(range(after + 1, got[-1] + 1))
    finally:
        await client.close()



async def test_node_budget_bounds_detached_runs_together(tmp_path: Path) -> None:
    """Two detached runs on an embedded node: their held frames together stay within the node bound."""
    from asm_node import NodeAgent
    from tests.support.processes import node_config

    node_bound = 2 << 20
    agent = NodeAgent(node_config(reaper=False, replay_max_bytes_per_node=node_bound, detach_grace_s=30))
    await agent.start()
    try:
        markers = [tmp_path / f"done-{i}" for i in range(2)]
        runs = []
        for i, marker in enumerate(markers):
            code = _code_of(60_000, str(marker)) + "import time\ntime.sleep(30)\n"
            req = pb.StartRunRequest(run_id=f"budget-{i}", provider="shell",
                                     prompt=_python_prompt(os.path.basename(PYTHON), code),
                                     options_json=json.dumps({"command_timeout_ms": 60_000}))
            frames = agent.start_run_frames(req)
            await frames.__anext__()
            await frames.aclose()  # detached at once
            runs.append(agent.runs[f"budget-{i}"])
        deadline = time.monotonic() + 30
        while not all(m.exists() for m in markers):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        budget = agent.replay_budget
        assert budget.held == sum(r.held_cost for r in runs)  # the bookkeeping is exact
        assert budget.held <= node_bound
        assert all(r.first_held_seq > 1 and r.last_seq == 60_001 for r in runs)  # both evicted, both read on
        for r in runs:
            r.interrupt()
        await asyncio.wait([r.task for r in runs if r.task is not None], timeout=15)
        assert all(r.done for r in runs) and budget.held == 0 and not budget.runs
    finally:
        await agent.stop()


async def test_timeout_of_a_held_cli_ends_the_run(node_process: Callable[..., NodeProcess]) -> None:
    """A CLI held by a client that stopped reading still times out: the node reads its last output."""
    node = node_process(*_allow_python(), "--backlog-bytes", str(1 << 20))
    client = GrpcNodeClient(RemoteNode(node.address))
    req = pb.StartRunRequest(run_id="held-timeout", provider="shell", prompt=_numbered_lines(200_000, "", 100),
                             options_json=json.dumps({"command_timeout_ms": 1500}))
    try:
        stream = client.start_run(req).__aiter__()
        first = await stream.__anext__()
        deadline = time.monotonic() + 15
        while (await client.get_run(pb.GetRunRequest(run_id="held-timeout"))).status == pb.RUN_STATUS_RUNNING:
            assert time.monotonic() < deadline, "a held CLI past its timeout kept the run running"
            await asyncio.sleep(0.1)
        last, kinds = first.events[-1].seq, []
        async for batch in stream:
            assert batch.events[0].seq == last + 1
            last = batch.events[-1].seq
            kinds += [e.kind for e in batch.events if e.kind != pb.EVENT_KIND_ASSISTANT_DELTA]
        assert kinds[-1] == pb.EVENT_KIND_RUN_COMPLETED and pb.EVENT_KIND_ERROR in kinds
        info = await client.get_run(pb.GetRunRequest(run_id="held-timeout"))
        assert info.status == pb.RUN_STATUS_FAILED and info.last_seq == last
    finally:
        await client.close()


async def test_embedded_slow_consumer_pauses_the_pump(tmp_path: Path) -> None:
    """The in-process node goes through the same Run.follow(): a slow consumer pauses the pump."""
    from asm_controller import EmbeddedNode
    from asm_node import NodeAgent
    from tests.support.processes import node_config

    agent = NodeAgent(node_config(reaper=False, backlog_max_bytes=1 << 20))
    await agent.start()
    # More than the library's own 64-batch channel absorbs (64 x 4096 events) before it pushes back.
    lines, received = 400_000, 0
    try:
        async with Session("shell", node=EmbeddedNode(agent), options={"command_timeout_ms": 60_000}) as sess:
            async for ev in sess.stream(_python_prompt(os.path.basename(PYTHON), _code_of(lines, "", 100)),
                                          run_id="embedded-slow"):
                if ev.kind == "assistant_delta":
                    received += 1
                    if received == 50_000:
                        # It stops reading (the node parses on in the same event loop) until the node's log
                        # pauses the pump: waited for, not slept for, since a loaded machine parses slower.
                        (run,) = agent.runs.values()
                        for _ in range(1200):  # 60 s at most
                            if run.pauses or run.finished_ns:
                                break
                            await asyncio.sleep(0.05)
        (run,) = agent.runs.values()
        assert received == lines and run.pauses > 0 and run.first_held_seq >= 1
    finally:
        await agent.stop()
