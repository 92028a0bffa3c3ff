"""The controller's HTTP API (``asm controller serve --http-listen``): REST + Server-Sent Events over the
same FleetApi as gRPC, with the same auth, errors in one JSON shape, and an OpenAPI document.

FastAPI on uvicorn: an ASGI stack whose pydantic models validate requests and give the OpenAPI document,
whose StreamingResponse carries SSE; uvicorn runs inside the controller's asyncio loop.
"""

from asm_controller.http._app import HttpServer, create_app
from asm_controller.http._auth import authenticate, principal_of
from asm_controller.http._deps import Caller, caller, fleet_api
from asm_controller.http._errors import HTTP_STATUS, error_body, error_response, http_status
from asm_controller.http._limits import MAX_BODY_BYTES

__all__ = [
    "HTTP_STATUS",
    "MAX_BODY_BYTES",
    "Caller",
    "HttpServer",
    "authenticate",
    "caller",
    "create_app",
    "error_body",
    "error_response",
    "fleet_api",
    "http_status",
    "principal_of",
]
