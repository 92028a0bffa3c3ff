"""The rich terminal UI (asm_cli.ui): what a terminal shows, and that a pipe / NO_COLOR / --no-color get
the plain text the CLI printed before rich, unchanged."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from asm_cli.ui import (
    RunView,
    add_no_color_option,
    nodes_table,
    nodes_text,
    print_nodes,
    print_runs,
    run_rendering,
    runs_table,
    runs_text,
    use_rich,
    watch_nodes,
)
from asm_controller._events import Event
from asm_controller._reducer import EventReducer, Result
from asm_controller.extensions.rendering import CompactRenderer, Rendering, TTYSink
from asm_wire import KIND_VALUES, pb

ROOT = Path(__file__).resolve().parent.parent
SPINNER_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def ev(seq: int, kind: str, run_id: str = "r-42", **payload: Any) -> Event:
    msg = pb.Event(id=f"{run_id}:{seq}", run_id=run_id, session_id="s1", provider="claude", seq=seq,
                   kind=KIND_VALUES[kind], timestamp_unix_nano=seq * 10_000_000)
    getattr(msg, kind).CopyFrom(getattr(pb, "".join(p.title() for p in kind.split("_")))(**payload))
    return Event(msg)


def events() -> list[Event]:
    return [
        ev(1, "run_started", pid=7),
        ev(2, "assistant_delta", content="Let me "),
        ev(3, "assistant_delta", content="check [bold]this[/bold]."),
        ev(4, "tool_use", tool_name="Bash", tool_call_id="c1", input_json=json.dumps({"command": "echo hi"})),
        ev(5, "tool_result", tool_call_id="c1", content_json=json.dumps("hi\n")),
        ev(6, "tool_use", tool_name="Read", tool_call_id="c2", input_json=json.dumps({"file_path": "/w/a.py"})),
        ev(7, "tool_result", tool_call_id="c2", is_error=True, content_json=json.dumps("Error: no such file")),
        ev(8, "error", message="line dropped", code="buffer_overflow", severity=pb.SEVERITY_WARNING),
        ev(9, "assistant_message", content=[pb.ContentBlock(type="text", text="Done.")]),
        ev(10, "cost_update", input_tokens=1234, output_tokens=56, cost_usd=0.0123),
        ev(11, "run_completed", status="completed", exit_code=0, duration_ms=1200),
    ]


def result_of(evs: Sequence[Event]) -> Result:
    r = EventReducer("r-42", "s1", "claude")
    for e in evs:
        r.apply(e)
    return r.result()


def drive(rendering: Rendering, evs: Sequence[Event]) -> None:
    for e in evs:
        rendering.feed(e)
    rendering.finish(result_of(evs))


def terminal(width: int = 80) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, record=True, width=width, force_terminal=True, color_system="standard"), buf


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- the run view ----------------------------------------------------------------------------------


def test_terminal_shows_the_run_id_and_a_spinner_while_waiting() -> None:
    console, _ = terminal()
    view = RunView(console, run_id="r-42", live=False)
    console.print(view)  # the footer a live view redraws
    shown = console.export_text()
    assert "run r-42" in shown and "waiting for output" in shown
    assert shown[0] in SPINNER_FRAMES


def test_a_silent_run_says_for_how_long() -> None:
    console, _ = terminal()
    view = RunView(console, live=False)
    view.write_event(ev(1, "run_started", run_id="r-7"), [])
    console.print(view)
    assert "run r-7" in console.export_text() and "silent" not in console.export_text()
    view.last_event = time.monotonic() - 5  # five seconds without an event
    console.print(view)
    assert "silent for 5s" in console.export_text()


def test_live_view_streams_text_panels_and_the_summary() -> None:
    console, buf = terminal()
    rendering = Rendering(CompactRenderer(), [RunView(console, run_id="r-42", refresh_per_second=20)])
    drive(rendering, events())
    raw = buf.getvalue()
    shown = console.export_text()
    assert "run r-42" in shown and any(f in shown for f in SPINNER_FRAMES)  # the live footer was drawn
    assert "Let me check [bold]this[/bold]." in shown  # agent text is never read as markup
    assert "╭─ ▸ Bash" in shown and "│ echo hi" in shown and "╭─ ✓ Bash" in shown and "│ hi" in shown
    assert "╭─ ✗ Read" in shown and "Error: no such file" in shown
    assert "⚠ warning (buffer_overflow): line dropped" in shown
    last = [line for line in shown.splitlines() if line.strip()][-1]
    assert last == "✔ completed in 100ms · 1,234 in / 56 out tokens · $0.0123 · run r-42"
    assert "\x1b[33m⚠ warning" in raw and "\x1b[32m✔ completed" in raw  # styled
    assert raw.endswith("\n") and "\x1b[?25h" in raw  # the cursor is shown again


def test_text_without_a_footer_streams_as_it_comes() -> None:
    console, _ = terminal()
    view = RunView(console, live=False)
    rendering = Rendering(CompactRenderer(), [view])
    rendering.feed(ev(1, "assistant_delta", content="half a li"))
    assert console.export_text(clear=False) == "half a li"
    drive(rendering, events()[3:])
    lines = console.export_text().splitlines()
    assert lines[0] == "half a li" and lines[1].startswith("╭─ ▸ Bash")


def test_piped_output_is_todays_plain_text() -> None:
    out, err = io.StringIO(), io.StringIO()
    old_out, old_err = io.StringIO(), io.StringIO()
    rendering = run_rendering(out, err)
    assert isinstance(rendering.sinks[0], TTYSink)
    drive(rendering, events())
    drive(Rendering(CompactRenderer(), [TTYSink(old_out, meta_stream=old_err)]), events())
    assert (out.getvalue(), err.getvalue()) == (old_out.getvalue(), old_err.getvalue())
    assert out.getvalue() == "Let me check [bold]this[/bold].\nDone.\n"  # only the answer on stdout
    assert "▸ Bash: echo hi\n" in err.getvalue() and "\x1b" not in err.getvalue()
    assert err.getvalue().endswith("✔ completed in 100ms · 1,234 in / 56 out tokens · $0.0123\n")


def test_no_color_env_and_flag_give_plain_text_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert use_rich(FakeTTY()) and not use_rich(io.StringIO())
    out, err = FakeTTY(), FakeTTY()
    flagged = run_rendering(out, err, no_color=True)
    assert isinstance(flagged.sinks[0], TTYSink)
    drive(flagged, events())
    assert "\x1b" not in out.getvalue() + err.getvalue() and "✔ completed" in err.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_rich(FakeTTY())
    assert isinstance(run_rendering(FakeTTY(), FakeTTY()).sinks[0], TTYSink)
    monkeypatch.delenv("NO_COLOR")
    live = run_rendering(FakeTTY(), FakeTTY(), live=False)
    assert isinstance(live.sinks[0], RunView)
    live.close()
    assert isinstance(run_rendering(FakeTTY(), io.StringIO()).sinks[0], TTYSink)  # stderr to a file: plain


def test_closing_without_a_summary_ends_the_open_line() -> None:
    console, buf = terminal()
    rendering = Rendering(CompactRenderer(), [RunView(console)])
    rendering.feed(ev(1, "assistant_delta", content="detached mid-li"))
    rendering.close()
    assert buf.getvalue().endswith("detached mid-li\n")


# -- tables -------------------------------------------------------------------------------------------


def node_row(name: str, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "node": f"{name}.example.internal:50051", "node_id": name, "version": "0.1.0", "protocol": 1,
        "epoch": "01JABCDEFGHJKMNPQRSTVWXYZ0", "state": "ready", "health": "healthy", "up": True,
        "heartbeat_age_s": 0.4, "labels": {}, "load": {"active_runs": 1, "max_runs": 8},
        "providers": [{"name": p, "available": p != "amp", "version": "2.0.14 (Claude Code)", "cli_path": "/x"}
                      for p in ("claude", "codex", "gemini", "amp", "shell")],
        "host": {}, "capabilities": [],
    }
    row.update(over)
    return row


def node_rows() -> list[dict[str, Any]]:
    """Fresh rows: the drain deadline is 30 s from *now* (a module-level list went stale in a long run)."""
    return [
    node_row("alpha"),
    node_row("beta", state="draining", drain_deadline_unix_nano=time.time_ns() + 30_000_000_000),
    {"node": "10.0.0.9:50051", "error": {"kind": "unavailable", "reason": "unreachable",
                                          "message": "node 10.0.0.9:50051 is unreachable: connection refused"}},
]


def run_row(i: int) -> dict[str, Any]:
    return {"run_id": f"run-{i:04d}-0123456789abcdef0123456789abcdef", "session_id": f"sess-{i}-0123456789abcdef",
            "provider": "claude", "node": "alpha.example.internal:50051", "status": "completed" if i else "running",
            "started": "2026-12-01T14:00:00Z", "started_unix_nano": 1, "finished_unix_nano": 2,
            "duration_s": 12.5 if i else None, "last_seq": 9, "exit_code": 0, "owner": ""}


RUN_ROWS = [run_row(i) for i in range(3)]


def test_plain_tables_are_the_text_asm_printed_before_rich() -> None:
    text = nodes_text(node_rows())
    lines = text.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "HEALTH", "EPOCH", "LOAD", "HEARTBEAT", "PROVIDERS"]
    assert lines[0].startswith("NODE  ") and text.count("NODE  ") == 1
    assert lines[1].startswith("alpha.example.internal:50051  ready ")
    assert "claude 2.0.14 (Claude Code), codex" in lines[1] and "amp (missing)" in lines[1]
    assert "draining (deadline in 30s)" in lines[2] or "draining (deadline in 29s)" in lines[2]
    assert lines[3].split()[:2] == ["10.0.0.9:50051", "error"] and lines[3].endswith("  unreachable")
    assert lines[4] == "  10.0.0.9:50051: node 10.0.0.9:50051 is unreachable: connection refused"
    runs = runs_text(RUN_ROWS).splitlines()
    assert runs[0] == "RUN" + " " * 40 + "SESSION" + " " * 18 + "PROVIDER  NODE" + " " * 26 + \
        "STATUS     STARTED               DURATION"
    assert runs[1].endswith("running    2026-12-01T14:00:00Z  -") and runs[2].endswith("  12.5s")
    out = io.StringIO()
    print_nodes(node_rows(), out)
    print_runs(RUN_ROWS, out)
    assert out.getvalue() == text + runs_text(RUN_ROWS)


@pytest.mark.parametrize("width", [80, 120])
def test_rich_tables_fit_the_width_one_line_per_row(width: int) -> None:
    console, _ = terminal(width)
    console.print(nodes_table(node_rows()))
    console.print(runs_table(RUN_ROWS))
    shown = console.export_text().splitlines()
    assert all(len(line) <= width for line in shown), shown
    assert len(shown) == 1 + 3 + 1 + 3  # a header and one line per row: long cells are cut, never wrapped
    assert shown[0].split() == ["NODE", "STATE", "HEALTH", "EPOCH", "LOAD", "HEARTBEAT", "PROVIDERS"]
    assert shown[4].split() == ["RUN", "SESSION", "PROVIDER", "NODE", "STATUS", "STARTED", "DURATION"]
    assert [line.split()[1] for line in shown[1:4]] == ["ready", "draining" if width > 80 else "drainin…", "error"]
    assert all(line.split()[-3:-1] == ["12-01", "14:00:00"] for line in shown[5:])
    assert all(line.split()[2] == "claude" for line in shown[5:])
    assert "…" in shown[1] and shown[3].startswith("10.0.0.9:50")


def test_print_on_a_terminal_uses_the_rich_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "80")
    out = FakeTTY()
    print_nodes(node_rows(), out)
    assert "\x1b[" in out.getvalue() and "connection refused" in out.getvalue()
    plain = FakeTTY()
    print_runs(RUN_ROWS, plain, no_color=True)
    assert plain.getvalue() == runs_text(RUN_ROWS)


def test_watch_nodes_live_table_and_plain_rounds() -> None:
    fetched = 0
    rows_now = node_rows()

    async def fetch() -> list[dict[str, Any]]:
        nonlocal fetched
        fetched += 1
        return rows_now[:1] if fetched == 1 else rows_now

    console, buf = terminal()
    rows = asyncio.run(watch_nodes(fetch, 0.01, count=2, console=console))
    assert rows == rows_now and fetched == 2
    assert "every 0.01s (Ctrl-C to stop)" in console.export_text()
    assert "\x1b[2K" in buf.getvalue() or "\x1b[1A" in buf.getvalue()  # redrawn in place, not appended
    pipe = io.StringIO()
    fetched = 0
    asyncio.run(watch_nodes(fetch, 0.01, count=2, stream=pipe))
    text = pipe.getvalue()
    assert text.count("every 0.01s (Ctrl-C to stop)\n") == 2 and text.count("NODE  ") == 2
    assert text.endswith(nodes_text(rows_now)) and "\x1b" not in text


# -- a real terminal --------------------------------------------------------------------------------

DRIVER = """
import json, sys, time
from asm_controller._events import Event
from asm_controller._reducer import EventReducer
from asm_cli.ui import run_rendering
from asm_wire import KIND_VALUES, pb

def ev(seq, kind, **payload):
    msg = pb.Event(id=f"r-tmux:{seq}", run_id="r-tmux", session_id="s1", provider="claude", seq=seq,
                   kind=KIND_VALUES[kind], timestamp_unix_nano=seq * 10_000_000)
    getattr(msg, kind).CopyFrom(getattr(pb, "".join(p.title() for p in kind.split("_")))(**payload))
    return Event(msg)

red = EventReducer("r-tmux", "s1", "claude")
rendering = run_rendering(run_id="r-tmux")
def feed(e):
    red.apply(e)
    rendering.feed(e)
print("asm: a notice", file=sys.stderr)
open(sys.argv[1] + ".waiting", "w").close()
while not __import__("os").path.exists(sys.argv[1] + ".go"):
    time.sleep(0.02)
feed(ev(1, "run_started", pid=1))
feed(ev(2, "assistant_delta", content="Thinking about it"))
while not __import__("os").path.exists(sys.argv[1] + ".go2"):  # the test has seen the run go silent
    time.sleep(0.02)
feed(ev(3, "assistant_delta", content=" done.\\n"))
feed(ev(4, "tool_use", tool_name="Bash", tool_call_id="c1", input_json=json.dumps({"command": "echo hi"})))
feed(ev(5, "tool_result", tool_call_id="c1", content_json=json.dumps("hi\\n")))
feed(ev(6, "run_completed", status="completed", exit_code=0, duration_ms=1200))
rendering.finish(red.result())
print("END-OF-DRIVE", flush=True)
time.sleep(60)
"""


def _wait_for(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_real_terminal_shows_the_spinner_then_the_run(tmp_path: Path) -> None:
    script = tmp_path / "drive.py"
    script.write_text(DRIVER)
    flag = tmp_path / "flag"
    sock = f"asm-ui-test-{tmp_path.name}"
    env = ["-e", "NO_COLOR=", "-e", "TERM=xterm-256color", "-e", f"PYTHONPATH={ROOT}"]
    subprocess.run(["tmux", "-L", sock, "-f", "/dev/null", "new-session", "-d", "-x", "100", "-y", "30", *env,
                    f"{sys.executable} {script} {flag}"], check=True, cwd=ROOT)

    def screen() -> str:
        return subprocess.run(["tmux", "-L", sock, "capture-pane", "-p"], capture_output=True, text=True).stdout

    try:
        assert _wait_for(lambda: Path(str(flag) + ".waiting").exists() and "waiting for output" in screen()), \
            screen()
        waiting = screen()
        assert "run r-tmux" in waiting and "asm: a notice" in waiting
        assert any(f in waiting for f in SPINNER_FRAMES)
        Path(str(flag) + ".go").touch()
        assert _wait_for(lambda: "silent for " in screen()), screen()
        silent = screen()
        assert "Thinking about it" in silent and "waiting for output" not in silent  # the unfinished line
        Path(str(flag) + ".go2").touch()
        assert _wait_for(lambda: "END-OF-DRIVE" in screen()), screen()
        done = [line.rstrip() for line in screen().splitlines() if line.strip()]
        assert done[-1] == "END-OF-DRIVE"
        assert done[-2] == "✔ completed in 50ms · run r-tmux"
        assert "Thinking about it done." in done and "│ echo hi  │" in done and "│ hi       │" in done
        assert not any(f in "".join(done) for f in SPINNER_FRAMES)  # the spinner is gone at the end
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)


def test_no_color_option() -> None:
    parser = argparse.ArgumentParser()
    add_no_color_option(parser)
    assert parser.parse_args([]).no_color is False and parser.parse_args(["--no-color"]).no_color is True


def test_a_replayed_tool_call_is_drawn_once() -> None:
    console, _ = terminal()
    rendering = Rendering(CompactRenderer(), [RunView(console, live=False)])
    evs = events()
    for e in evs[:5] + evs[3:5]:  # an attach that overlaps what was shown: seq 4 and 5 again
        rendering.feed(e)
    rendering.close()
    shown = console.export_text()
    assert shown.count("╭─ ▸ Bash") == 1 and shown.count("╭─ ✓ Bash") == 1
