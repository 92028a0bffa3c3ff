"""What ``asm`` needs before it knows the command: exit codes, the parser class, the command table,
and how a failure becomes an exit code. Standard library only.

``asm --version`` and ``asm --help`` import this module and nothing of gRPC, protobuf, the node agent,
settings, metrics or rich; ``asm run ...`` imports the ``run`` command module alone (issue 15: a client
invocation spent 93 % of its ~220 ms importing what it never used).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NODE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: The node stopped the run (drain deadline, shutdown): not the user's Ctrl-C; retry elsewhere.
EXIT_NODE_STOPPED = 4
#: No run by that id (``asm attach``, error kind not_found): nothing was followed, nothing started.
EXIT_NOT_FOUND = 5
NODE_STOPPED_KINDS = frozenset({"node_draining", "node_shutdown"})

#: The commands in ``asm --help`` order: name -> (its command modules, its help line). A group
#: (``node``, ``controller``) has several modules, each adding its subcommands. The help lines are
#: those the modules give their parsers (tests/test_cli_imports.py checks the help is the same
#: whether one command or all were built).
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "node": (("node_serve", "node_drain"), "node agent commands"),
    "run": (("run",), "run a prompt on a node (an embedded one when no --node is given)"),
    "attach": (("attach",), "follow an existing run to its end (replay, then live); never starts one"),
    "input": (("input",), "steer a running run: send a user message to its CLI (Claude)"),
    "approve": (("approve",), "answer a run's pending approval (allow or deny)"),
    "logs": (("logs",), "a run's logged events (--follow: on to its end, as attach)"),
    "runs": (("runs",), "the runs a node holds, or a controller knows: a table or JSON"),
    "sessions": (("sessions",), "a controller's sessions (runs grouped), or the resumable sessions "
                                "a provider's CLI keeps on a node"),
    "controller": (("controller_serve",), "controller service commands"),
    "replay": (("replay",), "print a recorded run's events and its Result, rebuilt from an event store"),
    "providers": (("providers",), "what each provider supports (permission modes, features, options)"),
    "nodes": (("nodes",), "the fleet as a table: state, epoch, load, providers, heartbeat age"),
}
#: The top-level options that take a value (the command is the first word that is not an option).
_VALUE_OPTIONS = ("--log-level",)
_FLAG_OPTIONS = ("-h", "--help", "--version")


class Subcommands(Protocol):
    """Where a command module adds its parser (``argparse``'s subparsers action)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


class Parser(argparse.ArgumentParser):
    """A usage error is one ``asm: error: ...`` line and exit 2.

    A help text that is costly to make (``--provider``'s lists the provider registry, which imports
    the node's provider modules) is given by :func:`later_help` and made only when help is printed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.formatting = False  # laying out help or usage text (see _get_formatter)
        super().__init__(*args, **kwargs)
        self.later_help: list[tuple[argparse.Action, Callable[[], str]]] = []

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"asm: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)

    def format_help(self) -> str:
        later, self.later_help = self.later_help, []
        for action, make in later:
            action.help = make()
        self.formatting = True
        try:
            return super().format_help()
        finally:
            self.formatting = False

    def format_usage(self) -> str:
        self.formatting = True
        try:
            return super().format_usage()
        finally:
            self.formatting = False

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every add_argument (to check its metavar), and each asks for
        # the terminal's width, importing shutil (with zlib, bz2, lzma: ~5 ms of a client's start).
        # Only help and usage text are laid out to the terminal; the check needs no width.
        if getattr(self, "formatting", False) or self.formatter_class is not argparse.HelpFormatter:
            return self.formatter_class(prog=self.prog)  # what argparse's own _get_formatter does
        return argparse.HelpFormatter(prog=self.prog, width=80)


def later_help(parser: argparse.ArgumentParser, action: argparse.Action, make: Callable[[], str]) -> None:
    """Give ``action`` (an option of ``parser``) the help ``make()`` returns, made when help is printed."""
    if isinstance(parser, Parser):
        parser.later_help.append((action, make))
    else:  # a plain ArgumentParser: the same text, made now
        action.help = make()


class VersionAction(argparse.Action):
    """``--version``: argparse's version action, the version read only when it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "show program's version number and exit") -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from asm_wire import __version__

        sys.stdout.write(f"asm {__version__}\n")
        parser.exit()


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (``run``, ``node``, ...), "" when it names none (``asm``, ``asm --help``,
    ``asm --version``), None when unsure (an abbreviated option, an unknown word): build every parser."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _VALUE_OPTIONS:
            skip = True
        elif word in _FLAG_OPTIONS or any(word.startswith(f"{o}=") for o in _VALUE_OPTIONS):
            continue
        elif word.startswith("-"):
            return None
        else:
            return word if word in COMMANDS else None
    return ""


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    sys.stderr.write(f"asm: error: {message}\n")
    sys.exit(code)


def _instance(exc: BaseException, module: str, name: str) -> bool:
    """``isinstance(exc, module.name)``, without importing ``module``: unimported, nothing raised one."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(exc, getattr(loaded, name))


def failure_of(exc: Exception) -> tuple[str, int] | None:
    """The ``asm: error:`` message and exit code of a command's exception, None for a bug (a traceback)."""
    err: Any = exc
    if _instance(exc, "pydantic", "ValidationError"):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        return problems, EXIT_USAGE
    if _instance(exc, "asm_wire._errors", "NodeConnectionError"):
        return err.message, EXIT_NODE
    if _instance(exc, "asm_wire._errors", "AsmError"):
        return err.message, (EXIT_USAGE if err.kind == "config_invalid" else
                             EXIT_NOT_FOUND if err.kind == "not_found" else EXIT_FAILED)
    return None
