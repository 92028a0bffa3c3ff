"""``EventReducer.apply_batch`` and ``TextFold.deltas`` give what one event (one delta) at a time gives.

Random event sequences of every kind (tests/test_jsonl_encoder's drawing) mixed with output deltas
(empty, newline-led, not UTF-8), with duplicate, stale and skipped seqs, applied in random chunks:
the same fresh events, the same Result (text, messages, status, cost, error, ...), the same reducer
state (last seq, worked, finished, bookkeeping, pending approvals).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asm_controller._events import Event
from asm_controller._reducer import EventReducer, TextFold
from asm_wire import KIND_VALUES, pb
from tests.test_jsonl_encoder import events

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_PIECES = st.sampled_from(["", "\n", "\n\n", "a", "a\n", "\nb", "x" * 40, "\u00e9\u2713"]) | st.text("\nab", max_size=4) \
    | st.text(max_size=6)
_SEQ = st.integers(0, 12)


@st.composite
def _delta(draw: Any) -> pb.Event:
    m = pb.Event(id="r:1", run_id="r", kind=pb.EVENT_KIND_ASSISTANT_DELTA, seq=draw(_SEQ),
                 timestamp_unix_nano=draw(st.sampled_from([0, 1, 5_000_000, 10**18])),
                 provider_session_id=draw(st.sampled_from(["", "", "p1", "p2"])))
    m.assistant_delta.content = draw(_PIECES)
    if draw(st.integers(0, 6)) == 0:
        m.assistant_delta.data = draw(st.sampled_from([b"\xff\xfe", b"ok", b""]))
    return m


@st.composite
def _other(draw: Any) -> pb.Event:
    """An event of another kind, now and then one the reducer acts on (messages, tool calls, ends)."""
    kind = draw(st.sampled_from(["assistant_message", "tool_use", "tool_result", "run_started", "cost_update",
                                 "approval_requested", "approval_resolved", "result", "error", "run_completed",
                                 "random"]))
    if kind == "random":
        m = draw(events())
    else:
        m = pb.Event(id="r:1", run_id="r", kind=KIND_VALUES[kind], timestamp_unix_nano=draw(st.integers(0, 10**9)))
        getattr(m, kind).SetInParent()
        if kind == "assistant_message":
            m.assistant_message.content.add(type="text", text=draw(_PIECES))
        elif kind == "cost_update":
            m.cost_update.input_tokens = draw(st.integers(0, 10))
        elif kind in ("approval_requested", "approval_resolved"):
            getattr(m, kind).approval_id = draw(st.sampled_from(["a1", "a2"]))
        elif kind == "error":
            m.error.code, m.error.severity = "boom", draw(st.sampled_from([0, 1, 2, 3, 4]))
        elif kind == "result":
            m.result.output_json = '{"exit_code": 3}'
    m.seq = draw(_SEQ)
    return m


def _state(r: EventReducer) -> tuple[Any, ...]:
    res = r.result()
    return (res.to_summary(), [e.pb.SerializeToString() for e in res.messages], r.last_seq, r.worked, r.finished,
            [e.pb.SerializeToString() for e in r.bookkeeping], sorted(r.pending_approvals), res.duration_ms,
            repr(res.error), [repr(w) for w in res.warnings])


def _serialized(evs: list[Event]) -> list[bytes]:
    return [e.pb.SerializeToString() for e in evs]


@_SETTINGS
@given(msgs=st.lists(_delta() | _other(), max_size=30), cuts=st.lists(st.integers(0, 30), max_size=4))
def test_a_batch_reduces_to_the_result_of_one_event_at_a_time(msgs: list[pb.Event], cuts: list[int]) -> None:
    one = EventReducer("r", "s", "shell", {"k": "v"})
    fresh_one = [ev for ev in map(Event, msgs) if one.apply(ev)]
    batched = EventReducer("r", "s", "shell", {"k": "v"})
    fresh_batched: list[Event] = []
    bounds = [0, *sorted(c for c in cuts if c <= len(msgs)), len(msgs)]
    for lo, hi in itertools.pairwise(bounds):  # in chunks, as batches arrive
        fresh_batched.extend(batched.apply_batch(msgs[lo:hi]))
    assert _serialized(fresh_batched) == _serialized(fresh_one)
    assert _state(batched) == _state(one)


@_SETTINGS
@given(steps=st.lists(st.tuples(st.sampled_from(["deltas", "message", "seal"]), st.lists(_PIECES, max_size=5)),
                      max_size=8))
@example(steps=[("message", ["a"]), ("deltas", ["\n", "\nb"])])  # only a paragraph's first piece is trimmed
@example(steps=[("deltas", ["a\n"]), ("seal", []), ("deltas", ["\n", "\n", "c"])])
def test_deltas_at_once_give_what_the_deltas_one_by_one_give(steps: list[tuple[str, list[str]]]) -> None:
    one, batched = TextFold(), TextFold()
    for what, pieces in steps:
        if what == "deltas":
            pieces = [p for p in pieces if p]
            printed = [one.delta(p) for p in pieces]
            sep, text = batched.deltas(pieces)
            assert sep == (printed[0][0] if printed else "")
            assert sep + text == "".join(s + t for s, t in printed)
        elif what == "message":
            assert batched.message("".join(pieces)) == one.message("".join(pieces))
        else:
            one.seal()
            batched.seal()
        assert batched.text == one.text


@_SETTINGS
@given(msgs=st.lists(_delta() | _other(), max_size=30),
       stop=st.sets(st.sampled_from(sorted(set(KIND_VALUES.values()) - {KIND_VALUES["assistant_delta"]})), max_size=3))
def test_apply_until_is_one_at_a_time_up_to_the_first_new_event_of_those_kinds(msgs: list[pb.Event],
                                                                               stop: set[int]) -> None:
    one = EventReducer("r", "s", "shell", {"k": "v"})
    fresh_one: list[Event] = []
    stopped_one = False
    for m in msgs:
        if m.seq > one.last_seq and m.kind in stop:
            stopped_one = True
            break
        ev = Event(m)
        if one.apply(ev):
            fresh_one.append(ev)
    until = EventReducer("r", "s", "shell", {"k": "v"})
    fresh, stopped = until.apply_until(msgs, stop)
    assert stopped == stopped_one
    assert _serialized(fresh) == _serialized(fresh_one)
    assert _state(until) == _state(one)


def test_apply_until_refuses_to_stop_at_output_lines() -> None:
    with pytest.raises(ValueError):
        EventReducer("r", "s", "shell", {}).apply_until([], {KIND_VALUES["assistant_delta"]})
