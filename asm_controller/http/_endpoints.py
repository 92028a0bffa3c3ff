"""ASM's ``ensure_endpoint`` / ``release_endpoint`` over REST: ``POST /v1/endpoints``, ``DELETE /v1/endpoints/{ref}``.

The caller authenticates with a controller token; the lease it gets has a token of its own (in the
descriptor's ``headers``, given once) that works on the lease's ``/leases/<ref>/v1`` routes only, and
its completions run as that caller. Releasing is the owner's (or an admin's). Refusals are the API's one
error shape with ASM's reason (invalid_request, invalid_consumer_manifest, unsupported_provider,
missing_model_identity, incompatible).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from asm_controller.http._auth import authenticate
from asm_controller.http._errors import error_body, error_response, http_status
from asm_controller.inference import (
    CompatibilityResult,
    EndpointDescriptor,
    EndpointError,
    EndpointPublisher,
    consumer_manifest,
)
from asm_wire import ConfigError, PermissionDenied, make_error
from asm_wire._principal import Principal, acting_as

_Principal = Annotated[Principal, Depends(authenticate)]


class EnsureEndpointBody(BaseModel):
    """What ``POST /v1/endpoints`` takes: ASM's ``ensure_endpoint(request, consumer_manifest, context)``."""

    model_config = ConfigDict(extra="forbid")

    request: dict[str, Any] = Field(description="ASM's EndpointRequest: model_preference {provider, id or model}, "
                                                "stream, tools, ...")
    consumer_manifest: dict[str, Any] | None = Field(
        default=None, description="ASM's ConsumerManifest (default: ASM's own consumer_manifest/0)")
    context: dict[str, Any] = Field(default_factory=dict, description="ASM's context (boundary_ref)")
    ttl_s: float | None = Field(default=None, gt=0, description="the lease's lifetime in seconds "
                                                                "(default: the controller's; at most a day)")


class EnsureEndpointResponse(BaseModel):
    """The lease: its descriptor (base_url, and its own token in ``headers``: shown this once) and ASM's
    compatibility result."""

    descriptor: EndpointDescriptor
    compatibility: CompatibilityResult


def _refused(err: EndpointError) -> JSONResponse:
    body = error_body(err)
    if err.result is not None:  # ASM's failed compatibility result, for a caller that wants the detail
        body["error"]["compatibility"] = err.result.model_dump()
    return JSONResponse(body, status_code=http_status(err))


_BODY_DOC: Any = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": EnsureEndpointBody.model_json_schema()}}}}


def build_endpoints_router(publisher: EndpointPublisher) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["inference"])

    @router.post("/endpoints", status_code=201, response_model=EnsureEndpointResponse,
                 openapi_extra=_BODY_DOC,
                 summary="Publish a provider and model as an OpenAI-compatible endpoint of its own (a lease)",
                 responses={400: {"description": "refused, with ASM's reason, in the one error shape"}})
    async def ensure(request: Request, principal: _Principal) -> Response:
        # The body is read by hand: ASM's reasons (invalid_consumer_manifest, ...) come from ensure_endpoint.
        try:
            raw = await request.json()
            body = EnsureEndpointBody.model_validate(raw)
        except ValueError as e:  # not JSON, or not the body's shape (ValidationError is a ValueError)
            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else "the body is not JSON"
            return error_response(ConfigError(f"invalid request: {msg}", reason="invalid_request"))
        manifest = body.consumer_manifest if body.consumer_manifest is not None else consumer_manifest()
        with acting_as(principal, "HTTP POST /v1/endpoints"):  # the lease is this caller's
            try:
                descriptor, compat = await publisher.ensure_endpoint(body.request, manifest, body.context,
                                                                     ttl_s=body.ttl_s)
            except EndpointError as e:
                return _refused(e)
        out = EnsureEndpointResponse(descriptor=descriptor, compatibility=compat)
        return JSONResponse(out.model_dump(mode="json"), status_code=201)

    @router.delete("/endpoints/{lease_ref}", status_code=204, response_class=Response,
                   summary="Release an endpoint lease (its owner or an admin); its URL and token stop working",
                   responses={403: {"description": "another principal's lease"},
                              404: {"description": "no such (live) lease"}})
    async def release(lease_ref: str, principal: _Principal) -> Response:
        lease = await publisher.lookup(lease_ref)
        if lease is None:
            raise make_error("not_found", "runtime", f"no endpoint lease {lease_ref!r}"[:300], "lease_not_found")
        if lease.principal != principal.name and not principal.admin:
            raise PermissionDenied(f"endpoint lease {lease_ref} belongs to another principal "
                                   f"({principal.name} may not release it)")
        await publisher.release_endpoint(lease_ref)
        return Response(status_code=204)

    return router
