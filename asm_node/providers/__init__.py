"""Provider registry: one module per provider (command builder + line parser)."""

from __future__ import annotations

from asm_node.config import NodeConfig
from asm_node.providers.base import (
    CommandSpec,
    ExitInfo,
    LineParser,
    Provider,
    ProviderStatus,
    RunSpec,
)
from asm_node.providers.shell import ShellProvider


def build_providers(config: NodeConfig) -> dict[str, Provider]:
    providers: list[Provider] = [
        ShellProvider(config.shell_allowed_commands, config.shell_denied_commands, config.shell_allow_interpolation),
    ]
    return {p.name: p for p in providers}


__all__ = [
    "CommandSpec", "ExitInfo", "LineParser", "Provider", "ProviderStatus", "RunSpec",
    "ShellProvider", "build_providers",
]
