"""Provider registry: one module per provider (command builder + line parser)."""

from __future__ import annotations

from asm_node.config import NodeConfig
from asm_node.providers._cli import CliProvider
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
from asm_wire import ConfigError

_CLI_CLASSES: tuple[type[CliProvider], ...] = (ClaudeProvider, CodexProvider, GeminiProvider, AmpProvider)


def build_providers(config: NodeConfig) -> dict[str, Provider]:
    clis = [cls(config.allow_run_options) for cls in _CLI_CLASSES]
    check_operator_config(config, clis)
    providers: list[Provider] = [
        ShellProvider.from_config(config),
        *clis,
    ]
    return {p.name: p for p in providers}


def operator_option_names() -> frozenset[str]:
    """Every operator-only option of every CLI provider."""
    return frozenset().union(*(cls.operator_options for cls in _CLI_CLASSES))


def check_operator_config(config: NodeConfig, clis: list[CliProvider]) -> None:
    """Refuse, at start-up, allowances that name no operator option or hand a run the choice of binary."""
    known = set().union(*(p.operator_options for p in clis))
    node_only = set().union(*(p.node_only_options for p in clis))
    for name in config.allow_run_options:
        if name in node_only:
            raise ConfigError(f"--allow-run-option {name}: {name} is node configuration, never set by a run "
                              f"(set {', '.join(p.env_var for p in clis)} in the node's environment)")
        if name not in known:
            raise ConfigError(f"--allow-run-option {name}: no provider has an operator-only option {name!r} "
                              f"(known: {', '.join(sorted(known))})")
    path_vars = sorted({p.env_var for p in clis} & set(config.env_allow))
    if path_vars:
        raise ConfigError(f"--env-allow {path_vars[0]}: the CLI binary is node configuration, never chosen by a run")


__all__ = [
    "AmpProvider",
    "ClaudeProvider",
    "CliProvider",
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
    "operator_option_names",
]
