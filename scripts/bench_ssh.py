"""``scripts/bench.py --compare-ssh USER@127.0.0.1``: asm against ssh for the same commands (issue 15).

Given an sshd on this machine that lets USER in with a key (``ssh -o BatchMode=yes`` must work: no
password prompt), it measures side by side, interleaved, wall time from the shell's point of view:

* ``echo hi``: ``asm run --node <a node on 127.0.0.1> --provider shell "echo hi"`` (a fresh CLI
  process each time, as a user types it) against ``ssh HOST echo hi`` fresh (a new connection each
  time) and multiplexed (``ControlMaster=auto``, one master connection opened first and reused);
* a 2M-line command: ``cat`` of a file of ``lines`` JSONL lines, through ``asm run`` (text and
  ``--output jsonl``, stdout to /dev/null) against ``ssh HOST cat FILE`` (fresh and multiplexed).

Only loopback hosts are accepted (127.0.0.1, ::1, localhost): the benchmark sends no traffic
elsewhere. ssh runs with its own known_hosts and control socket in a temp dir (the user's ~/.ssh
is read for the key, never written), and the master connection is closed at the end. Without a
host, or when ``ssh -o BatchMode=yes HOST true`` fails, it says so and measures nothing.
This module never installs or starts an sshd.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")

__all__ = ["SshConfig", "check_host", "report_ssh", "run_ssh"]


@dataclass
class SshConfig:
    host: str
    repeats: int = 20  # echo hi, per path
    lines: int = 2_000_000  # the big command
    big_repeats: int = 1


def check_host(host: str) -> str | None:
    """Why ``host`` (``[USER@]HOST``) is refused, or None: only this machine's loopback."""
    name = host.rpartition("@")[2]
    if name not in _LOOPBACK:
        return f"--compare-ssh takes a loopback host only (USER@127.0.0.1, USER@::1, USER@localhost), not {name!r}"
    return None


def _asm_argv() -> list[str]:
    script = Path(sys.executable).parent / "asm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "asm_cli"]


class _Ssh:
    """ssh with a private known_hosts and control path (nothing of the user's is written)."""

    def __init__(self, host: str, tmp: Path) -> None:
        self.host = host
        self.base = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=accept-new",
                     "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}", "-o", "LogLevel=ERROR"]
        self.mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={tmp / 'cm-%C'}", "-o", "ControlPersist=300"]

    def argv(self, command: str, mux: bool) -> list[str]:
        return [*self.base, *(self.mux if mux else ["-o", "ControlMaster=no", "-o", "ControlPath=none"]),
                self.host, command]

    def close(self) -> None:
        subprocess.run([*self.base, *self.mux, "-O", "exit", self.host], capture_output=True, timeout=10, check=False)


def _timed(argv: list[str], timeout: float, out: Any = subprocess.DEVNULL) -> tuple[float, str | None]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, f"no end after {timeout:g}s"
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return wall, f"exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}"
    return wall, None


def run_ssh(cfg: SshConfig, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The figures (or ``{"skipped": why}``); starts one node agent on 127.0.0.1 and stops it by PID."""
    refused = check_host(cfg.host)
    if refused:
        return {"skipped": refused}
    if shutil.which("ssh") is None:
        return {"skipped": "no ssh client on PATH"}
    ssh = _Ssh(cfg.host, workdir)
    _wall, err = _timed(ssh.argv("true", mux=False), 15)
    if err:
        return {"skipped": f"`ssh -o BatchMode=yes {cfg.host} true` failed ({err.strip()}): give a host whose sshd "
                           "lets this user in with a key"}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench  # the node process helper

    big = workdir / "big.jsonl"
    bench.write_jsonl(big, cfg.lines)
    node = bench.NodeProcess(workdir)
    out: dict[str, Any] = {"host": cfg.host, "lines": cfg.lines, "echo": {}, "big": {}, "failures": []}
    try:
        node.start()
        addr = f"127.0.0.1:{node.port}"
        asm = [*_asm_argv(), "run", "--node", addr, "--provider", "shell"]
        echo: dict[str, list[str]] = {
            "asm run --node (fresh CLI)": [*asm, "echo hi"],
            "ssh, fresh connection": ssh.argv("echo hi", mux=False),
            "ssh, multiplexed (ControlMaster)": ssh.argv("echo hi", mux=True),
        }
        _timed(ssh.argv("true", mux=True), 15)  # the master connection, before timing
        for argv in echo.values():  # warm: bytecode cache, node, sshd
            _timed(argv, 30)
        for _ in range(cfg.repeats):
            for name, argv in echo.items():
                w, e = _timed(argv, 30)
                out["echo"].setdefault(name, []).append(w)
                if e:
                    out["failures"].append(f"{name}: {e}")
        log(f"    ssh: echo hi x{cfg.repeats} done")
        opts = ["--opt", "command_timeout_ms=600000"]
        bigs: dict[str, list[str]] = {
            "asm run --node, text": [*asm, *opts, f"cat {big}"],
            "asm run --node, --output jsonl": [*asm, *opts, "--output", "jsonl", f"cat {big}"],
            "ssh, fresh connection": ssh.argv(f"cat {big}", mux=False),
            "ssh, multiplexed (ControlMaster)": ssh.argv(f"cat {big}", mux=True),
            "local cat (no ssh, no asm)": ["cat", str(big)],
        }
        for _ in range(cfg.big_repeats):
            for name, argv in bigs.items():
                w, e = _timed(argv, max(120.0, cfg.lines / 10_000))
                out["big"].setdefault(name, []).append(w)
                if e:
                    out["failures"].append(f"{name}: {e}")
                log(f"    ssh: {name} {w:.2f}s")
    finally:
        ssh.close()
        node.stop()
    return out


def report_ssh(out: dict[str, Any]) -> None:
    print("\n(l) asm vs ssh (--compare-ssh)")
    if "skipped" in out:
        print(f"  skipped: {out['skipped']}")
        return
    echo = out["echo"]
    ref = statistics.median(echo["ssh, fresh connection"])
    print(f"  `echo hi` on {out['host']}, wall ms, {len(next(iter(echo.values())))} each, interleaved")
    print(f"  {'path':<36}{'median':>9}{'p90':>9}{'vs ssh fresh':>14}")
    for name, xs in echo.items():
        med = statistics.median(xs)
        p90 = statistics.quantiles(xs, n=10, method="inclusive")[8] if len(xs) > 1 else xs[0]
        print(f"  {name:<36}{med * 1000:>9.1f}{p90 * 1000:>9.1f}{med / ref:>13.2f}x")
    big = out["big"]
    ref = statistics.median(big["ssh, fresh connection"])
    print(f"  `cat` of {out['lines']:,} JSONL lines (stdout to /dev/null), wall s")
    print(f"  {'path':<36}{'wall s':>9}{'vs ssh fresh':>14}")
    for name, xs in big.items():
        med = statistics.median(xs)
        print(f"  {name:<36}{med:>9.2f}{med / ref:>13.2f}x")
    for f in out["failures"]:
        print(f"  !! {f}")
