"""Codex's output-schema file lives in a private directory of the run's (mkdtemp), removed at its end.

A fixed ``$TMPDIR/asm-<run id>`` let another local user plant a symlink (or a directory of
theirs) there first and redirect the node's write.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from asm_node.config import NodeConfig
from asm_node.providers import build_providers
from asm_node.providers.base import RunSpec, remove_run_files


def _command(tmp_path: Path, run_id: str) -> tuple[list[str], tuple[str, ...]]:
    fake = tmp_path / "codex"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    provider = build_providers(NodeConfig())["codex"]
    opts = provider.validate_options({"output_schema": {"type": "object"}}, "default")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "TMPDIR": str(tmp_path / "tmp"),
           provider.env_var or "UNUSED": str(fake)}
    spec = RunSpec(run_id=run_id, session_id="s1", provider="codex", prompt="hi", cwd=str(tmp_path),
                   permission_mode="default", options=opts, env=env)
    cmd = provider.build_command(spec)
    return cmd.argv, cmd.run_files


def test_a_planted_path_does_not_redirect_the_schema_write(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    # Another user got there first: the old fixed directory name is a link to their directory.
    (tmp_path / "tmp" / "asm-cx-1").symlink_to(elsewhere)
    argv, files = _command(tmp_path, "cx-1")
    assert list(elsewhere.iterdir()) == []  # nothing written through the planted link
    (schema,) = [a.split("=", 1)[1] for a in argv if a.startswith("--output-schema=")]
    assert files == (schema,)
    schema_dir = Path(schema).parent
    assert schema_dir.parent == tmp_path / "tmp" and schema_dir.name.startswith("asm-cx-1-")
    assert not schema_dir.is_symlink() and stat.S_IMODE(schema_dir.stat().st_mode) == 0o700
    assert json.loads(Path(schema).read_text()) == {"type": "object"}
    # The run's end removes the file and its private directory.
    remove_run_files(files)
    assert not schema_dir.exists() and (tmp_path / "tmp" / "asm-cx-1").is_symlink()


def test_two_builds_of_one_run_id_get_two_directories(tmp_path: Path) -> None:
    _, first = _command(tmp_path, "cx-2")
    _, second = _command(tmp_path, "cx-2")
    assert Path(first[0]).parent != Path(second[0]).parent
    remove_run_files(first + second)
    assert list((tmp_path / "tmp").iterdir()) == []
