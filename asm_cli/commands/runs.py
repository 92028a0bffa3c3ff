"""``asm runs``: the runs a node holds, or a controller knows."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from asm_cli.commands._common import (
    EXIT_OK,
    FINISHED,
    Subcommands,
    add_no_color_option,
    ask,
    client_args,
    server_target,
)
from asm_wire import pb, run_status_name


def _limit_arg(text: str) -> int:
    if not text.isdigit() or int(text) > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {2**32 - 1}, got {text[:40]!r}")
    return int(text)


def _run_row(info: pb.RunInfo, node: str) -> dict[str, Any]:
    end = info.finished_unix_nano or (time.time_ns() if info.status not in FINISHED else info.started_unix_nano)
    return {
        "run_id": info.run_id, "session_id": info.session_id, "provider": info.provider,
        "node": info.node or node, "status": run_status_name(info.status),
        "started": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.started_unix_nano / 1e9))
                    if info.started_unix_nano else None),
        "started_unix_nano": info.started_unix_nano, "finished_unix_nano": info.finished_unix_nano,
        "duration_s": round(max(0, end - info.started_unix_nano) / 1e9, 3) if info.started_unix_nano else None,
        "last_seq": info.last_seq, "exit_code": info.exit_code, "owner": info.owner,
    }


async def _runs(args: argparse.Namespace) -> int:
    target, what = server_target(args)
    request = pb.ListRunsRequest(status=args.status or "", limit=args.limit)
    resp: pb.ListRunsResponse = await ask(target, what, lambda c: c.list_runs(request))
    # A node leaves RunInfo.node empty (the runs are its own); a controller names the run's node.
    rows = [_run_row(info, "" if args.controller else args.node) for info in resp.runs]
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        from asm_cli import ui

        ui.print_runs(rows, sys.stdout, no_color=args.no_color)
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    return asyncio.run(_runs(args))


def add_parser(sub: Subcommands) -> None:
    rs = sub.add_parser("runs", help="the runs a node holds, or a controller knows: a table or JSON")
    where = rs.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", metavar="HOST:PORT")
    where.add_argument("--controller", metavar="HOST:PORT")
    rs.add_argument("--status", metavar="S", help="only runs in this status (running, completed, failed, ...)")
    rs.add_argument("--limit", type=_limit_arg, default=0, metavar="N",
                    help="at most the N most recently started runs (default: the server's, 1000)")
    rs.add_argument("--output", default="text", choices=["text", "json"])
    client_args(rs)
    add_no_color_option(rs)
    rs.set_defaults(func=cmd_runs)
