"""Routing: which node a run goes to, and in which order to fall back.

* :class:`HealthTracker` is ASM's per-candidate state machine (healthy →
  unhealthy for a cooldown after a failure → lazily degraded → healthy on
  success), with an injectable clock.
* Strategies order the eligible nodes: ``priority`` (lowest priority value,
  then configuration order), ``round_robin`` and ``weighted``. Unlike ASM,
  ``weighted`` is *smooth* weighted round-robin (nginx's algorithm): weights
  2:1 pick a, b, a, a, b, a … rather than blocks a, a, b.
* :class:`Router` filters candidates by what their last handshake said:
  provider available, not draining, not lost, free capacity, label selector.
  The first node of the order is the strategy's pick; the others are the
  failover order for admission refusals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asm_wire import ConfigError, Strategy, choices, node_state_name, pb

#: The routing strategies (the vocabulary is asm_wire.Strategy).
STRATEGIES = choices(Strategy)


@dataclass
class Health:
    status: str = "healthy"  # healthy | degraded | unhealthy
    failures: int = 0
    last_error: str | None = None
    excluded_until: float | None = None

    def view(self, now: float) -> dict[str, Any]:
        return {
            "status": self.status, "failures": self.failures, "last_error": self.last_error,
            "excluded": self.excluded_until is not None and now < self.excluded_until,
        }


class HealthTracker:
    def __init__(self, cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if cooldown_s <= 0:
            raise ConfigError("failure cooldown must be positive")
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._health: dict[str, Health] = {}

    def _get(self, key: str) -> Health:
        h = self._health.setdefault(key, Health())
        # Lazy recovery: an expired exclusion becomes "degraded" (selectable again).
        if h.status == "unhealthy" and h.excluded_until is not None and self.clock() >= h.excluded_until:
            h.status, h.excluded_until = "degraded", None
        return h

    def failure(self, key: str, reason: str) -> None:
        h = self._get(key)
        h.status, h.failures, h.last_error = "unhealthy", h.failures + 1, reason
        h.excluded_until = self.clock() + self.cooldown_s

    def success(self, key: str) -> None:
        self._health[key] = Health()

    def available(self, key: str) -> bool:
        return self._get(key).status != "unhealthy"

    def status(self, key: str) -> str:
        return self._get(key).status

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {k: self._get(k).view(now) for k in list(self._health)}


@dataclass(frozen=True)
class Candidate:
    """A node the router may pick, with its routing attributes."""

    key: str
    position: int
    priority: int = 100
    weight: int = 1
    target: Any = None


@dataclass
class _StrategyState:
    counter: int = 0
    current: dict[str, int] = field(default_factory=dict)


def order(strategy: str, cands: Sequence[Candidate], state: _StrategyState) -> list[Candidate]:
    """The pick first, then the failover order. Deterministic for a given state."""
    if not cands:
        return []
    if strategy == Strategy.PRIORITY:
        return sorted(cands, key=lambda c: (c.priority, c.position))
    if strategy == Strategy.ROUND_ROBIN:
        i = state.counter % len(cands)
        state.counter += 1
        return list(cands[i:]) + list(cands[:i])
    if strategy == Strategy.WEIGHTED:
        total = sum(max(c.weight, 1) for c in cands)
        for c in cands:
            state.current[c.key] = state.current.get(c.key, 0) + max(c.weight, 1)
        pick = max(cands, key=lambda c: (state.current[c.key], -c.position))
        state.current[pick.key] -= total
        rest = sorted((c for c in cands if c is not pick), key=lambda c: (-c.weight, c.position))
        return [pick, *rest]
    raise ConfigError(f"unknown routing strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")


def eligible(info: pb.HandshakeResponse | None, provider: str, selector: Mapping[str, str]) -> str | None:
    """Why a node cannot take the run, judged from its last handshake; None when it can (or is unknown)."""
    if info is None:
        return None
    if info.state != pb.NODE_STATE_READY:
        return node_state_name(info.state)
    prov = next((p for p in info.providers if p.name == provider), None)
    if prov is None or not prov.available:
        return f"no {provider} CLI"
    if info.limits.max_runs and info.load.active_runs >= info.limits.max_runs:
        return "at capacity"
    for key, value in selector.items():
        if info.labels.get(key) != value:
            return f"label {key}!={value}"
    return None


class Router:
    def __init__(self, strategy: str = "priority", cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown routing strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.health = HealthTracker(cooldown_s, clock)
        self._state = _StrategyState()

    def plan(self, cands: Sequence[Candidate], skip: Callable[[Candidate], str | None]) -> tuple[list[Candidate], list[dict[str, str]]]:
        """Eligible candidates in try order, and the skipped ones with the reason.

        A node that is cooling down after a failure is not dropped but tried
        last: with every node unhealthy, a run still gets its chance instead of
        a refusal (ASM would refuse for the whole cooldown).
        """
        usable, cooling, skipped = [], [], []
        for c in cands:
            reason = skip(c)
            if reason:
                skipped.append({"node": getattr(c.target, "address", c.key), "skipped": reason})
            elif self.health.available(c.key):
                usable.append(c)
            else:
                cooling.append(c)
        return order(self.strategy, usable, self._state) + sorted(cooling, key=lambda c: c.position), skipped
