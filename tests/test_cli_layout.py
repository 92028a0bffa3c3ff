"""The CLI's shape: a thin parser over one module per command, and no reach into other modules' privates."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import asm_cli.commands
from asm_cli.main import build_parser

CLI = Path(asm_cli.commands.__file__).parent.parent
#: Private-looking names that are documented public API of the standard library.
ALLOWED = {("os", "_exit")}


def _command_modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(asm_cli.commands.__path__) if not m.name.startswith("_")]


def test_every_command_module_adds_its_parser_and_main_dispatches_to_it() -> None:
    names = _command_modules()
    assert {"node_serve", "node_drain", "run", "attach", "runs", "replay", "nodes", "controller_serve",
            "providers"} <= set(names)
    for name in names:
        module = importlib.import_module(f"asm_cli.commands.{name}")
        assert callable(getattr(module, "add_parser", None)), name
    # Every command dispatches to a function of the command module that defines it.
    argv = {
        "run": ["run", "--provider", "shell", "true"], "attach": ["attach", "r1", "--node", "127.0.0.1:1"],
        "runs": ["runs", "--node", "127.0.0.1:1"], "replay": ["replay", "store.jsonl"], "nodes": ["nodes"],
        "providers": ["providers"], "node_serve": ["node", "serve", "--listen", "127.0.0.1:0"],
        "node_drain": ["node", "drain", "--node", "127.0.0.1:1"],
        "controller_serve": ["controller", "serve", "--listen", "127.0.0.1:0"],
    }
    parser = build_parser()
    for module_name, args in [*argv.items(), ("node_drain", ["node", "undrain", "--node", "127.0.0.1:1"])]:
        assert parser.parse_args(args).func.__module__ == f"asm_cli.commands.{module_name}", args


def test_main_is_only_the_parser_and_dispatch() -> None:
    tree = ast.parse((CLI / "main.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert functions == {"build_parser", "main"}


def test_the_cli_reads_no_private_attribute_of_another_object() -> None:
    offences = []
    for path in sorted(CLI.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value.id if isinstance(node.value, ast.Name) else ast.unparse(node.value)
                if owner not in ("self", "cls") and (owner, node.attr) not in ALLOWED:
                    offences.append(f"{path.relative_to(CLI)}:{node.lineno}: {owner}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("asm_cli"):
                offences += [f"{path.relative_to(CLI)}:{node.lineno}: from {node.module} import {a.name}"
                             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert offences == []
