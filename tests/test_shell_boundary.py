"""The shell provider as a security boundary, attacked the way a client with a valid token would.

Every attack goes through a real node agent (a separate ``asm node serve`` process, or an
in-process gRPC server) on 127.0.0.1 and the controller's ``Session``/``RemoteNode``. A refused
command must come back typed (``guardrail_blocked`` / ``command_denied``, or ``config_invalid``)
and must never have started a process (no ``run_started`` event).
"""

from __future__ import annotations

import asyncio
import random
import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from asm_controller import RemoteNode, Result, Session
from asm_node import NodeServer
from asm_node.providers.shell import ShellProvider, split_command
from asm_wire import ConfigError
from tests.support.processes import PYTHON_BASENAME, NodeProcess, start_node_process

pytestmark = pytest.mark.slow  # each case a run through a served node

TOKEN = "shell-boundary-" + "t" * 16


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """The node's workspace root, with one file inside; a secret sits next to it, outside."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "inside.txt").write_text("inside the workspace\n")
    (tmp_path / "outside.txt").write_text("outside the workspace\n")
    return root


@contextmanager
def _node(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[NodeProcess]:
    """A node agent process requiring TOKEN, stopped by its PID on the way out."""
    node = start_node_process(tmp_path, "--token-file", str(_token_file(tmp_path)), *args, env=env)
    try:
        yield node
    finally:
        node.stop()


def _token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    return path


@pytest.fixture
def node(tmp_path: Path, ws: Path) -> Iterator[NodeProcess]:
    """A node agent process with ASM_TOKEN in its own environment (as a container sets it)."""
    with _node(tmp_path, "--workspace-root", str(ws), env={"ASM_TOKEN": TOKEN}) as n:
        yield n


async def _run(node: NodeProcess, prompt: str, cwd: Path, **options: object) -> Result:
    async with Session("shell", node=RemoteNode(node.address, token=TOKEN), cwd=str(cwd), options=options) as s:
        return await s.query(prompt)


def _refused(result: Result, fragment: str = "") -> str:
    """The run was refused before anything was spawned; returns the message."""
    assert result.error is not None, result.text
    assert result.error.kind == "guardrail_blocked", result.error
    assert result.error.reason == "command_denied", result.error
    assert not any(m.kind == "run_started" for m in result.messages)
    assert fragment in result.error.message, result.error.message
    return result.error.message


# -- the allow-list cannot be switched off ---------------------------------------------------


async def test_narrowing_to_an_unknown_command_runs_nothing(node: NodeProcess, ws: Path) -> None:
    msg = _refused(await _run(node, "bash -c id", ws, allowed_commands=["zzz"]), "'zzz'")
    assert "only narrow" in msg
    # Narrowing to nothing at all: nothing runs, not even a command the node allows.
    _refused(await _run(node, "echo hi", ws, allowed_commands=[]), "not in the allowed list")
    # And bash was never allowed in the first place.
    _refused(await _run(node, "bash -c id", ws), "not in the allowed list")


async def test_narrowing_to_an_allowed_command_keeps_only_it(node: NodeProcess, ws: Path) -> None:
    ok = await _run(node, "echo narrowed", ws, allowed_commands=["echo"])
    assert ok.ok, ok.error
    assert ok.text == "narrowed\n"
    _refused(await _run(node, "cat inside.txt", ws, allowed_commands=["echo"]), "not in the allowed list")
    # An absolute path naming the same executable narrows too.
    echo = shutil.which("echo")
    assert echo is not None
    ok = await _run(node, "echo by-path", ws, allowed_commands=[echo])
    assert ok.ok and ok.text == "by-path\n", ok.error


async def test_an_empty_node_allow_list_refuses_every_command(tmp_path: Path, ws: Path) -> None:
    with _node(tmp_path, "--workspace-root", str(ws), env={"ASM_NODE_SHELL_ALLOWED_COMMANDS": "[]"}) as n:
        for prompt in ("echo hi", "true", "bash -c id"):
            _refused(await _run(n, prompt, ws), "not in the allowed list")


async def test_find_delete_is_refused_and_deletes_nothing(node: NodeProcess, ws: Path) -> None:
    _refused(await _run(node, "find . -delete", ws), "'find' is not in the allowed list")
    assert (ws / "inside.txt").exists()


async def test_date_prints_the_clock_but_never_sets_it(tmp_path: Path, ws: Path) -> None:
    # `date` is allowed by default and a node often runs as root: `date -s` would set the host's clock.
    # The refusals are tried on a stand-in `date` the operator allows by absolute path (same name, so the
    # same rule applies): if the guard ever regresses, this test fails without touching the real clock.
    fake = tmp_path / "fakebin" / "date"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "fake date ran: $*"\n')
    fake.chmod(0o755)
    with _node(tmp_path, "--workspace-root", str(ws), "--shell-allow", str(fake)) as n:
        for args in ("-s 2001-01-01", "-us 2001-01-01", "--set=2001-01-01", "--se 2001-01-01"):
            _refused(await _run(n, f"{fake} {args}", ws), "would set the system clock")
        ok = await _run(n, f"{fake} -dsunday +%A", ws)  # a value after -d, not a set
        assert ok.ok and ok.text == "fake date ran: -dsunday +%A\n", ok.error
        ok = await _run(n, "date -u -d @0 +%Y", ws)  # the real one still prints
        assert ok.ok and ok.text == "1970\n", ok.error


# -- resolved executables, never basenames of client paths --------------------------------


async def test_a_script_named_cat_given_by_path_is_refused(node: NodeProcess, ws: Path) -> None:
    tool = ws / "x" / "cat"
    tool.parent.mkdir()
    marker = ws / "pwned"
    tool.write_text(f"#!/bin/sh\ntouch {marker}\necho pwned\n")
    tool.chmod(0o755)
    for prompt in ("x/cat inside.txt", "./x/cat inside.txt", f"{tool} inside.txt"):
        _refused(await _run(node, prompt, ws), "is not in the allowed list")
    assert not marker.exists()


async def test_a_link_to_an_allowed_binary_runs_the_operators_binary(node: NodeProcess, ws: Path) -> None:
    cat = shutil.which("cat")
    assert cat is not None
    (ws / "bin").mkdir()
    (ws / "bin" / "cat").symlink_to(cat)
    (ws / "bin" / "other").symlink_to(cat)
    ok = await _run(node, "bin/cat inside.txt", ws)
    assert ok.ok and ok.text == "inside the workspace\n", ok.error
    # The same binary under another name is another executable (multi-call binaries switch on the name).
    _refused(await _run(node, "bin/other inside.txt", ws), "not in the allowed list")
    # A denied binary stays denied under an allowed name (deny-list by real path).
    rm = shutil.which("rm")
    assert rm is not None
    (ws / "bin2").mkdir()
    (ws / "bin2" / "cat").symlink_to(rm)
    _refused(await _run(node, "bin2/cat inside.txt", ws), "is denied")
    assert (ws / "inside.txt").exists()


async def test_bare_names_use_the_nodes_startup_path_not_the_requests(tmp_path: Path, ws: Path) -> None:
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "echo").write_text("#!/bin/sh\necho pwned\n")
    (fake / "echo").chmod(0o755)
    with _node(tmp_path, "--workspace-root", str(ws), "--env-allow", "PATH") as n:
        async with Session("shell", node=RemoteNode(n.address, token=TOKEN), cwd=str(ws),
                           env={"PATH": f"{fake}:/usr/bin:/bin"}) as s:
            result = await s.query("echo real")
        assert result.ok, result.error
        assert result.text == "real\n"


async def test_operator_absolute_entries_are_used_as_given(tmp_path: Path, ws: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    hello = tools / "hello"
    hello.write_text("#!/bin/sh\necho hello from the operator\n")
    hello.chmod(0o755)
    with _node(tmp_path, "--workspace-root", str(ws), "--shell-allow", str(hello)) as n:
        ok = await _run(n, str(hello), ws)
        assert ok.ok and ok.text == "hello from the operator\n", ok.error
        # A bare name is looked up on the PATH, where there is no `hello`.
        _refused(await _run(n, "hello", ws), "not in the allowed list")


def test_a_non_executable_operator_entry_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an executable file"):
        ShellProvider([str(tmp_path)], [])
    with pytest.raises(ConfigError, match="absolute path"):
        ShellProvider(["x/cat"], [])


# -- file-reading commands are confined ------------------------------------------------------


async def test_default_readers_cannot_read_outside_the_workspace(node: NodeProcess, ws: Path) -> None:
    (ws / "link").symlink_to(ws.parent / "outside.txt")
    attacks = [
        "cat /etc/shadow", "cat /etc/passwd", "cat ../outside.txt", "cat link", "cat -- /etc/passwd",
        "head -n 1 /etc/passwd", "tail -c 10 /etc/passwd", "ls /", "wc --files0-from=/etc/passwd",
        "date -f/etc/passwd", "date -f /etc/passwd", "cat inside.txt /etc/passwd",
    ]
    for prompt in attacks:
        _refused(await _run(node, prompt, ws), "outside the workspace roots")


async def test_proc_is_never_readable_through_them(node: NodeProcess, ws: Path) -> None:
    (ws / "env").symlink_to(f"/proc/{node.pid}/environ")
    for prompt in (f"cat /proc/{node.pid}/environ", "cat /proc/self/environ", "cat env", "head /sys/kernel/mm",
                   "cat /dev/fd/0"):
        msg = _refused(await _run(node, prompt, ws), "never readable")
        assert TOKEN not in msg


async def test_reading_inside_the_workspace_works(node: NodeProcess, ws: Path) -> None:
    for prompt in ("cat inside.txt", f"cat {ws / 'inside.txt'}", "head -n 1 inside.txt", "wc -l inside.txt"):
        ok = await _run(node, prompt, ws)
        assert ok.ok, (prompt, ok.error)
        assert "inside" in ok.text, (prompt, ok.text)
    listing = await _run(node, "ls", ws)
    assert listing.ok and "inside.txt" in listing.text, listing.error
    assert (await _run(node, "date +%Y", ws)).text.strip().isdigit()


async def test_without_roots_the_runs_cwd_is_the_boundary(tmp_path: Path, ws: Path) -> None:
    with _node(tmp_path) as n:
        ok = await _run(n, "cat inside.txt", ws)
        assert ok.ok and ok.text == "inside the workspace\n", ok.error
        _refused(await _run(n, "cat ../outside.txt", ws), "outside the run's cwd")


async def test_the_operator_can_lift_the_confinement_but_not_for_proc(tmp_path: Path, ws: Path) -> None:
    with _node(tmp_path, "--workspace-root", str(ws), "--shell-unconfined-reads") as n:
        ok = await _run(n, "cat ../outside.txt", ws)
        assert ok.ok and ok.text == "outside the workspace\n", ok.error
        _refused(await _run(n, f"cat /proc/{n.pid}/environ", ws), "never readable")


# -- interpolation checks the first word the same way ------------------------------------


async def test_interpolation_checks_and_pins_the_first_word(tmp_path: Path, ws: Path) -> None:
    tool = ws / "x" / "echo"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho pwned\n")
    tool.chmod(0o755)
    with _node(tmp_path, "--workspace-root", str(ws), "--shell-allow-interpolation") as n:
        ok = await _run(n, "echo a && echo b", ws, interpolate=True)
        assert ok.ok and ok.text == "a\nb\n", ok.error
        _refused(await _run(n, "x/echo hi", ws, interpolate=True), "not in the allowed list")
        _refused(await _run(n, "bash -c id", ws, interpolate=True), "not in the allowed list")
        _refused(await _run(n, "echo hi", ws, interpolate=True, allowed_commands=["zzz"]), "only narrow")


# -- the prompt is capped before it is parsed ------------------------------------------------


async def test_a_10_mib_prompt_is_refused_in_milliseconds(grpc_node: NodeServer, tmp_path: Path) -> None:
    cap = 64 * 1024
    async with Session("shell", node=RemoteNode(f"127.0.0.1:{grpc_node.port}"), cwd=str(tmp_path)) as s:
        t0 = time.perf_counter()
        # One 10 MiB token: quadratic for shlex (minutes on the event loop before the cap existed).
        result = await asyncio.wait_for(s.query("echo " + "a" * (10 * 1024 * 1024)), 30)
        elapsed = time.perf_counter() - t0
        assert result.error is not None and result.error.kind == "config_invalid", result.error
        assert str(cap) in result.error.message and "shell_max_prompt_bytes" in result.error.message
        assert not any(m.kind == "run_started" for m in result.messages)
        assert elapsed < 1.0, elapsed
        # One byte over is refused too; exactly at the cap parses quickly and runs.
        over = await s.query("echo " + "b" * (cap - 4))
        assert over.error is not None and over.error.kind == "config_invalid"
        words = ("c " * ((cap - 5) // 2)).rstrip()
        at_cap = "echo " + words + " " * (cap - 5 - len(words))
        assert len(at_cap.encode()) == cap
        t0 = time.perf_counter()
        ok = await asyncio.wait_for(s.query(at_cap), 30)
        assert ok.ok, ok.error
        assert ok.text == words + "\n"
        assert time.perf_counter() - t0 < 5.0


async def test_nul_in_the_command_line_is_config_invalid(grpc_node: NodeServer, tmp_path: Path) -> None:
    async with Session("shell", node=RemoteNode(f"127.0.0.1:{grpc_node.port}"), cwd=str(tmp_path)) as s:
        result = await s.query("echo a\0b")
    assert result.error is not None and result.error.kind == "config_invalid"
    assert "NUL" in result.error.message


async def test_python_allowed_by_name_still_runs(grpc_node: NodeServer, tmp_path: Path) -> None:
    # tests/conftest.py's node_config allows the test interpreter by name, resolved on the PATH at start.
    async with Session("shell", node=RemoteNode(f"127.0.0.1:{grpc_node.port}"), cwd=str(tmp_path)) as s:
        result = await s.query(f"{PYTHON_BASENAME} -c \"print('py ok')\"")
    assert result.ok, result.error
    assert result.text == "py ok\n"


def test_splitting_matches_shlex_and_is_linear() -> None:
    rng = random.Random(9)
    alphabet = "ab '\"\\\t"
    for _ in range(20_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        try:
            want: object = shlex.split(line)
        except ValueError as exc:
            want = str(exc)
        try:
            got: object = split_command(line)
        except ValueError as exc:
            got = str(exc)
        assert got == want, line
    t0 = time.perf_counter()
    assert split_command("x" * (1 << 20)) == ["x" * (1 << 20)]
    assert len(split_command('"a\\b" ' * (1 << 16))) == 1 << 16
    assert time.perf_counter() - t0 < 2.0
