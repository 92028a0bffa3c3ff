"""Per-client ownership: principals (named tokens, client certificates) own their runs.

Every server listens on 127.0.0.1 and every call is real gRPC: nodes started
in-process with ``start_server`` (and one ``asm node serve --tokens-file``
process), the controller with ``start_controller``. ``alice`` and ``bob`` are
plain principals, ``root`` has the admin role.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

import asm_wire._principal as principal_mod
from asm_controller import EmbeddedNode, GrpcNodeClient, NodeUnauthenticated, RemoteNode, Session, TLSConfig
from asm_controller.service import ControllerConfig, ControllerServer, start_controller
from asm_node import NodeAgent, NodeServer, start_server
from asm_node.providers import build_providers
from asm_wire import KIND_VALUES, AsmError, ConfigError, PermissionDenied, error_from_rpc, pb, ulid
from asm_wire._principal import (
    AUDIT,
    AuditLog,
    Principal,
    TokenTable,
    acting_as,
    load_tokens,
    parse_tokens,
)
from asm_wire.v1 import node_pb2_grpc
from tests.support.processes import ROOT, NodeProcess, wait_until
from tests.support.processes import node_config as make_config
from tests.support.providers import approval_provider

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abc"
ROOT_TOKEN = "root-token-0123456789abc"
NODE_TOKEN = "node-token-0123456789abc"
TOKENS = f"# principals of this node\nalice:{ALICE}\n\nbob:{BOB}\nroot:{ROOT_TOKEN}:admin\n"
APPROVAL = KIND_VALUES["approval_requested"]
STARTED = KIND_VALUES["run_started"]
COMPLETED = KIND_VALUES["run_completed"]


@pytest.fixture(autouse=True)
def _fresh_audit_budget() -> None:
    # The audit log is per process: earlier tests in this second must not eat this test's lines.
    AUDIT._window, AUDIT._written, AUDIT.suppressed = 0.0, 0, 0


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    return path


def _client(address: str, token: str | None = None, tls: TLSConfig | None = None) -> GrpcNodeClient:
    return GrpcNodeClient(RemoteNode(address, token=token, tls=tls, connect_timeout_s=5.0))


@dataclass
class Follow:
    """A StartRun stream consumed in the background."""

    task: asyncio.Task[None]
    events: list[pb.Event]

    async def until(self, kind: int, timeout: float = 15.0) -> pb.Event:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for ev in self.events:
                if ev.kind == kind:
                    return ev
            if self.task.done():
                self.task.result()  # raise the stream's error
                break
            await asyncio.sleep(0.02)
        raise AssertionError(f"no event of kind {kind} in {[e.kind for e in self.events]}")


def _follow(client: GrpcNodeClient, request: pb.StartRunRequest) -> Follow:
    events: list[pb.Event] = []

    async def consume() -> None:
        async for batch in client.start_run(request):
            events.extend(batch.events)

    return Follow(asyncio.create_task(consume()), events)


async def _denied(call: Callable[[], Any], owner: str = "alice") -> PermissionDenied:
    with pytest.raises(PermissionDenied) as info:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    err = info.value
    assert (err.kind, err.domain, err.reason) == ("auth_error", "transport", "permission_denied")
    assert owner not in err.message  # the owner is not named to others
    return err


async def _raw_status(address: str, token: str, run_id: str) -> grpc.StatusCode:
    """GetRun without the client library: the status code on the wire."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=(("authorization", f"Bearer {token}"),))
    return info.value.code()


def _providers(config: Any) -> dict[str, Any]:
    return {**build_providers(config), "scripted": approval_provider()}


@pytest.fixture
async def owned_node(tokens_file: Path) -> AsyncIterator[NodeServer]:
    config = make_config(tokens_file=tokens_file, approval_timeout_ms=60_000)
    server = await start_server(config, NodeAgent(config, providers=_providers(config)))
    try:
        yield server
    finally:
        await server.stop()


def _addr(port: int) -> str:
    return f"127.0.0.1:{port}"


# -- the node ----------------------------------------------------------------------------


async def test_another_principals_run_cannot_be_seen_or_touched(owned_node: NodeServer) -> None:
    addr = _addr(owned_node.port)
    alice, bob, root = _client(addr, ALICE), _client(addr, BOB), _client(addr, ROOT_TOKEN)
    try:
        rid = ulid()
        run = _follow(alice, pb.StartRunRequest(run_id=rid, provider="scripted", prompt="go"))
        asked = await run.until(APPROVAL)
        approval_id = asked.approval_requested.approval_id
        assert owned_node.agent.runs[rid].owner == "alice"

        await _denied(lambda: bob.get_run(pb.GetRunRequest(run_id=rid)))
        await _denied(lambda: bob.attach_run(pb.AttachRunRequest(run_id=rid)))
        await _denied(lambda: bob.interrupt_run(pb.InterruptRunRequest(run_id=rid)))
        await _denied(lambda: bob.resolve_approval(
            pb.ResolveApprovalRequest(run_id=rid, approval_id=approval_id, decision="allow")))
        await _denied(lambda: bob.send_input(pb.SendInputRequest(run_id=rid, data=b"pwned\n", end_input=True)))
        # StartRun with alice's run id is refused; it does not attach bob to her run.
        await _denied(lambda: bob.start_run(pb.StartRunRequest(run_id=rid, provider="scripted", prompt="x")))
        assert await _raw_status(addr, BOB, rid) == grpc.StatusCode.PERMISSION_DENIED
        assert (await bob.list_runs(pb.ListRunsRequest())).runs == []

        # Nothing bob did reached the run: still waiting on its approval, one subscriber (alice).
        node_run = owned_node.agent.runs[rid]
        assert node_run.status == "running" and not node_run.done
        assert node_run.subscribers == 1
        assert approval_id in node_run._approvals

        # bob's own run is his; the admin sees both, with their owners.
        bob_rid = ulid()
        bobs = _follow(bob, pb.StartRunRequest(run_id=bob_rid, provider="shell", prompt="sleep 30"))
        await bobs.until(STARTED)
        assert [r.run_id for r in (await bob.list_runs(pb.ListRunsRequest())).runs] == [bob_rid]
        assert [(r.run_id, r.owner) for r in (await alice.list_runs(pb.ListRunsRequest())).runs] == [(rid, "alice")]
        listed = {r.run_id: r.owner for r in (await root.list_runs(pb.ListRunsRequest())).runs}
        assert listed == {rid: "alice", bob_rid: "bob"}
        assert (await root.get_run(pb.GetRunRequest(run_id=rid))).owner == "alice"
        await _denied(lambda: alice.interrupt_run(pb.InterruptRunRequest(run_id=bob_rid)), owner="bob")
        assert (await root.interrupt_run(pb.InterruptRunRequest(run_id=bob_rid))).accepted  # an admin may
        await bobs.until(COMPLETED)

        # The owner can do everything bob could not.
        await alice.resolve_approval(pb.ResolveApprovalRequest(run_id=rid, approval_id=approval_id, decision="allow"))
        await alice.send_input(pb.SendInputRequest(run_id=rid, data=b"ok\n", end_input=True))
        await run.until(COMPLETED)
        said = "".join(e.assistant_delta.content for e in run.events if e.kind == KIND_VALUES["assistant_delta"])
        assert said == "ok"  # not bob's "pwned"
        info = await alice.get_run(pb.GetRunRequest(run_id=rid))
        assert info.status == pb.RUN_STATUS_COMPLETED and info.owner == "alice"
    finally:
        for c in (alice, bob, root):
            await c.close()


async def test_start_with_another_principals_run_id_launches_nothing(owned_node: NodeServer) -> None:
    addr = _addr(owned_node.port)
    alice, bob = _client(addr, ALICE), _client(addr, BOB)
    try:
        rid = ulid()
        run = _follow(alice, pb.StartRunRequest(run_id=rid, provider="shell", prompt="echo mine"))
        await run.until(COMPLETED)
        attaches = owned_node.agent.metrics.attaches._value.get()
        await _denied(lambda: bob.start_run(pb.StartRunRequest(run_id=rid, provider="shell", prompt="echo theirs")))
        assert owned_node.agent.metrics.attaches._value.get() == attaches  # not counted as an attach
        assert list(owned_node.agent.runs) == [rid]
        assert owned_node.agent.runs[rid].spec.prompt == "echo mine"
        # The owner re-attaching with the same id still works (replay from the start).
        again = _follow(alice, pb.StartRunRequest(run_id=rid, provider="shell", prompt="echo mine"))
        await again.until(COMPLETED)
        assert [e.seq for e in again.events] == [e.seq for e in run.events]
    finally:
        await alice.close()
        await bob.close()


async def test_drain_needs_an_admin(owned_node: NodeServer) -> None:
    addr = _addr(owned_node.port)
    bob, root = _client(addr, BOB), _client(addr, ROOT_TOKEN)
    try:
        await _denied(lambda: bob.drain(pb.DrainRequest(deadline_ms=1000)))
        assert owned_node.agent.state == pb.NODE_STATE_READY
        resp = await root.drain(pb.DrainRequest(deadline_ms=1000))
        assert resp.state == pb.NODE_STATE_DRAINING == owned_node.agent.state
    finally:
        await bob.close()
        await root.close()


async def test_single_token_is_one_admin_principal() -> None:
    """The existing --token-file/ASM_TOKEN setup: one principal ("default", admin), behaviour unchanged."""
    server = await start_server(make_config(token="s3cret"))
    addr = _addr(server.port)
    try:
        async with Session("shell", node=RemoteNode(addr, token="s3cret")) as s:
            result = await s.query("echo hello")
        assert result.ok and result.text == "hello\n"
        client = _client(addr, "s3cret")
        try:
            runs = (await client.list_runs(pb.ListRunsRequest())).runs
            assert [r.owner for r in runs] == ["default"]
            assert (await client.get_run(pb.GetRunRequest(run_id=runs[0].run_id))).status == pb.RUN_STATUS_COMPLETED
            assert (await client.drain(pb.DrainRequest(deadline_ms=0))).state == pb.NODE_STATE_DRAINING
        finally:
            await client.close()
    finally:
        await server.stop()


async def test_single_token_and_tokens_file_together(tokens_file: Path) -> None:
    """The single token joins the named ones as the admin principal "default"."""
    server = await start_server(make_config(token="single-token-0123456789", tokens_file=tokens_file))
    addr = _addr(server.port)
    alice, single = _client(addr, ALICE), _client(addr, "single-token-0123456789")
    try:
        run = _follow(alice, pb.StartRunRequest(run_id=ulid(), provider="shell", prompt="echo a"))
        await run.until(COMPLETED)
        assert [r.owner for r in (await single.list_runs(pb.ListRunsRequest())).runs] == ["alice"]
    finally:
        await alice.close()
        await single.close()
        await server.stop()


async def test_embedded_agent_is_admin_unless_told_otherwise() -> None:
    agent = NodeAgent(make_config())
    await agent.start()
    try:
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            result = await s.query("echo local")
        assert result.ok
        (run,) = agent.runs.values()
        assert run.owner == "anonymous"  # no auth: the one admin principal
        assert (await agent.get_run(pb.GetRunRequest(run_id=run.spec.run_id))).owner == "anonymous"
        with acting_as(Principal("bob")):
            with pytest.raises(PermissionDenied):
                await agent.get_run(pb.GetRunRequest(run_id=run.spec.run_id))
            assert (await agent.list_runs(pb.ListRunsRequest())).runs == []
            with pytest.raises(PermissionDenied):
                await agent.drain(pb.DrainRequest())
        assert len((await agent.list_runs(pb.ListRunsRequest())).runs) == 1
    finally:
        await agent.stop()


# -- tokens file ---------------------------------------------------------------------------


A16, B16 = "a" * 16 + "-alpha", "b" * 16 + "-beta"


@pytest.mark.parametrize(("text", "line", "why"), [
    ("alice\n", 1, "expected NAME:TOKEN"),
    (f"alice:{A16}:admin:x\n", 1, "expected NAME:TOKEN"),
    ("# header\nalice:short-token\n", 2, "shorter than 16 bytes"),
    (f"alice:{A16}\n\n# again\nalice:{B16}\n", 4, "already defined on line 1"),
    (f"alice:{A16}\nbob:{A16}\n", 2, "the same token as line 1"),
    (f"alice:{A16}:root\n", 1, "unknown role"),
    (f"al ice:{A16}\n", 1, "invalid principal name"),
    (f":{A16}\n", 1, "invalid principal name"),
    ("alice:abc def ghijklmnop qrs\n", 1, "visible ASCII"),
    ("alice:tökentökentökentöken\n", 1, "visible ASCII"),
])
def test_malformed_tokens_file_names_the_line(text: str, line: int, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tokens(text, "tokens file F")
    msg = info.value.message
    assert f"tokens file F line {line}:" in msg and why in msg, msg
    for secret in (A16, B16, "short-token", "abc def", "tökentöken"):
        assert secret not in msg and secret not in repr(info.value)
    assert info.value.kind == "config_invalid"


def test_tokens_file_format() -> None:
    entries = parse_tokens(f"# comment\n\n  alice:{A16}  \nroot:{B16}:admin\n")
    assert [(p.name, p.admin, t) for p, t in entries] == [("alice", False, A16), ("root", True, B16)]
    with pytest.raises(ConfigError, match="defines no token"):
        parse_tokens("# nothing here\n\n")
    table = TokenTable(entries)
    assert A16 not in repr(table) and "alice" in repr(table)


async def test_bad_tokens_file_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    bad.write_text(f"alice:{A16}\nbob\n")
    with pytest.raises(ConfigError, match="line 2"):
        await start_server(make_config(tokens_file=bad))
    with pytest.raises(ConfigError, match="cannot read tokens file"):
        await start_server(make_config(tokens_file=tmp_path / "missing"))
    binary = tmp_path / "binary"
    binary.write_bytes(b"alice:" + b"\xff" * 20 + b"\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        await start_server(make_config(tokens_file=binary))
    clash = tmp_path / "clash"
    clash.write_text(f"default:{A16}\n")
    with pytest.raises(ConfigError, match="'default'"):
        load_tokens("single-token-0123456789", clash)
    same = tmp_path / "same"
    same.write_text(f"alice:{A16}\n")
    with pytest.raises(ConfigError, match="repeats the single") as info:
        load_tokens(A16, same)
    assert A16 not in info.value.message


def test_every_token_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: a match on the first token costs as many comparisons as no match at all."""
    calls: list[bytes] = []
    real = principal_mod.hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(principal_mod.hmac, "compare_digest", counting)
    table = TokenTable(parse_tokens(TOKENS))
    assert table.match(f"Bearer {ALICE}".encode()) == Principal("alice")
    assert len(calls) == 3
    calls.clear()
    assert table.match(b"Bearer nope") is None
    assert len(calls) == 3
    assert table.match(f"Bearer {ROOT_TOKEN}".encode()) == Principal("root", admin=True)
    assert table.match(ALICE.encode()) is None  # the scheme is required


# -- audit ---------------------------------------------------------------------------------


async def test_refused_calls_are_audited(owned_node: NodeServer, caplog: pytest.LogCaptureFixture) -> None:
    addr = _addr(owned_node.port)
    caplog.set_level(logging.WARNING, logger="asm.audit")
    wrong, alice, bob = _client(addr, "wrong-token-0123456789"), _client(addr, ALICE), _client(addr, BOB)
    try:
        with pytest.raises(NodeUnauthenticated):
            await wrong.list_runs(pb.ListRunsRequest())
        rid = ulid()
        await _follow(alice, pb.StartRunRequest(run_id=rid, provider="shell", prompt="echo a")).until(COMPLETED)
        await _denied(lambda: bob.get_run(pb.GetRunRequest(run_id=rid)))
        await _denied(lambda: bob.attach_run(pb.AttachRunRequest(run_id=rid)))
    finally:
        for c in (wrong, alice, bob):
            await c.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "asm.audit"]
    assert len(lines) == 3, lines
    unauth, get, attach = lines
    assert "principal=- " in unauth and "peer=ipv4:127.0.0.1:" in unauth
    assert "method=/asm.v1.NodeService/ListRuns" in unauth and unauth.endswith("outcome=unauthenticated")
    assert "principal=bob " in get and "method=/asm.v1.NodeService/GetRun" in get
    assert get.endswith("outcome=permission_denied")
    assert "method=/asm.v1.NodeService/AttachRun" in attach
    assert not any("wrong-token" in line or BOB in line for line in lines)  # tokens never logged


async def test_audit_flood_is_rate_limited(owned_node: NodeServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asm.audit")
    wrong = _client(_addr(owned_node.port), "wrong-token-0123456789")
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        results = await asyncio.gather(*(wrong.list_runs(pb.ListRunsRequest()) for _ in range(200)),
                                       return_exceptions=True)
    finally:
        await wrong.close()
    elapsed = loop.time() - started
    assert all(isinstance(r, NodeUnauthenticated) for r in results)
    lines = [r.getMessage() for r in caplog.records if r.name == "asm.audit"]
    assert 1 <= len(lines) <= AUDIT.per_second * (int(elapsed) + 2), (len(lines), elapsed)
    assert len(lines) < 200
    assert owned_node.agent.metrics.rejected.labels("auth")._value.get() == 200  # every refusal still counted


def test_audit_log_budget_and_summary(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    audit = AuditLog(per_second=5, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="asm.audit")
    for _ in range(50):
        audit.record("-", "ipv4:127.0.0.1:1", "/asm.v1.NodeService/ListRuns", "unauthenticated")
    assert len(caplog.records) == 5 and audit.suppressed == 45
    now[0] += 1.5
    audit.record("bob", "ipv4:127.0.0.1:2", "/m\nforged line", "permission_denied")
    summary, line = (r.getMessage() for r in caplog.records[5:])
    assert "45 refused call(s) not logged" in summary
    assert "\n" not in line and "/m\\x0aforged line" in line  # client text cannot forge log lines


def test_audit_summary_is_logged_when_a_flood_simply_stops(caplog: pytest.LogCaptureFixture) -> None:
    # The count of suppressed lines used to wait for the next refused call, which may never come.
    timers: list[tuple[float, Callable[[], None]]] = []
    audit = AuditLog(per_second=3, clock=lambda: 5.0, schedule=lambda delay, fn: timers.append((delay, fn)))
    caplog.set_level(logging.WARNING, logger="asm.audit")
    for _ in range(10):
        audit.record("-", "ipv4:127.0.0.1:1", "/asm.v1.NodeService/GetRun", "unauthenticated")
    assert len(caplog.records) == 3 and len(timers) == 1 and timers[0][0] == 1.0  # one timer per flood
    timers[0][1]()  # the flood stopped; the timer fires
    assert "7 refused call(s) not logged" in caplog.records[-1].getMessage()
    assert audit.suppressed == 0
    timers[0][1]()  # a second firing logs nothing more
    assert len(caplog.records) == 4


@pytest.mark.slow
def test_audit_summary_timer_is_real(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asm.audit")
    audit = AuditLog(per_second=1)
    for _ in range(3):
        audit.record("-", "peer", "/m", "unauthenticated")
    assert wait_until(lambda: any("2 refused call(s)" in r.getMessage() for r in caplog.records), 5.0)


async def test_another_principals_snapshot_cannot_be_diffed_or_rolled_back(tmp_path: Path, tokens_file: Path) -> None:
    # Snapshots are addressed by cwd: before, bob could roll back the workspace alice had snapshotted.
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "f.txt").write_text("alice's work\n")
    server = await start_server(make_config(tokens_file=tokens_file, workspace_roots=[ws]))
    addr = _addr(server.port)
    alice, bob, root = _client(addr, ALICE), _client(addr, BOB), _client(addr, ROOT_TOKEN)
    try:
        snap = await alice.snapshot(pb.SnapshotRequest(cwd=str(ws), backend="hash"))
        (ws / "f.txt").write_text("alice's newer work\n")
        await _denied(lambda: bob.diff(pb.DiffRequest(cwd=str(ws), from_id=snap.id)))
        await _denied(lambda: bob.rollback(pb.RollbackRequest(cwd=str(ws), snapshot_id=snap.id)))
        assert (ws / "f.txt").read_text() == "alice's newer work\n"
        mine = await bob.snapshot(pb.SnapshotRequest(cwd=str(ws), backend="hash"))
        await _denied(lambda: bob.diff(pb.DiffRequest(cwd=str(ws), from_id=mine.id, to_id=snap.id)))
        assert (await alice.diff(pb.DiffRequest(cwd=str(ws), from_id=snap.id))).modified == ["f.txt"]
        assert (await root.diff(pb.DiffRequest(cwd=str(ws), from_id=snap.id))).modified == ["f.txt"]  # an admin may
        # A snapshot id this agent did not make (a git ref from before a restart) is an admin's only.
        await _denied(lambda: alice.diff(pb.DiffRequest(cwd=str(ws), from_id="git-" + "0" * 40)), owner="bob")
    finally:
        for c in (alice, bob, root):
            await c.close()
        await server.stop()


# -- mutual TLS principals ---------------------------------------------------------------------


async def test_client_certificate_subjects_are_principals(tmp_path: Path) -> None:
    ca = trustme.CA()
    paths: dict[str, tuple[Path, Path]] = {}
    for name in ("alice", "bob", "ops"):
        leaf = ca.issue_cert(f"{name}@example", common_name=name)
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        paths[name] = (cert, key)
    server_leaf = ca.issue_cert("127.0.0.1")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    server_leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server_leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server = await start_server(make_config(tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key",
                                            tls_ca=tmp_path / "ca.pem", admin_principals=["cn:ops"]))

    def client(name: str) -> GrpcNodeClient:
        cert, key = paths[name]
        return _client(_addr(server.port), tls=TLSConfig.from_files(ca=tmp_path / "ca.pem", cert=cert, key=key))

    alice, bob, ops = client("alice"), client("bob"), client("ops")
    try:
        rid = ulid()
        await _follow(alice, pb.StartRunRequest(run_id=rid, provider="shell", prompt="echo a")).until(COMPLETED)
        assert server.agent.runs[rid].owner == "cn:alice"
        await _denied(lambda: bob.get_run(pb.GetRunRequest(run_id=rid)))
        assert (await bob.list_runs(pb.ListRunsRequest())).runs == []
        await _denied(lambda: bob.drain(pb.DrainRequest()))
        assert [r.owner for r in (await ops.list_runs(pb.ListRunsRequest())).runs] == ["cn:alice"]
        assert (await ops.drain(pb.DrainRequest(deadline_ms=1000))).state == pb.NODE_STATE_DRAINING
    finally:
        for c in (alice, bob, ops):
            await c.close()
        await server.stop()


# -- the controller --------------------------------------------------------------------------


@pytest.fixture
async def fleet(tokens_file: Path) -> AsyncIterator[tuple[NodeServer, ControllerServer]]:
    config = make_config(token=NODE_TOKEN, approval_timeout_ms=60_000)
    node = await start_server(config, NodeAgent(config, providers=_providers(config)))
    ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[_addr(node.port)],
                                                  node_token=NODE_TOKEN, tokens_file=tokens_file))
    try:
        yield node, ctl
    finally:
        await ctl.stop()
        await node.stop()


async def test_controller_enforces_ownership(fleet: tuple[NodeServer, ControllerServer]) -> None:
    node, ctl = fleet
    addr = _addr(ctl.port)
    alice, bob, root = _client(addr, ALICE), _client(addr, BOB), _client(addr, ROOT_TOKEN)
    try:
        rid = ulid()
        run = _follow(alice, pb.StartRunRequest(run_id=rid, provider="scripted", prompt="go"))
        approval_id = (await run.until(APPROVAL)).approval_requested.approval_id

        await _denied(lambda: bob.get_run(pb.GetRunRequest(run_id=rid)))
        await _denied(lambda: bob.attach_run(pb.AttachRunRequest(run_id=rid)))
        await _denied(lambda: bob.interrupt_run(pb.InterruptRunRequest(run_id=rid)))
        await _denied(lambda: bob.resolve_approval(
            pb.ResolveApprovalRequest(run_id=rid, approval_id=approval_id, decision="allow")))
        await _denied(lambda: bob.send_input(pb.SendInputRequest(run_id=rid, data=b"pwned\n", end_input=True)))
        await _denied(lambda: bob.start_run(pb.StartRunRequest(run_id=rid, provider="shell", prompt="echo x")))
        assert await _raw_status(addr, BOB, rid) == grpc.StatusCode.PERMISSION_DENIED
        assert (await bob.list_runs(pb.ListRunsRequest())).runs == []
        assert ctl.api.session._approvals.get(approval_id) is not None  # bob's approve did not consume it

        bob_rid = ulid()
        bobs = _follow(bob, pb.StartRunRequest(run_id=bob_rid, provider="shell", prompt="echo bob"))
        await bobs.until(COMPLETED)
        assert [(r.run_id, r.owner) for r in (await bob.list_runs(pb.ListRunsRequest())).runs] == [(bob_rid, "bob")]
        assert [r.run_id for r in (await alice.list_runs(pb.ListRunsRequest())).runs] == [rid]
        seen = {r.run_id: r.owner for r in (await root.list_runs(pb.ListRunsRequest())).runs}
        assert seen == {rid: "alice", bob_rid: "bob"}

        await alice.resolve_approval(pb.ResolveApprovalRequest(run_id=rid, approval_id=approval_id, decision="allow"))
        await alice.send_input(pb.SendInputRequest(run_id=rid, data=b"ok\n", end_input=True))
        await run.until(COMPLETED)
        said = "".join(e.assistant_delta.content for e in run.events if e.kind == KIND_VALUES["assistant_delta"])
        assert said == "ok"
        assert (await alice.get_run(pb.GetRunRequest(run_id=rid))).owner == "alice"
        # On the node, the controller's runs belong to the controller's own principal.
        assert {r.owner for r in node.agent.runs.values()} == {"default"}
    finally:
        for c in (alice, bob, root):
            await c.close()


async def test_controller_drain_node_needs_an_admin(fleet: tuple[NodeServer, ControllerServer]) -> None:
    node, ctl = fleet
    addr = _addr(ctl.port)
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = node_pb2_grpc.ControllerServiceStub(channel)
        request = pb.DrainNodeRequest(address=_addr(node.port), deadline_ms=1000)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.DrainNode(request, metadata=(("authorization", f"Bearer {BOB}"),))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert node.agent.state == pb.NODE_STATE_READY
        resp = await stub.DrainNode(request, metadata=(("authorization", f"Bearer {ROOT_TOKEN}"),))
        assert resp.state == pb.NODE_STATE_DRAINING == node.agent.state
    bob = _client(addr, BOB)
    try:
        await _denied(lambda: bob.drain(pb.DrainRequest()))
    finally:
        await bob.close()


async def test_controller_refuses_bad_tokens_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    bad.write_text(f"root:{A16}:superuser\n")
    with pytest.raises(ConfigError, match="line 1: unknown role"):
        await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=["127.0.0.1:1"], tokens_file=bad))


# -- the CLI ---------------------------------------------------------------------------------


def _asm(*args: str, token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ASM_TOKEN" and not k.startswith("ASM_NODE_")}
    return subprocess.run([sys.executable, "-m", "asm_cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=str(ROOT), env=env)


@pytest.mark.slow
async def test_node_serve_tokens_file(
    node_process: Callable[..., NodeProcess], tokens_file: Path, tmp_path: Path
) -> None:
    node = node_process("--tokens-file", str(tokens_file))
    for name, token in (("alice", ALICE), ("bob", BOB)):
        (tmp_path / f"{name}.tok").write_text(token + "\n")
    rid = ulid()
    mine = await asyncio.to_thread(_asm, "run", "--node", node.address, "--token-file", str(tmp_path / "alice.tok"),
                                   "--provider", "shell", "--run-id", rid, "--output", "jsonl", "echo mine")
    assert mine.returncode == 0, mine.stderr
    assert json.loads(mine.stdout.splitlines()[-1])["text"] == "mine\n"
    # bob reusing alice's run id: refused and typed, and he gets none of her output.
    theirs = await asyncio.to_thread(_asm, "run", "--node", node.address, "--token-file", str(tmp_path / "bob.tok"),
                                     "--provider", "shell", "--run-id", rid, "--output", "jsonl", "echo theirs")
    assert theirs.returncode != 0
    assert "Traceback" not in theirs.stderr
    assert "mine" not in theirs.stdout and "theirs" not in theirs.stdout
    summary = json.loads(theirs.stdout.splitlines()[-1])
    assert summary["error"]["reason"] == "permission_denied", summary
    async with asyncio.timeout(30):
        bob, alice = _client(node.address, BOB), _client(node.address, ALICE)
        try:
            assert (await bob.list_runs(pb.ListRunsRequest())).runs == []
            assert [r.owner for r in (await alice.list_runs(pb.ListRunsRequest())).runs] == ["alice"]
        finally:
            await bob.close()
            await alice.close()
    drained = await asyncio.to_thread(_asm, "node", "drain", "--node", node.address, "--token-file",
                                      str(tmp_path / "bob.tok"), "--output", "json")
    assert drained.returncode != 0 and "Traceback" not in drained.stderr
    assert "Drain needs an admin principal (bob is not one)" in drained.stderr, drained.stderr
    assert "outcome=permission_denied" in node.log() and "principal=bob" in node.log()


@pytest.mark.slow
def test_node_serve_refuses_a_bad_tokens_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    bad.write_text(f"alice:{A16}\nbob:{A16}\n")
    proc = _asm("node", "serve", "--listen", "127.0.0.1:0", "--tokens-file", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.startswith("asm: error:") and "line 2" in proc.stderr
    assert A16 not in proc.stderr and "Traceback" not in proc.stderr
    for cmd in (("node", "serve"), ("controller", "serve")):
        assert "--tokens-file" in _asm(*cmd, "--help").stdout


def test_permission_denied_round_trips() -> None:
    err = PermissionDenied("nope")
    assert err.grpc_status() == grpc.StatusCode.PERMISSION_DENIED
    back = error_from_rpc(err.grpc_status(), err.message, err.grpc_trailers())
    assert type(back) is PermissionDenied and back.reason == "permission_denied"
    assert isinstance(back, AsmError)
