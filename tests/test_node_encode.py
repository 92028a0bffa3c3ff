"""asm_node._encode: a run's output lines as Events' bytes, exactly what upb serializes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from asm_node._encode import delta_events
from asm_wire import KIND_VALUES, pb

_ids = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


def _reference(run_id: str, session_id: str, provider: str, psid: str, first_seq: int, ts: int,
               texts: list[str]) -> list[bytes]:
    out = []
    for i, text in enumerate(texts):
        ev = pb.Event(kind=KIND_VALUES["assistant_delta"])
        ev.assistant_delta.content = text
        seq = first_seq + i
        ev.id, ev.run_id, ev.session_id, ev.provider = f"{run_id}:{seq}", run_id, session_id, provider
        ev.seq, ev.timestamp_unix_nano = seq, ts
        if psid:
            ev.provider_session_id = psid
        out.append(ev.SerializeToString())
    return out


@settings(max_examples=300, deadline=None)
@given(run_id=_ids, session_id=_ids, provider=_ids, psid=_ids,
       first_seq=st.one_of(st.integers(1, 300), st.integers(1, 2**40)),
       ts=st.one_of(st.just(0), st.integers(0, 2**63 - 1)),
       texts=st.lists(st.one_of(st.text(max_size=20), st.text(min_size=120, max_size=300),
                                st.builds(lambda n: "x" * n, st.integers(16_000, 17_000))), max_size=6))
def test_the_bytes_are_upbs(run_id: str, session_id: str, provider: str, psid: str, first_seq: int, ts: int,
                            texts: list[str]) -> None:
    got = delta_events(run_id, session_id, provider, psid, first_seq, ts, texts)
    assert got == _reference(run_id, session_id, provider, psid, first_seq, ts, texts)


def test_seq_boundaries_and_a_parse_back() -> None:
    """Around the 1- and 2-byte varint limits of the seq and the lengths, and parsed back field by field."""
    for first in (126, 127, 128, 16_382, 16_383, 16_384):
        texts = ["a\n", "é" * 63 + "\n", "b" * 127, "c" * 16_383, "d" * 16_384]
        got = delta_events("run-1", "s", "shell", "", first, 1_700_000_000_123_456_789, texts)
        assert got == _reference("run-1", "s", "shell", "", first, 1_700_000_000_123_456_789, texts)
        back = [pb.Event.FromString(b) for b in got]
        assert [e.seq for e in back] == list(range(first, first + len(texts)))
        assert [e.assistant_delta.content for e in back] == texts
        assert {e.kind for e in back} == {KIND_VALUES["assistant_delta"]}
