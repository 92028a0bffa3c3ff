"""``Rendering.feed_all``: a batch rendered with the terminal sink's flushes held gives the output of
feeding its events one by one -- each stream's bytes, and what a reader of both streams on one pipe
(``2>&1``) sees, in order -- with one flush a batch instead of one an event."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asm_controller._events import Event
from asm_controller.extensions.rendering import CompactRenderer, Rendering, TTYSink, VerboseRenderer
from asm_wire import pb
from tests.test_reducer_batch import _delta, _other


class _Pipe:
    """Two text streams on one pipe: what is flushed reaches the pipe, in flush order."""

    def __init__(self) -> None:
        self.pipe: list[str] = []
        self.flushes = 0


class _Stream:
    def __init__(self, pipe: _Pipe, name: str) -> None:
        self.pipe, self.name = pipe, name
        self.pending: list[str] = []
        self.written: list[str] = []

    def write(self, s: str) -> int:
        self.pending.append(s)
        self.written.append(s)
        return len(s)

    def flush(self) -> None:
        self.pipe.flushes += 1
        if self.pending:
            self.pipe.pipe.append(f"{self.name}:{''.join(self.pending)}")
            self.pending.clear()

    def isatty(self) -> bool:
        return False


def _render(msgs: list[pb.Event], cuts: list[int] | None, verbose: bool) -> tuple[Any, ...]:
    pipe = _Pipe()
    out, err = _Stream(pipe, "out"), _Stream(pipe, "err")
    rendering = Rendering(VerboseRenderer() if verbose else CompactRenderer(), [TTYSink(out, meta_stream=err)])  # type: ignore[arg-type]
    evs = [Event(m) for m in msgs]
    if cuts is None:
        for ev in evs:
            rendering.feed(ev)
    else:
        bounds = [0, *sorted(c for c in cuts if c <= len(evs)), len(evs)]
        for lo, hi in itertools.pairwise(bounds):
            rendering.feed_all(evs[lo:hi])
    flushes = pipe.flushes
    rendering.finish(None)
    merged: list[list[str]] = []  # what the reader sees: stdout's text, then stderr's, ... (chunks joined)
    for chunk in pipe.pipe:
        name, _, text = chunk.partition(":")
        if merged and merged[-1][0] == name:
            merged[-1][1] += text
        else:
            merged.append([name, text])
    return "".join(out.written), "".join(err.written), merged, flushes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(_delta() | _other(), max_size=25), cuts=st.lists(st.integers(0, 25), max_size=3),
       verbose=st.booleans())
def test_a_batch_renders_as_its_events_one_by_one(msgs: list[pb.Event], cuts: list[int], verbose: bool) -> None:
    for i, m in enumerate(msgs):
        m.run_id, m.seq = "r", i + 1  # one run, every event new: all of them are rendered
    one = _render(msgs, None, verbose)
    batched = _render(msgs, cuts, verbose)
    assert batched[:3] == one[:3]
    assert batched[3] <= one[3]


def test_a_batch_of_output_lines_is_flushed_once() -> None:
    msgs = []
    for i in range(100):
        m = pb.Event(run_id="r", seq=i + 1, kind=pb.EVENT_KIND_ASSISTANT_DELTA)
        m.assistant_delta.content = f"{i}\n"
        msgs.append(m)
    one, batched = _render(msgs, None, False), _render(msgs, [], False)
    assert batched[:3] == one[:3] and one[0] == "".join(f"{i}\n" for i in range(100))
    assert (one[3], batched[3]) == (100, 1)
