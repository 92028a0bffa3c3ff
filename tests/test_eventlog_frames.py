"""The event log's frames (``EventBatch.events`` entries) for every event length around the one-byte
length boundary: ``frame`` and the frames ``EventLog.append`` makes inline are the protobuf encoding."""

from __future__ import annotations

from asm_node.eventlog import EventLog, frame


def _reference(data: bytes) -> bytes:
    """Field 1, wire type 2: the tag, the length as a varint, the bytes."""
    out, n = bytearray(b"\x0a"), len(data)
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out) + data
        out.append((n & 0x7F) | 0x80)
        n >>= 7


async def test_appended_frames_are_the_protobuf_encoding_of_every_length() -> None:
    datas = [bytes([i % 251]) * n for i, n in enumerate([*range(300), 16_383, 16_384, 70_000])]
    for data in datas:
        assert frame(data) == _reference(data)
    log = EventLog("r", max_events=10_000, max_bytes=1 << 30, backlog_max_bytes=1 << 30)
    log.append(datas)
    log.close()
    sent = b"".join([b async for b in log.follow(0)])
    assert sent == b"".join(_reference(d) for d in datas)
    assert log.held_bytes == len(sent)
