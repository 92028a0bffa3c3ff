"""``asm run`` prints a batch of events at a time: a big output still comes out whole and in order.

Through a real node process: 200,000 lines of ``cat FILE`` with ``--output jsonl`` (every event's
line, in seq order, each delta the file's line) and ``--output text`` (stdout is the file); and the
library's ``RunStream.next_batch`` mixed with ``async for`` gives every event once, in order.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from asm_controller import EmbeddedNode, Session
from asm_node import NodeAgent
from tests.support.cli import ASM
from tests.support.processes import ROOT, NodeProcess

LINES = 200_000


def _cat(node: NodeProcess, path: Path, output: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*ASM, "run", "--node", node.address, "--provider", "shell", "--cwd", str(path.parent),
                           "--opt", "command_timeout_ms=600000", "--output", output, f"cat {path.name}"],
                          capture_output=True, timeout=300, cwd=str(ROOT))


@pytest.mark.slow
def test_200k_lines_of_jsonl_through_a_node_process_come_out_every_one_in_order(
        node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"{i}\n" for i in range(1, LINES + 1)))
    node = node_process()
    proc = _cat(node, path, "jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == LINES + 4  # run_started, the deltas, result, run_completed, the summary
    events = [json.loads(line) for line in lines[:-1]]
    assert [e["seq"] for e in events] == list(range(1, LINES + 4))
    assert [e["kind"] for e in events[:1] + events[-2:]] == ["run_started", "result", "run_completed"]
    deltas = events[1:-2]
    assert all(e["kind"] == "assistant_delta" for e in deltas)
    assert [e["payload"]["content"] for e in deltas] == [f"{i}\n" for i in range(1, LINES + 1)]
    summary = json.loads(lines[-1])
    assert summary["kind"] == "result_summary" and summary["status"] == "completed"
    assert summary["text"] == path.read_text() and summary["events"] == LINES + 3


@pytest.mark.slow
def test_200k_lines_of_text_through_a_node_process_are_the_file(
        node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"{i}\n" for i in range(1, LINES + 1)))
    node = node_process()
    proc = _cat(node, path, "text")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == path.read_bytes()


async def test_next_batch_and_async_for_share_one_stream(agent: NodeAgent, tmp_path: Path) -> None:
    n = 5000
    (tmp_path / "lines.txt").write_text("".join(f"{i}\n" for i in range(1, n + 1)))
    async with Session("shell", node=EmbeddedNode(agent), cwd=str(tmp_path)) as s:
        stream = s.stream("cat lines.txt")
        seqs: list[int] = []
        sizes: list[int] = []
        turn = 0
        while True:
            turn += 1
            if turn % 2:  # one event, then the rest of its batch or the next one
                ev = await anext(stream, None)
                if ev is None:
                    break
                seqs.append(ev.seq)
            else:
                batch = await stream.next_batch()
                if batch is None:
                    break
                sizes.append(len(batch))
                seqs.extend(ev.seq for ev in batch)
        assert await stream.next_batch() is None
        assert seqs == list(range(1, n + 4))
        assert max(sizes) > 1  # batches, not one event at a time
        result = stream.result
        assert result is not None and result.ok and result.text == "".join(f"{i}\n" for i in range(1, n + 1))


def test_settle_heap_puts_what_is_loaded_out_of_the_collectors_reach() -> None:
    import gc

    from asm_cli.commands._common import settle_heap

    gc.unfreeze()
    thresholds = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000  # the modules, gRPC, protobuf: never walked again
        assert gc.get_threshold()[0] == 10_000  # young collections every 10,000 allocations, not 700
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
