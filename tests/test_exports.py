"""The controller package's public face: every name in ``__all__`` resolves, and the reshape kept them all."""

from __future__ import annotations

import asm_controller
from asm_controller import NodePool, Session


def test_every_exported_name_resolves() -> None:
    missing = [name for name in asm_controller.__all__ if not hasattr(asm_controller, name)]
    assert missing == []
    assert len(set(asm_controller.__all__)) == len(asm_controller.__all__)


def test_session_uses_a_public_node_pool_and_can_share_one() -> None:
    shared = NodePool()
    a = Session("shell", pool=shared)
    b = Session("shell", pool=shared)
    assert a.pool is shared and b.pool is shared
    assert isinstance(Session("shell").pool, NodePool)
    assert Session("shell").pool is not Session("shell").pool
