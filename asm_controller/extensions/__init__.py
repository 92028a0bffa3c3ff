"""asm_controller.extensions: optional building blocks on top of the controller runtime."""

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
