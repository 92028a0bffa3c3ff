"""The direct event encoder (asm_controller._jsonl) gives exactly the JSON the MessageToDict path gave.

The reference below is Event.to_dict as it was before issue 15 (``MessageToDict`` and its rewriting),
kept here verbatim: every event kind, with every payload field drawn from the values its type allows
(empty and non-ASCII strings, JSON-string fields that parse and that do not, 64-bit integers, -0.0,
NaN and infinities, bytes, unknown enum values, repeated blocks), must give the same dict and,
through ``--output jsonl``, the same line, character for character.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asm_controller import Event
from asm_controller._jsonl import event_line, payload_dict, timestamp_iso
from asm_wire import KIND_NAMES, KIND_VALUES, SEVERITY_NAMES, pb

# -- the reference: Event.to_dict before issue 15 -----------------------------------------------------------

_JSON_FIELDS = {"input_json": "input", "content_json": "content", "details_json": "details", "output_json": "output"}


def _reference_payload(msg: Any) -> dict[str, Any]:
    out: dict[str, Any] = MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for key, new in _JSON_FIELDS.items():
        if key in out:
            raw = out.pop(key)
            try:
                out[new] = json.loads(raw) if raw else None
            except ValueError:
                out[new] = raw
    if "data" in out and isinstance(msg, (pb.AssistantDelta, pb.Raw)):
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
    for key in ("index", "pid", "exit_code", "signal", "duration_ms", "input_tokens", "output_tokens", "total_tokens"):
        if key in out and isinstance(out[key], str):
            out[key] = int(out[key])
    return out


def _reference_dict(m: pb.Event) -> dict[str, Any]:
    field = m.WhichOneof("payload")
    return {
        "id": m.id, "kind": KIND_NAMES[m.kind], "seq": m.seq, "run_id": m.run_id, "session_id": m.session_id,
        "provider": m.provider, "provider_session_id": m.provider_session_id or None,
        "timestamp": datetime.fromtimestamp(m.timestamp_unix_nano / 1e9, tz=UTC).isoformat(),
        "metadata": dict(m.metadata), "payload": _reference_payload(getattr(m, field)) if field else {},
    }


def _outcome(make: Any) -> tuple[str, Any]:
    """What ``make()`` gives, or the type of what it raises (both paths must fail alike)."""
    try:
        return "ok", make()
    except Exception as exc:
        return "raised", type(exc)


# -- drawing events -----------------------------------------------------------------------------------------

PAYLOADS = [f.name for f in pb.Event.DESCRIPTOR.oneofs_by_name["payload"].fields]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["json", "type", "text", "k"]),
                                                                  inner, max_size=3),
    max_leaves=8,
)
_json_text = st.one_of(st.just(""), _json_values.map(json.dumps), st.text(max_size=12),
                       st.just('[{"type": "text", "json": "{\\"a\\": 1}"}, {"json": "nope"}]'))
_text = st.text(max_size=16) | st.sampled_from(["", "text", "héllo ✓ \x00\n\t\"\\", "\U0001f600"])
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _value(draw: Any, f: FieldDescriptor) -> Any:
    if f.type == FieldDescriptor.TYPE_STRING:
        return draw(_json_text if f.name.endswith("json") else _text)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return draw(st.binary(max_size=12))
    if f.type == FieldDescriptor.TYPE_BOOL:
        return draw(st.booleans())
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return draw(st.floats(width=64 if f.type == FieldDescriptor.TYPE_DOUBLE else 32)
                    | st.sampled_from([0.0, -0.0, 1.0, 0.1, float("inf"), float("-inf"), float("nan")]))
    if f.type == FieldDescriptor.TYPE_ENUM:
        return draw(st.sampled_from([v.number for v in f.enum_type.values]) | st.integers(-3, 12))
    lo, hi = _INT_RANGES[f.type]
    return draw(st.sampled_from([0, lo, hi, 1, -1 if lo < 0 else 2]) | st.integers(lo, hi))


def _fill(draw: Any, msg: Any) -> None:
    for f in msg.DESCRIPTOR.fields:
        if draw(st.booleans()):
            continue  # left at its default: which fields are set decides MessageToDict's key order
        if f.message_type is not None:
            for _ in range(draw(st.integers(0, 3)) if f.is_repeated else 1):
                _fill(draw, getattr(msg, f.name).add() if f.is_repeated else getattr(msg, f.name))
        elif f.is_repeated:
            getattr(msg, f.name).extend(_value(draw, f) for _ in range(draw(st.integers(0, 3))))
        else:
            setattr(msg, f.name, _value(draw, f))


@st.composite
def events(draw: Any, payload: str | None = None) -> pb.Event:
    field = payload if payload is not None else draw(st.sampled_from([*PAYLOADS, None]))
    m = pb.Event(
        id=draw(_text), run_id=draw(_text), session_id=draw(_text), provider=draw(_text),
        kind=KIND_VALUES[field] if field and draw(st.integers(0, 5)) else draw(st.integers(-2, len(KIND_NAMES) + 2)),
        seq=draw(st.sampled_from([0, 1, 2**64 - 1]) | st.integers(0, 2**64 - 1)),
        provider_session_id=draw(_text),
        timestamp_unix_nano=draw(st.sampled_from([0, time.time_ns(), 1_500_000_000_999_999_500, -1, -999])
                                 | st.integers(-2**63, 2**63 - 1)),
    )
    m.metadata.update(draw(st.dictionaries(_text, _text, max_size=3)))
    if field is not None:
        getattr(m, field).SetInParent()  # present even when every field stays at its default
        _fill(draw, getattr(m, field))
    return m


# -- the properties -----------------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("payload", PAYLOADS)
@_SETTINGS
@given(data=st.data())
def test_every_kind_gives_the_same_dict_and_line_as_message_to_dict(payload: str, data: Any) -> None:
    m = data.draw(events(payload))
    expected = _outcome(lambda: _reference_dict(m))
    assert _outcome(lambda: Event(m).to_dict()) == expected
    assert _outcome(lambda: payload_dict(getattr(m, payload))) == _outcome(
        lambda: _reference_payload(getattr(m, payload)))
    line = _outcome(lambda: event_line(m))
    assert line == (_outcome(lambda: json.dumps(expected[1])) if expected[0] == "ok" else expected)


@_SETTINGS
@given(m=events())
def test_any_event_envelope_gives_the_same_line(m: pb.Event) -> None:
    expected = _outcome(lambda: json.dumps(_reference_dict(m)))
    assert _outcome(lambda: event_line(m)) == expected


@_SETTINGS
@given(ns=st.integers(-2**63, 2**63 - 1) | st.sampled_from([0, 999, 1000, 500, 1_700_000_000_000_000_500,
                                                          1_700_000_000_999_999_999, -1, -500, -1000]))
def test_the_timestamp_is_fromtimestamp_isoformat(ns: int) -> None:
    assert timestamp_iso(ns) == datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat()


EDGES = [
    ("cost_update", pb.CostUpdate(cost_usd=-0.0)),  # -0.0 is "set" (not all zero bits): listed first
    ("cost_update", pb.CostUpdate(cost_usd=float("nan"), total_tokens=2**63 - 1)),
    ("cost_update", pb.CostUpdate(cost_usd=float("-inf"), input_tokens=-(2**63))),
    ("error", pb.Error(severity=7, exit_code=-1)),  # an unknown severity: "error"
    ("error", pb.Error(severity=-1)),  # SEVERITY_NAMES[-1], as before
    ("assistant_delta", pb.AssistantDelta(index=3)),
    ("assistant_delta", pb.AssistantDelta(format="text")),
    ("assistant_delta", pb.AssistantDelta(data=b"\xff\xfe")),
    ("raw", pb.Raw(content="x")),
    ("tool_result", pb.ToolResult(content_json='[{"json": "{\\"a\\": [1]}"}, {"json": "bad"}, {"json": ""}]')),
    ("tool_result", pb.ToolResult(content_json='[{"json": 1}]')),  # TypeError in both
    ("assistant_message", pb.AssistantMessage(content=[pb.ContentBlock(json='{"x": 1}'), pb.ContentBlock(text="t")])),
    ("tool_use", pb.ToolUse(input_json="not json")),
]


@pytest.mark.parametrize(("field", "payload"), EDGES)
def test_edge_payloads_give_the_same_line(field: str, payload: Any) -> None:
    m = pb.Event(id="r:1", run_id="r", kind=KIND_VALUES[field], seq=1, timestamp_unix_nano=1)
    getattr(m, field).CopyFrom(payload)
    getattr(m, field).SetInParent()
    assert _outcome(lambda: payload_dict(getattr(m, field))) == _outcome(lambda: _reference_payload(getattr(m, field)))
    assert _outcome(lambda: event_line(m)) == _outcome(lambda: json.dumps(_reference_dict(m)))


def test_the_bulk_kinds_are_encoded_without_message_to_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    """assistant_delta/raw/stderr, the kinds of a command's output, never reach the generic path."""
    import asm_controller._jsonl as jsonl

    def refuse(msg: Any) -> dict[str, Any]:
        raise AssertionError(f"generic path for {type(msg).__name__}")

    monkeypatch.setattr(jsonl, "payload_dict", refuse)
    for field, value in (("assistant_delta", pb.AssistantDelta(content="hi\n", format="text", data=b"\xff")),
                         ("raw", pb.Raw(stream="stdout", content="x")), ("stderr", pb.Stderr(content="e"))):
        m = pb.Event(id="r:1", run_id="r", kind=KIND_VALUES[field], seq=1, timestamp_unix_nano=time.time_ns())
        getattr(m, field).CopyFrom(value)
        assert event_line(m) == json.dumps(_reference_dict(m))


def test_print_event_jsonl_writes_the_encoder_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from asm_cli.commands._common import print_event

    m = pb.Event(id="r:3", run_id="r", kind=KIND_VALUES["stderr"], seq=3, timestamp_unix_nano=time.time_ns())
    m.stderr.content = "warn ✓"
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    print_event(Event(m), "jsonl")
    assert out.getvalue() == json.dumps(_reference_dict(m)) + "\n"


class _CountingOut(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.flushed = ""

    def flush(self) -> None:
        self.flushes += 1
        self.flushed = self.getvalue()


async def test_jsonl_lines_are_flushed_once_per_burst_and_as_soon_as_the_loop_waits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from asm_cli.commands._common import print_event

    out = _CountingOut()
    monkeypatch.setattr("sys.stdout", out)
    m = pb.Event(id="r:1", run_id="r", kind=KIND_VALUES["stderr"], seq=1, timestamp_unix_nano=1)
    for _ in range(1000):  # one burst: no await in between
        print_event(Event(m), "jsonl")
    assert out.flushes == 0
    await asyncio.sleep(0)  # the loop runs its callbacks: the burst goes out
    assert out.flushes == 1 and out.flushed.count("\n") == 1000
    print_event(Event(m), "jsonl")
    await asyncio.sleep(0)
    assert out.flushes == 2 and out.flushed.count("\n") == 1001


def test_jsonl_lines_without_an_event_loop_are_flushed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from asm_cli.commands._common import print_event

    out = _CountingOut()
    monkeypatch.setattr("sys.stdout", out)
    print_event(Event(pb.Event(id="r:1", kind=KIND_VALUES["stderr"], seq=1)), "jsonl")
    assert out.flushes == 1


async def test_a_reader_gone_during_a_burst_is_raised_by_the_next_print(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from asm_cli.commands._common import print_event

    class Gone(_CountingOut):
        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Gone())
    ev = Event(pb.Event(id="r:1", kind=KIND_VALUES["stderr"], seq=1))
    print_event(ev, "jsonl")
    await asyncio.sleep(0)
    with pytest.raises(BrokenPipeError):
        print_event(ev, "jsonl")


def test_a_stdout_replaced_and_closed_since_is_not_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    """(As pytest's capture does between tests: the next print goes to the new stdout, no error.)"""
    from asm_cli.commands._common import flush_lines, print_event

    ev = Event(pb.Event(id="r:1", kind=KIND_VALUES["stderr"], seq=1))
    first = io.StringIO()
    monkeypatch.setattr("sys.stdout", first)
    print_event(ev, "jsonl")
    flush_lines()
    first.close()
    second = io.StringIO()
    monkeypatch.setattr("sys.stdout", second)
    print_event(ev, "jsonl")
    assert second.getvalue().count("\n") == 1
