"""``asm providers``: what each provider supports."""

from __future__ import annotations

import argparse
import json
import sys

from asm_cli.commands._common import EXIT_OK, Subcommands


def cmd_providers(args: argparse.Namespace) -> int:
    from asm_node.providers.features import manifests

    rows = manifests()
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    for m in rows:
        sys.stdout.write(f"{m['provider']} ({m['display_name']}{', CLI path from $' + m['env_var'] if m['env_var'] else ''})\n")
        for mode, info in m["permission_modes"].items():
            flags = " ".join(info.get("cli_args", [])) or "(no flag)"
            text = f"{info['native']}: {flags}" if info["supported"] else f"refused: {info['reason']}"
            if info.get("notes"):
                text += f" ({info['notes']})"
            sys.stdout.write(f"  permission {mode:<8} {text}\n")
        for feat, info in m["common_features"].items():
            sys.stdout.write(f"  {feat:<10} {'yes' if info['supported'] else 'no ':<4} {info['notes']}\n")
        sys.stdout.write(f"  options any client may set: {', '.join(m['client_options'])}\n")
        if m["operator_options"]:
            sys.stdout.write(f"  operator-only (asm node serve --allow-run-option NAME): "
                             f"{', '.join(m['operator_options'])}\n")
        if m["node_only_options"]:
            sys.stdout.write(f"  node configuration only, never a run's: {', '.join(m['node_only_options'])} "
                             f"(set ${m['env_var']})\n")
    return EXIT_OK


def add_parser(sub: Subcommands) -> None:
    pr = sub.add_parser("providers", help="what each provider supports (permission modes, features, options)")
    pr.add_argument("--output", default="text", choices=["text", "json"])
    pr.set_defaults(func=cmd_providers)
