"""Helpers for fleet tests: CLIs that count their executions, and a client that follows a run across
controller replicas, recording every event it receives (duplicates included, so a test can see them)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from asm_controller import RemoteNode
from asm_controller._client import GrpcNodeClient
from asm_wire import AsmError, pb
from tests.support.faults import py

#: Errors after which a follower tries again (the next address): the replica died or handed the run over.
RETRYABLE = {"connection_failed", "transport", "node_not_ready", "unknown", "timeout", "node_unreachable"}


def counted_cli(executions: Path, run_id: str, lines: int, interval: float) -> str:
    """A CLI that appends ``run_id`` to ``executions`` (one line per execution), then prints numbered lines."""
    return py(f"with open({str(executions)!r}, 'a') as f:\n    f.write({run_id!r} + '\\n')\n"
              f"import time\nfor i in range({lines}):\n    print(i, flush=True)\n    time.sleep({interval})")


def executions(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


@dataclass
class Followed:
    run_id: str
    events: list[pb.Event] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)  # where each (re)connection went
    errors: list[str] = field(default_factory=list)

    @property
    def seqs(self) -> list[int]:
        return [m.seq for m in self.events]

    @property
    def completed(self) -> pb.Event | None:
        return next((m for m in self.events if m.kind == pb.EVENT_KIND_RUN_COMPLETED), None)

    @property
    def error_reason(self) -> str:
        return next((m.metadata.get("reason", "") for m in self.events if m.kind == pb.EVENT_KIND_ERROR), "")

    @property
    def error_code(self) -> str:
        return next((m.error.code for m in self.events if m.kind == pb.EVENT_KIND_ERROR), "")


async def follow(addresses: list[str], request: pb.StartRunRequest, *, timeout: float = 120.0,
                 token: str | None = None) -> Followed:
    """StartRun on the first address; on a broken stream, StartRun again (a known id attaches) after the
    last seq received, on the next address. Every event received is kept, in order."""
    out = Followed(request.run_id)
    deadline = time.monotonic() + timeout
    i = 0
    cursor = 0
    while time.monotonic() < deadline:
        addr = addresses[i % len(addresses)]
        out.addresses.append(addr)
        client = GrpcNodeClient(RemoteNode(addr, token=token))
        req = pb.StartRunRequest()
        req.CopyFrom(request)
        req.after_seq = cursor
        try:
            async for batch in client.start_run(req):
                out.events.extend(batch.events)
                if batch.events:
                    cursor = max(cursor, batch.events[-1].seq)
                if out.completed is not None:
                    return out
            out.errors.append(f"{addr}: stream ended without run_completed")
        except AsmError as err:
            out.errors.append(f"{addr}: {err.kind}/{err.reason}: {err.message}")
            if err.kind not in RETRYABLE and err.reason not in ("lease_lost", "store_unreachable"):
                raise AssertionError(f"run {request.run_id}: {err!r} from {addr} (cursor {cursor}; "
                                     f"earlier: {out.errors})") from err
            i += 1
        finally:
            await client.close()
        await asyncio.sleep(0.2)
    raise AssertionError(f"run {request.run_id} did not complete in {timeout}s: {out.errors[-5:]}")


def assert_once(f: Followed) -> None:
    """Every event once, in order: seqs 1..N with no gap and no repeat, ending in run_completed."""
    assert f.completed is not None, f.errors
    assert f.seqs == list(range(1, len(f.seqs) + 1)), (f.run_id, f.seqs, f.errors)
