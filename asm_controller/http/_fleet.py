"""The fleet: nodes (list, drain, undrain: admin), sessions, the providers, and the probes."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from asm_controller.http._convert import message_dict
from asm_controller.http._deps import Caller, caller, fleet_api
from asm_controller.http._errors import error_response
from asm_node.providers.features import manifests
from asm_wire import AsmError, NodeNotReady, pb

_CallerDep = Annotated[Caller, Depends(caller)]

#: /readyz gives the store this long to answer.
READY_TIMEOUT_S = 2.0


class DrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deadline_ms: int = Field(default=0, ge=0, le=2**32 - 1,
                             description="runs still going this long after the drain are ended (0: no deadline)")


class Status(BaseModel):
    status: str


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["fleet"])

    @router.get("/nodes", summary="The fleet: nodes, replicas, queued runs")
    async def list_nodes(c: _CallerDep) -> dict[str, Any]:
        return message_dict(await c.call(c.api.list_nodes, pb.ListNodesRequest()))

    @router.post("/nodes/{address}/drain", summary="Drain a node (admin): it takes no new runs")
    async def drain(address: str, c: _CallerDep, body: DrainBody | None = None) -> dict[str, Any]:
        deadline = body.deadline_ms if body is not None else 0
        return message_dict(await c.call(c.api.drain_node, pb.DrainNodeRequest(address=address, deadline_ms=deadline)))

    @router.post("/nodes/{address}/undrain", summary="Undrain a node (admin): it takes runs again")
    async def undrain(address: str, c: _CallerDep) -> dict[str, Any]:
        return message_dict(await c.call(c.api.undrain_node, pb.UndrainNodeRequest(address=address)))

    @router.get("/sessions", summary="Sessions (runs grouped by session id), latest activity first, paged")
    async def list_sessions(c: _CallerDep, provider: str = "", node: str = "",
                            limit: Annotated[int, Query(ge=0, le=10_000)] = 0, page_token: str = "") -> dict[str, Any]:
        return message_dict(await c.call(c.api.list_sessions, pb.ListSessionsRequest(
            provider=provider, node=node, limit=limit, page_token=page_token)))

    @router.get("/providers", summary="The providers asm knows (as `asm providers --output json`), registry order")
    async def list_providers(c: _CallerDep) -> dict[str, Any]:
        # Read at each call: the registry is the one list (a provider registered later is listed too).
        return {"providers": manifests()}

    return router


def build_probes() -> APIRouter:
    router = APIRouter(tags=["probes"])

    @router.get("/healthz", response_model=Status, summary="The process is up (no auth)")
    async def healthz() -> Status:
        return Status(status="ok")

    @router.get("/readyz", response_model=Status, summary="Ready: its run store answers and its leases are kept (no auth)",
                responses={503: {"description": "not ready, in the one error shape"}})
    async def readyz(request: Request) -> Status | JSONResponse:
        api = fleet_api(request)
        if not api.keeper.healthy:
            return error_response(NodeNotReady("this replica's lease keeper cannot renew its leases",
                                               reason="store_unreachable"))
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await api.store.meta_get("controller_epoch")
        except (AsmError, TimeoutError, OSError) as exc:
            why = exc.message if isinstance(exc, AsmError) else "no answer in time" if isinstance(exc, TimeoutError) \
                else str(exc)
            return error_response(NodeNotReady(f"the run store does not answer: {why}", reason="store_unreachable"))
        return Status(status="ready")

    return router
