"""``asm runs``: the runs a node holds, or a controller knows (a controller: filtered and paged history)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from datetime import UTC, datetime
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
from asm_controller import GrpcNodeClient
from asm_wire import ConfigError, pb, run_status_name

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _limit_arg(text: str) -> int:
    if not text.isdigit() or int(text) > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {2**32 - 1}, got {text[:40]!r}")
    return int(text)


def time_arg(text: str) -> int:
    """--since/--until: an ISO 8601 time (without an offset: UTC) or a span back from now (``90s``, ``30m``,
    ``2h``, ``3d``, ``1w``) -> unix nanoseconds."""
    rel = _RELATIVE.fullmatch(text.strip())
    if rel:
        return max(0, time.time_ns() - int(float(rel.group(1)) * _UNIT_S[rel.group(2)] * 1e9))
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO time (2026-12-01T14:00:00Z) or a span like 2h or 3d, "
                                         f"got {text[:40]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when.timestamp() < 0:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is before 1970")
    return int(when.timestamp() * 1e9)


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
        "priority": info.priority, "queue_position": info.queue_position, "replica": info.replica,
    }


async def _runs(args: argparse.Namespace) -> int:
    target, what = server_target(args)
    history = pb.ListRunsRequest(session_id=args.session or "", provider=args.provider or "",
                                 node=args.node_address or "", since_unix_nano=args.since or 0,
                                 until_unix_nano=args.until or 0)
    if not args.controller and (history.ByteSize() or args.page_token):
        raise ConfigError("--session, --provider, --node-address, --since, --until and --page-token ask a "
                          "controller's run history: use --controller (a node lists only the runs it holds)")
    infos: list[pb.RunInfo] = []
    token = args.page_token or ""
    while True:
        request = pb.ListRunsRequest(status=args.status or "", limit=args.limit, page_token=token)
        request.MergeFrom(history)

        def call(c: GrpcNodeClient, r: pb.ListRunsRequest = request) -> Any:
            return c.list_runs(r)

        resp: pb.ListRunsResponse = await ask(target, what, call)
        infos.extend(resp.runs)
        token = resp.next_page_token
        if not (args.all and token):
            break
    # A node leaves RunInfo.node empty (the runs are its own); a controller names the run's node.
    rows = [_run_row(info, "" if args.controller else args.node) for info in infos]
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        from asm_cli import ui

        ui.print_runs(rows, sys.stdout, no_color=args.no_color)
    if token:  # more pages: where to go on (stderr, so stdout stays the table / the JSON array)
        sys.stdout.flush()
        sys.stderr.write(f"asm: more runs: --page-token {token}\n")
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    return asyncio.run(_runs(args))


def add_parser(sub: Subcommands) -> None:
    rs = sub.add_parser("runs", help="the runs a node holds, or a controller knows: a table or JSON")
    where = rs.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", metavar="HOST:PORT")
    where.add_argument("--controller", metavar="HOST:PORT")
    rs.add_argument("--status", metavar="S", help="only runs in this status (running, completed, failed, ...)")
    rs.add_argument("--limit", "--page-size", dest="limit", type=_limit_arg, default=0, metavar="N",
                    help="at most the N most recently started runs: a page (default: the server's, 1000)")
    hist = rs.add_argument_group("history (--controller: its run registry)")
    hist.add_argument("--session", metavar="ID", help="only this session's runs")
    hist.add_argument("--provider", metavar="P", help="only this provider's runs")
    hist.add_argument("--node-address", metavar="HOST:PORT", help="only the runs placed on this node of the fleet")
    hist.add_argument("--since", type=time_arg, metavar="TIME",
                      help="started at or after TIME: ISO 8601 (UTC without an offset) or a span back from now "
                      "(30m, 2h, 3d, 1w)")
    hist.add_argument("--until", type=time_arg, metavar="TIME", help="started before TIME (same forms)")
    hist.add_argument("--page-token", metavar="T",
                      help="the next page: the token the previous page printed (on stderr: 'asm: more runs: ...')")
    hist.add_argument("--all", action="store_true", help="every page, not just the first")
    rs.add_argument("--output", default="text", choices=["text", "json"])
    client_args(rs)
    add_no_color_option(rs)
    rs.set_defaults(func=cmd_runs)
