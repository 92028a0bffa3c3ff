"""Shell commands and checks shared by the fault, failover, no-hang and pipeline tests."""

from __future__ import annotations

import base64

from asm_controller import Event
from asm_node.testing import PYTHON_BASENAME


def py(code: str) -> str:
    encoded = base64.b64encode(code.encode()).decode()
    return f"{PYTHON_BASENAME} -c \"exec(__import__('base64').b64decode('{encoded}'))\""


def ticker(n: int, interval: float) -> str:
    """A CLI printing n numbered lines, one every ``interval`` seconds."""
    return py(f"import time\nfor i in range({n}):\n    print(i, flush=True)\n    time.sleep({interval})")


def node_args() -> list[str]:
    return ["--shell-allow", PYTHON_BASENAME, "--detach-grace", "2"]


def assert_exactly_once(events: list[Event], n_lines: int) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "events lost, duplicated or out of order"
    deltas = [e.payload["content"] for e in events if e.kind == "assistant_delta"]
    assert deltas == [f"{i}\n" for i in range(n_lines)]
