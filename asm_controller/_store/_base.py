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
from asm_wire import StoreError as StoreError  # re-exported: the store's modules import it from here
from asm_wire import StoreLocked as StoreLocked

#: A run is in flight (the controller must re-attach it after a restart) in these states.
IN_FLIGHT = ("pending", "running")
STATUSES = ("pending", "running", "completed", "failed", "interrupted")
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


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunRecord))
#: Fields update() may set (run_id is the key).
UPDATABLE: frozenset[str] = frozenset(FIELDS) - {"run_id"}


@dataclass
class SessionRecord:
    """A session as the registry knows it: the runs recorded under one session id."""

    session_id: str
    provider: str
    owner: str
    runs: int
    last_run_id: str
    last_status: str
    first_at: float  # created_at of its first run
    last_at: float  # created_at of its latest run
    provider_session_id: str  # the latest non-empty one (the CLI's resumable session)
    node: str  # the latest run's node_address


class RunExists(ConfigError):
    """create() for a run id the store already holds (a run id is used once, ever)."""

    default_reason = "run_exists"


class InvalidRecord(ConfigError):
    """A value the store refuses (oversized id, non-JSON spec, unknown status, overlapping events, ...)."""

    default_reason = "invalid_record"


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


@dataclass
class UpdateOp:
    """One queued (coalesced) update()."""

    run_id: str
    fields: dict[str, Any]


BatchOp = EventsOp | UpdateOp


class RunStore(Protocol):
    """The controller's durable run registry and event log; every backend behaves the same."""

    url: str  # display form, password hidden
    history_max_bytes: int

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def claim(self) -> None: ...
    async def meta_get(self, key: str) -> str | None: ...
    async def meta_set(self, key: str, value: str) -> None: ...
    async def create(self, rec: RunRecord) -> None: ...
    async def get(self, run_id: str) -> RunRecord | None: ...
    async def update(self, run_id: str, **fields: Any) -> None: ...
    async def list_runs(self, *, status: str | None = None, owner: str | None = None,
                        session_id: str | None = None, provider: str | None = None, node: str | None = None,
                        since: float | None = None, until: float | None = None,
                        before: tuple[float, str] | None = None, limit: int = 1000) -> list[RunRecord]: ...
    async def sessions(self, *, owner: str | None = None, provider: str | None = None, node: str | None = None,
                       before: tuple[float, str] | None = None, limit: int = 100) -> list[SessionRecord]: ...
    async def in_flight(self) -> list[RunRecord]: ...
    async def append_events(self, run_id: str, first_seq: int, last_seq: int, data: bytes) -> None: ...
    async def events_after(self, run_id: str, after_seq: int) -> list[tuple[int, int, bytes]]: ...
    async def prune(self, ended_before: float) -> int: ...
    async def write_batch(self, ops: Sequence[BatchOp]) -> list[AsmError]:
        """Apply ops in order in one transaction; returns the ops' own errors (unknown run, overlap):
        those ops are skipped, the rest is written. Raises StoreError when the database fails."""
        ...


# --- input checks ---------------------------------------------------------------------------------

#: Longest accepted text per field (characters). Ids follow asm_wire.valid_id's 128.
MAX_CHARS: dict[str, int] = {
    "run_id": 128, "session_id": 128, "provider": 64, "owner": 256, "prompt_digest": 71,
    "node_address": 512, "node_id": 128, "node_epoch": 64, "node_run_id": 128, "status": 16,
    "provider_session_id": 256,
}
MAX_META_KEY = 128
MAX_META_VALUE = 65536
#: A spec or result larger than this (as JSON) is refused: the registry is not a blob store.
MAX_JSON_CHARS = 1 << 20
MAX_SEQ = 2**63 - 1
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


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


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    **{name: (lambda n, v: check_text(n, v)) for name in MAX_CHARS},
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
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidRecord(f"limit must be a non-negative integer, not {limit!r}")
    return limit


def record_from_columns(cols: dict[str, Any]) -> RunRecord:
    """A RunRecord from stored column values (spec/result as JSON text)."""
    values = {name: cols[name] for name in FIELDS}
    values["spec"] = json.loads(values["spec"]) if values["spec"] else {}
    values["result"] = json.loads(values["result"]) if values["result"] is not None else None
    for name in ("created_at", "updated_at"):
        values[name] = float(values[name])
    if values["ended_at"] is not None:
        values["ended_at"] = float(values["ended_at"])
    for name in ("last_seq", "node_seq", "first_held_seq"):
        values[name] = int(values[name])
    return RunRecord(**values)


def overlap_error(run_id: str, first_seq: int, held_last: int) -> InvalidRecord:
    return InvalidRecord(f"run {run_id}: an event chunk starting at seq {first_seq} overlaps the log, "
                         f"which already holds seqs up to {held_last}")
