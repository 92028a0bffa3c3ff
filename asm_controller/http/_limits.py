"""Request body bound (pure ASGI: counted as the body arrives, so a lying or absent Content-Length gets no further)."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asm_controller.http._errors import error_body
from asm_wire import make_error

#: 1 MiB of request besides the prompt, plus the prompt itself (a node bounds a shell prompt to 64 KiB; CLI
#: prompts are bounded by the gRPC message size, 4 MiB): a StartRun over HTTP can carry what one over gRPC can.
MAX_BODY_BYTES = (1 << 20) + (4 << 20)
#: A refused body is read (and dropped) up to this much more before the 413, so the client gets the answer
#: instead of a connection reset by unread data; a larger one is refused at once.
DRAIN_BYTES = 16 << 20


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    if declared <= self.max_bytes + DRAIN_BYTES:
                        await _drain(receive, declared)
                    await self._refuse(send)
                    return
        seen = 0
        refused = False

        async def bounded_receive() -> Message:
            # Past the bound: answer 413 now and tell the app the client left (whatever it sends is dropped).
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    if message.get("more_body", False):
                        await _drain(receive, self.max_bytes + DRAIN_BYTES - seen)
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, bounded_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        err = make_error("buffer_overflow", "transport",
                         f"request body larger than {self.max_bytes} bytes", "request_too_large")
        body = json.dumps(error_body(err)).encode()
        headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                              (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive, limit: int) -> None:
    """Read and drop the request body, at most ``limit`` bytes."""
    read = 0
    while read < limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
