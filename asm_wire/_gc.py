"""The cyclic collector settled for a process that streams events (standard library only).

Each event in flight is a few tracked objects (upb's message wrapper, an Event) that die with their
batch. With CPython's default first-generation threshold (700 allocations) a collection finds
thousands of a batch's objects alive, traverses and promotes them, and the older collections walk
them again together with everything imported at start-up (~100k objects: gRPC, protobuf, the
modules): about half the CPU a relayed event cost in a controller (docs/benchmarks.md). So, once a
process has started: what it holds is frozen out of every later collection (``gc.freeze``) and the
first generation is collected less often. Cycles are still collected, only later.

Serving processes (``asm node serve``, ``asm controller serve``) and the CLI's streaming commands
call it; a library user's process is never tuned behind its back.
"""

from __future__ import annotations

import gc

#: The first-generation threshold of a serving process, and of the CLI while a run streams in.
SERVING_YOUNG = 20_000
CLI_YOUNG = 10_000


def settle_heap(young: int) -> None:
    """Freeze what the process holds now and collect the first generation every ``young`` allocations."""
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(young, second, third)
