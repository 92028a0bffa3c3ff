"""Durations on the command line: ``90`` (seconds), ``500ms``, ``30s``, ``2m``, ``1h``, ``1h30m``."""

from __future__ import annotations

import re

from asm_wire import ConfigError

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def parse_duration_ms(text: str, flag: str) -> int:
    """``text`` in milliseconds; a malformed one is a ConfigError naming ``flag`` (exit 2)."""
    raw = text.strip().lower()
    try:
        if re.fullmatch(r"\d+(?:\.\d+)?", raw):
            return round(float(raw) * 1000)
        pos, total = 0, 0.0
        for m in _PART.finditer(raw):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNIT_MS[m.group(2)]
            pos = m.end()
        if pos == len(raw) and pos:
            return round(total)
    except (ValueError, OverflowError):
        pass
    raise ConfigError(f"{flag} expects a duration such as 90, 30s, 500ms, 2m or 1h30m, not {text[:40]!r}")


def bounded_duration_ms(text: str, flag: str, low_ms: int, high_ms: int) -> int:
    """:func:`parse_duration_ms` within ``low_ms .. high_ms`` (ConfigError, config_invalid, otherwise)."""
    ms = parse_duration_ms(text, flag)
    if not low_ms <= ms <= high_ms:
        raise ConfigError(f"{flag} {text[:40]} is out of range: from {format_ms(low_ms)} to {format_ms(high_ms)}",
                          reason="invalid_deadline")
    return ms


def format_ms(ms: int) -> str:
    """``1s``, ``24h``, ``1500ms``: a bound as the flag takes it."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
