"""The hand-off between a run's driver and its one subscriber."""

from __future__ import annotations

from asm_controller._events import Event
from asm_controller._queue import BoundedQueue


class BatchChannel:
    """Run driver -> subscriber hand-off: bounded for data, never blocking for the end.

    ``put`` waits while ``high_water`` batches are unread (back-pressure all the
    way to the node); ``put_final`` and ``close`` always succeed, so the end of
    a stream can never be lost behind a slow reader. A reader that goes away
    (``abandon``) stops the back-pressure so the run still completes.
    """

    def __init__(self, high_water: int = 64) -> None:
        self._queue: BoundedQueue[list[Event]] = BoundedQueue(high_water, "block")

    async def put(self, batch: list[Event]) -> None:
        await self._queue.put(batch)  # waits for room, or until the reader abandons

    def put_final(self, batch: list[Event]) -> None:
        self._queue.force(batch)

    def close(self) -> None:
        self._queue.close()

    def abandon(self) -> None:
        self._queue.abandon()

    async def get(self) -> list[Event] | None:
        if not await self._queue.wait():
            return None
        return self._queue.get_nowait()
