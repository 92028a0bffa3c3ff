"""A provider is one room: its common features are declared on its class, and `asm providers` shows exactly those."""

from __future__ import annotations

import os
from pathlib import Path

from asm_node.config import NodeConfig
from asm_node.providers import build_providers
from asm_node.providers.base import RUN_OPTIONS, RunSpec
from asm_node.providers.claude import ClaudeProvider
from asm_node.providers.features import manifests

COMMON = {"streaming", "tools", "resume", "interrupt", "cost", "approvals", "ollama", "steering", "mcp"}


def test_every_provider_declares_every_common_feature_on_its_class() -> None:
    providers = build_providers(NodeConfig())
    for name, provider in providers.items():
        assert set(type(provider).features) == COMMON, name
    rows = manifests()
    assert [r["provider"] for r in rows] == list(providers)
    for row in rows:
        declared = type(providers[row["provider"]]).features
        assert row["common_features"] == {k: {"supported": s, "notes": n} for k, (s, n) in declared.items()}


def test_claudes_manifest_says_what_its_module_does_approvals_over_stdio() -> None:
    # The old central table said "never prompts" while claude.py routes prompts through asm.
    supported, notes = ClaudeProvider.features["approvals"]
    assert supported and "--permission-prompt-tool stdio" in notes
    assert "approvals" in ClaudeProvider.options_model.model_fields


def test_steering_is_declared_exactly_where_a_run_keeps_its_stdin_for_input(tmp_path: Path) -> None:
    # A provider saying "steering: yes" must start its CLI with stdin open for send_input; "no" must not.
    fake = tmp_path / "cli"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    providers = build_providers(NodeConfig())
    for name, provider in providers.items():
        opts = provider.validate_options({}, "default")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), provider.env_var or "UNUSED": str(fake)}
        spec = RunSpec(run_id="r1", session_id="s1", provider=name, prompt="echo hi", cwd=str(tmp_path),
                       permission_mode="default", options=opts, env=env)
        cmd = provider.build_command(spec)
        takes_input = cmd.stdin and not cmd.close_stdin_after_data
        assert takes_input == type(provider).features["steering"][0], name


def test_every_manifest_lists_the_deadlines_as_options_any_client_may_set() -> None:
    for row in manifests():
        assert RUN_OPTIONS <= set(row["options"]), row["provider"]
        assert RUN_OPTIONS <= set(row["client_options"]), row["provider"]
