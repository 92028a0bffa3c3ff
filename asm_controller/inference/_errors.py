"""Refusals of the inference endpoint and the OpenAI error body they become.

ASM 0.9.2 answered every error with ``type: invalid_request_error`` and a ``code`` of
``invalid_request`` (400), ``unauthorized`` (401), ``not_found`` (404) or ``runtime_error``. asm keeps
those codes and ASM's messages, but gives each status OpenAI's own ``type`` (``authentication_error``
for 401, ``server_error`` for 5xx, ...), names the offending ``param``, and tells the openai client
whether a retry makes sense (``x-should-retry``): a run that failed has run (and cost) already, so the
client's automatic retry of a 5xx would start the CLI again -- it is told not to; a full fleet (429/503)
may be retried.
"""

from __future__ import annotations

from typing import Final

import grpc

from asm_controller.inference._openai import ErrorBody, ErrorDetail
from asm_wire import AsmError

#: OpenAI's error ``type`` per HTTP status.
_TYPES: Final = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_error"}
#: ASM's codes (kept), per HTTP status.
_CODES: Final = {400: "invalid_request", 401: "unauthorized", 404: "not_found"}

_GRPC_TO_HTTP: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 502,  # a node or the CLI's own credentials, not the caller's
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.FAILED_PRECONDITION: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.ABORTED: 503,
}
#: Refusals where nothing ran: a retry may succeed and costs nothing.
_RETRYABLE: Final = frozenset({429, 503})


class InferenceError(Exception):
    """A refusal or failure of a chat completion, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, retry: bool | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code if code is not None else _CODES.get(status, "runtime_error")
        self.param = param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retry = retry if retry is not None else status in _RETRYABLE

    def body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, code=self.code, param=self.param))

    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "true" if self.retry else "false"}

    def __repr__(self) -> str:
        return f"InferenceError({self.status}, {self.message!r}, code={self.code!r}, param={self.param!r})"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> InferenceError:
    return InferenceError(400, message, param=param, code=code)


def from_asm_error(err: AsmError, *, ran: bool) -> InferenceError:
    """An asm error as the endpoint's answer: its status from the error table's gRPC status.

    ``ran``: the run reached a CLI (its failure came from its events): never retried automatically.
    """
    status = _GRPC_TO_HTTP.get(err.grpc_status(), 500)
    if ran and status < 500 and status not in (400, 403, 429):
        status = 500
    return InferenceError(status, err.message, code=err.reason or err.kind, retry=(not ran) and status in _RETRYABLE)
