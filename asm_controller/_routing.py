"""Routing: which node a run goes to, and in which order to fall back.

* :class:`HealthTracker` is ASM's per-candidate state machine (healthy →
  unhealthy for a cooldown after a failure → lazily degraded → healthy on
  success), with an injectable clock.
* Strategies order the eligible nodes: ``priority`` (lowest priority value,
  then configuration order), ``round_robin``, ``weighted`` and
  ``least_loaded``. Unlike ASM, ``weighted`` is *smooth* weighted round-robin
  (nginx's algorithm): weights 2:1 pick a, b, a, a, b, a … rather than blocks
  a, a, b. ``least_loaded`` is power-of-two choices on each node's reported
  load (its last handshake/heartbeat: ``load.active_runs`` of
  ``limits.max_runs``, plus the runs this router placed there since that
  report), tie-broken by health; nodes without room go last.
* :class:`Router` filters candidates by what their last handshake said:
  provider available, not draining, not lost, free capacity, label selector.
  The first node of the order is the strategy's pick; the others are the
  failover order for admission refusals.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
class Load:
    """A node's load as it last reported it (handshake or heartbeat)."""

    active: int
    capacity: int = 0  # limits.max_runs; 0: not reported (no limit known)
    at: float = 0.0  # when it was reported, on the router's clock (time.monotonic)


class _Reporting(Protocol):
    """What :func:`reported_load` reads: a node handle's last handshake and when it was answered."""

    info: pb.HandshakeResponse
    last_ok: float


def reported_load(handle: _Reporting | None) -> Load | None:
    """The load a connected node last reported; None for a node never contacted."""
    if handle is None:
        return None
    return Load(handle.info.load.active_runs, handle.info.limits.max_runs, handle.last_ok)


@dataclass(frozen=True)
class Candidate:
    """A node the router may pick, with its routing attributes."""

    key: str
    position: int
    priority: int = 100
    weight: int = 1
    target: Any = None
    load: Load | None = None  # least_loaded's input; None: unknown (counts as idle)


#: How long a run this router placed counts towards its node's load when no newer report came
#: (a report after the placement already counts the run, if it still runs). Heartbeats come every
#: second by default; this only matters for nodes that report rarely or never (embedded).
PICK_TTL_S = 5.0


@dataclass
class _StrategyState:
    counter: int = 0
    current: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    #: least_loaded: when this router placed runs on each node (pruned after PICK_TTL_S).
    picks: dict[str, list[float]] = field(default_factory=dict)


def _no_rank(key: str) -> int:
    return 0


def _least_loaded(cands: Sequence[Candidate], state: _StrategyState, rank: Callable[[str], int],
                  now: float) -> list[Candidate]:
    """Power-of-two choices: two nodes with room at random, the less loaded (then the healthier) wins.

    Sampling two instead of taking the global minimum keeps routers that see the same stale
    reports (between heartbeats; several replicas) from all piling onto one node, and still
    avoids the loaded ones. The failover order after the pick is by load, then health, then
    configuration order; nodes without room come last (the node's StartRun refuses, typed, and
    the run moves on).
    """
    def effective(c: Candidate) -> tuple[bool, float, int, int, int]:
        load = c.load or Load(0)
        since = max(load.at, now - PICK_TTL_S)
        active = load.active + sum(1 for t in state.picks.get(c.key, ()) if t > since)
        full = bool(load.capacity) and active >= load.capacity
        share = active / load.capacity if load.capacity else 0.0
        return full, share, active, rank(c.key), c.position

    keys = {c.key: effective(c) for c in cands}
    room = [c for c in cands if not keys[c.key][0]]
    if len(room) >= 2:
        a, b = state.rng.sample(room, 2)
        pick = b if keys[b.key][1:4] < keys[a.key][1:4] else a  # a full tie: the random first
    else:
        pick = min(cands, key=lambda c: keys[c.key])
    rest = sorted((c for c in cands if c is not pick), key=lambda c: keys[c.key])
    times = [t for t in state.picks.get(pick.key, ()) if t > now - PICK_TTL_S]
    times.append(now)
    state.picks[pick.key] = times
    return [pick, *rest]


def order(strategy: str, cands: Sequence[Candidate], state: _StrategyState,
          rank: Callable[[str], int] = _no_rank, now: float = 0.0) -> list[Candidate]:
    """The pick first, then the failover order. Deterministic for a given state (and its seeded rng).

    ``rank``: a node's health rank (0 healthy, higher worse), least_loaded's tie-break; ``now``:
    the router's clock, when least_loaded records its pick.
    """
    if not cands:
        return []
    if strategy == Strategy.LEAST_LOADED:
        return _least_loaded(cands, state, rank, now)
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
    """``seed`` makes least_loaded's random choices repeatable (tests); ``clock`` is the health
    tracker's and least_loaded's (the same clock the node handles stamp their reports with)."""

    def __init__(self, strategy: str = "priority", cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown routing strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.health = HealthTracker(cooldown_s, clock)
        self._state = _StrategyState(rng=random.Random(seed))

    def _rank(self, key: str) -> int:
        return 0 if self.health.status(key) == "healthy" else 1

    def plan(self, cands: Sequence[Candidate], skip: Callable[[Candidate], str | None],
             cooling: Callable[[Candidate], bool] | None = None) -> tuple[list[Candidate], list[dict[str, str]]]:
        """Eligible candidates in try order, and the skipped ones with the reason.

        A node that is cooling down after a failure (or for which ``cooling`` says so: the run's
        provider failed there) is not dropped but tried last: with every node unhealthy, a run
        still gets its chance instead of a refusal (ASM would refuse for the whole cooldown).
        """
        usable, cooling_, skipped = [], [], []
        for c in cands:
            reason = skip(c)
            if reason:
                skipped.append({"node": getattr(c.target, "address", c.key), "skipped": reason})
            elif self.health.available(c.key) and not (cooling is not None and cooling(c)):
                usable.append(c)
            else:
                cooling_.append(c)
        ordered = order(self.strategy, usable, self._state, self._rank, self.health.clock())
        return ordered + sorted(cooling_, key=lambda c: c.position), skipped
