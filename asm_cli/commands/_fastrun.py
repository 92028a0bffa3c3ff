"""The fast path of ``asm run --node ADDR``: a simple remote run without grpc and asyncio (issue 15).

A run on one served node does what the Session path does for it -- a Handshake, StartRun, the
events reduced by the same reducer, printed by the same code, the same Result and exit code -- on
the CLI's own synchronous gRPC client (:mod:`asm_cli._fastrpc`), so ``asm run --node`` starts in a
fraction of the time (importing grpc and asyncio alone took longer than a whole run may).

It takes only what it provably does the same way; everything else goes to the usual path:

* a run that is not simple (several nodes or attributes, --controller, --record, --snapshot, a
  selector, a strategy, a priority or queue timeout, --on-node-lost resume, a provider failover
  list, TLS without --tls-ca: grpc's own root store is not the system's) never comes here;
* before StartRun has its first answer, anything that is not plainly fine (the node unreachable or
  refusing the token, incompatible, not ready, a controller, a typed refusal of StartRun, a broken
  transport) hands the whole run to the usual path, with the run's id: nothing ran yet, or the
  node already has the run and StartRun with its id attaches to it -- never a second run. The
  usual path then reports exactly what it always did;
* once events flow: an approval request or a broken stream hands the run over to the usual path
  attached to it (AttachRun; the events printed so far are not printed again, the reducer sees
  them all), which answers approvals and re-attaches as always.

Ctrl-C sends InterruptRun on the same connection; a second one exits at once, as on the usual path.
``ASM_FAST_CLIENT=0`` turns the fast path off.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asm_cli.commands._common import EXIT_INTERRUPTED, print_events, read_token, report
from asm_wire import (
    PROTOCOL_VERSION,
    REQUIRED_CAPABILITIES,
    Capability,
    __version__,
    parse_address,
    pb,
    ulid,
    valid_id,
    version_major_minor,
)

if TYPE_CHECKING:
    import ssl

    from asm_cli._fastrpc._client import Channel
    from asm_controller._reducer import EventReducer
    from asm_controller.extensions.rendering import Rendering

log = logging.getLogger("asm_controller.session")  # the usual path's logger for the same warnings

_SERVICE = "/asm.v1.NodeService/"
#: An event the fast path does not handle itself: the usual path takes the run over there (it asks).
_HAND_OVER_KINDS = frozenset({pb.EVENT_KIND_APPROVAL_REQUESTED})
_RUN_STARTED = pb.EVENT_KIND_RUN_STARTED
#: Where the controller side stamps its view of the run on run_started (asm_controller._run).
_STAMP_KEY = "asm.controller"
_RPC_TIMEOUT_S = 15.0  # RemoteNode.rpc_timeout_s


@dataclass
class Handover:
    """A run the fast path started, for the usual path to follow from here (``asm_cli.commands.run``)."""

    run_id: str
    #: The last seq printed: the usual path attaches and prints what comes after it.
    printed: int
    rendering: Rendering | None
    #: Result.metadata the usual path's attach does not know (how the run was admitted).
    metadata: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


class _Fallback(Exception):
    """Nothing was started that the usual path would not find: it runs the command from the start."""


def lane_metadata(requested: str, remote: bool) -> dict[str, Any]:
    """asm_controller._options.lane_metadata (that module imports grpc); a test pins them equal."""
    return {"lane": "core", "requested_lane": requested,
            "lane_fallback_reason": "sdk_remote_unsupported" if requested == "auto" and remote else None}


def applies(args: argparse.Namespace) -> bool:
    """Whether this ``asm run`` is simple enough for the fast path (see the module doc)."""
    if os.environ.get("ASM_FAST_CLIENT", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if args.controller or not args.node or len(args.node) != 1 or "," in args.node[0]:
        return False
    if args.record or args.snapshot or args.selector or args.strategy != "priority" or args.priority \
            or args.queue_timeout or args.on_node_lost != "fail":
        return False
    if not args.provider or "," in args.provider or (args.run_id and not valid_id(args.run_id)):
        return False
    if args.tls_ca or args.tls_cert or args.tls_key:
        # TLS with the CA given (a certificate needs its key: the usual path says so otherwise).
        return bool(args.tls_ca) and bool(args.tls_cert) == bool(args.tls_key)
    return True  # (--tls-server-name alone is plaintext on the usual path too)


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """grpc.ssl_channel_credentials(ca, key, cert) as the stdlib's ssl: the node's certificate checked
    against --tls-ca and the node's name (or --tls-server-name), TLS 1.2 at least, ALPN h2."""
    if not args.tls_ca:
        return None
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=args.tls_ca)
    if args.tls_cert:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _compatible(info: pb.HandshakeResponse) -> bool:
    """asm_controller._connector.check_compatible's rule, as a yes/no (a no goes the usual way, which
    says why), and not a controller (its runs' metadata comes from its stamp: the usual path)."""
    return (version_major_minor(info.agent_version) == version_major_minor(__version__)
            and info.protocol_version == PROTOCOL_VERSION
            and {c.value for c in REQUIRED_CAPABILITIES} <= set(info.capabilities)
            and info.state == pb.NODE_STATE_READY
            and Capability.FLEET.value not in info.capabilities)


class _Interrupts:
    """Ctrl-C while the run streams: the first asks for InterruptRun, a second exits at once."""

    def __init__(self) -> None:
        from asm_cli._fastrpc._client import wake_pipe

        self.read_fd, self.write_fd = wake_pipe()
        self.pressed = 0
        self.sent = False
        self._old_handler: Any = None
        self._old_fd = -1

    def __enter__(self) -> _Interrupts:
        self._old_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old_handler)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self.read_fd)
        os.close(self.write_fd)

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.pressed:  # a second Ctrl-C: stop waiting
            sys.stderr.write("asm: interrupted again, exiting without waiting for the node\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        self.pressed = 1
        sys.stderr.write("asm: interrupting the run (Ctrl-C again to exit now)\n")

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass


def run_fast(args: argparse.Namespace, options: dict[str, Any], rendering_for: Any) -> int | Handover | None:
    """Run it on the fast path: its exit code; a Handover for the usual path to follow the started run;
    None when the usual path should run the whole command (nothing was started)."""
    from google.protobuf.message import DecodeError

    from asm_cli._fastrpc._client import Channel, RpcError

    try:
        token = read_token(args.token_file)
        host, port = parse_address(args.node[0])
        metadata = [("authorization", f"Bearer {token}")] if token else []
        session_id = ulid()
        run_id = args.run_id or ulid()
        channel = Channel(host, port, ssl_context=_ssl_context(args), server_hostname=args.tls_server_name,
                          connect_timeout=args.connect_timeout)
    except Exception:  # the usual path says what is wrong, in its words (a TLS refusal too)
        return None
    try:
        try:
            info = pb.HandshakeResponse.FromString(channel.unary(
                _SERVICE + "Handshake", pb.HandshakeRequest(controller_version=__version__,
                                                            protocol_version=PROTOCOL_VERSION).SerializeToString(),
                metadata, timeout=args.connect_timeout))
        except (RpcError, DecodeError):
            return None
        if not _compatible(info):
            return None
        return _Follow(args, channel, metadata, info, session_id, run_id, options, rendering_for).run()
    except _Fallback:
        return None
    finally:
        channel.close()


class _Follow:
    """StartRun and its stream, as asm_controller._run.Run drives a one-node run."""

    def __init__(self, args: argparse.Namespace, channel: Channel, metadata: list[tuple[str, str]],
                 info: pb.HandshakeResponse, session_id: str, run_id: str, options: dict[str, Any],
                 rendering_for: Any) -> None:
        self.args = args
        self.channel = channel
        self.metadata = metadata
        self.info = info
        self.run_id = run_id
        self.address = args.node[0]
        self.session_id = session_id
        provider = args.provider
        self.reducer: EventReducer
        self.attempts: list[dict[str, Any]] = []
        self.request = pb.StartRunRequest(
            run_id=run_id, session_id=session_id, provider=provider, prompt=args.prompt, cwd=args.cwd_resolved,
            permission_mode=args.permission_mode, options_json=json.dumps(options) if options else "",
            approval_timeout_ms=args.approval_timeout_ms)
        self.rendering_for = rendering_for
        self.rendering: Rendering | None = None
        self.printed = 0

    def run(self) -> int | Handover:
        from google.protobuf.message import DecodeError

        from asm_cli._fastrpc._client import RpcError

        channel = self.channel
        with _Interrupts() as interrupts:
            try:
                sid = channel.open(_SERVICE + "StartRun", self.request.SerializeToString(), self.metadata)
                self._prepare()  # while the node starts the run
                first = channel.read(sid, wake_fd=None)
                if first is None:
                    raise _Fallback()
                batch = pb.EventBatch.FromString(first)
            except (RpcError, DecodeError):
                raise _Fallback() from None  # refused (nothing ran) or unanswered (StartRun again attaches)
            self._bind()
            self._stamp(batch)
            self.rendering = self.rendering_for(self.args) if self.args.output == "text" else None
            try:
                while True:
                    if interrupts.pressed and not interrupts.sent:
                        self._interrupt(interrupts)
                    handover = self._show(batch)
                    if handover is not None:
                        return self._hand(handover, interrupts)
                    if self.reducer.finished:
                        channel.cancel(sid)
                        break
                    message = self._next(sid, interrupts)
                    try:
                        if message is None:
                            raise DecodeError("the stream broke, or ended before run_completed")
                        batch = pb.EventBatch.FromString(message)
                    except DecodeError:  # as a broken stream: the usual path re-attaches
                        return self._hand(Handover(self.run_id, self.printed, self.rendering,
                                                   {"attempts": list(self.attempts), "reconnects": 1}), interrupts)
            except BaseException:
                if self.rendering is not None and sys.exc_info()[0] is not None:
                    import contextlib

                    with contextlib.suppress(Exception):
                        self.rendering.close()
                if not self.reducer.finished and not interrupts.sent:
                    self._interrupt(interrupts)  # as Session.stop on the usual path: the run does not go on
                raise
        return report(self.reducer.result(), self.args.output, self.rendering)

    def _prepare(self) -> None:
        """The reducer (as Run makes it) and the text rendering's modules: imported while the node spawns
        the run (its first answer takes longer than these imports)."""
        from asm_controller._reducer import EventReducer

        provider = self.args.provider
        self.reducer = EventReducer(self.run_id, self.session_id, provider,
                                    {"provider": provider, **lane_metadata("auto", False), "execution": "pending"})
        self.attempts = self.reducer.metadata.setdefault("attempts", [])
        if self.args.output == "text":
            import asm_controller.extensions.rendering  # noqa: F401 (asm_cli.plain's, imported ahead)

    def _next(self, sid: int, interrupts: _Interrupts) -> bytes | None:
        """The stream's next batch; None when it broke (or ended early)."""
        from asm_cli._fastrpc._client import RpcError, Woken

        while True:
            try:
                return self.channel.read(sid, wake_fd=interrupts.read_fd)
            except Woken:
                interrupts.drain()
                if interrupts.pressed and not interrupts.sent:
                    self._interrupt(interrupts)
            except RpcError:
                return None

    def _interrupt(self, interrupts: _Interrupts) -> None:
        """InterruptRun on the same connection (a failure is a warning, as on the usual path)."""
        from asm_cli._fastrpc._client import Code, RpcError

        interrupts.sent = True
        try:
            self.channel.unary(_SERVICE + "InterruptRun", pb.InterruptRunRequest(run_id=self.run_id).SerializeToString(),
                               self.metadata, timeout=_RPC_TIMEOUT_S)
        except RpcError as err:
            if err.code == Code.NOT_FOUND:
                interrupts.sent = False  # not created on the node yet: again after the next batch
            else:
                log.warning("interrupt of run %s failed: %s", self.run_id, _asm_error(err))

    def _bind(self) -> None:
        """Run._admit_once + Run._bind: the attempt and the node in the result's metadata."""
        info = self.info
        self.attempts.append({"node": self.address, "node_id": info.node_id, "admitted": True})
        self.reducer.metadata.update(node_id=info.node_id, node_epoch=info.boot_epoch, node_address=self.address,
                                     execution="remote", **lane_metadata("auto", True))

    def _stamp(self, batch: pb.EventBatch) -> None:
        """Run._stamp: the controller side's view of the run on its run_started (a direct node has none)."""
        for m in batch.events:
            if m.kind == _RUN_STARTED:
                m.metadata[_STAMP_KEY] = json.dumps(self.reducer.metadata, default=str)
                return

    def _show(self, batch: pb.EventBatch) -> Handover | None:
        """Reduce and print a batch's new events, a batch at a time as the usual path does (the reducer's
        apply_batch, one jsonl string, the rendering's feed_all); a Handover at an approval request (it
        and what follows it are not printed: the usual path shows them)."""
        reducer, rendering = self.reducer, self.rendering
        fresh, stopped = reducer.apply_until(batch.events, _HAND_OVER_KINDS)
        reducer.bookkeeping.clear()  # (approvals and cost for a Session: none here)
        if fresh:
            self.printed = fresh[-1].pb.seq
            if rendering is not None:
                rendering.feed_all(fresh)
            else:
                print_events(fresh, "jsonl")
        if stopped:
            return Handover(self.run_id, self.printed, rendering, {"attempts": list(self.attempts)})
        return None

    def _hand(self, handover: Handover, interrupts: _Interrupts) -> Handover:
        """The run, for the usual path to follow; a Ctrl-C not yet delivered is sent first (there a
        further Ctrl-C exits at once, as after the first one)."""
        if interrupts.pressed and not interrupts.sent:
            self._interrupt(interrupts)
        handover.interrupted = bool(interrupts.pressed)
        return handover


def _asm_error(err: Any) -> Any:
    """An RpcError as the usual path's client raises it (asm_wire.error_from_rpc)."""
    from asm_wire import error_from_rpc

    return error_from_rpc(err.code, err.details, err.trailers)
