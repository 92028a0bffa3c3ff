"""Binary stdout is lossless: the shell parser decodes only valid UTF-8, other lines travel as bytes.

The regression: every byte that was not UTF-8 became U+FFFD (200 MB of output became
362 MB of replacement characters, and the bytes were gone). Now a delta carries either
``content`` (valid UTF-8) or ``data`` (the exact bytes); JSONL shows ``data_b64``.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asm_controller import Event, RemoteNode, Session
from asm_controller._reducer import EventReducer
from asm_node.providers.shell import ShellParser
from asm_node.server import NodeServer
from asm_wire import pb
from tests.support.processes import PYTHON_BASENAME, ROOT, NodeProcess

MIB = 1 << 20
EMIT = "import sys\nsys.stdout.buffer.write(open('blob', 'rb').read())\n"


def random_blob(size: int = MIB, seed: int = 9) -> bytes:
    # Ends with a newline: a final line without one gets one from the node's line framing.
    return random.Random(seed).randbytes(size - 1) + b"\n"


def delta_bytes(line: dict[str, Any]) -> bytes:
    payload = line["payload"]
    if "data_b64" in payload:
        assert payload["content"] == ""
        return base64.b64decode(payload["data_b64"])
    return str(payload["content"]).encode()


def test_shell_parser_decodes_only_valid_utf8() -> None:
    parser = ShellParser([0])
    out: list[pb.Event] = []
    parser.feed_lines([b"hello", "café ✓".encode(), b"\xff\xfe\x00bin", b"crlf\r", b"", b"\xc3"], out)
    deltas = [ev.assistant_delta for ev in out]
    assert [(d.content, d.data) for d in deltas] == [
        ("hello\n", b""), ("café ✓\n", b""), ("", b"\xff\xfe\x00bin\n"), ("crlf\r\n", b""), ("\n", b""),
        ("", b"\xc3\n"),  # a truncated sequence is not text either
    ]
    assert all("\ufffd" not in d.content for d in deltas)


def test_event_dict_carries_bytes_as_base64_and_text_unchanged() -> None:
    binary = Event(pb.Event(kind=pb.EVENT_KIND_ASSISTANT_DELTA, assistant_delta=pb.AssistantDelta(data=b"\x80\x00\n")))
    text = Event(pb.Event(kind=pb.EVENT_KIND_ASSISTANT_DELTA, assistant_delta=pb.AssistantDelta(content="hi\n")))
    raw = Event(pb.Event(kind=pb.EVENT_KIND_RAW, raw=pb.Raw(stream="stdout", data=b"\xfe{")))
    assert binary.to_dict()["payload"]["data_b64"] == base64.b64encode(b"\x80\x00\n").decode()
    assert "data_b64" not in text.to_dict()["payload"] and "data" not in text.to_dict()["payload"]
    assert raw.to_dict()["payload"]["data_b64"] == base64.b64encode(b"\xfe{").decode()
    assert (binary.output_bytes, text.output_bytes, raw.output_bytes) == (b"\x80\x00\n", b"hi\n", b"\xfe{")
    # The Result text is for display: bytes decoded with replacement, the event keeps them exactly.
    reducer = EventReducer("r", "s", "shell")
    for seq, ev in enumerate((text, binary), 1):
        ev.pb.seq = seq
        reducer.apply(ev)
    assert reducer.result().text == "hi\n\ufffd\x00\n"


async def test_a_mebibyte_of_random_bytes_comes_back_exactly(grpc_node: NodeServer, tmp_path: Path) -> None:
    blob = random_blob()
    (tmp_path / "blob").write_bytes(blob)
    (tmp_path / "emit.py").write_text(EMIT)
    async with Session("shell", node=RemoteNode(f"127.0.0.1:{grpc_node.port}"), cwd=str(tmp_path)) as s:
        stream = s.stream(f"{PYTHON_BASENAME} emit.py")
        events = [ev async for ev in stream]
    result = stream.result
    assert result is not None and result.ok, result
    deltas = [ev for ev in events if ev.kind == "assistant_delta"]
    assert b"".join(ev.output_bytes for ev in deltas) == blob
    assert any(ev.pb.assistant_delta.data for ev in deltas)  # random bytes are mostly not UTF-8
    assert all(not (ev.pb.assistant_delta.data and ev.pb.assistant_delta.content) for ev in deltas)
    assert result.text == "".join(ev.output_bytes.decode("utf-8", "replace") for ev in deltas)


@pytest.mark.slow
def test_cli_jsonl_and_the_recorded_store_keep_the_bytes_without_inflation(
        node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_process("--shell-allow", PYTHON_BASENAME)
    blob = random_blob()
    (tmp_path / "blob").write_bytes(blob)
    (tmp_path / "emit.py").write_text(EMIT)
    store = tmp_path / "events.jsonl"

    def asm(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "asm_cli", *args], capture_output=True, timeout=120,
                              cwd=str(ROOT))

    live = asm("run", "--node", node.address, "--provider", "shell", "--cwd", str(tmp_path), "--output", "jsonl",
               "--record", str(store), f"{PYTHON_BASENAME} emit.py")
    assert live.returncode == 0, live.stderr.decode()
    raw_lines = live.stdout.splitlines()
    lines = [json.loads(x) for x in raw_lines]
    deltas = [x for x in lines if x.get("kind") == "assistant_delta"]
    assert b"".join(delta_bytes(x) for x in deltas) == blob
    # The output's share of the JSONL is base64's 4/3 (plus JSON quoting of the few text lines), not 3x.
    carried = sum(len(x["payload"].get("data_b64", "")) + len(json.dumps(x["payload"]["content"])) for x in deltas)
    assert carried < 1.45 * len(blob), carried / len(blob)
    assert b"\\ufffd" not in b"".join(raw_lines[:-1])
    # The store holds the same bytes: the replay gives them back exactly.
    replay = asm("replay", str(store), "--output", "jsonl")
    assert replay.returncode == 0, replay.stderr.decode()
    replayed = [json.loads(x) for x in replay.stdout.splitlines()]
    assert b"".join(delta_bytes(x) for x in replayed if x.get("kind") == "assistant_delta") == blob
    assert store.stat().st_size < 3 * len(blob)  # pb base64 in the store: ~4/3 of the output, plus headers


def test_json_cli_parsers_keep_non_utf8_lines_exactly() -> None:
    # A JSON CLI's non-JSON line that is not UTF-8 used to become U+FFFD in raw.content.
    from asm_node.providers import ClaudeProvider

    provider = ClaudeProvider()
    parser = provider.parser_class(provider, 0.0, 0.0, False)
    junk, text = b"\xff\xfe binary \x80\x81", "plain words ü"
    out: list[pb.Event] = []
    parser.feed_lines([junk, text.encode()], out)
    raws = [e.raw for e in out if e.WhichOneof("payload") == "raw"]
    assert [(r.content, r.data) for r in raws] == [("", junk), (text, b"")]
    events = [Event(e) for e in out]
    assert [e.output_bytes for e in events] == [junk, text.encode()]
    assert base64.b64decode(events[0].to_dict()["payload"]["data_b64"]) == junk
