"""History: fold a session, rebuild a run with the live reducer, replay a file and report its damage."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from asm_controller._events import Event
from asm_controller._reducer import EventReducer, Result
from asm_controller.extensions.persistence._file import _MAX_PROBLEMS, FileStore, RecoveryReport
from asm_controller.extensions.persistence._store import EventStore, _runtime_error
from asm_wire import AsmError, EventKind, RunNotFound, kind_value, make_error

__all__ = ["rebuild_run", "replay_file", "replay_session", "run_damage", "store_damage"]

A = TypeVar("A")


async def replay_session(store: EventStore, session_id: str, init: A, fn: Callable[[A, Event], A]) -> A:
    """Left fold of ``fn(acc, event)`` over the session's events (store order).

    A store failure is raised as an AsmError (kind ``unknown``, domain ``runtime``)
    with the original exception as ``__cause__``; an exception from ``fn`` propagates.
    """
    try:
        events = await store.list_events(session_id)
    except AsmError:
        raise
    except Exception as exc:
        raise _runtime_error(f"replay_session failed: {type(exc).__name__}: {exc}", "store_read_failed", exc) from exc
    acc = init
    for ev in events:
        acc = fn(acc, ev)
    return acc


async def _rebuild(store: EventStore, run_id: str, session_id: str | None) -> tuple[list[Event], Result]:
    try:
        events = await store.list_events(session_id=session_id, run_id=run_id)
    except AsmError:
        raise
    except Exception as exc:
        raise _runtime_error(f"rebuild_run failed: {type(exc).__name__}: {exc}", "store_read_failed", exc) from exc
    where = f" of session {session_id!r}" if session_id is not None else ""
    if not events:
        raise RunNotFound(f"run {run_id!r}{where} not found in the event store")
    sids = list(dict.fromkeys(e.session_id for e in events))
    if len(sids) > 1:
        raise _runtime_error(f"run {run_id!r} is in several sessions ({', '.join(map(repr, sids))}); "
                             "give the session id", "run_ambiguous")
    # The live reducer consumed them in seq order (dropping repeats): so does this one.
    events.sort(key=lambda e: e.pb.seq)
    first = events[0]
    reducer = EventReducer(run_id, first.session_id, first.provider or "unknown")
    applied = [ev for ev in events if reducer.apply(ev)]
    return applied, reducer.result()


async def rebuild_run(store: EventStore, run_id: str, session_id: str | None = None) -> Result:
    """The run's Result, reduced from its stored events by the live EventReducer.

    Text, cost, stop reason, error, status, event count and ``duration_ms`` (from
    the events' own timestamps) equal the live Result's; the controller-side
    ``metadata`` (node, attempts) is not in the events and is not rebuilt.
    Raises RunNotFound (kind ``not_found``, reason ``run_not_found``) for a run the store
    does not hold, and (``run_ambiguous``) when the id is in several sessions and
    no ``session_id`` is given.
    """
    return (await _rebuild(store, run_id, session_id))[1]


_COMPLETED_KIND: Final = kind_value(EventKind.RUN_COMPLETED)


def store_damage(report: RecoveryReport | None) -> list[dict[str, Any]]:
    """The file-level damage opening found, as ``result_summary.metadata.damage`` entries."""
    if report is None:
        return []
    out: list[dict[str, Any]] = []
    if report.tail_lines:
        out.append({"kind": "torn_tail", "lines": report.tail_lines, "bytes": report.tail_bytes,
                    "offset": report.truncated_at})
    middle = [p for p in report.problems if p.where == "middle" and not p.reason.startswith("format version")]
    if report.skipped_lines:
        first = middle[0] if middle else None
        out.append({"kind": "bad_lines", "lines": report.skipped_lines, "bytes": report.skipped_bytes,
                    "first_line": first.line if first else None, "first_offset": first.offset if first else None,
                    "reason": first.reason if first else None})
    if report.future_lines:
        out.append({"kind": "newer_format", "lines": report.future_lines})
    return out


def run_damage(events: Sequence[Event]) -> list[dict[str, Any]]:
    """What is missing from one run's stored events: seq gaps (the node numbers a run's
    events 1, 2, 3, ... with no holes) and a missing ``run_completed`` (its last event)."""
    out: list[dict[str, Any]] = []
    expected = 1
    for seq in sorted({e.pb.seq for e in events}):
        if seq > expected:
            if len(out) < _MAX_PROBLEMS:
                out.append({"kind": "seq_gap", "from": expected, "to": seq - 1, "missing": seq - expected})
        expected = max(expected, seq + 1)
    if not any(e.pb.kind == _COMPLETED_KIND for e in events):
        out.append({"kind": "missing_run_completed", "last_seq": expected - 1})
    return out


async def replay_file(path: str | os.PathLike[str], session_id: str | None = None,
                      run_id: str | None = None) -> list[tuple[list[Event], Result]]:
    """Runs rebuilt from an event store file, each as (its events in seq order, its Result).

    * ``run_id`` given: that run (in ``session_id`` when given);
    * only ``session_id``: every run of the session, in the order they started;
    * neither: the last run — the one whose first event was stored last.

    The file is opened read-only (no lock, nothing truncated), so a file being
    recorded can be replayed. Errors are AsmError: a missing file is a ConfigError
    (``config_invalid``); an unknown session or run is kind ``not_found`` (reasons
    ``session_not_found``; ``run_not_found``, class RunNotFound), an empty store kind
    ``runtime`` (reason ``store_empty``).

    Damage is never silent: a Result whose record is incomplete gets
    ``metadata["damage"]``, a list of :func:`store_damage` entries (the file's torn
    tail, bad lines, newer-format lines: every run of the file gets them) and
    :func:`run_damage` entries (seq gaps, no ``run_completed``). Intact: no key.
    """
    p = Path(path)
    async with FileStore(p, readonly=True) as store:
        sessions = await store.sessions()
        if not sessions:
            raise _runtime_error(f"event store {p} holds no events", "store_empty")
        if session_id is not None and session_id not in sessions:
            known = ", ".join(sessions[-10:])
            raise make_error("not_found", "runtime", f"session {session_id!r} is not in {p} (sessions: {known})",
                             reason="session_not_found")
        if run_id is not None:
            runs = [await _rebuild(store, run_id, session_id)]
        elif session_id is not None:
            runs = [await _rebuild(store, rid, session_id) for rid in await store.runs(session_id)]
        else:
            last = await store.last_run()
            assert last is not None
            runs = [await _rebuild(store, last[1], last[0])]
        file_damage = store_damage(store.recovered)
        for events, result in runs:
            damage = file_damage + run_damage(events)
            if damage:
                result.metadata["damage"] = damage
        return runs
