"""Floods of output from a node process: every event arrives, and the node's RSS stays bounded.

Two floods, each on a fresh ``asm node serve`` process streamed over real gRPC on 127.0.0.1:
many 2-byte lines (one event each) and 1 MiB lines. The long-line flood runs at the issue's
size (256 MiB, under a second); its 1 GB of tiny lines (~500M events) would take half an
hour on a shared 2-core machine, so the sizes come from the environment with CI defaults
that keep the module well under ~60 s; ``scripts/bench.py --flood`` runs larger sizes and
docs/benchmarks.md has the figures.

    ASM_FLOOD_TINY_BYTES   bytes of "x\\n" lines     (default 2 MB: 1M events; peak ~100 MB measured)
    ASM_FLOOD_LONG_BYTES   bytes of 1 MiB lines      (default 256 MiB; peak ~130 MB measured)
    ASM_FLOOD_RSS_MB       bound on the node's peak RSS (default 256 MB)

Both run on a DEFAULT node: a tiny-line flood outruns even a fast local follower (the CLI's
output is read in 256 KiB chunks of up to 128k lines while the follower sends 4096 events a
turn), and the node no longer drops what the follower has yet to send: it stops reading the
CLI's stdout past ``backlog_max_bytes`` (tests/test_backpressure.py covers the bounds).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

from tests.support.flood import LONG_LINE_BYTES, flood, long_lines, tiny_lines
from tests.support.processes import NodeProcess

pytestmark = pytest.mark.slow  # line floods with RSS sampling

TINY_BYTES = int(os.environ.get("ASM_FLOOD_TINY_BYTES", 2_000_000))
LONG_BYTES = int(os.environ.get("ASM_FLOOD_LONG_BYTES", 256 * LONG_LINE_BYTES))
RSS_BOUND_MB = float(os.environ.get("ASM_FLOOD_RSS_MB", 256))
PYTHON = sys.executable


def _allow_python() -> tuple[str, ...]:
    # The interpreter by absolute path and by name: the allow-list may match either.
    return ("--shell-allow", PYTHON, "--shell-allow", os.path.basename(PYTHON))


async def test_tiny_line_flood_every_event_arrives_rss_bounded(node_process: Callable[..., NodeProcess]) -> None:
    prompt, lines = tiny_lines(PYTHON, TINY_BYTES)
    node = node_process(*_allow_python())  # the default replay and backlog bounds
    r = await flood(node.address, node.pid, "flood-tiny", prompt, lines)
    assert r.error is None, r.error
    assert r.status == "completed" and not r.gaps
    assert r.deltas == lines and r.delta_bytes == 2 * lines
    assert r.events == lines + 3  # run_started, the lines, result, run_completed
    assert r.rss_samples > 0 and r.peak_rss_mb > r.start_rss_mb  # the node was sampled under load
    assert r.peak_rss_mb < RSS_BOUND_MB, f"node peak RSS {r.peak_rss_mb:.0f} MB for {lines:,} events"
    assert node.proc.poll() is None


async def test_long_line_flood_every_event_arrives_rss_bounded(node_process: Callable[..., NodeProcess]) -> None:
    prompt, lines = long_lines(PYTHON, LONG_BYTES)
    node = node_process(*_allow_python())
    r = await flood(node.address, node.pid, "flood-long", prompt, lines)
    assert r.error is None, r.error
    assert r.status == "completed" and not r.gaps
    assert r.deltas == lines and r.delta_bytes == lines * LONG_LINE_BYTES
    assert r.events == lines + 3
    assert r.rss_samples > 0 and r.peak_rss_mb > r.start_rss_mb  # the node was sampled under load
    assert r.peak_rss_mb < RSS_BOUND_MB, f"node peak RSS {r.peak_rss_mb:.0f} MB for {lines} lines of 1 MiB"
    assert node.proc.poll() is None
