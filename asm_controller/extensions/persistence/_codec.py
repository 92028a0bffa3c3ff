"""The on-disk line format, version 1: encode, decode (raising :class:`~asm_wire.DecodeError`) and sniff."""

from __future__ import annotations

import base64
import binascii
import json
import os
import zlib
from typing import Final

from google.protobuf.message import DecodeError as ProtoDecodeError

from asm_wire import DecodeError, kind_name, pb

__all__ = ["FORMAT_VERSION", "CorruptLine", "decode_line", "encode_line", "sniff_store"]

FORMAT_VERSION: Final = 1


class CorruptLine(DecodeError):
    """A store line that is not a readable record (torn, damaged, or not ours); ``message`` says why.

    A :class:`~asm_wire.DecodeError` (kind ``parse_error``, reason ``corrupt_line``: the error
    table's row), so callers can ``except DecodeError``; it crosses gRPC as a DecodeError.
    """


def encode_line(m: pb.Event) -> bytes:
    """One event as a version-1 line (with its newline)."""
    raw = m.SerializeToString(deterministic=True)
    kind = kind_name(m.kind)
    rec = {"v": FORMAT_VERSION, "session_id": m.session_id, "run_id": m.run_id, "id": m.id, "seq": m.seq,
           "kind": kind, "ts": m.timestamp_unix_nano, "crc": zlib.crc32(raw), "pb": base64.b64encode(raw).decode()}
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> pb.Event | int:
    """The event of a line (without its newline), or the format version of a newer line; raises CorruptLine."""
    if not line.strip():
        raise CorruptLine("empty line")
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise CorruptLine("invalid JSON (torn or damaged line)") from None
    if not isinstance(rec, dict):
        raise CorruptLine("not a JSON object")
    v = rec.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CorruptLine(f"missing or invalid format version {v!r}")
    if v > FORMAT_VERSION:
        return v
    data = rec.get("pb")
    if not isinstance(data, str):
        raise CorruptLine("no 'pb' field")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise CorruptLine("invalid base64 in 'pb'") from None
    if rec.get("crc") != zlib.crc32(raw):
        raise CorruptLine("checksum mismatch")
    try:
        msg = pb.Event.FromString(raw)
    except ProtoDecodeError:
        raise CorruptLine("invalid protobuf") from None
    if (rec.get("id"), rec.get("session_id"), rec.get("run_id")) != (msg.id, msg.session_id, msg.run_id):
        raise CorruptLine("header does not match the event")
    return msg


_SNIFF_BYTES: Final = 1 << 20
_SNIFF_LINES: Final = 64
_LINE_PREFIX: Final = b'{"v":'  # every line encode_line writes starts so


def sniff_store(fd: int) -> str | None:
    """None when the open regular file ``fd`` looks like an event store of ours, else why not.

    Ours: one of its first 64 complete lines (within the first MiB) is a store record
    (it decodes, or is a newer format version), or it is a single unfinished line that
    starts like one (a first write torn by a crash). An empty file is ours.
    """
    head = os.pread(fd, _SNIFF_BYTES, 0)
    if not head:
        return None
    lines = head.split(b"\n")
    complete = lines[:-1]
    for line in complete[:_SNIFF_LINES]:
        try:
            decode_line(line)
        except CorruptLine:
            continue
        return None
    if not complete and head.startswith(_LINE_PREFIX):
        return None
    return "its first line is not an event record" if complete else "it does not start with an event record"
