"""``asm replay``: a recorded run's events and its Result, rebuilt from an event store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

from asm_cli.commands._common import EXIT_FAILED, EXIT_OK, Subcommands, add_no_color_option, flush_lines, print_event
from asm_controller.extensions.persistence import replay_file

if TYPE_CHECKING:
    from asm_controller.extensions.rendering import Rendering


def _text_rendering(args: argparse.Namespace) -> Rendering:
    """The ``--output text`` rendering: rich on a terminal, today's plain text when piped (asm_cli.ui)."""
    from asm_cli import plain  # rich is imported only for a terminal

    return plain.run_rendering(sys.stdout, sys.stderr, no_color=args.no_color, live=False)


def _damage_line(d: dict[str, Any]) -> str:
    kind = d.get("kind")
    if kind == "seq_gap":
        return f"events {d['from']}..{d['to']} are missing ({d['missing']})"
    if kind == "missing_run_completed":
        return f"the run has no run_completed event (last seq {d['last_seq']}): it is incomplete"
    if kind == "torn_tail":
        return f"{d['lines']} damaged line(s) ({d['bytes']} bytes) at the end, from byte {d['offset']}"
    if kind == "bad_lines":
        return f"{d['lines']} bad line(s) ({d['bytes']} bytes) skipped, first line {d['first_line']}: {d['reason']}"
    if kind == "newer_format":
        return f"{d['lines']} line(s) of a newer format version cannot be read"
    return json.dumps(d)


async def _replay(args: argparse.Namespace) -> int:
    damaged = False
    for events, result in await replay_file(args.path, session_id=args.session, run_id=args.run):
        damage = result.metadata.get("damage") or []
        if damage:
            damaged = True
            label = "warning" if args.allow_damaged else "error"
            for d in damage:
                sys.stderr.write(f"asm: {label}: {args.path}: run {result.run_id}: {_damage_line(d)}\n")
        if args.output == "jsonl":
            for ev in events:
                print_event(ev, "jsonl")
            flush_lines()
            sys.stdout.write(json.dumps(result.to_summary()) + "\n")
        else:
            rendering = _text_rendering(args)
            for ev in events:
                rendering.feed(ev)
            with contextlib.suppress(OSError):
                rendering.finish(result)
    sys.stdout.flush()
    if damaged and not args.allow_damaged:
        sys.stderr.write("asm: error: the event store is damaged: the replay is incomplete "
                         "(--allow-damaged accepts it)\n")
        return EXIT_FAILED
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    return asyncio.run(_replay(args))


def add_parser(sub: Subcommands) -> None:
    rp = sub.add_parser("replay", help="print a recorded run's events and its Result, rebuilt from an event store")
    rp.add_argument("path", metavar="PATH", help="an event store written by 'asm run --record'")
    rp.add_argument("--session", metavar="ID", help="this session's runs (every one unless --run is given)")
    rp.add_argument("--run", metavar="ID", help="this run (default: the last run recorded in the file)")
    rp.add_argument("--output", default="text", choices=["text", "jsonl"])
    rp.add_argument("--allow-damaged", action="store_true",
                    help="exit 0 for a damaged store (the damage is still reported in the summary and on stderr)")
    add_no_color_option(rp)
    rp.set_defaults(func=cmd_replay)
