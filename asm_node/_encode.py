"""A run's plain output lines as serialized Events, made directly (no ``pb.Event`` per line).

A line of a command's stdout is one ``assistant_delta`` event, and a 2M-line run is 2M of them: built
as messages (one ``pb.Event``, seven stamped fields, ``SerializeToString``) they were most of the
node's CPU per event. Every field but the id, the seq and the text is the same for a read's lines,
so they are written once and the rest is concatenated. The bytes are exactly what upb serializes for
the same message (fields in number order, proto3 defaults left out): tests/test_node_encode.py
compares them over random runs, seqs, stamps and texts.
"""

from __future__ import annotations

from asm_wire import KIND_VALUES

_DELTA_KIND = KIND_VALUES["assistant_delta"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(field: int, value: str) -> bytes:
    """A string field (proto3: an empty one is not written)."""
    if not value:
        return b""
    data = value.encode("utf-8")
    return _varint(field << 3 | 2) + _varint(len(data)) + data


#: Length prefixes for the short lengths (most ids, deltas and lines), looked up instead of encoded.
_LEN = [_varint(n) for n in range(0x4000)]


def delta_events(run_id: str, session_id: str, provider: str, provider_session_id: str, first_seq: int,
                 timestamp_ns: int, texts: list[str]) -> list[bytes]:
    """``assistant_delta`` events with ``content`` = each text, seqs ``first_seq`` on, one stamp."""
    # Fields 2-5 (run_id, session_id, provider, kind), then 7-8 (provider_session_id, timestamp).
    middle = _string(2, run_id) + _string(3, session_id) + _string(4, provider) + b"\x28" + _varint(_DELTA_KIND)
    after_seq = _string(7, provider_session_id) + (b"\x40" + _varint(timestamp_ns) if timestamp_ns else b"")
    lens, varint, prefix = _LEN, _varint, f"{run_id}:"
    out: list[bytes] = []
    append = out.append
    seq = first_seq
    for text in texts:
        ident = (prefix + str(seq)).encode("utf-8")
        content = text.encode("utf-8")
        n = len(content)
        delta = (b"\x0a" + lens[n] if n < 0x4000 else b"\x0a" + varint(n)) + content if n else b""
        d = len(delta)
        li = len(ident)
        append(b"\x0a" + (lens[li] if li < 0x4000 else varint(li)) + ident + middle
               + b"\x30" + (lens[seq] if seq < 0x4000 else varint(seq)) + after_seq
               + b"\xaa\x01" + (lens[d] if d < 0x4000 else varint(d)) + delta)
        seq += 1
    return out
