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

#: The registry: one line per provider (its module declares the rest). Its order is the order of
#: `asm providers`, the manifests and the CLI help. Tests may add one with :func:`register`.
REGISTRY: list[type[Provider]] = [
    ShellProvider,
    ClaudeProvider,
    CodexProvider,
    GeminiProvider,
    AmpProvider,
]


def register(cls: type[Provider]) -> type[Provider]:
    """Add a provider class to the registry (replacing one of the same name); returns it."""
    unregister(cls.name)
    REGISTRY.append(cls)
    return cls


def unregister(name: str) -> None:
    REGISTRY[:] = [c for c in REGISTRY if c.name != name]


def provider_names() -> tuple[str, ...]:
    """Every registered provider's name, in registry order."""
    return tuple(c.name for c in REGISTRY)


def provider_class(name: str) -> type[Provider] | None:
    return next((c for c in REGISTRY if c.name == name), None)


def provider_help() -> str:
    """The providers as a CLI help text says them: "shell, claude, codex, gemini or amp"."""
    names = provider_names()
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _cli_classes() -> list[type[CliProvider]]:
    return [c for c in REGISTRY if issubclass(c, CliProvider)]


def build_providers(config: NodeConfig) -> dict[str, Provider]:
    providers = [cls.build(config) for cls in REGISTRY]
    check_operator_config(config, [p for p in providers if isinstance(p, CliProvider)])
    return {p.name: p for p in providers}


def operator_option_names() -> frozenset[str]:
    """Every operator-only option of every CLI provider."""
    return frozenset().union(*(cls.operator_options for cls in _cli_classes()))


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
    "REGISTRY",
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
    "provider_class",
    "provider_help",
    "provider_names",
    "register",
    "unregister",
]
