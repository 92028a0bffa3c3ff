"""One JSON shape for every failure: ``{"error": {"kind", "domain", "reason", "message"}}``.

The body is :meth:`AsmError.to_dict`; the HTTP status is the error table's gRPC status mapped below, so a
client of the REST API and one of gRPC see the same kind, domain and reason for the same failure.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from asm_wire import AsmError, ConfigError, make_error

log = logging.getLogger("asm_controller.http")

#: gRPC status (from the error table) -> HTTP status.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # the client closed the request (nginx's code; no standard one)
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(err: AsmError) -> int:
    return HTTP_STATUS.get(err.grpc_status(), 500)


def error_body(err: AsmError) -> dict[str, Any]:
    body = err.to_dict()
    body.setdefault("reason", "")
    return {"error": body}


def error_response(err: AsmError, status: int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """``err`` as the API's one error shape, with its table status (or ``status``)."""
    return JSONResponse(error_body(err), status_code=status or http_status(err), headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


#: Statuses Starlette raises itself (routing, methods), as the table's kinds.
_HTTP_KINDS: dict[int, tuple[str, str, str]] = {
    404: ("not_found", "runtime", "no_route"),
    405: ("config_invalid", "config", "method_not_allowed"),
    413: ("buffer_overflow", "transport", "request_too_large"),
}


def install_error_handlers(app: FastAPI) -> None:
    """Every failure in the one shape: AsmError, validation (bad JSON too), unknown routes, anything else."""

    async def on_asm(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AsmError)
        status = http_status(exc)
        return error_response(exc, headers={"WWW-Authenticate": 'Bearer realm="asm"'} if status == 401 else None)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(ConfigError(_validation_message(exc), reason="invalid_request"))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind, domain, reason = _HTTP_KINDS.get(exc.status_code, ("config_invalid", "config", "bad_request"))
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error_response(make_error(kind, domain, f"{message}: {request.method} {request.url.path}", reason),
                              status=exc.status_code, headers=getattr(exc, "headers", None))

    async def on_other(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(make_error("runtime", "runtime", "internal error (see the server's log)", "internal"),
                              status=500)

    app.add_exception_handler(AsmError, on_asm)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_other)
