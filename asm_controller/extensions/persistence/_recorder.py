"""Recording for the CLI (``asm run --record``): a FileStore behind a blocking AsyncWriter."""

from __future__ import annotations

import os
from collections.abc import Iterable

from asm_controller._events import Event
from asm_controller.extensions.persistence._file import FileStore
from asm_controller.extensions.persistence._writer import AsyncWriter

__all__ = ["open_recorder", "record_events"]

async def record_events(path: str | os.PathLike[str], events: Iterable[Event], fsync: str = "always") -> int:
    """Append events to the event store at ``path`` (created if missing); how many were new."""
    async with FileStore(path, fsync=fsync) as store:
        return await store.append(events)


async def open_recorder(path: str | os.PathLike[str], fsync: str = "batch", queue_size: int = 10_000) -> AsyncWriter:
    """A writer recording into the FileStore at ``path`` (for ``asm run --record``).

    ``overflow="block"``: ``await writer.put(ev)`` never loses an event (it waits
    only when the disk is ``queue_size`` events behind). ``await writer.close()``
    drains, syncs and closes the store. Raises AsmError when the file is locked by
    another writer or cannot be opened.
    """
    store = FileStore(path, fsync=fsync)
    await store.open()
    return AsyncWriter(store, queue_size=queue_size, overflow="block", close_store=True)
