"""``asm nodes``: the fleet as a table (directly, or a controller's view), optionally watched."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable
from typing import Any

from asm_cli.commands._common import EXIT_NODE, EXIT_OK, Subcommands, add_no_color_option, client_args, remote_nodes
from asm_controller import (
    ControllerClient,
    GrpcNodeClient,
    NodeNotReady,
    NodeUnreachable,
    RemoteNode,
    connect,
    preflight,
)
from asm_wire import PROTOCOL_VERSION, AsmError, ConfigError, __version__, node_state_name, pb


def _status_row(st: pb.NodeStatus) -> dict[str, Any]:
    row: dict[str, Any] = {"node": st.address}
    if st.HasField("error") and st.error.kind:
        row["error"] = {"kind": st.error.kind, "domain": st.error.domain, "message": st.error.message,
                        "reason": st.error.reason}
        return row
    row.update(
        node_id=st.node_id, version=st.agent_version, epoch=st.epoch, state=st.state, health=st.health, up=st.up,
        load={"active_runs": st.active_runs, "max_runs": st.max_runs},
        heartbeat_age_s=round(st.heartbeat_age_ms / 1000, 1), labels=dict(st.labels),
        providers=[{"name": p.name, "available": p.available, "version": p.version, "cli_path": p.cli_path}
                   for p in st.providers],
    )
    if st.drain_deadline_unix_nano:
        row["drain_deadline_unix_nano"] = st.drain_deadline_unix_nano
    return row


async def _controller_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The controller's view of its fleet (ListNodes); any failure to get it: the controller is unreachable."""
    (target,) = remote_nodes(argparse.Namespace(**{**vars(args), "node": [args.controller]}))
    async with ControllerClient(target) as client:
        try:
            resp = await client.list_nodes()
        except AsmError as err:
            raise NodeUnreachable(f"controller {args.controller}: {err.message}") from None
    rows = [_status_row(st) for st in resp.nodes]
    replicas = [{"replica_id": r.replica_id, "address": r.address, "leases": r.leases, "self": r.self,
                 "heartbeat_age_s": round(r.heartbeat_age_ms / 1000, 1)} for r in resp.replicas]
    for row in rows:  # the controller's routing strategy, replicas and queue on every row (JSON stays a list)
        row["strategy"] = resp.strategy
        row["replicas"] = replicas
        row["queued_runs"] = resp.queued_runs
    return rows


async def _direct_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for target in remote_nodes(args):
        row: dict[str, Any] = {"node": target.address}
        try:
            handle = await connect(target)
        except NodeNotReady as not_ready:
            # Draining (or stopping): the node answered; its state is shown, it is not an error
            # (a --provider preflight still fails: the node admits no run).
            try:
                row.update(_info_row(await _bare_handshake(target)))
                if args.provider:
                    row["preflight"] = {"ok": False, "error": not_ready.to_dict()}
            except AsmError as err:
                row["error"] = err.to_dict()
            rows.append(row)
            continue
        except AsmError as err:
            row["error"] = err.to_dict()
            rows.append(row)
            continue
        try:
            row.update(_info_row(handle.info))
            if args.provider:
                try:
                    row["preflight"] = {"ok": True, "cwd": await preflight(handle, args.provider, args.cwd or "")}
                except AsmError as err:
                    row["preflight"] = {"ok": False, "error": err.to_dict()}
        finally:
            await handle.close()
        rows.append(row)
    return rows


async def _bare_handshake(target: RemoteNode) -> pb.HandshakeResponse:
    """A handshake without connect()'s readiness check (a draining node refuses runs, not questions)."""
    client = GrpcNodeClient(target)
    try:
        return await client.handshake(
            pb.HandshakeRequest(controller_version=__version__, protocol_version=PROTOCOL_VERSION),
            timeout=target.connect_timeout_s)
    finally:
        await client.close()


def _info_row(info: pb.HandshakeResponse) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        node_id=info.node_id, version=info.agent_version, protocol=info.protocol_version,
        epoch=info.boot_epoch, state=node_state_name(info.state),
        health="healthy", up=True, heartbeat_age_s=0.0, labels=dict(info.labels),
        load={"active_runs": info.load.active_runs, "max_runs": info.limits.max_runs},
        providers=[
            {"name": p.name, "available": p.available, "version": p.version, "cli_path": p.cli_path}
            for p in info.providers
        ],
        host={"hostname": info.host.hostname, "os": info.host.os, "arch": info.host.arch},
        capabilities=list(info.capabilities),
    )
    if info.drain_deadline_unix_nano:
        row["drain_deadline_unix_nano"] = info.drain_deadline_unix_nano
    return row


async def _nodes(args: argparse.Namespace) -> int:
    if bool(args.controller) == bool(args.node):
        raise ConfigError("give either --node HOST:PORT (repeatable) or --controller HOST:PORT")

    def fetch() -> Awaitable[list[dict[str, Any]]]:
        return _controller_rows(args) if args.controller else _direct_rows(args)

    if args.output != "json":
        from asm_cli import ui

        if args.watch:
            rows = await ui.watch_nodes(fetch, args.watch, count=args.watch_count, no_color=args.no_color)
        else:
            rows = await fetch()
            ui.print_nodes(rows, sys.stdout, no_color=args.no_color)
    else:
        rounds = 0
        while True:
            rows = await fetch()
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            sys.stdout.flush()
            rounds += 1
            if not args.watch or (args.watch_count and rounds >= args.watch_count):
                break
            await asyncio.sleep(args.watch)
    failed = any("error" in r or not r.get("preflight", {"ok": True})["ok"] for r in rows)
    return EXIT_NODE if failed else EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_nodes(args))
    except KeyboardInterrupt:
        return EXIT_OK


def add_parser(sub: Subcommands) -> None:
    n = sub.add_parser("nodes", help="the fleet as a table: state, epoch, load, providers, heartbeat age")
    n.add_argument("--node", action="append", metavar="HOST:PORT")
    n.add_argument("--controller", metavar="HOST:PORT", help="ask a controller for its fleet")
    n.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    n.add_argument("--watch-count", type=int, default=0, help=argparse.SUPPRESS)
    n.add_argument("--provider", help="also preflight this provider")
    n.add_argument("--cwd", metavar="DIR", help="cwd to preflight")
    n.add_argument("--output", default="table", choices=["table", "json"])
    client_args(n)
    add_no_color_option(n)
    n.set_defaults(func=cmd_nodes)
