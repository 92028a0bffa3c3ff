"""The one error type of asm: a tree of classes, one per cause a caller may catch.

Every failure a user can see is an :class:`AsmError`. The class is the category (``except
NodeConnectionError`` catches every reason a node could not be used); ``kind``, ``domain`` and
``reason`` are its serialised form, ASM's vocabularies on the wire. The table below is the only
place the classes, their fields and their gRPC status are written down: :func:`make_error`, the
class defaults and :meth:`AsmError.grpc_status` are all read from it, and nothing else in asm
tells errors apart by a string.

How to read a row: a class's first row gives its defaults (kind, domain, reason); a ``reason``
names one typed cause and picks its class when an error is rebuilt (from the wire, or by
``make_error``); ``*`` means "the reasons of the subclasses below", a reason-less row (``-``) makes
a kind map to its class and status. Rows of ``AsmError`` itself are kinds with no class of their
own. An error's gRPC status is its reason's row, else its kind's reason-less row, else INTERNAL.
"unknown id" is ``not_found`` (NOT_FOUND); ``unknown`` is *unclassified* (gRPC UNKNOWN).

The table (``_TABLE_TEXT`` below the imports; appended to this docstring at import, so ``help()`` shows
it, and read from the constant, so ``python -OO`` keeps working) is headed ``Errors::``.

What the causes mean:

* ``NodeConnectionError``: a node could not be used for a run (unreachable: connection refused,
  DNS, socket closed; connect_timeout: no gRPC answer in time; unauthenticated: token refused,
  node cert not verified; version_mismatch: agent major.minor or protocol; not_ready: draining or
  stopping; provider_missing / cwd_not_allowed / at_capacity: the preflight's refusals). A node that
  refuses a client certificate under mutual TLS just closes the socket, which a client cannot tell
  from a network failure: that case is NodeUnreachable with the TLS error text.
* ``PermissionDenied``: another principal's run, or an admin-only call.
* ``RunNotFound`` / ``ApprovalNotFound`` / ``NodeNotFound``: no run, pending approval or fleet node
  by that id where it was looked for; nothing is started.
* ``ReplayGap``: a follower's cursor is older than the events still held (node replay buffer,
  controller history bound); the message names the seqs that are gone.
* ``StoreError``: the controller's run store failed or cannot be used (store_unavailable:
  connection or I/O, may pass; schema_too_new: migrated by a newer asm). ``StoreLocked``: another
  controller holds the store. ``LeaseLost``: a replica's fenced write found the run's lease taken
  over by another replica (or the run not in the status it expected): it stops acting on that run.
* ``WorkspaceError``: a workspace snapshot, diff or rollback failed (``GitFailed``: git exited
  non-zero or could not be run; ``GitTimeout``; ``SnapshotNotFound``: an unknown snapshot id).
* ``DecodeError``: a recorded event line that cannot be decoded (torn, damaged, not asm's format).
* ``RunError``: a run's failure as reduced from its events (``Result.error``), with that event's
  kind and domain.

The kind vocabulary (:data:`KINDS`) is ASM 0.9.2's typed kinds plus ``node_lost`` (a run's node
disappeared), ``run_lost`` (the node restarted while the run ran: its outcome is unknown, it is
never run again), ``node_draining`` / ``node_shutdown`` (the node ended the run: its drain deadline
passed / it was stopped; retry elsewhere, unlike ``user_cancelled``), ``not_found`` (no such id),
``permission_denied`` (a tool call the CLI's permission mode or sandbox refused: a warning event, the
run goes on) and ``runtime`` (ASM uses it as a kind although it is not in its typed list).

At the gRPC boundary the kind, domain and reason travel in trailing metadata (``asm-error-*``) next
to the status above, so a round trip is exact; a status without that metadata (a transport failure
raised by gRPC itself) is mapped from its code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

if TYPE_CHECKING:  # grpc is imported only to name a status (the CLI's fast path never imports it)
    import grpc

# The kind vocabulary: see the module docstring.
KINDS: Final = frozenset(
    {
        "cli_not_found", "connection_failed", "timeout", "parse_error", "json_decode_error",
        "auth_error", "rate_limit", "buffer_overflow", "transport_error", "transport_busy",
        "queue_full", "at_capacity", "user_cancelled", "approval_denied", "guardrail_blocked",
        "tool_failed", "config_invalid", "unknown", "runtime", "node_lost", "run_lost",
        "node_draining", "node_shutdown", "not_found", "permission_denied",
    }
)
DOMAINS: Final = frozenset(
    {"transport", "parser", "provider", "approval", "guardrail", "tool", "runtime", "config"}
)

_MD_KIND: Final = "asm-error-kind"
_MD_DOMAIN: Final = "asm-error-domain"
_MD_REASON: Final = "asm-error-reason"

#: The error table: every class under AsmError with its kind, domain, reason(s) and gRPC status.
#: Its one declaration; read by _read_table() below (how to read it: the module docstring).
_TABLE_TEXT: Final = """\
    class                    kind               domain     reason               gRPC status
    AsmError                 unknown            runtime    -                    UNKNOWN
    AsmError                 runtime            runtime    -                    INTERNAL
    AsmError                 timeout            transport  -                    DEADLINE_EXCEEDED
    AsmError                 connection_failed  transport  -                    UNAVAILABLE
    AsmError                 transport_error    transport  -                    UNAVAILABLE
    AsmError                 node_lost          transport  -                    UNAVAILABLE
    AsmError                 node_draining      runtime    -                    UNAVAILABLE
    AsmError                 node_shutdown      runtime    -                    UNAVAILABLE
    AsmError                 run_lost           runtime    -                    FAILED_PRECONDITION
    AsmError                 cli_not_found      provider   -                    FAILED_PRECONDITION
    AsmError                 at_capacity        runtime    -                    RESOURCE_EXHAUSTED
    AsmError                 queue_full         runtime    -                    RESOURCE_EXHAUSTED
    AsmError                 queue_full         runtime    queue_full           RESOURCE_EXHAUSTED
    AsmError                 timeout            runtime    queue_timeout        DEADLINE_EXCEEDED
    AsmError                 timeout            runtime    run_timeout          DEADLINE_EXCEEDED
    AsmError                 timeout            runtime    idle_timeout         DEADLINE_EXCEEDED
    AsmError                 timeout            runtime    command_timeout      DEADLINE_EXCEEDED
    AsmError                 approval_denied    approval   approval_timeout     PERMISSION_DENIED
    AsmError                 runtime            runtime    env_unavailable      FAILED_PRECONDITION
    AsmError                 buffer_overflow    transport  -                    OUT_OF_RANGE
    AsmError                 buffer_overflow    transport  message_too_large    OUT_OF_RANGE
    AsmError                 guardrail_blocked  guardrail  -                    PERMISSION_DENIED
    AsmError                 auth_error         transport  -                    UNAUTHENTICATED
    AsmError                 user_cancelled     runtime    -                    CANCELLED
    AsmError                 not_found          runtime    -                    NOT_FOUND
    ConfigError              config_invalid     config     -                    INVALID_ARGUMENT
    NodeConnectionError      connection_failed  transport  *                    UNAVAILABLE
    ├ NodeUnreachable        connection_failed  transport  unreachable          UNAVAILABLE
    ├ NodeConnectTimeout     timeout            transport  connect_timeout      DEADLINE_EXCEEDED
    ├ NodeUnauthenticated    auth_error         transport  unauthenticated      UNAUTHENTICATED
    ├ NodeVersionMismatch    connection_failed  transport  version_mismatch     UNAVAILABLE
    ├ NodeCapabilityMismatch connection_failed  transport  capability_mismatch  UNAVAILABLE
    ├ NodeNotReady           connection_failed  transport  not_ready            UNAVAILABLE
    ├ NodeNotReady           connection_failed  transport  journal_unavailable  UNAVAILABLE
    ├ ProviderMissing        cli_not_found      provider   provider_missing     FAILED_PRECONDITION
    ├ CwdNotAllowed          config_invalid     config     cwd_not_allowed      PERMISSION_DENIED
    └ NodeAtCapacity         at_capacity        runtime    at_capacity          RESOURCE_EXHAUSTED
    PermissionDenied         auth_error         transport  permission_denied    PERMISSION_DENIED
    RunNotFound              not_found          runtime    run_not_found        NOT_FOUND
    ApprovalNotFound         not_found          approval   approval_not_found   NOT_FOUND
    NodeNotFound             not_found          runtime    node_not_found       NOT_FOUND
    ReplayGap                buffer_overflow    transport  replay_gap           OUT_OF_RANGE
    StoreError               runtime            runtime    store_unavailable    INTERNAL
    StoreError               runtime            runtime    schema_too_new       INTERNAL
    └ StoreLocked            runtime            runtime    store_in_use         INTERNAL
    LeaseLost                runtime            runtime    lease_lost           ABORTED
    WorkspaceError           tool_failed        tool       workspace_io         INTERNAL
    ├ GitFailed              tool_failed        tool       git_failed           INTERNAL
    ├ GitTimeout             timeout            tool       git_timeout          DEADLINE_EXCEEDED
    └ SnapshotNotFound       not_found          tool       snapshot_not_found   NOT_FOUND
    DecodeError              parse_error        parser     corrupt_line         INVALID_ARGUMENT
    RunError                 unknown            runtime    *                    UNKNOWN
"""


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

    # Set from the table below (a class's first row), never by hand.
    default_kind: ClassVar[str]
    default_domain: ClassVar[str]
    default_reason: ClassVar[str]
    _row: ClassVar[_Row | None] = None

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
        """The table's status for this kind and reason, else for this kind, else INTERNAL."""
        import grpc

        row = _BY_KEY.get((self.kind, self.reason)) or _BY_KEY.get((self.kind, ""))
        return row.status if row is not None else grpc.StatusCode.INTERNAL

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        return ((_MD_KIND, self.kind), (_MD_DOMAIN, self.domain), (_MD_REASON, self.reason))


class ConfigError(AsmError):
    """A bad option, request field or configuration value."""


class NodeConnectionError(AsmError):
    """A node could not be used for a run (its subclasses say why)."""


class NodeUnreachable(NodeConnectionError):
    """Connection refused, DNS failure, socket closed (also a refused client certificate)."""


class NodeConnectTimeout(NodeConnectionError):
    """No gRPC answer in time."""


class NodeUnauthenticated(NodeConnectionError):
    """The token was refused, or the node's certificate was not verified."""


class NodeVersionMismatch(NodeConnectionError):
    """The agent's major.minor or the protocol version differs."""


class NodeCapabilityMismatch(NodeConnectionError):
    """The node lacks a capability the controller needs."""


class NodeNotReady(NodeConnectionError):
    """The node is draining or stopping."""


class ProviderMissing(NodeConnectionError):
    """Preflight: the provider's CLI is not on the node."""


class CwdNotAllowed(NodeConnectionError):
    """Preflight: the cwd is outside the node's workspace roots (or not usable by the agent)."""


class NodeAtCapacity(NodeConnectionError):
    """Preflight: no free run slot (or the server's own overload answer)."""


class PermissionDenied(AsmError):
    """The caller is authenticated but may not do this (another principal's run, or an admin-only call)."""


class RunNotFound(AsmError):
    """No run by that id where it was looked for (``asm attach``): nothing to follow, nothing is started."""


class ApprovalNotFound(AsmError):
    """No pending approval by that id (never requested, already resolved, or its run ended)."""


class NodeNotFound(AsmError):
    """No node by that address in the controller's fleet."""


class ReplayGap(AsmError):
    """A follower's cursor is older than the events still held: the message names the seqs that are gone."""


class StoreError(AsmError):
    """The controller's run store failed or cannot be used (``reason``: store_unavailable, schema_too_new)."""


class StoreLocked(StoreError):
    """Another controller holds the run store (one controller per registry)."""


class LeaseLost(AsmError):
    """A fenced write or a status compare-and-set failed: another replica holds the run's lease now
    (or the run is no longer in the expected status). The writer must stop acting on that run."""


class WorkspaceError(AsmError):
    """A workspace snapshot, diff or rollback failed."""


class GitFailed(WorkspaceError):
    """git exited non-zero or could not be run."""


class GitTimeout(WorkspaceError):
    """git did not finish within the node's git timeout."""


class SnapshotNotFound(WorkspaceError):
    """No snapshot by that id (hash snapshots are forgotten when the node restarts)."""


class DecodeError(AsmError):
    """A recorded event line that cannot be decoded (torn, damaged, or not asm's format)."""


class RunError(AsmError):
    """A run's failure as reduced from its events (``Result.error``)."""


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    cls: type[AsmError]
    kind: str
    domain: str
    reason: str  # "" = reason-less (the kind's row); "*" = the subclasses' reasons
    status_name: str

    @property
    def status(self) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[self.status_name]


def _read_table(text: str) -> tuple[_Row, ...]:
    """The rows of the error table (the one declaration of the tree)."""
    rows = []
    for line in text.splitlines()[1:]:  # the first line is the header
        name, kind, domain, reason, status = line.strip().lstrip("├└│ ").split()
        cls = globals()[name]
        if not (isinstance(cls, type) and issubclass(cls, AsmError)):
            raise TypeError(f"{name} in the error table is not an AsmError")
        rows.append(_Row(cls, kind, domain, "" if reason == "-" else reason, status))
    return tuple(rows)


TABLE: Final[tuple[_Row, ...]] = _read_table(_TABLE_TEXT)
if __doc__ is not None:
    __doc__ += "\nErrors::\n\n" + _TABLE_TEXT
_BY_KEY: Final[dict[tuple[str, str], _Row]] = {}
for _r in TABLE:
    if _r.cls.__dict__.get("_row") is None:  # a class's first row: its defaults
        _r.cls._row = _r
        _r.cls.default_kind, _r.cls.default_domain = _r.kind, _r.domain
        _r.cls.default_reason = "" if _r.reason == "*" else _r.reason
    if _r.reason != "*":
        _BY_KEY.setdefault((_r.kind, _r.reason), _r)
del _r


#: A gRPC status that came without asm trailers (raised by gRPC itself, or a foreign server) -> kind, domain.
#: Keyed by the status's name: grpc.StatusCode and the CLI's own client's codes (asm_cli._fastrpc) alike.
_STATUS_KIND: Final[dict[str, tuple[str, str]]] = {
    "INVALID_ARGUMENT": ("config_invalid", "config"),
    "UNAUTHENTICATED": ("auth_error", "transport"),
    "PERMISSION_DENIED": ("auth_error", "transport"),
    "RESOURCE_EXHAUSTED": ("at_capacity", "runtime"),
    "FAILED_PRECONDITION": ("config_invalid", "runtime"),
    "NOT_FOUND": ("not_found", "runtime"),
    "DEADLINE_EXCEEDED": ("timeout", "transport"),
    "UNAVAILABLE": ("connection_failed", "transport"),
    # No CANCELLED: a call this client cancels ends in asyncio.CancelledError (grpc.aio raises it for a
    # locally cancelled call), so a CANCELLED status always comes from the peer or the transport.
}


def make_error(
    kind: str, domain: str, message: str, reason: str = "", **extra: Any
) -> AsmError:
    """Build the most specific AsmError subclass for these fields (the table's row for kind and reason,
    else for the kind alone, else AsmError): a round trip over the wire keeps the class."""
    row = (_BY_KEY.get((kind, reason)) if reason else None) or _BY_KEY.get((kind, ""))
    cls = row.cls if row is not None else AsmError
    return cls(message, kind=kind, domain=domain, reason=reason, **extra)


class StatusLike(Protocol):
    """A gRPC status code as error_from_rpc reads it: grpc.StatusCode, or the CLI's client's Code."""

    @property
    def name(self) -> str: ...


def error_from_rpc(
    code: StatusLike | None, details: str | None, trailers: Any
) -> AsmError:
    """Rebuild an AsmError from a failed RPC (status code, details, trailing metadata). ``code`` is read
    by its name: a grpc.StatusCode, or any status with the same names (the CLI's fast client's)."""
    md = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in (trailers or ())}
    name = code.name if code else ""
    message = details or (name if code else "RPC failed")
    if _MD_KIND in md:
        return make_error(md[_MD_KIND], md.get(_MD_DOMAIN, "runtime"), message, md.get(_MD_REASON, ""))
    if name == "RESOURCE_EXHAUSTED":
        if "larger than max" in message:  # gRPC's own message-size limit, not a busy server
            return AsmError(message, kind="buffer_overflow", domain="transport", reason="message_too_large")
        # gRPC's own overload answers (maximum_concurrent_rpcs, the pending-request backlog) carry no
        # asm trailers: still a typed, retryable "the server is full".
        return NodeAtCapacity(f"the server is at capacity, retry later ({message})")
    if name == "UNAVAILABLE" and "RST_STREAM with error code 7" in message:
        # HTTP/2 REFUSED_STREAM: the server's cap on concurrent streams per connection; the call
        # was never processed and may be retried.
        return NodeAtCapacity(f"the server refused the call: too many concurrent streams, retry later ({message})")
    if name == "CANCELLED":
        return AsmError(f"the call was cancelled by the server or the transport, not by this client ({message})",
                        kind="transport_error", domain="transport", reason="cancelled_by_peer")
    kind, domain = _STATUS_KIND.get(name, ("transport_error", "transport"))
    return AsmError(message, kind=kind, domain=domain)
