"""The run store's records, errors, interface and input checks (shared by every backend).

Every backend validates with the same functions here, so bad input is the same typed error
(:class:`InvalidRecord`, ``TypeError`` for an unknown field name) whatever the database, and
never reaches a driver.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from asm_wire import AsmError, ConfigError
from asm_wire import LeaseLost as LeaseLost  # re-exported: the store's modules import it from here
from asm_wire import StoreError as StoreError
from asm_wire import StoreLocked as StoreLocked

#: A run is in flight (on a node: the controller must re-attach it after a restart) in these states.
IN_FLIGHT = ("pending", "running")
#: A run waits in the fleet queue (no node could admit it yet); it has no node.
QUEUED = "queued"
#: A run is live (not ended: owned through a lease by one replica) in these states.
LIVE = (QUEUED, *IN_FLIGHT)
STATUSES = (QUEUED, "pending", "running", "completed", "failed", "interrupted")
#: The default per-run bound of the stored event log.
DEFAULT_HISTORY_MAX_BYTES = 64 * 2**20


@dataclass
class RunRecord:
    """One run as the controller records it (before StartRun is sent, then as it progresses)."""

    run_id: str
    session_id: str
    provider: str
    owner: str = ""  # principal that started it
    prompt_digest: str = ""  # "sha256:<hex>" (never the prompt itself)
    spec: dict[str, Any] = field(default_factory=dict)  # JSON: cwd, permission_mode, options, ... (never env)
    node_address: str = ""
    node_id: str = ""
    node_epoch: str = ""
    node_run_id: str = ""
    status: str = "pending"  # pending | running | completed | failed | interrupted
    last_seq: int = 0  # highest seq in this run's event log
    node_seq: int = 0  # the node's cursor (re-attach after this seq)
    first_held_seq: int = 1  # events before it were dropped from the log (history bound)
    provider_session_id: str = ""
    created_at: float = 0.0  # unix seconds (0: the store sets the time of create())
    updated_at: float = 0.0
    ended_at: float | None = None
    result: dict[str, Any] | None = None  # the final result summary (JSON)
    # The fleet queue (schema version 2).
    priority: int = 0  # -1000..1000; higher starts first, FIFO (queued_at) within a priority
    queued_at: float | None = None  # when it entered the queue (create() of a queued run: created_at)
    queue_deadline: float | None = None  # unix seconds: still queued then -> queue_timeout
    #: The prompt, held ONLY while the run is queued (another replica must be able to start it after a
    #: failover); cleared when it is placed. get() returns it, list_runs() never does.
    prompt: str = ""
    # The lease (schema version 2): the replica that owns this live run, its fencing token, and until when.
    lease_owner: str = ""
    lease_token: int = 0
    lease_expires: float = 0.0


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunRecord))
#: Fields update() may set (run_id is the key).
UPDATABLE: frozenset[str] = frozenset(FIELDS) - {"run_id"}


class RunExists(ConfigError):
    """create() for a run id the store already holds (a run id is used once, ever)."""

    default_reason = "run_exists"


class InvalidRecord(ConfigError):
    """A value the store refuses (oversized id, non-JSON spec, unknown status, overlapping events, ...)."""

    default_reason = "invalid_record"


@dataclass(frozen=True)
class Lease:
    """A replica's claim on one live run: its owner (replica id) and fencing token.

    A write fenced with a Lease is applied only while the run's row still holds exactly this owner
    and token; take_lease() by another replica raises the token, so the old holder's writes fail
    (LeaseLost) instead of interleaving with the new owner's."""

    owner: str
    token: int


@dataclass(frozen=True)
class ReplicaRecord:
    """One controller replica as it registers itself (heartbeat_replica) in a shared store."""

    replica_id: str
    address: str  # where clients and other replicas reach it (its --advertise address)
    started_at: float
    heartbeat_at: float
    expires_at: float  # it counts as dead after this (unless it heartbeats again)
    leases: int  # live runs whose unexpired lease it holds (when replicas() was read)


@dataclass(frozen=True)
class SessionRecord:
    """One session as the run history shows it (an aggregate of its runs)."""

    session_id: str
    provider: str  # the latest run's
    owner: str  # the latest run's
    runs: int
    last_run_id: str
    last_status: str
    first_at: float  # created_at of its first run
    last_at: float  # created_at of its latest run (the listing's order and cursor)
    provider_session_id: str  # the latest non-empty one ("": none yet)
    node: str  # the latest run's node_address


@dataclass(frozen=True)
class EndpointLeaseRecord:
    """One published inference endpoint (schema version 3): who asked for it, what it serves, until when.

    ``token_digest`` is "sha256:<hex>" of the lease's bearer token: the token itself is handed to its
    caller once and never stored, so a leaked database does not leak working endpoint tokens."""

    ref: str
    owner: str  # the principal that asked for it (its completions run as that principal)
    provider: str
    model: str
    token_digest: str
    created_at: float
    expires_at: float
    data: dict[str, Any] = field(default_factory=dict)  # JSON: the rest of the lease (endpoint id, flags)


# The store's failures are asm_wire's StoreError (reason ``store_unavailable``: connection or I/O, may
# pass; ``schema_too_new``: the database was migrated by a newer asm) and StoreLocked (another
# controller holds the store): one class tree with every other asm error (asm_wire._errors).


@dataclass(frozen=True)
class EventsOp:
    """One queued append_events() (StoreWriter -> RunStore.write_batch)."""

    run_id: str
    first_seq: int
    last_seq: int
    data: bytes
    fence: Lease | None = None


@dataclass
class UpdateOp:
    """One queued (coalesced) update()."""

    run_id: str
    fields: dict[str, Any]
    fence: Lease | None = None
    expect_status: str | tuple[str, ...] | None = None


BatchOp = EventsOp | UpdateOp


#: A keyset cursor: (created_at, run_id) of list_runs()' last row, (last_at, session_id) of sessions()'.
Cursor = tuple[float, str]
#: Statuses a status filter or expect_status accepts: one, or several.
StatusFilter = str | tuple[str, ...]


class RunStore(Protocol):
    """The controller's durable run registry and event log; every backend behaves the same.

    Times that decide something (leases, replicas) are passed in by the caller (``now``, ``until``:
    unix seconds) so every replica and every test decides with the clock it means."""

    url: str  # display form, password hidden
    history_max_bytes: int

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def claim(self) -> None:
        """SQLite: make this process the store's only controller (StoreLocked if another holds it).
        PostgreSQL: a no-op (replicas share it; leases keep each run exclusive)."""
        ...
    async def meta_get(self, key: str) -> str | None: ...
    async def meta_set(self, key: str, value: str) -> None: ...
    async def create(self, rec: RunRecord) -> None: ...
    async def get(self, run_id: str) -> RunRecord | None: ...
    async def update(self, run_id: str, *, fence: Lease | None = None,
                     expect_status: StatusFilter | None = None, **fields: Any) -> None:
        """Set fields. ``fence``: only while the run's lease is exactly it; ``expect_status``: only while
        the run's status is (one of) it. Otherwise LeaseLost (nothing written); RunNotFound."""
        ...
    async def list_runs(self, *, status: StatusFilter | None = None, owner: str | None = None,
                        session_id: str | None = None, provider: str | None = None, node: str | None = None,
                        since: float | None = None, until: float | None = None, before: Cursor | None = None,
                        limit: int = 1000) -> list[RunRecord]:
        """Newest first (created_at, run_id descending); ``before``: the previous page's last
        (created_at, run_id), exclusive; since <= created_at < until; node = node_address. The
        records' ``prompt`` is always "" here (a history listing never ships prompts)."""
        ...
    async def in_flight(self) -> list[RunRecord]: ...
    async def append_events(self, run_id: str, first_seq: int, last_seq: int, data: bytes, *,
                            fence: Lease | None = None) -> None: ...
    async def end_run(self, run_id: str, first_seq: int, last_seq: int, data: bytes, *,
                      fence: Lease | None = None, expect_status: StatusFilter | None = None,
                      **fields: Any) -> None:
        """End a run in one transaction: update() its fields (the same ``fence`` and ``expect_status``
        compare-and-set) and append its final chunk of events, both or neither: a reader that sees it
        ended finds its end in the log, and a crash cannot leave one without the other. LeaseLost,
        RunNotFound, InvalidRecord (an overlapping chunk too): nothing written. A chunk the log already
        holds is not appended again (the fields are still written)."""
        ...
    async def events_after(self, run_id: str, after_seq: int) -> list[tuple[int, int, bytes]]: ...
    async def prune(self, ended_before: float, *, max_log_bytes: int | None = None) -> int:
        """Delete runs ended before ``ended_before`` (and their events); returns how many. Then, when
        the event logs of ended runs hold more than ``max_log_bytes``, drop the oldest ended runs'
        logs (their records stay: first_held_seq = last_seq + 1) until they fit."""
        ...
    async def log_bytes(self) -> int:
        """Bytes of event data held, every run together."""
        ...
    async def write_batch(self, ops: Sequence[BatchOp]) -> list[AsmError]:
        """Apply ops in order in one transaction; returns the ops' own errors (unknown run, overlap,
        LeaseLost), each with ``details["run_id"]``: those ops are skipped, the rest is written.
        Raises StoreError when the database fails."""
        ...

    # --- leases: which replica owns which live run ---
    async def take_lease(self, run_id: str, owner: str, *, seen_token: int, until: float,
                         now: float) -> Lease | None:
        """Compare-and-set: only if the run's lease_token is still ``seen_token``, it is live, and its
        lease expired (lease_expires < now), is free or is ``owner``'s already. Then the lease is
        ``owner``'s with token seen_token + 1 until ``until``; None when the CAS failed (or no such run)."""
        ...
    async def renew_leases(self, owner: str, *, until: float) -> dict[str, int]:
        """Extend every lease ``owner`` holds on a live run to ``until``; returns {run_id: token} held."""
        ...
    async def release_lease(self, run_id: str, lease: Lease) -> bool:
        """Expire ``lease`` now (another replica may take the run at once) if it is still held; True if it was."""
        ...
    async def expired_leases(self, *, now: float, limit: int = 500) -> list[RunRecord]:
        """Live runs whose lease expired before ``now`` (or never had one), oldest first."""
        ...

    # --- replicas ---
    async def heartbeat_replica(self, replica_id: str, address: str, *, now: float, until: float) -> None: ...
    async def remove_replica(self, replica_id: str) -> None: ...
    async def replicas(self, *, now: float) -> list[ReplicaRecord]:
        """Replicas alive at ``now`` (expires_at >= now), by id, each with its count of unexpired leases."""
        ...

    # --- the fleet queue ---
    async def queued(self, *, limit: int = 1000, owner: str | None = None,
                     lease_owner: str | None = None) -> list[RunRecord]:
        """Queued runs in start order: priority descending, then queued_at, then run_id (FIFO within a
        priority). ``owner`` filters by the principal (as in list_runs), ``lease_owner`` by the replica
        holding their lease."""
        ...
    async def queue_position(self, run_id: str) -> int | None:
        """The run's 1-based place in the fleet-wide start order; None if it is not queued."""
        ...
    async def queue_stats(self) -> tuple[int, float | None]:
        """(queued runs, the oldest queued_at or None)."""
        ...

    # --- history ---
    async def sessions(self, *, owner: str | None = None, provider: str | None = None, node: str | None = None,
                       before: Cursor | None = None, limit: int = 100) -> list[SessionRecord]:
        """Sessions of the runs matching the filters, newest activity first (last_at, session_id
        descending); ``before``: the previous page's last (last_at, session_id), exclusive."""
        ...

    # --- inference endpoint leases (schema version 3) ---
    async def put_endpoint_lease(self, rec: EndpointLeaseRecord) -> None:
        """Store the lease (a lease already stored under its ref is replaced)."""
        ...
    async def get_endpoint_lease(self, ref: str) -> EndpointLeaseRecord | None:
        """The lease by ref, expired or not (the caller decides with its clock); None if unknown."""
        ...
    async def delete_endpoint_lease(self, ref: str) -> bool:
        """Forget the lease; True if it was stored."""
        ...
    async def expired_endpoint_leases(self, *, now: float, limit: int = 500) -> list[str]:
        """Refs of the leases with expires_at <= ``now``, soonest-expired first."""
        ...


# --- input checks ---------------------------------------------------------------------------------

#: Longest accepted text per field (characters). Ids follow asm_wire.valid_id's 128.
MAX_CHARS: dict[str, int] = {
    "run_id": 128, "session_id": 128, "provider": 64, "owner": 256, "prompt_digest": 71,
    "node_address": 512, "node_id": 128, "node_epoch": 64, "node_run_id": 128, "status": 16,
    "provider_session_id": 256, "lease_owner": 64, "replica_id": 64, "address": 512,
}
#: The longest prompt a queued run may hold (characters).
MAX_PROMPT_CHARS = 1 << 20
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
MAX_META_KEY = 128
MAX_META_VALUE = 65536
#: A spec or result larger than this (as JSON) is refused: the registry is not a blob store.
MAX_JSON_CHARS = 1 << 20
MAX_SEQ = 2**63 - 1
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
#: Longest accepted text per endpoint-lease field (characters).
MAX_LEASE_CHARS: dict[str, int] = {"ref": 128, "owner": 256, "provider": 64, "model": 256, "token_digest": 71}


def check_text(name: str, value: object, *, empty_ok: bool = True, limit: int | None = None) -> str:
    if not isinstance(value, str):
        raise InvalidRecord(f"{name} must be a string, not {type(value).__name__}")
    if not value and not empty_ok:
        raise InvalidRecord(f"{name} must not be empty")
    limit = limit if limit is not None else MAX_CHARS[name]
    if len(value) > limit:
        raise InvalidRecord(f"{name} is {len(value)} characters long; at most {limit} are accepted")
    if "\x00" in value:
        raise InvalidRecord(f"{name} contains a NUL character")
    return value


def check_seq(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecord(f"{name} must be an integer, not {type(value).__name__}")
    if not minimum <= value <= MAX_SEQ:
        raise InvalidRecord(f"{name} must be between {minimum} and 2**63-1, not {value}")
    return value


def check_time(name: str, value: object, *, none_ok: bool = False) -> float | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRecord(f"{name} must be a number of unix seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise InvalidRecord(f"{name} must be a finite, non-negative number of unix seconds, not {value}")
    return float(value)


def encode_json(name: str, value: object, *, none_ok: bool) -> str | None:
    """The canonical JSON text of a spec/result dict (InvalidRecord when it is not JSON)."""
    if value is None and none_ok:
        return None
    if not isinstance(value, dict):
        raise InvalidRecord(f"{name} must be a dict, not {type(value).__name__}")
    if name == "spec" and "env" in value:
        raise InvalidRecord("spec must not hold env: the registry never stores environment values")
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRecord(f"{name} is not JSON-serializable: {exc}") from None
    if len(text) > MAX_JSON_CHARS:
        raise InvalidRecord(f"{name} is {len(text)} characters as JSON; at most {MAX_JSON_CHARS} are accepted")
    if "\x00" in text:  # "\u0000" after escaping is fine, a raw NUL is not possible here; kept for safety
        raise InvalidRecord(f"{name} contains a NUL character")
    return text


def _status(name: str, value: object) -> str:
    if value not in STATUSES:
        raise InvalidRecord(f"status must be one of {', '.join(STATUSES)}, not {value!r}")
    return str(value)


def _digest(name: str, value: object) -> str:
    text = check_text(name, value)
    if text and not _DIGEST.fullmatch(text):
        raise InvalidRecord("prompt_digest must be 'sha256:' and 64 lowercase hex digits (never the prompt itself)")
    return text


def check_priority(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecord(f"{name} must be an integer, not {type(value).__name__}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidRecord(f"{name} must be between {MIN_PRIORITY} and {MAX_PRIORITY}, not {value}")
    return value


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    **{name: (lambda n, v: check_text(n, v)) for name in MAX_CHARS if name in FIELDS},
    "run_id": lambda n, v: check_text(n, v, empty_ok=False),
    "session_id": lambda n, v: check_text(n, v, empty_ok=False),
    "provider": lambda n, v: check_text(n, v, empty_ok=False),
    "prompt_digest": _digest,
    "status": _status,
    "spec": lambda n, v: encode_json(n, v, none_ok=False),
    "result": lambda n, v: encode_json(n, v, none_ok=True),
    "last_seq": check_seq,
    "node_seq": check_seq,
    "first_held_seq": lambda n, v: check_seq(n, v, 1),
    "created_at": check_time,
    "updated_at": check_time,
    "ended_at": lambda n, v: check_time(n, v, none_ok=True),
    "priority": check_priority,
    "queued_at": lambda n, v: check_time(n, v, none_ok=True),
    "queue_deadline": lambda n, v: check_time(n, v, none_ok=True),
    "prompt": lambda n, v: check_text(n, v, limit=MAX_PROMPT_CHARS),
    "lease_token": check_seq,
    "lease_expires": check_time,
}
assert set(_CHECKS) == set(FIELDS), set(FIELDS) ^ set(_CHECKS)


def check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Validated column values for these record fields (spec/result as JSON text).

    An unknown field name is a TypeError (a programming error, like a bad keyword argument).
    """
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise TypeError(f"RunRecord has no field(s) {', '.join(unknown)}")
    return {name: _CHECKS[name](name, value) for name, value in fields.items()}


def check_update(fields: dict[str, Any]) -> dict[str, Any]:
    """check_fields() for update(): run_id cannot change."""
    if "run_id" in fields:
        raise TypeError("update() cannot change run_id")
    return check_fields(fields)


def check_record(rec: RunRecord) -> dict[str, Any]:
    if not isinstance(rec, RunRecord):
        raise InvalidRecord(f"create() takes a RunRecord, not {type(rec).__name__}")
    return check_fields({name: getattr(rec, name) for name in FIELDS})


def check_meta(key: object, value: object | None = None, *, with_value: bool = False) -> None:
    check_text("meta key", key, empty_ok=False, limit=MAX_META_KEY)
    if with_value:
        check_text("meta value", value, limit=MAX_META_VALUE)


def check_chunk(run_id: object, first_seq: object, last_seq: object, data: object) -> None:
    check_text("run_id", run_id, empty_ok=False)
    first = check_seq("first_seq", first_seq, 1)
    last = check_seq("last_seq", last_seq, 1)
    if last < first:
        raise InvalidRecord(f"an event chunk's last_seq ({last}) is below its first_seq ({first})")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRecord(f"event data must be bytes, not {type(data).__name__}")


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_SEQ:
        raise InvalidRecord(f"limit must be a non-negative integer (at most 2**63-1), not {limit!r}")
    return limit


def check_statuses(name: str, value: object) -> tuple[str, ...]:
    """A status filter (one status or a tuple/list of them) as a non-empty tuple of known statuses."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, tuple | list) or not items:
        raise InvalidRecord(f"{name} must be a status or a non-empty tuple of statuses, not {value!r}"[:300])
    for item in items:
        if item not in STATUSES:
            raise InvalidRecord(f"{name}: {item!r} is not a status ({', '.join(STATUSES)})"[:300])
    return tuple(items)


def check_fence(fence: object) -> Lease | None:
    if fence is None:
        return None
    if not isinstance(fence, Lease):
        raise InvalidRecord(f"fence must be a Lease, not {type(fence).__name__}")
    check_text("lease_owner", fence.owner, empty_ok=False)
    check_seq("lease token", fence.token)
    return fence


def check_owner(name: str, value: object) -> str:
    """A replica id (lease owner)."""
    return check_text(name, value, empty_ok=False, limit=MAX_CHARS["lease_owner"])


def check_take(run_id: object, owner: object, seen_token: object, until: object, now: object
               ) -> tuple[int, float, float]:
    """take_lease()'s input: (the new token, the new expiry, now), the same checks on every backend."""
    check_text("run_id", run_id, empty_ok=False)
    check_owner("owner", owner)
    token = check_seq("seen_token", seen_token) + 1
    if token > MAX_SEQ:
        raise InvalidRecord("seen_token is at its maximum: the lease cannot be taken again")
    expires, at = check_time("until", until), check_time("now", now)
    assert expires is not None and at is not None
    return token, expires, at


def check_cursor(before: object) -> Cursor | None:
    """A keyset cursor: (created_at or last_at, run_id or session_id) from the previous page."""
    if before is None:
        return None
    if not isinstance(before, tuple | list) or len(before) != 2:
        raise InvalidRecord(f"a cursor is (unix seconds, id) from the previous page's last row, not {before!r}"[:300])
    at = check_time("cursor time", before[0])
    assert at is not None
    return at, check_text("cursor id", before[1], limit=MAX_CHARS["run_id"])


def check_filter_text(name: str, value: object, field_name: str) -> str | None:
    return None if value is None else check_text(name, value, limit=MAX_CHARS[field_name])


def check_expect(fence: object, expect_status: object) -> tuple[Lease | None, tuple[str, ...] | None]:
    return check_fence(fence), (None if expect_status is None else check_statuses("expect_status", expect_status))


def check_max_bytes(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise InvalidRecord(f"max_log_bytes must be a non-negative integer, not {value!r}"[:300])
    return value


def lease_lost(run_id: str, fence: Lease | None, expect: tuple[str, ...] | None, *, owner: str, token: int,
               status: str) -> LeaseLost | None:
    """The LeaseLost for a row (owner, token, status) a fenced write finds; None when it may write."""
    if fence is not None and (owner, token) != (fence.owner, fence.token):
        holder = f"{owner!r} (token {token})" if owner else "nobody"
        return LeaseLost(f"run {run_id}: its lease is held by {holder}, not by {fence.owner!r} (token "
                         f"{fence.token}): another replica took it over", details={"run_id": run_id})
    if expect is not None and status not in expect:
        return LeaseLost(f"run {run_id} is {status}, not {' or '.join(expect)}: another replica or "
                         "request changed it first", details={"run_id": run_id})
    return None


#: The operation names a SQL store reports to its ``observe`` hook (a metric's bounded label set).
STORE_OPS: tuple[str, ...] = (
    "open", "claim", "meta_get", "meta_set", "create", "get", "update", "list_runs", "in_flight",
    "append_events", "end_run", "events_after", "prune", "log_bytes", "write_batch", "take_lease", "renew_leases",
    "release_lease", "expired_leases", "heartbeat_replica", "remove_replica", "replicas", "queued",
    "queue_position", "queue_stats", "sessions", "put_endpoint_lease", "get_endpoint_lease",
    "delete_endpoint_lease", "expired_endpoint_leases",
)


def check_lease_ref(ref: object) -> str:
    return check_text("lease ref", ref, empty_ok=False, limit=MAX_LEASE_CHARS["ref"])


def check_endpoint_lease(rec: object) -> dict[str, Any]:
    """The column values of an endpoint lease (``data`` as JSON text); InvalidRecord for bad input."""
    if not isinstance(rec, EndpointLeaseRecord):
        raise InvalidRecord(f"put_endpoint_lease() takes an EndpointLeaseRecord, not {type(rec).__name__}")
    cols: dict[str, Any] = {"ref": check_lease_ref(rec.ref)}
    for name in ("owner", "provider", "model"):
        cols[name] = check_text(name, getattr(rec, name), empty_ok=name == "model", limit=MAX_LEASE_CHARS[name])
    digest = check_text("token_digest", rec.token_digest, limit=MAX_LEASE_CHARS["token_digest"])
    if not _DIGEST.fullmatch(digest):
        raise InvalidRecord("token_digest must be 'sha256:' and 64 lowercase hex digits (never the token itself)")
    cols["token_digest"] = digest
    created, expires = check_time("created_at", rec.created_at), check_time("expires_at", rec.expires_at)
    assert created is not None and expires is not None
    if expires < created:
        raise InvalidRecord(f"expires_at ({expires}) is before created_at ({created})")
    cols["created_at"], cols["expires_at"] = created, expires
    cols["data"] = encode_json("data", rec.data, none_ok=False)
    return cols


def endpoint_lease_from_columns(cols: dict[str, Any]) -> EndpointLeaseRecord:
    return EndpointLeaseRecord(
        ref=str(cols["ref"]), owner=str(cols["owner"]), provider=str(cols["provider"]), model=str(cols["model"]),
        token_digest=str(cols["token_digest"]), created_at=float(cols["created_at"]),
        expires_at=float(cols["expires_at"]), data=json.loads(cols["data"]) if cols["data"] else {})


def record_from_columns(cols: dict[str, Any]) -> RunRecord:
    """A RunRecord from stored column values (spec/result as JSON text; no ``prompt``: a listing's "")."""
    values = {name: cols[name] for name in FIELDS if name != "prompt"}
    values["prompt"] = cols.get("prompt") or ""
    values["spec"] = json.loads(values["spec"]) if values["spec"] else {}
    values["result"] = json.loads(values["result"]) if values["result"] is not None else None
    for name in ("created_at", "updated_at", "lease_expires"):
        values[name] = float(values[name])
    for name in ("ended_at", "queued_at", "queue_deadline"):
        if values[name] is not None:
            values[name] = float(values[name])
    for name in ("last_seq", "node_seq", "first_held_seq", "priority", "lease_token"):
        values[name] = int(values[name])
    return RunRecord(**values)


def overlap_error(run_id: str, first_seq: int, held_last: int) -> InvalidRecord:
    return InvalidRecord(f"run {run_id}: an event chunk starting at seq {first_seq} overlaps the log, "
                         f"which already holds seqs up to {held_last}")
