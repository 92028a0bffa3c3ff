"""The ``asm`` command line: the composition root of node and controller.

    asm node serve --listen HOST:PORT [--token-file F] [--tokens-file F] [--tls-cert F --tls-key F [--tls-ca F]]
                   [--workspace-root DIR ...] [--max-runs N] [--insecure]
    asm run [--node HOST:PORT ...] --provider P [--cwd DIR] [--permission-mode M]
            [--output text|jsonl] [--opt KEY=VALUE ...] PROMPT
    asm nodes --node HOST:PORT ... [--provider P [--cwd DIR]] [--output table|json]
    asm node drain [--controller C] --node HOST:PORT [--deadline S];  asm node undrain [--controller C] --node HOST:PORT
    asm attach RUN_ID (--node HOST:PORT | --controller C) [--output text|jsonl] [--after-seq N]
    asm runs (--node HOST:PORT | --controller C) [--status S] [--output text|json]

Exit codes: 0 success; 1 the run failed; 2 usage or configuration error;
3 no node could be used (unreachable, refused, incompatible); 4 the node stopped
the run (node_draining, node_shutdown: retry elsewhere); 5 no such run (asm attach: not_found);
130 interrupted (Ctrl-C; asm attach: detached, the run goes on).
A user mistake prints one ``asm: error: ...`` line, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
import prometheus_client
from pydantic import ValidationError

from asm_controller import (
    EmbeddedNode,
    GrpcNodeClient,
    LivenessConfig,
    NodeConnectionError,
    NodeNotReady,
    NodeUnreachable,
    RemoteNode,
    Result,
    Session,
    TLSConfig,
    connect,
    preflight,
)
from asm_controller.extensions.persistence import open_recorder, replay_file
from asm_controller.extensions.rendering import CompactRenderer, Rendering, TTYSink
from asm_node import NodeAgent, NodeConfig, serve
from asm_node.config import SECRET_ENV
from asm_node.journal import default_state_dir
from asm_node.providers import operator_option_names
from asm_wire import (
    PROTOCOL_VERSION,
    AsmError,
    ConfigError,
    NodeConnectTimeout,
    RunNotFound,
    __version__,
    error_from_rpc,
    pb,
    valid_id,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NODE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: The node stopped the run (drain deadline, shutdown): not the user's Ctrl-C; retry elsewhere.
EXIT_NODE_STOPPED = 4
#: No run by that id (``asm attach``, error kind not_found): nothing was followed, nothing started.
EXIT_NOT_FOUND = 5
NODE_STOPPED_KINDS = frozenset({"node_draining", "node_shutdown"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"asm: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    sys.stderr.write(f"asm: error: {message}\n")
    sys.exit(code)


def _read_token(token_file: str | None, secrets: dict[str, str] | None = None) -> str | None:
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


#: Internal: the fd of the pipe a re-executed server reads its secrets from.
_SECRETS_FD_ENV = "ASM_SECRETS_FD"
#: A pipe holds at least one page: the hand-over write can never block.
_SECRETS_MAX_BYTES = 4096


def _take_secrets(argv: list[str] | None) -> dict[str, str]:
    """A server's secrets (SECRET_ENV), gone from its environment for good.

    ``/proc/<pid>/environ`` shows the environment a process was started with,
    even after it unsets a variable, to anything running as the same user (a
    run's CLI included). So a server started with ASM_TOKEN in its environment
    re-executes itself (same pid, same argv) without it, handing the values over
    through an inherited pipe that the new image reads once and closes.
    ``argv`` is None for an in-process call (nothing to re-execute: the
    secrets are only read; the CLIs never inherit them either way).
    """
    fd_text = os.environ.pop(_SECRETS_FD_ENV, None)
    if fd_text is not None:
        return _read_secrets_pipe(fd_text)
    secrets = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    if not secrets or argv is None:
        return secrets
    payload = json.dumps(secrets).encode()
    if len(payload) > _SECRETS_MAX_BYTES:
        raise ConfigError(f"{', '.join(secrets)} too long to hand over (over {_SECRETS_MAX_BYTES} bytes): "
                          "use --token-file")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, payload)
    os.close(write_fd)
    os.set_inheritable(read_fd, True)
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env[_SECRETS_FD_ENV] = str(read_fd)
    sys.stdout.flush()
    sys.stderr.flush()
    # The interpreter's own flags (-X, -W, -E ...) are kept; -P: the new image never imports from the cwd
    # (a workspace could plant a module there).
    flags_of: Callable[[], list[str]] = getattr(subprocess, "_args_from_interpreter_flags", list)
    flags = flags_of()
    if "-I" not in flags and "-P" not in flags:
        flags.append("-P")
    try:
        os.execve(sys.executable, [sys.executable, *flags, "-m", "asm_cli", *argv], env)
    except OSError as exc:
        os.close(read_fd)
        raise ConfigError(f"cannot re-execute {sys.executable!r} without {', '.join(secrets)} in its environment "
                          f"({exc.strerror}): use --token-file") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _read_secrets_pipe(fd_text: str) -> dict[str, str]:
    if not fd_text.isdigit():
        raise ConfigError(f"{_SECRETS_FD_ENV} must be a file descriptor number, got {fd_text!r}")
    fd = int(fd_text)
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, _SECRETS_MAX_BYTES + 1):
            chunks.append(chunk)
            if sum(map(len, chunks)) > _SECRETS_MAX_BYTES:
                raise ConfigError(f"{_SECRETS_FD_ENV}: more than {_SECRETS_MAX_BYTES} bytes")
        os.close(fd)
        value = json.loads(b"".join(chunks))
    except OSError as exc:
        raise ConfigError(f"cannot read the secrets handed over on fd {fd}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"the secrets handed over on fd {fd} are not a JSON object") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"the secrets handed over on fd {fd} are not a JSON object of strings")
    return {k: v for k, v in value.items() if k in SECRET_ENV}


def _tls_args(p: argparse.ArgumentParser, server: bool) -> None:
    p.add_argument("--tls-cert", metavar="F", help="certificate (PEM)" + ("" if server else " for mutual TLS"))
    p.add_argument("--tls-key", metavar="F", help="private key (PEM)")
    p.add_argument("--tls-ca", metavar="F",
                   help="CA bundle: clients must present a cert it signed (mutual TLS)" if server
                   else "CA bundle that signed the node's certificate (enables TLS)")
    if not server:
        p.add_argument("--tls-server-name", metavar="NAME", help="expected name in the node's certificate")


def _limit_args(p: argparse.ArgumentParser) -> None:
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


def _limit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The _limit_args given, as ServerLimits/NodeConfig field names."""
    given = {"handshake_timeout_s": args.handshake_timeout, "max_connections": args.max_connections,
             "max_concurrent_streams": args.max_streams_per_connection,
             "max_concurrent_rpcs": args.max_concurrent_rpcs}
    return {k: v for k, v in given.items() if v is not None}


def _client_tls(args: argparse.Namespace) -> TLSConfig | None:
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TLSConfig.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def _remote_nodes(args: argparse.Namespace) -> list[RemoteNode]:
    token = _read_token(args.token_file)
    tls = _client_tls(args)
    live = LivenessConfig(node_lost_timeout_s=getattr(args, "node_lost_timeout", 8.0))
    nodes = []
    for spec in args.node:
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


def _pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _parse_opts(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt expects KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw  # a bare string
        out[key.strip()] = value
    return out


# -- asm node serve -------------------------------------------------------------


#: ``asm node serve`` flags that map one-to-one onto NodeConfig fields.
_NODE_SERVE_FIELDS = {
    "tokens_file": "tokens_file", "admin_principal": "admin_principals", "workspace_root": "workspace_roots",
    "max_runs": "max_runs", "node_id": "node_id", "shell_allow_interpolation": "shell_allow_interpolation",
    "shell_max_prompt_bytes": "shell_max_prompt_bytes", "env_allow": "env_allow",
    "allow_run_option": "allow_run_options", "detach_grace": "detach_grace_s", "retention_seconds": "retention_s",
    "retention_runs": "retention_max_runs", "retention_bytes": "retention_max_bytes",
    "journal_max_age": "journal_max_age_s", "backlog_bytes": "backlog_max_bytes",
    "replay_bytes": "replay_max_bytes_per_run", "replay_node_bytes": "replay_max_bytes_per_node",
    "line_cap": "line_cap_bytes", "metrics_listen": "metrics_listen", "metrics_insecure": "metrics_insecure",
}


def cmd_node_serve(args: argparse.Namespace) -> int:
    secrets = _take_secrets(getattr(args, "reexec_argv", None))
    # Precedence as before: --token-file, then ASM_TOKEN, then ASM_NODE_TOKEN (NodeConfig's own variable).
    token = _read_token(args.token_file, secrets) or secrets.get("ASM_NODE_TOKEN")
    settings: dict[str, Any] = {
        "listen": args.listen, "insecure": args.insecure, "token": token,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_ca": args.tls_ca,
    }
    for flag, field_name in _NODE_SERVE_FIELDS.items():
        value = getattr(args, flag)
        if value is not None and value is not False and value != [] and value != "":
            settings[field_name] = value  # an unset flag keeps NodeConfig's default (or its ASM_NODE_* env)
    if args.shell_allow:
        settings["shell_allowed_commands"] = [*NodeConfig().shell_allowed_commands, *args.shell_allow]
    if args.shell_unconfined_reads:
        settings["shell_confine_reads"] = False
    # The run journal is durable by default for a served node (ASM_NODE_STATE_DIR also sets it).
    if args.state_dir is not None:
        settings["state_dir"] = args.state_dir
    elif "ASM_NODE_STATE_DIR" not in os.environ:
        settings["state_dir"] = default_state_dir()
    if args.label:
        settings["labels"] = _pairs(args.label, "--label")
    settings.update(_limit_settings(args))
    config = NodeConfig(**{k: v for k, v in settings.items() if v is not None})

    def ready(node: Any) -> None:
        metrics = f", metrics on port {node.metrics_port}" if node.metrics_port else ""
        sys.stderr.write(
            f"asm node {node.agent.node_id} listening on {args.listen} (port {node.port}, epoch {node.agent.boot_epoch})"
            f"{metrics}\n"
        )
        sys.stderr.flush()

    asyncio.run(serve(config, on_ready=ready))
    return EXIT_OK


# -- asm run ----------------------------------------------------------------------


def _print_event(ev: Any, output: str) -> None:
    if output == "jsonl":
        sys.stdout.write(json.dumps(ev.to_dict()) + "\n")
        sys.stdout.flush()
        return
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


async def _run(args: argparse.Namespace) -> int:
    options = _parse_opts(args.opt)
    # Before anything runs: a file that is not an event store, a device/FIFO/directory,
    # a locked or unwritable store is refused here (ConfigError: exit 2, file untouched).
    recorder = await open_recorder(args.record) if args.record else None
    unrecorded: dict[str, Any] | None = None
    last_err: AsmError = ConfigError("no node to snapshot on")
    agent: NodeAgent | None = None
    nodes: list[Any]
    if args.node:
        nodes = list(_remote_nodes(args))
    else:
        # An embedded node runs as the user who typed the command: that user is its operator.
        agent = NodeAgent(NodeConfig(node_id=f"{os.uname().nodename}-embedded",
                                     allow_run_options=sorted(operator_option_names())))
        await agent.start()
        nodes = [EmbeddedNode(agent)]
    cwd = args.cwd_resolved
    session = Session(args.provider, node=nodes, cwd=cwd, permission_mode=args.permission_mode, options=options,
                      strategy=args.strategy, selector=_pairs(args.selector, "--selector"),
                      on_node_lost=args.on_node_lost)
    before: pb.SnapshotInfo | None = None
    snap_handle = None
    if args.snapshot:
        # Snapshots are taken on the node that owns the workspace: pin the run to the first reachable node.
        for target in nodes:
            try:
                snap_handle = await session.pool.handle(target)
                break
            except NodeConnectionError as err:
                last_err = err
        if snap_handle is None:
            raise last_err
        session.defaults = dataclasses.replace(session.defaults, node=snap_handle.target)
        before = await snap_handle.api.snapshot(pb.SnapshotRequest(cwd=cwd, backend=args.snapshot, label="before"))
    interrupted = False
    rendering = (Rendering(CompactRenderer(), [TTYSink(sys.stdout, meta_stream=sys.stderr)])
                 if args.output == "text" else None)
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    try:
        stream = session.stream(args.prompt, **({"run_id": args.run_id} if args.run_id else {}))

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
                _print_event(ev, args.output)
            if recorder is not None:
                await recorder.put(ev)
        result = stream.result
        assert result is not None
        if before is not None and snap_handle is not None:
            after = await snap_handle.api.snapshot(pb.SnapshotRequest(cwd=cwd, backend=before.backend, label="after"))
            diff = await snap_handle.api.diff(pb.DiffRequest(cwd=cwd, from_id=before.id, to_id=after.id,
                                                             max_patch_bytes=1))
            result.metadata["snapshots"] = {
                "backend": before.backend, "before": before.id, "after": after.id,
                "diff": {"added": list(diff.added), "modified": list(diff.modified), "deleted": list(diff.deleted)},
            }
            if args.output != "jsonl":
                sys.stderr.write(f"asm: workspace changes: {len(diff.added)} added, {len(diff.modified)} modified, "
                                 f"{len(diff.deleted)} deleted (snapshots {before.id} -> {after.id})\n")
                for mark, paths in (("A", diff.added), ("M", diff.modified), ("D", diff.deleted)):
                    for path in list(paths)[:50]:
                        sys.stderr.write(f"  {mark} {path}\n")
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
    code = _report(result, args.output, rendering)
    return EXIT_FAILED if code == EXIT_OK and unrecorded is not None else code  # the run worked, its record did not


def _report(result: Result, output: str, rendering: Rendering | None) -> int:
    """A run's end as ``asm run`` (and ``asm attach``) prints it -- the result_summary object (jsonl) or
    the summary line (text) -- and the exit code of its outcome."""
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


# -- asm attach / asm runs -----------------------------------------------------------


_MAX_SEQ = 2**63 - 1
_FINISHED = frozenset({pb.RUN_STATUS_COMPLETED, pb.RUN_STATUS_FAILED, pb.RUN_STATUS_INTERRUPTED})


def _seq_arg(text: str) -> int:
    """--after-seq: a sequence number, 0 to 2**63-1 (what the wire's uint64 cursor accepts everywhere)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a sequence number (an integer >= 0), got {text[:40]!r}") from None
    if not 0 <= value <= _MAX_SEQ:
        raise argparse.ArgumentTypeError(f"must be from 0 to {_MAX_SEQ}, got {text[:40]}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text[:40]!r}") from None
    if not 0 < value < 10**10:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text[:40]}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 2**62:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}")
    return int(text)


def _limit_arg(text: str) -> int:
    if not text.isdigit() or int(text) > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {2**32 - 1}, got {text[:40]!r}")
    return int(text)


def _server(args: argparse.Namespace) -> tuple[RemoteNode, str]:
    """The one node or controller ``--node``/``--controller`` names, with this command's credentials."""
    address = args.controller or args.node
    (target,) = _remote_nodes(argparse.Namespace(**{**vars(args), "node": [address]}))
    return target, f"{'controller' if args.controller else 'node'} {address}"


async def _ask(target: RemoteNode, what: str, call: Callable[[GrpcNodeClient], Any]) -> Any:
    """One unary call on a bare client (no readiness check: a draining node still answers questions),
    its transport failures typed as for a node connection (exit 3)."""
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


async def _run_info(target: RemoteNode, what: str, run_id: str) -> pb.RunInfo:
    """GetRun: the run's provider, session and last seq; an id the server does not know is RunNotFound."""
    try:
        info: pb.RunInfo = await _ask(target, what, lambda c: c.get_run(pb.GetRunRequest(run_id=run_id)))
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
    target, what = _server(args)
    info = await _run_info(target, what, args.run_id)
    after = args.after_seq
    if after > info.last_seq:
        raise ConfigError(f"--after-seq {after} is past run {args.run_id}'s events (its last seq is {info.last_seq})")
    # A finished run has nothing past its last seq to send: follow it from just before its end (its
    # error and run_completed), so the summary still has its outcome; events up to --after-seq are not printed.
    cursor = min(after, max(0, info.last_seq - 2)) if info.status in _FINISHED else after
    session = Session(info.provider or "shell", node=target,
                      session_id=info.session_id if valid_id(info.session_id) else None)
    stream = session.attach(args.run_id, target, provider=info.provider or None, after_seq=cursor)
    rendering = (Rendering(CompactRenderer(), [TTYSink(sys.stdout, meta_stream=sys.stderr)])
                 if args.output == "text" else None)
    last_seq = after

    async def follow() -> None:
        nonlocal last_seq
        async for ev in stream:
            if ev.seq <= after:
                continue
            last_seq = ev.seq
            if rendering is not None:
                rendering.feed(ev)
            else:
                _print_event(ev, args.output)

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
        loop.remove_signal_handler(signal.SIGINT)
        if rendering is not None and (detached or sys.exc_info()[0] is not None):
            with contextlib.suppress(Exception):
                rendering.close()
    if detached:
        # Detach, never interrupt: Session.stop() (and RunStream.aclose()) would interrupt the run, so
        # neither is called. The run's follower task is left to asyncio.run's teardown, which cancels
        # it here, in this process only: its AttachRun stream is cancelled, no InterruptRun is sent.
        sys.stdout.flush()
        sys.stderr.write(f"asm: detached from run {args.run_id}; it goes on on {what} "
                         f"('asm attach {args.run_id} --{'controller' if args.controller else 'node'} "
                         f"{args.controller or args.node} --after-seq {last_seq}' follows it again)\n")
        return EXIT_INTERRUPTED
    await session.stop()  # the run has ended: nothing is left to interrupt; this closes the connection
    result = stream.result
    assert result is not None
    return _report(result, args.output, rendering)


def cmd_attach(args: argparse.Namespace) -> int:
    return asyncio.run(_attach(args))


def _run_row(info: pb.RunInfo, node: str) -> dict[str, Any]:
    end = info.finished_unix_nano or (time.time_ns() if info.status not in _FINISHED else info.started_unix_nano)
    return {
        "run_id": info.run_id, "session_id": info.session_id, "provider": info.provider,
        "node": info.node or node, "status": pb.RunStatus.Name(info.status).removeprefix("RUN_STATUS_").lower(),
        "started": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.started_unix_nano / 1e9))
                    if info.started_unix_nano else None),
        "started_unix_nano": info.started_unix_nano, "finished_unix_nano": info.finished_unix_nano,
        "duration_s": round(max(0, end - info.started_unix_nano) / 1e9, 3) if info.started_unix_nano else None,
        "last_seq": info.last_seq, "exit_code": info.exit_code, "owner": info.owner,
    }


def _runs_table(rows: list[dict[str, Any]]) -> str:
    head = ("RUN", "SESSION", "PROVIDER", "NODE", "STATUS", "STARTED", "DURATION")
    lines = [head] + [
        (r["run_id"], r["session_id"], r["provider"], r["node"] or "-", r["status"], r["started"] or "-",
         "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s")
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n"
                   for line in lines)


async def _runs(args: argparse.Namespace) -> int:
    target, what = _server(args)
    request = pb.ListRunsRequest(status=args.status or "", limit=args.limit)
    resp: pb.ListRunsResponse = await _ask(target, what, lambda c: c.list_runs(request))
    # A node leaves RunInfo.node empty (the runs are its own); a controller names the run's node.
    rows = [_run_row(info, "" if args.controller else args.node) for info in resp.runs]
    sys.stdout.write(json.dumps(rows, indent=2) + "\n" if args.output == "json" else _runs_table(rows))
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    return asyncio.run(_runs(args))


# -- asm replay -------------------------------------------------------------------


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
                _print_event(ev, "jsonl")
            sys.stdout.write(json.dumps(result.to_summary()) + "\n")
        else:
            rendering = Rendering(CompactRenderer(), [TTYSink(sys.stdout, meta_stream=sys.stderr)])
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


# -- asm nodes --------------------------------------------------------------------


def _status_row(st: pb.NodeStatus) -> dict[str, Any]:
    row: dict[str, Any] = {"node": st.address}
    if st.HasField("error") and st.error.kind:
        row["error"] = {"kind": st.error.kind, "domain": st.error.domain, "message": st.error.message,
                        "reason": st.error.reason}
        return row
    row.update(
        node_id=st.node_id, version=st.agent_version, epoch=st.epoch, state=st.state, health=st.health, up=st.up,
        load={"active_runs": st.active_runs, "max_runs": st.max_runs},
        heartbeat_age_s=round(st.heartbeat_age_ms / 1000, 1), labels=dict(st.labels),
        providers=[{"name": p.name, "available": p.available, "version": p.version, "cli_path": p.cli_path}
                   for p in st.providers],
    )
    if st.drain_deadline_unix_nano:
        row["drain_deadline_unix_nano"] = st.drain_deadline_unix_nano
    return row


async def _controller_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from asm_wire.v1 import node_pb2_grpc

    (target,) = _remote_nodes(argparse.Namespace(**{**vars(args), "node": [args.controller]}))
    client = GrpcNodeClient(target)
    try:
        stub = node_pb2_grpc.ControllerServiceStub(client.channel)
        try:
            resp = await stub.ListNodes(pb.ListNodesRequest(), metadata=client._md, timeout=target.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata())
            raise NodeUnreachable(f"controller {args.controller}: {err.message}") from None
    finally:
        await client.close()
    return [_status_row(st) for st in resp.nodes]


async def _direct_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for target in _remote_nodes(args):
        row: dict[str, Any] = {"node": target.address}
        try:
            handle = await connect(target)
        except NodeNotReady as not_ready:
            # Draining (or stopping): the node answered; its state is shown, it is not an error
            # (a --provider preflight still fails: the node admits no run).
            try:
                row.update(_info_row(await _bare_handshake(target)))
                if args.provider:
                    row["preflight"] = {"ok": False, "error": not_ready.to_dict()}
            except AsmError as err:
                row["error"] = err.to_dict()
            rows.append(row)
            continue
        except AsmError as err:
            row["error"] = err.to_dict()
            rows.append(row)
            continue
        try:
            row.update(_info_row(handle.info))
            if args.provider:
                try:
                    row["preflight"] = {"ok": True, "cwd": await preflight(handle, args.provider, args.cwd or "")}
                except AsmError as err:
                    row["preflight"] = {"ok": False, "error": err.to_dict()}
        finally:
            await handle.close()
        rows.append(row)
    return rows


async def _bare_handshake(target: RemoteNode) -> pb.HandshakeResponse:
    """A handshake without connect()'s readiness check (a draining node refuses runs, not questions)."""
    client = GrpcNodeClient(target)
    try:
        return await client.handshake(
            pb.HandshakeRequest(controller_version=__version__, protocol_version=PROTOCOL_VERSION),
            timeout=target.connect_timeout_s)
    finally:
        await client.close()


def _info_row(info: pb.HandshakeResponse) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        node_id=info.node_id, version=info.agent_version, protocol=info.protocol_version,
        epoch=info.boot_epoch, state=pb.NodeState.Name(info.state).removeprefix("NODE_STATE_").lower(),
        health="healthy", up=True, heartbeat_age_s=0.0, labels=dict(info.labels),
        load={"active_runs": info.load.active_runs, "max_runs": info.limits.max_runs},
        providers=[
            {"name": p.name, "available": p.available, "version": p.version, "cli_path": p.cli_path}
            for p in info.providers
        ],
        host={"hostname": info.host.hostname, "os": info.host.os, "arch": info.host.arch},
        capabilities=list(info.capabilities),
    )
    if info.drain_deadline_unix_nano:
        row["drain_deadline_unix_nano"] = info.drain_deadline_unix_nano
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("NODE", "STATE", "HEALTH", "EPOCH", "LOAD", "HEARTBEAT", "PROVIDERS")
    lines = [head]
    errors = []
    for row in rows:
        if "error" in row:
            e = row["error"]
            lines.append((row["node"], "error", "-", "-", "-", "-", f"{e.get('reason') or e['kind']}"))
            errors.append(f"  {row['node']}: {e['message']}")
            continue
        provs = ", ".join(f"{p['name']} {p['version']}".strip() if p["available"] else f"{p['name']} (missing)"
                          for p in row["providers"])
        load = f"{row['load']['active_runs']}/{row['load']['max_runs']}"
        extra = ""
        if "preflight" in row:
            pf = row["preflight"]
            extra = " | preflight ok" if pf["ok"] else \
                f" | preflight {pf['error'].get('reason') or pf['error']['kind']}: {pf['error']['message']}"
        state = row["state"]
        if row.get("drain_deadline_unix_nano"):
            left = max(0.0, (row["drain_deadline_unix_nano"] - time.time_ns()) / 1e9)
            state = f"{state} (deadline in {left:.0f}s)"
        lines.append((row["node"], state, row["health"], row["epoch"][-10:], load,
                      f"{row['heartbeat_age_s']:.1f}s", provs + extra))
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(head) - 1)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + str(r[-1]) for r in lines]
    return "\n".join(out + errors) + "\n"


async def _nodes(args: argparse.Namespace) -> int:
    if bool(args.controller) == bool(args.node):
        raise ConfigError("give either --node HOST:PORT (repeatable) or --controller HOST:PORT")
    rounds = 0
    while True:
        rows = await (_controller_rows(args) if args.controller else _direct_rows(args))
        if args.output == "json":
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        else:
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
                sys.stdout.write(time.strftime("%H:%M:%S ") + f"every {args.watch:g}s (Ctrl-C to stop)\n")
            sys.stdout.write(_table(rows))
        sys.stdout.flush()
        rounds += 1
        if not args.watch or (args.watch_count and rounds >= args.watch_count):
            break
        await asyncio.sleep(args.watch)
    failed = any("error" in r or not r.get("preflight", {"ok": True})["ok"] for r in rows)
    return EXIT_NODE if failed else EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_nodes(args))
    except KeyboardInterrupt:
        return EXIT_OK


# -- asm controller serve -------------------------------------------------------------


def _controller_state(args: argparse.Namespace) -> str:
    """--state as given, else SQLite in --state-dir (default: the per-user state directory)."""
    if args.state:
        return str(args.state)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    state_dir = Path(args.state_dir) if args.state_dir else Path(base) / "asm" / "controller"
    return f"sqlite:///{state_dir.resolve() / 'controller.sqlite3'}"


def cmd_controller_serve(args: argparse.Namespace) -> int:
    from asm_controller.service import ControllerConfig, serve_controller

    secrets = _take_secrets(getattr(args, "reexec_argv", None))
    token = _read_token(args.token_file, secrets)
    node_token = _read_token(args.node_token_file) if args.node_token_file else token
    node_tls = None
    if args.node_tls_ca or args.node_tls_cert or args.node_tls_key:
        node_tls = TLSConfig.from_files(args.node_tls_ca, args.node_tls_cert, args.node_tls_key)
    config = ControllerConfig(
        listen=args.listen, nodes=list(args.node or []),
        nodes_file=Path(args.nodes_file) if args.nodes_file else None, nodes_dns=args.nodes_dns,
        metrics_listen=args.metrics_listen, token=token, node_token=node_token,
        tokens_file=Path(args.tokens_file) if args.tokens_file else None,
        admin_principals=list(args.admin_principal or []),
        tls_cert=Path(args.tls_cert) if args.tls_cert else None, tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_ca=Path(args.tls_ca) if args.tls_ca else None, node_tls=node_tls, insecure=args.insecure,
        strategy=args.strategy, liveness=LivenessConfig(node_lost_timeout_s=args.node_lost_timeout),
        expected_providers=list(args.expect_provider or []),
        metrics_insecure=args.metrics_insecure,
        limits=dataclasses.replace(ControllerConfig().limits, **_limit_settings(args)),
        state=_controller_state(args), state_max_age_s=args.state_max_age,
        history_max_bytes=args.history_bytes,
    )

    def ready(ctl: Any) -> None:
        metrics = f", metrics on port {ctl.metrics_port}" if ctl.metrics_port else ""
        sys.stderr.write(f"asm controller listening on {args.listen} (port {ctl.port}){metrics}; "
                         f"nodes: {', '.join(t.address for t in ctl.api.targets) or '(none yet)'}\n")
        sys.stderr.flush()

    asyncio.run(serve_controller(config, on_ready=ready))
    return EXIT_OK


# -- asm node drain -----------------------------------------------------------------


async def _controller_call(args: argparse.Namespace, method: str, request: Any) -> pb.DrainResponse:
    """One ControllerService call (DrainNode, UndrainNode) with this command's credentials; typed errors."""
    from asm_wire.v1 import node_pb2_grpc

    (target,) = _remote_nodes(argparse.Namespace(**{**vars(args), "node": [args.controller]}))
    client = GrpcNodeClient(target)
    try:
        stub = node_pb2_grpc.ControllerServiceStub(client.channel)
        try:
            resp: pb.DrainResponse = await getattr(stub, method)(request, metadata=client._md,
                                                                  timeout=target.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata())
            if err.kind in ("connection_failed", "transport_error") and not err.reason:
                raise NodeUnreachable(f"controller {args.controller}: {err.message}") from None
            raise err from None
    finally:
        await client.close()
    return resp


def _drain_row(address: str, resp: pb.DrainResponse) -> dict[str, Any]:
    state = pb.NodeState.Name(resp.state).removeprefix("NODE_STATE_").lower()
    return {"node": address, "state": state, "active_runs": resp.active_runs,
            "deadline_unix_nano": resp.deadline_unix_nano}


async def _drain(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    failed = False
    if args.controller:
        for address in args.node:
            resp = await _controller_call(args, "DrainNode", pb.DrainNodeRequest(
                address=address, deadline_ms=int(args.deadline * 1000)))
            rows.append(_drain_row(address, resp))
    for target in [] if args.controller else _remote_nodes(args):
        try:
            handle = await connect(target)
        except NodeNotReady:
            # Already draining: report its state instead of failing.
            from asm_controller import GrpcNodeClient

            client = GrpcNodeClient(target)
            try:
                resp = await client.drain(pb.DrainRequest(deadline_ms=int(args.deadline * 1000)))
            finally:
                await client.close()
        except AsmError as err:
            rows.append({"node": target.address, "error": err.to_dict()})
            failed = True
            continue
        else:
            try:
                resp = await handle.api.drain(pb.DrainRequest(deadline_ms=int(args.deadline * 1000)))
            finally:
                await handle.close()
        rows.append(_drain_row(target.address, resp))
    for row in rows:
        if args.output == "json":
            continue
        if "error" in row:
            sys.stdout.write(f"{row['node']:<22} ERROR  {row['error'].get('reason') or row['error']['kind']}: "
                             f"{row['error']['message']}\n")
        else:
            sys.stdout.write(f"{row['node']:<22} {row['state']} ({row['active_runs']} active run(s); "
                             f"interrupted after {args.deadline:g}s)\n")
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    return EXIT_NODE if failed else EXIT_OK


def cmd_node_drain(args: argparse.Namespace) -> int:
    return asyncio.run(_drain(args))


async def _undrain(args: argparse.Namespace) -> int:
    """Cancel drains: the nodes take runs again; their running runs are not interrupted at the old deadline."""
    rows: list[dict[str, Any]] = []
    if args.controller:
        for address in args.node:
            rows.append(_drain_row(address, await _controller_call(
                args, "UndrainNode", pb.UndrainNodeRequest(address=address))))
    else:
        for target in _remote_nodes(args):
            # No connect(): its readiness check refuses the very node being undrained.
            client = GrpcNodeClient(target)
            try:
                rows.append(_drain_row(target.address, await client.undrain(pb.UndrainRequest())))
            finally:
                await client.close()
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        for row in rows:
            sys.stdout.write(f"{row['node']:<22} {row['state']} ({row['active_runs']} active run(s))\n")
    return EXIT_OK


def cmd_node_undrain(args: argparse.Namespace) -> int:
    return asyncio.run(_undrain(args))


# -- asm providers ------------------------------------------------------------------


def cmd_providers(args: argparse.Namespace) -> int:
    from asm_node.providers.features import manifests

    rows = manifests()
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    for m in rows:
        sys.stdout.write(f"{m['provider']} ({m['display_name']}{', CLI path from $' + m['env_var'] if m['env_var'] else ''})\n")
        for mode, info in m["permission_modes"].items():
            flags = " ".join(info.get("cli_args", [])) or "(no flag)"
            text = f"{info['native']}: {flags}" if info["supported"] else f"refused: {info['reason']}"
            sys.stdout.write(f"  permission {mode:<8} {text}\n")
        for feat, info in m["common_features"].items():
            sys.stdout.write(f"  {feat:<10} {'yes' if info['supported'] else 'no ':<4} {info['notes']}\n")
        sys.stdout.write(f"  options any client may set: {', '.join(m['client_options'])}\n")
        if m["operator_options"]:
            sys.stdout.write(f"  operator-only (asm node serve --allow-run-option NAME): "
                             f"{', '.join(m['operator_options'])}\n")
        if m["node_only_options"]:
            sys.stdout.write(f"  node configuration only, never a run's: {', '.join(m['node_only_options'])} "
                             f"(set ${m['env_var']})\n")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asm", description="Run AI coding-agent CLIs on remote machines.")
    parser.add_argument("--version", action="version", version=f"asm {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    node = sub.add_parser("node", help="node agent commands")
    node_sub = node.add_subparsers(dest="node_command", required=True, parser_class=_Parser)
    s = node_sub.add_parser("serve", help="serve a node agent")
    s.add_argument("--listen", required=True, metavar="HOST:PORT")
    s.add_argument("--token-file", metavar="F", help="bearer token clients must present (or env ASM_TOKEN)")
    s.add_argument("--tokens-file", metavar="F",
                   help="named client tokens, NAME:TOKEN[:admin] per line; each name owns its runs")
    s.add_argument("--admin-principal", action="append", metavar="NAME",
                   help="client-certificate principal (cn:<CN>) with the admin role (repeatable)")
    _tls_args(s, server=True)
    s.add_argument("--workspace-root", action="append", metavar="DIR", help="runs' cwd must be inside (repeatable)")
    s.add_argument("--max-runs", type=int, metavar="N", help="concurrent runs (default 8)")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback listen address without auth")
    s.add_argument("--node-id", help="node id (default: the hostname)")
    s.add_argument("--shell-allow", action="append", metavar="CMD", help="add a command to the shell allow-list (a name on the node's PATH, or an absolute path)")
    s.add_argument("--shell-allow-interpolation", action="store_true", help="let runs ask for /bin/sh -c")
    s.add_argument("--shell-unconfined-reads", action="store_true",
                   help="let cat/head/tail/ls/wc/date read outside the workspace roots (/proc, /sys, /dev stay refused)")
    s.add_argument("--shell-max-prompt-bytes", type=int, metavar="N",
                   help="refuse longer shell command lines before parsing (default 65536)")
    s.add_argument("--env-allow", action="append", metavar="VAR", help="env var a run request may set")
    s.add_argument("--allow-run-option", action="append", metavar="NAME",
                   help="operator-only provider option a run may set, e.g. args or anthropic_base_url "
                        "(repeatable; see 'asm providers')")
    s.add_argument("--detach-grace", type=float, metavar="SECONDS", help="interrupt runs left unattached this long")
    s.add_argument("--retention-seconds", type=float, metavar="S",
                   help="keep finished runs attachable this long (default 300)")
    s.add_argument("--retention-runs", type=int, metavar="N", help="keep at most N finished runs (default 1000)")
    s.add_argument("--retention-bytes", type=int, metavar="B",
                   help="keep at most B bytes of finished runs' events (default 268435456)")
    s.add_argument("--state-dir", metavar="DIR",
                   help="where the node's run journal lives (default $XDG_STATE_HOME/asm/node or "
                        "~/.local/state/asm/node); one node agent per directory")
    s.add_argument("--journal-max-age", type=float, metavar="S",
                   help="forget journaled runs this many seconds after they ended (default 604800: 7 days)")
    s.add_argument("--backlog-bytes", type=int, metavar="B",
                   help="stop reading a CLI's stdout while its attached client is this far behind "
                        "(default 33554432)")
    s.add_argument("--replay-bytes", type=int, metavar="B",
                   help="keep at most B bytes of a running run's sent events for re-attach (default 67108864)")
    s.add_argument("--replay-node-bytes", type=int, metavar="B",
                   help="... and of all running runs together (default 268435456)")
    s.add_argument("--line-cap", type=int, metavar="BYTES", help="longest stdout line accepted (default 8 MiB)")
    s.add_argument("--label", action="append", metavar="KEY=VALUE", help="node label for routing selectors")
    s.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    _limit_args(s)
    s.set_defaults(func=cmd_node_serve)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--token-file", metavar="F", help="bearer token file (default: env ASM_TOKEN)")
        _tls_args(p, server=False)
        p.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS")

    d = node_sub.add_parser("drain", help="stop a node taking runs; interrupt its runs after a deadline")
    d.add_argument("--node", action="append", required=True, metavar="HOST:PORT")
    d.add_argument("--controller", metavar="HOST:PORT", help="drain --node through this controller (DrainNode)")
    d.add_argument("--deadline", type=float, default=300.0, metavar="SECONDS",
                   help="in-flight runs are interrupted after this long (default 300)")
    d.add_argument("--output", default="text", choices=["text", "json"])
    client_args(d)
    d.set_defaults(func=cmd_node_drain)
    ud = node_sub.add_parser("undrain", help="cancel a drain: the node takes runs again, nothing is interrupted")
    ud.add_argument("--node", action="append", required=True, metavar="HOST:PORT")
    ud.add_argument("--controller", metavar="HOST:PORT", help="undrain --node through this controller (UndrainNode)")
    ud.add_argument("--output", default="text", choices=["text", "json"])
    client_args(ud)
    ud.set_defaults(func=cmd_node_undrain)

    r = sub.add_parser("run", help="run a prompt on a node (an embedded one when no --node is given)")
    r.add_argument("--node", action="append", metavar="HOST:PORT", help="node to run on; repeat to fail over")
    r.add_argument("--controller", metavar="HOST:PORT", help="run through a controller service (it picks the node)")
    r.add_argument("--provider", required=True, help="claude, codex, gemini, amp or shell")
    r.add_argument("--cwd", metavar="DIR", help="working directory on the node")
    r.add_argument("--permission-mode", default="default", choices=["default", "auto", "bypass", "plan"])
    r.add_argument("--output", default="text", choices=["text", "jsonl"])
    r.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="provider option (repeatable)")
    r.add_argument("--run-id", help="run id (default: a new ULID); an existing id on the node attaches")
    r.add_argument("--record", metavar="PATH",
                   help="append the run's events to this event store (JSON lines; see 'asm replay'); "
                        "a file that is not one is refused; exit 1 if some events could not be recorded")
    r.add_argument("--snapshot", nargs="?", const="auto", choices=["auto", "git", "hash"],
                   help="snapshot the workspace before and after (git when it is a repository); diff in the result")
    r.add_argument("--strategy", default="priority", choices=["priority", "round_robin", "weighted"],
                   help="how to pick among several --node (HOST:PORT[,weight=N][,priority=N])")
    r.add_argument("--selector", action="append", metavar="KEY=VALUE", help="only nodes with this label")
    r.add_argument("--on-node-lost", default="fail", choices=["fail", "resume"],
                   help="resume: continue the provider session on another node (shared workspace only)")
    r.add_argument("--node-lost-timeout", type=float, default=8.0, metavar="SECONDS",
                   help="a node silent this long is lost and its run ends with node_lost (default 8)")
    client_args(r)
    r.add_argument("prompt", metavar="PROMPT")
    r.set_defaults(func=cmd_run)

    at = sub.add_parser("attach", help="follow an existing run to its end (replay, then live); never starts one")
    at.add_argument("run_id", metavar="RUN_ID")
    where = at.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", metavar="HOST:PORT", help="the node the run is on")
    where.add_argument("--controller", metavar="HOST:PORT", help="the controller the run was started through")
    at.add_argument("--output", default="text", choices=["text", "jsonl"])
    at.add_argument("--after-seq", type=_seq_arg, default=0, metavar="N",
                    help="only the events after seq N (e.g. the last one you saw; default 0: all held)")
    client_args(at)
    at.set_defaults(func=cmd_attach)

    rs = sub.add_parser("runs", help="the runs a node holds, or a controller knows: a table or JSON")
    where = rs.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", metavar="HOST:PORT")
    where.add_argument("--controller", metavar="HOST:PORT")
    rs.add_argument("--status", metavar="S", help="only runs in this status (running, completed, failed, ...)")
    rs.add_argument("--limit", type=_limit_arg, default=0, metavar="N",
                    help="at most the N most recently started runs (default: the server's, 1000)")
    rs.add_argument("--output", default="text", choices=["text", "json"])
    client_args(rs)
    rs.set_defaults(func=cmd_runs)

    c = sub.add_parser("controller", help="controller service commands")
    c_sub = c.add_subparsers(dest="controller_command", required=True, parser_class=_Parser)
    cs = c_sub.add_parser("serve", help="serve a long-running controller in front of a fleet of nodes")
    cs.add_argument("--listen", required=True, metavar="HOST:PORT")
    cs.add_argument("--node", action="append", metavar="HOST:PORT", help="a node of the fleet (repeatable)")
    cs.add_argument("--nodes-file", metavar="F", help="file with one HOST:PORT per line (re-read periodically)")
    cs.add_argument("--nodes-dns", metavar="NAME:PORT",
                    help="DNS name resolving to every node (e.g. a Kubernetes headless Service); re-resolved")
    cs.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    _limit_args(cs)
    cs.add_argument("--token-file", metavar="F", help="bearer token clients must present (or env ASM_TOKEN)")
    cs.add_argument("--tokens-file", metavar="F",
                    help="named client tokens, NAME:TOKEN[:admin] per line; each name owns its runs")
    cs.add_argument("--admin-principal", action="append", metavar="NAME",
                    help="client-certificate principal (cn:<CN>) with the admin role (repeatable)")
    cs.add_argument("--node-token-file", metavar="F", help="token for the nodes (default: the same token)")
    _tls_args(cs, server=True)
    cs.add_argument("--node-tls-ca", metavar="F", help="CA of the nodes' certificates")
    cs.add_argument("--node-tls-cert", metavar="F", help="client certificate for the nodes (mutual TLS)")
    cs.add_argument("--node-tls-key", metavar="F", help="its key")
    cs.add_argument("--insecure", action="store_true", help="allow a non-loopback listen address without auth")
    cs.add_argument("--strategy", default="priority", choices=["priority", "round_robin", "weighted"])
    cs.add_argument("--node-lost-timeout", type=float, default=8.0, metavar="SECONDS")
    cs.add_argument("--state", metavar="URL",
                    help="the run registry: sqlite:///PATH, postgresql://USER:PASS@HOST:PORT/DB or memory: "
                         "(default: SQLite in --state-dir)")
    cs.add_argument("--state-dir", metavar="DIR",
                    help="where the default SQLite registry lives (default $XDG_STATE_HOME/asm/controller, "
                         "else ~/.local/state/asm/controller)")
    cs.add_argument("--state-max-age", type=_positive_float, default=7 * 86400.0, metavar="SECONDS",
                    help="ended runs leave the registry after this long (default 7 days)")
    cs.add_argument("--history-bytes", type=_positive_int, default=64 * 2**20, metavar="N",
                    help="per-run bound of the registry's event log (default 64 MiB)")
    cs.add_argument("--expect-provider", action="append", metavar="NAME",
                    help="a provider the fleet must offer: NoHealthyNodeForProvider alerts for it even before any "
                         "node advertised it (repeatable)")
    cs.set_defaults(func=cmd_controller_serve)

    rp = sub.add_parser("replay", help="print a recorded run's events and its Result, rebuilt from an event store")
    rp.add_argument("path", metavar="PATH", help="an event store written by 'asm run --record'")
    rp.add_argument("--session", metavar="ID", help="this session's runs (every one unless --run is given)")
    rp.add_argument("--run", metavar="ID", help="this run (default: the last run recorded in the file)")
    rp.add_argument("--output", default="text", choices=["text", "jsonl"])
    rp.add_argument("--allow-damaged", action="store_true",
                    help="exit 0 for a damaged store (the damage is still reported in the summary and on stderr)")
    rp.set_defaults(func=cmd_replay)

    pr = sub.add_parser("providers", help="what each provider supports (permission modes, features, options)")
    pr.add_argument("--output", default="text", choices=["text", "json"])
    pr.set_defaults(func=cmd_providers)

    n = sub.add_parser("nodes", help="the fleet as a table: state, epoch, load, providers, heartbeat age")
    n.add_argument("--node", action="append", metavar="HOST:PORT")
    n.add_argument("--controller", metavar="HOST:PORT", help="ask a controller for its fleet")
    n.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    n.add_argument("--watch-count", type=int, default=0, help=argparse.SUPPRESS)
    n.add_argument("--provider", help="also preflight this provider")
    n.add_argument("--cwd", metavar="DIR", help="cwd to preflight")
    n.add_argument("--output", default="table", choices=["table", "json"])
    client_args(n)
    n.set_defaults(func=cmd_nodes)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # A server started from the command line may re-execute itself (see _take_secrets); an in-process call never.
    args.reexec_argv = list(sys.argv[1:]) if argv is None else None
    # `*_created` series double every counter for no use on a dashboard.
    disable_created: Callable[[], None] = prometheus_client.disable_created_metrics
    disable_created()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        _fail(problems)
    except NodeConnectionError as exc:
        _fail(exc.message, EXIT_NODE)
    except AsmError as exc:
        _fail(exc.message, EXIT_USAGE if exc.kind == "config_invalid" else
              EXIT_NOT_FOUND if exc.kind == "not_found" else EXIT_FAILED)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # `asm ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_OK)
    sys.exit(code)


if __name__ == "__main__":
    main()
