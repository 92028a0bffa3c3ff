"""ProviderFeatures: what each provider supports, with native permission names and CLI flags.

Queryable from Python (:func:`manifest`, :func:`manifests`) and from
``asm providers [--output json]``, with which options a client may set and
which only the node operator may allow (``--allow-run-option``).
"""

from __future__ import annotations

from typing import Any

from asm_node.config import NodeConfig
from asm_node.providers import build_providers
from asm_node.providers._cli import CliProvider
from asm_wire import PermissionMode, choices


def manifest(name: str, config: NodeConfig | None = None) -> dict[str, Any]:
    providers = build_providers(config or NodeConfig())
    if name not in providers:
        from asm_wire import ConfigError

        raise ConfigError(f"unknown provider {name!r} (known: {', '.join(sorted(providers))})")
    p = providers[name]
    modes: dict[str, Any] = {}
    if isinstance(p, CliProvider):
        for mode in choices(PermissionMode):
            if mode in p.unsupported_modes:
                modes[mode] = {"supported": False, "reason": p.unsupported_modes[mode]}
            else:
                native, args = p.permission_modes[mode]
                modes[mode] = {"supported": True, "native": native, "cli_args": list(args)}
        options = sorted(p.options_model.model_fields)
        client_options = p.client_options()
        operator_options = sorted(p.operator_options)
        node_only = sorted(p.node_only_options)
    else:
        modes = {m: {"supported": True, "native": m, "cli_args": []} for m in choices(PermissionMode)}
        options = ["allowed_commands", "command_timeout_ms", "denied_commands", "interpolate", "success_exit_codes"]
        client_options, operator_options, node_only = options, [], []
    return {
        "provider": name,
        "display_name": p.display_name,
        "env_var": p.env_var,
        "permission_modes": modes,
        "common_features": {k: {"supported": s, "notes": n} for k, (s, n) in p.features.items()},
        "options": options,
        #: Who may set what: any client / a run only with `--allow-run-option NAME` / never a run.
        "client_options": client_options,
        "operator_options": operator_options,
        "node_only_options": node_only,
    }


def manifests(config: NodeConfig | None = None) -> list[dict[str, Any]]:
    """Every provider's manifest, in the registry's order (each provider declares its own features)."""
    return [manifest(n, config) for n in build_providers(config or NodeConfig())]
