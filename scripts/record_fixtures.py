#!/usr/bin/env python3
"""Re-record tests/fixtures/cli/{claude,codex,gemini}_{text,tool}.jsonl from the real CLIs.

Each CLI (installed by scripts/install_clis.sh into ``${ASM_CLI_CACHE:-~/.cache/asm-clis}``)
runs with the argv its provider module builds (``Provider.build_command``, the node's own path),
in a hermetic HOME/TMPDIR from tests/support/cli_env.py, against the scripted model server
tests/support/fake_model_server.py on 127.0.0.1 — nothing leaves the machine. Two scenarios:

* ``text``: ``Say hi. SCENARIO_TEXT``, permission mode ``default``: the model answers with text.
* ``tool``: ``Run a command. SCENARIO_TOOL``, permission mode ``bypass``: the model asks for one
  shell call (``echo tool-output-123``), the CLI runs it, the model answers.

The captured stdout is made stable for committing: session/thread ids, UUIDs, the fake server's
message/tool ids and Gemini's time-based tool ids become numbered placeholders (the same value
always gets the same placeholder, so tool_use/tool_result pairs still match); timestamps become
``2026-01-01T00:00:00.000Z``; the scratch/workspace paths become ``/tmp/asm-fixture[/ws]``;
integer ``*_ms`` durations become 0. What the CLI prints otherwise (its tool list, version,
usage figures) is kept as printed and changes when the CLI is upgraded.

``amp_stream_json.jsonl`` is NOT recorded: Amp has no offline model endpoint to point it at,
so that capture stays as committed.

``--check`` records into a temporary directory and compares, for each capture, the sequence of
event kinds the current provider parser makes of it with the committed fixture's; exit 1 with a
diff when they differ (or a CLI fails), exit 0 when they all match. A CLI that is not installed
is reported and skipped (exit 0 when none is installed only with ``--allow-missing``; else 2).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asm_node.providers import ClaudeProvider, CodexProvider, GeminiProvider, RunSpec  # noqa: E402
from asm_node.providers._cli import CliProvider  # noqa: E402
from asm_node.providers.base import ExitInfo  # noqa: E402
from asm_wire import KIND_NAMES, pb  # noqa: E402
from tests.support.cli_env import CLI_NAMES, GEMINI_MODEL, cli_env, find_cli, hermetic_env  # noqa: E402
from tests.support.fake_model_server import FakeModelServer  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "cli"
PROVIDERS: dict[str, type[CliProvider]] = {"claude": ClaudeProvider, "codex": CodexProvider, "gemini": GeminiProvider}
# Same per-CLI options as tests/test_conformance.py: codex outside a git repo, gemini's model pinned.
OPTIONS: dict[str, dict[str, Any]] = {"claude": {}, "codex": {"skip_git_repo_check": True},
                                      "gemini": {"model": GEMINI_MODEL}}
SCENARIOS: dict[str, tuple[str, str]] = {  # scenario -> (prompt, permission mode)
    "text": ("Say hi. SCENARIO_TEXT", "default"),
    "tool": ("Run a command. SCENARIO_TOOL", "bypass"),
}
RUN_TIMEOUT_S = 90.0

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# The fake server's ids (msg_/toolu_/resp_/call_... + 24 hex) and Gemini's "<tool>_<epoch ms>_<n>".
_HEX_ID = re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{24}(?![0-9a-fA-F])")
_EPOCH_MS = re.compile(r"(?<=_)1[0-9]{12}(?=_)")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")
STABLE_TIME = "2026-01-01T00:00:00.000Z"
STABLE_DIR = "/tmp/asm-fixture"


class Stabilizer:
    """Replaces volatile values with placeholders, consistently within one capture."""

    def __init__(self, scratch: Path, workspace: Path) -> None:
        pairs = [(str(workspace.resolve()), STABLE_DIR + "/ws"), (str(workspace), STABLE_DIR + "/ws"),
                 (str(scratch.resolve()), STABLE_DIR), (str(scratch), STABLE_DIR)]
        # Claude also names its per-project directory after the cwd, every non-alphanumeric made "-".
        slug = re.compile(r"[^A-Za-z0-9]")
        self.paths = pairs + [(slug.sub("-", real), slug.sub("-", stable)) for real, stable in pairs]
        self.seen: dict[str, str] = {}

    def _placeholder(self, value: str, kind: str) -> str:
        if value not in self.seen:
            n = len(self.seen) + 1
            self.seen[value] = {"uuid": f"00000000-0000-4000-8000-{n:012d}", "hex": f"{n:024d}",
                                "ms": f"{1000000000000 + n}"}[kind]
        return self.seen[value]

    def text(self, s: str) -> str:
        for real, stable in self.paths:
            s = s.replace(real, stable)
        s = _TIMESTAMP.sub(STABLE_TIME, s)
        s = _UUID.sub(lambda m: self._placeholder(m.group(0).lower(), "uuid"), s)
        s = _HEX_ID.sub(lambda m: self._placeholder(m.group(0), "hex"), s)
        return _EPOCH_MS.sub(lambda m: self._placeholder(m.group(0), "ms"), s)

    def value(self, v: Any, key: str = "") -> Any:
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and key.endswith("_ms"):
            return 0
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, dict):
            return {self.text(k): self.value(x, k) for k, x in v.items()}
        return v

    def line(self, raw: bytes) -> bytes:
        try:
            obj = json.loads(raw)
        except ValueError:
            return self.text(raw.decode("utf-8", "replace")).encode()
        return json.dumps(self.value(obj), ensure_ascii=False, separators=(",", ":")).encode()


def record_one(name: str, cli: Path, scenario: str, server: FakeModelServer, scratch: Path) -> list[bytes]:
    """Run one CLI for one scenario; its stdout lines, stabilized. Raises RuntimeError on failure."""
    prompt, mode = SCENARIOS[scenario]
    workspace = scratch / "ws"
    workspace.mkdir(parents=True, exist_ok=True)
    env = hermetic_env({**cli_env(name, server.base_url, scratch), PROVIDERS[name].env_var: str(cli)})
    provider = PROVIDERS[name]()
    spec = RunSpec(run_id=f"fixture-{name}-{scenario}", session_id="fixture", provider=name, prompt=prompt,
                   cwd=str(workspace), permission_mode=mode, options=provider.validate_options(OPTIONS[name], mode),
                   env=env)
    cmd = provider.build_command(spec)
    # A prompt sent as stream-json input (Claude) is written and stdin closed: the CLI exits after its turn.
    proc = subprocess.run(cmd.argv, cwd=cmd.cwd, env=cmd.env, input=cmd.stdin_data if cmd.stdin else None,
                          stdin=None if cmd.stdin else subprocess.DEVNULL, capture_output=True,
                          timeout=RUN_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"{name} {scenario}: exit {proc.returncode}\n{tail}")
    stab = Stabilizer(scratch, workspace)
    return [stab.line(line) for line in proc.stdout.splitlines() if line.strip()]


def event_kinds(name: str, lines: list[bytes]) -> list[str]:
    """The event kinds the current provider parser makes of a capture (plus its finish on exit 0)."""
    provider = PROVIDERS[name]()
    spec = RunSpec(run_id="r1", session_id="s1", provider=name, prompt="hi", cwd="/tmp", permission_mode="default",
                   options=provider.validate_options(OPTIONS[name], "default"), env={})
    parser = provider.new_parser(spec)
    out: list[pb.Event] = []
    parser.feed_lines(lines, out)
    out += parser.finish(ExitInfo(returncode=0, signal=0, stderr_tail=""))
    return [KIND_NAMES[e.kind] for e in out]


def record_all(dest: Path, names: list[str]) -> list[str]:
    """Record every scenario of ``names`` into ``dest``; the file names written."""
    written = []
    with FakeModelServer() as server, tempfile.TemporaryDirectory(prefix="asm-fixture-") as tmp:
        for name in names:
            cli = find_cli(name)
            assert cli is not None
            for scenario in SCENARIOS:
                scratch = Path(tmp) / f"{name}-{scenario}"
                lines = record_one(name, cli, scenario, server, scratch)
                target = dest / f"{name}_{scenario}.jsonl"
                target.write_bytes(b"".join(line + b"\n" for line in lines))
                written.append(target.name)
                server.clear()
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true",
                    help="record into a temp dir and compare parsed event kinds with the committed fixtures")
    ap.add_argument("--cli", action="append", choices=CLI_NAMES, help="only this CLI (repeatable)")
    ap.add_argument("--allow-missing", action="store_true", help="skip CLIs that are not installed (exit 0)")
    ap.add_argument("--fixtures", type=Path, default=FIXTURES,
                    help="the fixture directory to write (or, with --check, to compare with)")
    args = ap.parse_args(argv)
    wanted = list(args.cli or CLI_NAMES)
    names = [n for n in wanted if find_cli(n) is not None]
    for n in sorted(set(wanted) - set(names)):
        print(f"skip {n}: not installed (run scripts/install_clis.sh)", file=sys.stderr)
    if not names:
        return 0 if args.allow_missing else 2
    if set(names) != set(wanted) and not args.allow_missing:
        return 2
    try:
        if not args.check:
            for f in record_all(args.fixtures, names):
                print(f"wrote {args.fixtures / f}")
            return 0
        with tempfile.TemporaryDirectory(prefix="asm-fixture-check-") as tmp:
            failed = False
            for f in record_all(Path(tmp), names):
                name = f.split("_")[0]
                committed = args.fixtures / f
                old = event_kinds(name, committed.read_bytes().splitlines()) if committed.exists() else []
                new = event_kinds(name, (Path(tmp) / f).read_bytes().splitlines())
                if old == new:
                    print(f"ok {f}: {' '.join(new)}")
                    continue
                failed = True
                print(f"MISMATCH {f}: the real CLI's capture parses differently from the committed fixture")
                sys.stdout.writelines(difflib.unified_diff([k + "\n" for k in old], [k + "\n" for k in new],
                                                           f"committed/{f}", f"recorded/{f}"))
            return 1 if failed else 0
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"recording failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
