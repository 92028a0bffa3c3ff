"""Rendering: compact/verbose output, no doubled text, colour rules, sinks, error handling, summary lines."""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from asm_controller._events import Event
from asm_controller._reducer import Cost, EventReducer, Result
from asm_controller.extensions.rendering import (
    AnsiStripper,
    CallbackSink,
    CompactRenderer,
    FileSink,
    JSONLSink,
    Rendering,
    Sink,
    Span,
    TTYSink,
    VerboseRenderer,
    plain_text,
    summarize_input,
    summary_line,
)
from asm_wire import KIND_VALUES, RunError, pb


def ev(seq: int, kind: str, ts_ms: int | None = None, run_id: str = "r1", **payload: Any) -> Event:
    msg = pb.Event(id=f"{run_id}:{seq}", run_id=run_id, session_id="s1", provider="claude", seq=seq,
                   kind=KIND_VALUES[kind], timestamp_unix_nano=(seq * 10 if ts_ms is None else ts_ms) * 1_000_000)
    getattr(msg, kind).CopyFrom(getattr(pb, "".join(p.title() for p in kind.split("_")))(**payload))
    return Event(msg)


def text_block(t: str) -> pb.ContentBlock:
    return pb.ContentBlock(type="text", text=t)


def fixture() -> list[Event]:
    """A Claude-like run: streamed text then the full message, thinking, two tools (one failing),
    a denied approval, a guardrail, a warning, stderr, a message without deltas, cost, result, end."""
    return [
        ev(1, "run_started", ts_ms=0, pid=42, cwd="/w", command="claude"),
        ev(2, "assistant_delta", content="Let me "),
        ev(3, "assistant_delta", content="check."),
        ev(4, "assistant_message", content=[text_block("Let me check.")]),
        ev(5, "thinking", content="The user wants a greeting."),
        ev(6, "tool_use", tool_name="Bash", tool_call_id="call_1",
           input_json=json.dumps({"command": "echo hi", "description": "say hi"})),
        ev(7, "tool_result", tool_call_id="call_1", content_json=json.dumps("hi\n")),
        ev(8, "tool_use", tool_name="Read", tool_call_id="call_2", input_json=json.dumps({"file_path": "/w/a.py"})),
        ev(9, "tool_result", tool_call_id="call_2", is_error=True,
           content_json=json.dumps([{"type": "text", "text": "Error: no such file\nline 2\nline 3"}])),
        ev(10, "approval_requested", approval_id="a1", subject="Bash",
           details_json=json.dumps({"command": "rm -rf build"})),
        ev(11, "approval_resolved", approval_id="a1", decision="deny", reason="not allowed"),
        ev(12, "guardrail_triggered", rule="tool_deny", direction="input", action="block",
           message="Tool blocked by policy: Bash", details_json=json.dumps({"tool": "Bash"})),
        ev(13, "error", message="line dropped", code="buffer_overflow", severity=pb.SEVERITY_WARNING,
           domain="transport"),
        ev(14, "stderr", content="debug: loaded config"),
        ev(15, "assistant_message", content=[text_block("Done.")]),
        ev(16, "cost_update", input_tokens=1234, output_tokens=56, total_tokens=1290, cost_usd=0.0123),
        ev(17, "result", status="completed", stop_reason="end_turn"),
        ev(18, "run_completed", ts_ms=1200, status="completed", exit_code=0, duration_ms=1200),
    ]


def reduce(events: Sequence[Event]) -> Result:
    r = EventReducer("r1", "s1", "claude")
    for e in events:
        r.apply(e)
    return r.result()


def render_plain(renderer: CompactRenderer | VerboseRenderer, events: Sequence[Event],
                 result: Result | None = None, *, use_result: bool = True) -> str:
    spans: list[Span] = []
    for e in events:
        spans += renderer.render(e)
    spans += renderer.finish((result or reduce(events)) if use_result else None)
    return plain_text(spans)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


async def aiter_events(events: Sequence[Event]) -> AsyncIterator[Event]:
    for e in events:
        yield e


COMPACT = """\
Let me check.
▸ Bash: echo hi
  ✓ hi
▸ Read: /w/a.py
  ✗ Error: no such file (+2 lines)
⏸ approval requested [a1] ▸ Bash: rm -rf build
✗ denied [a1]: not allowed
⚠ guardrail tool_deny (input) → block: Tool blocked by policy: Bash
⚠ warning (buffer_overflow): line dropped
Done.
✔ completed in 1.2s · 1,234 in / 56 out tokens · $0.0123
"""

VERBOSE = """\
· run r1 · session s1 · claude · pid 42 · cwd /w
Let me check.
✻ The user wants a greeting.
▸ Bash [call_1]: echo hi
    input {"command":"echo hi","description":"say hi"}
  ✓ Bash [call_1] ok
    │ hi
▸ Read [call_2]: /w/a.py
  ✗ Read [call_2] error
    │ Error: no such file
    │ line 2
    │ line 3
⏸ approval requested [a1] ▸ Bash: rm -rf build
✗ denied [a1]: not allowed
⚠ guardrail tool_deny (input) → block: Tool blocked by policy: Bash tool=Bash
⚠ warning (buffer_overflow): line dropped
stderr │ debug: loaded config
Done.
· cost +1,234 in / 56 out tokens · $0.0123
· result: completed (stop: end_turn)
· run completed: completed (exit 0)
✔ completed in 1.2s · 1,234 in / 56 out tokens · $0.0123 · 18 events · 1 warning
"""


def test_compact_golden() -> None:
    assert render_plain(CompactRenderer(), fixture()) == COMPACT


def test_verbose_golden() -> None:
    assert render_plain(VerboseRenderer(), fixture()) == VERBOSE


def test_compact_hides_thinking_stderr_and_lifecycle_verbose_shows_them() -> None:
    compact = render_plain(CompactRenderer(), fixture())
    assert "greeting" not in compact and "debug: loaded" not in compact and "run r1" not in compact
    verbose = render_plain(VerboseRenderer(), fixture())
    assert "✻ The user wants a greeting." in verbose and "stderr │ debug: loaded config" in verbose


def test_thinking_is_dimmed_in_verbose() -> None:
    out = io.StringIO()
    sink = TTYSink(out, color=True)
    r = VerboseRenderer()
    sink.write(r.render(ev(1, "thinking", content="hmm")))
    assert "\x1b[2mhmm\x1b[0m" in out.getvalue()


def test_deltas_then_full_message_are_not_printed_twice_and_match_the_reducer() -> None:
    events = [
        ev(1, "assistant_delta", content="Hel"),
        ev(2, "assistant_delta", content="lo"),
        ev(3, "assistant_message", content=[text_block("Hello")]),
        ev(4, "assistant_delta", content=" world"),
        ev(5, "assistant_message", content=[text_block(" world, and more")]),  # the rest was not streamed
        ev(6, "assistant_message", content=[text_block("!")]),  # no deltas: printed whole
        ev(7, "run_completed", status="completed"),
    ]
    res = reduce(events)
    out = render_plain(CompactRenderer(), events, res)
    # Three messages, three paragraphs (issue 14: they were glued together).
    assert res.text == "Hello\n\n world, and more\n\n!"
    assert out.startswith(res.text + "\n")
    assert out.count("Hello") == 1 and out.count("world") == 1


def test_deltas_that_are_not_a_prefix_are_kept_as_the_reducer_keeps_them() -> None:
    events = [
        ev(1, "assistant_delta", content="thinking aloud. "),
        ev(2, "assistant_message", content=[text_block("Answer")]),
        ev(3, "run_completed", status="completed"),
    ]
    res = reduce(events)
    assert render_plain(CompactRenderer(), events, res).startswith(res.text + "\n")
    assert res.text == "thinking aloud. \n\nAnswer"


def test_text_after_a_tool_line_is_not_pushed_down_by_a_blank_line() -> None:
    events = [
        ev(1, "assistant_message", content=[text_block("I will run it.")]),
        ev(2, "tool_use", tool_name="Bash", tool_call_id="t1", input_json='{"command": "echo hi"}'),
        ev(3, "assistant_message", content=[text_block("It ran.")]),
        ev(4, "assistant_message", content=[text_block("Done.")]),
        ev(5, "run_completed", status="completed"),
    ]
    res = reduce(events)
    assert res.text == "I will run it.\n\nIt ran.\n\nDone."
    lines = render_plain(CompactRenderer(), events, res).split("\n")
    assert lines[0] == "I will run it." and "Bash" in lines[1]
    assert lines[2:5] == ["It ran.", "", "Done."]  # the tool line already sets the paragraphs apart


def test_replayed_events_are_not_rendered_again() -> None:
    r = CompactRenderer()
    first = r.render(ev(1, "assistant_delta", content="a")) + r.render(ev(2, "assistant_delta", content="b"))
    again = r.render(ev(2, "assistant_delta", content="b")) + r.render(ev(1, "assistant_delta", content="a"))
    assert plain_text(first) == "ab" and again == []


def test_tool_input_summary_is_one_line_and_truncated() -> None:
    long_cmd = "echo " + "x" * 500 + "\necho two"
    r = CompactRenderer(width=40)
    line = plain_text(r.render(ev(1, "tool_use", tool_name="Bash", tool_call_id="c",
                                  input_json=json.dumps({"command": long_cmd}))))
    assert line.startswith("▸ Bash: echo xxx") and line.endswith("…\n") and line.count("\n") == 1
    assert len(line) <= len("▸ Bash: ") + 40 + 1
    assert summarize_input({"pattern": "foo", "path": "src"}) == "src"
    assert summarize_input({"a": 1, "b": "two"}) == "a=1, b=two"
    assert summarize_input({"command": ["git", "status"]}) == "git status"
    # agent-provided escape sequences never reach our own lines
    esc = plain_text(r.render(ev(2, "tool_use", tool_name="Bash", tool_call_id="d",
                                 input_json=json.dumps({"command": "\x1b[31mred\x1b[0m"}))))
    assert "\x1b" not in esc and "red" in esc


def test_tool_result_first_line_and_empty_output() -> None:
    r = CompactRenderer(width=20)
    many = plain_text(r.render(ev(1, "tool_result", tool_call_id="c",
                                  content_json=json.dumps({"stdout": "\n\n" + "y" * 100 + "\nsecond\n"}))))
    assert many == "  ✓ " + "y" * 19 + "… (+1 lines)\n"
    empty = plain_text(r.render(ev(2, "tool_result", tool_call_id="d", content_json=json.dumps(None))))
    assert empty == "  ✓ (no output)\n"


def test_approval_allowed_and_guardrail_warn() -> None:
    r = CompactRenderer()
    out = plain_text(r.render(ev(1, "approval_resolved", approval_id="a2", decision="allow")))
    assert out == "✓ approved [a2]\n"
    g = plain_text(r.render(ev(2, "guardrail_triggered", rule="max_output_tokens", direction="output",
                               action="warn", message="over budget")))
    assert g == "⚠ guardrail max_output_tokens (output) → warn: over budget\n"


def test_tty_sink_colours_a_terminal_only() -> None:
    tty, pipe = FakeTTY(), io.StringIO()
    rendering = Rendering(CompactRenderer(), [TTYSink(tty), TTYSink(pipe)])
    for e in fixture():
        rendering.feed(e)
    rendering.finish(reduce(fixture()))
    assert "\x1b[0;34m▸ \x1b[0m" in tty.getvalue() and "\x1b[0;32m✔ completed\x1b[0m" in tty.getvalue()
    assert "\x1b" not in pipe.getvalue() and pipe.getvalue() == COMPACT


def test_no_color_env_disables_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    tty = FakeTTY()
    rendering = Rendering(CompactRenderer(), [TTYSink(tty)])
    for e in fixture():
        rendering.feed(e)
    rendering.finish(reduce(fixture()))
    assert "\x1b" not in tty.getvalue() and tty.getvalue() == COMPACT


def test_tty_sink_can_split_text_from_the_rest() -> None:
    out, err = io.StringIO(), io.StringIO()
    rendering = Rendering(CompactRenderer(), [TTYSink(out, meta_stream=err)])
    for e in fixture():
        rendering.feed(e)
    rendering.finish(reduce(fixture()))
    assert out.getvalue() == "Let me check.\nDone.\n"  # only the answer (and the newlines that end its lines)
    assert err.getvalue().startswith("▸ Bash: echo hi\n") and err.getvalue().endswith("$0.0123\n")


def test_file_sink_appends_plain_text_and_strips_agent_escapes(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "run.log"
    path.parent.mkdir()
    path.write_text("earlier\n")
    events = [
        *fixture()[:17],
        ev(19, "assistant_delta", content="\x1b[0;32mgre"),
        ev(20, "assistant_delta", content="en\x1b["),  # a sequence split across two writes
        ev(21, "assistant_delta", content="0m text\r\n"),
        ev(22, "run_completed", status="completed"),
    ]
    rendering = Rendering(CompactRenderer(), [FileSink(path), TTYSink(FakeTTY())])
    for e in events:
        rendering.feed(e)
    rendering.finish(reduce(events))
    data = path.read_bytes().decode()
    assert data.startswith("earlier\nLet me check.\n▸ Bash: echo hi\n")
    assert "\x1b" not in data and "green text\r\n" in data and "✔ completed" in data


def test_ansi_stripper_handles_split_sequences_osc_and_lone_cr() -> None:
    s = AnsiStripper()
    parts = ["\x1b[1;3", "1mbold\x1b[0m", " a\rb ", "\x1b]8;;https://x\x1b\\link\x1b]8;;\x1b\\", " end\r", "\n", "\x1b"]
    assert "".join(s.feed(p) for p in parts) + s.end() == "bold ab link end\r\n"


def test_jsonl_sink_writes_one_parseable_object_per_event(tmp_path: Path) -> None:
    stream = io.StringIO()
    path = tmp_path / "events.jsonl"
    rendering = Rendering(CompactRenderer(), [JSONLSink(stream), JSONLSink(path, summary=False)])
    events = fixture()
    for e in events:
        rendering.feed(e)
    rendering.finish(reduce(events))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [x["kind"] for x in lines] == [e.kind for e in events] + ["result_summary"]
    assert lines[0] == events[0].to_dict()
    assert lines[1]["payload"]["content"] == "Let me " and lines[-1]["status"] == "completed"
    from_file = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(from_file) == len(events) and from_file[-1]["kind"] == "run_completed"
    assert not stream.closed  # a stream it was given is not closed


def test_callback_sink_gets_event_and_plain_text() -> None:
    got: list[tuple[str, str]] = []
    rendering = Rendering(CompactRenderer(), [CallbackSink(lambda e, t: got.append((e.kind, t)))])
    for e in fixture()[:7]:
        rendering.feed(e)
    rendering.finish(None)
    assert ("tool_use", "\n▸ Bash: echo hi\n") in got and ("thinking", "") in got and len(got) == 7


class Recorder(Sink):
    def __init__(self, name: str, log: list[str], fail_on: int | None = None, fail_close: bool = False) -> None:
        self.name, self.log, self.fail_on, self.fail_close = name, log, fail_on, fail_close
        self.events: list[int] = []
        self.calls = 0
        self.finished = False

    def write_event(self, event: Event, spans: Sequence[Span]) -> None:
        self.calls += 1
        if self.fail_on is not None and self.calls >= self.fail_on:
            raise RuntimeError(f"{self.name} broke")
        self.events.append(event.seq)

    def write(self, spans: Sequence[Span]) -> None:
        self.finished = True

    def flush(self) -> None:
        self.log.append(f"flush {self.name}")

    def close(self) -> None:
        self.log.append(f"close {self.name}")
        if self.fail_close:
            raise OSError(f"{self.name} close failed")

    def __repr__(self) -> str:
        return f"Recorder({self.name})"


async def test_failing_sink_does_not_stop_the_others_and_is_raised_after_all_closed() -> None:
    log: list[str] = []
    a, bad, c = Recorder("a", log), Recorder("bad", log, fail_on=2, fail_close=True), Recorder("c", log)
    rendering = Rendering(CompactRenderer(), [a, bad, c])
    events = fixture()
    with pytest.raises(RuntimeError, match="bad broke") as info:
        await rendering.render(aiter_events(events))
    n = len(events)
    assert a.events == c.events == list(range(1, n + 1)) and a.finished and c.finished
    assert bad.events == [1] and bad.calls == 2 and not bad.finished  # skipped after its failure
    assert log == ["flush a", "flush bad", "flush c", "close c", "close bad", "close a"]
    assert any("Recorder(bad)" in note for note in info.value.__notes__)
    assert [type(e).__name__ for _, e in rendering.errors] == ["RuntimeError", "OSError"]


async def test_a_failing_renderer_is_recorded_and_the_sinks_still_get_the_events() -> None:
    class Broken(CompactRenderer):
        def render(self, event: Event) -> list[Span]:
            raise ValueError("renderer bug")

    log: list[str] = []
    a = Recorder("a", log)
    rendering = Rendering(Broken(), [a])
    with pytest.raises(ValueError, match="renderer bug"):
        await rendering.render(aiter_events(fixture()[:3]))
    assert a.events == [1, 2, 3] and log == ["flush a", "close a"]


async def test_stream_error_still_closes_sinks_and_propagates() -> None:
    async def broken() -> AsyncIterator[Event]:
        yield ev(1, "assistant_delta", content="x")
        raise ConnectionError("stream broke")

    log: list[str] = []
    rendering = Rendering(CompactRenderer(), [Recorder("a", log)])
    with pytest.raises(ConnectionError):
        await rendering.render(broken())
    assert log == ["flush a", "close a"] and rendering.closed


async def test_render_uses_the_stream_result_when_it_has_one() -> None:
    events = fixture()

    class FakeStream:
        def __init__(self) -> None:
            self.result: Result | None = None

        def __aiter__(self) -> AsyncIterator[Event]:
            return self._gen()

        async def _gen(self) -> AsyncIterator[Event]:
            for e in events:
                yield e
            res = reduce(events)
            res.metadata["node_id"] = "node-a"
            self.result = res

    out = io.StringIO()
    await Rendering(VerboseRenderer(), [TTYSink(out)]).render(FakeStream())
    assert out.getvalue().splitlines()[-1] == (
        "✔ completed on node-a in 1.2s · 1,234 in / 56 out tokens · $0.0123 · 18 events · 1 warning")


def test_summary_line_ok_failed_interrupted() -> None:
    ok = Result("r", "s", "p", "completed", cost=Cost(1234, 56, 0.0123), duration_ms=1234)
    assert summary_line(ok) == "✔ completed in 1.2s · 1,234 in / 56 out tokens · $0.0123"
    failed = Result("r", "s", "p", "failed", error=RunError("invalid api key", kind="auth_error", domain="provider"))
    assert summary_line(failed) == "✖ failed (auth_error): invalid api key"
    failed_late = Result("r", "s", "p", "failed", duration_ms=800, cost=Cost(10, 0, 0.0),
                         error=RunError("exit 1", kind="tool_failed", domain="tool"))
    assert summary_line(failed_late) == "✖ failed (tool_failed) after 800ms · 10 in / 0 out tokens: exit 1"
    interrupted = Result("r", "s", "p", "interrupted", duration_ms=125_000,
                         error=RunError("cancelled by user", kind="user_cancelled", domain="runtime"))
    assert summary_line(interrupted) == "■ interrupted after 2m05s"


def test_summary_line_says_how_many_tool_calls_were_denied() -> None:
    # A run whose tool calls were all refused completes, but must not look like a plain success.
    denied = Result("r", "s", "claude", "completed", duration_ms=2000,
                    denials=[{"tool": "Bash", "input": {"command": "touch x"}, "reason": "blocked"}])
    assert summary_line(denied) == "⚠ completed in 2.0s · 1 tool call denied"
    two = Result("r", "s", "claude", "completed", denials=[{"tool": "Bash", "input": {}, "reason": ""}] * 2)
    assert summary_line(two) == "⚠ completed · 2 tool calls denied"
    failed = Result("r", "s", "claude", "failed", denials=two.denials,
                    error=RunError("boom", kind="tool_failed", domain="tool"))
    assert summary_line(failed) == "✖ failed (tool_failed) · 2 tool calls denied: boom"


def test_summary_without_a_result_uses_the_renderers_tally() -> None:
    events = [
        ev(1, "run_started", ts_ms=0),
        ev(2, "cost_update", input_tokens=5, output_tokens=7, cost_usd=0.5),
        ev(3, "error", message="bad key", code="auth_error", domain="provider", severity=pb.SEVERITY_ERROR),
        ev(4, "run_completed", ts_ms=450, status="failed", exit_code=1),
    ]
    out = render_plain(CompactRenderer(), events, use_result=False)
    assert out == "✖ failed (auth_error) after 450ms · 5 in / 7 out tokens · $0.5000: bad key\n"
    verbose = render_plain(VerboseRenderer(), events, use_result=False)
    assert "✖ error [provider/auth_error]: bad key\n" in verbose


def test_the_tally_counts_permission_denied_warnings() -> None:
    events = [
        ev(1, "run_started", ts_ms=0),
        ev(2, "error", message="Bash(touch x) was blocked", code="permission_denied", domain="provider",
           severity=pb.SEVERITY_WARNING),
        ev(3, "run_completed", ts_ms=300, status="completed", exit_code=0),
    ]
    out = render_plain(CompactRenderer(), events, use_result=False)
    assert out.splitlines()[-1] == "⚠ completed in 300ms · 1 tool call denied"


def test_per_delta_work_is_small() -> None:
    events = [ev(i, "assistant_delta", content=f"tok{i} ") for i in range(1, 50_001)]
    rendering = Rendering(CompactRenderer(), [TTYSink(io.StringIO()), CallbackSink(lambda e, t: None)])
    t0 = time.perf_counter()
    for e in events:
        rendering.feed(e)
    rendering.finish(None)
    assert time.perf_counter() - t0 < 5.0
