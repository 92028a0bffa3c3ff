"""The ``asm`` command line: the composition root of node and controller.

    asm node serve --listen HOST:PORT [--token-file F] [--tokens-file F] [--tls-cert F --tls-key F [--tls-ca F]]
                   [--workspace-root DIR ...] [--max-runs N] [--insecure]
    asm run [--node HOST:PORT ...] --provider P [--cwd DIR] [--permission-mode M]
            [--output text|jsonl] [--opt KEY=VALUE ...] PROMPT
    asm nodes --node HOST:PORT ... [--provider P [--cwd DIR]] [--output table|json]
    asm node drain [--controller C] --node HOST:PORT [--deadline S];  asm node undrain [--controller C] --node HOST:PORT
    asm attach RUN_ID (--node HOST:PORT | --controller C) [--output text|jsonl] [--after-seq N]
    asm approve RUN_ID APPROVAL_ID allow|deny [--reason R] (--node HOST:PORT | --controller C)
    asm runs (--node HOST:PORT | --controller C) [--status S] [--output text|json]
             [--session ID] [--provider P] [--node-address A] [--since T] [--until T] [--page-size N] [--page-token T|--all]
    asm logs RUN_ID (--controller C | --node HOST:PORT) [--follow] [--after-seq N] [--output text|jsonl]
    asm sessions --controller C [--provider P] [--node A] [--output text|json];  asm sessions --node N --provider P
    asm input RUN_ID TEXT (--controller C | --node HOST:PORT)     # steer a running (Claude) run

Exit codes: 0 success; 1 the run failed; 2 usage or configuration error;
3 no node could be used (unreachable, refused, incompatible); 4 the node stopped
the run (node_draining, node_shutdown: retry elsewhere); 5 no such run (asm attach, asm replay: not_found);
130 interrupted (Ctrl-C; asm attach: detached, the run goes on).
A user mistake prints one ``asm: error: ...`` line, never a traceback.

This module is the thin parser and dispatch; each command lives in ``asm_cli.commands``
(one module per command, each adding its parser with ``add_parser(sub)``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

import prometheus_client
from pydantic import ValidationError

from asm_cli.commands import (
    approve,
    attach,
    controller_serve,
    input,
    logs,
    node_drain,
    node_serve,
    nodes,
    providers,
    replay,
    run,
    runs,
    sessions,
)
from asm_cli.commands._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NODE,
    EXIT_NODE_STOPPED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    NODE_STOPPED_KINDS,
    Parser,
    fail,
)
from asm_cli.commands.approve import cmd_approve
from asm_cli.commands.attach import cmd_attach
from asm_cli.commands.controller_serve import cmd_controller_serve
from asm_cli.commands.input import cmd_input
from asm_cli.commands.logs import cmd_logs
from asm_cli.commands.node_drain import cmd_node_drain, cmd_node_undrain
from asm_cli.commands.node_serve import cmd_node_serve
from asm_cli.commands.nodes import cmd_nodes
from asm_cli.commands.providers import cmd_providers
from asm_cli.commands.replay import cmd_replay
from asm_cli.commands.run import cmd_run
from asm_cli.commands.runs import cmd_runs
from asm_cli.commands.sessions import cmd_sessions
from asm_controller import NodeConnectionError
from asm_wire import AsmError, __version__

__all__ = [
    "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_NODE", "EXIT_NODE_STOPPED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE",
    "NODE_STOPPED_KINDS", "build_parser", "cmd_approve", "cmd_attach", "cmd_controller_serve", "cmd_input", "cmd_logs",
    "cmd_node_drain", "cmd_node_serve",
    "cmd_node_undrain", "cmd_nodes", "cmd_providers", "cmd_replay", "cmd_run", "cmd_runs", "cmd_sessions", "main",
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="asm", description="Run AI coding-agent CLIs on remote machines.")
    parser.add_argument("--version", action="version", version=f"asm {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    # The order here is the order in `asm --help`.
    node = sub.add_parser("node", help="node agent commands")
    node_sub = node.add_subparsers(dest="node_command", required=True, parser_class=Parser)
    node_serve.add_parser(node_sub)
    node_drain.add_parser(node_sub)  # drain and undrain
    run.add_parser(sub)
    attach.add_parser(sub)
    input.add_parser(sub)
    approve.add_parser(sub)
    logs.add_parser(sub)
    runs.add_parser(sub)
    sessions.add_parser(sub)
    controller = sub.add_parser("controller", help="controller service commands")
    controller_sub = controller.add_subparsers(dest="controller_command", required=True, parser_class=Parser)
    controller_serve.add_parser(controller_sub)
    replay.add_parser(sub)
    providers.add_parser(sub)
    nodes.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # A server started from the command line may re-execute itself (see take_secrets); an in-process call never.
    args.reexec_argv = list(sys.argv[1:]) if argv is None else None
    # `*_created` series double every counter for no use on a dashboard.
    disable_created: Callable[[], None] = prometheus_client.disable_created_metrics
    disable_created()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        fail(problems)
    except NodeConnectionError as exc:
        fail(exc.message, EXIT_NODE)
    except AsmError as exc:
        fail(exc.message, EXIT_USAGE if exc.kind == "config_invalid" else
             EXIT_NOT_FOUND if exc.kind == "not_found" else EXIT_FAILED)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # `asm ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_OK)
    sys.exit(code)


if __name__ == "__main__":
    main()
