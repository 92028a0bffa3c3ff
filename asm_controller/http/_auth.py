"""Who is calling, as on the gRPC side: ``Authorization: Bearer <token>`` against the same token table
(constant-time, every token compared), the matching name is the principal; without tokens every caller is
the admin principal ``anonymous`` (loopback only, or --insecure: the same exposure rule as gRPC)."""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from asm_wire import NodeUnauthenticated
from asm_wire._principal import ANONYMOUS, AUDIT, Principal, TokenTable

#: Documents the scheme in the OpenAPI document; the header itself is matched below (raw bytes, constant time).
_bearer = HTTPBearer(auto_error=False, description="a token of the controller's --token-file / --tokens-file")


class Unauthenticated(NodeUnauthenticated):
    """Refused: a missing or wrong token (401 with ``WWW-Authenticate: Bearer``)."""


def _tokens(request: Request) -> TokenTable | None:
    tokens: TokenTable | None = request.app.state.asm_tokens
    return tokens


async def authenticate(request: Request,
                       _doc: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:  # noqa: B008
    """The caller's principal (a FastAPI dependency)."""
    return principal_of(request)


def principal_of(request: Request) -> Principal:
    """:func:`authenticate` as a plain function (the inference router's ``principal_fn``)."""
    tokens = _tokens(request)
    if tokens is None:
        return ANONYMOUS
    presented = request.headers.get("authorization", "").encode("latin-1", errors="replace")
    principal = tokens.match(presented)
    if principal is None:
        peer = f"{request.client.host}:{request.client.port}" if request.client else "-"
        AUDIT.record("-", peer, f"HTTP {request.method} {request.url.path}", "unauthenticated")
        raise Unauthenticated("missing or invalid bearer token")
    return principal

