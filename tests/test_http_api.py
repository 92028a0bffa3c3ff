"""The controller's HTTP API (asm_controller.http): REST + SSE over the same FleetApi as gRPC.

In-process: a node (``start_server``, with the scripted approval provider) behind ``start_controller`` with
``http_listen``, driven over real HTTP on 127.0.0.1 with httpx. As processes: ``asm node serve`` behind
``asm controller serve --http-listen 127.0.0.1:0``, its events followed with ``curl -N`` across a reconnect.
``alice`` and ``bob`` are plain principals, ``root`` is an admin.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi.routing import APIRoute

from asm_controller import GrpcNodeClient, RemoteNode
from asm_controller.http import HTTP_STATUS, MAX_BODY_BYTES
from asm_controller.service import ControllerConfig, ControllerServer, start_controller
from asm_node import NodeAgent, NodeServer, start_server
from asm_node.providers import build_providers
from asm_node.testing import PYTHON_BASENAME, serve_controller
from asm_wire import ConfigError, PermissionDenied, pb, ulid
from tests.support.processes import http_base, start_node_process
from tests.support.processes import node_config as make_config
from tests.support.providers import approval_provider

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abc"
ROOT = "root-token-0123456789abc"
NODE_TOKEN = "node-token-0123456789abc"
TOKENS = f"alice:{ALICE}\nbob:{BOB}\nroot:{ROOT}:admin\n"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_error(resp: httpx.Response, status: int, kind: str, reason: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert {"kind", "domain", "reason", "message"} <= set(err), err
    assert err["kind"] == kind, err
    if reason is not None:
        assert err["reason"] == reason, err
    assert "Traceback" not in resp.text
    return dict(err)


async def _sse(client: httpx.AsyncClient, url: str, token: str, *, headers: dict[str, str] | None = None,
               stop_after: int | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The frames of an event stream (id, event, data), until it ends or ``stop_after`` frames (then hung up)."""
    frames: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    async with asyncio.timeout(timeout), client.stream("GET", url, headers={**_auth(token), **(headers or {})}) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line == "":
                if "data" in cur:
                    frames.append(cur)
                    if stop_after is not None and len(frames) >= stop_after:
                        return frames
                cur = {}
            elif line.startswith(":"):
                continue
            else:
                key, _, value = line.partition(": ")
                cur[key] = json.loads(value) if key == "data" else value
    return frames


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    return path


@pytest.fixture
async def fleet(tokens_file: Path) -> AsyncIterator[tuple[NodeServer, ControllerServer, httpx.AsyncClient]]:
    config = make_config(token=NODE_TOKEN, approval_timeout_ms=60_000)
    providers = {**build_providers(config), "scripted": approval_provider()}
    node = await start_server(config, NodeAgent(config, providers=providers))
    ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{node.port}"],
                                                  node_token=NODE_TOKEN, tokens_file=tokens_file,
                                                  http_listen="127.0.0.1:0"))
    assert ctl.http_port
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{ctl.http_port}", timeout=30.0)
    try:
        yield node, ctl, client
    finally:
        await client.aclose()
        await ctl.stop()
        await node.stop()


async def _start(client: httpx.AsyncClient, token: str, **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/runs", json=body, headers=_auth(token))
    assert resp.status_code in (200, 201), resp.text
    return dict(resp.json())


# -- the OpenAPI document ------------------------------------------------------------------------


async def test_openapi_document_matches_the_routes(fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient]
                                                   ) -> None:
    _, ctl, client = fleet
    resp = await client.get("/openapi.json")
    assert resp.status_code == 200
    doc = resp.json()
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for route in _served_routes(ctl.http.app):
        if route.path == "/openapi.json":  # the document itself
            continue
        assert isinstance(route.original_route if hasattr(route, "original_route") else route, APIRoute), route.path
        assert route.include_in_schema, route.path  # no undocumented route
        served |= {(route.path, m) for m in route.methods}
    assert served == documented
    # And the server answers each documented operation (a route of its own, never no_route / 405).
    params = {"{run_id}": ulid(), "{approval_id}": "ap-x", "{address}": "127.0.0.1:1", "{name}": "nothing.js"}
    for path, method in sorted(documented):
        url = path
        for key, value in params.items():
            url = url.replace(key, value)
        resp = await client.request(method, url, headers=_auth(ROOT))
        if resp.status_code >= 400:
            err = resp.json()["error"]  # the inference endpoint answers in OpenAI's shape (code, not reason)
            assert err.get("reason", err.get("code")) not in ("no_route", "method_not_allowed"), (method, path)
    for path in ("/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/events", "/v1/runs/{run_id}/interrupt",
                 "/v1/runs/{run_id}/approvals/{approval_id}", "/v1/runs/{run_id}/input", "/v1/nodes",
                 "/v1/nodes/{address}/drain", "/v1/nodes/{address}/undrain", "/v1/sessions", "/healthz", "/readyz"):
        assert path in doc["paths"], path
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def _served_routes(app: Any) -> list[Any]:
    """The app's routes, flattened (FastAPI >= 0.160 keeps included routers as lazy branches)."""
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


# -- auth and errors -----------------------------------------------------------------------------


async def test_auth_and_the_one_error_shape(fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient]) -> None:
    _, _, client = fleet
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}

    resp = await client.get("/v1/runs")
    _assert_error(resp, 401, "auth_error", "unauthenticated")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    _assert_error(await client.get("/v1/runs", headers=_auth("not-a-token-0123456789")), 401, "auth_error")
    _assert_error(await client.get("/v1/runs", headers={"Authorization": ALICE}), 401, "auth_error")  # no "Bearer"

    bad = await client.post("/v1/runs", content=b"{not json", headers={**_auth(ALICE), "content-type": "application/json"})
    assert _assert_error(bad, 400, "config_invalid", "invalid_request")["domain"] == "config"
    _assert_error(await client.post("/v1/runs", json={"provider": "shell"}, headers=_auth(ALICE)), 400,
                  "config_invalid", "invalid_request")  # no prompt
    _assert_error(await client.post("/v1/runs", json={"provider": "shell", "prompt": "x", "bogus": 1},
                                    headers=_auth(ALICE)), 400, "config_invalid")
    _assert_error(await client.get("/v1/nope", headers=_auth(ALICE)), 404, "not_found", "no_route")
    _assert_error(await client.get("/nope"), 404, "not_found", "no_route")
    _assert_error(await client.delete("/v1/runs", headers=_auth(ALICE)), 405, "config_invalid", "method_not_allowed")
    _assert_error(await client.get(f"/v1/runs/{ulid()}", headers=_auth(ALICE)), 404, "not_found", "run_not_found")
    _assert_error(await client.get("/v1/runs?status=sleepy", headers=_auth(ALICE)), 400, "config_invalid",
                  "invalid_status")

    big = b'{"provider": "shell", "prompt": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    _assert_error(await client.post("/v1/runs", content=big, headers={**_auth(ALICE), "content-type": "application/json"}),
                  413, "buffer_overflow", "request_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"provider": "shell", "prompt": "'
        for _ in range(6):
            yield b"x" * (1 << 20)
        yield b'"}'
    _assert_error(await client.post("/v1/runs", content=chunks(), headers={**_auth(ALICE), "content-type": "application/json"}),
                  413, "buffer_overflow", "request_too_large")


def test_status_mapping_covers_the_error_table() -> None:
    from asm_wire._errors import _TABLE_TEXT, _read_table

    for row in _read_table(_TABLE_TEXT):
        assert row.status in HTTP_STATUS, row
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert HTTP_STATUS[grpc.StatusCode.PERMISSION_DENIED] == 403
    assert HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED] == 401
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429


async def test_exposure_rules(tmp_path: Path, tokens_file: Path) -> None:
    with pytest.raises(ConfigError, match="non-loopback"):
        await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=["127.0.0.1:1"], http_listen="0.0.0.0:0"))
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    with pytest.raises(ConfigError, match="bearer token"):
        await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=["127.0.0.1:1"], http_listen="127.0.0.1:0",
                                                tls_ca=ca))


# -- runs ----------------------------------------------------------------------------------------


async def test_run_start_follow_get_list_and_ownership(
        fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient]) -> None:
    _, ctl, client = fleet
    rid = ulid()
    started = await _start(client, ALICE, provider="shell", prompt="echo hello over http", run_id=rid)
    assert started["created"] is True
    assert started["run"]["run_id"] == rid and started["run"]["owner"] == "alice"
    assert started["run"]["status"] in ("starting", "queued", "running", "completed")
    frames = await _sse(client, f"/v1/runs/{rid}/events", ALICE)
    assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
    assert frames[-1]["event"] == "run_completed"
    assert all(f["event"] == f["data"]["kind"] and int(f["id"]) == f["data"]["seq"] for f in frames)
    text = "".join(f["data"]["payload"].get("content", "") for f in frames if f["event"] == "assistant_delta")
    assert "hello over http" in text

    again = await _start(client, ALICE, provider="shell", prompt="echo a second time", run_id=rid)
    assert again["created"] is False and again["run"]["run_id"] == rid  # never a second execution

    got = (await client.get(f"/v1/runs/{rid}", headers=_auth(ALICE))).json()
    assert got["status"] == "completed" and got["exit_code"] == 0
    assert got["result"]["status"] == "completed" and "hello over http" in json.dumps(got["result"])
    listed = (await client.get("/v1/runs", headers=_auth(ALICE))).json()
    assert [r["run_id"] for r in listed["runs"]] == [rid]
    assert (await client.get("/v1/runs?status=completed&limit=1", headers=_auth(ALICE))).json()["runs"][0]["run_id"] == rid

    # Another principal: as over gRPC (PERMISSION_DENIED there, 403 here), and it lists nothing.
    grpc_client = GrpcNodeClient(RemoteNode(f"127.0.0.1:{ctl.port}", token=BOB, connect_timeout_s=5.0))
    try:
        with pytest.raises(PermissionDenied):
            await grpc_client.get_run(pb.GetRunRequest(run_id=rid))
    finally:
        await grpc_client.close()
    _assert_error(await client.get(f"/v1/runs/{rid}", headers=_auth(BOB)), 403, "auth_error", "permission_denied")
    _assert_error(await client.get(f"/v1/runs/{rid}/events", headers=_auth(BOB)), 403, "auth_error")
    _assert_error(await client.post(f"/v1/runs/{rid}/interrupt", headers=_auth(BOB)), 403, "auth_error")
    _assert_error(await client.post("/v1/runs", json={"provider": "shell", "prompt": "echo x", "run_id": rid},
                                    headers=_auth(BOB)), 403, "auth_error")
    assert (await client.get("/v1/runs", headers=_auth(BOB))).json()["runs"] == []
    assert {r["run_id"] for r in (await client.get("/v1/runs", headers=_auth(ROOT))).json()["runs"]} == {rid}
    sessions = (await client.get("/v1/sessions", headers=_auth(ALICE))).json()
    assert len(sessions["sessions"]) == 1


async def test_events_resume_exactly_once(fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient]) -> None:
    _, _, client = fleet
    rid = (await _start(client, ALICE, provider="shell", prompt="echo resumed"))["run"]["run_id"]
    first = await _sse(client, f"/v1/runs/{rid}/events", ALICE, stop_after=2)
    last = first[-1]["id"]
    rest = await _sse(client, f"/v1/runs/{rid}/events", ALICE, headers={"Last-Event-ID": last})
    seqs = [int(f["id"]) for f in first + rest]
    assert seqs == list(range(1, len(seqs) + 1)) and rest[-1]["event"] == "run_completed"
    tail = await _sse(client, f"/v1/runs/{rid}/events?after_seq={int(last) + 1}", ALICE)
    assert [int(f["id"]) for f in tail] == seqs[int(last) + 1:]
    # Last-Event-ID wins over after_seq (a reconnecting EventSource keeps the URL it was opened with).
    again = await _sse(client, f"/v1/runs/{rid}/events?after_seq=0", ALICE, headers={"Last-Event-ID": str(seqs[-2])})
    assert [int(f["id"]) for f in again] == [seqs[-1]]
    # After the end (an EventSource reconnects): 204, which tells it to stop; never the end again.
    done = await client.get(f"/v1/runs/{rid}/events", headers={**_auth(ALICE), "Last-Event-ID": str(seqs[-1])})
    assert done.status_code == 204 and done.content == b""
    _assert_error(await client.get(f"/v1/runs/{rid}/events", headers={**_auth(ALICE), "Last-Event-ID": "x"}), 400,
                  "config_invalid", "invalid_last_event_id")


async def test_approval_and_input(fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient]) -> None:
    _, _, client = fleet
    rid = (await _start(client, ALICE, provider="scripted", prompt="go"))["run"]["run_id"]
    frames: list[dict[str, Any]] = []
    # Up to the approval request: hang up there, as a console would while a person decides.
    async with asyncio.timeout(20):
        while not any(f["event"] == "approval_requested" for f in frames):
            frames = await _sse(client, f"/v1/runs/{rid}/events", ALICE, stop_after=len(frames) + 1)
    approval = next(f["data"] for f in frames if f["event"] == "approval_requested")
    approval_id = approval["payload"]["approval_id"]
    _assert_error(await client.post(f"/v1/runs/{rid}/approvals/{approval_id}", json={"decision": "allow"},
                                    headers=_auth(BOB)), 403, "auth_error")
    _assert_error(await client.post(f"/v1/runs/{rid}/approvals/{approval_id}", json={"decision": "maybe"},
                                    headers=_auth(ALICE)), 400, "config_invalid")
    resp = await client.post(f"/v1/runs/{rid}/approvals/{approval_id}", json={"decision": "allow", "reason": "ok"},
                             headers=_auth(ALICE))
    assert resp.status_code == 200, resp.text
    resp = await client.post(f"/v1/runs/{rid}/input", json={"data": "typed over http\n", "end_input": True},
                             headers=_auth(ALICE))
    assert resp.status_code == 200, resp.text
    rest = await _sse(client, f"/v1/runs/{rid}/events", ALICE, headers={"Last-Event-ID": frames[-1]["id"]})
    kinds = [f["event"] for f in rest]
    assert "approval_resolved" in kinds and kinds[-1] == "run_completed"
    assert "typed over http" in json.dumps([f["data"] for f in rest])
    assert [int(f["id"]) for f in frames + rest] == list(range(1, len(frames) + len(rest) + 1))


async def test_interrupt(fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient]) -> None:
    _, _, client = fleet
    rid = (await _start(client, ALICE, provider="shell", prompt="sleep 30"))["run"]["run_id"]
    await _sse(client, f"/v1/runs/{rid}/events", ALICE, stop_after=1)  # it runs
    resp = await client.post(f"/v1/runs/{rid}/interrupt", headers=_auth(ALICE))
    assert resp.status_code == 200 and resp.json() == {"accepted": True}
    frames = await _sse(client, f"/v1/runs/{rid}/events", ALICE, timeout=20)
    assert frames[-1]["event"] == "run_completed"
    assert frames[-1]["data"]["payload"]["status"] == "interrupted"
    assert (await client.get(f"/v1/runs/{rid}", headers=_auth(ALICE))).json()["status"] == "interrupted"


async def test_drain_and_undrain(fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient]) -> None:
    node, _, client = fleet
    address = f"127.0.0.1:{node.port}"
    _assert_error(await client.post(f"/v1/nodes/{address}/drain", headers=_auth(ALICE)), 403, "auth_error",
                  "permission_denied")
    _assert_error(await client.post("/v1/nodes/127.0.0.1:1/drain", headers=_auth(ROOT)), 404, "not_found",
                  "node_not_found")
    nodes = (await client.get("/v1/nodes", headers=_auth(ALICE))).json()
    assert [(n["address"], n["state"]) for n in nodes["nodes"]] == [(address, "ready")]
    resp = await client.post(f"/v1/nodes/{address}/drain", json={"deadline_ms": 60_000}, headers=_auth(ROOT))
    assert resp.status_code == 200, resp.text
    nodes = (await client.get("/v1/nodes", headers=_auth(ROOT))).json()
    assert nodes["nodes"][0]["state"] == "draining"
    assert (await client.post(f"/v1/nodes/{address}/undrain", headers=_auth(ROOT))).status_code == 200
    nodes = (await client.get("/v1/nodes", headers=_auth(ROOT))).json()
    assert nodes["nodes"][0]["state"] == "ready"


# -- real processes, curl -N ---------------------------------------------------------------------


def _curl_events(url: str, token: str, *extra: str, until: int | None = None, timeout: float = 30.0) -> str:
    """``curl -N`` on an event stream: all of it, or hung up (killed) once ``until`` frames have arrived."""
    proc = subprocess.Popen(["curl", "-sS", "-N", "-H", f"Authorization: Bearer {token}", *extra, url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out: list[str] = []
    frames = 0
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("id: "):
                frames += 1
            if until is not None and line == "\n" and frames >= until:
                break
            assert time.monotonic() < deadline, "".join(out)
    finally:
        proc.kill()
        proc.wait()
    return "".join(out)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_processes_curl_resume(tmp_path: Path, tokens_file: Path) -> None:
    script = tmp_path / "count.py"
    script.write_text("import time\nfor i in range(12):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)\n")
    (tmp_path / "node-token").write_text(NODE_TOKEN)
    node = start_node_process(tmp_path, "--token-file", str(tmp_path / "node-token"), "--shell-allow",
                              PYTHON_BASENAME)
    try:
        (tmp_path / "ctl-node-token").write_text(NODE_TOKEN)
        ctl = serve_controller(tmp_path, "--node", node.address, "--tokens-file", str(tokens_file),
                               "--node-token-file", str(tmp_path / "ctl-node-token"), "--http-listen", "127.0.0.1:0",
                               token=ROOT)
        try:
            base = http_base(ctl)
            resp = httpx.post(f"{base}/v1/runs", json={"provider": "shell", "prompt": f"{PYTHON_BASENAME} {script}",
                                                       "cwd": str(tmp_path)}, headers=_auth(ALICE), timeout=30)
            assert resp.status_code == 201, resp.text
            rid = resp.json()["run"]["run_id"]
            first = _curl_events(f"{base}/v1/runs/{rid}/events", ALICE, until=4)
            ids = re.findall(r"^id: (\d+)$", first, re.M)
            assert len(ids) >= 4
            rest = _curl_events(f"{base}/v1/runs/{rid}/events", ALICE, "-H", f"Last-Event-ID: {ids[-1]}")
            rest_ids = re.findall(r"^id: (\d+)$", rest, re.M)
            seqs = [int(i) for i in ids + rest_ids]
            assert seqs == list(range(1, len(seqs) + 1)), (first, rest)
            assert "event: run_completed" in rest
            lines = re.findall(r"line (\d+)", first + rest)
            assert sorted(set(lines), key=int) == [str(i) for i in range(12)]
            # The unauthenticated curl gets the one error shape.
            refused = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", f"{base}/v1/runs/{rid}/events"],
                                     capture_output=True, text=True, timeout=30)
            body, code = refused.stdout.rsplit("\n", 1)
            assert code == "401" and json.loads(body)["error"]["kind"] == "auth_error"
        finally:
            ctl.stop()
    finally:
        node.stop()


# -- TLS, keep-alive, shutdown -------------------------------------------------------------------


async def test_tls_with_the_controllers_certificate(tmp_path: Path, tokens_file: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    config = make_config(token=NODE_TOKEN)
    node = await start_server(config, NodeAgent(config, providers=build_providers(config)))
    ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{node.port}"],
                                                  node_token=NODE_TOKEN, tokens_file=tokens_file,
                                                  tls_cert=cert_path, tls_key=key_path, http_listen="127.0.0.1:0"))
    try:
        trusted = ssl.create_default_context()
        ca.configure_trust(trusted)
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{ctl.http_port}", verify=trusted) as client:
            assert (await client.get("/v1/nodes", headers=_auth(ALICE))).status_code == 200
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ctl.http_port}") as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get("/healthz")  # no clear text next to TLS
    finally:
        await ctl.stop()
        await node.stop()


async def test_keepalive_comments_and_stop_ends_streams(
        fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch) -> None:
    import asm_controller.http._runs as runs_mod

    monkeypatch.setattr(runs_mod, "KEEPALIVE_S", 0.2)
    _, ctl, client = fleet
    rid = (await _start(client, ALICE, provider="scripted", prompt="go"))["run"]["run_id"]  # waits for approval
    comments = 0
    stopping: asyncio.Future[None] | None = None
    began = time.monotonic()
    async with asyncio.timeout(20), client.stream("GET", f"/v1/runs/{rid}/events", headers=_auth(ALICE)) as r:
        async for line in r.aiter_lines():
            if line == ": keep-alive":
                comments += 1
                if comments == 2:
                    stopping = asyncio.ensure_future(ctl.http.stop())  # the stream ends, the server stops
    assert stopping is not None
    await asyncio.wait_for(stopping, 10)
    assert comments >= 2 and time.monotonic() - began < 15


async def test_readyz_follows_the_lease_keeper_and_the_store(
        fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch) -> None:
    _, ctl, client = fleet
    monkeypatch.setattr(ctl.api.keeper, "healthy", False)
    _assert_error(await client.get("/readyz"), 503, "connection_failed", "store_unreachable")
    monkeypatch.setattr(ctl.api.keeper, "healthy", True)

    async def unreachable(key: str) -> str | None:
        raise OSError("connection refused")
    monkeypatch.setattr(ctl.api.store, "meta_get", unreachable)
    err = _assert_error(await client.get("/readyz"), 503, "connection_failed", "store_unreachable")
    assert "connection refused" in err["message"]
    assert (await client.get("/healthz")).status_code == 200  # the process is still up


async def test_a_known_run_id_while_it_runs(fleet: tuple[NodeServer, ControllerServer, httpx.AsyncClient]) -> None:
    _, _, client = fleet
    rid = ulid()
    first = await _start(client, ALICE, provider="scripted", prompt="go", run_id=rid)  # waits for an approval
    again = await _start(client, ALICE, provider="scripted", prompt="go", run_id=rid)
    assert (first["created"], again["created"]) == (True, False)
    assert again["run"]["status"] in ("starting", "running")
    assert (await client.post(f"/v1/runs/{rid}/interrupt", headers=_auth(ALICE))).json() == {"accepted": True}
    frames = await _sse(client, f"/v1/runs/{rid}/events", ALICE)
    assert sum(f["event"] == "run_started" for f in frames) == 1  # one execution


async def test_a_mounted_router_shares_auth_errors_and_the_document(tokens_file: Path) -> None:
    """How the inference endpoint mounts: an APIRouter using the app's dependencies, given to start_controller."""
    from fastapi import APIRouter, Depends

    from asm_controller.http import Caller, caller

    extra = APIRouter()

    @extra.get("/v1/whoami")
    async def whoami(c: Caller = Depends(caller)) -> dict[str, Any]:  # noqa: B008
        nodes = await c.call(c.api.list_nodes, pb.ListNodesRequest())
        return {"principal": c.principal.name, "nodes": len(nodes.nodes)}

    config = make_config(token=NODE_TOKEN)
    node = await start_server(config, NodeAgent(config, providers=build_providers(config)))
    ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{node.port}"],
                                                  node_token=NODE_TOKEN, tokens_file=tokens_file,
                                                  http_listen="127.0.0.1:0"), http_routers=[extra])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ctl.http_port}") as client:
            assert (await client.get("/v1/whoami", headers=_auth(BOB))).json() == {"principal": "bob", "nodes": 1}
            _assert_error(await client.get("/v1/whoami"), 401, "auth_error")
            assert "/v1/whoami" in (await client.get("/openapi.json")).json()["paths"]
    finally:
        await ctl.stop()
        await node.stop()
