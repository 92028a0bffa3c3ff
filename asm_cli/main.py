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
from collections.abc import Sequence
from typing import TYPE_CHECKING

from asm_cli.commands._base import (
    COMMANDS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NODE,
    EXIT_NODE_STOPPED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    NODE_STOPPED_KINDS,
    Parser,
    VersionAction,
    command_of,
    fail,
    failure_of,
)
from asm_wire._lazy import lazy_exports

if TYPE_CHECKING:
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

#: The command functions, importable from here as before (each imports its command module when read).
_COMMAND_FUNCTIONS = {
    "asm_cli.commands.approve": ("cmd_approve",), "asm_cli.commands.attach": ("cmd_attach",),
    "asm_cli.commands.controller_serve": ("cmd_controller_serve",), "asm_cli.commands.input": ("cmd_input",),
    "asm_cli.commands.logs": ("cmd_logs",), "asm_cli.commands.node_drain": ("cmd_node_drain", "cmd_node_undrain"),
    "asm_cli.commands.node_serve": ("cmd_node_serve",), "asm_cli.commands.nodes": ("cmd_nodes",),
    "asm_cli.commands.providers": ("cmd_providers",), "asm_cli.commands.replay": ("cmd_replay",),
    "asm_cli.commands.run": ("cmd_run",), "asm_cli.commands.runs": ("cmd_runs",),
    "asm_cli.commands.sessions": ("cmd_sessions",),
}
__getattr__, __dir__ = lazy_exports(__name__, _COMMAND_FUNCTIONS)

__all__ = [
    "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_NODE", "EXIT_NODE_STOPPED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE",
    "NODE_STOPPED_KINDS", "build_parser", "cmd_approve", "cmd_attach", "cmd_controller_serve", "cmd_input", "cmd_logs",
    "cmd_node_drain", "cmd_node_serve",
    "cmd_node_undrain", "cmd_nodes", "cmd_providers", "cmd_replay", "cmd_run", "cmd_runs", "cmd_sessions", "main",
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``asm`` parser: every command's (None), or only ``command``'s in full ("" for none), the others
    a name and a help line, so ``asm --help`` and one command import no other command's module."""
    parser = Parser(prog="asm", description="Run AI coding-agent CLIs on remote machines.")
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    # The order of COMMANDS is the order in `asm --help`.
    for name, (modules, help_line) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_line)
            continue
        where = sub
        if name in ("node", "controller"):  # a group: its modules add its subcommands
            group = sub.add_parser(name, help=help_line)
            where = group.add_subparsers(dest=f"{name}_command", required=True, parser_class=Parser)
        for module in modules:
            __import__(f"asm_cli.commands.{module}")  # (not importlib: python -X importtime shows these)
            sys.modules[f"asm_cli.commands.{module}"].add_parser(where)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(command_of(words)).parse_args(argv)
    # A server started from the command line may re-execute itself (see take_secrets); an in-process call never.
    args.reexec_argv = list(sys.argv[1:]) if argv is None else None
    serving = "serve" in (getattr(args, "node_command", None), getattr(args, "controller_command", None))
    if serving or "prometheus_client" in sys.modules:
        # `*_created` series double every counter for no use on a dashboard (a client never imports
        # prometheus_client; a server's metrics are made after this).
        from collections.abc import Callable

        import prometheus_client

        disable_created: Callable[[], None] = prometheus_client.disable_created_metrics
        disable_created()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not serving:
        # grpc's core logs a failed TLS handshake at INFO on stderr, beside the client's own one-line
        # error that already says it; GRPC_VERBOSITY (read when grpc loads) still shows them when set.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # `asm ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_OK)
    except Exception as exc:  # ValidationError, NodeConnectionError, AsmError: one line and an exit code
        failure = failure_of(exc)
        if failure is None:
            raise
        fail(*failure)
    sys.exit(code)


if __name__ == "__main__":
    main()
