"""``asm approve``: answer a run's pending approval from another shell (the run's ``asm run`` waits for it)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from asm_cli.commands._common import EXIT_OK, Subcommands, ask, client_args, server_target
from asm_wire import ApprovalNotFound, AsmError, ConfigError, Decision, RunNotFound, choices, pb, valid_id

#: A reason is shown in the run's events and to the CLI (Claude: the denial's message): one short line.
MAX_REASON_CHARS = 1000


async def _approve(args: argparse.Namespace) -> int:
    for what, value in (("run id", args.run_id), ("approval id", args.approval_id)):
        if not valid_id(value):
            raise ConfigError(f"invalid {what} {value[:200]!r}: use 1-128 characters of [A-Za-z0-9._:-]")
    reason = args.reason or f"asm approve ({args.decision})"
    if len(reason) > MAX_REASON_CHARS or "\0" in reason:
        raise ConfigError(f"--reason must be at most {MAX_REASON_CHARS} characters, without NUL")
    target, what = server_target(args)
    request = pb.ResolveApprovalRequest(run_id=args.run_id, approval_id=args.approval_id, decision=args.decision,
                                        reason=reason)
    try:
        await ask(target, what, lambda c: c.resolve_approval(request))
    except AsmError as err:
        # Nodes and controllers answer an unknown run id with kind not_found (older ones: unknown).
        if isinstance(err, ApprovalNotFound) or err.reason == "approval_not_found":
            raise ApprovalNotFound(
                f"approval {args.approval_id} of run {args.run_id} is not pending on {what}: it was never requested, "
                "was already answered, timed out (then denied), or its run ended") from None
        if isinstance(err, RunNotFound) or (err.kind in ("not_found", "unknown") and err.domain == "runtime"):
            raise RunNotFound(f"run {args.run_id} is not known to {what} (see 'asm runs')") from None
        raise
    sys.stdout.write(f"{'allowed' if args.decision == Decision.ALLOW else 'denied'}: approval {args.approval_id} "
                     f"of run {args.run_id}\n")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    if bool(args.node) == bool(args.controller):
        raise ConfigError("give the run's node (--node HOST:PORT) or its controller (--controller HOST:PORT)")
    return asyncio.run(_approve(args))


def add_parser(sub: Subcommands) -> None:
    a = sub.add_parser("approve", help="answer a run's pending approval (allow or deny)",
                       description="Answer the approval a run waits for (its approval_requested event names the "
                                   "approval id; 'asm run' prints the command to type). Exit 5 when the run or the "
                                   "approval is not pending there.")
    a.add_argument("run_id", metavar="RUN_ID")
    a.add_argument("approval_id", metavar="APPROVAL_ID")
    a.add_argument("decision", choices=choices(Decision), metavar="allow|deny")
    a.add_argument("--reason", metavar="TEXT", help="why (shown in the run's approval_resolved event)")
    a.add_argument("--node", metavar="HOST:PORT", help="the node the run is on")
    a.add_argument("--controller", metavar="HOST:PORT", help="the controller that runs it")
    client_args(a)
    a.set_defaults(func=cmd_approve)
