"""``asm run``: one prompt on a node (embedded, remote, or through a controller)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from asm_cli.commands._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Subcommands,
    add_no_color_option,
    client_args,
    pairs,
    print_event,
    remote_nodes,
    report,
)
from asm_controller import EmbeddedNode, Session, SnapshotRun, SnapshotStream, stream_with_snapshot
from asm_controller.extensions.persistence import open_recorder
from asm_controller.extensions.rendering import Rendering
from asm_node import NodeAgent, NodeConfig
from asm_node.providers import operator_option_names
from asm_wire import ConfigError, PermissionMode, SnapshotBackend, Strategy, choices


def _text_rendering(args: argparse.Namespace) -> Rendering:
    """The ``--output text`` rendering: rich on a terminal, today's plain text when piped (asm_cli.ui)."""
    from asm_cli import ui  # rich is imported only for text output

    return ui.run_rendering(sys.stdout, sys.stderr, no_color=args.no_color, run_id=args.run_id)


def _print_workspace_changes(snaps: SnapshotRun) -> None:
    diff = snaps.diff
    sys.stderr.write(f"asm: workspace changes: {len(diff.added)} added, {len(diff.modified)} modified, "
                     f"{len(diff.deleted)} deleted (snapshots {snaps.before.id} -> {snaps.after.id})\n")
    for mark, paths in (("A", diff.added), ("M", diff.modified), ("D", diff.deleted)):
        for path in list(paths)[:50]:
            sys.stderr.write(f"  {mark} {path}\n")


def _parse_opts(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in items:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt expects KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw  # a bare string
        out[key.strip()] = value
    return out


async def _run(args: argparse.Namespace) -> int:
    options = _parse_opts(args.opt)
    # Before anything runs: a file that is not an event store, a device/FIFO/directory,
    # a locked or unwritable store is refused here (ConfigError: exit 2, file untouched).
    recorder = await open_recorder(args.record) if args.record else None
    unrecorded: dict[str, Any] | None = None
    agent: NodeAgent | None = None
    nodes: list[Any]
    if args.node:
        nodes = list(remote_nodes(args))
    else:
        # An embedded node runs as the user who typed the command: that user is its operator.
        agent = NodeAgent(NodeConfig(node_id=f"{os.uname().nodename}-embedded",
                                     allow_run_options=sorted(operator_option_names())))
        await agent.start()
        nodes = [EmbeddedNode(agent)]
    cwd = args.cwd_resolved
    session = Session(args.provider, node=nodes, cwd=cwd, permission_mode=args.permission_mode, options=options,
                      strategy=args.strategy, selector=pairs(args.selector, "--selector"),
                      on_node_lost=args.on_node_lost)
    run_id: dict[str, Any] = {"run_id": args.run_id} if args.run_id else {}
    if args.priority:
        run_id["priority"] = args.priority
    if args.queue_timeout:
        run_id["queue_timeout_ms"] = int(args.queue_timeout * 1000)
    snapshotted: SnapshotStream | None = None
    if args.snapshot:
        # Pins the run to the first reachable node (the one owning the workspace) and snapshots it, before
        # anything runs; the stream's end takes the after snapshot and the diff (result.metadata["snapshots"]).
        snapshotted = await stream_with_snapshot(session, args.prompt, backend=args.snapshot, **run_id)
    interrupted = False
    rendering = _text_rendering(args) if args.output == "text" else None
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    try:
        stream = snapshotted if snapshotted is not None else session.stream(args.prompt, **run_id)

        def on_sigint() -> None:
            nonlocal interrupted
            if interrupted:  # a second Ctrl-C: stop waiting
                sys.stderr.write("asm: interrupted again, exiting without waiting for the node\n")
                os._exit(EXIT_INTERRUPTED)
            interrupted = True
            sys.stderr.write("asm: interrupting the run (Ctrl-C again to exit now)\n")
            pending.add(loop.create_task(session.interrupt(stream.run_id)))

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        async for ev in stream:
            if rendering is not None:
                rendering.feed(ev)
            else:
                print_event(ev, args.output)
            if recorder is not None:
                await recorder.put(ev)
        result = stream.result
        assert result is not None
        snaps = snapshotted.snapshots if snapshotted is not None else None
        if snaps is not None and args.output != "jsonl":
            _print_workspace_changes(snaps)
    finally:
        if rendering is not None and sys.exc_info()[0] is not None:
            with contextlib.suppress(Exception):
                rendering.close()
        loop.remove_signal_handler(signal.SIGINT)
        await session.stop()
        if agent is not None:
            await agent.stop()
        if recorder is not None:
            await recorder.close()  # drains, fsyncs, closes; never raises for a write error
            lost = recorder.failed + recorder.dropped
            if lost or recorder.sync_error is not None:
                rec_err = recorder.errors[-1] if recorder.errors else recorder.sync_error
                unrecorded = {"path": args.record, "unrecorded_events": lost, "recorded_events": recorder.written,
                              "durable": recorder.sync_error is None, "error": rec_err.to_dict() if rec_err else None}
                what = f"{lost} event(s) not recorded" if lost else "the recording is not durable (fsync failed)"
                sys.stderr.write(f"asm: error: {what} to {args.record}{f': {rec_err.message}' if rec_err else ''}\n")
    if unrecorded is not None:
        result.metadata["recording"] = unrecorded
    code = report(result, args.output, rendering)
    return EXIT_FAILED if code == EXIT_OK and unrecorded is not None else code  # the run worked, its record did not


def cmd_run(args: argparse.Namespace) -> int:
    if args.controller:
        if args.node:
            raise ConfigError("give either --node or --controller, not both")
        args.node = [args.controller]  # a controller serves the node API: it is one big node
    # For an embedded node --cwd is a local path; a remote node gets it as given (it must be absolute there).
    if args.node:
        args.cwd_resolved = args.cwd or ""
    else:
        args.cwd_resolved = os.path.abspath(os.path.expanduser(args.cwd)) if args.cwd else os.getcwd()
    return asyncio.run(_run(args))


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
    if not -1000 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be from -1000 to 1000, got {value}")
    return value


def _queue_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text[:40]!r}") from None
    if not 0 < value <= (2**32 - 1) / 1000:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds up to {(2**32 - 1) // 1000}, got {text[:40]}")
    return value


def add_parser(sub: Subcommands) -> None:
    r = sub.add_parser("run", help="run a prompt on a node (an embedded one when no --node is given)")
    r.add_argument("--node", action="append", metavar="HOST:PORT", help="node to run on; repeat to fail over")
    r.add_argument("--controller", metavar="HOST:PORT", help="run through a controller service (it picks the node)")
    r.add_argument("--provider", required=True,
                   help="claude, codex, gemini, amp or shell; A,B: fail over to B when A fails before any work")
    r.add_argument("--cwd", metavar="DIR", help="working directory on the node")
    r.add_argument("--permission-mode", default="default", choices=choices(PermissionMode))
    r.add_argument("--output", default="text", choices=["text", "jsonl"])
    r.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="provider option (repeatable)")
    r.add_argument("--run-id", help="run id (default: a new ULID); an existing id on the node attaches")
    r.add_argument("--record", metavar="PATH",
                   help="append the run's events to this event store (JSON lines; see 'asm replay'); "
                        "a file that is not one is refused; exit 1 if some events could not be recorded")
    r.add_argument("--snapshot", nargs="?", const="auto", choices=sorted(choices(SnapshotBackend), key=lambda b: b != "auto"),
                   help="snapshot the workspace before and after (git when it is a repository); diff in the result")
    r.add_argument("--strategy", default="priority", choices=choices(Strategy),
                   help="how to pick among several --node (HOST:PORT[,weight=N][,priority=N])")
    r.add_argument("--selector", action="append", metavar="KEY=VALUE", help="only nodes with this label")
    r.add_argument("--on-node-lost", default="fail", choices=["fail", "resume"],
                   help="resume: continue the provider session on another node (shared workspace only)")
    r.add_argument("--node-lost-timeout", type=float, default=8.0, metavar="SECONDS",
                   help="a node silent this long is lost and its run ends with node_lost (default 8)")
    client_args(r)
    add_no_color_option(r)
    r.add_argument("--priority", type=_priority, default=0, metavar="N",
                   help="with --controller: the run's place in the fleet queue when every node is full "
                        "(-1000..1000, higher first; FIFO within a priority)")
    r.add_argument("--queue-timeout", type=_queue_timeout, default=0.0, metavar="SECONDS",
                   help="with --controller: give up (error queue_timeout) if still queued after this long")
    r.add_argument("prompt", metavar="PROMPT")
    r.set_defaults(func=cmd_run)
