"""A provider is one room: its common features are declared on its class, and `asm providers` shows exactly those."""

from __future__ import annotations

from asm_node.config import NodeConfig
from asm_node.providers import build_providers
from asm_node.providers.claude import ClaudeProvider
from asm_node.providers.features import manifests

COMMON = {"streaming", "tools", "resume", "interrupt", "cost", "approvals", "ollama"}


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
