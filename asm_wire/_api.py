"""The node API as a Python protocol: the seam between controller and node.

``asm_node.NodeAgent`` implements it in-process; the controller's gRPC client
implements it over a channel. The controller only ever talks to this protocol,
so an embedded node and a remote node run the same runtime code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from asm_wire.v1 import node_pb2 as pb


class NodeApi(Protocol):
    async def handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse: ...

    async def preflight(self, request: pb.PreflightRequest) -> pb.PreflightResponse: ...

    def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        """Start (or attach to) a run; yields event batches until its run_completed event."""
        ...

    def attach_run(self, request: pb.AttachRunRequest) -> AsyncIterator[pb.EventBatch]: ...

    async def interrupt_run(self, request: pb.InterruptRunRequest) -> pb.InterruptRunResponse: ...

    async def resolve_approval(self, request: pb.ResolveApprovalRequest) -> pb.ResolveApprovalResponse: ...

    async def send_input(self, request: pb.SendInputRequest) -> pb.SendInputResponse: ...

    async def get_run(self, request: pb.GetRunRequest) -> pb.RunInfo: ...

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse: ...

    async def drain(self, request: pb.DrainRequest) -> pb.DrainResponse: ...
