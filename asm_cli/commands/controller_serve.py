"""``asm controller serve``: the fleet behind one NodeService."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from asm_cli.commands._common import EXIT_OK, Subcommands, limit_args, limit_settings, read_token, tls_args
from asm_cli.commands._secrets import take_secrets
from asm_controller import LivenessConfig, TLSConfig
from asm_wire import Strategy, choices


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text[:40]!r}") from None
    if not 0 < value < 10**10:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text[:40]}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 2**62:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}")
    return int(text)


def _completion_option(text: str) -> tuple[str, str, Any]:
    """``PROVIDER:KEY=VALUE`` (VALUE as JSON when it parses: true, 3, "x"; else the text itself)."""
    provider, sep, rest = text.partition(":")
    key, eq, raw = rest.partition("=")
    if not sep or not eq or not provider.strip() or not key.strip():
        raise argparse.ArgumentTypeError(f"expected PROVIDER:KEY=VALUE (e.g. codex:skip_git_repo_check=true), "
                                         f"got {text[:80]!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return provider.strip().lower(), key.strip(), value


def _completion_options(items: list[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for provider, key, value in items:
        out.setdefault(provider, {})[key] = value
    return out


def _non_negative_int(text: str) -> int:
    if not text.isdigit() or int(text) > 2**31:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text[:40]!r}")
    return int(text)


def _replica_id(text: str) -> str:
    from asm_wire import valid_id

    if len(text) > 64 or not valid_id(text):
        raise argparse.ArgumentTypeError(f"a replica id is 1-64 letters, digits, '-', '_', '.' or ':', got {text[:70]!r}")
    return text


def _controller_state(args: argparse.Namespace) -> str:
    """--state as given (or env ASM_CONTROLLER_STATE: a URL with a password stays out of ps), else SQLite
    in --state-dir (default: the per-user state directory)."""
    if args.state:
        return str(args.state)
    if os.environ.get("ASM_CONTROLLER_STATE"):
        return os.environ["ASM_CONTROLLER_STATE"]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    state_dir = Path(args.state_dir) if args.state_dir else Path(base) / "asm" / "controller"
    return f"sqlite:///{state_dir.resolve() / 'controller.sqlite3'}"


def cmd_controller_serve(args: argparse.Namespace) -> int:
    from asm_controller.service import ControllerConfig, serve_controller

    secrets = take_secrets(getattr(args, "reexec_argv", None))
    token = read_token(args.token_file, secrets)
    node_token = read_token(args.node_token_file) if args.node_token_file else token
    node_tls = None
    if args.node_tls_ca or args.node_tls_cert or args.node_tls_key:
        node_tls = TLSConfig.from_files(args.node_tls_ca, args.node_tls_cert, args.node_tls_key)
    config = ControllerConfig(
        listen=args.listen, nodes=list(args.node or []),
        nodes_file=Path(args.nodes_file) if args.nodes_file else None, nodes_dns=args.nodes_dns,
        metrics_listen=args.metrics_listen, token=token, node_token=node_token,
        tokens_file=Path(args.tokens_file) if args.tokens_file else None,
        admin_principals=list(args.admin_principal or []),
        tls_cert=Path(args.tls_cert) if args.tls_cert else None, tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_ca=Path(args.tls_ca) if args.tls_ca else None, node_tls=node_tls, insecure=args.insecure,
        strategy=args.strategy, liveness=LivenessConfig(node_lost_timeout_s=args.node_lost_timeout),
        expected_providers=list(args.expect_provider or []),
        metrics_insecure=args.metrics_insecure,
        limits=dataclasses.replace(ControllerConfig().limits, **limit_settings(args)),
        state=_controller_state(args), state_max_age_s=args.state_max_age,
        history_max_bytes=args.history_bytes, log_retention_bytes=args.log_retention_bytes,
        replica_id=args.replica_id, advertise=args.advertise, lease_ttl_s=args.lease_ttl, max_queued=args.max_queued,
        http_listen=args.http_listen, completion_options=_completion_options(args.completion_option or []),
    )

    def ready(ctl: Any) -> None:
        metrics = f", metrics on port {ctl.metrics_port}" if ctl.metrics_port else ""
        metrics += f", HTTP on port {ctl.http_port}" if ctl.http_port else ""
        sys.stderr.write(f"asm controller listening on {args.listen} (port {ctl.port}){metrics}; "
                         f"nodes: {', '.join(t.address for t in ctl.api.targets) or '(none yet)'}\n")
        sys.stderr.flush()

    asyncio.run(serve_controller(config, on_ready=ready))
    return EXIT_OK


def add_parser(sub: Subcommands) -> None:
    cs = sub.add_parser("serve", help="serve a long-running controller in front of a fleet of nodes")
    cs.add_argument("--listen", required=True, metavar="HOST:PORT")
    cs.add_argument("--node", action="append", metavar="HOST:PORT", help="a node of the fleet (repeatable)")
    cs.add_argument("--nodes-file", metavar="F", help="file with one HOST:PORT per line (re-read periodically)")
    cs.add_argument("--nodes-dns", metavar="NAME:PORT",
                    help="DNS name resolving to every node (e.g. a Kubernetes headless Service); re-resolved")
    cs.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    cs.add_argument("--completion-option", action="append", type=_completion_option, metavar="PROVIDER:KEY=VALUE",
                    help="a provider option every chat completion of PROVIDER gets (a chat request names only the "
                         "model), e.g. codex:skip_git_repo_check=true (repeatable)")
    cs.add_argument("--http-listen", metavar="HOST:PORT",
                    help="serve the HTTP API (REST + SSE: /v1/runs, /v1/nodes, /openapi.json) here too; same "
                         "tokens and TLS as gRPC (port 0: a free one, printed in the ready line)")
    limit_args(cs)
    cs.add_argument("--token-file", metavar="F", help="bearer token clients must present (or env ASM_TOKEN)")
    cs.add_argument("--tokens-file", metavar="F",
                    help="named client tokens, NAME:TOKEN[:admin] per line; each name owns its runs")
    cs.add_argument("--admin-principal", action="append", metavar="NAME",
                    help="client-certificate principal (cn:<CN>) with the admin role (repeatable)")
    cs.add_argument("--node-token-file", metavar="F", help="token for the nodes (default: the same token)")
    tls_args(cs, server=True)
    cs.add_argument("--node-tls-ca", metavar="F", help="CA of the nodes' certificates")
    cs.add_argument("--node-tls-cert", metavar="F", help="client certificate for the nodes (mutual TLS)")
    cs.add_argument("--node-tls-key", metavar="F", help="its key")
    cs.add_argument("--insecure", action="store_true", help="allow a non-loopback listen address without auth")
    cs.add_argument("--strategy", default=Strategy.LEAST_LOADED.value, choices=choices(Strategy),
                    help="how runs are spread over the nodes (default least_loaded: power-of-two choices on load)")
    cs.add_argument("--node-lost-timeout", type=float, default=8.0, metavar="SECONDS")
    cs.add_argument("--state", metavar="URL",
                    help="the run registry: sqlite:///PATH, postgresql://USER:PASS@HOST:PORT/DB or memory: "
                         "(default: SQLite in --state-dir)")
    cs.add_argument("--state-dir", metavar="DIR",
                    help="where the default SQLite registry lives (default $XDG_STATE_HOME/asm/controller, "
                         "else ~/.local/state/asm/controller)")
    cs.add_argument("--state-max-age", type=_positive_float, default=7 * 86400.0, metavar="SECONDS",
                    help="ended runs leave the registry after this long (default 7 days)")
    cs.add_argument("--history-bytes", type=_positive_int, default=64 * 2**20, metavar="N",
                    help="per-run bound of the registry's event log (default 64 MiB)")
    cs.add_argument("--log-retention-bytes", type=_positive_int, default=2**30, metavar="N",
                    help="total size of ended runs' event logs kept; the oldest go first (default 1 GiB)")
    cs.add_argument("--replica-id", type=_replica_id, metavar="ID",
                    help="this replica's id in a shared (PostgreSQL) store; a stable one (a pod name) takes its "
                         "runs back at once after a restart (default: HOSTNAME-RANDOM)")
    cs.add_argument("--advertise", metavar="HOST:PORT",
                    help="the address clients reach this replica at, shown by asm nodes (default: --listen)")
    cs.add_argument("--lease-ttl", type=_positive_float, default=10.0, metavar="SECONDS",
                    help="a replica's runs are taken over this long after it stopped renewing (default 10)")
    cs.add_argument("--max-queued", type=_non_negative_int, default=10_000, metavar="N",
                    help="runs that may wait in the fleet queue when every node is full (default 10000; "
                         "0: refuse at_capacity at once)")
    cs.add_argument("--expect-provider", action="append", metavar="NAME",
                    help="a provider the fleet must offer: NoHealthyNodeForProvider alerts for it even before any "
                         "node advertised it (repeatable)")
    cs.set_defaults(func=cmd_controller_serve)
