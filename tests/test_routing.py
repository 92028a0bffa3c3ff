"""Routing: health tracker, strategies and eligibility (pure, with a fake clock)."""

from __future__ import annotations

import pytest

from asm_controller import HealthTracker, Router
from asm_controller._routing import Candidate, _StrategyState, eligible, order
from asm_wire import ConfigError, pb


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cands(*weights: int, priorities: tuple[int, ...] = ()) -> list[Candidate]:
    return [Candidate(key=k, position=i, weight=w, priority=(priorities[i] if priorities else 100))
            for i, (k, w) in enumerate(zip("abcdef", weights, strict=False))]


def test_health_tracker_cooldown_and_lazy_recovery() -> None:
    clock = Clock()
    h = HealthTracker(cooldown_s=0.1, clock=clock)
    assert h.status("n1") == "healthy"
    h.failure("n1", "unreachable")
    assert h.status("n1") == "unhealthy" and not h.available("n1")
    assert h.snapshot()["n1"]["excluded"] is True
    clock.now += 0.101
    assert h.status("n1") == "degraded" and h.available("n1")
    assert h.snapshot()["n1"]["failures"] == 1  # kept through recovery
    h.failure("n1", "node_lost")
    assert h.snapshot()["n1"]["failures"] == 2
    h.success("n1")
    assert h.snapshot()["n1"] == {"status": "healthy", "failures": 0, "last_error": None, "excluded": False}
    with pytest.raises(ConfigError):
        HealthTracker(cooldown_s=0)


def test_priority_is_lowest_value_then_config_order() -> None:
    picked = order("priority", cands(1, 1, 1, priorities=(50, 10, 10)), _StrategyState())
    assert [c.key for c in picked] == ["b", "c", "a"]


def test_round_robin_rotates_and_keeps_the_rest_as_failover() -> None:
    state = _StrategyState()
    firsts = [order("round_robin", cands(1, 1, 1), state)[0].key for _ in range(4)]
    assert firsts == ["a", "b", "c", "a"]
    assert [c.key for c in order("round_robin", cands(1, 1, 1), state)] == ["b", "c", "a"]


def test_weighted_is_smooth_and_proportional() -> None:
    state = _StrategyState()
    picks = [order("weighted", cands(2, 1), state)[0].key for _ in range(6)]
    assert picks == ["a", "b", "a", "a", "b", "a"]  # not blocks a, a, b
    state = _StrategyState()
    many = [order("weighted", cands(5, 1, 1), state)[0].key for _ in range(70)]
    assert many.count("a") == 50 and many.count("b") == 10 and many.count("c") == 10
    assert "aaaaaa" not in "".join(many)  # spread, never six in a row


def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(ConfigError):
        Router("fastest")


def test_router_puts_cooling_nodes_last_and_skips_ineligible() -> None:
    clock = Clock()
    router = Router("priority", cooldown_s=30, clock=clock)
    router.health.failure("a", "unreachable")
    plan, skipped = router.plan(cands(1, 1, 1), lambda c: "draining" if c.key == "c" else None)
    assert [c.key for c in plan] == ["b", "a"]
    assert skipped == [{"node": "c", "skipped": "draining"}]


def _info(**kw: object) -> pb.HandshakeResponse:
    info = pb.HandshakeResponse(state=pb.NODE_STATE_READY, limits=pb.Limits(max_runs=2), load=pb.Load(active_runs=0),
                                providers=[pb.ProviderInfo(name="claude", available=True),
                                           pb.ProviderInfo(name="codex", available=False)])
    for k, v in kw.items():
        if k == "labels":
            info.labels.update(v)  # type: ignore[arg-type]
        elif k == "active":
            info.load.active_runs = v  # type: ignore[assignment]
        else:
            setattr(info, k, v)
    return info


def test_eligibility_from_the_last_handshake() -> None:
    assert eligible(_info(), "claude", {}) is None
    assert eligible(None, "claude", {}) is None  # never contacted: try it
    assert eligible(_info(), "codex", {}) == "no codex CLI"
    assert eligible(_info(), "gemini", {}) == "no gemini CLI"
    assert eligible(_info(state=pb.NODE_STATE_DRAINING), "claude", {}) == "draining"
    assert eligible(_info(active=2), "claude", {}) == "at capacity"
    assert eligible(_info(labels={"gpu": "a100", "zone": "eu"}), "claude", {"gpu": "a100"}) is None
    assert eligible(_info(labels={"gpu": "t4"}), "claude", {"gpu": "a100"}) == "label gpu!=a100"
