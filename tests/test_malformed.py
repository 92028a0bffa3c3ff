"""Every malformed input gets a typed answer (issue 9, item 8), through real gRPC on 127.0.0.1.

A bad cwd (NUL byte, over-long name or path), options JSON past its limits (size, depth, number
ranges, not an object), undecodable protobuf bytes and ids with a trailing newline are each
refused with INVALID_ARGUMENT / ``config_invalid`` naming the rule, and leave no traceback in
the logs. Undecodable requests are logged on one rate-limited line, not once per request.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

import asm_wire._server as wire_server
from asm_controller import GrpcNodeClient, RemoteNode
from asm_controller.service import ControllerConfig, ControllerServer, start_controller
from asm_node import NodeServer, start_server
from asm_wire import AsmError, ConfigError, pb, valid_id
from asm_wire._options import MAX_OPTIONS_BYTES, MAX_OPTIONS_DEPTH
from tests.support.processes import node_config as make_config


@pytest.fixture(autouse=True)
def _fresh_malformed_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire_server, "_malformed_log", wire_server._RateLimitedLog())


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None, f"traceback logged: {record.name}: {record.getMessage()}"
        assert "Traceback" not in record.getMessage()
    assert "internal error" not in caplog.text


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    server = await start_server(make_config(workspace_roots=[tmp_path]))
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(node: NodeServer) -> AsyncIterator[GrpcNodeClient]:
    c = GrpcNodeClient(RemoteNode(f"127.0.0.1:{node.port}"))
    try:
        yield c
    finally:
        await c.close()


async def _start(client: GrpcNodeClient, **fields: object) -> AsmError:
    request = pb.StartRunRequest(run_id=fields.pop("run_id", "bad-input"), provider="shell",  # type: ignore[arg-type]
                                 prompt="echo never", **fields)  # type: ignore[arg-type]
    with pytest.raises(AsmError) as info:
        async for _ in client.start_run(request):
            pass
    return info.value


# -- cwd ---------------------------------------------------------------------------------------------


def _cwds(root: Path) -> list[tuple[str, str]]:
    return [
        (f"{root}/a\0b", "NUL byte"),
        (f"{root}/{'a' * 256}", "256-byte path component: the limit is 255 bytes"),
        (f"{root}/{'é' * 128}", "256-byte path component: the limit is 255 bytes"),
        (str(root) + ("/" + "d" * 200) * 21, "the limit is 4096 bytes"),
    ]


async def test_bad_cwd_is_config_invalid_on_every_entry_point(
    node: NodeServer, client: GrpcNodeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for cwd, rule in _cwds(tmp_path):
        err = await _start(client, cwd=cwd)
        assert isinstance(err, ConfigError) and err.kind == "config_invalid", (cwd[:40], err)
        assert rule in err.message
        resp = await client.preflight(pb.PreflightRequest(provider="shell", cwd=cwd))
        assert not resp.ok
        assert resp.error.kind == "config_invalid" and rule in resp.error.message
        for call in (client.snapshot(pb.SnapshotRequest(cwd=cwd)),
                     client.diff(pb.DiffRequest(cwd=cwd, from_id="git-0")),
                     client.rollback(pb.RollbackRequest(cwd=cwd, snapshot_id="git-0"))):
            with pytest.raises(ConfigError) as info:
                await call
            assert rule in info.value.message
    assert node.agent.runs == {}
    _no_traceback(caplog)


async def test_cwd_failing_in_the_kernel_is_still_typed(
    node: NodeServer, client: GrpcNodeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within the text limits, but ENAMETOOLONG once ~ is expanded: typed, not INTERNAL."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HOME", str(tmp_path))
    cwd = "~/" + "/".join(["x" * 254] * 16)  # 4,081 bytes as given, over 4,096 once ~ is expanded
    assert len(cwd) <= 4096 < len(str(tmp_path)) + len(cwd) - 1
    err = await _start(client, cwd=cwd)
    assert err.kind == "config_invalid", err
    assert "cannot be used" in err.message
    _no_traceback(caplog)


# -- options JSON ---------------------------------------------------------------------------------------


_BAD_OPTIONS = [
    pytest.param('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", f"the limit is {MAX_OPTIONS_DEPTH} levels",
                 id="nested-100k"),
    pytest.param('{"a": ' + "[" * 40 + "]" * 40 + "}", f"the limit is {MAX_OPTIONS_DEPTH} levels", id="nested-40"),
    pytest.param('{"command_timeout_ms": ' + "9" * 5000 + "}", "within [-2**63, 2**63-1]", id="int-5000-digits"),
    pytest.param(json.dumps({"command_timeout_ms": 10**400}), "within [-2**63, 2**63-1]", id="timeout-10**400"),
    pytest.param(json.dumps({"command_timeout_ms": 2**63}), "within [-2**63, 2**63-1]", id="int-2**63"),
    pytest.param('{"command_timeout_ms": 1e400}', "numbers must be finite", id="float-inf"),
    pytest.param('{"command_timeout_ms": NaN}', "numbers must be finite", id="nan"),
    pytest.param('{"command_timeout_ms": -Infinity}', "numbers must be finite", id="-infinity"),
    pytest.param(json.dumps({"a": "x" * MAX_OPTIONS_BYTES}), f"the limit is {MAX_OPTIONS_BYTES} bytes", id="size"),
    pytest.param('{"a": "\\ud800"}', "lone surrogate", id="lone-surrogate"),
    pytest.param("[1, 2]", "must be a JSON object", id="list"),
    pytest.param('"text"', "must be a JSON object", id="string"),
    pytest.param("{not json", "not valid JSON", id="syntax"),
    # Within the JSON limits, but the provider converts the string: typed (whatever its message).
    pytest.param(json.dumps({"command_timeout_ms": "1" + "0" * 400}), "", id="str-10**400"),
    pytest.param(json.dumps({"command_timeout_ms": "9" * 5000}), "", id="str-5000-digits"),
]


@pytest.mark.parametrize(("options_json", "rule"), _BAD_OPTIONS)
async def test_bad_options_are_config_invalid_with_the_limit(
    node: NodeServer, client: GrpcNodeClient, options_json: str, rule: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    err = await _start(client, options_json=options_json)
    assert isinstance(err, ConfigError) and err.kind == "config_invalid", err
    assert rule in err.message
    assert node.agent.runs == {}
    _no_traceback(caplog)


async def test_options_within_the_limits_still_run(client: GrpcNodeClient, tmp_path: Path) -> None:
    options = json.dumps({"command_timeout_ms": 2**31, "success_exit_codes": [0]})
    events = []
    async for batch in client.start_run(pb.StartRunRequest(run_id="fine-options", provider="shell", prompt="echo ok",
                                                           cwd=str(tmp_path), options_json=options)):
        events.extend(batch.events)
    kinds = {pb.EventKind.Name(e.kind) for e in events}
    assert "EVENT_KIND_RUN_COMPLETED" in kinds, kinds


@pytest.fixture
async def controller(node: NodeServer) -> AsyncIterator[ControllerServer]:
    ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{node.port}"]))
    try:
        yield ctl
    finally:
        await ctl.stop()


@pytest.mark.parametrize(("options_json", "rule"), [
    pytest.param("[1, 2]", "must be a JSON object", id="list"),
    pytest.param("42", "must be a JSON object", id="number"),
    pytest.param('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "levels", id="nested-100k"),
    pytest.param(json.dumps({"command_timeout_ms": 10**400}), "within [-2**63, 2**63-1]", id="timeout-10**400"),
])
async def test_controller_refuses_bad_options_json(
    controller: ControllerServer, node: NodeServer, options_json: str, rule: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    c = GrpcNodeClient(RemoteNode(f"127.0.0.1:{controller.port}"))
    try:
        err = await _start(c, options_json=options_json)
    finally:
        await c.close()
    assert isinstance(err, ConfigError) and err.kind == "config_invalid", err
    assert rule in err.message
    assert node.agent.runs == {}
    _no_traceback(caplog)


# -- undecodable protobuf --------------------------------------------------------------------------------


_UNARY = ["Handshake", "Preflight", "InterruptRun", "ResolveApproval", "SendInput", "GetRun", "ListRuns", "Drain",
          "Snapshot", "Diff", "Rollback"]
_STREAM = ["StartRun", "AttachRun"]


def _garbage(n: int) -> list[bytes]:
    """Seeded random bytes that fail to parse as any request (checked)."""
    rng = random.Random(9)
    out: list[bytes] = []
    while len(out) < n:
        data = rng.randbytes(rng.randint(1, 200))
        if all(_fails(cls, data) for cls in _REQUEST_TYPES):
            out.append(data)
    return out


_REQUEST_TYPES = [
    pb.HandshakeRequest, pb.PreflightRequest, pb.StartRunRequest, pb.AttachRunRequest, pb.InterruptRunRequest,
    pb.ResolveApprovalRequest, pb.SendInputRequest, pb.GetRunRequest, pb.ListRunsRequest, pb.DrainRequest,
    pb.SnapshotRequest, pb.DiffRequest, pb.RollbackRequest, pb.ListNodesRequest, pb.DrainNodeRequest,
]


def _fails(cls: type, data: bytes) -> bool:
    try:
        cls.FromString(data)  # type: ignore[attr-defined]
    except Exception:
        return True
    return False


async def _raw_call(channel: grpc.aio.Channel, service: str, method: str, data: bytes,
                    streaming: bool) -> grpc.aio.AioRpcError:
    path = f"/{service}/{method}"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if streaming:
            async for _ in channel.unary_stream(path)(data, timeout=5):
                pass
        else:
            await channel.unary_unary(path)(data, timeout=5)
    return info.value


def _assert_invalid_argument(err: grpc.aio.AioRpcError) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    trailers = dict(err.trailing_metadata() or ())
    assert trailers.get("asm-error-kind") == "config_invalid"
    assert trailers.get("asm-error-reason") == "malformed_request"
    assert "malformed" in (err.details() or "")


async def test_undecodable_requests_are_invalid_argument_without_tracebacks(
    node: NodeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    garbage = _garbage(8)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:  # identity (de)serializers
        for method in _UNARY + _STREAM:
            for data in garbage:
                _assert_invalid_argument(await _raw_call(channel, wire_server.NODE_SERVICE, method, data,
                                                         method in _STREAM))
        # Invalid UTF-8 in a string field (GetRunRequest.run_id, field 1) does not parse either.
        _assert_invalid_argument(await _raw_call(channel, wire_server.NODE_SERVICE, "GetRun", b"\x0a\x02\xff\xfe",
                                                 False))
        # The node still serves well-formed requests.
        ok = await channel.unary_unary(f"/{wire_server.NODE_SERVICE}/ListRuns")(
            pb.ListRunsRequest().SerializeToString(), timeout=5)
        assert pb.ListRunsResponse.FromString(ok).runs == []
    _no_traceback(caplog)
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # 105 bad requests, one log line
    assert lines[0].levelno == logging.WARNING
    assert node.agent.runs == {}


async def test_controller_undecodable_requests_are_invalid_argument(
    controller: ControllerServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        for service, method in [(wire_server.CONTROLLER_SERVICE, "ListNodes"),
                                (wire_server.CONTROLLER_SERVICE, "DrainNode"),
                                (wire_server.NODE_SERVICE, "GetRun"), (wire_server.NODE_SERVICE, "StartRun")]:
            for data in _garbage(4):
                _assert_invalid_argument(await _raw_call(channel, service, method, data, method == "StartRun"))
    _no_traceback(caplog)


def test_malformed_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    limiter = wire_server._RateLimitedLog(interval_s=0.0)
    caplog.set_level(logging.WARNING, logger="asm.server")
    limiter.warning("first %s", 1)
    limiter.warning("second %s", 2)
    assert [r.getMessage() for r in caplog.records] == ["first 1", "second 2"]
    caplog.clear()
    held = wire_server._RateLimitedLog(interval_s=3600.0)
    for i in range(5):
        held.warning("line %s", i)
    assert [r.getMessage() for r in caplog.records] == ["line 0"]
    held._next = 0.0
    held.warning("line %s", 9)
    assert caplog.records[-1].getMessage() == "line 9 (4 more since the last such line)"


# -- ids ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["run1\n", "run1\r\n", "\nrun1", "run\n1", "run1\x00", "", "-run", "a" * 129])
def test_ids_are_matched_whole(value: str) -> None:
    assert not valid_id(value)


@pytest.mark.parametrize("value", ["run1", "01HZX3", "a.b:c-d_e", "a" * 128])
def test_valid_ids_still_pass(value: str) -> None:
    assert valid_id(value)


async def test_run_id_with_trailing_newline_is_refused(node: NodeServer, client: GrpcNodeClient) -> None:
    err = await _start(client, run_id="run1\n")
    assert isinstance(err, ConfigError) and "invalid run_id" in err.message
    err = await _start(client, run_id="run2", session_id="sess\n")
    assert isinstance(err, ConfigError) and "invalid session_id" in err.message
    assert node.agent.runs == {}


async def test_env_with_nul_is_refused(node: NodeServer, tmp_path: Path) -> None:
    server = await start_server(make_config(env_allow=["FOO"]))
    c = GrpcNodeClient(RemoteNode(f"127.0.0.1:{server.port}"))
    try:
        err = await _start(c, env={"FOO": "a\0b"})
        assert isinstance(err, ConfigError) and "NUL" in err.message
        assert server.agent.runs == {}
    finally:
        await c.close()
        await server.stop()


@pytest.mark.parametrize(("prompt", "options"), [("hi\0there", {}), ("hi", {"model": "a\0b"})])
async def test_nul_in_a_cli_command_line_is_refused_not_hung(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    prompt: str, options: dict[str, str],
) -> None:
    # exec() raises ValueError on NUL: the run task died before run_completed and the stream hung.
    monkeypatch.setenv("GEMINI_CLI_PATH", "/bin/true")
    server = await start_server(make_config(workspace_roots=[tmp_path]))
    c = GrpcNodeClient(RemoteNode(f"127.0.0.1:{server.port}"))
    try:
        request = pb.StartRunRequest(run_id="nul-run", provider="gemini", prompt=prompt, cwd=str(tmp_path),
                                     options_json=json.dumps(options))
        with pytest.raises(ConfigError) as info:
            async for _ in c.start_run(request):
                pass
        assert info.value.reason == "nul_byte"
        assert server.agent.runs == {} and server.agent.active_runs() == 0
        _no_traceback(caplog)
    finally:
        await c.close()
        await server.stop()
