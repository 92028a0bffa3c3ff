"""The committed CLI captures still match what the real CLIs print (scripts/record_fixtures.py --check).

Each real CLI (scripts/install_clis.sh) is recorded again against tests/support/fake_model_server.py on
127.0.0.1 and its capture must parse, with the current provider parser, into the same sequence of
event kinds as tests/fixtures/cli/<cli>_<scenario>.jsonl. Without the CLI the test skips, like
tests/test_conformance.py. The stabilizer (placeholders for ids, times, paths) is tested without CLIs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.cli_env import CLI_NAMES, find_cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "record_fixtures.py"
FIXTURES = ROOT / "tests" / "fixtures" / "cli"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("record_fixtures", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", *args], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT))


@pytest.mark.real_cli
@pytest.mark.parametrize("name", CLI_NAMES)
def test_committed_fixtures_match_the_real_cli(name: str) -> None:
    if find_cli(name) is None:
        pytest.skip(f"{name} CLI not installed (run scripts/install_clis.sh)")
    proc = _check("--cli", name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"ok {name}_") == 2, proc.stdout  # both scenarios: text and tool


@pytest.mark.real_cli
def test_check_fails_with_a_diff_when_a_fixture_no_longer_matches(tmp_path: Path) -> None:
    """A committed capture missing its tool result line is caught: exit 1 and a kind diff."""
    name = next((n for n in CLI_NAMES if find_cli(n) is not None), None)
    if name is None:
        pytest.skip("no real CLI installed (run scripts/install_clis.sh)")
    for f in FIXTURES.glob(f"{name}_*.jsonl"):
        shutil.copy(f, tmp_path / f.name)
    tool = tmp_path / f"{name}_tool.jsonl"
    lines = tool.read_text().splitlines()
    kept = [line for line in lines if "tool_result" not in line and "tool-output-123\\n\",\"exit_code\":0" not in line]
    assert len(kept) < len(lines)
    tool.write_text("".join(line + "\n" for line in kept))
    proc = _check("--cli", name, "--fixtures", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"MISMATCH {name}_tool.jsonl" in proc.stdout and "+tool_result" in proc.stdout
    assert f"ok {name}_text.jsonl" in proc.stdout


def test_stabilizer_gives_the_same_value_the_same_placeholder(tmp_path: Path) -> None:
    mod = _script()
    scratch = tmp_path / "scratch"
    stab = mod.Stabilizer(scratch, scratch / "ws")
    sid = "8f377aee-d6c1-42b0-865d-e39293d97881"
    line = json.dumps({"session_id": sid, "cwd": str(scratch / "ws"), "timestamp": "2026-11-21T05:26:57.734Z",
                       "id": "toolu_c5790dc72eb64bf4bb369512", "tool_id": "run_shell_command_1795238819475_0",
                       "duration_ms": 315, "again": sid, "memory": f"/x/{re.sub(r'[^A-Za-z0-9]', '-', str(scratch / 'ws'))}/m"})
    out = json.loads(stab.line(line.encode()))
    assert out == {"session_id": "00000000-0000-4000-8000-000000000001", "cwd": "/tmp/asm-fixture/ws",
                   "timestamp": "2026-01-01T00:00:00.000Z", "id": "toolu_000000000000000000000002",
                   "tool_id": "run_shell_command_1000000000003_0", "duration_ms": 0,
                   "again": "00000000-0000-4000-8000-000000000001", "memory": "/x/-tmp-asm-fixture-ws/m"}


def test_committed_fixtures_hold_no_volatile_values() -> None:
    """What the script stabilizes never reaches the committed files (a hand edit would bring it back)."""
    mod = _script()
    for f in sorted(FIXTURES.glob("*_t*.jsonl")):  # the recorded ones: <cli>_text / <cli>_tool
        text = f.read_text()
        uuids = set(mod._UUID.findall(text))
        assert all(u.startswith("00000000-0000-4000-8000-") for u in uuids), (f.name, uuids)
        assert set(mod._TIMESTAMP.findall(text)) <= {mod.STABLE_TIME}, f.name
        assert "/tmp/asm-fixture-" not in text and str(Path.home()) not in text, f.name
