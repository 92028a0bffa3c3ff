"""Conformance, partial streaming: the real Claude Code, Codex and Gemini CLIs answering SCENARIO_SLOW (the
scripted model server streams 40 text deltas 0.25 s apart) through a node agent process and the controller.

What each CLI does with a streamed answer, as observed and asserted here:

* Claude Code (``--include-partial-messages``, asm's default) and Gemini CLI (``stream-json``) print each
  model delta as it comes: the client gets one ``assistant_delta`` per model delta, spread over the ~10 s
  of the answer, then the whole message (Claude) or nothing more (Gemini); the Result's text is the
  streamed text, once.
* Codex (``exec --json``) prints an agent message only whole (``item.completed``), once the model's stream
  is over: no ``assistant_delta`` at all, one ``assistant_message`` at the end. That is the CLI's output,
  not asm buffering it (its manifest says so: "agent messages arrive whole").

Times are the events' own timestamps (stamped on the node as each line is parsed), with bounds a fraction
of the scripted answer's length, plus the client's receipt times with the same loose bounds: the text
reaches the client while the run goes on, not in a burst at its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from asm_controller import Event, RemoteNode, Result, Session
from asm_node.providers import provider_class
from tests.support.cli_env import CLI_NAMES
from tests.support.conformance import OPTIONS, new_workspace, start_cli_node
from tests.support.fake_model_server import SLOW_DELTAS, SLOW_INTERVAL, FakeModelServer
from tests.support.processes import NodeProcess

pytestmark = pytest.mark.real_cli  # every test here drives an installed CLI (skipped without it)

# As tests/test_conformance.py: Gemini's model pinned (skips its router), Codex outside a git repo.
#: The scripted slow answer, as fake_model_server streams it ("slow0 slow1 ... slow38 done.").
EXPECTED = "".join([f"slow{i} " for i in range(SLOW_DELTAS - 1)] + ["done."])
#: How long the model server takes to stream it (the pause is between deltas).
STREAM_S = (SLOW_DELTAS - 1) * SLOW_INTERVAL
#: The CLIs that print the model's text deltas as they come; the others print whole messages.
STREAMS_DELTAS = {"claude": True, "gemini": True, "codex": False}


@pytest.fixture(scope="module")
def model_server() -> Iterator[FakeModelServer]:
    server = FakeModelServer(slow_deltas=SLOW_DELTAS, slow_interval=SLOW_INTERVAL).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=CLI_NAMES)
def cli_node(request: pytest.FixtureRequest, model_server: FakeModelServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, NodeProcess, Path]]:
    name: str = request.param
    scratch = tmp_path_factory.mktemp(f"stream-{name}")
    node = start_cli_node(name, model_server, scratch)
    workspace = new_workspace(scratch)
    try:
        yield name, node, workspace
    finally:
        node.stop()


def stamp(ev: Event) -> float:
    """The event's node-side timestamp, in seconds."""
    return ev.pb.timestamp_unix_nano / 1e9


def text_of(ev: Event) -> str:
    if ev.kind == "assistant_delta":
        return str(ev.payload["content"])
    return "".join(b["text"] for b in ev.payload["content"] if b["type"] == "text")


async def slow_run(cli_node: tuple[str, NodeProcess, Path]) -> tuple[list[tuple[Event, float]], Result]:
    """The SCENARIO_SLOW run's events, each with the client's (monotonic) receipt time, and its Result."""
    name, node, workspace = cli_node
    loop = asyncio.get_running_loop()
    async with Session(name, node=RemoteNode(node.address), cwd=str(workspace), options=OPTIONS[name]) as s:
        stream = s.stream("Talk slowly. SCENARIO_SLOW")
        received = [(ev, loop.time()) async for ev in stream]
    assert stream.result is not None
    return received, stream.result


async def test_a_slow_answer_streams_as_the_cli_prints_it(cli_node: tuple[str, NodeProcess, Path]) -> None:
    name = cli_node[0]
    received, result = await slow_run(cli_node)
    events = [ev for ev, _ in received]
    assert result.ok, result.error
    assert [e.kind for e in events][-2:] == ["result", "run_completed"]
    # The reduced text is the answer once: a message after the deltas replaces them, never adds to them.
    assert result.text == EXPECTED
    deltas = [(ev, t) for ev, t in received if ev.kind == "assistant_delta"]
    messages = [ev for ev in events if ev.kind == "assistant_message"]
    done, done_at = received[-1]
    assert done.kind == "run_completed"

    if not STREAMS_DELTAS[name]:
        # Codex: its agent message comes whole, at the end of the model's stream (no deltas to show).
        cls = provider_class(name)
        assert cls is not None and "arrive whole" in cls.features["streaming"][1]  # and asm says so
        assert deltas == [] and [text_of(m) for m in messages] == [EXPECTED]
        assert stamp(messages[0]) - stamp(events[0]) >= 0.8 * STREAM_S  # not before the model was done
        return

    # Several deltas (the server sent 40; a CLI could merge a few), their text the answer, in order.
    assert len(deltas) >= SLOW_DELTAS // 2, [e.kind for e in events]
    assert "".join(text_of(ev) for ev, _ in deltas) == EXPECTED
    assert [text_of(m) for m in messages] in ([EXPECTED], [])  # Claude repeats it whole; Gemini does not
    stamps = [stamp(ev) for ev, _ in deltas]
    assert stamps == sorted(stamps)
    # Incremental: the deltas are spread over the answer, the first well before the run's end.
    assert stamps[-1] - stamps[0] >= 0.5 * STREAM_S, stamps
    assert stamp(done) - stamps[0] >= 0.5 * STREAM_S
    # And the client got them as they came (the controller and gRPC stream add no buffering).
    first_at, last_at = deltas[0][1], deltas[-1][1]
    assert last_at - first_at >= 0.5 * STREAM_S and done_at - first_at >= 0.5 * STREAM_S
