"""``asm run``: one prompt on a node (embedded, remote, or through a controller)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from asm_cli.commands._approvals import APPROVAL_KINDS as _APPROVAL_KINDS
from asm_cli.commands._approvals import APPROVE_MODES, Approvals, approval_mode
from asm_cli.commands._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Subcommands,
    add_no_color_option,
    client_args,
    later_help,
    next_batch,
    pairs,
    print_events,
    remote_nodes,
    report,
    settle_heap,
)
from asm_cli.commands._duration import bounded_duration_ms
from asm_wire import (
    ConfigError,
    PermissionMode,
    SnapshotBackend,
    Strategy,
    choices,
)

if TYPE_CHECKING:  # the node agent, recorder and snapshots are imported only by a run that uses them
    # (and asyncio with the Session only off the fast path: asm_cli.commands._fastrun)
    import asyncio

    from asm_cli.commands._fastrun import Handover
    from asm_controller import RunStream, SnapshotRun, SnapshotStream
    from asm_controller.extensions.persistence import AsyncWriter
    from asm_controller.extensions.rendering import Rendering
    from asm_node import NodeAgent


def _text_rendering(args: argparse.Namespace) -> Rendering:
    """The ``--output text`` rendering: rich on a terminal, today's plain text when piped (asm_cli.ui)."""
    from asm_cli import plain  # rich is imported only for a terminal

    return plain.run_rendering(sys.stdout, sys.stderr, no_color=args.no_color, run_id=args.run_id)


def _print_workspace_changes(snaps: SnapshotRun) -> None:
    diff = snaps.diff
    sys.stderr.write(f"asm: workspace changes: {len(diff.added)} added, {len(diff.modified)} modified, "
                     f"{len(diff.deleted)} deleted (snapshots {snaps.before.id} -> {snaps.after.id})\n")
    for mark, paths in (("A", diff.added), ("M", diff.modified), ("D", diff.deleted)):
        for path in list(paths)[:50]:
            sys.stderr.write(f"  {mark} {path}\n")


def _parse_opts(items: Sequence[str], providers: str = "") -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``--opt KEY=VALUE`` (every provider of the run) and ``--opt PROVIDER:KEY=VALUE`` (that one only):
    the options and the per-provider options. VALUE is JSON, else a bare string. A run of one provider
    gets its own ``PROVIDER:`` options merged into the options (over the common ones)."""
    names = [p.strip() for p in providers.split(",") if p.strip()]
    common: dict[str, Any] = {}
    scoped: dict[str, dict[str, Any]] = {}
    for pair in items:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--opt expects KEY=VALUE or PROVIDER:KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw  # a bare string
        provider, colon, name = key.partition(":")
        if not colon:
            common[key] = value
            continue
        provider, name = provider.strip(), name.strip()
        if provider not in names or not name:
            raise ConfigError(f"--opt {key}=...: PROVIDER:KEY names one of this run's providers "
                              f"({', '.join(names) or 'none'}) and an option; {provider!r} is not one of them"
                              if provider not in names else f"--opt {key}=...: no option name after {provider}:",
                              reason="option_provider_unknown")
        scoped.setdefault(provider, {})[name] = value
    if len(names) == 1 and scoped:
        return {**common, **scoped.pop(names[0])}, {}
    return common, scoped


def _remote_hint(args: argparse.Namespace) -> str:
    """The target flag of an ``asm approve`` for this run (empty for an embedded node)."""
    if args.controller:
        return f"--controller {args.controller}"
    if args.node:
        return f"--node {args.node[0].split(',')[0]}"
    return ""


async def _run(args: argparse.Namespace, handover: Handover | None = None) -> int:
    """The run on the Session path; with ``handover``, a run the fast path started, followed from there."""
    import asyncio

    from asm_controller import Session

    options, provider_options = _parse_opts(args.opt, args.provider)
    # Before anything runs: a file that is not an event store, a device/FIFO/directory,
    # a locked or unwritable store is refused here (ConfigError: exit 2, file untouched).
    recorder: AsyncWriter | None = None
    if args.record:
        from asm_controller.extensions.persistence import open_recorder

        recorder = await open_recorder(args.record)
    unrecorded: dict[str, Any] | None = None
    agent: NodeAgent | None = None
    nodes: list[Any]
    if args.node:
        nodes = list(remote_nodes(args))
    else:
        from asm_controller import EmbeddedNode
        from asm_node import NodeAgent, NodeConfig
        from asm_node.providers import operator_option_names

        # An embedded node runs as the user who typed the command: that user is its operator.
        agent = NodeAgent(NodeConfig(node_id=f"{os.uname().nodename}-embedded",
                                     allow_run_options=sorted(operator_option_names())))
        await agent.start()
        nodes = [EmbeddedNode(agent)]
    cwd = args.cwd_resolved
    session = Session(args.provider, node=nodes, cwd=cwd, permission_mode=args.permission_mode, options=options,
                      provider_options=provider_options,
                      strategy=args.strategy, selector=pairs(args.selector, "--selector"),
                      on_node_lost=args.on_node_lost, approval_timeout_ms=args.approval_timeout_ms)
    run_id: dict[str, Any] = {"run_id": args.run_id} if args.run_id else {}
    if args.priority:
        run_id["priority"] = args.priority
    if args.queue_timeout:
        run_id["queue_timeout_ms"] = int(args.queue_timeout * 1000)
    snapshotted: SnapshotStream | None = None
    if args.snapshot:
        # Pins the run to the first reachable node (the one owning the workspace) and snapshots it, before
        # anything runs; the stream's end takes the after snapshot and the diff (result.metadata["snapshots"]).
        from asm_controller import stream_with_snapshot

        snapshotted = await stream_with_snapshot(session, args.prompt, backend=args.snapshot, **run_id)
    interrupted = handover is not None and handover.interrupted
    if handover is not None:
        rendering = handover.rendering
    else:
        rendering = _text_rendering(args) if args.output == "text" else None
    printed = handover.printed if handover is not None else 0  # shown by the fast path already
    approvals = Approvals(session, args.approval_mode, rendering, _remote_hint(args))
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    stream: RunStream | SnapshotStream
    try:
        if handover is not None:
            stream = session.attach(handover.run_id, nodes[0], args.provider)
        else:
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
        # A batch at a time (as they arrived from the node): the jsonl lines of a batch are made in one
        # loop and held as one string; each event still goes to the rendering, approvals and recorder in turn.
        settle_heap()
        while (batch := await next_batch(stream)) is not None:
            if printed:  # a hand-over from the fast path: what it showed is not shown again
                batch = [ev for ev in batch if ev.pb.seq > printed]
                if not batch:
                    continue
            asks = [i for i, ev in enumerate(batch) if ev.pb.kind in _APPROVAL_KINDS]
            if rendering is None:
                print_events(batch, args.output)
                for i in asks:
                    approvals.on_event(batch[i])
            else:
                start = 0
                for i in asks:  # what Approvals writes to stderr comes right after its event's rendering
                    rendering.feed_all(batch[start:i + 1])
                    approvals.on_event(batch[i])
                    start = i + 1
                rendering.feed_all(batch[start:] if start else batch)
            if recorder is not None:
                for ev in batch:
                    await recorder.put(ev)
        result = stream.result
        assert result is not None
        snaps = snapshotted.snapshots if snapshotted is not None else None
        if snaps is not None and args.output != "jsonl":
            _print_workspace_changes(snaps)
    finally:
        await approvals.close()
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
    if handover is not None:
        result.metadata.update(handover.metadata)
    if unrecorded is not None:
        result.metadata["recording"] = unrecorded
    code = report(result, args.output, rendering)
    if approvals.timed_out:
        # Nobody answered: the run went on without what it asked for. Not a success a script may rely on.
        sys.stderr.write(f"asm: error: {len(approvals.timed_out)} approval(s) were not answered in time and were "
                         f"denied ({', '.join(approvals.timed_out[:5])}): the run did not do what it asked to do\n")
        return EXIT_FAILED if code == EXIT_OK else code
    return EXIT_FAILED if code == EXIT_OK and unrecorded is not None else code  # the run worked, its record did not


def cmd_run(args: argparse.Namespace) -> int:
    args.approval_mode = approval_mode(args)
    args.approval_timeout_ms = (bounded_duration_ms(args.approval_timeout, "--approval-timeout", 1000, 24 * 3600 * 1000)
                                if args.approval_timeout else 0)
    if args.controller:
        if args.node:
            raise ConfigError("give either --node or --controller, not both")
        args.node = [args.controller]  # a controller serves the node API: it is one big node
    # For an embedded node --cwd is a local path; a remote node gets it as given (it must be absolute there).
    if args.node:
        args.cwd_resolved = args.cwd or ""
    else:
        args.cwd_resolved = os.path.abspath(os.path.expanduser(args.cwd)) if args.cwd else os.getcwd()
    handover: Handover | None = None
    from asm_cli.commands import _fastrun

    if _fastrun.applies(args):
        fast = _fastrun.run_fast(args, _parse_opts(args.opt, args.provider)[0], _text_rendering)
        if isinstance(fast, int):
            return fast
        handover = fast  # None: the usual path runs it all (nothing started); else it follows the run
    import asyncio

    return asyncio.run(_run(args, handover))


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
    provider = r.add_argument("--provider", required=True)

    def provider_line() -> str:  # the provider registry (the node's provider modules): made for --help only
        from asm_node.providers import provider_help

        return f"{provider_help()}; A,B: fail over to B when A fails before any work"

    later_help(r, provider, provider_line)
    r.add_argument("--cwd", metavar="DIR", help="working directory on the node")
    r.add_argument("--permission-mode", default="default", choices=choices(PermissionMode))
    r.add_argument("--output", default="text", choices=["text", "jsonl"])
    r.add_argument("--opt", action="append", default=[], metavar="[PROVIDER:]KEY=VALUE",
                   help="provider option (repeatable); PROVIDER:KEY=VALUE for one of --provider's candidates only")
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
    r.add_argument("--approve", choices=APPROVE_MODES,
                   help="answer the run's approvals (--opt approvals=true): allow or deny every one, or prompt "
                        "(ask on the terminal: y, n, or a = allow the rest of the run). Default: prompt on a "
                        "terminal with --output text; otherwise the approval is printed and waits for "
                        "'asm approve RUN_ID APPROVAL_ID allow|deny' from another shell")
    r.add_argument("--approval-timeout", metavar="DURATION",
                   help="deny an approval nobody answered after this long (1s to 24h; default: the node's, 2m "
                        "unless 'asm node serve --approval-timeout' says otherwise); exit 1 when one timed out")
    r.add_argument("--priority", type=_priority, default=0, metavar="N",
                   help="with --controller: the run's place in the fleet queue when every node is full "
                        "(-1000..1000, higher first; FIFO within a priority)")
    r.add_argument("--queue-timeout", type=_queue_timeout, default=0.0, metavar="SECONDS",
                   help="with --controller: give up (error queue_timeout) if still queued after this long")
    r.add_argument("prompt", metavar="PROMPT")
    r.set_defaults(func=cmd_run)
