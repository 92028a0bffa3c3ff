"""EventReducer: folds a run's events into a :class:`Result`.

Differences from ASM 0.9.2, on purpose (asm_runtime.md section 8):

* Text is not doubled when a provider sends deltas *and* the full message: the
  deltas since the last message are replaced by the message's text. Separate
  assistant messages (and streamed text a tool call ended) are paragraphs,
  joined by one blank line, not glued together (:class:`TextFold`, shared
  with the renderers and the chat-completions endpoint, so all three agree).
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
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from asm_controller._events import Event
from asm_wire import (
    KIND_VALUES,
    AsmError,
    EventKind,
    RunError,
    RunStatus,
    is_failure,
    kind_value,
    make_error,
    normalize_kind,
    pb,
)

_DELTA = kind_value(EventKind.ASSISTANT_DELTA)
_MESSAGE = kind_value(EventKind.ASSISTANT_MESSAGE)
_RESULT = kind_value(EventKind.RESULT)
_ERROR = kind_value(EventKind.ERROR)
_COMPLETED = kind_value(EventKind.RUN_COMPLETED)
_STARTED = kind_value(EventKind.RUN_STARTED)
_COST = kind_value(EventKind.COST_UPDATE)
_APPROVAL_REQ = kind_value(EventKind.APPROVAL_REQUESTED)
_APPROVAL_RES = kind_value(EventKind.APPROVAL_RESOLVED)
#: The metadata of the node a run ran on, which a controller's stamp names for its clients.
RAN_ON_KEYS = ("node_id", "node_epoch", "node_address", "lane_fallback_reason")
#: Events that end a paragraph of streamed text (the assistant did something else in between).
_TEXT_BREAKS = frozenset({kind_value(EventKind.TOOL_USE), kind_value(EventKind.TOOL_RESULT)})
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
    #: The tool calls the provider refused (its permission rules, a sandbox): ``{"tool", "input", "reason"}``
    #: each, from the result event's ``denials``. A run can be ``completed`` with every tool call denied.
    denials: list[dict[str, Any]] = field(default_factory=list)

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
            "denials": list(self.denials),
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


#: Event kinds that are not work: the CLI starting, reporting, failing or ending.
_NOT_WORK = frozenset(KIND_VALUES[k] for k in (
    "run_started", "provider_init", "raw", "stderr", "error", "result", "run_completed", "cost_update",
    "user_message", "guardrail_triggered") if k in KIND_VALUES)
#: The model Claude Code names on the assistant message it makes up for an API error ("API Error: 500 ...").
SYNTHETIC_MODEL = "<synthetic>"


def is_work(m: pb.Event) -> bool:
    """Did the provider do something with this event (the model answered, a tool ran, it asks)?

    Claude Code's own "API Error: 500 ..." assistant message (model ``<synthetic>``) is not work,
    nor is an empty delta or message: a run with no work can go to another provider unseen.
    """
    kind = m.kind
    if kind in _NOT_WORK:
        return False
    if kind == pb.EVENT_KIND_ASSISTANT_DELTA:
        return bool(m.assistant_delta.content or m.assistant_delta.data)
    if kind == pb.EVENT_KIND_ASSISTANT_MESSAGE:
        msg = m.assistant_message
        return msg.model != SYNTHETIC_MODEL and any(b.type != "text" or b.text for b in msg.content)
    return True


class TextFold:
    """A run's answer text, append-only: deltas, full messages and the paragraph breaks between them.

    Deltas extend the current paragraph; a full message that starts with the paragraph streamed
    so far supersedes it (only its rest is new: never doubled); any other message, and deltas
    after a message or a tool call, start a new paragraph, one blank line after the previous one.
    :meth:`delta` / :meth:`message` return ``(separator, new_text)``: a terminal that printed a
    tool line in between drops the separator; the text is their concatenation.
    """

    __slots__ = ("_keep", "_len", "_para", "_para_kind", "_pieces", "_tail")

    def __init__(self, keep: bool = True) -> None:
        self._keep = keep  # False: a renderer, which prints the pieces and never needs the whole text
        self._pieces: list[str] = []
        self._len = 0
        self._para: list[str] = []  # the current paragraph's pieces
        self._para_kind = ""  # "" | deltas | message | sealed (deltas a tool call ended)
        self._tail = ""  # the last two characters of the text (how many newlines end it)

    @property
    def text(self) -> str:
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]  # keep one string: a long run does not keep one per delta
        return self._pieces[0] if self._pieces else ""

    def _add(self, piece: str) -> None:
        if piece:
            if self._keep:
                self._pieces.append(piece)
            self._len += len(piece)
            self._tail = piece[-2:] if len(piece) >= 2 else (self._tail + piece)[-2:]

    def _start(self, body: str, kind: str) -> tuple[str, str]:
        """A new paragraph: the separator that puts one blank line before it (none at the start)."""
        sep = ""
        if self._len:
            sep = "\n" * (2 - (len(self._tail) - len(self._tail.rstrip("\n"))))
            body = body.lstrip("\n")
        self._add(sep)
        self._para, self._para_kind = [body], kind
        self._add(body)
        return sep, body

    def delta(self, content: str) -> tuple[str, str]:
        if not content:
            return "", ""
        if self._para_kind == "deltas":
            self._para.append(content)
            self._add(content)
            return "", content
        return self._start(content, "deltas")

    def deltas(self, contents: list[str]) -> tuple[str, str]:
        """:meth:`delta` of each of ``contents`` (none empty) in turn, in one step: the separator and
        their new text, as the concatenation of what the calls one by one return (a batch's output
        lines are joined once, not appended one by one)."""
        if not contents:
            return "", ""
        sep, text = "", ""
        if self._para_kind != "deltas":
            sep, text = self._start(contents[0], "deltas")  # only the paragraph's first piece is trimmed
            contents = contents[1:]
        if contents:
            rest = contents[0] if len(contents) == 1 else "".join(contents)
            self._para.append(rest)
            self._add(rest)
            text += rest
        return sep, text

    def message(self, text: str) -> tuple[str, str]:
        if not text:
            return "", ""
        if self._para_kind in ("deltas", "sealed"):
            para = "".join(self._para)
            if text.startswith(para):
                rest = text[len(para):]
                self._add(rest)
                self._para, self._para_kind = [text], "message"
                return "", rest
        return self._start(text, "message")

    def seal(self) -> None:
        """Something other than text came (a tool call): the next text is a new paragraph."""
        if self._para_kind == "deltas":
            self._para_kind = "sealed"
        elif self._para_kind == "message":
            self._para, self._para_kind = [], ""


def _denials(value: Any) -> list[dict[str, Any]]:
    """A result's ``denials`` as the normalized ``{"tool", "input", "reason"}`` dicts (other entries dropped)."""
    if not isinstance(value, list):
        return []
    return [{"tool": str(d.get("tool") or ""), "input": d.get("input"), "reason": str(d.get("reason") or "")}
            for d in value if isinstance(d, dict)]


class EventReducer:
    def __init__(self, run_id: str, session_id: str, provider: str, metadata: dict[str, Any] | None = None) -> None:
        self.run_id = run_id
        self.session_id = session_id
        self.provider = provider
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.status = "pending"
        self.last_seq = 0
        self.finished = False
        #: The provider did something (see :func:`is_work`): a run that did is never re-run elsewhere.
        self.worked = False
        self.pending_approvals: dict[str, Event] = {}
        #: Approval and cost events not yet seen by the session (drained by the run driver).
        self.bookkeeping: list[Event] = []
        self._text = TextFold()
        self._denials: list[dict[str, Any]] = []
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
        if not self.worked and is_work(m):
            self.worked = True
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
            self._text.delta(d.content or d.data.decode("utf-8", "replace"))
            return True
        if kind == _MESSAGE:
            # The full message supersedes the deltas that streamed it; deltas that
            # are not a prefix of it belong to something else and are kept.
            self._text.message(message_text(m.assistant_message))
        elif kind in _TEXT_BREAKS:
            self._text.seal()
        elif kind == _STARTED:
            self.status = RunStatus.RUNNING
            stamped = m.metadata.get("asm.controller")
            if stamped:
                # Recorded by the controller that ran it (node, epoch, attempts): restored on replay.
                try:
                    theirs = json.loads(stamped)
                except ValueError:
                    theirs = None
                if isinstance(theirs, dict):
                    mine = self.metadata
                    if "controller_id" in mine:
                        # Through a controller: the node that ran it is the controller's, not the controller.
                        mine = {**mine, **{k: theirs[k] for k in RAN_ON_KEYS if k in theirs}}
                    self.metadata = {**theirs, **mine}
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
                    if isinstance(out, dict) and "denials" in out:
                        self._denials = _denials(out["denials"])
                except ValueError:
                    pass
        elif kind == _ERROR:
            e = m.error
            code, domain = normalize_kind(e.code), e.domain or "runtime"
            exit_code = e.exit_code if e.exit_code >= 0 else None
            reason = m.metadata.get("reason", "")
            err: AsmError = RunError(e.message, kind=code, domain=domain, exit_code=exit_code)
            if reason:
                # A typed cause (a controller's end of a run it could not place): keep its class
                # (ProviderMissing, NodeAtCapacity, ...) as a direct caller would get it.
                typed = make_error(code, domain, e.message, reason=reason, exit_code=exit_code)
                err = typed if type(typed) is not AsmError else RunError(
                    e.message, kind=code, domain=domain, reason=reason, exit_code=exit_code)
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
        self._messages.append(ev)
        return True

    def apply_batch(self, msgs: Iterable[pb.Event]) -> list[Event]:
        """``[ev for ev in map(Event, msgs) if self.apply(ev)]``, the same state after it: the fresh
        events, wrapped. The run's output lines (``assistant_delta``) are folded in a loop of their own
        and their text joined once per stretch of deltas (tests/test_reducer_batch.py: the same
        Result as one event at a time, over random sequences)."""
        return self._apply_batch(msgs, ())[0]

    def apply_until(self, msgs: Iterable[pb.Event], kinds: Collection[int]) -> tuple[list[Event], bool]:
        """:meth:`apply_batch` up to the first new event of one of ``kinds`` (a proto kind value), which
        is left unapplied with everything after it; and whether it stopped there. For a consumer that
        hands the run over at such an event (the fast ``asm run`` path at an approval request), in the
        same loop: no second pass over the batch to look for one. ``assistant_delta`` cannot be one of
        them (the output lines' loop never stops)."""
        if _DELTA in kinds:
            raise ValueError("apply_until cannot stop at assistant_delta events")
        return self._apply_batch(msgs, kinds)

    def _apply_batch(self, msgs: Iterable[pb.Event], stop: Collection[int]) -> tuple[list[Event], bool]:
        stopped = False
        fresh: list[Event] = []
        append = fresh.append
        texts: list[str] = []  # the text of the deltas since the last other event, not yet folded in
        last, events, first_ns, last_ns, psid = self.last_seq, self._events, self._first_ns, self._last_ns, self._psid
        worked = self.worked
        for m in msgs:
            seq = m.seq
            if seq <= last:
                continue  # seen before (a re-attach's replay)
            if m.kind != _DELTA:
                if stop and m.kind in stop:
                    stopped = True
                    break
                self.last_seq, self._events, self._first_ns, self._last_ns, self._psid = (
                    last, events, first_ns, last_ns, psid)
                self.worked = worked
                if texts:
                    self._text.deltas(texts)
                    texts = []
                ev = Event(m)
                self.apply(ev)
                append(ev)
                last, events, first_ns, last_ns, psid = (
                    self.last_seq, self._events, self._first_ns, self._last_ns, self._psid)
                worked = self.worked
                continue
            last = seq
            events += 1
            ts = m.timestamp_unix_nano
            if not first_ns:
                first_ns = ts
            last_ns = ts
            if psid is None and m.provider_session_id:
                psid = m.provider_session_id
            d = m.assistant_delta
            # Bytes that are not UTF-8 are decoded for display only; the event keeps them exactly.
            content = d.content or d.data.decode("utf-8", "replace")
            if content:
                worked = True  # (is_work of a delta: it has content or data)
                texts.append(content)
            append(Event(m))
        if texts:
            self._text.deltas(texts)
        self.last_seq, self._events, self._first_ns, self._last_ns, self._psid = last, events, first_ns, last_ns, psid
        self.worked = worked
        return fresh, stopped

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
            text=self._text.text,
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
            denials=[dict(d) for d in self._denials],
        )
