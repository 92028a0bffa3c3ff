"""``asm node serve``: a node agent."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from asm_cli.commands._common import EXIT_OK, Subcommands, limit_args, limit_settings, pairs, read_token, tls_args
from asm_cli.commands._duration import bounded_duration_ms

#: ``asm node serve`` flags that map one-to-one onto NodeConfig fields.
_NODE_SERVE_FIELDS = {
    "tokens_file": "tokens_file", "admin_principal": "admin_principals", "workspace_root": "workspace_roots",
    "max_runs": "max_runs", "node_id": "node_id", "shell_allow_interpolation": "shell_allow_interpolation",
    "shell_max_prompt_bytes": "shell_max_prompt_bytes", "env_allow": "env_allow",
    "allow_run_option": "allow_run_options", "detach_grace": "detach_grace_s", "retention_seconds": "retention_s",
    "retention_runs": "retention_max_runs", "retention_bytes": "retention_max_bytes",
    "journal_max_age": "journal_max_age_s", "journal_max_runs": "journal_max_runs", "backlog_bytes": "backlog_max_bytes",
    "replay_bytes": "replay_max_bytes_per_run", "replay_node_bytes": "replay_max_bytes_per_node",
    "line_cap": "line_cap_bytes", "metrics_listen": "metrics_listen", "metrics_insecure": "metrics_insecure",
}


def cmd_node_serve(args: argparse.Namespace) -> int:
    # The node agent is imported here, not with the module: `asm node drain` builds this parser too.
    from asm_cli.commands._secrets import take_secrets
    from asm_node import NodeConfig, serve
    from asm_node.config import MAX_APPROVAL_TIMEOUT_MS, MAX_DEADLINE_MS, MIN_APPROVAL_TIMEOUT_MS
    from asm_node.journal import default_state_dir

    secrets = take_secrets(getattr(args, "reexec_argv", None))
    # Precedence as before: --token-file, then ASM_TOKEN, then ASM_NODE_TOKEN (NodeConfig's own variable).
    token = read_token(args.token_file, secrets) or secrets.get("ASM_NODE_TOKEN")
    settings: dict[str, Any] = {
        "listen": args.listen, "insecure": args.insecure, "token": token,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_ca": args.tls_ca,
    }
    for flag, field_name in _NODE_SERVE_FIELDS.items():
        value = getattr(args, flag)
        if value is not None and value is not False and value != [] and value != "":
            settings[field_name] = value  # an unset flag keeps NodeConfig's default (or its ASM_NODE_* env)
    if args.shell_allow:
        settings["shell_allowed_commands"] = [*NodeConfig().shell_allowed_commands, *args.shell_allow]
    if args.shell_unconfined_reads:
        settings["shell_confine_reads"] = False
    # The run journal is durable by default for a served node (ASM_NODE_STATE_DIR also sets it).
    if args.state_dir is not None:
        settings["state_dir"] = args.state_dir
    elif "ASM_NODE_STATE_DIR" not in os.environ:
        settings["state_dir"] = default_state_dir()
    if args.label:
        settings["labels"] = pairs(args.label, "--label")
    # Durations (90, 30s, 2m, 1h): bounded here, so a bad one is one clear config_invalid line (exit 2).
    if args.approval_timeout is not None:
        settings["approval_timeout_ms"] = bounded_duration_ms(
            args.approval_timeout, "--approval-timeout", MIN_APPROVAL_TIMEOUT_MS, MAX_APPROVAL_TIMEOUT_MS)
    if args.run_timeout is not None:
        settings["run_timeout_ms"] = bounded_duration_ms(args.run_timeout, "--run-timeout", 1, MAX_DEADLINE_MS)
    if args.idle_timeout is not None:
        settings["idle_timeout_ms"] = bounded_duration_ms(args.idle_timeout, "--idle-timeout", 1, MAX_DEADLINE_MS)
    settings.update(limit_settings(args))
    config = NodeConfig(**{k: v for k, v in settings.items() if v is not None})

    def ready(node: Any) -> None:
        metrics = f", metrics on port {node.metrics_port}" if node.metrics_port else ""
        sys.stderr.write(
            f"asm node {node.agent.node_id} listening on {args.listen} (port {node.port}, epoch {node.agent.boot_epoch})"
            f"{metrics}\n"
        )
        sys.stderr.flush()

    asyncio.run(serve(config, on_ready=ready))
    return EXIT_OK


def add_parser(sub: Subcommands) -> None:
    s = sub.add_parser("serve", help="serve a node agent")
    s.add_argument("--listen", required=True, metavar="HOST:PORT")
    s.add_argument("--token-file", metavar="F", help="bearer token clients must present (or env ASM_TOKEN)")
    s.add_argument("--tokens-file", metavar="F",
                   help="named client tokens, NAME:TOKEN[:admin] per line; each name owns its runs")
    s.add_argument("--admin-principal", action="append", metavar="NAME",
                   help="client-certificate principal (cn:<CN>) with the admin role (repeatable)")
    tls_args(s, server=True)
    s.add_argument("--workspace-root", action="append", metavar="DIR", help="runs' cwd must be inside (repeatable)")
    s.add_argument("--max-runs", type=int, metavar="N", help="concurrent runs (default 8)")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback listen address without auth")
    s.add_argument("--node-id", help="node id (default: the hostname)")
    s.add_argument("--shell-allow", action="append", metavar="CMD", help="add a command to the shell allow-list (a name on the node's PATH, or an absolute path)")
    s.add_argument("--shell-allow-interpolation", action="store_true", help="let runs ask for /bin/sh -c")
    s.add_argument("--shell-unconfined-reads", action="store_true",
                   help="let cat/head/tail/ls/wc/date read outside the workspace roots (/proc, /sys, /dev stay refused)")
    s.add_argument("--shell-max-prompt-bytes", type=int, metavar="N",
                   help="refuse longer shell command lines before parsing (default 65536)")
    s.add_argument("--env-allow", action="append", metavar="VAR", help="env var a run request may set")
    s.add_argument("--allow-run-option", action="append", metavar="NAME",
                   help="operator-only provider option a run may set, e.g. args or anthropic_base_url "
                        "(repeatable; see 'asm providers')")
    s.add_argument("--detach-grace", type=float, metavar="SECONDS", help="interrupt runs left unattached this long")
    s.add_argument("--retention-seconds", type=float, metavar="S",
                   help="keep finished runs attachable this long (default 300)")
    s.add_argument("--retention-runs", type=int, metavar="N", help="keep at most N finished runs (default 1000)")
    s.add_argument("--retention-bytes", type=int, metavar="B",
                   help="keep at most B bytes of finished runs' events (default 268435456)")
    s.add_argument("--state-dir", metavar="DIR",
                   help="where the node's run journal lives (default $XDG_STATE_HOME/asm/node or "
                        "~/.local/state/asm/node); one node agent per directory")
    s.add_argument("--journal-max-age", type=float, metavar="S",
                   help="forget journaled runs this many seconds after they ended (default 604800: 7 days)")
    s.add_argument("--journal-max-runs", type=int, metavar="N",
                   help="journal at most N ended runs; the oldest ended are forgotten first (default 1000000)")
    s.add_argument("--backlog-bytes", type=int, metavar="B",
                   help="stop reading a CLI's stdout while its attached client is this far behind "
                        "(default 33554432)")
    s.add_argument("--replay-bytes", type=int, metavar="B",
                   help="keep at most B bytes of a running run's sent events for re-attach (default 67108864)")
    s.add_argument("--replay-node-bytes", type=int, metavar="B",
                   help="... and of all running runs together (default 268435456)")
    s.add_argument("--line-cap", type=int, metavar="BYTES", help="longest stdout line accepted (default 8 MiB)")
    s.add_argument("--approval-timeout", metavar="DURATION",
                   help="deny an approval nobody answered after this long, when the run sets no timeout of its own "
                        "(1s to 24h; default 2m)")
    s.add_argument("--run-timeout", metavar="DURATION",
                   help="default wall-clock deadline of every run (a run's --opt run_timeout_ms replaces it; "
                        "default: none): the run is stopped and fails with timeout, reason run_timeout")
    s.add_argument("--idle-timeout", metavar="DURATION",
                   help="default output-silence deadline (a run's --opt idle_timeout_ms replaces it; default: none; "
                        "a pending approval is not silence): the run fails with timeout, reason idle_timeout")
    s.add_argument("--label", action="append", metavar="KEY=VALUE", help="node label for routing selectors")
    s.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    limit_args(s)
    s.set_defaults(func=cmd_node_serve)
