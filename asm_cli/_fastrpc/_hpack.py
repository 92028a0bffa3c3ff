"""HPACK (RFC 7541) for the CLI's small gRPC client: a complete decoder, a minimal encoder.

The decoder takes everything a server may send: indexed fields from the static and the dynamic
table, literals with and without indexing (or never indexed), dynamic table size updates and
Huffman-coded strings (grpc C-core's server uses them all). The encoder sends literals without
indexing and without Huffman coding, which every decoder must accept, so it needs no table.
"""

from __future__ import annotations

from collections import deque

STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""), ("cache-control", ""),
    ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
    ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""), ("date", ""),
    ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""), ("if-match", ""),
    ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""), ("if-unmodified-since", ""),
    ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""), ("proxy-authenticate", ""),
    ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""),
    ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
    ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
)

#: The code length of each of the 257 symbols of RFC 7541 Appendix B (256 is EOS), as chr(48 + length).
#: The code is canonical (codes assigned in order of length, then symbol), so the lengths define it.
_LENGTHS = ("=GLLLLLLLHNLLNLLLLLLLLNLLLLLLLLL6::<=68;::8;8666555666666678?6<:=67777777777777777777777878=C=>6?56565666"
            "577666567655677777?;>=LDFDDFFFGFGGGGGHGHHFGHGGGGEFGFGGHFEDFFGGEGFFHEFGGEEFEGFGGDFFFGFFGJJDCFGFIJJJKKJH"
            "ICEJKKJKHEEJJLKKKDHDEFEEGFFIIHHJGJKJJKKKKKLKKKKKJN")
_EOS = 256


class HpackError(Exception):
    """The peer's header block is not valid HPACK (a connection error: COMPRESSION_ERROR)."""


def _huffman_codes() -> dict[tuple[int, int], int]:
    """(length, code) -> symbol of the canonical code the lengths define."""
    lengths = [ord(c) - 48 for c in _LENGTHS]
    out: dict[tuple[int, int], int] = {}
    code, prev = -1, 0
    for sym in sorted(range(257), key=lambda s: (lengths[s], s)):
        code = (code + 1) << (lengths[sym] - prev) if code >= 0 else 0
        prev = lengths[sym]
        out[(prev, code)] = sym
    return out


_CODES: dict[tuple[int, int], int] | None = None


def huffman_decode(data: bytes) -> bytes:
    """A Huffman-coded string: its padding must be the EOS prefix (all ones), shorter than a byte."""
    global _CODES
    if _CODES is None:
        _CODES = _huffman_codes()
    codes = _CODES
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            sym = codes.get((length, code))
            if sym is not None:
                if sym == _EOS:
                    raise HpackError("EOS in a Huffman-coded string")
                out.append(sym)
                code = length = 0
            elif length > 30:
                raise HpackError("invalid Huffman code")
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def encode_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer with an N-bit prefix; ``first`` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    if pos >= len(data):
        raise HpackError("truncated integer")
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("truncated integer")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 35:
            raise HpackError("integer too large")


def _string(data: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(data):
        raise HpackError("truncated string")
    huffman = data[pos] & 0x80
    length, pos = _integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HpackError("truncated string")
    raw = data[pos:end]
    return (huffman_decode(raw) if huffman else raw).decode("latin-1"), end


class Decoder:
    """One connection's HPACK decoder (its dynamic table lives as long as the connection)."""

    def __init__(self, max_table_size: int = 4096) -> None:
        #: The most the table may hold: what we advertise (SETTINGS_HEADER_TABLE_SIZE, default 4096).
        self.max_allowed = max_table_size
        self.max_size = max_table_size
        self.size = 0
        self.table: deque[tuple[str, str]] = deque()  # newest first (dynamic index 62 is table[0])

    def _field(self, index: int) -> tuple[str, str]:
        if index <= 0:
            raise HpackError("index 0")
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        i = index - len(STATIC_TABLE) - 1
        if i >= len(self.table):
            raise HpackError(f"index {index} beyond the dynamic table")
        return self.table[i]

    def _evict(self) -> None:
        while self.size > self.max_size:
            name, value = self.table.pop()
            self.size -= 32 + len(name) + len(value)

    def _add(self, name: str, value: str) -> None:
        size = 32 + len(name) + len(value)
        if size > self.max_size:  # larger than the table: it empties it (RFC 7541 4.4)
            self.table.clear()
            self.size = 0
            return
        self.table.appendleft((name, value))
        self.size += size
        self._evict()

    def decode(self, data: bytes, max_list_size: int = 1 << 20) -> list[tuple[str, str]]:
        """The header list of one complete header block; one larger than ``max_list_size`` (RFC 7540's
        measure: name + value + 32 a field) is refused, since indexed fields let a small block expand."""
        out: list[tuple[str, str]] = []
        pos, n = 0, len(data)
        fields_seen = False
        listed = 0
        while pos < n:
            if listed > max_list_size:
                raise HpackError(f"a header list above the {max_list_size} bytes allowed")
            byte = data[pos]
            if byte & 0x80:  # indexed field
                index, pos = _integer(data, pos, 7)
                field = self._field(index)
                out.append(field)
                listed += 32 + len(field[0]) + len(field[1])
                fields_seen = True
            elif byte & 0xE0 == 0x20:  # dynamic table size update: only at the block's start
                if fields_seen:
                    raise HpackError("table size update after a field")
                size, pos = _integer(data, pos, 5)
                if size > self.max_allowed:
                    raise HpackError(f"table size {size} above the allowed {self.max_allowed}")
                self.max_size = size
                self._evict()
            else:
                indexing = byte & 0xC0 == 0x40
                index, pos = _integer(data, pos, 6 if indexing else 4)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = _string(data, pos)
                value, pos = _string(data, pos)
                if indexing:
                    self._add(name, value)
                out.append((name, value))
                listed += 32 + len(name) + len(value)
                fields_seen = True
        if listed > max_list_size:
            raise HpackError(f"a header list above the {max_list_size} bytes allowed")
        return out


def _literal(text: str) -> bytes:
    raw = text.encode("latin-1")
    return encode_integer(len(raw), 7) + raw


def encode(headers: list[tuple[str, str]]) -> bytes:
    """A header block of literals without indexing (0000 prefix, a new name), no Huffman coding."""
    return b"".join(b"\x00" + _literal(name) + _literal(value) for name, value in headers)
