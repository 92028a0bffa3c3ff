"""Running the ``asm`` command line as a user does (shared by the CLI tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.processes import ROOT

ASM = [sys.executable, "-m", "asm_cli"]


def asm(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ASM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=str(ROOT))


def jsonl(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]
