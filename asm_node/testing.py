"""Test helpers for code that runs on, or talks to, an asm node (shipped, so nobody copies them).

* :class:`ScriptedProvider`: a provider whose "CLI" is this Python printing given lines (or
  running a given script), parsed by :class:`ScriptedParser`'s small JSON-lines dialect.
* :func:`running_agent` / :func:`running_server`: an in-process :class:`~asm_node.NodeAgent`
  (for ``EmbeddedNode``) or a gRPC :class:`~asm_node.NodeServer` on ``127.0.0.1:0``, stopped on exit.
* :func:`serve_node` / :func:`serve_controller`: ``asm node serve`` / ``asm controller serve`` as a
  subprocess (:class:`ServedProcess`), ready once a gRPC Handshake on its port is answered; no log
  scraping (the port is picked here and passed with ``--listen``).

The scripted dialect, one JSON object per stdout line (any other line is assistant text)::

    {"text": "..."}                       assistant_delta
    {"tool": "Bash", "id": "t1"}          tool_use
    {"cost": [input_tokens, output_tokens]}  cost_update (0.5 USD)
    {"approval": "ap-1", "tool": "Bash"}  approval_requested
    {"result": [input_tokens, output_tokens]}  result (completed, end_turn): the run is terminal
    {"error": "message"}                  a fatal error

On exit without a result the parser reports ``completed``/``exit`` with the exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from asm_node.agent import NodeAgent
from asm_node.config import NodeConfig
from asm_node.providers import CommandSpec, ExitInfo, LineParser, Provider, ProviderStatus, RunSpec
from asm_node.providers.base import error_event, result_event
from asm_node.server import NodeServer, start_server
from asm_wire import KIND_VALUES, PROTOCOL_VERSION, __version__, pb

__all__ = [
    "PYTHON_BASENAME", "ScriptedParser", "ScriptedProvider", "ServedProcess", "free_port", "handshake",
    "running_agent", "running_server", "serve_controller", "serve_node", "test_config", "wait_serving",
]

#: The name of this interpreter, for ``shell_allowed_commands`` (a scripted CLI runs it).
PYTHON_BASENAME = os.path.basename(sys.executable)


class ScriptedParser(LineParser):
    """Parses the scripted dialect (see the module docstring) into events."""

    def feed_lines(self, lines: list[bytes], out: list[pb.Event]) -> None:
        for line in lines:
            try:
                d = json.loads(line)
            except ValueError:
                d = None
            if not isinstance(d, dict):
                ev = pb.Event(kind=KIND_VALUES["assistant_delta"])
                ev.assistant_delta.content = line.decode(errors="replace")
                out.append(ev)
            elif "approval" in d:
                out.append(pb.Event(kind=KIND_VALUES["approval_requested"], approval_requested=pb.ApprovalRequested(
                    approval_id=d["approval"], subject=d.get("tool", ""))))
            elif "tool" in d:
                out.append(pb.Event(kind=KIND_VALUES["tool_use"], tool_use=pb.ToolUse(
                    tool_name=d["tool"], tool_call_id=d.get("id", "t1"), input_json=json.dumps({"command": "x"}))))
            elif "cost" in d:
                out.append(pb.Event(kind=KIND_VALUES["cost_update"], cost_update=pb.CostUpdate(
                    input_tokens=d["cost"][0], output_tokens=d["cost"][1], cost_usd=0.5)))
            elif "result" in d:
                self.terminal = True
                out.append(result_event("completed", "end_turn", {"usage": {"input_tokens": d["result"][0],
                                                                            "output_tokens": d["result"][1]}}))
            elif "error" in d:
                self.terminal = self.failed = True
                out.append(error_event("unknown", "provider", str(d["error"])))
            else:
                ev = pb.Event(kind=KIND_VALUES["assistant_delta"])
                ev.assistant_delta.content = str(d.get("text", ""))
                out.append(ev)

    def finish(self, exit: ExitInfo) -> list[pb.Event]:
        return [] if self.terminal else [result_event("completed", "exit", {"exit_code": exit.returncode})]


_PRINT_LINES = "import sys\nfor line in sys.argv[1:]:\n    print(line, flush=True)\n"


class ScriptedProvider(Provider):
    """A provider whose CLI is ``python -c SCRIPT``: it prints ``lines``, or runs ``script``.

    ``lines`` are strings or JSON-able objects (one stdout line each). ``script`` is Python source;
    ``args(spec)`` gives its ``sys.argv[1:]`` (for instance the prompt). ``stdin=True`` keeps the
    CLI's stdin open for ``SendInput`` and approval answers. Options are passed through unchecked.
    """

    def __init__(
        self, lines: Iterable[str | Mapping[str, Any]] | None = None, *, script: str | None = None,
        args: Callable[[RunSpec], Sequence[str]] | None = None, name: str = "scripted",
        display_name: str = "Scripted", stdin: bool = False,
        parser: Callable[[], LineParser] = ScriptedParser,
    ) -> None:
        if (lines is None) == (script is None):
            raise ValueError("ScriptedProvider takes lines or a script (one of them)")
        self.name = name
        self.display_name = display_name
        self.script = script if script is not None else _PRINT_LINES
        self.lines = [ln if isinstance(ln, str) else json.dumps(dict(ln)) for ln in (lines or ())]
        self.args = args
        self.stdin = stdin
        self.parser = parser

    def status(self, env: Mapping[str, str], probe_version: bool = True) -> ProviderStatus:
        return ProviderStatus(available=True, cli_path=sys.executable, version="test")

    def validate_options(self, options: Mapping[str, Any], permission_mode: str) -> dict[str, Any]:
        return dict(options)

    def build_command(self, spec: RunSpec) -> CommandSpec:
        extra = list(self.args(spec)) if self.args is not None else self.lines
        return CommandSpec(argv=[sys.executable, "-c", self.script, *extra], cwd=spec.cwd, env=dict(spec.env),
                           stdin=self.stdin)

    def new_parser(self, spec: RunSpec) -> LineParser:
        return self.parser()


def test_config(**overrides: Any) -> NodeConfig:
    """A :class:`NodeConfig` for tests: ``127.0.0.1:0``, short graces, this Python and ``sh`` allowed."""
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0", "interrupt_grace_s": 1.0, "term_grace_s": 1.0, "exit_grace_s": 0.5,
        "shell_allowed_commands": [*NodeConfig().shell_allowed_commands, PYTHON_BASENAME, "python3", "sh"],
    }
    base.update(overrides)
    return NodeConfig(**base)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name


@contextlib.asynccontextmanager
async def running_agent(config: NodeConfig | None = None, *,
                        providers: Mapping[str, Provider] | None = None) -> AsyncIterator[NodeAgent]:
    """A started in-process node agent (use it as ``EmbeddedNode(agent)``), stopped on exit."""
    agent = NodeAgent(config or test_config(), providers=dict(providers) if providers is not None else None)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


@contextlib.asynccontextmanager
async def running_server(config: NodeConfig | None = None, *,
                         agent: NodeAgent | None = None) -> AsyncIterator[NodeServer]:
    """A node agent behind a real gRPC server in this process (``server.port``), stopped on exit."""
    server = await start_server(config or test_config(), agent)
    try:
        yield server
    finally:
        await server.stop()


# -- served processes -------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out (bound, then closed) for a child to listen on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_HANDSHAKE = "/asm.v1.NodeService/Handshake"  # the sync call; the generated stub's stubs type it as aio-only


def handshake(address: str, token: str | None = None, timeout: float = 2.0) -> pb.HandshakeResponse:
    """One plaintext gRPC Handshake (nodes and controllers both answer it); raises grpc.RpcError."""
    md = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(_HANDSHAKE, request_serializer=pb.HandshakeRequest.SerializeToString,
                                   response_deserializer=pb.HandshakeResponse.FromString)
        resp: pb.HandshakeResponse = call(
            pb.HandshakeRequest(controller_version=__version__, protocol_version=PROTOCOL_VERSION),
            metadata=md, timeout=timeout)
        return resp


def wait_serving(address: str, *, token: str | None = None, timeout: float = 20.0,
                 alive: Callable[[], bool] = lambda: True) -> pb.HandshakeResponse | None:
    """Poll the Handshake until the server answers; its response, or None if it answered with a refusal
    (an auth error still proves it serves). Raises TimeoutError, or RuntimeError once ``alive()`` is false."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise RuntimeError("the server exited before it served")
        try:
            return handshake(address, token, timeout=max(0.2, min(2.0, deadline - time.monotonic())))
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None  # it answered: serving, but not to us (a token we do not know)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing answered a handshake on {address} within {timeout:g}s")
        time.sleep(0.05)


@dataclass
class ServedProcess:
    """A served ``asm`` process on 127.0.0.1: its Popen, port, stderr log and first handshake."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    info: pb.HandshakeResponse | None = field(default=None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def epoch(self) -> str:
        """The boot epoch from the readiness handshake ("" if it was refused for want of a token)."""
        return self.info.boot_epoch if self.info is not None else ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal it (by PID), wait up to ``timeout``, then kill; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _flag(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _token(args: Sequence[str], env: Mapping[str, str], token: str | None) -> str | None:
    """The token to handshake with: given, else ``--token-file``'s, else ASM_TOKEN or ASM_NODE_TOKEN (the
    serve commands' own precedence)."""
    if token is not None:
        return token
    path = _flag(args, "--token-file")
    if path is not None:
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip() or None
    return env.get("ASM_TOKEN") or env.get("ASM_NODE_TOKEN") or None


def _serve(command: Sequence[str], log_path: Path, args: Sequence[str], *, listen: str, env: Mapping[str, str],
           cwd: Path, timeout: float, token: str | None, python_flags: Sequence[str], what: str) -> ServedProcess:
    host, _, fixed = listen.rpartition(":")
    tries = 1 if int(fixed) else 3  # a port picked here may be taken before the child binds it
    for attempt in range(tries):
        port = int(fixed) or free_port(host)
        argv = [sys.executable, *python_flags, "-m", "asm_cli", *command, "--listen", f"{host}:{port}", *args]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=dict(env), cwd=str(cwd))
        alive = (lambda p: lambda: p.poll() is None)(proc)
        try:
            info = wait_serving(f"127.0.0.1:{port}", token=_token(args, env, token), timeout=timeout, alive=alive)
        except RuntimeError:
            text = log_path.read_text(errors="replace")
            if attempt + 1 < tries and "in use" in text.lower():
                continue
            raise RuntimeError(f"{what} exited early ({proc.returncode}): {text}") from None
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{what} did not become ready: {log_path.read_text(errors='replace')}") from None
        return ServedProcess(proc, port, log_path, info)
    raise AssertionError("unreachable")


def serve_node(directory: Path, *args: str, listen: str = "127.0.0.1:0", env: Mapping[str, str] | None = None,
               inherit: bool = True, cwd: Path | None = None, timeout: float = 20.0, token: str | None = None,
               python_flags: Sequence[str] = ()) -> ServedProcess:
    """``asm node serve --listen LISTEN ARGS`` (port 0: one picked here) in ``cwd`` (default
    ``directory``), its stderr in a log under ``directory``.

    Returned once it answers a handshake: with ``token``, else the one of ``--token-file``, ASM_TOKEN
    or ASM_NODE_TOKEN (a refused handshake is ready too, with no epoch). Unless ARGS or ``env`` name
    a state dir, it journals in its own (a fixed run id must not meet another node's outcome).
    ``inherit=False``: only ``env``, not os.environ. ``python_flags`` go before ``-m`` (``-I`` runs
    as the installed console script does)."""
    log_path = directory / f"node-{time.monotonic_ns()}.log"
    full = {**(os.environ if inherit else {}), **(env or {})}
    if "--state-dir" not in args and "ASM_NODE_STATE_DIR" not in (env or {}):
        full["ASM_NODE_STATE_DIR"] = str(log_path.with_suffix(".state"))
    return _serve(("node", "serve"), log_path, args, listen=listen, env=full, cwd=cwd or directory, timeout=timeout,
                  token=token, python_flags=python_flags, what="node agent")


def serve_controller(directory: Path, *args: str, listen: str = "127.0.0.1:0", env: Mapping[str, str] | None = None,
                     timeout: float = 20.0, token: str | None = None) -> ServedProcess:
    """``asm controller serve --listen LISTEN ARGS`` (port 0: one picked here) in ``directory``,
    returned once it answers a handshake; its own registry (``--state-dir`` under ``directory``)
    unless ARGS name one."""
    log_path = directory / f"controller-{time.monotonic_ns()}.log"
    if "--state" not in args and "--state-dir" not in args:
        args = (*args, "--state-dir", str(log_path.with_suffix(".state")))
    return _serve(("controller", "serve"), log_path, args, listen=listen, env={**os.environ, **(env or {})},
                  cwd=directory, timeout=timeout, token=token, python_flags=(), what="controller")
