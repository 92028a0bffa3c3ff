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
from asm_node.providers.base import RUN_OPTIONS


def manifest(name: str, config: NodeConfig | None = None) -> dict[str, Any]:
    providers = build_providers(config or NodeConfig())
    if name not in providers:
        from asm_wire import ConfigError

        raise ConfigError(f"unknown provider {name!r} (known: {', '.join(sorted(providers))})")
    p = providers[name]
    modes = p.permission_table()
    # The deadlines are every provider's: the node's run supervision handles them, not the CLI.
    options = sorted({*p.option_names(), *RUN_OPTIONS})
    if isinstance(p, CliProvider):
        client_options = sorted({*p.client_options(), *RUN_OPTIONS})
        operator_options = sorted(p.operator_options)
        node_only = sorted(p.node_only_options)
    else:
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


def _mode_cell(info: dict[str, Any]) -> str:
    if not info["supported"]:
        return f"**refused**: {info['reason']}"
    flags = " ".join(info["cli_args"])
    cell = f"`{flags}`" if flags else f"(no flag: {info['native']})"
    return f"{cell}; {info['notes']}" if info.get("notes") else cell


def permission_table_markdown(config: NodeConfig | None = None) -> str:
    """docs/providers.md's permission-mode table, derived from the providers' declarations (a test
    compares the two): one column per CLI provider, in registry order."""
    rows = [m for m in manifests(config) if m["env_var"]]  # the CLI providers (shell has no modes of its own)
    names = [m["display_name"].removesuffix(" CLI") for m in rows]
    lines = ["| asm | " + " | ".join(names) + " |", "|---" * (len(rows) + 1) + "|"]
    for mode in rows[0]["permission_modes"] if rows else ():
        cells = [_mode_cell(m["permission_modes"][mode]).replace("|", "\\|") for m in rows]
        lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
