"""Provider registry: one module per provider (command builder + line parser)."""

from __future__ import annotations

from asm_node.config import NodeConfig
from asm_node.providers.amp import AmpProvider
from asm_node.providers.base import (
    CommandSpec,
    ExitInfo,
    LineParser,
    Provider,
    ProviderStatus,
    RunSpec,
)
from asm_node.providers.claude import ClaudeProvider
from asm_node.providers.codex import CodexProvider
from asm_node.providers.gemini import GeminiProvider
from asm_node.providers.shell import ShellProvider


def build_providers(config: NodeConfig) -> dict[str, Provider]:
    providers: list[Provider] = [
        ShellProvider.from_config(config),
        ClaudeProvider(),
        CodexProvider(),
        GeminiProvider(),
        AmpProvider(),
    ]
    return {p.name: p for p in providers}


__all__ = [
    "AmpProvider",
    "ClaudeProvider",
    "CodexProvider",
    "CommandSpec",
    "ExitInfo",
    "GeminiProvider",
    "LineParser",
    "Provider",
    "ProviderStatus",
    "RunSpec",
    "ShellProvider",
    "build_providers",
]
