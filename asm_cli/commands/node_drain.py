"""``asm node drain`` and ``asm node undrain``: directly, or through a controller (ControllerClient)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from asm_cli.commands._common import EXIT_NODE, EXIT_OK, Subcommands, client_args, remote_nodes
from asm_controller import ControllerClient, GrpcNodeClient, NodeNotReady, NodeUnreachable, connect
from asm_wire import AsmError, node_state_name, pb


async def _controller_call(args: argparse.Namespace, address: str,
                           call: Callable[[ControllerClient, str], Awaitable[pb.DrainResponse]]) -> pb.DrainResponse:
    """One ControllerService call (DrainNode, UndrainNode) with this command's credentials; typed errors."""
    (target,) = remote_nodes(argparse.Namespace(**{**vars(args), "node": [args.controller]}))
    async with ControllerClient(target) as client:
        try:
            return await call(client, address)
        except AsmError as err:
            if err.kind in ("connection_failed", "transport_error") and not err.reason:
                raise NodeUnreachable(f"controller {args.controller}: {err.message}") from None
            raise


def _drain_row(address: str, resp: pb.DrainResponse) -> dict[str, Any]:
    state = node_state_name(resp.state)
    return {"node": address, "state": state, "active_runs": resp.active_runs,
            "deadline_unix_nano": resp.deadline_unix_nano}


async def _drain(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    failed = False
    if args.controller:
        for address in args.node:
            resp = await _controller_call(args, address, lambda c, a: c.drain_node(a, int(args.deadline * 1000)))
            rows.append(_drain_row(address, resp))
    for target in [] if args.controller else remote_nodes(args):
        try:
            handle = await connect(target)
        except NodeNotReady:
            # Already draining: report its state instead of failing.
            client = GrpcNodeClient(target)
            try:
                resp = await client.drain(pb.DrainRequest(deadline_ms=int(args.deadline * 1000)))
            finally:
                await client.close()
        except AsmError as err:
            rows.append({"node": target.address, "error": err.to_dict()})
            failed = True
            continue
        else:
            try:
                resp = await handle.api.drain(pb.DrainRequest(deadline_ms=int(args.deadline * 1000)))
            finally:
                await handle.close()
        rows.append(_drain_row(target.address, resp))
    for row in rows:
        if args.output == "json":
            continue
        if "error" in row:
            sys.stdout.write(f"{row['node']:<22} ERROR  {row['error'].get('reason') or row['error']['kind']}: "
                             f"{row['error']['message']}\n")
        else:
            sys.stdout.write(f"{row['node']:<22} {row['state']} ({row['active_runs']} active run(s); "
                             f"interrupted after {args.deadline:g}s)\n")
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    return EXIT_NODE if failed else EXIT_OK


def cmd_node_drain(args: argparse.Namespace) -> int:
    return asyncio.run(_drain(args))


async def _undrain(args: argparse.Namespace) -> int:
    """Cancel drains: the nodes take runs again; their running runs are not interrupted at the old deadline."""
    rows: list[dict[str, Any]] = []
    if args.controller:
        for address in args.node:
            rows.append(_drain_row(address, await _controller_call(args, address, ControllerClient.undrain_node)))
    else:
        for target in remote_nodes(args):
            # No connect(): its readiness check refuses the very node being undrained.
            client = GrpcNodeClient(target)
            try:
                rows.append(_drain_row(target.address, await client.undrain(pb.UndrainRequest())))
            finally:
                await client.close()
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        for row in rows:
            sys.stdout.write(f"{row['node']:<22} {row['state']} ({row['active_runs']} active run(s))\n")
    return EXIT_OK


def cmd_node_undrain(args: argparse.Namespace) -> int:
    return asyncio.run(_undrain(args))


def add_parser(sub: Subcommands) -> None:
    d = sub.add_parser("drain", help="stop a node taking runs; interrupt its runs after a deadline")
    d.add_argument("--node", action="append", required=True, metavar="HOST:PORT")
    d.add_argument("--controller", metavar="HOST:PORT", help="drain --node through this controller (DrainNode)")
    d.add_argument("--deadline", type=float, default=300.0, metavar="SECONDS",
                   help="in-flight runs are interrupted after this long (default 300)")
    d.add_argument("--output", default="text", choices=["text", "json"])
    client_args(d)
    d.set_defaults(func=cmd_node_drain)
    ud = sub.add_parser("undrain", help="cancel a drain: the node takes runs again, nothing is interrupted")
    ud.add_argument("--node", action="append", required=True, metavar="HOST:PORT")
    ud.add_argument("--controller", metavar="HOST:PORT", help="undrain --node through this controller (UndrainNode)")
    ud.add_argument("--output", default="text", choices=["text", "json"])
    client_args(ud)
    ud.set_defaults(func=cmd_node_undrain)
