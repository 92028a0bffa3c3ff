"""The node's run journal keeps at most ``journal_max_runs`` ended runs: the oldest ended are forgotten first."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asm_node import NodeAgent, NodeConfig
from asm_node.journal import DEFAULT_MAX_RUNS, Journal
from asm_node.testing import ScriptedProvider, test_config
from asm_wire import RunNotFound, pb


async def events(stream: AsyncIterator[pb.EventBatch]) -> list[pb.Event]:
    return [ev async for batch in stream for ev in batch.events]


def test_the_journal_keeps_at_most_max_runs_ended_runs_oldest_forgotten_first() -> None:
    journal = Journal(None, "epoch-a", 3600.0, max_runs=3)
    try:
        journal.started("live", "o", "s", "shell", 1)  # running: never pruned, whatever its age
        now = time.time_ns()
        for i in range(6):
            journal.started(f"r{i}", "o", "s", "shell", now)
            journal.finished(f"r{i}", "completed", 0, 2, now + i, None)
        journal.prune()
        kept = {r for (r,) in journal._db.execute("SELECT run_id FROM runs")}
        assert kept == {"live", "r3", "r4", "r5"}
    finally:
        journal.close()


async def test_a_node_forgets_the_oldest_ended_run_ids_past_journal_max_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    count = "import sys\nopen(sys.argv[1], 'a').write('ran\\n')\n"
    provider = ScriptedProvider(script=count, args=lambda spec: [str(marker)])
    node = NodeAgent(test_config(retention_max_runs=0, journal_max_runs=2), providers={"scripted": provider})
    await node.start()
    try:
        for rid in ("cap-0", "cap-1", "cap-2"):
            await events(node.start_run(pb.StartRunRequest(run_id=rid, provider="scripted", prompt="p")))
        assert node.journal.count() <= 2 and node.journal.get("cap-0") is None
        assert node.journal.get("cap-2") is not None
        with pytest.raises(RunNotFound):  # forgotten by the node
            await node.get_run(pb.GetRunRequest(run_id="cap-0"))
        again = await events(node.start_run(pb.StartRunRequest(run_id="cap-2", provider="scripted", prompt="p")))
        assert [e.kind for e in again] == [pb.EVENT_KIND_RUN_COMPLETED]  # still journaled: not run again
        assert len(marker.read_text().splitlines()) == 3
    finally:
        await node.stop()


def test_journal_max_runs_is_an_asm_node_serve_flag() -> None:
    from asm_cli.commands.node_serve import _NODE_SERVE_FIELDS
    from asm_cli.main import build_parser

    args = build_parser("node").parse_args(["node", "serve", "--listen", "127.0.0.1:0", "--journal-max-runs", "5"])
    assert args.journal_max_runs == 5 and _NODE_SERVE_FIELDS["journal_max_runs"] == "journal_max_runs"
    assert NodeConfig(journal_max_runs=5).journal_max_runs == 5 and NodeConfig().journal_max_runs == DEFAULT_MAX_RUNS
