"""The one error type of asm, and its mapping to and from gRPC status codes.

Every failure a user can see is an :class:`AsmError` with ASM's ``kind`` and
``domain`` vocabularies, plus a finer ``reason`` where one failure kind has
several typed causes (the node connector's failures, for instance). Subclasses
exist so callers can ``except`` a specific cause; they never change the fields.

Exception tree::

    AsmError                       any asm failure (kind, domain, reason, message)
    ├── ConfigError                kind=config_invalid   bad option, cwd outside the roots, ...
    ├── NodeConnectionError        a node could not be used for a run
    │   ├── NodeUnreachable        reason=unreachable        (connection refused, DNS, socket closed)
    │   ├── NodeConnectTimeout     reason=connect_timeout    (no gRPC answer in time)
    │   ├── NodeUnauthenticated    reason=unauthenticated    (token refused; node cert not verified)
    │   ├── NodeVersionMismatch    reason=version_mismatch   (agent major.minor or protocol)
    │   ├── NodeCapabilityMismatch reason=capability_mismatch
    │   ├── NodeNotReady           reason=not_ready          (draining or stopping)
    │   ├── ProviderMissing        reason=provider_missing   (preflight: CLI not on the node)
    │   ├── CwdNotAllowed          reason=cwd_not_allowed    (preflight: cwd outside the roots)
    │   └── NodeAtCapacity         reason=at_capacity        (preflight: no free run slot)
    ├── PermissionDenied           reason=permission_denied  (another principal's run; admin-only call)
    ├── RunNotFound                kind=not_found, reason=run_not_found (no run by that id to follow)
    └── RunError                   a run ended in failure (carried by Result.error)

A node that refuses a client certificate under mutual TLS just closes the
socket, which a client cannot tell from a network failure: that case is
reported as NodeUnreachable with the TLS error text.

At the gRPC boundary the kind, domain and reason travel in trailing metadata
(``asm-error-*``) next to a status code chosen from the kind, so a round trip
is exact; a status without that metadata (a transport failure raised by gRPC
itself) is mapped from its code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import grpc

# ASM 0.9.2's typed kinds, plus ``node_lost`` (a run's node disappeared), ``run_lost`` (the node
# restarted while the run ran: its outcome is unknown, it is never run again),
# ``node_draining`` / ``node_shutdown`` (the node ended the run: its drain deadline
# passed / it was stopped; retry elsewhere, unlike ``user_cancelled``), ``not_found`` (no such
# run id: nothing by that id exists to follow or list; gRPC NOT_FOUND, like ``unknown``, which the
# node still answers for an id it does not hold) and
# ``runtime`` (ASM uses it as a kind although it is not in its typed list).
KINDS: Final = frozenset(
    {
        "cli_not_found", "connection_failed", "timeout", "parse_error", "json_decode_error",
        "auth_error", "rate_limit", "buffer_overflow", "transport_error", "transport_busy",
        "queue_full", "at_capacity", "user_cancelled", "approval_denied", "guardrail_blocked",
        "tool_failed", "config_invalid", "unknown", "runtime", "node_lost", "run_lost",
        "node_draining", "node_shutdown", "not_found",
    }
)
DOMAINS: Final = frozenset(
    {"transport", "parser", "provider", "approval", "guardrail", "tool", "runtime", "config"}
)

_MD_KIND: Final = "asm-error-kind"
_MD_DOMAIN: Final = "asm-error-domain"
_MD_REASON: Final = "asm-error-reason"


def normalize_kind(code: str | None) -> str:
    """Map a provider or wire error code to an ASM kind (unknown strings -> ``unknown``)."""
    if not code:
        return "unknown"
    k = code.strip().lower().replace("-", "_")
    aliases = {"authentication_failed": "auth_error", "cancelled": "user_cancelled"}
    k = aliases.get(k, k)
    return k if k in KINDS else "unknown"


class AsmError(Exception):
    """An asm failure with ASM's kind/domain vocabulary and an optional finer reason."""

    default_kind = "unknown"
    default_domain = "runtime"
    default_reason = ""

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        domain: str | None = None,
        reason: str | None = None,
        exit_code: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind or self.default_kind
        self.domain = domain or self.default_domain
        self.reason = reason if reason is not None else self.default_reason
        self.exit_code = exit_code
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return f"[{self.domain}/{self.kind}] {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, domain={self.domain!r}, reason={self.reason!r}, message={self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "domain": self.domain, "message": self.message}
        if self.reason:
            out["reason"] = self.reason
        if self.exit_code is not None:
            out["exit_code"] = self.exit_code
        return out

    # -- gRPC boundary -------------------------------------------------------

    def grpc_status(self) -> grpc.StatusCode:
        return _REASON_STATUS.get(self.reason) or _KIND_STATUS.get(self.kind, grpc.StatusCode.INTERNAL)

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        return ((_MD_KIND, self.kind), (_MD_DOMAIN, self.domain), (_MD_REASON, self.reason))


class ConfigError(AsmError):
    default_kind = "config_invalid"
    default_domain = "config"


class NodeConnectionError(AsmError):
    default_kind = "connection_failed"
    default_domain = "transport"


class NodeUnreachable(NodeConnectionError):
    default_reason = "unreachable"


class NodeConnectTimeout(NodeConnectionError):
    default_kind = "timeout"
    default_reason = "connect_timeout"


class NodeUnauthenticated(NodeConnectionError):
    default_kind = "auth_error"
    default_reason = "unauthenticated"


class NodeVersionMismatch(NodeConnectionError):
    default_reason = "version_mismatch"


class NodeCapabilityMismatch(NodeConnectionError):
    default_reason = "capability_mismatch"


class NodeNotReady(NodeConnectionError):
    default_reason = "not_ready"


class ProviderMissing(NodeConnectionError):
    default_kind = "cli_not_found"
    default_domain = "provider"
    default_reason = "provider_missing"


class CwdNotAllowed(NodeConnectionError):
    default_kind = "config_invalid"
    default_domain = "config"
    default_reason = "cwd_not_allowed"


class NodeAtCapacity(NodeConnectionError):
    default_kind = "at_capacity"
    default_domain = "runtime"
    default_reason = "at_capacity"


class PermissionDenied(AsmError):
    """The caller is authenticated but may not do this (another principal's run, or an admin-only call)."""

    default_kind = "auth_error"
    default_domain = "transport"
    default_reason = "permission_denied"


class RunNotFound(AsmError):
    """No run by that id where it was looked for (``asm attach``): nothing to follow, nothing is started."""

    default_kind = "not_found"
    default_domain = "runtime"
    default_reason = "run_not_found"


class RunError(AsmError):
    """A run's failure as reduced from its events (``Result.error``)."""


_BY_REASON: Final[dict[str, type[AsmError]]] = {
    cls.default_reason: cls
    for cls in (
        NodeUnreachable, NodeConnectTimeout, NodeUnauthenticated, NodeVersionMismatch,
        NodeCapabilityMismatch, NodeNotReady, ProviderMissing, CwdNotAllowed, NodeAtCapacity,
        PermissionDenied, RunNotFound,
    )
}

_KIND_STATUS: Final[dict[str, grpc.StatusCode]] = {
    "config_invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "guardrail_blocked": grpc.StatusCode.PERMISSION_DENIED,
    "auth_error": grpc.StatusCode.UNAUTHENTICATED,
    "at_capacity": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "queue_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "buffer_overflow": grpc.StatusCode.OUT_OF_RANGE,
    "cli_not_found": grpc.StatusCode.FAILED_PRECONDITION,
    "unknown": grpc.StatusCode.NOT_FOUND,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "connection_failed": grpc.StatusCode.UNAVAILABLE,
    "transport_error": grpc.StatusCode.UNAVAILABLE,
    "node_lost": grpc.StatusCode.UNAVAILABLE,
    "node_draining": grpc.StatusCode.UNAVAILABLE,
    "node_shutdown": grpc.StatusCode.UNAVAILABLE,
    "run_lost": grpc.StatusCode.FAILED_PRECONDITION,
    "user_cancelled": grpc.StatusCode.CANCELLED,
}
_REASON_STATUS: Final[dict[str, grpc.StatusCode]] = {
    "cwd_not_allowed": grpc.StatusCode.PERMISSION_DENIED,
    "not_ready": grpc.StatusCode.UNAVAILABLE,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
}
_STATUS_KIND: Final[dict[grpc.StatusCode, tuple[str, str]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ("config_invalid", "config"),
    grpc.StatusCode.UNAUTHENTICATED: ("auth_error", "transport"),
    grpc.StatusCode.PERMISSION_DENIED: ("auth_error", "transport"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("at_capacity", "runtime"),
    grpc.StatusCode.FAILED_PRECONDITION: ("config_invalid", "runtime"),
    grpc.StatusCode.NOT_FOUND: ("unknown", "runtime"),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("timeout", "transport"),
    grpc.StatusCode.UNAVAILABLE: ("connection_failed", "transport"),
    # No CANCELLED: a call this client cancels ends in asyncio.CancelledError (grpc.aio raises it for a
    # locally cancelled call), so a CANCELLED status always comes from the peer or the transport.
}


def make_error(
    kind: str, domain: str, message: str, reason: str = "", **extra: Any
) -> AsmError:
    """Build the most specific AsmError subclass for these fields."""
    cls: type[AsmError] = _BY_REASON.get(reason) or (ConfigError if kind == "config_invalid" else AsmError)
    return cls(message, kind=kind, domain=domain, reason=reason, **extra)


def error_from_rpc(
    code: grpc.StatusCode | None, details: str | None, trailers: Any
) -> AsmError:
    """Rebuild an AsmError from a failed RPC (status code, details, trailing metadata)."""
    md = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in (trailers or ())}
    message = details or (code.name if code else "RPC failed")
    if _MD_KIND in md:
        return make_error(md[_MD_KIND], md.get(_MD_DOMAIN, "runtime"), message, md.get(_MD_REASON, ""))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "larger than max" in message:  # gRPC's own message-size limit, not a busy server
            return AsmError(message, kind="buffer_overflow", domain="transport", reason="message_too_large")
        # gRPC's own overload answers (maximum_concurrent_rpcs, the pending-request backlog) carry no
        # asm trailers: still a typed, retryable "the server is full".
        return NodeAtCapacity(f"the server is at capacity, retry later ({message})")
    if code == grpc.StatusCode.UNAVAILABLE and "RST_STREAM with error code 7" in message:
        # HTTP/2 REFUSED_STREAM: the server's cap on concurrent streams per connection; the call
        # was never processed and may be retried.
        return NodeAtCapacity(f"the server refused the call: too many concurrent streams, retry later ({message})")
    if code == grpc.StatusCode.CANCELLED:
        return AsmError(f"the call was cancelled by the server or the transport, not by this client ({message})",
                        kind="transport_error", domain="transport", reason="cancelled_by_peer")
    kind, domain = _STATUS_KIND.get(code, ("transport_error", "transport")) if code else ("transport_error", "transport")
    return AsmError(message, kind=kind, domain=domain)
