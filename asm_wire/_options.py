"""Parsing a run's ``options_json`` with limits, on the node and on the controller alike.

Options come from any client. ``json.loads`` alone accepts text of any size,
nesting deep enough to raise RecursionError, integers of thousands of digits
(ValueError past Python's 4,300-digit limit, OverflowError once converted to a
float) and ``NaN``/``Infinity``: each became INTERNAL with a traceback. Here
every one of them is a :class:`ConfigError` (config_invalid) naming the limit.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from asm_wire._errors import ConfigError

MAX_OPTIONS_BYTES: Final = 256 * 1024
MAX_OPTIONS_DEPTH: Final = 32
#: Integers must fit a signed 64-bit value (what protobuf and the CLIs' own flags accept).
MAX_OPTIONS_INT: Final = 2**63 - 1
MIN_OPTIONS_INT: Final = -(2**63)
_MAX_INT_DIGITS: Final = len(str(MIN_OPTIONS_INT))


def _int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > _MAX_INT_DIGITS:
        raise ConfigError(f"option value {text[:20]}... ({len(digits)} digits) is out of range: integers must be "
                          f"within [-2**63, 2**63-1]")
    value = int(text)
    if not MIN_OPTIONS_INT <= value <= MAX_OPTIONS_INT:
        raise ConfigError(f"option value {text} is out of range: integers must be within [-2**63, 2**63-1]")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ConfigError(f"option value {text[:40]} is out of range: numbers must be finite")
    return value


def _constant(name: str) -> Any:
    raise ConfigError(f"option value {name} is not allowed: numbers must be finite")


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # "\ud800" is valid JSON but no valid text: it would fail later, when passed to a CLI.
        raise ConfigError("option strings must be valid Unicode (no lone surrogate escapes)") from None


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, checking its strings (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item)
            continue
        if isinstance(item, dict):
            for key in item:
                _check_string(key)
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_options_json(text: str) -> dict[str, Any]:
    """``options_json`` -> a dict; ConfigError for anything that is not a bounded JSON object."""
    if not text:
        return {}
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_OPTIONS_BYTES:
        raise ConfigError(f"options are {size} bytes of JSON: the limit is {MAX_OPTIONS_BYTES} bytes")
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise ConfigError(f"options are nested too deeply: the limit is {MAX_OPTIONS_DEPTH} levels") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"options are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"options must be a JSON object, not {type(value).__name__}")
    depth = _depth(value)
    if depth > MAX_OPTIONS_DEPTH:
        raise ConfigError(f"options are nested {depth} levels deep: the limit is {MAX_OPTIONS_DEPTH} levels")
    return value
