"""A run between two workspace snapshots: snapshot before, run, snapshot after, diff.

Snapshots are taken on the node that owns the workspace, so the run is pinned
to the first reachable node of its targets (no failover to another node's
copy of the workspace). The outcome lands in ``result.metadata["snapshots"]``
(``backend``, ``before``, ``after``, ``diff``) and in a :class:`SnapshotRun`.

    run = await session.run_with_snapshot("fix the tests", backend="git")  # or run_with_snapshot(session, ...)
    print(run.result.ok, run.diff.added)

:func:`stream_with_snapshot` is the streaming form (``asm run --snapshot``
renders the events as they come).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asm_controller._connector import NodeHandle
from asm_controller._events import Event
from asm_controller._reducer import Result
from asm_wire import AsmError, ConfigError, NodeConnectionError, pb

if TYPE_CHECKING:  # Session delegates here (Session.run_with_snapshot): no import back at run time
    from asm_controller._session import RunStream, Session

__all__ = ["SNAPSHOT_BACKENDS", "SnapshotRun", "SnapshotStream", "run_with_snapshot", "stream_with_snapshot"]

#: ``auto``: git when the workspace is a repository, else hashes.
SNAPSHOT_BACKENDS = ("auto", "git", "hash")
#: The diff lists paths only: no patch text is asked for.
_NO_PATCH = 1


@dataclass(frozen=True)
class SnapshotRun:
    """A finished run with the workspace snapshots around it and their diff."""

    result: Result
    backend: str
    before: pb.SnapshotInfo
    after: pb.SnapshotInfo
    diff: pb.DiffResponse

    def to_dict(self) -> dict[str, Any]:
        """The ``result.metadata["snapshots"]`` form."""
        return {
            "backend": self.backend, "before": self.before.id, "after": self.after.id,
            "diff": {"added": list(self.diff.added), "modified": list(self.diff.modified),
                     "deleted": list(self.diff.deleted)},
        }


class SnapshotStream:
    """A run's event stream; its end takes the after snapshot and the diff (see :func:`stream_with_snapshot`)."""

    def __init__(self, stream: RunStream, handle: NodeHandle, cwd: str, before: pb.SnapshotInfo) -> None:
        self.stream = stream
        self.before = before
        #: Set once the stream has ended and the after snapshot and diff are taken.
        self.snapshots: SnapshotRun | None = None
        self._handle = handle
        self._cwd = cwd

    @property
    def run_id(self) -> str:
        return self.stream.run_id

    @property
    def result(self) -> Result | None:
        """The Result; once the stream has ended, the one carrying ``metadata["snapshots"]``."""
        return self.snapshots.result if self.snapshots is not None else self.stream.result

    def __aiter__(self) -> SnapshotStream:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.stream.__anext__()
        except StopAsyncIteration:
            if self.snapshots is None:
                await self._finish()
            raise

    async def _finish(self) -> None:
        result = self.stream.result
        assert result is not None  # the stream has ended
        api = self._handle.api
        after = await api.snapshot(pb.SnapshotRequest(cwd=self._cwd, backend=self.before.backend, label="after"))
        diff = await api.diff(pb.DiffRequest(cwd=self._cwd, from_id=self.before.id, to_id=after.id,
                                             max_patch_bytes=_NO_PATCH))
        self.snapshots = SnapshotRun(result, self.before.backend, self.before, after, diff)
        result.metadata["snapshots"] = self.snapshots.to_dict()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def stream_with_snapshot(session: Session, prompt: str, *, backend: str = "auto",
                               **overrides: Any) -> SnapshotStream:
    """Pin the run to the first reachable node, snapshot its workspace, and return the run's stream.

    Iterating the stream to its end takes the after snapshot and the diff.
    ``overrides`` are :meth:`Session.stream`'s (``cwd``, ``run_id``, ...);
    ``node`` may name the candidates (default: the session's). Raises the last
    connection error when no node can be reached, before anything runs.
    """
    if backend not in SNAPSHOT_BACKENDS:
        raise ConfigError(f"unknown snapshot backend {backend!r}: expected one of {', '.join(SNAPSHOT_BACKENDS)}")
    opts = session.defaults.merged(overrides)
    last_err: AsmError = ConfigError("no node to snapshot on")
    handle: NodeHandle | None = None
    for target in opts.nodes:
        try:
            handle = await session.pool.handle(target)
            break
        except NodeConnectionError as err:
            last_err = err
    if handle is None:
        raise last_err
    before = await handle.api.snapshot(pb.SnapshotRequest(cwd=opts.cwd, backend=backend, label="before"))
    stream = session.stream(prompt, **{**overrides, "node": handle.target})
    return SnapshotStream(stream, handle, opts.cwd, before)


async def run_with_snapshot(session: Session, prompt: str, *, backend: str = "auto", **overrides: Any) -> SnapshotRun:
    """Run ``prompt`` between two snapshots of its workspace: the Result, the snapshots and their diff."""
    stream = await stream_with_snapshot(session, prompt, backend=backend, **overrides)
    try:
        async for _ in stream:
            pass
    finally:
        await stream.aclose()  # a no-op for an ended run; interrupts one whose caller was cancelled
    assert stream.snapshots is not None
    return stream.snapshots
