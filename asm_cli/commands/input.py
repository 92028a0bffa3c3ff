"""``asm input``: steer a running run from another shell -- a user message into its CLI.

    asm input RUN_ID "text" (--controller C | --node N)
    asm input RUN_ID - (--controller C | --node N)        # the text from stdin

The text reaches a Claude Code run as a user message (its stream-json input) while it works; it is
answered in the same run (a message that arrives mid-answer gets a turn of its own, one that
arrives while tools run joins the turn), and the run ends after the last answer. Other providers
refuse (config_invalid, reason ``input_not_supported``, exit 2); an ended run is ``run_not_running``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from asm_cli.commands._common import EXIT_OK, Subcommands, ask, client_args, server_target
from asm_controller import GrpcNodeClient
from asm_wire import ConfigError, pb, valid_id

#: The most text one input carries (a message, not a file upload).
MAX_INPUT_BYTES = 1 << 20


async def _input(args: argparse.Namespace) -> int:
    if not valid_id(args.run_id):
        raise ConfigError(f"invalid run id {args.run_id[:200]!r}: use 1-128 characters of [A-Za-z0-9._:-]")
    text = sys.stdin.read(MAX_INPUT_BYTES + 1) if args.text == "-" else args.text
    data = text.encode("utf-8", "surrogateescape")
    if not text.strip():
        raise ConfigError("asm input needs a non-empty text (or - to read it from stdin)")
    if len(data) > MAX_INPUT_BYTES:
        raise ConfigError(f"the input is over {MAX_INPUT_BYTES} bytes: send a message, not a file")
    target, what = server_target(args)
    request = pb.SendInputRequest(run_id=args.run_id, data=data)

    def call(c: GrpcNodeClient) -> Any:
        return c.send_input(request)

    await ask(target, what, call)
    if not args.quiet:
        sys.stderr.write(f"asm: input sent to run {args.run_id}\n")
    return EXIT_OK


def cmd_input(args: argparse.Namespace) -> int:
    return asyncio.run(_input(args))


def add_parser(sub: Subcommands) -> None:
    ip = sub.add_parser("input", help="steer a running run: send a user message to its CLI (Claude)")
    ip.add_argument("run_id", metavar="RUN_ID")
    ip.add_argument("text", metavar="TEXT", help='the message ("-": read it from stdin)')
    where = ip.add_mutually_exclusive_group(required=True)
    where.add_argument("--controller", metavar="HOST:PORT", help="the controller the run was started through")
    where.add_argument("--node", metavar="HOST:PORT", help="the node the run is on")
    ip.add_argument("--quiet", "-q", action="store_true", help="print nothing when the input was sent")
    client_args(ip)
    ip.set_defaults(func=cmd_input)
