"""Pipeline: ordered plugs over each event of a run, on the controller.

A plug is a callable ``plug(event, ctx) -> Outcome`` (``ctx`` is a dict that
lives as long as the run). Outcomes, as in ASM's pipeline (asm_extensions.md
section 0):

* :class:`Continue` — keep going (optionally with a replacement event, and
  events to inject after it);
* :class:`Halt` — stop the pipeline for this event; emit ``event`` (or
  nothing) plus the injected events;
* :class:`Reject` — the run fails with this error (the run is interrupted on
  its node and ends with the error, e.g. ``guardrail_blocked``).

Injected events skip the plugs after the one that injected them (as in ASM),
but *observers* (persistence, pubsub, rendering) are not plugs: they see every
event the pipeline outputs, injected ones included, so their position can no
longer make them miss events (an ASM trap).

Built-ins: :class:`CostTracker`, :class:`PolicyGuard`, :class:`AllowedTools`,
and :class:`Policy` with the enforcer actions ``block`` (drop the event, note a
guardrail), ``warn`` (keep it, note a guardrail), ``request_approval``
(replace it by an approval; a deny or timeout interrupts the run) and
``cancel`` (fail the run). Every action emits a ``guardrail_triggered`` event,
a kind the stream and the reducer accept (ASM 0.9.2 crashed on it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from asm_controller._events import Event
from asm_wire import KIND_VALUES, AsmError, ConfigError, make_error, pb

ACTIONS = ("block", "warn", "request_approval", "cancel")


@dataclass
class Continue:
    event: Event | None = None
    inject: list[Event] = field(default_factory=list)


@dataclass
class Halt:
    event: Event | None = None
    inject: list[Event] = field(default_factory=list)


@dataclass
class Reject:
    error: AsmError


Outcome = Continue | Halt | Reject
Plug = Callable[[Event, dict[str, Any]], Outcome]


def derived(source: Event, kind: str, **payload: Any) -> Event:
    """A new event caused by ``source`` (same run, session and provider; seq assigned later)."""
    msg = pb.Event(run_id=source.run_id, session_id=source.session_id, provider=source.provider,
                   kind=KIND_VALUES[kind], timestamp_unix_nano=time.time_ns())
    getattr(msg, kind).CopyFrom(getattr(pb, "".join(p.title() for p in kind.split("_")))(**payload))
    msg.metadata["causation_id"] = source.id
    msg.metadata["origin"] = "pipeline"
    return Event(msg)


class Pipeline:
    def __init__(self, plugs: Sequence[Plug]) -> None:
        for plug in plugs:
            if not callable(plug):
                raise ConfigError(f"pipeline plug {plug!r} is not callable")
        self.plugs = list(plugs)

    def run(self, event: Event, ctx: dict[str, Any]) -> tuple[list[Event], AsmError | None]:
        """The events to emit for ``event``, or the error that fails the run."""
        current: Event | None = event
        injected: list[Event] = []
        for plug in self.plugs:
            assert current is not None
            try:
                outcome = plug(current, ctx)
            except Exception as exc:  # a plug bug fails the run with a clear error, not a crash
                return [], make_error("runtime", "runtime", f"pipeline plug {getattr(plug, '__name__', plug)!r} "
                                                            f"raised: {exc}")
            if isinstance(outcome, Reject):
                err = outcome.error
                if not isinstance(err, AsmError):
                    err = make_error("guardrail_blocked", "guardrail", f"Pipeline plug rejected event: {err!r}")
                return [], err
            if isinstance(outcome, Halt):
                out = ([outcome.event] if outcome.event is not None else []) + injected + outcome.inject
                return out, None
            if not isinstance(outcome, Continue):
                return [], make_error("runtime", "runtime", f"pipeline plug returned {outcome!r}; expected "
                                                            "Continue, Halt or Reject")
            if outcome.event is not None:
                current = outcome.event
            injected.extend(outcome.inject)
        assert current is not None
        return [current, *injected], None


# -- built-in plugs -------------------------------------------------------------------


def _usage(ev: Event) -> tuple[int, int]:
    try:
        out = json.loads(ev.pb.result.output_json or "{}")
    except ValueError:
        return 0, 0
    usage = out.get("usage") if isinstance(out, dict) else None
    if not isinstance(usage, dict):
        stats = out.get("stats") if isinstance(out, dict) else None
        usage = stats if isinstance(stats, dict) else {}
    return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)


class CostTracker:
    """Prices a run's usage at explicit rates (USD per token) and injects a ``cost_update`` after its ``result``.

    Providers already report cost; to avoid counting twice, nothing is injected
    for a run that has reported a cost_update itself (unlike ASM).
    """

    def __init__(self, input_rate: float = 0.0, output_rate: float = 0.0) -> None:
        if input_rate < 0 or output_rate < 0:
            raise ConfigError("cost rates must be >= 0")
        self.input_rate, self.output_rate = input_rate, output_rate

    def __call__(self, ev: Event, ctx: dict[str, Any]) -> Outcome:
        kind = ev.pb.kind
        if kind == pb.EVENT_KIND_COST_UPDATE:
            ctx["cost_reported"] = True
        if kind != pb.EVENT_KIND_RESULT or ctx.get("cost_reported"):
            return Continue()
        i, o = _usage(ev)
        usd = i * self.input_rate + o * self.output_rate
        return Continue(inject=[derived(ev, "cost_update", input_tokens=i, output_tokens=o, total_tokens=i + o,
                                        cost_usd=usd)])


def _tool_name(ev: Event) -> str | None:
    return ev.pb.tool_use.tool_name if ev.pb.kind == pb.EVENT_KIND_TOOL_USE else None


class AllowedTools:
    """Only these tools (by the provider's name for them); an empty list allows all."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = {str(t).strip() for t in allowed if str(t).strip()}

    def __call__(self, ev: Event, ctx: dict[str, Any]) -> Outcome:
        name = _tool_name(ev)
        if name is None or not self.allowed or name in self.allowed:
            return Continue()
        return Reject(make_error("guardrail_blocked", "guardrail", f"Tool blocked by allowlist: {name}"))


class PolicyGuard:
    """Stateless: a denied tool, or one result over ``max_output_tokens``, fails the run."""

    def __init__(self, disallow_tools: Iterable[str] = (), max_output_tokens: int | None = None) -> None:
        self.deny = set(disallow_tools)
        self.max_output_tokens = max_output_tokens

    def __call__(self, ev: Event, ctx: dict[str, Any]) -> Outcome:
        name = _tool_name(ev)
        if name is not None and name in self.deny:
            return Reject(make_error("guardrail_blocked", "guardrail", f"Tool blocked by policy: {name}"))
        if self.max_output_tokens is not None and ev.pb.kind == pb.EVENT_KIND_RESULT:
            _, out = _usage(ev)
            if out > self.max_output_tokens:
                return Reject(make_error("guardrail_blocked", "guardrail", "Output tokens exceeded policy limit"))
        return Continue()


class Policy:
    """Tool deny-list and a cumulative output-token budget, each with an action (ASM's Policy + Enforcer)."""

    def __init__(self, disallow_tools: Iterable[str] = (), max_output_tokens: int | None = None,
                 on_tool_violation: str = "cancel", on_budget_violation: str = "cancel") -> None:
        deny = list(disallow_tools)
        if not all(isinstance(t, str) and t.strip() for t in deny):
            raise ConfigError("disallow_tools entries must be non-empty strings")
        if max_output_tokens is not None and (not isinstance(max_output_tokens, int) or max_output_tokens < 0):
            raise ConfigError("max_output_tokens must be a non-negative integer")
        for action in (on_tool_violation, on_budget_violation):
            if action not in ACTIONS:
                raise ConfigError(f"policy action must be one of {', '.join(ACTIONS)}, got {action!r}")
        self.deny = {t.strip() for t in deny}
        self.max_output_tokens = max_output_tokens
        self.on_tool, self.on_budget = on_tool_violation, on_budget_violation

    def __call__(self, ev: Event, ctx: dict[str, Any]) -> Outcome:
        name = _tool_name(ev)
        if name is not None and name in self.deny:
            details = {"tool_name": name, "tool_call_id": ev.pb.tool_use.tool_call_id,
                       "tool_input": ev.payload.get("input")}
            return self._enforce(ev, ctx, "tool_disallowed", self.on_tool, "input", f"Tool blocked by policy: {name}",
                                 details)
        if self.max_output_tokens is not None and ev.pb.kind == pb.EVENT_KIND_RESULT:
            _, out = _usage(ev)
            total = ctx.get("policy_output_tokens", 0) + out
            ctx["policy_output_tokens"] = total
            if total > self.max_output_tokens:
                details = {"output_tokens": out, "total_output_tokens": total,
                           "max_output_tokens": self.max_output_tokens}
                return self._enforce(ev, ctx, "output_budget_exceeded", self.on_budget, "output",
                                     "Output tokens exceeded policy limit", details)
        return Continue()

    def _enforce(self, ev: Event, ctx: dict[str, Any], rule: str, action: str, direction: str, message: str,
                 details: dict[str, Any]) -> Outcome:
        note = derived(ev, "guardrail_triggered", rule=rule, direction=direction, action=action, message=message,
                       details_json=json.dumps(details))
        ctx["last_violation"] = {"rule": rule, "action": action, "source_event_id": ev.id}
        if action == "warn":
            return Continue(inject=[note])
        if action == "block":
            return Halt(None, inject=[note])  # the offending event is dropped; the run goes on
        if action == "request_approval":
            approval = derived(ev, "approval_requested", approval_id=f"policy-approval-{ev.id}",
                               subject=details.get("tool_name") or "policy_violation",
                               details_json=json.dumps({"rule": rule, **details}))
            approval.pb.metadata["policy"] = "1"
            return Halt(approval, inject=[note])
        err = make_error("guardrail_blocked", "guardrail", message)
        err.details.update(rule=rule, action=action, direction=direction, event_id=ev.id)
        return Reject(err)


__all__ = [
    "ACTIONS", "AllowedTools", "Continue", "CostTracker", "Halt", "Outcome", "Pipeline", "Plug", "Policy",
    "PolicyGuard", "Reject", "derived",
]
