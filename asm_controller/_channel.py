"""The hand-off between a run's driver and its one subscriber."""

from __future__ import annotations

import asyncio
from collections import deque

from asm_controller._events import Event


class BatchChannel:
    """Run driver -> subscriber hand-off: bounded for data, never blocking for the end.

    ``put`` waits while ``high_water`` batches are unread (back-pressure all the
    way to the node); ``put_final`` and ``close`` always succeed, so the end of
    a stream can never be lost behind a slow reader. A reader that goes away
    (``abandon``) stops the back-pressure so the run still completes.
    """

    def __init__(self, high_water: int = 64) -> None:
        self._items: deque[list[Event]] = deque()
        self._high = high_water
        self._closed = False
        self._abandoned = False
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def put(self, batch: list[Event]) -> None:
        while len(self._items) >= self._high and not self._abandoned:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        self.put_final(batch)

    def put_final(self, batch: list[Event]) -> None:
        if not self._abandoned:
            self._items.append(batch)
            self._wake(self._getter)

    def close(self) -> None:
        self._closed = True
        self._wake(self._getter)

    def abandon(self) -> None:
        self._abandoned = True
        self._items.clear()
        self._wake(self._putter)

    async def get(self) -> list[Event] | None:
        while not self._items:
            if self._closed:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            await self._getter
        batch = self._items.popleft()
        self._wake(self._putter)
        return batch

