"""EventReducer: folds a run's events into a :class:`Result`.

Differences from ASM 0.9.2, on purpose (asm_runtime.md section 8):

* Text is not doubled when a provider sends deltas *and* the full message: the
  deltas since the last message are replaced by the message's text.
* Only ``error`` events of severity ``error``/``fatal`` fail a run; ``warning``
  and ``info`` errors (an overlong line that was dropped, say) are kept in
  ``Result.warnings``.
* There is one reducer, fed by the run's driver: ``query()``, ``stream()`` and
  the session all see the same Result.
* ``duration_ms`` comes from the events' own timestamps (first to last).
* ``messages`` holds every event except text deltas, whose text is in ``text``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from asm_controller._events import Event
from asm_wire import AsmError, EventKind, RunError, RunStatus, is_failure, kind_value, normalize_kind, pb

_DELTA = kind_value(EventKind.ASSISTANT_DELTA)
_MESSAGE = kind_value(EventKind.ASSISTANT_MESSAGE)
_RESULT = kind_value(EventKind.RESULT)
_ERROR = kind_value(EventKind.ERROR)
_COMPLETED = kind_value(EventKind.RUN_COMPLETED)
_STARTED = kind_value(EventKind.RUN_STARTED)
_COST = kind_value(EventKind.COST_UPDATE)
_APPROVAL_REQ = kind_value(EventKind.APPROVAL_REQUESTED)
_APPROVAL_RES = kind_value(EventKind.APPROVAL_RESOLVED)
#: Error kinds of an interrupted run: a client asked, or the node stopped it (drain deadline, shutdown).
INTERRUPT_KINDS = frozenset({"user_cancelled", "node_draining", "node_shutdown"})
#: The node ended the run itself; with on_node_lost="resume" it continues on another node.
NODE_STOPPED_KINDS = frozenset({"node_draining", "node_shutdown"})


@dataclass
class Cost:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Cost) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "cost_usd": self.cost_usd}


@dataclass
class Result:
    """The reduced outcome of one run."""

    run_id: str
    session_id: str
    provider: str
    status: str  # completed | failed | interrupted (or pending while running)
    text: str = ""
    messages: list[Event] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)
    error: AsmError | None = None
    warnings: list[AsmError] = field(default_factory=list)
    duration_ms: int | None = None
    stop_reason: str | None = None
    provider_session_id: str | None = None
    exit_code: int | None = None
    events: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == RunStatus.COMPLETED and self.error is None

    def raise_for_error(self) -> Result:
        if self.error is not None:
            raise self.error
        return self

    def to_summary(self) -> dict[str, Any]:
        """The ``result_summary`` object printed by ``asm run --output jsonl``."""
        return {
            "kind": "result_summary",
            "run_id": self.run_id,
            "session_id": self.session_id,
            "provider": self.provider,
            "status": self.status,
            "text": self.text,
            "error": self.error.to_dict() if self.error else None,
            "warnings": [w.to_dict() for w in self.warnings],
            "cost": self.cost.to_dict(),
            "duration_ms": self.duration_ms,
            "stop_reason": self.stop_reason,
            "provider_session_id": self.provider_session_id,
            "exit_code": self.exit_code,
            "events": self.events,
            "node_id": self.metadata.get("node_id"),
            "metadata": self.metadata,
        }


def message_text(msg: pb.AssistantMessage) -> str:
    """An assistant message's text blocks, joined (the reducer's and the renderers' one reading)."""
    return "".join([b.text for b in msg.content if b.type == "text"])


class EventReducer:
    def __init__(self, run_id: str, session_id: str, provider: str, metadata: dict[str, Any] | None = None) -> None:
        self.run_id = run_id
        self.session_id = session_id
        self.provider = provider
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.status = "pending"
        self.last_seq = 0
        self.finished = False
        self.pending_approvals: dict[str, Event] = {}
        #: Approval and cost events not yet seen by the session (drained by the run driver).
        self.bookkeeping: list[Event] = []
        self._committed: list[str] = []
        self._deltas: list[str] = []
        self._messages: list[Event] = []
        self._cost = Cost()
        self._error: AsmError | None = None
        self._warnings: list[AsmError] = []
        self._stop_reason: str | None = None
        self._psid: str | None = None
        self._exit_code: int | None = None
        self._first_ns = 0
        self._last_ns = 0
        self._events = 0

    def apply(self, ev: Event) -> bool:
        """Fold one event in; False (and nothing changes) for a duplicate or stale seq."""
        m = ev.pb
        seq = m.seq
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        self._events += 1
        ts = m.timestamp_unix_nano
        if not self._first_ns:
            self._first_ns = ts
        self._last_ns = ts
        if self._psid is None and m.provider_session_id:
            self._psid = m.provider_session_id
        kind = m.kind
        if kind == _DELTA:
            d = m.assistant_delta
            # Bytes that are not UTF-8 are decoded for display only; the event keeps them exactly.
            self._deltas.append(d.content or d.data.decode("utf-8", "replace"))
            return True
        if kind == _MESSAGE:
            # The full message supersedes the deltas that streamed it; deltas that
            # are not a prefix of it belong to something else and are kept.
            text = message_text(m.assistant_message)
            if self._deltas:
                streamed = "".join(self._deltas)
                self._deltas.clear()
                if not text.startswith(streamed):
                    self._committed.append(streamed)
            if text:
                self._committed.append(text)
        elif kind == _STARTED:
            self.status = RunStatus.RUNNING
            stamped = m.metadata.get("asm.controller")
            if stamped:
                # Recorded by the controller that ran it (node, epoch, attempts): restored on replay.
                try:
                    self.metadata = {**json.loads(stamped), **self.metadata}
                except ValueError:
                    pass
            if m.run_started.provider_session_id:
                self._psid = m.run_started.provider_session_id
            return True
        elif kind == _COST:
            c = m.cost_update
            self._cost.add(Cost(c.input_tokens, c.output_tokens, c.cost_usd))
            self.metadata["cost"] = self._cost.to_dict()
            self.bookkeeping.append(ev)
            return True
        elif kind == _APPROVAL_REQ:
            self.pending_approvals[m.approval_requested.approval_id] = ev
            self.bookkeeping.append(ev)
            return True
        elif kind == _APPROVAL_RES:
            self.pending_approvals.pop(m.approval_resolved.approval_id, None)
            self.bookkeeping.append(ev)
            return True
        elif kind == _RESULT:
            self._stop_reason = m.result.stop_reason or None
            if self.status not in (RunStatus.FAILED, RunStatus.INTERRUPTED):
                self.status = RunStatus.COMPLETED
            if m.result.output_json:
                try:
                    out = json.loads(m.result.output_json)
                    if isinstance(out, dict) and isinstance(out.get("exit_code"), int):
                        self._exit_code = out["exit_code"]
                except ValueError:
                    pass
        elif kind == _ERROR:
            e = m.error
            err = RunError(
                e.message, kind=normalize_kind(e.code), domain=e.domain or "runtime",
                exit_code=e.exit_code if e.exit_code >= 0 else None,
                reason=m.metadata.get("reason", ""),  # e.g. which deadline (run_timeout, idle_timeout, ...)
            )
            if is_failure(e.severity):
                if self._error is None:
                    self._error = err
                self.status = RunStatus.INTERRUPTED if err.kind in INTERRUPT_KINDS else RunStatus.FAILED
            else:
                self._warnings.append(err)
        elif kind == _COMPLETED:
            rc = m.run_completed
            if rc.status:
                self.status = rc.status
            if self._error is not None and self._error.kind not in INTERRUPT_KINDS:
                self.status = RunStatus.FAILED  # e.g. a guardrail stopped the run: the interrupt was only the means
            elif self.status in ("pending", RunStatus.RUNNING):
                self.status = RunStatus.COMPLETED
            if rc.exit_code >= 0:
                self._exit_code = rc.exit_code
            self.finished = True
            # A finished run keeps one string, not one per delta (finished runs stay in session history).
            if self._deltas:
                self._committed.append("".join(self._deltas))
                self._deltas.clear()
            self._committed = ["".join(self._committed)]
        self._messages.append(ev)
        return True

    @property
    def error(self) -> AsmError | None:
        return self._error

    @property
    def provider_session_id(self) -> str | None:
        return self._psid

    def set_error(self, err: AsmError) -> None:
        """Replace the run's error, if it has one, by a more precise one of the same failure (e.g. NodeUnreachable)."""
        if self._error is not None:
            self._error = err

    def result(self) -> Result:
        return Result(
            run_id=self.run_id,
            session_id=self.session_id,
            provider=self.provider,
            status=self.status,
            text="".join(self._committed) + "".join(self._deltas),
            messages=list(self._messages),
            cost=Cost(self._cost.input_tokens, self._cost.output_tokens, self._cost.cost_usd),
            error=self._error,
            warnings=list(self._warnings),
            duration_ms=(self._last_ns - self._first_ns) // 1_000_000 if self.finished else None,
            stop_reason=self._stop_reason,
            provider_session_id=self._psid,
            exit_code=self._exit_code,
            events=self._events,
            metadata=dict(self.metadata),
        )
