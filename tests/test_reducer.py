"""EventReducer: text without doubling, terminal rules, cost, approvals, duplicates."""

from __future__ import annotations

import json

from asm_controller import Event, EventReducer
from asm_wire import KIND_VALUES, pb


def ev(seq: int, kind: str, ts_ms: int = 0, **payload: object) -> Event:
    msg = pb.Event(run_id="r", session_id="s", provider="p", seq=seq, kind=KIND_VALUES[kind],
                   timestamp_unix_nano=ts_ms * 1_000_000)
    if payload or kind not in ("run_completed",):
        getattr(msg, kind).CopyFrom(getattr(pb, "".join(p.title() for p in kind.split("_")))(**payload))
    return Event(msg)


def text_block(text: str) -> pb.ContentBlock:
    return pb.ContentBlock(type="text", text=text)


def reduce(events: list[Event]) -> EventReducer:
    r = EventReducer("r", "s", "p")
    for e in events:
        r.apply(e)
    return r


def test_deltas_then_full_message_do_not_double_the_text() -> None:
    r = reduce([
        ev(1, "run_started"),
        ev(2, "assistant_delta", content="Hel"),
        ev(3, "assistant_delta", content="lo"),
        ev(4, "assistant_message", content=[text_block("Hello")]),
        ev(5, "assistant_delta", content="World"),
        ev(6, "assistant_message", content=[text_block("World")]),
        ev(7, "result", status="completed", stop_reason="end_turn"),
        ev(8, "run_completed", status="completed"),
    ])
    res = r.result()
    # Two messages, each streamed then sent whole: two paragraphs, neither doubled (issue 14).
    assert res.text == "Hello\n\nWorld"
    assert res.stop_reason == "end_turn" and res.ok


def test_deltas_unrelated_to_the_message_are_kept() -> None:
    r = reduce([
        ev(1, "assistant_delta", content="thinking aloud. "),
        ev(2, "assistant_message", content=[text_block("Answer")]),
        ev(3, "run_completed", status="completed"),
    ])
    assert r.result().text == "thinking aloud. \n\nAnswer"


def test_warning_error_is_not_terminal_but_error_is() -> None:
    r = reduce([
        ev(1, "error", message="line dropped", code="buffer_overflow", severity=pb.SEVERITY_WARNING),
        ev(2, "assistant_delta", content="still here"),
    ])
    assert r.status == "pending" and r.result().error is None
    assert [w.kind for w in r.result().warnings] == ["buffer_overflow"]
    r.apply(ev(3, "error", message="boom", code="rate_limit", domain="provider"))
    res = r.result()
    assert res.status == "failed" and res.error is not None
    assert (res.error.kind, res.error.domain, res.error.message) == ("rate_limit", "provider", "boom")


def test_unknown_error_code_normalizes_to_unknown() -> None:
    res = reduce([ev(1, "error", message="?", code="Weird-Code")]).result()
    assert res.error is not None and res.error.kind == "unknown"


def test_cost_accumulates_and_duplicates_are_ignored() -> None:
    r = reduce([
        ev(1, "cost_update", 1000, input_tokens=2, output_tokens=3, cost_usd=0.5),
        ev(2, "cost_update", 1500, input_tokens=1, output_tokens=1, cost_usd=0.25),
        ev(2, "cost_update", 1500, input_tokens=1, output_tokens=1, cost_usd=0.25),
        ev(1, "assistant_delta", content="stale"),
        ev(3, "run_completed", 4000, status="completed"),
    ])
    res = r.result()
    assert (res.cost.input_tokens, res.cost.output_tokens, res.cost.cost_usd) == (3, 4, 0.75)
    assert res.text == "" and res.events == 3
    assert res.duration_ms == 3000


def test_approvals_tracked_until_resolved() -> None:
    r = reduce([
        ev(1, "approval_requested", approval_id="a1", subject="Bash", details_json=json.dumps({"cmd": "ls"})),
        ev(2, "approval_requested", approval_id="a2", subject="Edit"),
        ev(3, "approval_resolved", approval_id="a1", decision="allow"),
    ])
    assert list(r.pending_approvals) == ["a2"]
    assert r.pending_approvals["a2"].payload["subject"] == "Edit"


def test_provider_session_id_from_first_event_that_has_it() -> None:
    e2 = ev(2, "assistant_delta", content="x")
    e2.pb.provider_session_id = "sess-1"
    e3 = ev(3, "assistant_delta", content="y")
    e3.pb.provider_session_id = "sess-2"
    assert reduce([ev(1, "run_started"), e2, e3]).result().provider_session_id == "sess-1"


def test_event_to_dict_decodes_json_payload_fields() -> None:
    e = ev(1, "tool_use", tool_name="Bash", tool_call_id="t1", input_json=json.dumps({"command": "ls", "n": 3}))
    d = e.to_dict()
    assert d["kind"] == "tool_use" and d["seq"] == 1
    assert d["payload"] == {"tool_name": "Bash", "tool_call_id": "t1", "input": {"command": "ls", "n": 3}}


def test_separate_assistant_messages_are_paragraphs() -> None:
    # Claude Code sends each text block as its own assistant event: they were glued ("command.The tool").
    r = reduce([
        ev(1, "run_started"),
        ev(2, "assistant_message", content=[text_block("I will run the command.")]),
        ev(3, "tool_use", tool_name="Bash", tool_call_id="t1", input_json="{}"),
        ev(4, "tool_result", tool_call_id="t1", content_json='"hi"'),
        ev(5, "assistant_message", content=[text_block("The tool ran.\n")]),
        ev(6, "assistant_message", content=[text_block("\nDone.")]),
    ])
    assert r.result().text == "I will run the command.\n\nThe tool ran.\n\nDone."  # while running
    r.apply(ev(7, "run_completed", status="completed"))
    assert r.result().text == "I will run the command.\n\nThe tool ran.\n\nDone."


def test_streamed_text_a_tool_call_ends_is_its_own_paragraph() -> None:
    # Gemini streams deltas only: the text before a tool call and the text after it are two messages.
    r = reduce([
        ev(1, "assistant_delta", content="Running "),
        ev(2, "assistant_delta", content="it."),
        ev(3, "tool_use", tool_name="run_shell_command", tool_call_id="t1", input_json="{}"),
        ev(4, "assistant_delta", content="It ran."),
        ev(5, "run_completed", status="completed"),
    ])
    assert r.result().text == "Running it.\n\nIt ran."


def test_the_message_of_text_a_tool_call_closed_replaces_it() -> None:
    r = reduce([
        ev(1, "assistant_delta", content="Look"),
        ev(2, "tool_use", tool_name="Bash", tool_call_id="t1", input_json="{}"),
        ev(3, "assistant_message", content=[text_block("Look")]),
        ev(4, "assistant_message", content=[text_block("Next")]),
        ev(5, "run_completed", status="completed"),
    ])
    assert r.result().text == "Look\n\nNext"


def test_denials_come_from_the_result_output() -> None:
    out = {"denials": [{"tool": "Bash", "input": {"command": "touch x"}, "reason": "blocked"}, "junk"]}
    r = reduce([
        ev(1, "result", status="completed", stop_reason="end_turn", output_json=json.dumps(out)),
        ev(2, "run_completed", status="completed"),
    ])
    res = r.result()
    assert res.ok
    assert res.denials == [{"tool": "Bash", "input": {"command": "touch x"}, "reason": "blocked"}]
    assert res.to_summary()["denials"] == res.denials
    assert reduce([ev(1, "run_completed", status="completed")]).result().denials == []
