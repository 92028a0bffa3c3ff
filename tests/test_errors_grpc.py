"""The error tree across a real gRPC call: a workspace and a persistence failure reach the client as
their class (the table's status and the ``asm-error-*`` trailers), and the controller's face exports
every class of the tree."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import asm_controller
from asm_controller._client import GrpcNodeClient, RemoteNode
from asm_controller.extensions.persistence import decode_line
from asm_node import NodeServer
from asm_wire import AsmError, DecodeError, SnapshotNotFound, WorkspaceError, pb
from asm_wire import _errors as errors_module


@pytest.fixture
async def client(grpc_node: NodeServer) -> AsyncIterator[GrpcNodeClient]:
    c = GrpcNodeClient(RemoteNode(f"127.0.0.1:{grpc_node.port}"))
    try:
        yield c
    finally:
        await c.close()


def test_the_controller_face_exports_every_error_class() -> None:
    classes = {name for name, obj in inspect.getmembers(errors_module, inspect.isclass) if issubclass(obj, AsmError)}
    assert classes <= set(asm_controller.__all__)
    assert all(getattr(asm_controller, name) is getattr(errors_module, name) for name in classes)


async def test_an_unknown_snapshot_id_is_snapshot_not_found_at_the_client(
    tmp_path: Path, client: GrpcNodeClient
) -> None:
    with pytest.raises(SnapshotNotFound, match="unknown snapshot id") as err:
        await client.diff(pb.DiffRequest(cwd=str(tmp_path), from_id="hash-0123"))
    assert isinstance(err.value, WorkspaceError)
    assert (err.value.kind, err.value.domain, err.value.reason) == ("not_found", "tool", "snapshot_not_found")
    assert err.value.grpc_status() == grpc.StatusCode.NOT_FOUND


async def test_a_corrupt_line_is_a_decode_error_at_the_client(
    grpc_node: NodeServer, client: GrpcNodeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def torn_journal(run_id: str) -> Any:
        return decode_line(b'{"v":1,"pb":')  # the real codec's failure, raised inside the node's GetRun

    monkeypatch.setattr(grpc_node.agent, "_journaled", torn_journal)
    with pytest.raises(DecodeError, match="invalid JSON") as err:
        await client.get_run(pb.GetRunRequest(run_id="r1"))
    assert (err.value.kind, err.value.domain, err.value.reason) == ("parse_error", "parser", "corrupt_line")
    assert err.value.grpc_status() == grpc.StatusCode.INVALID_ARGUMENT
