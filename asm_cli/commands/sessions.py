"""``asm sessions``: the sessions a controller's registry knows, or the resumable sessions a provider
CLI keeps on a node's host.

    asm sessions --controller C [--provider P] [--node ADDR] [--limit N] [--page-token T | --all]
    asm sessions --node N --provider P [--limit N]                     # the CLI's own sessions on that host
    asm sessions --controller C --node ADDR --provider P --provider-sessions   # the same, through the controller
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from asm_cli.commands._common import EXIT_OK, Subcommands, add_no_color_option, ask, client_args, server_target
from asm_cli.commands.runs import _limit_arg
from asm_controller import ControllerClient, GrpcNodeClient, NodeUnreachable
from asm_wire import AsmError, ConfigError, NodeConnectTimeout, pb, run_status_name


def _when(unix_nano: int) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_nano / 1e9)) if unix_nano else None


def _session_row(s: pb.SessionInfo) -> dict[str, Any]:
    return {"session_id": s.session_id, "provider": s.provider, "owner": s.owner, "runs": s.runs,
            "last_run_id": s.last_run_id, "last_status": run_status_name(s.last_status),
            "first": _when(s.first_unix_nano), "last": _when(s.last_unix_nano),
            "first_unix_nano": s.first_unix_nano, "last_unix_nano": s.last_unix_nano,
            "provider_session_id": s.provider_session_id, "node": s.node}


def _provider_row(s: pb.ProviderSession) -> dict[str, Any]:
    return {"provider": s.provider, "id": s.id, "label": s.label, "cwd": s.cwd,
            "updated": _when(s.updated_unix_nano), "updated_unix_nano": s.updated_unix_nano,
            "source_kind": s.source_kind}


def _print_table(head: Sequence[str], cells: list[tuple[str, ...]], flexible: dict[str, tuple[int, int]],
                 no_color: bool) -> None:
    """A table on a terminal (one line per row, cut to fit), else aligned plain text for scripts."""
    from asm_cli import ui  # rich is imported only for text output

    if ui.use_rich(sys.stdout, no_color=no_color):
        from rich.console import Console

        Console(file=sys.stdout).print(ui.FitTable(head, cells, flexible))
        return
    lines = [tuple(head), *cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    sys.stdout.write("".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n"
                             for line in lines))


async def _registry_sessions(args: argparse.Namespace) -> int:
    target, what = server_target(args)
    rows: list[dict[str, Any]] = []
    token = args.page_token or ""
    client = ControllerClient(target)
    try:
        while True:
            try:
                resp = await client.list_sessions(provider=args.provider or "", node=args.node or "",
                                                  limit=args.limit, page_token=token)
            except AsmError as err:  # a transport failure is the controller's (exit 3), as for `ask`
                if err.kind == "timeout" and not err.reason:
                    raise NodeConnectTimeout(f"{what} did not answer within {target.rpc_timeout_s:g}s") from None
                if err.kind in ("connection_failed", "transport_error") and not err.reason:
                    raise NodeUnreachable(f"{what} is unreachable: {err.message}") from None
                raise
            rows.extend(_session_row(s) for s in resp.sessions)
            token = resp.next_page_token
            if not (args.all and token):
                break
    finally:
        await client.close()
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        cells = [tuple(str(c) for c in (r["session_id"], r["provider"], r["runs"], r["last_status"], r["last"] or "-",
                                         r["node"] or "-", r["provider_session_id"] or "-")) for r in rows]
        _print_table(("SESSION", "PROVIDER", "RUNS", "LAST STATUS", "LAST RUN", "NODE", "PROVIDER SESSION"), cells,
                     {"SESSION": (3, 8), "NODE": (2, 6), "PROVIDER SESSION": (2, 8)}, args.no_color)
    if token:
        sys.stdout.flush()
        sys.stderr.write(f"asm: more sessions: --page-token {token}\n")
    return EXIT_OK


async def _provider_sessions(args: argparse.Namespace) -> int:
    if not args.provider:
        raise ConfigError("the sessions a CLI keeps on a host are per provider: give --provider P")
    via_controller = bool(args.controller)
    if via_controller and not args.node:
        raise ConfigError("--provider-sessions through a controller needs --node ADDR (one of its nodes)")
    target, what = server_target(argparse.Namespace(**{**vars(args), "node": None if via_controller else args.node}))
    request = pb.ListProviderSessionsRequest(provider=args.provider, node=args.node if via_controller else "",
                                             limit=args.limit)

    def call(c: GrpcNodeClient) -> Any:
        return c.list_provider_sessions(request)

    resp: pb.ListProviderSessionsResponse = await ask(target, what, call)
    rows = [_provider_row(s) for s in resp.sessions]
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        cells = [tuple(str(c) for c in (r["id"], r["updated"] or "-", r["cwd"] or "-", r["label"] or "-"))
                 for r in rows]
        _print_table(("ID", "UPDATED", "CWD", "LABEL"), cells, {"CWD": (2, 8), "LABEL": (3, 8)}, args.no_color)
    return EXIT_OK


async def _sessions(args: argparse.Namespace) -> int:
    if not (args.controller or args.node):
        raise ConfigError("asm sessions needs --controller C (its registry) or --node N (a CLI's sessions there)")
    if args.provider_sessions or not args.controller:
        if args.page_token or args.all:
            raise ConfigError("--page-token and --all page a controller's registry sessions; a CLI's sessions "
                              "come in one answer (--limit, at most 1000)")
        return await _provider_sessions(args)
    return await _registry_sessions(args)


def cmd_sessions(args: argparse.Namespace) -> int:
    return asyncio.run(_sessions(args))


def add_parser(sub: Subcommands) -> None:
    ss = sub.add_parser("sessions", help="a controller's sessions (runs grouped), or the resumable sessions "
                        "a provider's CLI keeps on a node")
    ss.add_argument("--controller", metavar="HOST:PORT", help="ask this controller (its registry)")
    ss.add_argument("--node", metavar="HOST:PORT",
                    help="with --controller: only sessions with a run on this node (or, with --provider-sessions, "
                    "the node to ask); alone: the node whose CLI sessions to list")
    ss.add_argument("--provider", metavar="P", help="only this provider's sessions (required for a CLI's own)")
    ss.add_argument("--provider-sessions", action="store_true",
                    help="the sessions the provider's CLI keeps on the node's host (resumable with "
                    "--opt resume=ID), asked through the controller")
    ss.add_argument("--limit", "--page-size", dest="limit", type=_limit_arg, default=0, metavar="N",
                    help="at most N sessions (default 100)")
    ss.add_argument("--page-token", metavar="T", help="the next page (printed on stderr by the previous one)")
    ss.add_argument("--all", action="store_true", help="every page, not just the first")
    ss.add_argument("--output", default="text", choices=["text", "json"])
    client_args(ss)
    add_no_color_option(ss)
    ss.set_defaults(func=cmd_sessions)

