"""least_loaded routing: power-of-two choices on reported load, health tie-break, full nodes last
(pure: seeded randomness and a fake clock, so every assertion is deterministic)."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass

import pytest

from asm_controller import Router, Session
from asm_controller._routing import PICK_TTL_S, Candidate, Load, _StrategyState, order, reported_load
from asm_controller.service import ControllerConfig
from asm_wire import Strategy, pb


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cands(*loads: tuple[int, int], at: float = 0.0) -> list[Candidate]:
    """Candidates a, b, c, ... with (active, capacity) as they last reported it at ``at``."""
    return [Candidate(key=k, position=i, load=Load(active, cap, at))
            for i, (k, (active, cap)) in enumerate(zip("abcdefghij", loads, strict=False))]


def firsts(router: Router, cs: list[Candidate], n: int) -> list[str]:
    return [router.plan(cs, lambda c: None)[0][0].key for _ in range(n)]


def test_seeded_choices_repeat() -> None:
    nodes = cands(*[(0, 100)] * 10)
    one = firsts(Router(Strategy.LEAST_LOADED, clock=Clock(), seed=7), nodes, 30)
    two = firsts(Router(Strategy.LEAST_LOADED, clock=Clock(), seed=7), nodes, 30)
    assert one == two
    assert one != firsts(Router(Strategy.LEAST_LOADED, clock=Clock(), seed=8), nodes, 30)


@pytest.mark.parametrize("seed", range(5))
def test_the_less_loaded_of_the_two_wins(seed: int) -> None:
    state = _StrategyState()
    state.rng.seed(seed)
    # Two nodes: the pair is always both, so the idle one must win, whatever the draw.
    picked = order(Strategy.LEAST_LOADED, cands((3, 4), (0, 4)), state, now=1.0)
    assert [c.key for c in picked] == ["b", "a"]
    # Load is a share of capacity: 2 of 8 is lighter than 1 of 2.
    picked = order(Strategy.LEAST_LOADED, cands((1, 2), (2, 8)), _StrategyState(), now=1.0)
    assert picked[0].key == "b"


def test_picks_count_until_the_next_report_and_expire() -> None:
    state = _StrategyState()
    state.rng.seed(1)
    # Both idle at t=0; every pick counts on its node until a newer report, so they alternate.
    keys = [order(Strategy.LEAST_LOADED, cands((0, 4), (0, 4)), state, now=10.0)[0].key for _ in range(4)]
    assert sorted(keys) == ["a", "a", "b", "b"]
    assert Counter(keys[:2]) == Counter("ab")
    # a and b are now full by our own count: the order still has both (least loaded first), none dropped.
    assert len(order(Strategy.LEAST_LOADED, cands((0, 4), (0, 4)), state, now=10.0)) == 2
    # A report newer than the picks replaces them (it already counts what still runs).
    fresh = cands((0, 4), (3, 4), at=11.0)
    assert order(Strategy.LEAST_LOADED, fresh, state, now=11.5)[0].key == "a"
    # Without any newer report, picks stop counting after PICK_TTL_S (a node that never reports).
    state = _StrategyState()
    for _ in range(3):
        order(Strategy.LEAST_LOADED, cands((0, 4), (1, 4)), state, now=20.0)
    assert order(Strategy.LEAST_LOADED, cands((0, 4), (1, 4)), state, now=20.0 + PICK_TTL_S + 0.1)[0].key == "a"
    assert all(len(times) <= 3 for times in state.picks.values())  # pruned, not kept forever


def test_nodes_without_room_go_last() -> None:
    for seed in range(10):
        state = _StrategyState()
        state.rng.seed(seed)
        picked = [c.key for c in order(Strategy.LEAST_LOADED, cands((4, 4), (2, 4), (1, 4), (5, 4)), state, now=1.0)]
        assert picked[0] in ("b", "c") and picked[2:] == ["a", "d"]  # the full ones last, least loaded first
        assert picked[:2] in (["c", "b"], ["b", "c"])
    # Only one node has room: it is the pick.
    assert order(Strategy.LEAST_LOADED, cands((4, 4), (3, 4)), _StrategyState(), now=1.0)[0].key == "b"
    # Every node full: least loaded first all the same (its StartRun refuses, typed, and the run moves on).
    assert [c.key for c in order(Strategy.LEAST_LOADED, cands((6, 4), (4, 4)), _StrategyState(), now=1.0)] == ["b", "a"]


def test_health_breaks_ties() -> None:
    clock = Clock()
    router = Router(Strategy.LEAST_LOADED, cooldown_s=1, clock=clock, seed=3)
    router.health.failure("a", "unreachable")
    clock.now += 1.5  # a: degraded (selectable again), b: healthy, same load
    nodes = cands((1, 4), (1, 4), at=clock.now)
    assert router.health.status("a") == "degraded"
    assert router.plan(nodes, lambda c: None)[0][0].key == "b"
    # Cooling (unhealthy) nodes come after every usable one, as for the other strategies.
    router.health.failure("b", "unreachable")
    plan, _ = router.plan(cands((0, 4), (0, 4), (3, 4), at=clock.now), lambda c: None)
    assert [c.key for c in plan][-1] == "b"


def test_spreads_evenly_when_reports_are_stale() -> None:
    # 10 nodes that all reported idle, 40 runs placed before the next report: each gets 4 (its
    # capacity), as the router counts its own picks; a second round overflows least loaded first.
    router = Router(Strategy.LEAST_LOADED, clock=Clock(), seed=11)
    nodes = cands(*[(0, 4)] * 10)
    placed = Counter(firsts(router, nodes, 40))
    assert sorted(placed.values()) == [4] * 10
    # Never-contacted nodes (no load known) count as idle, and are spread over too.
    unknown = [Candidate(key=k, position=i) for i, k in enumerate("abc")]
    assert set(firsts(Router(Strategy.LEAST_LOADED, clock=Clock(), seed=2), unknown, 9)) == {"a", "b", "c"}


def test_other_strategies_are_unchanged_by_load() -> None:
    loaded = cands((3, 4), (0, 4), (0, 4))
    assert order(Strategy.PRIORITY, loaded, _StrategyState())[0].key == "a"
    assert order(Strategy.ROUND_ROBIN, loaded, _StrategyState())[0].key == "a"


@dataclass
class FakeHandle:
    info: pb.HandshakeResponse
    last_ok: float


def test_reported_load_reads_the_last_handshake() -> None:
    info = pb.HandshakeResponse(limits=pb.Limits(max_runs=8), load=pb.Load(active_runs=3))
    assert reported_load(FakeHandle(info, 42.0)) == Load(3, 8, 42.0)
    assert reported_load(None) is None


def test_defaults_service_least_loaded_library_priority() -> None:
    from asm_cli.commands.controller_serve import add_parser

    assert ControllerConfig().strategy == Strategy.LEAST_LOADED
    assert Router().strategy == Strategy.PRIORITY
    assert Session("shell", node=[]).pool.router.strategy == Strategy.PRIORITY
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())  # type: ignore[arg-type]
    args = parser.parse_args(["serve", "--listen", "127.0.0.1:0"])
    assert args.strategy == "least_loaded"
    for name in ("priority", "round_robin", "weighted"):
        assert parser.parse_args(["serve", "--listen", "127.0.0.1:0", "--strategy", name]).strategy == name
