"""The issue-15 benchmark's own rules: --compare-ssh talks to loopback only and skips without an sshd;
the --issue15 summary says met / NOT met with each figure's baseline and ratio."""

from __future__ import annotations

import importlib
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# scripts/ is no package: its modules are loaded by name from that directory.
bench = importlib.import_module("bench")
bench_ssh = importlib.import_module("bench_ssh")


@pytest.mark.parametrize("host", ["me@127.0.0.1", "127.0.0.1", "me@::1", "me@localhost"])
def test_compare_ssh_takes_loopback_hosts(host: str) -> None:
    assert bench_ssh.check_host(host) is None


@pytest.mark.parametrize("host", ["me@10.0.0.1", "me@192.168.1.2", "me@example.com", "me@127.0.0.2.example.com"])
def test_compare_ssh_refuses_any_other_host_before_sending_anything(host: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh at all: nothing may be tried
    out = bench_ssh.run_ssh(bench_ssh.SshConfig(host=host), tmp_path, print)
    assert "loopback host only" in out["skipped"]


def _fake_ssh(directory: Path) -> None:
    """A stand-in ssh that runs its last argument here (the mode's mechanics, without an sshd)."""
    script = directory / "ssh"
    script.write_text('#!/bin/sh\nfor a; do last="$a"; case "$a" in -O) exit 0;; esac; done\nexec sh -c "$last"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_compare_ssh_skips_when_ssh_cannot_log_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 'Connection refused' >&2\nexit 255\n")
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    out = bench_ssh.run_ssh(bench_ssh.SshConfig(host="me@127.0.0.1"), tmp_path, print)
    assert "failed" in out["skipped"] and "Connection refused" in out["skipped"]


@pytest.mark.slow
def test_compare_ssh_measures_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_ssh(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    work = tmp_path / "work"
    work.mkdir()
    out = bench_ssh.run_ssh(bench_ssh.SshConfig(host="me@127.0.0.1", repeats=1, lines=500), work, print)
    assert "skipped" not in out, out
    assert out["failures"] == []
    assert set(out["echo"]) == {"asm run --node (fresh CLI)", "ssh, fresh connection",
                                "ssh, multiplexed (ControlMaster)"}
    assert "asm run --node, --output jsonl" in out["big"] and "local cat (no ssh, no asm)" in out["big"]
    bench_ssh.report_ssh(out)
    printed = capsys.readouterr().out
    assert "vs ssh fresh" in printed and "500 JSONL lines" in printed


def test_the_issue15_summary_says_met_or_not_with_baseline_and_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    figures = [
        {"name": "6. one stream", "value": 90_000.0, "unit": "ev/s", "baseline": 100_000.0,
         "baseline_name": "direct", "ratio": 0.9, "target": ">= 0.9x", "met": True},
        {"name": "6. runs/s", "value": 80.0, "unit": "runs/s", "baseline": 170.0, "baseline_name": "library",
         "ratio": 80 / 170, "target": ">= 1,000 runs/s", "met": False},
        {"name": "runs/s at 50 nodes", "value": 88.0, "unit": "runs/s", "baseline": 245.0, "ratio": 0.36,
         "target": "(figure)", "met": None},
    ]
    bench.report_issue15(figures, ["scripts/bench_cli.py not importable"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any("6. one stream" in ln and "0.90x" in ln and ln.rstrip().endswith("met") for ln in lines)
    assert any("6. runs/s" in ln and "0.47x" in ln and ln.rstrip().endswith("NOT met") for ln in lines)
    assert "skipped: scripts/bench_cli.py not importable" in out
    assert "1 of 2 targets met" in out


def test_machine_details_name_cpu_kernel_and_python() -> None:
    text = bench.machine_details()
    assert "nproc" in text and "CPU" in text and "Python 3." in text
