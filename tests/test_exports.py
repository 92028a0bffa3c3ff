"""The controller package's public face: every name in ``__all__`` resolves, and the reshape kept them all."""

from __future__ import annotations

import pytest

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


async def test_session_connect_is_public_and_typed() -> None:
    from asm_controller import ConfigError, EmbeddedNode, NodeUnreachable, RemoteNode
    from asm_node.testing import running_agent

    async with running_agent() as agent:
        async with Session("shell", node=EmbeddedNode(agent)) as s:
            handle = await s.connect()
            assert handle.info.node_id and s.pool.get(handle.target.key) is handle
            assert await s.connect() is handle  # one connection per node
    async with Session("shell") as s:
        with pytest.raises(NodeUnreachable, match=r"127\.0\.0\.1:1"):
            await s.connect(RemoteNode("127.0.0.1:1", connect_timeout_s=1.0))
        with pytest.raises(ConfigError, match="no node"):
            await s.connect()
