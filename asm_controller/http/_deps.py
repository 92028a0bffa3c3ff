"""What every route needs: the FleetApi, the caller as the current principal, a bounded call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Depends, Request

from asm_controller.http._auth import authenticate
from asm_wire import make_error
from asm_wire._principal import Principal, acting_as

if TYPE_CHECKING:
    from asm_controller.service import FleetApi

T = TypeVar("T")

#: A unary call (everything but an event stream) answers within this long, else 504 timeout.
CALL_TIMEOUT_S = 60.0


def fleet_api(request: Request) -> FleetApi:
    """The controller's FleetApi (a FastAPI dependency)."""
    api: FleetApi = request.app.state.asm_api
    return api


class Caller:
    """The authenticated principal and the FleetApi, and ``call`` to run a FleetApi method as that principal:
    the same contextvar the gRPC interceptor sets, so ownership checks are the gRPC ones."""

    def __init__(self, api: FleetApi, principal: Principal, method: str) -> None:
        self.api, self.principal, self.method = api, principal, method

    async def call(self, fn: Callable[[Any], Awaitable[T]], request: Any, timeout: float = CALL_TIMEOUT_S) -> T:
        with acting_as(self.principal, self.method):
            try:
                async with asyncio.timeout(timeout):
                    return await fn(request)
            except TimeoutError:
                raise make_error("timeout", "transport", f"{self.method} did not answer within {timeout:g}s",
                                 "http_timeout") from None

    @contextlib.asynccontextmanager
    async def acting(self) -> AsyncIterator[None]:
        with acting_as(self.principal, self.method):
            yield


async def caller(request: Request, principal: Principal = Depends(authenticate)) -> Caller:  # noqa: B008
    route = request.scope.get("route")
    name = getattr(route, "path", request.url.path)
    return Caller(fleet_api(request), principal, f"HTTP {request.method} {name}")
