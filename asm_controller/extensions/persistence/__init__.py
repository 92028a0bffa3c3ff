"""Persistence: an event log per session, an async writer off the run path, and replay.

Stores (:class:`EventStore`): :class:`MemoryStore` and :class:`FileStore`. Both are
idempotent by event id **per session** (ASM keys a *global* id set; two sessions
that happen to reuse an id both keep their event here). An event without an id
is keyed by ``"<run_id>:<seq>"``, the node's own id scheme. ``list_events``
returns events in first-write order; a duplicate is ignored (first write wins).

On-disk format (:class:`FileStore`), version 1: one JSON object per line::

    {"v":1,"session_id":"s","run_id":"r","id":"r:3","seq":3,"kind":"assistant_delta",
     "ts":1700000000123456789,"crc":2868023451,"pb":"<base64 of the serialized pb.Event>"}

* ``pb`` is authoritative: the protobuf's own bytes round-trip exactly (int64 and
  uint64 with no string conversions, enum values, doubles, unknown fields and
  enum values written by a newer node), and encoding is ~3x cheaper than
  ``MessageToDict`` + JSON. ``crc`` (CRC-32 of those bytes) catches a damaged
  line that still parses.
* The other fields are a readable header for ``grep``/``jq`` (filter by session,
  run, kind) and are checked against the decoded event on load.
* ``v`` versions the format. A line with a *newer* ``v`` is preserved and
  reported, never truncated (a newer writer's data); an older writer's line
  without ``v`` is corrupt.

Crash safety:

* Every append writes whole lines (all events of the call) with one
  ``os.write`` on an ``O_APPEND`` descriptor, under an exclusive ``flock`` on
  ``<path>.lock`` held for the store's lifetime: no other process appends in
  between, and a crash can only leave a torn *last* line. A failed write is cut
  back (``ftruncate``) so the file never keeps half a line mid-file.
* ``append()`` returning is the acknowledgement. ``fsync="always"``: the data was
  ``fdatasync``-ed before it returned (survives power loss). ``"batch"``: written
  to the OS (survives a crash of the process) and synced within
  ``fsync_interval`` seconds, and on ``sync()``/``close()``. ``"never"``: the OS
  decides.
* Opening reads the whole file and rebuilds the dedup index. A line counts only
  when it ends with its newline (a write that did not finish was never
  acknowledged). Damage at the tail (a torn final write, garbage appended) is
  cut back to the end of the last good line; a bad line in the middle (invalid
  JSON, bad version, bad base64/checksum/protobuf, header mismatch) is skipped
  and left in the file until ``compact()`` or a ``reset_session`` rewrites it.
  Both are logged and described in :attr:`FileStore.recovered` (and by
  :func:`replay_file` in ``Result.metadata["damage"]``). A store of ours never
  refuses to open because of damage (ASM refused on any bad line).
* Opening for writing never takes over a file that is not ours: a non-empty file
  in which :func:`sniff_store` finds no record, or anything but a regular file
  (directory, FIFO, socket, device), is a ConfigError before the lock file or any
  byte is written. A symlink is followed once: the store is its target.
* File I/O runs on one dedicated thread per store, never on the event loop.
  ``reset_session``/``compact`` rewrite the file (temp file, fsync, atomic rename).

:class:`AsyncWriter` is the pipeline observer (``Session(..., observers=[writer])``)
that takes events off the run path into a bounded queue and appends them in
batches; see its docstring for the overflow policies.

History: :func:`replay_session` (a fold) and :func:`rebuild_run` (the real
:class:`EventReducer`, so the Result equals the live one). For the CLI:
:func:`record_events`, :func:`open_recorder` and :func:`replay_file`.

Layout (one job per module): ``_store`` (the :class:`EventStore` contract, :class:`MemoryStore`),
``_codec`` (the line format: :func:`encode_line`, :func:`decode_line`, :class:`CorruptLine`
(a :class:`~asm_wire.DecodeError`), :func:`sniff_store`), ``_file`` (:class:`FileStore`), ``_writer`` (:class:`AsyncWriter`),
``_replay`` (history and damage reports), ``_recorder`` (the CLI's recording helpers).
"""

from asm_controller.extensions.persistence._codec import (
    FORMAT_VERSION,
    CorruptLine,
    decode_line,
    encode_line,
    sniff_store,
)
from asm_controller.extensions.persistence._file import FSYNC_MODES, FileStore, LineProblem, RecoveryReport
from asm_controller.extensions.persistence._recorder import open_recorder, record_events
from asm_controller.extensions.persistence._replay import (
    rebuild_run,
    replay_file,
    replay_session,
    run_damage,
    store_damage,
)
from asm_controller.extensions.persistence._store import EventStore, MemoryStore
from asm_controller.extensions.persistence._writer import OVERFLOW_POLICIES, AsyncWriter

__all__ = [
    "FORMAT_VERSION", "FSYNC_MODES", "OVERFLOW_POLICIES", "AsyncWriter", "CorruptLine", "EventStore", "FileStore",
    "LineProblem", "MemoryStore", "RecoveryReport", "decode_line", "encode_line", "open_recorder", "rebuild_run",
    "record_events", "replay_file", "replay_session", "run_damage", "sniff_store", "store_damage",
]
