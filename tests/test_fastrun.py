"""The fast ``asm run --node`` path (asm_cli.commands._fastrun) behaves like the Session path.

Each scenario runs twice against the same real node agent process -- the fast path (the default) and
the Session path (``ASM_FAST_CLIENT=0``) -- and compares stdout (text and jsonl, ids, timestamps and
durations aside), stderr and the exit code. Which path ran is read from the modules the process had
imported when it exited: the fast path imports no grpc; a hand-over to the Session path does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asm_cli.commands import _fastrun
from tests.support.cli import ASM
from tests.support.processes import ROOT, NodeProcess
from tests.test_approvals_cli import RUN as APPROVAL_RUN
from tests.test_approvals_cli import answers
from tests.test_approvals_cli import fake_claude as fake_claude  # (the fixture, re-exported for pytest)
from tests.test_security import Pki
from tests.test_security import pki as pki  # (the fixture, re-exported for pytest)

_VARYING = {"id", "run_id", "session_id", "timestamp", "pid", "duration_ms", "node_epoch"}
_ULID = re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b")
_TIME = re.compile(r"\b\d+(\.\d+)?(ms|s)\b")


class Ran:
    def __init__(self, proc: subprocess.CompletedProcess[str], modules: set[str]) -> None:
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.modules = modules

    @property
    def fast(self) -> bool:
        """Ran on the fast path to its end (no grpc, the fast client)."""
        return "grpc" not in self.modules and "asm_cli._fastrpc._client" in self.modules


def _wrapper(listing: str, args: list[str]) -> list[str]:
    code = ("import atexit, runpy, sys\n"
            f"atexit.register(lambda: open({listing!r}, 'w').write('\\n'.join(sys.modules)))\n"
            f"sys.argv = ['asm', *{args!r}]\n"
            "runpy.run_module('asm_cli', run_name='__main__', alter_sys=True)\n")
    return [ASM[0], "-c", code]


def _env(fast: bool, extra: dict[str, str] | None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env.pop("ASM_FAST_CLIENT", None)
    if not fast:
        env["ASM_FAST_CLIENT"] = "0"
    return env


def run(fast: bool, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Ran:
    with tempfile.NamedTemporaryFile("r", suffix=".modules") as listing:
        proc = subprocess.run(_wrapper(listing.name, list(args)), capture_output=True, text=True, timeout=timeout,
                              cwd=str(ROOT), env=_env(fast, env), stdin=subprocess.DEVNULL)
        return Ran(proc, set(listing.read().split()))


def _norm(value: Any) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in _VARYING:
                out[k] = "*"
            elif k == "asm.controller" and isinstance(v, str):
                out[k] = _norm(json.loads(v))
            else:
                out[k] = _norm(v)
        return out
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, str):
        return _TIME.sub("T", _ULID.sub("ULID", value))
    return value


def norm_jsonl(text: str) -> list[Any]:
    return [_norm(json.loads(line)) for line in text.splitlines()]


def norm_text(text: str) -> str:
    return _TIME.sub("T", _ULID.sub("ULID", text))


def same(fast: Ran, usual: Ran, jsonl: bool) -> None:
    assert fast.code == usual.code, (fast.stderr, usual.stderr)
    assert norm_text(fast.stderr) == norm_text(usual.stderr)
    if jsonl:
        assert norm_jsonl(fast.stdout) == norm_jsonl(usual.stdout)
    else:
        assert norm_text(fast.stdout) == norm_text(usual.stdout)
    assert not usual.fast and "Traceback" not in fast.stderr


@pytest.mark.parametrize("output", ["text", "jsonl"])
@pytest.mark.parametrize(("command", "code"), [("echo hi", 0), ("false", 1), ("cat /etc/hostname", 1),
                                               ("echo a; echo b", 1)])
def test_runs_print_and_exit_the_same(node_process: Callable[..., NodeProcess], output: str, command: str,
                                      code: int) -> None:
    node = node_process()
    args = ("run", "--node", node.address, "--provider", "shell", "--output", output, command)
    fast, usual = run(True, *args), run(False, *args)
    same(fast, usual, output == "jsonl")
    assert fast.code == code
    # A run the node refuses before it starts (a guardrail on StartRun) is handed to the usual path whole.
    assert fast.fast == (command in ("echo hi", "false"))


def test_a_provider_the_node_lacks(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    for output in ("text", "jsonl"):
        args = ("run", "--node", node.address, "--provider", "nosuch", "--output", output, "x")
        fast, usual = run(True, *args), run(False, *args)
        same(fast, usual, output == "jsonl")
        assert fast.code == 3 and "is not available on node" in fast.stderr


def test_an_unreachable_node() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    for output in ("text", "jsonl"):
        args = ("run", "--node", address, "--provider", "shell", "--output", output, "echo hi")
        fast, usual = run(True, *args), run(False, *args)
        same(fast, usual, output == "jsonl")
        assert fast.code == 3 and "unreachable" in fast.stderr


def test_a_bad_token_and_a_good_one(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    node = node_process("--token-file", str(token_file))
    args = ("run", "--node", node.address, "--provider", "shell", "--output", "jsonl", "echo hi")
    fast, usual = run(True, *args, env={"ASM_TOKEN": "wrong"}), run(False, *args, env={"ASM_TOKEN": "wrong"})
    same(fast, usual, True)
    assert fast.code == 3 and "credentials" in fast.stderr
    fast, usual = run(True, *args, env={"ASM_TOKEN": "s3cret-token"}), run(False, *args, env={"ASM_TOKEN": "s3cret-token"})
    same(fast, usual, True)
    assert fast.code == 0 and fast.fast


def test_200k_lines_every_one_in_order(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    (tmp_path / "lines.txt").write_text("".join(f"line {i}\n" for i in range(200_000)))
    node = node_process()
    args = ("run", "--node", node.address, "--provider", "shell", "--output", "jsonl", "cat lines.txt")
    fast, usual = run(True, *args), run(False, *args)
    assert fast.fast and fast.code == usual.code == 0
    text = "".join(e["payload"]["content"] for e in map(json.loads, fast.stdout.splitlines())
                   if e["kind"] == "assistant_delta")
    assert text == (tmp_path / "lines.txt").read_text()
    seqs = [e["seq"] for e in map(json.loads, fast.stdout.splitlines()[:-1])]
    assert seqs == list(range(1, len(seqs) + 1))
    assert norm_jsonl(fast.stdout) == norm_jsonl(usual.stdout)  # the same batching of deltas into events


def _interrupted(fast: bool, node: NodeProcess, output: str) -> tuple[int, str, str]:
    with tempfile.NamedTemporaryFile("r", suffix=".modules") as listing:
        proc = subprocess.Popen(_wrapper(listing.name, ["run", "--node", node.address, "--provider", "shell",
                                                        "--output", output, "sleep 30"]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                                env={**_env(fast, None), "NO_COLOR": "1"}, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        if output == "jsonl":
            assert json.loads(proc.stdout.readline())["kind"] == "run_started"
        else:
            time.sleep(2.0)  # (text: nothing is printed before the end) the run is started by then
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        if fast:
            assert "grpc" not in listing.read().split()
    return proc.returncode, out, err


@pytest.mark.parametrize("output", ["jsonl", "text"])
def test_ctrl_c_interrupts_the_same_way(node_process: Callable[..., NodeProcess], output: str) -> None:
    node = node_process()
    code, out, err = _interrupted(True, node, output)
    code2, out2, err2 = _interrupted(False, node, output)
    assert code == code2 == 130
    assert norm_text(err) == norm_text(err2) and "interrupting the run" in err
    if output == "jsonl":
        first = norm_jsonl(out)
        assert first[-1]["status"] == "interrupted" and first == norm_jsonl(out2)
    else:
        assert norm_text(out) == norm_text(out2)


def test_a_second_ctrl_c_exits_at_once(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    proc = subprocess.Popen([*ASM, "run", "--node", node.address, "--provider", "shell", "--output", "jsonl",
                             "sleep 30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env=_env(True, None))
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["kind"] == "run_started"
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupting the run" in err or "interrupted again" in err


@pytest.mark.parametrize("decision", ["allow", "deny"])
def test_an_approval_is_handed_over_and_answered(fake_claude: dict[str, str],
                                                 node_process: Callable[..., NodeProcess], decision: str) -> None:
    node = node_process(env={"CLAUDE_CLI_PATH": fake_claude["CLAUDE_CLI_PATH"], "FAKE_LOG": fake_claude["FAKE_LOG"]})
    args = (APPROVAL_RUN[0], "--node", node.address, "--cwd", fake_claude["WS"], "--approve", decision, "--output",
            "jsonl", *APPROVAL_RUN[1:])
    fast = run(True, *args, env=fake_claude)
    usual = run(False, *args, env=fake_claude)
    assert "asm_cli._fastrpc._client" in fast.modules and not fast.fast  # started fast, then handed over
    same(fast, usual, True)
    events = [json.loads(line) for line in fast.stdout.splitlines()]
    assert [e["seq"] for e in events[:-1]] == list(range(1, len(events)))  # none twice, none lost
    assert sum(e["kind"] == "run_started" for e in events) == 1
    assert answers(fake_claude) == [decision, decision]


def test_lane_metadata_is_the_controllers() -> None:
    from asm_controller._options import lane_metadata

    for requested in ("auto", "core"):
        for remote in (True, False):
            assert _fastrun.lane_metadata(requested, remote) == lane_metadata(requested, remote)


def test_what_takes_the_fast_path() -> None:
    from asm_cli.main import build_parser

    def parsed(*extra: str) -> Any:
        args = build_parser("run").parse_args(["run", "--provider", "shell", *extra, "x"])
        return args

    assert _fastrun.applies(parsed("--node", "127.0.0.1:1"))
    assert _fastrun.applies(parsed("--node", "127.0.0.1:1", "--tls-ca", "ca.pem"))
    assert _fastrun.applies(parsed("--node", "127.0.0.1:1", "--tls-ca", "ca.pem", "--tls-cert", "c", "--tls-key", "k"))
    for extra in (["--node", "a:1", "--node", "b:1"], ["--node", "a:1,weight=2"], ["--controller", "a:1"],
                  ["--node", "a:1", "--record", "r.jsonl"], ["--node", "a:1", "--snapshot", "git"],
                  ["--node", "a:1", "--selector", "k=v"], ["--node", "a:1", "--strategy", "round_robin"],
                  ["--node", "a:1", "--priority", "3"], ["--node", "a:1", "--queue-timeout", "3"],
                  ["--node", "a:1", "--on-node-lost", "resume"], ["--node", "a:1", "--tls-cert", "c.pem"],
                  ["--node", "a:1", "--tls-ca", "ca.pem", "--tls-key", "k.pem"], []):
        assert not _fastrun.applies(parsed(*extra)), extra
    os.environ["ASM_FAST_CLIENT"] = "0"
    try:
        assert not _fastrun.applies(parsed("--node", "127.0.0.1:1"))
    finally:
        del os.environ["ASM_FAST_CLIENT"]


class _Proxy:
    """A TCP proxy to the node whose connections can be cut (a broken transport mid-stream)."""

    def __init__(self, port: int) -> None:
        import socket
        import threading

        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[Any, Any]] = []
        self.accepted = 0
        self._threading = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.pairs.append((client, server))
            self.accepted += 1
            for a, b in ((client, server), (server, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: Any, dst: Any) -> None:
        import socket

        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        import socket

        for pair in self.pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.pairs.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def _cut_mid_run(fast: bool, proxy: _Proxy) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.Popen([*ASM, "run", "--node", f"127.0.0.1:{proxy.port}", "--provider", "shell",
                             "--output", "jsonl", "sleep 3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(ROOT), env=_env(fast, None), stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert json.loads(first)["kind"] == "run_started"
    proxy.cut()  # the stream breaks under the run; the node keeps running it
    out, err = proc.communicate(timeout=60)
    return proc.returncode, [json.loads(line) for line in (first + out).splitlines()], err


def test_a_broken_stream_is_handed_over_and_nothing_is_lost_or_doubled(
        node_process: Callable[..., NodeProcess]) -> None:
    proxy = _Proxy(node_process().port)
    try:
        code, events, err = _cut_mid_run(True, proxy)
        code2, events2, _ = _cut_mid_run(False, proxy)
    finally:
        proxy.close()
    assert code == code2 == 0, err
    assert [e["seq"] for e in events[:-1]] == list(range(1, len(events)))
    assert sum(e["kind"] == "run_started" for e in events) == 1
    summary = events[-1]
    assert summary["status"] == "completed" and summary["metadata"]["reconnects"] == 1
    assert _norm(events) == _norm(events2)


def test_a_run_id_the_node_has_attaches_the_same_way(node_process: Callable[..., NodeProcess]) -> None:
    """StartRun with an existing run's id attaches to it (replays it): never a second run."""
    node = node_process()
    args = ("run", "--node", node.address, "--provider", "shell", "--run-id", "reused-run-1", "--output", "jsonl",
            "echo hi")
    first = run(False, *args)
    fast, usual = run(True, *args), run(False, *args)
    assert first.code == fast.code == usual.code == 0 and fast.fast
    started = [e for e in map(json.loads, fast.stdout.splitlines()) if e["kind"] == "run_started"]
    assert len(started) == 1 and started[0]["payload"]["pid"] == json.loads(first.stdout.splitlines()[0])["payload"]["pid"]
    assert norm_jsonl(fast.stdout) == norm_jsonl(usual.stdout) == norm_jsonl(first.stdout)


@pytest.mark.parametrize(("mutual", "flags", "fast_expected"), [
    (False, ["--tls-ca", "{ca}"], True),
    (False, ["--tls-ca", "{ca}", "--tls-server-name", "localhost"], True),
    (False, ["--tls-ca", "{ca}", "--tls-server-name", "evil.example"], False),  # not the cert's name
    (False, ["--tls-ca", "{other_ca}"], False),  # the node's cert is not signed by the CA trusted
    (False, [], False),  # plaintext to a TLS node
    (True, ["--tls-ca", "{ca}", "--tls-cert", "{client_cert}", "--tls-key", "{client_key}"], True),
    (True, ["--tls-ca", "{ca}"], False),  # the node wants a client certificate
    (True, ["--tls-ca", "{ca}", "--tls-cert", "{other_client_cert}", "--tls-key", "{other_client_key}"], False),
])
async def test_tls_runs_print_and_exit_the_same(pki: Pki, mutual: bool, flags: list[str], fast_expected: bool) -> None:
    """TLS on the fast path (the stdlib's ssl) decides as grpc's does: what grpc accepts runs fast, with
    the same output; a certificate either refuses goes to the usual path, which says why in its words."""
    from asm_node import start_server
    from tests.support.processes import node_config

    server = await start_server(node_config(tls_cert=pki.server_cert, tls_key=pki.server_key,
                                            tls_ca=pki.ca if mutual else None))
    try:
        paths = {k: str(v) for k, v in vars(pki).items()}
        args = ("run", "--node", f"127.0.0.1:{server.port}", "--provider", "shell", "--connect-timeout", "5",
                *(f.format(**paths) for f in flags), "echo hi")
        fast = await asyncio.to_thread(run, True, *args)
        usual = await asyncio.to_thread(run, False, *args)
    finally:
        await server.stop()
    same(fast, usual, jsonl=False)
    assert fast.fast == fast_expected, fast.stderr
    # One `asm: error:` line for a refused certificate, not grpc core's own log lines beside it.
    assert fast_expected or usual.stderr.startswith("asm: error:"), usual.stderr
    assert (fast.code, fast.stdout.strip() if fast_expected else "") == (0 if fast_expected else fast.code,
                                                                         "hi" if fast_expected else "")
