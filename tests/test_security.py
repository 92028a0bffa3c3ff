"""Security of the node agent and its clients: bearer token, (mutual) TLS, exposure rule.

Every server here listens on 127.0.0.1 only; the non-loopback exposure rule is
checked through ``check_exposure`` and through a CLI that must refuse to bind.
"""

from __future__ import annotations

import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

import asm_wire._server
from asm_controller import (
    GrpcNodeClient,
    NodeConnectionError,
    NodeConnectTimeout,
    NodeUnauthenticated,
    RemoteNode,
    Session,
    TLSConfig,
    connect,
)
from asm_node import NodeConfig, NodeServer, start_server
from asm_node.server import check_exposure
from asm_wire import PROTOCOL_VERSION, ConfigError, __version__, pb
from asm_wire import NodeUnauthenticated as WireNodeUnauthenticated
from tests.support.processes import PYTHON_BASENAME, ROOT, NodeProcess
from tests.support.processes import node_config as make_config

TOKEN = "s3cret"


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process env without any asm credentials or node settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "ASM_TOKEN" and not k.startswith("ASM_NODE_")}
    env.update(extra)
    return env


async def _handshake(client: GrpcNodeClient) -> pb.HandshakeResponse:
    return await client.handshake(
        pb.HandshakeRequest(controller_version=__version__, protocol_version=PROTOCOL_VERSION), timeout=5.0
    )


# -- 1. bearer token ---------------------------------------------------------------------


@pytest.fixture
async def token_node() -> AsyncIterator[NodeServer]:
    server = await start_server(make_config(token=TOKEN))
    try:
        yield server
    finally:
        await server.stop()


def _addr(server: NodeServer) -> str:
    return f"127.0.0.1:{server.port}"


async def test_right_token_connects(token_node: NodeServer) -> None:
    handle = await connect(RemoteNode(_addr(token_node), token=TOKEN))
    try:
        assert handle.node_id == token_node.agent.node_id
        assert handle.node_id != ""
        assert handle.epoch == token_node.agent.boot_epoch
        assert handle.epoch != ""
        assert handle.execution == "remote"
    finally:
        await handle.close()


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("wrong", id="wrong"),
        pytest.param(None, id="none"),
        pytest.param(TOKEN[:-1], id="prefix"),
        pytest.param(TOKEN + "x", id="longer"),
        pytest.param(TOKEN.upper(), id="case"),
    ],
)
async def test_bad_token_is_unauthenticated(token_node: NodeServer, token: str | None) -> None:
    started = time.monotonic()
    with pytest.raises(NodeUnauthenticated) as info:
        await connect(RemoteNode(_addr(token_node), token=token, connect_timeout_s=3.0))
    err = info.value
    assert isinstance(err, WireNodeUnauthenticated)  # the controller re-exports the wire class
    assert isinstance(err, NodeConnectionError)
    assert err.kind == "auth_error"
    assert err.reason == "unauthenticated"
    assert err.domain == "transport"
    assert TOKEN not in err.message  # never echo the expected secret
    assert time.monotonic() - started < 3.0  # refused at once, not a timeout


async def test_token_in_wrong_scheme_is_refused(token_node: NodeServer) -> None:
    """Only ``authorization: Bearer <token>`` is accepted: the bare token, or another scheme, is not."""
    for header in (TOKEN, f"Basic {TOKEN}", f"Bearer  {TOKEN}"):
        client = GrpcNodeClient(RemoteNode(_addr(token_node)))
        client._md = (("authorization", header),)
        try:
            with pytest.raises(NodeUnauthenticated) as info:
                await _handshake(client)
            assert info.value.reason == "unauthenticated", header
        finally:
            await client.close()


async def test_wrong_token_refused_on_every_rpc_and_starts_nothing(token_node: NodeServer) -> None:
    """The interceptor guards every method, streams included; a refused StartRun must not spawn anything."""
    client = GrpcNodeClient(RemoteNode(_addr(token_node), token="wrong"))
    try:
        with pytest.raises(NodeUnauthenticated):
            await client.preflight(pb.PreflightRequest(provider="shell", cwd=""))
        with pytest.raises(NodeUnauthenticated):
            await client.list_runs(pb.ListRunsRequest())
        with pytest.raises(NodeUnauthenticated):
            await client.get_run(pb.GetRunRequest(run_id="01HZZZZZZZZZZZZZZZZZZZZZZZ"))
        with pytest.raises(NodeUnauthenticated):
            async for _ in client.start_run(
                pb.StartRunRequest(run_id="01HZZZZZZZZZZZZZZZZZZZZZZZ", provider="shell", prompt="echo pwned")
            ):
                pass
        with pytest.raises(NodeUnauthenticated):
            async for _ in client.attach_run(pb.AttachRunRequest(run_id="01HZZZZZZZZZZZZZZZZZZZZZZZ")):
                pass
    finally:
        await client.close()
    assert token_node.agent.runs == {}


async def test_session_with_wrong_token_gets_typed_error(token_node: NodeServer) -> None:
    async with Session("shell", node=RemoteNode(_addr(token_node), token="wrong", connect_timeout_s=3.0)) as s:
        result = await s.query("echo hi")
    assert result.ok is False
    assert result.status == "failed"
    assert isinstance(result.error, NodeUnauthenticated)
    assert result.error.kind == "auth_error"
    assert result.error.reason == "unauthenticated"
    assert "hi" not in result.text
    assert token_node.agent.runs == {}


async def test_session_with_right_token_runs(token_node: NodeServer) -> None:
    async with Session("shell", node=RemoteNode(_addr(token_node), token=TOKEN)) as s:
        result = await s.query("echo hello")
    assert result.error is None
    assert result.ok is True
    assert result.status == "completed"
    assert result.text == "hello\n"
    assert result.metadata["node_id"] == token_node.agent.node_id


# -- 5. constant-time comparison -----------------------------------------------------------


async def test_token_compared_with_hmac_compare_digest(
    token_node: NodeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(asm_wire._server.hmac, "compare_digest", recording)
    client = GrpcNodeClient(RemoteNode(_addr(token_node), token=TOKEN))
    try:
        info = await _handshake(client)
    finally:
        await client.close()
    assert info.node_id == token_node.agent.node_id
    assert calls, "TokenAuthInterceptor did not use hmac.compare_digest"
    assert (bytes(calls[0][0]), bytes(calls[0][1])) == (f"Bearer {TOKEN}".encode(),) * 2

    calls.clear()
    client = GrpcNodeClient(RemoteNode(_addr(token_node), token="wrong"))
    try:
        with pytest.raises(NodeUnauthenticated):
            await _handshake(client)
    finally:
        await client.close()
    assert calls, "a refused token must also go through hmac.compare_digest"


# -- 2. TLS and mutual TLS -----------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example")
    foreign_client = other.issue_cert("client@example")
    p = Pki(
        ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
        client_cert=d / "client.pem", client_key=d / "client.key", other_ca=d / "other-ca.pem",
        other_client_cert=d / "other-client.pem", other_client_key=d / "other-client.key",
    )
    ca.cert_pem.write_to_path(str(p.ca))
    other.cert_pem.write_to_path(str(p.other_ca))
    server.cert_chain_pems[0].write_to_path(str(p.server_cert))
    server.private_key_pem.write_to_path(str(p.server_key))
    client.cert_chain_pems[0].write_to_path(str(p.client_cert))
    client.private_key_pem.write_to_path(str(p.client_key))
    foreign_client.cert_chain_pems[0].write_to_path(str(p.other_client_cert))
    foreign_client.private_key_pem.write_to_path(str(p.other_client_key))
    return p


@pytest.fixture
async def mtls_node(pki: Pki) -> AsyncIterator[NodeServer]:
    server = await start_server(make_config(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca))
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def tls_node(pki: Pki) -> AsyncIterator[NodeServer]:
    server = await start_server(make_config(tls_cert=pki.server_cert, tls_key=pki.server_key))
    try:
        yield server
    finally:
        await server.stop()


async def _connect_fails(addr: str, tls: TLSConfig | None, token: str | None = None) -> NodeConnectionError:
    started = time.monotonic()
    with pytest.raises(NodeConnectionError) as info:
        await connect(RemoteNode(addr, tls=tls, token=token, connect_timeout_s=3.0))
    # A TLS refusal is immediate and typed: not left to run into the connect timeout.
    assert not isinstance(info.value, NodeConnectTimeout), repr(info.value)
    assert time.monotonic() - started < 3.0
    return info.value


async def test_mtls_client_with_cert_runs(mtls_node: NodeServer, pki: Pki) -> None:
    tls = TLSConfig.from_files(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    node = RemoteNode(_addr(mtls_node), tls=tls)
    handle = await connect(node)
    try:
        assert handle.node_id == mtls_node.agent.node_id
        assert handle.epoch == mtls_node.agent.boot_epoch
    finally:
        await handle.close()
    async with Session("shell", node=node) as s:
        result = await s.query("echo hello")
    assert result.error is None
    assert result.ok is True
    assert result.text == "hello\n"


async def test_mtls_client_without_cert_is_refused(mtls_node: NodeServer, pki: Pki) -> None:
    err = await _connect_fails(_addr(mtls_node), TLSConfig.from_files(ca=pki.ca))
    # Observed: NodeUnreachable (reason "unreachable"): the server just closes the socket. The
    # exception tree documents "client cert refused" as NodeUnauthenticated; see the report.
    assert err.domain == "transport"
    assert err.reason in ("unauthenticated", "unreachable"), repr(err)
    assert mtls_node.agent.runs == {}


async def test_mtls_client_cert_from_another_ca_is_refused(mtls_node: NodeServer, pki: Pki) -> None:
    tls = TLSConfig.from_files(ca=pki.ca, cert=pki.other_client_cert, key=pki.other_client_key)
    err = await _connect_fails(_addr(mtls_node), tls)
    assert err.domain == "transport"
    assert err.reason in ("unauthenticated", "unreachable"), repr(err)


async def test_client_trusting_another_ca_is_refused(mtls_node: NodeServer, pki: Pki) -> None:
    tls = TLSConfig.from_files(ca=pki.other_ca, cert=pki.client_cert, key=pki.client_key)
    err = await _connect_fails(_addr(mtls_node), tls)
    # The client itself rejects the node's certificate: the connector types it as a TLS failure.
    assert isinstance(err, NodeUnauthenticated), repr(err)
    assert err.kind == "auth_error"
    assert "TLS" in err.message


async def test_plaintext_client_to_tls_node_is_refused(mtls_node: NodeServer) -> None:
    err = await _connect_fails(_addr(mtls_node), None)
    assert err.domain == "transport"


async def test_session_on_mtls_node_without_cert_fails_typed(mtls_node: NodeServer, pki: Pki) -> None:
    node = RemoteNode(_addr(mtls_node), tls=TLSConfig.from_files(ca=pki.ca), connect_timeout_s=3.0)
    async with Session("shell", node=node) as s:
        result = await s.query("echo hi")
    assert result.ok is False
    assert isinstance(result.error, NodeConnectionError), repr(result.error)
    assert not isinstance(result.error, NodeConnectTimeout)
    assert mtls_node.agent.runs == {}


async def test_server_only_tls_client_with_ca_runs(tls_node: NodeServer, pki: Pki) -> None:
    node = RemoteNode(_addr(tls_node), tls=TLSConfig.from_files(ca=pki.ca))
    handle = await connect(node)
    try:
        assert handle.node_id == tls_node.agent.node_id
        assert handle.epoch == tls_node.agent.boot_epoch
    finally:
        await handle.close()
    async with Session("shell", node=node) as s:
        result = await s.query("echo hello")
    assert result.ok is True
    assert result.text == "hello\n"


async def test_server_only_tls_client_trusting_another_ca_is_refused(tls_node: NodeServer, pki: Pki) -> None:
    err = await _connect_fails(_addr(tls_node), TLSConfig.from_files(ca=pki.other_ca))
    assert isinstance(err, NodeUnauthenticated), repr(err)


async def test_server_name_override_must_match_the_cert(tls_node: NodeServer, pki: Pki) -> None:
    ok = RemoteNode(_addr(tls_node), tls=TLSConfig.from_files(ca=pki.ca, server_name="localhost"))
    handle = await connect(ok)
    await handle.close()
    wrong_name = await _connect_fails(_addr(tls_node), TLSConfig.from_files(ca=pki.ca, server_name="evil.example"))
    untrusted = await _connect_fails(_addr(tls_node), TLSConfig.from_files(ca=pki.other_ca))
    # Both are the client rejecting the node's certificate; they must be typed alike (today an
    # untrusted CA is NodeUnauthenticated, so a name mismatch must be too).
    assert (type(wrong_name), wrong_name.reason) == (type(untrusted), untrusted.reason), (wrong_name, untrusted)
    assert isinstance(wrong_name, NodeUnauthenticated), repr(wrong_name)


async def test_token_and_mtls_together_need_both(pki: Pki) -> None:
    server = await start_server(
        make_config(token=TOKEN, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca)
    )
    try:
        tls = TLSConfig.from_files(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        handle = await connect(RemoteNode(_addr(server), token=TOKEN, tls=tls))
        assert handle.epoch == server.agent.boot_epoch
        await handle.close()
        with pytest.raises(NodeUnauthenticated) as info:
            await connect(RemoteNode(_addr(server), token="wrong", tls=tls, connect_timeout_s=3.0))
        assert info.value.reason == "unauthenticated"
        await _connect_fails(_addr(server), TLSConfig.from_files(ca=pki.ca), token=TOKEN)
    finally:
        await server.stop()


def test_client_cert_without_key_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError):
        TLSConfig.from_files(ca=pki.ca, cert=pki.client_cert)
    with pytest.raises(ConfigError):
        TLSConfig.from_files(ca=pki.ca, key=pki.client_key)


async def test_server_tls_cert_without_key_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError):
        await start_server(make_config(tls_cert=pki.server_cert))
    with pytest.raises(ConfigError):
        await start_server(make_config(tls_ca=pki.ca))


# -- 3. exposure rule ----------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "10.1.2.3:7070", "node.example:7070"])
def test_non_loopback_without_auth_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_exposure(NodeConfig(listen=listen))
    assert info.value.kind == "config_invalid"
    assert "--insecure" in info.value.message


def test_non_loopback_with_server_only_tls_is_still_refused(pki: Pki) -> None:
    """TLS without client certs encrypts but authenticates nobody."""
    with pytest.raises(ConfigError):
        check_exposure(NodeConfig(listen="0.0.0.0:0", tls_cert=pki.server_cert, tls_key=pki.server_key))


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"insecure": True}, id="insecure"),
        pytest.param({"token": "a-token-of-24-characters"}, id="token"),  # non-loopback: 16 bytes at least
        pytest.param({"tls_ca": "CA"}, id="mtls"),
    ],
)
def test_non_loopback_with_auth_or_insecure_is_allowed(settings: dict[str, Any], pki: Pki) -> None:
    if settings.get("tls_ca") == "CA":
        settings = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_ca": pki.ca}
    check_exposure(NodeConfig(listen="0.0.0.0:0", **settings))


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "localhost:0", "[::1]:0", "127.0.0.53:7070"])
def test_loopback_without_auth_is_allowed(listen: str) -> None:
    check_exposure(NodeConfig(listen=listen))


def _asm(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asm_cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env if env is not None else _clean_env(), cwd=str(ROOT),
    )


def test_cli_refuses_non_loopback_without_auth() -> None:
    proc = _asm("node", "serve", "--listen", "0.0.0.0:0")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("asm: error:")
    assert "non-loopback" in lines[0]
    assert "listening on" not in proc.stderr


# -- 4. the CLI's token from ASM_TOKEN ---------------------------------------------------------


@pytest.fixture
def token_node_process(node_process: Callable[..., NodeProcess], tmp_path: Path) -> tuple[NodeProcess, str]:
    tok = "cli-" + os.urandom(8).hex()
    tokfile = tmp_path / "token"
    tokfile.write_text(tok + "\n")
    return node_process("--token-file", str(tokfile)), tok


def test_cli_run_with_token_from_env(token_node_process: tuple[NodeProcess, str]) -> None:
    node, tok = token_node_process
    proc = _asm(
        "run", "--node", node.address, "--provider", "shell", "--output", "jsonl", "echo hello",
        env=_clean_env(ASM_TOKEN=tok), timeout=30,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "result_summary"
    assert summary["status"] == "completed"
    assert "hello" in summary["text"]
    assert summary["error"] is None
    assert tok not in proc.stdout and tok not in proc.stderr


def test_cli_run_with_wrong_token_from_env(token_node_process: tuple[NodeProcess, str]) -> None:
    node, tok = token_node_process
    proc = _asm(
        "run", "--node", node.address, "--provider", "shell", "echo hello",
        env=_clean_env(ASM_TOKEN="wrong"), timeout=30,
    )
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "refused our credentials" in proc.stderr
    assert "hello" not in proc.stdout
    assert tok not in proc.stderr


def test_cli_run_with_wrong_token_jsonl_summary(token_node_process: tuple[NodeProcess, str]) -> None:
    node, _ = token_node_process
    proc = _asm(
        "run", "--node", node.address, "--provider", "shell", "--output", "jsonl", "echo hello",
        env=_clean_env(ASM_TOKEN="wrong"), timeout=30,
    )
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "result_summary"
    assert summary["status"] == "failed"
    assert summary["error"]["kind"] == "auth_error"
    assert summary["error"]["reason"] == "unauthenticated"


def test_cli_run_without_token_is_refused(token_node_process: tuple[NodeProcess, str]) -> None:
    node, _ = token_node_process
    proc = _asm("run", "--node", node.address, "--provider", "shell", "echo hello", timeout=30)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "refused our credentials" in proc.stderr


@pytest.mark.slow
def test_cli_nodes_reports_unauthenticated(token_node_process: tuple[NodeProcess, str]) -> None:
    node, tok = token_node_process
    proc = _asm("nodes", "--node", node.address, "--output", "json", env=_clean_env(ASM_TOKEN="wrong"))
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    rows = json.loads(proc.stdout)
    assert rows[0]["error"]["reason"] == "unauthenticated"
    proc = _asm("nodes", "--node", node.address, "--output", "json", env=_clean_env(ASM_TOKEN=tok))
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert json.loads(proc.stdout)[0]["epoch"] == node.epoch


# -- the agent's own secrets stay out of the CLIs it runs ---------------------------------------


async def test_agent_token_not_inherited_by_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "agent-" + os.urandom(8).hex()
    monkeypatch.setenv("ASM_TOKEN", secret)
    server = await start_server(make_config(token=secret))
    try:
        async with Session("shell", node=RemoteNode(_addr(server), token=secret)) as s:
            # cat cannot read /proc (the shell provider confines it); the interpreter can.
            result = await s.query(f"{PYTHON_BASENAME} -c \"print(open('/proc/self/environ').read())\"")
    finally:
        await server.stop()
    assert result.ok is True, result.error
    assert "PATH=" in result.text  # the run did see an environment
    assert secret not in result.text
    assert "ASM_TOKEN=" not in result.text
