"""ULIDs (26 Crockford base32 chars: 48-bit ms time + 80 random bits), as ASM uses for ids."""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Ids cross the wire and end up in logs and file names: keep them to a safe charset.
# Always matched with fullmatch: ``$`` would also accept a trailing newline.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def ulid() -> str:
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def valid_id(value: str) -> bool:
    """True for ids asm accepts from callers: 1-128 chars of ``[A-Za-z0-9._:-]``."""
    return _ID_RE.fullmatch(value) is not None
