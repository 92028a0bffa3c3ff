"""Endpoint leases over REST on real processes: ``asm controller serve --http-listen`` (SQLite --state) in
front of a shell node. ``POST /v1/endpoints`` publishes a lease; the real ``openai`` client uses its base URL
with its own token; ``DELETE /v1/endpoints/{ref}`` releases it (owner or admin); leases expire; a restarted
controller on the same store still serves them. ``alice`` and ``bob`` are plain principals, ``root`` an admin.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from asm_node.testing import ServedProcess, serve_controller
from tests.support.processes import NodeProcess, start_node_process, wait_until

pytestmark = pytest.mark.slow

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abc"
ROOT = "root-token-0123456789abc"
NODE_TOKEN = "node-token-0123456789abc"
SHELL = {"request": {"model_preference": {"provider": "shell", "id": "sh"}}}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Fleet:
    tmp: Path
    node: NodeProcess
    port: int
    ctl: ServedProcess | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.ctl = serve_controller(
            self.tmp, "--node", self.node.address, "--tokens-file", str(self.tmp / "tokens"),
            "--node-token-file", str(self.tmp / "node-token"), "--http-listen", f"127.0.0.1:{self.port}",
            "--state", f"sqlite:///{self.tmp / 'state' / 'controller.sqlite3'}", token=ROOT)
        ctl = self.ctl
        assert wait_until(lambda: re.search(r"HTTP on port (\d+)", ctl.log()) is not None)

    def stop(self) -> None:
        if self.ctl is not None:
            self.ctl.stop()
            self.ctl = None

    def ensure(self, token: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return httpx.post(f"{self.base}/v1/endpoints", json=body or SHELL, headers=_auth(token), timeout=30)

    def release(self, token: str, ref: str) -> httpx.Response:
        return httpx.delete(f"{self.base}/v1/endpoints/{ref}", headers=_auth(token), timeout=30)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    (tmp_path / "tokens").write_text(f"alice:{ALICE}\nbob:{BOB}\nroot:{ROOT}:admin\n")
    (tmp_path / "node-token").write_text(NODE_TOKEN)
    node = start_node_process(tmp_path, "--token-file", str(tmp_path / "node-token"), "--shell-allow", "echo")
    f = Fleet(tmp_path, node, _free_port())
    try:
        f.start()
        yield f
    finally:
        f.stop()
        node.stop()


def _lease(resp: httpx.Response) -> tuple[str, str, str]:
    """(lease_ref, base_url, token) of a POST /v1/endpoints answer."""
    assert resp.status_code == 201, resp.text
    desc = resp.json()["descriptor"]
    token = desc["headers"]["authorization"].removeprefix("Bearer ")
    return desc["lease_ref"], desc["base_url"], token


def _complete(base_url: str, token: str, text: str) -> str:
    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0)
    done = client.chat.completions.create(model="sh", messages=[{"role": "user", "content": f"echo {text}"}])
    return done.choices[0].message.content or ""


def test_a_lease_is_served_with_its_own_token_and_released_by_its_owner(fleet: Fleet) -> None:
    resp = fleet.ensure(ALICE)
    ref, base_url, token = _lease(resp)
    body = resp.json()
    assert base_url == f"{fleet.base}/leases/{ref}/v1"  # the listener's own URL
    assert body["compatibility"]["compatible"] is True and body["descriptor"]["provider_identity"] == "shell"
    assert token not in (ALICE, BOB, ROOT)
    # The real openai client on the lease's base URL with its token: non-stream and stream.
    assert "hello lease" in _complete(base_url, token, "hello lease")
    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0)
    chunks = list(client.chat.completions.create(model="sh", stream=True,
                                                 messages=[{"role": "user", "content": "echo streamed lease"}]))
    assert "streamed lease" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [m.id for m in client.models.list()] == ["sh"]
    # The lease's run is its owner's (a run of alice's in the run API).
    runs = httpx.get(f"{fleet.base}/v1/runs", headers=_auth(ALICE), timeout=30).json()
    assert any(r.get("provider") == "shell" for r in runs.get("runs", [])), runs
    bobs = httpx.get(f"{fleet.base}/v1/runs", headers=_auth(BOB), timeout=30).json()
    assert not any(r.get("provider") == "shell" for r in bobs.get("runs", [])), bobs
    # A controller token is not the lease's: the lease path takes its own token only (a lease token is a
    # capability for one pinned model, shared with a tool; a controller token opens the whole API).
    for other in (ALICE, ROOT):
        with pytest.raises(openai.AuthenticationError):
            _complete(base_url, other, "nope")
    # And the lease's token is no controller token.
    assert httpx.get(f"{fleet.base}/v1/runs", headers=_auth(token), timeout=30).status_code == 401
    # Another principal cannot release it; no token at all is refused before that.
    denied = fleet.release(BOB, ref)
    assert denied.status_code == 403 and denied.json()["error"]["reason"] == "permission_denied", denied.text
    assert httpx.delete(f"{fleet.base}/v1/endpoints/{ref}", timeout=30).status_code == 401
    assert "still here" in _complete(base_url, token, "still here")
    # Its owner releases it: its URL is gone (404 before the token check, as in ASM), a second release is 404.
    assert fleet.release(ALICE, ref).status_code == 204
    with pytest.raises(openai.NotFoundError):
        _complete(base_url, token, "gone")
    again = fleet.release(ALICE, ref)
    assert again.status_code == 404 and again.json()["error"]["reason"] == "lease_not_found"
    # An admin may release anyone's.
    ref2, _, _ = _lease(fleet.ensure(BOB))
    assert fleet.release(ROOT, ref2).status_code == 204


def test_refusals_carry_asm_reasons(fleet: Fleet) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"request": {"model_preference": {"provider": "nope", "id": "x"}}}, "unsupported_provider"),
        ({"request": {"model_preference": {"provider": "shell"}}}, "missing_model_identity"),
        ({"request": {"model_preference": {"provider": "shell", "id": "sh"}, "tools": [{"type": "function"}]}},
         "incompatible"),
        ({**SHELL, "consumer_manifest": {"accepted_protocols": 7}}, "invalid_consumer_manifest"),
        ({**SHELL, "ttl_s": -1}, "invalid_request"),
        ({**SHELL, "ttl_s": 10**9}, "invalid_request"),
        ({"nothing": 1}, "invalid_request"),
    ]
    for body, reason in cases:
        resp = fleet.ensure(ALICE, body)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["reason"] == reason, (body, resp.text)
    incompatible = fleet.ensure(ALICE, cases[2][0]).json()["error"]
    assert incompatible["compatibility"]["missing_requirements"] == ["tool_calling"]
    assert httpx.post(f"{fleet.base}/v1/endpoints", json=SHELL, timeout=30).status_code == 401
    assert httpx.post(f"{fleet.base}/v1/endpoints", json=SHELL, headers=_auth("wrong-token-0123456789"),
                      timeout=30).status_code == 401


def test_an_expired_lease_stops_working(fleet: Fleet) -> None:
    started = time.time()
    ref, base_url, token = _lease(fleet.ensure(ALICE, {**SHELL, "ttl_s": 3.0}))
    assert "before expiry" in _complete(base_url, token, "before expiry")
    time.sleep(max(0.0, started + 3.2 - time.time()))
    with pytest.raises(openai.NotFoundError):
        _complete(base_url, token, "after expiry")
    assert fleet.release(ALICE, ref).status_code == 404


def test_a_lease_survives_a_controller_restart_on_the_same_store(fleet: Fleet) -> None:
    ref, base_url, token = _lease(fleet.ensure(ALICE))
    released, _, _ = _lease(fleet.ensure(ALICE))
    assert fleet.release(ALICE, released).status_code == 204
    fleet.stop()
    fleet.start()
    assert "after restart" in _complete(base_url, token, "after restart")  # it is in the store
    with pytest.raises(openai.AuthenticationError):
        _complete(base_url, "wrong-token-0123456789abcdef", "nope")
    missing = httpx.get(f"{fleet.base}/leases/{released}/health", headers=_auth(token), timeout=30)
    assert missing.status_code == 404
    assert fleet.release(BOB, ref).status_code == 403  # still alice's
    assert fleet.release(ALICE, ref).status_code == 204


def test_the_lease_api_is_in_the_openapi_document(fleet: Fleet) -> None:
    paths = httpx.get(f"{fleet.base}/openapi.json", timeout=30).json()["paths"]
    assert "post" in paths["/v1/endpoints"] and "requestBody" in paths["/v1/endpoints"]["post"]
    assert "delete" in paths["/v1/endpoints/{lease_ref}"]
    for path in ("/leases/{lease_ref}/v1/chat/completions", "/leases/{lease_ref}/v1/models",
                 "/leases/{lease_ref}/health"):
        assert path in paths, path
