"""``asm attach``: follow an existing run to its end; never starts or interrupts one. It answers the run's
approvals as ``asm run`` does (``--approve``, the terminal's question, or the ``asm approve`` hint)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import TYPE_CHECKING

from asm_cli.commands._approvals import APPROVAL_KINDS, APPROVE_MODES, Approvals, approval_mode
from asm_cli.commands._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    FINISHED,
    Subcommands,
    add_no_color_option,
    ask,
    client_args,
    flush_lines,
    next_batch,
    print_events,
    report,
    server_target,
    settle_heap,
)
from asm_controller import RemoteNode, Session
from asm_wire import AsmError, ConfigError, RunNotFound, pb, valid_id

if TYPE_CHECKING:
    from asm_controller import Event
    from asm_controller.extensions.rendering import Rendering

_MAX_SEQ = 2**63 - 1
_REQUESTED = pb.EVENT_KIND_APPROVAL_REQUESTED


def _text_rendering(args: argparse.Namespace) -> Rendering:
    """The ``--output text`` rendering: rich on a terminal, today's plain text when piped (asm_cli.ui)."""
    from asm_cli import plain  # rich is imported only for a terminal

    return plain.run_rendering(sys.stdout, sys.stderr, no_color=args.no_color, run_id=args.run_id)


def _seq_arg(text: str) -> int:
    """--after-seq: a sequence number, 0 to 2**63-1 (what the wire's uint64 cursor accepts everywhere)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a sequence number (an integer >= 0), got {text[:40]!r}") from None
    if not 0 <= value <= _MAX_SEQ:
        raise argparse.ArgumentTypeError(f"must be from 0 to {_MAX_SEQ}, got {text[:40]}")
    return value


async def _run_info(target: RemoteNode, what: str, run_id: str) -> pb.RunInfo:
    """GetRun: the run's provider, session and last seq; an id the server does not know is RunNotFound."""
    try:
        info: pb.RunInfo = await ask(target, what, lambda c: c.get_run(pb.GetRunRequest(run_id=run_id)))
    except AsmError as err:
        # Nodes and controllers answer an id they do not hold with kind "unknown" (gRPC NOT_FOUND).
        if err.kind in ("unknown", "not_found") and err.domain == "runtime":
            raise RunNotFound(f"run {run_id} is not known to {what} (never started there, or forgotten since: "
                              "see 'asm runs')") from None
        raise
    return info


async def _attach(args: argparse.Namespace) -> int:
    """Follow an existing run to its end: what the server holds after --after-seq, then live. Never starts
    or interrupts anything: Ctrl-C detaches (the run goes on)."""
    if not valid_id(args.run_id):
        raise ConfigError(f"invalid run id {args.run_id[:200]!r}: use 1-128 characters of [A-Za-z0-9._:-]")
    target, what = server_target(args)
    info = await _run_info(target, what, args.run_id)
    after = args.after_seq
    if after > info.last_seq:
        raise ConfigError(f"--after-seq {after} is past run {args.run_id}'s events (its last seq is {info.last_seq})")
    # A finished run has nothing past its last seq to send: follow it from just before its end (its
    # error and run_completed), so the summary still has its outcome; events up to --after-seq are not printed.
    cursor = min(after, max(0, info.last_seq - 2)) if info.status in FINISHED else after
    session = Session(info.provider or "shell", node=target,
                      session_id=info.session_id if valid_id(info.session_id) else None)
    stream = session.attach(args.run_id, target, provider=info.provider or None, after_seq=cursor)
    rendering = _text_rendering(args) if args.output == "text" else None
    hint = f"--controller {args.controller}" if args.controller else f"--node {args.node}"
    approvals = Approvals(session, approval_mode(args), rendering, hint, command="asm attach")
    last_seq = after
    # The run's history (up to its last seq when attached) holds approvals answered long ago: a request
    # there is acted on only if it is still pending once the history has been read, never asked twice.
    history_end = info.last_seq
    held: dict[str, Event] = {}

    def on_approval(ev: Event) -> None:
        if ev.pb.seq > history_end:
            approvals.on_event(ev)
        elif ev.pb.kind == _REQUESTED:
            held[ev.pb.approval_requested.approval_id] = ev
        else:
            held.pop(ev.pb.approval_resolved.approval_id, None)
            approvals.on_event(ev)  # (a past timeout still counts: the run did not get what it asked for)

    async def follow() -> None:
        nonlocal last_seq
        settle_heap()
        while (batch := await next_batch(stream)) is not None:  # a batch at a time, as they arrived
            asks = [ev for ev in batch if ev.pb.kind in APPROVAL_KINDS]
            # Seqs rise within a stream: past the history's start, the whole batch is shown (no second scan).
            shown = batch if batch and batch[0].pb.seq > after else [ev for ev in batch if ev.pb.seq > after]
            if shown:
                last_seq = shown[-1].pb.seq
                if rendering is not None:
                    rendering.feed_all(shown)
                else:
                    print_events(shown, args.output)
            for ev in asks:
                on_approval(ev)
            if held and batch[-1].pb.seq >= history_end:
                for ev in held.values():  # still pending now that the history is read
                    approvals.on_event(ev)
                held.clear()

    following = asyncio.ensure_future(follow())
    detached = False

    def on_sigint() -> None:
        nonlocal detached
        detached = True
        following.cancel()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        await following
    except asyncio.CancelledError:
        if not detached:
            raise
    finally:
        await approvals.close()
        loop.remove_signal_handler(signal.SIGINT)
        if rendering is not None and (detached or sys.exc_info()[0] is not None):
            with contextlib.suppress(Exception):
                rendering.close()
    if detached:
        # Detach, never interrupt: Session.stop() (and RunStream.aclose()) would interrupt the run, so
        # neither is called. The run's follower task is left to asyncio.run's teardown, which cancels
        # it here, in this process only: its AttachRun stream is cancelled, no InterruptRun is sent.
        flush_lines()  # every event printed (up to --after-seq below) is out before the notice
        sys.stdout.flush()
        sys.stderr.write(f"asm: detached from run {args.run_id}; it goes on on {what} "
                         f"('asm attach {args.run_id} --{'controller' if args.controller else 'node'} "
                         f"{args.controller or args.node} --after-seq {last_seq}' follows it again)\n")
        return EXIT_INTERRUPTED
    await session.stop()  # the run has ended: nothing is left to interrupt; this closes the connection
    result = stream.result
    assert result is not None
    code = report(result, args.output, rendering)
    if approvals.timed_out:  # as asm run: the run went on without what it asked for
        sys.stderr.write(f"asm: error: {len(approvals.timed_out)} approval(s) were not answered in time and were "
                         f"denied ({', '.join(approvals.timed_out[:5])}): the run did not do what it asked to do\n")
        return EXIT_FAILED if code == EXIT_OK else code
    return code


def cmd_attach(args: argparse.Namespace) -> int:
    approval_mode(args)  # "--approve prompt" without a terminal: a usage error before anything connects
    return asyncio.run(_attach(args))


def add_parser(sub: Subcommands) -> None:
    at = sub.add_parser("attach", help="follow an existing run to its end (replay, then live); never starts one")
    at.add_argument("run_id", metavar="RUN_ID")
    where = at.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", metavar="HOST:PORT", help="the node the run is on")
    where.add_argument("--controller", metavar="HOST:PORT", help="the controller the run was started through")
    at.add_argument("--output", default="text", choices=["text", "jsonl"])
    at.add_argument("--after-seq", type=_seq_arg, default=0, metavar="N",
                    help="only the events after seq N (e.g. the last one you saw; default 0: all held)")
    at.add_argument("--approve", choices=APPROVE_MODES,
                    help="answer the run's approval requests: allow or deny each, or prompt on the terminal "
                         "(default: ask on a terminal with --output text, else print how to answer with 'asm approve')")
    client_args(at)
    add_no_color_option(at)
    at.set_defaults(func=cmd_attach)
