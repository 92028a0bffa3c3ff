"""The routing strategy in ``asm nodes --controller`` (text and JSON) and in ListNodes."""

from __future__ import annotations

import asyncio
import io
from typing import Any

from asm_cli.ui import nodes_text, print_nodes, watch_nodes
from asm_controller._metrics import ControllerMetrics
from asm_controller.service import ControllerConfig, FleetApi
from asm_wire import pb


def row(node: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"node": node, "state": "ready", "health": "healthy", "epoch": "e1",
                            "load": {"active_runs": 1, "max_runs": 4}, "heartbeat_age_s": 0.5, "providers": []}
    return {**base, **kw}


def test_text_output_names_the_strategy_after_the_table() -> None:
    rows = [row("a:1", strategy="least_loaded"), row("b:1", strategy="least_loaded")]
    text = nodes_text(rows)
    assert text.splitlines()[0].startswith("NODE  ") and text.endswith("\nrouting: least_loaded\n")
    out = io.StringIO()
    print_nodes(rows, out)
    assert out.getvalue() == text
    # Direct (--node) rows have no strategy: no footer, the table as before.
    assert "routing" not in nodes_text([row("a:1")])


def test_watch_shows_the_strategy_each_round() -> None:
    async def fetch() -> list[dict[str, Any]]:
        return [row("a:1", strategy="round_robin")]

    pipe = io.StringIO()
    asyncio.run(watch_nodes(fetch, 0.01, count=2, stream=pipe))
    assert pipe.getvalue().count("routing: round_robin\n") == 2


async def test_list_nodes_reports_the_configured_strategy() -> None:
    for strategy in ("least_loaded", "weighted"):
        api = FleetApi(ControllerConfig(strategy=strategy), ControllerMetrics())
        try:
            resp = await api.list_nodes(pb.ListNodesRequest())
        finally:
            await api.session.stop(timeout=1.0)
        assert resp.strategy == strategy and list(resp.nodes) == []
