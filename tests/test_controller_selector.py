"""A client's node selector reaches the controller (StartRunRequest.selector; `asm run --selector` and the
HTTP API's POST /v1/runs): only nodes whose labels include all its pairs take the run; a bad selector is
config_invalid before anything runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from asm_controller import RemoteNode
from asm_controller._client import GrpcNodeClient
from asm_node.testing import serve_controller
from asm_wire import AsmError, pb
from tests.support.processes import ROOT, http_base, start_node_process

pytestmark = pytest.mark.slow  # node and controller processes


async def test_a_selector_picks_the_labelled_node_over_grpc_http_and_the_cli(tmp_path: Path) -> None:
    plain = start_node_process(tmp_path, "--label", "gpu=no")
    gpu = start_node_process(tmp_path, "--label", "gpu=yes", "--label", "zone=b")
    ctl = serve_controller(tmp_path, "--node", plain.address, "--node", gpu.address, "--state", "memory:",
                           "--strategy", "priority", "--http-listen", "127.0.0.1:0")
    try:
        client = GrpcNodeClient(RemoteNode(ctl.address))
        try:
            for i in range(3):  # priority routing would put every run on the first (plain) node
                batches = [b async for b in client.start_run(pb.StartRunRequest(
                    run_id=f"sel-{i}", provider="shell", prompt="true", selector={"gpu": "yes", "zone": "b"}))]
                assert batches[-1].events[-1].run_completed.status == "completed"
                assert (await client.get_run(pb.GetRunRequest(run_id=f"sel-{i}"))).node == gpu.address
            with pytest.raises(AsmError) as bad:
                async for _ in client.start_run(pb.StartRunRequest(run_id="bad", provider="shell", prompt="true",
                                                                   selector={"": "x"})):
                    pass
            assert (bad.value.kind, bad.value.reason) == ("config_invalid", "invalid_selector")
            nobody = [m for b in [b async for b in client.start_run(pb.StartRunRequest(
                run_id="nobody", provider="shell", prompt="true", selector={"gpu": "maybe"}))] for m in b.events]
            assert nobody[-1].run_completed.status == "failed"
            assert "label gpu!=maybe" in nobody[-2].error.message
        finally:
            await client.close()
        async with httpx.AsyncClient(base_url=http_base(ctl), timeout=30) as http:
            resp = await http.post("/v1/runs", json={"provider": "shell", "prompt": "true", "run_id": "sel-http",
                                                     "selector": {"gpu": "yes"}})
            assert resp.status_code == 201, resp.text
            for _ in range(100):
                info = (await http.get("/v1/runs/sel-http")).json()
                if info["status"] == "completed":
                    break
            assert info["node"] == gpu.address
        cli = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "asm_cli", "run", "--controller", ctl.address, "--provider",
                             "shell", "--selector", "gpu=yes", "--run-id", "sel-cli", "true"],
            capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert cli.returncode == 0, cli.stderr
        client = GrpcNodeClient(RemoteNode(ctl.address))
        try:
            assert (await client.get_run(pb.GetRunRequest(run_id="sel-cli"))).node == gpu.address
        finally:
            await client.close()
    finally:
        ctl.stop()
        plain.stop()
        gpu.stop()


def test_completion_options_are_checked_at_the_command_line() -> None:
    bad = subprocess.run([sys.executable, "-m", "asm_cli", "controller", "serve", "--listen", "127.0.0.1:0",
                          "--node", "127.0.0.1:1", "--completion-option", "skip_git_repo_check"],
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert bad.returncode == 2 and "PROVIDER:KEY=VALUE" in bad.stderr and "Traceback" not in bad.stderr
    from asm_cli.commands.controller_serve import _completion_option, _completion_options

    assert _completion_options([_completion_option("Codex:skip_git_repo_check=true"),
                                _completion_option("gemini:model=gemini-2.5-flash"),
                                _completion_option("codex:retries=3")]) == {
        "codex": {"skip_git_repo_check": True, "retries": 3}, "gemini": {"model": "gemini-2.5-flash"}}
