"""The web console: one page and its two assets, shipped in the package (no build step), served at ``/``.

The page talks to the same ``/v1`` API with the token a person types (kept in the tab's session storage,
sent as a bearer header); the files themselves need no token (they hold nothing but code)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from asm_wire import make_error

_ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
#: The page may load only its own scripts and styles, and talk only to this server.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _read(name: str) -> bytes:
    return (resources.files("asm_controller.http") / "console" / name).read_bytes()


def build_console() -> APIRouter:
    router = APIRouter(tags=["console"])
    headers = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
               "Referrer-Policy": "no-referrer"}

    @router.get("/", include_in_schema=True, summary="The web console (an HTML page)",
                response_class=Response, responses={200: {"content": {"text/html": {}}}})
    async def console_page() -> Response:
        return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=headers)

    @router.get("/console/{name}", summary="The web console's script and style sheet", response_class=Response)
    async def console_asset(name: str) -> Response:
        if name not in _ASSETS:  # a fixed set: nothing else in the package is reachable
            raise make_error("not_found", "runtime", f"the console has no asset {name[:64]!r}",
                             reason="no_such_asset")
        return Response(_read(name), media_type=_ASSETS[name], headers=headers)

    return router
