"""The CLI's terminal output on rich: a live run view, width-aware tables, a live ``asm nodes --watch``.

Rich is used only on a real terminal that wants colour. When the output is piped, or ``NO_COLOR`` is
set (https://no-color.org), or ``TERM=dumb``, or the caller passes ``no_color=True`` (``--no-color``),
every function here writes the same plain text the CLI wrote before rich (that text is what scripts and
tests read), so piping ``asm run``/``asm nodes``/``asm runs`` into a file is byte-for-byte unchanged.

Runs (``asm run/attach/replay --output text``)::

    rendering = run_rendering(sys.stdout, sys.stderr, no_color=args.no_color)
    for ev in stream: rendering.feed(ev)
    rendering.finish(result)        # or rendering.close() without a summary

:func:`run_rendering` returns an ordinary :class:`~asm_controller.extensions.rendering.Rendering` (so its
sink-error rules hold): with a :class:`RunView` sink on a terminal, else today's ``TTYSink``. ``RunView``
shows, at the bottom of the screen while the run lasts, a spinner with the run id, the elapsed time and
whether the run is silent; the assistant's text streams above it, tool calls and their results are
panels, warnings and errors are styled, and the summary line ends the run.

Tables: :func:`nodes_table` / :func:`runs_table` build rich tables from the row dicts ``asm nodes`` and
``asm runs`` build; :func:`print_nodes` / :func:`print_runs` print them (or the plain text);
:func:`watch_nodes` redraws the nodes table in place (``rich.live.Live``) every ``interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import IO, Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from asm_controller._events import Event
from asm_controller._reducer import Result
from asm_controller.extensions.rendering import (
    AnsiStripper,
    CompactRenderer,
    Rendering,
    Sink,
    Span,
    VerboseRenderer,
    summarize_input,
    truncate,
)
from asm_wire import KIND_VALUES

__all__ = [
    "FitTable",
    "RunView",
    "add_no_color_option",
    "approval_question",
    "nodes_table",
    "nodes_text",
    "print_nodes",
    "print_runs",
    "run_rendering",
    "runs_table",
    "runs_text",
    "suspended",
    "use_rich",
    "watch_nodes",
]

_TEXT = "text"  # the renderer's style name for the assistant's own text
_DELTA = KIND_VALUES["assistant_delta"]
_MESSAGE = KIND_VALUES["assistant_message"]
_TOOL_USE = KIND_VALUES["tool_use"]
_TOOL_RESULT = KIND_VALUES["tool_result"]
#: The renderer's style names that are not rich styles.
_NO_STYLE = {"text", "plain"}
#: How long a run must be silent before the status line says so.
_SILENT_S = 1.0
#: Lines of a tool result shown in its panel.
_RESULT_LINES = 8
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


from asm_cli.commands._common import add_no_color_option  # noqa: E402  (re-exported for callers)
from asm_cli.plain import plain_rendering, use_rich  # noqa: E402  (use_rich re-exported for callers)


def _clean(s: str) -> str:
    """Agent-provided text made safe to show: no escape sequences, no control characters but tab/newline."""
    s = AnsiStripper().feed(s)
    return _CONTROL_RE.sub("", s)


def _styled(spans: Sequence[Span]) -> Text:
    """The renderer's spans as a rich Text (style names such as ``"dim"``/``"red"`` are rich styles too);
    built with append, never from markup, so agent text with ``[brackets]`` is shown as it is."""
    out = Text()
    for text, style in spans:
        out.append(text, style=None if style in _NO_STYLE else style)
    return out


def _fmt_elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _json(raw: str) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _result_body(value: Any) -> str:
    """The readable text of a tool result's content: a string, content blocks, or a dict with an output."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(item["text"] if isinstance(item, dict) and isinstance(item.get("text"), str)
                         else item if isinstance(item, str) else json.dumps(item, default=str) for item in value)
    if isinstance(value, dict):
        for key in ("output", "stdout", "content", "result", "text", "error", "message", "stderr"):
            v = value.get(key)
            if isinstance(v, str | list) and v:
                return _result_body(v)
    return json.dumps(value, default=str) if value else ""


class RunView(Sink):
    """A rendering sink that draws a run on a rich console (see the module docstring).

    ``live=False`` draws no spinner (the panels, text and summary only): for a terminal that should
    not be redrawn. The view itself is the live footer's renderable: the unfinished line of assistant
    text, then the spinner line (``console.print(view)`` draws it once)."""

    def __init__(self, console: Console, *, run_id: str | None = None, live: bool = True,
                 refresh_per_second: float = 8.0, width: int = 100) -> None:
        self.console = console
        self.run_id = run_id or ""
        self.width = width
        self.started = time.monotonic()
        self.last_event: float | None = None
        self.partial = ""  # assistant text after its last newline: drawn in the live footer
        self._open = False  # without a footer: the assistant text printed has not ended its line
        self._tools: dict[str, str] = {}
        self._spinner = Spinner("dots", style="cyan")
        self._live: Live | None = None
        self._refresh_per_second = refresh_per_second
        self._suspended = False
        if live:
            self._start_live()

    def _start_live(self) -> None:
        # transient: the spinner disappears when the run ends; stdout/stderr are redirected through
        # the console so the CLI's own notices (asm: interrupting ...) print above the footer.
        self._live = Live(self, console=self.console, refresh_per_second=self._refresh_per_second,
                          transient=True, redirect_stdout=True, redirect_stderr=True)
        self._live.start()
        # Live hides the cursor; a second Ctrl-C exits with os._exit, which would leave it hidden.
        self.console.show_cursor(True)

    def suspend(self) -> None:
        """Take the footer away while the user answers a prompt (an approval): the prompt line is not
        redrawn over, and what the user types is echoed where they type it."""
        if self._live is not None:
            self._flush_partial()
            self._stop()
            self._suspended = True

    def resume(self) -> None:
        """The footer again, after :meth:`suspend` (not once the run's summary is printed)."""
        if self._suspended:
            self._suspended = False
            self._start_live()

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.partial:  # its tail: a long line without a newline is printed whole when it ends
            yield Text(self.partial[-4 * max(options.max_width, 20):])
        now = time.monotonic()
        frame = self._spinner.render(console.get_time())
        line = Text.assemble(frame if isinstance(frame, Text) else Text(""), " ")
        line.append(f"run {self.run_id}" if self.run_id else "starting run", style="bold")
        line.append(f" · {_fmt_elapsed(now - self.started)}", style="dim")
        if self.last_event is None:
            line.append(" · waiting for output", style="dim")
        elif now - self.last_event >= _SILENT_S:
            line.append(f" · silent for {_fmt_elapsed(now - self.last_event)}", style="dim")
        yield line

    # -- Sink ------------------------------------------------------------------------------

    def write_event(self, event: Event, spans: Sequence[Span]) -> None:
        m = event.pb
        self.last_event = time.monotonic()
        if m.run_id and m.run_id != self.run_id:
            self.run_id = m.run_id
        if not spans:
            return  # nothing to show, or an event already shown (a replay overlap: the renderer dedups)
        if m.kind == _TOOL_USE:
            self._flush_partial()
            self._tool_use(m)
        elif m.kind == _TOOL_RESULT:
            self._flush_partial()
            self._tool_result(m)
        else:
            self._write(spans)
        # No redraw here: Live redraws the footer after each print and on its own timer
        # (refresh_per_second), so a flood of deltas costs no redraw per delta.

    def write(self, spans: Sequence[Span]) -> None:
        self._write(spans)

    def write_result(self, result: Result | None, spans: Sequence[Span]) -> None:
        """The summary line, printed once the spinner is gone (with the run id, dimmed)."""
        self._suspended = False
        self._stop()
        if result is not None and result.run_id:
            self.run_id = result.run_id
        text_spans = [s for s in spans if s[1] == _TEXT]
        if text_spans:
            self._text("".join(t for t, _ in text_spans))
        self._flush_partial()
        summary = _styled([s for s in spans if s[1] != _TEXT])
        summary.rstrip()
        if self.run_id:
            summary.append(f" · run {self.run_id}", style="dim")
        self.console.print(summary, soft_wrap=True, highlight=False)

    def flush(self) -> None:
        self.console.file.flush()

    def close(self) -> None:
        self._suspended = False
        self._stop()
        self._flush_partial()
        self.console.file.flush()

    # -- drawing ---------------------------------------------------------------------------

    def _stop(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def _write(self, spans: Sequence[Span]) -> None:
        """Assistant text streams (its unfinished line stays in the footer); other spans are whole lines."""
        run: list[Span] = []
        for span in spans:
            if span[1] == _TEXT:
                if run:
                    self._lines(run)
                    run = []
                self._text(span[0])
            else:
                run.append(span)
        if run:
            self._lines(run)

    def _text(self, text: str) -> None:
        if self._live is None:  # no footer to hold the unfinished line: it is printed as it comes
            self.console.print(Text(text), end="", soft_wrap=True, highlight=False)
            self._open = not text.endswith("\n")
            return
        full = self.partial + text
        done, sep, self.partial = full.rpartition("\n")
        if sep:
            self.console.print(Text(done), soft_wrap=True, highlight=False)

    def _flush_partial(self) -> None:
        """End the assistant's unfinished line before one of our own lines."""
        if self.partial:
            text, self.partial = self.partial, ""
            self.console.print(Text(text), soft_wrap=True, highlight=False)
        elif self._open:
            self.console.print()
        self._open = False

    def _lines(self, spans: list[Span]) -> None:
        self._flush_partial()
        line = _styled(spans)
        line.rstrip()  # the line's newline: print adds its own
        self.console.print(line, soft_wrap=True, highlight=False)

    def _tool_use(self, m: Any) -> None:
        t = m.tool_use
        name = truncate(_clean(t.tool_name).strip(), 60) or "tool"
        if t.tool_call_id:
            if len(self._tools) > 4096:
                self._tools.clear()
            self._tools[t.tool_call_id] = name
        body = _clean(summarize_input(_json(t.input_json))).strip()
        lines = body.splitlines()
        shown = "\n".join(truncate(line, 4 * self.width) for line in lines[:_RESULT_LINES])
        if len(lines) > _RESULT_LINES:
            shown += f"\n… {len(lines) - _RESULT_LINES} more lines"
        self.console.print(Panel(Text(shown), title=Text(f"▸ {name}", style="bold blue"), title_align="left",
                                 border_style="blue", box=box.ROUNDED, expand=False), highlight=False)

    def _tool_result(self, m: Any) -> None:
        t = m.tool_result
        name = self._tools.pop(t.tool_call_id, "") or "tool"
        lines = [line.rstrip() for line in _clean(_result_body(_json(t.content_json))).strip("\n").splitlines()]
        body = Text("\n".join(truncate(line, 4 * self.width) for line in lines[:_RESULT_LINES]) or "(no output)",
                    style="red" if t.is_error else "")
        if len(lines) > _RESULT_LINES:
            body.append(f"\n… {len(lines) - _RESULT_LINES} more lines", style="dim")
        mark, style = ("✗", "red") if t.is_error else ("✓", "green")
        self.console.print(Panel(body, title=Text(f"{mark} {name}", style=style), title_align="left",
                                 border_style=style, box=box.ROUNDED, expand=False), highlight=False)


def run_rendering(stdout: IO[str] | None = None, stderr: IO[str] | None = None, *, no_color: bool = False,
                  verbose: bool = False, run_id: str | None = None, live: bool = True) -> Rendering:
    """The rendering ``asm run/attach/replay --output text`` uses: a :class:`RunView` when both streams
    are terminals that want colour; otherwise today's ``TTYSink`` (the assistant text on ``stdout``, the
    rest on ``stderr``; plain text to a pipe, and with ``no_color`` even on a terminal)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if use_rich(out, no_color=no_color) and use_rich(err, no_color=no_color):
        renderer = VerboseRenderer() if verbose else CompactRenderer()
        return Rendering(renderer, [RunView(Console(file=out), run_id=run_id, live=live)])
    return plain_rendering(out, err, no_color=no_color, verbose=verbose)


@contextlib.contextmanager
def suspended(rendering: Rendering | None) -> Iterator[None]:
    """No live footer while the user answers a prompt on the terminal (``asm run``'s approval question)."""
    views = [s for s in rendering.sinks if isinstance(s, RunView)] if rendering is not None else []
    for view in views:
        view.suspend()
    try:
        yield
    finally:
        for view in views:
            view.resume()


#: Lines of a tool's input shown above an approval question.
_APPROVAL_INPUT_LINES = 20


def approval_question(subject: str, details_json: str, width: int = 100) -> tuple[str, str]:
    """What ``asm run`` asks for an ``approval_requested``: the tool's input (JSON, cut at 20 lines) and
    the question, ``Allow Bash(echo hi)? [y/N/a]``; control characters are removed from both."""
    details = _json(details_json)
    tool_input = details.get("tool_input", details) if isinstance(details, dict) else details
    name = truncate(_clean(subject).strip(), 60) or "this tool call"
    brief = truncate(_clean(summarize_input(tool_input)).strip().replace("\n", " "), max(width - len(name) - 20, 20))
    if isinstance(tool_input, dict | list) and tool_input:
        shown = json.dumps(tool_input, indent=2, ensure_ascii=False, default=str)
    else:
        shown = "" if tool_input in (None, "", {}) else str(tool_input)
    lines = [truncate(_clean(line), 4 * width) for line in shown.splitlines()]
    if len(lines) > _APPROVAL_INPUT_LINES:
        lines = [*lines[:_APPROVAL_INPUT_LINES], f"… {len(lines) - _APPROVAL_INPUT_LINES} more lines"]
    question = f"Allow {name}({brief})? [y/N/a] " if brief else f"Allow {name}? [y/N/a] "
    return "\n".join(lines), question


# -- tables ------------------------------------------------------------------------------------

_NODE_HEAD = ("NODE", "STATE", "HEALTH", "EPOCH", "LOAD", "HEARTBEAT", "PROVIDERS")
_RUN_HEAD = ("RUN", "SESSION", "PROVIDER", "NODE", "STATUS", "STARTED", "DURATION")


def _node_cells(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
    """One tuple of cells per row (as ``asm nodes`` shows them) and the (node, message) of every error."""
    cells: list[tuple[str, ...]] = []
    errors: list[tuple[str, str]] = []
    for row in rows:
        if "error" in row:
            e = row["error"]
            cells.append((str(row["node"]), "error", "-", "-", "-", "-", f"{e.get('reason') or e['kind']}"))
            errors.append((str(row["node"]), str(e["message"])))
            continue
        provs = ", ".join(f"{p['name']} {p['version']}".strip() if p["available"] else f"{p['name']} (missing)"
                          for p in row["providers"])
        load = f"{row['load']['active_runs']}/{row['load']['max_runs']}"
        extra = ""
        if "preflight" in row:
            pf = row["preflight"]
            extra = " | preflight ok" if pf["ok"] else \
                f" | preflight {pf['error'].get('reason') or pf['error']['kind']}: {pf['error']['message']}"
        state = str(row["state"])
        if row.get("drain_deadline_unix_nano"):
            left = max(0.0, (row["drain_deadline_unix_nano"] - time.time_ns()) / 1e9)
            state = f"{state} (deadline in {left:.0f}s)"
        cells.append((str(row["node"]), state, str(row["health"]), str(row["epoch"])[-10:], load,
                      f"{row['heartbeat_age_s']:.1f}s", provs + extra))
    return cells, errors


def nodes_text(rows: list[dict[str, Any]]) -> str:
    """The plain ``asm nodes`` table (aligned columns, error messages below): what a pipe gets."""
    cells, errors = _node_cells(rows)
    lines: list[tuple[str, ...]] = [_NODE_HEAD, *cells]
    widths = [max(len(r[i]) for r in lines) for i in range(len(_NODE_HEAD) - 1)]
    out = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in lines]
    return "\n".join(out + [f"  {node}: {message}" for node, message in errors] + _fleet_footer(rows)) + "\n"


def _strategy(rows: list[dict[str, Any]]) -> str:
    """The controller's routing strategy (``asm nodes --controller`` puts it on each row); "" directly."""
    return next((str(r["strategy"]) for r in rows if r.get("strategy")), "")


def _fleet_footer(rows: list[dict[str, Any]]) -> list[str]:
    """Below the table for a controller: its routing strategy, its replicas (leases held) and the fleet queue."""
    lines = [f"routing: {strategy}"] if (strategy := _strategy(rows)) else []
    first = rows[0] if rows else {}
    replicas = first.get("replicas") or []
    if replicas:
        lines.append("replicas: " + ", ".join(
            f"{r['replica_id']}{' (this one)' if r.get('self') else ''} at {r['address']}: {r['leases']} lease(s)"
            for r in replicas))
    if "queued_runs" in first:
        lines.append(f"queued runs: {first['queued_runs']}")
    return lines


_STATE_STYLES = {"ready": "green", "draining": "yellow", "stopping": "yellow", "error": "red"}


class FitTable:
    """A table that keeps one line per row at any width, laid out when it is drawn (so a live table
    follows a resized terminal). The columns not in ``flexible`` keep their full width (rich's own
    layout drops whole columns of a table that does not fit); the ``flexible`` ones (name -> (ratio,
    min width)) share what is left and cut their cells with ``…``. Columns are two spaces apart, as
    in the plain text."""

    def __init__(self, head: Sequence[str], cells: list[tuple[str, ...]], flexible: dict[str, tuple[int, int]],
                 *, right: Sequence[str] = (), styles: dict[str, dict[str, str]] | None = None) -> None:
        self.head = tuple(head)
        self.cells = cells
        self.flexible = flexible
        self.right = set(right)
        self.styles = styles or {}

    def widths(self, max_width: int) -> list[int]:
        """Each column's width for a console ``max_width`` wide."""
        natural = [max([len(name), *(len(c[i]) for c in self.cells)]) for i, name in enumerate(self.head)]
        room = max_width - 2 * (len(self.head) - 1)
        if sum(natural) <= room:
            return natural
        flex = [i for i, name in enumerate(self.head) if name in self.flexible]
        left = room - sum(w for i, w in enumerate(natural) if i not in flex)
        widths = list(natural)
        # Share what is left by ratio; a column never gets more than it needs, and what it leaves goes
        # to the others (largest ratio first).
        pending = sorted(flex, key=lambda i: self.flexible[self.head[i]][0])
        while pending:
            total = sum(self.flexible[self.head[i]][0] for i in pending)
            i = pending.pop(0)
            ratio, min_width = self.flexible[self.head[i]]
            share = max(min_width, left * ratio // total if total else 0)
            widths[i] = min(natural[i], share)
            left -= widths[i]
        return widths

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(box=None, pad_edge=False, padding=(0, 1), collapse_padding=False, show_edge=False,
                      header_style="bold", expand=False)
        for name, width in zip(self.head, self.widths(options.max_width), strict=True):
            table.add_column(name, no_wrap=True, overflow="ellipsis", width=width, min_width=width, max_width=width,
                             justify="right" if name in self.right else "left")
        for cell in self.cells:
            table.add_row(*(Text(c, style=self.styles.get(name, {}).get(c.split(" ")[0], ""))
                            for name, c in zip(self.head, cell, strict=True)))
        yield table


def nodes_table(rows: list[dict[str, Any]]) -> FitTable:
    """``asm nodes`` as a rich table: one line per node at any width (the node, state and providers
    cells are cut with ``…`` when the terminal is narrow), the state coloured."""
    cells, _ = _node_cells(rows)
    return FitTable(_NODE_HEAD, cells, {"NODE": (2, 8), "STATE": (1, 8), "PROVIDERS": (3, 9)},
                    right=("LOAD", "HEARTBEAT"), styles={"STATE": _STATE_STYLES})


def _node_errors(rows: list[dict[str, Any]]) -> Text | None:
    _, errors = _node_cells(rows)
    if not errors:
        return None
    out = Text()
    for i, (node, message) in enumerate(errors):
        out.append(("\n" if i else "") + f"  {node}: ", style="bold")
        out.append(message, style="red")
    return out


def _run_cells(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [(str(r["run_id"]), str(r["session_id"]), str(r["provider"]), str(r["node"] or "-"), _run_status(r),
             str(r["started"] or "-"), "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s") for r in rows]


def _run_status(row: dict[str, Any]) -> str:
    """The status, with a queued run's place in the fleet queue (``queued #3``)."""
    status = str(row["status"])
    return f"{status} #{row['queue_position']}" if status == "queued" and row.get("queue_position") else status


def runs_text(rows: list[dict[str, Any]]) -> str:
    """The plain ``asm runs`` table (aligned columns, trailing blanks stripped): what a pipe gets."""
    lines: list[tuple[str, ...]] = [_RUN_HEAD, *_run_cells(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_RUN_HEAD))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n"
                   for line in lines)


_STATUS_STYLES = {"completed": "green", "running": "cyan", "failed": "red", "interrupted": "yellow",
                  "lost": "red", "queued": "dim"}


def _short_time(started: str) -> str:
    """``2026-12-01T14:00:00Z`` as ``12-01 14:00:00`` (UTC): the year is noise in a terminal's table."""
    if len(started) == 20 and started[10] == "T" and started.endswith("Z"):
        return f"{started[5:10]} {started[11:19]}"
    return started


def runs_table(rows: list[dict[str, Any]]) -> FitTable:
    """``asm runs`` as a rich table: one line per run at any width (run, session and node are cut
    with ``…`` when the terminal is narrow; the start time is UTC without its year)."""
    cells = [(*c[:5], _short_time(c[5]), c[6]) for c in _run_cells(rows)]
    return FitTable(_RUN_HEAD, cells, {"RUN": (3, 8), "SESSION": (2, 7), "NODE": (2, 6)}, right=("DURATION",),
                    styles={"STATUS": _STATUS_STYLES})


def print_nodes(rows: list[dict[str, Any]], stream: IO[str] | None = None, *, no_color: bool = False) -> None:
    """Print ``asm nodes``'s table: rich on a terminal, else :func:`nodes_text`."""
    out = stream if stream is not None else sys.stdout
    if not use_rich(out, no_color=no_color):
        out.write(nodes_text(rows))
        return
    console = Console(file=out)
    console.print(nodes_table(rows))
    errors = _node_errors(rows)
    if errors is not None:
        console.print(errors, soft_wrap=True, highlight=False)
    for line in _fleet_footer(rows):
        console.print(Text(line, style="dim"))


def print_runs(rows: list[dict[str, Any]], stream: IO[str] | None = None, *, no_color: bool = False) -> None:
    """Print ``asm runs``'s table: rich on a terminal, else :func:`runs_text`."""
    out = stream if stream is not None else sys.stdout
    if not use_rich(out, no_color=no_color):
        out.write(runs_text(rows))
        return
    Console(file=out).print(runs_table(rows))


def _watch_header(interval: float) -> str:
    return time.strftime("%H:%M:%S ") + f"every {interval:g}s (Ctrl-C to stop)"


async def watch_nodes(fetch: Callable[[], Awaitable[list[dict[str, Any]]]], interval: float, *, count: int = 0,
                      stream: IO[str] | None = None, no_color: bool = False,
                      console: Console | None = None) -> list[dict[str, Any]]:
    """``asm nodes --watch``: fetch the rows every ``interval`` seconds and show them, ``count`` times
    (0: until cancelled / Ctrl-C); returns the last rows (the exit code is the caller's).

    On a terminal (or a given ``console``) the table is redrawn in place by a ``rich.live.Live``; to a
    pipe each round appends a blank line, the time header and :func:`nodes_text`, as before rich."""
    out = stream if stream is not None else sys.stdout
    rows: list[dict[str, Any]] = []
    if console is None and not use_rich(out, no_color=no_color):
        rounds = 0
        while True:
            rows = await fetch()
            out.write("\n" + _watch_header(interval) + "\n" + nodes_text(rows))
            out.flush()
            rounds += 1
            if count and rounds >= count:
                return rows
            await asyncio.sleep(interval)
    con = console if console is not None else Console(file=out)

    def view(rows: list[dict[str, Any]]) -> RenderableType:
        parts: list[RenderableType] = [Text(_watch_header(interval), style="dim"), nodes_table(rows)]
        errors = _node_errors(rows)
        if errors is not None:
            parts.append(errors)
        parts.extend(Text(line, style="dim") for line in _fleet_footer(rows))
        return Group(*parts)

    rounds = 0
    with Live(Text("fetching nodes…", style="dim"), console=con, auto_refresh=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            rows = await fetch()
            live.update(view(rows), refresh=True)
            rounds += 1
            if count and rounds >= count:
                return rows
            await asyncio.sleep(interval)
