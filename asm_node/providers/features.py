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

# Common features: supported?, and how (notes shown to users).
_FEATURES: dict[str, dict[str, tuple[bool, str]]] = {
    "claude": {
        "streaming": (True, "--include-partial-messages text deltas"),
        "tools": (True, "tool_use / tool_result from assistant and user lines"),
        "resume": (True, "--resume=<session_id>, or --continue for the latest"),
        "interrupt": (True, "SIGINT to the process group; the session stays resumable"),
        "cost": (True, "usage and total_cost_usd from the result line"),
        "approvals": (False, "--print mode never prompts; the permission mode decides"),
        "ollama": (True, "ANTHROPIC_BASE_URL/AUTH_TOKEN pointed at Ollama"),
    },
    "codex": {
        "streaming": (True, "item events; agent messages arrive whole"),
        "tools": (True, "command_execution, file_change, mcp_tool_call, web_search, todo_list"),
        "resume": (True, "exec resume <thread_id>, or exec resume --last"),
        "interrupt": (True, "SIGINT to the process group; the thread stays resumable"),
        "cost": (True, "usage from turn.completed, priced with the table"),
        "approvals": (False, "codex exec never prompts"),
        "ollama": (True, "--oss with model_provider ollama"),
    },
    "gemini": {
        "streaming": (True, "assistant message deltas"),
        "tools": (True, "tool_use / tool_result"),
        "resume": (True, "--resume=<session_id> or --resume=latest"),
        "interrupt": (True, "SIGINT to the process group"),
        "cost": (True, "stats from the result line, priced with the table"),
        "approvals": (False, "headless mode never prompts; --approval-mode / --yolo decide"),
        "ollama": (False, "not supported by the Gemini CLI"),
    },
    "amp": {
        "streaming": (True, "Claude-compatible --stream-json"),
        "tools": (True, "tool_use / tool_result"),
        "resume": (True, "amp threads continue <thread_id>"),
        "interrupt": (True, "SIGINT to the process group"),
        "cost": (True, "usage from the stream"),
        "approvals": (False, "--execute mode never prompts"),
        "ollama": (False, "not supported by Amp"),
    },
    "shell": {
        "streaming": (True, "one assistant_delta per stdout line"),
        "tools": (False, ""),
        "resume": (False, ""),
        "interrupt": (True, "SIGINT to the process group"),
        "cost": (False, ""),
        "approvals": (False, ""),
        "ollama": (False, ""),
    },
}


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
        "common_features": {k: {"supported": s, "notes": n} for k, (s, n) in _FEATURES[name].items()},
        "options": options,
        #: Who may set what: any client / a run only with `--allow-run-option NAME` / never a run.
        "client_options": client_options,
        "operator_options": operator_options,
        "node_only_options": node_only,
    }


def manifests(config: NodeConfig | None = None) -> list[dict[str, Any]]:
    return [manifest(n, config) for n in ("claude", "codex", "gemini", "amp", "shell")]
