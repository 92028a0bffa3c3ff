"""What several commands share: exit codes, the parser class, connection flags, tokens,
printing events and a run's end (``report``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from asm_cli.commands._base import EXIT_FAILED as EXIT_FAILED
from asm_cli.commands._base import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from asm_cli.commands._base import EXIT_NODE as EXIT_NODE
from asm_cli.commands._base import EXIT_NODE_STOPPED as EXIT_NODE_STOPPED
from asm_cli.commands._base import EXIT_NOT_FOUND as EXIT_NOT_FOUND
from asm_cli.commands._base import EXIT_OK as EXIT_OK
from asm_cli.commands._base import EXIT_USAGE as EXIT_USAGE
from asm_cli.commands._base import NODE_STOPPED_KINDS as NODE_STOPPED_KINDS
from asm_cli.commands._base import Parser as Parser
from asm_cli.commands._base import Subcommands as Subcommands
from asm_cli.commands._base import fail as fail
from asm_cli.commands._base import later_help as later_help
from asm_controller._jsonl import event_line, event_lines
from asm_wire import AsmError, ConfigError, NodeConnectionError, NodeConnectTimeout, NodeUnreachable, parse_address, pb

if TYPE_CHECKING:
    # The gRPC client (grpc, asyncio) is imported by the functions that connect: the fast ``asm run
    # --node`` path (asm_cli.commands._fastrun) prints and reports with this module without it.
    import asyncio

    from asm_controller import Event, GrpcNodeClient, RemoteNode, Result, SnapshotStream, TLSConfig
    from asm_controller._session import RunStream
    from asm_controller.extensions.rendering import Rendering


def read_token(token_file: str | None, secrets: dict[str, str] | None = None) -> str | None:
    """The token from its file (read once, at start), else ASM_TOKEN (from ``secrets`` when a server took them)."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"token file {token_file} is empty")
        return token
    env = os.environ if secrets is None else secrets
    return env.get("ASM_TOKEN") or None


def tls_args(p: argparse.ArgumentParser, server: bool) -> None:
    p.add_argument("--tls-cert", metavar="F", help="certificate (PEM)" + ("" if server else " for mutual TLS"))
    p.add_argument("--tls-key", metavar="F", help="private key (PEM)")
    p.add_argument("--tls-ca", metavar="F",
                   help="CA bundle: clients must present a cert it signed (mutual TLS)" if server
                   else "CA bundle that signed the node's certificate (enables TLS)")
    if not server:
        p.add_argument("--tls-server-name", metavar="NAME", help="expected name in the node's certificate")


def limit_args(p: argparse.ArgumentParser) -> None:
    """Abuse bounds of a gRPC server (node or controller) and the metrics exposure switch."""
    p.add_argument("--metrics-insecure", action="store_true",
                   help="allow a non-loopback --metrics-listen (the metrics endpoint has no authentication)")
    p.add_argument("--handshake-timeout", type=float, metavar="SECONDS",
                   help="close a connection that has not finished its handshake by then (default 5)")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="open connections at once (default: half the open-file limit)")
    p.add_argument("--max-streams-per-connection", type=int, metavar="N",
                   help="concurrent HTTP/2 streams on one connection (default 1000)")
    p.add_argument("--max-concurrent-rpcs", type=int, metavar="N",
                   help="RPCs in flight in all; more are refused RESOURCE_EXHAUSTED, at_capacity "
                   "(default 1000 on a node, 4000 on a controller)")


def limit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The limit_args given, as ServerLimits/NodeConfig field names."""
    given = {"handshake_timeout_s": args.handshake_timeout, "max_connections": args.max_connections,
             "max_concurrent_streams": args.max_streams_per_connection,
             "max_concurrent_rpcs": args.max_concurrent_rpcs}
    return {k: v for k, v in given.items() if v is not None}


def _client_tls(args: argparse.Namespace) -> TLSConfig | None:
    from asm_controller import TLSConfig

    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TLSConfig.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def remote_nodes(args: argparse.Namespace) -> list[RemoteNode]:
    """The ``--node`` targets (HOST:PORT[,weight=N][,priority=N]) with this command's credentials.

    A target that is the ``--controller`` (the commands pass it in ``args.node``) may list several
    addresses, HOST:PORT[,HOST:PORT...]: one controller service (its replicas), tried in turn."""
    from asm_controller import LivenessConfig, RemoteNode

    token = read_token(args.token_file)
    tls = _client_tls(args)
    live = LivenessConfig(node_lost_timeout_s=getattr(args, "node_lost_timeout", 8.0))
    controller = getattr(args, "controller", None)
    nodes = []
    for spec in args.node:
        if controller and spec == controller and "," in spec:
            addr, attrs = _controller_addresses(spec)
        else:
            # HOST:PORT[,weight=N][,priority=N]
            addr, *attrs = spec.split(",")
        kw: dict[str, int] = {}
        for attr in attrs:
            key, _, value = attr.partition("=")
            if key not in ("weight", "priority") or not value.lstrip("-").isdigit():
                raise ConfigError(f"bad node attribute {attr!r} in {spec!r}: use HOST:PORT[,weight=N][,priority=N]")
            kw[key] = int(value)
        nodes.append(RemoteNode(addr, token=token, tls=tls, connect_timeout_s=args.connect_timeout, liveness=live,
                                priority=kw.get("priority", 100), weight=kw.get("weight", 1)))
    return nodes


def _controller_addresses(spec: str) -> tuple[str, list[str]]:
    """``--controller A[,B...]``: the addresses (joined, for one RemoteNode) and any NAME=VALUE attributes;
    an empty element or a bad HOST:PORT is a usage error naming it."""
    addresses: list[str] = []
    attrs: list[str] = []
    for part in spec.split(","):
        if "=" in part:
            attrs.append(part)
            continue
        if not part.strip():
            raise ConfigError(f"--controller {spec[:500]!r} has an empty address: "
                              "use HOST:PORT or HOST:PORT,HOST:PORT,... (one controller's replicas)")
        try:
            parse_address(part)
        except ConfigError:
            raise ConfigError(f"--controller {spec[:500]!r}: invalid address {part[:200]!r}: expected HOST:PORT "
                              "(e.g. 127.0.0.1:7070), several separated by commas") from None
        addresses.append(part.strip())
    if not addresses:
        raise ConfigError(f"--controller {spec[:500]!r} names no address: use HOST:PORT[,HOST:PORT...]")
    return ",".join(addresses), attrs


def pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def client_args(p: argparse.ArgumentParser) -> None:
    """The connection flags of a client command: credentials, TLS, connect timeout."""
    p.add_argument("--token-file", metavar="F", help="bearer token file (default: env ASM_TOKEN)")
    tls_args(p, server=False)
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS")


class _Lines:
    """``--output jsonl`` lines on their way to stdout: one write and one flush per burst, not per line.

    A write and a flush per event was a write(2) per line (with PYTHONUNBUFFERED, as in containers,
    even without the flush): 2M lines cost seconds of system time. Lines are kept until the event loop
    is about to wait for the next event (a ``call_soon`` callback runs once the burst of events that
    arrived together is printed), or 4096 of them; so every line is still out as soon as the run goes
    quiet. Without a running loop each line is written and flushed at once, as before. A failed write
    in the callback (BrokenPipeError: the reader left) is raised by the next print, where it was."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.held = 0  # the lines in ``lines`` (an entry may hold a batch's)
        self.stream: IO[str] | None = None
        self.scheduled: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self.failed: Exception | None = None

    def add(self, stream: IO[str], line: str, count: int = 1) -> None:
        """Hold ``line`` (``count`` lines, when it is a batch's: it counts that much toward the 4096)."""
        if self.failed is not None:
            exc, self.failed = self.failed, None
            raise exc
        if self.scheduled is not None and stream is self.stream and self.held + count < 4096:
            self.lines.append(line)  # a drain is already scheduled: the common case, kept cheap
            self.held += count
            return
        if stream is not self.stream:
            self.drain()
            self.stream = stream
        self.lines.append(line)
        self.held += count
        asyncio = sys.modules.get("asyncio")  # not imported (the fast asm run path): no loop can be running
        try:
            if asyncio is None:
                raise RuntimeError("no running event loop")
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.drain()
            return
        if self.held >= 4096:
            self.drain()
        elif self.scheduled is None or self.scheduled() is not loop:  # (a loop that closed never ran it)
            self.scheduled = weakref.ref(loop)
            loop.call_soon(self._drain_soon)

    def _drain_soon(self) -> None:
        try:
            self.drain()
        except (OSError, ValueError) as exc:
            self.failed = exc

    def drain(self) -> None:
        self.scheduled = None  # the next line schedules a drain again (also after a loop that never ran it)
        stream = self.stream
        if stream is None or not self.lines:
            return  # nothing held: a stream given up (closed since) is not touched
        text = "".join(self.lines)
        self.lines.clear()
        self.held = 0
        stream.write(text)
        stream.flush()


_lines = _Lines()


def flush_lines() -> None:
    """Write out the jsonl lines still held (before anything else is written to stdout)."""
    _lines.failed = None  # the reader left: this write raises it again
    _lines.drain()


def settle_heap() -> None:
    """Before a run's events stream in: what the process imported and set up so far (~100k objects:
    gRPC, protobuf, the modules) is moved out of the collector's reach (``gc.freeze``), and the young
    generation is collected every 10,000 allocations instead of 700. Each event allocates two tracked
    objects (upb's wrapper and the Event) that die with their batch: full collections kept coming in a
    long run, each walking all of that (~10 ms) again (~0.3 s of a 2M-line run), and a young one came
    every 350 events, each promoting the batch still alive (GC ~40 -> ~10 ms for 200,000 lines)."""
    from asm_wire._gc import CLI_YOUNG
    from asm_wire._gc import settle_heap as settle

    settle(CLI_YOUNG)


async def next_batch(stream: RunStream | SnapshotStream) -> list[Event] | None:
    """The stream's next events, None at its end: a RunStream's batch as it arrived (the printing
    loops of ``asm run``/``attach`` go a batch at a time), one event of any other stream."""
    from asm_controller._session import RunStream  # (loaded by then: whoever made the stream imported it)

    if isinstance(stream, RunStream):
        return await stream.next_batch()
    try:
        return [await anext(stream)]
    except StopAsyncIteration:
        return None


def print_event(ev: Any, output: str) -> None:
    """One event as ``--output jsonl`` prints it (a JSON line), or the plain fallback of a text output."""
    if output == "jsonl":
        # The same line as json.dumps(ev.to_dict()), made directly (asm_controller._jsonl: ~4x less CPU).
        _lines.add(sys.stdout, event_line(ev.pb) + "\n")
        return
    _print_text(ev)


def print_events(evs: Sequence[Any], output: str) -> None:
    """A batch of events as :func:`print_event` prints them one by one, the same bytes: for jsonl one
    string made by :func:`~asm_controller._jsonl.event_lines` (the bulk lines without a call each)."""
    if output == "jsonl":
        try:
            text = event_lines([ev.pb for ev in evs])
        except Exception:  # an event the encoder refuses: the lines before it are printed, then it raises
            for ev in evs:
                print_event(ev, output)
            raise AssertionError("unreachable: event_lines raised where event_line did not") from None
        if text:
            _lines.add(sys.stdout, text, len(evs))
        return
    for ev in evs:
        _print_text(ev)


def _print_text(ev: Any) -> None:
    kind = ev.kind
    if kind == "assistant_delta":
        sys.stdout.write(ev.pb.assistant_delta.content)
        sys.stdout.flush()
    elif kind == "assistant_message":
        sys.stdout.write("".join(b.text for b in ev.pb.assistant_message.content if b.type == "text") + "\n")
        sys.stdout.flush()
    elif kind == "stderr":
        sys.stderr.write(ev.pb.stderr.content + "\n")
    elif kind == "error" and ev.pb.error.severity in (1, 2):  # warnings; a failure is in the summary line
        sys.stderr.write(f"asm: warning: {ev.pb.error.code or 'error'}: {ev.pb.error.message}\n")


def report(result: Result, output: str, rendering: Rendering | None) -> int:
    """A run's end as ``asm run`` (and ``asm attach``) prints it -- the result_summary object (jsonl) or
    the summary line (text) -- and the exit code of its outcome."""
    flush_lines()
    if output == "jsonl":
        sys.stdout.write(json.dumps(result.to_summary()) + "\n")
        if result.error is not None:
            sys.stderr.write(f"asm: error: {result.error}\n")
    elif isinstance(result.error, NodeConnectionError):
        if rendering is not None:
            rendering.close()
        sys.stderr.write(f"asm: error: {result.error.message}\n")  # nothing ran: no summary to give
    elif rendering is not None:
        with contextlib.suppress(OSError):  # a closed pipe on stdout is not the run's failure
            rendering.finish(result)  # ends the open text line on stdout; the summary line on stderr
    sys.stdout.flush()
    if result.ok:
        return EXIT_OK
    if result.error is not None and result.error.kind == "user_cancelled":
        return EXIT_INTERRUPTED
    if result.error is not None and result.error.kind in NODE_STOPPED_KINDS:
        return EXIT_NODE_STOPPED
    if isinstance(result.error, NodeConnectionError):
        return EXIT_NODE
    return EXIT_FAILED


FINISHED = frozenset({pb.RUN_STATUS_COMPLETED, pb.RUN_STATUS_FAILED, pb.RUN_STATUS_INTERRUPTED})


def server_target(args: argparse.Namespace) -> tuple[RemoteNode, str]:
    """The one node or controller ``--node``/``--controller`` names, with this command's credentials."""
    address = args.controller or args.node
    (target,) = remote_nodes(argparse.Namespace(**{**vars(args), "node": [address]}))
    return target, f"{'controller' if args.controller else 'node'} {address}"


async def ask(target: RemoteNode, what: str, call: Callable[[GrpcNodeClient], Any]) -> Any:
    """One unary call on a bare client (no readiness check: a draining node still answers questions),
    its transport failures typed as for a node connection (exit 3)."""
    from asm_controller import GrpcNodeClient

    client = GrpcNodeClient(target)
    try:
        return await call(client)
    except AsmError as err:
        if err.kind == "timeout" and not err.reason:
            raise NodeConnectTimeout(f"{what} did not answer within {target.rpc_timeout_s:g}s") from None
        if err.kind in ("connection_failed", "transport_error") and not err.reason:
            raise NodeUnreachable(f"{what} is unreachable: {err.message}") from None
        raise
    finally:
        await client.close()


def add_no_color_option(parser: argparse.ArgumentParser) -> None:
    """``--no-color``: plain text even on a terminal (as ``NO_COLOR=1``); sets ``args.no_color``.

    Here rather than in asm_cli.ui so that building the parser does not import rich."""
    parser.add_argument("--no-color", action="store_true", default=False,
                        help="plain text, no colour or live display, even on a terminal (as NO_COLOR=1)")
