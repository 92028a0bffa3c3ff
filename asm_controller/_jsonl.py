"""Events as JSON without ``MessageToDict``: the dict :meth:`Event.to_dict` gives and its ``--output jsonl`` line.

``asm run --output jsonl`` printed each event as ``json.dumps(event.to_dict())``, ~10 µs of client CPU
an event, most of it protobuf's generic ``MessageToDict`` walking descriptors (issue 15: 2M lines took
25 s). Here the same JSON is made directly:

* :func:`payload_dict` is ``MessageToDict(msg, preserving_proto_field_name=True,
  always_print_fields_with_no_presence=True)`` plus the rewriting Event.to_dict always did (JSON-string
  fields parsed, ``data`` as ``data_b64``, severity names, int64 counters as ints, content blocks'
  ``json``), from a per-message table compiled once from the descriptor;
* :func:`event_line` is ``json.dumps(Event(msg).to_dict())``, character for character (key order,
  ``ensure_ascii`` escapes, separators), built as a string: the bulk kinds (``assistant_delta``, ``raw``,
  ``stderr``) without any dict, the others through :func:`payload_dict` and ``json.dumps``.

MessageToDict's key order is kept exactly: the fields it lists (proto3 fields with a non-default value)
in field-number order, then the defaults in declaration order; tests/test_jsonl_encoder.py compares
both with the MessageToDict path over every event kind (hypothesis).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _esc  # json.dumps(str), ensure_ascii: the C function
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from asm_wire import KIND_NAMES, SEVERITY_NAMES, pb

__all__ = ["event_line", "event_lines", "payload_dict", "timestamp_iso"]

_JSON_FIELDS = {"input_json": "input", "content_json": "content", "details_json": "details", "output_json": "output"}
#: int64 payload fields MessageToDict renders as strings that Event.to_dict turned back into ints.
_INT_KEYS = ("index", "pid", "exit_code", "signal", "duration_ms", "input_tokens", "output_tokens", "total_tokens")
_INT64 = frozenset({FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64})
_FLOATS = frozenset({FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE})


# -- the payload as MessageToDict gives it ------------------------------------------------------------------


def _is_set(value: Any) -> bool:
    """Whether ListFields lists a proto3 field without presence: a value that is not all zero bits
    (so -0.0 counts as set, as in upb; ``bool(-0.0)`` would not)."""
    if isinstance(value, float):
        return value != 0.0 or math.copysign(1.0, value) < 0
    return bool(value)


def _float_json(value: float) -> Any:
    if math.isinf(value):
        return "-Infinity" if value < 0.0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return value


#: One field of a compiled message: name, its number, a converter of one value, repeated or not.
_Field = tuple[str, int, Callable[[Any], Any], bool]
_COMPILED: dict[str, tuple[list[_Field], list[_Field], bool]] = {}


def _converter(field: FieldDescriptor) -> Callable[[Any], Any]:
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        return _message_dict
    if cpp == FieldDescriptor.CPPTYPE_ENUM and field.enum_type is not None:
        by_number = {v.number: v.name for v in field.enum_type.values}
        if field.enum_type.is_closed:  # proto2 enums: MessageToDict refuses an unknown value
            return by_number.__getitem__
        return lambda v: by_number.get(v, v)
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return lambda v: base64.b64encode(v).decode("utf-8")
        return str
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return bool
    if cpp in _INT64:
        return str  # MessageToDict quotes 64-bit integers
    if cpp in _FLOATS:
        if cpp == FieldDescriptor.CPPTYPE_FLOAT:
            from google.protobuf.internal import type_checkers

            return lambda v: _float_json(v) if math.isinf(v) or math.isnan(v) else type_checkers.ToShortestFloat(v)
        return _float_json
    return int


def _compile(desc: Descriptor) -> tuple[list[_Field], list[_Field], bool]:
    """(fields in number order, fields in declaration order, whether they may need MessageToDict itself)."""
    fields: list[_Field] = []
    unusual = False
    for f in desc.fields:
        if f.has_presence or f.containing_oneof is not None or (f.message_type is not None and f.message_type.
                                                                 GetOptions().map_entry):
            unusual = True  # presence, oneofs and maps: not in asm's payloads; left to protobuf
        if f.message_type is not None and f.message_type.full_name.startswith("google.protobuf."):
            unusual = True  # well-known types have their own JSON forms
        fields.append((f.name, f.number, _converter(f), f.is_repeated))
    return sorted(fields, key=lambda x: x[1]), fields, unusual


def _message_dict(msg: Any) -> dict[str, Any]:
    """``MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)``."""
    desc = msg.DESCRIPTOR
    compiled = _COMPILED.get(desc.full_name)
    if compiled is None:
        compiled = _COMPILED[desc.full_name] = _compile(desc)
    by_number, declared, unusual = compiled
    if unusual:
        from google.protobuf.json_format import MessageToDict

        out: dict[str, Any] = MessageToDict(msg, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
        return out
    out = {}
    unset: set[str] = set()
    for name, _, conv, repeated in by_number:
        value = getattr(msg, name)
        if repeated:
            if value:
                out[name] = [conv(v) for v in value]
            else:
                unset.add(name)
        elif _is_set(value):
            out[name] = conv(value)
        else:
            unset.add(name)
    if unset:
        for name, _, conv, repeated in declared:
            if name in unset:
                out[name] = [] if repeated else conv(getattr(msg, name))  # the default value
    return out


def payload_dict(msg: Any) -> dict[str, Any]:
    """An event payload message as Event.payload gives it (see the module docstring)."""
    out = _message_dict(msg)
    for key, new in _JSON_FIELDS.items():
        if key in out:
            raw = out.pop(key)
            try:
                out[new] = json.loads(raw) if raw else None
            except ValueError:
                out[new] = raw
    if "data" in out and isinstance(msg, (pb.AssistantDelta, pb.Raw)):
        # Output that was not valid UTF-8, kept exactly: base64.
        data = out.pop("data")
        if data:
            out["data_b64"] = data
    if "severity" in out:
        out["severity"] = SEVERITY_NAMES[msg.severity] if msg.severity < len(SEVERITY_NAMES) else "error"
    for block in out.get("content", []) if isinstance(out.get("content"), list) else []:
        if isinstance(block, dict) and block.get("json"):
            try:
                block["block"] = json.loads(block.pop("json"))
            except ValueError:
                pass
    for key in _INT_KEYS:
        if key in out and isinstance(out[key], str):
            out[key] = int(out[key])
    return out


# -- the jsonl line -----------------------------------------------------------------------------------------

_second: list[Any] = [None, ""]  # the last whole second seen and its ISO text: events come in bursts


def timestamp_iso(ns: int) -> str:
    """``datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat()``, the date part cached per second.

    The microseconds are rounded as ``fromtimestamp`` rounds them (half to even, from the float)."""
    frac, whole = math.modf(ns / 1e9)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        us -= 1_000_000
        whole += 1.0
    elif us < 0:
        us += 1_000_000
        whole -= 1.0
    if whole != _second[0]:
        text = datetime.fromtimestamp(whole, tz=UTC).isoformat()
        _second[0], _second[1] = whole, text[:-6]  # without "+00:00"
    return f"{_second[1]}.{us:06d}+00:00" if us else f"{_second[1]}+00:00"


_KINDS: dict[int, str] = {i: _esc(name) for i, name in enumerate(KIND_NAMES)}


def _ordered(parts: list[tuple[bool, str]]) -> str:
    """MessageToDict's order: the set fields first, then the defaults (each list in field order)."""
    return ", ".join([p for s, p in parts if s] + [p for s, p in parts if not s])


def _delta_json(d: Any) -> str:
    content, index, fmt, data = d.content, d.index, d.format, d.data
    if content and not index:  # a command's output line: no list to build
        if fmt:
            body = f'"content": {_esc(content)}, "format": {_esc(fmt)}, "index": 0'
        else:
            body = f'"content": {_esc(content)}, "index": 0, "format": ""'
    else:
        body = _ordered([(bool(content), f'"content": {_esc(content)}'), (bool(index), f'"index": {index}'),
                         (bool(fmt), f'"format": {_esc(fmt)}')])
    if data:
        return f'{{{body}, "data_b64": "{base64.b64encode(data).decode()}"}}'
    return f"{{{body}}}"


def _raw_json(r: Any) -> str:
    stream, content, data = r.stream, r.content, r.data
    body = _ordered([(bool(stream), f'"stream": {_esc(stream)}'), (bool(content), f'"content": {_esc(content)}')])
    if data:
        return f'{{{body}, "data_b64": "{base64.b64encode(data).decode()}"}}'
    return f"{{{body}}}"


def _stderr_json(s: Any) -> str:
    return f'{{"content": {_esc(s.content)}}}'


_FAST: dict[str, Callable[[Any], str]] = {"assistant_delta": _delta_json, "raw": _raw_json, "stderr": _stderr_json}


#: The run's part of the line (run, session, provider ids), the same for every event of a run: escaped once.
_RUN_PARTS: dict[tuple[str, str, str, str], str] = {}


def _run_part(run_id: str, session_id: str, provider: str, psid: str) -> str:
    key = (run_id, session_id, provider, psid)
    part = _RUN_PARTS.get(key)
    if part is None:
        if len(_RUN_PARTS) >= 256:  # a controller-wide printer (many runs) keeps a few
            _RUN_PARTS.clear()
        part = _RUN_PARTS[key] = (f'"run_id": {_esc(run_id)}, "session_id": {_esc(session_id)}, '
                                  f'"provider": {_esc(provider)}, "provider_session_id": '
                                  f'{_esc(psid) if psid else "null"}, ')
    return part


def event_line(msg: pb.Event) -> str:
    """``json.dumps(Event(msg).to_dict())``: one ``--output jsonl`` line (without its newline)."""
    kind = _KINDS.get(msg.kind)
    if kind is None:
        kind = _esc(KIND_NAMES[msg.kind])
    field = msg.WhichOneof("payload")
    if field is None:
        payload = "{}"
    else:
        fast = _FAST.get(field)
        payload = fast(getattr(msg, field)) if fast is not None else json.dumps(payload_dict(getattr(msg, field)))
    metadata = json.dumps(dict(msg.metadata)) if msg.metadata else "{}"
    return (f'{{"id": {_esc(msg.id)}, "kind": {kind}, "seq": {msg.seq}, '
            f'{_run_part(msg.run_id, msg.session_id, msg.provider, msg.provider_session_id)}'
            f'"timestamp": "{timestamp_iso(msg.timestamp_unix_nano)}", "metadata": {metadata}, "payload": {payload}}}')


_DELTA_KIND = pb.EVENT_KIND_ASSISTANT_DELTA


def event_lines(msgs: Iterable[pb.Event]) -> str:
    """``"".join(event_line(m) + "\n" for m in msgs)``: a batch's ``--output jsonl`` lines, one string.

    A command's output lines (``assistant_delta`` events of one run, content only, no metadata) are
    made in this one loop, with the run's part and the timestamp's text held in locals while they stay
    the same (a node stamps the events of one read with one time), instead of four calls an event;
    anything else goes through :func:`event_line`.
    tests/test_jsonl_batch.py checks the two agree over random batches.
    """
    out: list[str] = []
    append = out.append
    esc = _esc
    run_id = session_id = provider = psid = None  # the run of ``part`` (none yet)
    part = ""
    last_ns, ts = None, ""  # a node stamps the events of one read alike: the text is made once for them
    for m in msgs:
        d = m.assistant_delta
        content = d.content  # not empty: assistant_delta is the payload set (an unset one reads as empty)
        if not content or m.kind != _DELTA_KIND or d.index or d.format or d.data or m.metadata:
            append(event_line(m) + "\n")
            continue
        if m.run_id != run_id or m.session_id != session_id or m.provider != provider or (
                m.provider_session_id != psid):  # (compared one by one: no tuple to allocate and collect)
            run_id, session_id, provider, psid = m.run_id, m.session_id, m.provider, m.provider_session_id
            part = _run_part(run_id, session_id, provider, psid)
        ns = m.timestamp_unix_nano
        if ns != last_ns:
            last_ns, ts = ns, timestamp_iso(ns)
        append(f'{{"id": {esc(m.id)}, "kind": "assistant_delta", "seq": {m.seq}, {part}"timestamp": "{ts}", '
               f'"metadata": {{}}, "payload": {{"content": {esc(content)}, "index": 0, "format": ""}}}}\n')
    return "".join(out)
