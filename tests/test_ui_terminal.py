"""``asm run --output text`` as a person sees it: a live spinner with the run id on a terminal, plain when piped.

The real CLI under a real pseudo-terminal (``pty``), and the same command through a pipe.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tests.support.processes import ROOT

pytestmark = pytest.mark.slow  # the real CLI under a pseudo-terminal, a few seconds each

ASM = [sys.executable, "-m", "asm_cli"]
SPINNER = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "ASM_TOKEN") and not k.startswith("ASM_NODE_")}
    env.update(TERM="xterm-256color", COLUMNS="100", LINES="30")
    return env


def run_in_pty(args: list[str], timeout: float = 60) -> tuple[int, str]:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([*ASM, *args], stdin=secondary, stdout=secondary, stderr=secondary, env=_env(),
                            cwd=str(ROOT), close_fds=True)
    os.close(secondary)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.2)
            if ready:
                try:
                    data = os.read(primary, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        rc = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    return rc, b"".join(chunks).decode("utf-8", "replace")


def test_asm_run_on_a_terminal_shows_a_live_spinner_with_the_run_id() -> None:
    rc, screen = run_in_pty(["run", "--provider", "shell", "--run-id", "pty-run-1", "sleep 2"])
    assert rc == 0, screen
    assert "pty-run-1" in screen
    assert SPINNER & set(screen), "no spinner while the run was silent"
    assert "\x1b[" in screen  # drawn (cursor moves, colour), not plain lines


def test_asm_run_piped_is_plain_text_without_escapes() -> None:
    proc = subprocess.run([*ASM, "run", "--provider", "shell", "--run-id", "pipe-run-1", "echo hello"],
                          capture_output=True, text=True, timeout=60, env=_env(), cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello\n"
    assert "\x1b[" not in proc.stdout + proc.stderr and not SPINNER & set(proc.stdout + proc.stderr)


def test_no_color_on_a_terminal_is_plain_too() -> None:
    rc, screen = run_in_pty(["run", "--provider", "shell", "--no-color", "echo hello"])
    assert rc == 0, screen
    assert "hello" in screen and not SPINNER & set(screen)
