"""asm_controller.extensions: optional building blocks on top of the controller runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING

from asm_wire._lazy import lazy_exports

if TYPE_CHECKING:
    from asm_controller.extensions.persistence import (
        AsyncWriter,
        EventStore,
        FileStore,
        MemoryStore,
        RecoveryReport,
        rebuild_run,
        replay_file,
        replay_session,
    )

# Imported on first use: a run's pipeline or text rendering does not load the persistence layer (issue 15).
__getattr__, __dir__ = lazy_exports(__name__, {"asm_controller.extensions.persistence": (
    "AsyncWriter", "EventStore", "FileStore", "MemoryStore", "RecoveryReport", "rebuild_run", "replay_file",
    "replay_session",
)})

__all__ = [
    "AsyncWriter",
    "EventStore",
    "FileStore",
    "MemoryStore",
    "RecoveryReport",
    "rebuild_run",
    "replay_file",
    "replay_session",
]
