"""``asm logs``: a run's logged events (from a controller's registry, or what a node holds).

Without ``--follow``: the events logged up to now (after ``--after-seq``), then exit 0 -- the run
is neither followed nor touched (an ended run's summary comes last, as ``asm replay`` prints it).
With ``--follow``: ``asm attach`` (the same code): the events, then live to the run's end, its
summary and the exit code of its outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import TYPE_CHECKING

from asm_cli.commands._common import (
    EXIT_OK,
    FINISHED,
    Subcommands,
    add_no_color_option,
    ask,
    client_args,
    flush_lines,
    print_event,
    server_target,
)
from asm_cli.commands.attach import _attach, _run_info, _seq_arg
from asm_controller import Event, EventReducer, GrpcNodeClient
from asm_wire import ConfigError, pb, valid_id

if TYPE_CHECKING:
    from asm_controller.extensions.rendering import Rendering


def _text_rendering(args: argparse.Namespace) -> Rendering:
    """The ``--output text`` rendering without the live spinner line: this prints history and exits."""
    from asm_cli import plain  # rich is imported only for a terminal

    return plain.run_rendering(sys.stdout, sys.stderr, no_color=args.no_color, live=False)


async def _logs(args: argparse.Namespace) -> int:
    if args.follow:
        return await _attach(args)
    if not valid_id(args.run_id):
        raise ConfigError(f"invalid run id {args.run_id[:200]!r}: use 1-128 characters of [A-Za-z0-9._:-]")
    target, what = server_target(args)
    info = await _run_info(target, what, args.run_id)
    after, upto = args.after_seq, info.last_seq
    if after > upto:
        raise ConfigError(f"--after-seq {after} is past run {args.run_id}'s events (its last seq is {upto})")
    ended = info.status in FINISHED
    # An ended run is read from just before its end at the latest, so its outcome is known for the summary.
    cursor = min(after, max(0, upto - 2)) if ended else after
    reducer = EventReducer(args.run_id, info.session_id, info.provider or "unknown")
    rendering = _text_rendering(args) if args.output == "text" else None
    if upto > cursor:
        async def read(client: GrpcNodeClient) -> None:
            # A bare AttachRun read up to the last seq logged when asked: leaving it early cancels only
            # this call (nothing is interrupted, unlike a Session's stream).
            async for batch in client.attach_run(pb.AttachRunRequest(run_id=args.run_id, after_seq=cursor)):
                for m in batch.events:
                    ev = Event(m)
                    if not reducer.apply(ev) or ev.seq <= after:
                        continue
                    if rendering is not None:
                        rendering.feed(ev)
                    else:
                        print_event(ev, args.output)
                if reducer.finished or (not ended and reducer.last_seq >= upto):
                    return

        try:
            await ask(target, what, read)
        except BaseException:
            if rendering is not None:
                with contextlib.suppress(Exception):
                    rendering.close()
            raise
    flush_lines()
    if ended and reducer.finished:
        result = reducer.result()
        if rendering is not None:
            with contextlib.suppress(OSError):
                rendering.finish(result)
        else:
            sys.stdout.write(json.dumps(result.to_summary()) + "\n")
    else:
        if rendering is not None:
            rendering.close()
        sys.stdout.flush()
        if not ended:
            where = f"--{'controller' if args.controller else 'node'} {args.controller or args.node}"
            sys.stderr.write(f"asm: run {args.run_id} is still {'running' if upto else 'starting'} (logged up to seq "
                             f"{reducer.last_seq or upto}): 'asm logs {args.run_id} {where} --follow --after-seq "
                             f"{max(after, reducer.last_seq)}' follows it\n")
    sys.stdout.flush()
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    return asyncio.run(_logs(args))


def add_parser(sub: Subcommands) -> None:
    lg = sub.add_parser("logs", help="a run's logged events (--follow: on to its end, as attach)")
    lg.add_argument("run_id", metavar="RUN_ID")
    where = lg.add_mutually_exclusive_group(required=True)
    where.add_argument("--controller", metavar="HOST:PORT", help="the controller whose registry has the run")
    where.add_argument("--node", metavar="HOST:PORT", help="the node the run is on")
    lg.add_argument("--follow", "-f", action="store_true",
                    help="go on with the live events to the run's end (as asm attach; its exit code)")
    lg.add_argument("--after-seq", type=_seq_arg, default=0, metavar="N",
                    help="only the events after seq N (default 0: all held)")
    lg.add_argument("--output", default="text", choices=["text", "jsonl"])
    client_args(lg)
    add_no_color_option(lg)
    lg.set_defaults(func=cmd_logs)
