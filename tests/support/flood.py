"""Output floods streamed from a node process over real gRPC, with the node's RSS sampled meanwhile.

Shared by ``tests/test_flood.py`` (CI sizes) and ``scripts/bench.py --flood`` (full sizes).
A flood is a shell-provider run of the Python interpreter writing ``total`` bytes of lines:
tiny ones (``"x\\n"``, one event each) or long ones (1 MiB each). The client counts every
event and checks the sequence has no gap; a sampler thread reads ``VmRSS`` of the node
from ``/proc`` every 20 ms.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field

from asm_controller import GrpcNodeClient, RemoteNode
from asm_wire import AsmError, pb

LONG_LINE_BYTES = 1 << 20


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _python_prompt(python: str, code: str) -> str:
    encoded = base64.b64encode(code.encode()).decode()
    return f"{python} -c \"exec(__import__('base64').b64decode('{encoded}'))\""


def tiny_lines(python: str, total_bytes: int) -> tuple[str, int]:
    """A prompt writing ``total_bytes`` of 2-byte lines, and the number of lines it writes."""
    lines = max(1, total_bytes // 2)
    code = (
        "import sys\nw = sys.stdout.buffer.write\nchunk = b'x\\n' * 32768\n"
        f"n = {lines}\nfor _ in range(n // 32768): w(chunk)\nw(b'x\\n' * (n % 32768))\nsys.stdout.flush()\n"
    )
    return _python_prompt(python, code), lines


def long_lines(python: str, total_bytes: int, line_bytes: int = LONG_LINE_BYTES) -> tuple[str, int]:
    """A prompt writing ``total_bytes`` of ``line_bytes``-long lines, and the number of lines."""
    lines = max(1, total_bytes // line_bytes)
    code = (
        "import sys\nw = sys.stdout.buffer.write\n"
        f"line = b'y' * {line_bytes - 1} + b'\\n'\nfor _ in range({lines}): w(line)\nsys.stdout.flush()\n"
    )
    return _python_prompt(python, code), lines


class RssSampler:
    """Peak and last VmRSS of a process, sampled by a thread (the event loop may be busy)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.start_mb = rss_mb(pid)
        self.peak_mb = self.start_mb
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = rss_mb(self.pid)
            if value == value:
                self.peak_mb = max(self.peak_mb, value)
                self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class FloodResult:
    lines: int
    events: int = 0
    status: str = ""
    error: str | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)
    wall_s: float = 0.0
    start_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    end_rss_mb: float = 0.0
    rss_samples: int = 0
    deltas: int = 0
    delta_bytes: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s else 0.0


async def flood(address: str, node_pid: int, run_id: str, prompt: str, lines: int,
                timeout_ms: int = 3_600_000) -> FloodResult:
    """Run ``prompt`` on the node and stream it; every event is counted and its seq checked."""
    out = FloodResult(lines=lines)
    client = GrpcNodeClient(RemoteNode(address))
    req = pb.StartRunRequest(run_id=run_id, provider="shell", prompt=prompt,
                             options_json=json.dumps({"command_timeout_ms": timeout_ms}))
    delta, completed = pb.EVENT_KIND_ASSISTANT_DELTA, pb.EVENT_KIND_RUN_COMPLETED
    t0 = time.perf_counter()
    with RssSampler(node_pid) as rss:
        try:
            async for batch in client.start_run(req):
                events = batch.events
                if events[0].seq != out.events + 1 or events[-1].seq - events[0].seq + 1 != len(events):
                    out.gaps.append((out.events + 1, events[0].seq))
                out.events = events[-1].seq
                for ev in events:
                    if ev.kind == delta:
                        out.deltas += 1
                        out.delta_bytes += len(ev.assistant_delta.content)
                    elif ev.kind == completed:
                        out.status = ev.run_completed.status
        except AsmError as err:
            out.error = f"{err.kind}/{err.reason}: {err.message}"
        finally:
            await client.close()
    out.wall_s = time.perf_counter() - t0
    out.start_rss_mb, out.peak_rss_mb, out.end_rss_mb = rss.start_mb, rss.peak_mb, rss_mb(node_pid)
    out.rss_samples = rss.samples
    return out
