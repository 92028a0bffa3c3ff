"""Hypothesis fuzzing of every provider's output parser with mutated real CLI captures.

The captures in tests/fixtures/cli/ are real output of the Claude Code, Codex, Gemini and Amp CLIs
(Claude/Codex/Gemini recorded by scripts/record_fixtures.py against tests/support/fake_model_server.py). Each example takes
one capture and mutates it the way a broken pipe, a new CLI version or a hostile tool output
would: byte flips, truncation, dropped/duplicated/shuffled lines, JSON values swapped for another
type, hostile lines (deep nesting, 5,000-digit numbers, lone surrogates, NUL, invalid UTF-8).

The contract under test (asm_node.providers.base.LineParser): ``feed_lines`` and ``finish``
never raise, whatever the bytes, and every event they return is valid: a known kind whose payload
is that kind's, serializable, with its JSON fields valid JSON, and accepted by the controller's
reducer. Deterministic (``derandomize``) and bounded, so CI runs the same examples every time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asm_controller import Event, EventReducer
from asm_node.providers import AmpProvider, ClaudeProvider, CodexProvider, GeminiProvider, RunSpec, ShellProvider
from asm_node.providers.base import ExitInfo, LineParser, Provider
from asm_wire import KIND_NAMES, pb

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cli"
PROVIDERS: dict[str, Provider] = {
    "claude": ClaudeProvider(), "codex": CodexProvider(), "gemini": GeminiProvider(), "amp": AmpProvider(),
    "shell": ShellProvider(["echo"], [], False),
}
CAPTURES: dict[str, list[str]] = {
    "claude": ["claude_text.jsonl", "claude_tool.jsonl"],
    "codex": ["codex_text.jsonl", "codex_tool.jsonl"],
    "gemini": ["gemini_text.jsonl", "gemini_tool.jsonl"],
    "amp": ["amp_stream_json.jsonl"],
}
CAPTURES["shell"] = [name for names in CAPTURES.values() for name in names]  # any bytes are shell output
FUZZ = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Lines no CLI should print, but a broken one (or a tool's output echoed raw) can.
HOSTILE_LINES = [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the json module's recursion limit
    b'{"type":"assistant","message":' * 5_000 + b"{}" + b"}" * 5_000,
    b"1" * 5_000,  # an integer past int_max_str_digits
    b'{"type":"result","usage":{"input_tokens":' + b"9" * 5_000 + b"}}",
    b'{"type":"result","usage":{"input_tokens":1e400,"output_tokens":-1e400}}',
    b'"\\ud800"', b'{"type":"text","text":"\\udfff"}', b'{"session_id":"\\ud800x"}',
    b'{"type":"\\u0000","session_id":"a\\u0000b"}', b"\x00\x00\x00", b"\xff\xfe\xfd{\"type\":",
    b"NaN", b"Infinity", b"-Infinity", b'{"a":NaN}', b"null", b"true", b"[]", b"{}", b'""', b"0", b"-1",
    b"\r", b" \t ", b"\xef\xbb\xbf{}", b"x" * 200_000,
]

#: Values a JSON field may be swapped for (a type the parser does not expect).
SWAP_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**63, -(2**80), 1.5, 1e308, -1e308, "", "x" * 10_000, "\u0000", "\ud800",
    "\u202e\u00e9\U0001f600", [], [None], {}, {"type": None}, [[[[[]]]]], {"text": 5}, "not-a-number",
]


def fixture(name: str) -> list[bytes]:
    return (FIXTURES / name).read_bytes().splitlines()


def new_parser(provider: str) -> LineParser:
    p = PROVIDERS[provider]
    mode = "default"
    options = p.validate_options({}, mode)
    spec = RunSpec(run_id="r1", session_id="s1", provider=provider, prompt="hi", cwd="/tmp", permission_mode=mode,
                   options=options, env={})
    return p.new_parser(spec)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


@st.composite
def swapped(draw: st.DrawFn, line: bytes) -> bytes:
    """The line with one JSON value (anywhere in it) replaced by a value of another type."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # a hostile line nested past the json module's recursion limit
        return line
    paths = _paths(obj)
    if not paths:
        return line
    _set(obj, draw(st.sampled_from(paths)), draw(st.sampled_from(SWAP_VALUES)))
    return json.dumps(obj).encode("utf-8", "surrogatepass")


@st.composite
def mutated_capture(draw: st.DrawFn, provider: str) -> list[bytes]:
    lines = list(fixture(draw(st.sampled_from(CAPTURES[provider]))))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "drop", "dup", "shuffle", "swap", "hostile", "split"]))
        if not lines:
            lines = [b""]
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        if op == "flip" and line:
            j = draw(st.integers(0, len(line) - 1))
            lines[i] = line[:j] + bytes([line[j] ^ draw(st.integers(1, 255))]) + line[j + 1:]
        elif op == "truncate":
            lines[i] = line[: draw(st.integers(0, len(line)))]
        elif op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, line)
        elif op == "shuffle":
            lines = draw(st.permutations(lines))
        elif op == "swap":
            lines[i] = draw(swapped(line))
        elif op == "hostile":
            lines.insert(i, draw(st.sampled_from(HOSTILE_LINES)))
        elif op == "split" and line:  # a line broken in two (a write cut mid-way)
            j = draw(st.integers(0, len(line)))
            lines[i: i + 1] = [line[:j], line[j:]]
    if draw(st.booleans()):
        lines.append(draw(st.binary(max_size=200)))
    return lines


exits = st.builds(
    ExitInfo,
    returncode=st.one_of(st.none(), st.sampled_from([0, 1, 2, 127, 130, 137, 143, 145, 255]),
                         st.integers(-(2**31), 2**31)),
    signal=st.sampled_from([0, 0, 0, 9, 15, 2]),
    # As the run makes it: the stderr bytes decoded with errors="replace".
    stderr_tail=st.one_of(st.binary(max_size=300), st.sampled_from([
        b"Error: 401 Unauthorized", b"429 Too Many Requests", b"cd: /x: No such file or directory", b"please log in",
        b"\x00\xed\xa0\x80" * 3])).map(lambda b: b.decode("utf-8", "replace")),
)


def check_event(ev: pb.Event) -> None:
    """A valid event: a known kind, that kind's payload, serializable, JSON fields that parse."""
    assert isinstance(ev, pb.Event)
    assert 0 < ev.kind < len(KIND_NAMES), ev
    payload = ev.WhichOneof("payload")
    assert payload == KIND_NAMES[ev.kind], (payload, KIND_NAMES[ev.kind])
    pb.Event.FromString(ev.SerializeToString())
    body = getattr(ev, payload)
    for field in ("input_json", "content_json", "output_json", "json"):
        text = getattr(body, field, "")
        if text:
            json.loads(text)
    for blk in getattr(body, "content", []) if payload in ("assistant_message", "user_message") else []:
        if blk.json:
            json.loads(blk.json)


def run_parser(provider: str, lines: list[bytes], chunks: list[int], exit: ExitInfo) -> list[pb.Event]:
    parser = new_parser(provider)
    out: list[pb.Event] = []
    start = 0
    for size in chunks:  # lines arrive in batches of any size
        parser.feed_lines(lines[start: start + size], out)
        start += size
    parser.feed_lines(lines[start:], out)
    out += parser.finish(exit)
    assert parser.finish(exit) == []  # finish is once
    for ev in out:
        check_event(ev)
    # The controller's reducer accepts the stream as the node would stamp it.
    out.append(pb.Event(kind=pb.EVENT_KIND_RUN_COMPLETED, run_completed=pb.RunCompleted(
        status="failed" if parser.failed else "completed")))
    reducer = EventReducer("r1", "s1", provider)
    for seq, ev in enumerate(out, 1):
        ev.seq = seq
        ev.provider_session_id = parser.provider_session_id
        reducer.apply(Event(ev))
    assert reducer.result().status in ("completed", "failed")
    return out


def _fuzz(provider: str) -> Any:
    @FUZZ
    @given(lines=mutated_capture(provider), chunks=st.lists(st.integers(0, 4), max_size=4), exit=exits)
    def test(lines: list[bytes], chunks: list[int], exit: ExitInfo) -> None:
        run_parser(provider, lines, chunks, exit)
    test.__name__ = f"test_{provider}_parser_survives_mutated_captures"
    test.__doc__ = f"The {provider} parser on mutated real captures: no exception, only valid events."
    return test


test_claude_parser_survives_mutated_captures = _fuzz("claude")
test_codex_parser_survives_mutated_captures = _fuzz("codex")
test_gemini_parser_survives_mutated_captures = _fuzz("gemini")
test_amp_parser_survives_mutated_captures = _fuzz("amp")
test_shell_parser_survives_mutated_captures = _fuzz("shell")


def test_every_hostile_line_alone_in_every_parser() -> None:
    """Each hostile line by itself, before and after a real capture, in every parser (no sampling)."""
    for provider in PROVIDERS:
        for hostile in HOSTILE_LINES:
            for lines in ([hostile], [hostile, *fixture(CAPTURES[provider][0])],
                          [*fixture(CAPTURES[provider][0])[:1], hostile]):
                run_parser(provider, lines, [], ExitInfo(returncode=0, signal=0, stderr_tail=""))


def test_unmutated_captures_still_parse_to_their_results() -> None:
    """The fixtures are the real captures: unmutated, each ends in a completed result, no warning."""
    for provider, names in CAPTURES.items():
        if provider == "shell":
            continue
        for name in names:
            events = run_parser(provider, fixture(name), [], ExitInfo(returncode=0, signal=0, stderr_tail=""))
            kinds = [KIND_NAMES[e.kind] for e in events]
            assert "result" in kinds, (name, kinds)
            assert not [e for e in events if e.kind == pb.EVENT_KIND_ERROR], (name, kinds)
