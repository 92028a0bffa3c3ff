"""The batch paths of ``--output jsonl`` give the same bytes as the per-event ones.

``event_lines`` (one string for a batch) against ``event_line`` per event, over random batches: the
bulk shape (a command's output lines: assistant_delta, content only) mixed with every other event,
deltas that leave the fast path (metadata, index, format, data, a kind that is not the payload's),
several runs in one batch, and timestamps that repeat, cross whole seconds and round up into the next.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asm_cli.commands import _common
from asm_controller import Event
from asm_controller._jsonl import event_line, event_lines, timestamp_iso
from asm_wire import pb
from tests.test_jsonl_encoder import events

_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_S = 1_764_626_679 * 10**9  # a whole second
#: Around whole seconds and microsecond rounding: the same second, the next, a carry into the next.
_TIMES = st.sampled_from([_S, _S + 1, _S + 499, _S + 500, _S + 501, _S + 999_999_499, _S + 999_999_500,
                          _S + 999_999_999, _S + 10**9, _S + 10**9 + 4_130_000, 0, -1, -500, 2**63 - 1, -(2**63)]) \
    | st.integers(_S - 2 * 10**9, _S + 2 * 10**9) | st.integers(-(2**63), 2**63 - 1)
_RUNS = st.sampled_from([("01M8ST6WWF7AA3T518R09MR8TV", "01M8ST6WWFZEVVB0WSQ365ZTT1", "shell", ""),
                         ("01M8ST6WWF7AA3T518R09MR8TV", "01M8ST6WWFZEVVB0WSQ365ZTT1", "shell", "psid"),
                         ("r2", "s", "shell", ""), ("r\u00e9", "s\n", "", "")])
_CONTENT = st.sampled_from(["1\n", "hello", "h\u00e9llo \u2713\n", "\x00\"\\\t", "\U0001f600", "x" * 300]) | st.text(
    max_size=12)


@st.composite
def _bulk(draw: Any) -> pb.Event:
    """A command's output line as a node sends it, now and then changed so that it leaves the fast path."""
    run_id, session_id, provider, psid = draw(_RUNS)
    seq = draw(st.integers(0, 2**64 - 1))
    m = pb.Event(id=draw(st.sampled_from([f"{run_id}:{seq}", "", "x\u00e9"])), run_id=run_id, session_id=session_id,
                 provider=provider, provider_session_id=psid, kind=pb.EVENT_KIND_ASSISTANT_DELTA, seq=seq,
                 timestamp_unix_nano=draw(_TIMES))
    m.assistant_delta.content = draw(_CONTENT)
    change = draw(st.sampled_from(["none"] * 6 + ["metadata", "index", "format", "data", "kind", "no payload"]))
    if change == "metadata":
        m.metadata["k"] = "v"
    elif change == "index":
        m.assistant_delta.index = draw(st.integers(-(2**31), 2**31 - 1))
    elif change == "format":
        m.assistant_delta.format = "text"
    elif change == "data":
        m.assistant_delta.data = b"\xff"
    elif change == "kind":
        m.kind = draw(st.sampled_from([pb.EVENT_KIND_RAW, pb.EVENT_KIND_STDERR, 0, 999]))
    elif change == "no payload":
        m.ClearField("assistant_delta")
    return m


@st.composite
def _batches(draw: Any) -> list[pb.Event]:
    msgs = draw(st.lists(_bulk() | events(), max_size=12))
    # Runs of one timestamp, as a node stamps one read's lines.
    if msgs and draw(st.booleans()):
        ns = draw(_TIMES)
        for m in msgs[: draw(st.integers(1, len(msgs)))]:
            m.timestamp_unix_nano = ns
    return [pb.Event.FromString(m.SerializeToString()) for m in msgs]  # as they come off the wire


def _one_by_one(msgs: list[pb.Event]) -> str | type[Exception]:
    try:
        return "".join(event_line(m) + "\n" for m in msgs)
    except Exception as exc:
        return type(exc)


def _batched(msgs: list[pb.Event]) -> str | type[Exception]:
    try:
        return event_lines(msgs)
    except Exception as exc:
        return type(exc)


@_SETTINGS
@given(msgs=_batches())
def test_a_batch_gives_the_lines_of_its_events_one_by_one(msgs: list[pb.Event]) -> None:
    assert _batched(msgs) == _one_by_one(msgs)


@_SETTINGS
@given(times=st.lists(_TIMES, min_size=1, max_size=20))
def test_timestamps_held_across_a_batch_are_those_made_for_each(times: list[int]) -> None:
    msgs = []
    for i, ns in enumerate(sorted(times)):
        m = pb.Event(id=f"r:{i}", run_id="r", kind=pb.EVENT_KIND_ASSISTANT_DELTA, seq=i, timestamp_unix_nano=ns)
        m.assistant_delta.content = "x\n"
        msgs.append(m)
    lines = event_lines(msgs).splitlines()
    for m, line in zip(msgs, lines, strict=True):
        assert f'"timestamp": "{timestamp_iso(m.timestamp_unix_nano)}"' in line


def test_the_bulk_shape_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import asm_controller._jsonl as jsonl

    m = pb.Event(id="r:2", run_id="r", session_id="s", provider="shell", kind=pb.EVENT_KIND_ASSISTANT_DELTA, seq=2,
                 timestamp_unix_nano=_S + 4_130_000)
    m.assistant_delta.content = "1\n"
    expected = event_line(m) + "\n"
    monkeypatch.setattr(jsonl, "event_line", lambda m: pytest.fail("the bulk shape left the fast path"))
    assert jsonl.event_lines([m, m]) == expected * 2


@_SETTINGS
@given(msgs=_batches(), split=st.integers(0, 12))
def test_print_events_writes_the_bytes_print_event_writes(msgs: list[pb.Event], split: int) -> None:
    evs = [Event(m) for m in msgs]
    outs: list[tuple[str, type[Exception] | None]] = []
    for how in ("one by one", "batched"):
        buf = io.StringIO()
        old, sys.stdout = sys.stdout, buf
        raised: type[Exception] | None = None
        try:
            if how == "one by one":
                for ev in evs:
                    _common.print_event(ev, "jsonl")
            else:
                _common.print_events(evs[:split], "jsonl")
                _common.print_events(evs[split:], "jsonl")
        except Exception as exc:  # an event the encoder refuses: the same lines before it, the same error
            raised = type(exc)
        finally:
            _common.flush_lines()
            sys.stdout = old
        outs.append((buf.getvalue(), raised))
    assert outs[0] == outs[1]
