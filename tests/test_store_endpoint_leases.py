"""The run store's inference endpoint leases (schema v3) and StoreLeaseStore over it: one contract over
memory, SQLite and a real PostgreSQL (the fixtures of tests/test_store.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest

from asm_controller._store import EndpointLeaseRecord, InvalidRecord, RunStore, open_store
from asm_controller.inference import EndpointPublisher, Lease, StoreLeaseStore, token_digest
from asm_wire._principal import Principal, acting_as
from tests import test_store as contract
from tests.test_store import ALL, DURABLE, raw_sql

backend_url, make_store, store = contract.backend_url, contract.make_store, contract.store

T0 = 1_000_000.0
DIGEST = "sha256:" + hashlib.sha256(b"tok").hexdigest()


def rec(ref: str = "lease_1", **fields: Any) -> EndpointLeaseRecord:
    base: dict[str, Any] = {"owner": "alice", "provider": "shell", "model": "sh", "token_digest": DIGEST,
                            "created_at": T0, "expires_at": T0 + 60, "data": {"endpoint_id": "endpoint_1"}}
    return EndpointLeaseRecord(ref=ref, **{**base, **fields})


@ALL
async def test_put_get_delete_round_trip(store: RunStore) -> None:
    assert await store.get_endpoint_lease("lease_1") is None
    await store.put_endpoint_lease(rec())
    assert await store.get_endpoint_lease("lease_1") == rec()
    await store.put_endpoint_lease(rec(expires_at=T0 + 120, data={"x": [1, "é"]}))  # a put replaces
    assert await store.get_endpoint_lease("lease_1") == rec(expires_at=T0 + 120, data={"x": [1, "é"]})
    assert await store.delete_endpoint_lease("lease_1") is True
    assert await store.delete_endpoint_lease("lease_1") is False
    assert await store.get_endpoint_lease("lease_1") is None


@ALL
async def test_expired_lists_the_expired_refs_soonest_first(store: RunStore) -> None:
    for i, expires in enumerate((T0 + 30, T0 + 10, T0 + 20, T0 + 99)):
        await store.put_endpoint_lease(rec(f"lease_{i}", expires_at=expires))
    assert await store.expired_endpoint_leases(now=T0) == []
    assert await store.expired_endpoint_leases(now=T0 + 20) == ["lease_1", "lease_2"]  # expires_at <= now
    assert await store.expired_endpoint_leases(now=T0 + 50) == ["lease_1", "lease_2", "lease_0"]
    assert await store.expired_endpoint_leases(now=T0 + 50, limit=1) == ["lease_1"]
    assert await store.expired_endpoint_leases(now=T0 + 50, limit=0) == []


@ALL
@pytest.mark.parametrize("bad", [
    {"ref": ""}, {"ref": "x" * 129}, {"ref": "a\x00b"}, {"ref": 7}, {"owner": ""}, {"provider": ""},
    {"model": "m" * 257}, {"token_digest": "tok"}, {"token_digest": ""}, {"created_at": -1.0},
    {"expires_at": float("nan")}, {"expires_at": T0 - 1}, {"data": {"a": float("inf")}}, {"data": []},
    {"created_at": True},
])
async def test_bad_input_is_invalid_record(store: RunStore, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidRecord):
        await store.put_endpoint_lease(dataclasses.replace(rec(), **bad))
    assert await store.expired_endpoint_leases(now=T0 + 1e6) == []  # nothing was written


@ALL
async def test_bad_arguments_are_invalid_record(store: RunStore) -> None:
    with pytest.raises(InvalidRecord):
        await store.put_endpoint_lease({"ref": "x"})  # type: ignore[arg-type]
    for call in (store.get_endpoint_lease, store.delete_endpoint_lease):
        for ref in ("", "x" * 129, None):
            with pytest.raises(InvalidRecord):
                await call(ref)  # type: ignore[arg-type]
    for kwargs in ({"now": -1.0}, {"now": "soon"}, {"now": T0, "limit": -1}, {"now": T0, "limit": True}):
        with pytest.raises(InvalidRecord):
            await store.expired_endpoint_leases(**kwargs)


@DURABLE
async def test_the_store_never_holds_the_token(store: RunStore, backend_url: str) -> None:
    publisher = EndpointPublisher("http://h:1", StoreLeaseStore(store))
    with acting_as(Principal("alice"), "test"):
        desc, _ = await publisher.ensure_endpoint({"model_preference": {"provider": "shell", "id": "sh"}}, {})
    token = desc.headers["authorization"].removeprefix("Bearer ")
    rows = await raw_sql(backend_url, "SELECT ref, owner, provider, model, token_digest, data FROM asm_endpoint_leases")
    assert len(rows) == 1 and rows[0][:5] == (desc.lease_ref, "alice", "shell", "sh", token_digest(token))
    assert token not in repr(rows)


@ALL
async def test_store_lease_store_authenticates_by_digest_and_keeps_the_lease(store: RunStore) -> None:
    leases = StoreLeaseStore(store)
    publisher = EndpointPublisher("http://h:1/", leases, ttl_s=60)
    with acting_as(Principal("root", admin=True), "test"):
        desc, compat = await publisher.ensure_endpoint(
            {"model_preference": {"provider": "shell", "id": "sh"}}, {}, {"boundary_ref": "b-1"})
    assert compat.compatible and desc.base_url == f"http://h:1/leases/{desc.lease_ref}/v1"
    token = desc.headers["authorization"].removeprefix("Bearer ")
    got = await publisher.lookup(desc.lease_ref)
    assert isinstance(got, Lease) and got.auth_token == ""  # read back: no token, its digest only
    assert (got.principal, got.admin, got.provider, got.model, got.endpoint_id, got.boundary_ref, got.streaming) == (
        "root", True, "shell", "sh", desc.endpoint_id, "b-1", True)
    assert got.expires_at == desc.expires_at
    assert got.authorized(f"Bearer {token}")
    for wrong in (None, "", token, f"Bearer {token}x", f"bearer {token}", f"Bearer  {token}", "Bearer "):
        assert not got.authorized(wrong), wrong
    assert await leases.get("x" * 500) is None  # a ref no lease can have is unknown, not an error
    await leases.delete("x" * 500)
    await publisher.release_endpoint(desc)
    assert await publisher.lookup(desc.lease_ref) is None


@ALL
async def test_expired_leases_are_refused_and_swept(store: RunStore) -> None:
    publisher = EndpointPublisher("http://h:1", StoreLeaseStore(store))
    with acting_as(Principal("alice"), "test"):
        short, _ = await publisher.ensure_endpoint({"model_preference": {"provider": "shell", "id": "a"}}, {},
                                                   ttl_s=0.05)
        long, _ = await publisher.ensure_endpoint({"model_preference": {"provider": "shell", "id": "b"}}, {})
    await asyncio.sleep(0.1)
    assert await store.get_endpoint_lease(short.lease_ref) is not None  # held until swept or looked up
    assert await publisher.sweep() == 1
    assert await store.get_endpoint_lease(short.lease_ref) is None
    assert await publisher.lookup(long.lease_ref) is not None


@DURABLE
async def test_a_lease_survives_reopening_the_store(backend_url: str, tmp_path: Path) -> None:
    first = open_store(backend_url)
    await first.open()
    try:
        with acting_as(Principal("alice"), "test"):
            desc, _ = await EndpointPublisher("http://h:1", StoreLeaseStore(first)).ensure_endpoint(
                {"model_preference": {"provider": "shell", "id": "sh"}}, {})
    finally:
        await first.close()
    again = open_store(backend_url)
    await again.open()
    try:
        lease = await EndpointPublisher("http://h:1", StoreLeaseStore(again)).lookup(desc.lease_ref)
        assert lease is not None and lease.authorized(desc.headers["authorization"])
    finally:
        await again.close()


async def test_the_controller_sweeps_expired_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    from asm_controller import service
    from asm_controller.service import ControllerConfig, start_controller

    monkeypatch.setattr(service, "ENDPOINT_SWEEP_S", 0.05)
    ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=["127.0.0.1:9"],
                                                  http_listen="127.0.0.1:0"))
    try:
        assert ctl.endpoints.base_url_root == f"http://127.0.0.1:{ctl.http_port}"
        with acting_as(Principal("alice"), "test"):
            desc, _ = await ctl.endpoints.ensure_endpoint({"model_preference": {"provider": "shell", "id": "sh"}},
                                                          {}, ttl_s=0.1)
        assert await ctl.api.store.get_endpoint_lease(desc.lease_ref) is not None
        for _ in range(100):  # swept within 5 s (polled: the store has no change notification)
            if await ctl.api.store.get_endpoint_lease(desc.lease_ref) is None:
                break
            await asyncio.sleep(0.05)
        assert await ctl.api.store.get_endpoint_lease(desc.lease_ref) is None
        tasks = list(ctl._tasks)
    finally:
        await ctl.stop()
    await asyncio.sleep(0)
    assert all(t.done() for t in tasks)  # the sweeper is cancelled with the controller
