"""Hypothesis fuzzing of every request message, over real gRPC, to a node and to a controller.

An in-process node agent (``asm_node.start_server``) listens on 127.0.0.1 with its workspace root
a temporary directory and a shell allow-list of only ``echo`` and ``true``; a controller
(``asm_controller.service.start_controller``) routes to it. Both run on an event loop in a thread
of their own; the examples are sent from that loop with real channels.

Every request type the node serves is generated with hostile field values: huge strings, NUL
bytes, any unicode, paths outside the root or with over-long components, ids with a trailing
newline, options_json nested 100k deep, 5,000-digit and 10**400 numbers, non-object JSON, the full
range of every integer field; and whole requests of random or corrupted bytes (a channel call with
identity serializers). The contract: every answer is OK or a *typed* status (INVALID_ARGUMENT,
PERMISSION_DENIED, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAUTHENTICATED,
OUT_OF_RANGE, UNAVAILABLE), never INTERNAL or UNKNOWN, and nothing is logged with a traceback.

Runs really start, so every generated prompt is harmless whatever the options say: its first word
is ``echo``, ``true`` or a command that exists nowhere. Drain/DrainNode are not fuzzed (they would
stop the node taking runs). Deterministic (``derandomize``), bounded, a few seconds per test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asm_controller.service import ControllerConfig, ControllerServer, start_controller
from asm_node import NodeServer, start_server
from asm_wire import pb
from tests.support.processes import node_config

pytestmark = pytest.mark.slow  # hypothesis fuzzing of served nodes and controllers

T = TypeVar("T")
SERVICE = "/asm.v1.NodeService/"
TYPED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE,
}
FUZZ = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
CALL_TIMEOUT = 5.0  # a request that takes longer hangs: a failure too (DEADLINE_EXCEEDED is not typed)

#: (response type, streaming) of every fuzzed method; Drain is left out on purpose.
METHODS: dict[str, tuple[type[Message], bool]] = {
    "Handshake": (pb.HandshakeResponse, False),
    "Preflight": (pb.PreflightResponse, False),
    "StartRun": (pb.EventBatch, True),
    "AttachRun": (pb.EventBatch, True),
    "InterruptRun": (pb.InterruptRunResponse, False),
    "ResolveApproval": (pb.ResolveApprovalResponse, False),
    "SendInput": (pb.SendInputResponse, False),
    "GetRun": (pb.RunInfo, False),
    "ListRuns": (pb.ListRunsResponse, False),
    "Snapshot": (pb.SnapshotInfo, False),
    "Diff": (pb.DiffResponse, False),
    "Rollback": (pb.RollbackResponse, False),
}
#: Run ids the generated StartRun requests use, so the other calls find real runs too.
RUN_IDS = [f"fuzz-run-{i}" for i in range(6)]


# --- the cluster under test ----------------------------------------------------------------------

class _Recorder(logging.Handler):
    """Every log record at WARNING or above, from any thread (caplog's capture is per test function,
    which hypothesis examples cannot share). A record with a traceback fails the example; a plain
    log line (e.g. a rate-limited "malformed request" warning) does not."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        out = []
        for r in self.records:
            text = r.getMessage()
            if r.exc_info or r.exc_text or r.stack_info or "Traceback" in text:
                out.append(f"{r.name}: {text[:300]} {self.format(r)[-1500:] if r.exc_info else ''}")
        return out


@dataclass
class Cluster:
    loop: asyncio.AbstractEventLoop
    node: NodeServer
    controller: ControllerServer
    workspace: Path
    log: _Recorder
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    @property
    def node_address(self) -> str:
        return f"127.0.0.1:{self.node.port}"

    @property
    def controller_address(self) -> str:
        return f"127.0.0.1:{self.controller.port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workspace = tmp_path_factory.mktemp("fuzz-ws")
    (workspace / "sub").mkdir()
    (workspace / "sub" / "file.txt").write_text("fuzz\n")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-cluster", daemon=True)
    thread.start()
    recorder = _Recorder()
    logging.getLogger().addHandler(recorder)

    async def up() -> tuple[NodeServer, ControllerServer]:
        node = await start_server(node_config(workspace_roots=[workspace], shell_allowed_commands=["echo", "true"],
                                              max_runs=64, retention_s=5.0))
        ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{node.port}"]))
        return node, ctl

    node, ctl = asyncio.run_coroutine_threadsafe(up(), loop).result(60)
    c = Cluster(loop, node, ctl, workspace, recorder)

    async def channels() -> None:
        c.channels = {"node": grpc.aio.insecure_channel(c.node_address),
                      "controller": grpc.aio.insecure_channel(c.controller_address)}
    c.run(channels())
    try:
        yield c
    finally:
        async def down() -> None:
            for ch in c.channels.values():
                await ch.close()
            await ctl.stop()
            await node.stop(grace=2.0)
        try:
            c.run(down(), timeout=60)
        finally:
            logging.getLogger().removeHandler(recorder)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


async def call(channel: grpc.aio.Channel, method: str, request: Message | bytes) -> tuple[grpc.StatusCode, str]:
    """Send one request (a message, or raw bytes as the whole request); read every response."""
    response_type, streaming = METHODS[method]
    serializer = None if isinstance(request, bytes) else type(request).SerializeToString
    try:
        if streaming:
            stream = channel.unary_stream(SERVICE + method, request_serializer=serializer,
                                          response_deserializer=response_type.FromString)
            async for _ in stream(request, timeout=CALL_TIMEOUT):  # type: ignore[arg-type]  # bytes: identity
                pass
        else:
            unary = channel.unary_unary(SERVICE + method, request_serializer=serializer,
                                        response_deserializer=response_type.FromString)
            await unary(request, timeout=CALL_TIMEOUT)  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def check(cluster: Cluster, target: str, method: str, request: Message | bytes,
          expect: grpc.StatusCode | None = None) -> None:
    before = len(cluster.log.records)
    code, details = cluster.run(call(cluster.channels[target], method, request))
    shown = request if isinstance(request, bytes) else str(request)[:600]
    assert code in TYPED, f"{target} {method}: {code.name} {details!r} for {shown!r}"
    assert expect is None or code == expect, f"{target} {method}: {code.name}, not {expect.name}, for {shown!r}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{target} {method}: {code.name} without a message"
        # The server's own answer, not gRPC's: an error message that echoes a huge field overflows
        # the 16 KiB metadata limit and reaches the client as "Stream removed" RESOURCE_EXHAUSTED.
        assert not details.startswith("Stream removed"), f"{target} {method}: {details[:200]!r} for {shown!r}"
    new = _slice(cluster.log, before).tracebacks()
    assert not new, f"{target} {method} logged a traceback/error for {shown!r}:\n" + "\n".join(new)


def _slice(rec: _Recorder, start: int) -> _Recorder:
    out = _Recorder()
    out.records = rec.records[start:]
    return out


# --- hostile values -------------------------------------------------------------------------------

HUGE = 200_000


def _deep(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


def big(*makers: Callable[[], str]) -> st.SearchStrategy[str]:
    """Large values, built when drawn (a strategy holding them would have a megabyte repr)."""
    return st.sampled_from(makers).map(lambda make: make())


#: Listed hostile strings (every one is also sent on its own in every field, see listed_requests).
TEXT_CHEAP = [
    "", " ", "\x00", "a\x00b", "\n", "abc\n", "ok-id\n", "\r\n", "\u202e\u200b\ufeff", "\U0001f600" * 50,
    "../" * 50, "/", "/etc/shadow", "/proc/self/environ", "~", "$(id)", "`id`", "%s%n", "{}", "null", "-1",
]
TEXT_BIG: tuple[Callable[[], str], ...] = (
    lambda: "x" * HUGE, lambda: "\u00e9" * (HUGE // 2), lambda: "a" * 5_000, lambda: "/" + "a" * 5_000,
    lambda: "9" * 5_000,
)
hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(TEXT_CHEAP),
    big(*TEXT_BIG),
)
ids = st.one_of(st.sampled_from(RUN_IDS), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", fullmatch=True),
                hostile_text)
uint32 = st.one_of(st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
uint64 = st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from([2**63, -1, 0, 1e308, -1e308, "\x00", [], {}]),
    st.sampled_from([1, -1]).map(lambda sign: sign * 10**400), st.just(5_000).map(lambda n: "1" * n),
)
SHELL_OPTIONS = ["allowed_commands", "denied_commands", "command_timeout_ms", "success_exit_codes", "interpolate"]
options_objects = st.dictionaries(
    st.one_of(st.sampled_from(SHELL_OPTIONS), st.text(max_size=10)),
    st.one_of(json_scalar, st.lists(json_scalar, max_size=4)), max_size=4,
).map(lambda d: json.dumps(d, allow_nan=False))
OPTIONS_CHEAP = [
    "", "{}", "[]", "[1]", '"x"', "null", "1", "true", "{", "}", "NaN", '{"a":NaN}', "{\"a\":1}garbage",
    '{"command_timeout_ms":1e400}', '{"command_timeout_ms":-1}', '{"command_timeout_ms":0.5}',
    '{"command_timeout_ms":"99999999999999999999999999"}', '{"success_exit_codes":[1e308, -1, 99999999999999999999]}',
    '{"success_exit_codes":"1,x"}', '{"allowed_commands":["zzz"]}', '{"allowed_commands":"echo"}',
    '{"x":"\\ud800"}', '{"\\u0000":"\\u0000"}', '{"interpolate":"yes"}',
]
OPTIONS_BIG: tuple[Callable[[], str], ...] = (
    lambda: "1" * 5_000, lambda: '{"command_timeout_ms":' + "1" * 5_000 + "}",
    lambda: '{"command_timeout_ms":1' + "0" * 400 + "}", lambda: _deep(100), lambda: _deep(1_000),
    lambda: _deep(100_000), lambda: "[" * 100_000 + "]" * 100_000, lambda: json.dumps({"k" * 1000: "v" * HUGE}),
)
options_json = st.one_of(options_objects, st.sampled_from(OPTIONS_CHEAP), big(*OPTIONS_BIG))
#: First words that are harmless whatever the options: echo/true, or a command that exists nowhere.
prompts = st.builds(
    lambda head, rest: f"{head} {rest}" if rest else head,
    st.sampled_from(["echo", "true", "asm-fuzz-no-such-command"]),
    st.one_of(st.just(""), hostile_text.filter(lambda s: len(s) < 70_000)),
)


def cwd_values(workspace: Path) -> list[str]:
    w = str(workspace)
    return [w, w + "/sub", w + "/sub/file.txt", w + "/missing", w + "/../..", w + "/\x00", w + "\n",
            w + "/" + "a" * 300, w + "/" + "a" * 5_000, w + ("/a" * 3_000), "", "/", "/etc", "relative"]


def cwds(workspace: Path) -> st.SearchStrategy[str]:
    w = str(workspace)
    return st.one_of(st.sampled_from(cwd_values(workspace)), st.builds(lambda s: f"{w}/{s}", hostile_text),
                     hostile_text)


M = TypeVar("M", bound=Message)
_fresh = itertools.count()
#: A run id no example used before: a new run, not an attach to an old one.
fresh_ids = st.builds(lambda: f"fz-{next(_fresh)}")


@st.composite
def mostly_valid(draw: st.DrawFn, cls: type[M], valid: dict[str, st.SearchStrategy[Any]],
                 hostile: dict[str, st.SearchStrategy[Any]]) -> M:
    """A valid request with one to three fields hostile: each bad value reaches the code past the
    checks of the other fields (a request with every field bad stops at the first check)."""
    fields = {name: draw(strategy) for name, strategy in valid.items()}
    for name in draw(st.lists(st.sampled_from(sorted(hostile)), min_size=1, max_size=3, unique=True)):
        fields[name] = draw(hostile[name])
    return cls(**fields)


def typed_requests(workspace: Path, only: str = "", exclude: str = "") -> st.SearchStrategy[tuple[str, Message]]:
    cwd = cwds(workspace)
    options: dict[str, st.SearchStrategy[tuple[str, Message]]] = {
        "Handshake": st.tuples(st.just("Handshake"), st.builds(pb.HandshakeRequest, controller_version=hostile_text,
                                                  protocol_version=uint32)),
        "Preflight": st.tuples(st.just("Preflight"), st.builds(pb.PreflightRequest, provider=st.one_of(
            st.sampled_from(["shell", "claude", "codex", "gemini", "amp"]), hostile_text), cwd=cwd)),
        "StartRun": st.tuples(st.just("StartRun"), mostly_valid(pb.StartRunRequest, {
            "run_id": st.one_of(fresh_ids, fresh_ids, fresh_ids, st.sampled_from(RUN_IDS)),
            "provider": st.just("shell"), "prompt": st.just("echo hi"), "cwd": st.just(str(workspace)),
        }, {
            "run_id": ids, "session_id": st.one_of(st.just(""), ids),
            "provider": st.one_of(st.sampled_from(["claude", "amp", ""]), hostile_text),
            "prompt": prompts, "cwd": cwd,
            "permission_mode": st.one_of(st.sampled_from(["", "default", "auto", "bypass", "plan"]), hostile_text),
            "options_json": options_json,
            "env": st.dictionaries(st.one_of(st.sampled_from(["PATH", "LD_PRELOAD", "ASM_TOKEN"]), hostile_text),
                                   hostile_text, min_size=1, max_size=2),
            "after_seq": uint64, "approval_timeout_ms": uint32,
        })),
        "AttachRun": st.tuples(st.just("AttachRun"), st.builds(pb.AttachRunRequest, run_id=ids, after_seq=uint64)),
        "InterruptRun": st.tuples(st.just("InterruptRun"), st.builds(pb.InterruptRunRequest, run_id=ids)),
        "ResolveApproval": st.tuples(st.just("ResolveApproval"), st.builds(
            pb.ResolveApprovalRequest, run_id=ids, approval_id=hostile_text,
            decision=st.one_of(st.sampled_from(["allow", "deny"]), hostile_text), reason=hostile_text)),
        "SendInput": st.tuples(st.just("SendInput"), st.builds(pb.SendInputRequest, run_id=ids,
                                                  data=st.one_of(st.binary(max_size=64),
                                                                 st.just(HUGE).map(lambda n: b"\x00" * n)),
                                                  end_input=st.booleans())),
        "GetRun": st.tuples(st.just("GetRun"), st.builds(pb.GetRunRequest, run_id=ids)),
        "ListRuns": st.tuples(st.just("ListRuns"), st.builds(pb.ListRunsRequest, active_only=st.booleans())),
        "Snapshot": st.tuples(st.just("Snapshot"), st.builds(pb.SnapshotRequest, cwd=cwd,
                                                 backend=st.one_of(st.sampled_from(["git", "hash", ""]), hostile_text),
                                                 label=hostile_text)),
        "Diff": st.tuples(st.just("Diff"), st.builds(pb.DiffRequest, cwd=cwd, from_id=hostile_text, to_id=hostile_text,
                                             max_patch_bytes=uint32)),
        "Rollback": st.tuples(st.just("Rollback"), st.builds(pb.RollbackRequest, cwd=cwd, snapshot_id=hostile_text)),
    }
    return st.one_of([o for name, o in options.items() if (not only or name == only) and name != exclude])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def raw_requests(draw: st.DrawFn, workspace: Path) -> tuple[str, bytes]:
    """Bytes that are not a valid request: random, a valid one corrupted, or crafted wire-level lies."""
    method = draw(st.sampled_from(sorted(METHODS)))
    kind = draw(st.sampled_from(["random", "corrupt", "bad_utf8", "overlong", "bad_length", "wire_type", "unknown"]))
    if kind == "random":
        return method, draw(st.binary(min_size=1, max_size=512))
    field_no = draw(st.integers(1, 12))
    if kind == "corrupt":
        _, msg = draw(typed_requests(workspace, only=method))
        data = bytearray(msg.SerializeToString() or b"\x0a\x01a")
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return method, bytes(data[: draw(st.integers(1, len(data)))])
    if kind == "bad_utf8":  # a string field holding invalid UTF-8 (proto3 strings must be UTF-8)
        payload = draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"a\xffb", b"\x80" * 100]))
        return method, bytes([field_no << 3 | 2]) + _varint(len(payload)) + payload
    if kind == "overlong":  # an 11-byte varint, or a value past 64 bits
        return method, bytes([field_no << 3]) + draw(st.sampled_from([b"\xff" * 10 + b"\x01", b"\x80" * 11, b"\xff" * 9]))
    if kind == "bad_length":  # a length prefix far past the end
        return method, bytes([field_no << 3 | 2]) + _varint(draw(st.sampled_from([2**31, 2**63, 100]))) + b"abc"
    if kind == "wire_type":  # deprecated groups / reserved wire types
        return method, bytes([field_no << 3 | draw(st.sampled_from([3, 4, 6, 7]))]) + b"\x00\x00"
    return method, _varint(draw(st.integers(100, 2**29 - 1)) << 3 | 2) + b"\x03abc"  # an unknown field: valid


# --- the tests ------------------------------------------------------------------------------------

def _fuzz(target: str, strategy: Callable[[Path], st.SearchStrategy[tuple[str, Any]]], doc: str,
          ) -> Callable[[Cluster], None]:
    def test(cluster: Cluster) -> None:
        @FUZZ
        @given(req=strategy(cluster.workspace))
        def example(req: tuple[str, Any]) -> None:
            check(cluster, target, *req)
        example()
    test.__doc__ = doc
    return test


def start_runs(workspace: Path) -> st.SearchStrategy[tuple[str, Message]]:
    return typed_requests(workspace, only="StartRun")


def other_requests(workspace: Path) -> st.SearchStrategy[tuple[str, Message]]:
    return typed_requests(workspace, exclude="StartRun")


test_node_start_run_with_hostile_fields = _fuzz("node", start_runs, "StartRun, hostile fields, to the node.")
test_controller_start_run_with_hostile_fields = _fuzz("controller", start_runs, "StartRun to the controller.")
test_node_other_requests_with_hostile_fields = _fuzz(
    "node", other_requests, "Every other request type (attach, interrupt, approve, input, query, snapshots).")
test_controller_other_requests_with_hostile_fields = _fuzz("controller", other_requests, "The same, to the controller.")
test_node_malformed_protobuf = _fuzz("node", raw_requests, "Random/corrupted bytes as whole requests, to the node.")
test_controller_malformed_protobuf = _fuzz("controller", raw_requests, "The same bytes, to the controller.")


ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def listed_requests(workspace: Path, target: str) -> Iterator[tuple[str, Message] | tuple[str, Message, grpc.StatusCode]]:
    """Every listed hostile value, alone, in every field it fits (the rest of the request valid).
    An id that is not 1-128 characters of [A-Za-z0-9._:-] (a trailing newline included) must be
    refused as INVALID_ARGUMENT, not accepted (the controller names its own sessions: it ignores
    session_id)."""
    w = str(workspace)
    texts = [*TEXT_CHEAP, *(make() for make in TEXT_BIG)]
    n = 0

    def start(**fields: Any) -> pb.StartRunRequest:
        nonlocal n
        n += 1
        base: dict[str, Any] = {"run_id": f"listed-{n}", "provider": "shell", "prompt": "echo hi", "cwd": w}
        return pb.StartRunRequest(**{**base, **fields})

    for options in [*OPTIONS_CHEAP, *(make() for make in OPTIONS_BIG)]:
        yield "StartRun", start(options_json=options)
    for cwd in [*cwd_values(workspace), *texts, *(f"{w}/{t}" for t in texts)]:
        yield "StartRun", start(cwd=cwd)
        yield "Preflight", pb.PreflightRequest(provider="shell", cwd=cwd)
        yield "Snapshot", pb.SnapshotRequest(cwd=cwd, backend="hash")
        yield "Diff", pb.DiffRequest(cwd=cwd, from_id="x")
        yield "Rollback", pb.RollbackRequest(cwd=cwd, snapshot_id="x")
    for t in texts:
        for name in ("run_id", "session_id") if target == "node" else ("run_id",):
            if t and not ID.fullmatch(t):
                yield "StartRun", start(**{name: t}), grpc.StatusCode.INVALID_ARGUMENT
        for name in ("provider", "permission_mode"):
            yield "StartRun", start(**{name: t})
        if len(t) < 70_000:
            yield "StartRun", start(prompt=f"echo {t}")
        yield "StartRun", start(env={t or "E": t})
        yield "Preflight", pb.PreflightRequest(provider=t, cwd=w)
        yield "Handshake", pb.HandshakeRequest(controller_version=t, protocol_version=1)
        yield "AttachRun", pb.AttachRunRequest(run_id=t)
        yield "InterruptRun", pb.InterruptRunRequest(run_id=t)
        yield "GetRun", pb.GetRunRequest(run_id=t)
        yield "SendInput", pb.SendInputRequest(run_id=t, data=t.encode())
        yield "ResolveApproval", pb.ResolveApprovalRequest(run_id=t, approval_id=t, decision=t, reason=t)
        yield "ResolveApproval", pb.ResolveApprovalRequest(run_id="listed-1", approval_id=t, decision=t)
        yield "Snapshot", pb.SnapshotRequest(cwd=w, backend=t, label=t)
        yield "Diff", pb.DiffRequest(cwd=w, from_id=t, to_id=t)
        yield "Rollback", pb.RollbackRequest(cwd=w, snapshot_id=t)
    yield "StartRun", start(after_seq=2**64 - 1, approval_timeout_ms=2**32 - 1)
    yield "AttachRun", pb.AttachRunRequest(run_id="listed-1", after_seq=2**64 - 1)
    yield "Handshake", pb.HandshakeRequest(protocol_version=2**32 - 1)
    yield "Diff", pb.DiffRequest(cwd=w, max_patch_bytes=2**32 - 1)


@pytest.mark.parametrize("target", ["node", "controller"])
def test_every_listed_hostile_value(cluster: Cluster, target: str) -> None:
    """Each listed value on its own, every one sent (all failures reported together, not the first)."""
    failures = []
    for method, request, *expect in listed_requests(cluster.workspace, target):
        try:
            check(cluster, target, method, request, *expect)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0][:400])
    assert not failures, f"{len(failures)} untyped answers:\n" + "\n".join(failures)


def test_the_cluster_still_runs_after_the_fuzzing(cluster: Cluster) -> None:
    """After every example above: a plain run through the controller still completes."""
    async def run() -> list[pb.Event]:
        stub = cluster.channels["controller"].unary_stream(
            SERVICE + "StartRun", request_serializer=pb.StartRunRequest.SerializeToString,
            response_deserializer=pb.EventBatch.FromString)
        events: list[pb.Event] = []
        async for batch in stub(pb.StartRunRequest(run_id="fuzz-after", provider="shell", prompt="echo still alive",
                                                    cwd=str(cluster.workspace)), timeout=CALL_TIMEOUT):
            events.extend(batch.events)
        return events
    before = len(cluster.log.records)
    events = cluster.run(run())
    text = "".join(e.assistant_delta.content for e in events if e.kind == pb.EVENT_KIND_ASSISTANT_DELTA)
    assert text == "still alive\n"
    assert events[-1].kind == pb.EVENT_KIND_RUN_COMPLETED and events[-1].run_completed.status == "completed"
    assert not _slice(cluster.log, before).tracebacks()


@pytest.mark.parametrize("target", ["node", "controller"])
def test_an_error_echoing_a_huge_field_still_arrives_typed(cluster: Cluster, target: str) -> None:
    """"Unknown run id: <200 KB>" overflowed the 16 KiB trailer limit: the client saw gRPC's own
    "Stream removed" RESOURCE_EXHAUSTED instead of NOT_FOUND. The status message is cut now."""
    for run_id in ("x" * HUGE, "\u00e9" * (HUGE // 2)):
        code, details = cluster.run(call(cluster.channels[target], "GetRun", pb.GetRunRequest(run_id=run_id)))
        assert code == grpc.StatusCode.NOT_FOUND, (code, details[:200])
        assert details.startswith("Unknown run id: ") and details.endswith(" characters)") and len(details) < 1100
