"""History queries of the controller's registry: page tokens, filter checks, records on the wire.

A page token is opaque to clients: the urlsafe base64 of a small JSON object naming what it pages
(``runs`` or ``sessions``) and the keyset cursor, the (time, id) of the last row of the previous
page. The store answers rows strictly older than the cursor, newest first, so a page never repeats
or skips a row however many runs start meanwhile. Anything else (not base64, not that JSON, the
other listing's token, an overlong one) is ``config_invalid`` with reason ``invalid_page_token``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

from asm_wire import ConfigError, RunStatus, pb, run_status_value, valid_id

#: A token longer than this is not one of ours (ids are <= 128 characters).
MAX_PAGE_TOKEN_CHARS = 1024
_VERSION = 1


def encode_page_token(kind: str, at: float, key: str) -> str:
    """The token that continues a listing of ``kind`` after the row (``at``, ``key``)."""
    raw = json.dumps({"v": _VERSION, "k": kind, "at": at, "id": key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(kind: str, token: str) -> tuple[float, str] | None:
    """The keyset cursor of a token from a ``kind`` listing (None for an empty token)."""
    if not token:
        return None
    bad = ConfigError(f"page_token {token[:40]!r}{'...' if len(token) > 40 else ''} is not a page token of this "
                      f"{kind} listing (pass the next_page_token of the previous page unchanged)",
                      reason="invalid_page_token")
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise bad
    try:
        obj = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(obj, dict) or obj.get("v") != _VERSION or obj.get("k") != kind:
        raise bad
    at, key = obj.get("at"), obj.get("id")
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) or at < 0 \
            or not isinstance(key, str) or not key or len(key) > 128 or "\x00" in key:
        raise bad
    return float(at), key


def check_filter(name: str, value: str, limit: int, *, an_id: bool = False) -> str | None:
    """A text filter of a listing: None when empty; config_invalid when no record could ever match it
    (a NUL, too long, an id outside the id alphabet) -- refused before it reaches the database."""
    if not value:
        return None
    if "\x00" in value or len(value) > limit or (an_id and not valid_id(value)):
        raise ConfigError(f"{name} filter {value[:80]!r} is not valid: at most {limit} characters"
                          f"{' of [A-Za-z0-9._:-]' if an_id else ', no NUL'}", reason="invalid_filter")
    return value


def time_range(since_ns: int, until_ns: int) -> tuple[float | None, float | None]:
    """since/until in unix nanoseconds -> store seconds (0: open); a negative one is config_invalid."""
    if since_ns < 0 or until_ns < 0:
        raise ConfigError("since_unix_nano / until_unix_nano must not be negative", reason="invalid_filter")
    return (since_ns / 1e9 if since_ns else None), (until_ns / 1e9 if until_ns else None)


def status_value(name: str) -> pb.RunStatus.ValueType:
    """A registry status on the wire: its ``pending`` is the wire's ``starting``; others share their names."""
    try:
        return run_status_value(RunStatus.STARTING if name == "pending" else name)
    except ValueError:
        return pb.RUN_STATUS_UNSPECIFIED


def session_info(rec: Any) -> pb.SessionInfo:
    """A store SessionRecord as the wire's SessionInfo."""
    return pb.SessionInfo(
        session_id=rec.session_id, provider=rec.provider, owner=rec.owner, runs=rec.runs,
        last_run_id=rec.last_run_id, last_status=status_value(rec.last_status),
        first_unix_nano=int(rec.first_at * 1e9), last_unix_nano=int(rec.last_at * 1e9),
        provider_session_id=rec.provider_session_id, node=rec.node)
