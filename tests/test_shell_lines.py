"""The shell provider's output lines become the same events whether decoded at once or line by line:
text lines as ``content`` (a ``\\r`` kept), any line that is not UTF-8 as its exact bytes in ``data``."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from asm_node.providers.shell import ShellParser
from asm_wire import KIND_VALUES, pb


def _reference(lines: list[bytes]) -> list[bytes]:
    """One event a line, each decoded on its own (the parser before the lines were decoded at once)."""
    out = []
    for line in lines:
        ev = pb.Event(kind=KIND_VALUES["assistant_delta"])
        try:
            ev.assistant_delta.content = line.decode("utf-8") + "\n"
        except UnicodeDecodeError:
            ev.assistant_delta.data = line + b"\n"
        out.append(ev.SerializeToString())
    return out


_LINE = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")) | st.sampled_from(
    [b"", b"\r", b"plain", "caf\u00e9 \u2713".encode(), b"\xff\xfe", b"\xc3", b"\xe2\x9c", "\U0001f600".encode(),
     b"\xed\xa0\x80", b"a\x00b"])


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, max_size=12))
def test_lines_decoded_at_once_give_the_events_of_one_at_a_time(lines: list[bytes]) -> None:
    out: list[pb.Event] = []
    ShellParser([0]).feed_lines(lines, out)
    assert [ev.SerializeToString() for ev in out] == _reference(lines)


def test_no_lines_no_events() -> None:
    out: list[pb.Event] = []
    ShellParser([0]).feed_lines([], out)
    assert out == []


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, max_size=12))
def test_delta_texts_are_the_contents_feed_lines_gives_or_none(lines: list[bytes]) -> None:
    """The run's direct path (delta_texts + asm_node._encode) takes exactly the lines that are all text,
    with the same contents feed_lines makes; any line that is not UTF-8 leaves the batch to feed_lines."""
    texts = ShellParser([0]).delta_texts(lines)
    out: list[pb.Event] = []
    ShellParser([0]).feed_lines(lines, out)
    if any(ev.assistant_delta.data for ev in out):
        assert texts is None
    else:
        assert texts == [ev.assistant_delta.content for ev in out]
