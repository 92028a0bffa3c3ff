"""Rendering: turn a run's events into human-readable text, written to sinks.

The Python form of ASM's ``Extensions.Rendering`` (asm_extensions.md section 4),
working on asm's own events (``Event.pb``) rather than ASM's legacy payload
structs, so every kind renders on live runs (ASM's renderers fell back to
``?kind`` for almost everything: hard part 11).

    rendering = Rendering(CompactRenderer(), [TTYSink(sys.stdout, meta_stream=sys.stderr),
                                              FileSink("run.log"), JSONLSink("run.jsonl")])
    async with session.stream("fix the test") as stream:
        await rendering.render(stream)      # feed every event, then finish(stream.result)

Model
-----
A *renderer* turns one event into a list of **spans**, ``(text, style)`` pairs,
and the final :class:`~asm_controller._reducer.Result` into a summary line.
Styles are names (``"text"``, ``"plain"``, ``"dim"``, ``"red"``, ``"green"``,
``"yellow"``, ``"blue"``, ``"magenta"``, ``"bold"``), not escape codes: a sink
decides whether to colour (:class:`TTYSink` on a terminal without
``NO_COLOR``) or to write plain text (:class:`FileSink`). So colour never has
to be stripped out of our own output again, and no regex runs per delta.

The style ``"text"`` marks the assistant's own text (and the newline that ends
its line). :class:`TTYSink` can send it to one stream (stdout) and everything
else (tool calls, warnings, the summary) to another (stderr), so
``asm run ... > answer.txt`` captures only the answer.

Renderers
---------
:class:`CompactRenderer` — the assistant text as it streams, tool calls
(``▸ Bash: echo hi``), tool results (``  ✓ hi``), approvals, guardrails,
warnings and the summary line. :class:`VerboseRenderer` adds the run's
lifecycle, thinking (dimmed), stderr, cost updates, terminal errors, ids and
fuller tool inputs/outputs.

Assistant text is never printed twice: a provider that streams deltas and then
sends the whole message gets only the part of the message that was not
streamed yet (the reducer's rule: the message supersedes deltas that are a
prefix of it; deltas that are not a prefix are kept and the message is printed
in full). So the assistant text printed is ``Result.text``, apart from the line
breaks put before our own lines when the text had not ended its line.
Events with a ``seq`` at or below the last one seen for the run (a replay
overlap) render nothing.

Sinks and errors
----------------
A sink has ``write_event(event, spans)`` (each event), ``write_result(result,
spans)`` (the finish output; it goes to ``write`` by default, which
:class:`JSONLSink` and :class:`CallbackSink` ignore, as in ASM), ``flush()`` and
``close()``. :class:`Rendering` never lets one sink stop the others: a sink
that raises is recorded and skipped for the rest of the run (it is still
flushed and closed), and when the rendering ends every sink is flushed, then
closed in reverse order, and only then is the first error raised (the original
exception, with a note naming the sink and how many further errors there
were). A renderer that raises on an event is recorded the same way; the sinks
still receive the event (with no text).

Differences from ASM, on purpose: the output formats are asm's own (not
byte-compatible with ASM's ``r+``/``t+bash`` lines); the file sink appends and
strips escape sequences that the *agent* printed (tool output, stderr) with a
small state machine that also handles a sequence split across two writes (ASM
stripped per chunk, so split sequences survived); lone carriage returns are
dropped as in ASM.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from asm_controller._events import Event
from asm_controller._reducer import Result, TextFold
from asm_controller._reducer import message_text as _message_text
from asm_wire import KIND_NAMES, KIND_VALUES, pb

__all__ = [
    "STYLES",
    "AnsiStripper",
    "CallbackSink",
    "CompactRenderer",
    "FileSink",
    "JSONLSink",
    "Renderer",
    "Rendering",
    "Sink",
    "Span",
    "TTYSink",
    "VerboseRenderer",
    "ansi_text",
    "plain_text",
    "summarize_input",
    "summary_line",
    "truncate",
]

#: One piece of rendered output: (text, style name).
Span = tuple[str, str]

TEXT = "text"  # the assistant's own text
PLAIN = "plain"

#: Style name -> ANSI SGR prefix (ASM's colours, plus yellow and bold).
STYLES: dict[str, str] = {
    TEXT: "",
    PLAIN: "",
    "dim": "\x1b[2m",
    "red": "\x1b[0;31m",
    "green": "\x1b[0;32m",
    "yellow": "\x1b[0;33m",
    "blue": "\x1b[0;34m",
    "magenta": "\x1b[0;35m",
    "bold": "\x1b[1m",
}
RESET = "\x1b[0m"

_NL: Span = ("\n", PLAIN)
_TEXT_NL: Span = ("\n", TEXT)

_K = KIND_VALUES
_DELTA = _K["assistant_delta"]
_MESSAGE = _K["assistant_message"]
_TEXT_BREAKS = frozenset({_K["tool_use"], _K["tool_result"]})
_SEVERITY_INFO = pb.SEVERITY_INFO
_SEVERITY_WARNING = pb.SEVERITY_WARNING


def plain_text(spans: Sequence[Span]) -> str:
    """The spans' text without any styling."""
    return "".join([t for t, _ in spans])


def ansi_text(spans: Sequence[Span]) -> str:
    """The spans' text with ANSI colour codes (a reset after each styled span)."""
    out: list[str] = []
    for text, style in spans:
        code = STYLES.get(style, "")
        if code and text:
            out.append(code)
            out.append(text)
            out.append(RESET)
        else:
            out.append(text)
    return "".join(out)


# -- small text helpers (used on tool/approval/... events, never per delta) -----------

_ANSI_RE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte
    r"|\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC ... BEL | ST
    r"|[PX^_][^\x1b]*\x1b\\"  # DCS/SOS/PM/APC ... ST
    r"|[ -/]*[0-OQ-WYZ\\`-~])"  # two-byte (and nF) escapes, not the introducers above
    r"|\r(?!\n)"
)
_ANSI_PREFIX_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[PX^_][^\x1b]*\x1b?|[ -/]*)")
_CONTROL = {i: None for i in range(32) if i not in (9, 10)} | {127: None}


def _clean(s: str) -> str:
    """Agent-provided text made safe to embed in our own lines: no escapes, no control characters."""
    if "\x1b" in s:
        s = _ANSI_RE.sub("", s)
    return s.translate(_CONTROL)


def truncate(s: str, width: int) -> str:
    """At most ``width`` characters; a cut string ends with ``…``."""
    if width <= 0 or len(s) <= width:
        return s
    return s[: max(width - 1, 0)] + "…"


def _one_line(s: str, width: int) -> str:
    s = _clean(s).strip().replace("\t", " ")
    if "\n" in s:
        s = " ↵ ".join(part.strip() for part in s.splitlines() if part.strip())
    return truncate(s, width)


def _json(raw: str) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _compact_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        return repr(value)


_PRIMARY_KEYS = (
    "command", "cmd", "file_path", "path", "notebook_path", "pattern", "url", "query", "prompt", "description",
    "skill", "name",
)


def summarize_input(value: Any) -> str:
    """A one-line summary of a tool input: its most telling field (``command``, ``file_path``, ...)
    if it has one, otherwise ``key=value`` pairs; not truncated (see :func:`truncate`)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in _PRIMARY_KEYS:
            v = value.get(key)
            if isinstance(v, str) and v:
                return v
            if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                return " ".join(v)
        return ", ".join(f"{k}={v if isinstance(v, str) else _compact_json(v)}" for k, v in value.items())
    return _compact_json(value)


_RESULT_KEYS = ("output", "stdout", "content", "result", "text", "error", "message", "stderr")


def _result_text(value: Any) -> str:
    """The readable text of a tool result's content (a string, content blocks, or a dict with output)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for item in value:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                parts.append(item["text"])
            else:
                parts.append(_compact_json(item))
        return "\n".join(parts)
    if isinstance(value, dict):
        for key in _RESULT_KEYS:
            v = value.get(key)
            if isinstance(v, str | list) and v:
                return _result_text(v)
        return _compact_json(value) if value else ""
    return _compact_json(value)


def _fmt_duration(ms: int) -> str:
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    minutes, seconds = divmod(ms // 1000, 60)
    return f"{minutes}m{seconds:02d}s"


def _summary_spans(
    status: str, *, error_kind: str | None, error_message: str | None, input_tokens: int, output_tokens: int,
    cost_usd: float, duration_ms: int | None, node: str | None = None, extra: Sequence[str] = (), denied: int = 0,
) -> list[Span]:
    if status == "completed" and error_kind is None and denied:
        # The CLI finished, but refused tool calls: not a plain success (the work asked for may not be done).
        head, style, when = "⚠ completed", "yellow", "in"
    elif status == "completed" and error_kind is None:
        head, style, when = "✔ completed", "green", "in"
    elif status == "interrupted":
        head, style, when = "■ interrupted", "yellow", "after"
    elif status == "failed" or error_kind is not None:
        head, style, when = "✖ failed", "red", "after"
    else:
        head, style, when = f"? {status or 'unknown'}", "yellow", "after"
    show_error = error_kind is not None and error_kind != "user_cancelled"
    if show_error:
        head += f" ({error_kind})"
    words = []
    if node:
        words.append(f"on {node}")
    if duration_ms is not None:
        words.append(f"{when} {_fmt_duration(duration_ms)}")
    metrics = []
    if input_tokens or output_tokens:
        metrics.append(f"{input_tokens:,} in / {output_tokens:,} out tokens")
    if cost_usd > 0:
        metrics.append(f"${cost_usd:.4f}")
    if denied:
        metrics.append(f"{denied} tool call{'s' if denied != 1 else ''} denied")
    metrics.extend(extra)
    tail = (" " + " ".join(words) if words else "") + "".join(f" · {m}" for m in metrics)
    out: list[Span] = [(head, style)]
    if tail:
        out.append((tail, PLAIN))
    if show_error and error_message:
        out.append((": " + error_message, PLAIN))
    return out


def summary_line(result: Result, *, verbose: bool = False) -> str:
    """The summary line of a Result, without colour and newline, e.g.
    ``✔ completed in 1.2s · 1,234 in / 56 out tokens · $0.0123``, ``⚠ completed in 2.0s · 1 tool call denied``
    (the CLI refused tool calls: ``Result.denials``) or ``✖ failed (auth_error): message``."""
    return plain_text(_result_summary(result, verbose))


def _result_summary(result: Result, verbose: bool) -> list[Span]:
    err = result.error
    extra: list[str] = []
    if verbose:
        extra.append(f"{result.events:,} events")
        if result.warnings:
            extra.append(f"{len(result.warnings)} warning{'s' if len(result.warnings) != 1 else ''}")
    return _summary_spans(
        result.status, error_kind=err.kind if err else None, error_message=err.message if err else None,
        input_tokens=result.cost.input_tokens, output_tokens=result.cost.output_tokens,
        cost_usd=result.cost.cost_usd, duration_ms=result.duration_ms,
        node=str(result.metadata["node_id"]) if verbose and result.metadata.get("node_id") else None, extra=extra,
        denied=len(result.denials),
    )


# -- renderers ---------------------------------------------------------------------------


@runtime_checkable
class Renderer(Protocol):
    """Turns events into spans; ``finish`` renders the end of the run (``result`` may be None)."""

    def render(self, event: Event) -> list[Span]: ...

    def finish(self, result: Result | None) -> list[Span]: ...


class _BaseRenderer:
    """Shared state: line position, the delta/message rule, replay dedup, and a tally for finish(None)."""

    verbose = False

    def __init__(self, *, width: int = 100) -> None:
        self.width = width
        self.events = 0
        self.tools = 0
        self._run_id: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._last_seq = 0
        self._open = False  # the cursor is not at the start of a line (assistant text without its newline)
        self._text = TextFold(keep=False)  # the reducer's text rule: what is new, and where a paragraph starts
        self._after_line = False  # a non-text line (a tool call) was printed since the last text
        self._tool_names: dict[str, str] = {}
        # the tally, for finish(None)
        self._status = ""
        self._error: tuple[str, str] | None = None
        self._in = self._out = 0
        self._cost = 0.0
        self._first_ns: int | None = None
        self._last_ns = 0
        self._duration_ms: int | None = None
        self._denied = 0

    # -- entry points ------------------------------------------------------------------

    def render(self, event: Event) -> list[Span]:
        m = event.pb
        if m.run_id != self._run_id:
            self._run_id = m.run_id
            self._reset()
        seq = m.seq
        if seq:
            if seq <= self._last_seq:
                return []  # a replayed event we already rendered
            self._last_seq = seq
        self.events += 1
        ts = m.timestamp_unix_nano
        if self._first_ns is None:
            self._first_ns = ts
        self._last_ns = ts
        kind = m.kind
        if kind == _DELTA:  # the hot path: no allocation beyond the span
            d = m.assistant_delta
            content = d.content or d.data.decode("utf-8", "replace")  # binary output: shown, kept in the event
            if not content:
                return []
            return self._print_text(*self._text.delta(content))
        if kind == _MESSAGE:
            return self._print_text(*self._text.message(_message_text(m.assistant_message)))
        if kind in _TEXT_BREAKS:
            self._text.seal()
        name = KIND_NAMES[kind] if kind < len(KIND_NAMES) else "unknown"
        handler: Callable[[pb.Event], list[Span] | None] | None = getattr(self, "_on_" + name, None)
        spans = handler(m) if handler is not None else self._on_other(m, name)
        if not spans:
            return []
        self._after_line = True
        if self._open:
            spans.insert(0, _TEXT_NL)
            self._open = False
        return spans

    def _print_text(self, sep: str, text: str) -> list[Span]:
        """New answer text; a paragraph's blank line is left out right after a tool line (already apart)."""
        shown = text if self._after_line else sep + text
        if not shown:
            return []
        self._after_line = False
        self._open = shown[-1] != "\n"
        return [(shown, TEXT)]

    def finish(self, result: Result | None) -> list[Span]:
        out: list[Span] = []
        if self._open:
            out.append(_TEXT_NL)
            self._open = False
        if result is not None:
            out.extend(_result_summary(result, self.verbose))
        else:
            out.extend(self._tally_summary())
        out.append(_NL)
        return out

    def _tally_summary(self) -> list[Span]:
        status = self._status
        if not status:
            status = ("interrupted" if self._error[0] == "user_cancelled" else "failed") if self._error else "unknown"
        duration = self._duration_ms
        if duration is None and self._first_ns is not None and self._last_ns > self._first_ns:
            duration = (self._last_ns - self._first_ns) // 1_000_000
        extra = [f"{self.events:,} events"] if self.verbose else []
        return _summary_spans(
            status, error_kind=self._error[0] if self._error else None,
            error_message=self._error[1] if self._error else None, input_tokens=self._in, output_tokens=self._out,
            cost_usd=self._cost, duration_ms=duration, extra=extra, denied=self._denied,
        )

    # -- kinds shared by both renderers ---------------------------------------------------

    def _on_tool_use(self, m: pb.Event) -> list[Span]:
        t = m.tool_use
        self.tools += 1
        name = _one_line(t.tool_name, 60) or "tool"
        if t.tool_call_id:
            if len(self._tool_names) > 4096:
                self._tool_names.clear()
            self._tool_names[t.tool_call_id] = name
        value = _json(t.input_json)
        summary = _one_line(summarize_input(value), self.width)
        out: list[Span] = [("▸ ", "blue"), (name, "bold")]
        if self.verbose and t.tool_call_id:
            out.append((f" [{_one_line(t.tool_call_id, 60)}]", "dim"))
        if summary:
            out.append((": " + summary, PLAIN))
        out.append(_NL)
        if self.verbose and isinstance(value, dict) and len(value) > 1:
            out += [("    input ", "dim"), (_one_line(_compact_json(value), self.width), "dim"), _NL]
        return out

    def _on_tool_result(self, m: pb.Event) -> list[Span]:
        t = m.tool_result
        name = self._tool_names.pop(t.tool_call_id, "")
        text = _clean(_result_text(_json(t.content_json))).strip("\n")
        lines = [line for line in text.splitlines() if line.strip()]
        mark: Span = ("  ✗ ", "red") if t.is_error else ("  ✓ ", "green")
        out: list[Span] = [mark]
        if self.verbose:
            label = (name or "tool") + (f" [{_one_line(t.tool_call_id, 60)}]" if t.tool_call_id else "")
            out.append((label + (" error" if t.is_error else " ok"), "red" if t.is_error else "dim"))
            out.append(_NL)
            for line in lines[:5]:
                out += [("    │ ", "dim"), (truncate(line.rstrip(), self.width), PLAIN), _NL]
            if len(lines) > 5:
                out += [(f"    │ … {len(lines) - 5} more lines", "dim"), _NL]
            return out
        if not lines:
            out.append(("(no output)", "dim"))
        else:
            out.append((truncate(lines[0].strip(), self.width), "red" if t.is_error else PLAIN))
            if len(lines) > 1:
                out.append((f" (+{len(lines) - 1} lines)", "dim"))
        out.append(_NL)
        return out

    def _on_approval_requested(self, m: pb.Event) -> list[Span]:
        a = m.approval_requested
        out: list[Span] = [("⏸ approval requested", "yellow"), (f" [{_one_line(a.approval_id, 80)}]", "dim")]
        subject = _one_line(a.subject, 60)
        details = _one_line(summarize_input(_json(a.details_json)), self.width)
        if subject or details:
            out.append((" ▸ ", "yellow"))
        if subject:
            out.append((subject, "bold"))
        if details:
            out.append(((": " if subject else "") + details, PLAIN))
        out.append(_NL)
        return out

    def _on_approval_resolved(self, m: pb.Event) -> list[Span]:
        a = m.approval_resolved
        allowed = a.decision == "allow"
        word = "✓ approved" if allowed else "✗ denied" if a.decision in ("deny", "") else f"✗ {_one_line(a.decision, 40)}"
        out: list[Span] = [
            (word, "green" if allowed else "red"),
            (f" [{_one_line(a.approval_id, 80)}]", "dim"),
        ]
        if a.reason:
            out.append((": " + _one_line(a.reason, self.width), PLAIN))
        out.append(_NL)
        return out

    def _on_guardrail_triggered(self, m: pb.Event) -> list[Span]:
        g = m.guardrail_triggered
        style = "red" if g.action in ("block", "cancel") else "yellow"
        head = f"⚠ guardrail {_one_line(g.rule, 60) or '?'}"
        if g.direction:
            head += f" ({_one_line(g.direction, 20)})"
        out: list[Span] = [(head, style)]
        if g.action:
            out.append((f" → {_one_line(g.action, 40)}", style))
        if g.message:
            out.append((": " + _one_line(g.message, self.width), PLAIN))
        if self.verbose and g.details_json:
            details = _one_line(summarize_input(_json(g.details_json)), self.width)
            if details:
                out.append((" " + details, "dim"))
        out.append(_NL)
        return out

    def _on_error(self, m: pb.Event) -> list[Span] | None:
        e = m.error
        code = _one_line(e.code, 60) or "error"
        if e.severity == _SEVERITY_WARNING:
            if e.code == "permission_denied":
                self._denied += 1  # one warning per refused tool call: the tally's "N tool calls denied"
            return [("⚠ warning", "yellow"), (f" ({code}): ", PLAIN), (self._msg(e.message), PLAIN), _NL]
        if e.severity == _SEVERITY_INFO:
            return [("· info", "dim"), (f" ({code}): {self._msg(e.message)}", "dim"), _NL] if self.verbose else None
        if self._error is None:
            self._error = (code, e.message)
        if not self.verbose:
            return None  # a failure is in the summary line
        domain = _one_line(e.domain, 40) or "runtime"
        return [(f"✖ error [{domain}/{code}]", "red"), (": " + self._msg(e.message), PLAIN), _NL]

    def _msg(self, message: str) -> str:
        return _one_line(message, self.width) if not self.verbose else _clean(message).strip()

    # -- kinds that only feed the tally in compact mode -------------------------------------

    def _on_cost_update(self, m: pb.Event) -> list[Span] | None:
        c = m.cost_update
        self._in += c.input_tokens
        self._out += c.output_tokens
        self._cost += c.cost_usd
        if not self.verbose:
            return None
        text = f"· cost +{c.input_tokens:,} in / {c.output_tokens:,} out tokens"
        if c.cost_usd:
            text += f" · ${c.cost_usd:.4f}"
        return [(text, "dim"), _NL]

    def _on_run_completed(self, m: pb.Event) -> list[Span] | None:
        rc = m.run_completed
        if self._error is not None and self._error[0] != "user_cancelled":
            self._status = "failed"  # as the reducer: an interrupt that a failure caused is a failure
        elif rc.status:
            self._status = rc.status
        elif not self._status:
            self._status = "completed" if self._error is None else "failed"
        if rc.duration_ms:
            self._duration_ms = rc.duration_ms
        if not self.verbose:
            return None
        text = f"· run completed: {_one_line(rc.status, 40) or '?'}"
        if rc.exit_code >= 0:
            text += f" (exit {rc.exit_code})"
        if rc.signal:
            text += f" (signal {rc.signal})"
        return [(text, "dim"), _NL]

    def _on_result(self, m: pb.Event) -> list[Span] | None:
        if not self._status:
            self._status = "completed" if self._error is None else ""
        if not self.verbose:
            return None
        reason = _one_line(m.result.stop_reason, 60)
        return [(f"· result: {_one_line(m.result.status, 40) or 'completed'}"
                 + (f" (stop: {reason})" if reason else ""), "dim"), _NL]

    def _on_other(self, m: pb.Event, name: str) -> list[Span] | None:
        return [(f"· {name}", "dim"), _NL] if self.verbose else None


class CompactRenderer(_BaseRenderer):
    """The assistant's text as it streams; one line per tool call, tool result, approval,
    guardrail and warning; and the summary line. ``width`` bounds every summarized field."""

    verbose = False

    def _on_run_started(self, m: pb.Event) -> None:
        return None

    def _on_thinking(self, m: pb.Event) -> None:
        return None

    def _on_stderr(self, m: pb.Event) -> None:
        return None


class VerboseRenderer(_BaseRenderer):
    """Everything the compact renderer shows, plus the run's lifecycle, thinking (dimmed),
    stderr, cost updates, terminal errors, info notices, raw lines and ids."""

    verbose = True

    def __init__(self, *, width: int = 240) -> None:
        super().__init__(width=width)

    def _on_run_started(self, m: pb.Event) -> list[Span]:
        r = m.run_started
        parts = [f"· run {m.run_id}", f"session {m.session_id}", m.provider]
        if r.pid:
            parts.append(f"pid {r.pid}")
        if r.cwd:
            parts.append(f"cwd {r.cwd}")
        if r.provider_session_id:
            parts.append(f"provider session {r.provider_session_id}")
        return [(_one_line(" · ".join(p for p in parts if p), 4 * self.width), "dim"), _NL]

    def _on_thinking(self, m: pb.Event) -> list[Span] | None:
        text = _clean(m.thinking.content).strip("\n")
        return [("✻ ", "dim"), (text, "dim"), _NL] if text else None

    def _on_stderr(self, m: pb.Event) -> list[Span] | None:
        text = _clean(m.stderr.content).rstrip("\n")
        return [("stderr │ ", "dim"), (text, "dim"), _NL]

    def _on_user_message(self, m: pb.Event) -> list[Span] | None:
        text = "".join(b.text for b in m.user_message.content if b.type == "text")
        return [(f"· user: {_one_line(text, self.width)}", "dim"), _NL] if text else None

    def _on_raw(self, m: pb.Event) -> list[Span]:
        text = m.raw.content or m.raw.data.decode("utf-8", "replace")
        return [(f"· raw {m.raw.stream or 'stdout'}: {_one_line(text, self.width)}", "dim"), _NL]


# -- sinks -------------------------------------------------------------------------------


class Sink:
    """A destination for rendered output. Subclasses override what they need; the defaults do nothing
    (``write_event`` and ``write_result`` forward the spans to ``write``)."""

    def write(self, spans: Sequence[Span]) -> None:
        """Renderer output that belongs to no event (the finish output)."""

    def write_event(self, event: Event, spans: Sequence[Span]) -> None:
        self.write(spans)

    def write_result(self, result: Result | None, spans: Sequence[Span]) -> None:
        self.write(spans)

    def flush(self) -> None:
        pass

    def hold(self) -> None:
        """A batch of events follows (:meth:`Rendering.feed_all`): flushes may wait for :meth:`release`."""

    def release(self) -> None:
        """The batch is out: flush what :meth:`hold` kept back."""

    def close(self) -> None:
        pass


def _wants_color(stream: Any, color: bool | None) -> bool:
    if color is not None:
        return color
    if os.environ.get("NO_COLOR"):  # https://no-color.org: set and not empty
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class TTYSink(Sink):
    """Writes to a text stream (default ``sys.stdout``), flushing after each event.

    ANSI colour only when the stream is a terminal and ``NO_COLOR`` is not set
    (``color=True/False`` overrides). With ``meta_stream`` (e.g. ``sys.stderr``),
    the assistant's text goes to ``stream`` and everything else to
    ``meta_stream``, each coloured by its own terminal-ness. The streams are
    never closed.
    """

    def __init__(self, stream: IO[str] | None = None, *, meta_stream: IO[str] | None = None,
                 color: bool | None = None) -> None:
        self.stream: IO[str] = stream if stream is not None else sys.stdout
        self.meta_stream = meta_stream
        self.color = _wants_color(self.stream, color)
        self.meta_color = _wants_color(meta_stream, color) if meta_stream is not None else self.color
        self._held = False
        self._dirty: IO[str] | None = None  # written while held, not flushed yet

    def hold(self) -> None:
        self._held = True

    def release(self) -> None:
        self._held = False
        dirty, self._dirty = self._dirty, None
        if dirty is not None:
            dirty.flush()

    def _flushed(self, target: IO[str]) -> None:
        """After a write to ``target``: flush it, or, held, once the batch is out or before the other
        stream is written (so stdout and stderr interleave as they do flushed per event)."""
        if self._held:
            self._dirty = target
        else:
            target.flush()

    def _before(self, target: IO[str]) -> None:
        dirty = self._dirty
        if dirty is not None and dirty is not target:
            self._dirty = None
            dirty.flush()

    def write(self, spans: Sequence[Span]) -> None:
        if not spans:
            return
        meta = self.meta_stream
        if meta is None:
            self.stream.write(ansi_text(spans) if self.color else plain_text(spans))
            self._flushed(self.stream)
            return
        # Split: consecutive spans to the same stream are written together; flush when switching.
        current: IO[str] | None = None
        run: list[Span] = []
        for span in spans:
            target = self.stream if span[1] == TEXT else meta
            if target is not current and run:
                self._emit(current, run)
                run = []
            current = target
            run.append(span)
        if run:
            self._emit(current, run)

    def _emit(self, target: IO[str] | None, spans: list[Span]) -> None:
        if target is None:
            return
        color = self.color if target is self.stream else self.meta_color
        self._before(target)
        target.write(ansi_text(spans) if color else plain_text(spans))
        self._flushed(target)

    def flush(self) -> None:
        self._dirty = None
        self.stream.flush()
        if self.meta_stream is not None:
            self.meta_stream.flush()

    def close(self) -> None:
        self.flush()


class AnsiStripper:
    """Removes ANSI escape sequences and lone carriage returns from a stream of chunks, including a
    sequence split across chunks (its start is held back until the next chunk or :meth:`end`)."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = ""

    def feed(self, s: str) -> str:
        if self._held:
            s, self._held = self._held + s, ""
        elif "\x1b" not in s and "\r" not in s:
            return s
        i = s.rfind("\x1b")
        if i >= 0 and _ANSI_RE.match(s, i) is None and len(s) - i < 4096:
            prefix = _ANSI_PREFIX_RE.match(s, i)
            if prefix is not None and prefix.end() == len(s):
                s, self._held = s[:i], s[i:]
        if s.endswith("\r"):
            s, self._held = s[:-1], "\r" + self._held
        return _ANSI_RE.sub("", s).replace("\x1b", "")

    def end(self) -> str:
        """What is left at the end of the stream (an unfinished sequence or a lone CR is dropped)."""
        self._held = ""  # only ever a lone CR and/or the start of an unfinished sequence
        return ""


class FileSink(Sink):
    """Appends plain text (no colour; escape sequences the agent printed are stripped) to a file,
    flushing after every write; parent directories are created. The file is opened here (so a bad
    path fails at once) and closed by :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], *, strip_ansi: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", errors="backslashreplace")
        self._strip = AnsiStripper() if strip_ansi else None

    def write(self, spans: Sequence[Span]) -> None:
        if not spans:
            return
        if self._file is None:
            raise ValueError(f"file sink {self.path} is closed")
        text = plain_text(spans)
        if self._strip is not None:
            text = self._strip.feed(text)
        if text:
            self._file.write(text)
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            if self._strip is not None:
                tail = self._strip.end()
                if tail:
                    f.write(tail)
            f.flush()
        finally:
            f.close()

    def __repr__(self) -> str:
        return f"FileSink({str(self.path)!r})"


class JSONLSink(Sink):
    """One JSON object per event (``event.to_dict()``), one per line, flushed per line; with
    ``summary=True`` (default) the Result's ``to_summary()`` as a last line, as
    ``asm run --output jsonl`` prints it. Renderer text is ignored. A path is opened for
    append (and closed by :meth:`close`); a stream is only flushed."""

    def __init__(self, target: str | os.PathLike[str] | IO[str], *, summary: bool = True) -> None:
        self.summary = summary
        self._owned = isinstance(target, str | os.PathLike)
        if isinstance(target, str | os.PathLike):
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._stream: IO[str] | None = open(path, "a", encoding="utf-8")
        else:
            self._stream = target

    def _line(self, obj: dict[str, Any]) -> None:
        if self._stream is None:
            raise ValueError("jsonl sink is closed")
        self._stream.write(json.dumps(obj, default=str) + "\n")
        self._stream.flush()

    def write_event(self, event: Event, spans: Sequence[Span]) -> None:
        self._line(event.to_dict())

    def write_result(self, result: Result | None, spans: Sequence[Span]) -> None:
        if self.summary and result is not None:
            self._line(result.to_summary())

    def flush(self) -> None:
        if self._stream is not None:
            self._stream.flush()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        if self._owned:
            stream.close()
        else:
            stream.flush()


class CallbackSink(Sink):
    """Calls ``fn(event, text)`` for every event, ``text`` being the event's rendered plain text
    (possibly empty). The finish output is ignored, as is ``fn``'s return value.

    ``CallbackSink(broadcaster.callback)`` publishes every rendered event on a pubsub broadcaster."""

    def __init__(self, fn: Callable[[Event, str], object]) -> None:
        if not callable(fn):
            raise TypeError(f"callback sink needs a callable, got {fn!r}")
        self.fn = fn

    def write_event(self, event: Event, spans: Sequence[Span]) -> None:
        self.fn(event, plain_text(spans) if spans else "")


# -- the stream driver ----------------------------------------------------------------------


class Rendering:
    """Feeds events through a renderer into sinks; see the module docstring for the error rules.

    ``feed(event)`` per event, then ``finish(result)`` (which closes), or ``await render(events)``
    for both. ``close()`` ends a rendering without a summary (idempotent). ``errors`` lists every
    recorded ``(who, exception)``.
    """

    def __init__(self, renderer: Renderer | None = None, sinks: Sequence[Sink] = ()) -> None:
        self.renderer: Renderer = renderer if renderer is not None else CompactRenderer()
        self.sinks: list[Sink] = list(sinks)
        self._live: list[Sink] = list(self.sinks)
        self.errors: list[tuple[object, BaseException]] = []
        self.closed = False

    def _fail(self, who: object, exc: BaseException) -> None:
        self.errors.append((who, exc))
        if who is not self.renderer and who in self._live:
            self._live = [s for s in self._live if s is not who]

    def feed(self, event: Event) -> None:
        """Render one event and hand it to every sink; never raises for a sink's or renderer's error."""
        if self.closed:
            return
        try:
            spans = self.renderer.render(event)
        except Exception as exc:
            self._fail(self.renderer, exc)
            spans = []
        for sink in self._live:
            try:
                sink.write_event(event, spans)
            except Exception as exc:
                self._fail(sink, exc)

    def feed_all(self, events: Iterable[Event]) -> None:
        """:meth:`feed` each of ``events`` with the sinks' flushes held until the last (a terminal sink
        flushes once a batch, not once an event: the same output, in the same order)."""
        held = list(self._live)
        for sink in held:
            try:
                sink.hold()
            except Exception as exc:
                self._fail(sink, exc)
        try:
            for event in events:
                self.feed(event)
        finally:
            for sink in held:
                if sink not in self._live:
                    continue  # it failed meanwhile: never touched again, as after any failure
                try:
                    sink.release()
                except Exception as exc:
                    self._fail(sink, exc)

    def finish(self, result: Result | None = None) -> None:
        """Render the end of the run (the summary line), write it to every sink, then close."""
        if self.closed:
            return
        try:
            spans = self.renderer.finish(result)
        except Exception as exc:
            self._fail(self.renderer, exc)
            spans = []
        for sink in self._live:
            try:
                sink.write_result(result, spans)
            except Exception as exc:
                self._fail(sink, exc)
        self.close()

    def close(self) -> None:
        """Flush every sink, close them in reverse order, then raise the first recorded error, if any."""
        if self.closed:
            return
        self.closed = True
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception as exc:
                self.errors.append((sink, exc))
        for sink in reversed(self.sinks):
            try:
                sink.close()
            except Exception as exc:
                self.errors.append((sink, exc))
        self._raise_first()

    def _raise_first(self) -> None:
        if not self.errors:
            return
        who, first = self.errors[0]
        note = f"rendering: {who!r} failed"
        if len(self.errors) > 1:
            note += f"; {len(self.errors) - 1} further error(s): " + ", ".join(
                f"{w!r}: {type(e).__name__}" for w, e in self.errors[1:6])
        first.add_note(note)
        raise first

    async def render(self, events: AsyncIterable[Event], result: Result | None = None) -> None:
        """Feed every event, then finish with ``result`` (default: ``events.result`` when the
        iterable has one, as a :class:`RunStream` does; otherwise the renderer's own tally).

        If iterating the events raises, the sinks are still flushed and closed and that
        exception propagates (sink errors are attached to it as a note)."""
        try:
            async for event in events:
                self.feed(event)
        except BaseException as exc:
            try:
                self.close()
            except Exception as sink_exc:
                if sink_exc is not exc:
                    exc.add_note(f"rendering: a sink failed too: {sink_exc!r}")
            raise
        if result is None:
            found = getattr(events, "result", None)
            result = found if isinstance(found, Result) else None
        self.finish(result)

    def __enter__(self) -> Rendering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
